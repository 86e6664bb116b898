#!/usr/bin/env bash
# Second device call: the two fixture tests after the add_rmsnorm register cap, then DeepSeek-V3's
# 4-layer cut on the GPU (the CPU side came from the first call, same synth, same commands).
set -o pipefail
C=target/cudamla-carry
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
F="FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES=$PWD/tests/fixtures"
for t in fast_decode_on_cuda_stays_close_to_reference fixtures_match_reference_on_cuda latent_attention_kernel; do
  env FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES=$PWD/tests/fixtures timeout 60 $C/cuda-tests --test-threads 1 --nocapture $t 2>&1 | tee -a $OUT/tests.log | grep -E "deepseek|kimi|panicked|result:|latent"
done
( time timeout 120 $C/flashmoe synth --preset deepseek-v3 --layers 4 --to /tmp/ds ) 2>&1 | tail -4
show() { python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); print(sys.argv[1], {k:d.get(k) for k in ("prompt_tokens","gen_tokens","prefill_tok_s","decode_tok_s","weight_bytes_per_token","resident_weight_bytes")})
    elif "error" in l: print(l.strip())' "$1"; }
for P in 512 2048 512; do
  timeout 60 $C/flashmoe bench --model /tmp/ds --device cuda --prompt-tokens $P --gen-tokens 64 --json 2>&1 | tee -a $OUT/bench-cuda.log | show cuda
done
FLASHMOE_CUDA_TIMING=1 timeout 40 $C/flashmoe bench --model /tmp/ds --device cuda --prompt-tokens 2048 --gen-tokens 16 --json > $OUT/timing.log 2>&1
grep cuda-timing $OUT/timing.log | tail -5
