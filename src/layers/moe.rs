//! Sparse MoE block: softmax router → top-k → optional renormalisation → routed SwiGLU
//! experts, plus (Qwen3.5 / Qwen3-Next) a shared expert scaled by sigmoid(gate·x).

use super::mlp::{Mlp, MlpRef};
use super::sigmoid;
use crate::flash::ExpertStore;
use crate::profile::{PROFILE, add_since};
use crate::tensor::{Mat, dot};
use anyhow::Result;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// The always-on expert of Qwen3.5 / Qwen3-Next.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub mlp: Mlp,
    /// `shared_expert_gate.weight`, one row of `hidden`.
    pub gate: Vec<f32>,
}

/// Where a layer's routed experts live.
#[derive(Clone)]
pub enum Experts {
    /// All in memory (a Hugging Face checkpoint).
    Memory(Vec<Mlp>),
    /// Read on demand from the flash layout's expert file of `layer`.
    Flash { store: Arc<ExpertStore>, layer: usize },
}

impl std::fmt::Debug for Experts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Experts::Memory(v) => write!(f, "Experts::Memory({} experts)", v.len()),
            Experts::Flash { layer, .. } => write!(f, "Experts::Flash(layer {layer})"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Moe {
    pub router: Mat,
    pub experts: Experts,
    pub shared: Option<SharedExpert>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Index of the layer (for routing statistics).
    pub layer: usize,
}

/// Top-k experts of one token from its router logits: (expert, weight), best first.
pub fn route(logits: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    let k = k.min(p.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
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
    /// Tokens are grouped by expert so each expert is read and decoded once per call; expert
    /// outputs are summed in expert order, so the result does not depend on I/O timing.
    pub fn forward(&self, x: &[f32], n: usize, top_k: Option<usize>, out: &mut [f32]) -> Result<()> {
        let t_route = Instant::now();
        let h = self.router.cols;
        let e = self.router.rows;
        let mut logits = vec![0.0; n * e];
        self.router.matmul(x, n, &mut logits);
        let k = top_k.unwrap_or(self.top_k);
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for t in 0..n {
            let r = route(&logits[t * e..(t + 1) * e], k, self.norm_topk_prob);
            let chosen: Vec<usize> = r.iter().map(|x| x.0).collect();
            crate::profile::record_routing(self.layer, e, &chosen);
            for (ex, w) in r {
                per_expert[ex].push((t, w));
            }
        }
        let needed: Vec<usize> = (0..e).filter(|&ex| !per_expert[ex].is_empty()).collect();
        add_since(&PROFILE.route, t_route);
        // experts that are ready at once run as parallel tasks, each into its own slot;
        // the combine below sums them in expert order, so the result is the same
        let results: Vec<std::sync::Mutex<Vec<f32>>> = needed.iter().map(|_| Default::default()).collect();
        let exact = crate::tensor::exact();
        let run = |i: usize, mlp: MlpRef<'_>| {
            crate::tensor::exact_products(exact, || {
                let toks = &per_expert[needed[i]];
                let mut xs = Vec::with_capacity(toks.len() * h);
                for &(t, _) in toks {
                    xs.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                let mut y = vec![0.0; toks.len() * h];
                mlp.forward(&xs, toks.len(), &mut y);
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = y;
            })
        };
        let mut shared_out = vec![];
        let shared_ns = std::cell::Cell::new(0u64);
        let shared = |shared_out: &mut Vec<f32>| {
            if let Some(sh) = &self.shared {
                let t = Instant::now();
                shared_out.resize(n * h, 0.0);
                sh.mlp.forward(x, n, shared_out);
                shared_ns.set(t.elapsed().as_nanos() as u64);
            }
        };
        let t_experts = Instant::now();
        match &self.experts {
            Experts::Memory(v) => {
                shared(&mut shared_out);
                (0..needed.len()).into_par_iter().for_each(|i| run(i, v[needed[i]].view()));
            }
            Experts::Flash { store, layer } => {
                store.with_experts(*layer, &needed, || shared(&mut shared_out), run)?;
            }
        }
        let results: Vec<Vec<f32>> =
            results.into_iter().map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect();
        let spent = t_experts.elapsed().as_nanos() as u64;
        PROFILE.shared_expert.fetch_add(shared_ns.get(), std::sync::atomic::Ordering::Relaxed);
        PROFILE.experts.fetch_add(spent.saturating_sub(shared_ns.get()), std::sync::atomic::Ordering::Relaxed);
        out.iter_mut().for_each(|v| *v = 0.0);
        for (i, &ex) in needed.iter().enumerate() {
            for (j, &(t, w)) in per_expert[ex].iter().enumerate() {
                crate::kernels::axpy(w, &results[i][j * h..(j + 1) * h], &mut out[t * h..(t + 1) * h]);
            }
        }
        if let Some(sh) = &self.shared {
            for t in 0..n {
                let g = sigmoid(dot(&sh.gate, &x[t * h..(t + 1) * h]));
                crate::kernels::axpy(g, &shared_out[t * h..(t + 1) * h], &mut out[t * h..(t + 1) * h]);
            }
        }
        Ok(())
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
