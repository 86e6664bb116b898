//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, DeepSeek-V3.2, GLM-5), computed in
//! the latent space: each position caches only its normalised latent c (`kv_lora_rank`) and
//! its rotated shared key k_pe (`qk_rope_head_dim`), 576 floats for DeepSeek-V3 where
//! expanded K and V would take 128 × 320. With W_UK, W_UV the key and value halves of a
//! head's rows of `kv_b_proj`,
//!
//!   q_nope·k_nope = q_nope·(W_UK c) = (W_UKᵀ q_nope)·c   and   Σ p·v = W_UV (Σ p·c),
//!
//! so a head's query is taken into the latent space once per token ([`Mla::uk`]), scores
//! are dot products with the cached rows [c ‖ k_pe], and the weighted sum of latents leaves
//! through W_UV ([`Mla::uv`]): nothing is expanded per position (DeepSeek's reference code
//! calls this the "absorb" form; transformers expands K and V instead). Decode uses it.
//!
//! A prompt's chunk of many tokens costs less the other way (DeepSeek's reference and
//! llama.cpp switch likewise): K_nope = W_UK c and V = W_UV c for every position, as two
//! products over the latents (a group of heads at a time, nothing kept after the chunk), then
//! causal attention over tiles of 16 queries × 4 keys per head, 192 + 128 multiply-adds per
//! (query, head, position) instead of 576 + 512. [`Mla::expands`] picks the cheaper form.
//!
//! With a lightning indexer (DSA), each query attends only to the `topk` positions the
//! indexer scores highest: Σ_h w_h·ReLU(q_h·k_s)/√d over its own small heads, w from
//! `weights_proj`. While a query sees at most `topk` positions it attends to all of them, and
//! the scores are not computed.

use super::norm::RmsNorm;
use super::rope::Rope;
use crate::config::IndexerSpec;
use crate::scratch;
use crate::tensor::{Mat, MatRef, Precision, Product, WKind, products, products_rows};
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
    /// W_UK of every head, `[heads · nope, kv_lora]` (the key rows of `kv_b_proj`): a head's
    /// query into the latent space, or the latents out to K_nope.
    pub uk: Mat,
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

/// Builds [`Mla::uk`] and [`Mla::uv`] from `kv_b_proj` (`[heads · (nope + v), kv_lora]`, each
/// head's key rows then its value rows): f32 when it is stored in f32 or f16, bf16 otherwise —
/// the same values for bf16, and for a quantized `kv_b_proj` (`--dense q4`/`q8`) half the
/// memory of f32 (DeepSeek-V3: 2.0 GB instead of 4.1 over 61 layers) at a rounding far below
/// the quantization's own.
pub fn split_kv_b(kv_b: &Mat, heads: usize, nope: usize, v: usize) -> (Mat, Mat) {
    let kvl = kv_b.cols;
    let w = kv_b.view();
    let (mut uk, mut uv) = (vec![0f32; heads * nope * kvl], vec![0f32; heads * v * kvl]);
    for h in 0..heads {
        let base = h * (nope + v);
        for i in 0..nope {
            w.row_f32(base + i, &mut uk[(h * nope + i) * kvl..(h * nope + i + 1) * kvl]);
        }
        for i in 0..v {
            w.row_f32(base + nope + i, &mut uv[(h * v + i) * kvl..(h * v + i + 1) * kvl]);
        }
    }
    let to = |rows: usize, cols: usize, d: Vec<f32>| {
        let m = Mat::from_f32(rows, cols, d).expect("sizes match");
        if matches!(kv_b.kind, WKind::F32 | WKind::F16) { m } else { m.to_kind(WKind::BF16) }
    };
    (to(heads * nope, kvl, uk), to(heads * v, kvl, uv))
}

/// [`split_kv_b`] from llama.cpp's split halves: `k_b` (`[heads · kv_lora, nope]`, each head's
/// W_UK transposed) and `v_b` (`[heads · v, kv_lora]`, W_UV), in f32 or bf16 as there.
pub fn join_kv_b(k_b: &Mat, v_b: &Mat, heads: usize) -> (Mat, Mat) {
    let (kvl, nope) = (k_b.rows / heads, k_b.cols);
    let kt = k_b.to_f32();
    let mut uk = vec![0f32; heads * nope * kvl];
    for h in 0..heads {
        for c in 0..kvl {
            for i in 0..nope {
                uk[(h * nope + i) * kvl + c] = kt[(h * kvl + c) * nope + i];
            }
        }
    }
    let keep = |m: Mat, kind: WKind| if matches!(kind, WKind::F32 | WKind::F16) { m } else { m.to_kind(WKind::BF16) };
    let uk = keep(Mat::from_f32(heads * nope, kvl, uk).expect("sizes match"), k_b.kind);
    let uv = keep(Mat::from_f32(v_b.rows, v_b.cols, v_b.to_f32()).expect("sizes match"), v_b.kind);
    (uk, uv)
}

/// Rows `r0..r0 + n` of an f32 or bf16 matrix (a group of heads' rows of W_UK or W_UV).
fn rows_of<'a>(w: &MatRef<'a>, r0: usize, n: usize) -> MatRef<'a> {
    let b = w.cols * w.kind.size();
    MatRef { rows: n, cols: w.cols, kind: w.kind, data: &w.data[r0 * b..(r0 + n) * b] }
}

