#!/usr/bin/env bash
# Eleventh session's last call on the H200: the CUDA tests on the merged main (built here with
# `scripts/test_cuda.sh --build`, then its binaries and the attn2 kernels.cu packed as
# target/cudax/carry.tar.xz and carried), the same tests with the attention
# kernel of branch cuda3-attn2 (every k load of a lane's row in flight at once; never run before)
# through FLASHMOE_CUDA_SOURCE, then the two interleaved on the 24-layer 30B-A3B q4 shape.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
C=target/cuda-carry
# carried compressed (the tree and the binaries exceed the 64 MiB carry otherwise)
if [ -f target/cudax/carry.tar.xz ]; then tar -C target -xJf target/cudax/carry.tar.xz; fi
A2=$PWD/$C/kernels-attn2.cu
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
timeout 150 bash scripts/test_cuda.sh >"$OUT/tests.log" 2>&1
echo "main tests rc $?"; grep -E "^test result|FAILED|panicked" "$OUT/tests.log"
FLASHMOE_CUDA_SOURCE=$A2 timeout 150 bash scripts/test_cuda.sh >"$OUT/tests-attn2.log" 2>&1
echo "attn2 tests rc $?"; grep -E "^test result|FAILED|panicked" "$OUT/tests-attn2.log"
m=/tmp/M
timeout 100 $C/flashmoe synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to $m --force >/dev/null
run() {  # label, env...
    local label=$1; shift
    local j
    j=$(env "$@" $C/flashmoe bench --model $m --device cuda --json --prompt-tokens ${P:-512} --gen-tokens ${G:-128} | grep '^{')
    echo "$label P=${P:-512} $j" >>"$OUT/bench.txt"
    echo "$label P=${P:-512} $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"]), round(d["decode_tok_s"],1))')"
}
timeout 30 $C/flashmoe bench --model $m --device cuda --prompt-tokens 64 --gen-tokens 8 >/dev/null 2>&1
for r in 1 2; do
    run main X=1
    run attn2 FLASHMOE_CUDA_SOURCE=$A2
done
P=4096 G=64 run main X=1
P=4096 G=64 run attn2 FLASHMOE_CUDA_SOURCE=$A2
