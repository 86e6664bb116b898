#!/usr/bin/env python3
"""Markdown table of bench/beyond_ram.sh results with roofline bounds.

tokens/s <= disk bandwidth / expert bytes read from disk per token (measured O_DIRECT random
reads of one expert, 8 threads), and <= memory bandwidth / weight bytes touched per token
(resident weights used + this token's experts; measured read bandwidth, all threads).
"""
import glob
import json
import os
import sys

d = sys.argv[1] if len(sys.argv) > 1 else "bench/results"
mem = json.load(open(os.path.join(d, "memory.json")))
mem_bw = mem["mem_gb_s_all"] * 1e9
rows = []
for f in sorted(glob.glob(os.path.join(d, "*_k*_*.json"))):
    name = os.path.basename(f)[:-5]
    if "_disk_t" in name:  # a model name with `_k` in it (kimi_k25) matches the pattern too
        continue
    model, k, cache = name.rsplit("_", 2)
    try:
        r = json.loads(open(f).read().strip().splitlines()[-1])
    except (ValueError, IndexError):
        rows.append(f"| {model} | {k[1:]} | {cache} | failed (see {name}.log) | | | | | | | |")
        continue
    disk = json.load(open(os.path.join(d, f"{model}_disk_t8.json")))["disk_gb_s"] * 1e9
    cold = r["bytes_read_per_token"]
    disk_bound = disk / cold if cold > 0 else float("inf")
    mem_bound = mem_bw / r["weight_bytes_per_token"]
    bound = min(disk_bound, mem_bound)
    ph = r["phases_ms"]
    rows.append(
        f"| {model} | {k[1:]} | {cache} | {r['decode_tok_s']:.3f} | {r['prefill_tok_s']:.2f} | "
        f"{cold / 1e6:.0f} | {100 * r['cache_hit_rate']:.1f}% | {r['disk_gb_s']:.2f} | "
        f"{r['peak_rss_bytes'] / 2**30:.2f} | {disk_bound:.3f} / {mem_bound:.2f} | {100 * r['decode_tok_s'] / bound:.0f}% | "
        f"{ph['expert_io_wait']:.0f} / {ph['expert_compute']:.0f} / {ph['attention_deltanet']:.0f} / {ph['lm_head']:.0f} / {ph['total']:.0f} |"
    )
print("| model | K | cache | decode tok/s | prefill tok/s | MB read/token | hit rate | disk GB/s achieved | peak RSS GiB | bound tok/s (disk / mem) | of bound | ms/token: I/O wait / experts / attn+DeltaNet / lm_head / total |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print()
for f in sorted(glob.glob(os.path.join(d, "*_disk_t*.json"))):
    r = json.load(open(f))
    print(f"- {os.path.basename(f)[:-5]}: {r['disk_gb_s']:.3f} GB/s ({r['block']}-byte O_DIRECT random reads, {r['threads']} threads)")
print(f"- memory read: {mem['mem_gb_s_1thread']:.1f} GB/s one thread, {mem['mem_gb_s_all']:.1f} GB/s all threads")
