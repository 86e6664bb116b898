//! Weight matrices in their storage format (f32, bf16, f16 or group-quantized), owned or
//! memory-mapped, with f32 matrix–vector and matrix–matrix products. Activations are f32.

use crate::kernels::ggml::{self, Ggml};
use crate::kernels::{self, QPrep, amx};
use crate::quant::{self, QMat};
use crate::scratch::{self, Pool};
use anyhow::{Result, bail};
use memmap2::Mmap;
use rayon::prelude::*;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Storage format of a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WKind {
    F32,
    BF16,
    F16,
    /// Group-wise affine quantization (see [`crate::quant`]).
    Q {
        bits: u8,
        group: u16,
    },
    /// OCP MXFP4 (gpt-oss's experts as released): per row, `cols/2` bytes of e2m1 values (the
    /// low nibble first) for every row, then `cols/32` e8m0 scales (2^(s − 127)) per row.
    Mxfp4,
    /// A ggml block type as GGUF stores it: each row whole blocks of scales and values.
    Ggml(Ggml),
}

impl WKind {
    /// Bytes of a `[rows, cols]` matrix in this format.
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WKind::F32 => rows * cols * 4,
            WKind::BF16 | WKind::F16 => rows * cols * 2,
            WKind::Q { bits, group } => quant::blob_bytes(rows, cols, bits, group as usize),
            WKind::Mxfp4 => rows * (cols.div_ceil(32) * 17),
            WKind::Ggml(t) => rows * t.row_bytes(cols),
        }
    }

    /// [`WKind::bytes`], or `None` where a size read from a file would overflow.
    pub fn checked_bytes(self, rows: usize, cols: usize) -> Option<usize> {
        // every format needs fewer than 8 bytes per element: if that fits, the formulas do
        rows.checked_mul(cols)?.checked_mul(8)?;
        Some(self.bytes(rows, cols))
    }

    /// Bytes per element for unquantized kinds (2 for quantized: their scales' size).
    pub fn size(self) -> usize {
        match self {
            WKind::F32 => 4,
            _ => 2,
        }
    }

    pub fn name(self) -> String {
        match self {
            WKind::F32 => "f32".into(),
            WKind::BF16 => "bf16".into(),
            WKind::F16 => "f16".into(),
            WKind::Q { bits, group } => format!("q{bits}g{group}"),
            WKind::Mxfp4 => "mxfp4".into(),
            WKind::Ggml(t) => format!("ggml-{}", t.name()),
        }
    }

    /// Parses a name written by [`WKind::name`].
    pub fn parse(s: &str) -> Option<WKind> {
        match s {
            "f32" => Some(WKind::F32),
            "bf16" => Some(WKind::BF16),
            "f16" => Some(WKind::F16),
            "mxfp4" => Some(WKind::Mxfp4),
            _ if s.starts_with("ggml-") => Ggml::parse(&s[5..]).map(WKind::Ggml),
            _ => {
                let rest = s.strip_prefix('q')?;
                let (b, g) = rest.split_once('g')?;
                let bits: u8 = b.parse().ok()?;
                let group: u16 = g.parse().ok()?;
                (quant::BITS.contains(&bits) && group > 0).then_some(WKind::Q { bits, group })
            }
        }
    }
}

/// 8-byte aligned owned bytes, so that views as u16/f32 are always aligned.
#[derive(Clone, Debug)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> AlignedBytes {
        AlignedBytes { words: vec![0; len.div_ceil(8)], len }
    }
    pub fn from_slice(b: &[u8]) -> AlignedBytes {
        let mut a = AlignedBytes::zeroed(b.len());
        a.bytes_mut().copy_from_slice(b);
        a
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

#[derive(Clone, Debug)]
enum Buf {
    Owned(AlignedBytes),
    Mapped { map: Arc<Mmap>, off: usize, len: usize },
}

/// An owned or mapped `[rows, cols]` matrix (PyTorch `nn.Linear` layout: y = W·x).
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub kind: WKind,
    buf: Buf,
}

/// A borrowed matrix: the unit every product works on.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub rows: usize,
    pub cols: usize,
    pub kind: WKind,
    pub data: &'a [u8],
}

use crate::kernels::bf16_to_f32;

#[inline]
fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Bytes of one MXFP4 row's packed values and of its scales (a partial last block is padded).
fn mxfp4_split(_rows: usize, cols: usize) -> (usize, usize) {
    (cols.div_ceil(32) * 16, cols.div_ceil(32))
}

/// How products treat the activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations in every product, as the reference computes (`logits`, the tests).
    Exact,
    /// int8 activations for q4/q8 (VNNI, AVX2) or q4/q2 (NEON dot product) weights, bf16
    /// activations where the CPU has AVX-512 BF16; f32 elsewhere. About 2× faster prefill.
    #[default]
    Fast,
}

thread_local! {
    /// Prepared activation vectors of quantized products (no allocation per product once warm).
    static PREP: Pool<QPrep> = const { Pool::new() };
}

/// Below this much work (weight elements × tokens for products) a step runs on the calling
/// thread: the pool's hand-off costs more than the work. `FLASHMOE_PAR_MIN` overrides it.
static PAR_MIN: AtomicUsize = AtomicUsize::new(UNSET);
const UNSET: usize = usize::MAX;

