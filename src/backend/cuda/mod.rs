//! The CUDA backend: every weight uploaded once, activations and KV caches in GPU memory, each
//! block of a layer a few fused kernels (`kernels.cu`, compiled by NVRTC at load) on one stream.
//! The routed experts of a layer are found on the GPU (router product and top-k) and read from
//! there by the expert kernels, so a forward pass returns to the host only for its logits.
//!
//! Supported: attention (GQA; gated; q/k norms per head, over the whole projection or none;
//! q/k/v/o biases; partial, YaRN RoPE; sliding windows; sinks) and Gated DeltaNet mixers; MoE
//! routers (softmax or sigmoid, correction bias, groups, scaling; gpt-oss's logit bias and
//! softmax over the chosen), routed experts with biases and the clamped SwiGLU, shared experts
//! gated or not, dense feed-forwards; in every weight format flashmoe stores, MXFP4 included
//! (its own kernels: e2m1 nibbles and e8m0 scales read as stored); multi-head latent attention
//! (DeepSeek-V3, Kimi-K2: a latent cache, attended in the latent space) and DSA's lightning
//! indexer (DeepSeek-V3.2, GLM-5: index keys beside the latent cache, each token's top-k
//! selection found and attended on the GPU). Not yet: experts beyond GPU memory (the whole
//! model must fit).

use super::{Accelerator, DeviceState};
use crate::layers::attention::QkNorms;
use crate::layers::mlp::MlpRef;
use crate::layers::moe::Experts;
use crate::model::{FfnWeights, MixerWeights, Model, State};
use crate::tensor::{MatRef, WKind};
use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
};
use std::sync::{Arc, Mutex};

const SOURCE: &str = include_str!("kernels.cu");

/// Whether the CUDA driver library can be loaded and reports at least one device.
pub fn available() -> bool {
    // SAFETY: only probes for the shared library.
    let present = unsafe { sys::is_culib_present() };
    present && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Compiles the built-in kernels to PTX for `arch` (e.g. `compute_90`) and returns the PTX's
/// length: NVRTC alone, no driver or GPU, so machines without one (CI) still catch a kernel
/// that does not compile. `None` where NVRTC cannot be loaded.
pub fn compile_check(arch: &'static str) -> Option<Result<usize>> {
    // SAFETY: only probes for the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return None;
    }
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    Some(
        cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
            .map(|ptx| ptx.to_src().len())
            .map_err(|e| anyhow!("compiling the kernels for {arch} failed: {e:?}")),
    )
}

/// Why `model` cannot run on CUDA, if it cannot.
pub fn supports(model: &Model) -> Result<()> {
    let family = &model.cfg.family;
    let ggml = |m: &crate::tensor::Mat| match m.kind {
        WKind::Ggml(t) => {
            Err(anyhow::anyhow!("GGUF {} weights are not on the CUDA backend yet: use --device cpu", t.name()))
        }
        _ => Ok(()),
    };
    ggml(&model.embed)?;
    model.lm_head.as_ref().map_or(Ok(()), ggml)?;
    for l in &model.layers {
        if let MixerWeights::Attention(a) = &l.mixer {
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].into_iter().try_for_each(ggml)?;
        }
        match &l.ffn {
            FfnWeights::Moe(m) => {
                ggml(&m.router)?;
                if let crate::layers::moe::Experts::Memory(xs) = &m.experts {
                    xs.iter().try_for_each(|x| [&x.gate, &x.up, &x.down].into_iter().try_for_each(ggml))?;
                }
            }
            FfnWeights::Dense(m) => [&m.gate, &m.up, &m.down].into_iter().try_for_each(ggml)?,
        }
    }
    for (i, l) in model.layers.iter().enumerate() {
        match &l.mixer {
            MixerWeights::DeltaNet(d) if d.cfg.k_head_dim > 128 || d.cfg.v_head_dim > 1024 => bail!(
                "layer {i}: Gated DeltaNet heads of {}x{} are above the CUDA kernel's 128x1024: use --device cpu",
                d.cfg.k_head_dim,
                d.cfg.v_head_dim
            ),
            MixerWeights::DeltaNet(d) if d.cfg.v_heads_tiled => bail!(
                "layer {i}: Gated DeltaNet with llama.cpp's tiled value-head order (a qwen35/qwen35moe GGUF) is not \
                 on the CUDA backend: use --device cpu"
            ),
            MixerWeights::Attention(a) if a.head_dim > 256 => {
                bail!("layer {i}: head_dim {} is above the CUDA attention kernel's 256: use --device cpu", a.head_dim)
            }
            MixerWeights::Attention(a) if a.gated && matches!(a.qk_norm, QkNorms::Whole { .. }) => {
                bail!(
                    "layer {i}: gated attention with a whole-width q/k norm ({family}) is not on the CUDA backend: use --device cpu"
                )
            }
            MixerWeights::Mla(m)
                if m.indexer
                    .as_ref()
                    .is_some_and(|x| dsa_scores_shared(x.spec.heads, x.spec.head_dim) > DSA_SHARED) =>
            {
                let x = &m.indexer.as_ref().expect("matched").spec;
                bail!(
                    "layer {i}: a lightning indexer of {} heads x {} needs {} B of shared memory in the CUDA score kernel, above its {DSA_SHARED}: use --device cpu",
                    x.heads,
                    x.head_dim,
                    dsa_scores_shared(x.heads, x.head_dim)
                )
            }
            MixerWeights::Mla(m)
                if m.indexer.as_ref().is_some_and(|x| {
                    x.spec.topk == 0
                        || x.spec.head_dim < m.rope_dim
                        || matches!(m.q, crate::layers::mla::QProj::Full(_))
                }) =>
            {
                bail!(
                    "layer {i}: a lightning indexer needs q-LoRA, index_topk > 0 and index_head_dim >= qk_rope_head_dim on the CUDA backend: use --device cpu"
                )
            }
            MixerWeights::Mla(m)
                if m.shares_selection
                    && !model.layers[..i]
                        .iter()
                        .any(|l| matches!(&l.mixer, MixerWeights::Mla(e) if e.indexer.is_some())) =>
            {
                bail!(
                    "layer {i}: shares the lightning indexer's selection of an earlier layer, and none has an indexer"
                )
            }
            MixerWeights::Mla(m) if m.kv_lora + m.rope_dim > MLA_ROW || !m.rope_dim.is_multiple_of(2) => bail!(
                "layer {i}: latent rows of {} + {} do not fit the CUDA latent attention kernel (at most {MLA_ROW}, an even rope part): use --device cpu",
                m.kv_lora,
                m.rope_dim
            ),
            MixerWeights::Mla(m) if ![&m.uk, &m.uv].iter().all(|w| matches!(w.kind, WKind::F32 | WKind::BF16)) => {
                bail!("layer {i}: latent attention's W_UK/W_UV in {} ({family}): use --device cpu", m.uk.kind.name())
            }
            _ => {}
        }
        let plain = |m: &crate::layers::mlp::Mlp| m.bias.is_none() && m.act == crate::config::Act::Swiglu;
        match &l.ffn {
            FfnWeights::Moe(m) => {
                let (s, e) = (&m.scoring.spec, m.router.rows);
                if s.n_group > 64 {
                    bail!("layer {i}: {} expert groups are above the CUDA router's 64: use --device cpu", s.n_group);
                }
                if e > 4096 {
                    bail!("layer {i}: {e} experts are above the CUDA router's 4096: use --device cpu");
                }
                if m.shared.as_ref().is_some_and(|sh| !plain(&sh.mlp)) {
                    bail!(
                        "layer {i}: a shared expert with biases or another activation ({family}) is not on the CUDA backend: use --device cpu"
                    );
                }
            }
            FfnWeights::Dense(m) if !plain(m) => {
                bail!(
                    "layer {i}: a dense MLP with biases or another activation ({family}) is not on the CUDA backend: use --device cpu"
                )
            }
            FfnWeights::Dense(_) => {}
        }
    }
    Ok(())
}

/// A matrix's place and format as the kernels read it (`MatD` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MatD {
    off: u64,
    soff: u64,
    boff: u64,
    rows: i32,
    cols: i32,
    kind: i32,
    bits: i32,
    group: i32,
    rb: i32,
}

// SAFETY: plain repr(C) data, laid out as the kernels' struct.
unsafe impl DeviceRepr for MatD {}

impl MatD {
    fn of(m: &MatRef<'_>, off: u64) -> MatD {
        let (rows, cols) = (m.rows as i32, m.cols as i32);
        let mut d = MatD { off, rows, cols, ..Default::default() };
        match m.kind {
            WKind::F32 => d.kind = 0,
            WKind::BF16 => d.kind = 1,
            WKind::F16 => d.kind = 2,
            WKind::Q { bits, group } => {
                let packed = crate::quant::packed_bytes(m.rows, m.cols, bits) as u64;
                let groups = m.cols.div_ceil(group as usize) as u64;
                (d.kind, d.bits, d.group) = (3, bits as i32, group as i32);
                d.rb = crate::quant::row_bytes(m.cols, bits) as i32;
                d.soff = packed;
                d.boff = packed + 2 * m.rows as u64 * groups;
            }
            WKind::Mxfp4 => {
                // every row's e2m1 nibbles (16 bytes per 32 values), then every row's scales
                let vb = m.cols.div_ceil(32) * 16;
                (d.kind, d.rb, d.soff) = (4, vb as i32, (m.rows * vb) as u64);
            }
            WKind::Ggml(_) => unreachable!("refused by `supports`"),
        }
        d
    }
}

/// Up to four one-token products in one launch (`Multi` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Multi {
    base: [u64; 4],
    m: [MatD; 4],
    y: [u64; 4],
    n: i32,
}

// SAFETY: plain repr(C) data, laid out as the kernels' struct.
unsafe impl DeviceRepr for Multi {}

/// An input quantized for the integer kernels (`QX` in kernels.cu); null `q`: the f32 input.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Qx {
    q: u64,
    d: u64,
    s16: u64,
}

// SAFETY: plain repr(C) data, laid out as the kernels' struct.
unsafe impl DeviceRepr for Qx {}

/// A product's input in the forms its kernels take: int8 for a decode product (`qx`), bf16 for
/// a prompt's products on tensor cores (`xb`); neither: the f32 rows.
#[derive(Clone, Copy, Debug, Default)]
struct Prep {
    qx: Qx,
    xb: u64,
}

/// Whether the int8-input expert kernels take `d` (`i8_ok` in kernels.cu): q4/q8 rows of whole
/// 16-byte loads, groups of whole 32s; MXFP4 rows of whole 32-value blocks.
fn i8_ok(d: &MatD) -> bool {
    if d.kind == 4 {
        return d.cols % 32 == 0;
    }
    d.kind == 3 && (d.bits == 4 || d.bits == 8) && d.cols % 32 == 0 && d.group % 32 == 0 && d.rb % 16 == 0
}

/// Whether a prompt's product on `d` runs on tensor cores (`mma_ok` in kernels.cu).
fn mma_ok(d: &MatD) -> bool {
    d.cols % 16 == 0
        && (d.kind == 1 || d.kind == 4 || (d.kind == 3 && (d.bits == 4 || d.bits == 8) && d.group % 16 == 0))
}

/// An expert block's biases (offsets from its base) and activation (`ActD` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ActD {
    bg: u64,
    bu: u64,
    bd: u64,
    bias: i32,
    clamped: i32,
    alpha: f32,
    limit: f32,
}

// SAFETY: plain repr(C) data, laid out as the kernels' struct.
unsafe impl DeviceRepr for ActD {}

/// How a router picks experts (`RouteD` in kernels.cu; device addresses of its bias vectors).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RouteD {
    lbias: u64,
    cbias: u64,
    sigmoid: i32,
    renorm: i32,
    chosen: i32,
    n_group: i32,
    topk_group: i32,
    scale: f32,
}

// SAFETY: plain repr(C) data, laid out as the kernels' struct.
unsafe impl DeviceRepr for RouteD {}

impl RouteD {
    fn of(s: &crate::config::RouterSpec, lbias: u64, cbias: u64) -> RouteD {
        RouteD {
            lbias,
            cbias,
            sigmoid: s.sigmoid as i32,
            renorm: s.renormalize as i32,
            chosen: s.softmax_chosen as i32,
            n_group: s.n_group as i32,
            topk_group: s.topk_group as i32,
            scale: s.scale,
        }
    }
}

/// A matrix in its own allocation.
struct DMat {
    _buf: CudaSlice<u8>,
    ptr: u64,
    d: MatD,
}

/// A layer's routed experts: one allocation, expert `e` at `ptr + e · stride`.
struct DExperts {
    _buf: CudaSlice<u8>,
    ptr: u64,
    stride: u64,
    gate: MatD,
    up: MatD,
    down: MatD,
    act: ActD,
}

struct DMoe {
    router: DMat,
    /// The router's logit bias and correction bias, which `route` points at.
    _route_bias: (Option<DVec>, Option<DVec>),
    route: RouteD,
    experts: DExperts,
    /// The shared expert and its gate (none: weight 1).
    shared: Option<(DExperts, Option<DVec>)>,
    top_k: usize,
}

enum DFfn {
    Moe(Box<DMoe>),
    Dense(Box<DExperts>),
}

/// Where an attention layer's q/k norms apply.
#[derive(Clone, Copy, Debug, PartialEq)]
enum NormAt {
    None,
    PerHead,
    /// Over each token's whole q (and k) projection, before the head split (MiniMax-M2).
    Whole,
}

struct DAttn {
    q: DMat,
    k: DMat,
    v: DMat,
    o: DMat,
    norm: NormAt,
    /// The q and k norms' weights and eps (`norm` not None).
    qk_norm: Option<(DVec, DVec, f32)>,
    /// Biases of q, k, v and of the output projection.
    bias: Option<[DVec; 3]>,
    o_bias: Option<DVec>,
    sinks: Option<DVec>,
    /// Positions a token attends, itself included (i32::MAX: all).
    window: i32,
    nh: usize,
    nkv: usize,
    d: usize,
    gated: bool,
    rot: usize,
    /// RoPE's frequency per rotated pair (f64) and the factor on cos and sin.
    freqs: CudaSlice<f64>,
    fscale: f32,
}

struct DDelta {
    qkv: DMat,
    z: DMat,
    b: DMat,
    a: DMat,
    out: DMat,
    conv_w: DVec,
    dt_bias: DVec,
    neg_a: DVec,
    norm_w: DVec,
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
    kern: usize,
    eps: f32,
}

impl DDelta {
    fn conv_dim(&self) -> usize {
        2 * self.nk * self.dk + self.nv * self.dv
    }
}

/// The query path of a latent-attention layer.
enum DQ {
    /// `q_proj`.
    Full(DMat),
    /// `q_b_proj(q_a_layernorm(q_a_proj x))`: the norm's weight and eps.
    LoRA { a: DMat, norm: DVec, eps: f32, b: DMat },
}

