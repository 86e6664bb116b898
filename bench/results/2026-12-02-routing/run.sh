#!/bin/bash
# Issue 14: beyond-RAM decode and 2k/8k-token prefill of a Qwen3-30B-A3B shape cut to 6 layers
# (2.46 GB: 0.42 GB resident q4, 2.04 GB of q4 experts) for each synthetic routing mode, in a
# memory cgroup smaller than the model, against the disk roofline and the warm (page-cached)
# prefill of the same prompt. Needs root (the cgroup, dropping the page cache).
#   BIN=target/release/flashmoe WORK=/work/bench-routing LIMIT=1G bash bench/results/2026-12-02-routing/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-target/release/flashmoe}
WORK=${WORK:?a directory for the models}
LIMIT=${LIMIT:-1G}
MODES=${MODES:-uniform realistic skewed}
PROMPTS=${PROMPTS:-2048 8192}
RES=${RES:-$here}
export MEMCG_NAME=flashmoe_routing
. "$(dirname "$0")/../../../scripts/memcg.sh"
for m in $MODES; do
    [ -f "$WORK/m6-$m/flashmoe.json" ] || $BIN synth --preset qwen3-30b-a3b --layers 6 --routing "$m" --to "$WORK/m6-$m"
done
first=$(echo $MODES | cut -d' ' -f1)
for t in 1 8; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    $BIN sysbench --file "$WORK/m6-$first/experts/layer_000.bin" --block 2654208 --io-threads $t --direct | tee -a "$RES/sysbench.jsonl"
done
$BIN sysbench --memory | tee -a "$RES/sysbench.jsonl"
beyond() { # NAME ARGS...: bench in the cgroup, cold
    local name=$1; shift
    memcg_init "$LIMIT"
    ( memcg_run $BIN bench --cold --json "$@" ) > "$RES/$name.json" 2> "$RES/$name.log"
    echo "$(memcg_peak)" > "$RES/$name.peak"
    echo "$name: $(python3 -c "import json,sys;r=json.load(open(sys.argv[1]));print(r['prefill_tok_s'],r['decode_tok_s'],r['cache_mode'])" "$RES/$name.json") peak $(cat "$RES/$name.peak")"
}
warm() { # NAME ARGS...: bench with the model's files in the page cache, no limit
    local name=$1 dir=$3; shift
    cat "$dir"/experts/*.bin "$dir"/*.bin > /dev/null
    $BIN bench --json --cache os "$@" > "$RES/$name.json" 2> "$RES/$name.log"
    echo "$name: $(python3 -c "import json,sys;r=json.load(open(sys.argv[1]));print(r['prefill_tok_s'],r['decode_tok_s'],r['cache_mode'])" "$RES/$name.json")"
}
# the modes interleaved within each measurement, uniform first
for m in $MODES; do beyond "decode_$m" --model "$WORK/m6-$m" --prompt-tokens 16 --gen-tokens 32; done
for p in $PROMPTS; do
    for m in $MODES; do
        beyond "prefill${p}_$m" --model "$WORK/m6-$m" --prompt-tokens "$p" --gen-tokens 1
        warm "warm${p}_$m" --model "$WORK/m6-$m" --prompt-tokens "$p" --gen-tokens 1
    done
done
python3 "$here/table.py" "$RES"
