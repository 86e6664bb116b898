//! Importing an MLX-quantized checkpoint: the packed weights, scales and biases land in the
//! flash layout byte for byte, and the model computes what the dequantized weights compute.
//!
//! The MLX checkpoint is made here from a fixture the way mlx-lm lays out Qwen3.5: names under
//! `language_model.`, experts stacked as `switch_mlp`, matrices as uint32-packed `.weight` with
//! bf16 `.scales`/`.biases` (routers at 8 bits), zero-centred norms shifted by +1, conv1d as
//! [C, K, 1], and modules whose input size the group does not divide left unquantized.

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::{MANIFEST, Manifest};
use flashmoe::load::load_model;
use flashmoe::quant;
use flashmoe::tensor::{AlignedBytes, Mat, Precision, WKind};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

const GROUP: usize = 8;

struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Quantizes `[.., rows, cols]` (leading dims flattened) the MLX way: weight as uint32 words,
/// scales and biases as bf16 with the leading shape kept.
fn mlx_quantize(name: &str, shape: &[usize], w: &[f32], bits: u8, out: &mut BTreeMap<String, T>) -> Vec<f32> {
    let cols = *shape.last().unwrap();
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let blob = quant::quantize(w, rows, cols, bits, GROUP);
    let m =
        Mat::from_bytes(rows, cols, WKind::Q { bits, group: GROUP as u16 }, AlignedBytes::from_slice(&blob)).unwrap();
    let rb = quant::row_bytes(cols, bits);
    let ng = cols / GROUP;
    let aux = blob.len() - 4 * rows * ng;
    let base = name.strip_suffix(".weight").unwrap();
    let lead = &shape[..shape.len() - 1];
    let with_last = |last: usize| lead.iter().copied().chain([last]).collect::<Vec<_>>();
    out.insert(name.into(), T { dtype: Dtype::U32, shape: with_last(rb / 4), data: blob[..rows * rb].to_vec() });
    out.insert(
        format!("{base}.scales"),
        T { dtype: Dtype::BF16, shape: with_last(ng), data: blob[aux..aux + 2 * rows * ng].to_vec() },
    );
    out.insert(
        format!("{base}.biases"),
        T { dtype: Dtype::BF16, shape: with_last(ng), data: blob[aux + 2 * rows * ng..].to_vec() },
    );
    m.to_f32() // what the quantized weights mean
}

