//! Multi-token (prefill) products beyond plain f32: the bf16 4×4 tile (`vdpbf16ps`) and
//! 16-row int8 panels (`vpdpbusd`), their activation conversions, and scalar references.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Isa, avx512vl, bf16_to_f32, isa};
use std::sync::OnceLock;

static BF16: OnceLock<bool> = OnceLock::new();

/// AVX-512 BF16 (`vdpbf16ps`) is usable: multi-token products may run on bf16 activations.
pub fn bf16_products() -> bool {
    *BF16.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(isa(), Isa::Avx512 | Isa::Avx512Vnni) && avx512vl() && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// f32 → bf16 bits, rounding to nearest even.
pub fn f32_to_bf16(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if bf16_products() {
        // SAFETY: AVX-512 BF16 was detected at run time.
        return unsafe { x86::f32_to_bf16_avx512(x, out) };
    }
    f32_to_bf16_scalar(x, out)
}

/// Scalar reference of [`f32_to_bf16`].
pub fn f32_to_bf16_scalar(x: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = half::bf16::from_f32(*v).to_bits();
    }
}

/// 4 bf16 rows × 4 bf16 vectors of dot products, accumulated in f32 (prefill's inner kernel
/// where [`bf16_products`] holds).
#[inline]
pub fn dot4x4_bf16(rows: [&[u16]; 4], x: [&[u16]; 4]) -> [[f32; 4]; 4] {
    let n = rows[0].len();
    assert!(rows.iter().chain(&x).all(|s| s.len() == n), "dot4x4_bf16: unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if bf16_products() {
        // SAFETY: AVX-512 BF16 was detected at run time; the lengths are equal.
        return unsafe { x86::dot4x4_bf16_avx512(rows, x) };
    }
    dot4x4_bf16_scalar(rows, x)
}

/// Scalar reference of [`dot4x4_bf16`].
pub fn dot4x4_bf16_scalar(rows: [&[u16]; 4], x: [&[u16]; 4]) -> [[f32; 4]; 4] {
    let mut out = [[0.0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            out[r][t] = rows[r].iter().zip(x[t]).map(|(&a, &b)| bf16_to_f32(a) * bf16_to_f32(b)).sum();
        }
    }
    out
}

/// Dequantizes row `r` of a q4/q8 matrix straight to bf16 when the SIMD kernel applies
/// (returns false otherwise, and the caller goes through f32).
pub fn dequant_row_bf16(q: &crate::quant::QMat<'_>, r: usize, out: &mut [u16]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if bf16_products() && matches!(q.bits, 4 | 8) && q.cols.is_multiple_of(32) && q.group.is_multiple_of(32) {
        let rb = crate::quant::row_bytes(q.cols, q.bits);
        let ng = q.cols.div_ceil(q.group);
        let (p, sc, bi) =
            (&q.packed[r * rb..(r + 1) * rb], &q.scales[r * ng..(r + 1) * ng], &q.biases[r * ng..(r + 1) * ng]);
        // SAFETY: AVX-512 BF16 detected; sizes are multiples of 32 as the kernel requires.
        unsafe { x86::dequant_row_bf16_avx512(p, sc, bi, q.bits, q.group, &mut out[..q.cols]) };
        return true;
    }
    let _ = (q, r, out);
    false
}

/// Multi-token products of these q4/q8 rows can run on int8 activations, rounded per group as
/// decode's int8 matrix–vector products round them: with VNNI (`vpdpbusd`) for q4 and q8, with
/// AVX2 (`vpmaddubsw`, whose 16-bit sums only 4-bit weights keep from saturating) for q4.
pub fn int8_gemm(bits: u8, group: usize, cols: usize) -> bool {
    let kernel = match isa() {
        Isa::Avx512Vnni => avx512vl() && matches!(bits, 4 | 8),
        Isa::Avx2 | Isa::Avx512 => bits == 4,
        _ => false,
    };
    kernel && group.is_multiple_of(64) && cols.is_multiple_of(64)
}

