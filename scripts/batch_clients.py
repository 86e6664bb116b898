#!/usr/bin/env python3
"""Concurrent streaming clients against a running `flashmoe serve` (docs/PERFORMANCE.md,
"Concurrent requests"). For each client count: that many /v1/completions streams at once,
each a different prompt, greedy, end-of-text banned so every one makes --tokens tokens.
Prints one JSON line per count: aggregate tok/s, per-request latency (first token, whole),
decode steps and sequences in them, expert bytes read per step and per token.
Usage: batch_clients.py BASE_URL [--clients 1,2,4,8] [--tokens 32] [--tag NAME]"""
import json, sys, threading, time, urllib.request, argparse

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("--clients", default="1,2,4,8")
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--tag", default="")
ap.add_argument("--ban", default="", help="comma-separated token ids to ban (end of text)")
a = ap.parse_args()

def metrics():
    text = urllib.request.urlopen(a.base + "/metrics").read().decode()
    out = {}
    for l in text.splitlines():
        if l and not l.startswith("#"):
            k, v = l.split(" ")
            out[k] = float(v)
    return out

bias = {t: -100 for t in a.ban.split(",") if t}
WORDS = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "MACBETH", "BANQUO", "PROSPERO", "MIRANDA", "LEAR", "CORDELIA"]

def one(i, res):
    body = {"prompt": f"{WORDS[i % len(WORDS)]} {i}: speak", "max_tokens": a.tokens, "temperature": 0,
            "stream": True, "logit_bias": bias}
    req = urllib.request.Request(a.base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time(); first = None; n = 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c.get("choices"):
                n += 1
                if first is None:
                    first = time.time() - t0
    res[i] = (first, time.time() - t0)

# warm-up: one request (loads what a first request loads)
one(0, {})
for c in [int(x) for x in a.clients.split(",")]:
    m0 = metrics(); res = {}
    t0 = time.time()
    ts = [threading.Thread(target=one, args=(i, res)) for i in range(c)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.time() - t0
    m1 = metrics()
    d = lambda k: m1.get(k, 0) - m0.get(k, 0)
    toks = d("flashmoe_completion_tokens_total")
    steps = d("flashmoe_decode_steps_total")
    print(json.dumps({
        "tag": a.tag, "clients": c, "tokens": toks, "wall_s": round(wall, 2),
        "aggregate_tok_s": round(toks / wall, 2),
        "per_client_tok_s": round(toks / wall / c, 2),
        "latency_s": round(sum(v[1] for v in res.values()) / c, 2),
        "first_token_s": round(sum(v[0] for v in res.values()) / c, 2),
        "steps": steps, "mean_batch": round(d("flashmoe_decode_step_sequences_total") / max(steps, 1), 2),
        "expert_MB_per_step": round(d("flashmoe_expert_bytes_read_total") / max(steps, 1) / 1e6, 1),
        "expert_MB_per_token": round(d("flashmoe_expert_bytes_read_total") / max(toks, 1) / 1e6, 1),
    }), flush=True)
