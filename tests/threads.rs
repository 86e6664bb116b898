//! Many threads: every model path on an oversubscribed pool (32 workers, whatever the cores)
//! gives the logits of a one-thread run, bit for bit. Work stealing re-enters code on a
//! waiting worker, so per-thread state held across a parallel loop shows up here as a panic or
//! a wrong value. The parallel threshold is set to 0, so the tiny fixtures take every parallel
//! path that full-size models take; no reduction depends on how work is split.

mod common;

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::synth::{Routing, SynthOptions, synth};
use flashmoe::flash::{CacheMode, StoreOptions};
use flashmoe::layers::attention::KvType;
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::model::Model;
use flashmoe::tensor::{Precision, WKind};
use std::path::PathBuf;

/// Worker threads of the many-thread runs (`FLASHMOE_TEST_THREADS`, default 32).
fn many() -> usize {
    std::env::var("FLASHMOE_TEST_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

fn fixture(name: &str) -> PathBuf {
    common::fixture_dir(name)
}

fn q4() -> ConvertOptions {
    ConvertOptions { experts: WKind::Q { bits: 4, group: 64 }, dense: WKind::BF16, force: false, progress: false }
}

fn on_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

/// Prefill logits of every position, then the logits of `decode` steps fed one at a time.
fn run(m: &Model, prompt: &[u32], decode: usize) -> Vec<Vec<f32>> {
    let mut st = m.new_state();
    let mut out = vec![m.forward(&mut st, prompt, true).unwrap()];
    for t in 0..decode {
        out.push(m.forward(&mut st, &[(7 + 13 * t as u32) % m.vocab_size() as u32], false).unwrap());
    }
    out
}

fn prompt(m: &Model, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % m.vocab_size() as u32).collect()
}

/// One thread and `many()` threads agree exactly, for both precisions with an f32 KV cache
/// and for the CLI's default (fast, bf16 cache).
fn check(label: &str, m: &mut Model, n: usize, decode: usize) {
    flashmoe::tensor::set_parallel_threshold(0);
    let p = prompt(m, n);
    for (precision, kv) in
        [(Precision::Exact, KvType::F32), (Precision::Fast, KvType::F32), (Precision::Fast, KvType::Bf16)]
    {
        m.opts.precision = precision;
        m.opts.kv_cache = kv;
        let one = on_threads(1, || run(m, &p, decode));
        let lots = on_threads(many(), || run(m, &p, decode));
        assert!(one.iter().flatten().all(|v| v.is_finite()), "{label}: non-finite logits");
        assert_eq!(one, lots, "{label} {precision:?} {kv} cache: {} threads differ from one", many());
    }
}

#[test]
fn checkpoints_of_every_family_on_many_threads() {
    for name in common::fixtures() {
        let mut m = load_model_with(&fixture(name), &LoadOptions::default()).unwrap();
        check(name, &mut m, 9, 3);
    }
}

#[test]
fn streamed_experts_on_many_threads_in_every_cache_mode() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen35_text", "qwen3_next", "qwen3_moe"] {
        let out = tmp.path().join(name);
        convert(&fixture(name), &out, &q4()).unwrap();
        for (mode, cache_bytes, prefetch) in [(CacheMode::Os, 1, true), (CacheMode::Direct, 1 << 20, true)] {
            let lo = LoadOptions {
                store: StoreOptions { mode, cache_bytes, io_threads: 3, max_batch: 2, prefetch },
                ..Default::default()
            };
            let mut m = load_model_with(&out, &lo).unwrap();
            check(&format!("{name} {mode:?}"), &mut m, 9, 4);
        }
    }
}

/// Sequences decoded at once from threads sharing one model and one expert store, each on the
/// oversubscribed pool, equal the same sequences run alone.
#[test]
fn concurrent_sequences_share_one_store() {
    flashmoe::tensor::set_parallel_threshold(0);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    convert(&fixture("qwen3_next"), &out, &q4()).unwrap();
    for mode in [CacheMode::Os, CacheMode::Direct] {
        // a cache smaller than one layer's experts: the callers contend for slots
        let lo = LoadOptions {
            store: StoreOptions { mode, cache_bytes: 1, io_threads: 2, max_batch: 2, prefetch: true },
            ..Default::default()
        };
        let m = load_model_with(&out, &lo).unwrap();
        let prompts: Vec<Vec<u32>> = (0..4).map(|s| prompt(&m, 5 + 3 * s)).collect();
        let alone: Vec<_> = prompts.iter().map(|p| on_threads(1, || run(&m, p, 6))).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(many()).build().unwrap();
        // several rounds: a store that waited for slots another caller pinned deadlocked here
        // now and then (rayon ran one caller on top of the other on one thread)
        for round in 0..8 {
            let together: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = prompts.iter().map(|p| s.spawn(|| pool.install(|| run(&m, p, 6)))).collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(alone, together, "{mode:?} round {round}: concurrent sequences differ from sequential ones");
        }
    }
}

/// A synthetic model of the Qwen3-Next-80B shape (four layers: DeltaNet and attention, 512
/// experts, real widths): products big enough to split by the default rules as well.
#[test]
fn synthetic_80b_shape_on_many_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("80b");
    let so = SynthOptions {
        experts: WKind::Q { bits: 4, group: 64 },
        dense: WKind::BF16,
        routing: Routing::Skewed,
        layers: Some(4),
        seed: 1,
        force: false,
        progress: false,
    };
    synth("qwen3-next-80b-a3b", &out, &so).unwrap();
    for mode in [CacheMode::Os, CacheMode::Direct] {
        let lo = LoadOptions {
            store: StoreOptions {
                mode,
                cache_bytes: 64 << 20,
                prefetch: mode == CacheMode::Direct,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut m = load_model_with(&out, &lo).unwrap();
        check(&format!("80b {mode:?}"), &mut m, 24, 3);
    }
}
