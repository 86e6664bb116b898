#!/usr/bin/env python3
"""The markdown table of docs/PERFORMANCE.md's "Concurrent requests" from the JSON lines that
scripts/batch_clients.py prints (tags `<setting>_b8` batched, `<setting>_b1` one at a time).
Usage: batch_table.py FILE [FILE...] (or stdin)."""
import json, sys

rows = {}
for line in (l for f in (sys.argv[1:] or ["-"]) for l in (sys.stdin if f == "-" else open(f))):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    setting, mode = r["tag"].rsplit("_", 1)
    rows.setdefault((setting, r["clients"]), {})[mode] = r  # the last run of each wins

def name(s):
    if s.startswith("warm"):
        return "warm"
    lim, cache = s[3:].split("_c")
    return f"cgroup {lim}, direct cache {cache}"

print("| setting | clients | batched: aggregate tok/s | latency s | mean batch | expert MB / token "
      "| one at a time: aggregate tok/s | latency s | expert MB / token |")
print("|---|---|---|---|---|---|---|---|---|")
for (setting, c), m in rows.items():
    b, o = m.get("b8"), m.get("b1")
    cell = lambda r, k: "" if r is None else r[k]
    print(f"| {name(setting)} | {c} | {cell(b, 'aggregate_tok_s')} | {cell(b, 'latency_s')} | {cell(b, 'mean_batch')} "
          f"| {cell(b, 'expert_MB_per_token')} | {cell(o, 'aggregate_tok_s')} | {cell(o, 'latency_s')} "
          f"| {cell(o, 'expert_MB_per_token')} |")
