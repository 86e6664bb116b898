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

# structured output: a pydantic model through `parse` (json_schema, strict), and json_object
from typing import Literal
from pydantic import BaseModel


class Line(BaseModel):
    speaker: Literal["ROMEO", "JULIET", "NURSE"]
    mood: Literal["happy", "sad"]
    aside: bool


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
r = parse(model=model, messages=[{"role": "user", "content": "Who speaks?"}], response_format=Line,
          temperature=0, max_tokens=60)
line = r.choices[0].message.parsed
assert isinstance(line, Line) and r.choices[0].finish_reason == "stop", r
for stream in (False, True):
    kw = dict(model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}],
              response_format={"type": "json_object"}, temperature=0.8, seed=7, max_tokens=200)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    assert isinstance(json.loads(text), dict), text

# a required call, and a named one, even where the model would answer in words
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}],
                                   tools=tools, tool_choice="required", temperature=0, max_tokens=80)
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments).get("city"), str), call
two = tools + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
r = client.chat.completions.create(model=model, messages=msgs[:1], tools=two, temperature=0, max_tokens=80,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET"), call

# log probabilities through the typed objects: greedy, the chosen token tops its list
kw = dict(model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}], max_tokens=8, temperature=0,
          logprobs=True, top_logprobs=3)
r = client.chat.completions.create(**kw)
lp = r.choices[0].logprobs.content
assert lp and len(lp) == r.usage.completion_tokens, lp
for t in lp:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True), t
    assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, t
assert bytes(b for t in lp for b in t.bytes).decode() == r.choices[0].message.content
streamed = [t for c in client.chat.completions.create(stream=True, **kw)
            if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content for t in c.choices[0].logprobs.content]
assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in lp], (streamed, lp)
r = client.completions.create(model=model, prompt="ROMEO:", max_tokens=4, temperature=0, logprobs=2, echo=True)
clp = r.choices[0].logprobs
assert r.choices[0].text.startswith("ROMEO:") and clp.token_logprobs[0] is None and clp.text_offset[0] == 0, clp
assert "".join(clp.tokens) == r.choices[0].text and all(len(d) <= 3 for d in clp.top_logprobs[1:]), clp

# n choices, indexed, whole and streamed
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}], n=2,
                                   max_tokens=8, temperature=1, seed=3)
assert [c.index for c in r.choices] == [0, 1], r
texts = ["", ""]
for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Speak as ROMEO."}], n=2,
                                        max_tokens=8, temperature=1, seed=3, stream=True):
    for ch in c.choices:
        texts[ch.index] += ch.delta.content or ""
assert texts == [c.message.content for c in r.choices], (texts, r)

# errors come back as openai exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("unknown model accepted")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e
try:
    client.chat.completions.create(model=model, messages=msgs[:1], tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    raise SystemExit("undeclared tool_choice accepted")
except Exception as e:  # openai.BadRequestError
    assert getattr(e, "status_code", None) == 400, e
print("all openai client checks passed")