/// Whether work of this size goes to the thread pool.
#[inline]
pub fn parallel(work: usize) -> bool {
    let mut min = PAR_MIN.load(Relaxed);
    if min == UNSET {
        min = std::env::var("FLASHMOE_PAR_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 16);
        let _ = PAR_MIN.compare_exchange(UNSET, min, Relaxed, Relaxed);
    }
    work >= min
}

/// Sets the size from which work goes to the thread pool (tests set 0, so that tiny models
/// run every parallel path; results do not depend on it).
pub fn set_parallel_threshold(work: usize) {
    PAR_MIN.store(work, Relaxed);
}

impl Mat {
    /// A matrix over `data`, which must hold exactly the bytes `kind` needs.
    pub fn from_bytes(rows: usize, cols: usize, kind: WKind, data: AlignedBytes) -> Result<Mat> {
        if data.len != kind.bytes(rows, cols) {
            bail!("matrix {rows}x{cols} {} needs {} bytes, got {}", kind.name(), kind.bytes(rows, cols), data.len);
        }
        Ok(Mat { rows, cols, kind, buf: Buf::Owned(data) })
    }

    /// A matrix inside a memory map; `off` must be 8-byte aligned.
    pub fn mapped(rows: usize, cols: usize, kind: WKind, map: Arc<Mmap>, off: usize) -> Result<Mat> {
        let len = kind.checked_bytes(rows, cols).unwrap_or(usize::MAX);
        if !off.is_multiple_of(8) || off.checked_add(len).is_none_or(|end| end > map.len()) {
            bail!("matrix {rows}x{cols} at offset {off} does not fit an aligned slot of the {}-byte map", map.len());
        }
        Ok(Mat { rows, cols, kind, buf: Buf::Mapped { map, off, len } })
    }

    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Mat> {
        Mat::from_bytes(rows, cols, WKind::F32, AlignedBytes::from_slice(bytemuck::cast_slice(&data)))
    }

    pub fn from_half(rows: usize, cols: usize, bits: Vec<u16>, kind: WKind) -> Result<Mat> {
        if !matches!(kind, WKind::BF16 | WKind::F16) {
            bail!("from_half needs bf16 or f16");
        }
        Mat::from_bytes(rows, cols, kind, AlignedBytes::from_slice(bytemuck::cast_slice(&bits)))
    }

    pub fn dtype(&self) -> WKind {
        self.kind
    }

    pub fn data(&self) -> &[u8] {
        match &self.buf {
            Buf::Owned(a) => a.bytes(),
            Buf::Mapped { map, off, len } => &map[*off..*off + *len],
        }
    }

    pub fn view(&self) -> MatRef<'_> {
        MatRef { rows: self.rows, cols: self.cols, kind: self.kind, data: self.data() }
    }

    pub fn bytes(&self) -> usize {
        self.kind.bytes(self.rows, self.cols)
    }

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.view().row_f32(r, out)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.view().to_f32()
    }

    #[track_caller]
    pub fn matvec(&self, x: &[f32], y: &mut [f32], p: Precision) {
        self.view().matvec(x, y, p)
    }

    #[track_caller]
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], p: Precision) {
        self.view().matmul(x, n, y, p)
    }

    /// A new matrix made of the given row ranges, in order (un-fusing projections).
    pub fn gather_rows(&self, ranges: &[std::ops::Range<usize>]) -> Mat {
        let d = self.data();
        let rows: usize = ranges.iter().map(|r| r.len()).sum();
        let bytes: Vec<u8> = match self.kind {
            WKind::Q { bits, group } => {
                // rows are independent: gather packed rows, then their scales, then their biases
                let q = QMat::new(d, self.rows, self.cols, bits, group as usize);
                let rb = quant::row_bytes(self.cols, bits);
                let ng = self.cols.div_ceil(group as usize);
                let mut out = vec![0u8; self.kind.bytes(rows, self.cols)];
                let mut at = 0;
                for r in ranges.iter().flat_map(|r| r.clone()) {
                    out[at..at + rb].copy_from_slice(&q.packed[r * rb..(r + 1) * rb]);
                    at += rb;
                }
                let aux_at = out.len() - 4 * rows * ng;
                let aux: &mut [u16] = bytemuck::cast_slice_mut(&mut out[aux_at..]);
                let (sc, bi) = aux.split_at_mut(rows * ng);
                for (k, r) in ranges.iter().flat_map(|r| r.clone()).enumerate() {
                    sc[k * ng..(k + 1) * ng].copy_from_slice(&q.scales[r * ng..(r + 1) * ng]);
                    bi[k * ng..(k + 1) * ng].copy_from_slice(&q.biases[r * ng..(r + 1) * ng]);
                }
                out
            }
            WKind::Mxfp4 => {
                let (vb, sb) = mxfp4_split(self.rows, self.cols);
                let (vals, scales) = d.split_at(self.rows * vb);
                let mut out: Vec<u8> =
                    ranges.iter().flat_map(|r| vals[r.start * vb..r.end * vb].iter().copied()).collect();
                out.extend(ranges.iter().flat_map(|r| scales[r.start * sb..r.end * sb].iter().copied()));
                out
            }
            _ => {
                let rb = self.kind.bytes(1, self.cols);
                ranges.iter().flat_map(|r| d[r.start * rb..r.end * rb].iter().copied()).collect()
            }
        };
        Mat { rows, cols: self.cols, kind: self.kind, buf: Buf::Owned(AlignedBytes::from_slice(&bytes)) }
    }

    /// This matrix in another format.
    pub fn to_kind(&self, kind: WKind) -> Mat {
        let b = self.encode(kind);
        Mat::from_bytes(self.rows, self.cols, kind, AlignedBytes::from_slice(&b)).expect("encode gives the right size")
    }

    /// Encodes a matrix in `kind`, converting rows in chunks so a huge embedding never needs an
    /// f32 copy of itself.
    pub fn encode(&self, kind: WKind) -> Vec<u8> {
        let m = self;
        if m.kind == kind {
            return m.data().to_vec();
        }
        let (rows, cols) = (m.rows, m.cols);
        let mut out = vec![0u8; kind.bytes(rows, cols)];
        const CHUNK: usize = 1024;
        let mut buf = vec![0f32; CHUNK.min(rows.max(1)) * cols];
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + CHUNK).min(rows);
            let n = r1 - r0;
            for r in r0..r1 {
                m.row_f32(r, &mut buf[(r - r0) * cols..(r - r0 + 1) * cols]);
            }
            let rows_f = &buf[..n * cols];
            match kind {
                WKind::F32 => out[r0 * cols * 4..r1 * cols * 4].copy_from_slice(bytemuck::cast_slice(rows_f)),
                WKind::BF16 | WKind::F16 => {
                    for (i, v) in rows_f.iter().enumerate() {
                        let bits = if kind == WKind::BF16 {
                            half::bf16::from_f32(*v).to_bits()
                        } else {
                            half::f16::from_f32(*v).to_bits()
                        };
                        let o = (r0 * cols + i) * 2;
                        out[o..o + 2].copy_from_slice(&bits.to_le_bytes());
                    }
                }
                WKind::Q { bits, group } => {
                    let g = group as usize;
                    let blob = quant::quantize(rows_f, n, cols, bits, g);
                    // scatter the chunk's packed rows, scales and biases into the full blob
                    let rb = quant::row_bytes(cols, bits);
                    let ng = cols.div_ceil(g);
                    out[r0 * rb..r1 * rb].copy_from_slice(&blob[..n * rb]);
                    let (chunk_aux, full_aux) = (blob.len() - 4 * n * ng, out.len() - 4 * rows * ng);
                    let sc = 2 * ng;
                    out[full_aux + r0 * sc..full_aux + r1 * sc].copy_from_slice(&blob[chunk_aux..chunk_aux + n * sc]);
                    let (cb, fb) = (chunk_aux + n * sc, full_aux + rows * sc);
                    out[fb + r0 * sc..fb + r1 * sc].copy_from_slice(&blob[cb..cb + n * sc]);
                }
                WKind::Ggml(t) => unreachable!("no encoder for {}: GGUF tensors are kept as stored", t.name()),
                WKind::Mxfp4 => {
                    let (vb, sb) = mxfp4_split(rows, cols);
                    let (vals, scales) = out.split_at_mut(rows * vb);
                    for (i, row) in rows_f.chunks_exact(cols).enumerate() {
                        let r = r0 + i;
                        kernels::mxfp4_encode_row(
                            row,
                            &mut vals[r * vb..(r + 1) * vb],
                            &mut scales[r * sb..(r + 1) * sb],
                        );
                    }
                }
            }
            r0 = r1;
        }
        out
    }

    /// Index of the first NaN or ±Inf element (quantized: of the first such group scale or
    /// bias), if any.
    pub fn first_nonfinite(&self) -> Option<usize> {
        let d = self.data();
        let half = |bits: &[u16], exp: u16| bits.iter().position(|&b| b & exp == exp);
        match self.kind {
            WKind::F32 => bytemuck::cast_slice::<u8, f32>(d).iter().position(|v| !v.is_finite()),
            WKind::BF16 => half(bytemuck::cast_slice(d), 0x7f80),
            WKind::F16 => half(bytemuck::cast_slice(d), 0x7c00),
            WKind::Q { bits, group } => {
                let q = QMat::new(d, self.rows, self.cols, bits, group as usize);
                half(q.scales, 0x7f80).or_else(|| half(q.biases, 0x7f80))
            }
            // e8m0's NaN
            WKind::Mxfp4 => d[self.rows * mxfp4_split(self.rows, self.cols).0..].iter().position(|&s| s == 0xff),
            // a non-finite scale decodes to non-finite values
            WKind::Ggml(_) => {
                let mut row = vec![0f32; self.cols];
                (0..self.rows).find_map(|r| {
                    self.row_f32(r, &mut row);
                    row.iter().position(|v| !v.is_finite()).map(|c| r * self.cols + c)
                })
            }
        }
    }

    /// Rows `start..end` as a new matrix.
    pub fn slice_rows(&self, start: usize, end: usize) -> Mat {
        self.gather_rows(std::slice::from_ref(&(start..end)))
    }
}

