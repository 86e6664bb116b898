//! `flashmoe synth`: full-size models of the published shapes with random weights, written
//! straight to the flash layout (streamed, never held in memory), so that I/O and compute per
//! token are measured at full scale without downloading a checkpoint.
//!
//! Routing: `uniform` leaves the router random (every expert equally likely: the cache's worst
//! case). `skewed` gives every embedding a constant component along hidden dimension 0 and sets
//! router row e's weight on that dimension so that its logit carries −α·ln(1 + rank_e) (rank_e a
//! random permutation per layer), on top of a unit-variance random part. Expert popularity then
//! follows a Zipf(1)-like law with a heavy tail, the hot set differs per layer, and consecutive
//! tokens share it, which is what makes caches work on trained models. `bench` prints the
//! resulting concentration.

use super::convert::{Out, resident_kind};
use super::format::{ExpertLayer, Experts, MANIFEST, Manifest, Part, TENSOR_ALIGN, TensorEntry, expert_layout};
use super::staging::Staging;
use crate::config::{Arch, Ffn, Mixer, ModelConfig};
use crate::tensor::{AlignedBytes, Mat, WKind};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::path::Path;

/// Presets: (name, config.json values, source).
pub const PRESETS: &[&str] = &[
    "qwen3.5-397b-a17b",
    "qwen3.5-122b-a10b",
    "qwen3.5-35b-a3b",
    "qwen3-next-80b-a3b",
    "qwen3-235b-a22b",
    "qwen3-30b-a3b",
];

/// The public `config.json` values of a preset (text model only).
///
/// Sources: Qwen3.5-397B-A17B and Qwen3-Next-80B-A3B from ../shared/reference/model-math.md
/// (checked against the published configs); Qwen3.5-35B-A3B equals the defaults of
/// transformers' `Qwen3_5MoeTextConfig` ("Qwen3.5-35B-A3B style"); Qwen3-30B-A3B and
/// Qwen3-235B-A22B from their published config.json (the 235B one also appears in public
/// training scripts: 94 layers, 64/4 heads of 128, 128 experts, top-8, intermediate 1536).
/// Qwen3.5-122B-A10B: 48 layers (12 attention), 256 experts, 8 routed + 1 shared, as its model
/// card states; hidden 3072, heads 32/2, DeltaNet 16/64 heads and intermediate 1024 are the
/// published config's values as recalled here, not re-checked against the file (no network).
pub fn preset_config(name: &str) -> Result<Value> {
    let qwen35 =
        |hidden: usize, layers: usize, heads: usize, v_heads: usize, experts: usize, k: usize, inter: usize| {
            json!({
                "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": hidden,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 256,
                "linear_num_key_heads": 16, "linear_num_value_heads": v_heads, "linear_key_head_dim": 128,
                "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
                "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter,
                "shared_expert_intermediate_size": inter, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
                "max_position_embeddings": 262144,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            })
        };
    let qwen3 = |hidden: usize, layers: usize, heads: usize, inter: usize| {
        json!({
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
            "num_experts_per_tok": 8, "moe_intermediate_size": inter, "intermediate_size": inter * 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false, "max_position_embeddings": 40960,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        })
    };
    Ok(match name {
        "qwen3.5-397b-a17b" => qwen35(4096, 60, 32, 64, 512, 10, 1024),
        "qwen3.5-122b-a10b" => qwen35(3072, 48, 32, 64, 256, 8, 1024),
        "qwen3.5-35b-a3b" => qwen35(2048, 40, 16, 32, 256, 8, 512),
        "qwen3-next-80b-a3b" => json!({
            "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
            "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "num_experts": 512, "num_experts_per_tok": 10,
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "intermediate_size": 5120,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        }),
        "qwen3-235b-a22b" => qwen3(4096, 94, 64, 1536),
        "qwen3-30b-a3b" => qwen3(2048, 48, 32, 768),
        _ => bail!("unknown preset `{name}` (one of: {})", PRESETS.join(", ")),
    })
}

/// Expert popularity shape of a synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Uniform,
    Skewed,
}

