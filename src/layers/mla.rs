//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, DeepSeek-V3.2, GLM-5), computed in
//! the latent space: each position caches only its normalised latent c (`kv_lora_rank`) and
//! its rotated shared key k_pe (`qk_rope_head_dim`), 576 floats for DeepSeek-V3 where
//! expanded K and V would take 128 × 320. With W_UK, W_UV the key and value halves of a
//! head's rows of `kv_b_proj`,
//!
//!   q_nope·k_nope = q_nope·(W_UK c) = (W_UKᵀ q_nope)·c   and   Σ p·v = W_UV (Σ p·c),
//!
//! so a head's query is taken into the latent space once per token ([`Mla::uk_t`]), scores
//! are dot products with the cached rows [c ‖ k_pe], and the weighted sum of latents leaves
//! through W_UV ([`Mla::uv`]): nothing is expanded per position (DeepSeek's reference code
//! calls this the "absorb" form; transformers expands K and V instead).
//!
//! With a lightning indexer (DSA), each query attends only to the `topk` positions the
//! indexer scores highest: Σ_h w_h·ReLU(q_h·k_s)/√d over its own small heads, w from
//! `weights_proj`. While a query sees at most `topk` positions it attends to all of them, and
//! the scores are not computed.

use super::norm::RmsNorm;
use super::rope::Rope;
use crate::config::IndexerSpec;
use crate::scratch;
use crate::tensor::{Mat, MatRef, Precision, Product, WKind, products};
use rayon::prelude::*;
use smallvec::{SmallVec, smallvec};

/// A layer's products computed together (at most four).
type Jobs<'a> = SmallVec<[Product<'a>; 4]>;

#[derive(Clone, Debug)]
pub enum QProj {
    /// `q_proj` (no q-LoRA).
    Full(Mat),
    /// `q_b_proj(q_a_layernorm(q_a_proj x))`.
    LoRA { a: Mat, norm: RmsNorm, b: Mat },
}

#[derive(Clone, Debug)]
pub struct Mla {
    pub q: QProj,
    /// `kv_a_proj_with_mqa`: x → [latent ‖ k_pe].
    pub kv_a: Mat,
    pub kv_norm: RmsNorm,
    /// W_UKᵀ of every head, `[heads · kv_lora, nope]`: a head's query into the latent space.
    pub uk_t: Mat,
    /// W_UV of every head, `[heads · v, kv_lora]`.
    pub uv: Mat,
    pub o_proj: Mat,
    pub num_heads: usize,
    pub nope: usize,
    pub rope_dim: usize,
    pub kv_lora: usize,
    pub v_dim: usize,
    pub interleaved: bool,
    pub scale: f32,
    pub rope: Rope,
    pub indexer: Option<Indexer>,
    /// The layer selects with the indexer of the last layer that has one (GLM-5.2's `shared`).
    pub shares_selection: bool,
}

/// DSA's lightning indexer of one layer.
#[derive(Clone, Debug)]
pub struct Indexer {
    /// `wq_b`: the q-LoRA latent → `heads × head_dim`.
    pub wq_b: Mat,
    /// `wk`: x → one key of `head_dim`, LayerNorm'd (`k_norm`, with bias).
    pub wk: Mat,
    pub k_norm: (Vec<f32>, Vec<f32>),
    /// `weights_proj`: x → a weight per head.
    pub weights: Mat,
    pub spec: IndexerSpec,
}

/// What a latent-attention layer keeps per position: `[pos][kv_lora + rope]`, and the
/// indexer's keys `[pos][head_dim]` when it has one.
#[derive(Clone, Debug, Default)]
pub struct LatentCache {
    pub lat: Vec<f32>,
    pub index_k: Vec<f32>,
}

impl LatentCache {
    pub fn bytes(&self) -> usize {
        (self.lat.capacity() + self.index_k.capacity()) * 4
    }
}

/// The positions each token of a forward pass attends to (`None`: every visible one), handed
/// from a layer with an indexer to the layers that share its selection.
#[derive(Debug, Default)]
pub struct Selection {
    pub rows: Vec<Option<Vec<u32>>>,
}

