//! The decoder: embeddings, a stack of (mixer + feed-forward) layers, final norm, lm_head,
//! and the per-sequence state (KV caches and DeltaNet states).

use crate::config::ModelConfig;
use crate::flash::ExpertStore;
use crate::layers::attention::{Attention, KvCache, KvType};
use crate::layers::deltanet::{DeltaNet, DeltaState};
use crate::layers::mla::{LatentCache, Mla, Selection};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{Experts, Moe};
use crate::layers::norm::RmsNorm;
use crate::profile::{PROFILE, add_since};
use crate::scratch;
use crate::tensor::{Mat, Precision};
use anyhow::{Result, bail};
use smallvec::{SmallVec, smallvec};
use std::sync::Arc;
use std::time::Instant;

/// Token mixer weights of one layer.
#[derive(Clone, Debug)]
// one per layer, never in a hot array: boxing would only add an indirection
#[allow(clippy::large_enum_variant)]
pub enum MixerWeights {
    Attention(Attention),
    DeltaNet(DeltaNet),
    Mla(Mla),
}

/// Feed-forward weights of one layer.
#[derive(Clone, Debug)]
// one per layer, never in a hot array: boxing would only add an indirection
#[allow(clippy::large_enum_variant)]
pub enum FfnWeights {
    Moe(Moe),
    Dense(Mlp),
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub input_norm: RmsNorm,
    pub post_norm: RmsNorm,
    pub mixer: MixerWeights,
    pub ffn: FfnWeights,
}

/// Per-layer sequence state.
#[derive(Clone, Debug)]
pub enum LayerState {
    Kv(KvCache),
    Delta(DeltaState),
    Latent(LatentCache),
}

impl LayerState {
    /// The variant's name in prompt-cache files ([`crate::prompt_cache`]); a 16-bit KV cache's
    /// names its type.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerState::Kv(c) => kv_kind(c.ty()),
            LayerState::Delta(_) => "delta",
            LayerState::Latent(_) => "latent",
        }
    }

    /// The state's buffers, in the order cache files hold them.
    pub fn buffers(&self) -> SmallVec<[StateBuf<'_>; 4]> {
        match self {
            LayerState::Kv(c) => smallvec![c.k.state_buf(), c.v.state_buf()],
            LayerState::Delta(d) => smallvec![StateBuf::F32(&d.conv), StateBuf::F32(&d.s)],
            LayerState::Latent(c) => smallvec![StateBuf::F32(&c.lat), StateBuf::F32(&c.index_k)],
        }
    }

    /// The same buffers, to fill when loading.
    pub fn buffers_mut(&mut self) -> SmallVec<[StateBufMut<'_>; 4]> {
        match self {
            LayerState::Kv(c) => smallvec![c.k.state_buf_mut(), c.v.state_buf_mut()],
            LayerState::Delta(d) => smallvec![StateBufMut::F32(&mut d.conv), StateBufMut::F32(&mut d.s)],
            LayerState::Latent(c) => smallvec![StateBufMut::F32(&mut c.lat), StateBufMut::F32(&mut c.index_k)],
        }
    }

    /// Whether the state after `n` tokens holds the state after any `m < n` of them (a KV
    /// cache: its first `m` rows); a recurrent state does not.
    pub fn truncatable(&self) -> bool {
        match self {
            // a sliding window's cache keeps only its window's rows: not a prefix's state
            LayerState::Kv(c) => c.window.is_none(),
            LayerState::Latent(_) => true,
            LayerState::Delta(_) => false,
        }
    }

    /// Cuts a truncatable state of `from` tokens to its first `to`; false when it cannot be.
    pub fn truncate(&mut self, from: usize, to: usize) -> bool {
        if to == from {
            return true;
        }
        if !self.truncatable() || to > from || from == 0 {
            return false;
        }
        for mut b in self.buffers_mut() {
            let row = b.len() / from;
            b.truncate(row * to);
        }
        true
    }
}

