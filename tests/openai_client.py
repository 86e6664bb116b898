"""Drives a running flashmoe server with the official `openai` package (argv[1] = base URL)."""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")
model = client.models.list().data[0].id
assert model == "flashmoe-default", model

# streamed chat
pieces, finish = [], None
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}], max_tokens=24, temperature=0, stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
streamed = "".join(pieces)
assert streamed and finish in ("stop", "length"), (streamed, finish)

# the same, not streamed: same text, consistent usage
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}], max_tokens=24, temperature=0
)
assert r.choices[0].message.content == streamed, (r.choices[0].message.content, streamed)
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# tool call round trip
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
msgs = [{"role": "user", "content": "What is the weather in Mantua?"}]
r = client.chat.completions.create(model=model, messages=msgs, tools=tools, temperature=0, max_tokens=60)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
assert call.function.name == "get_weather", call
args = json.loads(call.function.arguments)
assert args.get("city") == "Mantua", args
msgs.append(choice.message.model_dump(exclude_none=True))
msgs.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Mantua", "weather": "foggy", "temperature": 9})})
r = client.chat.completions.create(model=model, messages=msgs, tools=tools, temperature=0, max_tokens=40)
answer = r.choices[0].message.content
assert "Mantua" in answer and "foggy" in answer, answer

# errors come back as openai exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("unknown model accepted")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e
print("all openai client checks passed")
