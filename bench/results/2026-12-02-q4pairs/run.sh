#!/usr/bin/env bash
# Decode's q4 products on the lent 16-core Xeon: memory bandwidth, `sysbench --products` (as
# computed, as only read, from the caches) for the one-row kernel and the row-pair kernels
# (FLASHMOE_Q4KERNEL=0/1/2), then the 24-layer 30B-A3B shape (q4 everywhere) decoding with each,
# interleaved. BIN: a flashmoe binary built on the development machine.
set -uo pipefail
BIN=${BIN:-target/fm-carry/flashmoe}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node|MHz|L2|L3" | tee "$OUT/lscpu.txt"
"$BIN" sysbench --memory --threads 16 | tee "$OUT/sysbench.txt"
for t in 16 1 8; do
    for v in 0 1 2; do
        echo "kernel $v threads $t $(FLASHMOE_Q4KERNEL=$v "$BIN" sysbench --products --threads $t --seconds 2)" | tee -a "$OUT/products.txt"
    done
done
for items in 2 8 16; do
    echo "items $items kernel 2 $(FLASHMOE_ITEMS=$items FLASHMOE_Q4KERNEL=2 "$BIN" sysbench --products --threads 16 --seconds 2)" | tee -a "$OUT/products.txt"
done
m=/tmp/fm30b
"$BIN" synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to "$m" --force >/dev/null
"$BIN" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 8 --json >/dev/null
for r in 1 2; do
    for v in 0 2 1; do
        echo "round $r kernel $v $(FLASHMOE_Q4KERNEL=$v "$BIN" bench --model "$m" --threads 16 --prompt-tokens 512 --gen-tokens 64 --json)" | tee -a "$OUT/bench.txt"
    done
done
FLASHMOE_STEP_PROFILE=1 FLASHMOE_Q4KERNEL=2 "$BIN" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 64 > "$OUT/profile.txt" 2>&1
"$BIN" sysbench --memory --threads 16 | tee -a "$OUT/sysbench.txt"
