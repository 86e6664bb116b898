#!/usr/bin/env python3
"""Build the tiny random test models in tests/fixtures and record reference outputs.

Run in a throwaway venv with torch and transformers (>= 5.17) from PyPI:

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch transformers
    /tmp/fx/bin/python scripts/make_fixtures.py [NAME ...]   # all fixtures, or only these

Every parameter is random (norm weights included) and rounded to bf16, then stored in the
fixture's dtype. The reference runs in float64 with eager attention and eager experts.
For each fixture, reference.json holds:
  prompt          token ids of the prompt
  prefill_logits  one row per prompt position (one forward over the whole prompt)
  greedy          greedy continuation (argmax, no sampling)
  decode_logits   one row per step when prompt + greedy[:-1] is fed one token at a time with a cache
tokenizer_reference.json holds encode/decode checks and rendered chat templates.

Variants (not committed): FIXTURES_VARY=N FIXTURES_OUT=DIR makes every fixture again with other
shapes drawn from N (layer counts and patterns, hidden sizes, head counts, head, LoRA and rope
dims, expert counts, top-k, groups, intermediate sizes, windows, indexer budgets: odd sizes
included) and other weights; `FLASHMOE_FIXTURES=DIR cargo test --release --test reference` then
checks the engine on them (scripts/fixture_variants.sh does both).
"""
import importlib.util
import json
import os
import random
import shutil
import sys
import zlib

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.environ.get("FIXTURES_OUT") or os.path.join(ROOT, "tests", "fixtures")
VARY = int(os.environ.get("FIXTURES_VARY") or 0)
TEMPLATE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_template.jinja")).read()
VOCAB = 320
GREEDY_STEPS = 8
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
CORPUS = """
The quick brown fox jumps over the lazy dog. Flash storage streams experts on demand.
A mixture of experts routes each token to a few feed-forward networks; the rest stay on disk.
Numbers like 12345 and 3.14159 appear, as do symbols: {"name": "get_weather", "arguments": {}}.
ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.
JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.
    Indented code: fn main() { println!("hello"); }  // tabs\tand newlines\n
Unicode: café, naïve, 東京, ñandú, emoji 🙂.
"""


