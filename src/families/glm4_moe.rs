//! GLM-4.5 / 4.6 / 4.7 (`glm4_moe`; 355B-A32B, Air 106B-A12B): GQA attention with q/k/v biases,
//! optional per-head q/k norm (`use_qk_norm`), half-split partial RoPE (factor 0.5 by default),
//! sigmoid routing with a score correction bias, group limits and `routed_scaling_factor`, an
//! ungated shared expert (`shared_experts`, `n_shared_experts` × the expert width), and dense
//! layers first (`first_k_dense_replace`). The checkpoint's MTP layers (index
//! `num_hidden_layers` and up) are not part of the text model and are skipped.
//! transformers: `models/glm4_moe/modeling_glm4_moe.py`.

use super::{Family, Names, SHARED_EXPERTS, Traits};
use crate::config::{Ffn, ModelConfig, QkNorm, opt_bool, opt_usize};
use anyhow::Result;
use serde_json::{Value, json};

pub struct Glm4Moe;

impl Family for Glm4Moe {
    fn name(&self) -> &'static str {
        "GLM-4.5"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["glm4_moe"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits { partial_rotary_default: 0.5, ..Traits::PLAIN }
    }

    fn names(&self) -> &'static Names {
        &SHARED_EXPERTS
    }

    fn configure(&self, t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        cfg.attn.qk_norm = if opt_bool(t, "use_qk_norm", false)? { QkNorm::PerHead } else { QkNorm::None };
        cfg.attn.qkv_bias = opt_bool(t, "attention_bias", false)?;
        let dense = opt_usize(t, "first_k_dense_replace", 1)?.min(cfg.num_layers);
        cfg.ffns.iter_mut().take(dense).for_each(|f| *f = Ffn::Dense);
        super::deepseek_moe(t, cfg)
    }

    fn tool_format(&self, _model_type: &str) -> crate::toolcall::ToolFormat {
        crate::toolcall::ToolFormat::Glm
    }

    fn presets(&self) -> &'static [&'static str] {
        &["glm-4.5", "glm-4.5-air"]
    }

    /// zai-org/GLM-4.5 and GLM-4.5-Air `config.json` (GLM-4.6/4.7 keep the 4.5 shape).
    fn preset(&self, name: &str) -> Option<Value> {
        let (hidden, inter, moe_inter, layers, experts, dense, scale, qk_norm) = match name {
            "glm-4.5" => (5120, 12288, 1536, 92, 160, 3, 2.5, true),
            "glm-4.5-air" => (4096, 10944, 1408, 46, 128, 1, 1.0, false),
            _ => return None,
        };
        Some(json!({
            "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": hidden, "intermediate_size": inter,
            "moe_intermediate_size": moe_inter, "num_hidden_layers": layers, "num_attention_heads": 96,
            "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": experts, "num_experts_per_tok": 8,
            "n_shared_experts": 1, "first_k_dense_replace": dense, "routed_scaling_factor": scale,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "use_qk_norm": qk_norm,
            "attention_bias": true, "partial_rotary_factor": 0.5, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "num_nextn_predict_layers": 1,
            "tie_word_embeddings": false,
        }))
    }
}
