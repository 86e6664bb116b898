//! Softmax attention with GQA, q/k RMSNorm (per head, over the whole projection, or none),
//! optional q/k/v biases, partial RoPE, an optional sliding window and (Qwen3.5 / Qwen3-Next) a
//! per-element sigmoid output gate carried in the second half of each head's q_proj rows.

use super::norm::RmsNorm;
use super::rope::Rope;
use super::sigmoid;
use crate::kernels::KvRows;
use crate::scratch;
use crate::tensor::{Mat, Precision, Product, Staged, products, products_rows_then, products_then};
use rayon::prelude::*;
use smallvec::SmallVec;
use std::sync::atomic::{AtomicUsize, Ordering::AcqRel};

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Mat,
    pub k_proj: Mat,
    pub v_proj: Mat,
    pub o_proj: Mat,
    pub qk_norm: QkNorms,
    /// Biases of q, k and v (GLM-4.5, gpt-oss), added before the norms.
    pub bias: Option<[Vec<f32>; 3]>,
    /// Bias of the output projection (gpt-oss).
    pub o_bias: Option<Vec<f32>>,
    /// A learned logit per head that joins each softmax and is dropped after (gpt-oss).
    pub sinks: Option<Vec<f32>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub gated: bool,
    pub rope: Rope,
    /// Each position attends to at most this many positions, itself included (Mixtral).
    pub window: Option<usize>,
}

/// The q and k norms of an attention layer.
#[derive(Clone, Debug)]
pub enum QkNorms {
    None,
    /// A norm of `head_dim`, applied to each head.
    PerHead {
        q: RmsNorm,
        k: RmsNorm,
    },
    /// A norm over all heads of q (and of k) at once, before RoPE (MiniMax-M2).
    Whole {
        q: RmsNorm,
        k: RmsNorm,
    },
}

/// How a KV cache stores its rows (`--kv-cache`): f32 as computed, or rounded (to nearest,
/// ties to even) to bf16 or f16, halving the bytes each decode token reads back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F32,
    /// f32's exponent range: no overflow; 8 significant bits.
    Bf16,
    /// 11 significant bits, but a value above 65504 becomes ±∞.
    F16,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::Bf16 => "bf16",
            KvType::F16 => "f16",
        }
    }

    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        if self == KvType::F32 { 4 } else { 2 }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<KvType> {
        match s {
            "f32" => Ok(KvType::F32),
            "bf16" => Ok(KvType::Bf16),
            "f16" => Ok(KvType::F16),
            _ => anyhow::bail!("--kv-cache: `{s}` is not a KV cache type (f32, bf16 or f16)"),
        }
    }
}

/// Keys or values of a cache, `[pos][kv_head][head_dim]`, stored as its [`KvType`].
#[derive(Clone, Debug)]
pub enum KvBuf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl Default for KvBuf {
    fn default() -> Self {
        KvBuf::F32(Vec::new())
    }
}

impl KvBuf {
    pub fn new(ty: KvType) -> KvBuf {
        match ty {
            KvType::F32 => KvBuf::F32(Vec::new()),
            KvType::Bf16 => KvBuf::Bf16(Vec::new()),
            KvType::F16 => KvBuf::F16(Vec::new()),
        }
    }

    pub fn ty(&self) -> KvType {
        match self {
            KvBuf::F32(_) => KvType::F32,
            KvBuf::Bf16(_) => KvType::Bf16,
            KvBuf::F16(_) => KvType::F16,
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::Bf16(v) | KvBuf::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn capacity(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.capacity(),
            KvBuf::Bf16(v) | KvBuf::F16(v) => v.capacity(),
        }
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.capacity() * self.ty().bytes()
    }

    /// The rows as the kernels read them.
    pub fn rows(&self) -> KvRows<'_> {
        match self {
            KvBuf::F32(v) => KvRows::F32(v),
            KvBuf::Bf16(v) => KvRows::Bf16(v),
            KvBuf::F16(v) => KvRows::F16(v),
        }
    }

    /// The values widened to f32 (tests, conversions).
    pub fn to_f32(&self) -> Vec<f32> {
        let r = self.rows();
        (0..r.len()).map(|i| r.get(i)).collect()
    }

    /// A buffer of type `ty` holding `x` (rounded to nearest even for a 16-bit type).
    pub fn from_f32(ty: KvType, x: &[f32]) -> KvBuf {
        let mut b = KvBuf::new(ty);
        b.extend(x, 0);
        b
    }

    /// Keeps the first `n` values.
    pub fn truncate(&mut self, n: usize) {
        match self {
            KvBuf::F32(v) => v.truncate(n),
            KvBuf::Bf16(v) | KvBuf::F16(v) => v.truncate(n),
        }
    }

    fn drain_front(&mut self, n: usize) {
        match self {
            KvBuf::F32(v) => drop(v.drain(..n)),
            KvBuf::Bf16(v) | KvBuf::F16(v) => drop(v.drain(..n)),
        }
    }

