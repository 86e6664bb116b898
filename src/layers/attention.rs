//! Softmax attention with GQA, q/k RMSNorm, partial RoPE and (Qwen3.5 / Qwen3-Next) a
//! per-element sigmoid output gate carried in the second half of each head's q_proj rows.

use super::norm::RmsNorm;
use super::rope::Rope;
use super::sigmoid;
use crate::scratch;
use crate::tensor::{Mat, Precision, Product, products};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Mat,
    pub k_proj: Mat,
    pub v_proj: Mat,
    pub o_proj: Mat,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub gated: bool,
    pub rope: Rope,
}

/// Keys and values of past positions, `[pos][kv_head][head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvCache {
    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 4
    }
}

impl Attention {
    /// Attends `n` new tokens at positions `pos0..pos0+n`, appending them to `cache`.
    pub fn forward(&self, x: &[f32], n: usize, pos0: usize, cache: &mut KvCache, out: &mut [f32], p: Precision) {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qw = if self.gated { 2 * d } else { d };
        let mut q = scratch::zeros(n * nh * qw);
        let mut k = scratch::zeros(n * nkv * d);
        let mut v = scratch::zeros(n * nkv * d);
        products(
            &mut [
                Product { w: self.q_proj.view(), x, y: &mut q },
                Product { w: self.k_proj.view(), x, y: &mut k },
                Product { w: self.v_proj.view(), x, y: &mut v },
            ],
            n,
            p,
        );

        // q/k norm and RoPE, token by token (in parallel for a prompt)
        let rotate = |(cos, sin): &mut (scratch::Buf, scratch::Buf),
                      (t, (qt, kt)): (usize, (&mut [f32], &mut [f32]))| {
            self.rope.table(pos0 + t, cos.vec(), sin.vec());
            for head in qt.chunks_exact_mut(qw) {
                let head = &mut head[..d];
                self.q_norm.apply(head);
                Rope::apply(head, cos, sin);
            }
            for head in kt.chunks_exact_mut(d) {
                self.k_norm.apply(head);
                Rope::apply(head, cos, sin);
            }
        };
        let tables = || (scratch::zeros(0), scratch::zeros(0));
        if n > 1 && crate::tensor::parallel(n * (nh + nkv) * d) {
            q.par_chunks_mut(nh * qw).zip(k.par_chunks_mut(nkv * d)).enumerate().for_each_init(tables, rotate);
        } else {
            let mut tb = tables();
            q.chunks_mut(nh * qw).zip(k.chunks_mut(nkv * d)).enumerate().for_each(|c| rotate(&mut tb, c));
        }
        // grow by at least 256 positions at a time, so short runs never reallocate mid-decode
        let add = k.len().max(256 * nkv * d);
        if cache.k.capacity() - cache.k.len() < k.len() {
            cache.k.reserve(add);
            cache.v.reserve(add);
        }
        cache.k.extend_from_slice(&k);
        cache.v.extend_from_slice(&v);

        let mut o = scratch::zeros(n * nh * d);
        let heads = Heads { nh, nkv, d, gated: self.gated };
        attend(&q, n, pos0, cache, &mut o, heads, context_parts(n, nkv, pos0));
        self.o_proj.matmul(&o, n, out, p);
    }
}

/// Head counts of an attention layer.
#[derive(Clone, Copy, Debug)]
struct Heads {
    nh: usize,
    nkv: usize,
    d: usize,
    gated: bool,
}

/// Parts of the context per (token, KV head) work item: one when the tokens and KV heads give
/// enough items, else one per 128 positions (up to 64), so that decode has work for every
/// thread. It depends on the shape alone, never on the thread count, so results do not either.
fn context_parts(n: usize, nkv: usize, pos0: usize) -> usize {
    if n * nkv >= 32 { 1 } else { (pos0 + 1).div_ceil(128).clamp(1, 64) }
}

