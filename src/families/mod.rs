//! Model families: everything that differs between `model_type`s lives in one file per family
//! (config defaults, the checkpoint's tensor layout where it departs from the common names,
//! synth presets), and this registry maps a `model_type` to its family. Generic code (config,
//! load, convert, synth, inspect) asks the family or reads the [`Traits`] it recorded in the
//! config, never the family's identity.
//!
//! Adding a family: a file with a unit struct implementing [`Family`], one line in [`FAMILIES`],
//! and a fixture from `transformers` (docs/ARCHITECTURE.md walks through it).

use crate::config::{LinearAttnConfig, ModelConfig};
use crate::source::Source;
use crate::tensor::Mat;
use anyhow::{Result, bail};
use serde_json::Value;

mod names;
mod qwen3_5_moe;
mod qwen3_moe;
mod qwen3_next;

mod deepseek_v3;
mod glm4_moe;
mod glm_moe_dsa;
mod gpt_oss;
mod minimax_m2;
mod mixtral;

pub use names::{BLOCK_SPARSE, HF, Names, SHARED_EXPERTS, weight};

/// The math and config switches a family sets; generic code reads these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Traits {
    /// The text model's config sits under `text_config`, its tensors under `language_model`.
    pub multimodal: bool,
    /// Whether `layer_types` / `full_attention_interval` apply (else every layer is attention).
    pub deltanet_layers: bool,
    /// Whether `decoder_sparse_step` / `mlp_only_layers` apply (else every layer is MoE).
    pub dense_layers: bool,
    /// Whether `shared_expert_intermediate_size` applies.
    pub shared_expert: bool,
    /// RMSNorm weights are stored as offsets from one (`(1 + w)·x̂`).
    pub zero_centered_norm: bool,
    /// q_proj also yields a sigmoid output gate per head.
    pub gated_attention: bool,
    /// `partial_rotary_factor` when config.json gives none.
    pub partial_rotary_default: f64,
    /// Top-k weights are renormalised whatever `norm_topk_prob` says.
    pub always_renormalize: bool,
}

impl Traits {
    /// A decoder of plain attention layers, every layer MoE, nothing Qwen-specific; families
    /// start from it and set what differs.
    pub const PLAIN: Traits = Traits {
        multimodal: false,
        deltanet_layers: false,
        dense_layers: false,
        shared_expert: false,
        zero_centered_norm: false,
        gated_attention: false,
        partial_rotary_default: 1.0,
        always_renormalize: false,
    };
}

/// One model family.
pub trait Family: Sync {
    /// A short name (`inspect` prints it).
    fn name(&self) -> &'static str;
    /// The `model_type` values it reads.
    fn model_types(&self) -> &'static [&'static str];
    /// Its switches for one of its `model_type`s.
    fn traits(&self, model_type: &str) -> Traits;
    /// Where its checkpoints keep each tensor.
    fn names(&self) -> &'static Names {
        &HF
    }
    /// Reads what only this family's `config.json` says into `cfg`, after the common fields
    /// (`t`: the text model's config). Router, attention options, dense-first layers, etc.
    fn configure(&self, _t: &Value, _cfg: &mut ModelConfig) -> Result<()> {
        Ok(())
    }
    /// Routed expert `e` of layer `layer` when this family's checkpoints store experts in a
    /// layout of their own (`None`: the common layouts of [`crate::import::expert`]).
    fn expert(
        &self,
        _ck: &dyn Source,
        _cfg: &ModelConfig,
        _pre: &str,
        _layer: usize,
        _e: usize,
    ) -> Option<Result<crate::import::Expert>> {
        None
    }
    /// How its chat template writes tool calls (what the server parses).
    fn tool_format(&self, _model_type: &str) -> crate::toolcall::ToolFormat {
        crate::toolcall::ToolFormat::Qwen
    }
    /// Synth presets: names and their text model's `config.json`.
    fn presets(&self) -> &'static [&'static str] {
        &[]
    }
    fn preset(&self, _name: &str) -> Option<Value> {
        None
    }
    /// The DeltaNet input projections of the layer at tensor prefix `p` as (qkv, z, b, a), read
    /// from the checkpoint's own layout (default: four separate tensors).
    fn deltanet_inputs(&self, ck: &dyn Source, p: &str, l: &LinearAttnConfig, h: usize) -> Result<[Mat; 4]> {
        let (cd, vd, nv) = (l.conv_dim(), l.value_dim(), l.num_v_heads);
        Ok([
            ck.mat(&format!("{p}.in_proj_qkv.weight"), &[cd, h])?,
            ck.mat(&format!("{p}.in_proj_z.weight"), &[vd, h])?,
            ck.mat(&format!("{p}.in_proj_b.weight"), &[nv, h])?,
            ck.mat(&format!("{p}.in_proj_a.weight"), &[nv, h])?,
        ])
    }
    /// Names and shapes of those projections as the checkpoint stores them (what synth writes).
    fn deltanet_input_tensors(&self, p: &str, l: &LinearAttnConfig, h: usize) -> Vec<(String, Vec<usize>)> {
        let (cd, vd, nv) = (l.conv_dim(), l.value_dim(), l.num_v_heads);
        vec![
            (format!("{p}.in_proj_qkv.weight"), vec![cd, h]),
            (format!("{p}.in_proj_z.weight"), vec![vd, h]),
            (format!("{p}.in_proj_b.weight"), vec![nv, h]),
            (format!("{p}.in_proj_a.weight"), vec![nv, h]),
        ]
    }
}