/// `out += a · row r` of an f32 or bf16 matrix.
#[inline]
fn row_axpy(w: &MatRef<'_>, r: usize, a: f32, out: &mut [f32]) {
    let c = w.cols;
    match w.kind {
        WKind::F32 => crate::kernels::axpy(a, &bytemuck::cast_slice::<u8, f32>(w.data)[r * c..(r + 1) * c], out),
        WKind::BF16 => crate::kernels::axpy_bf16(a, &bytemuck::cast_slice::<u8, u16>(w.data)[r * c..(r + 1) * c], out),
        _ => unreachable!("split_kv_b makes f32 or bf16"),
    }
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
/// The step profile books a step to the caller's line.
#[track_caller]
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
        q + self.kv_a.bytes() + self.uk.bytes() + self.uv.bytes() + self.o_proj.bytes() + ix
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
        self.forward_as(x, n, pos0, cache, sel, out, p, Form::Cheaper)
    }

    /// [`Mla::forward`] in the given form.
    #[allow(clippy::too_many_arguments)]
    fn forward_as(
        &self,
        x: &[f32],
        n: usize,
        pos0: usize,
        cache: &mut LatentCache,
        sel: &mut Selection,
        out: &mut [f32],
        p: Precision,
        form: Form,
    ) {
        let mut pr = self.project(x, n, p, false);
        let mut o = scratch::dirty(n * self.num_heads * self.v_dim);
        self.attend(&mut pr.slices(0, n), n, pos0, cache, sel, &mut o, p, form);
        self.o_proj.matmul(&o, n, out, p);
    }

    /// One decode step of each of several sequences (a batch, [`crate::model::Model::forward_batch`]):
    /// row `t` of `x` is a token at `pos[t]` of the sequence whose latent cache is `caches[t]`
    /// (and whose indexer selection is `sels[t]`). Every projection runs over all the rows at
    /// once, each weight row read once for all ([`products_rows`]); attention runs on each
    /// sequence's own cache. Every row's output is bit for bit what [`Mla::forward`] of that
    /// token alone gives it.
    pub fn decode_rows(
        &self,
        x: &[f32],
        pos: &[usize],
        caches: &mut [&mut LatentCache],
        sels: &mut [&mut Selection],
        out: &mut [f32],
        p: Precision,
    ) {
        let m = pos.len();
        assert!(caches.len() == m && sels.len() == m && out.len() == m * self.o_proj.rows);
        let mut pr = self.project(x, m, p, true);
        let (nh, qd, lw, kvl, vd) =
            (self.num_heads, self.nope + self.rope_dim, self.kv_lora + self.rope_dim, self.kv_lora, self.v_dim);
        // every row is written by its attention
        let mut o = scratch::dirty(m * nh * vd);
        if m == 1 {
            self.attend(&mut pr.slices(0, 1), 1, pos[0], caches[0], sels[0], &mut o, p, Form::Cheaper);
            return products_rows(&mut [Product { w: self.o_proj.view(), x: &o, y: out }], p);
        }
        // one token of a sequence always attends in the latent space (`expands` is false)
        for (t, (cache, sel)) in caches.iter_mut().zip(sels.iter_mut()).enumerate() {
            self.prepare(&mut pr.slices(t, 1), 1, pos[t], cache, sel);
        }
        // W_UK's and W_UV's rows are read once for all the sequences (per head, [h][t][..]),
        // then the outputs turned token-major
        let mut qh = scratch::zeros(nh * m * lw);
        each_chunk(true, &mut qh, m * lw, |h, out| {
            let qs: SmallVec<[&[f32]; 8]> = (0..m).map(|t| &pr.q[(t * nh + h) * qd..(t * nh + h + 1) * qd]).collect();
            self.absorb(h, &qs, &mut out.chunks_exact_mut(lw).collect::<SmallVec<[_; 8]>>());
        });
        let mut qc = scratch::dirty(m * nh * lw);
        each_chunk(true, &mut qc, lw, |i, out| {
            let (t, h) = (i / nh, i % nh);
            out.copy_from_slice(&qh[(h * m + t) * lw..(h * m + t + 1) * lw]);
        });
        let parts: SmallVec<[(scratch::Buf, Split); 8]> = (0..m)
            .map(|t| {
                let chosen = |u: usize| sels[t].rows.get(u).and_then(Option::as_deref);
                self.latent_parts(&qc[t * nh * lw..(t + 1) * nh * lw], 1, pos[t], caches[t], &chosen, true)
            })
            .collect();
        let mut l = scratch::zeros(nh * m * kvl);
        each_chunk(true, &mut l, kvl, |i, li| {
            let (h, t) = (i / m, i % m);
            merge(&parts[t].0, parts[t].1, 0, h, li);
        });
        let mut oh = scratch::dirty(nh * m * vd);
        each_chunk(true, &mut oh, m * vd, |h, out| {
            let ls: SmallVec<[&[f32]; 8]> = l[h * m * kvl..(h + 1) * m * kvl].chunks_exact(kvl).collect();
            self.out_of_latent(h, &ls, &mut out.chunks_exact_mut(vd).collect::<SmallVec<[_; 8]>>());
        });
        each_chunk(true, &mut o, vd, |i, out| {
            let (t, h) = (i / nh, i % nh);
            out.copy_from_slice(&oh[(h * m + t) * vd..(h * m + t + 1) * vd]);
        });
        products_rows(&mut [Product { w: self.o_proj.view(), x: &o, y: out }], p);
    }

    /// Step 1, the projections of `n` tokens: q (through the q-LoRA latent), the latent row,
    /// the indexer's inputs. `rows`: the tokens are each one decode step of its own sequence,
    /// computed as one-token products over all of them ([`products_rows`]).
    fn project(&self, x: &[f32], n: usize, p: Precision, rows: bool) -> Projected {
        let (nh, nope, rd, kvl) = (self.num_heads, self.nope, self.rope_dim, self.kv_lora);
        let (qd, lw) = (nope + rd, kvl + rd);
        let run = |jobs: &mut [Product<'_>]| if rows { products_rows(jobs, p) } else { products(jobs, n, p) };
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
                run(&mut jobs);
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
                    run(&mut jobs);
                }
                // each row on its own
                norm.apply(&mut qa);
                let mut jobs: Jobs<'_> = smallvec![Product { w: b.view(), x: &qa, y: &mut q }];
                if let Some(i) = ix {
                    jobs.push(Product { w: i.wq_b.view(), x: &qa, y: &mut iq });
                }
                run(&mut jobs);
            }
        }
        Projected { q, lat, ik, iw, iq, n }
    }

    /// Steps 2-6 for `n` tokens at `pos0..` of one sequence from their projections: the
    /// attention's output `o`, `[n, heads · v_dim]`, before the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        pr: &mut ProjectedRows<'_>,
        n: usize,
        pos0: usize,
        cache: &mut LatentCache,
        sel: &mut Selection,
        o: &mut [f32],
        p: Precision,
        form: Form,
    ) {
        let (nh, qd, lw, kvl) = (self.num_heads, self.nope + self.rope_dim, self.kv_lora + self.rope_dim, self.kv_lora);
        let decode = n == 1;
        self.prepare(pr, n, pos0, cache, sel);
        let q = &*pr.q;
        let chosen = |t: usize| sel.rows.get(t).and_then(Option::as_deref);
        let seen: usize = (0..n).map(|t| chosen(t).map_or(pos0 + t + 1, <[u32]>::len)).sum();
        let group_bytes = match form {
            Form::Cheaper if self.expands(n, pos0, seen) => Some(EXPAND_BYTES),
            Form::Expanded { group_bytes } => Some(group_bytes),
            _ => None,
        };
        if let Some(group_bytes) = group_bytes {
            o.fill(0.0);
            return self.attend_expanded(q, n, pos0, cache, &chosen, o, group_bytes, p);
        }
        // 4. each head's query in the latent space: [W_UKᵀ q_nope ‖ q_pe]·scale
        let mut qc = scratch::zeros(n * nh * lw);
        each_chunk(decode, &mut qc, lw, |i, out| self.absorb(i % nh, &[&q[i * qd..(i + 1) * qd]], &mut [out]));
        let (partial, split) = self.latent_parts(&qc, n, pos0, cache, &chosen, decode);
        // 6. per head: merge its parts, then out of the latent space through W_UV; then the
        //    output projection
        let vd = self.v_dim;
        each_chunk(decode, o, vd, |i, oh| {
            let (t, h) = (i / nh, i % nh);
            let mut l = scratch::zeros(kvl);
            merge(&partial, split, t, h, &mut l);
            self.out_of_latent(h, &[&l], &mut [oh]);
        });
    }

    /// Steps 2-3 of attention over `n` new tokens: the latents and the shared key normalised
    /// and rotated (the queries' rope parts too) and appended to the cache; the indexer's
    /// choice of positions per token, or the shared one kept.
    fn prepare(&self, pr: &mut ProjectedRows<'_>, n: usize, pos0: usize, cache: &mut LatentCache, sel: &mut Selection) {
        let (nh, nope, rd, kvl) = (self.num_heads, self.nope, self.rope_dim, self.kv_lora);
        let (qd, lw) = (nope + rd, kvl + rd);
        let decode = n == 1;
        let ix = self.indexer.as_ref();
        let (ihd, ihn) = ix.map_or((0, 0), |i| (i.spec.head_dim, i.spec.heads));
        let ProjectedRows { q, lat, ik, iw, iq } = pr;
        let (q, lat, ik, iw, iq) = (&mut **q, &mut **lat, &mut **ik, &**iw, &mut **iq);
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
            crate::scratch::reserve_touched(c, new.len(), 256 * row);
            c.extend_from_slice(new);
        }

        // 3. the indexer's choice of positions per token, or the shared one
        if let Some(i) = ix {
            let one = |t: usize| i.select(&iq[t * ihn * ihd..], &iw[t * ihn..(t + 1) * ihn], pos0 + t, cache, decode);
            sel.rows = if n > 1 { (0..n).into_par_iter().map(one).collect() } else { vec![one(0)] };
        } else if !self.shares_selection {
            sel.rows.clear();
        }
    }

    /// Step 4 for head `h` of several queries (`qs[t]`, `nope + rope` each) into `outs[t]`
    /// (`kv_lora + rope`, zeroed): [W_UKᵀ q_nope ‖ q_pe]·scale. Each row of W_UK is read once
    /// for all the queries, and each output sums in the same order as for one query alone.
    fn absorb(&self, h: usize, qs: &[&[f32]], outs: &mut [&mut [f32]]) {
        let (nope, kvl) = (self.nope, self.kv_lora);
        let uk = self.uk.view();
        for r in 0..nope {
            for (qh, out) in qs.iter().zip(outs.iter_mut()) {
                row_axpy(&uk, h * nope + r, qh[r] * self.scale, &mut out[..kvl]);
            }
        }
        for (qh, out) in qs.iter().zip(outs.iter_mut()) {
            for (o, &v) in out[kvl..].iter_mut().zip(&qh[nope..]) {
                *o = v * self.scale;
            }
        }
    }

    /// Step 6's second half for head `h`: each latent `ls[t]` out through W_UV into `outs[t]`
    /// (`v_dim`), each row of W_UV read once for all.
    fn out_of_latent(&self, h: usize, ls: &[&[f32]], outs: &mut [&mut [f32]]) {
        let (vd, uv) = (self.v_dim, self.uv.view());
        for j in 0..vd {
            for (l, out) in ls.iter().zip(outs.iter_mut()) {
                out[j] = row_dot(&uv, h * vd + j, l);
            }
        }
    }

    /// Step 5 over the `n` tokens' latent-space queries `qc`: the partial softmaxes and
    /// weighted latent sums of every (token, part of the positions, group of heads), for
    /// [`merge`].
    fn latent_parts<'s>(
        &self,
        qc: &[f32],
        n: usize,
        pos0: usize,
        cache: &LatentCache,
        chosen: &(dyn Fn(usize) -> Option<&'s [u32]> + Sync),
        decode: bool,
    ) -> (scratch::Buf, Split) {
        let (nh, kvl, lw) = (self.num_heads, self.kv_lora, self.kv_lora + self.rope_dim);
        // 5. softmax over the cached rows and the weighted sum of latents: one item per (token,
        //    part of the positions, group of heads), the groups of a part next to each other so
        //    the items running at once read the same rows (from L3). An item reads each of its
        //    rows once for all its heads ([`attend_part`]); the parts' partial softmaxes merge
        //    in the next step. Every item writes its whole output: nothing is zeroed between
        //    steps (a large zeroing went to rayon, whose workers then fought the team's
        //    spinning helpers for the cores: docs/PERFORMANCE.md, "MLA decode").
        let (hg, parts) = work_split(n, nh, pos0 + n);
        let groups = nh.div_ceil(hg);
        let per = hg * (kvl + 2);
        let rows = &cache.lat[..];
        let mut partial = scratch::dirty(n * parts * groups * per);
        each_chunk(decode, &mut partial, per, |i, out| {
            let (t, c, g) = (i / (parts * groups), i / groups % parts, i % groups);
            let (h0, h1) = (g * hg, ((g + 1) * hg).min(nh));
            let sel = chosen(t);
            let len = sel.map_or(pos0 + t + 1, <[u32]>::len);
            let (j0, j1) = (c * len / parts, (c + 1) * len / parts);
            let q = &qc[(t * nh + h0) * lw..(t * nh + h1) * lw];
            let (acc, stats) = out.split_at_mut(hg * kvl);
            attend_part(
                q,
                h1 - h0,
                rows,
                lw,
                kvl,
                sel,
                j0..j1,
                &mut acc[..(h1 - h0) * kvl],
                &mut stats[..2 * (h1 - h0)],
            );
        });
        (partial, Split { hg, parts, groups, per })
    }
}

