#!/usr/bin/env bash
# Continuous batching on a many-core machine (docs/PERFORMANCE.md, "Concurrent requests"):
# aggregate tok/s and per-request latency at 1, 2, 4 and 8 concurrent streaming clients, decode
# steps shared (serve --max-batch 8) against one request at a time (--max-batch 1), on $THREADS
# compute threads; warm (files in the page cache) and, where the machine has a memory cgroup
# controller (v1 or v2, scripts/memcg.sh) and this runs as root, beyond RAM (scripts/batch_clients.sh: a $LIMIT
# cgroup, O_DIRECT expert reads through a $CACHE cache). Runs a prebuilt binary, so it can be
# carried to a machine without Rust:
#
#   bash bench/batch_16core.sh path/to/flashmoe
#
# The model is the development machine's (qwen3-30b-a3b, $LAYERS layers, q4 experts, $DENSE
# resident), synthesized under $WORK once; JSON lines go to $RES, the table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-${BIN:-target/release/flashmoe}}")
WORK=${WORK:-/tmp/flashmoe-batch}
LAYERS=${LAYERS:-4}
DENSE=${DENSE:-bf16}
RES=${RES:-bench/results/batch_16core.jsonl}
export M=${M:-$WORK/bM-$LAYERS-$DENSE}
export RAYON_NUM_THREADS=${THREADS:-16}
export TOKENS=${TOKENS:-24}
mkdir -p "$WORK" "$(dirname "$RES")"
if [ ! -f "$M/flashmoe.json" ]; then
    "$BIN" synth --preset qwen3-30b-a3b --layers "$LAYERS" --experts q4 --dense "$DENSE" --routing skewed --to "$M"
fi
if [ -z "${ONLY:-}" ]; then
    # beyond RAM needs a memory cgroup, v1 or v2 (scripts/memcg.sh); without one, warm only
    . scripts/memcg.sh
    if memcg_init "${LIMIT:-2200M}"; then ONLY=all; else ONLY=warm; echo "no memory cgroup: warm only" >&2; fi
fi
echo "threads $RAYON_NUM_THREADS, model $M, $TOKENS tokens per client, settings: $ONLY" >&2
ONLY=$ONLY bash scripts/batch_clients.sh "$BIN" | tee -a "$RES"
python3 scripts/batch_table.py "$RES"
