"""Per decode token, where the GPU's time goes, from a `scripts/cupti_trace.c` trace:
`cupti_table.py TRACE [TOKENS]`. A token is a run of kernels with no gap over 15 µs between them
(the host's sampling and the next launch sit between tokens); the last TOKENS (default 16)
tokens are summed. Per kernel and grid: launches per token, the kernel's own time (end − start;
under programmatic dependent launch that includes its wait for the previous kernel) and its
share of the token's span (end − the previous kernel's end), which adds up to the span."""
import collections, sys

rows = []
for line in open(sys.argv[1]):
    f = line.split(None, 6)
    if len(f) == 7:
        rows.append((int(f[0]), int(f[1]), f"{f[2]}x{f[3]}x{f[4]}", int(f[5]), f[6].strip()))
rows.sort()
tokens, cur = [], []
for r in rows:
    if cur and r[0] - max(c[1] for c in cur[-4:]) > 15000:
        tokens.append(cur)
        cur = []
    cur.append(r)
if cur:
    tokens.append(cur)
want = int(sys.argv[2]) if len(sys.argv) > 2 else 16
# decode tokens: the runs with the most common launch count, the last `want` of them
counts = collections.Counter(len(t) for t in tokens)
per, _ = counts.most_common(1)[0]
dec = [t for t in tokens if len(t) == per][-want:]
agg = collections.OrderedDict()
span = own = 0
for t in dec:
    span += t[-1][1] - t[0][0]
    prev_end = t[0][0]
    for s, e, g, b, n in t:
        a = agg.setdefault((n.split("(")[0][:28], g), [0, 0, 0])
        a[0] += 1
        a[1] += e - s
        a[2] += max(0, e - prev_end)
        own += e - s
        prev_end = max(prev_end, e)
nt = len(dec)
print(f"{len(rows)} kernels, {len(tokens)} runs; {nt} decode tokens of {per} kernels: "
      f"span {span / nt / 1e3:.1f} us/token, kernels' own {own / nt / 1e3:.1f} us")
print(f"{'kernel':28s} {'grid':14s} {'n/tok':>5s} {'own us':>8s} {'us/tok':>8s} {'span us/tok':>11s}")
for (n, g), (c, o, sp) in sorted(agg.items(), key=lambda x: -x[1][2]):
    print(f"{n:28s} {g:14s} {c / nt:5.1f} {o / c / 1e3:8.2f} {o / nt / 1e3:8.1f} {sp / nt / 1e3:11.1f}")
