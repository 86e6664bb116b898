"""Drives a running flashmoe server's /v1/responses with the official `openai` package
(argv[1] = base URL ending in /v1)."""
import json
import sys
from typing import Literal

import openai
from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(base_url=sys.argv[1], api_key="not-needed")
model = "flashmoe-default"

# plain text, whole: the client's output_text, usage, the echoed settings
r = client.responses.create(model=model, input="Speak as ROMEO.", max_output_tokens=24, temperature=0)
assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete"), r
assert r.output_text and r.output[-1].type == "message" and r.output[-1].role == "assistant", r
u = r.usage
assert u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens, u
assert r.temperature == 0 and r.max_output_tokens == 24 and r.tools == [], r
if r.status == "incomplete":
    assert r.incomplete_details.reason == "max_output_tokens", r

# the same streamed: the deltas make the same text, the events are numbered in order
deltas, types, seqs, final = [], [], [], None
for ev in client.responses.create(model=model, input="Speak as ROMEO.", max_output_tokens=24, temperature=0, stream=True):
    types.append(ev.type)
    seqs.append(ev.sequence_number)
    if ev.type == "response.output_text.delta":
        deltas.append(ev.delta)
    if ev.type in ("response.completed", "response.incomplete"):
        final = ev.response
assert "".join(deltas) == r.output_text, (deltas, r.output_text)
assert seqs == list(range(len(seqs))), seqs
assert types[:2] == ["response.created", "response.in_progress"] and final is not None, types
assert final.output_text == r.output_text and final.usage.output_tokens == u.output_tokens, final

# the stream helper accumulates the same response
with client.responses.stream(model=model, input="Speak as ROMEO.", max_output_tokens=60, temperature=0) as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    done = stream.get_final_response()
assert done.status == "completed" and done.output_text == text and text, (done, text)

# instructions and a multi-turn input list; the earlier turns come from the prefix cache
turns = [{"role": "user", "content": "Speak as ROMEO."},
         {"role": "assistant", "content": [{"type": "output_text", "text": text}]},
         {"role": "user", "content": [{"type": "input_text", "text": "Speak as JULIET."}]}]
r = client.responses.create(model=model, instructions="You are a player in Shakespeare's company.", input=turns,
                            max_output_tokens=24, temperature=0)
assert r.output_text and r.instructions.startswith("You are a player"), r

# a function tool round trip: the call forced by tool_choice, then its output answered in words
tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ask = [{"role": "user", "content": "What is the weather in Mantua?"}]
r = client.responses.create(model=model, input=ask, tools=tools, temperature=0, max_output_tokens=60,
                            tool_choice={"type": "function", "name": "get_weather"})
calls = [o for o in r.output if o.type == "function_call"]
assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_"), r
assert json.loads(calls[0].arguments).get("city") == "Mantua", calls[0]
with client.responses.stream(model=model, input=ask, tools=tools, temperature=0, max_output_tokens=60,
                             tool_choice="required") as stream:
    args = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
    s_call = [o for o in stream.get_final_response().output if o.type == "function_call"][0]
assert s_call.name == "get_weather" and args == s_call.arguments and json.loads(args).get("city"), (args, s_call)
follow = ask + [c.model_dump(exclude_none=True) for c in r.output] + [
    {"type": "function_call_output", "call_id": calls[0].call_id,
     "output": json.dumps({"city": "Mantua", "weather": "foggy", "temperature": 9})}]
r = client.responses.create(model=model, input=follow, tools=tools, temperature=0, max_output_tokens=40)
assert "Mantua" in r.output_text and "foggy" in r.output_text, r.output_text
assert r.usage.input_tokens_details.cached_tokens > 0, r.usage


# structured output: a pydantic model through `responses.parse` (json_schema, strict)
class Line(BaseModel):
    speaker: Literal["ROMEO", "JULIET", "NURSE"]
    mood: Literal["happy", "sad"]
    aside: bool


parse = getattr(client.responses, "parse", None)
if parse is not None:
    r = parse(model=model, input="Who speaks?", text_format=Line, temperature=0, max_output_tokens=60)
    assert isinstance(r.output_parsed, Line) and r.status == "completed", r
# greedy: the Responses API has no `seed`, and a sampled object may run past the token limit
r = client.responses.create(model=model, input="Speak as ROMEO.", temperature=0, max_output_tokens=200,
                            text={"format": {"type": "json_object"}})
assert r.status == "completed" and isinstance(json.loads(r.output_text), dict), r.output_text

# refusals come back as openai exceptions naming the field
for bad in ({"previous_response_id": "resp_1"}, {"store": True}, {"seed": 3}):
    try:
        client.responses.create(model=model, input="x", extra_body=bad) if "seed" in bad else \
            client.responses.create(model=model, input="x", **bad)
        raise SystemExit(f"{bad} accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == next(iter(bad)), e.body
print("all responses client checks passed")
