//! GGUF architectures → the engine's families: `general.architecture` and its `ARCH.*` keys
//! become the `config.json` value the family's parser reads, and llama.cpp's tensor names
//! (`blk.N.attn_q.weight`, `blk.N.ffn_gate_exps.weight`, …) the canonical names of the family's
//! [`Names`] table, so no family has a second implementation for GGUF.
//!
//! A stacked expert tensor (`ffn_gate_exps`: `ne = [hidden, inter, experts]`, logically
//! `[experts, inter, hidden]`) is named as an MLX `switch_mlp` stack, the layout
//! [`crate::import::expert`] already reads rows of. Supported, as llama.cpp's graphs compute
//! them:
//! - `qwen3moe`: rotate-half RoPE as Hugging Face (its converter does not permute Q/K as it
//!   does for `llama`); every layer MoE, top-k weights always renormalised.
//! - `gpt-oss`: biases, sinks, every other layer sliding (`sliding_window_pattern`, else even
//!   layers), YaRN; experts in ggml's MXFP4 ([`crate::source::Format::GgmlMxfp4`]) with biases.
//! - `deepseek2` (DeepSeek-V3/R1, Kimi-K2): MLA, with `kv_b_proj` whole (older files) or split
//!   as llama.cpp's converter now writes it (`attn_k_b` transposed, `attn_v_b`); interleaved
//!   RoPE; DeepSeek's YaRN (`yarn_log_multiplier` = 0.1 · mscale_all_dim, cos and sin
//!   unscaled); sigmoid routing with a correction bias, groups, scale; shared experts; dense
//!   layers first. Softmax routing (DeepSeek-V2, and files without `expert_gating_func`, which
//!   llama.cpp reads as V2's) is refused.
//! - `glm4moe` (GLM-4.5/4.6/4.7): the DeepSeek router without MLA; partial half-split RoPE,
//!   q/k norm and biases where their tensors are; the MTP layers past the text model skipped.

use super::{TensorInfo, Value};
use crate::families::Names;
use crate::source::RowOrder;
use anyhow::{Result, anyhow, bail};
use serde_json::{Value as Json, json};
use std::collections::BTreeMap;
use std::path::Path;

/// The architectures read, as (GGUF name, `model_type`).
pub const ARCHES: &[(&str, &str)] = &[
    ("qwen3moe", "qwen3_moe"),
    ("gpt-oss", "gpt_oss"),
    ("deepseek2", "deepseek_v3"),
    ("glm4moe", "glm4_moe"),
    ("qwen3next", "qwen3_next"),
    ("qwen35moe", "qwen3_5_moe_text"),
    ("llama", "mixtral"),
];

/// How one GGUF tensor is presented: its canonical name, logical shape, row order, and whether
/// it holds −exp of its values ([`Format::NegExp`](crate::source::Format::NegExp)).
#[derive(Clone, Debug)]
pub struct Mapped {
    pub name: String,
    pub shape: Vec<usize>,
    pub order: RowOrder,
    pub neg_exp: bool,
}

/// Metadata of one file, with messages naming it.
struct Meta<'a> {
    file: &'a Path,
    meta: &'a BTreeMap<String, Value>,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.meta.get(&self.key(k))
    }
    /// An integer, or the one value of a per-layer array whose entries are all equal.
    fn u64_opt(&self, k: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(k) else { return Ok(None) };
        let bad = || {
            anyhow!(
                "{}: metadata `{}` is {} {v:?}, expected an integer",
                self.file.display(),
                self.key(k),
                v.type_name()
            )
        };
        match v {
            Value::Array(a) => {
                let xs: Vec<u64> = a.iter().map(|x| x.as_u64().ok_or_else(bad)).collect::<Result<_>>()?;
                match xs.first() {
                    Some(&x) if xs.iter().all(|&y| y == x) => Ok(Some(x)),
                    _ => bail!(
                        "{}: metadata `{}` differs between layers ({xs:?}); not supported",
                        self.file.display(),
                        self.key(k)
                    ),
                }
            }
            _ => v.as_u64().map(Some).ok_or_else(bad),
        }
    }
    fn u64(&self, k: &str) -> Result<u64> {
        self.u64_opt(k)?.ok_or_else(|| anyhow!("{}: metadata `{}` is missing", self.file.display(), self.key(k)))
    }
    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(k) else { return Ok(None) };
        v.as_f64().map(Some).ok_or_else(|| {
            anyhow!("{}: metadata `{}` is {} {v:?}, expected a number", self.file.display(), self.key(k), v.type_name())
        })
    }
}

