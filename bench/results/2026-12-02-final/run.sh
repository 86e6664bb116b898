#!/usr/bin/env bash
# One call on the lent H200 machine after the tenth session's merges (binaries built here by
# `scripts/test_cuda.sh --build`, carried in target/cuda-carry): the CUDA tests, MLA decode
# after a 2048-token prompt at 16/8/4/1 threads (bench/results/2026-12-02-mla-decode/run.sh),
# and decode of the 24-layer 30B-A3B shape at 14, 15 and 16 threads, interleaved.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" target/mla-carry
ln -sf ../cuda-carry/flashmoe target/mla-carry/flashmoe
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
timeout 200 bash scripts/test_cuda.sh >"$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc $?"; grep -E "^test result|FAILED|panicked" "$OUT/cuda-tests.log" | head
OUT=$OUT/mla timeout 330 bash bench/results/2026-12-02-mla-decode/run.sh 2048 2>&1 | tee "$OUT/mla.log" | tail -30
B=target/cuda-carry/flashmoe
m=/tmp/fm30b
"$B" synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to "$m" --force >/dev/null
"$B" bench --model "$m" --threads 16 --prompt-tokens 64 --gen-tokens 8 --json >/dev/null
"$B" sysbench --memory --threads 16 | tee "$OUT/sysbench.txt"
for r in 1 2; do
    for t in 16 15 14; do
        j=$("$B" bench --model "$m" --threads $t --prompt-tokens 512 --gen-tokens 64 --json)
        echo "round $r threads $t $j" >>"$OUT/threads.txt"
        echo "round $r threads $t $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"],1), round(d["decode_tok_s"],2), round(d["products_gb_s"],1))')"
    done
done