/// Multi-head latent attention (`layers::mla::Mla`): the cache holds `kvl + rd` floats per
/// position, attended in the latent space for a prompt as for decode; with DSA, each token
/// attends to its indexer's selection (`topk` positions), the index keys (`hd` floats per
/// position) in the layer state's second buffer.
struct DMla {
    q: DQ,
    kv_a: DMat,
    kv_norm: DVec,
    kv_eps: f32,
    uk: DMat,
    uv: DMat,
    o: DMat,
    nh: usize,
    nope: usize,
    rd: usize,
    kvl: usize,
    vd: usize,
    /// q-LoRA's rank (0: no q-LoRA).
    q_lora: usize,
    interleaved: bool,
    scale: f32,
    /// RoPE's frequency per rotated pair (f64) and the factor on cos and sin.
    freqs: CudaSlice<f64>,
    fscale: f32,
    /// Its lightning indexer (DSA), if it has its own.
    ix: Option<Box<DIndexer>>,
    /// The positions each token attends to (0: all): the budget of its own indexer or of the
    /// one whose selection it shares.
    topk: usize,
}

/// DSA's lightning indexer of a latent-attention layer (`layers::mla::Indexer`).
struct DIndexer {
    wq_b: DMat,
    wk: DMat,
    weights: DMat,
    /// `k_norm`'s weight and bias.
    norm: (DVec, DVec),
    heads: usize,
    hd: usize,
    interleaved: bool,
}

impl DIndexer {
    /// Floats of one token's projections: queries, key, weights.
    fn floats(&self) -> usize {
        self.heads * self.hd + self.hd + self.heads
    }
}

/// Bytes of `dsa_scores`' shared memory for an indexer of `heads` × `hd`: the queries at
/// `dsa_qstride`'s odd row stride, the weights, a key for each of the block's 8 warps.
fn dsa_scores_shared(heads: usize, hd: usize) -> usize {
    let qs = if hd % 2 == 1 { hd } else { hd + 1 };
    4 * (heads * qs + heads + 8 * hd)
}

/// The shared memory a block may take without opting in (48 KiB).
const DSA_SHARED: usize = 48 << 10;
/// Positions per block of `dsa_scores` (`DSA_SP` in kernels.cu).
const DSA_SP: usize = 64;
/// Most floats of a prompt's index scores at once (128 MB): tokens × context, in groups of
/// tokens when a chunk's scores would take more.
const DSA_SCORES: usize = 1 << 25;

impl DMla {
    fn row(&self) -> usize {
        self.kvl + self.rd
    }
}

enum DMixer {
    Attn(Box<DAttn>),
    Delta(Box<DDelta>),
    Mla(Box<DMla>),
}

struct DLayer {
    input_norm: DVec,
    post_norm: DVec,
    mixer: DMixer,
    ffn: DFfn,
}

/// An f32 vector on the device and its address.
struct DVec {
    _buf: CudaSlice<f32>,
    ptr: u64,
}

struct Kernels {
    _module: Arc<CudaModule>,
    matmul: CudaFunction,
    matvec: CudaFunction,
    matvec_q: CudaFunction,
    matvec_multi: CudaFunction,
    matvec_norm: CudaFunction,
    quant_x: CudaFunction,
    add_rmsnorm: CudaFunction,
    qk_norm_rope: CudaFunction,
    whole_norm: CudaFunction,
    attn_part: CudaFunction,
    attn_part1: CudaFunction,
    /// One token's attention for a GQA group, a lane per position (head dims 64, 128, 256).
    attn_dec: [CudaFunction; 3],
    attn_vec: [CudaFunction; 3],
    attn_merge: CudaFunction,
    delta_conv: CudaFunction,
    delta_shift: CudaFunction,
    delta_l2norm: CudaFunction,
    delta_rec: CudaFunction,
    to_bf16: CudaFunction,
    mma_matmul: CudaFunction,
    mma_gate_up_tiles: CudaFunction,
    mma_down_tiles: CudaFunction,
    swiglu_mul: CudaFunction,
    route_topk: CudaFunction,
    mla_rope_cache: CudaFunction,
    mla_absorb: CudaFunction,
    mla_part: CudaFunction,
    mla_merge: CudaFunction,
    mla_part_sel: CudaFunction,
    mla_merge_sel: CudaFunction,
    dsa_prep: CudaFunction,
    dsa_scores: CudaFunction,
    dsa_select: CudaFunction,
    mla_uv: CudaFunction,
    router_topk: CudaFunction,
    swiglu_gate_up: CudaFunction,
    swiglu_gate_up_i8: CudaFunction,
    down_sum: CudaFunction,
    down_sum_i8: CudaFunction,
    gated_add: CudaFunction,
    gather_rows: CudaFunction,
    gate_up_tiles: CudaFunction,
    down_tiles: CudaFunction,
    combine_slots: CudaFunction,
}

/// A model uploaded to one CUDA device.
pub struct CudaModel {
    name: String,
    stream: Arc<CudaStream>,
    k: Kernels,
    layers: Vec<DLayer>,
    norm: DVec,
    head: DMat,
    hidden: usize,
    vocab: usize,
    eps: f32,
    /// Floats of one (token, head) attention part: the widest attention layer's heads × (d + 2).
    part_floats: usize,
    /// Floats of a decode token's latent-attention parts per CHUNK positions (0: no such layer).
    mla_part_floats: usize,
    /// DSA: the most floats of one token's indexer projections, and the largest budget (0, 0:
    /// no indexer).
    dsa: (usize, usize),
    /// One forward pass at a time (they share the stream), and its scratch buffers.
    run: Mutex<Scratch>,
}

/// A sequence's layer states in GPU memory: per attention layer its KV cache
/// (`[pos][kv_head][head_dim]` f32, grown by doubling), per DeltaNet layer its conv history and
/// recurrent state.
struct CudaState {
    stream: Arc<CudaStream>,
    bufs: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Positions each KV cache holds room for.
    cap: usize,
    kinds: Vec<StateKind>,
}

#[derive(Clone, Copy, Debug)]
enum StateKind {
    /// Floats per position of k (and of v).
    Kv(usize),
    /// Floats per position of a latent cache and of its index keys (DSA; 0: none, the second
    /// buffer a placeholder).
    Latent(usize, usize),
    /// Floats of the conv history and of the recurrent state.
    Delta(usize, usize),
}

impl std::fmt::Debug for CudaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaState({} layers, room for {} positions)", self.bufs.len(), self.cap)
    }
}

