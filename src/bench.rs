//! `flashmoe bench`: prefill and decode speed, time per phase, bytes read per token, cache
//! behaviour and memory, on any model (synthetic full-size ones included).

use crate::layers::attention::KvType;
use crate::layers::moe::Experts;
use crate::model::{FfnWeights, Model};
use crate::profile::{PROFILE, routing_start, routing_take};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Prefill on a pool of this many threads instead of the caller's.
    pub prefill_threads: Option<usize>,
    /// Evict the model's files from the page cache first.
    pub cold: bool,
    pub seed: u64,
    /// Draw the phases on stderr when it is a terminal (`crate::progress`).
    pub progress: bool,
}

/// Everything `bench --json` prints. Key names are relied on by outside checks.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// With `--cold`: the share of the expert files still in the page cache after dropping
    /// them (mapped or locked by another process); above a few percent the run is not cold.
    pub cold_resident_fraction: Option<f64>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Bytes of the routed experts that were not in memory when a token asked for them (its
    /// misses × the expert size): what the routing waited for.
    pub bytes_read_per_token: f64,
    /// Prefill: expert bytes the I/O threads read per prompt token (the chunks' expert unions
    /// over the prompt length), and the disk throughput that made.
    pub prefill_bytes_read_per_token: f64,
    pub prefill_disk_gb_s: f64,
    /// Bytes the store's I/O threads read per decode token, counted as each read completes:
    /// demand reads and prefetches, mispredicted prefetches included. This is the disk traffic
    /// (an expert that was prefetched in time counts as a hit, but its read counts here).
    pub bytes_fetched_per_token: f64,
    pub reads_per_token: f64,
    /// `bytes_fetched_per_token` × decode tok/s: the disk's achieved throughput.
    pub disk_gb_s: f64,
    /// Share of expert fetches served from memory (own cache, prefetched reads that completed
    /// in time included, or page cache in os mode).
    pub cache_hit_rate: f64,
    pub peak_rss_bytes: u64,
    /// Weight bytes one decode token touches: resident weights used plus its routed experts.
    pub weight_bytes_per_token: f64,
    pub resident_weight_bytes: u64,
    /// Milliseconds per decode token, by phase.
    pub phases_ms: BTreeMap<String, f64>,
    pub prefill_phases_ms: BTreeMap<String, f64>,
    /// Decode: parallel steps per token on the thread team, and the weight bytes per second
    /// that single-token products read while they ran (their own roofline fraction).
    pub team_steps_per_token: f64,
    pub products_gb_s: f64,
    /// Mean share of routings that go to the most popular 10% of a layer's experts (decode).
    pub top10pct_expert_share: f64,
    /// Share of a token's experts the previous token also used (same layer).
    pub expert_reuse: f64,
    /// Per MoE layer: popularity (top-10% share, entropy), reuse from the previous token, and
    /// the share of the experts each prompt chunk needed (prefill).
    pub prefill_routing: crate::profile::RoutingSummary,
    pub decode_routing: crate::profile::RoutingSummary,
    /// Share of prefetched (predicted) experts that were then routed to (with --prefetch).
    pub prefetch_accuracy: f64,
    pub cache_mode: String,
    pub experts_per_token: usize,
    /// Decode's threads, and prefill's (the same unless `--prefill-threads`).
    pub threads: usize,
    pub prefill_threads: usize,
    /// Where the model ran (`cpu`, or the accelerator in words).
    pub device: String,
    /// The KV cache type (`f32`, `bf16`, `f16`; a GPU's is f32), and the cache bytes a decode
    /// token reads at the end of the run: attention's keys and values in its window, MLA's
    /// latents and indexer keys (DeltaNet's fixed-size state is not counted).
    pub kv_cache: String,
    pub kv_bytes_per_token: f64,
}

