//! Broken checkpoints and bad requests give clear errors naming the file, tensor or field.

use flashmoe::generate::{Sampler, SamplingParams, generate};
use flashmoe::load::load_model;
use flashmoe::tokenizer::TextTokenizer;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A scratch copy of a fixture directory.
fn copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_model(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Rewrites `model.safetensors`, letting `edit` change the list of (name, dtype, shape, bytes).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut list);
    let views: Vec<(String, TensorView)> =
        list.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

const T: &str = "model.layers.0.self_attn.q_norm.weight";

#[test]
fn missing_config_and_unknown_model_type() {
    let d = copy("qwen3_moe_norm");
    let cfg = d.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"qwen3_moe\"", "\"llama\"")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("unsupported model_type `llama`") && e.contains("config.json"), "{e}");
    std::fs::write(&cfg, text.replace("\"hidden_size\"", "\"hidden_sizes\"")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("`hidden_size`"), "{e}");
    std::fs::remove_file(&cfg).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn missing_shard_file() {
    let d = copy("qwen35_text");
    std::fs::remove_file(d.path().join("model-00003-of-00010.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00003-of-00010.safetensors"), "{e}");
}

#[test]
fn missing_tensor() {
    let d = copy("qwen3_moe_norm");
    rewrite(d.path(), |l| l.retain(|t| t.0 != T));
    let e = load_err(d.path());
    assert!(e.contains(T) && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape() {
    let d = copy("qwen3_moe_norm");
    rewrite(d.path(), |l| {
        let t = l.iter_mut().find(|t| t.0 == T).unwrap();
        t.2 = vec![t.2[0] + 1];
        t.3.extend([0, 0]);
    });
    let e = load_err(d.path());
    assert!(e.contains(T) && e.contains("shape [13]") && e.contains("expected [12]"), "{e}");
}

#[test]
fn unsupported_dtype() {
    let d = copy("qwen3_moe_norm");
    rewrite(d.path(), |l| {
        let t = l.iter_mut().find(|t| t.0 == T).unwrap();
        t.1 = Dtype::I16; // same byte size as bf16
    });
    let e = load_err(d.path());
    assert!(e.contains(T) && e.contains("unsupported dtype I16"), "{e}");
}

#[test]
fn corrupt_header() {
    let d = copy("qwen3_moe_norm");
    let p = d.path().join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[8..24].copy_from_slice(b"#not-json-at-all");
    std::fs::write(&p, b).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
    // an absurd header length
    let mut b = std::fs::read(fixture("qwen3_moe_norm").join("model.safetensors")).unwrap();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
}

#[test]
fn truncated_file() {
    let d = copy("qwen3_moe_norm");
    let p = d.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && (e.contains("truncated") || e.contains("header")), "{e}");
}

#[test]
fn token_out_of_range_and_prompt_over_context() {
    let m = load_model(&fixture("qwen3_moe_norm")).unwrap();
    let e = m.forward(&mut m.new_state(), &[1, 320], false).unwrap_err().to_string();
    assert!(e.contains("token id 320") && e.contains("320 ids"), "{e}");
    let long = vec![1u32; m.max_context() + 1];
    let mut s = Sampler::new(SamplingParams::default());
    let e = generate(&m, &mut m.new_state(), &long, 4, &mut s, &[], |_| true).unwrap_err().to_string();
    assert!(e.contains("65 tokens") && e.contains("context of 64"), "{e}");
    // a prompt that fits stops cleanly when the context fills up
    let fits = vec![1u32; m.max_context() - 2];
    let (out, st) = generate(&m, &mut m.new_state(), &fits, 10, &mut s, &[], |_| true).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(st.stop, flashmoe::generate::StopReason::ContextFull);
}

#[test]
fn missing_tokenizer() {
    let d = copy("qwen3_moe_norm");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = format!("{:#}", TextTokenizer::load(d.path()).err().unwrap());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn cli_reports_errors_without_panicking() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["logits", "--model", "/nonexistent/model", "--tokens", "1,2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error:") && err.contains("/nonexistent/model/config.json"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["logits", "--model", fixture("qwen3_moe").to_str().unwrap(), "--tokens", "1,x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`x` is not a token id"), "{err}");
}

/// A NaN in the weights: every run that computes through it is an error naming the layer and
/// sublayer (never "!!!!" or `null` logits), and `convert` refuses the checkpoint.
#[test]
fn non_finite_weights_are_errors() {
    let d = copy("qwen3_moe_norm");
    let name = "model.layers.1.mlp.experts.0.down_proj.weight";
    rewrite(d.path(), |l| {
        let t = l.iter_mut().find(|t| t.0 == name).unwrap();
        let nan: &[u8] = match t.1 {
            Dtype::F32 => &f32::NAN.to_le_bytes(),
            Dtype::BF16 => &0x7fc0u16.to_le_bytes(),
            _ => &0x7e00u16.to_le_bytes(), // f16
        };
        let w = nan.len();
        for i in 0..t.3.len() / w {
            t.3[i * w..(i + 1) * w].copy_from_slice(nan);
        }
    });
    let m = load_model(d.path()).unwrap();
    // every token routes somewhere; run the whole vocabulary's first ids until expert 0 is hit
    let tokens: Vec<u32> = (0..64).collect();
    let e = format!("{:#}", m.forward(&mut m.new_state(), &tokens, true).unwrap_err());
    assert!(e.contains("layer 1") && e.contains("non-finite") && e.contains("MoE"), "{e}");
    let out = d.path().join("converted");
    let opts = flashmoe::flash::convert::ConvertOptions {
        experts: flashmoe::tensor::WKind::Q { bits: 4, group: 64 },
        dense: flashmoe::tensor::WKind::BF16,
        force: false,
        progress: false,
    };
    let e = format!("{:#}", flashmoe::flash::convert::convert(d.path(), &out, &opts).unwrap_err());
    assert!(e.contains("non-finite") && e.contains("layer 1 expert 0 down_proj"), "{e}");
    assert!(!out.exists());
}

#[test]
fn fp8_weights_without_their_block_scales_or_with_the_wrong_ones() {
    const W: &str = "model.layers.0.self_attn.q_proj.weight";
    let d = copy("minimax_m2_fp8");
    rewrite(d.path(), |l| l.retain(|t| t.0 != format!("{W}_scale_inv")));
    let e = load_err(d.path());
    assert!(e.contains(W) && e.contains("_scale_inv"), "{e}");
    let d = copy("minimax_m2_fp8");
    rewrite(d.path(), |l| {
        let s = l.iter_mut().find(|t| t.0 == format!("{W}_scale_inv")).unwrap();
        s.2 = vec![1, 1];
        s.3.truncate(4);
    });
    let e = load_err(d.path());
    assert!(e.contains("blocks of 12x20") && e.contains("[1, 1]"), "{e}");
    // a block size that is not two positive integers
    let d = copy("minimax_m2_fp8");
    let cfg = d.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"weight_block_size\": [\n      12,\n      20\n    ]", "\"weight_block_size\": [0]"),
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("weight_block_size"), "{e}");
}

