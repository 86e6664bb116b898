#!/usr/bin/env bash
# Third call on the lent H200 (issues 19, 20, 18): the CUDA tests on this build (attn_vec, the
# norm's loads, the router's small blocks; DSA's indexer); flashmoe's session-start build
# (flashmoe-old) against this one (and this one with FLASHMOE_CUDA_ATTN=dec, the previous
# decode attention, and with FLASHMOE_CUDA_PDL=1), interleaved, 24-layer Qwen3-30B-A3B shape
# q4; kernel timelines (CUPTI); then the 16 cores with the KV cache in f32 and bf16. All
# results in one tar in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/res
RES=/tmp/res
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
C=/tmp/c; mkdir -p $C; for f in target/cuda-xz/*.xz; do xz -dc $f > $C/$(basename $f .xz); chmod +x $C/$(basename $f .xz); done
R=bench/results/2026-12-02-h200-llama
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES="$PWD/tests/fixtures" timeout 200 $C/cuda-tests --test-threads 1 --nocapture >$RES/tests.log 2>&1
echo "cuda tests rc $? at $(el) s"; grep -E "^test |^test result|panicked" $RES/tests.log | head -40
m=/tmp/M
( time timeout 200 $C/flashmoe synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to $m --force >/dev/null ) 2>&1 | tail -3
fm() { # label env... binary P G
    local label=$1; shift
    local j
    j=$(timeout 120 env "$@" bench --model $m --device cuda --json --prompt-tokens $P --gen-tokens $G 2>>$RES/err.log | grep '^{')
    echo "$label P=$P $j" >>$RES/bench.txt
    echo "$label P=$P $(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tok_s"]), round(d["decode_tok_s"],1))' 2>&1)"
}
N=$C/flashmoe; O=$C/flashmoe-old
timeout 30 $N bench --model $m --device cuda --prompt-tokens 64 --gen-tokens 8 >/dev/null 2>&1
for r in 1 2; do
    P=512 G=128 fm old X=1 $O
    P=512 G=128 fm new X=1 $N
    P=512 G=128 fm new-dec FLASHMOE_CUDA_ATTN=dec $N
    P=512 G=128 fm new-pdl FLASHMOE_CUDA_PDL=1 $N
done
P=4096 G=64 fm old X=1 $O
P=4096 G=64 fm new X=1 $N
P=4096 G=64 fm new-dec FLASHMOE_CUDA_ATTN=dec $N
P=8192 G=64 fm new X=1 $N
P=8192 G=64 fm new-dec FLASHMOE_CUDA_ATTN=dec $N
echo "flashmoe A/B done at $(el) s"
INC=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name cupti.h 2>/dev/null | head -1)")
LIB=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name 'libcupti.so*' 2>/dev/null | head -1)")
gcc -shared -fPIC -O2 -I"$INC" -I/usr/local/cuda/include scripts/cupti_trace.c -L"$LIB" -lcupti -o /tmp/cupti_trace.so && export LD_LIBRARY_PATH=$LIB:$LD_LIBRARY_PATH
for v in new; do
    E=X=1; B=$N; [ $v = old ] && B=$O
    env $E CUDA_INJECTION64_PATH=/tmp/cupti_trace.so CUPTI_TRACE_OUT=/tmp/trace-$v.txt timeout 60 $B bench --model $m --device cuda --prompt-tokens 512 --gen-tokens 32 >/dev/null 2>&1
    echo "== $v" >>$RES/tables.txt; python3 scripts/cupti_table.py /tmp/trace-$v.txt 16 >>$RES/tables.txt 2>&1
done
# issue 18 on the 16 cores: the KV cache in f32 and bf16 (bench/kv_cache.sh, 2 rounds), and the memory roofline
$N sysbench --memory 2>&1 | tail -4 | tee $RES/sysbench.txt
# (within the call's limit: skipped past 430 s)
[ "$(el)" -lt 430 ] && timeout $(( 560 - $(el) )) bash bench/kv_cache.sh $N $m $RES/kv 2 --device cpu --threads 16 >$RES/kv.txt 2>&1
tail -8 $RES/kv.txt
echo "cpu done at $(el) s"
xz -9 -c /tmp/trace-new.txt > $RES/trace-new.txt.xz
tar cf $OUT/res.tar -C /tmp res
cat $RES/tables.txt | head -70
echo "end at $(el) s"
