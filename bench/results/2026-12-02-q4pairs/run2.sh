#!/usr/bin/env bash
# Second call: the one-row kernel with broadcast unpacking (FLASHMOE_Q4KERNEL=3), the row-pair
# kernels unrolled (1, 2), and the down step's items over one expert each (FLASHMOE_DOWN=1),
# in `sysbench --products` and on the 24-layer 30B-A3B shape (q4 everywhere), interleaved.
set -uo pipefail
BIN=${BIN:-target/fm-carry/flashmoe}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
"$BIN" sysbench --memory --threads 16 | tee "$OUT/sysbench.txt"
for t in 16 1; do
    for v in 0 3 2; do
        for d in 0 1; do
            echo "kernel $v down $d threads $t $(FLASHMOE_DOWN=$d FLASHMOE_Q4KERNEL=$v "$BIN" sysbench --products --threads $t --seconds 2)" | tee -a "$OUT/products.txt"
        done
    done
done
m=/tmp/fm30b
"$BIN" synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to "$m" --force >/dev/null
"$BIN" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 8 --json >/dev/null
for r in 1 2 3; do
    for vd in 0,0 3,1 3,0 0,1 2,1; do
        v=${vd%,*} d=${vd#*,}
        j=$(FLASHMOE_DOWN=$d FLASHMOE_Q4KERNEL=$v "$BIN" bench --model "$m" --threads 16 --prompt-tokens 512 --gen-tokens 64 --json)
        echo "round $r kernel $v down $d $j" >> "$OUT/bench.txt"
        echo "round $r kernel $v down $d $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"],1), round(d["decode_tok_s"],2), round(d["products_gb_s"],1), round(d["phases_ms"]["total"],2), round(d["phases_ms"]["team_step_tails"],2))')"
    done
done
FLASHMOE_STEP_PROFILE=1 FLASHMOE_DOWN=1 FLASHMOE_Q4KERNEL=3 "$BIN" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 64 > "$OUT/profile.txt" 2>&1
"$BIN" sysbench --memory --threads 16 | tee -a "$OUT/sysbench.txt"
