#!/usr/bin/env bash
# Second call (after run.sh): the previous session's build (base) against this one (new: logits
# reused, finite check and argmax on the team, the experts' output rows not zeroed, the page-cache
# check in four parts per expert, and the KV cache's pages touched when it grows), new also with
# FLASHMOE_ITEMS=8, interleaved, four rounds; 30B-A3B shape q4 everywhere, 24 layers, 16 threads;
# then the new build's step profile.
set -uo pipefail
C=${C:-/tmp/fmbin}
mkdir -p "$C" && tar -C "$C" -xJf target/fmx/bins.tar.xz
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
"$C/new" sysbench --memory --threads 16 | tee "$OUT/sysbench.txt"
m=/tmp/fm30b
"$C/new" synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to "$m" --force >/dev/null
"$C/new" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 8 --json >/dev/null
for r in 1 2 3 4; do
    for v in base new new:8; do
        b=${v%%:*} items=${v#*:}; [ "$items" = "$v" ] && items=4
        j=$(FLASHMOE_ITEMS=$items "$C/$b" bench --model "$m" --device cpu --threads 16 --prompt-tokens 512 --gen-tokens 64 --json)
        echo "round $r $v $j" >> "$OUT/bench.txt"
        echo "round $r $v $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"],1), round(d["decode_tok_s"],2), round(d["products_gb_s"],1), round(d["phases_ms"]["total"],2), round(d["phases_ms"]["team_step_tails"],2))')"
    done
done
FLASHMOE_STEP_PROFILE=1 "$C/new" bench --model "$m" --device cpu --threads 16 --prompt-tokens 512 --gen-tokens 64 > "$OUT/profile.txt" 2>&1

"$C/new" sysbench --memory --threads 16 | tee -a "$OUT/sysbench.txt"
