#!/usr/bin/env bash
# The built-in model's quality table of docs/QUALITY.md: validation perplexity (held-out plays,
# models/default/valid.txt) for bf16/q8/q4/q3/q2 experts and for K = all, half, quarter of the
# routed experts, with KL divergence and top-1 agreement against the bf16, K = all model.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/flashmoe
M=models/default
T=$M/valid.txt
echo "| experts | K | perplexity | mean KL vs bf16 K=4 | top-1 agreement |"
echo "|---|---|---|---|---|"
row() { # label K args...
    local label=$1 k=$2; shift 2
    # --exact: f32 prefill activations, so the table shows what the weights' formats cost
    $BIN eval --model $M --text $T --reference $M --json --exact "$@" | python3 -c "
import json,sys; r=json.load(sys.stdin)
print(f'| $label | $k | {r[\"perplexity\"]:.3f} | {r[\"kl\"]:.4f} | {100*r[\"top1\"]:.1f}% |')"
}
row bf16 4
for q in q8 q4 q3 q2; do row $q 4 --experts $q; done
row bf16 2 --experts-per-token 2
row bf16 1 --experts-per-token 1
row q4 2 --experts q4 --experts-per-token 2
row q2 2 --experts q2 --experts-per-token 2
