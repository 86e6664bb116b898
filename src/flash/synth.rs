//! `flashmoe synth`: full-size models of the published shapes with random weights, written
//! straight to the flash layout (streamed, never held in memory), so that I/O and compute per
//! token are measured at full scale without downloading a checkpoint.
//!
//! Routing: `uniform` leaves the router random (every expert equally likely: the cache's worst
//! case, and the near-uniform end of trained models). `skewed` and `realistic` give every
//! embedding a constant component along hidden dimension 0 and set router row e's weight on that
//! dimension so that its logit carries a per-expert bias b_e (the experts' order a random
//! permutation per layer), on top of a unit-variance random part; top-k over those logits makes
//! expert popularity follow the bias, the hot set differs per layer, and consecutive tokens share
//! it, which is what makes caches work on trained models. `skewed`: b = −α·ln(1 + rank), a
//! Zipf(1)-like law with a heavy tail (about half of all routings on the top 10%). `realistic`:
//! b = −σ·(rank + ½)/experts, linear in the expert's rank share, with σ solved for the model's
//! expert count and k so that the top 10% of experts take [`REALISTIC_TOP10`] of the routings:
//! the law and that share were fitted to the built-in trained model's routing over held-out text
//! (`scripts/routing_fit.py`; docs/PERFORMANCE.md, "Routing realism"), and with them the
//! popularity's entropy and the reuse between consecutive tokens follow at any expert count.
//! `bench` prints the resulting statistics.

use super::convert::{Out, resident_kind};
use super::format::{ExpertLayer, Experts, MANIFEST, Manifest, Part, TENSOR_ALIGN, TensorEntry, expert_layout};
use super::staging::Staging;
use crate::config::{Ffn, Mixer, ModelConfig, QkNorm};
use crate::families::preset_config;
use crate::families::weight;
use crate::tensor::{AlignedBytes, Mat, WKind};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::Path;

/// Expert popularity shape of a synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Uniform,
    Skewed,
    Realistic,
}

impl std::str::FromStr for Routing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Routing::Uniform),
            "skewed" => Ok(Routing::Skewed),
            "realistic" => Ok(Routing::Realistic),
            _ => bail!("--routing must be `uniform`, `realistic` or `skewed`, got `{s}`"),
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
    /// A router choosing this many experts per token.
    Router(usize),
}

