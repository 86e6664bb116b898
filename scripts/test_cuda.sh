#!/usr/bin/env bash
# The CUDA backend's tests and a first benchmark, in one call on a GPU machine that has no Rust:
# build here with `scripts/test_cuda.sh --build` (writes target/cuda-carry/), carry that folder,
# and run `bash scripts/test_cuda.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/cuda-carry
if [ "${1:-}" = "--build" ]; then
    cargo build --release --features cuda
    bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="cuda": print(m["executable"])')
    mkdir -p "$CARRY"
    strip -o "$CARRY/flashmoe" "${CARGO_TARGET_DIR:-target}/release/flashmoe"
    strip -o "$CARRY/cuda-tests" "$bin"
    ls -la "$CARRY"
    exit 0
fi
# NVRTC ships with the toolkit, often outside the loader's path
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; break; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
FLASHMOE_REQUIRE_CUDA=1 FLASHMOE_FIXTURES="$PWD/tests/fixtures" "$CARRY/cuda-tests" --test-threads 1 --nocapture
