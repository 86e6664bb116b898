#!/usr/bin/env bash
# Beyond RAM, measured: full-scale synthetic models bigger than the memory they may use.
#
#  1. this machine's limits: random expert-sized O_DIRECT reads at the engine's parallelism,
#     and memory read bandwidth;
#  2. models larger than a memory cgroup's limit (page cache is charged to the cgroup; going
#     over the limit with anonymous memory kills the process), run cold in both cache modes:
#       - a Qwen3-Next-80B-A3B-shaped model, all 48 layers, q4 experts (~50 GB),
#       - a Qwen3.5-397B-A17B-shaped model cut to $L397 layers (every per-layer shape exact);
#  3. JSON results in $RESULTS, and the table for docs/PERFORMANCE.md (bench/perf_table.py).
#
# Needs root for the cgroup (v1 memory controller, or cgroup v2 memory.max) and ~55 GB free
# disk under $WORK. The synthetic models are deleted at the end (KEEP=1 keeps them).
#
#   bash bench/beyond_ram.sh                 # the Qwen models
#   ONLY=next80b bash bench/beyond_ram.sh    # one model
#   ONLY=families bash bench/beyond_ram.sh   # GLM-4.5, MiniMax-M2, gpt-oss-120b, Mixtral-8x22B,
#                                            # each cut to a few layers, in a $LIMIT_FAM cgroup
#   ONLY=mla bash bench/beyond_ram.sh        # DeepSeek-V3, Kimi-K2.5, GLM-5 cut to a few layers,
#                                            # in a $LIMIT_MLA cgroup
#   ONLY=sweep bash bench/beyond_ram.sh      # one model (Qwen3-30B-A3B's shape cut to $LSWEEP
#                                            # layers, q4) cold under each limit of $SWEEP and
#                                            # none, default store flags: the data of
#                                            # bench/plot_memory.py's plot
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flashmoe}
WORK=${WORK:-/work/flashmoe-bench}
RESULTS=${RESULTS:-bench/results}
LIMIT_80B=${LIMIT_80B:-10G}
LIMIT_397B=${LIMIT_397B:-8G}
L397=${L397:-6}
LIMIT_FAM=${LIMIT_FAM:-6G}
LIMIT_MLA=${LIMIT_MLA:-12G}
GEN=${GEN:-24}
PROMPT=${PROMPT:-16}
ONLY=${ONLY:-all}
# resident weights' format (bf16 in the tables so far; q4 as MLX 4-bit releases: DENSE=q4)
DENSE=${DENSE:-bf16}

[ "${BUILD:-1}" = 0 ] || cargo build --release --quiet  # BUILD=0: $BIN as it is
mkdir -p "$WORK" "$RESULTS"
echo "disk: $(df -h "$WORK" | tail -1)"

# Runs a command inside a memory cgroup limited to $1 (v1, else v2). Prints the cgroup's peak.
limited() {
    local limit=$1; shift
    local bytes
    bytes=$(numfmt --from=iec "$limit")
    if [ -d /sys/fs/cgroup/memory ]; then
        local cg=/sys/fs/cgroup/memory/flashmoe_bench
        [ -d $cg ] || mkdir $cg
        echo "$bytes" > $cg/memory.limit_in_bytes
        echo 0 > $cg/memory.max_usage_in_bytes 2>/dev/null || true
        sh -c "echo \$\$ > $cg/cgroup.procs && exec \"\$@\"" _ "$@"
        echo "cgroup peak: $(cat $cg/memory.max_usage_in_bytes) bytes (limit $bytes)" >&2
    else
        local root=/sys/fs/cgroup
        [ -f $root/cgroup.controllers ] || root=/sys/fs/cgroup/unified
        local cg=$root/flashmoe_bench
        [ -d $cg ] || mkdir $cg
        echo "+memory" > $root/cgroup.subtree_control 2>/dev/null || true
        echo "$bytes" > $cg/memory.max
        sh -c "echo \$\$ > $cg/cgroup.procs && exec \"\$@\"" _ "$@"
        echo "cgroup peak: $(cat $cg/memory.peak 2>/dev/null || echo n/a) bytes (limit $bytes)" >&2
    fi
}