impl std::str::FromStr for Routing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Routing::Uniform),
            "skewed" => Ok(Routing::Skewed),
            _ => bail!("routing must be `uniform` or `skewed`, got `{s}`"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub experts: WKind,
    pub dense: WKind,
    pub routing: Routing,
    /// Keep every per-layer shape but only this many layers (the real pattern's first N).
    pub layers: Option<usize>,
    pub seed: u64,
    pub force: bool,
    pub progress: bool,
}

/// Fast deterministic generator (wyrand); quality is ample for random weights.
struct Rng(u64);

impl Rng {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }
    /// Uniform in [−a, a].
    #[inline]
    fn sym(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
}

/// How a resident tensor is filled.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform with this standard deviation.
    Std(f32),
    Const(f32),
    /// log(uniform(1, 16)), as A_log.
    ALog,
    Embedding,
    Router,
}

fn specs(c: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let std = |fan_in: usize| Init::Std(1.0 / (fan_in as f32).sqrt());
    // small outputs keep the residual stream dominated by the embedding (see module doc)
    let out_std = |fan_in: usize| Init::Std(0.1 / (fan_in as f32).sqrt());
    let norm = if c.zero_centered_norm() { Init::Const(0.0) } else { Init::Const(1.0) };
    let mut s: Vec<(String, Vec<usize>, Init)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h], Init::Embedding),
        ("model.norm.weight".into(), vec![h], norm),
    ];
    if !c.tie_word_embeddings {
        s.push(("lm_head.weight".into(), vec![v, h], std(h)));
    }
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        s.push((format!("{p}.input_layernorm.weight"), vec![h], norm));
        s.push((format!("{p}.post_attention_layernorm.weight"), vec![h], norm));
        match c.mixers[i] {
            Mixer::Attention => {
                let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
                let q = nh * d * if c.gated_attention() { 2 } else { 1 };
                s.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h], std(h)));
                s.push((format!("{p}.self_attn.k_proj.weight"), vec![nkv * d, h], std(h)));
                s.push((format!("{p}.self_attn.v_proj.weight"), vec![nkv * d, h], std(h)));
                s.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nh * d], out_std(nh * d)));
                s.push((format!("{p}.self_attn.q_norm.weight"), vec![d], norm));
                s.push((format!("{p}.self_attn.k_norm.weight"), vec![d], norm));
            }
            Mixer::DeltaNet => {
                let l = c.linear.as_ref().expect("DeltaNet layer without linear config");
                let (cd, vd, nv) = (l.conv_dim(), l.value_dim(), l.num_v_heads);
                let a = format!("{p}.linear_attn");
                if c.arch == Arch::Qwen3Next {
                    s.push((format!("{a}.in_proj_qkvz.weight"), vec![cd + vd, h], std(h)));
                    s.push((format!("{a}.in_proj_ba.weight"), vec![2 * nv, h], std(h)));
                } else {
                    s.push((format!("{a}.in_proj_qkv.weight"), vec![cd, h], std(h)));
                    s.push((format!("{a}.in_proj_z.weight"), vec![vd, h], std(h)));
                    s.push((format!("{a}.in_proj_b.weight"), vec![nv, h], std(h)));
                    s.push((format!("{a}.in_proj_a.weight"), vec![nv, h], std(h)));
                }
                s.push((format!("{a}.conv1d.weight"), vec![cd, 1, l.conv_kernel], Init::Std(0.3)));
                s.push((format!("{a}.dt_bias"), vec![nv], Init::Const(1.0)));
                s.push((format!("{a}.A_log"), vec![nv], Init::ALog));
                s.push((format!("{a}.norm.weight"), vec![l.v_head_dim], Init::Const(1.0)));
                s.push((format!("{a}.out_proj.weight"), vec![h, vd], out_std(vd)));
            }
        }
        match c.ffns[i] {
            Ffn::Moe => {
                s.push((format!("{p}.mlp.gate.weight"), vec![c.num_experts, h], Init::Router));
                let si = c.shared_expert_intermediate_size;
                if si > 0 {
                    s.push((format!("{p}.mlp.shared_expert.gate_proj.weight"), vec![si, h], std(h)));
                    s.push((format!("{p}.mlp.shared_expert.up_proj.weight"), vec![si, h], std(h)));
                    s.push((format!("{p}.mlp.shared_expert.down_proj.weight"), vec![h, si], out_std(si)));
                    s.push((format!("{p}.mlp.shared_expert_gate.weight"), vec![1, h], std(h)));
                }
            }
            Ffn::Dense => {
                let di = c.intermediate_size;
                s.push((format!("{p}.mlp.gate_proj.weight"), vec![di, h], std(h)));
                s.push((format!("{p}.mlp.up_proj.weight"), vec![di, h], std(h)));
                s.push((format!("{p}.mlp.down_proj.weight"), vec![h, di], out_std(di)));
            }
        }
    }
    s
}