impl<'a> MatRef<'a> {
    /// Row `r` converted to f32 into `out`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.kind {
            WKind::F32 => out.copy_from_slice(&bytemuck::cast_slice::<u8, f32>(self.data)[r * c..(r + 1) * c]),
            WKind::BF16 => {
                let d: &[u16] = bytemuck::cast_slice(self.data);
                for (o, &v) in out.iter_mut().zip(&d[r * c..(r + 1) * c]) {
                    *o = bf16_to_f32(v);
                }
            }
            WKind::F16 => {
                let d: &[u16] = bytemuck::cast_slice(self.data);
                for (o, &v) in out.iter_mut().zip(&d[r * c..(r + 1) * c]) {
                    *o = f16_to_f32(v);
                }
            }
            WKind::Q { bits, group } => QMat::new(self.data, self.rows, c, bits, group as usize).row_f32(r, out),
            WKind::Mxfp4 => {
                let (vals, scales) = self.mxfp4_row(r);
                kernels::mxfp4_decode_row(vals, scales, out);
            }
            WKind::Ggml(t) => {
                let rb = t.row_bytes(c);
                ggml::decode_row(t, &self.data[r * rb..(r + 1) * rb], out)
            }
        }
    }

    /// Row `r` of an MXFP4 matrix: (packed values, scales).
    fn mxfp4_row(&self, r: usize) -> (&'a [u8], &'a [u8]) {
        let (vb, sb) = mxfp4_split(self.rows, self.cols);
        let (vals, scales) = self.data.split_at(self.rows * vb);
        (&vals[r * vb..(r + 1) * vb], &scales[r * sb..(r + 1) * sb])
    }

    /// The whole matrix as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_f32(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }

    /// y = W·x for one vector. Quantized rows meet int8 activations with [`Precision::Fast`]
    /// where the CPU has the instructions.
    #[track_caller]
    pub fn matvec(&self, x: &[f32], y: &mut [f32], p: Precision) {
        products(&mut [Product { w: *self, x, y }], 1, p)
    }

    /// Rows `r0..r0 + y.len()` of W·x, with x prepared for this matrix.
    fn rows_into(&self, x: &Input<'_>, r0: usize, y: &mut [f32]) {
        let c = self.cols;
        match (self.kind, x) {
            (WKind::Q { bits, group }, Input::Quant(prep)) => {
                let q = QMat::new(self.data, self.rows, c, bits, group as usize);
                let rb = quant::row_bytes(c, bits);
                let ng = c.div_ceil(group as usize);
                for (o, r) in y.iter_mut().zip(r0..) {
                    *o = kernels::qdot(
                        &q.packed[r * rb..(r + 1) * rb],
                        &q.scales[r * ng..(r + 1) * ng],
                        &q.biases[r * ng..(r + 1) * ng],
                        prep,
                    );
                }
            }
            (WKind::F32, Input::Plain(x)) => {
                let d: &[f32] = bytemuck::cast_slice(self.data);
                for (o, r) in y.iter_mut().zip(r0..) {
                    *o = dot(&d[r * c..(r + 1) * c], x);
                }
            }
            (WKind::BF16, Input::Plain(x)) => {
                let d: &[u16] = bytemuck::cast_slice(self.data);
                for (o, r) in y.iter_mut().zip(r0..) {
                    *o = kernels::dot_bf16(&d[r * c..(r + 1) * c], x);
                }
            }
            (WKind::Mxfp4, Input::Plain(x)) => {
                for (o, r) in y.iter_mut().zip(r0..) {
                    let (vals, scales) = self.mxfp4_row(r);
                    *o = kernels::dot_mxfp4(vals, scales, x);
                }
            }
            (WKind::Ggml(t), Input::Plain(x)) => {
                let rb = t.row_bytes(c);
                for (o, r) in y.iter_mut().zip(r0..) {
                    *o = ggml::dot(t, &self.data[r * rb..(r + 1) * rb], x);
                }
            }
            (_, Input::Plain(x)) => {
                let d: &[u16] = bytemuck::cast_slice(self.data);
                for (o, r) in y.iter_mut().zip(r0..) {
                    *o = d[r * c..(r + 1) * c].iter().zip(*x).map(|(&w, &v)| f16_to_f32(w) * v).sum();
                }
            }
            (_, Input::Quant(_)) => unreachable!("quantized input prepared for a plain matrix"),
        }
    }

    /// Rows `r0..r0 + ys[t].len()` of W·x_t for each token's input `xs[t]` into `ys[t]`, each
    /// value bit for bit what [`MatRef::rows_into`] gives that token alone (the same kernel's
    /// sums, in the same order), while each weight row is read once for all the tokens: by a
    /// multi-vector kernel where the format has one, else by the one-token kernel per token
    /// while the row is in L1.
    fn rows_into_multi(&self, xs: &[Input<'_>], r0: usize, ys: &mut [&mut [f32]]) {
        let (c, m) = (self.cols, xs.len());
        debug_assert!(ys.len() == m && ys.iter().all(|y| y.len() == ys[0].len()));
        let len = ys.first().map_or(0, |y| y.len());
        let mut v: SmallVec<[f32; 16]> = SmallVec::from_elem(0.0, m);
        let mut put = |i: usize, v: &[f32]| ys.iter_mut().zip(v).for_each(|(y, &v)| y[i] = v);
        match self.kind {
            WKind::Q { bits, group } if xs.iter().all(|x| matches!(x, Input::Quant(_))) => {
                let preps: SmallVec<[&QPrep; 16]> =
                    xs.iter().map(|x| if let Input::Quant(q) = x { *q } else { unreachable!() }).collect();
                let q = QMat::new(self.data, self.rows, c, bits, group as usize);
                let rb = quant::row_bytes(c, bits);
                let ng = c.div_ceil(group as usize);
                for (i, r) in (r0..r0 + len).enumerate() {
                    let (sc, bi) = (&q.scales[r * ng..(r + 1) * ng], &q.biases[r * ng..(r + 1) * ng]);
                    kernels::qdot_multi(&q.packed[r * rb..(r + 1) * rb], sc, bi, &preps, &mut v);
                    put(i, &v);
                }
            }
            WKind::F32 | WKind::BF16 if xs.iter().all(|x| matches!(x, Input::Plain(_))) => {
                let plain: SmallVec<[&[f32]; 16]> =
                    xs.iter().map(|x| if let Input::Plain(x) = x { *x } else { unreachable!() }).collect();
                if self.kind == WKind::F32 {
                    let d: &[f32] = bytemuck::cast_slice(self.data);
                    for (i, r) in (r0..r0 + len).enumerate() {
                        kernels::dot_multi(&d[r * c..(r + 1) * c], &plain, &mut v);
                        put(i, &v);
                    }
                } else {
                    // two rows at a time: each token's vector is loaded once for both
                    let d: &[u16] = bytemuck::cast_slice(self.data);
                    let row = |r: usize| &d[r * c..(r + 1) * c];
                    let mut v2: SmallVec<[f32; 16]> = SmallVec::from_elem(0.0, m);
                    let mut i = 0;
                    while i < len {
                        let r = r0 + i;
                        if i + 2 <= len {
                            kernels::dot_bf16_multi(&[row(r), row(r + 1)], &plain, &mut [&mut v, &mut v2]);
                            put(i, &v);
                            put(i + 1, &v2);
                            i += 2;
                        } else {
                            kernels::dot_bf16_multi(&[row(r)], &plain, &mut [&mut v]);
                            put(i, &v);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                for i in 0..len {
                    for (x, y) in xs.iter().zip(ys.iter_mut()) {
                        self.rows_into(x, r0 + i, &mut y[i..i + 1]);
                    }
                }
            }
        }
    }

    /// Y = X·Wᵀ for `n` row vectors: `x` is `[n, cols]`, `y` is `[n, rows]`. Each weight row is
    /// decoded once and used for every input vector, so prefill reads the weights once.
    ///
    /// With [`Precision::Fast`], q4/q8 weights run on int8 activations (`vpdpbusd`, rounded
    /// as decode rounds them) where the CPU has AVX-512 VNNI (q4 also with AVX2), and bf16 and
    /// other quantized weights on bf16 activations (`vdpbf16ps`) where it has AVX-512 BF16.
    #[track_caller]
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], p: Precision) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(y.len(), n * self.rows);
        if n == 1 {
            return self.matvec(x, y, p);
        }
        let fast = p == Precision::Fast;
        // rows are independent: each block writes its own rows of every output vector
        let out = OutPtr(y.as_mut_ptr());
        match self.kind {
            WKind::Q { bits, group } if fast && kernels::int8_gemm(bits, group as usize, self.cols) => {
                // int8 activations, as decode uses, in a reused per-thread buffer
                let q = QMat::new(self.data, self.rows, self.cols, bits, group as usize);
                let mut xt = scratch::take(&QTOKENS);
                if amx::amx_int8() {
                    // AMX tiles take the activations in natural column order
                    xt.quantize(x, n, self.cols, group as usize, 8);
                    let mut tok = scratch::take(&AMX_INT8);
                    tok.pack(&xt);
                    self.blocks(n, |b| self.block_int8_amx(b, &q, &tok, out));
                } else {
                    xt.quantize(x, n, self.cols, group as usize, bits);
                    self.blocks(n, |b| self.block_int8(b, &q, &xt, out));
                }
            }
            WKind::BF16 | WKind::Q { .. } if fast && kernels::bf16_products() => {
                // the activations in bf16 once per product, in a reused per-thread buffer
                let mut xb = scratch::take(&XBF16);
                xb.resize(x.len(), 0);
                kernels::f32_to_bf16(x, &mut xb);
                if amx::amx_bf16() && self.cols.is_multiple_of(32) {
                    let mut tok = scratch::take(&AMX_BF16);
                    tok.pack(&xb, n, self.cols);
                    self.blocks(n, |b| self.block_bf16(b, &xb, n, Some(&tok), out));
                } else {
                    self.blocks(n, |b| self.block_bf16(b, &xb, n, None, out));
                }
            }
            _ => self.blocks(n, |b| self.block_f32(b, x, n, out)),
        }
    }

    /// Runs `f` on every block of [`RB`] rows, on the pool when the product is big enough.
    fn blocks(&self, n: usize, f: impl Fn(usize) + Sync + Send) {
        let nb = self.rows.div_ceil(RB);
        if !parallel(self.rows * self.cols * n) {
            (0..nb).for_each(f);
        } else {
            (0..nb).into_par_iter().for_each(f);
        }
    }

    /// Rows `b·RB..` of the product on f32: the rows are decoded once into f32 (they stay in
    /// L2), then swept by tiles of four tokens (they stay in L1).
    fn block_f32(&self, b: usize, x: &[f32], n: usize, out: OutPtr) {
        let (rows, cols) = (self.rows, self.cols);
        let (r0, r1) = (b * RB, ((b + 1) * RB).min(rows));
        let nr = r1 - r0;
        let mut rowsf = scratch::take(&ROWS_F32);
        rowsf.resize(nr * cols, 0.0);
        for r in r0..r1 {
            self.row_f32(r, &mut rowsf[(r - r0) * cols..(r - r0 + 1) * cols]);
        }
        sweep_tiles(&rowsf, x, cols, r0, r1, n, rows, out, kernels::dot4x4);
    }

    /// Rows `b·RB..` of the product on int8 activations: packed 16 rows at a time.
    fn block_int8(&self, b: usize, q: &QMat<'_>, xt: &kernels::QTokens, out: OutPtr) {
        let (r0, r1) = (b * RB, ((b + 1) * RB).min(self.rows));
        let mut panel = scratch::take(&PANEL);
        for p0 in (r0..r1).step_by(16) {
            panel.pack(q, p0, (r1 - p0).min(16));
            // SAFETY: `out` is the `[n, rows]` output of this product; rows r0..r1 are this
            // block's alone.
            unsafe { panel.gemm(q, xt, out.0, self.rows, p0) };
        }
    }

    /// Rows `b·RB..` of the product on int8 activations, on AMX tiles: 16 rows at a time
    /// unpacked to bytes.
    fn block_int8_amx(&self, b: usize, q: &QMat<'_>, tok: &amx::Int8Tokens, out: OutPtr) {
        let (r0, r1) = (b * RB, ((b + 1) * RB).min(self.rows));
        let mut panel = scratch::take(&AMX_PANEL);
        for p0 in (r0..r1).step_by(amx::T) {
            panel.pack(q, p0, (r1 - p0).min(amx::T));
            let mut y = amx::Out { y: out.0, rows: self.rows, r0: p0, _life: std::marker::PhantomData };
            // SAFETY: AMX checked by the caller; rows p0.. of the `[n, rows]` output are this
            // block's alone.
            unsafe { amx::gemm_int8(&panel, tok, q.group, &mut y) };
        }
    }

    /// Rows `b·RB..` of the product on bf16: bf16 weights are used in place, quantized rows
    /// are dequantized to bf16 once; on AMX tiles when `tiles` holds the packed tokens.
    fn block_bf16(&self, b: usize, xb: &[u16], n: usize, tiles: Option<&amx::Bf16Tokens>, out: OutPtr) {
        let (rows, cols) = (self.rows, self.cols);
        let (r0, r1) = (b * RB, ((b + 1) * RB).min(rows));
        let nr = r1 - r0;
        let mut dec = scratch::take(&ROWS_BF16);
        let src: &[u16] = match self.kind {
            WKind::Q { bits, group } => {
                let q = QMat::new(self.data, rows, cols, bits, group as usize);
                dec.resize(nr * cols, 0);
                let mut tmp = Vec::new();
                for r in r0..r1 {
                    let o = &mut dec[(r - r0) * cols..(r - r0 + 1) * cols];
                    if !kernels::dequant_row_bf16(&q, r, o) {
                        tmp.resize(cols, 0.0);
                        q.row_f32(r, &mut tmp);
                        kernels::f32_to_bf16(&tmp, o);
                    }
                }
                &dec
            }
            _ => &bytemuck::cast_slice::<u8, u16>(self.data)[r0 * cols..r1 * cols],
        };
        if let Some(tok) = tiles {
            let mut pad = scratch::take(&ROWS_BF16);
            for p0 in (0..nr).step_by(amx::T) {
                let np = (nr - p0).min(amx::T);
                // a tile reads 16 whole rows: a short panel goes through a zero-padded copy
                let w = if np == amx::T {
                    &src[p0 * cols..]
                } else {
                    pad.clear();
                    pad.extend_from_slice(&src[p0 * cols..(p0 + np) * cols]);
                    pad.resize(amx::T * cols, 0);
                    &pad[..]
                };
                let mut y = amx::Out { y: out.0, rows, r0: r0 + p0, _life: std::marker::PhantomData };
                // SAFETY: AMX checked by the caller; `w` holds 16 rows; rows r0.. of the
                // `[n, rows]` output are this block's alone.
                unsafe { amx::gemm_bf16(w, np, cols, tok, &mut y) };
            }
            return;
        }
        sweep_tiles(src, xb, cols, r0, r1, n, rows, out, kernels::dot4x4_bf16);
    }
}

