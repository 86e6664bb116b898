#!/usr/bin/env bash
# One device call: the CUDA tests (MLA fixtures included), then DeepSeek-V3's 4-layer cut on the
# GPU and on the 16 CPU cores. Carried as target/cudamla-carry; run from the repository root.
set -o pipefail
C=target/cudamla-carry
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
T=${TESTS:-}
FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES=$PWD/tests/fixtures timeout ${TT:-200} $C/cuda-tests --test-threads 1 --nocapture $T 2>&1 | tee $OUT/tests.log | grep -E "^test |panicked|result|error|CUDA|latent" | tail -150
[ -n "${NOBENCH:-}" ] && exit 0
( time timeout 120 $C/flashmoe synth --preset deepseek-v3 --layers 4 --to /tmp/ds ) 2>&1 | tail -4
show() { python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); print(sys.argv[1], {k:d.get(k) for k in ("prompt_tokens","gen_tokens","prefill_tok_s","decode_tok_s","weight_bytes_per_token","resident_weight_bytes")})' "$1"; }
for P in 512 2048; do
  timeout 90 $C/flashmoe bench --model /tmp/ds --device cuda --prompt-tokens $P --gen-tokens 64 --json 2>&1 | tee -a $OUT/bench-cuda.log | show cuda
done
timeout 90 $C/flashmoe bench --model /tmp/ds --device cuda --prompt-tokens 512 --gen-tokens 64 --json 2>&1 | tee -a $OUT/bench-cuda.log | show cuda-again
for P in 512 2048; do
  timeout 100 $C/flashmoe bench --model /tmp/ds --device cpu --threads 16 --prompt-tokens $P --gen-tokens 16 --json 2>&1 | tee -a $OUT/bench-cpu.log | show cpu16
done