/// The constant embedding component along dimension 0 that skewed routing keys on.
const SKEW_COMPONENT: f32 = 4.0;
/// Weight of the popularity term −ln(1 + rank) against the unit-variance per-token part of a
/// router logit. Top-k selection sharpens popularity a lot, so a small weight already gives a
/// strong skew; this value puts about half of all routings on the top 10% of experts.
const SKEW_ALPHA: f32 = 0.5;

fn fill(init: Init, shape: &[usize], rng: &mut Rng, routing: Routing) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let cols = *shape.last().unwrap_or(&1);
    let sq3 = 3f32.sqrt();
    match init {
        Init::Std(s) => (0..n).map(|_| rng.sym(s * sq3)).collect(),
        Init::Const(c) => vec![c; n],
        Init::ALog => (0..n).map(|_| (8.5 + rng.sym(7.5)).ln()).collect(),
        Init::Embedding => {
            let mut v: Vec<f32> = (0..n).map(|_| rng.sym(sq3)).collect();
            if routing == Routing::Skewed {
                v.iter_mut().step_by(cols).for_each(|x| *x = SKEW_COMPONENT);
            }
            v
        }
        Init::Router => {
            let mut v: Vec<f32> = (0..n).map(|_| rng.sym(sq3 / (cols as f32).sqrt())).collect();
            if routing == Routing::Skewed {
                let rows = n / cols;
                // a random rank per expert; the normalised dim-0 input is ≈ SKEW_COMPONENT
                let mut rank: Vec<usize> = (0..rows).collect();
                for i in (1..rows).rev() {
                    rank.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                let x0 = SKEW_COMPONENT / (1.0 + SKEW_COMPONENT * SKEW_COMPONENT / cols as f32).sqrt();
                for (e, r) in rank.iter().enumerate() {
                    v[e * cols] = -SKEW_ALPHA * ((1 + r) as f32).ln() / x0;
                }
            }
            v
        }
    }
}

/// A random expert extent: packed values uniform, scales/biases giving weights uniform in ±a.
fn random_extent(kind: WKind, parts: &[Part; 3], stride: usize, rng: &mut Rng, out: &mut [u8]) {
    out[..stride].iter_mut().for_each(|b| *b = 0);
    for (pi, p) in parts.iter().enumerate() {
        let a = 3f32.sqrt() / (p.cols as f32).sqrt() * if pi == 2 { 0.1 } else { 1.0 };
        let off = p.offset as usize;
        let len = kind.bytes(p.rows, p.cols);
        let blob = &mut out[off..off + len];
        match kind {
            WKind::Q { bits, group } => {
                let ng = p.cols.div_ceil(group as usize);
                let aux = len - 4 * p.rows * ng;
                for ch in blob[..aux].chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    ch.copy_from_slice(&r[..ch.len()]);
                }
                let scale = half::bf16::from_f32(2.0 * a / ((1u32 << bits) - 1) as f32).to_bits().to_le_bytes();
                let bias = half::bf16::from_f32(-a).to_bits().to_le_bytes();
                let (sc, bi) = blob[aux..].split_at_mut(2 * p.rows * ng);
                sc.chunks_mut(2).for_each(|c| c.copy_from_slice(&scale));
                bi.chunks_mut(2).for_each(|c| c.copy_from_slice(&bias));
            }
            _ => {
                let v: Vec<f32> = (0..p.rows * p.cols).map(|_| rng.sym(a)).collect();
                let m = Mat::from_f32(p.rows, p.cols, v).expect("sizes match");
                blob.copy_from_slice(&m.encode(kind));
            }
        }
    }
}