/// Int8 activations of several tokens: per token and weight group, x / s rounded with
/// s = max|x| / 127 (as [`QPrep`] does for one vector), s, and Σ x (for the group biases).
#[derive(Default, Debug, Clone)]
pub struct QTokens {
    pub xq: Vec<i8>,
    pub xs: Vec<f32>,
    pub xsum: Vec<f32>,
    pub cols: usize,
    pub groups: usize,
}

impl QTokens {
    /// Quantizes `n` tokens of `cols` values (`x` is `[n, cols]`) in groups of `group`, for
    /// rows of `bits` (q4 panels take each 8 activations as evens then odds).
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize, group: usize, bits: u8) {
        self.quantize_natural(x, n, cols, group);
        if bits == 4 {
            for c in self.xq.chunks_exact_mut(8) {
                let v: [i8; 8] = [c[0], c[2], c[4], c[6], c[1], c[3], c[5], c[7]];
                c.copy_from_slice(&v);
            }
        }
    }

    /// Where the activation of column `j` is stored for rows of `bits`.
    pub fn position(j: usize, bits: u8) -> usize {
        if bits == 4 { (j & !7) | ((j & 1) << 2) | ((j & 7) >> 1) } else { j }
    }

    fn quantize_natural(&mut self, x: &[f32], n: usize, cols: usize, group: usize) {
        assert_eq!(x.len(), n * cols);
        (self.cols, self.groups) = (cols, cols.div_ceil(group));
        self.xq.clear();
        self.xs.clear();
        self.xsum.clear();
        self.xq.resize(x.len(), 0);
        for (gx, gq) in
            x.chunks(cols).flat_map(|r| r.chunks(group)).zip(self.xq.chunks_mut(cols).flat_map(|r| r.chunks_mut(group)))
        {
            let (s, sum) = super::quantize_group(gx, gq);
            self.xs.push(s);
            self.xsum.push(sum);
        }
    }

    /// Scalar reference of [`QTokens::quantize`].
    pub fn quantize_scalar(&mut self, x: &[f32], n: usize, cols: usize, group: usize) {
        assert_eq!(x.len(), n * cols);
        (self.cols, self.groups) = (cols, cols.div_ceil(group));
        self.xq.clear();
        self.xs.clear();
        self.xsum.clear();
        for gx in x.chunks(cols).flat_map(|row| row.chunks(group)) {
            let amax = gx.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            self.xs.push(s);
            self.xsum.push(gx.iter().sum());
            self.xq.extend(gx.iter().map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8));
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn token(&self, t: usize) -> (&[i8], &[f32], &[f32]) {
        let (c, g) = (self.cols, self.groups);
        (&self.xq[t * c..(t + 1) * c], &self.xs[t * g..(t + 1) * g], &self.xsum[t * g..(t + 1) * g])
    }
}

/// Up to 16 rows of a q4/q8 matrix packed for the int8 panel kernel (reused buffers).
#[derive(Default, Debug, Clone)]
pub struct Panel {
    wp: Vec<u8>,
    sp: Vec<f32>,
    bp: Vec<f32>,
    nrows: usize,
    /// The rows' packed bytes, copied in one sequential pass before the transposing reads.
    stage: Vec<u8>,
}