/// A KV layer's state kind in prompt-cache files: `kv` (f32, as every file before 16-bit
/// caches), `kv-bf16`, `kv-f16`.
pub fn kv_kind(ty: KvType) -> &'static str {
    match ty {
        KvType::F32 => "kv",
        KvType::Bf16 => "kv-bf16",
        KvType::F16 => "kv-f16",
    }
}

/// The KV cache type of a state kind ([`kv_kind`]), `None` for other kinds.
pub fn kv_kind_type(kind: &str) -> Option<KvType> {
    [KvType::F32, KvType::Bf16, KvType::F16].into_iter().find(|&t| kv_kind(t) == kind)
}

/// One buffer of a layer's state as stored: f32 values, or 16-bit ones (a bf16/f16 KV cache).
#[derive(Clone, Copy, Debug)]
pub enum StateBuf<'a> {
    F32(&'a [f32]),
    U16(&'a [u16]),
}

impl StateBuf<'_> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            StateBuf::F32(v) => v.len(),
            StateBuf::U16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of one value.
    pub fn value_bytes(&self) -> usize {
        match self {
            StateBuf::F32(_) => 4,
            StateBuf::U16(_) => 2,
        }
    }

    /// Appends values `from..to`, little-endian, to `out`.
    pub fn le_bytes(&self, from: usize, to: usize, out: &mut Vec<u8>) {
        match self {
            StateBuf::F32(v) => out.extend(v[from..to].iter().flat_map(|x| x.to_le_bytes())),
            StateBuf::U16(v) => out.extend(v[from..to].iter().flat_map(|x| x.to_le_bytes())),
        }
    }
}

/// A [`StateBuf`] to fill when loading.
#[derive(Debug)]
pub enum StateBufMut<'a> {
    F32(&'a mut Vec<f32>),
    U16(&'a mut Vec<u16>),
}

impl StateBufMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            StateBufMut::F32(v) => v.len(),
            StateBufMut::U16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, n: usize) {
        match self {
            StateBufMut::F32(v) => v.truncate(n),
            StateBufMut::U16(v) => v.truncate(n),
        }
    }

    /// Bytes of one value.
    pub fn value_bytes(&self) -> usize {
        match self {
            StateBufMut::F32(_) => 4,
            StateBufMut::U16(_) => 2,
        }
    }

    /// Makes the buffer `len` zeros and returns its bytes, to be read into (little-endian:
    /// [`Self::from_le`] after).
    pub fn zeroed_bytes(&mut self, len: usize) -> &mut [u8] {
        match self {
            StateBufMut::F32(v) => {
                v.clear();
                v.resize(len, 0.0);
                bytemuck::cast_slice_mut(&mut v[..])
            }
            StateBufMut::U16(v) => {
                v.clear();
                v.resize(len, 0);
                bytemuck::cast_slice_mut(&mut v[..])
            }
        }
    }

    /// Turns little-endian values read into [`Self::zeroed_bytes`] into native ones.
    pub fn from_le(&mut self) {
        #[cfg(target_endian = "big")]
        match self {
            StateBufMut::F32(v) => v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes())),
            StateBufMut::U16(v) => v.iter_mut().for_each(|x| *x = x.swap_bytes()),
        }
    }
}

impl Layer {
    /// The kind of state this layer keeps and the length of each of its buffers after `pos`
    /// tokens ([`LayerState::kind`], [`LayerState::buffers`]).
    /// `kv` is the run's KV cache type.
    pub fn state_shape(&self, pos: usize, kv: KvType) -> (&'static str, SmallVec<[usize; 4]>) {
        match &self.mixer {
            MixerWeights::Attention(a) => {
                let rows = a.window.map_or(pos, |w| crate::layers::attention::window_rows(pos, w));
                (kv_kind(kv), smallvec![rows * a.num_kv_heads * a.head_dim; 2])
            }
            MixerWeights::DeltaNet(d) => {
                let s = DeltaState::new(&d.cfg);
                ("delta", smallvec![s.conv.len(), s.s.len()])
            }
            MixerWeights::Mla(a) => {
                let ix = a.indexer.as_ref().map_or(0, |i| i.spec.head_dim);
                ("latent", smallvec![pos * (a.kv_lora + a.rope_dim), pos * ix])
            }
        }
    }
}

