//! Hot-path dot products with run-time ISA dispatch: AVX-512, AVX2+FMA, NEON, and the scalar
//! code the tests use as reference.
//!
//! Quantized rows are dotted against a *prepared* activation vector: x permuted so that the
//! nibbles (q4) or crumbs (q2) of a packed chunk line up with their inputs after a plain
//! shift-and-mask, plus the per-group sums of x that carry the affine bias. The preparation
//! costs O(cols) once per product and is shared by every row.

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

pub mod amx;
mod gemm;
pub mod kv;
pub use kv::{KvRows, axpy_rows_kv, dot_rows_kv};
pub mod ggml;
pub use gemm::*;

use smallvec::SmallVec;
use std::sync::OnceLock;

/// The instruction set in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 with VNNI: quantized rows use int8 activations and `vpdpbusd`.
    Avx512Vnni,
    Neon,
}

static ISA: OnceLock<Isa> = OnceLock::new();

/// AVX-512 VBMI (byte permutes), used by the q3 kernel.
fn vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa() == Isa::Avx512Vnni && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The aarch64 dot-product extension (`sdot`), used for int8 activations on q4/q2 rows.
fn dotprod() -> bool {
    static DP: OnceLock<bool> = OnceLock::new();
    *DP.get_or_init(|| {
        #[cfg(target_arch = "aarch64")]
        {
            isa() == Isa::Neon && std::arch::is_aarch64_feature_detected!("dotprod")
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            false
        }
    })
}

/// AVX-512 VL (masked 256-bit loads), used with VNNI by the group-64 kernels.
fn avx512vl() -> bool {
    static VL: OnceLock<bool> = OnceLock::new();
    *VL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Detected once; `FLASHMOE_ISA=scalar|avx2|avx512` narrows it (benchmarks, tests).
pub fn isa() -> Isa {
    *ISA.get_or_init(|| {
        let best = detect();
        let x86 = matches!(best, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni);
        match std::env::var("FLASHMOE_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") if x86 => Isa::Avx2,
            Some("avx512") if matches!(best, Isa::Avx512 | Isa::Avx512Vnni) => Isa::Avx512,
            _ => best,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            if is_x86_feature_detected!("avx512vnni") {
                return Isa::Avx512Vnni;
            }
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Isa::Neon;
        }
    }
    Isa::Scalar
}

#[cfg(target_arch = "x86_64")]
pub use x86::dequant_row_avx512;

#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Σ a·b.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dot_f32_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot_f32_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot_f32(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// Scalar reference of [`dot`].
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// y += a·x (attention's value sums, the MoE combine).
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    match isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::axpy_avx512(a, x, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::axpy(a, x, y) },
        _ => y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x),
    }
}

/// `out[p] = scale · q · rows[p·stride ..][..q.len()]`: a head's attention scores over a KV
/// cache whose rows for one KV head are `stride` elements apart.
pub fn dot_rows(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + d, "rows too short");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time; `rows` length checked above
        match d {
            64 => return unsafe { x86::dot_rows_avx512::<4>(q, rows, stride, scale, out) },
            128 => return unsafe { x86::dot_rows_avx512::<8>(q, rows, stride, scale, out) },
            256 => return unsafe { x86::dot_rows_avx512::<16>(q, rows, stride, scale, out) },
            _ => {}
        }
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = scale * dot(q, &rows[p * stride..p * stride + d]);
    }
}

/// Softmax in place: `x ← e^(x − max x) / Σ` (attention weights over a KV cache). Returns
/// (max x, Σ e^(x − max x)), what merging softmaxes over parts of a context needs.
pub fn softmax(x: &mut [f32]) -> (f32, f32) {
    if x.is_empty() {
        return (f32::NEG_INFINITY, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time.
        return unsafe { x86::softmax_avx512(x) };
    }
    softmax_scalar(x)
}

/// SwiGLU's gating in place: `g ← silu(g) · u`.
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len());
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time; equal lengths.
        return unsafe { x86::silu_avx512(g, Some(u)) };
    }
    swiglu_scalar(g, u)
}

/// SiLU in place: `x ← x · sigmoid(x)`.
pub fn silu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time.
        return unsafe { x86::silu_avx512(x, None) };
    }
    x.iter_mut().for_each(|v| *v = crate::layers::silu(*v));
}

/// Scalar reference of [`swiglu`].
pub fn swiglu_scalar(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = crate::layers::silu(*a) * b;
    }
}

/// Scalar reference of [`softmax`].
pub fn softmax_scalar(x: &mut [f32]) -> (f32, f32) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
    (m, sum)
}

/// `out += Σ_p w[p] · rows[p·stride ..][..out.len()]`: a head's weighted sum of cached values.
pub fn axpy_rows(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    assert!(w.is_empty() || rows.len() >= (w.len() - 1) * stride + d, "rows too short");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time; `rows` length checked above
        match d {
            64 => return unsafe { x86::axpy_rows_avx512::<4>(w, rows, stride, out) },
            128 => return unsafe { x86::axpy_rows_avx512::<8>(w, rows, stride, out) },
            256 => return unsafe { x86::axpy_rows_avx512::<16>(w, rows, stride, out) },
            _ => {}
        }
    }
    for (p, &wp) in w.iter().enumerate() {
        axpy(wp, &rows[p * stride..p * stride + d], out);
    }
}

/// `y += a·x` for a bf16 `x`: a head's query taken into MLA's latent space in decode, one
/// row of `W_UK` at a time.
pub fn axpy_bf16(a: f32, x: &[u16], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time; equal lengths.
        return unsafe { x86::axpy_bf16_avx512(a, x, y) };
    }
    axpy_bf16_scalar(a, x, y)
}

/// Scalar reference of [`axpy_bf16`].
pub fn axpy_bf16_scalar(a: f32, x: &[u16], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * bf16_to_f32(x));
}

/// `out[i·d ..][..d] += Σ_k p[i][k] · rows[k·stride ..][..d]` for four rows i (`d` =
/// `out.len() / 4`): attention's weighted value sums for a tile of four queries, so each value
/// row is loaded once for the four and the sums stay in registers across the rows.
pub fn axpy4_rows(p: [&[f32]; 4], rows: &[f32], stride: usize, out: &mut [f32]) {
    let (k, d) = (p[0].len(), out.len() / 4);
    assert!(out.len() == 4 * d && p.iter().all(|r| r.len() == k), "axpy4_rows: ragged tile");
    assert!(k == 0 || rows.len() >= (k - 1) * stride + d, "rows too short");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the ISA was detected at run time; lengths checked above.
        return unsafe { x86::axpy4_rows_avx512(p, rows, stride, out) };
    }
    axpy4_rows_scalar(p, rows, stride, out)
}

/// Scalar reference of [`axpy4_rows`].
pub fn axpy4_rows_scalar(p: [&[f32]; 4], rows: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len() / 4;
    for (i, o) in out.chunks_exact_mut(d).enumerate() {
        for (s, &w) in p[i].iter().enumerate() {
            o.iter_mut().zip(&rows[s * stride..s * stride + d]).for_each(|(o, &v)| *o += w * v);
        }
    }
}

