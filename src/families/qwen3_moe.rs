//! Qwen3-MoE (`qwen3_moe`; Qwen3-30B-A3B, Qwen3-235B-A22B): GQA attention with per-head q/k
//! RMSNorm in every layer, softmax top-k routing (`norm_topk_prob` from the config), no shared
//! expert; dense layers by `decoder_sparse_step` / `mlp_only_layers`.
//! transformers: `models/qwen3_moe/modeling_qwen3_moe.py`.

use super::{Family, Traits};
use serde_json::{Value, json};

pub struct Qwen3Moe;

impl Family for Qwen3Moe {
    fn name(&self) -> &'static str {
        "Qwen3-MoE"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3_moe"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits {
            multimodal: false,
            deltanet_layers: false,
            dense_layers: true,
            shared_expert: false,
            zero_centered_norm: false,
            gated_attention: false,
            partial_rotary_default: 1.0,
            always_renormalize: false,
        }
    }

    fn presets(&self) -> &'static [&'static str] {
        &["qwen3-235b-a22b", "qwen3-30b-a3b"]
    }

    /// From the published config.json files (the 235B one also appears in public training
    /// scripts: 94 layers, 64/4 heads of 128, 128 experts, top-8, intermediate 1536).
    fn preset(&self, name: &str) -> Option<Value> {
        let (hidden, layers, heads, inter) = match name {
            "qwen3-235b-a22b" => (4096, 94, 64, 1536),
            "qwen3-30b-a3b" => (2048, 48, 32, 768),
            _ => return None,
        };
        Some(json!({
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
            "num_experts_per_tok": 8, "moe_intermediate_size": inter, "intermediate_size": inter * 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false, "max_position_embeddings": 40960,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        }))
    }
}
