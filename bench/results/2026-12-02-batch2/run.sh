#!/usr/bin/env bash
# docs/PERFORMANCE.md, "Concurrent requests: continuous batching", the direct cache's eviction
# order: this build against main (324af9a, plain LRU), one setting after the other, on the
# development machine (2 cores, shared). Usage, from the repository root:
#   bash bench/results/2026-12-02-batch2/run.sh NEW_BIN MAIN_BIN
# Model: flashmoe synth --preset qwen3-30b-a3b --layers 4 --to /tmp/bM (q4 experts, bf16 resident).
set -euo pipefail
NEW=$1 MAIN=$2
OUT=${OUT:-bench/results/2026-12-02-batch2}; mkdir -p "$OUT"
export TOKENS=${TOKENS:-24} PORT=${PORT:-18531}
for setting in ${SETTINGS:-ram256 warm ram768}; do
    for which in ${WHICH:-new main}; do
        bin=$NEW; [ $which = main ] && bin=$MAIN
        case $setting in
            warm) ONLY=warm bash scripts/batch_clients.sh "$bin" ;;
            ram256) ONLY=ram CACHE=256M bash scripts/batch_clients.sh "$bin" ;;
            ram768) ONLY=ram CACHE=768M bash scripts/batch_clients.sh "$bin" ;;
        esac | tee -a "$OUT/$which.jsonl"
        echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    done
done