/// Everything a sequence carries between calls: positions so far and each layer's state.
#[derive(Clone, Debug)]
pub struct State {
    pub pos: usize,
    pub layers: Vec<LayerState>,
    /// An error interrupted a forward pass part-way through the layers.
    pub poisoned: bool,
    /// The accelerator's own state (KV caches in GPU memory), when the model runs on one.
    pub device: Option<Box<dyn crate::backend::DeviceState>>,
}

impl State {
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(c) => c.bytes(),
                LayerState::Delta(d) => d.bytes(),
                LayerState::Latent(c) => c.bytes(),
            })
            .sum::<usize>()
            + self.device.as_ref().map_or(0, |d| d.bytes())
    }
}

/// Run-time options of a forward pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Routed experts per token; `None` keeps the model's `num_experts_per_tok`.
    pub experts_per_token: Option<usize>,
    /// How products treat activations: exact (f32, as the reference) or fast (int8/bf16).
    pub precision: Precision,
    /// How KV caches store their rows ([`KvType`]): f32 (the default here, as the reference
    /// computes), or bf16 / f16 at half the bytes (the CLI's default is bf16).
    pub kv_cache: KvType,
    /// A longer prompt runs in chunks of this many tokens (0: [`PREFILL_CHUNK`]): activation
    /// buffers stay bounded, and each chunk still reads a routed expert once for all its tokens.
    pub prefill_chunk: usize,
}

/// The default prefill chunk: 2048 tokens keep a 397B-shaped model's activations near 1 GB,
/// and read each expert once per 2048 tokens of a long agent prompt.
pub const PREFILL_CHUNK: usize = 2048;

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Mat,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<Mat>,
    pub opts: RunOptions,
    /// The expert store of a converted (flash) model.
    pub store: Option<Arc<ExpertStore>>,
    /// Where the forward pass runs when not on the CPU ([`crate::backend::attach`]).
    pub accel: Option<Arc<dyn crate::backend::Accelerator>>,
}

/// Whether every value is finite (NaN and ±Inf are not); a prompt's rows in parallel.
pub(crate) fn all_finite(x: &[f32]) -> bool {
    if x.len() >= 1 << 16 && crate::par::on_team() {
        // decode's logits, which the team's items just wrote: the leader alone took ~50 µs a
        // token reading them back
        let ok = std::sync::atomic::AtomicBool::new(true);
        let chunk = x.len().div_ceil(rayon::current_num_threads()).next_multiple_of(16);
        crate::par::for_each(x.len().div_ceil(chunk), |i| {
            if !finite_chunk(&x[i * chunk..x.len().min((i + 1) * chunk)]) {
                ok.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        });
        return ok.into_inner();
    }
    if x.len() >= 1 << 18 && crate::tensor::parallel(x.len()) {
        use rayon::prelude::*;
        return x.par_chunks(1 << 16).all(finite_chunk);
    }
    finite_chunk(x)
}

fn finite_chunk(x: &[f32]) -> bool {
    // v·0 is NaN exactly for NaN and ±Inf; sixteen lanes, so the loop vectorizes
    let mut acc = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * 0.0;
        }
    }
    acc.iter().chain(it.remainder()).all(|v| v.is_finite())
}

impl Layer {
    /// h = x + mixer(norm1(x)); x' = h + ffn(norm2(h)), in place on `x` (`n` tokens). A
    /// non-finite value (corrupt weights, an overflow) is an error naming the sublayer. `sel`
    /// carries a sparse-attention selection from layer to layer.
    fn forward(
        &self,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        st: &mut LayerState,
        sel: &mut Selection,
        opts: &RunOptions,
    ) -> Result<()> {
        self.mix(x, n, pos0, st, sel, opts)?;
        self.feed(x, n, opts, false)
    }

