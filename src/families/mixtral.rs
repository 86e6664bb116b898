//! Mixtral (`mixtral`; Mixtral-8x7B, 8x22B): GQA attention without q/k norms, full RoPE, softmax
//! top-2 always renormalised, no shared expert, `block_sparse_moe.experts.N.w1/w3/w2`, and an
//! optional sliding window (`sliding_window`, null in the released configs).
//! transformers: `models/mixtral/modeling_mixtral.py`.

use super::{BLOCK_SPARSE, Family, Names, Traits};
use crate::config::{ModelConfig, QkNorm, field, req_usize};
use anyhow::Result;
use serde_json::{Value, json};

pub struct Mixtral;

impl Family for Mixtral {
    fn name(&self) -> &'static str {
        "Mixtral"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["mixtral"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits { always_renormalize: true, ..Traits::PLAIN }
    }

    fn names(&self) -> &'static Names {
        &BLOCK_SPARSE
    }

    fn configure(&self, t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        cfg.attn.qk_norm = QkNorm::None;
        // the experts' width is `intermediate_size`; there are no dense layers
        cfg.moe_intermediate_size = std::mem::take(&mut cfg.intermediate_size);
        if field(t, "sliding_window").is_some() {
            let w = req_usize(t, "sliding_window")?.max(1);
            cfg.attn.window.iter_mut().for_each(|x| *x = Some(w));
        }
        Ok(())
    }

    fn presets(&self) -> &'static [&'static str] {
        &["mixtral-8x22b"]
    }

    /// mistralai/Mixtral-8x22B-v0.1 `config.json`.
    fn preset(&self, name: &str) -> Option<Value> {
        (name == "mixtral-8x22b").then(|| {
            json!({
                "model_type": "mixtral", "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "max_position_embeddings": 65536, "sliding_window": null, "tie_word_embeddings": false,
            })
        })
    }
}