#[test]
fn compressed_tensors_int4_experts_with_missing_or_wrong_parts_or_an_unsupported_scheme() {
    const B: &str = "language_model.model.layers.1.mlp.experts.2.up_proj";
    let load_err = |d: &Path| {
        let e = load_err(d);
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    for part in ["weight_scale", "weight_shape"] {
        let d = copy("kimi_k25_int4");
        rewrite(d.path(), |l| l.retain(|t| t.0 != format!("{B}.{part}")));
        let e = load_err(d.path());
        assert!(e.contains(&format!("{B}.weight_packed")) && e.contains(&format!("{B}.{part}")), "{e}");
    }
    // scales for groups of 16, a packed tensor one word short, a stated shape that disagrees
    let d = copy("kimi_k25_int4");
    rewrite(d.path(), |l| {
        let s = l.iter_mut().find(|t| t.0 == format!("{B}.weight_scale")).unwrap();
        s.2 = vec![32, 2];
        s.3 = vec![0x3f; 128];
    });
    let e = load_err(d.path());
    assert!(e.contains(&format!("{B}.weight_scale")) && e.contains("[32, 2]") && e.contains("[32, 1]"), "{e}");
    let d = copy("kimi_k25_int4");
    rewrite(d.path(), |l| {
        let s = l.iter_mut().find(|t| t.0 == format!("{B}.weight_packed")).unwrap();
        s.2 = vec![32, 3];
        s.3.truncate(32 * 3 * 4);
    });
    let e = load_err(d.path());
    assert!(e.contains(&format!("{B}.weight")) && e.contains("[32, 3]"), "{e}");
    let d = copy("kimi_k25_int4");
    rewrite(d.path(), |l| {
        let s = l.iter_mut().find(|t| t.0 == format!("{B}.weight_shape")).unwrap();
        s.3[..8].copy_from_slice(&16i64.to_le_bytes());
    });
    let e = load_err(d.path());
    assert!(e.contains(&format!("{B}.weight_shape")) && e.contains("[16, 32]"), "{e}");
    // packed words that are not int32
    let d = copy("kimi_k25_int4");
    rewrite(d.path(), |l| l.iter_mut().find(|t| t.0 == format!("{B}.weight_packed")).unwrap().1 = Dtype::U32);
    let e = load_err(d.path());
    assert!(e.contains(&format!("{B}.weight_packed")) && e.contains("I32"), "{e}");
    // schemes flashmoe does not import: each named
    for (from, to, says) in [
        ("\"num_bits\": 4", "\"num_bits\": 5", "num_bits 5"),
        ("\"symmetric\": true", "\"symmetric\": false", "symmetric"),
        ("\"strategy\": \"group\"", "\"strategy\": \"tensor\"", "strategy `tensor`"),
        ("\"format\": \"pack-quantized\"", "\"format\": \"float-quantized\"", "float-quantized"),
        ("\"input_activations\": null", "\"input_activations\": {\"num_bits\": 8}", "input_activations"),
    ] {
        let d = copy("kimi_k25_int4");
        let cfg = d.path().join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(from), "{from}");
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        let e = load_err(d.path());
        assert!(e.contains("config.json") && e.contains("config_groups.group_0") && e.contains(says), "{e}");
    }
    // a group the inputs are no multiple of
    let d = copy("kimi_k25_int4");
    let cfg = d.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"group_size\": 32", "\"group_size\": 64")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("weight_packed") && e.contains("group size 64"), "{e}");
}