fn write(dir: &Path, tensors: &BTreeMap<String, T>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn mlx_checkpoint_imports_bit_exact() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen35_text");
    let ck = flashmoe::checkpoint::Checkpoint::open(&src).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let (ne, layers) =
        (cfg["num_experts"].as_u64().unwrap() as usize, cfg["num_hidden_layers"].as_u64().unwrap() as usize);

    let tmp = tempfile::tempdir().unwrap();
    let (mlx_dir, deq_dir) = (tmp.path().join("mlx"), tmp.path().join("dequantized"));
    std::fs::create_dir_all(&mlx_dir).unwrap();
    std::fs::create_dir_all(&deq_dir).unwrap();
    let mut mlx = BTreeMap::new();
    let mut deq = BTreeMap::new(); // the same model in HF layout, f32, with the dequantized values
    let f32t = |shape: &[usize], v: &[f32]| T { dtype: Dtype::F32, shape: shape.to_vec(), data: f32_bytes(v) };
    for name in ck.names() {
        if name.contains(".mlp.experts.") {
            continue;
        }
        let shape = ck.shape(name).unwrap().to_vec();
        let v = ck.mat(name, &shape).unwrap().to_f32();
        let mname = name.replacen("model.", "language_model.model.", 1).replace("lm_head.", "language_model.lm_head.");
        let zero_centred =
            [".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight"]
                .iter()
                .any(|s| name.ends_with(s))
                || name == "model.norm.weight";
        let quantizable = shape.len() == 2 && shape[1].is_multiple_of(GROUP) && !name.contains("norm");
        if zero_centred {
            let shifted: Vec<half::bf16> = v.iter().map(|x| half::bf16::from_f32(x + 1.0)).collect();
            let data = shifted.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            mlx.insert(mname, T { dtype: Dtype::BF16, shape: shape.clone(), data });
            let unshifted: Vec<f32> = shifted.iter().map(|x| x.to_f32() - 1.0).collect();
            deq.insert(name.to_string(), f32t(&shape, &unshifted));
        } else if name.ends_with("conv1d.weight") {
            mlx.insert(mname, f32t(&[shape[0], shape[2], 1], &v));
            deq.insert(name.to_string(), f32t(&shape, &v));
        } else if quantizable {
            let bits = if name.ends_with("mlp.gate.weight") { 8 } else { 4 };
            let d = mlx_quantize(&mname, &shape, &v, bits, &mut mlx);
            deq.insert(name.to_string(), f32t(&shape, &d));
        } else {
            mlx.insert(mname, f32t(&shape, &v));
            deq.insert(name.to_string(), f32t(&shape, &v));
        }
    }
    for l in 0..layers {
        for (proj, rows, cols) in [("gate_proj", 24, 48), ("up_proj", 24, 48), ("down_proj", 48, 24)] {
            let mut all = vec![];
            for e in 0..ne {
                all.extend(
                    ck.mat(&format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"), &[rows, cols]).unwrap().to_f32(),
                );
            }
            let name = format!("language_model.model.layers.{l}.mlp.switch_mlp.{proj}.weight");
            let d = mlx_quantize(&name, &[ne, rows, cols], &all, 4, &mut mlx);
            for e in 0..ne {
                let part = &d[e * rows * cols..(e + 1) * rows * cols];
                deq.insert(format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"), f32t(&[rows, cols], part));
            }
        }
    }
    write(&mlx_dir, &mlx);
    write(&deq_dir, &deq);
    let wrapped = json!({"model_type": "qwen3_5_moe", "text_config": cfg.clone(), "tie_word_embeddings": false,
        "quantization": {"group_size": GROUP, "bits": 4}});
    std::fs::write(mlx_dir.join("config.json"), wrapped.to_string()).unwrap();
    std::fs::write(deq_dir.join("config.json"), cfg.to_string()).unwrap();

    let out = tmp.path().join("flash");
    let opts = ConvertOptions {
        experts: WKind::Q { bits: 4, group: GROUP as u16 },
        dense: WKind::BF16,
        force: false,
        progress: false,
    };
    convert(&mlx_dir, &out, &opts).unwrap();
    let m = Manifest::load(&out).unwrap();
    assert!(out.join(MANIFEST).exists());

    // bit-exact: every expert extent holds the MLX bytes of that expert
    let src_bytes = std::fs::read(mlx_dir.join("model.safetensors")).unwrap();
    let src = SafeTensors::deserialize(&src_bytes).unwrap();
    let ex = m.experts.as_ref().unwrap();
    for l in [0usize, layers - 1] {
        let file = std::fs::read(out.join(format!("experts/layer_{l:03}.bin"))).unwrap();
        for e in [0usize, ne - 1] {
            let extent = &file[e * ex.stride as usize..(e + 1) * ex.stride as usize];
            for (proj, part) in [("gate_proj", &ex.gate), ("up_proj", &ex.up), ("down_proj", &ex.down)] {
                let base = format!("language_model.model.layers.{l}.mlp.switch_mlp.{proj}");
                let w = src.tensor(&format!("{base}.weight")).unwrap();
                let rb = w.shape()[2] * 4;
                let packed = &w.data()[e * part.rows * rb..(e + 1) * part.rows * rb];
                let at = part.offset as usize;
                assert_eq!(&extent[at..at + packed.len()], packed, "layer {l} expert {e} {proj} packed");
                let sc = src.tensor(&format!("{base}.scales")).unwrap();
                let sb = sc.shape()[2] * 2;
                let scales = &sc.data()[e * part.rows * sb..(e + 1) * part.rows * sb];
                let blob_len = WKind::Q { bits: 4, group: GROUP as u16 }.bytes(part.rows, part.cols);
                let aux = at + blob_len - 2 * scales.len();
                assert_eq!(&extent[aux..aux + scales.len()], scales, "layer {l} expert {e} {proj} scales");
            }
        }
    }
    let tensor = m.resident.tensors.iter().find(|t| t.name.ends_with("layers.3.self_attn.q_proj.weight")).unwrap();
    assert_eq!(tensor.kind, "q4g8");

    // and it computes what the dequantized checkpoint computes
    let prompt = [5u32, 77, 120, 3, 250, 9, 41];
    // (exact products: the twin's weights are f32, the import's q4, and only the f32 path
    // treats both alike)
    let (mut a, mut b) = (load_model(&out).unwrap(), load_model(&deq_dir).unwrap());
    (a.opts.precision, b.opts.precision) = (Precision::Exact, Precision::Exact);
    let la = a.forward(&mut a.new_state(), &prompt, true).unwrap();
    let lb = b.forward(&mut b.new_state(), &prompt, true).unwrap();
    let scale = lb.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-4, "imported MLX model differs from its dequantized twin: {err:e}");

    // the MLX checkpoint also runs as it is, unconverted, and computes the same
    let mut c = load_model(&mlx_dir).unwrap();
    c.opts.precision = Precision::Exact;
    let lc = c.forward(&mut c.new_state(), &prompt, true).unwrap();
    let err = lc.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-4, "the MLX checkpoint loaded directly differs from its dequantized twin: {err:e}");
}
