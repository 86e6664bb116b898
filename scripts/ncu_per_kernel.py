"""Per-kernel sums over the last N launches of an `ncu --csv --print-units base` log with the
metrics gpu__time_duration.sum and dram__bytes_read.sum (docs/PERFORMANCE.md, issue 19):
`ncu_per_kernel.py LOG N [LAUNCHES_PER_TOKEN]`, N a whole number of decode tokens' launches
(242 a token on the 24-layer 30B shape since issue 19, 290 before)."""
import csv, sys, collections
N = int(sys.argv[2]) if len(sys.argv) > 2 else 484
PER = int(sys.argv[3]) if len(sys.argv) > 3 else 242
rows = collections.OrderedDict()
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
for r in csv.DictReader(lines):
    k = r['ID']
    d = rows.setdefault(k, {'name': r['Kernel Name'].split('(')[0], 'grid': r.get('Grid Size', ''), 'block': r.get('Block Size', '')})
    d[r['Metric Name']] = float(r['Metric Value'].replace(',', ''))
ids = list(rows)[-N:]
agg = collections.OrderedDict()
for k in ids:
    d = rows[k]; key = (d['name'], d['grid'])
    a = agg.setdefault(key, [0, 0.0, 0.0])
    a[0] += 1; a[1] += d.get('gpu__time_duration.sum', 0); a[2] += d.get('dram__bytes_read.sum', 0)
tok = len(ids) / PER
tot = sum(a[1] for a in agg.values())
print(f"{sys.argv[1]}: {len(rows)} launches, last {N} = {tok:.1f} tokens; kernel time {tot/tok/1e3:.1f} us/token")
for (n, g), (c, t, b) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{n:22s} {g:16s} n/tok {c/tok:5.1f} us/launch {t/c/1e3:7.2f} us/tok {t/tok/1e3:7.1f} MB/launch {b/c/1e6:7.2f} GB/s {b/t if t else 0:7.0f}")
