//! GGUF models against llama.cpp: tiny random checkpoints converted by llama.cpp's own
//! `convert_hf_to_gguf.py` (F16, Q8_0) and `llama-quantize` (Q4_K_M) — a Qwen3-MoE
//! (`qwen3moe`), a gpt-oss with MXFP4 experts (`gpt-oss`), a DeepSeek-V3 (`deepseek2`) — with
//! llama.cpp's logits for fixed token sequences and its tokenization of a few texts
//! (scripts/gguf_fixtures.sh made them; nothing here builds llama.cpp).

mod common;

use common::agreement;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(f: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(f)
}

/// llama.cpp's record for one quantization: (token sequences, logits per sequence, texts,
/// their tokens).
struct Llama {
    sequences: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f64>>>,
    texts: Vec<String>,
    tokens: Vec<Vec<u32>>,
}

fn llama(arch: &str, q: &str) -> Llama {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("llama-{arch}-{q}.json"))).unwrap()).unwrap();
    let ids = |x: &Value| x.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    Llama {
        sequences: v["sequences"].as_array().unwrap().iter().map(ids).collect(),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                    .collect()
            })
            .collect(),
        texts: v["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        tokens: v["tokens"].as_array().unwrap().iter().map(ids).collect(),
    }
}

/// (top-1 agreement, mean KL(llama.cpp ‖ flashmoe)) over every position of every sequence.
fn agree(arch: &str, q: &str) -> (f64, f64) {
    let path = fixture(&format!("{arch}-{q}.gguf"));
    let mut m = flashmoe::load::load_model(&path).unwrap();
    m.opts.precision = flashmoe::tensor::Precision::Exact;
    let l = llama(arch, q);
    let (mut top, mut kl, mut n) = (0.0, 0.0, 0.0);
    for (seq, want) in l.sequences.iter().zip(&l.logits) {
        let got = m.forward(&mut m.new_state(), seq, true).unwrap();
        let (t, k) = agreement(&got, want);
        let rows = want.len() as f64;
        (top, kl, n) = (top + t * rows, kl + k * rows, n + rows);
    }
    let (top, kl) = (top / n, kl / n);
    eprintln!("{arch} {q}: top-1 {top:.4}, mean KL {kl:.2e} over {n} positions");
    (top, kl)
}

#[test]
fn f16_agrees_with_llama_cpp() {
    let (top, kl) = agree("qwen3moe", "f16");
    assert!(top >= 0.99 && kl <= 1e-3, "F16: top-1 {top}, KL {kl}");
}

/// llama.cpp multiplies Q8_0 and K-quant weights with activations it rounds to 8 bits (Q8_0 /
/// Q8_K blocks); flashmoe keeps them in f32, so these bound the difference that makes.
#[test]
fn q8_0_agrees_with_llama_cpp() {
    let (top, kl) = agree("qwen3moe", "q8_0");
    assert!(top >= 0.95 && kl <= 1e-2, "Q8_0: top-1 {top}, KL {kl}");
}

#[test]
fn q4_k_m_agrees_with_llama_cpp() {
    let (top, kl) = agree("qwen3moe", "q4_k_m");
    assert!(top >= 0.9 && kl <= 3e-2, "Q4_K_M: top-1 {top}, KL {kl}");
}

#[test]
fn gpt_oss_f16_agrees_with_llama_cpp() {
    let (top, kl) = agree("gpt-oss", "f16");
    assert!(top >= 0.99 && kl <= 1e-3, "gpt-oss F16: top-1 {top}, KL {kl}");
}

#[test]
fn gpt_oss_q8_0_agrees_with_llama_cpp() {
    let (top, kl) = agree("gpt-oss", "q8_0");
    assert!(top >= 0.95 && kl <= 1e-2, "gpt-oss Q8_0: top-1 {top}, KL {kl}");
}

#[test]
fn deepseek2_f16_agrees_with_llama_cpp() {
    let (top, kl) = agree("deepseek2", "f16");
    assert!(top >= 0.99 && kl <= 1e-3, "deepseek2 F16: top-1 {top}, KL {kl}");
}

