//! Model configuration read from a Hugging Face `config.json`; what differs between families
//! comes from their [`Traits`](crate::families::Traits).

use crate::families::{self, Traits};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::path::Path;

/// Token mixer of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixer {
    /// Gated DeltaNet (`linear_attention`).
    DeltaNet,
    /// Softmax attention over a KV cache (`full_attention`).
    Attention,
    /// Multi-head latent attention over a cache of compressed latents (the DeepSeek lineage).
    Mla,
}

/// Feed-forward block of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ffn {
    Moe,
    Dense,
}

/// How the query and key heads are normalised before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One RMSNorm of `head_dim` applied to every head (Qwen, GLM-4.5 with `use_qk_norm`).
    PerHead,
    /// One RMSNorm over all heads of the projection at once (MiniMax-M2).
    Whole,
}

/// How a router turns logits into the chosen experts and their weights.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterSpec {
    /// Softmax over all experts (Qwen, Mixtral) or a sigmoid per expert (GLM, MiniMax, DeepSeek).
    pub sigmoid: bool,
    /// A per-expert bias added to the scores for choosing only (`e_score_correction_bias`).
    pub correction_bias: bool,
    /// Renormalise the chosen weights to sum to one.
    pub renormalize: bool,
    /// Multiplies the final weights (`routed_scaling_factor`).
    pub scale: f32,
    /// Group-limited choice: experts in `n_group` groups, only the best `topk_group` groups
    /// (by the sum of their two best scores) are eligible (1, 1: no limit).
    pub n_group: usize,
    pub topk_group: usize,
    /// The router has a bias of its own, added to the logits (gpt-oss).
    pub logit_bias: bool,
    /// Choose the top-k by logit, then softmax over the chosen only (gpt-oss).
    pub softmax_chosen: bool,
}

impl RouterSpec {
    pub fn softmax(renormalize: bool) -> RouterSpec {
        RouterSpec {
            sigmoid: false,
            correction_bias: false,
            renormalize,
            scale: 1.0,
            n_group: 1,
            topk_group: 1,
            logit_bias: false,
            softmax_chosen: false,
        }
    }
}

/// An expert's activation between its gate/up and down products.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// silu(g) · u.
    Swiglu,
    /// gpt-oss: g ← min(g, limit), u ← clamp(u, ±limit), g·σ(alpha·g)·(u + 1).
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// YaRN's frequency blend and attention factor (`rope_type: yarn`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the blend's corrected range to whole dimensions (false for gpt-oss).
    pub truncate: bool,
    /// Multiplies cos and sin.
    pub attention_factor: f64,
}

/// Attention options beyond the Qwen default.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    pub qk_norm: QkNorm,
    /// Biases on the q, k and v projections, and on the output projection.
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// A learned logit per head that takes part in the softmax and is then dropped (gpt-oss).
    pub sinks: bool,
    /// Per layer: each position attends to at most this many positions, itself included.
    pub window: Vec<Option<usize>>,
    pub yarn: Option<Yarn>,
}

/// Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-5): queries from a low-rank
/// (`q_lora_rank`) or full projection, keys and values from one latent of `kv_lora_rank` per
/// token plus a `qk_rope_head_dim` rotary key shared by every head.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaSpec {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// RoPE rotates the pairs (2i, 2i+1) rather than (i, i + d/2).
    pub interleaved: bool,
    /// The softmax scale: (nope + rope)^-½, times YaRN's mscale² where `mscale_all_dim` says so.
    pub softmax_scale: f32,
    pub indexer: Option<IndexerSpec>,
}

impl MlaSpec {
    /// Floats cached per token: the normalised latent and the rotated shared key.
    pub fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// DeepSeek sparse attention's lightning indexer (V3.2, GLM-5): each query attends only to the
/// `topk` earlier positions its indexer scores highest.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexerSpec {
    pub heads: usize,
    pub head_dim: usize,
    pub topk: usize,
    /// Its RoPE (on the first `qk_rope_head_dim` dims) rotates interleaved pairs (GLM-5).
    pub interleaved: bool,
    /// Per layer: it has an indexer of its own (`full`), else it reuses the selection of the
    /// last layer that has (`shared`, GLM-5.2+).
    pub own: Vec<bool>,
}