/// The `config.json` value of the model, and how each tensor is presented (`None`: not one
/// the engine reads, e.g. an MTP layer's).
pub fn map(file: &Path, meta: &BTreeMap<String, Value>, infos: &[TensorInfo]) -> Result<(Json, Vec<Option<Mapped>>)> {
    let arch = match meta.get("general.architecture") {
        Some(Value::Str(s)) => s.as_str(),
        Some(v) => bail!("{}: metadata `general.architecture` is {}, expected a string", file.display(), v.type_name()),
        None => bail!("{}: metadata `general.architecture` is missing", file.display()),
    };
    let Some(&(_, model_type)) = ARCHES.iter().find(|(a, _)| *a == arch) else {
        let all: Vec<&str> = ARCHES.iter().map(|a| a.0).collect();
        bail!("{}: GGUF architecture `{arch}` is not supported (supported: {})", file.display(), all.join(", "));
    };
    let m = Meta { file, meta, arch };
    let find = |n: &str| infos.iter().find(|t| t.name == n);
    let embd = find("token_embd.weight")
        .ok_or_else(|| anyhow!("{}: tensor `token_embd.weight` is missing", file.display()))?;
    let vocab = embd.ne.get(1).copied().unwrap_or(0);
    let config = match model_type {
        "qwen3_moe" => qwen3moe(&m, vocab, find("output.weight").is_none())?,
        "gpt_oss" => gpt_oss(&m, vocab, find("output.weight").is_none())?,
        "deepseek_v3" => deepseek2(&m, vocab, find("output.weight").is_none())?,
        "glm4_moe" => glm4moe(&m, vocab, find("output.weight").is_none(), &|n| find(n).is_some())?,
        "qwen3_next" | "qwen3_5_moe_text" => qwen_deltanet(&m, vocab, find("output.weight").is_none(), model_type)?,
        "mixtral" => llama(&m, vocab, find("output.weight").is_none(), &|n| find(n).is_some())?,
        _ => unreachable!("every entry of ARCHES has a mapping"),
    };
    let names = crate::families::names_of(model_type);
    let pre = names.text_prefixes[0];
    let head = config["head_dim"].as_u64().unwrap_or(0) as usize;
    let present = |t: &TensorInfo| {
        let name = canonical(names, pre, &t.name)?;
        let mut shape = t.shape();
        // llama.cpp squeezes the depthwise conv's `[channels, 1, kernel]` to `[channels, kernel]`
        if name.ends_with(&format!(".{}.weight", names.conv1d)) && shape.len() == 2 {
            shape.insert(1, 1);
        }
        let neg_exp = t.name.ends_with(".ssm_a");
        // llama.cpp's converter permutes `llama`'s Q and K rows for its RoPE of adjacent pairs
        let q_or_k = t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_k.weight");
        let order = if arch == "llama" && q_or_k { RowOrder::RopePairs { head } } else { RowOrder::Plain };
        Some(Mapped { name, shape, order, neg_exp })
    };
    Ok((config, infos.iter().map(present).collect()))
}