fn specs(c: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let std = |fan_in: usize| Init::Std(1.0 / (fan_in as f32).sqrt());
    // small outputs keep the residual stream dominated by the embedding (see module doc)
    let out_std = |fan_in: usize| Init::Std(0.1 / (fan_in as f32).sqrt());
    let norm = if c.zero_centered_norm() { Init::Const(0.0) } else { Init::Const(1.0) };
    let family = crate::families::by_model_type(&c.model_type).expect("a parsed config's family");
    let n = family.names();
    let pre = n.text_prefixes[0];
    let w = |m: &str, name: &str| weight(m, name);
    let mut s: Vec<(String, Vec<usize>, Init)> = vec![
        (format!("{pre}{}.weight", n.embed), vec![v, h], Init::Embedding),
        (format!("{pre}{}.weight", n.final_norm), vec![h], norm),
    ];
    if !c.tie_word_embeddings {
        s.push((format!("{}.weight", n.lm_head[0]), vec![v, h], std(h)));
    }
    for i in 0..c.num_layers {
        let p = n.layer(pre, i);
        s.push((w(&p, n.input_norm), vec![h], norm));
        s.push((w(&p, n.post_norm), vec![h], norm));
        match c.mixers[i] {
            Mixer::Attention => {
                let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
                let q = nh * d * if c.gated_attention() { 2 } else { 1 };
                let a = format!("{p}.{}", n.attention);
                s.push((w(&a, n.q_proj), vec![q, h], std(h)));
                s.push((w(&a, n.k_proj), vec![nkv * d, h], std(h)));
                s.push((w(&a, n.v_proj), vec![nkv * d, h], std(h)));
                s.push((w(&a, n.o_proj), vec![h, nh * d], out_std(nh * d)));
                let (qn, kn) = match c.attn.qk_norm {
                    QkNorm::None => (0, 0),
                    QkNorm::PerHead => (d, d),
                    QkNorm::Whole => (nh * d, nkv * d),
                };
                if qn > 0 {
                    s.push((w(&a, n.q_norm), vec![qn], norm));
                    s.push((w(&a, n.k_norm), vec![kn], norm));
                }
                if c.attn.qkv_bias {
                    for (proj, len) in [(n.q_proj, q), (n.k_proj, nkv * d), (n.v_proj, nkv * d)] {
                        s.push((format!("{a}.{proj}.bias"), vec![len], Init::Std(0.1)));
                    }
                }
                if c.attn.o_bias {
                    s.push((format!("{a}.{}.bias", n.o_proj), vec![h], Init::Std(0.01)));
                }
                if c.attn.sinks {
                    s.push((format!("{a}.{}", n.sinks), vec![nh], Init::Std(1.0)));
                }
            }
            Mixer::Mla => {
                let m = c.mla.as_ref().expect("latent attention layer without its sizes");
                let (nh, mn, a) = (c.num_heads, &n.mla, format!("{p}.{}", n.attention));
                let qd = nh * (m.qk_nope_head_dim + m.qk_rope_head_dim);
                match m.q_lora_rank {
                    None => s.push((w(&a, mn.q_proj), vec![qd, h], std(h))),
                    Some(r) => {
                        s.push((w(&a, mn.q_a), vec![r, h], std(h)));
                        s.push((w(&a, mn.q_a_norm), vec![r], norm));
                        s.push((w(&a, mn.q_b), vec![qd, r], std(r)));
                    }
                }
                let kvl = m.kv_lora_rank;
                s.push((w(&a, mn.kv_a), vec![m.latent_width(), h], std(h)));
                s.push((w(&a, mn.kv_a_norm), vec![kvl], norm));
                s.push((w(&a, mn.kv_b), vec![nh * (m.qk_nope_head_dim + m.v_head_dim), kvl], std(kvl)));
                s.push((w(&a, n.o_proj), vec![h, nh * m.v_head_dim], out_std(nh * m.v_head_dim)));
                if let Some(x) = m.indexer.as_ref().filter(|x| x.own[i]) {
                    let ix = format!("{a}.{}", mn.indexer);
                    let r = m.q_lora_rank.expect("the indexer reads the q-LoRA latent");
                    s.push((w(&ix, mn.index_q), vec![x.heads * x.head_dim, r], std(r)));
                    s.push((w(&ix, mn.index_k), vec![x.head_dim, h], std(h)));
                    s.push((w(&ix, mn.index_k_norm), vec![x.head_dim], Init::Const(1.0)));
                    s.push((format!("{ix}.{}.bias", mn.index_k_norm), vec![x.head_dim], Init::Const(0.0)));
                    s.push((w(&ix, mn.index_weights), vec![x.heads, h], std(h)));
                }
            }
            Mixer::DeltaNet => {
                let l = c.linear.as_ref().expect("DeltaNet layer without linear config");
                let (cd, vd, nv) = (l.conv_dim(), l.value_dim(), l.num_v_heads);
                let a = format!("{p}.{}", n.deltanet);
                for (name, shape) in family.deltanet_input_tensors(&a, l, h) {
                    s.push((name, shape, std(h)));
                }
                s.push((w(&a, n.conv1d), vec![cd, 1, l.conv_kernel], Init::Std(0.3)));
                s.push((format!("{a}.{}", n.dt_bias), vec![nv], Init::Const(1.0)));
                s.push((format!("{a}.{}", n.a_log), vec![nv], Init::ALog));
                s.push((w(&a, n.gated_norm), vec![l.v_head_dim], Init::Const(1.0)));
                s.push((w(&a, n.out_proj), vec![h, vd], out_std(vd)));
            }
        }
        let f = format!("{p}.{}", n.ffn);
        match c.ffns[i] {
            Ffn::Moe => {
                s.push((w(&f, n.router), vec![c.num_experts, h], Init::Router(c.num_experts_per_tok)));
                if c.router.logit_bias {
                    s.push((format!("{f}.{}.bias", n.router), vec![c.num_experts], Init::Const(0.0)));
                }
                if c.router.correction_bias {
                    // zero: the choice stays as the skewed router set it
                    s.push((format!("{f}.{}", n.correction_bias), vec![c.num_experts], Init::Const(0.0)));
                }
                let si = c.shared_expert_intermediate_size;
                if si > 0 {
                    let sh = format!("{f}.{}", n.shared_expert);
                    s.push((w(&sh, n.gate_proj), vec![si, h], std(h)));
                    s.push((w(&sh, n.up_proj), vec![si, h], std(h)));
                    s.push((w(&sh, n.down_proj), vec![h, si], out_std(si)));
                    if c.shared_expert_gated {
                        s.push((w(&f, n.shared_expert_gate), vec![1, h], std(h)));
                    }
                }
            }
            Ffn::Dense => {
                let di = c.intermediate_size;
                s.push((w(&f, n.gate_proj), vec![di, h], std(h)));
                s.push((w(&f, n.up_proj), vec![di, h], std(h)));
                s.push((w(&f, n.down_proj), vec![h, di], out_std(di)));
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

/// Share of the routings that the top 10% of experts take in `realistic` routing: the mean over
/// the built-in model's 8 MoE layers over its held-out text (`flashmoe eval --text
/// models/default/valid.txt --json`, 18,810 tokens: 0.339; per layer 0.22–0.47).
pub const REALISTIC_TOP10: f64 = 0.339;

/// erfc(x)/2 for x ≥ 0 by the Chebyshev fit of Numerical Recipes' `erfcc` (relative error
/// below 1.2e-7), extended by symmetry: the chance that a unit normal exceeds `x·√2`.
fn normal_tail(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let c = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let poly = c.iter().rev().fold(0.0, |acc, &a| acc * t + a);
    let erfc = t * (-z * z + poly).exp();
    if x >= 0.0 { erfc / 2.0 } else { 1.0 - erfc / 2.0 }
}

/// Mean-field share of the routings on the top 10% of `biases` (sorted, largest first) when
/// each token takes the `k` largest of bias + a unit normal: the threshold τ with
/// Σ P(b_e + z > τ) = k, each expert's share P(b_e + z > τ)/k (the 10% boundary expert in part).
pub fn top10_share_of_biases(biases: &[f64], k: usize) -> f64 {
    let e = biases.len();
    let chosen = |tau: f64| biases.iter().map(|b| normal_tail(tau - b)).sum::<f64>();
    let (mut lo, mut hi) = (-60.0, 60.0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if chosen(mid) > k as f64 { lo = mid } else { hi = mid }
    }
    let tau = 0.5 * (lo + hi);
    let p: Vec<f64> = biases.iter().map(|b| normal_tail(tau - b)).collect();
    let total: f64 = p.iter().sum();
    let x = 0.1 * e as f64;
    let whole = x.floor() as usize;
    (p[..whole].iter().sum::<f64>() + p.get(whole).map_or(0.0, |q| (x - whole as f64) * q)) / total
}

/// `realistic` routing's biases b_e = −σ·(rank + ½)/experts (largest first), σ solved so that
/// the top 10% take [`REALISTIC_TOP10`] of the routings at this expert count and k.
pub fn realistic_biases(experts: usize, k: usize) -> Vec<f64> {
    let law = |sigma: f64| -> Vec<f64> { (0..experts).map(|r| -sigma * (r as f64 + 0.5) / experts as f64).collect() };
    if experts < 2 || k >= experts {
        return vec![0.0; experts];
    }
    let (mut lo, mut hi) = (0.0, 60.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if top10_share_of_biases(&law(mid), k) < REALISTIC_TOP10 { lo = mid } else { hi = mid }
    }
    law(0.5 * (lo + hi))
}

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
            if routing != Routing::Uniform {
                v.iter_mut().step_by(cols).for_each(|x| *x = SKEW_COMPONENT);
            }
            v
        }
        Init::Router(k) => {
            let mut v: Vec<f32> = (0..n).map(|_| rng.sym(sq3 / (cols as f32).sqrt())).collect();
            if routing != Routing::Uniform {
                let rows = n / cols;
                // a random rank per expert; the normalised dim-0 input is ≈ SKEW_COMPONENT
                let mut rank: Vec<usize> = (0..rows).collect();
                for i in (1..rows).rev() {
                    rank.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                let x0 = SKEW_COMPONENT / (1.0 + SKEW_COMPONENT * SKEW_COMPONENT / cols as f32).sqrt();
                let bias = match routing {
                    Routing::Realistic => realistic_biases(rows, k).iter().map(|&b| b as f32).collect(),
                    _ => (0..rows).map(|r| -SKEW_ALPHA * ((1 + r) as f32).ln()).collect::<Vec<f32>>(),
                };
                for (e, &r) in rank.iter().enumerate() {
                    v[e * cols] = bias[r] / x0;
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
            WKind::Mxfp4 => {
                // random e2m1 nibbles, every block's e8m0 scale putting e2m1's ±6 at ±a (no
                // f32 encode: that took minutes per gpt-oss-120b layer)
                let vals = p.rows * p.cols.div_ceil(32) * 16;
                for ch in blob[..vals].chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    ch.copy_from_slice(&r[..ch.len()]);
                }
                let e = ((a / 6.0).log2().round() as i32 + 127).clamp(0, 254) as u8;
                blob[vals..].iter_mut().for_each(|b| *b = e);
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

/// A preset's config cut to its first `layers` layers (a multimodal wrapper's under
/// `text_config`), and its full layer count.
fn cut_layers(mut raw: serde_json::Value, layers: Option<usize>, preset: &str) -> Result<(serde_json::Value, usize)> {
    // a multimodal wrapper keeps the text model's sizes under `text_config`
    let text_key = raw.get("text_config").is_some().then_some("text_config");
    let full = text_key.map_or(&raw, |k| &raw[k])["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    if let Some(n) = layers {
        if n == 0 || n > full {
            bail!("--layers must be in 1..={full} for {preset}");
        }
        let t = match text_key {
            Some(k) => &mut raw[k],
            None => &mut raw,
        };
        t["num_hidden_layers"] = json!(n);
        // a per-layer schedule keeps its first n entries
        for key in ["layer_types", "mlp_layer_types", "indexer_types"] {
            if let Some(lt) = t.get_mut(key).and_then(|v| v.as_array_mut()) {
                lt.truncate(n);
            }
        }
    }
    Ok((raw, full))
}

/// Writes a synthetic model of `preset` to `to` in the flash layout.
pub fn synth(preset: &str, to: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    synth_config(preset_config(preset)?, preset, to, opts)
}

/// [`synth`] of any shape: `raw` is a text model's `config.json` (a preset's, or a small one
/// for tests), named `preset` in the manifest.
pub fn synth_config(raw: serde_json::Value, preset: &str, to: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let (mut raw, full) = cut_layers(raw, opts.layers, preset)?;
    raw["flashmoe_synthetic"] = json!({"preset": preset, "routing": format!("{:?}", opts.routing).to_lowercase(),
        "seed": opts.seed, "full_layers": full});
    let cfg = ModelConfig::from_json(&raw)?;
    let ek = opts.experts;
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ([gate, up, down], biases, stride) = expert_layout(ek, h, inter, cfg.expert_bias);
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.ffns[i] == Ffn::Moe).collect();
    let specs = specs(&cfg);
    let names = crate::families::names_of(&cfg.model_type);
    let expert_total = stride * (ne * moe_layers.len()) as u64;
    let resident_total: u64 = specs
        .iter()
        .map(|(n, shape, _)| {
            let cols = *shape.last().unwrap_or(&1);
            TENSOR_ALIGN
                + resident_kind(names, n, shape, opts.dense).bytes(shape.iter().product::<usize>() / cols, cols) as u64
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
        let kind = resident_kind(names, n, shape, opts.dense);
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
    let experts = (!moe_layers.is_empty()).then(|| Experts {
        kind: ek.name(),
        num_experts: ne,
        stride,
        gate,
        up,
        down,
        biases,
        layers,
    });
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

#[cfg(test)]
mod cut_tests {
    use super::*;

    #[test]
    fn every_preset_cuts_to_one_layer_and_parses() {
        for p in crate::families::presets() {
            let (raw, full) = cut_layers(preset_config(p).unwrap(), Some(1), p).unwrap();
            assert!(full > 1, "{p}");
            assert_eq!(ModelConfig::from_json(&raw).unwrap().num_layers, 1, "{p}");
            assert!(cut_layers(preset_config(p).unwrap(), Some(full + 1), p).is_err());
        }
    }
    #[test]
    fn normal_tail_matches_known_values() {
        for (x, want) in [(0.0, 0.5), (1.0, 0.158_655_254), (-2.0, 0.977_249_868), (3.5, 2.326_290_8e-4)] {
            let got = normal_tail(x);
            assert!((got - want).abs() <= 2e-7 * want.max(1e-3) + 1e-9, "tail({x}) = {got}, want {want}");
        }
    }

    /// `realistic` biases hit the target share at any expert count (mean field), and a Monte
    /// Carlo top-k over bias + unit normals (Box-Muller on the synth generator) agrees.
    #[test]
    fn realistic_biases_give_the_target_share_at_any_expert_count() {
        for (e, k) in [(8, 2), (32, 4), (128, 8), (512, 10), (384, 8)] {
            let b = realistic_biases(e, k);
            assert!(b.windows(2).all(|w| w[0] > w[1]), "{e}: largest first");
            assert!((top10_share_of_biases(&b, k) - REALISTIC_TOP10).abs() < 1e-3, "{e} experts");
        }
        let (e, k, tokens) = (64, 4, 4000);
        let b = realistic_biases(e, k);
        let mut rng = Rng(11);
        let mut uni = || ((rng.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let mut counts = vec![0u64; e];
        let mut l = vec![(0.0, 0); e];
        for _ in 0..tokens {
            for (i, x) in l.iter_mut().enumerate() {
                let z = (-2.0 * uni().ln()).sqrt() * (std::f64::consts::TAU * uni()).cos();
                *x = (b[i] + z, i);
            }
            l.sort_unstable_by(|a, c| c.0.total_cmp(&a.0));
            l[..k].iter().for_each(|&(_, i)| counts[i] += 1);
        }
        // the top 10% by bias: 6.4 experts
        let top = (counts[..6].iter().sum::<u64>() as f64 + 0.4 * counts[6] as f64) / (tokens * k) as f64;
        assert!((top - REALISTIC_TOP10).abs() < 0.015, "Monte Carlo share {top}");
    }

    /// MXFP4 extents are written as nibbles and scales directly: every part decodes to finite
    /// values within e2m1's ±6 at the part's amplitude (the scale its nearest power of two), and
    /// not all zero.
    #[test]
    fn mxfp4_extents_hold_values_at_the_parts_amplitude() {
        let (h, i) = (96, 64);
        let (parts, _, stride) = expert_layout(WKind::Mxfp4, h, i, false);
        let mut out = vec![0u8; stride as usize];
        random_extent(WKind::Mxfp4, &parts, stride as usize, &mut Rng(7), &mut out);
        for (pi, p) in parts.iter().enumerate() {
            let a = 3f32.sqrt() / (p.cols as f32).sqrt() * if pi == 2 { 0.1 } else { 1.0 };
            let len = WKind::Mxfp4.bytes(p.rows, p.cols);
            let data = &out[p.offset as usize..p.offset as usize + len];
            let m = crate::tensor::MatRef { data, rows: p.rows, cols: p.cols, kind: WKind::Mxfp4 };
            let v = m.to_f32();
            let top = v.iter().fold(0f32, |t, x| t.max(x.abs()));
            assert!(v.iter().all(|x| x.is_finite()) && top > 0.0 && top <= 2.0 * a, "part {pi}: max {top}, a {a}");
        }
    }
}
