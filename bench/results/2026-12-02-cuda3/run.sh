#!/usr/bin/env bash
# One call on the lent H200 (issue 19): the CUDA tests, then the 24-layer 30B-A3B q4 shape
# decoded by main's build (flashmoe-old) and this branch's, its two changes switched by
# environment (FLASHMOE_CUDA_PDL=0: no programmatic dependent launch; FLASHMOE_CUDA_ATTN=part:
# the per-head decode attention), interleaved; then kernel timelines of a decode through
# CUPTI (scripts/cupti_trace.c, built there, or the copy built here) for both builds.
# Binaries built here by `scripts/test_cuda.sh --build`, carried in target/cuda-carry.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
C=target/cuda-carry
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/misc.log"
timeout 240 bash scripts/test_cuda.sh >"$OUT/tests.log" 2>&1
echo "cuda tests rc $?" | tee -a "$OUT/misc.log"; grep -E "^test |^test result|panicked" "$OUT/tests.log" | tee -a "$OUT/misc.log"
grep -E "^attention " "$OUT/tests.log" | tee -a "$OUT/misc.log"
# the CUPTI injector: built against this machine's toolkit, else the carried copy
INC=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name cupti.h 2>/dev/null | head -1)")
LIB=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name 'libcupti.so*' 2>/dev/null | head -1)")
TR=$C/cupti_trace.so
if gcc -shared -fPIC -O2 -I"$INC" -I/usr/local/cuda/include scripts/cupti_trace.c -L"$LIB" -lcupti -o /tmp/cupti_trace.so 2>>"$OUT/misc.log"; then
    TR=/tmp/cupti_trace.so; export LD_LIBRARY_PATH=$LIB:$LD_LIBRARY_PATH
fi
echo "cupti: inc $INC lib $LIB using $TR" | tee -a "$OUT/misc.log"
m=/tmp/M
( time timeout 200 $C/flashmoe synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to $m --force >/dev/null ) 2>&1 | tail -3 | tee -a "$OUT/misc.log"
run() {  # label, env..., binary, prompt, gen
    local label=$1; shift
    local j
    j=$(env "$@" bench --model $m --device cuda --json --prompt-tokens ${P:-512} --gen-tokens ${G:-128} 2>>"$OUT/misc.log" | grep '^{')
    echo "$label P=${P:-512} $j" >>"$OUT/bench.txt"
    echo "$label P=${P:-512} $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"]), round(d["decode_tok_s"],1))' 2>&1)"
}
N=$C/flashmoe; O=$C/flashmoe-old
timeout 30 $N bench --model $m --device cuda --prompt-tokens 64 --gen-tokens 8 >/dev/null 2>&1
for r in 1 2; do
    run old X=1 $O
    run nopdl-partattn FLASHMOE_CUDA_PDL=0 FLASHMOE_CUDA_ATTN=part $N
    run nopdl FLASHMOE_CUDA_PDL=0 $N
    run pdl-partattn FLASHMOE_CUDA_ATTN=part $N
    run new X=1 $N
done
P=4096 G=64 run old X=1 $O
P=4096 G=64 run new X=1 $N
for b in old new; do
    B=$N; [ $b = old ] && B=$O
    CUDA_INJECTION64_PATH=$PWD/$TR CUPTI_TRACE_OUT=/tmp/trace-$b.txt timeout 60 $B bench --model $m --device cuda --prompt-tokens 512 --gen-tokens 32 >/dev/null 2>>"$OUT/misc.log"
    echo "== $b" >>"$OUT/tables.txt"
    python3 scripts/cupti_table.py /tmp/trace-$b.txt 16 >>"$OUT/tables.txt" 2>&1
done
head -60 "$OUT/tables.txt"
( cd /tmp && tar czf "$OUT/traces.tar.gz" trace-old.txt trace-new.txt 2>/dev/null )
