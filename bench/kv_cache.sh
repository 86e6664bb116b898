#!/usr/bin/env bash
# KV cache types side by side (docs/PERFORMANCE.md, "Many cores", "A 16-bit KV cache"): `bench`
# with an f32 and a bf16 cache, interleaved (ABBA rounds), at 4096- and 512-token prompts, 32
# decode tokens; one JSON line per run in OUT, then a table (mean decode/prefill tok/s, KV
# bytes a decode token reads, attention ms a token).
# Usage: bench/kv_cache.sh FLASHMOE MODEL OUT [ROUNDS] [extra bench flags, e.g. --threads 16]
# The model of the recorded runs: flashmoe synth --preset qwen3-30b-a3b --layers 4 --experts q4 --dense q4 --to MODEL
set -euo pipefail
bin=$1 model=$2 out=$3 rounds=${4:-4}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"
for round in $(seq "$rounds"); do
    if (( round % 2 )); then order="f32 bf16"; else order="bf16 f32"; fi
    for p in 4096 512; do
        for kv in $order; do
            echo "round $round prompt $p kv $kv $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
            "$bin" bench --model "$model" --prompt-tokens "$p" --gen-tokens 32 --json --kv-cache "$kv" "$@" \
                > "$out/r-$round-$p-$kv.json" 2>/dev/null
        done
    done
done
python3 - "$out" <<'PY'
import glob, json, statistics as st, sys
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/r-*.json")):
    r = json.load(open(f))
    rows.setdefault((r["prompt_tokens"], r["kv_cache"]), []).append(r)
print("| prompt | cache | decode tok/s (runs) | mean | prefill tok/s mean | KV MB/token | attention ms/token |")
print("|---|---|---|---|---|---|---|")
for (p, kv), rs in sorted(rows.items(), key=lambda x: (-x[0][0], x[0][1] != "f32")):
    d = [r["decode_tok_s"] for r in rs]
    print(f"| {p} | {kv} | {' / '.join(f'{x:.1f}' for x in d)} | {st.mean(d):.2f} | "
          f"{st.mean(r['prefill_tok_s'] for r in rs):.1f} | {rs[0]['kv_bytes_per_token'] / 1e6:.1f} | "
          f"{st.mean(r['phases_ms']['attention_deltanet'] for r in rs):.2f} |")
PY
