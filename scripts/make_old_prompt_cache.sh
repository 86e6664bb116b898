#!/usr/bin/env bash
# Makes tests/fixtures/prompt_cache_v1/gpt_oss.fmpc: a prompt-cache entry written before KV
# caches had a type (flashmoe at ff7dc7a, f32 caches, kind `kv`), which tests/prompt_cache.rs
# loads with today's code. Run with a flashmoe built from that commit as $OLD_FLASHMOE.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
"${OLD_FLASHMOE:?a flashmoe binary built at ff7dc7a}" generate --model tests/fixtures/gpt_oss \
    --prompt "the old format" --max-tokens 2 --exact --threads 1 --prompt-cache "$tmp"
mkdir -p tests/fixtures/prompt_cache_v1
cp "$tmp"/*.fmpc tests/fixtures/prompt_cache_v1/gpt_oss.fmpc
rm -r "$tmp"