/// How [`Mla::latent_parts`] split its items: heads per group, parts of the positions,
/// groups, floats per item.
#[derive(Clone, Copy)]
struct Split {
    hg: usize,
    parts: usize,
    groups: usize,
    per: usize,
}

/// Step 6's first half: token `t`'s head `h` latent (`l`, zeroed, `kv_lora`) from its parts'
/// partial softmaxes: part c's Σ e^(x − m)·c weighed by its share of the whole.
fn merge(partial: &[f32], split: Split, t: usize, h: usize, l: &mut [f32]) {
    let Split { hg, parts, groups, per } = split;
    let kvl = l.len();
    let part = |c: usize| {
        let at = ((t * parts + c) * groups + h / hg) * per;
        let k = h % hg;
        let st = at + hg * kvl + 2 * k;
        (&partial[at + k * kvl..at + (k + 1) * kvl], partial[st], partial[st + 1])
    };
    let top = (0..parts).map(|c| part(c).1).fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = (0..parts).map(|c| part(c).2 * (part(c).1 - top).exp()).sum();
    for c in 0..parts {
        let (acc, m, z) = part(c);
        if z > 0.0 {
            crate::kernels::axpy((m - top).exp() / total, acc, l);
        }
    }
}

/// The projections of a forward pass's tokens ([`Mla::project`]).
struct Projected {
    q: scratch::Buf,
    lat: scratch::Buf,
    ik: scratch::Buf,
    iw: scratch::Buf,
    iq: scratch::Buf,
    n: usize,
}

