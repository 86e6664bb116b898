//! ggml's block-quantized formats (GGUF tensors), kept as stored: a row is whole blocks, each
//! block its scales and packed values. Rows are decoded block by block into a small buffer on
//! the stack and dotted with the f32 activations, so nothing is expanded at load; Q8_0, Q4_K
//! and Q6_K (the common Q4_K_M / Q8_0 mixes) have AVX-512 and AVX2 kernels that never leave
//! registers.
//!
//! The layouts and the arithmetic of each decoder follow ggml's `dequantize_row_*`
//! (`ggml-quants.c`), operation for operation in f32, so a decoded value is the value
//! llama.cpp's reference dequantization gives.

/// A ggml block type the engine computes (F32/F16/BF16 are [`crate::tensor::WKind`]'s own).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ggml {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
}

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// IQ4_NL's and IQ4_XS's non-linear 4-bit values.
const IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
/// MXFP4's e2m1 values, doubled (ggml's convention: the scale is halved to match).
const FP4X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

impl Ggml {
    pub const ALL: [Ggml; 13] = [
        Ggml::Q4_0,
        Ggml::Q4_1,
        Ggml::Q5_0,
        Ggml::Q5_1,
        Ggml::Q8_0,
        Ggml::Q2_K,
        Ggml::Q3_K,
        Ggml::Q4_K,
        Ggml::Q5_K,
        Ggml::Q6_K,
        Ggml::IQ4_NL,
        Ggml::IQ4_XS,
        Ggml::MXFP4,
    ];

    /// The `ggml_type` number GGUF stores.
    pub fn id(self) -> u32 {
        match self {
            Ggml::Q4_0 => 2,
            Ggml::Q4_1 => 3,
            Ggml::Q5_0 => 6,
            Ggml::Q5_1 => 7,
            Ggml::Q8_0 => 8,
            Ggml::Q2_K => 10,
            Ggml::Q3_K => 11,
            Ggml::Q4_K => 12,
            Ggml::Q5_K => 13,
            Ggml::Q6_K => 14,
            Ggml::IQ4_NL => 20,
            Ggml::IQ4_XS => 23,
            Ggml::MXFP4 => 39,
        }
    }

