#!/usr/bin/env python3
"""Decode tok/s against the memory limit, as an SVG, from `ONLY=sweep bench/beyond_ram.sh`'s results.

    python3 bench/plot_memory.py RESULTS_DIR OUT.svg [TITLE]

Reads RESULTS_DIR/sweep_LIMIT.json (`flashmoe bench --json` run cold in a memory cgroup of
LIMIT, e.g. 1536M; `none`: no limit) and sweep_model_size.txt (`du -sh` of the model). The
SVG is written by hand: no plotting library, no network.
"""
import glob
import json
import math
import os
import re
import sys

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def gib(limit):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", limit)
    return float(m.group(1)) * UNITS.get(m.group(2), 1) / 2**30


def load(results):
    points, unlimited = [], None
    for path in glob.glob(os.path.join(results, "sweep_*.json")):
        limit = os.path.basename(path)[len("sweep_"):-len(".json")]
        with open(path) as f:
            text = f.read().strip()
        if not text:
            continue  # a run that did not finish (killed by its cgroup)
        r = json.loads(text.splitlines()[-1])
        if limit == "none":
            unlimited = r
        else:
            points.append((gib(limit), limit, r))
    points.sort(key=lambda p: p[0])
    size = None
    size_file = os.path.join(results, "sweep_model_size.txt")
    if os.path.exists(size_file):
        first = open(size_file).read().split()[0]
        size = gib(first.rstrip("B").replace("i", ""))
    return points, unlimited, size


def svg(points, unlimited, size, title):
    w, h, left, right, top, bottom = 860, 420, 70, 170, 50, 60
    pw, ph = w - left - right, h - top - bottom
    xs = [p[0] for p in points] + ([size] if size else [])
    xmax = max(xs) * 1.1 if xs else 1
    ys = [p[2]["decode_tok_s"] for p in points] + ([unlimited["decode_tok_s"]] if unlimited else [])
    ymax = max(ys) * 1.15 if ys else 1
    step = nice_step(ymax / 5)
    ymax = step * -(-ymax // step)

    def X(v):
        return left + pw * v / xmax

    def Y(v):
        return top + ph * (1 - v / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="14">{esc(title)}</text>']
    # axes, grid and ticks
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>')
    y = 0.0
    while y <= ymax + 1e-9:
        out.append(f'<line x1="{left}" y1="{Y(y):.1f}" x2="{left + pw}" y2="{Y(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    xstep = nice_step(xmax / 6)
    x = 0.0
    while x <= xmax + 1e-9:
        out.append(f'<line x1="{X(x):.1f}" y1="{top + ph}" x2="{X(x):.1f}" y2="{top + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{X(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x:g}</text>')
        x += xstep
    out.append(f'<text x="{left + pw / 2}" y="{h - 16}" text-anchor="middle">memory limit (GiB, cgroup: '
               'process and page cache)</text>')
    out.append(f'<text x="18" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {top + ph / 2})">decode tok/s (cold start)</text>')
    if size:
        out.append(f'<line x1="{X(size):.1f}" y1="{top}" x2="{X(size):.1f}" y2="{top + ph}" stroke="#888" '
                   'stroke-dasharray="4 4"/>')
        out.append(f'<text x="{X(size) - 4:.1f}" y="{top + 12}" text-anchor="end" fill="#555">model on disk '
                   f'{size:.1f} GiB</text>')
    if unlimited:
        u = unlimited["decode_tok_s"]
        out.append(f'<line x1="{left}" y1="{Y(u):.1f}" x2="{left + pw}" y2="{Y(u):.1f}" stroke="#2a7" '
                   'stroke-dasharray="6 3"/>')
        out.append(f'<text x="{left + pw + 6}" y="{Y(u) + 4:.1f}" fill="#2a7">'
                   f'no limit: {u:.2f} ({unlimited["cache_mode"]})</text>')
    if points:
        path = " ".join(f"{X(p[0]):.1f},{Y(p[2]['decode_tok_s']):.1f}" for p in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="#26c" stroke-width="2"/>')
        for g, limit, r in points:
            cx, cy = X(g), Y(r["decode_tok_s"])
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#26c"/>')
            out.append(f'<text x="{cx:.1f}" y="{cy - 9:.1f}" text-anchor="middle" font-size="11">'
                       f'{r["decode_tok_s"]:.2f}</text>')
            out.append(f'<text x="{cx:.1f}" y="{cy + 17:.1f}" text-anchor="middle" font-size="10" fill="#555">'
                       f'{100 * r["cache_hit_rate"]:.0f}% hits</text>')
        out.append(f'<text x="{left + pw + 6}" y="{top + ph - 4}" font-size="10" fill="#555">'
                   f'cache: {esc(", ".join(sorted({p[2]["cache_mode"] for p in points})))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_step(raw):
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `raw`."""
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    results, out = sys.argv[1], sys.argv[2]
    points, unlimited, size = load(results)
    if not points:
        sys.exit(f"no sweep_*.json results in {results}")
    r = points[0][2]
    model = sys.argv[3] if len(sys.argv) > 3 else "the sweep's model"
    title = (f"{model}: cold, {r['prompt_tokens']} prompt + {r['gen_tokens']} decode tokens, "
             f"{r['threads']} threads, top-{r['experts_per_token']}")
    with open(out, "w") as f:
        f.write(svg(points, unlimited, size, title))
    for g, limit, r in points + ([(0, "none", unlimited)] if unlimited else []):
        print(f"{limit:>6}: decode {r['decode_tok_s']:.3f} tok/s, prefill {r['prefill_tok_s']:.2f} tok/s, "
              f"cache {r['cache_mode']}, hit rate {100 * r['cache_hit_rate']:.1f}%, "
              f"{r['bytes_fetched_per_token'] / 1e6:.0f} MB/token read, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
