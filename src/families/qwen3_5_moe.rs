//! Qwen3.5-MoE (`qwen3_5_moe`, the multimodal wrapper whose vision tower is skipped, and
//! `qwen3_5_moe_text`): three Gated DeltaNet layers per gated-attention layer, zero-centred
//! RMSNorm, partial RoPE (a quarter of each head by default), every layer MoE with a
//! sigmoid-gated shared expert, top-k weights always renormalised.
//! transformers: `models/qwen3_5_moe/modeling_qwen3_5_moe.py`.

use super::{Family, Traits};
use serde_json::{Value, json};

pub struct Qwen35Moe;

impl Family for Qwen35Moe {
    fn name(&self) -> &'static str {
        "Qwen3.5-MoE"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3_5_moe", "qwen3_5_moe_text"]
    }

    fn traits(&self, model_type: &str) -> Traits {
        Traits {
            multimodal: model_type == "qwen3_5_moe",
            deltanet_layers: true,
            dense_layers: false,
            shared_expert: true,
            zero_centered_norm: true,
            gated_attention: true,
            partial_rotary_default: 0.25,
            always_renormalize: true,
        }
    }

    fn presets(&self) -> &'static [&'static str] {
        &["qwen3.5-397b-a17b", "qwen3.5-122b-a10b", "qwen3.5-35b-a3b"]
    }

    /// Qwen3.5-397B-A17B from ../shared/reference/model-math.md (checked against the published
    /// config); Qwen3.5-35B-A3B equals the defaults of transformers' `Qwen3_5MoeTextConfig`.
    /// Qwen3.5-122B-A10B: 48 layers (12 attention), 256 experts, 8 routed + 1 shared, as its
    /// model card states; hidden 3072, heads 32/2, DeltaNet 16/64 heads and intermediate 1024
    /// are the published config's values as recalled, not re-checked against the file.
    fn preset(&self, name: &str) -> Option<Value> {
        let (hidden, layers, heads, v_heads, experts, k, inter) = match name {
            "qwen3.5-397b-a17b" => (4096, 60, 32, 64, 512, 10, 1024),
            "qwen3.5-122b-a10b" => (3072, 48, 32, 64, 256, 8, 1024),
            "qwen3.5-35b-a3b" => (2048, 40, 16, 32, 256, 8, 512),
            _ => return None,
        };
        Some(json!({
            "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 256,
            "linear_num_key_heads": 16, "linear_num_value_heads": v_heads, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
            "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter,
            "shared_expert_intermediate_size": inter, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
            "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        }))
    }
}