/// `out[h·n + j] = q[h] · rows[j·stride ..][..d]` for the `heads` rows of `q` (`d` =
/// `q.len() / heads` each) and `n = out.len() / heads` rows: a group of heads' scores over the
/// same cached rows (latent attention's decode), 4 heads × 4 rows per [`dot4x4`] so each row,
/// loaded once, feeds every head from L1. A short tile repeats its last head or row and drops
/// the repeats, so a score never depends on the tile it is in.
pub fn dot_tile(q: &[f32], heads: usize, rows: &[f32], stride: usize, out: &mut [f32]) {
    if heads == 0 || out.is_empty() {
        return;
    }
    let (d, n) = (q.len() / heads, out.len() / heads);
    assert!(q.len() == heads * d && out.len() == heads * n, "dot_tile: ragged tile");
    assert!(rows.len() >= (n - 1) * stride + d, "rows too short");
    let head = |h: usize| &q[h.min(heads - 1) * d..(h.min(heads - 1) + 1) * d];
    let row = |j: usize| &rows[j.min(n - 1) * stride..j.min(n - 1) * stride + d];
    for j0 in (0..n).step_by(4) {
        let rs = [row(j0), row(j0 + 1), row(j0 + 2), row(j0 + 3)];
        for h0 in (0..heads).step_by(4) {
            let s = dot4x4([head(h0), head(h0 + 1), head(h0 + 2), head(h0 + 3)], rs);
            for (hi, sh) in s.iter().enumerate().take(heads - h0) {
                let o = &mut out[(h0 + hi) * n + j0..];
                for (oj, &v) in o.iter_mut().zip(sh).take(n - j0) {
                    *oj = v;
                }
            }
        }
    }
}

/// `out[h·d ..][..d] += Σ_j w[h·n + j] · rows[j·stride ..][..d]` for `heads` rows of weights
/// (`n = w.len() / heads` each) and `d = out.len() / heads`: a group of heads' weighted sums
/// of the same cached rows, 4 heads at a time through [`axpy4_rows`] so each row is loaded
/// once per four heads. A last partial quad goes through a copy of its outputs, the missing
/// heads repeating the last one's weights.
pub fn axpy_tile(w: &[f32], heads: usize, rows: &[f32], stride: usize, out: &mut [f32]) {
    if heads == 0 {
        return;
    }
    let (n, d) = (w.len() / heads, out.len() / heads);
    assert!(w.len() == heads * n && out.len() == heads * d, "axpy_tile: ragged tile");
    let wr = |h: usize| &w[h.min(heads - 1) * n..(h.min(heads - 1) + 1) * n];
    let full = heads / 4 * 4;
    for h0 in (0..full).step_by(4) {
        axpy4_rows([wr(h0), wr(h0 + 1), wr(h0 + 2), wr(h0 + 3)], rows, stride, &mut out[h0 * d..(h0 + 4) * d]);
    }
    if full < heads {
        let r = heads - full;
        let mut quad = crate::scratch::zeros(4 * d);
        quad[..r * d].copy_from_slice(&out[full * d..]);
        axpy4_rows([wr(full), wr(full + 1), wr(full + 2), wr(full + 3)], rows, stride, &mut quad);
        out[full * d..].copy_from_slice(&quad[..r * d]);
    }
}

/// Four dot products of one row against four vectors (register blocking for prefill).
#[inline]
pub fn dot4(row: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    match isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dot4_f32_avx512(row, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot4_f32_avx2(row, x) },
        _ => [dot(row, x[0]), dot(row, x[1]), dot(row, x[2]), dot(row, x[3])],
    }
}

/// 4 rows × 4 vectors of dot products: `out[r][t] = rows[r] · x[t]`.
#[inline]
pub fn dot4x4(rows: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    match isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dot4x4_avx512(rows, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot4x4_f32_avx2(rows, x) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot4x4(rows, x) },
        _ => [dot4(rows[0], x), dot4(rows[1], x), dot4(rows[2], x), dot4(rows[3], x)],
    }
}

/// The e2m1 (FP4) values of a nibble.
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// 2^(s − 127), an e8m0 scale (255, its NaN, decodes as NaN).
#[inline]
pub fn e8m0(s: u8) -> f32 {
    if s == 0xff { f32::NAN } else { f32::from_bits(if s == 0 { 0x0040_0000 } else { (s as u32) << 23 }) }
}

/// One MXFP4 row (`vals`: two values a byte, low nibble first; `scales`: one per 32) as f32.
pub fn mxfp4_decode_row(vals: &[u8], scales: &[u8], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let b = vals[j / 2];
        *o = E2M1[if j % 2 == 0 { b & 15 } else { b >> 4 } as usize] * e8m0(scales[j / 32]);
    }
}

/// Encodes one row as MXFP4: per 32 values the smallest power of two that puts the largest
/// magnitude within e2m1's ±6, then each value to its nearest e2m1 (ties to the smaller).
pub fn mxfp4_encode_row(row: &[f32], vals: &mut [u8], scales: &mut [u8]) {
    vals.iter_mut().for_each(|v| *v = 0);
    for (k, blk) in row.chunks(32).enumerate() {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = if amax > 0.0 { (amax / 6.0).log2().ceil().clamp(-127.0, 127.0) as i32 } else { -127 };
        scales[k] = (e + 127) as u8;
        let inv = e8m0(scales[k]).recip();
        for (i, &v) in blk.iter().enumerate() {
            let a = (v * inv).abs();
            // of equally near codes the first, the smaller magnitude (codes ascend in value)
            let best = (1..8).fold(0usize, |b, c| if (E2M1[c] - a).abs() < (E2M1[b] - a).abs() { c } else { b });
            let code = (best as u8) | if v < 0.0 && best > 0 { 8 } else { 0 };
            let j = k * 32 + i;
            vals[j / 2] |= if j % 2 == 0 { code } else { code << 4 };
        }
    }
}

/// Σ mxfp4(w)·x over one row.
#[inline]
pub fn dot_mxfp4(vals: &[u8], scales: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) && x.len().is_multiple_of(32) {
        // SAFETY: the ISA was detected at run time; whole blocks.
        return unsafe { x86::dot_mxfp4_avx512(vals, scales, x) };
    }
    dot_mxfp4_scalar(vals, scales, x)
}

pub fn dot_mxfp4_scalar(vals: &[u8], scales: &[u8], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (k, xb) in x.chunks(32).enumerate() {
        let mut acc = [0f32; 2];
        for (i, pair) in xb.chunks(2).enumerate() {
            let b = vals[k * 16 + i];
            acc[0] += E2M1[(b & 15) as usize] * pair[0];
            if let Some(&x1) = pair.get(1) {
                acc[1] += E2M1[(b >> 4) as usize] * x1;
            }
        }
        total += (acc[0] + acc[1]) * e8m0(scales[k]);
    }
    total
}

/// Σ bf16(w)·x.
#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    match isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dot_bf16_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot_bf16_avx2(w, x) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::dot_bf16(w, x) },
        _ => dot_bf16_scalar(w, x),
    }
}

pub fn dot_bf16_scalar(w: &[u16], x: &[f32]) -> f32 {
    dot_widened_scalar(w, x, bf16_to_f32)
}

/// Σ widen(w)·x for 16-bit `w`: eight running sums, then the tail (the scalar reference of the
/// bf16 and f16 dots).
#[inline]
pub fn dot_widened_scalar(w: &[u16], x: &[f32], widen: impl Fn(u16) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] += widen(a[i]) * b[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += widen(*a) * b;
    }
    s
}

