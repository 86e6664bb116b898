#!/usr/bin/env python3
"""Renders the released chat templates of flashmoe's families the way transformers does.

The templates are llama.cpp's copies (`models/templates/`), taken at test time from the PyPI
sdist of llama-cpp-python (nothing of them is committed). Usage:

    chat_templates.py CACHE_DIR OUT.json

OUT.json: {"templates": {name: source}, "cases": [{"template", "conv", "rendered" | "error"}]},
the conversations being CONVERSATIONS below (tests/templates.rs renders the same ones).

DeepSeek V3.2's and V4's templates parse string arguments with a `from_json` filter, which
llama.cpp's template engine has and transformers' environment lacks; it is added here as
Python's `json.loads` (the meaning of the name), so that calls given as OpenAI sends them (the
arguments a JSON string) render too.
"""
import io
import json
import os
import sys
import tarfile
import urllib.parse
import urllib.request

from transformers.utils import chat_template_utils
from transformers.utils.chat_template_utils import render_jinja_template

VERSION = "0.3.36"
# The families flashmoe runs, by their released templates in the 0.3.36 sdist: Qwen3.5 (Qwen3.5-4B),
# Qwen3-Coder, Qwen3 (Qwen3-0.6B: Qwen3-MoE and Qwen3-Next write its format), gpt-oss, GLM-4.6,
# GLM-4.7 (GLM-4.7-Flash), MiniMax-M2, DeepSeek R1 / V3.1 / V3.2, Kimi-K2 (three). Also in the
# sdist, for models flashmoe does not run: DeepSeek-V4 (and V4-Flash-0731), Kimi-K3, MiniMax-M1
# and M3, StepFun3.5-Flash, Gemma 4. Not in it: GLM-5's, Kimi-K2.5's and Mixtral's own templates.
TEMPLATES = ["Qwen3.5-4B", "Qwen3-Coder", "Qwen-Qwen3-0.6B", "openai-gpt-oss-120b", "GLM-4.6", "GLM-4.7-Flash", "MiniMax-M2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
             "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2", "moonshotai-Kimi-K2", "Kimi-K2-Instruct",
             "Kimi-K2-Thinking"]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}}]
CONVERSATIONS = [
    dict(messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True),
    dict(messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour, «vite» — café 東京."},
                   {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another."}],
         add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                       "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
                   {"role": "tool", "content": "{\"temp\": 21}"}],
         tools=TOOLS, add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], add_generation_prompt=False),
    # reasoning in the history (as a field), thinking on
    dict(messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.", "reasoning_content": "Add them."},
                   {"role": "user", "content": "3+3?"}], add_generation_prompt=True, enable_thinking=True),
    # thinking off where the template has a switch
    dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=True,
         enable_thinking=False),
    # two calls in one turn after reasoning written into the content, their results, thinking on
    dict(messages=[{"role": "user", "content": "Paris or Rome?"},
                   {"role": "assistant", "content": "<think>Compare both.</think>Checking.", "tool_calls": [
                       {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                       {"type": "function", "id": "call_2", "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
                   {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 25}"}],
         tools=TOOLS, add_generation_prompt=True, enable_thinking=True),
    # a call as OpenAI clients send it back: the arguments a JSON string
    dict(messages=[{"role": "user", "content": "Weather in Rome?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call_1", "function": {
                       "name": "get_weather", "arguments": "{\"city\": \"Rome\", \"days\": 3}"}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 25}"}],
         tools=TOOLS, add_generation_prompt=True),
]


def compile_with_from_json(src):
    """transformers' compiled template, its environment given `from_json` (see the module doc)."""
    t = compile_template(src)
    t.environment.filters["from_json"] = json.loads
    return t


compile_template = chat_template_utils._compile_jinja_template
chat_template_utils._compile_jinja_template = compile_with_from_json


def sdist(cache):
    path = os.path.join(cache, f"llama_cpp_python-{VERSION}.tar.gz")
    if not os.path.exists(path):
        index = "https://pypi.org/pypi/llama-cpp-python/json"
        meta = json.load(urllib.request.urlopen(index))
        url = next(u["url"] for u in meta["releases"][VERSION] if u["packagetype"] == "sdist")
        # a mirror may answer with addresses relative to the index
        data = urllib.request.urlopen(urllib.parse.urljoin(index, url)).read()
        os.makedirs(cache, exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
    return path


def main():
    cache, out = sys.argv[1], sys.argv[2]
    srcs = {}
    with tarfile.open(sdist(cache)) as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if "/models/templates/" in m.name and base.endswith(".jinja") and base[:-6] in TEMPLATES:
                srcs[base[:-6]] = tar.extractfile(m).read().decode()
    cases = []
    for name in TEMPLATES:
        for i, c in enumerate(CONVERSATIONS):
            kw = {k: v for k, v in c.items() if k not in ("messages", "tools")}
            case = {"template": name, "conv": i}
            try:
                case["rendered"] = render_jinja_template([c["messages"]], tools=c.get("tools"), chat_template=srcs[name],
                                                         bos_token="<s>", eos_token="</s>", **kw)[0][0]
            except Exception as e:  # the template refuses the conversation: flashmoe must too
                case["error"] = str(e)
            cases.append(case)
    json.dump({"templates": srcs, "conversations": CONVERSATIONS, "cases": cases}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
