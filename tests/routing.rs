//! `synth --routing`: a small synthetic model of each mode, run by `bench` over a random-token
//! prompt and a greedy continuation, lands within stated bands of its target statistics
//! (measured by the engine's own routing counters), at two expert counts. Its own test binary:
//! the routing counters are process-wide.

use flashmoe::bench::{BenchOptions, run};
use flashmoe::flash::synth::{REALISTIC_TOP10, Routing, SynthOptions, synth_config};
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::profile::RoutingSummary;
use flashmoe::tensor::WKind;
use serde_json::json;

/// The built-in model over its held-out text (`flashmoe eval --text models/default/valid.txt`):
/// the popularity's exp(entropy)/experts, and reuse over the uniform router's k/experts.
const BUILTIN_EFFECTIVE_SHARE: f64 = 0.562;
const BUILTIN_REUSE_RATIO: f64 = 2.54;

fn config(experts: usize, k: usize) -> serde_json::Value {
    json!({
        "model_type": "qwen3_moe", "vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": experts,
        "num_experts_per_tok": k, "moe_intermediate_size": 32, "intermediate_size": 256,
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    })
}

/// Prefill's and decode's routing of a synthetic model of this shape and mode.
fn measure(experts: usize, k: usize, routing: Routing) -> (RoutingSummary, RoutingSummary) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let so = SynthOptions {
        experts: WKind::Q { bits: 4, group: 32 },
        dense: WKind::BF16,
        routing,
        layers: None,
        seed: 3,
        force: false,
        progress: false,
    };
    synth_config(config(experts, k), "routing-test", &out, &so).unwrap();
    let m = load_model_with(&out, &LoadOptions::default()).unwrap();
    let opts = BenchOptions {
        prompt_tokens: 1024,
        gen_tokens: 96,
        prefill_threads: None,
        cold: false,
        seed: 5,
        progress: false,
    };
    let r = run(&m, &opts).unwrap();
    (r.prefill_routing, r.decode_routing)
}

fn within(what: &str, x: f64, lo: f64, hi: f64) {
    assert!((lo..=hi).contains(&x), "{what} = {x:.4}, outside [{lo:.4}, {hi:.4}]");
}

#[test]
fn each_routing_mode_lands_in_its_bands_at_two_expert_counts() {
    for (e, k) in [(64, 4), (256, 8)] {
        let uniform_k = k as f64 / e as f64;
        let mut top10 = vec![];
        for mode in [Routing::Uniform, Routing::Realistic, Routing::Skewed] {
            let (pre, dec) = measure(e, k, mode);
            let tag = format!("{mode:?} {e} experts top-{k}");
            eprintln!(
                "{tag}: prefill top10 {:.3} effective {:.3} reuse {:.4} (independent {:.4}) chunk {:.3}; decode top10 {:.3} reuse {:.4}",
                pre.top10_share,
                pre.effective_share,
                pre.reuse,
                pre.independent_reuse,
                pre.chunk_distinct_share,
                dec.top10_share,
                dec.reuse
            );
            assert_eq!(pre.layers.len(), 2, "{tag}: both MoE layers recorded");
            // one 1024-token chunk per layer (bench prefills in chunks of 2048)
            assert!(pre.layers.iter().all(|l| l.chunk_tokens == 1024.0 && l.routings == 1024 * k as u64), "{tag}");
            // the prompt and the continuation: random tokens carry no context, so reuse is what
            // popularity gives
            within(
                &format!("{tag}: prefill reuse over its independent value"),
                pre.reuse / pre.independent_reuse,
                0.8,
                1.25,
            );
            match mode {
                Routing::Uniform => {
                    // 16–64 routings per expert: the sampling noise lifts the empirical top 10% a little
                    within(&format!("{tag}: top10"), pre.top10_share, 0.09, 0.16);
                    within(&format!("{tag}: effective share"), pre.effective_share, 0.93, 1.0);
                    within(&format!("{tag}: reuse / (k/E)"), pre.reuse / uniform_k, 0.75, 1.3);
                }
                Routing::Realistic => {
                    within(&format!("{tag}: top10"), pre.top10_share, REALISTIC_TOP10 - 0.04, REALISTIC_TOP10 + 0.05);
                    within(
                        &format!("{tag}: effective share"),
                        pre.effective_share,
                        BUILTIN_EFFECTIVE_SHARE - 0.07,
                        BUILTIN_EFFECTIVE_SHARE + 0.07,
                    );
                    within(
                        &format!("{tag}: reuse / (k/E)"),
                        pre.reuse / uniform_k,
                        0.7 * BUILTIN_REUSE_RATIO,
                        1.15 * BUILTIN_REUSE_RATIO,
                    );
                    within(
                        &format!("{tag}: decode top10"),
                        dec.top10_share,
                        REALISTIC_TOP10 - 0.08,
                        REALISTIC_TOP10 + 0.15,
                    );
                    within(
                        &format!("{tag}: decode reuse / (k/E)"),
                        dec.reuse / uniform_k,
                        0.5 * BUILTIN_REUSE_RATIO,
                        1.5 * BUILTIN_REUSE_RATIO,
                    );
                }
                Routing::Skewed => {
                    // −α·ln(1 + rank) is not scale-free: its head grows with the expert count
                    // (0.42 at 64 experts, about half at 128–512)
                    within(&format!("{tag}: top10"), pre.top10_share, 0.40, 1.0);
                }
            }
            top10.push(pre.top10_share);
        }
        assert!(top10[0] + 0.15 < top10[1] && top10[1] + 0.05 < top10[2], "{e} experts: {top10:?} not in order");
    }
}
