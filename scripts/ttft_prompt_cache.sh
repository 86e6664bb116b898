#!/bin/bash
# Time to first token of a repeated ~8k-token agent prompt (a system prompt with rules and 11
# tool definitions, then a user message), cold and from the prompt cache, each run a new
# process (docs/PERFORMANCE.md, "Prompt cache"). Usage: scripts/ttft_prompt_cache.sh [BIN]
# Needs a model in $M (default /tmp/pc-M): flashmoe synth --preset qwen3-30b-a3b --layers 4 --to /tmp/pc-M
# and a tokenizer beside it (the qwen3_moe fixture's: 320 ids, all valid for the synthetic vocab).
set -e
B=${1:-target/release/flashmoe}
M=${M:-/tmp/pc-M}
C=${C:-/tmp/pc-cache}
[ -f "$M/tokenizer.json" ] || cp tests/fixtures/qwen3_moe/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$M/"
SYS="$(python3 - <<'PY'
import json
verbs = ["read", "write", "search", "list", "move", "delete", "compile", "test", "format", "lint", "fetch", "patch"]
nouns = ["file", "directory", "symbol", "issue", "branch", "commit", "package", "module", "function", "log", "config", "test"]
tools = []
for i in range(11):
    v, n = verbs[i % 12], nouns[(i * 5) % 12]
    tools.append({"type": "function", "function": {"name": f"{v}_{n}_{i}", "description": f"{v.capitalize()} a {n} in the workspace. Use this when the user asks to {v} one {n}; it returns JSON with the result and any error message. Paths are relative to the repository root.", "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": f"the {n} path"}, "recursive": {"type": "boolean", "description": "descend into subdirectories"}, "limit": {"type": "integer", "description": "the most results to return"}}, "required": ["path"]}}})
rules = "\n".join(f"Rule {i}: keep changes small, run the tests for module {nouns[i % 12]}, and explain what you changed in {verbs[i % 12]}-style commits." for i in range(30))
print("You are a coding agent working in a Rust repository. Follow the rules below.\n" + rules + "\n\n# Tools\n" + json.dumps(tools, indent=1), end="")
PY
)"
rm -rf "$C"
run() {
    echo "== $1"; shift
    /usr/bin/time -f "wall %e s, max RSS %M KB" "$B" generate --model "$M" --chat --system "$SYS" --max-tokens 1 \
        --temperature 0 "$@" 2>&1 >/dev/null | grep -v "^experts\|^cache"
}
Q1="Add a --prompt-cache flag to the generate command and test it."
Q2="Why does the session test fail on the DeltaNet fixture? Fix it."
run "no prompt cache" --prompt "$Q1"
run "cold (empty cache)" --prompt "$Q1" --prompt-cache "$C"
run "same prompt again (new process)" --prompt "$Q1" --prompt-cache "$C"
run "same system+tools, another user message" --prompt "$Q2" --prompt-cache "$C"
run "same prompt again, third process" --prompt "$Q1" --prompt-cache "$C"
du -sh "$C"