/// Shared keys of every decoder: sizes, norms, RoPE, vocabulary (the head width is the
/// architecture's: [`gqa`], or MLA's own).
fn common(m: &Meta, vocab: u64, tied: bool) -> Result<Json> {
    let heads = m.u64("attention.head_count")?;
    if heads == 0 {
        bail!("{}: metadata `{}` is 0", m.file.display(), m.key("attention.head_count"));
    }
    let mut rope = json!({
        "rope_type": "default",
        "rope_theta": m.f64_opt("rope.freq_base")?.unwrap_or(10000.0),
    });
    let scaling = m.get("rope.scaling.type").map(|v| v.as_str().unwrap_or("?"));
    match scaling {
        None | Some("none") => {}
        Some("yarn") => {
            rope["rope_type"] = json!("yarn");
            rope["factor"] = json!(m.f64_opt("rope.scaling.factor")?.unwrap_or(1.0));
            rope["original_max_position_embeddings"] = json!(m.u64("rope.scaling.original_context_length")?);
            rope["beta_fast"] = json!(m.f64_opt("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0));
            rope["beta_slow"] = json!(m.f64_opt("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0));
        }
        Some(t) => {
            bail!("{}: metadata `{}` is `{t}`; supported: none, yarn", m.file.display(), m.key("rope.scaling.type"))
        }
    }
    let eps = m.f64_opt("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
        anyhow!("{}: metadata `{}` is missing", m.file.display(), m.key("attention.layer_norm_rms_epsilon"))
    })?;
    let tok = |k: &str| m.meta.get(k).and_then(Value::as_u64);
    Ok(json!({
        "vocab_size": vocab,
        "hidden_size": m.u64("embedding_length")?,
        "num_hidden_layers": m.u64("block_count")?,
        "num_attention_heads": heads,
        "rms_norm_eps": eps,
        "rope_parameters": rope,
        "max_position_embeddings": m.u64_opt("context_length")?.unwrap_or(32768),
        "tie_word_embeddings": tied,
        "eos_token_id": tok("tokenizer.ggml.eos_token_id"),
        "bos_token_id": tok("tokenizer.ggml.bos_token_id"),
    }))
}

/// [`common`] for grouped-query attention: KV heads, the head width and its rotated part.
fn gqa(m: &Meta, vocab: u64, tied: bool) -> Result<Json> {
    let mut c = common(m, vocab, tied)?;
    let heads = m.u64("attention.head_count")?;
    let head_dim = m.u64_opt("attention.key_length")?.unwrap_or(m.u64("embedding_length")? / heads);
    if let Some(v) = m.u64_opt("attention.value_length")?
        && v != head_dim
    {
        bail!("{}: attention.value_length {v} differs from key_length {head_dim}; not supported", m.file.display());
    }
    let rot = m.u64_opt("rope.dimension_count")?.unwrap_or(head_dim);
    c["num_key_value_heads"] = json!(m.u64_opt("attention.head_count_kv")?.unwrap_or(heads));
    c["head_dim"] = json!(head_dim);
    c["rope_parameters"]["partial_rotary_factor"] = json!(rot as f64 / head_dim.max(1) as f64);
    Ok(c)
}

/// llama.cpp's `qwen3moe`: its graph renormalises the top-k weights (`norm_w`) and has no
/// dense layers, whatever the source checkpoint's `norm_topk_prob` was.
fn qwen3moe(m: &Meta, vocab: u64, tied: bool) -> Result<Json> {
    let mut c = gqa(m, vocab, tied)?;
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!("qwen3_moe"));
    o.insert("num_experts".into(), json!(m.u64("expert_count")?));
    o.insert("num_experts_per_tok".into(), json!(m.u64("expert_used_count")?));
    o.insert("moe_intermediate_size".into(), json!(m.u64("expert_feed_forward_length")?));
    o.insert("intermediate_size".into(), json!(m.u64_opt("feed_forward_length")?.unwrap_or(0)));
    o.insert("norm_topk_prob".into(), json!(true));
    o.insert("decoder_sparse_step".into(), json!(1));
    o.insert("mlp_only_layers".into(), json!([]));
    Ok(c)
}

/// llama.cpp's `gpt-oss`: the family's switches (biases, sinks, the clamped SwiGLU of alpha
/// 1.702 and limit 7, the router softmaxed over the chosen) are llama.cpp's constants too.
/// Sliding layers by `sliding_window_pattern` (per layer, or every n-th full), else every
/// other one from the first. llama.cpp's YaRN rounds the correction range outwards
/// (`truncate`), the Hugging Face config of the releases does not: the releases' is kept.
fn gpt_oss(m: &Meta, vocab: u64, tied: bool) -> Result<Json> {
    let mut c = gqa(m, vocab, tied)?;
    let layers = m.u64("block_count")? as usize;
    let sliding: Vec<bool> = match m.get("attention.sliding_window_pattern") {
        Some(Value::Array(a)) => {
            let v: Option<Vec<bool>> = a.iter().map(Value::as_bool).collect();
            match v {
                Some(v) if v.len() == layers => v,
                _ => bail!(
                    "{}: metadata `{}` must be {layers} bools",
                    m.file.display(),
                    m.key("attention.sliding_window_pattern")
                ),
            }
        }
        _ => {
            let n = m.u64_opt("attention.sliding_window_pattern")?.unwrap_or(2) as usize;
            (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
        }
    };
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!("gpt_oss"));
    o.insert("num_local_experts".into(), json!(m.u64("expert_count")?));
    o.insert("num_experts_per_tok".into(), json!(m.u64("expert_used_count")?));
    let inter = match m.u64_opt("expert_feed_forward_length")? {
        Some(i) => i,
        None => m.u64("feed_forward_length")?,
    };
    o.insert("intermediate_size".into(), json!(inter));
    o.insert("sliding_window".into(), json!(m.u64("attention.sliding_window")?));
    let kinds = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" });
    o.insert("layer_types".into(), json!(kinds.collect::<Vec<_>>()));
    o.insert("attention_bias".into(), json!(true));
    o.insert("swiglu_limit".into(), json!(7.0));
    if c["rope_parameters"]["rope_type"] == "yarn" {
        c["rope_parameters"]["truncate"] = json!(false);
    }
    Ok(c)
}

/// llama.cpp's `deepseek2`: MLA sizes from its `*_mla` keys (`key_length` and `value_length`
/// are the latent's, `head_count_kv` 1), the DeepSeek router and its YaRN.
fn deepseek2(m: &Meta, vocab: u64, tied: bool) -> Result<Json> {
    let mut c = common(m, vocab, tied)?;
    let d = m.file.display();
    let rope = m.u64("rope.dimension_count")?;
    let k = m.u64("attention.key_length_mla")?;
    if k <= rope {
        bail!("{d}: attention.key_length_mla {k} must exceed rope.dimension_count {rope}");
    }
    let heads = m.u64("attention.head_count")?;
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!("deepseek_v3"));
    o.insert("num_key_value_heads".into(), json!(heads));
    o.insert("q_lora_rank".into(), json!(m.u64_opt("attention.q_lora_rank")?.filter(|&r| r > 0)));
    o.insert("kv_lora_rank".into(), json!(m.u64("attention.kv_lora_rank")?));
    o.insert("qk_nope_head_dim".into(), json!(k - rope));
    o.insert("qk_rope_head_dim".into(), json!(rope));
    o.insert("v_head_dim".into(), json!(m.u64("attention.value_length_mla")?));
    o.insert("rope_interleave".into(), json!(true));
    deepseek_moe(m, o)?;
    if c["rope_parameters"]["rope_type"] == "yarn" {
        // cos and sin unscaled, the softmax by (1 + 0.1 · mscale_all_dim · ln factor)²
        let all_dim = m.f64_opt("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0) / 0.1;
        let r = &mut c["rope_parameters"];
        r["attention_factor"] = json!(1.0);
        r["mscale"] = json!(all_dim);
        r["mscale_all_dim"] = json!(all_dim);
    }
    Ok(c)
}

/// DeepSeek's MoE recipe as `deepseek2` and `glm4moe` state it: sigmoid routing (refused
/// otherwise: softmax is DeepSeek-V2's, and a file without `expert_gating_func` is read so by
/// llama.cpp), groups, scale, renormalisation, shared experts, dense layers first.
fn deepseek_moe(m: &Meta, o: &mut serde_json::Map<String, Json>) -> Result<()> {
    let d = m.file.display();
    match m.u64_opt("expert_gating_func")? {
        Some(2) => {}
        Some(1) | None => bail!(
            "{d}: metadata `{}` is {} (softmax routing, DeepSeek-V2's); only sigmoid (2) is supported",
            m.key("expert_gating_func"),
            if m.get("expert_gating_func").is_some() { "1" } else { "missing, which llama.cpp reads as 1" }
        ),
        Some(g) => bail!("{d}: metadata `{}` is {g}; only sigmoid (2) is supported", m.key("expert_gating_func")),
    }
    o.insert("intermediate_size".into(), json!(m.u64("feed_forward_length")?));
    o.insert("moe_intermediate_size".into(), json!(m.u64("expert_feed_forward_length")?));
    o.insert("n_routed_experts".into(), json!(m.u64("expert_count")?));
    o.insert("num_experts_per_tok".into(), json!(m.u64("expert_used_count")?));
    o.insert("n_shared_experts".into(), json!(m.u64_opt("expert_shared_count")?.unwrap_or(0)));
    o.insert("first_k_dense_replace".into(), json!(m.u64_opt("leading_dense_block_count")?.unwrap_or(0)));
    o.insert("n_group".into(), json!(m.u64_opt("expert_group_count")?.unwrap_or(1)));
    o.insert("topk_group".into(), json!(m.u64_opt("expert_group_used_count")?.unwrap_or(1)));
    o.insert("routed_scaling_factor".into(), json!(m.f64_opt("expert_weights_scale")?.unwrap_or(1.0)));
    let norm = match m.get("expert_weights_norm") {
        None => false,
        Some(v) => {
            v.as_bool().ok_or_else(|| anyhow!("{d}: metadata `{}` is not a bool", m.key("expert_weights_norm")))?
        }
    };
    o.insert("norm_topk_prob".into(), json!(norm));
    o.insert("scoring_func".into(), json!("sigmoid"));
    Ok(())
}

/// llama.cpp's `glm4moe` (GLM-4.5/4.6/4.7): q/k norm and q/k/v biases where the file has
/// their tensors; `block_count` counts the MTP layers (`nextn_predict_layers`), which are not
/// part of the text model.
fn glm4moe(m: &Meta, vocab: u64, tied: bool, has: &dyn Fn(&str) -> bool) -> Result<Json> {
    let mut c = gqa(m, vocab, tied)?;
    let (blocks, nextn) = (m.u64("block_count")?, m.u64_opt("nextn_predict_layers")?.unwrap_or(0));
    if nextn >= blocks {
        bail!("{}: nextn_predict_layers {nextn} leaves none of the {blocks} blocks", m.file.display());
    }
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!("glm4_moe"));
    o.insert("num_hidden_layers".into(), json!(blocks - nextn));
    o.insert("use_qk_norm".into(), json!(has("blk.0.attn_q_norm.weight")));
    o.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
    deepseek_moe(m, o)?;
    Ok(c)
}

/// llama.cpp's `qwen3next` (Qwen3-Next) and `qwen35moe` (Qwen3.5-MoE): Gated DeltaNet sizes
/// from its `ssm.*` keys, the layer pattern from `attention.recurrent_layers` (else every
/// `full_attention_interval`-th layer is attention), every layer MoE with a gated shared
/// expert, top-k renormalised; `block_count` counts the MTP layers (`nextn_predict_layers`),
/// skipped. `qwen35moe`'s converter reorders the value heads (key head `j % n_k` for value head
/// `j`); M-RoPE's sections (`rope.dimension_sections`) rotate text positions as plain RoPE.
fn qwen_deltanet(m: &Meta, vocab: u64, tied: bool, model_type: &str) -> Result<Json> {
    let mut c = gqa(m, vocab, tied)?;
    let d = m.file.display();
    let (blocks, nextn) = (m.u64("block_count")?, m.u64_opt("nextn_predict_layers")?.unwrap_or(0));
    if nextn >= blocks {
        bail!("{d}: nextn_predict_layers {nextn} leaves none of the {blocks} blocks");
    }
    let layers = (blocks - nextn) as usize;
    let recurrent: Vec<bool> = match m.get("attention.recurrent_layers") {
        Some(Value::Array(a)) => match a.iter().map(Value::as_bool).collect::<Option<Vec<bool>>>() {
            Some(v) if v.len() >= layers => v[..layers].to_vec(),
            _ => bail!("{d}: metadata `{}` must be {blocks} bools", m.key("attention.recurrent_layers")),
        },
        Some(v) => {
            bail!("{d}: metadata `{}` is {}, expected an array", m.key("attention.recurrent_layers"), v.type_name())
        }
        None => {
            let every = m.u64_opt("full_attention_interval")?.unwrap_or(4).max(1) as usize;
            (0..layers).map(|i| (i + 1) % every != 0).collect()
        }
    };
    let (nk, nv, inner) = (m.u64("ssm.group_count")?, m.u64("ssm.time_step_rank")?, m.u64("ssm.inner_size")?);
    if nk == 0 || nv == 0 || nv % nk != 0 || inner % nv != 0 {
        bail!(
            "{d}: ssm.time_step_rank {nv} (value heads) must be a multiple of ssm.group_count {nk} (key heads), \
             and ssm.inner_size {inner} of it"
        );
    }
    let kinds = recurrent.iter().map(|&r| if r { "linear_attention" } else { "full_attention" });
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!(model_type));
    o.insert("num_hidden_layers".into(), json!(layers));
    o.insert("layer_types".into(), json!(kinds.collect::<Vec<_>>()));
    o.insert("linear_num_key_heads".into(), json!(nk));
    o.insert("linear_num_value_heads".into(), json!(nv));
    o.insert("linear_key_head_dim".into(), json!(m.u64("ssm.state_size")?));
    o.insert("linear_value_head_dim".into(), json!(inner / nv));
    o.insert("linear_conv_kernel_dim".into(), json!(m.u64("ssm.conv_kernel")?));
    if model_type == "qwen3_5_moe_text" && nv != nk {
        o.insert("linear_value_heads_tiled".into(), json!(true));
    }
    o.insert("num_experts".into(), json!(m.u64("expert_count")?));
    o.insert("num_experts_per_tok".into(), json!(m.u64("expert_used_count")?));
    o.insert("moe_intermediate_size".into(), json!(m.u64("expert_feed_forward_length")?));
    let shared = match m.u64_opt("expert_shared_feed_forward_length")? {
        Some(s) if s > 0 => s,
        _ => m.u64("feed_forward_length")?,
    };
    o.insert("shared_expert_intermediate_size".into(), json!(shared));
    o.insert("norm_topk_prob".into(), json!(true));
    o.insert("decoder_sparse_step".into(), json!(1));
    o.insert("mlp_only_layers".into(), json!([]));
    Ok(c)
}