impl DeviceState for CudaState {
    fn clone_box(&self) -> Box<dyn DeviceState> {
        let copy = |b: &CudaSlice<f32>| self.stream.clone_dtod(b).expect("copying a sequence state on the GPU");
        let bufs = self.bufs.iter().map(|(a, b)| (copy(a), copy(b))).collect();
        Box::new(CudaState { stream: self.stream.clone(), bufs, cap: self.cap, kinds: self.kinds.clone() })
    }
    fn bytes(&self) -> usize {
        self.bufs.iter().map(|(a, b)| (a.len() + b.len()) * 4).sum()
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// Whether launches may overlap the kernel before them (programmatic dependent launch, sm_90+,
/// `FLASHMOE_CUDA_PDL=1`): set once when the kernels are loaded. Off by default: on the H200 a
/// replayed decode graph already leaves ~0.1 µs between kernels, and the overlap measured
/// within noise in decode and 1–2% slower in prefill (docs/PERFORMANCE.md).
static PDL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A kernel launch, its arguments by reference as cudarc's builder takes them, issued through
/// `cuLaunchKernelEx` so that it can carry the programmatic-serialization attribute: the
/// kernel's blocks then start while the one before still runs and wait for it inside
/// (`PDL_ENTRY` in kernels.cu), which hides the launch gap and the ramp between kernels.
struct Launch<'a> {
    s: &'a CudaStream,
    f: &'a CudaFunction,
    args: Vec<*mut std::ffi::c_void>,
    _args: std::marker::PhantomData<&'a ()>,
}

fn launch<'a>(s: &'a CudaStream, f: &'a CudaFunction) -> Launch<'a> {
    Launch { s, f, args: Vec::with_capacity(12), _args: std::marker::PhantomData }
}

impl<'a> Launch<'a> {
    fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut std::ffi::c_void);
        self
    }

    /// # Safety
    /// The arguments must match the kernel's parameters, as for cudarc's `launch`.
    unsafe fn launch(&mut self, c: LaunchConfig) -> Result<(), cudarc::driver::DriverError> {
        self.s.context().bind_to_thread()?;
        // SAFETY: a plain C union; zero is a valid value of every member
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = PDL.load(std::sync::atomic::Ordering::Relaxed);
        let lc = sys::CUlaunchConfig {
            gridDimX: c.grid_dim.0,
            gridDimY: c.grid_dim.1,
            gridDimZ: c.grid_dim.2,
            blockDimX: c.block_dim.0,
            blockDimY: c.block_dim.1,
            blockDimZ: c.block_dim.2,
            sharedMemBytes: c.shared_mem_bytes,
            hStream: self.s.cu_stream(),
            attrs: &mut attr,
            numAttrs: pdl as u32,
        };
        // SAFETY: the caller's; `args` point at values that outlive this call
        unsafe { sys::cuLaunchKernelEx(&lc, self.f.cu_function(), self.args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
    }
}

fn cfg(grid: (usize, usize), block: usize, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// Warps (rows) per block of the row kernels.
const WARPS: usize = 8;
/// Warps of an `attn_vec` block (`VW` in kernels.cu).
const VEC_WARPS: usize = 16;
/// Warps of a block of `matvec_norm` (whose last block runs the norm).
const NORM_WARPS: usize = 16;
/// Rows a warp of `swiglu_gate_up_i8` computes (`GU_R` in kernels.cu).
const GU_ROWS: usize = 1;
/// Tokens the matmul kernel computes per weight read (`NT` in kernels.cu).
const NT: usize = 8;
/// Tokens per tensor-core warp tile (`MT` in kernels.cu).
const MT: usize = 32;
/// Positions per attention block (`CHUNK` in kernels.cu).
const CHUNK: usize = 128;
/// Positions per block of a decode token's latent attention (`mla_part`'s parts).
const MLA_CHUNK: usize = 64;
/// The widest latent cache row `mla_part` takes (`MLA_PL` lanes' floats × 32).
const MLA_ROW: usize = 18 * 32;
/// Heads per block of `mla_part` (`MLA_HW`), and positions per shared-memory tile (`MLA_TP`).
const MLA_HW: usize = 8;
const MLA_TP: usize = 16;
/// Longest prompt chunk a model with latent attention computes at once: its scratch grows as
/// tokens × heads × the latent row (three buffers of 2048 × 128 × 576 floats for DeepSeek-V3).
const MLA_PREFILL: usize = 2048;

impl CudaModel {
    /// Uploads every weight of `model` (streamed experts are read once, through the store).
    pub fn upload(model: &Model, ordinal: usize) -> Result<CudaModel> {
        supports(model)?;
        let (ctx, stream, k, gpu) = open(ordinal)?;
        let (free, _) = ctx.mem_get_info()?;
        let need = model_bytes(model);
        if need > free {
            bail!(
                "--device cuda:{ordinal}: the model needs {:.1} GB of GPU memory, {gpu} has {:.1} GB free: use --device cpu",
                need as f64 / 1e9,
                free as f64 / 1e9
            );
        }
        let up = Uploader { stream: stream.clone() };
        let mut layers = Vec::with_capacity(model.layers.len());
        // the budget of the last layer with an indexer, for the layers that share its selection
        let mut topk = 0;
        for (i, l) in model.layers.iter().enumerate() {
            let mixer = match &l.mixer {
                MixerWeights::DeltaNet(d) => DMixer::Delta(Box::new(DDelta {
                    qkv: up.mat(&d.in_proj_qkv.view())?,
                    z: up.mat(&d.in_proj_z.view())?,
                    b: up.mat(&d.in_proj_b.view())?,
                    a: up.mat(&d.in_proj_a.view())?,
                    out: up.mat(&d.out_proj.view())?,
                    conv_w: up.vec(&d.conv_w)?,
                    dt_bias: up.vec(&d.dt_bias)?,
                    neg_a: up.vec(&d.neg_a)?,
                    norm_w: up.vec(&d.norm_w)?,
                    nk: d.cfg.num_k_heads,
                    nv: d.cfg.num_v_heads,
                    dk: d.cfg.k_head_dim,
                    dv: d.cfg.v_head_dim,
                    kern: d.cfg.conv_kernel,
                    eps: d.eps,
                })),
                MixerWeights::Attention(a) => DMixer::Attn(Box::new(up.attention(a)?)),
                MixerWeights::Mla(m) => {
                    let d = up.mla(m, topk)?;
                    topk = d.topk;
                    DMixer::Mla(Box::new(d))
                }
            };
            let ffn = match &l.ffn {
                FfnWeights::Dense(m) => DFfn::Dense(Box::new(up.mlp(&m.view())?)),
                FfnWeights::Moe(m) => {
                    let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|v| up.vec(v)).transpose();
                    let (lb, cb) = (opt(&m.scoring.logit_bias)?, opt(&m.scoring.bias)?);
                    let at = |v: &Option<DVec>| v.as_ref().map_or(0, |v| v.ptr);
                    let route = RouteD::of(&m.scoring.spec, at(&lb), at(&cb));
                    DFfn::Moe(Box::new(DMoe {
                        router: up.mat(&m.router.view())?,
                        _route_bias: (lb, cb),
                        route,
                        experts: up
                            .experts(&m.experts, model.cfg.num_experts, m.act)
                            .with_context(|| format!("layer {i}: experts"))?,
                        shared: match &m.shared {
                            Some(s) => Some((up.mlp(&s.mlp.view())?, opt(&s.gate)?)),
                            None => None,
                        },
                        top_k: m.top_k,
                    }))
                }
            };
            layers.push(DLayer {
                input_norm: up.vec(l.input_norm.weight())?,
                post_norm: up.vec(l.post_norm.weight())?,
                mixer,
                ffn,
            });
        }
        let head = up.mat(&model.lm_head.as_ref().unwrap_or(&model.embed).view())?;
        let norm = up.vec(model.norm.weight())?;
        stream.synchronize()?;
        let part_floats = part_floats(&layers);
        let mla_part_floats = layers
            .iter()
            .map(|l| match &l.mixer {
                DMixer::Mla(a) => a.nh * (a.kvl + 2) * CHUNK.div_ceil(MLA_CHUNK),
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        let dsa = layers.iter().fold((0, 0), |(f, k), l| match &l.mixer {
            DMixer::Mla(a) => (f.max(a.ix.as_ref().map_or(0, |x| x.floats())), k.max(a.topk)),
            _ => (f, k),
        });
        Ok(CudaModel {
            name: format!("CUDA {ordinal}: {gpu}"),
            stream,
            k,
            layers,
            norm,
            head,
            hidden: model.cfg.hidden_size,
            vocab: model.cfg.vocab_size,
            eps: model.cfg.rms_norm_eps,
            part_floats,
            mla_part_floats,
            dsa,
            run: Mutex::new(Scratch::default()),
        })
    }

    fn matmul(&self, w: &DMat, x: u64, y: u64, n: usize, p: Prep) -> Result<()> {
        launch_matmul(&self.stream, &self.k, w.ptr, w.d, x, y, n, p)
    }

    /// Products of the same input `x` into their outputs: one launch for one token on the
    /// int8 input, else one product after another.
    fn matmuls(&self, jobs: &[(&DMat, u64)], x: u64, n: usize, p: Prep) -> Result<()> {
        if n != 1 || p.qx.q == 0 || jobs.len() > 4 {
            return jobs.iter().try_for_each(|(w, y)| self.matmul(w, x, *y, n, p));
        }
        let mut m = Multi { base: [0; 4], m: [jobs[0].0.d; 4], y: [0; 4], n: jobs.len() as i32 };
        for (i, (w, y)) in jobs.iter().enumerate() {
            (m.base[i], m.m[i], m.y[i]) = (w.ptr, w.d, *y);
        }
        let rows: usize = jobs.iter().map(|(w, _)| w.d.rows as usize).sum();
        let mut b = launch(&self.stream, &self.k.matvec_multi);
        b.arg(&m).arg(&x).arg(&p.qx);
        unsafe { b.launch(cfg((rows.div_ceil(WARPS), 1), 32 * WARPS, 0)) }?;
        Ok(())
    }

    fn quant(&self, fast: bool, x: u64, rows: usize, cols: usize, q: Qx) -> Result<Qx> {
        quant(&self.stream, &self.k, fast, x, rows, cols, q)
    }

    /// `values` f32 at `x` rounded to bf16 into `xb`.
    fn to_bf16(&self, x: u64, values: usize, xb: u64) -> Result<()> {
        let n = values as i64;
        let mut b = launch(&self.stream, &self.k.to_bf16);
        b.arg(&x).arg(&xb).arg(&n);
        unsafe { b.launch(cfg((values.div_ceil(256).min(4096), 1), 256, 0)) }?;
        Ok(())
    }

    /// The fast forms of `n` input rows of `cols` at `x`: int8 for one token (into `q`), bf16 for
    /// several (into `xb`); nothing when not `fast`.
    fn prep(&self, fast: bool, x: u64, n: usize, cols: usize, q: Qx, xb: u64) -> Result<Prep> {
        if !fast {
            return Ok(Prep::default());
        }
        if n == 1 {
            return Ok(Prep { qx: self.quant(true, x, 1, cols, q)?, xb: 0 });
        }
        if !cols.is_multiple_of(16) {
            return Ok(Prep::default());
        }
        self.to_bf16(x, n * cols, xb)?;
        Ok(Prep { qx: Qx::default(), xb })
    }

    /// x += y + yb (when y is not null; yb a bias row, or null); h = rmsnorm(x)·w; and h's fast
    /// form for the next products (one token's int8 form written by the norm kernel itself,
    /// into `q`).
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm(
        &self,
        x: u64,
        (y, yb): (u64, u64),
        w: &DVec,
        h: u64,
        n: usize,
        fast: bool,
        q: Qx,
        xb: u64,
    ) -> Result<Prep> {
        self.norm_rows(x, (y, yb), w, h, (self.hidden, self.eps), n, fast, q, xb)
    }

    /// [`CudaModel::add_rmsnorm`] on rows of `dim` with this `eps` (q-LoRA's latent norm too).
    #[allow(clippy::too_many_arguments)]
    fn norm_rows(
        &self,
        x: u64,
        (y, yb): (u64, u64),
        w: &DVec,
        h: u64,
        (dim, eps): (usize, f32),
        n: usize,
        fast: bool,
        q: Qx,
        xb: u64,
    ) -> Result<Prep> {
        let one = fast && n == 1 && dim.is_multiple_of(32);
        let mut b = launch(&self.stream, &self.k.add_rmsnorm);
        let dim32 = dim as i32;
        let fused = if one { q } else { Qx::default() };
        b.arg(&x).arg(&y).arg(&yb).arg(&w.ptr).arg(&h).arg(&dim32).arg(&eps).arg(&fused);
        // two values a thread (up to 1024 threads; NORM_PER, 8, held in registers at most): a
        // thread's quantized chunks are serial shuffle chains, fewer is shorter
        let threads = dim.div_ceil(2).next_multiple_of(32).clamp(32, 1024);
        unsafe { b.launch(cfg((n, 1), threads, 0)) }?;
        if one { Ok(Prep { qx: q, xb: 0 }) } else { self.prep(fast, h, n, dim, q, xb) }
    }

    /// [`swiglu`] of experts `ex` (routed by `ids`, `wts` when not null).
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &self,
        ex: &DExperts,
        ids: u64,
        wts: u64,
        k: usize,
        h: (u64, Prep),
        act: (u64, Qx),
        out: u64,
        n: usize,
    ) -> Result<()> {
        let stride = if ids == 0 { 0 } else { ex.stride };
        let m = (ex.gate, ex.up, ex.down);
        swiglu(&self.stream, &self.k, (ex.ptr, stride, ids, wts), m, ex.act, k, h, act, out, n, true)
    }

    /// out = the SwiGLU MLP of h (a dense layer, a shared expert): one token through the fused
    /// kernels; a prompt as three products (on tensor cores where `h` has its bf16 form), `tmp`
    /// holding up's rows and `xb` the activations' bf16 form.
    #[allow(clippy::too_many_arguments)]
    fn mlp(&self, m: &DExperts, h: (u64, Prep), act: (u64, Qx), tmp: u64, xb: u64, out: u64, n: usize) -> Result<()> {
        if n == 1 {
            return self.swiglu(m, 0, 0, 1, h, act, out, n);
        }
        let s = &self.stream;
        launch_matmul(s, &self.k, m.ptr, m.gate, h.0, act.0, n, h.1)?;
        launch_matmul(s, &self.k, m.ptr, m.up, h.0, tmp, n, h.1)?;
        let len = n * m.gate.rows as usize;
        let l64 = len as i64;
        let mut b = launch(s, &self.k.swiglu_mul);
        b.arg(&act.0).arg(&tmp).arg(&l64);
        unsafe { b.launch(cfg((len.div_ceil(256).min(4096), 1), 256, 0)) }?;
        let pa = self.prep(h.1.xb != 0, act.0, n, m.down.cols as usize, Qx::default(), xb)?;
        launch_matmul(s, &self.k, m.ptr, m.down, act.0, out, n, pa)
    }
}

/// Quantizes `rows` rows of `cols` at `x` into `q` for the integer kernels, when `fast` and
/// the rows fit them; else a null `Qx` (the f32 kernels).
fn quant(s: &CudaStream, k: &Kernels, fast: bool, x: u64, rows: usize, cols: usize, q: Qx) -> Result<Qx> {
    if !fast || !cols.is_multiple_of(32) {
        return Ok(Qx::default());
    }
    let (r32, c32) = (rows as i32, cols as i32);
    let mut b = launch(s, &k.quant_x);
    b.arg(&x).arg(&r32).arg(&c32).arg(&q.q).arg(&q.d).arg(&q.s16);
    unsafe { b.launch(cfg(((rows * cols / 32).div_ceil(WARPS), 1), 32 * WARPS, 0)) }?;
    Ok(q)
}

/// out = SwiGLU MLP (or the routed experts `ids` at `base + id · stride` weighted by `wts`, `k`
/// per token) of h, `n` tokens. On int8 inputs (`h.1.qx`) and q4/q8 matrices the `_i8` kernels
/// where `i8` (every load of a warp in flight at once; the down product's loads of all k
/// experts together), else the generic ones.
#[allow(clippy::too_many_arguments)]
fn swiglu(
    s: &CudaStream,
    kn: &Kernels,
    (base, stride, ids, wts): (u64, u64, u64, u64),
    m: (MatD, MatD, MatD),
    ad: ActD,
    k: usize,
    h: (u64, Prep),
    act: (u64, Qx),
    out: u64,
    n: usize,
    i8: bool,
) -> Result<()> {
    let (g, u, dn) = m;
    let k32 = k as i32;
    let qx = h.1.qx;
    let same = (u.kind, u.bits, u.group, u.rb, u.rows, u.cols) == (g.kind, g.bits, g.group, g.rb, g.rows, g.cols);
    if i8 && qx.q != 0 && i8_ok(&g) && same {
        let mut b = launch(s, &kn.swiglu_gate_up_i8);
        b.arg(&base).arg(&stride).arg(&ids).arg(&g).arg(&u).arg(&act.0).arg(&k32).arg(&qx).arg(&ad);
        unsafe { b.launch(cfg(((g.rows as usize).div_ceil(WARPS * GU_ROWS), n * k), 32 * WARPS, 0)) }?;
    } else {
        let mut b = launch(s, &kn.swiglu_gate_up);
        b.arg(&base).arg(&stride).arg(&ids).arg(&g).arg(&u).arg(&h.0).arg(&act.0).arg(&k32).arg(&qx).arg(&ad);
        unsafe { b.launch(cfg(((g.rows as usize).div_ceil(WARPS), n * k), 32 * WARPS, 0)) }?;
    }
    let qa = quant(s, kn, qx.q != 0, act.0, n * k, dn.cols as usize, act.1)?;
    let acc = 0i32;
    let grid = cfg(((dn.rows as usize).div_ceil(WARPS), n), 32 * WARPS, 0);
    if i8 && qa.q != 0 && i8_ok(&dn) {
        let mut b = launch(s, &kn.down_sum_i8);
        b.arg(&base).arg(&stride).arg(&ids).arg(&wts).arg(&dn).arg(&out).arg(&k32).arg(&acc).arg(&qa).arg(&ad);
        unsafe { b.launch(grid) }?;
    } else {
        let mut b = launch(s, &kn.down_sum);
        b.arg(&base)
            .arg(&stride)
            .arg(&ids)
            .arg(&wts)
            .arg(&dn)
            .arg(&act.0)
            .arg(&out)
            .arg(&k32)
            .arg(&acc)
            .arg(&qa)
            .arg(&ad);
        unsafe { b.launch(grid) }?;
    }
    Ok(())
}

/// The device, its stream, the compiled kernels and the GPU's name.
fn open(ordinal: usize) -> Result<(Arc<CudaContext>, Arc<CudaStream>, Kernels, String)> {
    // SAFETY: only probes for the shared libraries.
    if !unsafe { sys::is_culib_present() } {
        bail!(
            "--device cuda: the CUDA driver library (libcuda.so) was not found: install the NVIDIA driver, or use --device cpu"
        );
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "--device cuda: NVRTC (libnvrtc.so, part of the CUDA toolkit) was not found: add the toolkit's lib64 directory to LD_LIBRARY_PATH, or use --device cpu"
        );
    }
    let count = CudaContext::device_count()
        .map_err(|e| anyhow!("--device cuda: no usable CUDA device ({e}); use --device cpu"))?;
    if ordinal >= count.max(0) as usize {
        bail!("--device cuda:{ordinal}: this machine has {count} CUDA device(s); use --device cpu or a lower ordinal");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("--device cuda:{ordinal}: cannot open the device: {e}"))?;
    // one stream: no cross-stream events to track
    unsafe { ctx.disable_event_tracking() };
    // its own stream: the legacy default stream cannot be captured into a graph
    let stream = ctx.new_stream()?;
    let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let major = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    PDL.store(
        major >= 9 && std::env::var("FLASHMOE_CUDA_PDL").is_ok_and(|v| v == "1"),
        std::sync::atomic::Ordering::Relaxed,
    );
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), ..Default::default() };
    // FLASHMOE_CUDA_SOURCE: a kernels.cu to compile instead of the built-in one (kernel work
    // on a machine without Rust)
    let src = match std::env::var_os("FLASHMOE_CUDA_SOURCE") {
        Some(p) => std::fs::read_to_string(&p)
            .with_context(|| format!("FLASHMOE_CUDA_SOURCE: cannot read {}", p.to_string_lossy()))?,
        None => SOURCE.to_string(),
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| anyhow!("--device cuda: compiling the kernels for {arch} failed: {e:?}"))?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| anyhow!("--device cuda: loading the kernels failed (driver older than NVRTC?): {e}"))?;
    let f = |n: &str| module.load_function(n).with_context(|| format!("kernel {n}"));
    let k = Kernels {
        matmul: f("matmul")?,
        matvec: f("matvec")?,
        matvec_q: f("matvec_q")?,
        matvec_multi: f("matvec_multi")?,
        matvec_norm: f("matvec_norm")?,
        quant_x: f("quant_x")?,
        gather_rows: f("gather_rows")?,
        gate_up_tiles: f("gate_up_tiles")?,
        down_tiles: f("down_tiles")?,
        combine_slots: f("combine_slots")?,
        add_rmsnorm: f("add_rmsnorm")?,
        qk_norm_rope: f("qk_norm_rope")?,
        whole_norm: f("whole_norm")?,
        attn_part: f("attn_part")?,
        attn_part1: f("attn_part1")?,
        attn_dec: [f("attn_dec2")?, f("attn_dec4")?, f("attn_dec8")?],
        attn_vec: [f("attn_vec64")?, f("attn_vec128")?, f("attn_vec256")?],
        attn_merge: f("attn_merge")?,
        delta_conv: f("delta_conv")?,
        delta_shift: f("delta_shift")?,
        delta_l2norm: f("delta_l2norm")?,
        delta_rec: f("delta_rec")?,
        to_bf16: f("to_bf16")?,
        mma_matmul: f("mma_matmul")?,
        mma_gate_up_tiles: f("mma_gate_up_tiles")?,
        mma_down_tiles: f("mma_down_tiles")?,
        swiglu_mul: f("swiglu_mul")?,
        route_topk: f("route_topk")?,
        mla_rope_cache: f("mla_rope_cache")?,
        mla_absorb: f("mla_absorb")?,
        mla_part: f("mla_part")?,
        mla_merge: f("mla_merge")?,
        mla_part_sel: f("mla_part_sel")?,
        mla_merge_sel: f("mla_merge_sel")?,
        dsa_prep: f("dsa_prep")?,
        dsa_scores: f("dsa_scores")?,
        dsa_select: f("dsa_select")?,
        mla_uv: f("mla_uv")?,
        router_topk: f("router_topk")?,
        swiglu_gate_up: f("swiglu_gate_up")?,
        swiglu_gate_up_i8: f("swiglu_gate_up_i8")?,
        down_sum: f("down_sum")?,
        down_sum_i8: f("down_sum_i8")?,
        gated_add: f("gated_add")?,
        _module: module,
    };
    Ok((ctx, stream, k, gpu))
}

/// The stream and kernels the kernel tests share.
type TestDevice = Option<(Arc<CudaStream>, Kernels)>;

/// The device, stream and kernels the kernel tests share (opened at the first call).
fn test_device(ordinal: usize) -> Result<std::sync::MutexGuard<'static, TestDevice>> {
    static OPEN: Mutex<TestDevice> = Mutex::new(None);
    let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        let (_, s, k, _) = open(ordinal)?;
        *g = Some((s, k));
    }
    Ok(g)
}

