#!/usr/bin/env bash
# Third call on the lent H200 (issue 19): the CUDA tests on this build (attn_vec, the norm's
# loads, the router's small blocks); flashmoe's session-start build (flashmoe-old) against
# this one (and this one with FLASHMOE_CUDA_ATTN=dec, the previous decode attention),
# interleaved, 24-layer Qwen3-30B-A3B shape q4; llama.cpp built with CUDA here (the first
# call's trimmed source) on make_synth_gguf.py's Q4_0 GGUF of the same shape, interleaved with
# flashmoe; kernel timelines of both (CUPTI). All results in one tar in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/res
RES=/tmp/res
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
C=/tmp/c; mkdir -p $C; for f in target/cuda-xz/*.xz; do xz -dc $f > $C/$(basename $f .xz); chmod +x $C/$(basename $f .xz); done
R=bench/results/2026-12-02-h200-llama
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
W=/tmp/lw; mkdir -p $W
( cd $W && tar xJf "$OLDPWD/target/llama-carry/llama-src.tar.xz" &&
  cmake -S llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >$W/cmake.log 2>&1 &&
  cmake --build build --target llama-bench -j 14 >$W/build.log 2>&1; echo "llama build rc $? at $(( $(date +%s) - T0 )) s" >$W/done ) &
BUILD=$!
( PYTHONPATH=$W/llama.cpp/gguf-py; sleep 5; export PYTHONPATH; time python3 $R/make_synth_gguf.py /tmp/s24.gguf 24 ) >$RES/gguf.log 2>&1 &
GG=$!
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
for v in new old; do
    E=X=1; B=$N; [ $v = old ] && B=$O
    env $E CUDA_INJECTION64_PATH=/tmp/cupti_trace.so CUPTI_TRACE_OUT=/tmp/trace-$v.txt timeout 60 $B bench --model $m --device cuda --prompt-tokens 512 --gen-tokens 32 >/dev/null 2>&1
    echo "== $v" >>$RES/tables.txt; python3 scripts/cupti_table.py /tmp/trace-$v.txt 16 >>$RES/tables.txt 2>&1
done
# issue 18 on the 16 cores: the KV cache in f32 and bf16 (bench/kv_cache.sh, 2 rounds), and the memory roofline
$N sysbench --memory 2>&1 | tail -4 | tee $RES/sysbench.txt
timeout 200 bash bench/kv_cache.sh $N $m $RES/kv 2 --device cpu --threads 16 >$RES/kv.txt 2>&1
tail -8 $RES/kv.txt
echo "cpu done at $(el) s"
wait $GG; cat $RES/gguf.log | tail -3
wait $BUILD; cat $W/done; tail -2 $W/build.log
LB=$W/build/bin/llama-bench
if [ -x $LB ] && [ -s /tmp/s24.gguf ]; then
    lb() { timeout 120 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p $1 -n $2 -r 2 -o jsonl 2>>$RES/err.log | tee -a $RES/llama.jsonl |
        python3 -c 'import json,sys
for l in sys.stdin:
    d=json.loads(l); print("llama.cpp", "pp" if d["n_prompt"] else "tg", d["n_prompt"] or d["n_gen"], round(d["avg_ts"],1))'; }
    timeout 60 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p 64 -n 0 -r 1 >/dev/null 2>&1
    for r in 1 2; do
        echo "round $r at $(el) s"
        P=512 G=128 fm new X=1 $N; lb 512 128
        P=4096 G=64 fm new X=1 $N; lb 4096 64
    done
    CUDA_INJECTION64_PATH=/tmp/cupti_trace.so CUPTI_TRACE_OUT=/tmp/trace-llama.txt timeout 90 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p 512 -n 64 -r 1 >/dev/null 2>&1
    echo "== llama.cpp" >>$RES/tables.txt; python3 scripts/cupti_table.py /tmp/trace-llama.txt 16 >>$RES/tables.txt 2>&1
    python3 - /tmp/trace-llama.txt >>$RES/tables.txt 2>&1 <<'PY'
# llama.cpp's decode tokens by gaps: print the span and kernel count of the last runs of kernels
import sys
rows=sorted((int(l.split()[0]),int(l.split()[1]),l.split(None,6)[6].strip()) for l in open(sys.argv[1]) if len(l.split(None,6))==7)
runs=[];cur=[]
for r in rows:
    if cur and r[0]-cur[-1][1]>30000: runs.append(cur);cur=[]
    cur.append(r)
runs.append(cur)
for t in runs[-6:]:
    print("run of", len(t), "kernels, span", round((t[-1][1]-t[0][0])/1e3,1), "us")
PY
    xz -9 -c /tmp/trace-llama.txt > $RES/trace-llama.txt.xz
fi
xz -9 -c /tmp/trace-new.txt > $RES/trace-new.txt.xz
tar cf $OUT/res.tar -C /tmp res
cat $RES/tables.txt | head -70
echo "end at $(el) s"
