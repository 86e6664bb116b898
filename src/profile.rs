//! Process-wide time counters of the forward pass phases, read by `bench`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Nanoseconds spent per phase since the last [`Profile::reset`].
#[derive(Default)]
pub struct Profile {
    /// Attention and DeltaNet (projections included).
    pub mixer: AtomicU64,
    /// Router product and top-k.
    pub route: AtomicU64,
    pub shared_expert: AtomicU64,
    /// Routed experts: reading (or waiting for) their bytes and computing them.
    pub experts: AtomicU64,
    /// Dense feed-forward layers.
    pub dense: AtomicU64,
    pub lm_head: AtomicU64,
    /// Whole forward calls.
    pub total: AtomicU64,
    /// Decode team steps (`par`): how many, the leader's time inside them, and the part of it
    /// spent waiting for other members once no item was left to claim (the step's tail).
    pub steps: AtomicU64,
    pub step: AtomicU64,
    pub step_tail: AtomicU64,
    /// Single-token products (`tensor::products`): time and weight bytes read.
    pub products: AtomicU64,
    pub product_bytes: AtomicU64,
}

pub static PROFILE: Profile = Profile {
    mixer: AtomicU64::new(0),
    route: AtomicU64::new(0),
    shared_expert: AtomicU64::new(0),
    experts: AtomicU64::new(0),
    dense: AtomicU64::new(0),
    lm_head: AtomicU64::new(0),
    total: AtomicU64::new(0),
    steps: AtomicU64::new(0),
    step: AtomicU64::new(0),
    step_tail: AtomicU64::new(0),
    products: AtomicU64::new(0),
    product_bytes: AtomicU64::new(0),
};

/// A snapshot in nanoseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileSnapshot {
    pub mixer: u64,
    pub route: u64,
    pub shared_expert: u64,
    pub experts: u64,
    pub dense: u64,
    pub lm_head: u64,
    pub total: u64,
    pub steps: u64,
    pub step: u64,
    pub step_tail: u64,
    pub products: u64,
    pub product_bytes: u64,
}

impl Profile {
    pub fn reset(&self) {
        for a in [
            &self.mixer,
            &self.route,
            &self.shared_expert,
            &self.experts,
            &self.dense,
            &self.lm_head,
            &self.total,
            &self.steps,
            &self.step,
            &self.step_tail,
            &self.products,
            &self.product_bytes,
        ] {
            a.store(0, Relaxed);
        }
    }

    pub fn snapshot(&self) -> ProfileSnapshot {
        ProfileSnapshot {
            mixer: self.mixer.load(Relaxed),
            route: self.route.load(Relaxed),
            shared_expert: self.shared_expert.load(Relaxed),
            experts: self.experts.load(Relaxed),
            dense: self.dense.load(Relaxed),
            lm_head: self.lm_head.load(Relaxed),
            total: self.total.load(Relaxed),
            steps: self.steps.load(Relaxed),
            step: self.step.load(Relaxed),
            step_tail: self.step_tail.load(Relaxed),
            products: self.products.load(Relaxed),
            product_bytes: self.product_bytes.load(Relaxed),
        }
    }
}

/// Adds the time since `t` to `counter`.
#[inline]
pub fn add_since(counter: &AtomicU64, t: Instant) {
    counter.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
}

/// Adds its lifetime to a counter when dropped (a phase with several exits).
pub struct Timed<'a>(pub &'a AtomicU64, pub Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        add_since(self.0, self.1);
    }
}

/// Expert routing statistics (recorded only while enabled, by `bench` and `eval`), per MoE
/// layer: how often each expert was chosen, how many of a token's experts the previous token
/// of the same layer also chose, and how many distinct experts each prompt chunk needed.
#[derive(Default)]
pub struct RoutingStats {
    /// counts[layer][expert]: tokens routed there.
    pub counts: Vec<Vec<u64>>,
    last: Vec<Vec<usize>>,
    /// Per layer: of each token's experts, how many the previous token also used; and all.
    pub reused: Vec<u64>,
    pub routed: Vec<u64>,
    /// Per layer: calls over several tokens of one sequence (prompt chunks), the sum of their
    /// distinct experts and of their tokens.
    pub chunks: Vec<u64>,
    pub chunk_distinct: Vec<u64>,
    pub chunk_tokens: Vec<u64>,
}

