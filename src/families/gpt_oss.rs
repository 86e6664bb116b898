//! gpt-oss (`gpt_oss`; gpt-oss-120b 117B-A5.1B, gpt-oss-20b): GQA attention with biases on q, k,
//! v and o, a learned sink logit per head, sliding-window layers alternating with full ones
//! (`layer_types`, `sliding_window`), YaRN RoPE; a router with a bias whose top-k logits are
//! softmaxed among themselves; experts with biases, gate and up interleaved in one
//! `gate_up_proj` (even rows gate, odd rows up), and a clamped SwiGLU
//! (g ≤ 7, |u| ≤ 7, g·σ(1.702·g)·(u + 1)). Experts come as released (MXFP4: `*_blocks` and
//! `*_scales`, an e8m0 scale per 32 e2m1 values) or as the bf16 twin transformers writes
//! (`gate_up_proj` `[E, hidden, 2·inter]`, applied as x·W).
//! transformers: `models/gpt_oss/modeling_gpt_oss.py`, `integrations/mxfp4.py`.

use super::{Family, HF, Names, Traits};
use crate::config::{Act, ModelConfig, QkNorm, opt_f64, opt_usize, per_layer};
use crate::import::Expert;
use crate::source::{Format, Source};
use crate::tensor::{Mat, WKind};
use anyhow::Result;
use serde_json::{Value, json};

pub struct GptOss;

/// gpt-oss's names: the router is `mlp.router`.
pub const NAMES: Names = Names { router: "router", ..HF };

impl Family for GptOss {
    fn name(&self) -> &'static str {
        "gpt-oss"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gpt_oss"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits { always_renormalize: true, ..Traits::PLAIN }
    }

    fn names(&self) -> &'static Names {
        &NAMES
    }

    /// Harmony: channels and recipients in message headers ([`crate::harmony`]).
    fn tool_format(&self, _model_type: &str) -> crate::toolcall::ToolFormat {
        crate::toolcall::ToolFormat::Harmony
    }

    fn configure(&self, t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        let bias = crate::config::opt_bool(t, "attention_bias", true)?;
        let a = &mut cfg.attn;
        (a.qk_norm, a.qkv_bias, a.o_bias, a.sinks) = (QkNorm::None, bias, bias, true);
        let window = opt_usize(t, "sliding_window", 128)?.max(1);
        let n = cfg.num_layers;
        let kinds = [("sliding_attention", true), ("full_attention", false)];
        // transformers' default: even layers slide
        let sliding = per_layer(t, "layer_types", n, &kinds)?.unwrap_or_else(|| (0..n).map(|i| i % 2 == 0).collect());
        a.window = sliding.iter().map(|&s| s.then_some(window)).collect();
        cfg.moe_intermediate_size = std::mem::take(&mut cfg.intermediate_size);
        cfg.router.logit_bias = true;
        cfg.router.softmax_chosen = true;
        cfg.expert_bias = true;
        cfg.expert_act = Act::ClampedSwiglu { alpha: 1.702, limit: opt_f64(t, "swiglu_limit", 7.0)? as f32 };
        Ok(())
    }

    fn expert(&self, ck: &dyn Source, cfg: &ModelConfig, pre: &str, layer: usize, e: usize) -> Option<Result<Expert>> {
        let p = format!("{}.{}.{}", NAMES.layer(pre, layer), NAMES.ffn, NAMES.experts);
        Some(expert(ck, cfg, &p, e))
    }

    fn presets(&self) -> &'static [&'static str] {
        &["gpt-oss-120b", "gpt-oss-20b"]
    }

    /// openai/gpt-oss-120b and gpt-oss-20b `config.json`.
    fn preset(&self, name: &str) -> Option<Value> {
        let (layers, experts) = match name {
            "gpt-oss-120b" => (36, 128),
            "gpt-oss-20b" => (24, 32),
            _ => return None,
        };
        Some(json!({
            "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
            "num_local_experts": experts, "num_experts_per_tok": 4, "sliding_window": 128,
            "layer_types": (0..layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>(),
            "attention_bias": true, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": false, "original_max_position_embeddings": 4096},
            "max_position_embeddings": 131072, "tie_word_embeddings": false,
        }))
    }
}

