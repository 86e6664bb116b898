//! A decode step of several sequences at once (`Model::forward_batch`) gives every sequence
//! exactly the logits it gets alone (`Model::forward`, one token), bit for bit, in both
//! precisions and with f32, bf16 and f16 KV caches, on every fixture family, with the sequences at different positions (prompts of
//! different lengths, some decoded further), on one thread and on an oversubscribed pool; with
//! experts streamed from a converted model too, where a routed expert two sequences chose is
//! read once. Each step's products (attention's projections, the router, every expert over the
//! rows that chose it, lm_head) run over all its rows at once, each weight row read once.

mod common;

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::{CacheMode, StoreOptions};
use flashmoe::layers::attention::KvType;
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::model::{Model, State};
use flashmoe::tensor::{Precision, WKind};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    common::fixture_dir(name)
}

fn many() -> usize {
    std::env::var("FLASHMOE_TEST_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

fn on_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

fn prompt(m: &Model, n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_add(salt * 977).wrapping_mul(2654435761) >> 7) % m.vocab_size() as u32).collect()
}

/// The token sequence `s` feeds at decode step `t`.
fn next(m: &Model, s: usize, t: usize) -> u32 {
    ((7 + 13 * t + 31 * s) % m.vocab_size()) as u32
}

/// Sequences of prompt lengths `lens`, the first `lead[s]` decode steps of each fed alone, then
/// `steps` steps of all of them: per sequence, the logits of every step after its prompt.
fn run(m: &Model, lens: &[usize], lead: &[usize], steps: usize, batched: bool) -> Vec<Vec<Vec<f32>>> {
    let mut states: Vec<State> = lens
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let mut st = m.new_state();
            m.forward(&mut st, &prompt(m, n, s as u32), false).unwrap();
            st
        })
        .collect();
    let mut out: Vec<Vec<Vec<f32>>> = vec![vec![]; lens.len()];
    let mut fed = vec![0usize; lens.len()];
    for (s, st) in states.iter_mut().enumerate() {
        for _ in 0..lead[s] {
            out[s].push(m.forward(st, &[next(m, s, fed[s])], false).unwrap());
            fed[s] += 1;
        }
    }
    for _ in 0..steps {
        let toks: Vec<u32> = (0..lens.len()).map(|s| next(m, s, fed[s])).collect();
        if batched {
            let mut refs: Vec<&mut State> = states.iter_mut().collect();
            let rows = m.forward_batch(&mut refs, &toks).unwrap();
            for (s, row) in rows.chunks(m.vocab_size()).enumerate() {
                out[s].push(row.to_vec());
            }
        } else {
            for (s, st) in states.iter_mut().enumerate() {
                out[s].push(m.forward(st, &[toks[s]], false).unwrap());
            }
        }
        fed.iter_mut().for_each(|f| *f += 1);
    }
    for (s, st) in states.iter().enumerate() {
        assert_eq!(st.pos, lens[s] + lead[s] + steps);
    }
    out
}

/// Each precision with an f32 cache, and the CLI's default (fast, bf16) and f16 too.
const ALL: &[(Precision, KvType)] = &[
    (Precision::Exact, KvType::F32),
    (Precision::Fast, KvType::F32),
    (Precision::Fast, KvType::Bf16),
    (Precision::Exact, KvType::F16),
];

fn check(label: &str, m: &mut Model, runs: &[(Precision, KvType)]) {
    // six sequences: more than the four vectors a multi-vector kernel takes at once
    let (lens, lead) = ([3usize, 9, 1, 6, 2, 4], [0usize, 2, 5, 1, 3, 0]);
    for &(precision, kv) in runs {
        m.opts.precision = precision;
        m.opts.kv_cache = kv;
        let alone = on_threads(1, || run(m, &lens, &lead, 4, false));
        assert!(alone.iter().flatten().flatten().all(|v| v.is_finite()), "{label}: non-finite logits");
        for threads in [1, many()] {
            let together = on_threads(threads, || run(m, &lens, &lead, 4, true));
            assert!(
                alone == together,
                "{label} {precision:?} {kv} cache on {threads} threads: a batched step differs from one alone"
            );
        }
    }
}

#[test]
fn a_batch_step_equals_each_sequence_alone_on_every_family() {
    flashmoe::tensor::set_parallel_threshold(0);
    for name in common::fixtures() {
        let mut m = load_model_with(&fixture(name), &LoadOptions::default()).unwrap();
        check(name, &mut m, ALL);
    }
}

#[test]
fn a_batch_step_equals_each_sequence_alone_with_streamed_experts() {
    flashmoe::tensor::set_parallel_threshold(0);
    let tmp = tempfile::tempdir().unwrap();
    let opts =
        ConvertOptions { experts: WKind::Q { bits: 4, group: 64 }, dense: WKind::BF16, force: false, progress: false };
    for name in ["qwen3_moe", "qwen3_next", "gpt_oss", "deepseek_v32"] {
        let out = tmp.path().join(name);
        convert(&fixture(name), &out, &opts).unwrap();
        for (mode, cache_bytes) in [(CacheMode::Os, 1), (CacheMode::Direct, 1 << 20), (CacheMode::Direct, 1)] {
            let lo = LoadOptions {
                store: StoreOptions { mode, cache_bytes, io_threads: 3, max_batch: 2, prefetch: true },
                ..Default::default()
            };
            let mut m = load_model_with(&out, &lo).unwrap();
            check(&format!("{name} {mode:?} {cache_bytes}"), &mut m, &[ALL[0], ALL[2]]);
        }
    }
}

/// A sequence that cannot take its token leaves the batch with an error; the others go on
/// with the logits they would get alone, and only the failing state is touched.
#[test]
fn a_failing_sequence_leaves_the_others_alone() {
    let m = load_model_with(&fixture("qwen3_moe"), &LoadOptions::default()).unwrap();
    let mut a = m.new_state();
    let mut b = m.new_state();
    let mut c = m.new_state();
    for (s, st) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        m.forward(st, &prompt(&m, 4 + s, s as u32), false).unwrap();
    }
    let (mut a1, mut c1) = (a.clone(), c.clone());
    let want_a = m.forward(&mut a1, &[5], false).unwrap();
    let want_c = m.forward(&mut c1, &[6], false).unwrap();
    let bad = m.vocab_size() as u32;
    let res = m.forward_batch_each(&mut [&mut a, &mut b, &mut c], &[5, bad, 6]);
    assert_eq!(res[0].as_ref().unwrap(), &want_a);
    assert!(res[1].as_ref().unwrap_err().to_string().contains("out of range"));
    assert_eq!(res[2].as_ref().unwrap(), &want_c);
    assert!(!b.poisoned && b.pos == 5, "a rejected token leaves its state as it was");
    assert!(m.forward_batch(&mut [&mut a, &mut b], &[1, bad]).is_err());
}