/// llama.cpp's `llama` with experts (Mixtral): softmax top-k renormalised, full RoPE, no
/// sliding window (llama.cpp's graph has none). A dense `llama` (no `expert_count`) and
/// llama3-style RoPE scaling (`rope_freqs`) are refused.
fn llama(m: &Meta, vocab: u64, tied: bool, has: &dyn Fn(&str) -> bool) -> Result<Json> {
    let mut c = gqa(m, vocab, tied)?;
    let d = m.file.display();
    let experts = m.u64_opt("expert_count")?.unwrap_or(0);
    if experts == 0 {
        bail!(
            "{d}: a `llama` without experts (`{}` missing or 0) is a dense model; flashmoe runs mixture-of-experts \
             models (`llama` with ffn_*_exps, as Mixtral's)",
            m.key("expert_count")
        );
    }
    if has("rope_freqs.weight") {
        bail!("{d}: tensor `rope_freqs.weight` (llama3-style RoPE scaling) is not supported");
    }
    let o = c.as_object_mut().expect("an object");
    o.insert("model_type".into(), json!("mixtral"));
    o.insert("num_local_experts".into(), json!(experts));
    o.insert("num_experts_per_tok".into(), json!(m.u64("expert_used_count")?));
    let inter = match m.u64_opt("expert_feed_forward_length")? {
        Some(i) if i > 0 => i,
        _ => m.u64("feed_forward_length")?,
    };
    o.insert("intermediate_size".into(), json!(inter));
    Ok(c)
}