def float64_module(name):
    """Load a transformers modeling module with its float32 casts turned into float64.

    transformers computes norms, softmaxes, RoPE tables and the DeltaNet recurrence in float32
    even for a float64 model; this copy keeps the whole reference in float64.
    """
    spec = importlib.util.find_spec(name)
    src = spec.loader.get_source(name)
    for a, b in [("torch.float32", "torch.float64"), (".float()", ".double()"),
                 ("dtype=torch.float)", "dtype=torch.float64)"), ("dtype=torch.float,", "dtype=torch.float64,"),
                 ("dtype=torch.float ", "dtype=torch.float64 ")]:
        src = src.replace(a, b)
    # the lightning indexers report how close their top-k came to a tie (GapMonitor.index_gap)
    src = src.replace("        topk = min(self.index_topk, index_scores.shape[-1])\n",
                      "        topk = min(self.index_topk, index_scores.shape[-1])\n"
                      "        __import__('builtins')._fx_index_gap(index_scores, topk)\n")
    # redefine the classes in place, so that auto classes building sub-models find them too
    mod = importlib.import_module(name)
    exec(compile(src, spec.origin, "exec"), mod.__dict__)
    return mod


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TEMPLATE,
    )
    return fast


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float64) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                v = torch.log(torch.rand(p.shape, generator=g, dtype=torch.float64) * 7 + 1)
            elif name.endswith("dt_bias"):
                v = rnd(p.shape, 0.5)
            elif "conv1d" in name:
                v = rnd(p.shape, 0.4)
            elif name.endswith("sinks"):
                v = rnd(p.shape, 1.0)
            elif p.dim() == 1:  # norms: plain ones keep 1 + noise, zero-centred keep noise
                base = 1.0 if float(p.double().mean()) > 0.5 else 0.0
                v = base + rnd(p.shape, 0.1)
            elif "embed_tokens" in name or name == "lm_head.weight":
                v = rnd(p.shape, 0.5)
            else:  # [.., out, in]
                v = rnd(p.shape, 1.0 / p.shape[-1] ** 0.5)
                if name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
                    v = v * 3.0  # decisive routing keeps top-k away from ties
                if name.endswith("experts.gate_up_proj") and model.config.model_type == "gpt_oss":
                    v = v * 10.0  # past its SwiGLU clamp at 7 now and then
            p.copy_(v.to(torch.bfloat16).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change the choice
                b.copy_(rnd(b.shape, 0.15).to(torch.bfloat16).to(b.dtype))


class GapMonitor:
    """Records the smallest gap between the k-th and (k+1)-th router logit, and between the
    k-th and (k+1)-th score of a lightning indexer's choice."""

    def __init__(self, model):
        self.min_gap = float("inf")
        self.min_index_gap = float("inf")
        import builtins
        builtins._fx_index_gap = self.index_gap
        for name, mod in model.named_modules():
            if (name.endswith("mlp.gate") or name.endswith("mlp.router")) and hasattr(mod, "top_k"):
                mod.register_forward_hook(self.hook)

    def index_gap(self, scores, k):
        s = scores.double().reshape(-1, scores.shape[-1])
        for row in s:
            # masked positions hold -inf or the dtype's minimum (plus a score it absorbs)
            v = row[row > torch.finfo(row.dtype).min / 2].sort(descending=True).values
            if len(v) > k:
                self.min_index_gap = min(self.min_index_gap, (v[k - 1] - v[k]).item())

    def hook(self, mod, inp, out):
        logits = out[0] if isinstance(out, tuple) else out
        logits = logits.double()
        bias = getattr(mod, "e_score_correction_bias", None)
        if bias is None and len(inp) > 1:  # MiniMax passes the bias to its router
            bias = inp[1]
        if bias is not None:  # sigmoid routers choose by score + bias, maybe within groups
            logits = torch.sigmoid(logits) + bias.double()
            groups = getattr(mod, "num_group", 1)
            if groups > 1:
                g = logits.view(-1, groups, logits.shape[-1] // groups).topk(2, dim=-1)[0].sum(-1)
                gt = torch.topk(g, groups, dim=-1).values
                self.min_gap = min(self.min_gap, (gt[..., mod.topk_group - 1] - gt[..., mod.topk_group]).min().item())
                keep = torch.topk(g, mod.topk_group, dim=-1)[1]
                mask = torch.zeros_like(g).scatter_(1, keep, 1).repeat_interleave(logits.shape[-1] // groups, -1)
                logits = logits.masked_fill(mask == 0, -1e9)
        top = torch.topk(logits, min(mod.top_k + 1, logits.shape[-1]), dim=-1).values
        if top.shape[-1] > mod.top_k:
            gap = (top[..., mod.top_k - 1] - top[..., mod.top_k]).min().item()
            self.min_gap = min(self.min_gap, gap)


def reference(model, prompt):
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        prefill = model(input_ids=ids, use_cache=False).logits[0]
        # greedy, step by step with the model's own cache
        seq = list(prompt)
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        greedy = []
        logits = out.logits[0, -1]
        gaps = []
        for _ in range(GREEDY_STEPS):
            top2 = torch.topk(logits, 2).values
            gaps.append((top2[0] - top2[1]).item())
            nxt = int(torch.argmax(logits))
            greedy.append(nxt)
            seq.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1]
        # token-by-token from an empty cache over prompt + greedy[:-1]
        rows = []
        cache = None
        for t in seq[:-1]:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
        decode = torch.stack(rows)
        full = model(input_ids=torch.tensor([seq[:-1]]), use_cache=False).logits[0]
        err = (decode - full).abs().max().item() / full.abs().max().item()
        # the DeltaNet kernels of transformers compute in float32 even for a float64 model
        print(f"  reference prefill vs token-by-token decode: relative max error {err:.2e}")
    return prefill, greedy, decode, min(gaps)


def rows(t):
    return [[float(f"{x:.8g}") for x in r] for r in t.tolist()]


def vary(name, kw, n, blocks=1):
    """The config `kw` with other shapes drawn from variant `n` (see the module doc). `blocks`:
    what expert inputs must be multiples of (MXFP4 and int4 releases quantize in blocks of 32)."""
    r = random.Random(zlib.crc32(f"{name}/{n}".encode()))
    kw = json.loads(json.dumps(kw))
    if "text_config" in kw:  # a wrapper (Qwen3.5 VL): the text model varies, the vision tower follows
        kw["text_config"] = vary(name, kw["text_config"], n, blocks)
        kw["vision_config"]["out_hidden_size"] = kw["text_config"]["hidden_size"]
        return kw
    pick = r.choice
    layers = max(2, kw["num_hidden_layers"] + pick([-1, 0, 1, 2]))
    if "linear_num_key_heads" in kw and "layer_types" not in kw:
        layers = max(layers, 4)  # the default pattern's first full-attention layer is the 4th
    kw["num_hidden_layers"] = layers
    for key in ["layer_types", "indexer_types"]:
        if key in kw:
            kinds = sorted(set(kw[key]))
            t = [pick(kinds) for _ in range(layers)]
            if key == "indexer_types":
                t[0] = "full"  # a shared indexer reuses an earlier full one's choice
            for i, k in enumerate(kinds):  # every kind at least once
                if k not in t:
                    t[(i + 1) % layers] = k
            kw[key] = t
    if "mlp_only_layers" in kw:
        kw["mlp_only_layers"] = [i for i in kw["mlp_only_layers"] if i < layers]
    if "first_k_dense_replace" in kw:
        kw["first_k_dense_replace"] = pick(range(0, min(3, layers)))
    kw["hidden_size"] = pick([32, 64]) if blocks > 1 else pick([24, 30, 36, 40, 44, 56])
    mla = "kv_lora_rank" in kw
    if mla:
        kw["num_attention_heads"] = kw["num_key_value_heads"] = pick([1, 2, 3, 4, 6])
        if kw.get("q_lora_rank"):
            kw["q_lora_rank"] = pick(range(6, 25))
        kw["kv_lora_rank"] = pick(range(6, 21))
        kw["qk_nope_head_dim"] = pick(range(2, 11))
        kw["qk_rope_head_dim"] = pick([2, 4, 6, 8])
        kw["v_head_dim"] = pick(range(3, 13))
        if "index_head_dim" in kw:
            # ReLU'd scores of few heads over few dims tie at 0 too often for a choice to be made
            kw["index_head_dim"] = pick([d for d in [8, 12, 16] if d > kw["qk_rope_head_dim"]])
            kw["index_n_heads"] = pick([8, 16])
            kw["index_topk"] = pick(range(3, 11))
    else:
        nkv = pick([1, 2, 3])
        kw["num_key_value_heads"] = nkv
        kw["num_attention_heads"] = nkv * pick([1, 2, 3, 4])
        rope = kw.get("rope_parameters", {})
        frac = rope.get("partial_rotary_factor", 1.0)
        # the rotated part of a head is a whole number of pairs
        kw["head_dim"] = pick([d for d in [4, 6, 8, 10, 12, 16, 20, 24] if (d * frac) % 2 == 0 and d * frac >= 2])
        if "mrope_section" in rope:  # the sections split the rotated half-dims
            half = int(kw["head_dim"] * frac) // 2
            rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
        if "rotary_dim" in kw:
            kw["rotary_dim"] = int(kw["head_dim"] * frac)
        if "partial_rotary_factor" in kw:
            kw["partial_rotary_factor"] = frac
    if "linear_num_key_heads" in kw:
        kw["linear_num_key_heads"] = k = pick([1, 2])
        kw["linear_num_value_heads"] = k * pick([1, 2, 3])
        kw["linear_key_head_dim"] = pick([4, 6, 8, 12])
        kw["linear_value_head_dim"] = pick(range(3, 13))
        kw["linear_conv_kernel_dim"] = pick([2, 3, 4])
    ekey = next(k for k in ["num_experts", "num_local_experts", "n_routed_experts"] if k in kw)
    groups = kw.get("n_group", 1)
    if groups > 1:
        kw["n_group"] = groups = pick([2, 4])
        kw[ekey] = groups * pick([2, 3])
        kw["topk_group"] = pick(range(1, groups))
    else:
        kw[ekey] = pick(range(3, 13))
    per_group = kw[ekey] // groups
    kw["num_experts_per_tok"] = pick(range(1, min(4, kw.get("topk_group", 1) * per_group - 1, kw[ekey] - 1) + 1))
    sizes = [32, 64] if blocks > 1 else list(range(5, 49))
    for key in ["moe_intermediate_size", "shared_expert_intermediate_size"]:
        if key in kw:
            kw[key] = pick(sizes)
    if "intermediate_size" in kw:
        # gpt-oss and the per-expert families name their expert width so
        kw["intermediate_size"] = pick(sizes if ekey == "num_local_experts" else list(range(5, 49)))
    if "n_shared_experts" in kw:
        kw["n_shared_experts"] = pick([1, 2])
    if kw.get("sliding_window"):
        kw["sliding_window"] = pick(range(2, 10))
    return kw


def make(name, cfg_cls, model_cls, cfg_kwargs, dtype, prompt, seed, shard=None, fused=False, wrap_dtype=None,
         mtp=False, fp8=None, mxfp4=False, int4=None, kimi=False):
    if ONLY and name not in ONLY:
        return
    if VARY:
        cfg_kwargs = vary(name, cfg_kwargs, VARY, 32 if (mxfp4 or int4) else 1)
        seed += 100_000 * VARY
        print(f"{name}: variant {VARY}: {json.dumps(cfg_kwargs, sort_keys=True)}")
    path = os.path.join(OUT, name)
    for attempt in range(50):
        torch.manual_seed(seed + attempt)
        cfg = cfg_cls(**cfg_kwargs)
        model = model_cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
        model = model.to(torch.float64)
        randomize(model, seed + attempt)
        # round through the storage dtype so the reference sees exactly the stored values
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float64))
        mon = GapMonitor(model)
        prefill, greedy, decode, tgap = reference(model, prompt)
        # index scores are small (ReLU'd dot products over a few dims): a gap 100x f32's error
        if mon.min_gap > 2e-3 and tgap > 1e-3 and mon.min_index_gap > 1e-5:
            break
        print(f"{name}: seed {seed + attempt} too close to a tie ({mon.min_gap:.2e}, {tgap:.2e}, "
              f"index {mon.min_index_gap:.2e}); retrying")
    else:
        sys.exit(f"{name}: no seed without near-ties")
    if os.path.exists(path):
        shutil.rmtree(path)
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "50GB")
    if fused:
        fuse_experts(path, cfg_kwargs)
    if mtp:
        add_mtp_layer(path, cfg_kwargs["num_hidden_layers"])
    if fp8:
        # the reference is the model whose weights are the FP8 values, dequantized
        model = fp8_checkpoint(path, fp8, model_cls)
        prefill, greedy, decode, _ = reference(model, prompt)
    if mxfp4:
        model = mxfp4_checkpoint(path, model_cls)
        prefill, greedy, decode, _ = reference(model, prompt)
    if int4:
        model = int4_checkpoint(path, int4, model_cls)
        prefill, greedy, decode, _ = reference(model, prompt)
    if kimi:
        kimi_release(path)
    build_tokenizer().save_pretrained(path)
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "prompt": prompt,
                "prefill_logits": rows(prefill),
                "greedy": greedy,
                "decode_logits": rows(decode),
            },
            f,
        )
    print(f"{name}: ok (router gap {mon.min_gap:.2e}, greedy gap {tgap:.2e}), greedy {greedy}")


