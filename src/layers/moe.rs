//! Sparse MoE block: a router (softmax, or sigmoid with a score correction bias and group
//! limits) → top-k → optional renormalisation and scaling → routed SwiGLU experts, plus a
//! shared expert: scaled by sigmoid(gate·x) (Qwen3.5 / Qwen3-Next) or added as is (GLM-4.5).

use super::mlp::{Mlp, MlpRef, forward_each, forward_rows_each};
use super::sigmoid;
use crate::config::RouterSpec;
use crate::flash::ExpertStore;
use crate::profile::{PROFILE, add_since};
use crate::scratch;
use crate::tensor::{Mat, Precision, Product, SwigluTerm, dot, products_rows, swiglu_sum};
use anyhow::Result;
use rayon::prelude::*;
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Instant;

/// The always-on expert of Qwen3.5 / Qwen3-Next / GLM-4.5.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub mlp: Mlp,
    /// `shared_expert_gate.weight`, one row of `hidden` (Qwen); `None`: weight 1 (GLM).
    pub gate: Option<Vec<f32>>,
}

impl SharedExpert {
    /// Its weight for the token `x`.
    pub fn weight(&self, x: &[f32]) -> f32 {
        self.gate.as_ref().map_or(1.0, |g| sigmoid(dot(g, x)))
    }
}

/// How a block turns router logits into experts and weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Scoring {
    pub spec: RouterSpec,
    /// `e_score_correction_bias`, one per expert, when the spec has one.
    pub bias: Option<Vec<f32>>,
    /// The router's own bias, added to its logits (gpt-oss), when the spec has one.
    pub logit_bias: Option<Vec<f32>>,
}

impl Scoring {
    pub fn softmax(renormalize: bool) -> Scoring {
        Scoring { spec: RouterSpec::softmax(renormalize), bias: None, logit_bias: None }
    }
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
    /// The routed experts' activation (an extent's view does not know it).
    pub act: crate::config::Act,
    pub scoring: Scoring,
    /// Index of the layer (for routing statistics).
    pub layer: usize,
}

/// Top-k experts of one token from its router logits: (expert, weight), best first.
pub fn route(logits: &[f32], k: usize, scoring: &Scoring) -> Vec<(usize, f32)> {
    let mut top = vec![];
    route_into(logits, k, scoring, &mut Select::default(), &mut top);
    top
}

/// Calls `f` with the `k` experts the router logits pick (best first), without allocating.
pub fn with_top_experts<R>(logits: &[f32], k: usize, scoring: &Scoring, f: impl FnOnce(&[usize]) -> R) -> R {
    let mut r = scratch::take(&ROUTING);
    let r = &mut *r;
    route_into(logits, k, scoring, &mut r.select, &mut r.top);
    r.chosen.clear();
    r.chosen.extend(r.top.iter().map(|t| t.0));
    f(&r.chosen)
}

/// Scratch of [`route_into`].
#[derive(Default, Debug)]
pub struct Select {
    /// Each expert's weight (softmax or sigmoid of its logit).
    p: Vec<f32>,
    /// What the choice ranks by: the weight, plus the correction bias, masked to the kept groups.
    choice: Vec<f32>,
    idx: Vec<usize>,
    groups: Vec<(f32, usize)>,
    /// Logits plus the router's own bias.
    biased: Vec<f32>,
}