/// The canonical name of GGUF tensor `g` in a family whose names are `n` under prefix `pre`.
pub fn canonical(n: &Names, pre: &str, g: &str) -> Option<String> {
    match g {
        "token_embd.weight" => return Some(format!("{pre}{}.weight", n.embed)),
        "output_norm.weight" => return Some(format!("{pre}{}.weight", n.final_norm)),
        "output.weight" => return Some(format!("{}.weight", n.lm_head[0])),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let l = n.layer(pre, i);
    let dn = format!("{l}.{}", n.deltanet);
    if rest == "ssm_a" {
        return Some(format!("{dn}.{}", n.a_log));
    }
    let (role, suffix) = rest.rsplit_once('.')?;
    let (a, f) = (format!("{l}.{}", n.attention), format!("{l}.{}", n.ffn));
    // older files keep each expert apart: `ffn_gate.E`, `ffn_up.E`, `ffn_down.E`
    if let Some((p, e)) = role.split_once('.')
        && let Ok(e) = e.parse::<usize>()
    {
        let k = ["ffn_gate", "ffn_up", "ffn_down"].iter().position(|&x| x == p)?;
        return Some(format!("{f}.{}.{e}.{}.{suffix}", n.experts, n.expert_projs[k]));
    }
    let module = match role {
        "attn_norm" => format!("{l}.{}", n.input_norm),
        "ffn_norm" => format!("{l}.{}", n.post_norm),
        "attn_q" => format!("{a}.{}", n.q_proj),
        "attn_k" => format!("{a}.{}", n.k_proj),
        "attn_v" => format!("{a}.{}", n.v_proj),
        "attn_output" => format!("{a}.{}", n.o_proj),
        "attn_q_norm" => format!("{a}.{}", n.q_norm),
        "attn_k_norm" => format!("{a}.{}", n.k_norm),
        "post_attention_norm" => format!("{l}.{}", n.post_norm),
        "attn_sinks" if suffix == "weight" => return Some(format!("{a}.{}", n.sinks)),
        "attn_q_a" => format!("{a}.{}", n.mla.q_a),
        "attn_q_a_norm" => format!("{a}.{}", n.mla.q_a_norm),
        "attn_q_b" => format!("{a}.{}", n.mla.q_b),
        "attn_kv_a_mqa" => format!("{a}.{}", n.mla.kv_a),
        "attn_kv_a_norm" => format!("{a}.{}", n.mla.kv_a_norm),
        "attn_kv_b" => format!("{a}.{}", n.mla.kv_b),
        "attn_k_b" => format!("{a}.{}", n.mla.k_b),
        "attn_v_b" => format!("{a}.{}", n.mla.v_b),
        "ffn_gate_inp" => format!("{f}.{}", n.router),
        "ffn_gate_exps" => format!("{f}.{}.{}", n.mlx_experts, n.gate_proj),
        "ffn_up_exps" => format!("{f}.{}.{}", n.mlx_experts, n.up_proj),
        "ffn_down_exps" => format!("{f}.{}.{}", n.mlx_experts, n.down_proj),
        "ffn_gate" => format!("{f}.{}", n.gate_proj),
        "ffn_up" => format!("{f}.{}", n.up_proj),
        "ffn_down" => format!("{f}.{}", n.down_proj),
        "ffn_gate_shexp" => format!("{f}.{}.{}", n.shared_expert, n.gate_proj),
        "ffn_up_shexp" => format!("{f}.{}.{}", n.shared_expert, n.up_proj),
        "ffn_down_shexp" => format!("{f}.{}.{}", n.shared_expert, n.down_proj),
        "ffn_gate_inp_shexp" => format!("{f}.{}", n.shared_expert_gate),
        "exp_probs_b" if suffix == "bias" => return Some(format!("{f}.{}", n.correction_bias)),
        // Gated DeltaNet (Qwen3-Next, Qwen3.5): `attn_qkv`/`attn_gate` as the converter splits
        // Qwen3-Next's fused `in_proj_qkvz` (older files keep it whole, as `ssm_in`)
        "attn_qkv" => format!("{dn}.in_proj_qkv"),
        "attn_gate" => format!("{dn}.in_proj_z"),
        "ssm_in" => format!("{dn}.in_proj_qkvz"),
        "ssm_ba" => format!("{dn}.in_proj_ba"),
        "ssm_beta" => format!("{dn}.in_proj_b"),
        "ssm_alpha" => format!("{dn}.in_proj_a"),
        "ssm_conv1d" => format!("{dn}.{}", n.conv1d),
        "ssm_dt" if suffix == "bias" => return Some(format!("{dn}.{}", n.dt_bias)),
        "ssm_norm" => format!("{dn}.{}", n.gated_norm),
        "ssm_out" => format!("{dn}.{}", n.out_proj),
        _ => return None,
    };
    Some(format!("{module}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::HF;

    #[test]
    fn llama_cpp_names_become_the_familys() {
        let c = |g| canonical(&HF, "model.", g);
        assert_eq!(c("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(c("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(c("output_norm.weight").unwrap(), "model.norm.weight");
        assert_eq!(c("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(c("blk.3.attn_k_norm.weight").unwrap(), "model.layers.3.self_attn.k_norm.weight");
        assert_eq!(c("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(c("blk.0.ffn_gate_inp.weight").unwrap(), "model.layers.0.mlp.gate.weight");
        let e = c("blk.1.ffn_down_exps.weight").unwrap();
        assert_eq!(e, "model.layers.1.mlp.switch_mlp.down_proj.weight");
        assert!(HF.is_expert(&e));
        assert_eq!(c("blk.1.attn_q.bias").unwrap(), "model.layers.1.self_attn.q_proj.bias");
        assert_eq!(c("rope_freqs.weight"), None);
        // gpt-oss: sinks (no suffix in the family's names), the post-attention norm, the
        // router's bias, experts' biases beside their stacks
        let o = |g| canonical(crate::families::names_of("gpt_oss"), "model.", g);
        assert_eq!(o("blk.2.attn_sinks.weight").unwrap(), "model.layers.2.self_attn.sinks");
        assert_eq!(o("blk.2.post_attention_norm.weight").unwrap(), "model.layers.2.post_attention_layernorm.weight");
        assert_eq!(o("blk.2.ffn_gate_inp.bias").unwrap(), "model.layers.2.mlp.router.bias");
        assert_eq!(o("blk.2.ffn_up_exps.bias").unwrap(), "model.layers.2.mlp.switch_mlp.up_proj.bias");
        // deepseek2: MLA's projections, kv_b whole or split, shared experts, the correction bias
        let d = |g| canonical(crate::families::names_of("deepseek_v3"), "model.", g);
        assert_eq!(d("blk.1.attn_q_a.weight").unwrap(), "model.layers.1.self_attn.q_a_proj.weight");
        assert_eq!(d("blk.1.attn_q_a_norm.weight").unwrap(), "model.layers.1.self_attn.q_a_layernorm.weight");
        assert_eq!(d("blk.1.attn_kv_a_mqa.weight").unwrap(), "model.layers.1.self_attn.kv_a_proj_with_mqa.weight");
        assert_eq!(d("blk.1.attn_kv_b.weight").unwrap(), "model.layers.1.self_attn.kv_b_proj.weight");
        assert_eq!(d("blk.1.attn_k_b.weight").unwrap(), "model.layers.1.self_attn.k_b_proj.weight");
        assert_eq!(d("blk.1.attn_v_b.weight").unwrap(), "model.layers.1.self_attn.v_b_proj.weight");
        assert_eq!(d("blk.1.ffn_down_shexp.weight").unwrap(), "model.layers.1.mlp.shared_experts.down_proj.weight");
        assert_eq!(d("blk.1.exp_probs_b.bias").unwrap(), "model.layers.1.mlp.gate.e_score_correction_bias");
        assert_eq!(c("blk.x.attn_q.weight"), None);
        // Gated DeltaNet (Qwen3-Next, Qwen3.5)
        let dn = "model.layers.2.linear_attn";
        assert_eq!(c("blk.2.attn_qkv.weight").unwrap(), format!("{dn}.in_proj_qkv.weight"));
        assert_eq!(c("blk.2.attn_gate.weight").unwrap(), format!("{dn}.in_proj_z.weight"));
        assert_eq!(c("blk.2.ssm_in.weight").unwrap(), format!("{dn}.in_proj_qkvz.weight"));
        assert_eq!(c("blk.2.ssm_ba.weight").unwrap(), format!("{dn}.in_proj_ba.weight"));
        assert_eq!(c("blk.2.ssm_beta.weight").unwrap(), format!("{dn}.in_proj_b.weight"));
        assert_eq!(c("blk.2.ssm_alpha.weight").unwrap(), format!("{dn}.in_proj_a.weight"));
        assert_eq!(c("blk.2.ssm_conv1d.weight").unwrap(), format!("{dn}.conv1d.weight"));
        assert_eq!(c("blk.2.ssm_dt.bias").unwrap(), format!("{dn}.dt_bias"));
        assert_eq!(c("blk.2.ssm_a").unwrap(), format!("{dn}.A_log"));
        assert_eq!(c("blk.2.ssm_norm.weight").unwrap(), format!("{dn}.norm.weight"));
        assert_eq!(c("blk.2.ssm_out.weight").unwrap(), format!("{dn}.out_proj.weight"));
        assert_eq!(c("blk.2.ffn_gate_inp_shexp.weight").unwrap(), "model.layers.2.mlp.shared_expert_gate.weight");
        // Mixtral: the router, and older files' experts one by one
        let m = |g| canonical(crate::families::names_of("mixtral"), "model.", g);
        assert_eq!(m("blk.1.ffn_gate_inp.weight").unwrap(), "model.layers.1.block_sparse_moe.gate.weight");
        assert_eq!(m("blk.1.ffn_up.3.weight").unwrap(), "model.layers.1.block_sparse_moe.experts.3.w3.weight");
        assert_eq!(m("blk.1.ffn_down.0.weight").unwrap(), "model.layers.1.block_sparse_moe.experts.0.w2.weight");
        assert_eq!(
            m("blk.1.ffn_gate_exps.weight").unwrap(),
            "model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"
        );
        assert_eq!(m("blk.1.ffn_what.3.weight"), None);
    }
}