/// Tokens `t0..t0 + n` of a [`Projected`].
struct ProjectedRows<'a> {
    q: &'a mut [f32],
    lat: &'a mut [f32],
    ik: &'a mut [f32],
    iw: &'a [f32],
    iq: &'a mut [f32],
}

impl Projected {
    fn slices(&mut self, t0: usize, n: usize) -> ProjectedRows<'_> {
        let part = |len: usize| (t0 * len / self.n, (t0 + n) * len / self.n);
        let at = |len: usize| {
            let (a, b) = part(len);
            a..b
        };
        let (q, lat, ik, iw, iq) =
            (at(self.q.len()), at(self.lat.len()), at(self.ik.len()), at(self.iw.len()), at(self.iq.len()));
        ProjectedRows {
            q: &mut self.q[q],
            lat: &mut self.lat[lat],
            ik: &mut self.ik[ik],
            iw: &self.iw[iw],
            iq: &mut self.iq[iq],
        }
    }
}

/// How a forward pass attends.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// The one [`Mla::expands`] picks.
    Cheaper,
    /// In the latent space.
    #[cfg_attr(not(test), allow(dead_code))]
    Absorbed,
    /// Expanded, a group of heads' keys and values taking about `group_bytes`.
    #[cfg_attr(not(test), allow(dead_code))]
    Expanded { group_bytes: usize },
}

/// Queries per tile of the expanded form.
const QT: usize = 16;
/// Keys per block of a tile's weighted value sums (their rows stay in L2 for the tile).
const KB: usize = 256;
/// About the most bytes of one head group's expanded keys and values.
const EXPAND_BYTES: usize = 64 << 20;

impl Mla {
    /// Whether the expanded form costs fewer multiply-adds for `n` tokens after `pos0` whose
    /// queries attend to `seen` positions in all: it takes every one of the `pos0 + n`
    /// latents out to K_nope and V (kv_lora × (nope + v) per head) and then pays
    /// nope + rope + v per (query, head, position); the latent space takes each query in and
    /// out instead (the same per head), then pays 2·kv_lora + rope. Decode stays absorbed.
    pub fn expands(&self, n: usize, pos0: usize, seen: usize) -> bool {
        let (kvl, nope, rd, vd) = (self.kv_lora, self.nope, self.rope_dim, self.v_dim);
        let per_pos = kvl * (nope + vd);
        let expanded = (pos0 + n) * per_pos + seen * (nope + rd + vd);
        let absorbed = n * per_pos + seen * (2 * kvl + rd);
        n > 1 && expanded < absorbed
    }

    /// `o` (`[n][heads][v]`) = attention of the rotated queries `q` over the `pos0 + n`
    /// positions in `cache`, with K and V expanded from the latents for a group of heads at a
    /// time (as many as fit `group_bytes`: the shape alone decides). Each (head, tile of [`QT`]
    /// queries) is one work item; queries with a selection attend to its positions alone.
    #[allow(clippy::too_many_arguments)]
    fn attend_expanded<'s>(
        &self,
        q: &[f32],
        n: usize,
        pos0: usize,
        cache: &LatentCache,
        chosen: &(dyn Fn(usize) -> Option<&'s [u32]> + Sync),
        o: &mut [f32],
        group_bytes: usize,
        p: Precision,
    ) {
        let (nh, nope, rd, kvl, vd) = (self.num_heads, self.nope, self.rope_dim, self.kv_lora, self.v_dim);
        let (qd, lw, len) = (nope + rd, kvl + rd, pos0 + n);
        // the latents alone, the products' input
        let mut c = scratch::dirty(len * kvl);
        for (s, row) in c.chunks_exact_mut(kvl).enumerate() {
            row.copy_from_slice(&cache.lat[s * lw..s * lw + kvl]);
        }
        let most = (group_bytes / (len * (nope + qd + 2 * vd) * 4).max(1)).clamp(1, nh);
        // groups of about equal size
        let hg = nh.div_ceil(nh.div_ceil(most));
        let tiles = n.div_ceil(QT);
        let (uk, uv) = (self.uk.view(), self.uv.view());
        for h0 in (0..nh).step_by(hg) {
            let g = hg.min(nh - h0);
            let (mut kn, mut vn) = (scratch::dirty(len * g * nope), scratch::dirty(len * g * vd));
            rows_of(&uk, h0 * nope, g * nope).matmul(&c, len, &mut kn, p);
            rows_of(&uv, h0 * vd, g * vd).matmul(&c, len, &mut vn, p);
            // head-major, a head's key rows [k_nope ‖ the shared rope key] and value rows
            let (mut ke, mut ve) = (scratch::dirty(g * len * qd), scratch::dirty(g * len * vd));
            each_chunk(false, &mut ke, len * qd, |j, kh| {
                for (s, k) in kh.chunks_exact_mut(qd).enumerate() {
                    k[..nope].copy_from_slice(&kn[(s * g + j) * nope..(s * g + j + 1) * nope]);
                    k[nope..].copy_from_slice(&cache.lat[s * lw + kvl..(s + 1) * lw]);
                }
            });
            each_chunk(false, &mut ve, len * vd, |j, vh| {
                for (s, v) in vh.chunks_exact_mut(vd).enumerate() {
                    v.copy_from_slice(&vn[(s * g + j) * vd..(s * g + j + 1) * vd]);
                }
            });
            drop((kn, vn));
            // [head][tile][QT][v]: one item's rows contiguous
            let mut og = scratch::dirty(g * tiles * QT * vd);
            each_chunk(false, &mut og, QT * vd, |i, out| {
                let (j, b) = (i / tiles, i % tiles);
                let (t0, t1) = (b * QT, ((b + 1) * QT).min(n));
                let qh = |t: usize| &q[(t * nh + h0 + j) * qd..(t * nh + h0 + j + 1) * qd];
                let (kh, vh) = (&ke[j * len * qd..(j + 1) * len * qd], &ve[j * len * vd..(j + 1) * len * vd]);
                self.tile(&qh, kh, vh, t0, t1, pos0, chosen, out);
            });
            each_chunk(false, o, nh * vd, |t, ot| {
                let (b, r) = (t / QT, t % QT);
                for j in 0..g {
                    let at = ((j * tiles + b) * QT + r) * vd;
                    ot[(h0 + j) * vd..(h0 + j + 1) * vd].copy_from_slice(&og[at..at + vd]);
                }
            });
        }
    }

