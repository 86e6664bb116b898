#!/usr/bin/env python3
"""Fits `synth --routing realistic` to a trained model's routing (docs/PERFORMANCE.md,
"Routing realism"). Standard library only.

    flashmoe eval --text models/default/valid.txt --json > builtin.json
    python3 scripts/routing_fit.py builtin.json

Reads the per-layer routing statistics `eval` reports and takes their means as the targets: the
share of routings on the top 10% of experts, exp(entropy)/experts, and the token-to-token reuse
over the uniform router's k/experts (with the part popularity alone explains). Then, for three
one-parameter laws of the router bias b against the expert's rank share u = (rank + 1/2)/E —
logistic -s*ln(u/(1-u)), normal quantile, and linear -s*u — it solves s at each shape (E, k)
so that the top 10% take the target share (mean field: each token takes the k largest of
b + a unit normal), and prints the entropy and reuse each law then gives. The law whose
entropy and reuse land closest at every shape is the one `synth` uses (linear)."""
import json, math, sys

def tail(x):
    return 0.5 * math.erfc(x / math.sqrt(2))

def shares(b, k):
    lo, hi = -60.0, 60.0
    for _ in range(100):
        t = 0.5 * (lo + hi)
        if sum(tail(t - x) for x in b) > k:
            lo = t
        else:
            hi = t
    p = sorted((tail(t - x) for x in b), reverse=True)
    s = sum(p)
    return [q / s for q in p]

def stats(p):
    e = len(p)
    x = 0.1 * e
    w = int(x)
    top = sum(p[:w]) + (x - w) * (p[w] if w < e else 0)
    h = -sum(q * math.log(q) for q in p if q > 0)
    # reuse from popularity alone over k/E: E * sum(p^2)
    return top, math.exp(h) / e, e * sum(q * q for q in p)

def inv_tail(u):
    lo, hi = -12.0, 12.0
    for _ in range(80):
        m = 0.5 * (lo + hi)
        if tail(m) > u:
            lo = m
        else:
            hi = m
    return 0.5 * (lo + hi)

LAWS = {
    "logistic": lambda u: math.log((1 - u) / u),
    "normal": lambda u: inv_tail(u),
    "linear": lambda u: -u,
}

def biases(law, e, s):
    return [s * LAWS[law]((r + 0.5) / e) for r in range(e)]

def solve(law, e, k, target):
    lo, hi = 0.0, 60.0
    for _ in range(50):
        m = 0.5 * (lo + hi)
        if stats(shares(biases(law, e, m), k))[0] < target:
            lo = m
        else:
            hi = m
    return 0.5 * (lo + hi)

def main():
    r = json.load(open(sys.argv[1]))
    layers = r["routing"]["layers"]
    n = len(layers)
    mean = lambda key: sum(l[key] for l in layers) / n
    k = round(layers[0]["routings"] / r["tokens"])  # every fed token is routed once per layer
    e = layers[0]["experts"]
    top, eff, reuse, indep = mean("top10_share"), mean("effective_share"), mean("reuse"), mean("independent_reuse")
    print(f"targets over {n} layers ({e} experts, top-{k}): top-10% share {top:.3f}, exp(H)/E {eff:.3f}, "
          f"reuse {reuse:.3f} = {reuse / (k / e):.2f} x k/E (popularity alone {indep:.3f} = {indep / (k / e):.2f} x)")
    for law in LAWS:
        for (ee, kk) in [(e, k), (64, 4), (128, 8), (256, 8), (512, 10)]:
            s = solve(law, ee, kk, top)
            t, f, c = stats(shares(biases(law, ee, s), kk))
            print(f"{law:9s} E={ee:4d} k={kk:2d}: s={s:6.3f}  top-10% {t:.3f}  exp(H)/E {f:.3f}  reuse {c:.2f} x k/E")

main()
