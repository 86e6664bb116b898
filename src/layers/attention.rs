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

        let scale = 1.0 / (d as f32).sqrt();
        let group = nh / nkv;
        let mut o = scratch::zeros(n * nh * d);
        // every (token, head) output is independent given the cache: one task each
        let cache = &*cache;
        let attend = |scores: &mut scratch::Buf, (i, oh): (usize, &mut [f32])| {
            let scores = scores.vec();
            let (t, h) = (i / nh, i % nh);
            let len = pos0 + t + 1; // causal: this token sees every earlier position and itself
            let kvh = h / group;
            let qh = &q[(t * nh + h) * qw..(t * nh + h) * qw + d];
            // this KV head's rows are nkv·d apart in the cache
            let (ks, vs) = (&cache.k[kvh * d..], &cache.v[kvh * d..]);
            scores.clear();
            scores.resize(len, 0.0);
            crate::kernels::dot_rows(qh, ks, nkv * d, scale, scores);
            crate::kernels::softmax(scores);
            crate::kernels::axpy_rows(scores, vs, nkv * d, oh);
            if self.gated {
                let g = &q[(t * nh + h) * qw + d..(t * nh + h + 1) * qw];
                for (a, b) in oh.iter_mut().zip(g) {
                    *a *= sigmoid(*b);
                }
            }
        };
        if !crate::tensor::parallel(n * nh * (pos0 + n) * d) {
            let mut scores = scratch::zeros(0);
            o.chunks_mut(d).enumerate().for_each(|c| attend(&mut scores, c));
        } else if n == 1 {
            crate::par::chunks_mut(&mut o, d, |i, oh| attend(&mut scratch::zeros(0), (i, oh)));
        } else {
            o.par_chunks_mut(d).enumerate().for_each_init(|| scratch::zeros(0), attend);
        }
        self.o_proj.matmul(&o, n, out, p);
    }
}