/// Builds [`Mla::uk_t`] and [`Mla::uv`] from `kv_b_proj` (`[heads · (nope + v), kv_lora]`), in
/// bf16 when it is stored so (the same values) and f32 otherwise.
pub fn split_kv_b(kv_b: &Mat, heads: usize, nope: usize, v: usize) -> (Mat, Mat) {
    let kvl = kv_b.cols;
    let w = kv_b.view();
    let mut row = vec![0f32; kvl];
    let (mut uk_t, mut uv) = (vec![0f32; heads * kvl * nope], vec![0f32; heads * v * kvl]);
    for h in 0..heads {
        let base = h * (nope + v);
        for i in 0..nope {
            w.row_f32(base + i, &mut row);
            for (j, &x) in row.iter().enumerate() {
                uk_t[(h * kvl + j) * nope + i] = x;
            }
        }
        for i in 0..v {
            w.row_f32(base + nope + i, &mut uv[(h * v + i) * kvl..(h * v + i + 1) * kvl]);
        }
    }
    let to = |rows: usize, cols: usize, d: Vec<f32>| {
        let m = Mat::from_f32(rows, cols, d).expect("sizes match");
        if kv_b.kind == WKind::BF16 { m.to_kind(WKind::BF16) } else { m }
    };
    (to(heads * kvl, nope, uk_t), to(heads * v, kvl, uv))
}

/// Row `r` of an f32 or bf16 matrix · x.
#[inline]
fn row_dot(w: &MatRef<'_>, r: usize, x: &[f32]) -> f32 {
    let c = w.cols;
    match w.kind {
        WKind::F32 => crate::kernels::dot(&bytemuck::cast_slice::<u8, f32>(w.data)[r * c..(r + 1) * c], x),
        WKind::BF16 => crate::kernels::dot_bf16(&bytemuck::cast_slice::<u8, u16>(w.data)[r * c..(r + 1) * c], x),
        _ => unreachable!("split_kv_b makes f32 or bf16"),
    }
}