    /// The token mixer's half: x += mixer(norm1(x)).
    fn mix(
        &self,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        st: &mut LayerState,
        sel: &mut Selection,
        opts: &RunOptions,
    ) -> Result<()> {
        let p = opts.precision;
        let mut h = scratch::zeros(x.len());
        let mut y = scratch::zeros(x.len());
        self.input_norm.forward(x, &mut h);
        crate::par::mark();
        let t = Instant::now();
        match (&self.mixer, &mut *st) {
            (MixerWeights::Attention(a), LayerState::Kv(c)) => a.forward(&h, n, pos0, c, &mut y, p),
            (MixerWeights::DeltaNet(d), LayerState::Delta(s)) => d.forward(&h, n, s, &mut y, p),
            (MixerWeights::Mla(a), LayerState::Latent(c)) => a.forward(&h, n, pos0, c, sel, &mut y, p),
            _ => unreachable!("layer state does not match its mixer"),
        }
        add_since(&PROFILE.mixer, t);
        if !all_finite(&y) {
            bail!(
                "non-finite values (NaN or Inf) in the output of the {} ({})",
                self.mixer_name(),
                non_finite_cause(st)
            );
        }
        add_assign(x, &y);
        Ok(())
    }

    /// [`Layer::mix`] of one decode step of each of several sequences: row `t` of `x` is a
    /// token at `pos[t]` of the sequence whose layer state is `states[t]`. Every mixer computes
    /// its projections over all the rows at once and the rest on each sequence's own state
    /// ([`Attention::decode_rows`], [`DeltaNet::decode_rows`], [`Mla::decode_rows`]); each
    /// row gets what `mix` gives it alone. A row whose output is not finite is left as it was
    /// and gets its error.
    fn mix_rows(
        &self,
        x: &mut [f32],
        pos: &[usize],
        states: &mut [&mut LayerState],
        sels: &mut [&mut Selection],
        opts: &RunOptions,
    ) -> SmallVec<[Result<()>; 8]> {
        let d = x.len() / pos.len().max(1);
        let mut h = scratch::zeros(x.len());
        let mut y = scratch::zeros(x.len());
        self.input_norm.forward(x, &mut h);
        crate::par::mark();
        let t = Instant::now();
        let p = opts.precision;
        match &self.mixer {
            MixerWeights::Attention(a) => {
                let mut caches: SmallVec<[&mut KvCache; 8]> = states
                    .iter_mut()
                    .map(|st| {
                        if let LayerState::Kv(c) = &mut **st {
                            c
                        } else {
                            unreachable!("layer state does not match its mixer")
                        }
                    })
                    .collect();
                a.decode_rows(&h, pos, &mut caches, &mut y, p);
            }
            MixerWeights::DeltaNet(dn) => {
                let mut ds: SmallVec<[&mut DeltaState; 8]> = states
                    .iter_mut()
                    .map(|st| {
                        if let LayerState::Delta(s) = &mut **st {
                            s
                        } else {
                            unreachable!("layer state does not match its mixer")
                        }
                    })
                    .collect();
                dn.decode_rows(&h, &mut ds, &mut y, p);
            }
            MixerWeights::Mla(a) => {
                let mut caches: SmallVec<[&mut LatentCache; 8]> = states
                    .iter_mut()
                    .map(|st| {
                        if let LayerState::Latent(c) = &mut **st {
                            c
                        } else {
                            unreachable!("layer state does not match its mixer")
                        }
                    })
                    .collect();
                a.decode_rows(&h, pos, &mut caches, sels, &mut y, p);
            }
        }
        add_since(&PROFILE.mixer, t);
        x.chunks_exact_mut(d)
            .zip(y.chunks_exact(d))
            .zip(states.iter())
            .map(|((x, y), st)| {
                if !all_finite(y) {
                    bail!(
                        "non-finite values (NaN or Inf) in the output of the {} ({})",
                        self.mixer_name(),
                        non_finite_cause(st)
                    );
                }
                add_assign(x, y);
                Ok(())
            })
            .collect()
    }

