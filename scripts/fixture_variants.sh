#!/usr/bin/env bash
# Makes every fixture again with other random shapes and weights (variant N of
# scripts/make_fixtures.py) and runs the float64-reference and many-thread tests on them:
#   scripts/fixture_variants.sh N [NAME ...]       (PY: a python with torch and transformers)
# The variants go to ${OUT:-/tmp/flashmoe-variants}/N and are not committed.
set -euo pipefail
n=${1:?usage: fixture_variants.sh N [NAME ...]}; shift
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/flashmoe-variants}/$n
py=${PY:-/tmp/fx/bin/python}
mkdir -p "$out"
FIXTURES_VARY=$n FIXTURES_OUT=$out "$py" "$root/scripts/make_fixtures.py" "$@"
cd "$root"
FLASHMOE_FIXTURES=$out cargo test --release --test reference --test threads --test batch