impl Panel {
    /// Packs rows `r0..r0 + nrows` (`nrows <= 16`); [`int8_gemm`] must hold for `q`.
    pub fn pack(&mut self, q: &crate::quant::QMat<'_>, r0: usize, nrows: usize) {
        assert!(int8_gemm(q.bits, q.group, q.cols) && nrows <= 16 && r0 + nrows <= q.rows);
        let ng = q.cols.div_ceil(q.group);
        self.wp.resize(16 * q.cols, 0);
        self.sp.resize(16 * ng, 0.0);
        self.bp.resize(16 * ng, 0.0);
        self.nrows = nrows;
        // The transposing pass reads 16 rows side by side, which the hardware prefetchers do not
        // follow: streamed from DRAM it stalls on every line. One sequential copy first.
        let rb = crate::quant::row_bytes(q.cols, q.bits);
        self.stage.clear();
        self.stage.extend_from_slice(&q.packed[r0 * rb..(r0 + nrows) * rb]);
        let sub = crate::quant::QMat {
            rows: nrows,
            packed: &self.stage,
            scales: &q.scales[r0 * ng..(r0 + nrows) * ng],
            biases: &q.biases[r0 * ng..(r0 + nrows) * ng],
            ..*q
        };
        #[cfg(target_arch = "x86_64")]
        {
            if isa() == Isa::Avx512Vnni {
                // SAFETY: `int8_gemm` checked VNNI (with AVX-512F/BW/VL) and the sizes; buffers
                // sized above.
                return unsafe { x86::pack_panel_vnni(&sub, 0, nrows, &mut self.wp, &mut self.sp, &mut self.bp) };
            }
            // otherwise `int8_gemm` admitted only q4 on AVX2 (or AVX-512 without VNNI)
            pack_scales(&sub, nrows, &mut self.sp, &mut self.bp);
            // SAFETY: AVX2 detected; `int8_gemm` checked the sizes; `wp` sized above.
            unsafe { x86::pack_q4_avx2(&sub, nrows, &mut self.wp) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        pack_panel_scalar(&sub, nrows, &mut self.wp, &mut self.sp, &mut self.bp);
    }

    /// `y[t·rows + r0 + i] = row r0 + i · x_t` for the panel's rows and every token of `x`.
    ///
    /// # Safety
    /// `y` must be valid for writes of `x`'s tokens × `rows` floats, `r0 + nrows <= rows`, and
    /// no other thread may touch those rows meanwhile. The panel was packed from `q`.
    #[allow(clippy::int_plus_one)] // `t + T <= n` reads as "a whole tile fits"
    pub unsafe fn gemm(&self, q: &crate::quant::QMat<'_>, x: &QTokens, y: *mut f32, rows: usize, r0: usize) {
        assert!(x.cols == q.cols && r0 + self.nrows <= rows);
        #[cfg(target_arch = "x86_64")]
        {
            let n = x.xq.len() / x.cols.max(1);
            let mut t = 0;
            macro_rules! tile {
                ($T:literal) => {
                    while t + $T <= n {
                        let tok = x86::Int8Tokens::<$T> {
                            xq: std::array::from_fn(|i| x.token(t + i).0),
                            xs: std::array::from_fn(|i| x.token(t + i).1),
                            xsum: std::array::from_fn(|i| x.token(t + i).2),
                        };
                        let (w, s, b) = (&self.wp, &self.sp, &self.bp);
                        // SAFETY: packed for `q` (`int8_gemm` checked the ISA and the sizes
                        // there); the caller vouches for `y`.
                        unsafe {
                            let yt = y.add(t * rows);
                            if isa() == Isa::Avx512Vnni {
                                x86::gemm_panel_vnni::<$T>(w, s, b, q.cols, q.group, &tok, yt, rows, r0, self.nrows);
                            } else {
                                x86::gemm_panel_q4_avx2::<$T>(w, s, b, q.cols, q.group, &tok, yt, rows, r0, self.nrows);
                            }
                        }
                        t += $T;
                    }
                };
            }
            tile!(8);
            tile!(4);
            tile!(2);
            tile!(1);
        }
        let _ = (q, y, r0);
    }
}

/// The panel layout without SIMD (the packer where VNNI is absent; the reference of
/// `pack_panel_vnni`): per 64-column block, 16 dwords per activation dword position, each
/// holding the four weight bytes of one row (rows in lanes) that meet that activation dword
/// ([`QTokens::position`]); scales and biases as f32, 16 rows per group.
pub fn pack_panel_scalar(q: &crate::quant::QMat<'_>, nrows: usize, wp: &mut [u8], sp: &mut [f32], bp: &mut [f32]) {
    let cols = q.cols;
    let rb = crate::quant::row_bytes(cols, q.bits);
    wp[..16 * cols].fill(0);
    for i in 0..nrows {
        let p = &q.packed[i * rb..(i + 1) * rb];
        for j in 0..cols {
            let w = if q.bits == 8 { p[j] } else { (p[j / 2] >> (4 * (j % 2))) & 15 };
            let (blk, pos) = (j / 64, QTokens::position(j % 64, q.bits));
            wp[(blk * 16 + pos / 4) * 64 + i * 4 + pos % 4] = w;
        }
    }
    pack_scales(q, nrows, sp, bp);
}

/// A panel's group scales and biases as f32, 16 rows per group (absent rows 0).
pub(super) fn pack_scales(q: &crate::quant::QMat<'_>, nrows: usize, sp: &mut [f32], bp: &mut [f32]) {
    let ng = q.cols.div_ceil(q.group);
    sp[..16 * ng].fill(0.0);
    bp[..16 * ng].fill(0.0);
    for i in 0..nrows {
        for g in 0..ng {
            sp[g * 16 + i] = bf16_to_f32(q.scales[i * ng + g]);
            bp[g * 16 + i] = bf16_to_f32(q.biases[i * ng + g]);
        }
    }
}

/// Scalar reference of the int8 product of row `r` with token `t`.
pub fn int8_dot_scalar(q: &crate::quant::QMat<'_>, r: usize, x: &QTokens, t: usize) -> f64 {
    let ng = q.cols.div_ceil(q.group);
    let mut row = vec![0u8; q.cols];
    let rb = crate::quant::row_bytes(q.cols, q.bits);
    let p = &q.packed[r * rb..(r + 1) * rb];
    for (j, v) in row.iter_mut().enumerate() {
        *v = if q.bits == 8 { p[j] } else { (p[j / 2] >> (4 * (j % 2))) & 15 };
    }
    let (c, g0) = (x.cols, t * x.groups);
    let mut acc = 0.0;
    for g in 0..ng {
        let (a, e) = (g * q.group, ((g + 1) * q.group).min(q.cols));
        let dot: i64 = (a..e).map(|j| row[j] as i64 * x.xq[t * c + QTokens::position(j, q.bits)] as i64).sum();
        acc += bf16_to_f32(q.scales[r * ng + g]) as f64 * x.xs[g0 + g] as f64 * dot as f64
            + bf16_to_f32(q.biases[r * ng + g]) as f64 * x.xsum[g0 + g] as f64;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{QPrep, qdot};
    use crate::quant;
    use crate::testutil::uniform as rnd;

    #[test]
    fn bf16_products_match_scalar_reference_on_odd_sizes() {
        let bf = |v: &[f32]| v.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
        for n in [1, 7, 31, 32, 33, 64, 95, 100, 257, 2048] {
            let x = rnd(n, 11);
            let (mut a, mut b) = (vec![0u16; n], vec![0u16; n]);
            f32_to_bf16(&x, &mut a);
            f32_to_bf16_scalar(&x, &mut b);
            assert_eq!(a, b, "f32_to_bf16 {n}");
            let rs: Vec<Vec<u16>> = (0..4).map(|i| bf(&rnd(n, 20 + i))).collect();
            let xs: Vec<Vec<u16>> = (0..4).map(|i| bf(&rnd(n, 30 + i))).collect();
            let rr = [&rs[0][..], &rs[1][..], &rs[2][..], &rs[3][..]];
            let xx = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let (got, want) = (dot4x4_bf16(rr, xx), dot4x4_bf16_scalar(rr, xx));
            for r in 0..4 {
                for t in 0..4 {
                    let exact: f64 =
                        rr[r].iter().zip(xx[t]).map(|(&p, &q)| bf16_to_f32(p) as f64 * bf16_to_f32(q) as f64).sum();
                    // products of bf16 are exact in f32; only the summation order differs
                    assert!((got[r][t] as f64 - exact).abs() < 1e-4, "dot4x4_bf16 {n}: {} vs {exact}", got[r][t]);
                    assert!((want[r][t] as f64 - exact).abs() < 1e-4, "scalar {n}");
                }
            }
        }
        for bits in [4u8, 8, 2, 3] {
            for &(rows, cols, group) in &[(3, 64, 64), (2, 96, 32), (1, 2048, 64), (2, 40, 8)] {
                let w = rnd(rows * cols, 5 + bits as u64);
                let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, rows, cols, bits, group));
                let q = quant::QMat::new(blob.bytes(), rows, cols, bits, group);
                let (mut f, mut want, mut got) = (vec![0.0; cols], vec![0u16; cols], vec![0u16; cols]);
                for r in 0..rows {
                    q.row_f32(r, &mut f);
                    f32_to_bf16_scalar(&f, &mut want);
                    if dequant_row_bf16(&q, r, &mut got) {
                        assert_eq!(got, want, "dequant_row_bf16 q{bits} {rows}x{cols}/{group}");
                    }
                }
            }
        }
    }

    #[test]
    fn int8_panel_products_match_scalar_reference() {
        for bits in [4u8, 8] {
            for &(rows, cols, group, n) in &[(16, 64, 64, 8), (5, 128, 64, 3), (21, 192, 64, 15), (17, 256, 128, 9)] {
                if !int8_gemm(bits, group, cols) {
                    return;
                }
                let w = rnd(rows * cols, 40 + bits as u64);
                let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, rows, cols, bits, group));
                let q = quant::QMat::new(blob.bytes(), rows, cols, bits, group);
                let x = rnd(n * cols, 41);
                let mut xt = QTokens::default();
                xt.quantize(&x, n, cols, group, bits);
                let mut xr = QTokens::default();
                xr.quantize_scalar(&x, n, cols, group);
                assert_eq!(xt.xs, xr.xs, "int8 activation scales");
                for (j, v) in xr.xq.iter().enumerate() {
                    let at = (j / cols) * cols + QTokens::position(j % cols, bits);
                    assert_eq!(xt.xq[at], *v, "int8 activation {j}");
                }
                for (a, b) in xt.xsum.iter().zip(&xr.xsum) {
                    assert!((a - b).abs() < 1e-4, "group sums {a} {b}");
                }
                let mut y = vec![f32::NAN; n * rows];
                let mut panel = Panel::default();
                for r0 in (0..rows).step_by(16) {
                    let nr = (rows - r0).min(16);
                    panel.pack(&q, r0, nr);
                    unsafe { panel.gemm(&q, &xt, y.as_mut_ptr(), rows, r0) };
                }
                let mut deq = vec![0.0; cols];
                for t in 0..n {
                    let mut one = QPrep::default();
                    one.prepare(&x[t * cols..(t + 1) * cols], bits, group);
                    for r in 0..rows {
                        let want = int8_dot_scalar(&q, r, &xt, t);
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "q{bits} {rows}x{cols}/{group} t{t} r{r}: {got} vs {want}"
                        );
                        // the same int8 rounding as the single-vector VNNI kernels of decode
                        let rb = quant::row_bytes(cols, bits);
                        let ng = cols.div_ceil(group);
                        let (pk, sc, bi) = (
                            &q.packed[r * rb..(r + 1) * rb],
                            &q.scales[r * ng..(r + 1) * ng],
                            &q.biases[r * ng..(r + 1) * ng],
                        );
                        if one.int8 {
                            let dec = qdot(pk, sc, bi, &one) as f64;
                            assert!((got - dec).abs() < 1e-4 * (1.0 + dec.abs()), "prefill {got} vs decode {dec}");
                        }
                        // and close to the f32 product
                        q.row_f32(r, &mut deq);
                        let exact: f64 = deq.iter().zip(&x[t * cols..]).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound: f64 = deq
                            .chunks(group)
                            .zip(&xt.xs[t * ng..])
                            .map(|(w, s)| w.iter().map(|v| v.abs() as f64).sum::<f64>() * *s as f64 * 0.5)
                            .sum::<f64>()
                            + 1e-4;
                        assert!((got - exact).abs() <= bound, "int8 error {got} vs {exact} > {bound}");
                    }
                }
            }
        }
    }

    /// Both int8 panel kernels this CPU can run, whatever the dispatcher picks, on the
    /// portable packer's panels; and the VNNI packer against the portable one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_int8_panel_kernel_matches_the_scalar_reference() {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let vnni = isa() == Isa::Avx512Vnni && avx512vl();
        for bits in [4u8, 8] {
            for &(rows, cols, group, n) in &[(16, 64, 64, 8), (5, 128, 64, 3), (21, 192, 64, 15), (17, 256, 128, 9)] {
                let w = rnd(rows * cols, 60 + bits as u64);
                let blob = crate::tensor::AlignedBytes::from_slice(&quant::quantize(&w, rows, cols, bits, group));
                let q = quant::QMat::new(blob.bytes(), rows, cols, bits, group);
                let mut xt = QTokens::default();
                xt.quantize(&rnd(n * cols, 61), n, cols, group, bits);
                let ng = cols.div_ceil(group);
                let rb = quant::row_bytes(cols, bits);
                for r0 in (0..rows).step_by(16) {
                    let nr = (rows - r0).min(16);
                    let sub = quant::QMat {
                        rows: nr,
                        packed: &q.packed[r0 * rb..(r0 + nr) * rb],
                        scales: &q.scales[r0 * ng..(r0 + nr) * ng],
                        biases: &q.biases[r0 * ng..(r0 + nr) * ng],
                        ..q
                    };
                    let (mut wp, mut sp, mut bp) = (vec![0u8; 16 * cols], vec![0f32; 16 * ng], vec![0f32; 16 * ng]);
                    pack_panel_scalar(&sub, nr, &mut wp, &mut sp, &mut bp);
                    if vnni {
                        let (mut w2, mut s2, mut b2) = (vec![0u8; 16 * cols], vec![0f32; 16 * ng], vec![0f32; 16 * ng]);
                        unsafe { x86::pack_panel_vnni(&sub, 0, nr, &mut w2, &mut s2, &mut b2) };
                        assert_eq!((&w2, &s2, &b2), (&wp, &sp, &bp), "VNNI packer q{bits} {rows}x{cols}/{group}");
                    }
                    if avx2 && bits == 4 {
                        let mut w2 = vec![1u8; 16 * cols];
                        unsafe { x86::pack_q4_avx2(&sub, nr, &mut w2) };
                        assert_eq!(w2, wp, "AVX2 q4 packer {rows}x{cols}/{group}");
                    }
                    let mut y = vec![f32::NAN; n * rows];
                    for t in 0..n {
                        let tok =
                            x86::Int8Tokens::<1> { xq: [xt.token(t).0], xs: [xt.token(t).1], xsum: [xt.token(t).2] };
                        let yt = y[t * rows..].as_mut_ptr();
                        unsafe {
                            if bits == 4 && avx2 {
                                x86::gemm_panel_q4_avx2::<1>(&wp, &sp, &bp, cols, group, &tok, yt, rows, r0, nr);
                            } else if vnni {
                                x86::gemm_panel_vnni::<1>(&wp, &sp, &bp, cols, group, &tok, yt, rows, r0, nr);
                            }
                        }
                    }
                    for t in 0..n {
                        for r in r0..r0 + nr {
                            let (got, want) = (y[t * rows + r] as f64, int8_dot_scalar(&q, r, &xt, t));
                            if !got.is_nan() {
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "q{bits} t{t} r{r}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