/// `f(i, chunk)` over `size`-chunks of `data`: on the decode team for one token, rayon else.
fn each_chunk(decode: bool, data: &mut [f32], size: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if decode {
        crate::par::chunks_mut(data, size, f);
    } else if crate::tensor::parallel(data.len() * 64) {
        data.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Rotates the pairs (2i, 2i+1) of `x` (DeepSeek's layout). transformers rotates the same
/// pairs and writes them de-interleaved; q and k alike, so every dot product is the same.
#[inline]
fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((p, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (p[0], p[1]);
        p[0] = a * c - b * s;
        p[1] = b * c + a * s;
    }
}

fn rotate(x: &mut [f32], interleaved: bool, cos: &[f32], sin: &[f32]) {
    if interleaved { rope_interleaved(x, cos, sin) } else { Rope::apply(x, cos, sin) }
}

impl Mla {
    /// Bytes of its weights (the latent-space copies of `kv_b_proj` included).
    pub fn bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Full(w) => w.bytes(),
            QProj::LoRA { a, b, .. } => a.bytes() + b.bytes(),
        };
        let ix = self.indexer.as_ref().map_or(0, |i| i.wq_b.bytes() + i.wk.bytes() + i.weights.bytes());
        q + self.kv_a.bytes() + self.uk_t.bytes() + self.uv.bytes() + self.o_proj.bytes() + ix
    }

    /// Attends `n` new tokens at positions `pos0..pos0+n`, appending them to `cache`. `sel`
    /// carries the indexer's choice to the layers that share it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        pos0: usize,
        cache: &mut LatentCache,
        sel: &mut Selection,
        out: &mut [f32],
        p: Precision,
    ) {
        let (nh, nope, rd, kvl) = (self.num_heads, self.nope, self.rope_dim, self.kv_lora);
        let (qd, lw) = (nope + rd, kvl + rd);
        let decode = n == 1;
        // 1. projections: q (through the q-LoRA latent), the latent row, the indexer's inputs
        let mut q = scratch::zeros(n * nh * qd);
        let mut lat = scratch::zeros(n * lw);
        let ix = self.indexer.as_ref();
        let (ihd, ihn) = ix.map_or((0, 0), |i| (i.spec.head_dim, i.spec.heads));
        let mut ik = scratch::zeros(n * ihd);
        let mut iw = scratch::zeros(n * ihn);
        let mut iq = scratch::zeros(n * ihn * ihd);
        match &self.q {
            QProj::Full(w) => {
                // no allocation on the decode path
                let mut jobs: Jobs<'_> =
                    smallvec![Product { w: w.view(), x, y: &mut q }, Product { w: self.kv_a.view(), x, y: &mut lat }];
                if let Some(i) = ix {
                    jobs.push(Product { w: i.wk.view(), x, y: &mut ik });
                    jobs.push(Product { w: i.weights.view(), x, y: &mut iw });
                }
                products(&mut jobs, n, p);
            }
            QProj::LoRA { a, norm, b } => {
                let mut qa = scratch::zeros(n * a.rows);
                {
                    let mut jobs: Jobs<'_> = smallvec![
                        Product { w: a.view(), x, y: &mut qa },
                        Product { w: self.kv_a.view(), x, y: &mut lat }
                    ];
                    if let Some(i) = ix {
                        jobs.push(Product { w: i.wk.view(), x, y: &mut ik });
                        jobs.push(Product { w: i.weights.view(), x, y: &mut iw });
                    }
                    products(&mut jobs, n, p);
                }
                norm.apply(&mut qa);
                let mut jobs: Jobs<'_> = smallvec![Product { w: b.view(), x: &qa, y: &mut q }];
                if let Some(i) = ix {
                    jobs.push(Product { w: i.wq_b.view(), x: &qa, y: &mut iq });
                }
                products(&mut jobs, n, p);
            }
        }

        // 2. per token: normalise the latent, rotate the shared key and each head's rope part
        //    (and the indexer's), then append to the cache
        let (mut cos, mut sin) = (scratch::zeros(0), scratch::zeros(0));
        for t in 0..n {
            self.rope.table(pos0 + t, cos.vec(), sin.vec());
            let row = &mut lat[t * lw..(t + 1) * lw];
            self.kv_norm.apply(&mut row[..kvl]);
            rotate(&mut row[kvl..], self.interleaved, &cos, &sin);
            for head in q[t * nh * qd..(t + 1) * nh * qd].chunks_exact_mut(qd) {
                rotate(&mut head[nope..], self.interleaved, &cos, &sin);
            }
            if let Some(i) = ix {
                let k = &mut ik[t * ihd..(t + 1) * ihd];
                layer_norm(k, &i.k_norm.0, &i.k_norm.1, 1e-6);
                rotate(&mut k[..rd], i.spec.interleaved, &cos, &sin);
                for head in iq[t * ihn * ihd..(t + 1) * ihn * ihd].chunks_exact_mut(ihd) {
                    rotate(&mut head[..rd], i.spec.interleaved, &cos, &sin);
                }
            }
        }
        // grown 256 positions at a time, so short runs never reallocate mid-decode
        for (c, new, row) in [(&mut cache.lat, &lat[..], lw), (&mut cache.index_k, &ik[..], ihd)] {
            if c.capacity() - c.len() < new.len() {
                c.reserve(new.len().max(256 * row));
            }
            c.extend_from_slice(new);
        }

        // 3. the indexer's choice of positions per token, or the shared one
        if let Some(i) = ix {
            sel.rows =
                (0..n).map(|t| i.select(&iq[t * ihn * ihd..], &iw[t * ihn..(t + 1) * ihn], pos0 + t, cache)).collect();
        } else if !self.shares_selection {
            sel.rows.clear();
        }
        let chosen = |t: usize| sel.rows.get(t).and_then(Option::as_deref);

        // 4. each head's query in the latent space: [W_UKᵀ q_nope ‖ q_pe]·scale
        let mut qc = scratch::zeros(n * nh * lw);
        let uk = self.uk_t.view();
        each_chunk(decode, &mut qc, lw, |i, out| {
            let (t, h) = (i / nh, i % nh);
            let qh = &q[(t * nh + h) * qd..(t * nh + h + 1) * qd];
            for (j, o) in out[..kvl].iter_mut().enumerate() {
                *o = row_dot(&uk, h * kvl + j, &qh[..nope]) * self.scale;
            }
            for (o, &v) in out[kvl..].iter_mut().zip(&qh[nope..]) {
                *o = v * self.scale;
            }
        });

        // 5. softmax over the cached rows and the weighted sum of latents: one item per (token,
        //    group of heads, part of the positions), so a part's rows are read once for the
        //    group, from cache; the parts' partial softmaxes merge after
        let (hg, parts) = work_split(n, nh, pos0 + n);
        let groups = nh.div_ceil(hg);
        let per = hg * (kvl + 2);
        let rows = &cache.lat;
        let mut partial = scratch::zeros(n * groups * parts * per);
        each_chunk(decode, &mut partial, per, |i, out| {
            let (t, g, c) = (i / (groups * parts), i / parts % groups, i % parts);
            let sel = chosen(t);
            let len = sel.map_or(pos0 + t + 1, <[u32]>::len);
            let (j0, j1) = (c * len / parts, (c + 1) * len / parts);
            let mut w = scratch::dirty(j1 - j0);
            for (k, h) in (g * hg..((g + 1) * hg).min(nh)).enumerate() {
                let qh = &qc[(t * nh + h) * lw..(t * nh + h + 1) * lw];
                let o = &mut out[k * (kvl + 2)..(k + 1) * (kvl + 2)];
                match sel {
                    None => crate::kernels::dot_rows(qh, &rows[j0 * lw..], lw, 1.0, &mut w),
                    Some(pos) => {
                        for (wi, &s) in w.iter_mut().zip(&pos[j0..j1]) {
                            *wi = crate::kernels::dot(qh, &rows[s as usize * lw..(s as usize + 1) * lw]);
                        }
                    }
                }
                (o[0], o[1]) = crate::kernels::softmax(&mut w);
                match sel {
                    None => crate::kernels::axpy_rows(&w, &rows[j0 * lw..], lw, &mut o[2..]),
                    Some(pos) => {
                        for (&wi, &s) in w.iter().zip(&pos[j0..j1]) {
                            crate::kernels::axpy(wi, &rows[s as usize * lw..s as usize * lw + kvl], &mut o[2..]);
                        }
                    }
                }
            }
        });
        let mut ol = scratch::zeros(n * nh * kvl);
        each_chunk(decode, &mut ol, kvl, |i, o| {
            let (t, h) = (i / nh, i % nh);
            let part = |c: usize| {
                let at = ((t * groups + h / hg) * parts + c) * per + (h % hg) * (kvl + 2);
                &partial[at..at + kvl + 2]
            };
            if parts == 1 {
                return o.copy_from_slice(&part(0)[2..]);
            }
            // each part weighs by its share Σ e^(x − m)·e^(m − max m) of the whole
            let top = (0..parts).map(|c| part(c)[0]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..parts).map(|c| part(c)[1] * (part(c)[0] - top).exp()).sum();
            for c in 0..parts {
                let p = part(c);
                if p[1] > 0.0 {
                    crate::kernels::axpy(p[1] * (p[0] - top).exp() / total, &p[2..], o);
                }
            }
        });

        // 6. out of the latent space per head, then the output projection
        let vd = self.v_dim;
        let mut o = scratch::zeros(n * nh * vd);
        let uv = self.uv.view();
        each_chunk(decode, &mut o, vd, |i, oh| {
            let h = i % nh;
            let l = &ol[i * kvl..(i + 1) * kvl];
            for (j, v) in oh.iter_mut().enumerate() {
                *v = row_dot(&uv, h * vd + j, l);
            }
        });
        self.o_proj.matmul(&o, n, out, p);
    }
}