static ROUTING_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ROUTING: std::sync::Mutex<Option<RoutingStats>> = std::sync::Mutex::new(None);

/// Starts (or restarts) recording routing decisions.
pub fn routing_start() {
    *ROUTING.lock().unwrap_or_else(|p| p.into_inner()) = Some(RoutingStats::default());
    ROUTING_ON.store(true, Relaxed);
}

/// Pauses (`false`) or resumes recording without losing what was recorded (a reference
/// model's passes between the measured model's).
pub fn routing_record(on: bool) {
    ROUTING_ON.store(on, Relaxed);
}

/// Stops recording and returns what was recorded.
pub fn routing_take() -> RoutingStats {
    ROUTING_ON.store(false, Relaxed);
    ROUTING.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default()
}

fn with_layer(layer: usize, f: impl FnOnce(&mut RoutingStats)) {
    if !ROUTING_ON.load(Relaxed) {
        return;
    }
    let mut g = ROUTING.lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = g.as_mut() else { return };
    if s.counts.len() <= layer {
        let n = layer + 1;
        s.counts.resize(n, vec![]);
        s.last.resize(n, vec![]);
        for v in [&mut s.reused, &mut s.routed, &mut s.chunks, &mut s.chunk_distinct, &mut s.chunk_tokens] {
            v.resize(n, 0);
        }
    }
    f(s)
}

/// Records one token's experts in `layer` (a no-op unless recording).
pub fn record_routing(layer: usize, num_experts: usize, experts: &[usize]) {
    with_layer(layer, |s| {
        if s.counts[layer].len() < num_experts {
            s.counts[layer].resize(num_experts, 0);
        }
        for &e in experts {
            s.counts[layer][e] += 1;
        }
        s.reused[layer] += experts.iter().filter(|e| s.last[layer].contains(e)).count() as u64;
        s.routed[layer] += experts.len() as u64;
        s.last[layer].clear();
        s.last[layer].extend_from_slice(experts);
    })
}

/// Records that a chunk of `tokens` consecutive tokens of one sequence needed `distinct`
/// experts in `layer` (a no-op unless recording).
pub fn record_chunk(layer: usize, distinct: usize, tokens: usize) {
    with_layer(layer, |s| {
        s.chunks[layer] += 1;
        s.chunk_distinct[layer] += distinct as u64;
        s.chunk_tokens[layer] += tokens as u64;
    })
}

/// One MoE layer's routing, as [`RoutingStats::summary`] reports it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LayerRouting {
    pub layer: usize,
    pub experts: usize,
    /// Routings recorded (tokens × experts per token).
    pub routings: u64,
    /// Share of the routings that went to the most popular 10% of the experts.
    pub top10_share: f64,
    /// Entropy H of the experts' popularity over ln(experts): 1 is uniform.
    pub entropy: f64,
    /// exp(H) / experts: the share of the experts a uniform router would need for the same
    /// entropy (independent of the expert count for a popularity law of the expert's rank share).
    pub effective_share: f64,
    /// Share of a token's experts the previous token also chose.
    pub reuse: f64,
    /// The reuse that popularity alone gives (tokens choosing independently with these
    /// popularities): k·Σ(count/routings)². `reuse` above it is the tokens' own locality.
    pub independent_reuse: f64,
    /// Prompt chunks: their mean length, and the mean share of the experts each needed.
    pub chunk_tokens: f64,
    pub chunk_distinct_share: f64,
}

