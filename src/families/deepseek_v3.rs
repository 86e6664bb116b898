//! DeepSeek-V3 / R1 (`deepseek_v3`, 671B-A37B), Kimi-K2 / K2.5 (`kimi_k2`, and `kimi_k25`'s
//! text model: the DeepSeek-V3 architecture at 1T-A32B) and DeepSeek-V3.2 (`deepseek_v32`):
//! multi-head latent attention with interleaved RoPE and DeepSeek's YaRN (cos/sin unscaled,
//! the softmax scale × mscale²), sigmoid routing with a score correction bias, group-limited
//! top-k and `routed_scaling_factor`, one plain shared expert, dense layers first. V3.2 adds
//! the lightning indexer (half-split RoPE on its first dims). MTP layers (index
//! `num_hidden_layers` and up) are skipped. transformers: `models/deepseek_v3/`,
//! `models/deepseek_v32/`, `models/kimi_k25/`.

use super::{Family, Names, SHARED_EXPERTS, Traits};
use crate::config::{Ffn, IndexerSpec, Mixer, MlaSpec, ModelConfig, field, opt_bool, opt_usize, per_layer, req_usize};
use anyhow::{Result, bail};
use serde_json::{Value, json};

pub struct DeepseekV3;

impl Family for DeepseekV3 {
    fn name(&self) -> &'static str {
        "DeepSeek-V3"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["deepseek_v3", "kimi_k2", "kimi_k25", "deepseek_v32"]
    }

    fn traits(&self, model_type: &str) -> Traits {
        Traits { multimodal: model_type == "kimi_k25", ..Traits::PLAIN }
    }

    fn names(&self) -> &'static Names {
        &SHARED_EXPERTS
    }

    fn configure(&self, t: &Value, cfg: &mut ModelConfig) -> Result<()> {
        let v32 = cfg.model_type == "deepseek_v32";
        // V3.2 and Kimi always rotate interleaved pairs; V3 says so (transformers' default: yes)
        let interleaved = v32 || opt_bool(t, "rope_interleave", true)?;
        let own = vec![true; cfg.num_layers];
        configure_mla(t, cfg, interleaved, v32.then_some((false, own)), 3)
    }

    /// DeepSeek's tool-call tokens (V3/R1, V3.1 and V3.2's DSML forms); Kimi's sections.
    fn tool_format(&self, model_type: &str) -> crate::toolcall::ToolFormat {
        use crate::toolcall::ToolFormat;
        if model_type.starts_with("kimi") { ToolFormat::Kimi } else { ToolFormat::DeepSeek }
    }

    fn presets(&self) -> &'static [&'static str] {
        &["deepseek-v3", "deepseek-v3.2", "kimi-k2.5"]
    }

    /// deepseek-ai/DeepSeek-V3 and V3.2-Exp `config.json`; moonshotai/Kimi-K2.5's `text_config`
    /// (inside its `kimi_k25` wrapper).
    fn preset(&self, name: &str) -> Option<Value> {
        let v3 = |mt: &str| {
            json!({
                "model_type": mt, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
                "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": true,
                "scoring_func": "sigmoid", "topk_method": "noaux_tc", "max_position_embeddings": 163840,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_nextn_predict_layers": 1,
                "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                "tie_word_embeddings": false,
            })
        };
        match name {
            "deepseek-v3" => Some(v3("deepseek_v3")),
            "deepseek-v3.2" => {
                let mut c = v3("deepseek_v32");
                c["index_n_heads"] = json!(64);
                c["index_head_dim"] = json!(128);
                c["index_topk"] = json!(2048);
                Some(c)
            }
            "kimi-k2.5" => Some(json!({
                "model_type": "kimi_k25", "tie_word_embeddings": false,
                "text_config": {
                    "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
                    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384,
                    "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
                    "topk_group": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "norm_topk_prob": true,
                    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "max_position_embeddings": 262144,
                    "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "num_nextn_predict_layers": 0,
                    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                    "tie_word_embeddings": false,
                }
            })),
            _ => None,
        }
    }
}

