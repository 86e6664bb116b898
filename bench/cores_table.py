"""Table of bench/many_cores.sh results: tok/s by shape, variant and threads, and decode as a
share of the memory roofline (weight bytes touched per token × tok/s ÷ measured bandwidth)."""
import json, sys
path = sys.argv[1]
rows = [json.loads(l) for l in open(path) if l.strip()]
try:
    mem = [json.loads(l) for l in open(path + ".sysbench") if l.startswith("{")][-1]["mem_gb_s_all"]
except (OSError, IndexError, KeyError):
    mem = None
print("| shape | dense | variant | threads | prefill tok/s | decode tok/s | decode GB/s touched | of memory roofline |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["variant"] == "warmup":
        continue
    b = r["run"]
    gbs = b["weight_bytes_per_token"] * b["decode_tok_s"] / 1e9
    roof = f"{100 * gbs / mem:.0f}%" if mem else "-"
    print(f"| {r['shape']} | {r['dense']} | {r['variant']} | {r['threads']} | {b['prefill_tok_s']:.1f} "
          f"| {b['decode_tok_s']:.2f} | {gbs:.1f} | {roof} |")
if mem:
    print(f"\nmemory read bandwidth (sysbench --memory, all threads): {mem:.1f} GB/s")