/// What `synth` wrote.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub resident_bytes: u64,
    pub expert_bytes: u64,
    pub expert_stride: u64,
    pub layers: usize,
}

/// Writes a synthetic model of `preset` to `to` in the flash layout.
pub fn synth(preset: &str, to: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let mut raw = preset_config(preset)?;
    if let Some(n) = opts.layers {
        let full = raw["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
        if n == 0 || n > full {
            bail!("--layers must be in 1..={full} for {preset}");
        }
        raw["num_hidden_layers"] = json!(n);
    }
    raw["flashmoe_synthetic"] = json!({"preset": preset, "routing": format!("{:?}", opts.routing).to_lowercase(),
        "seed": opts.seed, "full_layers": preset_config(preset)?["num_hidden_layers"]});
    let cfg = ModelConfig::from_json(&raw)?;
    let ek = opts.experts;
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ([gate, up, down], stride) = expert_layout(ek, h, inter);
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.ffns[i] == Ffn::Moe).collect();
    let specs = specs(&cfg);
    let expert_total = stride * (ne * moe_layers.len()) as u64;
    let resident_total: u64 = specs
        .iter()
        .map(|(n, shape, _)| {
            let cols = *shape.last().unwrap_or(&1);
            TENSOR_ALIGN
                + resident_kind(n, shape, opts.dense).bytes(shape.iter().product::<usize>() / cols, cols) as u64
        })
        .sum();
    let staging = Staging::begin(to, opts.force, &[], expert_total + resident_total)?;
    let tmp = staging.dir.clone();
    let pb = if opts.progress { ProgressBar::new(expert_total) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut rng = Rng(opts.seed ^ 0x5eed);

    pb.set_message("resident");
    let mut out = Out::create(&tmp, "resident.bin")?;
    let mut tensors = vec![];
    for (n, shape, init) in &specs {
        let v = fill(*init, shape, &mut rng, opts.routing);
        let cols = *shape.last().unwrap_or(&1);
        let kind = resident_kind(n, shape, opts.dense);
        let m = Mat::from_f32(v.len() / cols, cols, v)?;
        let m = if kind == WKind::F32 { m } else { m.to_kind(WKind::BF16) }; // halve the peak
        let bytes = m.encode(kind);
        out.pad_to(TENSOR_ALIGN)?;
        tensors.push(TensorEntry {
            name: n.clone(),
            kind: kind.name(),
            shape: shape.clone(),
            offset: out.pos,
            bytes: bytes.len() as u64,
        });
        out.write(&bytes)?;
    }
    let resident_bytes = out.pos;
    let mut files = vec![out.finish()?];

    let parts = [gate, up, down];
    let mut extent = AlignedBytes::zeroed(stride as usize);
    let mut layers = vec![];
    for &l in &moe_layers {
        pb.set_message(format!("layer {l}"));
        let fname = format!("experts/layer_{l:03}.bin");
        let mut out = Out::create(&tmp, &fname)?;
        for _ in 0..ne {
            random_extent(ek, &parts, stride as usize, &mut rng, extent.bytes_mut());
            out.write(extent.bytes())?;
            pb.inc(stride);
        }
        files.push(out.finish()?);
        layers.push(ExpertLayer { layer: l, file: fname });
    }
    let experts =
        (!moe_layers.is_empty()).then(|| Experts { kind: ek.name(), num_experts: ne, stride, gate, up, down, layers });
    let manifest = Manifest::new(raw, opts.dense, tensors, experts, files);
    let mpath = tmp.join(MANIFEST);
    std::fs::write(&mpath, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("cannot write {}", mpath.display()))?;
    // what is about to replace the target must load: every file present at its size
    Manifest::load(&tmp).context("the written model does not load")?;
    staging.publish()?;
    pb.finish_and_clear();
    Ok(SynthReport { resident_bytes, expert_bytes: expert_total, expert_stride: stride, layers: cfg.num_layers })
}