def fuse_experts(path, kw):
    """Rewrite per-expert tensors as the fused 3-D form some releases ship."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    out = {}
    for layer in range(kw["num_hidden_layers"]):
        pre = f"model.layers.{layer}.mlp.experts"
        gu, dn = [], []
        for e in range(kw["num_experts"]):
            g = t.pop(f"{pre}.{e}.gate_proj.weight")
            u = t.pop(f"{pre}.{e}.up_proj.weight")
            gu.append(torch.cat([g, u], 0))
            dn.append(t.pop(f"{pre}.{e}.down_proj.weight"))
        out[f"{pre}.gate_up_proj"] = torch.stack(gu).contiguous()
        out[f"{pre}.down_proj"] = torch.stack(dn).contiguous()
    t.update(out)
    save_file(t, f, metadata={"format": "pt"})


def fp8_checkpoint(path, block, model_cls):
    """Store the checkpoint's projection weights as FP8 e4m3 with one f32 scale per
    block[0] x block[1] tile (`weight_scale_inv`), as the DeepSeek, GLM and MiniMax releases do;
    returns the model holding the dequantized weights."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    deq = dict(t)
    br, bc = block
    for k in list(t):
        w = t[k]
        if not (k.endswith("_proj.weight") or ".experts." in k) or w.dim() != 2:
            continue
        r, c = w.shape
        x = w.double()
        scale = torch.zeros((r + br - 1) // br, (c + bc - 1) // bc, dtype=torch.float64)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                scale[i, j] = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max().clamp(min=1e-12) / 448.0
        full = scale.repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
        q = (x / full).to(torch.float8_e4m3fn)
        scale32 = scale.float()
        t[k] = q
        t[k + "_scale_inv"] = scale32
        full32 = scale32.double().repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
        deq[k] = q.double() * full32  # exact: 4 significant bits times an f32
    quant = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
             "weight_block_size": [br, bc]}
    return quantized_and_twin(path, t, deq, quant, model_cls)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_encode(w):
    """[..., rows, cols] -> (blocks [..., rows, cols/32, 16] u8, scales [..., rows, cols/32] u8, dequantized):
    e2m1 values (low nibble first) and an e8m0 scale per 32, as gpt-oss releases its experts."""
    *lead, r, c = w.shape
    g = w.double().reshape(*lead, r, c // 32, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    x = g / torch.exp2(e)
    lut = torch.tensor(E2M1, dtype=torch.float64)
    idx = (x.abs().unsqueeze(-1) - lut).abs().argmin(-1)
    idx = idx + 8 * ((x < 0) & (idx > 0))
    signed = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    deq = (signed[idx] * torch.exp2(e)).reshape(*lead, r, c)
    nib = idx.to(torch.uint8)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()
    scales = (e.squeeze(-1) + 127).to(torch.uint8).contiguous()
    return blocks, scales, deq


def mxfp4_checkpoint(path, model_cls):
    """Store the experts of a gpt-oss checkpoint as released (MXFP4 `*_blocks`/`*_scales`, out x in);
    returns the model holding the dequantized weights."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    deq = dict(t)
    for k in list(t):
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            w = t.pop(k).transpose(1, 2)  # transformers keeps [E, in, out]; releases [E, out, in]
            blocks, scales, d = mxfp4_encode(w)
            t[k + "_blocks"], t[k + "_scales"] = blocks, scales
            deq[k] = d.transpose(1, 2).contiguous()
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
             "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return quantized_and_twin(path, t, deq, quant, model_cls)


def int4_pack(w, group):
    """[out, in] -> (weight_packed int32 [out, in/8], weight_scale bf16 [out, in/group], dequantized):
    compressed-tensors' symmetric int4 `pack-quantized` encoding, as Kimi-K2.5 releases its experts.
    scale = max|w| / 7.5 per group (compressed-tensors' symmetric range), rounded to bf16; values
    q = round(w / scale) in [-8, 7], stored as q + 8, eight a word from the lowest bits up."""
    import numpy as np
    r, c = w.shape
    g = w.double().reshape(r, c // group, group)
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)
    s = scale.double().unsqueeze(-1)
    q = torch.round(g / s).clamp(-8, 7)
    deq = (q * s).reshape(r, c)  # exact in float64: a 4-bit integer times a bf16
    u = (q.reshape(r, c) + 8).to(torch.int64).numpy().astype(np.uint32).reshape(r, c // 8, 8)
    words = np.zeros((r, c // 8), dtype=np.uint32)
    for i in range(8):
        words |= u[:, :, i] << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32).copy()), scale.contiguous(), deq


def int4_checkpoint(path, group, model_cls):
    """Store the routed experts as compressed-tensors int4 (`weight_packed`, `weight_scale`,
    `weight_shape`, the `quantization_config` Kimi-K2.5 ships); returns the model holding the
    dequantized weights."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    deq = dict(t)
    for k in list(t):
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            w = t.pop(k)
            base = k[: -len(".weight")]
            packed, scale, d = int4_pack(w, group)
            t[base + ".weight_packed"], t[base + ".weight_scale"] = packed, scale
            t[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            deq[k] = d
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group, "strategy": "group",
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
               "block_structure": None}
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                           "output_activations": None}},
             "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
             "kv_cache_scheme": None}
    return quantized_and_twin(path, t, deq, quant, model_cls)