/// o = softmax(q·Kᵀ/√d)·V over the cache, causal, then the output gate. One work item per
/// (token, KV head, part of the context): the query heads sharing a KV head run together, so
/// that head's cached rows are read once per item, not once per query head; with several
/// parts, each item's softmax is partial and the parts are merged by their weights.
fn attend(q: &[f32], n: usize, pos0: usize, cache: &KvCache, o: &mut [f32], heads: Heads, parts: usize) {
    let Heads { nh, nkv, d, gated } = heads;
    let (qw, g) = (if gated { 2 * d } else { d }, nh / nkv);
    let scale = 1.0 / (d as f32).sqrt();
    // item i: token t, KV head kvh, part c; it writes g heads' (max, sum, output) as
    // g·(d + 2) floats, or with one part the finished outputs straight into `o`
    let item = |i: usize, out: &mut [f32]| {
        let (t, kvh, c) = (i / (nkv * parts), i / parts % nkv, i % parts);
        let len = pos0 + t + 1; // causal: this token sees every earlier position and itself
        let (p0, p1) = (c * len / parts, (c + 1) * len / parts);
        let stride = nkv * d;
        let (ks, vs) = (&cache.k[p0 * stride + kvh * d..], &cache.v[p0 * stride + kvh * d..]);
        let mut w = scratch::zeros(p1 - p0);
        for j in 0..g {
            let h = kvh * g + j;
            let qh = &q[(t * nh + h) * qw..(t * nh + h) * qw + d];
            crate::kernels::dot_rows(qh, ks, stride, scale, &mut w);
            let (m, l) = crate::kernels::softmax(&mut w);
            let oj =
                if parts == 1 { &mut out[j * d..(j + 1) * d] } else { &mut out[j * (d + 2) + 2..(j + 1) * (d + 2)] };
            oj.iter_mut().for_each(|v| *v = 0.0);
            crate::kernels::axpy_rows(&w, vs, stride, oj);
            if parts == 1 {
                gate(heads, q, t, h, oj);
            } else {
                out[j * (d + 2)] = m;
                out[j * (d + 2) + 1] = l;
            }
        }
    };
    let per = if parts == 1 { g * d } else { g * (d + 2) };
    let mut partial = scratch::zeros(if parts == 1 { 0 } else { n * nkv * parts * per });
    let buf: &mut [f32] = if parts == 1 { o } else { &mut partial };
    if !crate::tensor::parallel(n * nh * (pos0 + n) * d) {
        buf.chunks_mut(per).enumerate().for_each(|(i, c)| item(i, c));
    } else if n == 1 {
        crate::par::chunks_mut(buf, per, item);
    } else {
        buf.par_chunks_mut(per).enumerate().for_each(|(i, c)| item(i, c));
    }
    if parts == 1 {
        return;
    }
    // merge the parts: each weighs by its share Σ e^(x − m) · e^(m − max m) of the whole
    for (tk, blocks) in partial.chunks(parts * per).enumerate() {
        let (t, kvh) = (tk / nkv, tk % nkv);
        for j in 0..g {
            let h = kvh * g + j;
            let part = |c: usize| &blocks[c * per + j * (d + 2)..c * per + (j + 1) * (d + 2)];
            let top = (0..parts).map(|c| part(c)[0]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..parts).map(|c| part(c)[1] * (part(c)[0] - top).exp()).sum();
            let oh = &mut o[(t * nh + h) * d..(t * nh + h + 1) * d];
            oh.iter_mut().for_each(|v| *v = 0.0);
            for c in 0..parts {
                let wgt = part(c)[1] * (part(c)[0] - top).exp() / total;
                crate::kernels::axpy(wgt, &part(c)[2..], oh);
            }
            gate(heads, q, t, h, oh);
        }
    }
}

/// Gated attention: o_h ⊙= sigmoid(the gate half of token t's q_proj for head h).
fn gate(heads: Heads, q: &[f32], t: usize, h: usize, oh: &mut [f32]) {
    if heads.gated {
        let (nh, d) = (heads.nh, heads.d);
        let qg = &q[(t * nh + h) * 2 * d + d..(t * nh + h + 1) * 2 * d];
        for (a, b) in oh.iter_mut().zip(qg) {
            *a *= sigmoid(*b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::uniform;

    /// The float64 definition: per token and head, softmax over the causal prefix, gated.
    fn naive(q: &[f32], n: usize, pos0: usize, c: &KvCache, h: Heads) -> Vec<f64> {
        let (qw, g) = (if h.gated { 2 * h.d } else { h.d }, h.nh / h.nkv);
        let mut o = vec![0f64; n * h.nh * h.d];
        for t in 0..n {
            for head in 0..h.nh {
                let (kvh, qh) = (head / g, &q[(t * h.nh + head) * qw..]);
                let s: Vec<f64> = (0..pos0 + t + 1)
                    .map(|p| {
                        let k = &c.k[(p * h.nkv + kvh) * h.d..];
                        (0..h.d).map(|j| qh[j] as f64 * k[j] as f64).sum::<f64>() / (h.d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (p, x) in s.iter().enumerate() {
                    let v = &c.v[(p * h.nkv + kvh) * h.d..];
                    for j in 0..h.d {
                        o[(t * h.nh + head) * h.d + j] += (x - m).exp() / z * v[j] as f64;
                    }
                }
                if h.gated {
                    for j in 0..h.d {
                        o[(t * h.nh + head) * h.d + j] *= 1.0 / (1.0 + (-(qh[h.d + j] as f64)).exp());
                    }
                }
            }
        }
        o
    }

    #[test]
    fn context_parts_merge_to_the_whole_softmax() {
        for (heads, n, pos0) in [
            (Heads { nh: 8, nkv: 2, d: 64, gated: true }, 1, 300),
            (Heads { nh: 4, nkv: 4, d: 16, gated: false }, 3, 40),
            (Heads { nh: 6, nkv: 2, d: 128, gated: false }, 1, 0),
        ] {
            let qw = if heads.gated { 2 * heads.d } else { heads.d };
            let q: Vec<f32> = uniform(n * heads.nh * qw, 1).iter().map(|v| v * 4.0).collect();
            let len = (pos0 + n) * heads.nkv * heads.d;
            let cache = KvCache { k: uniform(len, 2), v: uniform(len, 3) };
            let want = naive(&q, n, pos0, &cache, heads);
            for parts in [1, 2, 5, 64] {
                let mut o = vec![0f32; n * heads.nh * heads.d];
                attend(&q, n, pos0, &cache, &mut o, heads, parts);
                let err = o.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                assert!(err < 1e-5, "{heads:?} n {n} pos0 {pos0} parts {parts}: max error {err}");
            }
        }
    }
}