/// An activation vector prepared for the quantized dot products of one format.
#[derive(Default, Debug, Clone)]
pub struct QPrep {
    /// x, permuted for the packing of `bits` (identity for 8 and 3 bits).
    pub xp: Vec<f32>,
    /// Σ x over each group.
    pub xsum: Vec<f32>,
    pub bits: u8,
    pub group: usize,
    /// The SIMD layout applies (cols and group are multiples of the chunk).
    pub fast: bool,
    /// int8 activations for `vpdpbusd` (VNNI): x / scale rounded, per group, permuted so each
    /// 64-element block lines up with its unpacked weight bytes.
    pub xq: Vec<i8>,
    /// Per-group scale of `xq`.
    pub xscale: Vec<f32>,
    pub int8: bool,
}

/// Elements per packed chunk whose lanes a permutation lines up (16 bytes).
fn chunk(bits: u8) -> usize {
    match bits {
        4 => 32,
        2 => 64,
        _ => 16,
    }
}

impl QPrep {
    /// Prepares `x` for rows of `bits`-bit groups of `group`, on int8 activations where the
    /// CPU has the instructions.
    pub fn prepare(&mut self, x: &[f32], bits: u8, group: usize) {
        self.prepare_with(x, bits, group, true)
    }

    /// [`QPrep::prepare`]; `int8_ok` false keeps f32 activations (exact products).
    pub fn prepare_with(&mut self, x: &[f32], bits: u8, group: usize, int8_ok: bool) {
        self.layout(x.len(), bits, group, int8_ok);
        // SAFETY: the whole vector, from one writer, into buffers `layout` sized for it
        unsafe { self.parts().fill(x, 0) }
    }

    /// Sizes the buffers for a vector of `cols` and decides its kernels, so that parts of it
    /// can then be filled by several writers at once ([`QPrep::parts`]).
    pub fn layout(&mut self, cols: usize, bits: u8, group: usize, int8_ok: bool) {
        self.bits = bits;
        self.group = group;
        let ch = chunk(bits);
        // q3 has only the int8 (VNNI + VBMI) path
        let q3_ok = bits != 3 || vbmi();
        self.fast = matches!(isa(), Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Neon)
            && q3_ok
            && cols.is_multiple_of(ch)
            && group.is_multiple_of(ch);
        // NEON's `sdot` multiplies signed bytes: only q4/q2 weights fit
        let int8_isa = isa() == Isa::Avx512Vnni || (dotprod() && matches!(bits, 4 | 2));
        self.int8 = int8_ok && self.fast && int8_isa && cols.is_multiple_of(64) && group.is_multiple_of(64);
        if bits == 3 && !self.int8 {
            self.fast = false;
        }
        let groups = cols.div_ceil(group);
        self.xp.resize(cols, 0.0);
        self.xsum.resize(groups, 0.0);
        self.xq.resize(if self.int8 { cols } else { 0 }, 0);
        self.xscale.resize(if self.int8 { groups } else { 0 }, 0.0);
    }

    /// Raw access for filling parts of the vector laid out by [`QPrep::layout`].
    pub fn parts(&mut self) -> PrepParts {
        PrepParts {
            xp: self.xp.as_mut_ptr(),
            xsum: self.xsum.as_mut_ptr(),
            xq: self.xq.as_mut_ptr(),
            xscale: self.xscale.as_mut_ptr(),
            bits: self.bits,
            group: self.group,
            fast: self.fast,
            int8: self.int8,
        }
    }
}

/// Writers of disjoint parts of one [`QPrep`] (a decode step's items, each preparing the rows
/// it computed as the next product's input).
#[derive(Clone, Copy)]
pub struct PrepParts {
    xp: *mut f32,
    xsum: *mut f32,
    xq: *mut i8,
    xscale: *mut f32,
    bits: u8,
    group: usize,
    fast: bool,
    int8: bool,
}
// SAFETY: writers fill disjoint parts (see `fill`).
unsafe impl Send for PrepParts {}
unsafe impl Sync for PrepParts {}

impl PrepParts {
    /// Prepares elements `c0..c0 + x.len()` of the vector.
    ///
    /// # Safety
    /// The [`QPrep`] was laid out for a vector holding that range and is neither moved nor
    /// read until every writer is done; `c0` is a multiple of the group (and of 64), the range
    /// ends on a group boundary or at the vector's end, and no other writer's range overlaps.
    pub unsafe fn fill(&self, x: &[f32], c0: usize) {
        let g = self.group;
        debug_assert!(c0.is_multiple_of(g));
        let (g0, ng) = (c0 / g, x.len().div_ceil(g));
        // SAFETY (all four): inside the buffers `layout` sized, a range only this writer touches
        let xsum = unsafe { std::slice::from_raw_parts_mut(self.xsum.add(g0), ng) };
        for (s, c) in xsum.iter_mut().zip(x.chunks(g)) {
            *s = c.iter().sum::<f32>();
        }
        let xp = unsafe { std::slice::from_raw_parts_mut(self.xp.add(c0), x.len()) };
        if self.int8 {
            let xq = unsafe { std::slice::from_raw_parts_mut(self.xq.add(c0), x.len()) };
            let xscale = unsafe { std::slice::from_raw_parts_mut(self.xscale.add(g0), ng) };
            // natural order first, then each 64-element block permuted for its weights' layout
            let mut nat: SmallVec<[i8; 256]> = SmallVec::from_elem(0, g);
            for ((gx, gq), s) in x.chunks(g).zip(xq.chunks_mut(g)).zip(xscale.iter_mut()) {
                *s = quantize_group(gx, &mut nat[..gx.len()]).0;
                let order: Option<&[u8; 64]> = match self.bits {
                    4 => Some(&Q4_ORDER),
                    2 => Some(&Q2_ORDER),
                    _ => None,
                };
                match order {
                    Some(o) => gq.chunks_mut(64).zip(nat.chunks(64)).for_each(|(q, b)| {
                        q.iter_mut().zip(o).for_each(|(q, &k)| *q = b[k as usize]);
                    }),
                    None => gq.copy_from_slice(&nat[..gx.len()]),
                }
            }
        }
        // the int8 kernels read only xq (and the length of xp)
        if !self.fast || self.bits == 8 || self.bits == 3 || self.int8 {
            xp.copy_from_slice(x);
            return;
        }
        // element j of a chunk sits in byte j / per at shift (j % per)·bits: lane order is
        // phase-major, so phase p of the chunk's 16 bytes holds elements p, p+per, ...
        let per = 8 / self.bits as usize;
        let ch = chunk(self.bits);
        for (c, out) in x.chunks(ch).zip(xp.chunks_mut(ch)) {
            for p in 0..per {
                for i in 0..16 {
                    out[p * 16 + i] = c[i * per + p];
                }
            }
        }
    }
}

/// Source element of each position of a 64-element q4 block: even elements of both 32-element
/// halves, then their odd elements.
const Q4_ORDER: [u8; 64] = {
    let mut o = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let (half, h, i) = (k / 32, (k / 16) % 2, k % 16);
        o[k] = (h * 32 + 2 * i + half) as u8;
        k += 1;
    }
    o
};

/// The same for q2: the four 2-bit phases in turn.
const Q2_ORDER: [u8; 64] = {
    let mut o = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        o[k] = (4 * (k % 16) + k / 16) as u8;
        k += 1;
    }
    o
};