#[test]
fn deepseek2_q8_0_agrees_with_llama_cpp() {
    let (top, kl) = agree("deepseek2", "q8_0");
    assert!(top >= 0.95 && kl <= 1e-2, "deepseek2 Q8_0: top-1 {top}, KL {kl}");
}

#[test]
fn q4_k_m_keeps_llama_cpps_quantization_mix() {
    let g = flashmoe::gguf::Gguf::open(&fixture("qwen3moe-q4_k_m.gguf")).unwrap();
    let types: std::collections::BTreeSet<String> = g.infos.iter().map(|t| t.type_name()).collect();
    assert!(types.contains("Q4_K") && types.contains("Q6_K"), "{types:?}");
}

#[test]
fn tokenizer_from_metadata_tokenizes_as_llama_cpp() {
    let l = llama("qwen3moe", "f16");
    let tok = flashmoe::tokenizer::TextTokenizer::load(&fixture("qwen3moe-f16.gguf")).unwrap();
    assert!(!l.texts.is_empty());
    for (text, want) in l.texts.iter().zip(&l.tokens) {
        assert_eq!(&tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(&tok.decode(want, false).unwrap(), text);
    }
    assert!(tok.has_chat_template());
    assert_eq!(tok.eos_id(), Some(315));
}

#[test]
fn cli_runs_a_gguf() {
    let exe = env!("CARGO_BIN_EXE_flashmoe");
    let path = fixture("qwen3moe-q4_k_m.gguf");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe).args(args).arg("--model").arg(&path).output().unwrap();
        let (o, e) =
            (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        assert!(out.status.success(), "{args:?}: {e}");
        o + &e
    };
    let l: Value = serde_json::from_str(&run(&["logits", "--tokens", "1,2,3"])).unwrap();
    assert_eq!(l["logits"].as_array().unwrap().len(), 3);
    let g = run(&["generate", "--prompt", "ROMEO:", "--max-tokens", "4", "--temperature", "0"]);
    assert!(g.contains("tok/s"), "{g}");
    let b = run(&["bench", "--prompt-tokens", "8", "--gen-tokens", "4"]);
    assert!(b.contains("decode"), "{b}");
    let i = run(&["inspect"]);
    assert!(i.contains("(GGUF)") && i.contains("ggml-Q4_K") && i.contains("ggml-Q6_K"), "{i}");
}

/// `convert --experts keep` copies a GGUF's blocks into the flash layout: the streamed model
/// computes what the GGUF does (the router, stored F32, becomes bf16 as every converted router
/// does; this fixture's are bf16 values, so the logits are the same bits).
#[test]
fn convert_keeps_the_gguf_blocks() {
    use flashmoe::flash::convert::{ConvertOptions, convert, source_expert_kind};
    let from = fixture("qwen3moe-q8_0.gguf");
    let kind = source_expert_kind(&from).unwrap().unwrap();
    assert_eq!(kind.name(), "ggml-Q8_0");
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("m");
    let opts = ConvertOptions { experts: kind, dense: flashmoe::tensor::WKind::BF16, force: false, progress: false };
    convert(&from, &to, &opts).unwrap();
    let tokens = &llama("qwen3moe", "q8_0").sequences[1];
    let run = |p: &Path| {
        let mut m = flashmoe::load::load_model(p).unwrap();
        m.opts.precision = flashmoe::tensor::Precision::Exact;
        m.forward(&mut m.new_state(), tokens, true).unwrap()
    };
    assert_eq!(run(&from), run(&to));
    // mixed expert formats (Q4_K_M: Q4_K gate/up, Q6_K down in some layers) are refused by name
    let q4 = fixture("qwen3moe-q4_k_m.gguf");
    let opts = ConvertOptions { experts: source_expert_kind(&q4).unwrap().unwrap(), ..opts };
    let e = format!("{:#}", convert(&q4, &dir.path().join("q4"), &opts).unwrap_err());
    assert!(e.contains("down_proj is ggml-Q6_K"), "{e}");
    let tok = flashmoe::tokenizer::TextTokenizer::load(&to).unwrap();
    assert_eq!(
        tok.encode("ROMEO:").unwrap(),
        flashmoe::tokenizer::TextTokenizer::load(&from).unwrap().encode("ROMEO:").unwrap()
    );
}
