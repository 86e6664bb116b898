"""A synthetic qwen3moe GGUF with the real Qwen3-30B-A3B per-layer shapes and random weights,
as Q8_0 everywhere (norms and router f32), for llama.cpp's own `llama-quantize` to turn into the
mix its users download (Q4_K_M: Q4_K, with Q6_K where its rules put it):

    python3 scripts/make_synth_gguf.py OUT-q8_0.gguf N_LAYERS
    llama-quantize --allow-requantize OUT-q8_0.gguf OUT-q4_k_m.gguf Q4_K_M

Needs numpy and llama.cpp's gguf-py (`pip install gguf`, or PYTHONPATH=llama.cpp/gguf-py).
Used by bench/gguf_vs_llama.sh.

Weights are uniform integers in -127..127 times a fixed scale: zero mean. A nonzero mean
(e.g. unsigned codes) gives every weight row a common component, so every token's hidden state
turns to one direction and the router picks the same few experts for all of them, which makes
the experts touched per token, and so the bytes per token, unlike a real model's.
The vocabulary is byte-level BPE (GPT-2 style, Qwen2's pre-tokenizer): 256 byte tokens, one
merge, the rest filler, so both engines load the tokenizer; the benchmarks feed token ids.
"""

import sys

import gguf
import numpy as np

H, NH, NKV, HD, E, K, FF, V = 2048, 32, 4, 128, 128, 8, 768, 151936
Q = gguf.GGMLQuantizationType.Q8_0
BLK, BYTES = gguf.GGML_QUANT_SIZES[Q]  # 32 values in 34 bytes: f16 scale, 32 int8
# |w| <= 127 * D = 0.14, the range of the shared Q4_0 tool's weights
D = np.frombuffer(np.float16(0.14 / 127).tobytes(), dtype=np.uint8)


def q8(rng, rows_shape, cols):
    """Random valid Q8_0 data for a matrix rows_shape x cols (numpy order, the GGUF row last)."""
    assert cols % BLK == 0
    nblk = int(np.prod(rows_shape)) * (cols // BLK)
    b = np.empty((nblk, BYTES), dtype=np.uint8)
    b[:, 0:2] = D
    b[:, 2:] = rng.integers(-127, 128, size=(nblk, BLK), dtype=np.int8).view(np.uint8)
    return b.reshape(*rows_shape, cols // BLK * BYTES)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out, n_layers = sys.argv[1], int(sys.argv[2])
    if not 1 <= n_layers <= 48:
        sys.exit("N_LAYERS: 1..48 (Qwen3-30B-A3B has 48)")
    rng = np.random.default_rng(24)
    w = gguf.GGUFWriter(out, "qwen3moe")
    w.add_name(f"synthetic Qwen3-30B-A3B shape, {n_layers} of 48 layers")
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_feed_forward_length(6144)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(FF)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    # byte-level BPE: tokens are the GPT-2 byte-to-unicode images of the 256 bytes
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tok = dict(zip(bs, (chr(c) for c in cs)))
    toks = [byte_tok[b] for b in range(256)] + ["ab"] + [f"<filler{i}>" for i in range(257, V - 2)]
    toks += ["<|endoftext|>", "<|im_end|>"]
    types = [1] * (V - 2) + [3, 3]
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)
    w.add_add_bos_token(False)

    def ones(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", q8(rng, (V,), H), raw_dtype=Q)
    w.add_tensor("output_norm.weight", ones(H))
    w.add_tensor("output.weight", q8(rng, (V,), H), raw_dtype=Q)
    for layer in range(n_layers):
        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "ffn_norm.weight", ones(H))
        w.add_tensor(p + "attn_q.weight", q8(rng, (NH * HD,), H), raw_dtype=Q)
        w.add_tensor(p + "attn_k.weight", q8(rng, (NKV * HD,), H), raw_dtype=Q)
        w.add_tensor(p + "attn_v.weight", q8(rng, (NKV * HD,), H), raw_dtype=Q)
        w.add_tensor(p + "attn_output.weight", q8(rng, (H,), NH * HD), raw_dtype=Q)
        w.add_tensor(p + "attn_q_norm.weight", ones(HD))
        w.add_tensor(p + "attn_k_norm.weight", ones(HD))
        w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((E, H)) / 8).astype(np.float32))
        w.add_tensor(p + "ffn_gate_exps.weight", q8(rng, (E, FF), H), raw_dtype=Q)
        w.add_tensor(p + "ffn_up_exps.weight", q8(rng, (E, FF), H), raw_dtype=Q)
        w.add_tensor(p + "ffn_down_exps.weight", q8(rng, (E, H), FF), raw_dtype=Q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print("wrote", out)


if __name__ == "__main__":
    main()
