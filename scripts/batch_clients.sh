#!/bin/bash
# Aggregate tok/s and per-request latency at 1, 2, 4, 8 concurrent streaming clients, with
# decode steps shared (--max-batch 8) and one request at a time (--max-batch 1), warm (all in
# memory, page cache) and beyond RAM (a memory cgroup (v1 or v2) smaller than the model, experts read
# with O_DIRECT through a small cache) (docs/PERFORMANCE.md, "Concurrent requests").
# Usage: [ONLY=ram|warm] [CACHE=256M] [LIMIT=2200M] [TOKENS=32] [EXTRA="serve flags"] scripts/batch_clients.sh [BIN]. Needs a model in $M (default /tmp/bM):
#   flashmoe synth --preset qwen3-30b-a3b --layers 4 --to /tmp/bM
# and a tokenizer beside it (the qwen3_moe fixture's: 320 ids, all valid for the synthetic vocab).
set -e
B=${1:-target/release/flashmoe}
M=${M:-/tmp/bM}
TOKENS=${TOKENS:-32}
LIMIT=${LIMIT:-2200M}
CACHE=${CACHE:-256M}
PORT=${PORT:-18431}
[ -f "$M/tokenizer.json" ] || cp tests/fixtures/qwen3_moe/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$M/"
BAN=313,315
# runs a command in the memory cgroup flashmoe_bench limited to $LIMIT (v1 or v2, detected)
. "$(dirname "$0")/memcg.sh"
plain() { exec "$@"; }
limited() { memcg_run "$@"; }
serve() { # tag, max-batch, then the launcher's words
    local tag=$1 mb=$2; shift 2
    if curl -sf localhost:$PORT/health >/dev/null; then echo "port $PORT is taken (PORT=...)" >&2; exit 1; fi
    [ "$1" = limited ] && memcg_init "$LIMIT"
    ( "$@" "$B" serve --model "$M" --port $PORT --max-batch "$mb" --max-queue 16 --no-prompt-cache $STORE ${EXTRA:-} ) 2>/tmp/batch_serve_$tag.log &
    local pid=$!
    until curl -sf localhost:$PORT/health >/dev/null; do
        kill -0 $pid 2>/dev/null || { echo "the server stopped: /tmp/batch_serve_$tag.log" >&2; tail -3 /tmp/batch_serve_$tag.log >&2; exit 1; }
        sleep 0.5
    done
    python3 scripts/batch_clients.py http://localhost:$PORT --tokens "$TOKENS" --ban $BAN --tag "$tag"
    [ "$1" = limited ] && echo "cgroup peak: $(memcg_peak) bytes (v$MEMCG_V, $MEMCG)" >&2
    kill $pid; wait $pid 2>/dev/null || true
}
if [ "${ONLY:-all}" != ram ]; then
    STORE="--cache os"
    cat "$M"/experts/* "$M"/resident.bin >/dev/null # warm: every file in the page cache
    serve warm_b8 8 plain
    serve warm_b1 1 plain
fi
if [ "${ONLY:-all}" != warm ]; then
    STORE="--cache direct --cache-size $CACHE --io-threads 8"
    serve ram${LIMIT}_c${CACHE}_b8 8 limited
    serve ram${LIMIT}_c${CACHE}_b1 1 limited
fi
