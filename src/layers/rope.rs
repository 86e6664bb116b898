//! Rotary position embedding on the first `rot` dims of a head ("rotate half" pairing).
//! Qwen3.5's mrope with text-only positions (all three ids equal) is exactly this.

#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// (rotated dims, θ bits): tables of equal keys are equal.
    key: (usize, u64),
}

/// Recent tables, shared by every layer with the same parameters: decode asks each attention
/// layer for the same position's table, and `sin`/`cos` of large angles cost ~100 ns each
/// (~10 µs of serial time per layer and token).
type Memo = Vec<((usize, u64), usize, Vec<f32>, Vec<f32>)>;
static MEMO: std::sync::Mutex<Memo> = std::sync::Mutex::new(Vec::new());

impl Rope {
    pub fn new(rot_dim: usize, theta: f64) -> Rope {
        let inv_freq = (0..rot_dim / 2).map(|j| theta.powf(-((2 * j) as f64) / rot_dim as f64)).collect();
        Rope { inv_freq, key: (rot_dim, theta.to_bits()) }
    }

    /// (rotated dims, θ).
    pub fn params(&self) -> (usize, f64) {
        (self.key.0, f64::from_bits(self.key.1))
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
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
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
