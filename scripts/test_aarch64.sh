#!/usr/bin/env bash
# Runs the kernel, reference-logit and store tests as aarch64 binaries under qemu-aarch64, twice:
# on qemu's default CPU (NEON + the dot-product extension: the `sdot` int8 kernels) and on a
# Cortex-A53 (NEON only: the f32-activation kernels). Tests that start the CLI as a child process
# are skipped (the child would be an aarch64 binary without qemu), as is the built-in model's
# perplexity test (minutes under emulation; the reference-logit fixtures cover the same paths).
# Needs: rustup target aarch64-unknown-linux-gnu, gcc-aarch64-linux-gnu, qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
tests=(--lib --test reference --test flash --test bad_input --test tokenizer --test session --test mlx_import --test kv_cache)
for cpu in max cortex-a53; do
    echo "== aarch64 tests under qemu, -cpu $cpu"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
        cargo test --release --target aarch64-unknown-linux-gnu "${tests[@]}" -- --skip cli_ --skip through_the_cli
done
