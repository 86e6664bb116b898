//! Group-wise affine quantization (the MLX scheme): within each group of `group` consecutive
//! input elements of a row, w ≈ scale·q + bias with q an unsigned `bits`-bit integer and
//! scale, bias stored as bf16.
//!
//! Packing: element j of a row sits at bit offset j·bits of the row's packed bytes, least
//! significant bit first. For 2, 4 and 8 bits this is exactly MLX's little-endian uint32
//! packing, so MLX checkpoints import byte for byte; 3 bits is the same continuous bit stream.
//!
//! Matrix blob layout: `[rows × packed row, padded to 8 bytes][rows × groups scales (bf16)]
//! [rows × groups biases (bf16)]`.

use half::bf16;

/// Supported bit widths.
pub const BITS: [u8; 4] = [2, 3, 4, 8];

/// Packed bytes of one row.
pub fn row_bytes(cols: usize, bits: u8) -> usize {
    (cols * bits as usize).div_ceil(8)
}

/// Bytes of the packed section (padded so the scales that follow stay aligned).
pub fn packed_bytes(rows: usize, cols: usize, bits: u8) -> usize {
    (rows * row_bytes(cols, bits)).next_multiple_of(8)
}

/// Bytes of a whole quantized matrix blob.
pub fn blob_bytes(rows: usize, cols: usize, bits: u8, group: usize) -> usize {
    packed_bytes(rows, cols, bits) + 2 * 2 * rows * cols.div_ceil(group)
}

#[inline]
fn get_bits(packed: &[u8], j: usize, bits: u8) -> u32 {
    let bit = j * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    let mut w = packed[byte] as u32;
    if byte + 1 < packed.len() {
        w |= (packed[byte + 1] as u32) << 8;
    }
    (w >> shift) & ((1u32 << bits) - 1)
}

#[inline]
fn set_bits(packed: &mut [u8], j: usize, bits: u8, q: u32) {
    let bit = j * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    let v = q << shift;
    packed[byte] |= v as u8;
    if shift + bits as usize > 8 {
        packed[byte + 1] |= (v >> 8) as u8;
    }
}

/// bf16 rounding towards −∞ / +∞, so that the quantization grid covers the group's range.
fn bf16_down(x: f32) -> bf16 {
    let b = bf16::from_f32(x);
    if b.to_f32() > x { bf16::from_bits(if x >= 0.0 { b.to_bits() - 1 } else { b.to_bits() + 1 }) } else { b }
}

fn bf16_up(x: f32) -> bf16 {
    let b = bf16::from_f32(x);
    if b.to_f32() < x { bf16::from_bits(if x >= 0.0 { b.to_bits() + 1 } else { b.to_bits() - 1 }) } else { b }
}

/// Quantizes a `[rows, cols]` f32 matrix into a blob.
#[allow(clippy::needless_range_loop)] // j indexes the row and the packed bit stream alike
pub fn quantize(w: &[f32], rows: usize, cols: usize, bits: u8, group: usize) -> Vec<u8> {
    assert!(BITS.contains(&bits), "unsupported bit width {bits}");
    let rb = row_bytes(cols, bits);
    let ng = cols.div_ceil(group);
    let mut out = vec![0u8; blob_bytes(rows, cols, bits, group)];
    let (packed, aux) = out.split_at_mut(packed_bytes(rows, cols, bits));
    let (scales, biases) = aux.split_at_mut(2 * rows * ng);
    let qmax = ((1u32 << bits) - 1) as f32;
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let prow = &mut packed[r * rb..(r + 1) * rb];
        for g in 0..ng {
            let (a, b) = (g * group, ((g + 1) * group).min(cols));
            let lo = row[a..b].iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = row[a..b].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let bias = bf16_down(lo);
            let scale = bf16_up((hi - bias.to_f32()) / qmax);
            let (s, z) = (scale.to_f32(), bias.to_f32());
            for j in a..b {
                let q = if s > 0.0 { ((row[j] - z) / s).round().clamp(0.0, qmax) as u32 } else { 0 };
                set_bits(prow, j, bits, q);
            }
            let k = 2 * (r * ng + g);
            scales[k..k + 2].copy_from_slice(&scale.to_bits().to_le_bytes());
            biases[k..k + 2].copy_from_slice(&bias.to_bits().to_le_bytes());
        }
    }
    out
}

/// A borrowed quantized matrix.
#[derive(Clone, Copy, Debug)]
pub struct QMat<'a> {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub group: usize,
    pub packed: &'a [u8],
    pub scales: &'a [u16],
    pub biases: &'a [u16],
}

use crate::kernels::bf16_to_f32 as bf;

