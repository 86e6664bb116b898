//! RMSNorm, plain (`x·w`) or zero-centred (`x·(1+w)`, folded into the weight at load).

/// RMS normalisation over rows of `w.len()` elements.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    w: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// `zero_centered`: the stored weight is an offset from 1.
    pub fn new(mut w: Vec<f32>, eps: f32, zero_centered: bool) -> RmsNorm {
        if zero_centered {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        RmsNorm { w, eps }
    }

    /// The weight as applied (a zero-centred norm's offset folded in).
    pub fn weight(&self) -> &[f32] {
        &self.w
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    pub fn dim(&self) -> usize {
        self.w.len()
    }

    /// Normalises each row of `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        let norm = |row: &mut [f32]| {
            let inv = inv_rms(row, self.eps);
            for (v, w) in row.iter_mut().zip(&self.w) {
                *v *= inv * w;
            }
        };
        if x.len() > self.w.len() && crate::tensor::parallel(x.len()) && !crate::par::on_team() {
            use rayon::prelude::*;
            x.par_chunks_exact_mut(self.w.len()).for_each(norm);
        } else {
            x.chunks_exact_mut(self.w.len()).for_each(norm);
        }
    }

    /// `out = norm(x)` row by row.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        out.copy_from_slice(x);
        self.apply(out);
    }
}

/// 1 / sqrt(mean(x²) + eps), accumulated in f64 for stability on long rows (eight
/// independent lanes, so the loop vectorizes).
#[inline]
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    let ss = acc.iter().sum::<f64>() + tail;
    (1.0 / ((ss / x.len() as f64) + eps as f64).sqrt()) as f32
}