drop_all() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# 1. machine limits (memory now; disk on the first expert file written below)
$BIN sysbench --memory | tee "$RESULTS/memory.json"

run_model() {
    local name=$1 preset=$2 limit=$3; shift 3
    local dir=$WORK/$name
    [ -f "$dir/flashmoe.json" ] || $BIN synth --preset "$preset" --experts q4 --dense "${DENSE:-bf16}" --routing skewed "$@" --to "$dir" --force
    local stride
    stride=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['experts']['stride'])" "$dir/flashmoe.json")
    du -sh "$dir"
    for t in 1 4 8 16; do
        drop_all
        $BIN sysbench --file "$(ls "$dir"/experts/*.bin | head -1)" --block "$stride" --io-threads $t --direct --seconds 4 \
            | tee "$RESULTS/${name}_disk_t$t.json"
    done
    for k in "${KS[@]}"; do
        for cache in os direct; do
            drop_all
            echo "== $name k=$k cache=$cache (memory limit $limit)"
            limited "$limit" $BIN bench --model "$dir" --cold --cache $cache --cache-size 2G --io-threads 8 \
                --experts-per-token "$k" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --json \
                2> >(tee "$RESULTS/${name}_k${k}_${cache}.log" >&2) | tee "$RESULTS/${name}_k${k}_${cache}.json"
        done
    done
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}

if [ "$ONLY" = all ] || [ "$ONLY" = next80b ]; then
    KS=(10)
    run_model next80b qwen3-next-80b-a3b "$LIMIT_80B"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = q397b ]; then
    KS=(10 4)
    run_model q397b qwen3.5-397b-a17b "$LIMIT_397B" --layers "$L397"
fi
if [ "$ONLY" = families ]; then
    # every per-layer shape exact; the layer cuts keep each model 2-4x the cgroup's limit
    KS=(8); run_model glm45 glm-4.5 "$LIMIT_FAM" --layers 8
    KS=(8); run_model minimax_m2 minimax-m2 "$LIMIT_FAM" --layers 8
    KS=(4); run_model gpt_oss_120b gpt-oss-120b "$LIMIT_FAM" --layers 12
    KS=(2); run_model mixtral_8x22b mixtral-8x22b "$LIMIT_FAM" --layers 6
fi
if [ "$ONLY" = mla ]; then
    # the dense-first layers and 129k-164k vocabularies make 6-9 GB of resident weights: a
    # 12 GiB cgroup holds them and leaves a few GB for experts; each cut is 1.5-3x the limit
    [ -n "${SKIP_DSV3:-}" ] || { KS=(8); run_model deepseek_v3 deepseek-v3 "$LIMIT_MLA" --layers 6; }
    KS=(8); run_model kimi_k25 kimi-k2.5 "$LIMIT_MLA" --layers 4
    KS=(8); run_model glm5 glm-5 "$LIMIT_MLA" --layers 5
fi
if [ "$ONLY" = sweep ]; then
    # what a user gets by default (--cache auto, --cache-size auto) as the memory shrinks
    dir=$WORK/sweep30b
    [ -f "$dir/flashmoe.json" ] || $BIN synth --preset qwen3-30b-a3b --layers "${LSWEEP:-12}" --experts q4 --dense q4 \
        --routing skewed --to "$dir" --force
    du -sh "$dir" | tee "$RESULTS/sweep_model_size.txt"
    for limit in ${SWEEP:-1G 1536M 2G 3G 4G 6G} none; do
        drop_all
        echo "== sweep: memory limit $limit"
        run=($BIN bench --model "$dir" --cold --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --json)
        if [ "$limit" = none ]; then "${run[@]}"; else limited "$limit" "${run[@]}"; fi \
            2> >(tee "$RESULTS/sweep_$limit.log" >&2) | tee "$RESULTS/sweep_$limit.json"
    done
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
    python3 bench/plot_memory.py "$RESULTS" docs/memory_sweep.svg \
        "Qwen3-30B-A3B shape, ${LSWEEP:-12} of 48 layers, q4 ($(cut -f1 "$RESULTS/sweep_model_size.txt"))"
    exit 0
fi
python3 bench/perf_table.py "$RESULTS"
