//! GLM-5 / 5.1 / 5.2 (`glm_moe_dsa`, 744B-A40B): DeepSeek-V3.2's recipe — latent attention with
//! q-LoRA and interleaved RoPE, the lightning indexer (here with interleaved RoPE too), the
//! DeepSeek router with one group, a plain shared expert, three dense layers first — at GLM's
//! sizes. GLM-5.2+ lets layers reuse the last full layer's selection (`indexer_types`:
//! `shared` layers ship no indexer weights). The MTP layer (index `num_hidden_layers`) is
//! skipped. transformers: `models/glm_moe_dsa/`.

use super::deepseek_v3::configure_mla;
use super::{Family, Names, SHARED_EXPERTS, Traits};
use crate::config::{ModelConfig, field, opt_usize, per_layer};
use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

pub struct GlmMoeDsa;

impl Family for GlmMoeDsa {
    fn name(&self) -> &'static str {
        "GLM-5"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["glm_moe_dsa"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits::PLAIN
    }

    fn names(&self) -> &'static Names {
        &SHARED_EXPERTS
    }

    fn configure(&self, t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        let n = cfg.num_layers;
        // transformers' schedule: a list, a pattern of F/S, or every `freq`-th layer from `offset`
        let roles = [("full", true), ("shared", false)];
        let listed = match per_layer(t, "indexer_types", n, &roles)? {
            Some(l) => Some(l),
            None if field(t, "index_topk_pattern").is_some_and(Value::is_array) => {
                per_layer(t, "index_topk_pattern", n, &roles)?
            }
            None => None,
        };
        let own: Vec<bool> = match (listed, field(t, "index_topk_pattern")) {
            (Some(l), _) => l,
            (None, Some(Value::String(p))) => {
                if p.chars().count() != n {
                    bail!("config.json: index_topk_pattern has {} letters, num_hidden_layers is {n}", p.len());
                }
                p.chars()
                    .map(|c| match c {
                        'F' => Ok(true),
                        'S' => Ok(false),
                        _ => Err(anyhow!("config.json: index_topk_pattern holds `{c}` (F or S)")),
                    })
                    .collect::<Result<_>>()?
            }
            (None, Some(_)) => bail!("config.json: field `index_topk_pattern` is not a string or list"),
            (None, None) => {
                let freq = opt_usize(t, "index_topk_freq", 1)?.max(1);
                let offset = opt_usize(t, "index_skip_topk_offset", 2)?;
                (0..n).map(|i| (i + 1).saturating_sub(offset) % freq == 0).collect()
            }
        };
        configure_mla(t, cfg, true, Some((true, own)), 3)
    }

    fn tool_format(&self, _model_type: &str) -> crate::toolcall::ToolFormat {
        crate::toolcall::ToolFormat::Glm
    }

    fn presets(&self) -> &'static [&'static str] {
        &["glm-5"]
    }

    /// zai-org/GLM-5 `config.json`.
    fn preset(&self, name: &str) -> Option<Value> {
        (name == "glm-5").then(|| {
            json!({
                "model_type": "glm_moe_dsa", "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
                "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
                "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
                "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 2048, "qk_rope_head_dim": 64,
                "v_head_dim": 256, "qk_nope_head_dim": 192, "n_group": 1, "topk_group": 1,
                "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": true,
                "index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048,
                "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "num_nextn_predict_layers": 1, "tie_word_embeddings": false,
            })
        })
    }
}