/// (heads per work item, parts of the positions) for `n` tokens of `heads` heads seeing up to
/// `seen` positions: groups of up to 16 heads share each part's rows; the positions split
/// (in parts of at least 256) only when tokens and groups give fewer than 32 items. It depends
/// on the shape alone, never on the thread count, so results do not either.
fn work_split(n: usize, heads: usize, seen: usize) -> (usize, usize) {
    let hg = heads.min(16);
    let items = n * heads.div_ceil(hg);
    let parts = if items >= 32 { 1 } else { seen.div_ceil(256).clamp(1, (64 / items).max(1)) };
    (hg, parts)
}

impl Indexer {
    /// The positions token at `pos` attends to: all (`None`) while it sees at most `topk`,
    /// else the `topk` its score ranks highest, in order.
    fn select(&self, q: &[f32], w: &[f32], pos: usize, cache: &LatentCache) -> Option<Vec<u32>> {
        let (hn, hd, k) = (self.spec.heads, self.spec.head_dim, self.spec.topk);
        let seen = pos + 1;
        if seen <= k {
            return None;
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let wscale = 1.0 / (hn as f32).sqrt();
        let mut score = vec![0f32; seen];
        let mut dots = vec![0f32; seen];
        for h in 0..hn {
            crate::kernels::dot_rows(&q[h * hd..(h + 1) * hd], &cache.index_k, hd, scale, &mut dots);
            let wh = w[h] * wscale;
            for (s, &d) in score.iter_mut().zip(&dots) {
                *s += wh * d.max(0.0);
            }
        }
        let mut idx: Vec<u32> = (0..seen as u32).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| score[b as usize].total_cmp(&score[a as usize]));
        idx.truncate(k);
        idx.sort_unstable();
        Some(idx)
    }
}