/// One decode token's routed experts through the CUDA kernels (kernel tests): `experts`
/// uploaded as a layer's, `x` (hidden) routed to `ids` weighted by `wts`; returns
/// Σ_j wts[j] · SwiGLU_{ids[j]}(x). `fast`: on int8 inputs, as decode's default precision;
/// `i8`: through the `_i8` kernels where the formats allow, else the generic ones.
pub fn experts_once(
    ordinal: usize,
    experts: &[MlpRef<'_>],
    x: &[f32],
    ids: &[i32],
    wts: &[f32],
    fast: bool,
    i8: bool,
) -> Result<Vec<f32>> {
    let g = test_device(ordinal)?;
    let (s, kn) = g.as_ref().expect("opened");
    let up = Uploader { stream: s.clone() };
    let ex = up.pack(experts.len(), |put| experts.iter().enumerate().try_for_each(|(e, m)| put(e, m)))?;
    let (hidden, inter, k) = (ex.gate.cols as usize, ex.gate.rows as usize, ids.len());
    let (xb, ib, wb) = (s.clone_htod(x)?, s.clone_htod(ids)?, s.clone_htod(wts)?);
    let (act, out) = (s.alloc_zeros::<f32>(k * inter)?, s.alloc_zeros::<f32>(hidden)?);
    let (qx, qa) = (QBuf::new(s, hidden)?, QBuf::new(s, k * inter)?);
    let px = ptr(&xb, s);
    let prep = Prep { qx: quant(s, kn, fast, px, 1, hidden, qx.qx(s))?, xb: 0 };
    let io = (ex.ptr, ex.stride, ptr(&ib, s), ptr(&wb, s));
    let m = (ex.gate, ex.up, ex.down);
    swiglu(s, kn, io, m, ex.act, k, (px, prep), (ptr(&act, s), qa.qx(s)), ptr(&out, s), 1, i8)?;
    Ok(s.clone_dtoh(&out)?)
}

/// `y = W·x` for `n` tokens through the CUDA matmul kernel (kernel tests against the scalar
/// reference; `W` uploaded for the call).
/// `fast`: the products the default precision runs: one token's on the int8 input (q4/q8 rows),
/// several tokens' on tensor cores (bf16 inputs; bf16, q4 and q8 rows).
pub fn matmul_once(ordinal: usize, w: &MatRef<'_>, x: &[f32], n: usize, fast: bool) -> Result<Vec<f32>> {
    let g = test_device(ordinal)?;
    let (s, k) = g.as_ref().expect("opened");
    let wb = s.clone_htod(w.data)?;
    let (xb, yb) = (s.clone_htod(x)?, s.alloc_zeros::<f32>(n * w.rows)?);
    let (px, py) = (ptr(&xb, s), ptr(&yb, s));
    let q = QBuf::new(s, w.cols)?;
    let qx = if fast && n == 1 && w.cols.is_multiple_of(32) {
        let (one, c32, qx) = (1i32, w.cols as i32, q.qx(s));
        let mut b = launch(s, &k.quant_x);
        b.arg(&px).arg(&one).arg(&c32).arg(&qx.q).arg(&qx.d).arg(&qx.s16);
        unsafe { b.launch(cfg(((w.cols / 32).div_ceil(WARPS), 1), 32 * WARPS, 0)) }?;
        qx
    } else {
        Qx::default()
    };
    let xbf = s.alloc_zeros::<u16>(n * w.cols)?;
    let xb = if fast && n > 1 {
        let (len, pxb) = ((n * w.cols) as i64, ptr(&xbf, s));
        let mut b = launch(s, &k.to_bf16);
        b.arg(&px).arg(&pxb).arg(&len);
        unsafe { b.launch(cfg(((n * w.cols).div_ceil(256).min(4096), 1), 256, 0)) }?;
        pxb
    } else {
        0
    };
    launch_matmul(s, k, ptr(&wb, s), MatD::of(w, 0), px, py, n, Prep { qx, xb })?;
    Ok(s.clone_dtoh(&yb)?)
}

/// Room for `len` quantized input values.
struct QBuf {
    q: CudaSlice<i8>,
    d: CudaSlice<f32>,
    s16: CudaSlice<f32>,
}

impl QBuf {
    fn new(s: &Arc<CudaStream>, len: usize) -> Result<QBuf> {
        let len = len.next_multiple_of(32).max(32);
        Ok(QBuf {
            q: s.alloc_zeros::<i8>(len)?,
            d: s.alloc_zeros::<f32>(len / 32)?,
            s16: s.alloc_zeros::<f32>(len / 16)?,
        })
    }
    fn qx(&self, s: &CudaStream) -> Qx {
        Qx { q: ptr(&self.q, s), d: ptr(&self.d, s), s16: ptr(&self.s16, s) }
    }
}

/// Routes `n` tokens' router logits at `logits` (`e` each) to `k` experts each: ids and
/// weights into `ids`, `wts`.
#[allow(clippy::too_many_arguments)]
fn route(
    s: &CudaStream,
    kn: &Kernels,
    logits: u64,
    e: i32,
    k: i32,
    rd: RouteD,
    ids: u64,
    wts: u64,
    n: usize,
) -> Result<()> {
    let mut lb = launch(s, &kn.route_topk);
    lb.arg(&logits).arg(&e).arg(&k).arg(&rd).arg(&ids).arg(&wts);
    unsafe { lb.launch(cfg((n, 1), 32, 8 * e as usize)) }?;
    Ok(())
}

/// `n` tokens' router logits (`logits`, n × experts) through the CUDA router (kernel tests
/// against `moe::route`): each token's `k` (expert, weight), best first.
pub fn route_once(
    ordinal: usize,
    logits: &[f32],
    n: usize,
    k: usize,
    scoring: &crate::layers::moe::Scoring,
) -> Result<Vec<Vec<(usize, f32)>>> {
    let g = test_device(ordinal)?;
    let (s, kn) = g.as_ref().expect("opened");
    let e = logits.len() / n;
    let lb = scoring.logit_bias.as_deref().map(|v| s.clone_htod(v)).transpose()?;
    let cb = scoring.bias.as_deref().map(|v| s.clone_htod(v)).transpose()?;
    let at = |v: &Option<CudaSlice<f32>>| v.as_ref().map_or(0, |v| ptr(v, s));
    let rd = RouteD::of(&scoring.spec, at(&lb), at(&cb));
    let lg = s.clone_htod(logits)?;
    let (ids, wts) = (s.alloc_zeros::<i32>(n * k)?, s.alloc_zeros::<f32>(n * k)?);
    route(s, kn, ptr(&lg, s), e as i32, k as i32, rd, ptr(&ids, s), ptr(&wts, s), n)?;
    let (ids, wts) = (s.clone_dtoh(&ids)?, s.clone_dtoh(&wts)?);
    Ok((0..n).map(|t| (0..k).map(|j| (ids[t * k + j] as usize, wts[t * k + j])).collect()).collect())
}

/// One decode token's latent attention through `mla_part` and `mla_merge` (kernel tests):
/// the query `qc` (heads × (kvl + rd), already in the latent space) over the cached `rows`
/// (positions × (kvl + rd)), the context split in parts of MLA_CHUNK positions with `spare`
/// empty parts past its end (as a decode graph's grid covers the cache's capacity), and whole
/// in one part (a prompt's path). Returns both `[heads][kvl]` outputs.
pub fn mla_attend_once(
    ordinal: usize,
    qc: &[f32],
    rows: &[f32],
    (nh, kvl, rd): (usize, usize, usize),
    spare: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    mla_attend(ordinal, qc, rows, (nh, kvl, rd), spare, None)
}

/// [`mla_attend_once`] over the positions of `sel` alone (ascending, as `dsa_select` writes
/// them), through `mla_part_sel` and `mla_merge_sel`: a budget of `sel.len()` positions.
pub fn mla_attend_selected_once(
    ordinal: usize,
    qc: &[f32],
    rows: &[f32],
    (nh, kvl, rd): (usize, usize, usize),
    spare: usize,
    sel: &[u32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    mla_attend(ordinal, qc, rows, (nh, kvl, rd), spare, Some(sel))
}

fn mla_attend(
    ordinal: usize,
    qc: &[f32],
    rows: &[f32],
    (nh, kvl, rd): (usize, usize, usize),
    spare: usize,
    sel: Option<&[u32]>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let g = test_device(ordinal)?;
    let (s, kn) = g.as_ref().expect("opened");
    let lw = kvl + rd;
    if lw > MLA_ROW || qc.len() != nh * lw || rows.is_empty() || !rows.len().is_multiple_of(lw) {
        bail!("mla_attend_once: sizes do not fit the kernel");
    }
    let len = rows.len() / lw;
    if sel.is_some_and(|p| p.is_empty() || p.len() > len || p.iter().any(|&r| r as usize >= len)) {
        bail!("mla_attend_selected_once: a selection of 1..=positions rows within the cache");
    }
    let (q, cache) = (s.clone_htod(qc)?, s.clone_htod(rows)?);
    let meta = s.clone_htod(&[len as i64 - 1, ptr(&cache, s) as i64, 0])?;
    let picked: Vec<i32> = sel.unwrap_or(&[]).iter().map(|&r| r as i32).collect();
    let psel = s.clone_htod(&picked[..].iter().copied().chain([0]).collect::<Vec<i32>>())?;
    let (psel, topk32) = (ptr(&psel, s), picked.len() as i32);
    // the parts a decode graph's grid gives for this many positions
    let parts = len.div_ceil(MLA_CHUNK) + spare;
    let part = s.alloc_zeros::<f32>(nh * parts * (kvl + 2))?;
    let (split, whole) = (s.alloc_zeros::<f32>(nh * kvl)?, s.alloc_zeros::<f32>(nh * kvl)?);
    let (nh32, kvl32, rd32, layer) = (nh as i32, kvl as i32, rd as i32, 0i32);
    let (pq, pm, pp) = (ptr(&q, s), ptr(&meta, s), ptr(&part, s));
    let selected = sel.is_some();
    for (out, mp, chunk) in [(&split, parts, MLA_CHUNK), (&whole, 1, i32::MAX as usize)] {
        let (mp32, ch32, po) = (mp as i32, chunk as i32, ptr(out, s));
        let mut lb = launch(s, if selected { &kn.mla_part_sel } else { &kn.mla_part });
        lb.arg(&pq).arg(&pm).arg(&layer).arg(&pp).arg(&po).arg(&nh32).arg(&kvl32).arg(&rd32).arg(&mp32).arg(&ch32);
        if selected {
            lb.arg(&psel).arg(&topk32);
        }
        unsafe { lb.launch(cfg((nh.div_ceil(MLA_HW), mp), 32 * MLA_HW, 4 * MLA_TP * lw)) }?;
        if mp > 1 {
            let mut lb = launch(s, if selected { &kn.mla_merge_sel } else { &kn.mla_merge });
            lb.arg(&pp).arg(&pm).arg(&po).arg(&nh32).arg(&kvl32).arg(&mp32).arg(&ch32);
            if selected {
                lb.arg(&topk32);
            }
            unsafe { lb.launch(cfg((nh, 1), kvl.next_multiple_of(32).min(256), 4 * mp)) }?;
        }
    }
    Ok((s.clone_dtoh(&split)?, s.clone_dtoh(&whole)?))
}

/// Each token's index scores (of its positions 0..=pos) and selection ([`indexer_once`]).
pub type IndexerOut = (Vec<Vec<f32>>, Vec<Vec<u32>>);

/// The lightning indexer's scores and selection on the GPU (`dsa_scores`, `dsa_select`; kernel
/// tests against `layers::mla::Indexer`): `n` tokens at positions `pos0..pos0 + n` with their
/// rotated queries `q` (n × heads × hd) and weights `w` (n × heads) over the cached index
/// `keys` (at least pos0 + n rows of hd), `group` tokens per launch, each token's scores row
/// `spare` positions longer than the context (as a decode graph's grid covers the cache's
/// capacity). Returns each token's scores of its positions 0..=pos and its selection (all of
/// them while it sees at most `topk`).
#[allow(clippy::too_many_arguments)]
pub fn indexer_once(
    ordinal: usize,
    q: &[f32],
    w: &[f32],
    keys: &[f32],
    (heads, hd): (usize, usize),
    (pos0, n): (usize, usize),
    topk: usize,
    (group, spare): (usize, usize),
) -> Result<IndexerOut> {
    let g = test_device(ordinal)?;
    let (s, kn) = g.as_ref().expect("opened");
    let shared = dsa_scores_shared(heads, hd);
    if n == 0
        || group == 0
        || topk == 0
        || q.len() != n * heads * hd
        || w.len() != n * heads
        || keys.len() < (pos0 + n) * hd
        || shared > DSA_SHARED
    {
        bail!("indexer_once: sizes do not fit the kernels");
    }
    let stride = pos0 + n + spare;
    let (dq, dw, dk) = (s.clone_htod(q)?, s.clone_htod(w)?, s.clone_htod(keys)?);
    let meta = s.clone_htod(&[pos0 as i64, 0, ptr(&dk, s) as i64])?;
    let scores = s.alloc_zeros::<f32>(group * stride)?;
    let sel = s.alloc_zeros::<i32>(n * topk)?;
    let (pq, pw, pm, ps, psel) = (ptr(&dq, s), ptr(&dw, s), ptr(&meta, s), ptr(&scores, s), ptr(&sel, s));
    let (layer, heads32, hd32, stride64, topk32) = (0i32, heads as i32, hd as i32, stride as i64, topk as i32);
    let mut all = Vec::with_capacity(n);
    for t0 in (0..n).step_by(group) {
        let (m, t032) = (group.min(n - t0), t0 as i32);
        let mut lb = launch(s, &kn.dsa_scores);
        lb.arg(&pq).arg(&pw).arg(&pm).arg(&layer).arg(&t032).arg(&heads32).arg(&hd32).arg(&ps).arg(&stride64);
        unsafe { lb.launch(cfg((m, stride.div_ceil(DSA_SP)), 256, shared)) }?;
        let mut lb = launch(s, &kn.dsa_select);
        lb.arg(&ps).arg(&stride64).arg(&pm).arg(&t032).arg(&topk32).arg(&psel);
        unsafe { lb.launch(cfg((m, 1), 1024, 0)) }?;
        let got = s.clone_dtoh(&scores)?;
        for t in 0..m {
            all.push(got[t * stride..t * stride + pos0 + t0 + t + 1].to_vec());
        }
    }
    let sel = s.clone_dtoh(&sel)?;
    let picked = (0..n)
        .map(|t| sel[t * topk..t * topk + (pos0 + t + 1).min(topk)].iter().map(|&p| p as u32).collect())
        .collect();
    Ok((all, picked))
}

/// One decode token's attention (test hook): queries `q` ([heads][d], or [heads][2d] with
/// each head's output gate after its query, as Qwen3.5 and Qwen3-Next lay them out) over `len`
/// cached positions of k and v ([len][kv heads][d]) within the last `window` positions, in
/// parts of CHUNK with `spare` empty parts past the end (a decode graph's grid covers the
/// cache's capacity), merged (and gated). Returns `[heads][d]` through `attn_vec` and through
/// `attn_dec` (each where it takes the shape, else empty), and through `attn_part1`.
pub fn gqa_attend_once(
    ordinal: usize,
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    (nh, nkv, d): (usize, usize, usize),
    window: usize,
    spare: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let g = test_device(ordinal)?;
    let (s, kn) = g.as_ref().expect("opened");
    let row = nkv * d;
    let qw = q.len() / nh.max(1);
    if nkv == 0
        || !nh.is_multiple_of(nkv)
        || (q.len() != nh * d && q.len() != nh * 2 * d)
        || k.len() != v.len()
        || k.is_empty()
        || !k.len().is_multiple_of(row)
    {
        bail!("gqa_attend_once: sizes do not fit");
    }
    let len = k.len() / row;
    let (qd, kc, vc) = (s.clone_htod(q)?, s.clone_htod(k)?, s.clone_htod(v)?);
    let meta = s.clone_htod(&[len as i64 - 1, ptr(&kc, s) as i64, ptr(&vc, s) as i64])?;
    let parts = len.div_ceil(CHUNK) + spare;
    let part = s.alloc_zeros::<f32>(nh * parts * VEC_SUB * (d + 2))?;
    let (nh32, nkv32, d32, parts32, layer, w32) =
        (nh as i32, nkv as i32, d as i32, parts as i32, 0i32, window.min(i32::MAX as usize) as i32);
    let (qw32, gated) = (qw as i32, (qw == 2 * d) as i32);
    let (pq, pm, pp) = (ptr(&qd, s), ptr(&meta, s), ptr(&part, s));
    let merge = |out: &CudaSlice<f32>, parts32: i32| -> Result<Vec<f32>> {
        let (po, oq, sinks) = (ptr(out, s), Qx::default(), 0u64);
        let mut lb = launch(s, &kn.attn_merge);
        lb.arg(&pq).arg(&pp).arg(&po).arg(&nh32).arg(&d32).arg(&qw32).arg(&gated).arg(&parts32).arg(&oq).arg(&sinks);
        unsafe { lb.launch(cfg((nh, 1), 128, 0)) }?;
        Ok(s.clone_dtoh(out)?)
    };
    let mut vec = Vec::new();
    if let Some((f, gh)) = vec_heads(nh, nkv, d) {
        let (out, gh32, vparts) = (s.alloc_zeros::<f32>(nh * d)?, gh as i32, (parts * VEC_SUB) as i32);
        let mut lb = launch(s, &kn.attn_vec[f]);
        lb.arg(&pq).arg(&pm).arg(&layer).arg(&pp).arg(&nh32).arg(&nkv32).arg(&qw32).arg(&vparts).arg(&w32).arg(&gh32);
        unsafe { lb.launch(cfg((nh / gh, parts * VEC_SUB), 32 * VEC_WARPS, 0)) }?;
        vec = merge(&out, vparts)?;
    }
    let mut dec = Vec::new();
    if let Some((f, gh)) = dec_heads(nh, nkv, d, parts) {
        let (out, gh32) = (s.alloc_zeros::<f32>(nh * d)?, gh as i32);
        let mut lb = launch(s, &kn.attn_dec[f]);
        lb.arg(&pq).arg(&pm).arg(&layer).arg(&pp).arg(&nh32).arg(&nkv32).arg(&qw32).arg(&parts32).arg(&w32).arg(&gh32);
        unsafe { lb.launch(cfg((nh / gh, parts), 128, 0)) }?;
        dec = merge(&out, parts32)?;
    }
    let out = s.alloc_zeros::<f32>(nh * d)?;
    let mut lb = launch(s, &kn.attn_part1);
    lb.arg(&pq).arg(&pm).arg(&layer).arg(&pp).arg(&nh32).arg(&nkv32).arg(&d32).arg(&qw32).arg(&parts32).arg(&w32);
    unsafe { lb.launch(cfg((nh, parts), 128, 0)) }?;
    Ok((vec, dec, merge(&out, parts32)?))
}

/// y = W·x for `n` tokens: one token per warp and row (decode; on the int8 input where `qx`
/// has one), or 8 per weight read.
#[allow(clippy::too_many_arguments)]
fn launch_matmul(s: &CudaStream, k: &Kernels, base: u64, d: MatD, x: u64, y: u64, n: usize, p: Prep) -> Result<()> {
    let grid = |per: usize| cfg(((d.rows as usize).div_ceil(WARPS), n.div_ceil(per)), 32 * WARPS, 0);
    let n32 = n as i32;
    if n == 1 && p.qx.q != 0 {
        let mut b = launch(s, &k.matvec_q);
        b.arg(&base).arg(&d).arg(&x).arg(&y).arg(&p.qx);
        unsafe { b.launch(grid(1)) }?;
        return Ok(());
    }
    if n > 1 && p.xb != 0 && mma_ok(&d) {
        let mut b = launch(s, &k.mma_matmul);
        b.arg(&base).arg(&d).arg(&p.xb).arg(&y).arg(&n32);
        unsafe { b.launch(cfg(((d.rows as usize).div_ceil(64), n.div_ceil(MT)), 128, 0)) }?;
        return Ok(());
    }
    let (f, per) = if n == 1 { (&k.matvec, 1) } else { (&k.matmul, NT) };
    let mut b = launch(s, f);
    b.arg(&base).arg(&d).arg(&x).arg(&y).arg(&n32);
    unsafe { b.launch(grid(per)) }?;
    Ok(())
}

/// Device memory the weights will take.
fn model_bytes(model: &Model) -> usize {
    let experts: usize = model
        .layers
        .iter()
        .map(|l| match &l.ffn {
            FfnWeights::Moe(m) => match &m.experts {
                Experts::Memory(v) => v.iter().map(|e| e.bytes()).sum(),
                Experts::Flash { store, .. } => store.layout.stride * model.cfg.num_experts,
            },
            FfnWeights::Dense(_) => 0,
        })
        .sum();
    let lm = if model.lm_head.is_some() { 0 } else { model.embed.bytes() };
    model.weight_bytes() - model.embed.bytes() + lm + experts
}

struct Uploader {
    stream: Arc<CudaStream>,
}

impl Uploader {
    fn raw(&self, b: &[u8]) -> Result<(CudaSlice<u8>, u64)> {
        let s = self.stream.clone_htod(b).context("uploading weights to the GPU")?;
        let p = ptr(&s, &self.stream);
        Ok((s, p))
    }
    fn mat(&self, m: &MatRef<'_>) -> Result<DMat> {
        let (buf, p) = self.raw(m.data)?;
        Ok(DMat { _buf: buf, ptr: p, d: MatD::of(m, 0) })
    }
    fn vec(&self, v: &[f32]) -> Result<DVec> {
        let s = self.stream.clone_htod(v).context("uploading weights to the GPU")?;
        let p = ptr(&s, &self.stream);
        Ok(DVec { _buf: s, ptr: p })
    }
    fn attention(&self, a: &crate::layers::attention::Attention) -> Result<DAttn> {
        let (rot, _) = a.rope.params();
        let (freqs, fscale) = a.rope.freqs();
        let mut f = freqs.to_vec();
        f.resize(f.len().max(1), 0.0);
        let (norm, qk_norm) = match &a.qk_norm {
            QkNorms::None => (NormAt::None, None),
            QkNorms::PerHead { q, k } => (NormAt::PerHead, Some((q, k))),
            QkNorms::Whole { q, k } => (NormAt::Whole, Some((q, k))),
        };
        let qk_norm = match qk_norm {
            Some((q, k)) => Some((self.vec(q.weight())?, self.vec(k.weight())?, q.eps())),
            None => None,
        };
        let bias = match &a.bias {
            Some([q, k, v]) => Some([self.vec(q)?, self.vec(k)?, self.vec(v)?]),
            None => None,
        };
        let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|v| self.vec(v)).transpose();
        Ok(DAttn {
            q: self.mat(&a.q_proj.view())?,
            k: self.mat(&a.k_proj.view())?,
            v: self.mat(&a.v_proj.view())?,
            o: self.mat(&a.o_proj.view())?,
            norm,
            qk_norm,
            bias,
            o_bias: opt(&a.o_bias)?,
            sinks: opt(&a.sinks)?,
            window: a.window.map_or(i32::MAX, |w| w.min(i32::MAX as usize) as i32),
            nh: a.num_heads,
            nkv: a.num_kv_heads,
            d: a.head_dim,
            gated: a.gated,
            rot,
            freqs: self.stream.clone_htod(&f).context("uploading weights to the GPU")?,
            fscale: fscale as f32,
        })
    }

    /// `shared_topk`: the budget of the selection the layer shares, if it does.
    fn mla(&self, m: &crate::layers::mla::Mla, shared_topk: usize) -> Result<DMla> {
        use crate::layers::mla::QProj;
        let (freqs, fscale) = m.rope.freqs();
        let mut f = freqs.to_vec();
        f.resize(f.len().max(1), 0.0);
        let (q, q_lora) = match &m.q {
            QProj::Full(w) => (DQ::Full(self.mat(&w.view())?), 0),
            QProj::LoRA { a, norm, b } => (
                DQ::LoRA {
                    a: self.mat(&a.view())?,
                    norm: self.vec(norm.weight())?,
                    eps: norm.eps(),
                    b: self.mat(&b.view())?,
                },
                a.rows,
            ),
        };
        Ok(DMla {
            q,
            kv_a: self.mat(&m.kv_a.view())?,
            kv_norm: self.vec(m.kv_norm.weight())?,
            kv_eps: m.kv_norm.eps(),
            uk: self.mat(&m.uk.view())?,
            uv: self.mat(&m.uv.view())?,
            o: self.mat(&m.o_proj.view())?,
            nh: m.num_heads,
            nope: m.nope,
            rd: m.rope_dim,
            kvl: m.kv_lora,
            vd: m.v_dim,
            q_lora,
            interleaved: m.interleaved,
            scale: m.scale,
            freqs: self.stream.clone_htod(&f).context("uploading weights to the GPU")?,
            fscale: fscale as f32,
            ix: match &m.indexer {
                Some(x) => Some(Box::new(DIndexer {
                    wq_b: self.mat(&x.wq_b.view())?,
                    wk: self.mat(&x.wk.view())?,
                    weights: self.mat(&x.weights.view())?,
                    norm: (self.vec(&x.k_norm.0)?, self.vec(&x.k_norm.1)?),
                    heads: x.spec.heads,
                    hd: x.spec.head_dim,
                    interleaved: x.spec.interleaved,
                })),
                None => None,
            },
            topk: match &m.indexer {
                Some(x) => x.spec.topk,
                None if m.shares_selection => shared_topk,
                None => 0,
            },
        })
    }

    fn mlp(&self, m: &MlpRef<'_>) -> Result<DExperts> {
        self.pack(1, |put| put(0, m))
    }

    /// `n` SwiGLU experts in one allocation, expert `e` at `e · stride`, its gate, up and down at
    /// 256-byte-aligned offsets; `fill` hands each expert to `put`.
    fn pack(
        &self,
        n: usize,
        fill: impl FnOnce(&mut dyn FnMut(usize, &MlpRef<'_>) -> Result<()>) -> Result<()>,
    ) -> Result<DExperts> {
        let a = |x: usize| x.next_multiple_of(256);
        let mut host: Vec<u8> = Vec::new();
        let mut layout: Option<(MatD, MatD, MatD, usize)> = None;
        // expert 0's bias offsets (if it has biases) and activation
        let mut first_bias: Option<Option<(u64, u64, u64)>> = None;
        let mut act_kind = crate::config::Act::Swiglu;
        let mut put = |e: usize, m: &MlpRef<'_>| -> Result<()> {
            let (uo, dn) = (a(m.gate.data.len()), a(a(m.gate.data.len()) + m.up.data.len()));
            let end = a(dn + m.down.data.len());
            // the biases (f32) after the matrices
            let (inter, hidden) = (m.gate.rows, m.down.rows);
            let (bg, bu) = (end, a(end + 4 * inter));
            let bd = a(bu + 4 * inter);
            let stride = if m.bias.is_some() { a(bd + 4 * hidden) } else { end };
            let l = (MatD::of(&m.gate, 0), MatD::of(&m.up, uo as u64), MatD::of(&m.down, dn as u64), stride);
            let first = *layout.get_or_insert(l);
            let mine = m.bias.map(|_| (bg as u64, bu as u64, bd as u64));
            if first_bias.is_none() {
                act_kind = m.act;
            }
            let fb = *first_bias.get_or_insert(mine);
            let key = |l: &(MatD, MatD, MatD, usize)| (l.0.kind, l.0.bits, l.0.rows, l.0.cols, l.2.kind, l.2.bits, l.3);
            if key(&first) != key(&l) || e >= n || fb != mine || m.act != act_kind {
                bail!("expert {e} differs in format, shape or biases from expert 0");
            }
            if host.is_empty() {
                host.resize(n * stride, 0);
            }
            let at = e * stride;
            for (part, off) in [(m.gate.data, 0), (m.up.data, uo), (m.down.data, dn)] {
                host[at + off..at + off + part.len()].copy_from_slice(part);
            }
            if let Some(b) = m.bias {
                for (part, off) in b.iter().zip([bg, bu, bd]) {
                    let bytes: &[u8] = bytemuck::cast_slice(part);
                    host[at + off..at + off + bytes.len()].copy_from_slice(bytes);
                }
            }
            Ok(())
        };
        fill(&mut put)?;
        let (gate, up, down, stride) = layout.ok_or_else(|| anyhow!("a MoE layer without experts"))?;
        let (buf, p) = self.raw(&host)?;
        let mut act = ActD::default();
        if let Some((bg, bu, bd)) = first_bias.flatten() {
            (act.bg, act.bu, act.bd, act.bias) = (bg, bu, bd, 1);
        }
        if let crate::config::Act::ClampedSwiglu { alpha, limit } = act_kind {
            (act.clamped, act.alpha, act.limit) = (1, alpha, limit);
        }
        Ok(DExperts { _buf: buf, ptr: p, stride: stride as u64, gate, up, down, act })
    }

    /// Every routed expert of a layer (read once through the store when streamed), `act` their
    /// activation.
    fn experts(&self, ex: &Experts, n: usize, act: crate::config::Act) -> Result<DExperts> {
        self.pack(n, |put| match ex {
            Experts::Memory(v) => v.iter().enumerate().try_for_each(|(e, m)| put(e, &m.view())),
            Experts::Flash { store, layer } => {
                let failed = std::cell::RefCell::new(None);
                let put = std::cell::RefCell::new(put);
                let ids: Vec<usize> = (0..n).collect();
                for chunk in ids.chunks(8) {
                    store.with_experts(
                        *layer,
                        chunk,
                        || {},
                        |batch| {
                            for &(i, extent) in batch {
                                if let Err(e) = (put.borrow_mut())(chunk[i], &store.layout.mlp(extent, act)) {
                                    failed.borrow_mut().get_or_insert(e);
                                }
                            }
                        },
                    )?;
                }
                failed.into_inner().map_or(Ok(()), Err)
            }
        })
    }
}

impl Accelerator for CudaModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn forward(&self, model: &Model, st: &mut State, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        if self.mla_part_floats > 0 && tokens.len() > MLA_PREFILL {
            let mut logits = Vec::new();
            for (i, c) in tokens.chunks(MLA_PREFILL).enumerate() {
                let last = (i + 1) * MLA_PREFILL >= tokens.len();
                let l = self.forward(model, st, c, all_logits)?;
                if all_logits || last {
                    logits.extend(l);
                }
            }
            return Ok(logits);
        }
        let t0 = std::time::Instant::now();
        let mut guard = self.run.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let (n, h, s) = (tokens.len(), self.hidden, &self.stream);
        self.reserve(st, st.pos + n)?;
        let ds = st.device.as_mut().expect("reserved").as_any().downcast_mut::<CudaState>().expect("a CUDA state");
        let k = model.opts.experts_per_token;
        let fast = model.opts.precision == crate::tensor::Precision::Fast;
        let widest = self.layers.iter().map(|l| scratch_floats(l, n, h, k)).max().unwrap_or(0);
        // attention parts: a replayed decode graph covers the cache's capacity (blocks past the
        // sequence's end return at once), other calls what they attend
        let graph = n == 1 && graphs();
        let parts = if graph { ds.cap } else { st.pos + n }.div_ceil(CHUNK);
        // a decode token's latent attention splits its context too (prompts attend whole)
        let mla_parts = if n == 1 { self.mla_part_floats * parts } else { 0 };
        // (a decode token's attn_vec writes VEC_SUB parts to a CHUNK)
        let part = (n * self.part_floats * parts * if n == 1 { VEC_SUB } else { 1 }).max(mla_parts);
        let sizes = [n * h, widest, n * 64, n * self.vocab, 1 + 2 * self.layers.len(), part];
        let fresh = sc.fit(s, sizes)?;
        let fresh = self.fit_dsa(sc.bufs.as_mut().expect("fitted"), s, n, parts * CHUNK)? || fresh;
        // the embeddings and the positions and caches, through host buffers kept between calls
        sc.host_x.clear();
        sc.host_x.resize(n * h, 0.0);
        for (t, &id) in tokens.iter().enumerate() {
            model.embed.row_f32(id as usize, &mut sc.host_x[t * h..(t + 1) * h]);
        }
        sc.host_meta.clear();
        sc.host_meta.push(st.pos as i64);
        for (a, b) in &ds.bufs {
            sc.host_meta.extend([ptr(a, s) as i64, ptr(b, s) as i64]);
        }
        let b = sc.bufs.as_mut().expect("fitted");
        s.memcpy_htod(&sc.host_meta, &mut b.meta)?;
        s.memcpy_htod(&sc.host_x, &mut b.x.slice_mut(..n * h))?;
        let m = if all_logits { n } else { 1 };
        if graph {
            // decode: one graph per scratch allocation and expert count, replayed every token
            let key = (k, fast, parts);
            if fresh || sc.graph.as_ref().is_none_or(|g| g.0 != key) {
                sc.graph = None;
                let mut capture = || -> Result<Graph> {
                    s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                    let pass = self.pass(b, 1, k, 1, fast, parts);
                    let graph = s.end_capture(sys::CUgraphInstantiate_flags(0));
                    pass?;
                    Ok(Graph(graph?.ok_or_else(|| anyhow!("CUDA graph capture produced no graph"))?))
                };
                let graph = match capture() {
                    // a driver that cannot capture overlapping launches: capture plain ones
                    Err(e) if PDL.swap(false, std::sync::atomic::Ordering::Relaxed) => {
                        eprintln!(
                            "warning: CUDA graph capture with programmatic dependent launch failed ({e:#}); capturing without it"
                        );
                        capture()?
                    }
                    g => g?,
                };
                sc.graph = Some((key, graph));
            }
            sc.graph.as_ref().expect("captured").1.0.launch()?;
        } else {
            self.pass(b, n, k, m, fast, parts)?;
        }
        let t1 = std::time::Instant::now();
        let (t2, t3, finite);
        let b = sc.bufs.as_ref().expect("fitted");
        let len = m * self.vocab;
        let out = if m == 1 {
            // one row (decode): through the pinned buffer, exactly a row long (the copy takes
            // the host side's length)
            if sc.host_logits.is_none() {
                // SAFETY: written by the copy below before it is read; no flags: cached host
                // memory, which the host reads fast (write-combined memory is not)
                sc.host_logits = Some(unsafe { s.context().alloc_pinned_with_flags::<f32>(len, 0) }?);
            }
            let pinned = sc.host_logits.as_mut().expect("allocated");
            s.memcpy_dtoh(&b.logits.slice(..len), pinned).map_err(|e| anyhow!("CUDA forward pass failed: {e}"))?;
            s.synchronize().map_err(|e| anyhow!("CUDA forward pass failed: {e}"))?;
            t2 = std::time::Instant::now();
            // the check first, from memory the copy left in no cache; the copy out then reads
            // the host's caches
            let src = pinned.as_slice()?;
            finite = crate::model::all_finite(src);
            t3 = std::time::Instant::now();
            src.to_vec()
        } else {
            let mut out = vec![0f32; len];
            s.synchronize()?;
            t2 = std::time::Instant::now();
            s.memcpy_dtoh(&b.logits.slice(..len), &mut out).map_err(|e| anyhow!("CUDA forward pass failed: {e}"))?;
            t3 = std::time::Instant::now();
            finite = crate::model::all_finite(&out);
            out
        };
        if !finite {
            bail!("non-finite logits (NaN or Inf) from the CUDA forward pass (corrupt weights?)");
        }
        if n == 1 {
            report_timing([t0, t1, t2, t3, std::time::Instant::now()]);
        }
        st.pos += n;
        Ok(out)
    }
}

/// `FLASHMOE_CUDA_TIMING=1`: a decode call's phases on stderr, in µs — when it began (from the
/// first call), the host's work up to the launch, the GPU's to the stream's end (the logits'
/// copy into pinned memory included), then two host steps: the finite check on the pinned
/// logits and their copy out.
fn report_timing(t: [std::time::Instant; 5]) {
    static ON: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();
    let Some(start) = *ON.get_or_init(|| std::env::var_os("FLASHMOE_CUDA_TIMING").map(|_| t[0])) else { return };
    let us = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e6;
    eprintln!(
        "cuda-timing at {:.1} host {:.1} gpu {:.1} check {:.1} copy {:.1}",
        us(start, t[0]),
        us(t[0], t[1]),
        us(t[1], t[2]),
        us(t[2], t[3]),
        us(t[3], t[4])
    );
}

/// One decode token's attention kernel: `FLASHMOE_CUDA_ATTN=part` the per-head `attn_part1`,
/// `dec` the per-position `attn_dec`, else (and by default) `attn_vec` (comparisons on one
/// binary; each falls back to `attn_part1` for head dims it does not take).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DecAttn {
    Part,
    Dec,
    Vec,
}