/// Peak resident set size of this process (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn phases(model: &Model, tokens: usize, store_before: &crate::flash::StoreStats) -> BTreeMap<String, f64> {
    let p = PROFILE.snapshot();
    let ms = |ns: u64| ns as f64 / 1e6 / tokens.max(1) as f64;
    let (wait, compute) = match &model.store {
        Some(s) => {
            let st = s.stats();
            (st.io_wait_ns - store_before.io_wait_ns, st.compute_ns - store_before.compute_ns)
        }
        None => (0, p.experts),
    };
    let mut m = BTreeMap::new();
    m.insert("attention_deltanet".into(), ms(p.mixer));
    m.insert("routing".into(), ms(p.route));
    m.insert("shared_expert".into(), ms(p.shared_expert));
    m.insert("expert_io_wait".into(), ms(wait));
    m.insert("expert_compute".into(), ms(compute));
    m.insert("expert_other".into(), ms(p.experts.saturating_sub(wait + compute)));
    m.insert("dense_mlp".into(), ms(p.dense));
    m.insert("lm_head".into(), ms(p.lm_head));
    let known = p.mixer + p.route + p.shared_expert + p.experts + p.dense + p.lm_head;
    m.insert("other".into(), ms(p.total.saturating_sub(known)));
    m.insert("total".into(), ms(p.total));
    // how decode spends its time on the thread team (not phases: they overlap the ones above)
    m.insert("team_steps".into(), ms(p.step));
    m.insert("team_step_tails".into(), ms(p.step_tail));
    m.insert("single_token_products".into(), ms(p.products));
    m
}

/// Bytes of weights one decode token reads: every resident matrix but the embedding table
/// (one row of it), plus `k` routed experts per MoE layer.
pub fn weight_bytes_per_token(model: &Model, k: usize) -> f64 {
    let c = &model.cfg;
    let embed_row = model.embed.bytes() as f64 / c.vocab_size as f64;
    let tied = model.lm_head.is_none();
    let mut b = model.weight_bytes() as f64 - if tied { 0.0 } else { model.embed.bytes() as f64 - embed_row };
    for l in &model.layers {
        if let FfnWeights::Moe(m) = &l.ffn {
            match &m.experts {
                Experts::Memory(v) => {
                    let all: usize = v.iter().map(|e| e.bytes()).sum();
                    b -= all as f64;
                    b += k as f64 * all as f64 / v.len() as f64;
                }
                Experts::Flash { store, .. } => b += (k * store.expert_bytes()) as f64,
            }
        }
    }
    b
}

/// Bytes of KV cache one decode token reads after `pos` tokens with caches of type `kv`:
/// every attention layer's keys and values in its window, MLA's latent rows (f32) and indexer
/// keys.
pub fn kv_bytes_per_token(model: &Model, pos: usize, kv: KvType) -> f64 {
    let mut b = 0;
    for l in &model.layers {
        let (kind, lens) = l.state_shape(pos, kv);
        let n: usize = lens.iter().sum();
        b += match kind {
            "delta" => 0,
            k if crate::model::kv_kind_type(k).is_some() => n * kv.bytes(),
            _ => n * 4,
        };
    }
    b as f64
}

