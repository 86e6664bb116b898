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

/// Expert routing statistics (recorded only while enabled, by `bench`).
#[derive(Default)]
pub struct RoutingStats {
    /// counts[layer][expert]: tokens routed there.
    pub counts: Vec<Vec<u64>>,
    last: Vec<Vec<usize>>,
    /// Of each token's experts, how many the previous token of the same layer also used.
    pub reused: u64,
    pub routed: u64,
}

static ROUTING_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ROUTING: std::sync::Mutex<Option<RoutingStats>> = std::sync::Mutex::new(None);

/// Starts (or restarts) recording routing decisions.
pub fn routing_start() {
    *ROUTING.lock().unwrap_or_else(|p| p.into_inner()) = Some(RoutingStats::default());
    ROUTING_ON.store(true, Relaxed);
}

/// Stops recording and returns what was recorded.
pub fn routing_take() -> RoutingStats {
    ROUTING_ON.store(false, Relaxed);
    ROUTING.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default()
}

/// Records one token's experts in `layer` (a no-op unless recording).
pub fn record_routing(layer: usize, num_experts: usize, experts: &[usize]) {
    if !ROUTING_ON.load(Relaxed) {
        return;
    }
    let mut g = ROUTING.lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = g.as_mut() else { return };
    if s.counts.len() <= layer {
        s.counts.resize(layer + 1, vec![]);
        s.last.resize(layer + 1, vec![]);
    }
    if s.counts[layer].len() < num_experts {
        s.counts[layer].resize(num_experts, 0);
    }
    for &e in experts {
        s.counts[layer][e] += 1;
    }
    s.reused += experts.iter().filter(|e| s.last[layer].contains(e)).count() as u64;
    s.routed += experts.len() as u64;
    s.last[layer].clear();
    s.last[layer].extend_from_slice(experts);
}

impl RoutingStats {
    /// Mean over layers of the share of routings that went to the most popular `frac` of experts.
    pub fn top_share(&self, frac: f64) -> f64 {
        let layers: Vec<&Vec<u64>> = self.counts.iter().filter(|c| c.iter().sum::<u64>() > 0).collect();
        if layers.is_empty() {
            return 0.0;
        }
        let mut sum = 0.0;
        for c in &layers {
            let mut v = (*c).clone();
            v.sort_unstable_by(|a, b| b.cmp(a));
            let k = ((v.len() as f64 * frac).ceil() as usize).max(1);
            sum += v[..k].iter().sum::<u64>() as f64 / v.iter().sum::<u64>() as f64;
        }
        sum / layers.len() as f64
    }

    /// Fraction of a token's experts already used by the previous token (same layer).
    pub fn reuse(&self) -> f64 {
        if self.routed == 0 { 0.0 } else { self.reused as f64 / self.routed as f64 }
    }
}