    pub fn from_id(id: u32) -> Option<Ggml> {
        Ggml::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name of the type (`Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            Ggml::Q4_0 => "Q4_0",
            Ggml::Q4_1 => "Q4_1",
            Ggml::Q5_0 => "Q5_0",
            Ggml::Q5_1 => "Q5_1",
            Ggml::Q8_0 => "Q8_0",
            Ggml::Q2_K => "Q2_K",
            Ggml::Q3_K => "Q3_K",
            Ggml::Q4_K => "Q4_K",
            Ggml::Q5_K => "Q5_K",
            Ggml::Q6_K => "Q6_K",
            Ggml::IQ4_NL => "IQ4_NL",
            Ggml::IQ4_XS => "IQ4_XS",
            Ggml::MXFP4 => "MXFP4",
        }
    }

    pub fn parse(s: &str) -> Option<Ggml> {
        Ggml::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Values per block.
    pub fn block(self) -> usize {
        match self {
            Ggml::Q2_K | Ggml::Q3_K | Ggml::Q4_K | Ggml::Q5_K | Ggml::Q6_K | Ggml::IQ4_XS => QK_K,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Ggml::Q4_0 | Ggml::IQ4_NL => 18,
            Ggml::Q4_1 => 20,
            Ggml::Q5_0 => 22,
            Ggml::Q5_1 => 24,
            Ggml::Q8_0 => 34,
            Ggml::MXFP4 => 17,
            Ggml::Q2_K => 84,
            Ggml::Q3_K => 110,
            Ggml::Q4_K => 144,
            Ggml::Q5_K => 176,
            Ggml::Q6_K => 210,
            Ggml::IQ4_XS => 136,
        }
    }

    /// Bytes of a row of `cols` values (a partial last block takes a whole one).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols.div_ceil(self.block()) * self.block_bytes()
    }
}

#[inline]
fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K's sixteen 6-bit scales (still offset by 32), unpacked from its 12 bytes.
fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, b) in a.to_le_bytes().iter().enumerate() {
            out[4 * i + k] = *b as i8;
        }
    }
    out
}

/// One block `b` of type `t` decoded into `y` (`t.block()` values).
pub fn decode_block(t: Ggml, b: &[u8], y: &mut [f32]) {
    match t {
        Ggml::Q4_0 | Ggml::Q4_1 | Ggml::IQ4_NL => {
            let d = f16(b, 0);
            let (m, qs) = if t == Ggml::Q4_1 { (f16(b, 2), &b[4..20]) } else { (0.0, &b[2..18]) };
            for j in 0..16 {
                let (lo, hi) = (qs[j] & 0xf, qs[j] >> 4);
                (y[j], y[j + 16]) = match t {
                    Ggml::Q4_0 => ((lo as i32 - 8) as f32 * d, (hi as i32 - 8) as f32 * d),
                    Ggml::Q4_1 => (lo as f32 * d + m, hi as f32 * d + m),
                    _ => (d * IQ4NL[lo as usize] as f32, d * IQ4NL[hi as usize] as f32),
                };
            }
        }
        Ggml::Q5_0 | Ggml::Q5_1 => {
            let one = t == Ggml::Q5_1;
            let d = f16(b, 0);
            let (m, at) = if one { (f16(b, 2), 4) } else { (0.0, 2) };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                let (x0, x1) = ((qs[j] & 0xf) | h0, (qs[j] >> 4) | h1);
                if one {
                    (y[j], y[j + 16]) = (x0 as f32 * d + m, x1 as f32 * d + m);
                } else {
                    (y[j], y[j + 16]) = ((x0 as i32 - 16) as f32 * d, (x1 as i32 - 16) as f32 * d);
                }
            }
        }
        Ggml::Q8_0 => {
            let d = f16(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        Ggml::MXFP4 => {
            let d = e8m0_half(b[0]);
            for j in 0..16 {
                y[j] = FP4X2[(b[1 + j] & 0xf) as usize] as f32 * d;
                y[j + 16] = FP4X2[(b[1 + j] >> 4) as usize] as f32 * d;
            }
        }
        Ggml::Q2_K => {
            let (sc, d, min) = (&b[0..16], f16(b, 80), f16(b, 82));
            let mut is = 0;
            for n in 0..2 {
                let q = &b[16 + 32 * n..48 + 32 * n];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        let s = sc[is];
                        is += 1;
                        let (dl, ml) = (d * (s & 0xf) as f32, min * (s >> 4) as f32);
                        let o = 128 * n + 32 * j + 16 * half;
                        for l in 0..16 {
                            y[o + l] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                        }
                    }
                }
            }
        }
        Ggml::Q3_K => {
            let (hm, scales, d) = (&b[0..32], q3k_scales(&b[96..108]), f16(b, 108));
            let mut is = 0;
            let mut m = 1u8;
            for n in 0..2 {
                let q = &b[32 + 32 * n..64 + 32 * n];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        let dl = d * (scales[is] as i32 - 32) as f32;
                        is += 1;
                        let o = 128 * n + 32 * j + 16 * half;
                        for l in 0..16 {
                            let k = l + 16 * half;
                            let v = ((q[k] >> shift) & 3) as i32 - if hm[k] & m != 0 { 0 } else { 4 };
                            y[o + l] = dl * v as f32;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        Ggml::Q4_K | Ggml::Q5_K => {
            let five = t == Ggml::Q5_K;
            let (d, min, sc) = (f16(b, 0), f16(b, 2), &b[4..16]);
            let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
            for j in 0..4 {
                let (s1, m1) = scale_min_k4(2 * j, sc);
                let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                let (d1, m1, d2, m2) = (d * s1 as f32, min * m1 as f32, d * s2 as f32, min * m2 as f32);
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = (q[l] & 0xf, q[l] >> 4);
                    if five {
                        lo += if qh[l] & (1 << (2 * j)) != 0 { 16 } else { 0 };
                        hi += if qh[l] & (2 << (2 * j)) != 0 { 16 } else { 0 };
                    }
                    y[64 * j + l] = d1 * lo as f32 - m1;
                    y[64 * j + 32 + l] = d2 * hi as f32 - m2;
                }
            }
        }
        Ggml::Q6_K => {
            let d = f16(b, 208);
            for n in 0..2 {
                let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..160 + 32 * n]);
                let sc = &b[192 + 8 * n..200 + 8 * n];
                let o = 128 * n;
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[o + l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    y[o + l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    y[o + l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    y[o + l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }
        Ggml::IQ4_XS => {
            let d = f16(b, 0);
            let sh = u16::from_le_bytes([b[2], b[3]]);
            for ib in 0..8 {
                let ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | ((((sh >> (2 * ib)) & 3) as i32) << 4);
                let dl = d * (ls - 32) as f32;
                let qs = &b[8 + 16 * ib..24 + 16 * ib];
                for j in 0..16 {
                    y[32 * ib + j] = dl * IQ4NL[(qs[j] & 0xf) as usize] as f32;
                    y[32 * ib + j + 16] = dl * IQ4NL[(qs[j] >> 4) as usize] as f32;
                }
            }
        }
    }
}

/// ggml's `e8m0_to_fp32_half`: 2^(e − 128), subnormal below e = 2.
fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 { 0x0020_0000 << e } else { (e as u32 - 1) << 23 })
}

/// A row of `out.len()` values decoded (the last block may be partial).
pub fn decode_row(t: Ggml, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(t, Ggml::Q4_K | Ggml::Q6_K) && matches!(super::isa(), super::Isa::Avx512 | super::Isa::Avx512Vnni) {
        let (bs, bb) = (t.block(), t.block_bytes());
        // whole blocks in registers (prefill expands GGUF matrices tile by tile through here),
        // the same values as decode_block; a partial last block below
        let whole = out.len() / bs;
        for (k, o) in out[..whole * bs].chunks_exact_mut(bs).enumerate() {
            let b = &row[k * bb..(k + 1) * bb];
            // SAFETY: the ISA was detected at run time; one whole block in, 256 values out
            unsafe {
                match t {
                    Ggml::Q4_K => super::x86::decode_q4_k_avx512(b, o),
                    _ => super::x86::decode_q6_k_avx512(b, o),
                }
            }
        }
        if whole * bs < out.len() {
            let mut buf = [0f32; QK_K];
            decode_block(t, &row[whole * bb..(whole + 1) * bb], &mut buf);
            let rest = &mut out[whole * bs..];
            let n = rest.len();
            rest.copy_from_slice(&buf[..n]);
        }
        return;
    }
    decode_row_scalar(t, row, out)
}

/// [`decode_row`] block by block through [`decode_block`] (the reference).
pub fn decode_row_scalar(t: Ggml, row: &[u8], out: &mut [f32]) {
    let (bs, bb) = (t.block(), t.block_bytes());
    let mut buf = [0f32; QK_K];
    for (k, o) in out.chunks_mut(bs).enumerate() {
        decode_block(t, &row[k * bb..(k + 1) * bb], &mut buf[..bs]);
        o.copy_from_slice(&buf[..o.len()]);
    }
}

/// Σ w·x over one row of type `t` (`x.len()` values).
#[inline]
pub fn dot(t: Ggml, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if matches!(super::isa(), super::Isa::Avx512 | super::Isa::Avx512Vnni) && x.len().is_multiple_of(t.block()) {
        // SAFETY: the ISA was detected at run time; whole blocks of the row's type
        match t {
            Ggml::Q8_0 => return unsafe { super::x86::dot_q8_0_avx512(row, x) },
            Ggml::Q4_K => return unsafe { super::x86::dot_q4_k_avx512(row, x) },
            Ggml::Q6_K => return unsafe { super::x86::dot_q6_k_avx512(row, x) },
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx2 && x.len().is_multiple_of(t.block()) {
        // SAFETY: as above, for AVX2 and FMA
        match t {
            Ggml::Q8_0 => return unsafe { super::x86::dot_q8_0_avx2(row, x) },
            Ggml::Q4_K => return unsafe { super::x86::dot_q4_k_avx2(row, x) },
            Ggml::Q6_K => return unsafe { super::x86::dot_q6_k_avx2(row, x) },
            _ => {}
        }
    }
    dot_scalar(t, row, x)
}

/// [`dot`] by decoding each block and dotting it (the reference the SIMD kernels are tested
/// against).
pub fn dot_scalar(t: Ggml, row: &[u8], x: &[f32]) -> f32 {
    let (bs, bb) = (t.block(), t.block_bytes());
    let mut buf = [0f32; QK_K];
    let mut total = 0f32;
    for (k, xb) in x.chunks(bs).enumerate() {
        decode_block(t, &row[k * bb..(k + 1) * bb], &mut buf[..bs]);
        total += super::dot_scalar(&buf[..xb.len()], xb);
    }
    total
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Random blocks whose f16 fields are finite, moderate scales.
    pub(crate) fn random_row(t: Ggml, blocks: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut row: Vec<u8> = (0..blocks * t.block_bytes()).map(|_| next() as u8).collect();
        let halves: &[usize] = match t {
            Ggml::Q4_0 | Ggml::Q5_0 | Ggml::Q8_0 | Ggml::IQ4_NL | Ggml::IQ4_XS => &[0],
            Ggml::Q4_1 | Ggml::Q5_1 | Ggml::Q4_K | Ggml::Q5_K => &[0, 2],
            Ggml::Q2_K => &[80, 82],
            Ggml::Q3_K => &[108],
            Ggml::Q6_K => &[208],
            Ggml::MXFP4 => &[],
        };
        for b in 0..blocks {
            for &h in halves {
                let v = half::f16::from_f32(((next() % 2000) as f32 - 1000.0) / 4000.0);
                row[b * t.block_bytes() + h..][..2].copy_from_slice(&v.to_le_bytes());
            }
            if t == Ggml::MXFP4 {
                row[b * 17] = 118 + (next() % 16) as u8;
            }
        }
        row
    }

    #[test]
    fn decode_row_is_the_scalar_decode_bit_for_bit() {
        // odd block counts, rows ending inside a block, every ISA this CPU has
        for t in Ggml::ALL {
            for (blocks, cut) in [(1, 0), (3, 0), (5, 7), (2, t.block() - 1), (7, 1)] {
                let row = random_row(t, blocks, 31 * blocks as u64 + t.id() as u64);
                let n = blocks * t.block() - cut.min(t.block() - 1);
                let mut want = vec![f32::NAN; n];
                decode_row_scalar(t, &row, &mut want);
                let mut got = vec![f32::NAN; n];
                decode_row(t, &row, &mut got);
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{t:?} {blocks} blocks, {n} values");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_block_decodes_are_the_scalar_ones_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for t in [Ggml::Q4_K, Ggml::Q6_K] {
            for seed in 0..64 {
                let b = random_row(t, 1, 1000 + seed);
                let mut want = [0f32; QK_K];
                decode_block(t, &b, &mut want);
                let mut got = [f32::NAN; QK_K];
                // SAFETY: AVX-512F detected above; one whole block
                unsafe {
                    match t {
                        Ggml::Q4_K => crate::kernels::x86::decode_q4_k_avx512(&b, &mut got),
                        _ => crate::kernels::x86::decode_q6_k_avx512(&b, &mut got),
                    }
                }
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(w.to_bits(), g.to_bits(), "{t:?} seed {seed} value {i}: {w} vs {g}");
                }
            }
        }
    }

    #[test]
    fn sizes_are_ggmls() {
        // ggml's type sizes for 256 values
        let per256 = [144, 160, 176, 192, 272, 84, 110, 144, 176, 210, 144, 136, 136];
        for (t, want) in Ggml::ALL.into_iter().zip(per256) {
            assert_eq!(t.row_bytes(256), want, "{t:?}");
            assert_eq!(Ggml::from_id(t.id()), Some(t));
            assert_eq!(Ggml::parse(t.name()), Some(t));
        }
        assert_eq!(Ggml::from_id(16), None, "IQ2_XXS is not computed");
    }

    #[test]
    fn dot_is_the_decoded_rows_dot_for_every_type() {
        for t in Ggml::ALL {
            let blocks = 3;
            let row = random_row(t, blocks, t.id() as u64);
            let n = blocks * t.block();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 50.0).collect();
            let mut w = vec![0f32; n];
            decode_row(t, &row, &mut w);
            assert!(w.iter().all(|v| v.is_finite()), "{t:?}");
            let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = w.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>().max(1e-6);
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // the AVX2 results join on x86-64
            let mut got = vec![dot(t, &row, &x), dot_scalar(t, &row, &x)];
            // the AVX2 kernels, wherever the CPU has them (the dispatch prefers AVX-512)
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                use crate::kernels::x86;
                // SAFETY: detected just now; whole blocks
                match t {
                    Ggml::Q8_0 => got.push(unsafe { x86::dot_q8_0_avx2(&row, &x) }),
                    Ggml::Q4_K => got.push(unsafe { x86::dot_q4_k_avx2(&row, &x) }),
                    Ggml::Q6_K => got.push(unsafe { x86::dot_q6_k_avx2(&row, &x) }),
                    _ => {}
                }
            }
            for got in got {
                assert!(((got as f64 - want) / scale).abs() < 1e-5, "{t:?}: {got} vs {want}");
            }
            // a partial row (the values before the last block's end)
            let m = n - 5;
            let part: f64 = w[..m].iter().zip(&x[..m]).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(((dot(t, &row, &x[..m]) as f64 - part) / scale).abs() < 1e-5, "{t:?} partial");
        }
    }

    /// gguf-py's numpy dequantizers on random blocks (scripts/ggml_vectors.py): every value
    /// decoded alike, and the dot products agree with the reference values'.
    #[test]
    fn blocks_decode_as_gguf_py_does() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ggml/vectors.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for t in Ggml::ALL {
            let case = &v[t.name()];
            let hex = case["bytes"].as_str().unwrap();
            let row: Vec<u8> =
                (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
            let want: Vec<f32> =
                case["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(want.len(), row.len() / t.block_bytes() * t.block(), "{t:?}");
            let mut got = vec![0f32; want.len()];
            decode_row(t, &row, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{t:?} value {i}: {g} vs gguf-py's {w}");
            }
            let x: Vec<f32> = (0..want.len()).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
            let exact: f64 = want.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = want.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            assert!((dot(t, &row, &x) as f64 - exact).abs() <= 1e-5 * scale, "{t:?} dot");
        }
    }

    #[test]
    fn known_blocks_decode_to_ggmls_values() {
        // Q8_0: d = 0.5, q = -3 → -1.5
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b[2] = (-3i8) as u8;
        let mut y = [0f32; 32];
        decode_block(Ggml::Q8_0, &b, &mut y);
        assert_eq!((y[0], y[1]), (-1.5, 0.0));
        // Q4_0: low nibbles are values 0..16, high nibbles 16..32, offset 8
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        b[2] = 0x9f;
        decode_block(Ggml::Q4_0, &b, &mut y);
        assert_eq!((y[0], y[16], y[1]), (14.0, 2.0, -16.0));
        // MXFP4: e = 127 is a scale of 1 (ggml doubles the values and halves the scale)
        let mut b = vec![0u8; 17];
        (b[0], b[1]) = (127, 0xf7);
        decode_block(Ggml::MXFP4, &b, &mut y);
        assert_eq!((y[0], y[16]), (6.0, -6.0));
        assert_eq!(e8m0_half(0), 2f32.powi(-128));
    }
}