/// [`RoutingStats`] in numbers: each layer's and their means (over layers with routings).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoutingSummary {
    pub top10_share: f64,
    pub entropy: f64,
    pub effective_share: f64,
    pub reuse: f64,
    pub independent_reuse: f64,
    pub chunk_distinct_share: f64,
    pub layers: Vec<LayerRouting>,
}

/// Share of the total that the largest `frac · len` counts hold, the last one in part when
/// `frac · len` is fractional (so that 10% means the same at 32 experts as at 512).
fn top_share_of(c: &[u64], frac: f64) -> f64 {
    let mut v = c.to_vec();
    v.sort_unstable_by(|a, b| b.cmp(a));
    let x = (v.len() as f64 * frac).clamp(0.0, v.len() as f64);
    let whole = x.floor() as usize;
    let part = v.get(whole).map_or(0.0, |&c| (x - whole as f64) * c as f64);
    (v[..whole].iter().sum::<u64>() as f64 + part) / v.iter().sum::<u64>().max(1) as f64
}

/// Entropy of the counts' distribution over ln(len).
fn norm_entropy(c: &[u64]) -> f64 {
    let n = c.iter().sum::<u64>() as f64;
    if c.len() < 2 || n == 0.0 {
        return 0.0;
    }
    let h: f64 = c.iter().filter(|&&x| x > 0).map(|&x| -(x as f64 / n) * (x as f64 / n).ln()).sum();
    h / (c.len() as f64).ln()
}

impl RoutingStats {
    /// Mean over layers of the share of routings that went to the most popular `frac` of experts.
    pub fn top_share(&self, frac: f64) -> f64 {
        let layers: Vec<&Vec<u64>> = self.counts.iter().filter(|c| c.iter().sum::<u64>() > 0).collect();
        if layers.is_empty() {
            return 0.0;
        }
        layers.iter().map(|c| top_share_of(c, frac)).sum::<f64>() / layers.len() as f64
    }

    /// Fraction of a token's experts already used by the previous token (same layer).
    pub fn reuse(&self) -> f64 {
        let (r, n) = (self.reused.iter().sum::<u64>(), self.routed.iter().sum::<u64>());
        if n == 0 { 0.0 } else { r as f64 / n as f64 }
    }

    /// Every layer's statistics and their means.
    pub fn summary(&self) -> RoutingSummary {
        let layers: Vec<LayerRouting> = (0..self.counts.len())
            .filter(|&l| self.routed[l] > 0)
            .map(|l| {
                let c = &self.counts[l];
                let ch = self.chunks[l].max(1) as f64;
                let n = self.routed[l] as f64;
                let k = self.last[l].len().max(1) as f64; // experts per token
                let h = norm_entropy(c);
                LayerRouting {
                    layer: l,
                    experts: c.len(),
                    routings: self.routed[l],
                    top10_share: top_share_of(c, 0.10),
                    entropy: h,
                    effective_share: (h * (c.len().max(1) as f64).ln()).exp() / c.len().max(1) as f64,
                    reuse: self.reused[l] as f64 / n,
                    independent_reuse: k * c.iter().map(|&x| (x as f64 / n).powi(2)).sum::<f64>(),
                    chunk_tokens: self.chunk_tokens[l] as f64 / ch,
                    chunk_distinct_share: self.chunk_distinct[l] as f64 / ch / c.len().max(1) as f64,
                }
            })
            .collect();
        let n = layers.len().max(1) as f64;
        let mean = |f: fn(&LayerRouting) -> f64| layers.iter().map(f).sum::<f64>() / n;
        RoutingSummary {
            top10_share: mean(|l| l.top10_share),
            entropy: mean(|l| l.entropy),
            effective_share: mean(|l| l.effective_share),
            reuse: mean(|l| l.reuse),
            independent_reuse: mean(|l| l.independent_reuse),
            chunk_distinct_share: mean(|l| l.chunk_distinct_share),
            layers,
        }
    }
}
