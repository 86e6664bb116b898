#!/usr/bin/env python3
"""Reference dequantizations of random ggml blocks (tests/fixtures/ggml/vectors.json), from
the `gguf` package's (gguf-py's) numpy dequantizers, for src/kernels/ggml.rs's tests.

    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf numpy
    /tmp/ggufvenv/bin/python scripts/ggml_vectors.py

Blocks are random bytes with their f16 scales set to moderate finite values (and MXFP4's e8m0
scale near 1), three blocks per type.
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# type: byte offsets of the f16 scales in a block
HALVES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
          T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0],
          T.MXFP4: []}
BLOCKS = 3


def main():
    rng = np.random.default_rng(24)
    out = {}
    for t, halves in HALVES.items():
        size = quants.GGML_QUANT_SIZES[t][1]
        raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
        for h in halves:
            raw[:, h:h + 2] = np.frombuffer(rng.uniform(-0.25, 0.25, BLOCKS).astype(np.float16).tobytes(),
                                            dtype=np.uint8).reshape(BLOCKS, 2)
        if t == T.MXFP4:
            raw[:, 0] = rng.integers(118, 134, BLOCKS)
        values = quants.dequantize(raw.reshape(-1), t).reshape(-1)
        out[t.name] = {"bytes": raw.reshape(-1).tobytes().hex(), "values": [float(v) for v in values]}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ggml", "vectors.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"{path}: {', '.join(out)}")


if __name__ == "__main__":
    main()
