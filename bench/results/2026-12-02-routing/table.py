#!/usr/bin/env python3
"""Tables of run.sh's results: beyond-RAM decode per routing mode, and 2k/8k-token prefill
beyond RAM against the disk roofline (the union of experts per layer per chunk, from bench's
routing counters, over sysbench's 8-thread O_DIRECT rate) and the warm prefill of the prompt."""
import glob, json, os, sys

res = sys.argv[1]
sb = [json.loads(l) for l in open(os.path.join(res, "sysbench.jsonl")) if l.strip()]
disk = [s for s in sb if s.get("threads") == 8 and "disk_gb_s" in s][-1]
gbs, stride = disk["disk_gb_s"], disk["block"]
mem = [s for s in sb if "mem_gb_s_all" in s]
print(f"disk (8 threads, {stride} B reads): {gbs:.3f} GB/s; memory: {mem[-1]['mem_gb_s_all'] if mem else 'n/a'} GB/s\n")

def load(name):
    p = os.path.join(res, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None

def peak(name):
    p = os.path.join(res, name + ".peak")
    try:
        return int(open(p).read()) / 2**30
    except (OSError, ValueError):
        return float("nan")

modes = [m for m in ("uniform", "realistic", "skewed") if load("decode_" + m) or load("prefill2048_" + m)]
print("| routing | decode tok/s | hit rate | MB read/token | decode top-10% share | decode reuse | cgroup peak GiB |")
print("|---|---|---|---|---|---|---|")
for m in modes:
    r = load("decode_" + m)
    if r:
        d = r["decode_routing"]
        print(f"| {m} | {r['decode_tok_s']:.2f} | {100*r['cache_hit_rate']:.1f}% | {r['bytes_fetched_per_token']/1e6:.0f} | "
              f"{d['top10_share']:.3f} | {d['reuse']:.3f} | {peak('decode_' + m):.2f} |")
print()
print("| routing | prompt | experts per layer per chunk | disk bound tok/s | warm tok/s | beyond-RAM tok/s | of the lower bound | MB read/token (union) | achieved GB/s | cgroup peak GiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p in sorted({int(f.split("prefill")[1].split("_")[0]) for f in glob.glob(os.path.join(res, "prefill*_*.json"))}):
    for m in modes:
        c, w = load(f"prefill{p}_{m}"), load(f"warm{p}_{m}")
        if not c:
            continue
        L = c["prefill_routing"]["layers"]
        # every chunk of every layer reads its distinct experts once
        union = sum(l["chunk_distinct_share"] * l["experts"] * (p / l["chunk_tokens"]) for l in L) * stride
        per_chunk = sum(l["chunk_distinct_share"] * l["experts"] for l in L) / len(L)
        bound = p / (union / (gbs * 1e9))
        wt = w["prefill_tok_s"] if w else float("nan")
        lo = min(bound, wt)
        print(f"| {m} | {p} | {per_chunk:.1f} of {L[0]['experts']} | {bound:.1f} | {wt:.1f} | {c['prefill_tok_s']:.1f} | "
              f"{100*c['prefill_tok_s']/lo:.0f}% | {c['prefill_bytes_read_per_token']/1e6:.2f} ({union/p/1e6:.2f}) | "
              f"{c['prefill_disk_gb_s']:.3f} | {peak(f'prefill{p}_{m}'):.2f} |")
