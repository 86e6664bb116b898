#!/usr/bin/env bash
# One device call (carry target/cuda-carry, built by scripts/test_cuda.sh --build; copy this script there): the CUDA tests on the merged main, then DeepSeek-V3's MLA prefill on the 16-core CPU
set -o pipefail
C=target/cuda-carry
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES=$PWD/tests/fixtures timeout 120 $C/cuda-tests --test-threads 1 2>&1 | tee $OUT/tests.log | grep -E "^test |panicked|result" | tail -30
$C/flashmoe sysbench --memory 2>&1 | tail -3 | tee $OUT/sysbench.log
( time timeout 100 $C/flashmoe synth --preset deepseek-v3 --layers 4 --to /tmp/ds ) 2>&1 | tail -4
B="$C/flashmoe bench --model /tmp/ds --json --device cpu --gen-tokens 8"
for t in 16 4; do
  timeout 60 $B --threads $t --prompt-tokens 2048 2>&1 | tee -a $OUT/bench.log | python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); print('"$t"', {k:d.get(k) for k in ("prompt_tokens","prefill_tok_s","decode_tok_s","threads")})'
done
timeout 40 $B --threads 1 --prompt-tokens 256 2>&1 | tee -a $OUT/bench.log | python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); print(1, {k:d.get(k) for k in ("prompt_tokens","prefill_tok_s","decode_tok_s")})'
timeout 30 $B --threads 16 --prompt-tokens 256 2>&1 | tee -a $OUT/bench.log | python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); print(16, {k:d.get(k) for k in ("prompt_tokens","prefill_tok_s","decode_tok_s")})'