/// [`route`] into `top`, with reused scratch. Ties go to the lower expert index.
fn route_into(logits: &[f32], k: usize, scoring: &Scoring, s: &mut Select, top: &mut Vec<(usize, f32)>) {
    let spec = &scoring.spec;
    s.p.clear();
    let logits: &[f32] = match &scoring.logit_bias {
        Some(b) => {
            s.biased.clear();
            s.biased.extend(logits.iter().zip(b).map(|(l, b)| l + b));
            &s.biased
        }
        None => logits,
    };
    if spec.softmax_chosen {
        // gpt-oss: the top-k logits, then a softmax over them alone
        s.idx.clear();
        s.idx.extend(0..logits.len());
        let k = k.min(logits.len());
        let c = logits;
        s.idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
        s.idx.truncate(k);
        s.idx.sort_by(|&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
        let m = s.idx.first().map_or(0.0, |&e| c[e]);
        top.clear();
        top.extend(s.idx.iter().map(|&e| (e, (c[e] - m).exp())));
        let sum: f32 = top.iter().map(|t| t.1).sum();
        top.iter_mut().for_each(|t| t.1 = t.1 / sum * spec.scale);
        return;
    }
    if spec.sigmoid {
        s.p.extend(logits.iter().map(|&l| sigmoid(l)));
    } else {
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        s.p.extend(logits.iter().map(|&l| (l - m).exp()));
        let sum: f32 = s.p.iter().sum();
        s.p.iter_mut().for_each(|v| *v /= sum);
    }
    let ne = s.p.len();
    // the choice ranks by the weights themselves unless a bias or a group limit changes them
    let own_choice = scoring.bias.is_some() || spec.n_group > 1;
    if own_choice {
        s.choice.clear();
        match &scoring.bias {
            Some(b) => s.choice.extend(s.p.iter().zip(b).map(|(p, b)| p + b)),
            None => s.choice.extend_from_slice(&s.p),
        }
    }
    if spec.n_group > 1 {
        // only the best `topk_group` groups, by the sum of each group's two best scores
        let per = ne / spec.n_group;
        s.groups.clear();
        for (g, c) in s.choice.chunks(per).enumerate() {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in c {
                if v > a {
                    (a, b) = (v, a);
                } else if v > b {
                    b = v;
                }
            }
            s.groups.push((a + b, g));
        }
        s.groups.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        for &(_, g) in &s.groups[spec.topk_group.min(spec.n_group)..] {
            s.choice[g * per..(g + 1) * per].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        }
    }
    let c = if own_choice { &s.choice } else { &s.p };
    s.idx.clear();
    s.idx.extend(0..ne);
    let k = k.min(ne);
    s.idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
    s.idx.truncate(k);
    s.idx.sort_by(|&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
    top.clear();
    top.extend(s.idx.iter().map(|&e| (e, s.p[e])));
    if spec.renormalize {
        let sum: f32 = top.iter().map(|t| t.1).sum();
        // sigmoid weights can all be tiny; softmax ones never sum to zero
        let sum = if spec.sigmoid { sum + 1e-20 } else { sum };
        top.iter_mut().for_each(|t| t.1 /= sum);
    }
    if spec.scale != 1.0 {
        top.iter_mut().for_each(|t| t.1 *= spec.scale);
    }
}

/// Per-thread routing scratch, reused so that routing allocates nothing once warm.
#[derive(Default, Debug)]
struct Routing {
    select: Select,
    top: Vec<(usize, f32)>,
    chosen: Vec<usize>,
    /// (expert, token, weight) of every routing of the call, sorted by expert then token.
    assign: Vec<(usize, usize, f32)>,
    /// The distinct experts, ascending, and where each one's assignments start (one more
    /// entry: the end).
    needed: Vec<usize>,
    start: Vec<usize>,
}

thread_local! {
    static ROUTING: scratch::Pool<Routing> = const { scratch::Pool::new() };
}

/// A block as a term of decode's weighted sum of experts.
fn term<'a>(m: MlpRef<'a>, x: &'a [f32], weight: f32) -> SwigluTerm<'a> {
    SwigluTerm { gate: m.gate, up: m.up, down: m.down, x, weight, bias: m.bias, act: m.act }
}

/// Each expert task writes its own rows of one shared output buffer.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: tasks write disjoint row ranges (see `Moe::forward`).
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// The element at `off` (a method, so closures capture the whole `Rows`).
    fn at(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

impl Moe {
    /// `out = moe(x)` for `n` tokens. `top_k` overrides the configured number of routed experts.
    /// Tokens are grouped by expert so each expert is read and decoded once per call; expert
    /// outputs are summed in expert order, so the result does not depend on I/O timing.
    pub fn forward(&self, x: &[f32], n: usize, top_k: Option<usize>, out: &mut [f32], p: Precision) -> Result<()> {
        self.forward_impl(x, n, top_k, out, p, false)
    }

    /// [`Moe::forward`] for `n` rows that are each one decode step of its own sequence (a
    /// batch of sequences, [`crate::model::Model::forward_batch`]): a routed expert is read
    /// once for every row that chose it and its weight rows are applied to those rows
    /// together, each row's products computed as decode's one-token products compute them
    /// ([`crate::tensor::products_rows`]), so every row gets exactly the value one-token
    /// `forward` gives it.
    pub fn forward_rows(&self, x: &[f32], n: usize, top_k: Option<usize>, out: &mut [f32], p: Precision) -> Result<()> {
        self.forward_impl(x, n, top_k, out, p, n > 1)
    }

    /// `alone`: every row is computed as a one-token product of its own.
    fn forward_impl(
        &self,
        x: &[f32],
        n: usize,
        top_k: Option<usize>,
        out: &mut [f32],
        p: Precision,
        alone: bool,
    ) -> Result<()> {
        let mut r = scratch::take(&ROUTING);
        let r = &mut *r;
        let t_route = Instant::now();
        let h = self.router.cols;
        let e = self.router.rows;
        let mut logits = scratch::zeros(n * e);
        if alone {
            products_rows(&mut [Product { w: self.router.view(), x, y: &mut logits }], p);
        } else {
            self.router.matmul(x, n, &mut logits, p);
        }
        let k = top_k.unwrap_or(self.top_k).min(e);
        r.assign.clear();
        if n > 1 && crate::tensor::parallel(n * e) {
            // a prompt's tokens are routed in parallel (a serial loop over ~500 tokens × 512
            // experts held every other thread up in each layer); statistics in token order
            r.assign.resize(n * k, (0, 0, 0.0));
            r.assign.par_chunks_mut(k).enumerate().for_each_init(
                || (Select::default(), Vec::new()),
                |(sel, top), (t, a)| {
                    route_into(&logits[t * e..(t + 1) * e], k, &self.scoring, sel, top);
                    a.iter_mut().zip(top.iter()).for_each(|(a, &(ex, w))| *a = (ex, t, w));
                },
            );
            for a in r.assign.chunks(k) {
                r.chosen.clear();
                r.chosen.extend(a.iter().map(|x| x.0));
                crate::profile::record_routing(self.layer, e, &r.chosen);
            }
        } else {
            for t in 0..n {
                route_into(&logits[t * e..(t + 1) * e], k, &self.scoring, &mut r.select, &mut r.top);
                r.chosen.clear();
                r.chosen.extend(r.top.iter().map(|x| x.0));
                crate::profile::record_routing(self.layer, e, &r.chosen);
                r.assign.extend(r.top.iter().map(|&(ex, w)| (ex, t, w)));
            }
        }
        r.assign.sort_unstable_by_key(|a| (a.0, a.1));
        r.needed.clear();
        r.start.clear();
        for (j, a) in r.assign.iter().enumerate() {
            if r.needed.last() != Some(&a.0) {
                r.needed.push(a.0);
                r.start.push(j);
            }
        }
        r.start.push(r.assign.len());
        if n > 1 && !alone {
            // a prompt chunk of one sequence (a batch's rows are other sequences)
            crate::profile::record_chunk(self.layer, r.needed.len(), n);
        }
        add_since(&PROFILE.route, t_route);
        // expert i's outputs are rows start[i]..start[i + 1] of `ys`: ready experts run as
        // parallel tasks, and the combine below sums them in expert order, so the result is
        // the same whatever order they finish in
        let (assign, needed, start) = (&r.assign, &r.needed, &r.start);
        // one token's one-token products write all their rows (and decode's fused steps use
        // none): zeroing them took microseconds a layer
        let mut ys = if n == 1 { scratch::dirty(assign.len() * h) } else { scratch::zeros(assign.len() * h) };
        let rows = Rows(ys.as_mut_ptr());
        // SAFETY: `with_experts` (and the in-memory call) give each index exactly once, and
        // rows start[i]..start[i + 1] of `ys` belong to index i alone; `ys` outlives every task.
        let out_of = |i: usize| unsafe {
            let (a, b) = (start[i], start[i + 1]);
            std::slice::from_raw_parts_mut(rows.at(a * h), (b - a) * h)
        };
        let tokens = |i: usize| start[i + 1] - start[i];
        let shared_out = RefCell::new(scratch::zeros(0));
        // (time spent on it, it was computed on its own)
        let (shared_ns, shared_done) = (Cell::new(0u64), Cell::new(false));
        // the shared expert on its own (prefill, or decode with some experts still on their way)
        let shared = || {
            if let Some(sh) = &self.shared
                && !shared_done.replace(true)
            {
                let t = Instant::now();
                let mut so = shared_out.borrow_mut();
                so.vec().resize(n * h, 0.0);
                if alone {
                    forward_rows_each(&mut [(sh.mlp.view(), x, &mut so[..])], p);
                } else {
                    sh.mlp.forward(x, n, &mut so, p);
                }
                shared_ns.set(t.elapsed().as_nanos() as u64);
            }
        };
        // decode with every expert at hand: two steps compute the whole sum into `out`, the
        // shared expert as its last term, in the order the combine below would sum them
        let out = RefCell::new(out);
        let fused = Cell::new(false);
        let all_at_once = |batch: &[(usize, MlpRef<'_>)]| {
            if n != 1 || batch.len() != needed.len() || shared_done.get() {
                return false;
            }
            let mut order: SmallVec<[_; 16]> = batch.into();
            order.sort_unstable_by_key(|b| b.0);
            let mut terms: SmallVec<[_; 17]> = order.iter().map(|&(i, m)| term(m, x, assign[start[i]].2)).collect();
            if let Some(sh) = &self.shared {
                terms.push(term(sh.mlp.view(), x, sh.weight(x)));
            }
            swiglu_sum(&terms, &mut out.borrow_mut(), p);
            crate::par::mark();
            fused.set(true);
            true
        };
        let run_batch = |batch: &[(usize, MlpRef<'_>)]| {
            if all_at_once(batch) {
                return;
            }
            if n == 1 {
                shared();
            }
            if alone {
                // every expert over the rows that chose it, its weights read once for them all
                let total: usize = batch.iter().map(|b| tokens(b.0)).sum();
                // written in full below
                let mut xs = scratch::dirty(total * h);
                let mut rows = xs.chunks_exact_mut(h);
                for &(i, _) in batch {
                    for (a, r) in assign[start[i]..start[i + 1]].iter().zip(&mut rows) {
                        r.copy_from_slice(&x[a.1 * h..(a.1 + 1) * h]);
                    }
                }
                let mut rest = &xs[..];
                let mut items: SmallVec<[_; 16]> = SmallVec::new();
                for &(i, mlp) in batch {
                    let (xi, r) = rest.split_at(tokens(i) * h);
                    rest = r;
                    items.push((mlp, xi, out_of(i)));
                }
                forward_rows_each(&mut items, p);
                return;
            }
            // experts with several tokens (prefill): one task each
            let several = |b: &&(usize, MlpRef<'_>)| tokens(b.0) > 1;
            let run = |&&(i, mlp): &&(usize, MlpRef<'_>)| {
                let mut xs = scratch::zeros(0);
                for &(_, t, _) in &assign[start[i]..start[i + 1]] {
                    xs.vec().extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                mlp.forward(&xs, tokens(i), out_of(i), p);
            };
            let multi: SmallVec<[_; 16]> = batch.iter().filter(several).collect();
            if multi.len() > 1 {
                multi.par_iter().for_each(run);
            } else {
                multi.iter().for_each(run);
            }
            // experts with one token (all of decode): their products together
            let mut single: SmallVec<[_; 16]> = SmallVec::new();
            for &(i, mlp) in batch.iter().filter(|b| tokens(b.0) == 1) {
                for (a, o) in assign[start[i]..start[i + 1]].iter().zip(out_of(i).chunks_mut(h)) {
                    single.push((mlp, &x[a.1 * h..(a.1 + 1) * h], o));
                }
            }
            if !single.is_empty() {
                forward_each(&mut single, p);
            }
        };
        // a prompt's shared expert runs while the first reads are in flight; decode's waits
        // to join the routed experts' steps
        let during = || {
            if n > 1 {
                shared()
            }
        };
        let t_experts = Instant::now();
        match &self.experts {
            Experts::Memory(v) => {
                during();
                let batch: SmallVec<[_; 16]> = needed.iter().enumerate().map(|(i, &e)| (i, v[e].view())).collect();
                run_batch(&batch);
            }
            Experts::Flash { store, layer } => {
                let views = |batch: &[(usize, &[u8])]| {
                    let b: SmallVec<[_; 16]> =
                        batch.iter().map(|&(i, extent)| (i, store.layout.mlp(extent, self.act))).collect();
                    run_batch(&b)
                };
                store.with_experts(*layer, needed, during, views)?;
            }
        }
        let spent = t_experts.elapsed().as_nanos() as u64;
        PROFILE.shared_expert.fetch_add(shared_ns.get(), std::sync::atomic::Ordering::Relaxed);
        PROFILE.experts.fetch_add(spent.saturating_sub(shared_ns.get()), std::sync::atomic::Ordering::Relaxed);
        crate::par::mark();
        let out = out.into_inner();
        if fused.get() {
            return Ok(());
        }
        shared();
        let shared_out = shared_out.into_inner();
        // out_t = Σ (in expert order) w · expert(x_t) [+ sigmoid(gate·x_t) · shared(x_t)]
        let combine = |t: usize, ot: &mut [f32], js: &mut dyn Iterator<Item = usize>| {
            ot.iter_mut().for_each(|v| *v = 0.0);
            for j in js {
                crate::kernels::axpy(assign[j].2, &ys[j * h..(j + 1) * h], ot);
            }
            if let Some(sh) = &self.shared {
                let g = sh.weight(&x[t * h..(t + 1) * h]);
                crate::kernels::axpy(g, &shared_out[t * h..(t + 1) * h], ot);
            }
        };
        if n > 1 && crate::tensor::parallel(n * h) {
            // each token's routings, in the (expert-sorted) order of `assign`, then one task
            // per token: the same sums in the same order as one thread would do them
            let mut by_token = vec![0usize; n + 1];
            assign.iter().for_each(|a| by_token[a.1 + 1] += 1);
            (0..n).for_each(|t| by_token[t + 1] += by_token[t]);
            let mut fill = by_token.clone();
            let mut order = vec![0usize; assign.len()];
            for (j, a) in assign.iter().enumerate() {
                order[fill[a.1]] = j;
                fill[a.1] += 1;
            }
            out.par_chunks_mut(h).enumerate().for_each(|(t, ot)| {
                combine(t, ot, &mut order[by_token[t]..by_token[t + 1]].iter().copied());
            });
        } else {
            for (t, ot) in out.chunks_mut(h).enumerate() {
                combine(t, ot, &mut assign.iter().enumerate().filter(|a| a.1.1 == t).map(|a| a.0));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Scoring, route};
    use crate::config::RouterSpec;

    #[test]
    fn route_picks_largest_and_renormalizes() {
        let r = route(&[0.0, 3.0, 1.0, 2.0], 2, &Scoring::softmax(false));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = [0.0f32, 3.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((r[0].1 - 3f32.exp() / total).abs() < 1e-6);
        let r = route(&[0.0, 3.0, 1.0, 2.0], 2, &Scoring::softmax(true));
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
    }

    /// The float64 definition of a sigmoid router (GLM-4.5 / DeepSeek-V3's `TopkRouter`).
    fn naive_sigmoid(l: &[f32], bias: &[f32], k: usize, groups: usize, keep: usize, scale: f64) -> Vec<(usize, f64)> {
        let p: Vec<f64> = l.iter().map(|&x| 1.0 / (1.0 + (-x as f64).exp())).collect();
        let mut c: Vec<f64> = p.iter().zip(bias).map(|(p, &b)| p + b as f64).collect();
        let per = l.len() / groups;
        let mut gs: Vec<(f64, usize)> = (0..groups)
            .map(|g| {
                let mut v = c[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (v[0] + v[1], g)
            })
            .collect();
        gs.sort_by(|a, b| b.0.total_cmp(&a.0));
        for &(_, g) in &gs[keep..] {
            c[g * per..(g + 1) * per].iter_mut().for_each(|v| *v = f64::NEG_INFINITY);
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| c[b].total_cmp(&c[a]));
        idx.truncate(k);
        let sum: f64 = idx.iter().map(|&e| p[e]).sum();
        idx.iter().map(|&e| (e, p[e] / sum * scale)).collect()
    }

    #[test]
    fn sigmoid_routing_chooses_by_the_biased_score_and_weighs_by_the_plain_one() {
        let l = crate::testutil::uniform(32, 7).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        let bias = crate::testutil::uniform(32, 8).iter().map(|v| v * 0.5).collect::<Vec<_>>();
        for (groups, keep, k) in [(1, 1, 4), (4, 2, 3), (8, 3, 6)] {
            let spec = RouterSpec {
                sigmoid: true,
                correction_bias: true,
                renormalize: true,
                scale: 2.5,
                n_group: groups,
                topk_group: keep,
                ..RouterSpec::softmax(true)
            };
            let got = route(&l, k, &Scoring { spec, bias: Some(bias.clone()), logit_bias: None });
            let want = naive_sigmoid(&l, &bias, k, groups, keep, 2.5);
            assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want.iter().map(|x| x.0).collect::<Vec<_>>());
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 as f64 - w.1).abs() < 1e-6, "{groups} groups: {got:?} vs {want:?}");
            }
        }
        // the bias changes the choice, never the weights of what is chosen
        let spec = RouterSpec { sigmoid: true, correction_bias: true, ..RouterSpec::softmax(false) };
        let r = route(&[2.0, 1.0, 0.0], 1, &Scoring { spec, bias: Some(vec![0.0, 0.0, 5.0]), logit_bias: None });
        assert_eq!(r[0].0, 2);
        assert!((r[0].1 - 0.5).abs() < 1e-6);
    }
}
