#!/usr/bin/env bash
# One call on the lent H200 (issue 19): llama.cpp built with CUDA there (its source trimmed and
# carried as target/llama-carry/llama-src.tar.xz, from the PyPI sdist llama-cpp-python 0.3.36),
# and while it builds: the GPU's clocks, what a small kernel costs in a graph (floor.cu), the
# flashmoe decode's kernel timeline (CUPTI). Then llama-bench and flashmoe bench interleaved on
# the same shapes (shared/tools/make_synth_gguf.py's 24-layer Qwen3-30B-A3B Q4_0 GGUF; flashmoe
# synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4), llama.cpp's own kernel
# timeline, and its build kept in $OUT for later calls.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
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
  cmake --build build --target llama-bench -j 16 >$W/build.log 2>&1; echo "llama build rc $? at $(( $(date +%s) - T0 )) s" >$W/done ) &
BUILD=$!
{ nvidia-smi; nvidia-smi -q -d CLOCK,PERFORMANCE,POWER; } >"$OUT/smi.txt" 2>&1
nvcc -O3 -arch=sm_90 $R/floor.cu -o /tmp/floor >"$OUT/floor.txt" 2>&1 && /tmp/floor >>"$OUT/floor.txt" 2>&1
cat "$OUT/floor.txt"
m=/tmp/M
( time timeout 200 $C/flashmoe synth --preset qwen3-30b-a3b --layers 24 --experts q4 --dense q4 --to $m --force >/dev/null ) 2>&1 | tail -3
( time PYTHONPATH=$W/llama.cpp/gguf-py python3 ../shared/tools/make_synth_gguf.py /tmp/s24.gguf 24 >/dev/null ) 2>&1 | tail -3 &
GG=$!
# the CUPTI injector
INC=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name cupti.h 2>/dev/null | head -1)")
LIB=$(dirname "$(find /usr/local/cuda/ /usr/local/cuda*/ -name 'libcupti.so*' 2>/dev/null | head -1)")
gcc -shared -fPIC -O2 -I"$INC" -I/usr/local/cuda/include scripts/cupti_trace.c -L"$LIB" -lcupti -o /tmp/cupti_trace.so && export LD_LIBRARY_PATH=$LIB:$LD_LIBRARY_PATH
# flashmoe decode with the clocks sampled beside it, then its timeline
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,clocks_throttle_reasons.active --format=csv -lms 100 >"$OUT/clocks-flashmoe.csv" 2>&1 &
SMI=$!
timeout 60 $C/flashmoe bench --model $m --device cuda --json --prompt-tokens 512 --gen-tokens 512 2>/dev/null | grep '^{' >"$OUT/fm-clocks.json"
kill $SMI
CUDA_INJECTION64_PATH=/tmp/cupti_trace.so CUPTI_TRACE_OUT=/tmp/trace-fm.txt timeout 60 $C/flashmoe bench --model $m --device cuda --prompt-tokens 512 --gen-tokens 32 >/dev/null 2>&1
python3 scripts/cupti_table.py /tmp/trace-fm.txt 16 >"$OUT/tables.txt" 2>&1
echo "flashmoe timeline done at $(el) s"
wait $GG
wait $BUILD; cat $W/done; tail -3 $W/build.log
LB=$W/build/bin/llama-bench
if [ -x $LB ]; then
    ( cd $W/build/bin && tar cJf /tmp/llama-bin.tar.xz llama-bench *.so* 2>/dev/null; ls -la >"$OUT/llama-bin.ls" )
    split -b 15M /tmp/llama-bin.tar.xz "$OUT/llama-bin.tar.xz."
    ls -la "$OUT"
    fm() { timeout 90 $C/flashmoe bench --model $m --device cuda --json --prompt-tokens $1 --gen-tokens $2 2>/dev/null | grep '^{' | tee -a "$OUT/bench.jsonl" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("flashmoe pp'$1'", round(d["prefill_tok_s"]), "tg", round(d["decode_tok_s"],1))'; }
    lb() { timeout 120 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p $1 -n $2 -r 2 -o jsonl 2>/dev/null | tee -a "$OUT/llama.jsonl" |
        python3 -c 'import json,sys
for l in sys.stdin:
    d=json.loads(l); print("llama.cpp", "pp" if d["n_prompt"] else "tg", d["n_prompt"] or d["n_gen"], round(d["avg_ts"],1))'; }
    timeout 60 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p 64 -n 0 -r 1 >/dev/null 2>&1
    for r in 1 2; do
        echo "round $r at $(el) s"
        fm 512 128; lb 512 128
        fm 4096 64; lb 4096 0
    done
    echo "benches done at $(el) s"
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 100 >"$OUT/clocks-llama.csv" 2>&1 &
    SMI=$!
    CUDA_INJECTION64_PATH=/tmp/cupti_trace.so CUPTI_TRACE_OUT=/tmp/trace-llama.txt timeout 90 $LB -m /tmp/s24.gguf -ngl 99 -fa 1 -p 512 -n 64 -r 1 >/dev/null 2>&1
    kill $SMI
    python3 scripts/cupti_table.py /tmp/trace-llama.txt 16 >>"$OUT/tables.txt" 2>&1
    xz -9 -c /tmp/trace-llama.txt > "$OUT/trace-llama.txt.xz"; xz -9 -c /tmp/trace-fm.txt > "$OUT/trace-fm.txt.xz"
else
    tail -40 $W/cmake.log $W/build.log
fi
cat "$OUT/tables.txt" | head -80
echo "end at $(el) s"