fn dec_attention() -> DecAttn {
    static K: std::sync::OnceLock<DecAttn> = std::sync::OnceLock::new();
    *K.get_or_init(|| match std::env::var("FLASHMOE_CUDA_ATTN").as_deref() {
        Ok("part") => DecAttn::Part,
        Ok("dec") => DecAttn::Dec,
        _ => DecAttn::Vec,
    })
}

/// Positions of an `attn_vec` part: a CHUNK is VEC_SUB of them (`VP_SUB` in kernels.cu).
const VEC_SUB: usize = 2;

/// The most CHUNK parts (the cache's capacity / CHUNK) a decode token's attention takes
/// `attn_vec` for: on the H200 (24-layer 30B-A3B shape) it decoded 531–543 tok/s against
/// `attn_dec`'s 464–467 at 1,024 positions of capacity, 372 against 367 at 8,192, and 290
/// against 318 at 16,384.
const VEC_PARTS: usize = 64;

/// `attn_vec`'s kernel (by head dim: 64, 128, 256) and query heads per block: the largest
/// divisor of the group up to 8, 4, 2 (its shared memory holds VW · GM · d floats).
fn vec_heads(nh: usize, nkv: usize, d: usize) -> Option<(usize, usize)> {
    let f = [64, 128, 256].iter().position(|&x| x == d)?;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return None;
    }
    let (g, most) = (nh / nkv, [8, 4, 2][f]);
    Some((f, (1..=most.min(g)).filter(|gh| g.is_multiple_of(*gh)).max().unwrap_or(1)))
}