/// DeepSeek's MoE recipe, which GLM-4.5 and the MLA lineage share: sigmoid scores, a
/// correction bias for the choice only, groups, `routed_scaling_factor`, and
/// `n_shared_experts` × the expert width as one ungated shared expert.
pub(crate) fn deepseek_moe(t: &Value, cfg: &mut ModelConfig) -> Result<()> {
    use crate::config::{opt_bool, opt_f64, opt_usize};
    cfg.shared_expert_intermediate_size = opt_usize(t, "n_shared_experts", 1)? * cfg.moe_intermediate_size;
    cfg.shared_expert_gated = false;
    let r = &mut cfg.router;
    r.sigmoid = true;
    r.correction_bias = true;
    r.renormalize = opt_bool(t, "norm_topk_prob", true)?;
    r.scale = opt_f64(t, "routed_scaling_factor", 1.0)? as f32;
    r.n_group = opt_usize(t, "n_group", 1)?;
    r.topk_group = opt_usize(t, "topk_group", 1)?;
    Ok(())
}

/// Every supported family, in the order `inspect` and error messages list them.
static FAMILIES: &[&dyn Family] = &[
    &qwen3_5_moe::Qwen35Moe,
    &qwen3_next::Qwen3Next,
    &qwen3_moe::Qwen3Moe,
    &glm4_moe::Glm4Moe,
    &minimax_m2::MiniMaxM2,
    &mixtral::Mixtral,
    &gpt_oss::GptOss,
    &deepseek_v3::DeepseekV3,
    &glm_moe_dsa::GlmMoeDsa,
];

/// The tensor names of a `model_type`'s checkpoints (the common ones for an unknown type:
/// config parsing has refused it already).
pub fn names_of(model_type: &str) -> &'static Names {
    by_model_type(model_type).map_or(&HF, |f| f.names())
}

/// The family of a `model_type`.
pub fn by_model_type(model_type: &str) -> Result<&'static dyn Family> {
    match FAMILIES.iter().find(|f| f.model_types().contains(&model_type)) {
        Some(f) => Ok(*f),
        None => {
            let all: Vec<&str> = FAMILIES.iter().flat_map(|f| f.model_types().iter().copied()).collect();
            bail!("config.json: unsupported model_type `{model_type}` (supported: {})", all.join(", "))
        }
    }
}

/// Names of every synth preset.
pub fn presets() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|f| f.presets().iter().copied()).collect()
}

/// The text model's `config.json` of a synth preset.
pub fn preset_config(name: &str) -> Result<Value> {
    match FAMILIES.iter().find_map(|f| f.preset(name)) {
        Some(v) => Ok(v),
        None => bail!("unknown preset `{name}` (one of: {})", presets().join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_type_and_preset_has_one_family() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            for mt in f.model_types() {
                assert!(seen.insert(*mt), "{mt} claimed twice");
                assert_eq!(by_model_type(mt).unwrap().name(), f.name());
            }
        }
        for p in presets() {
            let cfg = preset_config(p).unwrap();
            let mt = cfg["model_type"].as_str().unwrap();
            assert!(by_model_type(mt).is_ok(), "preset {p}: {mt}");
            crate::config::ModelConfig::from_json(&cfg).unwrap();
        }
        assert!(by_model_type("llama").err().unwrap().to_string().contains("qwen3_moe"));
        assert!(preset_config("nope").is_err());
    }
}