def quantized_and_twin(path, tensors, dequantized, quant, model_cls):
    """Writes the quantized tensors and their `quantization_config` into the fixture, and returns
    the model loaded from their dequantized values (the reference runs on it)."""
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, quantization_config=quant), open(cfg_path, "w"), indent=2)
    tmp = path + ".dequantized"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(dequantized, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=2)
    model = model_cls.from_pretrained(tmp, dtype=torch.float64, attn_implementation="eager",
                                      experts_implementation="eager")
    shutil.rmtree(tmp)
    return model


def add_mtp_layer(path, layers):
    """Append a multi-token-prediction layer after the text model's, as GLM and DeepSeek
    releases ship it (`model.layers.{num_hidden_layers}`: a copy of the last layer plus its
    own projections): engines must skip it."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    last = f"model.layers.{layers - 1}."
    extra = {k.replace(last, f"model.layers.{layers}."): v.clone() for k, v in t.items() if k.startswith(last)}
    h = t["model.embed_tokens.weight"].shape[1]
    extra[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(h, 2 * h, dtype=t["model.embed_tokens.weight"].dtype)
    extra[f"model.layers.{layers}.enorm.weight"] = torch.ones(h, dtype=t["model.embed_tokens.weight"].dtype)
    t.update(extra)
    save_file(t, f, metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(cfg_path, "w"), indent=2)


def kimi_release(path):
    """Kimi-K2.5's release layout: a `kimi_k25` wrapper config whose `text_config` is the
    DeepSeek-V3 text model (`model_type: kimi_k2`), its tensors under `language_model.model.`
    and `language_model.lm_head`, beside a vision tower and projector flashmoe must skip."""
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    out = {}
    for k, v in t.items():
        if k.startswith("model."):
            out["language_model.model." + k[len("model."):]] = v
        elif k.startswith("lm_head."):
            out["language_model." + k] = v
        else:
            out[k] = v
    out["vision_tower.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2, dtype=torch.bfloat16)
    out["mm_projector.proj.0.weight"] = torch.zeros(32, 8, dtype=torch.bfloat16)
    save_file(out, f, metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    text = json.load(open(cfg_path))
    text["model_type"] = "kimi_k2"
    text.pop("architectures", None)
    wrapper = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
               "text_config": text, "vision_config": {"model_type": "kimi_k25_vision", "patch_size": 2},
               "tie_word_embeddings": False, "eos_token_id": text.get("eos_token_id")}
    json.dump(wrapper, open(cfg_path, "w"), indent=2)


def tokenizer_reference():
    tok = build_tokenizer()
    texts = [
        "Hello world",
        "ROMEO: But soft, what light through yonder window breaks?",
        "  leading spaces and\ttabs\n\nnew lines 12345 café 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    enc = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city — “quoted”",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ]
    convs = [
        dict(messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True),
        dict(
            messages=[
                {"role": "system", "content": "  You are terse.  "},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "<think>\nmaybe red\n</think>\n\nRed."},
                {"role": "user", "content": "Another."},
            ],
            add_generation_prompt=True,
            enable_thinking=False,
        ),
        dict(
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
                    ],
                },
                {"role": "tool", "content": '{"temp": 21}'},
                {"role": "tool", "content": '{"temp": 19}'},
            ],
            tools=tools,
            add_generation_prompt=True,
        ),
        dict(
            messages=[
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>r</think>a"},
            ],
            add_generation_prompt=False,
        ),
    ]
    chats = []
    for c in convs:
        kw = {k: v for k, v in c.items() if k not in ("messages", "tools")}
        rendered = tok.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False, **kw)
        chats.append(dict(c, rendered=rendered))
    with open(os.path.join(OUT, "tokenizer_reference.json"), "w") as f:
        json.dump({"encode": enc, "chat": chats}, f, ensure_ascii=False, indent=1)


def main():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3MoeConfig, Qwen3NextConfig

    q35 = float64_module("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    Qwen3_5MoeForCausalLM = q35.Qwen3_5MoeForCausalLM
    Qwen3_5MoeForConditionalGeneration = q35.Qwen3_5MoeForConditionalGeneration
    Qwen3NextForCausalLM = float64_module("transformers.models.qwen3_next.modeling_qwen3_next").Qwen3NextForCausalLM
    Qwen3MoeForCausalLM = float64_module("transformers.models.qwen3_moe.modeling_qwen3_moe").Qwen3MoeForCausalLM

    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    prompt = tok("ROMEO: But soft, what light through yonder window breaks?")["input_ids"]
    short = prompt[:9]
    common = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))

    qwen35_text = dict(
        common,
        hidden_size=48,
        num_hidden_layers=5,  # default pattern, interval 4: L L L F L
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=12,
        linear_value_head_dim=10,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=20,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
            mrope_section=[1, 1, 0], mrope_interleaved=True,
        ),
        max_position_embeddings=64,
    )
    make("qwen35_text", Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, qwen35_text, torch.bfloat16, prompt, 100,
         shard="60KB")
    make("qwen35_fused", Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, qwen35_text, torch.float32, short, 150,
         fused=True)

    text_cfg = dict(
        common,
        hidden_size=40,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        linear_num_key_heads=1,
        linear_num_value_heads=3,
        linear_key_head_dim=8,
        linear_value_head_dim=6,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=18,
        shared_expert_intermediate_size=14,
        rope_parameters=dict(
            rope_type="default", rope_theta=1000000.0, partial_rotary_factor=0.5,
            mrope_section=[1, 1, 0], mrope_interleaved=True,
        ),
        max_position_embeddings=128,
    )
    vision_cfg = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=40,
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
    vl = dict(text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=True,
              image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
              vision_end_token_id=VOCAB - 4)
    make("qwen35_vl", Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, vl, torch.float32, prompt, 200)
    # for scripts/gguf_fixtures.sh (made only when named): llama.cpp's qwen35moe wants equal key
    # and value head widths; widths of 32 let Q8_0's blocks divide every row; two value heads per
    # key head, which its converter reorders
    q35_g = dict(qwen35_text, hidden_size=32, num_hidden_layers=3,
                 layer_types=["linear_attention", "linear_attention", "full_attention"], num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32)
    if "qwen35_moe_gguf" in ONLY:
        make("qwen35_moe_gguf", Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, q35_g, torch.bfloat16, prompt, 2800)

    nxt = dict(
        common,
        hidden_size=32,
        num_hidden_layers=4,  # L L L F
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=20,
        shared_expert_intermediate_size=12,
        intermediate_size=40,
        mlp_only_layers=[2],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        max_position_embeddings=64,
    )
    make("qwen3_next", Qwen3NextConfig, Qwen3NextForCausalLM, nxt, torch.float16, prompt, 300)
    # for scripts/gguf_fixtures.sh (made only when named): llama.cpp's qwen3next has no dense
    # layers, always renormalises the top-k and wants equal key and value head widths; widths of
    # 32 let Q8_0's blocks divide every row
    nxt_g = dict(nxt, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
                 moe_intermediate_size=32, shared_expert_intermediate_size=32, mlp_only_layers=[])
    if "qwen3_next_gguf" in ONLY:
        make("qwen3_next_gguf", Qwen3NextConfig, Qwen3NextForCausalLM, nxt_g, torch.bfloat16, prompt, 2900)

    moe = dict(
        common,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=44,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=2,  # layers 1 and 3 sparse...
        mlp_only_layers=[3],  # ...but layer 3 forced dense
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        max_position_embeddings=64,
    )
    make("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM, moe, torch.bfloat16, prompt, 400)
    moe2 = dict(moe, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
                num_key_value_heads=1, num_experts_per_tok=3)
    make("qwen3_moe_norm", Qwen3MoeConfig, Qwen3MoeForCausalLM, moe2, torch.bfloat16, short, 500)
    # the checkpoint scripts/gguf_fixtures.sh converts to GGUF with llama.cpp (made only when named):
    # llama.cpp's qwen3moe has no dense layers and always renormalises the top-k, and widths of
    # 256 let the K-quants' blocks divide every row
    gg = dict(common, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=64, intermediate_size=256, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0), max_position_embeddings=64)
    if "qwen3_moe_gguf" in ONLY:
        make("qwen3_moe_gguf", Qwen3MoeConfig, Qwen3MoeForCausalLM, gg, torch.bfloat16, prompt, 2400)

    from transformers import Glm4MoeConfig, MiniMaxM2Config, MixtralConfig

    MixtralForCausalLM = float64_module("transformers.models.mixtral.modeling_mixtral").MixtralForCausalLM
    mixtral = dict(
        common,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=20,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=6,  # shorter than prompt + greedy: the window is exercised
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        max_position_embeddings=64,
    )
    make("mixtral", MixtralConfig, MixtralForCausalLM, mixtral, torch.float32, prompt, 600)
    # for scripts/gguf_fixtures.sh (made only when named): llama.cpp's llama has no sliding
    # window (nor do the Mixtral releases); widths of 32 let Q8_0's blocks divide every row
    mixtral_g = dict(mixtral, intermediate_size=32, sliding_window=None)
    if "mixtral_gguf" in ONLY:
        make("mixtral_gguf", MixtralConfig, MixtralForCausalLM, mixtral_g, torch.bfloat16, prompt, 3000)

    MiniMaxM2ForCausalLM = float64_module("transformers.models.minimax_m2.modeling_minimax_m2").MiniMaxM2ForCausalLM
    minimax = dict(
        common,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=3,
        rotary_dim=4,  # as the released config states it; the same as the factor below
        rope_parameters=dict(rope_type="default", rope_theta=5000000.0, partial_rotary_factor=0.5),
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    make("minimax_m2", MiniMaxM2Config, MiniMaxM2ForCausalLM, minimax, torch.bfloat16, prompt, 700)
    # as released: FP8 projections and experts in scale blocks (12x20 here: ragged edges)
    make("minimax_m2_fp8", MiniMaxM2Config, MiniMaxM2ForCausalLM, minimax, torch.bfloat16, short, 750, fp8=(12, 20))

    Glm4MoeForCausalLM = float64_module("transformers.models.glm4_moe.modeling_glm4_moe").Glm4MoeForCausalLM
    glm = dict(
        common,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.7,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, partial_rotary_factor=0.5),
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    make("glm4_moe", Glm4MoeConfig, Glm4MoeForCausalLM, glm, torch.bfloat16, prompt, 800, mtp=True)
    # the Air shape: no q/k norm, no group limit, plain weights
    air = dict(glm, use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=2,
               n_shared_experts=2, norm_topk_prob=False)
    make("glm4_moe_air", Glm4MoeConfig, Glm4MoeForCausalLM, air, torch.float32, short, 900)
    # for scripts/gguf_fixtures.sh (made only when named): llama.cpp's glm4moe has no group
    # limit; widths of 32 let Q8_0's blocks divide every row
    glm_g = dict(glm, hidden_size=64, num_hidden_layers=3, head_dim=16, intermediate_size=64,
                 moe_intermediate_size=32, n_group=1, topk_group=1)
    if "glm4_moe_gguf" in ONLY:
        make("glm4_moe_gguf", Glm4MoeConfig, Glm4MoeForCausalLM, glm_g, torch.bfloat16, prompt, 2700)

    from transformers import GptOssConfig

    GptOssForCausalLM = float64_module("transformers.models.gpt_oss.modeling_gpt_oss").GptOssForCausalLM
    oss = dict(
        common,
        hidden_size=32,
        num_hidden_layers=4,  # sliding, full, sliding, full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=3,
        sliding_window=5,  # shorter than the test sequence
        attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=16),
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    make("gpt_oss", GptOssConfig, GptOssForCausalLM, oss, torch.float32, prompt, 1000)
    # as released: MXFP4 experts (the reference runs on their dequantized values)
    oss_q = dict(oss, intermediate_size=32)  # MXFP4 blocks of 32 along both expert inputs
    make("gpt_oss_mxfp4", GptOssConfig, GptOssForCausalLM, oss_q, torch.bfloat16, short, 1100, mxfp4=True)
    # for scripts/gguf_fixtures.sh (made only when named): MXFP4 experts as released, which
    # llama.cpp's converter keeps; widths of 32 let Q8_0's blocks divide the other rows
    oss_g = dict(oss, hidden_size=64, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                 num_experts_per_tok=2, head_dim=16)
    if "gpt_oss_gguf" in ONLY:
        make("gpt_oss_gguf", GptOssConfig, GptOssForCausalLM, oss_g, torch.bfloat16, prompt, 2500, mxfp4=True)

    mla_fixtures(common, prompt, short)

    if not ONLY and not VARY:
        tokenizer_reference()


def mla_fixtures(common, prompt, short):
    """The MLA lineage: DeepSeek-V3 (q-LoRA, YaRN with mscale_all_dim, groups; and without
    q-LoRA), V3.2 and GLM-5 with lightning indexers whose budget the prompt outgrows, Kimi-K2.5's
    wrapper, an FP8 release."""
    from transformers import DeepseekV3Config, DeepseekV32Config, GlmMoeDsaConfig

    V3 = float64_module("transformers.models.deepseek_v3.modeling_deepseek_v3").DeepseekV3ForCausalLM
    V32 = float64_module("transformers.models.deepseek_v32.modeling_deepseek_v32").DeepseekV32ForCausalLM
    Glm5 = float64_module("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa").GlmMoeDsaForCausalLM
    v3 = dict(
        common,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=10,
        intermediate_size=40,
        moe_intermediate_size=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        # mscale ≠ mscale_all_dim: cos/sin get their ratio, the softmax mscale_all_dim²
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.7),
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    make("deepseek_v3", DeepseekV3Config, V3, v3, torch.bfloat16, prompt, 1200, mtp=True)
    nolora = dict(v3, q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1, first_k_dense_replace=2,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0), routed_scaling_factor=1.0)
    make("deepseek_v3_nolora", DeepseekV3Config, V3, nolora, torch.float32, prompt, 1300)
    # as released: FP8 e4m3 weights in 128x128 scale blocks (here 8x8: several per matrix)
    make("deepseek_v3_fp8", DeepseekV3Config, V3, v3, torch.bfloat16, short, 1350, fp8=(8, 8))
    # a budget of 8 positions: the prompt's later tokens attend to a selection
    v32 = dict(v3, index_n_heads=8, index_head_dim=8, index_topk=8,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    v32.pop("rope_interleave")
    make("deepseek_v32", DeepseekV32Config, V32, v32, torch.float32, prompt, 1400)
    glm5 = dict(v32, n_group=1, topk_group=1, qk_nope_head_dim=8, v_head_dim=6, rms_norm_eps=1e-5,
                indexer_types=["full", "shared", "full", "shared"],
                rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    make("glm_moe_dsa", GlmMoeDsaConfig, Glm5, glm5, torch.float32, prompt, 1500, mtp=True)
    kimi = dict(v3, n_group=1, topk_group=1, routed_scaling_factor=2.827,
                rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=4.0,
                                     original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                                     mscale=1.0, mscale_all_dim=1.0))
    make("kimi_k25", DeepseekV3Config, V3, kimi, torch.bfloat16, short, 1600, kimi=True)
    # as released: the routed experts compressed-tensors int4 in groups of 32 (their inputs
    # multiples of 32), the reference on their dequantized values
    kimi_q = dict(kimi, moe_intermediate_size=32)
    make("kimi_k25_int4", DeepseekV3Config, V3, kimi_q, torch.bfloat16, short, 1700, int4=32, kimi=True)
    # for scripts/gguf_fixtures.sh (made only when named): llama.cpp's deepseek2 rotates
    # interleaved pairs and knows YaRN's mscale only through mscale_all_dim (so mscale equals it
    # here, as in the releases); widths of 32 let Q8_0's blocks divide every row, k_b's included
    ds_g = dict(v3, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                intermediate_size=64, moe_intermediate_size=32,
                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                     original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                                     mscale=1.0, mscale_all_dim=1.0))
    if "deepseek_v3_gguf" in ONLY:
        make("deepseek_v3_gguf", DeepseekV3Config, V3, ds_g, torch.bfloat16, prompt, 2600)


# fixture names given on the command line: make only those
ONLY = set(sys.argv[1:])

if __name__ == "__main__":
    main()
