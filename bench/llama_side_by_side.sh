#!/usr/bin/env bash
# flashmoe against llama.cpp on the CPU, same machine, same shape, same 4-bit bytes, interleaved:
# the Qwen3-30B-A3B per-layer shape as a Q4_0 GGUF (shared/tools/make_synth_gguf.py) for
# llama-bench, and `flashmoe synth --experts q4 --dense q4` for flashmoe. Builds llama-bench
# from a llama.cpp source tree (CPU only, or with CUDA: DEVICE=cuda) while the models are written.
#
#   LLAMA_SRC=~/llama.cpp GGUF_SCRIPT=../shared/tools/make_synth_gguf.py bash bench/llama_side_by_side.sh
#
# BIN: flashmoe binary; OTHERS: "label=binary ..." earlier builds to interleave too (optional);
# SCALING: thread counts to run BIN at afterwards (optional); LAYERS, THREADS, PROMPT, GEN,
# ROUNDS. One JSON line per run in $RES; a summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flashmoe}
OTHERS=${OTHERS:-}
SCALING=${SCALING:-}
LLAMA_SRC=${LLAMA_SRC:?the llama.cpp source tree}
GGUF_SCRIPT=${GGUF_SCRIPT:?make_synth_gguf.py}
WORK=${WORK:-/tmp/flashmoe-llama}
RES=${RES:-bench/results/llama.jsonl}
LAYERS=${LAYERS:-24}
THREADS=${THREADS:-16}
PROMPT=${PROMPT:-512}
GEN=${GEN:-64}
ROUNDS=${ROUNDS:-2}
# DEVICE=cuda: both engines on the GPU (llama.cpp built with CUDA for CUDA_ARCH, all layers
# offloaded, flash attention on; flashmoe --device cuda)
DEVICE=${DEVICE:-}
CUDA_ARCH=${CUDA_ARCH:-90}
if [ "$DEVICE" = cuda ]; then
    LLAMA_CUDA="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
    LLAMA_GPU=(-ngl 99 -fa 1)
    FM_DEV=(--device cuda)
else
    LLAMA_CUDA="-DGGML_CUDA=OFF"
    LLAMA_GPU=()
    FM_DEV=()
    [ -n "$DEVICE" ] && FM_DEV=(--device "$DEVICE")
fi
mkdir -p "$WORK" "$(dirname "$RES")"
LB="$WORK/build/bin/llama-bench"
if [ ! -x "$LB" ]; then
    (cmake -S "$LLAMA_SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        $LLAMA_CUDA -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$WORK/cmake.log" 2>&1 &&
        cmake --build "$WORK/build" --target llama-bench -j "$(nproc)" >"$WORK/build.log" 2>&1) &
    build=$!
fi
gguf="$WORK/synth-$LAYERS.gguf"
[ -s "$gguf" ] || PYTHONPATH="$LLAMA_SRC/gguf-py" python3 "$GGUF_SCRIPT" "$gguf" "$LAYERS"
m="$WORK/flashmoe-$LAYERS"
[ -s "$m/manifest.json" ] || "$BIN" synth --preset qwen3-30b-a3b --layers "$LAYERS" --experts q4 --dense q4 --routing skewed --to "$m" --force
if [ -n "${build:-}" ]; then
    wait "$build" || { tail -n 30 "$WORK/cmake.log" "$WORK/build.log"; exit 1; }
fi
"$BIN" sysbench --memory | tee -a "$RES.sysbench"
fm() { # label binary [threads]
    local j t=${3:-$THREADS}
    j=$("$2" bench --model "$m" --threads "$t" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --json "${FM_DEV[@]}")
    echo "{\"engine\":\"$1\",\"threads\":$t,\"run\":$j}" | tee -a "$RES"
}
fm warmup "$BIN" >/dev/null
"$LB" -m "$gguf" -t "$THREADS" -p "$PROMPT" -n 0 -r 1 "${LLAMA_GPU[@]}" >/dev/null # warm the page cache
for _ in $(seq "$ROUNDS"); do
    fm flashmoe "$BIN"
    "$LB" -m "$gguf" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r 2 -o jsonl "${LLAMA_GPU[@]}" |
        while read -r l; do echo "{\"engine\":\"llama.cpp\",\"threads\":$THREADS,\"run\":$l}"; done | tee -a "$RES"
    for o in $OTHERS; do fm "${o%%=*}" "${o#*=}"; done
done
for t in $SCALING; do fm flashmoe "$BIN" "$t"; done
python3 - "$RES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    e, d = r["engine"], r["run"]
    if e == "llama.cpp":
        kind = "pp" if d["n_prompt"] else "tg"
        print(f"{e:14} {kind}{d['n_prompt'] or d['n_gen']:<4} {d['avg_ts']:8.1f} tok/s")
    else:
        print(f"{e:14} pp{d.get('prompt_tokens', '')} {d['prefill_tok_s']:8.1f} tok/s   tg {d['decode_tok_s']:7.2f} tok/s   {r['threads']} threads")
EOF
