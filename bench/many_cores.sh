#!/usr/bin/env bash
# Many cores: warm decode and 512-token prefill at 1..16 threads on full-size synthetic shapes,
# AMX against the AVX-512 VNNI/BF16 path, and the Qwen3-30B-A3B 24-layer shape that llama.cpp
# was measured on (docs/PERFORMANCE.md). Runs a prebuilt binary, so it can be carried to a
# machine without Rust:
#
#   SHAPES="qwen3-30b-a3b:24" bash bench/many_cores.sh
#
# SHAPES: preset:layers ...; THREADS: thread counts; one JSON line per run in $RES, the table
# printed at the end (bench/cores_table.py). Each model is deleted after its runs (KEEP=1 keeps
# them under $WORK).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/flashmoe}
WORK=${WORK:-/tmp/flashmoe-cores}
RES=${RES:-bench/results/cores.jsonl}
THREADS=${THREADS:-"1 2 4 8 16"}
SHAPES=${SHAPES:-"qwen3-30b-a3b:24 qwen3.5-35b-a3b:40 qwen3-next-80b-a3b:48"}
PROMPT=${PROMPT:-512}
GEN=${GEN:-32}
DENSE=${DENSE:-bf16}
# extra runs at 16 threads: no-amx (FLASHMOE_AMX=off), exact (--exact)
VARIANTS=${VARIANTS:-"no-amx exact"}
mkdir -p "$WORK" "$(dirname "$RES")"
"$BIN" sysbench --memory | tee -a "$RES.sysbench"
for spec in $SHAPES; do
    preset=${spec%%:*}
    layers=${spec##*:}
    m="$WORK/$preset-$layers"
    rm -rf "$m"
    start=$SECONDS
    "$BIN" synth --preset "$preset" --layers "$layers" --experts q4 --dense "$DENSE" --to "$m"
    echo "synth $preset:$layers took $((SECONDS - start)) s"
    run() { # label, env, threads, extra args
        local label=$1 env=$2 t=$3
        shift 3
        local j
        j=$(env $env "$BIN" bench --model "$m" --threads "$t" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --json "$@")
        echo "{\"shape\":\"$preset:$layers\",\"dense\":\"$DENSE\",\"variant\":\"$label\",\"threads\":$t,\"run\":$j}" | tee -a "$RES"
    }
    run warmup "" 16 >/dev/null
    for t in $THREADS; do
        run default "" "$t"
    done
    for v in $VARIANTS; do
        case $v in
            no-amx) run no-amx FLASHMOE_AMX=off 16 ;;
            exact) run exact "" 16 --exact ;;
        esac
    done
    [ "${KEEP:-0}" = 1 ] || rm -rf "$m"
done
python3 bench/cores_table.py "$RES"
