//! The built-in model: its perplexity on the held-out plays equals the transformers reference
//! recorded at training time, the quality table of docs/QUALITY.md is reproduced, and the README's
//! main command prints Shakespeare-like text.

use flashmoe::eval::evaluate;
use flashmoe::layers::attention::KvType;
use flashmoe::load::load_model;
use flashmoe::tensor::WKind;
use flashmoe::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::Path;

fn dir() -> &'static Path {
    Path::new(flashmoe::builtin::SOURCE)
}

#[test]
fn perplexity_matches_transformers_and_the_quality_table() {
    let info: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("training.json")).unwrap()).unwrap();
    let want = info["reference_eval"]["perplexity"].as_f64().unwrap();
    let tok = TextTokenizer::load(dir()).unwrap();
    let ids = tok.encode(&std::fs::read_to_string(dir().join("valid.txt")).unwrap()).unwrap();
    assert_eq!(ids.len() - ids.len().div_ceil(512), info["reference_eval"]["tokens"].as_u64().unwrap() as usize);
    let mut m = load_model(dir()).unwrap();
    m.opts.precision = flashmoe::tensor::Precision::Exact;
    let r = evaluate(&m, None, &ids, 512).unwrap();
    assert!((r.perplexity / want - 1.0).abs() < 1e-4, "engine {} vs transformers {want}", r.perplexity);
    // a 16-bit KV cache (the CLI's default is bf16; docs/QUALITY.md) moves it by a few 1e-5
    // (measured: bf16 83.0688, f16 83.0640 against 83.0659)
    for (kv, tol) in [(KvType::Bf16, 2e-4), (KvType::F16, 1e-4)] {
        m.opts.kv_cache = kv;
        let r16 = evaluate(&m, None, &ids, 512).unwrap();
        eprintln!("{kv} KV cache: perplexity {} against {} (f32)", r16.perplexity, r.perplexity);
        assert!(
            (r16.perplexity / r.perplexity - 1.0).abs() < tol,
            "{kv} cache: {} vs {}",
            r16.perplexity,
            r.perplexity
        );
    }
    m.opts.kv_cache = KvType::F32;
    // the default prefill products (bf16 activations where the CPU has AVX-512 BF16) move it
    // by a few 1e-4 (measured: 83.0331 against the reference's 83.0659)
    m.opts.precision = flashmoe::tensor::Precision::Fast;
    let r = evaluate(&m, None, &ids, 512).unwrap();
    assert!((r.perplexity / want - 1.0).abs() < 1e-3, "bf16 prefill: engine {} vs transformers {want}", r.perplexity);
    // docs/QUALITY.md: q4 experts, K = 2 → perplexity 90.394 with exact products; the default
    // int8 activations (VNNI) shift it by a few hundredths (measured: 90.455)
    m.requantize_experts(WKind::Q { bits: 4, group: 64 }).unwrap();
    m.opts.experts_per_token = Some(2);
    m.opts.precision = flashmoe::tensor::Precision::Exact;
    let r = evaluate(&m, None, &ids, 512).unwrap();
    assert!((r.perplexity - 90.394).abs() < 0.05, "q4 K=2 perplexity {}", r.perplexity);
    m.opts.precision = flashmoe::tensor::Precision::Fast;
    let r = evaluate(&m, None, &ids, 512).unwrap();
    assert!((r.perplexity - 90.394).abs() < 0.3, "q4 K=2 perplexity, fast prefill: {}", r.perplexity);
}

#[test]
fn main_command_prints_shakespeare() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        // greedy: a sampled path (even from a fixed seed) moves with any change of rounding, and
        // may sample an end token after a few words, as this small model sometimes does
        .args(["generate", "--prompt", "SCENE I. Verona.", "--max-tokens", "40", "--temperature", "0"])
        .env("XDG_CACHE_HOME", cache.path())
        .env_remove("FLASHMOE_MODEL")
        .output()
        .unwrap();
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{err}");
    assert!(err.contains("converting") && err.contains("experts:"), "{err}");
    assert!(text.starts_with("SCENE I. Verona."));
    // English words of the plays, not byte soup
    let words: Vec<&str> = text.split_whitespace().collect();
    let common =
        ["the", "and", "I", "to", "of", "my", "a", "you", "is", "that", "in", "not", "me", "it", "thou", "with", "be"];
    let hits = words.iter().filter(|w| common.contains(&w.trim_matches(|c: char| !c.is_alphabetic()))).count();
    assert!(words.len() >= 10 && hits >= 3, "{text}");
}