    fn shrink_to(&mut self, n: usize) {
        match self {
            KvBuf::F32(v) => v.shrink_to(n),
            KvBuf::Bf16(v) | KvBuf::F16(v) => v.shrink_to(n),
        }
    }

    /// Appends `x`, rounded to the buffer's type, growing by at least `ahead` values at a time.
    pub fn extend(&mut self, x: &[f32], ahead: usize) {
        match self {
            KvBuf::F32(v) => {
                scratch::reserve_touched(v, x.len(), ahead);
                v.extend_from_slice(x);
            }
            KvBuf::Bf16(v) | KvBuf::F16(v) => {
                scratch::reserve_touched(v, x.len(), ahead);
                let at = v.len();
                v.resize(at + x.len(), 0);
                if self.ty() == KvType::Bf16 {
                    crate::kernels::kv::round_bf16(x, &mut self.u16_mut()[at..]);
                } else {
                    crate::kernels::kv::round_f16(x, &mut self.u16_mut()[at..]);
                }
            }
        }
    }

    fn u16_mut(&mut self) -> &mut Vec<u16> {
        match self {
            KvBuf::Bf16(v) | KvBuf::F16(v) => v,
            KvBuf::F32(_) => unreachable!("an f32 buffer"),
        }
    }

    /// The buffer as a prompt-cache file stores it.
    pub fn state_buf(&self) -> crate::model::StateBuf<'_> {
        match self {
            KvBuf::F32(v) => crate::model::StateBuf::F32(v),
            KvBuf::Bf16(v) | KvBuf::F16(v) => crate::model::StateBuf::U16(v),
        }
    }

    /// The same, to fill when loading.
    pub fn state_buf_mut(&mut self) -> crate::model::StateBufMut<'_> {
        match self {
            KvBuf::F32(v) => crate::model::StateBufMut::F32(v),
            KvBuf::Bf16(v) | KvBuf::F16(v) => crate::model::StateBufMut::U16(v),
        }
    }
}

/// Keys and values of past positions, `[pos][kv_head][head_dim]`, in the run's [`KvType`]. A
/// sliding-window layer's cache holds only the positions a later token can still see
/// ([`window_rows`]): the first row is position `start`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub k: KvBuf,
    pub v: KvBuf,
    /// The layer's window, if it slides.
    pub window: Option<usize>,
    /// The position of the first row (set by each forward pass from the positions it ends at).
    pub start: usize,
}

/// Rows a sliding-window cache holds after `pos` positions: all of them until it may drop a
/// window's worth, then the `w − 1` the next token needs plus what arrived since. A function
/// of `pos` alone, whatever the chunking, so saved states have one shape; the rows move once
/// per `w` tokens.
pub fn window_rows(pos: usize, w: usize) -> usize {
    let (need, period) = (w.saturating_sub(1), w.max(1));
    if pos < need + period { pos } else { need + (pos - need) % period }
}

impl KvCache {
    /// An empty cache of type `ty`.
    pub fn new(ty: KvType, window: Option<usize>) -> KvCache {
        KvCache { k: KvBuf::new(ty), v: KvBuf::new(ty), window, start: 0 }
    }

    pub fn ty(&self) -> KvType {
        self.k.ty()
    }

    /// Drops what no later token of a sliding layer can see, once positions up to `end` are in.
    fn slide(&mut self, end: usize, row: usize) {
        let Some(w) = self.window else { return };
        let (held, keep) = (self.k.len() / row, window_rows(end, w));
        if held > keep {
            self.k.drain_front((held - keep) * row);
            self.v.drain_front((held - keep) * row);
            // a long prompt's rows are not kept around as capacity
            if self.k.capacity() > 4 * (keep + 256) * row {
                self.k.shrink_to((keep + 256) * row);
                self.v.shrink_to((keep + 256) * row);
            }
        }
        self.start = end - self.k.len() / row;
    }

    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }

    /// Appends `len` zeros each to the keys and values of an f32 cache, to be written in
    /// place, and returns them; `None` for a 16-bit cache (its rows come through [`Self::append`]).
    /// Grows by at least 256 positions of `row` at a time, so short runs never reallocate
    /// mid-decode.
    fn push_f32(&mut self, len: usize, row: usize) -> Option<(&mut [f32], &mut [f32])> {
        let (KvBuf::F32(k), KvBuf::F32(v)) = (&mut self.k, &mut self.v) else { return None };
        scratch::reserve_touched(k, len, 256 * row);
        scratch::reserve_touched(v, len, 256 * row);
        let at = k.len();
        k.resize(at + len, 0.0);
        v.resize(at + len, 0.0);
        Some((&mut k[at..], &mut v[at..]))
    }

    /// Appends rows of keys and values, rounded to the cache's type (growing as
    /// [`Self::push_f32`] does).
    fn append(&mut self, k: &[f32], v: &[f32], row: usize) {
        self.k.extend(k, 256 * row);
        self.v.extend(v, 256 * row);
    }
}

