#!/usr/bin/env bash
# flashmoe against llama.cpp on one and the same Q4_K_M GGUF (CPU), interleaved, warm and
# beyond RAM: the Qwen3-30B-A3B per-layer shape cut to $LAYERS layers, written as Q8_0 by
# scripts/make_synth_gguf.py and turned into Q4_K_M by llama.cpp's own llama-quantize (its
# real mix: Q4_K, Q6_K for output and for attn_v / ffn_down_exps of the layers its rule picks).
#
#   LLAMA_BUILD=/work/llama-build/build GGUF_PY=/path/llama.cpp/gguf-py PYTHON=python3 \
#       WORK=/work/bench-gguf MEMCG=1500M bash bench/gguf_vs_llama.sh
#
# Rows per round: llama.cpp (llama-bench, mmap, the one warm-up it does by default), flashmoe
# on the GGUF, flashmoe on `convert --from F.gguf --experts q4 --dense q4` (flash layout,
# flashmoe's own 4-bit format). Warm: the files in the page cache. Beyond RAM (MEMCG set,
# needs root): every run inside a memory cgroup of $MEMCG with the file evicted from the page
# cache first; flashmoe with --cold and its own cache mode choice (auto: direct here). One JSON
# line per run in $RES.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flashmoe}
LLAMA_BUILD=${LLAMA_BUILD:?llama.cpp build dir with bin/llama-bench and bin/llama-quantize}
WORK=${WORK:-/tmp/flashmoe-gguf}
RES=${RES:-$WORK/results.jsonl}
LAYERS=${LAYERS:-8}
THREADS=${THREADS:-$(nproc)}
PROMPT=${PROMPT:-512}
GEN=${GEN:-64}
ROUNDS=${ROUNDS:-3}
MEMCG=${MEMCG:-}
COLD_ROUNDS=${COLD_ROUNDS:-2}
COLD_GEN=${COLD_GEN:-16}        # decode tokens beyond RAM (llama.cpp's mmap thrashes there)
COLD_TIMEOUT=${COLD_TIMEOUT:-600} # seconds a beyond-RAM llama-bench run may take
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"
gguf=$WORK/synth$LAYERS-q4_k_m.gguf
if [ ! -s "$gguf" ]; then
    PYTHONPATH=${GGUF_PY:-} "$PYTHON" scripts/make_synth_gguf.py "$WORK/synth$LAYERS-q8_0.gguf" "$LAYERS"
    "$LLAMA_BUILD/bin/llama-quantize" --allow-requantize "$WORK/synth$LAYERS-q8_0.gguf" "$gguf" Q4_K_M "$THREADS" \
        >"$WORK/quantize.log" 2>&1
    rm -f "$WORK/synth$LAYERS-q8_0.gguf"
fi
flash=$WORK/synth$LAYERS-flash
# --experts keep is refused for a Q4_K_M file (its experts mix Q4_K and Q6_K and the flash layout
# holds one expert format): flashmoe's own q4 (group 64), its dense matrices q4 too
[ -s "$flash/flashmoe.json" ] || "$BIN" convert --from "$gguf" --to "$flash" --experts q4 --dense q4 --force
"$BIN" sysbench --memory | tee -a "$RES.sysbench"
"$BIN" sysbench --file "$gguf" --direct | tee -a "$RES.sysbench"

evict() { # drop one file's pages from the page cache
    "$PYTHON" -c 'import os,sys
for p in sys.argv[1:]:
    fd=os.open(p,os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
}
# shellcheck source=../scripts/memcg.sh
. scripts/memcg.sh
in_cg() { # run "$@" in the memory cgroup (a subshell becomes it)
    (memcg_run "$@")
}
llama() { # mode
    local pre=() extra=() j
    # beyond RAM without the CPU repack (--repack 1, its default, copies the Q4_K weights into
    # anonymous memory: 1.5 GB of it met the cgroup's OOM killer), reading through its mmap
    local gen=$GEN
    [ "$1" = cold ] && { evict "$gguf"; pre=(in_cg timeout "$COLD_TIMEOUT"); extra=(--repack 0 -lm mmap --no-warmup); gen=$COLD_GEN; }
    j=$("${pre[@]}" "$LLAMA_BUILD/bin/llama-bench" -m "$gguf" -p "$PROMPT" -n "$gen" -t "$THREADS" -r 1 -o jsonl "${extra[@]}" 2>"$WORK/llama.err" |
        "$PYTHON" -c 'import sys,json
r=[json.loads(l) for l in sys.stdin if l.strip()]
print(json.dumps({"prefill_tok_s":[x["avg_ts"] for x in r if x["n_prompt"]][0],"decode_tok_s":[x["avg_ts"] for x in r if x["n_gen"]][0]}))') ||
        j="{\"failed\":\"no result (over ${COLD_TIMEOUT}s beyond RAM, or see $WORK/llama.err)\"}"
    echo "{\"engine\":\"llama.cpp\",\"mode\":\"$1\",\"run\":$j}" | tee -a "$RES"
}
fm() { # label model mode
    local pre=() extra=() j gen=$GEN
    if [ "$3" = cold ]; then
        pre=(in_cg)
        extra=(--cold)
        gen=$COLD_GEN
        [ -f "$2" ] && evict "$2"
        [ -d "$2" ] && mapfile -t files < <(find "$2" -type f) && evict "${files[@]}"
    fi
    j=$("${pre[@]}" "$BIN" bench --model "$2" --threads "$THREADS" --prompt-tokens "$PROMPT" --gen-tokens "$gen" --json "${extra[@]}")
    echo "{\"engine\":\"$1\",\"mode\":\"$3\",\"run\":$j}" | tee -a "$RES"
}
find "$gguf" "$flash" -type f -exec cat {} + >/dev/null
for r in $(seq "$ROUNDS"); do
    echo "== warm round $r"
    llama warm
    fm flashmoe-gguf "$gguf" warm
    fm flashmoe-flash "$flash" warm
done
if [ -n "$MEMCG" ]; then
    memcg_init "$MEMCG"
    for r in $(seq "$COLD_ROUNDS"); do
        echo "== beyond RAM ($MEMCG) round $r"
        llama cold
        fm flashmoe-gguf "$gguf" cold
        fm flashmoe-flash "$flash" cold
    done
fi
"$PYTHON" - "$RES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for mode in ("warm", "cold"):
    for eng in ("llama.cpp", "flashmoe-gguf", "flashmoe-flash"):
        r = [x["run"] for x in rows if x["mode"] == mode and x["engine"] == eng and "failed" not in x["run"]]
        bad = sum(1 for x in rows if x["mode"] == mode and x["engine"] == eng and "failed" in x["run"])
        if bad:
            print(f"{mode:5} {eng:15} {bad} run(s) without a result")
        if not r:
            continue
        pp = sorted(x["prefill_tok_s"] for x in r)
        tg = sorted(x["decode_tok_s"] for x in r)
        print(f"{mode:5} {eng:15} n={len(r)} prefill median {statistics.median(pp):7.2f} ({pp[0]:.2f}-{pp[-1]:.2f})"
              f"  decode median {statistics.median(tg):6.2f} ({tg[0]:.2f}-{tg[-1]:.2f})")
EOF