/// Gated DeltaNet sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttnConfig {
    pub num_k_heads: usize,
    pub num_v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
    pub conv_kernel: usize,
    /// Value head j reads key head `j % num_k_heads` (llama.cpp's `qwen35`/`qwen35moe` GGUFs,
    /// whose converter reorders the value heads so), not `j / (num_v_heads / num_k_heads)`
    /// (Hugging Face's grouping). Config key `linear_value_heads_tiled`, written only for those.
    pub v_heads_tiled: bool,
}

impl LinearAttnConfig {
    /// The key head that value head `j` reads.
    pub fn k_head_of(&self, j: usize) -> usize {
        if self.v_heads_tiled { j % self.num_k_heads } else { j / (self.num_v_heads / self.num_k_heads) }
    }
    pub fn key_dim(&self) -> usize {
        self.num_k_heads * self.k_head_dim
    }
    pub fn value_dim(&self) -> usize {
        self.num_v_heads * self.v_head_dim
    }
    /// Channels of the causal conv: q, k and v together.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

/// Everything the forward pass needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    /// The family's name ([`crate::families`]).
    pub family: &'static str,
    /// What the family decides (multimodal wrapper, norms, gates, which layers are what).
    pub traits: Traits,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f32,
    pub mixers: Vec<Mixer>,
    pub ffns: Vec<Ffn>,
    /// Dense MLP intermediate size (0 when no layer is dense).
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    /// 0 when the family has no shared expert.
    pub shared_expert_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub router: RouterSpec,
    pub attn: AttnSpec,
    /// The shared expert is scaled by sigmoid(`shared_expert_gate`·x) (Qwen), else added as is.
    pub shared_expert_gated: bool,
    /// The routed experts' activation; with `expert_bias`, their gate, up and down have biases.
    pub expert_act: Act,
    pub expert_bias: bool,
    pub linear: Option<LinearAttnConfig>,
    /// Latent attention sizes (the layers whose mixer is [`Mixer::Mla`]).
    pub mla: Option<MlaSpec>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
}

pub(crate) fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|x| !x.is_null())
}

pub(crate) fn req_usize(v: &Value, name: &str) -> Result<usize> {
    let x = field(v, name)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("config.json: field `{name}` is missing or not a non-negative integer"))?;
    // no size, count or id of a model comes near 2^32; a damaged file's value must not reach an
    // allocation
    if x >= 1 << 32 {
        bail!("config.json: field `{name}` is {x}, implausibly large");
    }
    Ok(x as usize)
}

/// `x`, the value of field `name`, unless it is above `max`.
fn at_most(x: usize, name: &str, max: usize) -> Result<usize> {
    if x > max {
        bail!("config.json: field `{name}` is {x}; at most {max} is supported");
    }
    Ok(x)
}

/// The per-layer list `name` of `v` (one string per layer: `layer_types`, `mlp_layer_types`,
/// `indexer_types`), each string mapped through `values`; `None` when the field is absent.
/// Errors name the field, and the index and value of a bad entry or the length of a list
/// that does not have one entry per layer.
pub(crate) fn per_layer<T: Copy>(v: &Value, name: &str, layers: usize, values: &[(&str, T)]) -> Result<Option<Vec<T>>> {
    let Some(list) = field(v, name) else { return Ok(None) };
    let list = list.as_array().ok_or_else(|| anyhow!("config.json: field `{name}` is not a list"))?;
    if list.len() != layers {
        bail!("config.json: `{name}` has {} entries, num_hidden_layers is {layers}", list.len());
    }
    let allowed = || values.iter().map(|(s, _)| format!("`{s}`")).collect::<Vec<_>>().join(", ");
    list.iter()
        .enumerate()
        .map(|(i, x)| match values.iter().find(|(s, _)| x.as_str() == Some(s)) {
            Some(&(_, t)) => Ok(t),
            None => Err(anyhow!("config.json: `{name}`[{i}] is {x}, not one of {}", allowed())),
        })
        .collect::<Result<_>>()
        .map(Some)
}

