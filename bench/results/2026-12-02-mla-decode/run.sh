#!/usr/bin/env bash
# MLA decode after a long prompt on the lent 16-core Xeon, CPU only: this build at 1/4/8/16
# threads (prefill on 16 with `bench --prefill-threads`, so each count costs one decode, not one
# prompt) against main's build at 16 and 4, with the step profile on.
#
# Here (Rust):  bash bench/results/2026-12-02-mla-decode/run.sh --build [MAIN_FLASHMOE]
#   writes target/mla-carry/flashmoe (this checkout's release build) and, given main's binary,
#   target/mla-carry/flashmoe-main (without it main's runs are skipped).
# There: carry target/mla-carry, then `bash bench/results/2026-12-02-mla-decode/run.sh 2048`
#   and, in a second call, `... run.sh 8192` (each under 10 minutes; the first synthesizes
#   /tmp/ds, about 100 s, which a warm machine keeps for the second). Logs land in $OUT.
#   THREADS="16 4 1" picks the thread counts, REPEAT=0 skips the last run (16 again).
set -o pipefail
cd "$(dirname "$0")/../../.."
C=target/mla-carry
if [ "${1:-}" = "--build" ]; then
    cargo build --release
    mkdir -p "$C"
    strip -o "$C/flashmoe" "${CARGO_TARGET_DIR:-target}/release/flashmoe"
    if [ -n "${2:-}" ]; then strip -o "$C/flashmoe-main" "$2"; fi
    ls -la "$C"
    exit 0
fi
P=${1:-2048}
OUT=${OUT:-/tmp/mla-decode}
mkdir -p "$OUT"
nproc; grep -m1 'model name' /proc/cpuinfo
"$C/flashmoe" sysbench --memory 2>&1 | tail -3 | tee "$OUT/sysbench-$P.log"
if [ ! -f /tmp/ds/flashmoe.json ]; then
    ( time timeout 240 "$C/flashmoe" synth --preset deepseek-v3 --layers 4 --to /tmp/ds ) 2>&1 | tail -4
fi
summary='import json,sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        d=json.loads(l); ph=d["phases_ms"]
        print(sys.argv[2], "prompt", d["prompt_tokens"], "threads", d["threads"], "prefill_threads", d.get("prefill_threads"),
              "prefill %.1f tok/s" % d["prefill_tok_s"], "decode %.2f tok/s" % d["decode_tok_s"],
              "ms/token: attention %.1f team_steps %.1f tails %.1f total %.1f" % (ph["attention_deltanet"], ph["team_steps"], ph["team_step_tails"], ph["total"]))
for l in open(sys.argv[3]):
    if "mla.rs" in l: print("   ", l.strip().split(": ", 1)[1])'
run() { # binary threads [extra bench flags]
    local bin=$1 t=$2; shift 2
    local log="$OUT/$bin-$P-t$t"
    FLASHMOE_STEP_PROFILE=1 timeout 300 "$C/$bin" bench --model /tmp/ds --json --device cpu --cache os \
        --prompt-tokens "$P" --gen-tokens 8 --threads "$t" "$@" >"$log.json" 2>"$log.err"
    echo "rc $? $bin $t" >>"$OUT/rc.log"
    python3 -c "$summary" "$log.json" "$bin" "$log.err"
}
echo "step sites: this build mla.rs:319 W_UKᵀq, :342 attention, :358 merge + W_UV, :380 o_proj, :257/:264 projections;"
echo "            main's mla.rs:159 those first three + merge (4 steps), :396 o_proj, :255/:262 projections"
for t in ${THREADS:-16 8 4 1}; do run flashmoe $t --prefill-threads 16; done
if [ -x "$C/flashmoe-main" ]; then
    run flashmoe-main 16
    # main's prefill at 4 threads: 17 s at 2048 tokens, several minutes at 8192
    if [ "$P" -le 2048 ]; then run flashmoe-main 4; fi
fi
if [ "${REPEAT:-1}" = 1 ]; then run flashmoe 16 --prefill-threads 16; fi
