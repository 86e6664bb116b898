//! Sparse MoE block: softmax router → top-k → optional renormalisation → routed SwiGLU
//! experts, plus (Qwen3.5 / Qwen3-Next) a shared expert scaled by sigmoid(gate·x).

use super::mlp::Mlp;
use super::sigmoid;
use crate::tensor::{Mat, dot};

/// The always-on expert of Qwen3.5 / Qwen3-Next.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub mlp: Mlp,
    /// `shared_expert_gate.weight`, one row of `hidden`.
    pub gate: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Moe {
    pub router: Mat,
    pub experts: Vec<Mlp>,
    pub shared: Option<SharedExpert>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

/// Top-k experts of one token from its router logits: (expert, weight), best first.
pub fn route(logits: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    let k = k.min(p.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        p[b].total_cmp(&p[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut top: Vec<(usize, f32)> = idx.into_iter().map(|e| (e, p[e])).collect();
    if renormalize {
        let s: f32 = top.iter().map(|t| t.1).sum();
        top.iter_mut().for_each(|t| t.1 /= s);
    }
    top
}

impl Moe {
    /// `out = moe(x)` for `n` tokens. `top_k` overrides the configured number of routed experts.
    /// Tokens are grouped by expert so each expert's weights are read once per call.
    pub fn forward(&self, x: &[f32], n: usize, top_k: Option<usize>, out: &mut [f32]) {
        let h = self.router.cols;
        let e = self.router.rows;
        let mut logits = vec![0.0; n * e];
        self.router.matmul(x, n, &mut logits);
        let k = top_k.unwrap_or(self.top_k);
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for t in 0..n {
            for (ex, w) in route(&logits[t * e..(t + 1) * e], k, self.norm_topk_prob) {
                per_expert[ex].push((t, w));
            }
        }
        out.iter_mut().for_each(|v| *v = 0.0);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for (ex, toks) in per_expert.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            xs.clear();
            for &(t, _) in toks {
                xs.extend_from_slice(&x[t * h..(t + 1) * h]);
            }
            ys.resize(toks.len() * h, 0.0);
            self.experts[ex].forward(&xs, toks.len(), &mut ys);
            for (i, &(t, w)) in toks.iter().enumerate() {
                for (o, y) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&ys[i * h..(i + 1) * h])
                {
                    *o += w * y;
                }
            }
        }
        if let Some(sh) = &self.shared {
            let mut ys = vec![0.0; n * h];
            sh.mlp.forward(x, n, &mut ys);
            for t in 0..n {
                let g = sigmoid(dot(&sh.gate, &x[t * h..(t + 1) * h]));
                for (o, y) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&ys[t * h..(t + 1) * h])
                {
                    *o += g * y;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn route_picks_largest_and_renormalizes() {
        let r = route(&[0.0, 3.0, 1.0, 2.0], 2, false);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = [0.0f32, 3.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((r[0].1 - 3f32.exp() / total).abs() < 1e-6);
        let r = route(&[0.0, 3.0, 1.0, 2.0], 2, true);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
    }
}