pub(crate) fn opt_usize(v: &Value, name: &str, default: usize) -> Result<usize> {
    match field(v, name) {
        None => Ok(default),
        Some(_) => req_usize(v, name),
    }
}

pub(crate) fn opt_f64(v: &Value, name: &str, default: f64) -> Result<f64> {
    match field(v, name) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| anyhow!("config.json: field `{name}` is not a number")),
    }
}

pub(crate) fn opt_bool(v: &Value, name: &str, default: bool) -> Result<bool> {
    match field(v, name) {
        None => Ok(default),
        Some(x) => x.as_bool().ok_or_else(|| anyhow!("config.json: field `{name}` is not a boolean")),
    }
}

/// `eos_token_id` as one id or a list.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` for extra EOS ids) from a checkpoint dir.
    /// A GGUF file's config comes from its metadata ([`crate::gguf::arch`]).
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        if crate::gguf::is_gguf(dir) {
            let g = crate::gguf::Gguf::open(dir)?;
            return Self::from_json(g.config()).with_context(|| format!("in the metadata of {}", dir.display()));
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let root: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let mut cfg = Self::from_json(&root).with_context(|| format!("in {}", path.display()))?;
        cfg.eos_token_ids = Self::load_eos(dir, std::mem::take(&mut cfg.eos_token_ids))?;
        Ok(cfg)
    }

    /// Adds the EOS ids of `generation_config.json` (when present) to `ids`.
    pub fn load_eos(dir: &Path, mut ids: Vec<u32>) -> Result<Vec<u32>> {
        let gen_path = dir.join("generation_config.json");
        if let Ok(t) = std::fs::read_to_string(&gen_path) {
            let g: Value =
                serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", gen_path.display()))?;
            for id in token_ids(g.get("eos_token_id")) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Parses a `config.json` value.
    pub fn from_json(root: &Value) -> Result<ModelConfig> {
        let model_type = field(root, "model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("config.json: field `model_type` is missing"))?
            .to_string();
        let family = families::by_model_type(&model_type)?;
        let traits = family.traits(&model_type);
        let multimodal = traits.multimodal;
        let t = if multimodal {
            field(root, "text_config").ok_or_else(|| anyhow!("config.json: field `text_config` is missing"))?
        } else {
            root
        };
        let hidden_size = req_usize(t, "hidden_size")?;
        let num_layers = at_most(req_usize(t, "num_hidden_layers")?, "num_hidden_layers", 4096)?;
        let num_heads = req_usize(t, "num_attention_heads")?;
        let num_kv_heads = opt_usize(t, "num_key_value_heads", num_heads)?;
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(
                "config.json: num_attention_heads ({num_heads}) must be a positive multiple of \
                 num_key_value_heads ({num_kv_heads})"
            );
        }
        let head_dim = opt_usize(t, "head_dim", hidden_size / num_heads)?;
        let rope = field(t, "rope_parameters").or_else(|| field(t, "rope_scaling"));
        let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str);
        if let Some(rt) = rope_type
            && rt != "default"
            && rt != "yarn"
        {
            bail!("config.json: rope_type `{rt}` is not supported (default, yarn)");
        }
        let from_rope = |name: &str, default: f64| -> Result<f64> {
            match rope.and_then(|r| field(r, name)) {
                Some(x) => x.as_f64().ok_or_else(|| anyhow!("config.json: rope_parameters.{name} is not a number")),
                None => opt_f64(t, name, default),
            }
        };
        let yarn = if rope_type == Some("yarn") {
            let r = rope.expect("a rope_type comes with its parameters");
            let factor = from_rope("factor", 1.0)?;
            let mscale = |s: f64, m: f64| if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 };
            let attention_factor = match field(r, "attention_factor") {
                Some(_) => from_rope("attention_factor", 1.0)?,
                None => match (from_rope("mscale", 0.0)?, from_rope("mscale_all_dim", 0.0)?) {
                    (m, a) if m != 0.0 && a != 0.0 => mscale(factor, m) / mscale(factor, a),
                    _ => mscale(factor, 1.0),
                },
            };
            let orig = match field(r, "original_max_position_embeddings") {
                Some(_) => from_rope("original_max_position_embeddings", 0.0)?,
                None => bail!("config.json: rope_parameters.original_max_position_embeddings is missing (yarn)"),
            };
            Some(Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast: from_rope("beta_fast", 32.0)?,
                beta_slow: from_rope("beta_slow", 1.0)?,
                truncate: opt_bool(r, "truncate", true)?,
                attention_factor,
            })
        } else {
            None
        };
        let partial_default = traits.partial_rotary_default;
        let rope_theta = from_rope("rope_theta", 10000.0)?;
        // MiniMax-M2 states its rotary width as `rotary_dim`
        let partial_default = match field(t, "rotary_dim") {
            Some(_) if head_dim > 0 => req_usize(t, "rotary_dim")? as f64 / head_dim as f64,
            _ => partial_default,
        };
        let partial_rotary_factor = from_rope("partial_rotary_factor", partial_default)?;
        let rot = (head_dim as f64 * partial_rotary_factor) as usize;
        if !rot.is_multiple_of(2) || rot > head_dim {
            bail!(
                "config.json: rotary dimension {rot} (head_dim x partial_rotary_factor) must be even and <= head_dim"
            );
        }

        let mixers = if !traits.deltanet_layers {
            vec![Mixer::Attention; num_layers]
        } else if let Some(l) = per_layer(
            t,
            "layer_types",
            num_layers,
            &[("linear_attention", Mixer::DeltaNet), ("full_attention", Mixer::Attention)],
        )? {
            l
        } else {
            let every = opt_usize(t, "full_attention_interval", 4)?.max(1);
            (0..num_layers).map(|i| if (i + 1) % every == 0 { Mixer::Attention } else { Mixer::DeltaNet }).collect()
        };

        // transformers 5 writes Qwen3-MoE's expert count as `num_local_experts` (as Mixtral and
        // MiniMax do); the DeepSeek lineage and GLM say `n_routed_experts`
        let num_experts =
            match ["num_experts", "num_local_experts", "n_routed_experts"].iter().find(|k| field(t, k).is_some()) {
                Some(k) => at_most(req_usize(t, k)?, k, 1 << 16)?,
                None => 0,
            };
        let ffns: Vec<Ffn> =
            if !traits.dense_layers {
                vec![Ffn::Moe; num_layers]
            } else {
                let step = opt_usize(t, "decoder_sparse_step", 1)?.max(1);
                let only: Vec<usize> = match field(t, "mlp_only_layers") {
                    None => vec![],
                    Some(v) => v
                        .as_array()
                        .ok_or_else(|| anyhow!("config.json: field `mlp_only_layers` is not a list"))?
                        .iter()
                        .map(|x| {
                            x.as_u64()
                                .map(|x| x as usize)
                                .ok_or_else(|| anyhow!("config.json: mlp_only_layers holds a non-integer"))
                        })
                        .collect::<Result<_>>()?,
                };
                (0..num_layers)
                    .map(|i| {
                        if !only.contains(&i) && num_experts > 0 && (i + 1) % step == 0 { Ffn::Moe } else { Ffn::Dense }
                    })
                    .collect()
            };
        let linear = if mixers.contains(&Mixer::DeltaNet) {
            let l = LinearAttnConfig {
                num_k_heads: req_usize(t, "linear_num_key_heads")?,
                num_v_heads: req_usize(t, "linear_num_value_heads")?,
                k_head_dim: req_usize(t, "linear_key_head_dim")?,
                v_head_dim: req_usize(t, "linear_value_head_dim")?,
                conv_kernel: opt_usize(t, "linear_conv_kernel_dim", 4)?,
                v_heads_tiled: opt_bool(t, "linear_value_heads_tiled", false)?,
            };
            if l.num_k_heads == 0 || !l.num_v_heads.is_multiple_of(l.num_k_heads) || l.conv_kernel == 0 {
                bail!(
                    "config.json: linear_num_value_heads ({}) must be a multiple of linear_num_key_heads ({})",
                    l.num_v_heads,
                    l.num_k_heads
                );
            }
            Some(l)
        } else {
            None
        };
        let mut eos_token_ids = token_ids(t.get("eos_token_id"));
        for id in token_ids(root.get("eos_token_id")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        // The multimodal wrapper carries the tie flag at the top level.
        let tie_word_embeddings = if multimodal {
            opt_bool(root, "tie_word_embeddings", false)?
        } else {
            opt_bool(t, "tie_word_embeddings", false)?
        };
        let norm_topk_prob = traits.always_renormalize || opt_bool(t, "norm_topk_prob", false)?;
        let mut cfg = ModelConfig {
            model_type,
            family: family.name(),
            traits,
            vocab_size: req_usize(t, "vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            partial_rotary_factor,
            rms_norm_eps: opt_f64(t, "rms_norm_eps", 1e-6)? as f32,
            mixers,
            ffns,
            intermediate_size: opt_usize(t, "intermediate_size", 0)?,
            moe_intermediate_size: opt_usize(t, "moe_intermediate_size", 0)?,
            shared_expert_intermediate_size: if traits.shared_expert {
                opt_usize(t, "shared_expert_intermediate_size", 0)?
            } else {
                0
            },
            num_experts,
            num_experts_per_tok: opt_usize(t, "num_experts_per_tok", 0)?,
            router: RouterSpec::softmax(norm_topk_prob),
            attn: AttnSpec {
                qk_norm: QkNorm::PerHead,
                qkv_bias: false,
                o_bias: false,
                sinks: false,
                window: vec![None; num_layers],
                yarn,
            },
            shared_expert_gated: true,
            expert_act: Act::Swiglu,
            expert_bias: false,
            linear,
            mla: None,
            tie_word_embeddings,
            max_position_embeddings: opt_usize(t, "max_position_embeddings", 32768)?,
            eos_token_ids,
        };
        family.configure(t, &mut cfg)?;
        // what the family did not take up is refused rather than ignored
        if opt_bool(t, "attention_bias", false)? && !cfg.attn.qkv_bias {
            bail!("config.json: attention_bias = true is not supported for {}", cfg.family);
        }
        if opt_bool(t, "use_sliding_window", false)? && cfg.attn.window.iter().all(Option::is_none) {
            bail!("config.json: use_sliding_window = true is not supported for {}", cfg.family);
        }
        let any_moe = cfg.ffns.contains(&Ffn::Moe);
        if any_moe {
            if field(t, "num_experts_per_tok").is_none() {
                bail!("config.json: field `num_experts_per_tok` is missing or not a non-negative integer");
            }
            if cfg.moe_intermediate_size == 0 {
                bail!("config.json: field `moe_intermediate_size` is missing or not a non-negative integer");
            }
            let (k, e) = (cfg.num_experts_per_tok, cfg.num_experts);
            if k == 0 || k > e {
                bail!("config.json: num_experts_per_tok ({k}) must be in 1..=num_experts ({e})");
            }
            let r = &cfg.router;
            if r.n_group == 0 || e % r.n_group != 0 || r.topk_group == 0 || r.topk_group > r.n_group {
                bail!(
                    "config.json: n_group ({}) must divide the {e} experts and topk_group ({}) be in 1..=n_group",
                    r.n_group,
                    r.topk_group
                );
            }
            if r.n_group > 1 && (e / r.n_group < 2 || r.topk_group * (e / r.n_group) < k) {
                bail!(
                    "config.json: {} groups of {} experts, {} kept, cannot give top-{k}",
                    r.n_group,
                    e / r.n_group,
                    r.topk_group
                );
            }
        } else {
            cfg.num_experts_per_tok = 0;
            cfg.moe_intermediate_size = 0;
        }
        if cfg.ffns.contains(&Ffn::Dense) && cfg.intermediate_size == 0 {
            bail!("config.json: field `intermediate_size` is missing or not a non-negative integer");
        }
        if !cfg.ffns.contains(&Ffn::Dense) {
            cfg.intermediate_size = 0;
        }
        Ok(cfg)
    }

    /// Zero-centred RMSNorm `x·(1+w)` instead of `x·w`.
    pub fn zero_centered_norm(&self) -> bool {
        self.traits.zero_centered_norm
    }

    /// Attention output gated per element by sigmoid of a second half of q_proj.
    pub fn gated_attention(&self) -> bool {
        self.traits.gated_attention
    }

    /// Text weights live under `model.language_model.` (a multimodal wrapper).
    pub fn multimodal(&self) -> bool {
        self.traits.multimodal
    }

    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// Layer pattern as one letter a layer: `L` DeltaNet, `F` full attention, `M` latent
    /// attention; lower case when the layer's feed-forward block is dense.
    pub fn layer_pattern(&self) -> String {
        self.mixers
            .iter()
            .zip(&self.ffns)
            .map(|(m, f)| {
                let c = match m {
                    Mixer::DeltaNet => 'L',
                    Mixer::Attention => 'F',
                    Mixer::Mla => 'M',
                };
                if *f == Ffn::Dense { c.to_ascii_lowercase() } else { c }
            })
            .collect()
    }

    /// Parameters of one routed expert (gate, up and down, and their biases).
    pub fn expert_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.moe_intermediate_size);
        3 * h * i + if self.expert_bias { 2 * i + h } else { 0 }
    }

    /// Parameters of the token mixer of layer `i`.
    pub fn mixer_params(&self, i: usize) -> usize {
        let h = self.hidden_size;
        match self.mixers[i] {
            Mixer::Attention => {
                let q = self.num_heads * self.head_dim * if self.gated_attention() { 2 } else { 1 };
                let kv = 2 * self.num_kv_heads * self.head_dim;
                let norms = match self.attn.qk_norm {
                    QkNorm::None => 0,
                    QkNorm::PerHead => 2 * self.head_dim,
                    QkNorm::Whole => (self.num_heads + self.num_kv_heads) * self.head_dim,
                };
                let bias = if self.attn.qkv_bias { q + kv } else { 0 } + if self.attn.o_bias { h } else { 0 };
                let sinks = if self.attn.sinks { self.num_heads } else { 0 };
                h * (q + kv) + self.num_heads * self.head_dim * h + norms + bias + sinks
            }
            Mixer::DeltaNet => {
                let l = self.linear.as_ref().expect("DeltaNet layer without linear config");
                let (c, vd, nv) = (l.conv_dim(), l.value_dim(), l.num_v_heads);
                h * (c + vd + 2 * nv) + c * l.conv_kernel + 2 * nv + l.v_head_dim + vd * h
            }
            Mixer::Mla => {
                let m = self.mla.as_ref().expect("latent attention layer without its sizes");
                let (nh, kvl) = (self.num_heads, m.kv_lora_rank);
                let qd = nh * (m.qk_nope_head_dim + m.qk_rope_head_dim);
                let q = match m.q_lora_rank {
                    None => h * qd,
                    Some(r) => h * r + r + r * qd,
                };
                let kv = h * m.latent_width() + kvl + kvl * nh * (m.qk_nope_head_dim + m.v_head_dim);
                let ix = match &m.indexer {
                    Some(x) if x.own[i] => {
                        m.q_lora_rank.unwrap_or(0) * x.heads * x.head_dim
                            + h * x.head_dim
                            + 2 * x.head_dim
                            + h * x.heads
                    }
                    _ => 0,
                };
                q + kv + nh * m.v_head_dim * h + ix
            }
        }
    }

    /// Bytes of one sequence's state (f32) after `tokens` positions: the KV caches of the
    /// attention layers (latents for MLA; a sliding layer's only its window's) plus the fixed
    /// conv and recurrent states of the DeltaNet layers.
    pub fn state_bytes(&self, tokens: usize) -> u64 {
        let mut b = 0u64;
        for (i, m) in self.mixers.iter().enumerate() {
            b += match m {
                Mixer::Mla => {
                    let m = self.mla.as_ref().expect("latent attention layer without its sizes");
                    let ix = m.indexer.as_ref().filter(|x| x.own[i]).map_or(0, |x| x.head_dim);
                    ((m.latent_width() + ix) * tokens * 4) as u64
                }
                Mixer::Attention => {
                    let rows = self.attn.window[i].map_or(tokens, |w| crate::layers::attention::window_rows(tokens, w));
                    (2 * self.num_kv_heads * self.head_dim * rows * 4) as u64
                }
                Mixer::DeltaNet => {
                    let l = self.linear.as_ref().expect("DeltaNet layer without linear config");
                    (((l.conv_kernel - 1) * l.conv_dim() + l.num_v_heads * l.k_head_dim * l.v_head_dim) * 4) as u64
                }
            };
        }
        b
    }

    /// (total parameters, parameters used per token) of the text model.
    pub fn param_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let mut total = v * h + if self.tie_word_embeddings { 0 } else { v * h } + h;
        let mut inactive = 0u64;
        for i in 0..self.num_layers {
            total += 2 * h + self.mixer_params(i) as u64;
            match self.ffns[i] {
                Ffn::Dense => total += 3 * h * self.intermediate_size as u64,
                Ffn::Moe => {
                    let e = self.num_experts as u64;
                    let ep = self.expert_params() as u64;
                    total += e * h + e * ep;
                    if self.shared_expert_intermediate_size > 0 {
                        total += 3 * h * self.shared_expert_intermediate_size as u64;
                        total += if self.shared_expert_gated { h } else { 0 };
                    }
                    total += if self.router.correction_bias || self.router.logit_bias { e } else { 0 };
                    inactive += (e - self.num_experts_per_tok as u64) * ep;
                }
            }
        }
        (total, total - inactive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_layer_pattern_and_errors() {
        let c = json!({"model_type": "qwen3_5_moe_text", "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 4,
            "linear_value_head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 4, "shared_expert_intermediate_size": 4});
        let cfg = ModelConfig::from_json(&c).unwrap();
        assert_eq!(cfg.layer_pattern(), "LLLFLLLF");
        assert_eq!(cfg.rotary_dim(), 2);
        let mut bad = c.clone();
        bad["model_type"] = json!("llama");
        let e = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("unsupported model_type `llama`"), "{e}");
        let mut bad = c.clone();
        bad.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        // a damaged count is an error, not an allocation of its size (found by mutating configs)
        for (field, v, want) in [
            ("num_hidden_layers", 1u64 << 40, "implausibly large"),
            ("num_hidden_layers", 5000, "at most 4096"),
            ("num_experts", 1 << 20, "at most 65536"),
            ("hidden_size", 1 << 33, "implausibly large"),
        ] {
            let mut bad = c.clone();
            bad[field] = json!(v);
            let e = ModelConfig::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}` is {v}")) && e.contains(want), "{e}");
        }
    }

    #[test]
    fn per_layer_lists_name_the_field_index_and_value_that_are_wrong() {
        let vals = [("a", 1), ("b", 2)];
        let v = json!({"xs": ["a", "b", "a"], "short": ["a"], "odd": ["a", "c", "b"], "num": ["a", 3, "b"],
                       "flat": "ab"});
        assert_eq!(per_layer(&v, "xs", 3, &vals).unwrap(), Some(vec![1, 2, 1]));
        assert_eq!(per_layer(&v, "absent", 3, &vals).unwrap(), None);
        let e = per_layer(&v, "short", 3, &vals).unwrap_err().to_string();
        assert!(e.contains("`short` has 1 entries, num_hidden_layers is 3"), "{e}");
        let e = per_layer(&v, "odd", 3, &vals).unwrap_err().to_string();
        assert!(e.contains("`odd`[1] is \"c\", not one of `a`, `b`"), "{e}");
        let e = per_layer(&v, "num", 3, &vals).unwrap_err().to_string();
        assert!(e.contains("`num`[1] is 3"), "{e}");
        let e = per_layer(&v, "flat", 2, &vals).unwrap_err().to_string();
        assert!(e.contains("field `flat` is not a list"), "{e}");
        // a family's list through the config parser: gpt-oss's windows
        let mut g = crate::families::preset_config("gpt-oss-20b").unwrap();
        g["num_hidden_layers"] = json!(2);
        g["layer_types"] = json!(["sliding_attention", "dense"]);
        let e = ModelConfig::from_json(&g).unwrap_err().to_string();
        assert!(e.contains("`layer_types`[1] is \"dense\""), "{e}");
    }
}