/// Runs the benchmark: a random prompt prefilled at once, then `gen_tokens` greedy decode steps.
pub fn run(model: &Model, opts: &BenchOptions) -> Result<BenchResult> {
    // a cold run that is not cold says so: the share of the expert files still in memory
    let mut cold_resident = None;
    let spinner =
        |msg: String| if opts.progress { crate::progress::spinner(msg) } else { indicatif::ProgressBar::hidden() };
    if opts.cold
        && let Some(s) = &model.store
    {
        let pb = spinner("dropping the expert files from the page cache".into());
        s.drop_page_cache();
        pb.finish_and_clear();
        let (res, total) = s.page_cache_residency()?;
        cold_resident = Some(res as f64 / total.max(1) as f64);
    }
    let v = model.vocab_size() as u64;
    let mut x = opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let prompt: Vec<u32> = (0..opts.prompt_tokens.max(1))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % v) as u32
        })
        .collect();
    let mut st = model.new_state();
    let stats = || model.store.as_ref().map(|s| s.stats()).unwrap_or_default();

    PROFILE.reset();
    routing_start();
    let s0 = stats();
    let pb = spinner(format!("prefill of {} tokens", prompt.len()));
    let t = Instant::now();
    let logits = match opts.prefill_threads {
        Some(n) if n != rayon::current_num_threads() => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()?
            .install(|| model.forward(&mut st, &prompt, false))?,
        _ => model.forward(&mut st, &prompt, false)?,
    };
    let prefill_s = t.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let prefill_phases = phases(model, prompt.len(), &s0);
    let prefill_read = stats().bytes_read - s0.bytes_read;
    let prefill_routing = routing_take().summary();

    PROFILE.reset();
    crate::par::take_step_profile();
    routing_start();
    let s1 = stats();
    let t = Instant::now();
    // greedy, no stop token: `gen_tokens` forward passes (the shared decode loop samples one
    // token more than it feeds back)
    let pos0 = st.pos;
    let pb = if opts.progress {
        crate::progress::bar(opts.gen_tokens as u64, "decode", "tokens")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut greedy = crate::generate::Sampler::new(Default::default());
    crate::generate::decode(model, &mut st, logits, prompt.clone(), opts.gen_tokens + 1, &mut greedy, &[], |_, _| {
        if pb.position() < opts.gen_tokens as u64 {
            pb.inc(1); // the last sampled token is not fed back: gen_tokens forward passes
        }
        true
    })?;
    let made = st.pos - pos0;
    let decode_s = t.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let routing = routing_take();
    let s2 = stats();
    let decode_phases = phases(model, made, &s1);
    let prof = PROFILE.snapshot();
    for line in crate::par::take_step_profile() {
        eprintln!("step profile (decode, {made} tokens): {line}");
    }
    let per = |x: u64| x as f64 / made.max(1) as f64;
    let (hits, misses) = (s2.hits - s1.hits, s2.misses - s1.misses);
    // from disk: every own-cache miss (direct), every read not fully in the page cache (os)
    let bytes = misses * model.store.as_ref().map_or(0, |s| s.expert_bytes() as u64);
    let fetched = s2.bytes_read - s1.bytes_read;
    let k = model.opts.experts_per_token.unwrap_or(model.cfg.num_experts_per_tok);
    let kv = if model.accel.is_some() { KvType::F32 } else { model.opts.kv_cache };
    Ok(BenchResult {
        cold_resident_fraction: cold_resident,
        prompt_tokens: prompt.len(),
        gen_tokens: made,
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: made as f64 / decode_s.max(1e-12),
        prefill_s,
        decode_s,
        bytes_read_per_token: per(bytes),
        prefill_bytes_read_per_token: prefill_read as f64 / prompt.len().max(1) as f64,
        prefill_disk_gb_s: prefill_read as f64 / 1e9 / prefill_s.max(1e-12),
        bytes_fetched_per_token: per(fetched),
        reads_per_token: per(s2.reads - s1.reads),
        disk_gb_s: fetched as f64 / 1e9 / decode_s.max(1e-12),
        cache_hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes_per_token: weight_bytes_per_token(model, k),
        resident_weight_bytes: model.weight_bytes() as u64,
        phases_ms: decode_phases,
        prefill_phases_ms: prefill_phases,
        team_steps_per_token: per(prof.steps),
        products_gb_s: prof.product_bytes as f64 / prof.products.max(1) as f64,
        top10pct_expert_share: routing.top_share(0.10),
        expert_reuse: routing.reuse(),
        prefill_routing,
        decode_routing: routing.summary(),
        prefetch_accuracy: if s2.prefetched > s1.prefetched {
            (s2.prefetch_used - s1.prefetch_used) as f64 / (s2.prefetched - s1.prefetched) as f64
        } else {
            0.0
        },
        cache_mode: model.store.as_ref().map_or("memory".into(), |s| format!("{:?}", s.mode).to_lowercase()),
        experts_per_token: k,
        threads: rayon::current_num_threads(),
        prefill_threads: opts.prefill_threads.unwrap_or_else(rayon::current_num_threads),
        device: model.accel.as_ref().map_or("cpu".into(), |a| a.name()),
        kv_cache: kv.name().into(),
        kv_bytes_per_token: kv_bytes_per_token(model, st.pos, kv),
    })
}