/// What the MLA lineage shares: latent attention, the DeepSeek router, a plain shared expert,
/// dense layers first (`mlp_layer_types`, else `first_k_dense_replace`, default `dense_first`).
/// `indexer`: whether its RoPE is interleaved and which layers have their own.
pub(super) fn configure_mla(
    t: &Value,
    cfg: &mut ModelConfig,
    interleaved: bool,
    indexer: Option<(bool, Vec<bool>)>,
    dense_first: usize,
) -> Result<()> {
    if let Some(f) = field(t, "scoring_func").and_then(Value::as_str)
        && f != "sigmoid"
    {
        bail!("config.json: scoring_func `{f}` is not supported for {} (sigmoid)", cfg.family);
    }
    let q_lora_rank = match field(t, "q_lora_rank") {
        None => None,
        Some(_) => Some(req_usize(t, "q_lora_rank")?),
    };
    let (nope, rope) = (opt_usize(t, "qk_nope_head_dim", 128)?, opt_usize(t, "qk_rope_head_dim", 64)?);
    if !rope.is_multiple_of(2) {
        bail!("config.json: qk_rope_head_dim ({rope}) must be even");
    }
    // DeepSeek's YaRN leaves cos and sin alone and scales the softmax by mscale²
    let rp = field(t, "rope_parameters").or_else(|| field(t, "rope_scaling"));
    let mut softmax_scale = 1.0 / ((nope + rope) as f64).sqrt();
    if let Some(y) = &cfg.attn.yarn {
        let all_dim = rp.and_then(|r| field(r, "mscale_all_dim")).and_then(Value::as_f64).unwrap_or(0.0);
        if all_dim != 0.0 && y.factor > 1.0 {
            let m = 0.1 * all_dim * y.factor.ln() + 1.0;
            softmax_scale *= m * m;
        }
    }
    let n = cfg.num_layers;
    let indexer = match indexer {
        None => None,
        Some((interleaved, own)) => {
            if own.first() == Some(&false) {
                bail!("config.json: indexer_types[0] is `shared`: the first layer has no earlier selection to share");
            }
            Some(IndexerSpec {
                heads: req_usize(t, "index_n_heads")?,
                head_dim: req_usize(t, "index_head_dim")?,
                topk: req_usize(t, "index_topk")?.max(1),
                interleaved,
                own,
            })
        }
    };
    if let Some(i) = &indexer
        && (i.head_dim < rope || i.heads == 0)
    {
        bail!("config.json: index_head_dim ({}) must hold qk_rope_head_dim ({rope})", i.head_dim);
    }
    cfg.mla = Some(MlaSpec {
        q_lora_rank,
        kv_lora_rank: req_usize(t, "kv_lora_rank")?,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: opt_usize(t, "v_head_dim", 128)?,
        interleaved,
        softmax_scale: softmax_scale as f32,
        indexer,
    });
    cfg.mixers = vec![Mixer::Mla; n];
    // what inspect and the generic code read: the query/key head and its rotated part
    cfg.head_dim = nope + rope;
    cfg.partial_rotary_factor = rope as f64 / (nope + rope) as f64;
    cfg.num_kv_heads = cfg.num_heads;
    cfg.attn.qk_norm = crate::config::QkNorm::None;
    cfg.ffns = match per_layer(t, "mlp_layer_types", n, &[("dense", Ffn::Dense), ("sparse", Ffn::Moe)])? {
        Some(f) => f,
        None => {
            let dense = opt_usize(t, "first_k_dense_replace", dense_first)?.min(n);
            (0..n).map(|i| if i < dense { Ffn::Dense } else { Ffn::Moe }).collect()
        }
    };
    super::deepseek_moe(t, cfg)
}