/// Blocks a decode token's attention should at least fill (about the H100/H200's SM count).
const DEC_BLOCKS: usize = 128;

/// `attn_dec`'s kernel (by head dim: 64, 128, 256) and query heads per block for one token over
/// `parts` chunks: as many heads of a group as still give DEC_BLOCKS blocks (each k row read
/// once for them), a divisor of the group, at most 32 / (d / 32) (a lane's accumulators).
fn dec_heads(nh: usize, nkv: usize, d: usize, parts: usize) -> Option<(usize, usize)> {
    let f = [64, 128, 256].iter().position(|&x| x == d)?;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return None;
    }
    let g = nh / nkv;
    let fits = (1..=(1024 / d).min(g)).filter(|gh| g.is_multiple_of(*gh));
    let gh = fits.clone().filter(|gh| nh / gh * parts >= DEC_BLOCKS).max().unwrap_or(1);
    Some((f, gh))
}

/// Whether decode replays a captured CUDA graph (FLASHMOE_CUDA_GRAPH=0 turns it off).
fn graphs() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_CUDA_GRAPH").map_or(true, |v| v != "0"))
}

/// A captured decode pass. The graph is only touched under the model's run lock.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: used only while holding `CudaModel::run`, which serializes every access.
unsafe impl Send for Graph {}