/// One group of activations to int8: xq = round-half-even(x / s) clamped to ±127 with
/// s = max|x| / 127. Returns (s, Σ x).
pub(crate) fn quantize_group(x: &[f32], xq: &mut [i8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) && x.len().is_multiple_of(16) {
        // SAFETY: AVX-512 detected; equal lengths, a multiple of 16.
        return unsafe { x86::quantize_group_avx512(x, xq) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 && x.len().is_multiple_of(32) {
        // SAFETY: AVX2 detected; equal lengths, a multiple of 32.
        return unsafe { x86::quantize_group_avx2(x, xq) };
    }
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = amax / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (q, &v) in xq.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    (s, x.iter().sum())
}

/// Σ_j w_j·x_j of packed row `packed` (its scales and biases per group) against `prep`.
#[inline]
pub fn qdot(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    if prep.fast {
        // SAFETY: `fast` is only set when a SIMD ISA was detected and the sizes fit its chunks.
        #[cfg(target_arch = "x86_64")]
        match isa() {
            Isa::Avx512Vnni if prep.int8 && prep.bits == 3 => {
                return unsafe { x86::qdot_vnni_q3(packed, scales, biases, prep) };
            }
            Isa::Avx512Vnni if prep.int8 && prep.group == 64 && prep.bits == 4 && avx512vl() => {
                return unsafe { x86::qdot_vnni_g64::<4>(packed, scales, biases, prep) };
            }
            Isa::Avx512Vnni if prep.int8 && prep.group == 64 && prep.bits == 8 && avx512vl() => {
                return unsafe { x86::qdot_vnni_g64::<8>(packed, scales, biases, prep) };
            }
            Isa::Avx512Vnni if prep.int8 => return unsafe { x86::qdot_vnni(packed, scales, biases, prep) },
            Isa::Avx512 | Isa::Avx512Vnni => return unsafe { x86::qdot_avx512(packed, scales, biases, prep) },
            Isa::Avx2 => return unsafe { x86::qdot_avx2(packed, scales, biases, prep) },
            _ => {}
        }
        // SAFETY: as above; `int8` on aarch64 implies the dot-product extension and q4/q2.
        #[cfg(target_arch = "aarch64")]
        return unsafe {
            if prep.int8 {
                neon::qdot_sdot(packed, scales, biases, prep)
            } else {
                neon::qdot(packed, scales, biases, prep)
            }
        };
    }
    qdot_scalar(packed, scales, biases, &prep.xp, &prep.xsum, prep.bits, prep.group)
}

#[cfg(target_arch = "x86_64")]
/// Vectors a multi-vector kernel takes at once (more go in chunks of this many): four keep
/// every vector's accumulators in registers.
const MULTI: usize = 4;

/// The first `N` elements of `s` as an array.
#[cfg(target_arch = "x86_64")]
#[inline]
fn first<T: Copy, const N: usize>(s: &[T]) -> [T; N] {
    std::array::from_fn(|i| s[i])
}

/// Whether [`qdot`] picks the group-64 VNNI kernel for every one of `preps`: their bits.
#[cfg(target_arch = "x86_64")]
#[inline]
fn g64_vnni(preps: &[&QPrep]) -> Option<u8> {
    let bits = preps.first()?.bits;
    let ok = |p: &QPrep| p.fast && p.int8 && p.group == 64 && p.bits == bits && matches!(p.bits, 4 | 8);
    (isa() == Isa::Avx512Vnni && avx512vl() && preps.iter().all(|p| ok(p))).then_some(bits)
}

/// [`qdot`] of one row against several prepared vectors (a batch of sequences' decode step):
/// `out[t]` is bit for bit `qdot(packed, scales, biases, preps[t])`. Where the kernel `qdot`
/// picks has a multi-vector twin (AVX-512 VNNI group 64 q4/q8; AVX2 q2/q4/q8) the row is
/// loaded and unpacked once for every four vectors; elsewhere it is `qdot` per vector, the row
/// then read from L1.
pub fn qdot_multi(packed: &[u8], scales: &[u16], biases: &[u16], preps: &[&QPrep], out: &mut [f32]) {
    assert_eq!(preps.len(), out.len(), "one output per prepared vector");
    #[cfg(target_arch = "x86_64")]
    if let Some(bits) = g64_vnni(preps) {
        for (ps, os) in preps.chunks(MULTI).zip(out.chunks_mut(MULTI)) {
            // SAFETY: `g64_vnni` checked what `qdot` checks before it picks `qdot_vnni_g64`, for
            // every vector; `os` holds one output per vector of `ps`.
            unsafe {
                use x86::qdot_vnni_g64_multi as k;
                match (bits, ps.len()) {
                    (4, 1) => k::<4, 1>(packed, scales, biases, first(ps), os),
                    (4, 2) => k::<4, 2>(packed, scales, biases, first(ps), os),
                    (4, 3) => k::<4, 3>(packed, scales, biases, first(ps), os),
                    (4, _) => k::<4, 4>(packed, scales, biases, first(ps), os),
                    (_, 1) => k::<8, 1>(packed, scales, biases, first(ps), os),
                    (_, 2) => k::<8, 2>(packed, scales, biases, first(ps), os),
                    (_, 3) => k::<8, 3>(packed, scales, biases, first(ps), os),
                    (_, _) => k::<8, 4>(packed, scales, biases, first(ps), os),
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2
        && let Some(p0) = preps.first()
        && preps.iter().all(|p| p.fast && p.bits == p0.bits && p.group == p0.group && p.xp.len() == p0.xp.len())
    {
        for (ps, os) in preps.chunks(MULTI).zip(out.chunks_mut(MULTI)) {
            // SAFETY: AVX2 detected and every prep `fast` (what `qdot` checks before it picks
            // `qdot_avx2`), all of one shape; `os` holds one output per vector of `ps`.
            unsafe {
                use x86::qdot_avx2_multi as k;
                match ps.len() {
                    1 => k::<1>(packed, scales, biases, first(ps), os),
                    2 => k::<2>(packed, scales, biases, first(ps), os),
                    3 => k::<3>(packed, scales, biases, first(ps), os),
                    _ => k::<4>(packed, scales, biases, first(ps), os),
                }
            }
        }
        return;
    }
    for (o, p) in out.iter_mut().zip(preps) {
        *o = qdot(packed, scales, biases, p);
    }
}

/// [`dot`] of one row against several vectors: `out[t]` is bit for bit `dot(a, xs[t])`, the
/// row loaded once for every four vectors on AVX-512 and AVX2 (else `dot` per vector).
pub fn dot_multi(a: &[f32], xs: &[&[f32]], out: &mut [f32]) {
    assert!(xs.len() == out.len() && xs.iter().all(|x| x.len() == a.len()), "dot_multi: ragged vectors");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        for (v, o) in xs.chunks(MULTI).zip(out.chunks_mut(MULTI)) {
            // SAFETY: AVX-512F detected; equal lengths checked above.
            unsafe {
                use x86::dot_f32_avx512_multi as k;
                match v.len() {
                    1 => k::<1>(a, first(v), o),
                    2 => k::<2>(a, first(v), o),
                    3 => k::<3>(a, first(v), o),
                    _ => k::<4>(a, first(v), o),
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        for (v, o) in xs.chunks(MULTI).zip(out.chunks_mut(MULTI)) {
            // SAFETY: AVX2 and FMA detected; equal lengths checked above.
            unsafe {
                use x86::dot_f32_avx2_multi as k;
                match v.len() {
                    1 => k::<1>(a, first(v), o),
                    2 => k::<2>(a, first(v), o),
                    3 => k::<3>(a, first(v), o),
                    _ => k::<4>(a, first(v), o),
                }
            }
        }
        return;
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot(a, x);
    }
}

/// [`dot_bf16`] of one or two rows against several vectors: `out[r][t]` is bit for bit
/// `dot_bf16(w[r], xs[t])`. On AVX-512 and AVX2 each row is widened once for every four
/// vectors and, on AVX-512 with two rows, each vector loaded once for both (else `dot_bf16`
/// per pair).
pub fn dot_bf16_multi(w: &[&[u16]], xs: &[&[f32]], out: &mut [&mut [f32]]) {
    let n = w.first().map_or(0, |r| r.len());
    assert!(
        matches!(w.len(), 1 | 2)
            && w.iter().all(|r| r.len() == n)
            && xs.iter().all(|x| x.len() == n)
            && out.len() == w.len()
            && out.iter().all(|o| o.len() == xs.len()),
        "dot_bf16_multi: ragged rows or vectors"
    );
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) {
        for (c, v) in xs.chunks(MULTI).enumerate() {
            let at = c * MULTI;
            // SAFETY (every call): AVX-512F/BW detected; equal lengths checked above.
            macro_rules! tile {
                ($r:literal, $n:literal) => {{
                    let mut o = [[0f32; $n]; $r];
                    unsafe { x86::dot_bf16_avx512_multi::<$r, $n>(first(w), first(v), &mut o) };
                    for (dst, src) in out.iter_mut().zip(&o) {
                        dst[at..at + $n].copy_from_slice(src);
                    }
                }};
            }
            match (w.len(), v.len()) {
                (1, 1) => tile!(1, 1),
                (1, 2) => tile!(1, 2),
                (1, 3) => tile!(1, 3),
                (1, _) => tile!(1, 4),
                (_, 1) => tile!(2, 1),
                (_, 2) => tile!(2, 2),
                (_, 3) => tile!(2, 3),
                (_, _) => tile!(2, 4),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // one row at a time: two rows' accumulators for four vectors outnumber the registers
        for (r, o) in w.iter().zip(out.iter_mut()) {
            for (v, o) in xs.chunks(MULTI).zip(o.chunks_mut(MULTI)) {
                // SAFETY: AVX2 and FMA detected; equal lengths checked above.
                unsafe {
                    use x86::dot_bf16_avx2_multi as k;
                    match v.len() {
                        1 => k::<1>(r, first(v), o),
                        2 => k::<2>(r, first(v), o),
                        3 => k::<3>(r, first(v), o),
                        _ => k::<4>(r, first(v), o),
                    }
                }
            }
        }
        return;
    }
    for (r, o) in w.iter().zip(out.iter_mut()) {
        for (o, x) in o.iter_mut().zip(xs) {
            *o = dot_bf16(r, x);
        }
    }
}

/// Scalar reference: x in natural order.
pub fn qdot_scalar(
    packed: &[u8],
    scales: &[u16],
    biases: &[u16],
    x: &[f32],
    xsum: &[f32],
    bits: u8,
    group: usize,
) -> f32 {
    let cols = x.len();
    let mask = (1u32 << bits) - 1;
    let mut acc = 0.0f32;
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (a, e) = (g * group, ((g + 1) * group).min(cols));
        let mut qx = 0.0f32;
        for (j, xv) in x.iter().enumerate().take(e).skip(a) {
            let bit = j * bits as usize;
            let mut w = packed[bit / 8] as u32;
            if bit / 8 + 1 < packed.len() {
                w |= (packed[bit / 8 + 1] as u32) << 8;
            }
            qx += ((w >> (bit % 8)) & mask) as f32 * xv;
        }
        acc += bf16_to_f32(s) * qx + bf16_to_f32(b) * xsum[g];
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    use crate::testutil::uniform as rnd;

    #[test]
    fn softmax_matches_a_float64_reference() {
        for n in [1, 2, 15, 16, 17, 100, 1000, 2049] {
            // scores of attention's range, one of them far below the others (underflow)
            let mut x: Vec<f32> = rnd(n, 7).iter().map(|v| v * 30.0).collect();
            x[n / 2] -= 200.0;
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let (mut a, mut b) = (x.clone(), x.clone());
            let (ma, sa) = softmax(&mut a);
            let (mb, sb) = softmax_scalar(&mut b);
            assert!(ma as f64 == m && mb as f64 == m, "max n {n}");
            assert!((sa as f64 - s).abs() < 2e-6 * s && (sb as f64 - s).abs() < 2e-6 * s, "sum n {n}");
            for i in 0..n {
                let want = e[i] / s;
                assert!(
                    (a[i] as f64 - want).abs() <= 2e-6 * want.max(1e-30) + 1e-12,
                    "softmax n {n} i {i}: {} vs {want}",
                    a[i]
                );
                assert!((b[i] as f64 - want).abs() <= 2e-6 * want.max(1e-30) + 1e-12, "scalar n {n} i {i}");
            }
        }
    }

    #[test]
    fn mxfp4_rows_decode_encode_and_dot_as_the_format_defines() {
        for cols in [32usize, 64, 96, 2880, 40, 7] {
            let g = cols.div_ceil(32);
            // random codes and scales (no NaN scale), decoded by the definition in f64
            let vals: Vec<u8> = (0..g * 16).map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(7) as u8).collect();
            let scales: Vec<u8> = (0..g).map(|k| 110 + (k * 7 % 30) as u8).collect();
            let want: Vec<f64> = (0..cols)
                .map(|j| {
                    let b = vals[j / 2];
                    let code = if j % 2 == 0 { b & 15 } else { b >> 4 };
                    E2M1[code as usize] as f64 * 2f64.powi(scales[j / 32] as i32 - 127)
                })
                .collect();
            let mut dec = vec![0f32; cols];
            mxfp4_decode_row(&vals, &scales, &mut dec);
            assert!(dec.iter().zip(&want).all(|(a, b)| *a as f64 == *b), "decode {cols}");
            let x = rnd(cols, 3);
            let exact: f64 = want.iter().zip(&x).map(|(w, x)| w * *x as f64).sum();
            let mag: f64 = want.iter().zip(&x).map(|(w, x)| (w * *x as f64).abs()).sum();
            for (name, got) in
                [("dispatch", dot_mxfp4(&vals, &scales, &x)), ("scalar", dot_mxfp4_scalar(&vals, &scales, &x))]
            {
                assert!((got as f64 - exact).abs() <= 1e-6 * mag, "{name} dot {cols}: {got} vs {exact}");
            }
            // encoding the decoded row gives it back, value for value (codes of ±0 may differ)
            let (mut v2, mut s2) = (vec![0u8; g * 16], vec![0u8; g]);
            mxfp4_encode_row(&dec, &mut v2, &mut s2);
            let mut again = vec![0f32; cols];
            mxfp4_decode_row(&v2, &s2, &mut again);
            assert!(again.iter().zip(&dec).all(|(a, b)| a == b), "round trip {cols}");
            // any row: every value within half an e2m1 step of its block's scale
            let y: Vec<f32> = rnd(cols, 5).iter().map(|v| v * 10.0).collect();
            mxfp4_encode_row(&y, &mut v2, &mut s2);
            mxfp4_decode_row(&v2, &s2, &mut again);
            for (j, (a, b)) in again.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= e8m0(s2[j / 32]), "encode {cols} at {j}: {a} for {b}");
            }
        }
    }

    #[test]
    fn swiglu_matches_a_float64_reference() {
        for n in [0, 1, 15, 16, 17, 768, 1001] {
            // gate values over the range of real activations, and a few extreme ones
            let mut g: Vec<f32> = rnd(n, 11).iter().map(|v| v * 20.0).collect();
            let u = rnd(n, 12);
            for (i, v) in [-200.0, 200.0, -88.5, 0.0].into_iter().enumerate().filter(|&(i, _)| i < n) {
                g[i] = v;
            }
            let (mut a, mut b) = (g.clone(), g.clone());
            swiglu(&mut a, &u);
            swiglu_scalar(&mut b, &u);
            for i in 0..n {
                let x = g[i] as f64;
                let want = x / (1.0 + (-x).exp()) * u[i] as f64;
                let tol = 2e-6 * want.abs() + 1e-30;
                assert!((a[i] as f64 - want).abs() <= tol, "n {n} i {i}: {} vs {want}", a[i]);
                assert!((b[i] as f64 - want).abs() <= tol, "scalar n {n} i {i}: {} vs {want}", b[i]);
            }
        }
        let mut nan = [f32::NAN];
        swiglu(&mut nan, &[1.0]);
        assert!(nan[0].is_nan());
        for n in [1, 16, 33, 4096] {
            let mut x: Vec<f32> = rnd(n, 13).iter().map(|v| v * 30.0).collect();
            let want: Vec<f64> = x.iter().map(|&v| v as f64 / (1.0 + (-(v as f64)).exp())).collect();
            silu(&mut x);
            for (a, w) in x.iter().zip(&want) {
                assert!((*a as f64 - w).abs() <= 2e-6 * w.abs() + 1e-30, "silu n {n}: {a} vs {w}");
            }
        }
    }

    #[test]
    fn strided_attention_kernels_match_scalar() {
        // head sizes with and without a SIMD kernel, KV rows interleaved with other heads'
        for d in [16, 64, 100, 128, 256] {
            for len in [0, 1, 5, 33] {
                let stride = 3 * d + 7;
                let rows = rnd(len.max(1) * stride + d, 3);
                let (q, w) = (rnd(d, 4), rnd(len, 5));
                let mut s = vec![0.0; len];
                dot_rows(&q, &rows, stride, 0.5, &mut s);
                let mut o = rnd(d, 6);
                let o0 = o.clone();
                axpy_rows(&w, &rows, stride, &mut o);
                for p in 0..len {
                    let want: f64 = (0..d).map(|j| q[j] as f64 * rows[p * stride + j] as f64).sum::<f64>() * 0.5;
                    assert!((s[p] as f64 - want).abs() < 1e-4, "dot_rows d {d} len {len} p {p}");
                }
                for j in 0..d {
                    let want = o0[j] as f64 + (0..len).map(|p| w[p] as f64 * rows[p * stride + j] as f64).sum::<f64>();
                    assert!((o[j] as f64 - want).abs() < 1e-4, "axpy_rows d {d} len {len} j {j}");
                }
            }
        }
    }

    #[test]
    fn head_tiles_match_a_scalar_reference_on_odd_sizes() {
        // heads around multiples of 4, rows with and without tails, widths with and without
        // whole 16- and 64-column blocks (576 and 512: DeepSeek's latent rows and latents)
        for heads in [1, 3, 4, 5, 7, 16, 18] {
            for n in [1, 2, 3, 5, 17, 130] {
                for (d, dv) in [(7, 5), (37, 33), (576, 512)] {
                    let stride = d + 3;
                    let rows = rnd((n - 1) * stride + d, 1 + n as u64);
                    let q = rnd(heads * d, 2 + heads as u64);
                    let mut s = vec![f32::NAN; heads * n];
                    dot_tile(&q, heads, &rows, stride, &mut s);
                    for h in 0..heads {
                        for j in 0..n {
                            let want: f64 = (0..d).map(|i| q[h * d + i] as f64 * rows[j * stride + i] as f64).sum();
                            let got = s[h * n + j] as f64;
                            assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "dot_tile {heads}×{n}×{d}");
                        }
                    }
                    let w = rnd(heads * n, 3);
                    let o0 = rnd(heads * dv, 4);
                    let mut o = o0.clone();
                    axpy_tile(&w, heads, &rows, stride, &mut o);
                    for h in 0..heads {
                        for c in 0..dv {
                            let want = o0[h * dv + c] as f64
                                + (0..n).map(|j| w[h * n + j] as f64 * rows[j * stride + c] as f64).sum::<f64>();
                            let got = o[h * dv + c] as f64;
                            assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "axpy_tile {heads}×{n}×{dv}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tile_and_bf16_axpys_match_scalar_on_odd_sizes() {
        // widths with and without whole 64- and 16-column blocks, rows interleaved with others
        for d in [1, 7, 16, 17, 64, 100, 128, 200] {
            for k in [0, 1, 3, 33] {
                let stride = d + 5;
                let rows = rnd(k.max(1) * stride + d, 1);
                let p: Vec<Vec<f32>> = (0..4).map(|i| rnd(k, 10 + i)).collect();
                let pr = [&p[0][..], &p[1][..], &p[2][..], &p[3][..]];
                let o0 = rnd(4 * d, 2);
                let (mut a, mut b) = (o0.clone(), o0.clone());
                axpy4_rows(pr, &rows, stride, &mut a);
                axpy4_rows_scalar(pr, &rows, stride, &mut b);
                for i in 0..4 {
                    for j in 0..d {
                        let want = o0[i * d + j] as f64
                            + (0..k).map(|s| p[i][s] as f64 * rows[s * stride + j] as f64).sum::<f64>();
                        assert!((a[i * d + j] as f64 - want).abs() < 1e-5, "axpy4_rows d {d} k {k}");
                        assert!((b[i * d + j] as f64 - want).abs() < 1e-5, "axpy4_rows_scalar d {d} k {k}");
                    }
                }
            }
            let x: Vec<u16> = rnd(d, 3).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let y0 = rnd(d, 4);
            let (mut a, mut b) = (y0.clone(), y0.clone());
            axpy_bf16(-0.7, &x, &mut a);
            axpy_bf16_scalar(-0.7, &x, &mut b);
            for j in 0..d {
                let want = y0[j] as f64 - 0.7 * bf16_to_f32(x[j]) as f64;
                assert!((a[j] as f64 - want).abs() < 1e-6 && (b[j] as f64 - want).abs() < 1e-6, "axpy_bf16 d {d}");
            }
        }
    }

    #[test]
    fn simd_dots_match_scalar_on_odd_sizes() {
        for n in [1, 7, 8, 15, 16, 17, 31, 33, 64, 100, 257, 1000] {
            let (a, b) = (rnd(n, 1), rnd(n, 2));
            let want = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "dot {n}");
            let w: Vec<u16> = a.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
            let wb: f64 = w.iter().zip(&b).map(|(x, y)| bf16_to_f32(*x) as f64 * *y as f64).sum();
            assert!((dot_bf16(&w, &b) as f64 - wb).abs() < 1e-4, "bf16 {n}");
            assert!((dot_bf16_scalar(&w, &b) as f64 - wb).abs() < 1e-4, "bf16 scalar {n}");
            assert!((dot_scalar(&a, &b) as f64 - want).abs() < 1e-4, "dot scalar {n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6, "axpy {n}");
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let x4 = [&b[..], &b[..], &a[..], &a[..]];
                unsafe {
                    assert!((x86::dot_f32_avx2(&a, &b) as f64 - want).abs() < 1e-4, "avx2 dot {n}");
                    assert!((x86::dot_bf16_avx2(&w, &b) as f64 - wb).abs() < 1e-4, "avx2 bf16 {n}");
                    assert!((x86::dot4_f32_avx2(&a, x4)[1] as f64 - want).abs() < 1e-4, "avx2 dot4 {n}");
                    let blk = x86::dot4x4_f32_avx2([&a, &b, &a, &b], x4);
                    assert!(
                        (blk[0][1] as f64 - want).abs() < 1e-4 && (blk[3][2] as f64 - want).abs() < 1e-4,
                        "avx2 4x4 {n}"
                    );
                    if n % 32 == 0 {
                        let (mut q1, mut q2) = (vec![0i8; n], vec![0i8; n]);
                        // exact halves (ties) among the values, to check the rounding
                        let mut xt = a.clone();
                        let amax = xt.iter().fold(0f32, |m, v| m.max(v.abs()));
                        xt[1] = amax / 127.0 * 2.5;
                        let (s1, t1) = x86::quantize_group_avx2(&xt, &mut q1);
                        let amax = xt.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let s = amax / 127.0;
                        for (q, v) in q2.iter_mut().zip(&xt) {
                            *q = (v * (1.0 / s)).round_ties_even().clamp(-127.0, 127.0) as i8;
                        }
                        assert_eq!(s1, s, "avx2 quantizer scale {n}");
                        assert!((t1 - xt.iter().sum::<f32>()).abs() < 1e-4, "avx2 quantizer sum {n}");
                        assert_eq!(q1, q2, "avx2 quantizer {n}");
                    }
                }
            }
            let xs = [rnd(n, 3), rnd(n, 4), rnd(n, 5), rnd(n, 6)];
            let rs = [rnd(n, 7), rnd(n, 8), rnd(n, 9), rnd(n, 10)];
            let blk = dot4x4([&rs[0], &rs[1], &rs[2], &rs[3]], [&xs[0], &xs[1], &xs[2], &xs[3]]);
            for r in 0..4 {
                for k in 0..4 {
                    let want: f64 = rs[r].iter().zip(&xs[k]).map(|(x, y)| *x as f64 * *y as f64).sum();
                    assert!((blk[r][k] as f64 - want).abs() < 1e-4, "dot4x4 {n}");
                }
            }
            let got = dot4(&a, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            for k in 0..4 {
                let want: f64 = a.iter().zip(&xs[k]).map(|(x, y)| *x as f64 * *y as f64).sum();
                assert!((got[k] as f64 - want).abs() < 1e-4, "dot4 {n}");
            }
        }
    }

    #[test]
    fn multi_vector_dots_are_the_one_vector_dots_bit_for_bit() {
        // odd sizes and tails: partial 16-group blocks, groups that leave a tail, rows shorter
        // than a SIMD step; every batch size, past the four a kernel takes at once
        for b in 1..=8usize {
            let xs: Vec<Vec<f32>> = (0..b).map(|t| rnd(4096, 200 + t as u64)).collect();
            for bits in quant::BITS {
                for &(cols, group) in
                    &[(64, 64), (128, 64), (64 * 17, 64), (64 * 37, 64), (96, 32), (40, 8), (192, 128)]
                {
                    let w = rnd(2 * cols, bits as u64 * 31 + cols as u64);
                    let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, 2, cols, bits, group));
                    let q = quant::QMat::new(blob.bytes(), 2, cols, bits, group);
                    let (rb, ng) = (quant::row_bytes(cols, bits), cols.div_ceil(group));
                    for int8 in [true, false] {
                        let preps: Vec<QPrep> = xs
                            .iter()
                            .map(|x| {
                                let mut p = QPrep::default();
                                p.prepare_with(&x[..cols], bits, group, int8);
                                p
                            })
                            .collect();
                        let refs: Vec<&QPrep> = preps.iter().collect();
                        let mut row = vec![0.0; cols];
                        for r in 0..2 {
                            let (pk, sc, bi) = (
                                &q.packed[r * rb..(r + 1) * rb],
                                &q.scales[r * ng..(r + 1) * ng],
                                &q.biases[r * ng..(r + 1) * ng],
                            );
                            let mut got = vec![f32::NAN; b];
                            qdot_multi(pk, sc, bi, &refs, &mut got);
                            q.row_f32(r, &mut row);
                            for (t, p) in preps.iter().enumerate() {
                                let what = format!("q{bits} {cols}/{group} int8 {int8} row {r} vector {t} of {b}");
                                assert_eq!(got[t].to_bits(), qdot(pk, sc, bi, p).to_bits(), "{what}");
                                let x = &xs[t][..cols];
                                let want: f64 = row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                                let mag: f64 = row.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                                let wsum: f64 = row.iter().map(|v| v.abs() as f64).sum();
                                let tol = 1e-5 * (1.0 + mag) + if p.int8 { wsum * amax / 127.0 * 0.5 } else { 0.0 };
                                assert!((got[t] as f64 - want).abs() <= tol, "{what}: {} vs {want}", got[t]);
                            }
                        }
                    }
                }
            }
            for n in [1, 7, 16, 17, 31, 32, 33, 48, 100, 257, 2048] {
                let a = rnd(n, 5 + n as u64);
                let wb: Vec<u16> = a.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
                let vs: Vec<&[f32]> = xs.iter().map(|x| &x[..n]).collect();
                let (mut f, mut h, mut h2) = (vec![f32::NAN; b], vec![f32::NAN; b], vec![f32::NAN; b]);
                dot_multi(&a, &vs, &mut f);
                dot_bf16_multi(&[&wb], &vs, &mut [&mut h]);
                // two rows at once: the second the first reversed
                let wr: Vec<u16> = wb.iter().rev().copied().collect();
                let mut h1 = vec![f32::NAN; b];
                dot_bf16_multi(&[&wr, &wb], &vs, &mut [&mut h1, &mut h2]);
                for (t, x) in vs.iter().enumerate() {
                    assert_eq!(f[t].to_bits(), dot(&a, x).to_bits(), "f32 {n} vector {t} of {b}");
                    assert_eq!(h[t].to_bits(), dot_bf16(&wb, x).to_bits(), "bf16 {n} vector {t} of {b}");
                    assert_eq!(h2[t].to_bits(), h[t].to_bits(), "bf16 pair {n} vector {t} of {b}");
                    assert_eq!(h1[t].to_bits(), dot_bf16(&wr, x).to_bits(), "bf16 pair {n} vector {t} of {b}");
                    let want: f64 = a.iter().zip(*x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let wantb: f64 = wb.iter().zip(*x).map(|(a, b)| bf16_to_f32(*a) as f64 * *b as f64).sum();
                    assert!((f[t] as f64 - want).abs() < 1e-4 && (h[t] as f64 - wantb).abs() < 1e-4, "{n}: scalar");
                }
            }
        }
    }

    /// The AVX2 multi-vector kernels called directly (whatever ISA the dispatch picks here):
    /// every vector bit for bit its one-vector kernel, odd lengths and tails, 1 to 4 vectors.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_multi_vector_kernels_are_their_one_vector_kernels_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2 here");
            return;
        }
        let xs: Vec<Vec<f32>> = (0..4).map(|t| rnd(4096, 900 + t as u64)).collect();
        macro_rules! each_n {
            ($f:ident) => {
                $f!(1);
                $f!(2);
                $f!(3);
                $f!(4);
            };
        }
        for n in [1, 7, 8, 15, 16, 17, 31, 33, 100, 257, 2048] {
            let a = rnd(n, 77 + n as u64);
            let wb: Vec<u16> = a.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
            macro_rules! check {
                ($n:literal) => {{
                    let v: [&[f32]; $n] = std::array::from_fn(|t| &xs[t][..n]);
                    let (mut f, mut h) = ([f32::NAN; $n], [f32::NAN; $n]);
                    // SAFETY: AVX2 and FMA detected above; equal lengths.
                    unsafe {
                        x86::dot_f32_avx2_multi::<$n>(&a, v, &mut f);
                        x86::dot_bf16_avx2_multi::<$n>(&wb, v, &mut h);
                        for t in 0..$n {
                            assert_eq!(f[t].to_bits(), x86::dot_f32_avx2(&a, v[t]).to_bits(), "f32 {n} {t}/{}", $n);
                            assert_eq!(h[t].to_bits(), x86::dot_bf16_avx2(&wb, v[t]).to_bits(), "bf16 {n} {t}/{}", $n);
                        }
                    }
                }};
            }
            each_n!(check);
        }
        let mut fast = 0;
        for bits in [2u8, 4, 8] {
            for &(cols, group) in &[(64, 64), (128, 64), (64 * 17, 64), (64 * 37, 64), (192, 32), (192, 128), (40, 8)] {
                let w = rnd(2 * cols, bits as u64 * 13 + cols as u64);
                let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, 2, cols, bits, group));
                let q = quant::QMat::new(blob.bytes(), 2, cols, bits, group);
                let (rb, ng) = (quant::row_bytes(cols, bits), cols.div_ceil(group));
                let preps: Vec<QPrep> = xs
                    .iter()
                    .map(|x| {
                        let mut p = QPrep::default();
                        p.prepare_with(&x[..cols], bits, group, false);
                        p
                    })
                    .collect();
                if !preps[0].fast {
                    continue;
                }
                fast += 1;
                for r in 0..2 {
                    let (pk, sc, bi) = (
                        &q.packed[r * rb..(r + 1) * rb],
                        &q.scales[r * ng..(r + 1) * ng],
                        &q.biases[r * ng..(r + 1) * ng],
                    );
                    macro_rules! check {
                        ($n:literal) => {{
                            let ps: [&QPrep; $n] = std::array::from_fn(|t| &preps[t]);
                            let mut got = [f32::NAN; $n];
                            // SAFETY: AVX2 and FMA detected; every prep `fast`, of one shape.
                            unsafe {
                                x86::qdot_avx2_multi::<$n>(pk, sc, bi, ps, &mut got);
                                for t in 0..$n {
                                    let want = x86::qdot_avx2(pk, sc, bi, ps[t]);
                                    assert_eq!(
                                        got[t].to_bits(),
                                        want.to_bits(),
                                        "q{bits} {cols}/{group} row {r} {t}/{}",
                                        $n
                                    );
                                }
                            }
                        }};
                    }
                    each_n!(check);
                }
            }
        }
        assert!(fast >= 9, "only {fast} shapes took the SIMD path");
    }

    #[test]
    fn quantized_dots_match_scalar_reference() {
        for bits in quant::BITS {
            for &(rows, cols, group) in &[
                (3, 64, 64),
                (2, 128, 64),
                (5, 192, 32),
                (2, 96, 32),
                (3, 40, 8),
                (1, 2048, 64),
                (2, 48, 64),
                (2, 96, 64),
                (1, 192, 128),
                (2, 64 * 37, 64),
            ] {
                let w = rnd(rows * cols, bits as u64 + cols as u64);
                let x = rnd(cols, 99);
                let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, rows, cols, bits, group));
                let q = quant::QMat::new(blob.bytes(), rows, cols, bits, group);
                let mut prep = QPrep::default();
                prep.prepare(&x, bits, group);
                let rb = quant::row_bytes(cols, bits);
                let ng = cols.div_ceil(group);
                let mut row = vec![0.0; cols];
                for r in 0..rows {
                    q.row_f32(r, &mut row);
                    let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let (pk, sc, bi) = (
                        &q.packed[r * rb..(r + 1) * rb],
                        &q.scales[r * ng..(r + 1) * ng],
                        &q.biases[r * ng..(r + 1) * ng],
                    );
                    let mut got = vec![qdot(pk, sc, bi, &prep), qdot_scalar(pk, sc, bi, &x, &prep.xsum, bits, group)];
                    // every float-activation kernel this CPU can run, whatever the dispatcher picked
                    // (on a float preparation: an int8 one leaves x unpermuted)
                    let mut fprep = QPrep::default();
                    fprep.prepare_with(&x, bits, group, false);
                    #[cfg(target_arch = "x86_64")]
                    if fprep.fast && bits != 3 {
                        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                            got.push(unsafe { x86::qdot_avx2(pk, sc, bi, &fprep) });
                        }
                        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                            got.push(unsafe { x86::qdot_avx512(pk, sc, bi, &fprep) });
                        }
                    }
                    #[cfg(target_arch = "aarch64")]
                    {
                        let fits = |c: usize| cols.is_multiple_of(c) && group.is_multiple_of(c);
                        assert_eq!(prep.fast, bits != 3 && fits(chunk(bits)), "NEON takes q{bits} {cols}/{group}");
                        assert_eq!(prep.int8, prep.fast && dotprod() && matches!(bits, 4 | 2) && fits(64));
                    }
                    #[cfg(target_arch = "aarch64")]
                    if fprep.fast && bits != 3 {
                        got.push(unsafe { neon::qdot(pk, sc, bi, &fprep) });
                    }
                    // the int8-activation kernels round x to 8 bits per group: their error is at
                    // most Σ|w|·(x scale)/2 per group
                    if prep.int8 {
                        let bound: f64 = row
                            .chunks(group)
                            .zip(&prep.xscale)
                            .map(|(w, s)| w.iter().map(|v| v.abs() as f64).sum::<f64>() * *s as f64 * 0.5)
                            .sum::<f64>()
                            + 1e-4;
                        let v = got.remove(0) as f64;
                        let what = format!("int8 q{bits} {rows}x{cols}/{group}");
                        assert!((v - want).abs() <= bound, "{what}: {v} vs {want} ({bound})");
                        #[cfg(target_arch = "x86_64")]
                        {
                            let vnni = if bits == 3 {
                                unsafe { x86::qdot_vnni_q3(pk, sc, bi, &prep) }
                            } else {
                                unsafe { x86::qdot_vnni(pk, sc, bi, &prep) }
                            } as f64;
                            assert!((vnni - want).abs() <= bound, "vnni {what}: {vnni} vs {want} ({bound})");
                            // the group-64 kernel: the same products, summed in another order
                            let v64 = match bits {
                                4 if group == 64 && avx512vl() => {
                                    Some(unsafe { x86::qdot_vnni_g64::<4>(pk, sc, bi, &prep) })
                                }
                                8 if group == 64 && avx512vl() => {
                                    Some(unsafe { x86::qdot_vnni_g64::<8>(pk, sc, bi, &prep) })
                                }
                                _ => None,
                            };
                            if let Some(v64) = v64 {
                                let v64 = v64 as f64;
                                assert!((v64 - vnni).abs() <= 1e-5 * (1.0 + vnni.abs()), "g64 {what}: {v64} vs {vnni}");
                                assert_eq!(v, v64, "the dispatcher picked the group-64 VNNI kernel");
                            } else {
                                assert_eq!(v, vnni, "the dispatcher picked the VNNI kernel");
                            }
                        }
                        #[cfg(target_arch = "aarch64")]
                        assert_eq!(v, unsafe { neon::qdot_sdot(pk, sc, bi, &prep) } as f64, "the sdot kernel");
                    }
                    for g in got {
                        assert!(
                            (g as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "q{bits} {rows}x{cols}/{group}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