    /// One head's outputs for queries `t0..t1` (rows of `out`, `QT × v`) over its expanded
    /// keys `kh` (`[pos][nope + rope]`) and values `vh` (`[pos][v]`). The queries without a
    /// selection (a prefix: a selection starts once a query sees more than the budget) go by
    /// tiles: scores 4 queries × 4 keys at a time, each row's softmax, then the value sums 4
    /// queries at a time over blocks of [`KB`] keys. A short tile repeats its last query or
    /// key and drops the repeats, so a score never depends on the tile it is in.
    #[allow(clippy::too_many_arguments)]
    fn tile<'q, 's>(
        &self,
        qh: &(dyn Fn(usize) -> &'q [f32] + Sync),
        kh: &[f32],
        vh: &[f32],
        t0: usize,
        t1: usize,
        pos0: usize,
        chosen: &(dyn Fn(usize) -> Option<&'s [u32]> + Sync),
        out: &mut [f32],
    ) {
        let (qd, vd) = (self.nope + self.rope_dim, self.v_dim);
        out.iter_mut().for_each(|v| *v = 0.0);
        let dense = (t0..t1).find(|&t| chosen(t).is_some()).unwrap_or(t1) - t0;
        if dense > 0 {
            // query i sees positions 0..ends(i)
            let ends = |i: usize| pos0 + t0 + i.min(dense - 1) + 1;
            let width = ends(dense - 1);
            let mut w = scratch::zeros(dense.next_multiple_of(4) * width);
            let key = |s: usize| &kh[s.min(width - 1) * qd..(s.min(width - 1) + 1) * qd];
            for k0 in (0..width).step_by(4) {
                let ks = [key(k0), key(k0 + 1), key(k0 + 2), key(k0 + 3)];
                for i0 in (0..dense).step_by(4) {
                    if k0 >= ends(i0 + 3) {
                        continue;
                    }
                    let qs = [
                        qh(t0 + i0),
                        qh(t0 + (i0 + 1).min(dense - 1)),
                        qh(t0 + (i0 + 2).min(dense - 1)),
                        qh(t0 + (i0 + 3).min(dense - 1)),
                    ];
                    let d = crate::kernels::dot4x4(ks, qs);
                    for (r, dr) in d.iter().enumerate() {
                        for (i, &v) in dr.iter().enumerate() {
                            if i0 + i < dense && k0 + r < ends(i0 + i) {
                                w[(i0 + i) * width + k0 + r] = v * self.scale;
                            }
                        }
                    }
                }
            }
            for i in 0..dense {
                crate::kernels::softmax(&mut w[i * width..i * width + ends(i)]);
            }
            for i0 in (0..dense).step_by(4) {
                let row = |i: usize| &w[(i0 + i).min(dense - 1) * width..];
                for k0 in (0..ends(i0 + 3)).step_by(KB) {
                    let k1 = (k0 + KB).min(ends(i0 + 3));
                    let ps = [&row(0)[k0..k1], &row(1)[k0..k1], &row(2)[k0..k1], &row(3)[k0..k1]];
                    crate::kernels::axpy4_rows(ps, &vh[k0 * vd..], vd, &mut out[i0 * vd..(i0 + 4) * vd]);
                }
            }
        }
        // the rows a repeated query wrote belong to the queries that follow: clear them
        out[dense * vd..].iter_mut().for_each(|v| *v = 0.0);
        for t in t0 + dense..t1 {
            // (a selection starts once a query sees more than the budget: later ones have one)
            let all: Vec<u32>;
            let pos = match chosen(t) {
                Some(pos) => pos,
                None => {
                    all = (0..=(pos0 + t) as u32).collect();
                    &all
                }
            };
            let mut w = scratch::dirty(pos.len());
            for (wi, &s) in w.iter_mut().zip(pos) {
                *wi = crate::kernels::dot(qh(t), &kh[s as usize * qd..(s as usize + 1) * qd]) * self.scale;
            }
            crate::kernels::softmax(&mut w);
            let o = &mut out[(t - t0) * vd..(t - t0 + 1) * vd];
            for (&wi, &s) in w.iter().zip(pos) {
                crate::kernels::axpy(wi, &vh[s as usize * vd..(s as usize + 1) * vd], o);
            }
        }
    }
}

/// Positions per block of [`attend_part`]: its rows (DeepSeek-V3: 128 × 2,304 B) stay in L2
/// between the scores and the weighted sum.
const DB: usize = 128;

/// Latent attention of `heads` queries `q` (`[heads][lw]`, scaled, in the latent space) over
/// positions `j0..j1` of the cached rows (`[pos][lw]`: the latent's `kvl` values, then the
/// rope key), or over those positions of `sel`'s list: `acc[h]` = Σ e^(x − m)·c and
/// `stats[h]` = (m, Σ e^(x − m)), what merging parts needs. Blocks of [`DB`] positions: each
/// block's rows are read once for all the heads, as `[heads × lw]·[lw × DB]` scores
/// ([`kernels::dot_tile`]) and `[heads × DB]·[DB × kvl]` sums ([`kernels::axpy_tile`]), and
/// the blocks merge online (a larger max rescales what came before). A selection's rows are
/// gathered into a block first.
#[allow(clippy::too_many_arguments)]
fn attend_part(
    q: &[f32],
    heads: usize,
    rows: &[f32],
    lw: usize,
    kvl: usize,
    sel: Option<&[u32]>,
    span: std::ops::Range<usize>,
    acc: &mut [f32],
    stats: &mut [f32],
) {
    use crate::kernels;
    acc.iter_mut().for_each(|v| *v = 0.0);
    for st in stats.chunks_exact_mut(2) {
        (st[0], st[1]) = (f32::NEG_INFINITY, 0.0);
    }
    let mut s = scratch::dirty(heads * DB);
    let mut gathered = scratch::dirty(if sel.is_some() { DB * lw } else { 0 });
    for b0 in span.clone().step_by(DB) {
        let nb = (b0 + DB).min(span.end) - b0;
        let block: &[f32] = match sel {
            None => &rows[b0 * lw..(b0 + nb) * lw],
            Some(pos) => {
                for (g, &r) in gathered.chunks_exact_mut(lw).zip(&pos[b0..b0 + nb]) {
                    g.copy_from_slice(&rows[r as usize * lw..(r as usize + 1) * lw]);
                }
                &gathered[..nb * lw]
            }
        };
        let s = &mut s[..heads * nb];
        kernels::dot_tile(q, heads, block, lw, s);
        for ((sh, st), ah) in s.chunks_exact_mut(nb).zip(stats.chunks_exact_mut(2)).zip(acc.chunks_exact_mut(kvl)) {
            // the block's softmax, then weighed against what came before
            let (mb, zb) = kernels::softmax(sh);
            let (m, z) = (st[0], st[1]);
            let top = m.max(mb);
            if top > m && z > 0.0 {
                let f = (m - top).exp();
                ah.iter_mut().for_each(|v| *v *= f);
                st[1] = z * f;
            }
            let f = zb * (mb - top).exp();
            sh.iter_mut().for_each(|v| *v *= f);
            (st[0], st[1]) = (top, st[1] + f);
        }
        kernels::axpy_tile(s, heads, block, lw, acc);
    }
}

/// (heads per work item, parts of the positions) for `n` tokens of `heads` heads seeing up to
/// `seen` positions: groups of up to 16 heads share each part's rows; the positions split
/// (in parts of at least [`DB`]) only when tokens and groups give fewer than 32 items, into
/// at most 64 items in all (DeepSeek-V3's one token: 8 groups × 8 parts from 897 positions,
/// 4 items for each of 16 threads). It depends on the shape alone, never on the thread count,
/// so results do not either.
fn work_split(n: usize, heads: usize, seen: usize) -> (usize, usize) {
    let hg = heads.min(16);
    let items = n * heads.div_ceil(hg);
    let parts = if items >= 32 { 1 } else { seen.div_ceil(DB).clamp(1, (64 / items).max(1)) };
    (hg, parts)
}

impl Indexer {
    /// The positions token at `pos` attends to: all (`None`) while it sees at most `topk`,
    /// else the `topk` its score ranks highest, in order; of equal scores the lower positions
    /// (a total order, so any implementation can choose the same: the CUDA backend's does).
    /// `q`: its rotated queries (heads × head_dim), `w`: its weights (one per head).
    /// Scores are computed in blocks of 256 positions (`decode`: on the decode team).
    pub fn select(&self, q: &[f32], w: &[f32], pos: usize, cache: &LatentCache, decode: bool) -> Option<Vec<u32>> {
        let k = self.spec.topk;
        let seen = pos + 1;
        if seen <= k {
            return None;
        }
        // whole blocks (the decode team's chunks tile the buffer), the last one cut to `seen`
        let mut score = vec![0f32; seen.next_multiple_of(256)];
        each_chunk(decode, &mut score, 256, |b, out| {
            let len = (seen - b * 256).min(256);
            self.scores(q, w, &cache.index_k, b * 256, &mut out[..len]);
        });
        score.truncate(seen);
        let mut idx: Vec<u32> = (0..seen as u32).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| score[b as usize].total_cmp(&score[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_unstable();
        Some(idx)
    }
}

impl Indexer {
    /// `out[j]` = the score of position `s0 + j` (`s0` a multiple of 4) for one query (`q`:
    /// heads × head_dim, `w`: a weight per head): Σ_h w_h/√heads · ReLU(q_h·k/√head_dim), the
    /// heads in order. Dots go 4 heads × 4 positions at a time; a short tile repeats its last
    /// head or position and drops the repeats, so a score never depends on the block it is in.
    pub fn scores(&self, q: &[f32], w: &[f32], keys: &[f32], s0: usize, out: &mut [f32]) {
        let (hn, hd) = (self.spec.heads, self.spec.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let wscale = 1.0 / (hn as f32).sqrt();
        let last = s0 + out.len() - 1;
        let key = |s: usize| &keys[s.min(last) * hd..(s.min(last) + 1) * hd];
        let head = |h: usize| &q[h.min(hn - 1) * hd..(h.min(hn - 1) + 1) * hd];
        out.iter_mut().for_each(|v| *v = 0.0);
        for (j0, o) in (0..out.len()).step_by(4).zip(out.chunks_mut(4)) {
            let s = s0 + j0;
            let ks = [key(s), key(s + 1), key(s + 2), key(s + 3)];
            for h0 in (0..hn).step_by(4) {
                let d = crate::kernels::dot4x4([head(h0), head(h0 + 1), head(h0 + 2), head(h0 + 3)], ks);
                for (hi, dh) in d.iter().enumerate().take(hn - h0) {
                    let wh = w[h0 + hi] * wscale;
                    for (oj, &v) in o.iter_mut().zip(dh) {
                        *oj += wh * (v * scale).max(0.0);
                    }
                }
            }
        }
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
        let (uk, uv) = split_kv_b(&kv_b, nh, nope, vd);
        Mla {
            q: QProj::Full(m(nh * (nope + rd), h, seed)),
            kv_a: m(kvl + rd, h, seed + 1),
            kv_norm: RmsNorm::new(uniform(kvl, seed + 2), 1e-6, false),
            uk,
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
        assert_eq!(work_split(1, 20, n), (16, 3));
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
    fn a_part_over_many_blocks_is_the_whole_softmax() {
        // 5 heads (a short head tile), odd widths, spans across several blocks with tails,
        // every position and a selection
        let (heads, kvl, rd) = (5, 37, 9);
        let lw = kvl + rd;
        let seen = 3 * DB + 45;
        let rows = uniform(seen * lw, 1);
        let q: Vec<f32> = uniform(heads * lw, 2).iter().map(|v| 6.0 * v).collect();
        let pick: Vec<u32> = (0..seen as u32).filter(|s| s % 3 != 1).collect();
        for (sel, span) in [(None, 0..seen), (None, 7..2 * DB + 3), (None, 5..6), (Some(&pick[..]), 3..pick.len())] {
            let (mut acc, mut stats) = (vec![f32::NAN; heads * kvl], vec![f32::NAN; 2 * heads]);
            attend_part(&q, heads, &rows, lw, kvl, sel, span.clone(), &mut acc, &mut stats);
            for h in 0..heads {
                let pos: Vec<usize> = span.clone().map(|j| sel.map_or(j, |p| p[j] as usize)).collect();
                let x: Vec<f64> = pos
                    .iter()
                    .map(|&s| (0..lw).map(|i| q[h * lw + i] as f64 * rows[s * lw + i] as f64).sum())
                    .collect();
                let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
                assert!((stats[2 * h] as f64 - m).abs() < 1e-5, "max of head {h}");
                assert!((stats[2 * h + 1] as f64 - z).abs() < 1e-5 * z, "sum of head {h}");
                for c in 0..kvl {
                    let want: f64 = pos.iter().zip(&x).map(|(&s, v)| (v - m).exp() * rows[s * lw + c] as f64).sum();
                    let got = acc[h * kvl + c] as f64;
                    assert!((got - want).abs() < 1e-5 * z, "head {h} column {c}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn long_context_decode_is_the_same_on_any_thread_count() {
        // 20 heads (two groups), 600 positions (5 parts): one token's outputs, bit for bit
        let l = layer_of(20, true, 13);
        let n = 600;
        let x = uniform(n * 24, 14);
        let mut c = LatentCache::default();
        let mut out = vec![0f32; (n - 1) * 24];
        l.forward(&x[..(n - 1) * 24], n - 1, 0, &mut c, &mut Selection::default(), &mut out, Precision::Exact);
        let decode = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let _h = crate::par::hold();
                let (mut c, mut step) = (c.clone(), vec![0f32; 24]);
                l.forward(&x[(n - 1) * 24..], 1, n - 1, &mut c, &mut Selection::default(), &mut step, Precision::Exact);
                step
            })
        };
        let one = decode(1);
        assert!(one.iter().all(|v| v.is_finite()));
        for threads in [2, 5, 32] {
            assert_eq!(decode(threads), one, "{threads} threads");
        }
    }

    #[test]
    fn long_context_decode_gives_sixteen_threads_items_and_no_large_zeroing() {
        // DeepSeek-V3 (128 heads, 576-float rows) decoding one token after 1k-160k positions
        let (heads, kvl) = (128, 512);
        for seen in [1024, 2048, 8192, 163_840] {
            let (hg, parts) = work_split(1, heads, seen);
            let items = heads.div_ceil(hg) * parts;
            assert!(items >= 4 * 16, "{seen} positions: {items} items for 16 threads");
            // the partial softmaxes stay a pooled buffer, written in full (never zeroed)
            let floats = items * hg * (kvl + 2);
            assert!(floats <= scratch::MAX_ELEMS, "{seen} positions: {floats} floats of partials");
        }
        // a short context stays whole: its rows are few
        assert_eq!(work_split(1, heads, 100), (16, 1));
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
        assert_eq!(ix.select(&q, &w, 2, &cache, false), None);
        let got = ix.select(&q, &w, 6, &cache, false).unwrap();
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

    /// Prefill in `chunks` (token counts) through one cache, in `form`, against [`naive`].
    fn chunked(l: &Mla, kv_b: &[f32], x: &[f32], chunks: &[usize], form: Form, keep: &dyn Fn(usize, usize) -> bool) {
        let h = x.len() / chunks.iter().sum::<usize>();
        let n: usize = chunks.iter().sum();
        let want = naive(l, kv_b, x, n, keep);
        let mut c = LatentCache::default();
        let mut pos0 = 0;
        for &m in chunks {
            let rows = (pos0..pos0 + m)
                .map(|t| {
                    let all = (0..=t).all(|s| keep(t, s));
                    (!all).then(|| (0..=t as u32).filter(|&s| keep(t, s as usize)).collect())
                })
                .collect();
            let mut sel = Selection { rows };
            let mut out = vec![0f32; m * h];
            l.forward_as(&x[pos0 * h..(pos0 + m) * h], m, pos0, &mut c, &mut sel, &mut out, Precision::Exact, form);
            close(&out, &want[pos0 * h..(pos0 + m) * h], 1e-5);
            pos0 += m;
        }
    }

    #[test]
    fn expanded_prefill_matches_the_naive_form_on_odd_shapes() {
        // tiles of 16 queries and 4 keys with tails, a cache before the chunk, one token
        let all = |_: usize, _: usize| true;
        for interleaved in [false, true] {
            let l = layer_of(5, interleaved, 21);
            let kv_b = uniform(5 * (l.nope + l.v_dim) * l.kv_lora, 21 + 3);
            let x = uniform(70 * 24, 31);
            for chunks in [&[1][..], &[2], &[5], &[17], &[37], &[13, 24], &[3, 1, 1, 30], &[70]] {
                let n: usize = chunks.iter().sum();
                for form in [Form::Expanded { group_bytes: EXPAND_BYTES }, Form::Absorbed, Form::Cheaper] {
                    chunked(&l, &kv_b, &x[..n * 24], chunks, form, &all);
                }
                // groups of 2 heads (and a last one of 1)
                let g2 = 2 * (n * (l.nope + l.nope + l.rope_dim + 2 * l.v_dim) * 4);
                chunked(&l, &kv_b, &x[..n * 24], chunks, Form::Expanded { group_bytes: g2 }, &all);
            }
        }
    }

    #[test]
    fn expanded_prefill_attends_to_a_selection_exactly() {
        // the first 6 positions see everything (within the budget), later ones a selection
        let keep = |t: usize, s: usize| t < 6 || s % 3 == 1 || s == t || s + 2 == t;
        let l = Mla { shares_selection: true, ..layer_of(3, true, 41) };
        let kv_b = uniform(3 * (l.nope + l.v_dim) * l.kv_lora, 41 + 3);
        let x = uniform(40 * 24, 43);
        for chunks in [&[40][..], &[4, 19, 17], &[7, 1, 32]] {
            for form in [Form::Expanded { group_bytes: 1 }, Form::Absorbed] {
                chunked(&l, &kv_b, &x, chunks, form, &keep);
            }
        }
    }

    #[test]
    fn the_cost_model_expands_prompts_and_keeps_decode_absorbed() {
        // DeepSeek-V3's sizes
        let l = Mla { kv_lora: 512, nope: 128, rope_dim: 64, v_dim: 128, ..layer(true, 1) };
        let causal = |n: usize, pos0: usize| n * pos0 + n * (n + 1) / 2;
        assert!(l.expands(512, 0, causal(512, 0)));
        assert!(l.expands(2048, 6144, causal(2048, 6144)));
        assert!(!l.expands(1, 0, 1) && !l.expands(1, 5000, 5001));
        // a few tokens after a long context: expanding every position costs more
        assert!(!l.expands(4, 8000, causal(4, 8000)));
    }

    #[test]
    fn tied_index_scores_keep_the_lower_positions() {
        // keys repeated in runs of 3 (equal scores), and keys opposite to every query (score 0
        // after the ReLU): the budget's boundary falls inside a run and inside the zeros
        let (hn, hd) = (3, 5);
        let q: Vec<f32> = uniform(hn * hd, 8).iter().map(|v| v.abs() + 0.1).collect();
        let w = vec![0.9, 0.4, 1.3];
        let base = uniform(40 * hd, 9);
        let mut keys = vec![];
        for s in 0..60 {
            let k: Vec<f32> = if s % 2 == 0 {
                base[(s / 6) * hd..(s / 6 + 1) * hd].iter().map(|v| v.abs() + 0.05).collect()
            } else {
                vec![-1.0; hd]
            };
            keys.extend(k);
        }
        let cache = LatentCache { lat: vec![], index_k: keys };
        for topk in [1, 2, 4, 7, 29, 30, 31, 45] {
            let ix = Indexer {
                wq_b: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
                wk: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
                k_norm: (vec![], vec![]),
                weights: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
                spec: IndexerSpec { heads: hn, head_dim: hd, topk, interleaved: false, own: vec![true] },
            };
            let mut score = vec![0f32; 60];
            ix.scores(&q, &w, &cache.index_k, 0, &mut score);
            let mut want: Vec<u32> = (0..60).collect();
            want.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]).then(a.cmp(&b)));
            want.truncate(topk);
            want.sort();
            assert_eq!(ix.select(&q, &w, 59, &cache, false).unwrap(), want, "budget {topk}");
        }
    }

    #[test]
    fn indexer_scores_do_not_depend_on_their_block_and_match_the_reference() {
        // 5 heads (a short head tile), 301 positions (short position tiles, two blocks)
        let (hn, hd, seen) = (5, 12, 301);
        let ix = Indexer {
            wq_b: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            wk: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            k_norm: (vec![], vec![]),
            weights: Mat::from_f32(1, 1, vec![0.0]).unwrap(),
            spec: IndexerSpec { heads: hn, head_dim: hd, topk: 40, interleaved: false, own: vec![true] },
        };
        let keys = uniform(seen * hd, 5);
        let (q, w) = (uniform(hn * hd, 6), uniform(hn, 7));
        let mut whole = vec![0f32; seen];
        ix.scores(&q, &w, &keys, 0, &mut whole);
        for (s0, len) in [(4, 9), (256, 45), (300, 1), (296, 5)] {
            let mut part = vec![0f32; len];
            ix.scores(&q, &w, &keys, s0, &mut part);
            assert_eq!(part, whole[s0..s0 + len], "block at {s0}");
        }
        for (s, &got) in whole.iter().enumerate() {
            let want: f64 = (0..hn)
                .map(|h| {
                    let d: f64 = (0..hd).map(|i| q[h * hd + i] as f64 * keys[s * hd + i] as f64).sum();
                    w[h] as f64 / (hn as f64).sqrt() * (d / (hd as f64).sqrt()).max(0.0)
                })
                .sum();
            assert!((got as f64 - want).abs() < 1e-5, "position {s}: {got} vs {want}");
        }
        let cache = LatentCache { lat: vec![], index_k: keys };
        assert_eq!(ix.select(&q, &w, seen - 1, &cache, true), ix.select(&q, &w, seen - 1, &cache, false));
    }

    #[test]
    fn the_latent_space_copies_hold_kv_b_proj_in_any_format() {
        let (nh, nope, vd, kvl) = (3, 5, 4, 32);
        let f = Mat::from_f32(nh * (nope + vd), kvl, uniform(nh * (nope + vd) * kvl, 4)).unwrap();
        let kinds =
            [WKind::F32, WKind::F16, WKind::BF16, WKind::Q { bits: 8, group: 16 }, WKind::Q { bits: 4, group: 32 }];
        for kind in kinds {
            let kv_b = f.to_kind(kind);
            // exactly its values, rounded to bf16 where it is neither f32 nor f16
            let w = match kind {
                WKind::F32 | WKind::F16 => kv_b.to_f32(),
                _ => Mat::from_f32(kv_b.rows, kvl, kv_b.to_f32()).unwrap().to_kind(WKind::BF16).to_f32(),
            };
            let (uk, uv) = split_kv_b(&kv_b, nh, nope, vd);
            assert_eq!(uk.kind, if matches!(kind, WKind::F32 | WKind::F16) { WKind::F32 } else { WKind::BF16 });
            let (uk, uv) = (uk.to_f32(), uv.to_f32());
            for h in 0..nh {
                for i in 0..nope {
                    let r = h * (nope + vd) + i;
                    assert_eq!(
                        &uk[(h * nope + i) * kvl..(h * nope + i + 1) * kvl],
                        &w[r * kvl..(r + 1) * kvl],
                        "{kind:?}"
                    );
                }
                for i in 0..vd {
                    let r = h * (nope + vd) + nope + i;
                    assert_eq!(&uv[(h * vd + i) * kvl..(h * vd + i + 1) * kvl], &w[r * kvl..(r + 1) * kvl]);
                }
            }
        }
    }

    /// llama.cpp's split halves (`k_b` each head's W_UK transposed, `v_b` its W_UV) give what
    /// `kv_b_proj` whole gives, in any format (odd sizes where the format allows).
    #[test]
    fn the_split_halves_give_the_latent_space_copies_of_the_whole() {
        use crate::kernels::ggml::Ggml;
        for (nh, nope, vd, kvl, kind) in [
            (3, 5, 7, 9, WKind::F32),
            (3, 5, 7, 9, WKind::F16),
            (2, 32, 3, 64, WKind::Ggml(Ggml::Q8_0)),
            (1, 32, 32, 32, WKind::BF16),
        ] {
            // the whole with the halves' values, so both hold exactly the same numbers
            let mk = |rows: usize, cols: usize, seed: u64, kind: WKind| match kind {
                WKind::Ggml(t) => {
                    let b = crate::kernels::ggml::tests::random_row(t, rows * cols / t.block(), seed);
                    Mat::from_bytes(rows, cols, kind, crate::tensor::AlignedBytes::from_slice(&b)).unwrap()
                }
                _ => Mat::from_f32(rows, cols, uniform(rows * cols, seed)).unwrap().to_kind(kind),
            };
            let k_b = mk(nh * kvl, nope, 5, kind);
            let v_b = mk(nh * vd, kvl, 6, kind);
            let (kt, vt) = (k_b.to_f32(), v_b.to_f32());
            let mut whole = vec![];
            for h in 0..nh {
                for i in 0..nope {
                    whole.extend((0..kvl).map(|c| kt[(h * kvl + c) * nope + i]));
                }
                whole.extend(&vt[h * vd * kvl..(h + 1) * vd * kvl]);
            }
            let whole = Mat::from_f32(nh * (nope + vd), kvl, whole).unwrap();
            let whole = if matches!(kind, WKind::F16 | WKind::F32) { whole } else { whole.to_kind(WKind::BF16) };
            let (uk, uv) = join_kv_b(&k_b, &v_b, nh);
            let (wk, wv) = split_kv_b(&whole, nh, nope, vd);
            assert_eq!((uk.rows, uk.cols, uv.rows, uv.cols), (nh * nope, kvl, nh * vd, kvl));
            assert_eq!(uk.kind, if matches!(kind, WKind::F32 | WKind::F16) { WKind::F32 } else { WKind::BF16 });
            assert_eq!((uk.to_f32(), uv.to_f32()), (wk.to_f32(), wv.to_f32()), "{kind:?}");
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