impl CudaModel {
    /// Attention of `n` tokens on the normed `h`: q/k/v, biases, norms and RoPE (k, v into the
    /// cache), attention in parts (within the window), merged with the sinks; returns the output
    /// projection to run (matrix, input, its fast form) and its bias (or null).
    #[allow(clippy::too_many_arguments)]
    fn attention<'a>(
        &self,
        a: &'a DAttn,
        b: &Bufs,
        layer: i32,
        (ph, qh): (u64, Prep),
        n: usize,
        parts: usize,
        fast: bool,
    ) -> Result<(&'a DMat, u64, Prep, u64)> {
        let s = &self.stream;
        let p = |b: &CudaSlice<f32>| ptr(b, s);
        let (pa, pb, pc, pmeta, ppart) = (p(&b.a), p(&b.b), p(&b.c), ptr(&b.meta, s), p(&b.part));
        let qw = if a.gated { 2 * a.d } else { a.d };
        // q → a, k → b, v → c
        self.matmuls(&[(&a.q, pa), (&a.k, pb), (&a.v, pc)], ph, n, qh)?;
        let opt = |v: Option<&DVec>| v.map_or(0u64, |v| v.ptr);
        let (mut bq, mut bk, bv) = match &a.bias {
            Some([q, k, v]) => (q.ptr, k.ptr, v.ptr),
            None => (0, 0, 0),
        };
        let (qn, kn, eps) = a.qk_norm.as_ref().map_or((0, 0, self.eps), |(q, k, e)| (q.ptr, k.ptr, *e));
        if a.norm == NormAt::Whole {
            // the norms over the whole projections first (q and k biases with them)
            let (qd, kd) = ((a.nh * a.d) as i32, (a.nkv * a.d) as i32);
            let mut lb = launch(s, &self.k.whole_norm);
            lb.arg(&pa).arg(&pb).arg(&qn).arg(&kn).arg(&bq).arg(&bk).arg(&qd).arg(&kd).arg(&eps);
            unsafe { lb.launch(cfg((n, 2), 256, 0)) }?;
            (bq, bk) = (0, 0);
        }
        let (nh, nkv, d, qw32, rot) = (a.nh as i32, a.nkv as i32, a.d as i32, qw as i32, a.rot as i32);
        let (gated, parts32, per_head) = (a.gated as i32, parts as i32, (a.norm == NormAt::PerHead) as i32);
        let freqs = ptr(&a.freqs, s);
        let mut lb = launch(s, &self.k.qk_norm_rope);
        lb.arg(&pa).arg(&pb).arg(&pc).arg(&qn).arg(&kn).arg(&pmeta).arg(&layer);
        lb.arg(&nh).arg(&nkv).arg(&d).arg(&qw32).arg(&rot).arg(&freqs).arg(&a.fscale).arg(&eps);
        lb.arg(&bq).arg(&bk).arg(&bv).arg(&per_head);
        unsafe { lb.launch(cfg((n, a.nh + a.nkv), 32, 0)) }?;
        // attention in parts of CHUNK positions, merged into b; then o_proj → y
        // one token: its own kernel (few blocks, each a long walk: more loads in flight)
        let kind = if n == 1 { dec_attention() } else { DecAttn::Part };
        // attn_vec up to VEC_PARTS parts, attn_dec past them (the merge of attn_vec's many
        // parts then costs more than its blocks save)
        let vec = (kind == DecAttn::Vec && parts <= VEC_PARTS).then(|| vec_heads(a.nh, a.nkv, a.d)).flatten();
        let kind = if kind == DecAttn::Vec && vec.is_none() { DecAttn::Dec } else { kind };
        let dec = (kind == DecAttn::Dec).then(|| dec_heads(a.nh, a.nkv, a.d, parts)).flatten();
        // the parts the merge reads: attn_vec's are VEC_SUB to a CHUNK
        let mparts = if vec.is_some() { parts * VEC_SUB } else { parts };
        let mparts32 = mparts as i32;
        if let Some((f, gh)) = vec {
            let gh32 = gh as i32;
            let mut lb = launch(s, &self.k.attn_vec[f]);
            lb.arg(&pa).arg(&pmeta).arg(&layer).arg(&ppart).arg(&nh).arg(&nkv).arg(&qw32).arg(&mparts32);
            lb.arg(&a.window).arg(&gh32);
            unsafe { lb.launch(cfg((a.nh / gh, mparts), 32 * VEC_WARPS, 0)) }?;
        } else if let Some((f, gh)) = dec {
            let gh32 = gh as i32;
            let mut lb = launch(s, &self.k.attn_dec[f]);
            lb.arg(&pa).arg(&pmeta).arg(&layer).arg(&ppart).arg(&nh).arg(&nkv).arg(&qw32).arg(&parts32);
            lb.arg(&a.window).arg(&gh32);
            unsafe { lb.launch(cfg((a.nh / gh, parts), 128, 0)) }?;
        } else {
            let mut lb = launch(s, if n == 1 { &self.k.attn_part1 } else { &self.k.attn_part });
            lb.arg(&pa).arg(&pmeta).arg(&layer).arg(&ppart).arg(&nh).arg(&nkv).arg(&d).arg(&qw32).arg(&parts32);
            lb.arg(&a.window);
            unsafe { lb.launch(cfg((n * a.nh, parts), 128, 0)) }?;
        }
        // one token: the merge writes o_proj's int8 input too (a block per head, a warp per 32)
        let fused = fast && n == 1 && a.d.is_multiple_of(32) && a.d <= 1024;
        let oq = if fused { b.qa.qx(s) } else { Qx::default() };
        let sinks = opt(a.sinks.as_ref());
        let mut lb = launch(s, &self.k.attn_merge);
        lb.arg(&pa).arg(&ppart).arg(&pb).arg(&nh).arg(&d).arg(&qw32).arg(&gated).arg(&mparts32).arg(&oq).arg(&sinks);
        unsafe { lb.launch(cfg((n * a.nh, 1), if fused { a.d } else { 128 }, 0)) }?;
        let qo = if fused {
            Prep { qx: oq, xb: 0 }
        } else {
            self.prep(fast, pb, n, a.nh * a.d, b.qa.qx(s), ptr(&b.xbh, s))?
        };
        Ok((&a.o, pb, qo, opt(a.o_bias.as_ref())))
    }

    /// Latent attention of `n` tokens on the normed `h` (`layers::mla`, in the latent space for
    /// a prompt as for decode): q (through q-LoRA's normed latent) and the kv_a row; the latent
    /// normed and the rope parts rotated, [c ‖ k_pe] into the cache; each head's query into the
    /// latent space; attention over the cached rows (a decode token's context in parts of
    /// MLA_CHUNK positions, merged); out through W_UV. Returns the output projection to run.
    /// With DSA, the indexer's keys are cached and each token's selection found (or the last
    /// full layer's kept, for a layer that shares it) before the attention, which then reads
    /// the selected rows alone.
    #[allow(clippy::too_many_arguments)]
    fn mla<'a>(
        &self,
        a: &'a DMla,
        b: &Bufs,
        layer: i32,
        (ph, qh): (u64, Prep),
        n: usize,
        parts: usize,
        fast: bool,
    ) -> Result<(&'a DMat, u64, Prep, u64)> {
        let s = &self.stream;
        let p = |b: &CudaSlice<f32>| ptr(b, s);
        let (pa, pb, pc, pmeta, ppart) = (p(&b.a), p(&b.b), p(&b.c), ptr(&b.meta, s), p(&b.part));
        let (nh, lw) = (a.nh, a.row());
        // q → a; q-LoRA's latent → c, the kv_a rows after it
        let lat = pc + 4 * (n * a.q_lora) as u64;
        // the indexer's projections: queries (from q-LoRA's normed latent), key and weights
        // (from h), one token's [queries ‖ key ‖ weights] after another's
        let dsa = match a.topk {
            0 => None,
            _ => Some(b.dsa.as_ref().ok_or_else(|| anyhow!("the lightning indexer's buffers were not fitted"))?),
        };
        let (piq, pik, piw) = match (&a.ix, dsa) {
            (Some(x), Some(d)) => {
                let p = ptr(&d.proj, s);
                (p, p + 4 * (n * x.heads * x.hd) as u64, p + 4 * (n * (x.heads * x.hd + x.hd)) as u64)
            }
            _ => (0, 0, 0),
        };
        match &a.q {
            DQ::Full(q) => self.matmuls(&[(q, pa), (&a.kv_a, lat)], ph, n, qh)?,
            DQ::LoRA { a: qa, norm, eps, b: qb } => {
                match &a.ix {
                    Some(x) => self.matmuls(&[(qa, pc), (&a.kv_a, lat), (&x.wk, pik), (&x.weights, piw)], ph, n, qh)?,
                    None => self.matmuls(&[(qa, pc), (&a.kv_a, lat)], ph, n, qh)?,
                }
                let xb = ptr(&b.xbh, s);
                let pq = self.norm_rows(pc, (0, 0), norm, pc, (a.q_lora, *eps), n, fast, b.qa.qx(s), xb)?;
                self.matmul(qb, pc, pa, n, pq)?;
                if let Some(x) = &a.ix {
                    self.matmul(&x.wq_b, pc, piq, n, pq)?;
                }
            }
        }
        let (nh32, nope32, rd32, kvl32, il) =
            (nh as i32, a.nope as i32, a.rd as i32, a.kvl as i32, a.interleaved as i32);
        let freqs = ptr(&a.freqs, s);
        let mut lb = launch(s, &self.k.mla_rope_cache);
        lb.arg(&pa).arg(&lat).arg(&pmeta).arg(&layer).arg(&a.kv_norm.ptr).arg(&a.kv_eps).arg(&nh32).arg(&nope32);
        lb.arg(&rd32).arg(&kvl32).arg(&freqs).arg(&a.fscale).arg(&il);
        unsafe { lb.launch(cfg((n, 1 + nh), 128, 0)) }?;
        // the indexer: its key normed, rotated and cached, its queries rotated; each token's
        // scores and selection (a layer that shares one keeps the last)
        let stride = parts * CHUNK;
        let psel = dsa.map_or(0, |d| ptr(&d.sel, s));
        if let (Some(x), Some(d)) = (&a.ix, dsa) {
            let (heads32, hd32, il) = (x.heads as i32, x.hd as i32, x.interleaved as i32);
            let mut lb = launch(s, &self.k.dsa_prep);
            lb.arg(&piq).arg(&pik).arg(&pmeta).arg(&layer).arg(&x.norm.0.ptr).arg(&x.norm.1.ptr).arg(&heads32);
            lb.arg(&hd32).arg(&rd32).arg(&freqs).arg(&a.fscale).arg(&il);
            unsafe { lb.launch(cfg((n, 1 + x.heads), 128, 0)) }?;
            let g = dsa_group(n, stride);
            let (pscores, stride64, topk32) = (ptr(&d.scores, s), stride as i64, a.topk as i32);
            let shared = dsa_scores_shared(x.heads, x.hd);
            for t0 in (0..n).step_by(g) {
                let (m, t032) = (g.min(n - t0), t0 as i32);
                let mut lb = launch(s, &self.k.dsa_scores);
                lb.arg(&piq).arg(&piw).arg(&pmeta).arg(&layer).arg(&t032).arg(&heads32).arg(&hd32).arg(&pscores);
                lb.arg(&stride64);
                unsafe { lb.launch(cfg((m, stride.div_ceil(DSA_SP)), 256, shared)) }?;
                let mut lb = launch(s, &self.k.dsa_select);
                lb.arg(&pscores).arg(&stride64).arg(&pmeta).arg(&t032).arg(&topk32).arg(&psel);
                unsafe { lb.launch(cfg((m, 1), 1024, 0)) }?;
            }
        }
        // the latent-space queries → b
        let mut lb = launch(s, &self.k.mla_absorb);
        lb.arg(&pa).arg(&a.uk.ptr).arg(&a.uk.d).arg(&pb).arg(&nh32).arg(&nope32).arg(&rd32).arg(&a.scale);
        unsafe { lb.launch(cfg((n * nh, 1), a.kvl.next_multiple_of(32).min(256), 4 * a.nope)) }?;
        // attention → the latent sums in a (q is spent)
        let (mparts, chunk) =
            if n == 1 { (parts * CHUNK.div_ceil(MLA_CHUNK), MLA_CHUNK) } else { (1, i32::MAX as usize) };
        let (mp32, ch32) = (mparts as i32, chunk as i32);
        // with a selection (DSA), over each token's selected positions
        let topk32 = a.topk as i32;
        let selected = psel != 0;
        let mut lb = launch(s, if selected { &self.k.mla_part_sel } else { &self.k.mla_part });
        lb.arg(&pb)
            .arg(&pmeta)
            .arg(&layer)
            .arg(&ppart)
            .arg(&pa)
            .arg(&nh32)
            .arg(&kvl32)
            .arg(&rd32)
            .arg(&mp32)
            .arg(&ch32);
        if selected {
            lb.arg(&psel).arg(&topk32);
        }
        unsafe { lb.launch(cfg((n * nh.div_ceil(MLA_HW), mparts), 32 * MLA_HW, 4 * MLA_TP * lw)) }?;
        if mparts > 1 {
            let mut lb = launch(s, if selected { &self.k.mla_merge_sel } else { &self.k.mla_merge });
            lb.arg(&ppart).arg(&pmeta).arg(&pa).arg(&nh32).arg(&kvl32).arg(&mp32).arg(&ch32);
            if selected {
                lb.arg(&topk32);
            }
            unsafe { lb.launch(cfg((n * nh, 1), a.kvl.next_multiple_of(32).min(256), 4 * mparts)) }?;
        }
        // out of the latent space → c, o_proj's input
        let vd32 = a.vd as i32;
        let mut lb = launch(s, &self.k.mla_uv);
        lb.arg(&pa).arg(&a.uv.ptr).arg(&a.uv.d).arg(&pc).arg(&nh32).arg(&vd32);
        unsafe { lb.launch(cfg((n * nh, a.vd.div_ceil(WARPS)), 32 * WARPS, 0)) }?;
        let qo = self.prep(fast, pc, n, nh * a.vd, b.qa.qx(s), ptr(&b.xbh, s))?;
        Ok((&a.o, pc, qo, 0))
    }

    /// Gated DeltaNet of `n` tokens on the normed `h`: the four input projections, the causal
    /// conv (history from the state) with SiLU, q/k L2 norms, the recurrence with its gated
    /// RMSNorm; returns the output projection to run (matrix, input, its fast form).
    fn deltanet<'a>(
        &self,
        d: &'a DDelta,
        b: &Bufs,
        layer: i32,
        (ph, qh): (u64, Prep),
        n: usize,
        fast: bool,
    ) -> Result<(&'a DMat, u64, Prep, u64)> {
        let s = &self.stream;
        let p = |b: &CudaSlice<f32>| ptr(b, s);
        let (py, pa, pb, pc, pd, pmeta) = (p(&b.y), p(&b.a), p(&b.b), p(&b.c), p(&b.d), ptr(&b.meta, s));
        // qkv → a, z → c, b → d, a → y (free until the output projection)
        self.matmuls(&[(&d.qkv, pa), (&d.z, pc), (&d.b, pd), (&d.a, py)], ph, n, qh)?;
        let (cd, kd, vd) = (d.conv_dim(), d.nk * d.dk, d.nv * d.dv);
        let (cd32, kern32, n32) = (cd as i32, d.kern as i32, n as i32);
        let mut lb = launch(s, &self.k.delta_conv);
        lb.arg(&pa).arg(&pmeta).arg(&layer).arg(&d.conv_w.ptr).arg(&pb).arg(&cd32).arg(&kern32);
        unsafe { lb.launch(cfg((cd.div_ceil(256), n), 256, 0)) }?;
        let mut lb = launch(s, &self.k.delta_shift);
        lb.arg(&pa).arg(&pmeta).arg(&layer).arg(&n32).arg(&cd32).arg(&kern32);
        unsafe { lb.launch(cfg((cd.div_ceil(256), 1), 256, 0)) }?;
        let (kd32, dk32, nk32, qscale) = (kd as i32, d.dk as i32, d.nk as i32, 1.0f32 / (d.dk as f32).sqrt());
        let mut lb = launch(s, &self.k.delta_l2norm);
        lb.arg(&pb).arg(&cd32).arg(&kd32).arg(&dk32).arg(&nk32).arg(&qscale);
        unsafe { lb.launch(cfg((n, 2 * d.nk), 32, 0)) }?;
        let (vd32, nv32, dv32) = (vd as i32, d.nv as i32, d.dv as i32);
        let mut lb = launch(s, &self.k.delta_rec);
        lb.arg(&pb).arg(&pc).arg(&pd).arg(&py).arg(&pmeta).arg(&layer).arg(&d.neg_a.ptr).arg(&d.dt_bias.ptr);
        lb.arg(&d.norm_w.ptr).arg(&pa).arg(&n32).arg(&cd32).arg(&kd32).arg(&vd32).arg(&nk32).arg(&nv32);
        lb.arg(&dk32).arg(&dv32).arg(&d.eps);
        unsafe { lb.launch(cfg((d.nv, 1), d.dv.next_multiple_of(32), 0)) }?;
        let qo = self.prep(fast, pa, n, vd, b.qa.qx(s), ptr(&b.xbh, s))?;
        Ok((&d.out, pa, qo, 0))
    }

    /// Every layer, the final norm and lm_head on `b.x` (`n` tokens, the last `m` rows' logits
    /// into `b.logits`); positions and caches come from `b.meta`.
    /// `fast`: one token's q4/q8 products on int8 inputs (`Precision::Fast`).
    fn pass(&self, b: &mut Bufs, n: usize, k_over: Option<usize>, m: usize, fast: bool, parts: usize) -> Result<()> {
        let (h, s) = (self.hidden, &self.stream);
        let p = |b: &CudaSlice<f32>| ptr(b, s);
        let (px, ph, py, pa, pb, pc, pd) = (p(&b.x), p(&b.h), p(&b.y), p(&b.a), p(&b.b), p(&b.c), p(&b.d));
        let (pids, pw) = (ptr(&b.ids, s), p(&b.wts));
        let (qa, qb) = (b.qa.qx(s), b.qb.qx(s));
        let (xbh, xbe) = (ptr(&b.xbh, s), ptr(&b.xbe, s));
        let null = 0u64;
        for (i, l) in self.layers.iter().enumerate() {
            let qh =
                self.add_rmsnorm(px, (if i == 0 { null } else { py }, null), &l.input_norm, ph, n, fast, qa, xbh)?;
            let layer = i as i32;
            let (o, oin, qo, ob) = match &l.mixer {
                DMixer::Attn(a) => self.attention(a, b, layer, (ph, qh), n, parts, fast)?,
                DMixer::Delta(d) => self.deltanet(d, b, layer, (ph, qh), n, fast)?,
                DMixer::Mla(a) => self.mla(a, b, layer, (ph, qh), n, parts, fast)?,
            };
            // the output projection into y, then x += y and the post-mixer norm
            let qh = if n == 1 && o.d.rows as usize == h {
                // one launch: its last block runs the norm
                let one = fast && h.is_multiple_of(32);
                let hq = if one { qa } else { Qx::default() };
                let done = ptr(&b.done, s);
                let mut lb = launch(s, &self.k.matvec_norm);
                lb.arg(&o.ptr)
                    .arg(&o.d)
                    .arg(&oin)
                    .arg(&qo.qx)
                    .arg(&py)
                    .arg(&ob)
                    .arg(&done)
                    .arg(&px)
                    .arg(&l.post_norm.ptr);
                lb.arg(&ph).arg(&self.eps).arg(&hq);
                // blocks of NORM_WARPS: the last one's norm has 4 values a thread, not 8
                unsafe { lb.launch(cfg((h.div_ceil(NORM_WARPS), 1), 32 * NORM_WARPS, 0)) }?;
                if one { Prep { qx: qa, xb: 0 } } else { self.prep(fast, ph, n, h, qa, xbh)? }
            } else {
                self.matmul(o, oin, py, n, qo)?;
                self.add_rmsnorm(px, (py, ob), &l.post_norm, ph, n, fast, qa, xbh)?
            };
            match &l.ffn {
                DFfn::Dense(m) => self.mlp(m, (ph, qh), (pa, qb), pc, xbe, py, n)?,
                DFfn::Moe(m) => {
                    let k = k_over.unwrap_or(m.top_k).min(m.router.d.rows as usize).min(64);
                    let (e32, k32) = (m.router.d.rows, k as i32);
                    // weights and choice scores in shared memory
                    let shared = 8 * e32 as usize;
                    if n == 1 {
                        // the product and the top-k in one launch (its last block routes)
                        let (r, done) = (&m.router, ptr(&b.done, s));
                        let mut lb = launch(s, &self.k.router_topk);
                        lb.arg(&r.ptr).arg(&r.d).arg(&ph).arg(&qh.qx).arg(&pa).arg(&k32).arg(&m.route).arg(&pids);
                        lb.arg(&pw).arg(&done);
                        let blocks = (e32 as usize).div_ceil(WARPS);
                        unsafe { lb.launch(cfg((blocks, 1), 32 * WARPS, shared)) }?;
                    } else {
                        self.matmul(&m.router, ph, pa, n, qh)?;
                        route(s, &self.k, pa, e32, k32, m.route, pids, pw, n)?;
                    }
                    let ex = &m.experts;
                    if n == 1 {
                        self.swiglu(ex, pids, pw, k, (ph, qh), (pb, qb), py, n)?;
                    } else {
                        let xb = if fast { xbe } else { 0 };
                        self.experts_grouped(ex, &mut b.ids, &mut b.tiles, (pa, pb, pc), pw, k, ph, py, n, xb)?;
                    }
                    if let Some((sh, gate)) = &m.shared {
                        self.mlp(sh, (ph, qh), (pb, qb), pc, xbe, pd, n)?;
                        let (dim, gw) = (h as i32, gate.as_ref().map_or(0u64, |g| g.ptr));
                        let mut lb = launch(s, &self.k.gated_add);
                        lb.arg(&py).arg(&pd).arg(&gw).arg(&ph).arg(&dim);
                        unsafe { lb.launch(cfg((n, 1), 256, 0)) }?;
                    }
                }
            }
        }
        let rows = ph + 4 * (h * (n - m)) as u64;
        let qh = if n == 1 {
            self.add_rmsnorm(px, (py, null), &self.norm, ph, n, fast, qa, xbh)?
        } else {
            self.add_rmsnorm(px, (py, null), &self.norm, ph, n, false, qa, xbh)?;
            self.prep(fast, rows, m, h, qa, xbh)?
        };
        self.matmul(&self.head, rows, p(&b.logits), m, qh)
    }
}