/// Sweeps a block's decoded rows `r0..r1` (`src`, `cols` each) by 4×4 tiles against the `n`
/// token vectors of `x`, tokens outermost so a tile of x stays in L1 while the rows stream from
/// L2. A partial tile repeats its last row / token and drops those results.
#[allow(clippy::too_many_arguments)]
fn sweep_tiles<T>(
    src: &[T],
    x: &[T],
    cols: usize,
    r0: usize,
    r1: usize,
    n: usize,
    rows: usize,
    out: OutPtr,
    tile: impl Fn([&[T]; 4], [&[T]; 4]) -> [[f32; 4]; 4],
) {
    let nr = r1 - r0;
    let row = |i: usize| &src[i.min(nr - 1) * cols..(i.min(nr - 1) + 1) * cols];
    let xt = |t: usize| &x[t.min(n - 1) * cols..(t.min(n - 1) + 1) * cols];
    for t in (0..n).step_by(4) {
        let xs = [xt(t), xt(t + 1), xt(t + 2), xt(t + 3)];
        for i in (0..nr).step_by(4) {
            out.put(&tile([row(i), row(i + 1), row(i + 2), row(i + 3)], xs), r0 + i, r1, t, n, rows);
        }
    }
}

/// Rows per block of a matrix product (the unit of parallel work).
const RB: usize = 32;

thread_local! {
    /// Prefill scratch, reused so that products allocate nothing once warm.
    static XBF16: Pool<Vec<u16>> = const { Pool::new() };
    static ROWS_F32: Pool<Vec<f32>> = const { Pool::new() };
    static ROWS_BF16: Pool<Vec<u16>> = const { Pool::new() };
    static QTOKENS: Pool<kernels::QTokens> = const { Pool::new() };
    static PANEL: Pool<kernels::Panel> = const { Pool::new() };
    static AMX_INT8: Pool<amx::Int8Tokens> = const { Pool::new() };
    static AMX_BF16: Pool<amx::Bf16Tokens> = const { Pool::new() };
    static AMX_PANEL: Pool<amx::Int8Panel> = const { Pool::new() };
}

/// One product of a set computed together: `y = W·x` (or `Y = X·Wᵀ` for several tokens).
pub struct Product<'a> {
    pub w: MatRef<'a>,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
}

/// A product's input as its kernel takes it.
enum Input<'a> {
    Plain(&'a [f32]),
    Quant(&'a QPrep),
}

/// Work items per thread of a decode step (`FLASHMOE_ITEMS` overrides 4, for tuning).
fn items_per_thread() -> usize {
    static ITEMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ITEMS.get_or_init(|| std::env::var("FLASHMOE_ITEMS").ok().and_then(|v| v.parse().ok()).unwrap_or(4).max(1))
}

/// Rows of a decode step's plan: one matrix, or several whose rows an item reads together.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Section {
    pub rows: usize,
    /// Weight bytes an item reads per row.
    pub row_bytes: usize,
    /// Items start on multiples of this many rows (and end on one, or at the last row).
    pub align: usize,
}

impl Section {
    fn of(w: &MatRef<'_>) -> Section {
        Section { rows: w.rows, row_bytes: w.kind.bytes(w.rows, w.cols).div_ceil(w.rows.max(1)).max(1), align: 1 }
    }
}

/// A decode step's items: (section, first row, end row).
pub(crate) type Items = SmallVec<[(usize, usize, usize); 256]>;

