#!/usr/bin/env bash
# The CUDA feature's tests on a machine without a GPU: the errors for a missing device, and the
# kernels compiled by NVRTC (installed from PyPI into target/nvrtc the first time; no GPU or
# toolkit needed), so a kernel that does not compile fails here and not first on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
nv=target/nvrtc
if [ ! -e "$nv/lib/libnvrtc.so" ]; then
    (python3 -m venv "$nv/venv" && "$nv/venv/bin/pip" install -q 'nvidia-cuda-nvrtc>=13,<14') >/dev/null 2>&1 || true
    lib=$(find "$nv/venv" -name 'libnvrtc.so.13' 2>/dev/null | head -n 1)
    if [ -n "$lib" ]; then mkdir -p "$nv/lib" && ln -sf "$PWD/$lib" "$nv/lib/libnvrtc.so"; fi
fi
if [ -e "$nv/lib/libnvrtc.so" ]; then
    LD_LIBRARY_PATH="$PWD/$nv/lib:$(dirname "$(readlink "$nv/lib/libnvrtc.so")"):${LD_LIBRARY_PATH:-}" \
        FLASHMOE_REQUIRE_NVRTC=1 cargo test --release --features cuda --test cuda "$@"
else
    echo "NVRTC could not be installed: the kernels' compile check is skipped"
    cargo test --release --features cuda --test cuda "$@"
fi