/// Expert `e` under `p` (`….mlp.experts`): MXFP4 blocks as released (kept bit for bit), or the
/// bf16 twin; or from stacks of gate, up and down apart with their biases (`….mlp.switch_mlp`,
/// GGUF's `ffn_*_exps`), kept as stored.
fn expert(ck: &dyn Source, cfg: &ModelConfig, p: &str, e: usize) -> Result<Expert> {
    let (h, i, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let sw = p.strip_suffix(NAMES.experts).map(|f| format!("{f}{}", NAMES.mlx_experts));
    if let Some(sw) = sw.filter(|sw| ck.has(&format!("{sw}.{}.weight", NAMES.gate_proj))) {
        let projs = [(NAMES.gate_proj, i, h), (NAMES.up_proj, i, h), (NAMES.down_proj, h, i)];
        let m = |&(proj, rows, cols): &(&str, usize, usize)| {
            ck.mat_rows(&format!("{sw}.{proj}.weight"), &[ne, rows, cols], e * rows..(e + 1) * rows)
        };
        let b = |&(proj, rows, _): &(&str, usize, usize)| -> Result<Vec<f32>> {
            Ok(ck.mat_rows(&format!("{sw}.{proj}.bias"), &[ne, rows], e..e + 1)?.to_f32())
        };
        return Ok(Expert {
            mats: [m(&projs[0])?, m(&projs[1])?, m(&projs[2])?],
            bias: Some([b(&projs[0])?, b(&projs[1])?, b(&projs[2])?]),
        });
    }
    let bias = |name: &str, len: usize| -> Result<Vec<f32>> {
        Ok(ck.mat_rows(&format!("{p}.{name}"), &[ne, len], e..e + 1)?.to_f32())
    };
    let gate_up_bias = bias("gate_up_proj_bias", 2 * i)?;
    let deint = |v: &[f32], parity: usize| (0..i).map(|j| v[2 * j + parity]).collect::<Vec<f32>>();
    let bias = Some([deint(&gate_up_bias, 0), deint(&gate_up_bias, 1), bias("down_proj_bias", h)?]);
    let (gu, dn) = (format!("{p}.gate_up_proj"), format!("{p}.down_proj"));
    if ck.tensor(&gu)?.format == Format::Native(WKind::Mxfp4) {
        // gate the even rows, up the odd ones
        let gu = ck.mat_rows(&gu, &[ne, 2 * i, h], 2 * i * e..2 * i * (e + 1))?;
        let d = ck.mat_rows(&dn, &[ne, h, i], h * e..h * (e + 1))?;
        let even: Vec<_> = (0..i).map(|j| 2 * j..2 * j + 1).collect();
        let odd: Vec<_> = (0..i).map(|j| 2 * j + 1..2 * j + 2).collect();
        return Ok(Expert { mats: [gu.gather_rows(&even), gu.gather_rows(&odd), d], bias });
    }
    // transformers' parameters, applied as x·W: [hidden, 2·inter] and [inter, hidden]
    let t = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
        let w = ck.mat_rows(name, &[ne, rows, cols], e * rows..(e + 1) * rows)?.to_f32();
        Ok((0..cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| w[r * cols + c]).collect())
    };
    let (gate_up, down) = (t(&gu, h, 2 * i)?, t(&dn, i, h)?);
    let rows = |parity: usize| -> Vec<f32> {
        (0..i).flat_map(|j| gate_up[(2 * j + parity) * h..(2 * j + parity + 1) * h].iter().copied()).collect()
    };
    Ok(Expert {
        mats: [Mat::from_f32(i, h, rows(0))?, Mat::from_f32(i, h, rows(1))?, Mat::from_f32(h, i, down)?],
        bias,
    })
}