/// Work items of a decode step, largest first (guided self-scheduling): each item takes half
/// the remaining work's share per thread, down to a floor of 1/(2·`FLASHMOE_ITEMS`) of a
/// thread's share (and 16 KB of weights), so the first claims are few and large and the step
/// ends on small items rather than on one thread finishing a large one while the others wait.
/// Each claim is an atomic on a line every thread touches: about seven items per thread at four.
/// Items never span two sections. Returns (section, first row, end row) per item.
pub(crate) fn plan(sections: &[Section], threads: usize) -> Items {
    let total: usize = sections.iter().map(|s| s.rows * s.row_bytes).sum();
    let floor = (total / (2 * items_per_thread() * threads)).max(16 << 10);
    let mut left = total;
    let mut items = SmallVec::new();
    for (j, s) in sections.iter().enumerate() {
        let align = s.align.max(1);
        let mut r = 0;
        while r < s.rows {
            let size = (left / (2 * threads)).max(floor);
            let n = size.div_ceil(s.row_bytes).next_multiple_of(align).min(s.rows - r);
            items.push((j, r, r + n));
            r += n;
            left = left.saturating_sub(n * s.row_bytes);
        }
    }
    items
}

/// [`plan`] for whole products.
#[cfg(test)]
fn plan_items(ws: &[MatRef<'_>], threads: usize) -> SmallVec<[(usize, usize, usize); 256]> {
    let sections: SmallVec<[Section; 32]> = ws.iter().map(Section::of).collect();
    plan(&sections, threads)
}

/// Computes independent products over `n` tokens each. One token (decode): every row of every
/// product is a work item of one parallel step, so the threads start once for all of them
/// (a layer's q, k and v; all experts' gate and up) and inputs shared by several products are
/// prepared once. Several tokens: the products run side by side on rayon.
#[track_caller]
pub fn products(jobs: &mut [Product<'_>], n: usize, p: Precision) {
    if n != 1 {
        return match jobs {
            [] => {}
            [j] => j.w.matmul(j.x, n, j.y, p),
            _ => {
                let (a, b) = jobs.split_at_mut(jobs.len() / 2);
                rayon::join(|| products(a, n, p), || products(b, n, p));
            }
        };
    }
    products_then(jobs, &[], &|_, _, _| {}, p)
}

/// [`products`] for products whose tokens are each one decode step of its own sequence (a
/// batch of sequences): product `j` takes `x.len() / w.cols` tokens (`x` `[n, cols]`, `y`
/// `[n, rows]`), and every token's outputs are bit for bit what the one-token product gives
/// it alone (the same input preparation and kernel), while each item reads its weight rows
/// once for all the tokens. One decode step on the team, as for one token.
#[track_caller]
pub fn products_rows(jobs: &mut [Product<'_>], p: Precision) {
    products_rows_then(jobs, &[], &|_, _, _, _| {}, p)
}

/// After an item computed rows `r0..` of token `t` of product `j`: `then(j, t, r0, rows)`.
pub type ThenRows<'a> = dyn Fn(usize, usize, usize, &mut [f32]) + Sync + 'a;

/// [`products_rows`], each item then finishing the rows it computed for each token with `then`
/// (as [`products_then`] does for one token). Items of product `j` start on multiples of
/// `align[j]` rows (one where `align` is short).
#[track_caller]
pub fn products_rows_then(jobs: &mut [Product<'_>], align: &[usize], then: &ThenRows<'_>, p: Precision) {
    let site = std::panic::Location::caller();
    for j in jobs.iter() {
        assert!(
            j.w.cols > 0 && j.x.len().is_multiple_of(j.w.cols) && j.y.len() == j.x.len() / j.w.cols * j.w.rows,
            "a product's inputs and outputs do not match its {}x{} weights",
            j.w.rows,
            j.w.cols
        );
    }
    let _timed = account(jobs.iter().map(|j| j.w.kind.bytes(j.w.rows, j.w.cols)).sum());
    // (weights, input, output, tokens)
    type Job<'a> = (MatRef<'a>, &'a [f32], OutPtr, usize);
    let jobs: SmallVec<[Job<'_>; 32]> =
        jobs.iter_mut().map(|j| (j.w, j.x, OutPtr(j.y.as_mut_ptr()), j.x.len() / j.w.cols)).collect();
    // token t of product j is input first[j] + t
    let first: SmallVec<[usize; 32]> = jobs
        .iter()
        .scan(0, |o, j| {
            *o += j.3;
            Some(*o - j.3)
        })
        .collect();
    let prepared = Prepared::new(jobs.iter().flat_map(|j| j.1.chunks_exact(j.0.cols).map(move |x| (j.0, x))), p);
    crate::par::mark();
    let work: usize = jobs.iter().map(|j| j.0.rows * j.0.cols * j.3).sum();
    let (threads, items) = plan_products(jobs.iter().map(|j| j.0), align, work);
    step(site, items.len(), threads, |k| {
        let (ji, r0, r1) = items[k];
        let (w, x, y, n) = jobs[ji];
        let inputs: SmallVec<[Input<'_>; 16]> =
            (0..n).map(|t| prepared.input(first[ji] + t, &x[t * w.cols..(t + 1) * w.cols])).collect();
        // SAFETY: each output is a distinct `&mut` of the caller, alive past this call, of
        // `n` rows of the product's outputs; rows r0..r1 of each token are this item's alone
        let mut ys: SmallVec<[&mut [f32]; 16]> = (0..n).map(|t| unsafe { y.slice(t * w.rows + r0, r1 - r0) }).collect();
        w.rows_into_multi(&inputs, r0, &mut ys);
        for (t, y) in ys.iter_mut().enumerate() {
            then(ji, t, r0, y);
        }
    });
}

/// The team size for `work` multiply-adds and the items of a step over whole products, the
/// items of product `j` starting on multiples of `align[j]` rows (one where `align` is short).
fn plan_products<'a>(ws: impl Iterator<Item = MatRef<'a>>, align: &[usize], work: usize) -> (usize, Items) {
    let threads = if parallel(work) { rayon::current_num_threads() } else { 1 };
    let sections: SmallVec<[Section; 32]> = ws
        .enumerate()
        .map(|(ji, w)| Section { align: align.get(ji).copied().unwrap_or(1), ..Section::of(&w) })
        .collect();
    (threads, plan(&sections, threads))
}

/// After an item computed rows `r0..` of product `j`: `then(j, r0, rows)`.
pub type Then<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// [`products`] for one token, each item then finishing the rows it computed with `then`
/// (a head's normalisation and rotation, say) while they are in its cache, instead of the
/// leader reading them all back after the step. Items of product `j` start on multiples of
/// `align[j]` rows (one where `align` is short).
#[track_caller]
pub fn products_then(jobs: &mut [Product<'_>], align: &[usize], then: &Then<'_>, p: Precision) {
    let site = std::panic::Location::caller();
    let _timed = account(jobs.iter().map(|j| j.w.kind.bytes(j.w.rows, j.w.cols)).sum());
    // (weights, input, output, output length)
    type Job<'a> = (MatRef<'a>, &'a [f32], OutPtr, usize);
    let jobs: SmallVec<[Job<'_>; 32]> =
        jobs.iter_mut().map(|j| (j.w, j.x, OutPtr(j.y.as_mut_ptr()), j.y.len())).collect();
    let prepared = Prepared::new(jobs.iter().map(|j| (j.0, j.1)), p);
    crate::par::mark();
    let work: usize = jobs.iter().map(|j| j.0.rows * j.0.cols).sum();
    let (threads, items) = plan_products(jobs.iter().map(|j| j.0), align, work);
    step(site, items.len(), threads, |k| {
        let (ji, r0, r1) = items[k];
        debug_assert_eq!(jobs[ji].3, jobs[ji].0.rows);
        // SAFETY: each output is a distinct `&mut` of the caller, alive past this call, of the
        // product's rows; rows r0..r1 of it are this item's alone
        let y = unsafe { jobs[ji].2.slice(r0, r1 - r0) };
        jobs[ji].0.rows_into(&prepared.input(ji, jobs[ji].1), r0, y);
        then(ji, r0, y);
    });
}

/// The input vector of a product, written in parts by the items of the step before it (each
/// part prepared for the product's kernels as it is written, when the parts line up with the
/// weights' groups), then multiplied in a step of its own.
pub struct Staged<'a> {
    w: MatRef<'a>,
    x: scratch::Buf,
    prep: Option<scratch::Pooled<QPrep>>,
    /// Parts are prepared as they are written (else all at once before the product).
    parts: Option<kernels::PrepParts>,
    xp: OutPtr,
    p: Precision,
}

// SAFETY: writers touch disjoint parts (see `write`); the rest is read only after they finish.
unsafe impl Sync for Staged<'_> {}

impl<'a> Staged<'a> {
    /// An input for `w`, to be written in parts starting on multiples of `unit` elements.
    pub fn new(w: MatRef<'a>, unit: usize, p: Precision) -> Staged<'a> {
        // every element is written (the parts tile the vector) before the product reads it;
        // unused when the parts are prepared as they come
        let mut x = scratch::dirty(w.cols);
        let xp = OutPtr(x.as_mut_ptr());
        let (mut prep, mut parts) = (None, None);
        if let WKind::Q { bits, group } = w.kind {
            let mut q = scratch::take(&PREP);
            q.layout(w.cols, bits, group as usize, p == Precision::Fast);
            if unit.is_multiple_of(group as usize) {
                parts = Some(q.parts());
            }
            prep = Some(q);
        }
        Staged { w, x, prep, parts, xp, p }
    }

    /// Writes elements `c0..c0 + v.len()` of the input.
    ///
    /// # Safety
    /// `c0` is a multiple of the `unit` given to [`Staged::new`], the part ends on one or at the
    /// vector's end, and no other writer's part overlaps it.
    pub unsafe fn write(&self, c0: usize, v: &[f32]) {
        match &self.parts {
            // SAFETY: the caller's; the part starts on a multiple of the group (unit is one)
            Some(parts) => unsafe { parts.fill(v, c0) },
            // the plain vector, read by the product (plain weights) or prepared whole before it
            // SAFETY: the caller's
            None => unsafe { self.xp.slice(c0, v.len()) }.copy_from_slice(v),
        }
    }

    /// `y = W·x` once every part is written.
    #[track_caller]
    pub fn product(mut self, y: &mut [f32]) {
        assert_eq!(y.len(), self.w.rows, "a staged product's output has the wrong length");
        let site = std::panic::Location::caller();
        let _timed = account(self.w.kind.bytes(self.w.rows, self.w.cols));
        if let (Some(q), None, WKind::Q { bits, group }) = (&mut self.prep, self.parts, self.w.kind) {
            q.prepare_with(&self.x, bits, group as usize, self.p == Precision::Fast);
        }
        let input = match &self.prep {
            Some(q) => Input::Quant(q),
            None => Input::Plain(&self.x),
        };
        let threads = if parallel(self.w.rows * self.w.cols) { rayon::current_num_threads() } else { 1 };
        let items = plan(&[Section::of(&self.w)], threads);
        let yp = OutPtr(y.as_mut_ptr());
        step(site, items.len(), threads, |k| {
            let (_, r0, r1) = items[k];
            // SAFETY: rows r0..r1 of `y` are this item's alone; `y` outlives the step
            self.w.rows_into(&input, r0, unsafe { yp.slice(r0, r1 - r0) });
        });
    }
}

impl Staged<'_> {
    /// [`Staged::product`] of several inputs to the same weights (one per sequence of a batch),
    /// in one step: row `t` of `y` (`[n, rows]`) is bit for bit what `stages[t].product`
    /// gives, and each weight row is read once for all of them.
    #[track_caller]
    pub fn product_rows(mut stages: SmallVec<[Staged<'_>; 8]>, y: &mut [f32]) {
        let Some(w) = stages.first().map(|s| s.w) else { return };
        assert!(
            stages.iter().all(|s| std::ptr::eq(s.w.data, w.data) && s.w.kind == w.kind && s.w.cols == w.cols)
                && y.len() == stages.len() * w.rows,
            "staged products of a batch share their weights and fill one output row each"
        );
        let site = std::panic::Location::caller();
        let _timed = account(w.kind.bytes(w.rows, w.cols));
        for s in stages.iter_mut() {
            if let (Some(q), None, WKind::Q { bits, group }) = (&mut s.prep, s.parts, s.w.kind) {
                q.prepare_with(&s.x, bits, group as usize, s.p == Precision::Fast);
            }
        }
        let inputs: SmallVec<[Input<'_>; 8]> = stages
            .iter()
            .map(|s| match &s.prep {
                Some(q) => Input::Quant(q),
                None => Input::Plain(&s.x),
            })
            .collect();
        let n = inputs.len();
        let threads = if parallel(w.rows * w.cols * n) { rayon::current_num_threads() } else { 1 };
        let items = plan(&[Section::of(&w)], threads);
        let yp = OutPtr(y.as_mut_ptr());
        step(site, items.len(), threads, |k| {
            let (_, r0, r1) = items[k];
            // SAFETY: rows r0..r1 of each token's output row are this item's alone; `y`
            // outlives the step
            let mut ys: SmallVec<[&mut [f32]; 8]> =
                (0..n).map(|t| unsafe { yp.slice(t * w.rows + r0, r1 - r0) }).collect();
            w.rows_into_multi(&inputs, r0, &mut ys);
        });
    }
}

/// Counts a decode step's weight bytes and times it (the single-token products' figures).
fn account(bytes: usize) -> crate::profile::Timed<'static> {
    let prof = &crate::profile::PROFILE;
    prof.product_bytes.fetch_add(bytes as u64, Relaxed);
    crate::profile::Timed(&prof.products, std::time::Instant::now())
}

/// The inputs of a set of products, each distinct (input, format) prepared once.
struct Prepared {
    preps: SmallVec<[scratch::Pooled<QPrep>; 4]>,
    /// Per product: its prepared input, or `usize::MAX` for a plain one.
    which: SmallVec<[usize; 32]>,
}

impl Prepared {
    fn new<'a>(jobs: impl Iterator<Item = (MatRef<'a>, &'a [f32])>, p: Precision) -> Prepared {
        let mut seen: SmallVec<[(*const f32, WKind); 4]> = SmallVec::new();
        let mut r = Prepared { preps: SmallVec::new(), which: SmallVec::new() };
        for (w, x) in jobs {
            debug_assert_eq!(x.len(), w.cols);
            let WKind::Q { bits, group } = w.kind else {
                r.which.push(usize::MAX);
                continue;
            };
            match seen.iter().position(|&(k, kind)| std::ptr::eq(k, x.as_ptr()) && kind == w.kind) {
                Some(i) => r.which.push(i),
                None => {
                    let mut prep = scratch::take(&PREP);
                    prep.prepare_with(x, bits, group as usize, p == Precision::Fast);
                    r.preps.push(prep);
                    seen.push((x.as_ptr(), w.kind));
                    r.which.push(r.preps.len() - 1);
                }
            }
        }
        r
    }

    /// Product `ji`'s input (`x` is its plain input).
    fn input<'a>(&'a self, ji: usize, x: &'a [f32]) -> Input<'a> {
        match self.which[ji] {
            usize::MAX => Input::Plain(x),
            i => Input::Quant(&self.preps[i]),
        }
    }
}

/// A SwiGLU block applied to one token as a term of a weighted sum (a routed or shared expert).
#[derive(Clone, Copy)]
pub struct SwigluTerm<'a> {
    pub gate: MatRef<'a>,
    pub up: MatRef<'a>,
    pub down: MatRef<'a>,
    pub x: &'a [f32],
    pub weight: f32,
    /// Biases of gate, up and down, and the activation ([`crate::layers::mlp::activate`]).
    pub bias: Option<[&'a [f32]; 3]>,
    pub act: crate::config::Act,
}

/// `out = Σ_i weight_i · down_i(silu(gate_i·x_i) ⊙ up_i·x_i)`, summed in the order given, in two
/// decode steps: items of the first compute the same rows of a block's gate and up, apply
/// SwiGLU to them and prepare them as the down product's input; items of the second compute
/// rows of every block's down product and sum them into `out`. The leader's serial work
/// between and after the steps (SwiGLU, quantizing each block's input, reading back every
/// block's output to combine them) is gone. Each output element is the same sum, in the same
/// order, as products followed by `axpy` per term would compute, so the result is identical.
#[track_caller]
pub fn swiglu_sum(terms: &[SwigluTerm<'_>], out: &mut [f32], p: Precision) {
    let site = std::panic::Location::caller();
    let hidden = out.len();
    for t in terms {
        assert!(
            t.gate.rows == t.up.rows
                && t.down.cols == t.gate.rows
                && t.down.rows == hidden
                && t.x.len() == t.gate.cols
                && t.up.cols == t.gate.cols,
            "a SwiGLU term's shapes do not chain"
        );
    }
    let bytes: usize =
        terms.iter().map(|t| [t.gate, t.up, t.down].iter().map(|w| w.kind.bytes(w.rows, w.cols)).sum::<usize>()).sum();
    let _timed = account(bytes);
    // first step: the inputs of gate and up
    let prepared = Prepared::new(terms.iter().flat_map(|t| [(t.gate, t.x), (t.up, t.x)]), p);
    // each block's hidden activations, and their preparation for its down product
    let offs: SmallVec<[usize; 17]> = std::iter::once(0)
        .chain(terms.iter().scan(0, |o, t| {
            *o += t.gate.rows;
            Some(*o)
        }))
        .collect();
    // every row is written by the first step's items
    let mut h = scratch::dirty(offs[terms.len()]);
    let hp = OutPtr(h.as_mut_ptr());
    let mut down_in: SmallVec<[Option<scratch::Pooled<QPrep>>; 16]> = terms
        .iter()
        .map(|t| match t.down.kind {
            WKind::Q { bits, group } => {
                let mut q = scratch::take(&PREP);
                q.layout(t.down.cols, bits, group as usize, p == Precision::Fast);
                Some(q)
            }
            _ => None,
        })
        .collect();
    let parts: SmallVec<[Option<kernels::PrepParts>; 16]> =
        down_in.iter_mut().map(|q| q.as_mut().map(|q| q.parts())).collect();
    let align = |w: &MatRef<'_>| match w.kind {
        WKind::Q { group, .. } => lcm(group as usize, 16),
        _ => 16,
    };
    let threads = if parallel(bytes) { rayon::current_num_threads() } else { 1 };
    let sections: SmallVec<[Section; 16]> = terms
        .iter()
        .map(|t| Section {
            align: align(&t.down),
            row_bytes: Section::of(&t.gate).row_bytes + Section::of(&t.up).row_bytes,
            ..Section::of(&t.gate)
        })
        .collect();
    let items = plan(&sections, threads);
    let gate_up = |k: usize| {
        let (i, r0, r1) = items[k];
        let t = &terms[i];
        // SAFETY: rows r0..r1 of block i's part of `h` are this item's alone; `h` outlives the step
        let g = unsafe { hp.slice(offs[i] + r0, r1 - r0) };
        t.gate.rows_into(&prepared.input(2 * i, t.x), r0, g);
        // written in full by the product
        let mut u = scratch::dirty(r1 - r0);
        t.up.rows_into(&prepared.input(2 * i + 1, t.x), r0, &mut u);
        crate::layers::mlp::activate(g, &mut u, r0, t.bias, t.act);
        if let Some(parts) = &parts[i] {
            // SAFETY: laid out for block i's down input above and read only in the next step;
            // r0 is a multiple of the group, r1 one too or the end, and no other item has them
            unsafe { parts.fill(g, r0) };
        }
    };
    step(site, items.len(), threads, gate_up);
    drop(prepared);
    // second step: rows of every down product, summed
    let inputs: SmallVec<[Input<'_>; 16]> = terms
        .iter()
        .zip(&down_in)
        .enumerate()
        .map(|(i, (_, q))| match q {
            Some(q) => Input::Quant(q),
            None => Input::Plain(&h[offs[i]..offs[i + 1]]),
        })
        .collect();
    let row_bytes = terms.iter().map(|t| Section::of(&t.down).row_bytes).sum();
    let items = plan(&[Section { rows: hidden, row_bytes, align: 16 }], threads);
    let op = OutPtr(out.as_mut_ptr());
    let down = |k: usize| {
        let (_, r0, r1) = items[k];
        // SAFETY: rows r0..r1 of `out` are this item's alone; `out` outlives the step
        let o = unsafe { op.slice(r0, r1 - r0) };
        o.iter_mut().for_each(|v| *v = 0.0);
        let mut y = scratch::dirty(r1 - r0);
        for (t, input) in terms.iter().zip(&inputs) {
            t.down.rows_into(input, r0, &mut y);
            if let Some([_, _, bd]) = t.bias {
                kernels::axpy(1.0, &bd[r0..r1], &mut y);
            }
            kernels::axpy(t.weight, &y, o);
        }
    };
    step(site, items.len(), threads, down);
}

/// [`swiglu_sum`]'s two steps with the same items, each only reading the weight bytes of its
/// rows (`sysbench --products`: what the products' access pattern allows, with no arithmetic).
#[doc(hidden)]
pub fn swiglu_sum_read_only(terms: &[SwigluTerm<'_>]) -> u64 {
    let site = std::panic::Location::caller();
    let touch = |w: &MatRef<'_>, r0: usize, r1: usize| -> u64 {
        let WKind::Q { bits, group } = w.kind else { return 0 };
        let ng = w.cols.div_ceil(group as usize);
        let (rb, pb) = (quant::row_bytes(w.cols, bits), quant::packed_bytes(w.rows, w.cols, bits));
        let parts = [
            &w.data[r0 * rb..r1 * rb],
            &w.data[pb + 2 * r0 * ng..pb + 2 * r1 * ng],
            &w.data[pb + 2 * w.rows * ng + 2 * r0 * ng..pb + 2 * w.rows * ng + 2 * r1 * ng],
        ];
        parts.iter().map(|p| read_words(p)).fold(0, u64::wrapping_add)
    };
    let threads = rayon::current_num_threads();
    let sections: SmallVec<[Section; 16]> = terms
        .iter()
        .map(|t| Section {
            align: 64,
            row_bytes: Section::of(&t.gate).row_bytes + Section::of(&t.up).row_bytes,
            ..Section::of(&t.gate)
        })
        .collect();
    let sum = std::sync::atomic::AtomicU64::new(0);
    let items = plan(&sections, threads);
    step(site, items.len(), threads, |k| {
        let (i, r0, r1) = items[k];
        let v = touch(&terms[i].gate, r0, r1).wrapping_add(touch(&terms[i].up, r0, r1));
        sum.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
    });
    let hidden = terms.first().map_or(0, |t| t.down.rows);
    let row_bytes = terms.iter().map(|t| Section::of(&t.down).row_bytes).sum();
    let items = plan(&[Section { rows: hidden, row_bytes, align: 16 }], threads);
    step(site, items.len(), threads, |k| {
        let (_, r0, r1) = items[k];
        let v = terms.iter().map(|t| touch(&t.down, r0, r1)).fold(0, u64::wrapping_add);
        sum.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
    });
    sum.into_inner()
}

/// A wrapping sum of `b`'s 8-byte words (a read the compiler vectorizes; tail bytes ignored).
fn read_words(b: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    for c in b.chunks_exact(64) {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
        }
    }
    acc.iter().fold(0, |s, &a| s.wrapping_add(a))
}

/// Runs a decode step's items on the team, or in order on this thread when it is one.
fn step(site: &'static std::panic::Location<'static>, n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    if threads > 1 { crate::par::for_each_at(site, n, f) } else { (0..n).for_each(f) }
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b).max(1) * b
}

/// The output of a product, shared by the blocks that each write their own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: blocks write disjoint rows of the output, which outlives the product.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Elements `at..at + len` of the output.
    ///
    /// # Safety
    /// Inside the output, and no one else reads or writes them while the slice lives.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }

    /// Stores a 4×4 tile (rows `r..`, tokens `t..`) of a `[n, rows]` output, dropping the
    /// entries past `r_end` or `n`.
    #[inline]
    fn put(self, blk: &[[f32; 4]; 4], r: usize, r_end: usize, t: usize, n: usize, rows: usize) {
        for (i, br) in blk.iter().enumerate().take(r_end.saturating_sub(r)) {
            for (k, v) in br.iter().enumerate().take(n - t) {
                // SAFETY: r + i < r_end <= rows and t + k < n: inside the `[n, rows]` output,
                // in a row no other block writes.
                unsafe { *self.0.add((t + k) * rows + r + i) = *v };
            }
        }
    }
}

pub use crate::kernels::dot;

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::uniform as lcg;

    #[test]
    fn products_match_scalar_reference_for_every_format_and_odd_sizes() {
        for &(rows, cols, n) in &[(1, 64, 1), (7, 128, 3), (33, 192, 5), (300, 256, 2), (129, 704, 1), (5, 13, 2)] {
            let w = lcg(rows * cols, 7);
            let x = lcg(cols * n, 9);
            let mut mats = vec![
                Mat::from_f32(rows, cols, w.clone()).unwrap(),
                Mat::from_half(rows, cols, w.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(), WKind::BF16)
                    .unwrap(),
                Mat::from_half(rows, cols, w.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect(), WKind::F16)
                    .unwrap(),
            ];
            for bits in quant::BITS {
                let group = if cols % 64 == 0 { 64 } else { cols };
                let blob = quant::quantize(&w, rows, cols, bits, group);
                let kind = WKind::Q { bits, group: group as u16 };
                mats.push(Mat::from_bytes(rows, cols, kind, AlignedBytes::from_slice(&blob)).unwrap());
            }
            for (m, exact) in mats.iter().flat_map(|m| [(m, true), (m, false)]) {
                let wf = m.to_f32();
                let mut y = vec![0.0; rows * n];
                m.matmul(&x, n, &mut y, if exact { Precision::Exact } else { Precision::Fast });
                let bf16 = !exact && n > 1 && kernels::bf16_products() && m.kind != WKind::F32 && m.kind != WKind::F16;
                let bf16 = bf16
                    && !matches!(m.kind, WKind::Q { bits, group } if kernels::int8_gemm(bits, group as usize, cols));
                for t in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols).map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                        let got = y[t * rows + r] as f64;
                        let xt = &x[t * cols..(t + 1) * cols];
                        let amax = xt.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        let wsum: f64 = wf[r * cols..(r + 1) * cols].iter().map(|v| v.abs() as f64).sum();
                        let wx: f64 = (0..cols).map(|c| (wf[r * cols + c] as f64 * xt[c] as f64).abs()).sum();
                        // quantized single-vector products may use int8 activations (VNNI):
                        // allow half an activation step per weight; bf16 products round x
                        // (and a dequantized weight) to 8 significant bits: 2^-8 relative
                        let int8 = match m.kind {
                            WKind::Q { bits, group } => {
                                !exact && (n == 1 || kernels::int8_gemm(bits, group as usize, cols))
                            }
                            _ => false,
                        };
                        let tol = 1e-4
                            + if int8 { wsum * amax / 127.0 * 0.5 } else { 0.0 }
                            + if bf16 { wx / 256.0 } else { 0.0 };
                        assert!(
                            (got - want).abs() < tol,
                            "{rows}x{cols} {} exact={exact}: {got} vs {want}",
                            m.kind.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_sum_is_its_products_summed_in_order_bit_for_bit() {
        let mat = |rows: usize, cols: usize, seed: u64, kind: Option<u8>| {
            let w: Vec<f32> = lcg(rows * cols, seed).iter().map(|v| v * 0.5).collect();
            match kind {
                None => Mat::from_half(
                    rows,
                    cols,
                    w.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
                    WKind::BF16,
                )
                .unwrap(),
                Some(bits) => {
                    let group = if cols.is_multiple_of(64) { 64 } else { cols };
                    let blob = quant::quantize(&w, rows, cols, bits, group);
                    let kind = WKind::Q { bits, group: group as u16 };
                    Mat::from_bytes(rows, cols, kind, AlignedBytes::from_slice(&blob)).unwrap()
                }
            }
        };
        let kinds = quant::BITS.iter().map(|&b| Some(b)).chain([None]);
        for (kind, &(hidden, inter)) in
            kinds.flat_map(|k| [(256, 192), (128, 64), (64, 960), (48, 40)].iter().map(move |s| (k, s)))
        {
            let blocks: Vec<[Mat; 3]> = (0..4)
                .map(|e| {
                    [
                        mat(inter, hidden, 10 + e, kind),
                        mat(inter, hidden, 20 + e, kind),
                        mat(hidden, inter, 30 + e, kind),
                    ]
                })
                .collect();
            let xs: Vec<Vec<f32>> = (0..2).map(|i| lcg(hidden, 40 + i)).collect();
            let weights = [0.4, 0.3, 0.2, 0.7];
            for p in [Precision::Exact, Precision::Fast] {
                let mut want = vec![0.0; hidden];
                for (e, [g, u, d]) in blocks.iter().enumerate() {
                    let x = &xs[e % 2];
                    let (mut gv, mut uv, mut y) = (vec![0.0; inter], vec![0.0; inter], vec![0.0; hidden]);
                    g.matvec(x, &mut gv, p);
                    u.matvec(x, &mut uv, p);
                    kernels::swiglu(&mut gv, &uv);
                    d.matvec(&gv, &mut y, p);
                    kernels::axpy(weights[e], &y, &mut want);
                }
                let terms: Vec<SwigluTerm<'_>> = blocks
                    .iter()
                    .enumerate()
                    .map(|(e, [g, u, d])| SwigluTerm {
                        gate: g.view(),
                        up: u.view(),
                        down: d.view(),
                        x: &xs[e % 2],
                        weight: weights[e],
                        bias: None,
                        act: crate::config::Act::Swiglu,
                    })
                    .collect();
                for threads in [1, 3, 8] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut got = vec![f32::NAN; hidden];
                    pool.install(|| swiglu_sum(&terms, &mut got, p));
                    assert_eq!(got, want, "{kind:?} {hidden}x{inter} {p:?} {threads} threads");
                }
            }
        }
    }

    #[test]
    fn products_over_rows_are_one_token_products_bit_for_bit() {
        // every format, widths with and without whole SIMD steps and int8 groups, 1..8 rows
        for &(rows, cols) in &[(37, 128), (9, 2048 + 64), (5, 40), (70, 64 * 17)] {
            let w = lcg(rows * cols, 5);
            let mut mats = vec![
                Mat::from_f32(rows, cols, w.clone()).unwrap(),
                Mat::from_half(rows, cols, w.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(), WKind::BF16)
                    .unwrap(),
                Mat::from_half(rows, cols, w.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect(), WKind::F16)
                    .unwrap(),
                Mat::from_f32(rows, cols, w.clone()).unwrap().to_kind(WKind::Mxfp4),
            ];
            for bits in quant::BITS {
                let group = if cols % 64 == 0 { 64 } else { 8 };
                mats.push(Mat::from_f32(rows, cols, w.clone()).unwrap().to_kind(WKind::Q { bits, group }));
            }
            for (m, p) in mats.iter().flat_map(|m| [(m, Precision::Exact), (m, Precision::Fast)]) {
                for n in 1..=8 {
                    let x = lcg(n * cols, 40 + n as u64);
                    let mut want = vec![0.0; n * rows];
                    for (xt, yt) in x.chunks(cols).zip(want.chunks_mut(rows)) {
                        m.matvec(xt, yt, p);
                    }
                    for threads in [1, 5] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        let what = format!("{} {rows}x{cols} {p:?} {n} rows {threads} threads", m.kind.name());
                        let mut got = vec![f32::NAN; n * rows];
                        pool.install(|| products_rows(&mut [Product { w: m.view(), x: &x, y: &mut got }], p));
                        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
                        // the staged inputs of attention's output projection
                        let mut staged = vec![f32::NAN; n * rows];
                        pool.install(|| {
                            let stages: SmallVec<[Staged<'_>; 8]> = x
                                .chunks(cols)
                                .map(|xt| {
                                    let s = Staged::new(m.view(), cols, p);
                                    // SAFETY: one part, the whole vector
                                    unsafe { s.write(0, xt) };
                                    s
                                })
                                .collect();
                            Staged::product_rows(stages, &mut staged)
                        });
                        assert!(staged.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "staged {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn decode_items_cover_every_row_once_largest_first() {
        let blob = |rows, cols| AlignedBytes::zeroed(quant::blob_bytes(rows, cols, 4, 64));
        let (a, b, c) = (blob(4096, 2048), blob(512, 2048), blob(3, 64));
        let kind = WKind::Q { bits: 4, group: 64 };
        let ws = [
            MatRef { rows: 4096, cols: 2048, kind, data: a.bytes() },
            MatRef { rows: 512, cols: 2048, kind, data: b.bytes() },
            MatRef { rows: 3, cols: 64, kind, data: c.bytes() },
        ];
        for threads in [1, 2, 3, 16, 64] {
            let items = plan_items(&ws, threads);
            let mut next = [0usize; 3];
            let mut last = usize::MAX;
            for &(j, r0, r1) in &items {
                assert!(r0 == next[j] && r1 > r0 && r1 <= ws[j].rows, "{threads} threads: {items:?}");
                next[j] = r1;
                // sizes never grow within a product (the last item of one may be cut short)
                if j == 0 {
                    assert!(r1 - r0 <= last, "{threads} threads: {items:?}");
                    last = r1 - r0;
                }
            }
            assert_eq!(next, [4096, 512, 3]);
            assert!(items.len() <= 8 * threads + 8, "{threads} threads: {} items", items.len());
        }
    }

    #[test]
    fn gather_rows_keeps_values_in_every_format() {
        let (rows, cols) = (6, 128);
        let w = lcg(rows * cols, 3);
        let blob = quant::quantize(&w, rows, cols, 3, 64);
        let q = Mat::from_bytes(rows, cols, WKind::Q { bits: 3, group: 64 }, AlignedBytes::from_slice(&blob)).unwrap();
        let f = Mat::from_f32(rows, cols, w).unwrap();
        for m in [q, f] {
            let full = m.to_f32();
            let g = m.gather_rows(&[4..6, 0..1]);
            let want: Vec<f32> = [4, 5, 0].iter().flat_map(|&r| full[r * cols..(r + 1) * cols].to_vec()).collect();
            assert_eq!(g.to_f32(), want);
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [WKind::F32, WKind::BF16, WKind::F16, WKind::Q { bits: 3, group: 64 }] {
            assert_eq!(WKind::parse(&k.name()), Some(k));
        }
        assert_eq!(WKind::parse("q5g64"), None);
    }
}