/// LayerNorm with weight and bias, in f64.
fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, &wi), &bi) in x.iter_mut().zip(w).zip(b) {
        *v = ((*v as f64 - mean) * inv) as f32 * wi + bi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::uniform;

    /// A small layer of odd sizes (no q-LoRA: the q path is a plain product either way).
    fn layer(interleaved: bool, seed: u64) -> Mla {
        layer_of(3, interleaved, seed)
    }

    fn layer_of(nh: usize, interleaved: bool, seed: u64) -> Mla {
        let (h, nope, rd, kvl, vd) = (24, 5, 6, 7, 9);
        let m = |r: usize, c: usize, s: u64| Mat::from_f32(r, c, uniform(r * c, s)).unwrap();
        let kv_b = m(nh * (nope + vd), kvl, seed + 3);
        let (uk_t, uv) = split_kv_b(&kv_b, nh, nope, vd);
        Mla {
            q: QProj::Full(m(nh * (nope + rd), h, seed)),
            kv_a: m(kvl + rd, h, seed + 1),
            kv_norm: RmsNorm::new(uniform(kvl, seed + 2), 1e-6, false),
            uk_t,
            uv,
            o_proj: m(h, nh * vd, seed + 4),
            num_heads: nh,
            nope,
            rope_dim: rd,
            kv_lora: kvl,
            v_dim: vd,
            interleaved,
            scale: 0.37,
            rope: Rope::new(rd, 10000.0),
            indexer: None,
            shares_selection: false,
        }
    }

    /// The expanded form, in f64: K and V from every latent, causal softmax, `keep` masking.
    fn naive(l: &Mla, kv_b: &[f32], x: &[f32], n: usize, keep: impl Fn(usize, usize) -> bool) -> Vec<f64> {
        let (nh, nope, rd, kvl, vd) = (l.num_heads, l.nope, l.rope_dim, l.kv_lora, l.v_dim);
        let h = x.len() / n;
        let QProj::Full(qw) = &l.q else { unreachable!() };
        let (qw, kva, ow) = (qw.to_f32(), l.kv_a.to_f32(), l.o_proj.to_f32());
        let mv = |w: &[f32], rows: usize, x: &[f32]| -> Vec<f32> {
            (0..rows)
                .map(|r| (0..x.len()).map(|c| w[r * x.len() + c] as f64 * x[c] as f64).sum::<f64>() as f32)
                .collect()
        };
        let (mut qs, mut lats) = (vec![], vec![]);
        let (mut cos, mut sin) = (vec![], vec![]);
        for t in 0..n {
            l.rope.table(t, &mut cos, &mut sin);
            let mut q = mv(&qw, nh * (nope + rd), &x[t * h..(t + 1) * h]);
            let mut a = mv(&kva, kvl + rd, &x[t * h..(t + 1) * h]);
            l.kv_norm.apply(&mut a[..kvl]);
            rotate(&mut a[kvl..], l.interleaved, &cos, &sin);
            for hd in q.chunks_exact_mut(nope + rd) {
                rotate(&mut hd[nope..], l.interleaved, &cos, &sin);
            }
            qs.push(q);
            lats.push(a);
        }
        let mut out = vec![0f64; n * h];
        for t in 0..n {
            let mut o = vec![0f32; nh * vd];
            for hh in 0..nh {
                let qh = &qs[t][hh * (nope + rd)..(hh + 1) * (nope + rd)];
                let vis: Vec<usize> = (0..=t).filter(|&s| keep(t, s)).collect();
                let kv: Vec<Vec<f32>> =
                    vis.iter().map(|&s| mv(&kv_b[hh * (nope + vd) * kvl..], nope + vd, &lats[s][..kvl])).collect();
                let sc: Vec<f64> = vis
                    .iter()
                    .zip(&kv)
                    .map(|(&s, kvs)| {
                        let dn: f64 = (0..nope).map(|i| qh[i] as f64 * kvs[i] as f64).sum();
                        let dr: f64 = (0..rd).map(|i| qh[nope + i] as f64 * lats[s][kvl + i] as f64).sum();
                        (dn + dr) * l.scale as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                for (j, kvs) in kv.iter().enumerate() {
                    let p = (sc[j] - m).exp() / z;
                    for i in 0..vd {
                        o[hh * vd + i] += (p * kvs[nope + i] as f64) as f32;
                    }
                }
            }
            for r in 0..h {
                out[t * h + r] = (0..nh * vd).map(|c| ow[r * nh * vd + c] as f64 * o[c] as f64).sum();
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f64], tol: f64) {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() <= tol * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn absorbed_prefill_and_decode_match_the_expanded_form() {
        for interleaved in [false, true] {
            let l = layer(interleaved, 7);
            let kv_b = {
                let (nh, nope, vd, kvl) = (l.num_heads, l.nope, l.v_dim, l.kv_lora);
                uniform(nh * (nope + vd) * kvl, 7 + 3)
            };
            let n = 11;
            let x = uniform(n * 24, 99);
            let want = naive(&l, &kv_b, &x, n, |_, _| true);
            let mut out = vec![0f32; n * 24];
            let mut c = LatentCache::default();
            l.forward(&x, n, 0, &mut c, &mut Selection::default(), &mut out, Precision::Exact);
            close(&out, &want, 1e-5);
            // token by token through the cache
            let mut c = LatentCache::default();
            let mut step = vec![0f32; 24];
            for t in 0..n {
                l.forward(
                    &x[t * 24..(t + 1) * 24],
                    1,
                    t,
                    &mut c,
                    &mut Selection::default(),
                    &mut step,
                    Precision::Exact,
                );
                close(&step, &want[t * 24..(t + 1) * 24], 1e-5);
            }
        }
    }

    #[test]
    fn head_groups_and_parts_of_a_long_context_merge_to_the_whole_softmax() {
        // 20 heads: a group of 16 and one of 4; past 256 positions decode splits the context
        let l = layer_of(20, true, 11);
        let kv_b = uniform(20 * (l.nope + l.v_dim) * l.kv_lora, 11 + 3);
        let n = 300;
        assert_eq!(work_split(1, 20, n), (16, 2));
        let x = uniform(n * 24, 8);
        let want = naive(&l, &kv_b, &x, n, |_, _| true);
        let mut out = vec![0f32; n * 24];
        l.forward(&x, n, 0, &mut LatentCache::default(), &mut Selection::default(), &mut out, Precision::Exact);
        close(&out, &want, 1e-5);
        let mut c = LatentCache::default();
        let mut step = vec![0f32; 24];
        for t in 0..n {
            l.forward(&x[t * 24..(t + 1) * 24], 1, t, &mut c, &mut Selection::default(), &mut step, Precision::Exact);
            if t % 37 == 0 || t == n - 1 {
                close(&step, &want[t * 24..(t + 1) * 24], 1e-5);
            }
        }
    }

    #[test]
    fn a_selection_masks_the_positions_it_leaves_out() {
        let l = Mla { shares_selection: true, ..layer(true, 3) };
        let kv_b = uniform(l.num_heads * (l.nope + l.v_dim) * l.kv_lora, 3 + 3);
        let n = 9;
        let x = uniform(n * 24, 5);
        // every token keeps its even positions and itself
        let keep = |t: usize, s: usize| s.is_multiple_of(2) || s == t;
        let want = naive(&l, &kv_b, &x, n, keep);
        let rows = (0..n).map(|t| Some((0..=t as u32).filter(|&s| keep(t, s as usize)).collect())).collect();
        let mut sel = Selection { rows };
        let mut out = vec![0f32; n * 24];
        l.forward(&x, n, 0, &mut LatentCache::default(), &mut sel, &mut out, Precision::Exact);
        close(&out, &want, 1e-5);
    }

    #[test]
    fn the_indexer_keeps_the_top_scores_and_all_within_its_budget() {
        let (hn, hd) = (2, 4);
        let ix = Indexer {
            wq_b: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            wk: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            k_norm: (vec![], vec![]),
            weights: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            spec: IndexerSpec { heads: hn, head_dim: hd, topk: 3, interleaved: false, own: vec![true] },
        };
        let cache = LatentCache { lat: vec![], index_k: uniform(7 * hd, 1) };
        let (q, w) = (uniform(hn * hd, 2), vec![0.7, -1.3]);
        assert_eq!(ix.select(&q, &w, 2, &cache), None);
        let got = ix.select(&q, &w, 6, &cache).unwrap();
        // the scalar reference
        let score = |s: usize| -> f64 {
            (0..hn)
                .map(|h| {
                    let d: f64 = (0..hd).map(|i| q[h * hd + i] as f64 * cache.index_k[s * hd + i] as f64).sum();
                    w[h] as f64 / (hn as f64).sqrt() * (d / (hd as f64).sqrt()).max(0.0)
                })
                .sum()
        };
        let mut all: Vec<usize> = (0..7).collect();
        all.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        let mut want: Vec<u32> = all[..3].iter().map(|&s| s as u32).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn the_latent_space_copies_hold_kv_b_proj_exactly_in_any_format() {
        let (nh, nope, vd, kvl) = (3, 5, 4, 32);
        let f = Mat::from_f32(nh * (nope + vd), kvl, uniform(nh * (nope + vd) * kvl, 4)).unwrap();
        for kind in [WKind::F32, WKind::BF16, WKind::Q { bits: 8, group: 16 }, WKind::Q { bits: 4, group: 32 }] {
            let kv_b = f.to_kind(kind);
            let w = kv_b.to_f32();
            let (uk_t, uv) = split_kv_b(&kv_b, nh, nope, vd);
            let (uk_t, uv) = (uk_t.to_f32(), uv.to_f32());
            for h in 0..nh {
                for i in 0..nope {
                    for j in 0..kvl {
                        assert_eq!(uk_t[(h * kvl + j) * nope + i], w[(h * (nope + vd) + i) * kvl + j], "{kind:?}");
                    }
                }
                for i in 0..vd {
                    let r = h * (nope + vd) + nope + i;
                    assert_eq!(&uv[(h * vd + i) * kvl..(h * vd + i + 1) * kvl], &w[r * kvl..(r + 1) * kvl]);
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_its_definition() {
        let mut x = vec![1.0, 2.0, 4.0, -3.0];
        layer_norm(&mut x, &[1.0, 2.0, 1.0, 1.0], &[0.0, 0.0, 1.0, 0.0], 0.0);
        let mean = 1.0f64;
        let sd = ((0.0 + 1.0 + 9.0 + 16.0) / 4.0f64).sqrt();
        let want = [0.0, 2.0 * 1.0 / sd, 3.0 / sd + 1.0, -4.0 / sd];
        for (a, b) in x.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} {b} {mean}");
        }
    }
}