impl<'a> QMat<'a> {
    /// Views a blob (it must be 2-byte aligned).
    pub fn new(blob: &'a [u8], rows: usize, cols: usize, bits: u8, group: usize) -> QMat<'a> {
        let ng = cols.div_ceil(group);
        let (packed, aux) = blob.split_at(packed_bytes(rows, cols, bits));
        let aux: &[u16] = bytemuck::cast_slice(&aux[..4 * rows * ng]);
        let (scales, biases) = aux.split_at(rows * ng);
        QMat { rows, cols, bits, group, packed, scales, biases }
    }

    fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Row `r` dequantized.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = row_bytes(self.cols, self.bits);
        let p = &self.packed[r * rb..(r + 1) * rb];
        let ng = self.groups();
        #[cfg(target_arch = "x86_64")]
        if matches!(self.bits, 4 | 8)
            && matches!(crate::kernels::isa(), crate::kernels::Isa::Avx512 | crate::kernels::Isa::Avx512Vnni)
            && self.cols.is_multiple_of(32)
            && self.group.is_multiple_of(32)
        {
            let (sc, bi) = (&self.scales[r * ng..(r + 1) * ng], &self.biases[r * ng..(r + 1) * ng]);
            // SAFETY: AVX-512 detected; sizes are multiples of 32 as the kernel requires.
            unsafe { crate::kernels::dequant_row_avx512(p, sc, bi, self.bits, self.group, &mut out[..self.cols]) };
            return;
        }
        for g in 0..ng {
            let (s, z) = (bf(self.scales[r * ng + g]), bf(self.biases[r * ng + g]));
            let (a, b) = (g * self.group, ((g + 1) * self.group).min(self.cols));
            let o = &mut out[a..b];
            match self.bits {
                8 => o.iter_mut().zip(&p[a..b]).for_each(|(o, &q)| *o = s * q as f32 + z),
                4 if a % 2 == 0 => {
                    for (i, o) in o.iter_mut().enumerate() {
                        let j = a + i;
                        *o = s * ((p[j / 2] >> ((j % 2) * 4)) & 15) as f32 + z;
                    }
                }
                _ => {
                    for (i, o) in o.iter_mut().enumerate() {
                        *o = s * get_bits(p, a + i, self.bits) as f32 + z;
                    }
                }
            }
        }
    }

    /// Σ_j w[r][j]·x[j] as Σ_groups (scale·Σ q·x + bias·Σ x); `xsum[g]` is Σ x over group g
    /// (the packing's scalar reference, for the tests).
    #[cfg(test)]
    #[allow(clippy::needless_range_loop)]
    pub fn dot_row(&self, r: usize, x: &[f32], xsum: &[f32]) -> f32 {
        let rb = row_bytes(self.cols, self.bits);
        let p = &self.packed[r * rb..(r + 1) * rb];
        let ng = self.groups();
        let mut acc = 0.0f32;
        for g in 0..ng {
            let (a, b) = (g * self.group, ((g + 1) * self.group).min(self.cols));
            let qx = match self.bits {
                8 => p[a..b].iter().zip(&x[a..b]).map(|(&q, &v)| q as f32 * v).sum::<f32>(),
                4 => {
                    let mut s = 0.0;
                    for j in a..b {
                        s += ((p[j / 2] >> ((j % 2) * 4)) & 15) as f32 * x[j];
                    }
                    s
                }
                2 => {
                    let mut s = 0.0;
                    for j in a..b {
                        s += ((p[j / 4] >> ((j % 4) * 2)) & 3) as f32 * x[j];
                    }
                    s
                }
                _ => (a..b).map(|j| get_bits(p, j, self.bits) as f32 * x[j]).sum::<f32>(),
            };
            acc += bf(self.scales[r * ng + g]) * qx + bf(self.biases[r * ng + g]) * xsum[g];
        }
        acc
    }

    /// Per-group sums of `x` (shared by every row).
    #[cfg(test)]
    pub fn group_sums(&self, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend(x.chunks(self.group).map(|c| c.iter().sum::<f32>()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::AlignedBytes;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        crate::testutil::uniform(n, seed).into_iter().map(|v| v * 0.2).collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        for &bits in &BITS {
            for &(rows, cols, group) in &[(3, 64, 64), (5, 200, 64), (2, 96, 32), (1, 7, 64)] {
                let w = rnd(rows * cols, bits as u64);
                let blob = AlignedBytes::from_slice(&quantize(&w, rows, cols, bits, group));
                let blob = blob.bytes();
                assert_eq!(blob.len(), blob_bytes(rows, cols, bits, group));
                let q = QMat::new(blob, rows, cols, bits, group);
                let mut row = vec![0.0; cols];
                for r in 0..rows {
                    q.row_f32(r, &mut row);
                    for g in 0..cols.div_ceil(group) {
                        let s = bf(q.scales[r * q.groups() + g]);
                        for j in g * group..((g + 1) * group).min(cols) {
                            let e = (row[j] - w[r * cols + j]).abs();
                            assert!(e <= s * 0.5 + 1e-6, "bits {bits}: error {e} step {s}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_matches_dequantized_scalar_reference() {
        for &bits in &BITS {
            for &(rows, cols, group) in &[(4, 64, 64), (3, 320, 64), (2, 100, 64), (3, 24, 8)] {
                let w = rnd(rows * cols, 11 + bits as u64);
                let x = rnd(cols, 5);
                let blob = AlignedBytes::from_slice(&quantize(&w, rows, cols, bits, group));
                let q = QMat::new(blob.bytes(), rows, cols, bits, group);
                let mut xs = vec![];
                q.group_sums(&x, &mut xs);
                let mut row = vec![0.0; cols];
                for r in 0..rows {
                    q.row_f32(r, &mut row);
                    let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let got = q.dot_row(r, &x, &xs) as f64;
                    assert!((got - want).abs() < 1e-5, "bits {bits} {rows}x{cols}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn packing_matches_mlx_uint32_words() {
        // MLX: element j of a row in uint32 word j / (32/bits), at bit (j % (32/bits))·bits.
        for &bits in &[2u8, 4, 8] {
            let per = 32 / bits as usize;
            let vals: Vec<u32> = (0..64).map(|j| (j * 7 + 3) as u32 & ((1 << bits) - 1)).collect();
            let mut words = vec![0u32; 64 / per];
            for (j, v) in vals.iter().enumerate() {
                words[j / per] |= v << ((j % per) * bits as usize);
            }
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            for (j, v) in vals.iter().enumerate() {
                assert_eq!(get_bits(&bytes, j, bits), *v);
            }
        }
    }
}