    /// The feed-forward half: x += ffn(norm2(x)). `rows`: the `n` rows are one decode step of
    /// `n` sequences each, computed as one-token products (see [`Moe::forward_rows`]).
    fn feed(&self, x: &mut [f32], n: usize, opts: &RunOptions, rows: bool) -> Result<()> {
        let p = opts.precision;
        let mut h = scratch::zeros(x.len());
        let mut y = scratch::zeros(x.len());
        self.post_norm.forward(x, &mut h);
        crate::par::mark();
        match &self.ffn {
            FfnWeights::Moe(m) if rows => m.forward_rows(&h, n, opts.experts_per_token, &mut y, p)?,
            FfnWeights::Moe(m) => m.forward(&h, n, opts.experts_per_token, &mut y, p)?,
            FfnWeights::Dense(m) => {
                let t = Instant::now();
                if rows && n > 1 {
                    crate::layers::mlp::forward_rows_each(&mut [(m.view(), &h[..], &mut y[..])], p);
                } else {
                    m.forward(&h, n, &mut y, p);
                }
                add_since(&PROFILE.dense, t);
            }
        }
        if !all_finite(&y) {
            let what = if matches!(self.ffn, FfnWeights::Moe(_)) { "MoE block" } else { "feed-forward" };
            bail!("non-finite values (NaN or Inf) in the output of the {what} (corrupt weights?)");
        }
        add_assign(x, &y);
        crate::par::mark();
        Ok(())
    }

    fn mixer_name(&self) -> &'static str {
        match self.mixer {
            MixerWeights::Attention(_) => "attention",
            MixerWeights::DeltaNet(_) => "DeltaNet mixer",
            MixerWeights::Mla(_) => "latent attention",
        }
    }
}

/// What a mixer's non-finite output may come from: an f16 KV cache's overflow, or the weights.
fn non_finite_cause(st: &LayerState) -> &'static str {
    match st {
        LayerState::Kv(c) if c.ty() == KvType::F16 => {
            "an f16 KV cache holds values up to 65504: --kv-cache bf16 keeps f32's range; or corrupt weights?"
        }
        _ => "corrupt weights?",
    }
}

/// x += y (in parallel for a prompt's rows).
fn add_assign(x: &mut [f32], y: &[f32]) {
    if crate::tensor::parallel(x.len()) && x.len() > 1 << 14 && !crate::par::on_team() {
        use rayon::prelude::*;
        x.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(a, b)| crate::kernels::axpy(1.0, b, a));
    } else {
        crate::kernels::axpy(1.0, y, x);
    }
}

impl Model {
    /// Speculative prefetch: layer `i + 1`'s router applied to the hidden state entering layer
    /// `i` predicts its experts; the store reads them ahead while layer `i` runs.
    fn prefetch_next(&self, i: usize, x: &[f32]) {
        let (Some(next), Some(store)) = (self.layers.get(i + 1), &self.store) else { return };
        let FfnWeights::Moe(m) = &next.ffn else { return };
        let mut h = scratch::copy(x);
        next.post_norm.apply(&mut h);
        let mut logits = scratch::zeros(m.router.rows);
        m.router.matvec(&h, &mut logits, self.opts.precision);
        let k = self.opts.experts_per_token.unwrap_or(m.top_k);
        crate::layers::moe::with_top_experts(&logits, k, &m.scoring, |experts| store.prefetch(i + 1, experts));
    }