/// What a decode graph was captured for: expert count override, int8 inputs, attention parts.
type GraphKey = (Option<usize>, bool, usize);

/// A forward pass's buffers, kept between calls and grown when a call needs more.
#[derive(Default)]
struct Scratch {
    bufs: Option<Bufs>,
    host_x: Vec<f32>,
    host_meta: Vec<i64>,
    /// Page-locked room for one row of logits (decode's): the copy back runs at the link's
    /// speed, queued on the stream behind the pass (a pageable copy goes through the driver's
    /// staging buffers).
    host_logits: Option<cudarc::driver::PinnedHostSlice<f32>>,
    /// The decode graph, captured for (expert count override, int8 inputs, attention parts) on
    /// these buffers.
    graph: Option<(GraphKey, Graph)>,
}

struct Bufs {
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    y: CudaSlice<f32>,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    c: CudaSlice<f32>,
    d: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    wts: CudaSlice<f32>,
    tiles: CudaSlice<i32>,
    /// `router_topk`'s count of finished blocks (0 between launches).
    done: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    meta: CudaSlice<i64>,
    /// Attention's per-part (max, sum, values).
    part: CudaSlice<f32>,
    /// Quantized inputs: the normed hidden state or attention output (a), expert activations (b).
    qa: QBuf,
    qb: QBuf,
    /// bf16 forms of a prompt's inputs: the normed hidden state or mixer output (h), the experts'
    /// gathered inputs and activations (e).
    xbh: CudaSlice<u16>,
    xbe: CudaSlice<u16>,
    /// What they hold, as [`Scratch::fit`] asks.
    size: [usize; 6],
    /// The lightning indexer's, when the model has one ([`CudaModel::fit_dsa`]).
    dsa: Option<DsaBufs>,
}

/// DSA's buffers: the indexer's projections (per token: queries, key, weights), a group of
/// tokens' scores (rows of `stride` floats), each token's selection (`topk` positions).
struct DsaBufs {
    proj: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    sel: CudaSlice<i32>,
    size: [usize; 3],
}

/// Tokens whose index scores a prompt computes at once, its rows `stride` long.
fn dsa_group(n: usize, stride: usize) -> usize {
    (DSA_SCORES / stride.max(1)).clamp(1, n.max(1))
}

impl Scratch {
    /// Buffers for a call of these sizes; true when they were (re)allocated, which invalidates
    /// the captured graph.
    /// `want`: floats of (hidden rows, widest intermediate, routed pairs, logits, meta, attention parts).
    fn fit(&mut self, s: &Arc<CudaStream>, want: [usize; 6]) -> Result<bool> {
        let fits = |b: &Bufs| b.size.iter().zip(&want).all(|(have, need)| have >= need);
        let fresh = !self.bufs.as_ref().is_some_and(fits);
        if fresh {
            self.graph = None;
            self.bufs = None; // free the old ones first
            let [hd, w, pr, lg, meta, pt] = want;
            let f = |n: usize| s.alloc_zeros::<f32>(n.max(1));
            self.bufs = Some(Bufs {
                x: f(hd)?,
                h: f(hd)?,
                y: f(hd)?,
                a: f(w)?,
                b: f(w)?,
                c: f(w)?,
                d: f(hd)?,
                ids: s.alloc_zeros::<i32>(3 * pr.max(1))?,
                wts: f(pr)?,
                tiles: s.alloc_zeros::<i32>(3 * pr.max(1))?,
                done: s.alloc_zeros::<u32>(1)?,
                logits: f(lg)?,
                meta: s.alloc_zeros::<i64>(meta)?,
                part: f(pt)?,
                qa: QBuf::new(s, w)?,
                qb: QBuf::new(s, w)?,
                xbh: s.alloc_zeros::<u16>(w.max(1))?,
                xbe: s.alloc_zeros::<u16>(w.max(1))?,
                size: want,
                dsa: None,
            });
        }
        Ok(fresh)
    }
}

impl CudaModel {
    /// Makes `b` hold the indexer's buffers for `n` tokens whose scores rows are `stride` long
    /// (no-op without an indexer); true when they were (re)allocated, which invalidates the
    /// captured graph.
    fn fit_dsa(&self, b: &mut Bufs, s: &Arc<CudaStream>, n: usize, stride: usize) -> Result<bool> {
        let (floats, topk) = self.dsa;
        if topk == 0 {
            return Ok(false);
        }
        let want = [n * floats, dsa_group(n, stride) * stride, n * topk];
        if b.dsa.as_ref().is_some_and(|d| d.size.iter().zip(&want).all(|(have, need)| have >= need)) {
            return Ok(false);
        }
        b.dsa = None;
        b.dsa = Some(DsaBufs {
            proj: s.alloc_zeros::<f32>(want[0].max(1))?,
            scores: s.alloc_zeros::<f32>(want[1].max(1))?,
            sel: s.alloc_zeros::<i32>(want[2].max(1))?,
            size: want,
        });
        Ok(true)
    }

    /// A prompt's routed experts, grouped by expert on the host (the one sync of a MoE layer):
    /// each expert's weights are read once per 8 of its tokens instead of once per token.
    /// `ids` holds the routing (`n · k` ids), then the slot order and each pair's slot.
    #[allow(clippy::too_many_arguments)]
    fn experts_grouped(
        &self,
        ex: &DExperts,
        ids: &mut CudaSlice<i32>,
        tiles: &mut CudaSlice<i32>,
        (xg, act, ys): (u64, u64, u64),
        wts: u64,
        k: usize,
        h: u64,
        out: u64,
        n: usize,
        xb: u64,
    ) -> Result<()> {
        let s = &self.stream;
        let pairs = n * k;
        // tensor cores (32 slots a tile) when the inputs get a bf16 form and the formats allow
        let mma = xb != 0 && mma_ok(&ex.gate) && mma_ok(&ex.up) && mma_ok(&ex.down);
        let tile = if mma { MT } else { NT };
        let mut routed = vec![0i32; pairs];
        s.memcpy_dtoh(&ids.slice(..pairs), &mut routed)?;
        // counting sort of pairs by expert; tiles of up to `tile` slots of one expert
        let experts = routed.iter().map(|&e| e as usize + 1).max().unwrap_or(0);
        let mut start = vec![0usize; experts + 1];
        routed.iter().for_each(|&e| start[e as usize + 1] += 1);
        (0..experts).for_each(|e| start[e + 1] += start[e]);
        let mut fill = start.clone();
        let mut host = vec![0i32; 2 * pairs];
        let (order, slot_of) = host.split_at_mut(pairs);
        for (p, &e) in routed.iter().enumerate() {
            let slot = fill[e as usize];
            fill[e as usize] += 1;
            order[slot] = p as i32;
            slot_of[p] = slot as i32;
        }
        let mut tl = Vec::new();
        for e in 0..experts {
            for s0 in (start[e]..start[e + 1]).step_by(tile) {
                tl.extend_from_slice(&[e as i32, s0 as i32, (start[e + 1] - s0).min(tile) as i32]);
            }
        }
        s.memcpy_htod(&host, &mut ids.slice_mut(pairs..3 * pairs))?;
        s.memcpy_htod(&tl, &mut tiles.slice_mut(..tl.len()))?;
        let (pid, pt) = (ptr(ids, s), ptr(tiles, s));
        let (porder, pslot) = (pid + 4 * pairs as u64, pid + 8 * pairs as u64);
        let ntiles = tl.len() / 3;
        let (dim, k32) = (self.hidden as i32, k as i32);
        let mut b = launch(s, &self.k.gather_rows);
        b.arg(&h).arg(&porder).arg(&xg).arg(&dim).arg(&k32);
        unsafe { b.launch(cfg((pairs, 1), 256, 0)) }?;
        if mma {
            let (inter, hidden) = (ex.gate.rows as usize, ex.down.rows as usize);
            self.to_bf16(xg, pairs * self.hidden, xb)?;
            let mut b = launch(s, &self.k.mma_gate_up_tiles);
            b.arg(&ex.ptr).arg(&ex.stride).arg(&pt).arg(&ex.gate).arg(&ex.up).arg(&xb).arg(&act).arg(&ex.act);
            unsafe { b.launch(cfg((inter.div_ceil(64), ntiles), 128, 0)) }?;
            self.to_bf16(act, pairs * inter, xb)?;
            let mut b = launch(s, &self.k.mma_down_tiles);
            b.arg(&ex.ptr).arg(&ex.stride).arg(&pt).arg(&ex.down).arg(&xb).arg(&ys).arg(&ex.act);
            unsafe { b.launch(cfg((hidden.div_ceil(64), ntiles), 128, 0)) }?;
        } else {
            let mut b = launch(s, &self.k.gate_up_tiles);
            b.arg(&ex.ptr).arg(&ex.stride).arg(&pt).arg(&ex.gate).arg(&ex.up).arg(&xg).arg(&act).arg(&ex.act);
            unsafe { b.launch(cfg(((ex.gate.rows as usize).div_ceil(WARPS), ntiles), 32 * WARPS, 0)) }?;
            let mut b = launch(s, &self.k.down_tiles);
            b.arg(&ex.ptr).arg(&ex.stride).arg(&pt).arg(&ex.down).arg(&act).arg(&ys).arg(&ex.act);
            unsafe { b.launch(cfg(((ex.down.rows as usize).div_ceil(WARPS), ntiles), 32 * WARPS, 0)) }?;
        }
        let mut b = launch(s, &self.k.combine_slots);
        b.arg(&ys).arg(&pslot).arg(&wts).arg(&out).arg(&dim).arg(&k32);
        unsafe { b.launch(cfg((n, 1), 256, 0)) }?;
        Ok(())
    }
}

fn part_floats(layers: &[DLayer]) -> usize {
    let per = |l: &DLayer| match &l.mixer {
        DMixer::Attn(a) => a.nh * (a.d + 2),
        DMixer::Delta(_) | DMixer::Mla(_) => 0,
    };
    layers.iter().map(per).max().unwrap_or(0)
}

/// Floats of the largest intermediate of layer `l` for `n` tokens (`k` routed experts each).
fn scratch_floats(l: &DLayer, n: usize, hidden: usize, k: Option<usize>) -> usize {
    let attn = match &l.mixer {
        DMixer::Attn(a) => n * (a.nh * if a.gated { 2 * a.d } else { a.d }).max(a.nkv * a.d),
        DMixer::Delta(d) => n * d.conv_dim().max(d.nv * d.dv),
        // q, then the latent sums (a); the latent-space queries (b); q-LoRA's latent and the
        // kv_a row, then the values (c)
        DMixer::Mla(a) => n * (a.nh * a.row()).max(a.q_lora + a.row()).max(a.nh * (a.nope + a.rd)).max(a.nh * a.vd),
    };
    let ffn = match &l.ffn {
        DFfn::Dense(m) => n * m.gate.rows as usize,
        DFfn::Moe(m) => {
            let k = k.unwrap_or(m.top_k).min(64);
            let shared = m.shared.as_ref().map_or(0, |s| s.0.gate.rows as usize);
            let inter = (m.experts.gate.rows as usize).max(shared);
            n * (m.router.d.rows as usize).max(k * inter.max(hidden))
        }
    };
    attn.max(ffn).max(n * hidden)
}

impl CudaModel {
    /// Makes `st` hold device state with KV room for `positions`, keeping what it holds.
    fn reserve(&self, st: &mut State, positions: usize) -> Result<()> {
        let s = &self.stream;
        if st.device.is_none() {
            let kinds = self
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    DMixer::Attn(a) => StateKind::Kv(a.nkv * a.d),
                    DMixer::Delta(d) => StateKind::Delta((d.kern - 1) * d.conv_dim(), d.nv * d.dk * d.dv),
                    DMixer::Mla(a) => StateKind::Latent(a.row(), a.ix.as_ref().map_or(0, |x| x.hd)),
                })
                .collect();
            st.device = Some(Box::new(CudaState { stream: s.clone(), bufs: Vec::new(), cap: 0, kinds }));
        }
        let ds = st
            .device
            .as_mut()
            .expect("set")
            .as_any()
            .downcast_mut::<CudaState>()
            .ok_or_else(|| anyhow!("state of another device"))?;
        if positions <= ds.cap && ds.bufs.len() == self.layers.len() {
            return Ok(());
        }
        let cap = positions.max(2 * ds.cap).max(256);
        let mut old = std::mem::take(&mut ds.bufs).into_iter();
        for kind in ds.kinds.clone() {
            let prev = old.next();
            let pair = match (kind, prev) {
                (StateKind::Delta(..), Some(p)) => p,
                (StateKind::Delta(h, st), None) => (s.alloc_zeros::<f32>(h.max(1))?, s.alloc_zeros::<f32>(st.max(1))?),
                (StateKind::Latent(row, ix), prev) => {
                    let mut c = s.alloc_zeros::<f32>(cap * row)?;
                    let mut k = s.alloc_zeros::<f32>((cap * ix).max(1))?;
                    if let Some((old, old_k)) = prev {
                        s.memcpy_dtod(&old, &mut c.slice_mut(..old.len()))?;
                        if ix > 0 {
                            s.memcpy_dtod(&old_k, &mut k.slice_mut(..old_k.len()))?;
                        }
                    }
                    (c, k)
                }
                (StateKind::Kv(row), prev) => {
                    let (mut k, mut v) = (s.alloc_zeros::<f32>(cap * row)?, s.alloc_zeros::<f32>(cap * row)?);
                    if let Some((ok, ov)) = prev {
                        s.memcpy_dtod(&ok, &mut k.slice_mut(..ok.len()))?;
                        s.memcpy_dtod(&ov, &mut v.slice_mut(..ov.len()))?;
                    }
                    (k, v)
                }
            };
            ds.bufs.push(pair);
        }
        ds.cap = cap;
        Ok(())
    }
}
