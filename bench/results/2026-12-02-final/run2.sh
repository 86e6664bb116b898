#!/usr/bin/env bash
# Second call: continuous batching on the 16 cores (bench/batch_16core.sh, CPU), then the
# 24-layer 30B-A3B shape's CPU decode at 16, 15 and 14 threads, interleaved.
set -uo pipefail
OUT=${OUT:-/tmp/out}
B=target/fm-carry/flashmoe
mkdir -p "$OUT"
EXTRA="--device cpu" THREADS=16 RES="$OUT/batch_16core.jsonl" timeout 240 bash bench/batch_16core.sh "$B" 2>&1 | tail -25
m=/tmp/fm30b
timeout 60 "$B" synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to "$m" --force >/dev/null
"$B" sysbench --memory --threads 16 | tee "$OUT/sysbench.txt"
for r in 1 2; do
    for t in 16 15 14; do
        j=$(timeout 30 "$B" bench --device cpu --model "$m" --threads $t --prompt-tokens 512 --gen-tokens 64 --json)
        echo "round $r threads $t $j" >>"$OUT/threads.txt"
        echo "round $r threads $t $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"],1), round(d["decode_tok_s"],2), round(d["products_gb_s"],1))')"
    done
done
