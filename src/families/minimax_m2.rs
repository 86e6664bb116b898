//! MiniMax-M2 (`minimax_m2`; M2, M2.1, M2.5, M2.7: 230B-A10B): GQA attention whose q and k are
//! RMS-normalised over the whole projection (all heads at once) before the head split, partial
//! RoPE (`rotary_dim`), sigmoid routing with a score correction bias and always-renormalised
//! weights, no shared expert, `block_sparse_moe.experts.N.w1/w3/w2`.
//! transformers: `models/minimax_m2/modeling_minimax_m2.py`.

use super::{BLOCK_SPARSE, Family, Names, Traits};
use crate::config::{ModelConfig, QkNorm};
use anyhow::Result;
use serde_json::{Value, json};

pub struct MiniMaxM2;

impl Family for MiniMaxM2 {
    fn name(&self) -> &'static str {
        "MiniMax-M2"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["minimax_m2"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits { always_renormalize: true, ..Traits::PLAIN }
    }

    fn names(&self) -> &'static Names {
        &BLOCK_SPARSE
    }

    fn configure(&self, _t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        cfg.attn.qk_norm = QkNorm::Whole;
        cfg.moe_intermediate_size = std::mem::take(&mut cfg.intermediate_size);
        cfg.router.sigmoid = true;
        cfg.router.correction_bias = true;
        cfg.router.renormalize = true;
        Ok(())
    }

    fn tool_format(&self, _model_type: &str) -> crate::toolcall::ToolFormat {
        crate::toolcall::ToolFormat::MiniMax
    }

    fn presets(&self) -> &'static [&'static str] {
        &["minimax-m2"]
    }

    /// MiniMaxAI/MiniMax-M2 `config.json` (the transformers defaults are the same shape).
    fn preset(&self, name: &str) -> Option<Value> {
        (name == "minimax-m2").then(|| {
            json!({
                "model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
                "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                "num_local_experts": 256, "num_experts_per_tok": 8, "rotary_dim": 64, "rope_theta": 5000000.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 196608, "tie_word_embeddings": false,
            })
        })
    }
}