    /// A fresh, empty sequence state.
    pub fn new_state(&self) -> State {
        let layers = self
            .layers
            .iter()
            .map(|l| match &l.mixer {
                MixerWeights::Attention(a) => LayerState::Kv(KvCache::new(self.opts.kv_cache, a.window)),
                MixerWeights::DeltaNet(d) => LayerState::Delta(DeltaState::new(&d.cfg)),
                MixerWeights::Mla(_) => LayerState::Latent(LatentCache::default()),
            })
            .collect();
        State { pos: 0, layers, poisoned: false, device: None }
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Context length limit (positions) of one sequence.
    pub fn max_context(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Feeds `tokens` after what `st` holds. Returns logits `[rows, vocab]`: one row per token
    /// when `all_logits`, else only the last token's row.
    pub fn forward(&self, st: &mut State, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(st, tokens, all_logits, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::forward`] into `logits`, whose buffer is reused (a decode loop hands back the
    /// previous token's: a fresh 0.6–1 MB vector per token cost tens of microseconds of
    /// zeroing and page faults on the leader while every other thread waited).
    pub fn forward_into(&self, st: &mut State, tokens: &[u32], all_logits: bool, logits: &mut Vec<f32>) -> Result<()> {
        let n = tokens.len();
        if st.poisoned {
            bail!("this sequence state was left incomplete by an earlier error; start a new one");
        }
        if n == 0 {
            bail!("no tokens to process");
        }
        let h = self.cfg.hidden_size;
        let v = self.cfg.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            bail!("token id {bad} is out of range: the vocabulary has {v} ids");
        }
        if st.pos + n > self.max_context() {
            bail!("sequence of {} tokens exceeds the model's context of {} tokens", st.pos + n, self.max_context());
        }
        let chunk = if self.opts.prefill_chunk == 0 { PREFILL_CHUNK } else { self.opts.prefill_chunk };
        if n > chunk && self.accel.is_none() {
            logits.clear();
            logits.reserve(if all_logits { n * v } else { v });
            for (i, c) in tokens.chunks(chunk).enumerate() {
                let last = (i + 1) * chunk >= n;
                let l = self.forward(st, c, all_logits)?;
                if all_logits || last {
                    logits.extend(l);
                }
            }
            return Ok(());
        }
        let t_total = Instant::now();
        if let Some(acc) = &self.accel {
            let res = acc.forward(self, st, tokens, all_logits);
            add_since(&PROFILE.total, t_total);
            *logits = res?;
            return Ok(());
        }
        let mut x = scratch::zeros(n * h);
        for (t, &id) in tokens.iter().enumerate() {
            self.embed.row_f32(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        let prefetch = n == 1 && self.store.as_ref().is_some_and(|s| s.prefetch);
        // decode runs on the team (crate::par) from step to step
        let _hold = (n == 1).then(crate::par::hold);
        let mut sel = Selection::default();
        for (i, (layer, ls)) in self.layers.iter().zip(st.layers.iter_mut()).enumerate() {
            if prefetch {
                self.prefetch_next(i, &x);
            }
            if let Err(e) = layer.forward(&mut x, n, st.pos, ls, &mut sel, &self.opts) {
                // the state saw part of this call: the sequence cannot continue
                st.poisoned = true;
                return Err(e.context(format!("layer {i}")));
            }
        }
        st.pos += n;
        let rows = if all_logits { &mut x[..] } else { &mut x[(n - 1) * h..] };
        self.norm.apply(rows);
        let m = rows.len() / h;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if m > 1 || logits.len() != v {
            // a one-token product writes every row; a prompt's may accumulate into zeros
            logits.clear();
            logits.resize(m * v, 0.0);
        }
        let t = Instant::now();
        head.matmul(rows, m, logits, self.opts.precision);
        add_since(&PROFILE.lm_head, t);
        if !all_finite(logits) {
            let what = if all_finite(rows) { "lm_head" } else { "final norm" };
            bail!("non-finite logits (NaN or Inf) from the {what} (corrupt weights?)");
        }
        add_since(&PROFILE.total, t_total);
        Ok(())
    }

    /// One decode step of several sequences: `tokens[j]` follows what `states[j]` holds, each
    /// sequence at its own position. Returns one logits row per sequence, `[B, vocab]`, each
    /// exactly what [`Model::forward`] gives that sequence alone (see [`Model::forward_batch_each`]);
    /// the first error when any sequence fails.
    pub fn forward_batch(&self, states: &mut [&mut State], tokens: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len() * self.cfg.vocab_size);
        for r in self.forward_batch_each(states, tokens) {
            out.extend(r?);
        }
        Ok(out)
    }

    /// [`Model::forward_batch`] with a result per sequence. Per layer the token mixer runs on
    /// each sequence's own state (one token; an attention layer's projections over every row
    /// at once), then the feed-forward runs over every row at once: a routed expert chosen by
    /// several sequences is read from the store once for all of them. Every product of the
    /// step reads each weight row once for all the rows that need it, and computes each row
    /// as decode's one-token product would ([`crate::tensor::products_rows`]), so each
    /// sequence's logits are bit for bit those it gets alone (in either precision). A sequence that fails
    /// (a bad token, a full context, a non-finite mixer output) leaves the batch and only its
    /// state is poisoned; an error of the shared feed-forward poisons every sequence still in
    /// it. On an accelerator the sequences run one after another.
    pub fn forward_batch_each(&self, states: &mut [&mut State], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        assert_eq!(states.len(), tokens.len(), "one token per sequence");
        let b = tokens.len();
        if self.accel.is_some() || b <= 1 {
            return states.iter_mut().zip(tokens).map(|(st, &t)| self.forward(st, &[t], false)).collect();
        }
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let t_total = Instant::now();
        let mut res: Vec<Option<Result<Vec<f32>>>> = (0..b).map(|_| None).collect();
        for (j, (st, &t)) in states.iter().zip(tokens).enumerate() {
            if st.poisoned {
                res[j] = Some(Err(anyhow::anyhow!(
                    "this sequence state was left incomplete by an earlier error; start a new one"
                )));
            } else if t as usize >= v {
                res[j] = Some(Err(anyhow::anyhow!("token id {t} is out of range: the vocabulary has {v} ids")));
            } else if st.pos + 1 > self.max_context() {
                res[j] = Some(Err(anyhow::anyhow!(
                    "sequence of {} tokens exceeds the model's context of {} tokens",
                    st.pos + 1,
                    self.max_context()
                )));
            }
        }
        let mut live: Vec<usize> = (0..b).filter(|&j| res[j].is_none()).collect();
        let mut x = scratch::zeros(b * h);
        for &j in &live {
            self.embed.row_f32(tokens[j] as usize, &mut x[j * h..(j + 1) * h]);
        }
        // no read-ahead in a batch's step: it issues the union of its rows' experts at once
        // anyway, and every row's predictions would take the slots that union needs (with a
        // cache smaller than the step's experts, the predicted reads evicted what the step
        // then read again)
        let _hold = crate::par::hold();
        let mut sels: Vec<Selection> = (0..b).map(|_| Selection::default()).collect();
        let mut rows = scratch::zeros(0);
        for (i, layer) in self.layers.iter().enumerate() {
            if live.is_empty() {
                break;
            }
            // the live rows side by side, through the mixer (each on its own state) and the
            // feed-forward together
            rows.vec().clear();
            for &j in &live {
                rows.vec().extend_from_slice(&x[j * h..(j + 1) * h]);
            }
            let pos: SmallVec<[usize; 8]> = live.iter().map(|&j| states[j].pos).collect();
            let mixed = {
                let (mut ls, mut ss): (SmallVec<[&mut LayerState; 8]>, SmallVec<[&mut Selection; 8]>) = states
                    .iter_mut()
                    .zip(sels.iter_mut())
                    .enumerate()
                    .filter(|(j, _)| live.contains(j))
                    .map(|(_, (st, sel))| (&mut st.layers[i], sel))
                    .unzip();
                layer.mix_rows(&mut rows, &pos, &mut ls, &mut ss, &self.opts)
            };
            let mut kept = 0;
            for (r, (j, ok)) in live.clone().into_iter().zip(mixed).enumerate() {
                match ok {
                    Ok(()) => {
                        rows.vec().copy_within(r * h..(r + 1) * h, kept * h);
                        live[kept] = j;
                        kept += 1;
                    }
                    Err(e) => {
                        states[j].poisoned = true;
                        res[j] = Some(Err(e.context(format!("layer {i}"))));
                    }
                }
            }
            live.truncate(kept);
            rows.vec().truncate(kept * h);
            let m = live.len();
            if m == 0 {
                break;
            }
            if let Err(e) = layer.feed(&mut rows, m, &self.opts, true) {
                for &j in &live {
                    states[j].poisoned = true;
                    res[j] = Some(Err(anyhow::anyhow!("layer {i}: {e:#}")));
                }
                live.clear();
                break;
            }
            for (r, &j) in live.iter().enumerate() {
                x[j * h..(j + 1) * h].copy_from_slice(&rows[r * h..(r + 1) * h]);
            }
        }
        for &j in &live {
            states[j].pos += 1;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).view();
        let mut logits = vec![0.0; live.len() * v];
        for &j in &live {
            self.norm.apply(&mut x[j * h..(j + 1) * h]);
        }
        let t = Instant::now();
        rows.vec().clear();
        for &j in &live {
            rows.vec().extend_from_slice(&x[j * h..(j + 1) * h]);
        }
        crate::tensor::products_rows(
            &mut [crate::tensor::Product { w: head, x: &rows, y: &mut logits }],
            self.opts.precision,
        );
        add_since(&PROFILE.lm_head, t);
        for (r, &j) in live.iter().enumerate() {
            let row = logits[r * v..(r + 1) * v].to_vec();
            res[j] = Some(if all_finite(&row) {
                Ok(row)
            } else {
                let what = if all_finite(&x[j * h..(j + 1) * h]) { "lm_head" } else { "final norm" };
                Err(anyhow::anyhow!("non-finite logits (NaN or Inf) from the {what} (corrupt weights?)"))
            });
        }
        add_since(&PROFILE.total, t_total);
        res.into_iter().map(|r| r.expect("every sequence has a result")).collect()
    }

    /// Re-encodes every in-memory routed expert in `kind` (quality experiments: what would q2
    /// experts cost?). Fails for experts streamed from a converted model.
    pub fn requantize_experts(&mut self, kind: crate::tensor::WKind) -> Result<()> {
        for l in &mut self.layers {
            if let FfnWeights::Moe(m) = &mut l.ffn {
                match &mut m.experts {
                    Experts::Memory(v) => {
                        for e in v.iter_mut() {
                            *e = Mlp {
                                gate: e.gate.to_kind(kind),
                                up: e.up.to_kind(kind),
                                down: e.down.to_kind(kind),
                                ..e.clone()
                            };
                        }
                    }
                    Experts::Flash { .. } => {
                        bail!("experts of a converted model are re-quantized by converting again (flashmoe convert)")
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of the resident weights (everything but experts read from disk).
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.embed.bytes() + self.lm_head.as_ref().map_or(0, Mat::bytes);
        for l in &self.layers {
            b += match &l.mixer {
                MixerWeights::Attention(a) => a.q_proj.bytes() + a.k_proj.bytes() + a.v_proj.bytes() + a.o_proj.bytes(),
                MixerWeights::DeltaNet(d) => {
                    d.in_proj_qkv.bytes()
                        + d.in_proj_z.bytes()
                        + d.in_proj_b.bytes()
                        + d.in_proj_a.bytes()
                        + d.out_proj.bytes()
                }
                MixerWeights::Mla(a) => a.bytes(),
            };
            b += match &l.ffn {
                FfnWeights::Moe(m) => {
                    m.router.bytes()
                        + match &m.experts {
                            Experts::Memory(v) => v.iter().map(Mlp::bytes).sum::<usize>(),
                            Experts::Flash { .. } => 0,
                        }
                        + m.shared.as_ref().map_or(0, |s| s.mlp.bytes())
                }
                FfnWeights::Dense(m) => m.bytes(),
            };
        }
        b
    }
}
