//! Dense weight matrices in their storage dtype, with f32 matrix–vector and matrix–matrix
//! products. Activations are always f32; weights stay in bf16/f16 to halve resident memory.

use anyhow::{Result, bail};
use rayon::prelude::*;

/// Storage element type of a dense weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(Vec<u16>, DType),
}

/// A row-major `[rows, cols]` matrix (PyTorch `nn.Linear` layout: y = W·x).
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    store: Store,
}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Below this many weight elements a product runs on the calling thread: the pool's
/// hand-off costs more than the work.
const PAR_MIN_ELEMS: usize = 1 << 16;

impl Mat {
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Mat> {
        if data.len() != rows * cols {
            bail!(
                "matrix data has {} elements, expected {rows}x{cols}",
                data.len()
            );
        }
        Ok(Mat {
            rows,
            cols,
            store: Store::F32(data),
        })
    }

    pub fn from_half(rows: usize, cols: usize, bits: Vec<u16>, dtype: DType) -> Result<Mat> {
        if bits.len() != rows * cols || dtype == DType::F32 {
            bail!(
                "half matrix data has {} elements, expected {rows}x{cols}",
                bits.len()
            );
        }
        Ok(Mat {
            rows,
            cols,
            store: Store::Half(bits, dtype),
        })
    }

    pub fn dtype(&self) -> DType {
        match &self.store {
            Store::F32(_) => DType::F32,
            Store::Half(_, d) => *d,
        }
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// Row `r` converted to f32 into `out`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match &self.store {
            Store::F32(d) => out.copy_from_slice(&d[a..b]),
            Store::Half(d, DType::BF16) => {
                for (o, &v) in out.iter_mut().zip(&d[a..b]) {
                    *o = bf16_to_f32(v);
                }
            }
            Store::Half(d, _) => {
                for (o, &v) in out.iter_mut().zip(&d[a..b]) {
                    *o = f16_to_f32(v);
                }
            }
        }
    }

    /// The whole matrix as f32 (tests, small tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_f32(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }

    #[inline]
    fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match &self.store {
            Store::F32(d) => dot(&d[a..b], x),
            Store::Half(d, DType::BF16) => d[a..b]
                .iter()
                .zip(x)
                .map(|(&w, &v)| bf16_to_f32(w) * v)
                .sum(),
            Store::Half(d, _) => d[a..b]
                .iter()
                .zip(x)
                .map(|(&w, &v)| f16_to_f32(w) * v)
                .sum(),
        }
    }

    /// A new matrix made of the given row ranges, in order (un-fusing projections).
    pub fn gather_rows(&self, ranges: &[std::ops::Range<usize>]) -> Mat {
        let c = self.cols;
        match &self.store {
            Store::F32(d) => {
                let data: Vec<f32> = ranges
                    .iter()
                    .flat_map(|r| d[r.start * c..r.end * c].iter().copied())
                    .collect();
                Mat {
                    rows: data.len() / c,
                    cols: c,
                    store: Store::F32(data),
                }
            }
            Store::Half(d, t) => {
                let data: Vec<u16> = ranges
                    .iter()
                    .flat_map(|r| d[r.start * c..r.end * c].iter().copied())
                    .collect();
                Mat {
                    rows: data.len() / c,
                    cols: c,
                    store: Store::Half(data, *t),
                }
            }
        }
    }

    /// Rows `start..end` as a new matrix.
    pub fn slice_rows(&self, start: usize, end: usize) -> Mat {
        self.gather_rows(std::slice::from_ref(&(start..end)))
    }

    /// y = W·x for one vector.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(y.len(), self.rows);
        if self.rows * self.cols < PAR_MIN_ELEMS {
            for (r, o) in y.iter_mut().enumerate() {
                *o = self.dot_row(r, x);
            }
        } else {
            y.par_chunks_mut(64).enumerate().for_each(|(ci, ch)| {
                for (i, o) in ch.iter_mut().enumerate() {
                    *o = self.dot_row(ci * 64 + i, x);
                }
            });
        }
    }

    /// Y = X·Wᵀ for `n` row vectors: `x` is `[n, cols]`, `y` is `[n, rows]`. Each weight row is
    /// converted once and used for every input vector, so prefill reads the weights once.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(y.len(), n * self.rows);
        if n == 1 {
            return self.matvec(x, y);
        }
        let (rows, cols) = (self.rows, self.cols);
        let block =
            |r0: usize, out: &mut Vec<(usize, usize, f32)>, buf: &mut Vec<f32>, r1: usize| {
                for r in r0..r1 {
                    self.row_f32(r, buf);
                    for t in 0..n {
                        out.push((t, r, dot(buf, &x[t * cols..(t + 1) * cols])));
                    }
                }
            };
        const RB: usize = 32;
        let results: Vec<Vec<(usize, usize, f32)>> = if rows * cols * n < PAR_MIN_ELEMS {
            let mut out = Vec::with_capacity(rows * n);
            let mut buf = vec![0.0; cols];
            block(0, &mut out, &mut buf, rows);
            vec![out]
        } else {
            (0..rows.div_ceil(RB))
                .into_par_iter()
                .map(|b| {
                    let mut out = Vec::with_capacity(RB * n);
                    let mut buf = vec![0.0; cols];
                    block(b * RB, &mut out, &mut buf, ((b + 1) * RB).min(rows));
                    out
                })
                .collect()
        };
        for part in results {
            for (t, r, v) in part {
                y[t * rows + r] = v;
            }
        }
    }
}

/// f32 dot product with independent partial sums (lets the compiler vectorise).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matmul_matches_scalar_for_every_dtype_and_odd_sizes() {
        for &(rows, cols, n) in &[
            (1, 1, 1),
            (7, 13, 3),
            (33, 65, 5),
            (300, 257, 2),
            (129, 700, 1),
        ] {
            let w = lcg(rows * cols, 7);
            let x = lcg(cols * n, 9);
            let mats = [
                Mat::from_f32(rows, cols, w.clone()).unwrap(),
                Mat::from_half(
                    rows,
                    cols,
                    w.iter()
                        .map(|v| half::bf16::from_f32(*v).to_bits())
                        .collect(),
                    DType::BF16,
                )
                .unwrap(),
                Mat::from_half(
                    rows,
                    cols,
                    w.iter()
                        .map(|v| half::f16::from_f32(*v).to_bits())
                        .collect(),
                    DType::F16,
                )
                .unwrap(),
            ];
            for m in &mats {
                let wf = m.to_f32();
                let mut y = vec![0.0; rows * n];
                m.matmul(&x, n, &mut y);
                for t in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64)
                            .sum();
                        assert!(
                            (y[t * rows + r] as f64 - want).abs() < 1e-4,
                            "{rows}x{cols} {:?}",
                            m.dtype()
                        );
                    }
                }
            }
        }
    }
}