impl Attention {
    /// Attends `n` new tokens at positions `pos0..pos0+n`, appending them to `cache`.
    pub fn forward(&self, x: &[f32], n: usize, pos0: usize, cache: &mut KvCache, out: &mut [f32], p: Precision) {
        if n == 1 {
            return self.decode(x, pos0, cache, out, p);
        }
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

        if let Some([bq, bk, bv]) = &self.bias {
            for (y, b) in [(&mut *q, bq), (&mut *k, bk), (&mut *v, bv)] {
                y.chunks_exact_mut(b.len()).for_each(|r| crate::kernels::axpy(1.0, b, r));
            }
        }
        // q/k norm and RoPE, token by token (in parallel for a prompt)
        let rotate = |(cos, sin): &mut (scratch::Buf, scratch::Buf),
                      (t, (qt, kt)): (usize, (&mut [f32], &mut [f32]))| {
            self.rope.table(pos0 + t, cos.vec(), sin.vec());
            self.whole_norms(qt, kt);
            for head in qt.chunks_exact_mut(qw) {
                let head = &mut head[..d];
                self.head_norm(0, head);
                Rope::apply(head, cos, sin);
            }
            for head in kt.chunks_exact_mut(d) {
                self.head_norm(1, head);
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
        cache.append(&k, &v, nkv * d);
        cache.start = pos0 + n - cache.k.len() / (nkv * d);

        let mut o = scratch::zeros(n * nh * d);
        let heads = self.heads();
        attend(&q, n, pos0, cache, &mut o, heads, context_parts(n, nkv, pos0, heads.window));
        self.o_proj.matmul(&o, n, out, p);
        if let Some(b) = &self.o_bias {
            out.chunks_exact_mut(b.len()).for_each(|r| crate::kernels::axpy(1.0, b, r));
        }
        cache.slide(pos0 + n, nkv * d);
    }

    /// One token at `pos`, the same math in three steps and no serial pass over their outputs:
    /// the q/k/v items normalise and rotate the heads they computed, k and v written straight
    /// into the cache; the attention items of a KV head merge its parts when the last one is
    /// done (gate included) and hand the heads to the output projection's input.
    fn decode(&self, x: &[f32], pos: usize, cache: &mut KvCache, out: &mut [f32], p: Precision) {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qw = if self.gated { 2 * d } else { d };
        // the q/k/v step writes every row
        let mut q = scratch::dirty(nh * qw);
        let (mut cos, mut sin) = (scratch::zeros(0), scratch::zeros(0));
        self.rope.table(pos, cos.vec(), sin.vec());
        cache.start = pos + 1 - (cache.k.len() / (nkv * d) + 1);
        // an f32 cache takes k and v straight from their products; a 16-bit one rounds them
        // after the step
        let row = nkv * d;
        let f32_cache = cache.ty() == KvType::F32;
        let n16 = if f32_cache { 0 } else { row };
        // the products write every element
        let (mut k16, mut v16) = (scratch::dirty(n16), scratch::dirty(n16));
        let (k, v) = match cache.push_f32(row, row) {
            Some(kv) => kv,
            None => (&mut k16[..], &mut v16[..]),
        };
        crate::par::mark();
        // a norm over the whole projection needs all of its rows: RoPE waits for it
        let whole = matches!(self.qk_norm, QkNorms::Whole { .. });
        let finish = |j: usize, row0: usize, rows: &mut [f32]| {
            if let Some(b) = &self.bias {
                crate::kernels::axpy(1.0, &b[j][row0..row0 + rows.len()], rows);
            }
            if whole {
                return;
            }
            match j {
                0 => rows.chunks_exact_mut(qw).for_each(|head| {
                    self.head_norm(0, &mut head[..d]);
                    Rope::apply(&mut head[..d], &cos, &sin);
                }),
                1 => rows.chunks_exact_mut(d).for_each(|head| {
                    self.head_norm(1, head);
                    Rope::apply(head, &cos, &sin);
                }),
                _ => {}
            }
        };
        let mut jobs = [
            Product { w: self.q_proj.view(), x, y: &mut q },
            Product { w: self.k_proj.view(), x, y: &mut *k },
            Product { w: self.v_proj.view(), x, y: &mut *v },
        ];
        products_then(&mut jobs, &[qw, d], &finish, p);
        if whole {
            self.whole_norms(&mut q[..], k);
            q.chunks_exact_mut(qw).for_each(|head| Rope::apply(&mut head[..d], &cos, &sin));
            k.chunks_exact_mut(d).for_each(|head| Rope::apply(head, &cos, &sin));
        }
        if !f32_cache {
            cache.append(&k16, &v16, row);
        }
        let heads = self.heads();
        let o = Staged::new(self.o_proj.view(), nh / nkv * d, p);
        crate::par::mark();
        attend_one(&q, pos, cache, &o, heads, context_parts(1, nkv, pos, heads.window));
        o.product(out);
        if let Some(b) = &self.o_bias {
            crate::kernels::axpy(1.0, b, out);
        }
        cache.slide(pos + 1, nkv * d);
    }
}

impl Attention {
    /// One decode step of each of several sequences (a batch, [`crate::model::Model::forward_batch`]):
    /// row `t` of `x` is a token at `pos[t]` of the sequence whose cache is `caches[t]`. The
    /// q/k/v and output projections run over all the rows at once, each weight row read once
    /// for all ([`products_rows_then`], [`Staged::product_rows`]); attention itself runs on
    /// each sequence's own cache. Every row's output is bit for bit what [`Attention::forward`]
    /// of that token alone gives it.
    pub fn decode_rows(&self, x: &[f32], pos: &[usize], caches: &mut [&mut KvCache], out: &mut [f32], p: Precision) {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qw = if self.gated { 2 * d } else { d };
        let (hq, hk) = (nh * qw, nkv * d);
        let m = pos.len();
        assert!(caches.len() == m && x.len() == m * self.q_proj.cols && out.len() == m * self.o_proj.rows);
        // the q/k/v step writes every row
        let (mut q, mut k, mut v) = (scratch::dirty(m * hq), scratch::dirty(m * hk), scratch::dirty(m * hk));
        let tables: SmallVec<[(scratch::Buf, scratch::Buf); 8]> = pos
            .iter()
            .map(|&ps| {
                let (mut cos, mut sin) = (scratch::zeros(0), scratch::zeros(0));
                self.rope.table(ps, cos.vec(), sin.vec());
                (cos, sin)
            })
            .collect();
        crate::par::mark();
        // as in `decode`: a norm over the whole projection needs all of its rows first
        let whole = matches!(self.qk_norm, QkNorms::Whole { .. });
        let finish = |j: usize, t: usize, row0: usize, rows: &mut [f32]| {
            if let Some(b) = &self.bias {
                crate::kernels::axpy(1.0, &b[j][row0..row0 + rows.len()], rows);
            }
            if whole {
                return;
            }
            let (cos, sin) = &tables[t];
            match j {
                0 => rows.chunks_exact_mut(qw).for_each(|head| {
                    self.head_norm(0, &mut head[..d]);
                    Rope::apply(&mut head[..d], cos, sin);
                }),
                1 => rows.chunks_exact_mut(d).for_each(|head| {
                    self.head_norm(1, head);
                    Rope::apply(head, cos, sin);
                }),
                _ => {}
            }
        };
        let mut jobs = [
            Product { w: self.q_proj.view(), x, y: &mut q },
            Product { w: self.k_proj.view(), x, y: &mut k },
            Product { w: self.v_proj.view(), x, y: &mut v },
        ];
        products_rows_then(&mut jobs, &[qw, d], &finish, p);
        let heads = self.heads();
        let mut staged: SmallVec<[Staged<'_>; 8]> = SmallVec::new();
        for (t, cache) in caches.iter_mut().enumerate() {
            let (qt, kt) = (&mut q[t * hq..(t + 1) * hq], &mut k[t * hk..(t + 1) * hk]);
            if whole {
                let (cos, sin) = &tables[t];
                self.whole_norms(qt, kt);
                qt.chunks_exact_mut(qw).for_each(|head| Rope::apply(&mut head[..d], cos, sin));
                kt.chunks_exact_mut(d).for_each(|head| Rope::apply(head, cos, sin));
            }
            cache.start = pos[t] + 1 - (cache.k.len() / hk + 1);
            cache.append(kt, &v[t * hk..(t + 1) * hk], hk);
            let o = Staged::new(self.o_proj.view(), nh / nkv * d, p);
            crate::par::mark();
            attend_one(qt, pos[t], cache, &o, heads, context_parts(1, nkv, pos[t], heads.window));
            staged.push(o);
        }
        Staged::product_rows(staged, out);
        for ((t, cache), o) in caches.iter_mut().enumerate().zip(out.chunks_exact_mut(self.o_proj.rows)) {
            if let Some(b) = &self.o_bias {
                crate::kernels::axpy(1.0, b, o);
            }
            cache.slide(pos[t] + 1, hk);
        }
    }

    fn heads(&self) -> Heads<'_> {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let window = self.window.unwrap_or(usize::MAX);
        Heads { nh, nkv, d, gated: self.gated, window, sinks: self.sinks.as_deref() }
    }

    /// The per-head norm of q (`which` 0) or k (1), if the layer has one.
    fn head_norm(&self, which: usize, head: &mut [f32]) {
        if let QkNorms::PerHead { q, k } = &self.qk_norm {
            [q, k][which].apply(head);
        }
    }

    /// The norms over one token's whole q and k projections, if the layer has them.
    fn whole_norms(&self, qt: &mut [f32], kt: &mut [f32]) {
        if let QkNorms::Whole { q, k } = &self.qk_norm {
            q.apply(qt);
            k.apply(kt);
        }
    }
}

/// Head counts of an attention layer, and how far back a position sees.
#[derive(Clone, Copy, Debug)]
struct Heads<'a> {
    nh: usize,
    nkv: usize,
    d: usize,
    gated: bool,
    /// Positions attended, the own one included (`usize::MAX`: all).
    window: usize,
    /// Each head's sink logit.
    sinks: Option<&'a [f32]>,
}

/// Parts of the context per (token, KV head) work item: one when the tokens and KV heads give
/// enough items, else one per 64 positions, up to 32 items in all, so that decode has work
/// for every thread. It depends on the shape alone, never on the thread count, so results do
/// not either.
fn context_parts(n: usize, nkv: usize, pos0: usize, window: usize) -> usize {
    if n * nkv >= 32 { 1 } else { (pos0 + 1).min(window).div_ceil(64).clamp(1, (32 / (n * nkv)).max(1)) }
}

/// Floats of one (token, KV head, part) item's output: its g heads' finished outputs with one
/// part, else each head's (max, sum, unnormalised output).
fn part_len(heads: Heads<'_>, parts: usize) -> usize {
    let g = heads.nh / heads.nkv;
    if parts == 1 { g * heads.d } else { g * (heads.d + 2) }
}

/// Positions of a context part scored and summed at once: a KV head's block of k and v rows
/// (64 KB each at head dim 128) stays in L2 while its query heads use it.
const ATTN_BLOCK: usize = 128;

/// Item (token t, KV head kvh, part c of `parts`) of attention over the cache: softmax(q·Kᵀ/√d)·V
/// for the query heads sharing the KV head, causal. The heads run together so the KV head's
/// cached rows are read once per item, not once per query head; with several parts each
/// item's softmax is partial, for [`merge_parts`].
#[allow(clippy::too_many_arguments)]
fn attend_part(
    q: &[f32],
    t: usize,
    kvh: usize,
    c: usize,
    parts: usize,
    pos0: usize,
    cache: &KvCache,
    heads: Heads<'_>,
    out: &mut [f32],
) {
    let Heads { nh, nkv, d, gated, window, sinks } = heads;
    let (qw, g) = (if gated { 2 * d } else { d }, nh / nkv);
    let scale = 1.0 / (d as f32).sqrt();
    // this token sees every earlier position in its window and itself
    let end = pos0 + t + 1;
    let start = end.saturating_sub(window);
    let len = end - start;
    let (p0, p1) = (start + c * len / parts, start + (c + 1) * len / parts);
    let stride = nkv * d;
    // a sliding cache starts at `cache.start`; the window never reaches before it
    let r0 = p0 - cache.start;
    let (ks, vs) = (cache.k.rows().skip(r0 * stride + kvh * d), cache.v.rows().skip(r0 * stride + kvh * d));
    let n_pos = p1 - p0;
    let slot = |j: usize| if parts == 1 { j * d..(j + 1) * d } else { j * (d + 2) + 2..(j + 1) * (d + 2) };
    // (max, Σ e^(x − max)) of each head's softmax over the positions
    let mut ml: SmallVec<[(f32, f32); 16]> = SmallVec::new();
    if n_pos <= ATTN_BLOCK {
        let mut w = scratch::zeros(n_pos);
        for j in 0..g {
            let h = kvh * g + j;
            let qh = &q[(t * nh + h) * qw..(t * nh + h) * qw + d];
            crate::kernels::dot_rows_kv(qh, ks, stride, scale, &mut w);
            ml.push(crate::kernels::softmax(&mut w));
            let oj = &mut out[slot(j)];
            oj.iter_mut().for_each(|v| *v = 0.0);
            crate::kernels::axpy_rows_kv(&w, vs, stride, oj);
        }
    } else {
        // a long context in blocks of positions, every head over a block before the next, so
        // the block's k and v rows come from L2 once per head instead of from memory (a long
        // prompt's attention streamed the whole cache once per query head); each head's output
        // is the running softmax-weighted mean of its blocks' outputs
        let mut w = scratch::zeros(ATTN_BLOCK);
        let mut ob = scratch::zeros(d);
        ml.resize(g, (f32::NEG_INFINITY, 0.0));
        for j in 0..g {
            out[slot(j)].iter_mut().for_each(|v| *v = 0.0);
        }
        for b0 in (0..n_pos).step_by(ATTN_BLOCK) {
            let len = ATTN_BLOCK.min(n_pos - b0);
            let (kb, vb) = (ks.skip(b0 * stride), vs.skip(b0 * stride));
            for (j, mlj) in ml.iter_mut().enumerate() {
                let h = kvh * g + j;
                let qh = &q[(t * nh + h) * qw..(t * nh + h) * qw + d];
                let wb = &mut w[..len];
                crate::kernels::dot_rows_kv(qh, kb, stride, scale, wb);
                let (mb, lb) = crate::kernels::softmax(wb);
                ob.iter_mut().for_each(|v| *v = 0.0);
                crate::kernels::axpy_rows_kv(wb, vb, stride, &mut ob);
                let (m, l) = *mlj;
                let top = m.max(mb);
                let (a, c) = (l * (m - top).exp(), lb * (mb - top).exp());
                let (wa, wc) = (a / (a + c), c / (a + c));
                for (o, x) in out[slot(j)].iter_mut().zip(ob.iter()) {
                    *o = *o * wa + *x * wc;
                }
                *mlj = (top, a + c);
            }
        }
    }
    for (j, &(m, l)) in ml.iter().enumerate() {
        let h = kvh * g + j;
        let oj = &mut out[slot(j)];
        if parts == 1 {
            if let Some(s) = sinks {
                // the sink's share of the softmax: e^(s − m) against the positions' Σ e^(x − m) = l
                let keep = l / (l + (s[h] - m).exp());
                oj.iter_mut().for_each(|v| *v *= keep);
            }
            gate(heads, q, t, h, oj);
        } else {
            out[j * (d + 2)] = m;
            out[j * (d + 2) + 1] = l;
        }
    }
}

/// The outputs of (token t, KV head kvh)'s g heads (into `o`, g·d) from its parts' partial
/// softmaxes (`blocks`, part after part): each part weighs by its share Σ e^(x − m)·e^(m − max m)
/// of the whole.
fn merge_parts(blocks: &[f32], parts: usize, q: &[f32], t: usize, kvh: usize, heads: Heads<'_>, o: &mut [f32]) {
    let (g, d) = (heads.nh / heads.nkv, heads.d);
    let per = part_len(heads, parts);
    for (j, oh) in o.chunks_exact_mut(d).enumerate().take(g) {
        let part = |c: usize| &blocks[c * per + j * (d + 2)..c * per + (j + 1) * (d + 2)];
        let sink = heads.sinks.map(|s| s[kvh * g + j]);
        let top = (0..parts).map(|c| part(c)[0]).chain(sink).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = (0..parts).map(|c| part(c)[1] * (part(c)[0] - top).exp()).sum::<f32>()
            + sink.map_or(0.0, |s| (s - top).exp());
        oh.iter_mut().for_each(|v| *v = 0.0);
        for c in 0..parts {
            let wgt = part(c)[1] * (part(c)[0] - top).exp() / total;
            crate::kernels::axpy(wgt, &part(c)[2..], oh);
        }
        gate(heads, q, t, kvh * g + j, oh);
    }
}

/// o = softmax(q·Kᵀ/√d)·V over the cache for `n` tokens, causal, then the output gate: one work
/// item per (token, KV head, part of the context), the parts merged after.
fn attend(q: &[f32], n: usize, pos0: usize, cache: &KvCache, o: &mut [f32], heads: Heads<'_>, parts: usize) {
    let Heads { nh, nkv, d, .. } = heads;
    let per = part_len(heads, parts);
    let item = |i: usize, out: &mut [f32]| {
        attend_part(q, i / (nkv * parts), i / parts % nkv, i % parts, parts, pos0, cache, heads, out)
    };
    let mut partial = scratch::zeros(if parts == 1 { 0 } else { n * nkv * parts * per });
    let buf: &mut [f32] = if parts == 1 { o } else { &mut partial };
    if !crate::tensor::parallel(n * nh * (pos0 + n) * d) {
        buf.chunks_mut(per).enumerate().for_each(|(i, c)| item(i, c));
    } else {
        buf.par_chunks_mut(per).enumerate().for_each(|(i, c)| item(i, c));
    }
    if parts > 1 {
        let g = nh / nkv;
        for (tk, blocks) in partial.chunks(parts * per).enumerate() {
            let (t, kvh) = (tk / nkv, tk % nkv);
            merge_parts(blocks, parts, q, t, kvh, heads, &mut o[(t * nh + kvh * g) * d..(t * nh + (kvh + 1) * g) * d]);
        }
    }
}

/// [`attend`] for one token at `pos`, each KV head's outputs written to `o` by the item that
/// finishes its last part (merging them), so the step ends with the output projection's input
/// ready.
fn attend_one(q: &[f32], pos: usize, cache: &KvCache, o: &Staged<'_>, heads: Heads<'_>, parts: usize) {
    let Heads { nh, nkv, d, .. } = heads;
    let g = nh / nkv;
    let per = part_len(heads, parts);
    // each item writes its part in full before anyone reads it
    let mut partial = scratch::dirty(nkv * parts * per);
    let done: SmallVec<[AtomicUsize; 16]> = (0..nkv).map(|_| AtomicUsize::new(0)).collect();
    let at = crate::par::Shared(partial.as_mut_ptr());
    let work = if crate::tensor::parallel(nh * (pos + 1) * d) { nkv * parts } else { 0 };
    let item = |i: usize| {
        let (kvh, c) = (i / parts, i % parts);
        // SAFETY: item i alone writes floats i·per.. of `partial`, which outlives the step
        attend_part(q, 0, kvh, c, parts, pos, cache, heads, unsafe { at.slice(i * per, per) });
        // SAFETY (both writes): KV head kvh's heads are written once, by this item; `o` was made
        // with this unit
        if parts == 1 {
            // SAFETY: as above; the item's own floats, finished
            unsafe { o.write(kvh * g * d, at.slice(i * per, per)) };
        } else if done[kvh].fetch_add(1, AcqRel) + 1 == parts {
            // the KV head's last part: the others' writes happened before their increments
            // SAFETY: every part of this KV head is written and no item writes them again
            let blocks = unsafe { at.slice(kvh * parts * per, parts * per) };
            // merge_parts writes every element
            let mut oh = scratch::dirty(g * d);
            merge_parts(blocks, parts, q, 0, kvh, heads, &mut oh);
            unsafe { o.write(kvh * g * d, &oh) };
        }
    };
    if work > 0 {
        crate::par::for_each(work, item);
    } else {
        (0..nkv * parts).for_each(item);
    }
}

/// Gated attention: o_h ⊙= sigmoid(the gate half of token t's q_proj for head h).
fn gate(heads: Heads<'_>, q: &[f32], t: usize, h: usize, oh: &mut [f32]) {
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
    fn naive(q: &[f32], n: usize, pos0: usize, c: &KvCache, h: Heads<'_>) -> Vec<f64> {
        let (qw, g) = (if h.gated { 2 * h.d } else { h.d }, h.nh / h.nkv);
        let mut o = vec![0f64; n * h.nh * h.d];
        for t in 0..n {
            for head in 0..h.nh {
                let (kvh, qh) = (head / g, &q[(t * h.nh + head) * qw..]);
                let from = (pos0 + t + 1).saturating_sub(h.window);
                let s: Vec<f64> = (from..pos0 + t + 1)
                    .map(|p| {
                        let k = c.k.rows().skip((p * h.nkv + kvh) * h.d);
                        (0..h.d).map(|j| qh[j] as f64 * k.get(j) as f64).sum::<f64>() / (h.d as f64).sqrt()
                    })
                    .collect();
                let sink = h.sinks.map(|sk| sk[head] as f64);
                let m = s.iter().cloned().chain(sink).fold(f64::MIN, f64::max);
                let z: f64 = s.iter().chain(&sink).map(|x| (x - m).exp()).sum();
                for (p, x) in (from..).zip(&s) {
                    let v = c.v.rows().skip((p * h.nkv + kvh) * h.d);
                    for j in 0..h.d {
                        o[(t * h.nh + head) * h.d + j] += (x - m).exp() / z * v.get(j) as f64;
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
    fn a_sliding_cache_holds_what_the_next_token_sees_and_at_most_two_windows() {
        for w in [1, 2, 5, 128] {
            for pos in 0..1000 {
                let r = window_rows(pos, w);
                assert!(r >= pos.min(w - 1) && r <= pos && r < 2 * w.max(1), "w {w} pos {pos}: {r}");
                // one more token: at most one more row, or the drop to w - 1
                let next = window_rows(pos + 1, w);
                assert!(next == r + 1 || next == w - 1, "w {w} pos {pos}: {r} -> {next}");
            }
        }
    }

    #[test]
    fn a_16_bit_cache_holds_the_rounded_rows_at_half_the_bytes_and_slides_alike() {
        let row = 2 * 12;
        for window in [None, Some(5)] {
            let mut caches: Vec<KvCache> =
                [KvType::F32, KvType::Bf16, KvType::F16].into_iter().map(|t| KvCache::new(t, window)).collect();
            for (n, seed) in [(3, 1), (1, 2), (7, 3), (1, 4), (1, 5)] {
                let (k, v) = (uniform(n * row, seed), uniform(n * row, seed + 10));
                for c in &mut caches {
                    let end = c.start + c.k.len() / row + n;
                    c.append(&k, &v, row);
                    c.slide(end, row);
                }
            }
            let want = caches[0].k.to_f32();
            assert_eq!(want.len() / row, window.map_or(13, |w| window_rows(13, w)), "{window:?}");
            for c in &caches[1..] {
                // the same rows, each rounded once, in the same place
                assert_eq!((c.start, c.k.len(), c.v.len()), (caches[0].start, want.len(), want.len()));
                assert_eq!(c.k.rows().len(), want.len());
                let b = KvBuf::from_f32(c.ty(), &want);
                assert!(
                    matches!((&c.k, &b), (KvBuf::Bf16(x), KvBuf::Bf16(y)) | (KvBuf::F16(x), KvBuf::F16(y)) if x == y)
                );
                assert_eq!(c.bytes(), (c.k.capacity() + c.v.capacity()) * 2, "{}", c.ty());
            }
            assert_eq!(caches[0].bytes(), (caches[0].k.capacity() + caches[0].v.capacity()) * 4);
            // a cache of 256 positions or fewer: one growth step of 256 rows, half the bytes
            assert_eq!(caches[1].bytes() * 2, caches[0].bytes());
        }
    }

    #[test]
    fn context_parts_merge_to_the_whole_softmax() {
        for (heads, n, pos0) in [
            (Heads { nh: 8, nkv: 2, d: 64, gated: true, window: usize::MAX, sinks: None }, 1, 300),
            (Heads { nh: 4, nkv: 4, d: 16, gated: false, window: usize::MAX, sinks: None }, 3, 40),
            (Heads { nh: 6, nkv: 2, d: 128, gated: false, window: usize::MAX, sinks: None }, 1, 0),
            // a sliding window shorter than the context, and one shorter than a part
            (Heads { nh: 8, nkv: 2, d: 32, gated: false, window: 100, sinks: None }, 1, 300),
            (Heads { nh: 4, nkv: 2, d: 16, gated: true, window: 3, sinks: None }, 5, 70),
            // sinks (gpt-oss), with and without a window, one part and many
            (
                Heads { nh: 4, nkv: 2, d: 16, gated: false, window: usize::MAX, sinks: Some(&[0.5, -1.0, 3.0, 0.0]) },
                1,
                200,
            ),
            (Heads { nh: 4, nkv: 2, d: 16, gated: false, window: 7, sinks: Some(&[2.0, 1.0, -3.0, 9.0]) }, 4, 20),
            // contexts longer than a block (ATTN_BLOCK): whole blocks and a tail, windowed, sinks
            (Heads { nh: 8, nkv: 2, d: 64, gated: true, window: usize::MAX, sinks: None }, 2, 700),
            (Heads { nh: 4, nkv: 4, d: 16, gated: false, window: usize::MAX, sinks: None }, 1, 128),
            (Heads { nh: 4, nkv: 2, d: 32, gated: false, window: 301, sinks: Some(&[0.5, -1.0, 3.0, 0.0]) }, 3, 900),
        ] {
            let qw = if heads.gated { 2 * heads.d } else { heads.d };
            let q: Vec<f32> = uniform(n * heads.nh * qw, 1).iter().map(|v| v * 4.0).collect();
            let len = (pos0 + n) * heads.nkv * heads.d;
            // every cache type against the float64 definition over the values it holds
            for ty in [KvType::F32, KvType::Bf16, KvType::F16] {
                let cache = KvCache {
                    k: KvBuf::from_f32(ty, &uniform(len, 2)),
                    v: KvBuf::from_f32(ty, &uniform(len, 3)),
                    ..Default::default()
                };
                let want = naive(&q, n, pos0, &cache, heads);
                for parts in [1, 2, 5, 64] {
                    let mut o = vec![0f32; n * heads.nh * heads.d];
                    attend(&q, n, pos0, &cache, &mut o, heads, parts);
                    let err = o.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                    assert!(err < 1e-5, "{heads:?} {ty} n {n} pos0 {pos0} parts {parts}: max error {err}");
                    if n == 1 {
                        // decode's step: each KV head merged by its last part, straight into the
                        // output projection's input — the same numbers as attend then the product
                        let cols = heads.nh * heads.d;
                        let w = uniform(cols * 24, 4);
                        let group = if cols % 64 == 0 { 64 } else { cols };
                        let blob = crate::quant::quantize(&w, 24, cols, 4, group);
                        let kind = crate::tensor::WKind::Q { bits: 4, group: group as u16 };
                        let bytes = crate::tensor::AlignedBytes::from_slice(&blob);
                        for m in [
                            Mat::from_f32(24, cols, w.clone()).unwrap(),
                            Mat::from_bytes(24, cols, kind, bytes).unwrap(),
                        ] {
                            for p in [Precision::Exact, Precision::Fast] {
                                let mut want = vec![0f32; 24];
                                m.matvec(&o, &mut want, p);
                                for threads in [1, 4] {
                                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                                    let mut got = vec![f32::NAN; 24];
                                    pool.install(|| {
                                        let staged = Staged::new(m.view(), heads.nh / heads.nkv * heads.d, p);
                                        attend_one(&q, pos0, &cache, &staged, heads, parts);
                                        staged.product(&mut got);
                                    });
                                    assert_eq!(
                                        got, want,
                                        "{heads:?} {ty} pos0 {pos0} parts {parts} {p:?} {threads} threads"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
