#!/usr/bin/env bash
# Second call (issue 19): kernel timelines through CUPTI (scripts/cupti_trace.c) of main's build,
# this branch's without and with programmatic dependent launch, and a variant whose kernels
# only wait (no early trigger: FLASHMOE_CUDA_SOURCE with PDL_ENTRY redefined); the bench of
# the same four, interleaved.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
C=target/cuda-carry
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/misc.log"
INC=/usr/local/cuda/targets/x86_64-linux/include LIB=/usr/local/cuda/targets/x86_64-linux/lib
TR=$PWD/$C/cupti_trace.so
if gcc -shared -fPIC -O2 -I$INC scripts/cupti_trace.c -L$LIB -lcupti -o /tmp/cupti_trace.so 2>>"$OUT/misc.log"; then TR=/tmp/cupti_trace.so; fi
export LD_LIBRARY_PATH=$LIB:$LD_LIBRARY_PATH
echo "cupti $TR" | tee -a "$OUT/misc.log"
( echo '#define PDL_ENTRY() asm volatile("griddepcontrol.wait;" ::: "memory")'; cat src/backend/cuda/kernels.cu ) >/tmp/wait.cu
m=/tmp/M
( time timeout 200 $C/flashmoe synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to $m --force >/dev/null ) 2>&1 | tail -3 | tee -a "$OUT/misc.log"
run() {  # label, env..., binary
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
    run nopdl FLASHMOE_CUDA_PDL=0 $N
    run pdl X=1 $N
    run pdl-wait FLASHMOE_CUDA_SOURCE=/tmp/wait.cu $N
done
trace() {  # label, env..., binary
    local label=$1; shift
    env CUDA_INJECTION64_PATH=$TR CUPTI_TRACE_OUT=/tmp/trace-$label.txt "$@" bench --model $m --device cuda --prompt-tokens 512 --gen-tokens 32 >/dev/null 2>>"$OUT/misc.log"
    echo "== $label" >>"$OUT/tables.txt"
    python3 scripts/cupti_table.py /tmp/trace-$label.txt 16 >>"$OUT/tables.txt" 2>&1
}
trace old X=1 $O
trace nopdl FLASHMOE_CUDA_PDL=0 $N
trace pdl X=1 $N
trace pdl-wait FLASHMOE_CUDA_SOURCE=/tmp/wait.cu $N
grep -A14 "^== " "$OUT/tables.txt" | cut -c1-110
( cd /tmp && tar czf "$OUT/traces.tar.gz" trace-*.txt 2>/dev/null )
