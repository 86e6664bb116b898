#!/bin/bash
# Second round of the beyond-RAM decode rows (64 tokens), same models and cgroup as ../run.sh.
#   BIN=... WORK=/work/bench-routing bash bench/results/2026-12-02-routing/decode2/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export MEMCG_NAME=flashmoe_routing
. "$here/../../../../scripts/memcg.sh"
for m in uniform realistic skewed; do
    memcg_init 1G
    ( memcg_run "$BIN" bench --cold --json --model "$WORK/m6-$m" --prompt-tokens 16 --gen-tokens 64 ) > "$here/decode_$m.json" 2> "$here/decode_$m.log"
    memcg_peak > "$here/decode_$m.peak"
    python3 -c "import json,sys;r=json.load(open(sys.argv[1]));d=r['decode_routing'];print(sys.argv[2],round(r['decode_tok_s'],2),round(r['cache_hit_rate'],3),round(r['bytes_fetched_per_token']/1e6),round(d['top10_share'],3),round(d['reuse'],3))" "$here/decode_$m.json" "$m"
done
