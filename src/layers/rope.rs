//! Rotary position embedding on the first `rot` dims of a head ("rotate half" pairing).
//! Qwen3.5's mrope with text-only positions (all three ids equal) is exactly this.

#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    scale: f64,
    /// (rotated dims, θ bits, a digest of the frequencies and scale): tables of equal keys are equal.
    key: (usize, u64, u64),
    plain: bool,
}

/// Recent tables, shared by every layer with the same parameters: decode asks each attention
/// layer for the same position's table, and `sin`/`cos` of large angles cost ~100 ns each
/// (~10 µs of serial time per layer and token).
type Memo = Vec<((usize, u64, u64), usize, Vec<f32>, Vec<f32>)>;
static MEMO: std::sync::Mutex<Memo> = std::sync::Mutex::new(Vec::new());

impl Rope {
    pub fn new(rot_dim: usize, theta: f64) -> Rope {
        let inv_freq = (0..rot_dim / 2).map(|j| theta.powf(-((2 * j) as f64) / rot_dim as f64)).collect();
        Rope::of(rot_dim, theta, inv_freq, 1.0, true)
    }

    /// YaRN (`modeling_rope_utils._compute_yarn_parameters`): each frequency blends its
    /// interpolated (÷ factor) and original value by a linear ramp over the dimensions between
    /// the corrections for `beta_fast` and `beta_slow` rotations; cos and sin are scaled by the
    /// attention factor.
    pub fn yarn(rot_dim: usize, theta: f64, y: &crate::config::Yarn) -> Rope {
        let d = rot_dim as f64;
        let correction = |rot: f64| {
            d * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut lo, mut hi) = (correction(y.beta_fast), correction(y.beta_slow));
        if y.truncate {
            (lo, hi) = (lo.floor(), hi.ceil());
        }
        let (lo, mut hi) = (lo.max(0.0), hi.min(d - 1.0));
        if lo == hi {
            hi += 0.001;
        }
        let inv_freq = (0..rot_dim / 2)
            .map(|j| {
                let base = theta.powf((2 * j) as f64 / d);
                let ramp = ((j as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                let extrapolate = 1.0 - ramp;
                1.0 / (y.factor * base) * (1.0 - extrapolate) + 1.0 / base * extrapolate
            })
            .collect();
        Rope::of(rot_dim, theta, inv_freq, y.attention_factor, false)
    }

    fn of(rot_dim: usize, theta: f64, inv_freq: Vec<f64>, scale: f64, plain: bool) -> Rope {
        let digest = inv_freq
            .iter()
            .chain([&scale])
            .fold(0xcbf2_9ce4_8422_2325u64, |h, f| (h ^ f.to_bits()).wrapping_mul(0x0100_0000_01b3));
        Rope { inv_freq, scale, key: (rot_dim, theta.to_bits(), digest), plain }
    }

    /// (rotated dims, θ).
    pub fn params(&self) -> (usize, f64) {
        (self.key.0, f64::from_bits(self.key.1))
    }

    /// The frequency of each rotated pair and the factor on cos and sin (YaRN's attention
    /// factor): what a backend that builds its own tables needs.
    pub fn freqs(&self) -> (&[f64], f64) {
        (&self.inv_freq, self.scale)
    }

    /// Whether the frequencies are θ^(−2j/d), unscaled (what [`Rope::params`] describes).
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    /// cos and sin tables for position `pos`, each `rot/2` long.
    pub fn table(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        let memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, c, s)) = memo.iter().find(|m| m.0 == self.key && m.1 == pos) {
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
            return;
        }
        drop(memo);
        for &f in &self.inv_freq {
            let a = pos as f64 * f;
            cos.push((a.cos() * self.scale) as f32);
            sin.push((a.sin() * self.scale) as f32);
        }
        let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
        // the oldest entry's buffers are reused: a warm decode step allocates nothing here
        let mut e = if memo.len() >= 8 { memo.remove(0) } else { Default::default() };
        (e.0, e.1) = (self.key, pos);
        e.2.clear();
        e.2.extend_from_slice(cos);
        e.3.clear();
        e.3.extend_from_slice(sin);
        memo.push(e);
    }

    /// Rotates one head vector in place with the tables of its position. The two halves are
    /// separate slices, so the loop vectorizes.
    #[inline]
    pub fn apply(head: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        let (a, b) = head[..2 * half].split_at_mut(half);
        for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = y * c + x * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let r = Rope::new(4, 10000.0);
        let (mut c, mut s) = (vec![], vec![]);
        r.table(0, &mut c, &mut s);
        let mut h = vec![1.0, 2.0, 3.0, 4.0, 5.0];
        Rope::apply(&mut h, &c, &s);
        assert_eq!(h, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        r.table(7, &mut c, &mut s);
        Rope::apply(&mut h, &c, &s);
        let n: f32 = h[..4].iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
        assert_eq!(h[4], 5.0);
    }
}
