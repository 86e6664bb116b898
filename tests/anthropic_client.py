"""Drives a running flashmoe server with the official `anthropic` package (argv[1] = base URL)."""
import sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="not-needed")
ask = [{"role": "user", "content": "Speak as ROMEO."}]

# streamed message, through the client's own event accumulation
with client.messages.stream(model="any-model", max_tokens=24, extra_body={"temperature": 0}, messages=ask) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed and final.stop_reason in ("end_turn", "max_tokens"), (streamed, final.stop_reason)
assert final.content[0].type == "text" and final.content[0].text == streamed, final

# the same, whole: same text, consistent usage
r = client.messages.create(model="any-model", max_tokens=24, extra_body={"temperature": 0}, messages=ask)
assert r.content[0].text == streamed, (r.content, streamed)
assert r.usage.output_tokens > 0 and r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) > 0, r.usage

# a stop sequence is reported as such
word = streamed.split()[1] if len(streamed.split()) > 1 else streamed.split()[0]
r = client.messages.create(model="any-model", max_tokens=24, extra_body={"temperature": 0}, messages=ask, stop_sequences=[word])
assert r.stop_reason == "stop_sequence" and r.stop_sequence == word, r

# tool use round trip, whole and streamed
tools = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
msgs = [{"role": "user", "content": "What is the weather in Mantua?"}]
r = client.messages.create(model="any-model", max_tokens=60, extra_body={"temperature": 0}, messages=msgs, tools=tools)
assert r.stop_reason == "tool_use", r
use = [b for b in r.content if b.type == "tool_use"][0]
assert use.name == "get_weather" and use.input.get("city") == "Mantua", use
with client.messages.stream(model="any-model", max_tokens=60, extra_body={"temperature": 0}, messages=msgs, tools=tools) as stream:
    final = stream.get_final_message()
s_use = [b for b in final.content if b.type == "tool_use"][0]
assert final.stop_reason == "tool_use" and s_use.input == use.input, final
msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]})
msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
             "content": '{"city": "Mantua", "weather": "foggy", "temperature": 9}'}]})
r = client.messages.create(model="any-model", max_tokens=40, extra_body={"temperature": 0}, messages=msgs, tools=tools)
answer = "".join(b.text for b in r.content if b.type == "text")
assert "Mantua" in answer and "foggy" in answer, answer

# a required call ("any") even where the model would answer in words, and a named one
r = client.messages.create(model="any-model", max_tokens=80, extra_body={"temperature": 0}, tools=tools,
                           messages=[{"role": "user", "content": "Speak as ROMEO."}], tool_choice={"type": "any"})
use = [b for b in r.content if b.type == "tool_use"][0]
assert r.stop_reason == "tool_use" and use.name == "get_weather" and isinstance(use.input.get("city"), str), r

# refusals come back as anthropic exceptions
try:
    client.messages.create(model="any-model", max_tokens=10, messages=msgs, tools=tools,
                           tool_choice={"type": "tool", "name": "nope"})
    raise SystemExit("undeclared tool_choice accepted")
except anthropic.BadRequestError as e:
    assert "tool_choice" in str(e), e
print("all anthropic client checks passed")
