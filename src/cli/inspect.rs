//! `inspect`: what a model is, from its config and files; `template`: the prompt it renders.

use anyhow::{Context, Result, bail};
use flashmoe::config::{Ffn, Mixer, ModelConfig};
use flashmoe::flash::{Manifest, StoreOptions};
use std::path::{Path, PathBuf};

pub(crate) fn cmd_inspect(dir: PathBuf) -> Result<()> {
    let flash = Manifest::is_flash(&dir);
    let (c, manifest) = if flash {
        let m = Manifest::load(&dir)?;
        (ModelConfig::from_json(&m.config)?, Some(m))
    } else {
        (ModelConfig::load(&dir)?, None)
    };
    let (total, active) = c.param_counts();
    let n_attn = c.mixers.iter().filter(|m| **m == Mixer::Attention).count();
    let n_mla = c.mixers.iter().filter(|m| **m == Mixer::Mla).count();
    let n_moe = c.ffns.iter().filter(|f| **f == Ffn::Moe).count();
    println!(
        "model          {}{}",
        dir.display(),
        if flash {
            " (flash layout)"
        } else if flashmoe::gguf::is_gguf(&dir) {
            " (GGUF)"
        } else {
            " (Hugging Face checkpoint)"
        }
    );
    println!(
        "architecture   {} ({}{})",
        c.model_type,
        c.family,
        if c.multimodal() { ", multimodal wrapper" } else { "" }
    );
    println!(
        "layers         {} ({} DeltaNet, {} full attention, {} latent attention; {} MoE, {} dense)",
        c.num_layers,
        c.num_layers - n_attn - n_mla,
        n_attn,
        n_mla,
        n_moe,
        c.num_layers - n_moe
    );
    println!(
        "pattern        {}  (L DeltaNet, F attention, M latent attention; lower case = dense MLP)",
        c.layer_pattern()
    );
    println!("hidden         {}, vocab {}, context {}", c.hidden_size, c.vocab_size, c.max_position_embeddings);
    if let Some(m) = &c.mla {
        let per_token = 4 * m.latent_width();
        println!(
            "attention      latent (MLA): {} heads, q {}, kv latent {} + rope key {}, head dims nope {} / rope {} / v {} \
             (theta {}{}), {} RoPE",
            c.num_heads,
            m.q_lora_rank.map_or("full projection".to_string(), |r| format!("LoRA rank {r}")),
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            c.rope_theta,
            c.attn
                .yarn
                .map_or(String::new(), |y| format!(", YaRN x{} from {}", y.factor, y.original_max_position_embeddings)),
            if m.interleaved { "interleaved" } else { "half-split" }
        );
        // what expanded K and V would take, for comparison (GQA with one KV head per query head)
        let expanded = 4 * c.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim);
        println!(
            "latent cache   {per_token} B per token and layer (f32), {:.0}x less than expanded K and V ({expanded} B)",
            expanded as f64 / per_token as f64
        );
        if let Some(x) = &m.indexer {
            let own = x.own.iter().filter(|&&o| o).count();
            println!(
                "indexer        DSA: {} heads x {}, top {} positions, {} RoPE, own in {own} of {} layers (+{} B per token)",
                x.heads,
                x.head_dim,
                x.topk,
                if x.interleaved { "interleaved" } else { "half-split" },
                x.own.len(),
                4 * x.head_dim
            );
        }
    } else {
        println!(
            "attention      {} heads, {} kv heads, head dim {}, rotary dim {} (theta {}), gated {}",
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.rotary_dim(),
            c.rope_theta,
            c.gated_attention()
        );
        let a = &c.attn;
        println!(
            "attn options   q/k norm {}, biases {}, sinks {}, sliding window {}{}",
            match a.qk_norm {
                flashmoe::config::QkNorm::None => "none",
                flashmoe::config::QkNorm::PerHead => "per head",
                flashmoe::config::QkNorm::Whole => "over all heads",
            },
            match (a.qkv_bias, a.o_bias) {
                (true, true) => "q/k/v/o",
                (true, false) => "q/k/v",
                _ => "none",
            },
            if a.sinks { "yes" } else { "no" },
            {
                let w: Vec<usize> = a.window.iter().flatten().copied().collect();
                match w.first() {
                    None => "none".to_string(),
                    Some(x) if w.len() == a.window.len() => format!("{x} in every layer"),
                    Some(x) => format!("{x} in {} of {} layers", w.len(), a.window.len()),
                }
            },
            a.yarn
                .map_or(String::new(), |y| format!(", YaRN x{} from {}", y.factor, y.original_max_position_embeddings))
        );
    }
    if let Some(l) = &c.linear {
        println!(
            "deltanet       {} k heads x {}, {} v heads x {}, conv kernel {}{}",
            l.num_k_heads,
            l.k_head_dim,
            l.num_v_heads,
            l.v_head_dim,
            l.conv_kernel,
            if l.v_heads_tiled { " (v heads in llama.cpp's tiled order)" } else { "" }
        );
    }
    println!("parameters     {total} total, {active} active per token");
    // bytes of one expert and of the resident weights, as stored
    // bytes per stored format, every tensor (a GGUF's quantization mix)
    let mut mix = std::collections::BTreeMap::<String, u64>::new();
    let (expert_bytes, expert_fmt, resident_bytes) = match &manifest {
        Some(m) => {
            let res = m.files.iter().find(|f| f.name == m.resident.file).map_or(0, |f| f.bytes);
            match &m.experts {
                Some(e) => (e.stride, e.kind.clone(), res),
                None => (0, "-".into(), res),
            }
        }
        None => {
            // the bytes as stored, tensor by tensor (bf16, FP8 with its scales, MXFP4 blocks and
            // scales, compressed-tensors int words with their scales, MLX groups): routed experts
            // of the model's layers apart from the rest
            let src = flashmoe::source::open(&dir)?;
            let names = flashmoe::families::names_of(&c.model_type);
            let pre = flashmoe::import::text_prefix(&c, src.as_ref()).unwrap_or_default();
            let (mut experts, mut rest, mut kinds) = (0u64, 0u64, std::collections::BTreeSet::new());
            for n in src.tensors() {
                let t = src.tensor(n)?;
                *mix.entry(t.format.describe()).or_default() += t.stored_bytes();
                match names.layer_of(&pre, n) {
                    // MTP layers past the model's own: skipped by load and convert
                    Some(l) if l >= c.num_layers => {}
                    _ if names.is_expert(n) => {
                        experts += t.stored_bytes();
                        kinds.insert(t.format.describe());
                    }
                    _ => rest += t.stored_bytes(),
                }
            }
            let eb = experts / (c.num_experts * n_moe).max(1) as u64;
            let fmt = format!("{} as stored", kinds.into_iter().collect::<Vec<_>>().join(" + "));
            (eb, fmt, rest)
        }
    };
    if n_moe > 0 {
        println!(
            "experts        {} per layer, {} routed per token{}, intermediate {}, shared {}",
            c.num_experts,
            c.num_experts_per_tok,
            if c.router.renormalize { " (renormalised)" } else { "" },
            c.moe_intermediate_size,
            c.shared_expert_intermediate_size
        );
        let r = &c.router;
        println!(
            "router         {}{}{}{}{}",
            match (r.sigmoid, r.softmax_chosen) {
                (true, _) => "sigmoid per expert",
                (false, true) => "top-k by logit, softmax over the chosen",
                (false, false) => "softmax over experts",
            },
            match (r.correction_bias, r.logit_bias) {
                (true, _) => ", choice by score + correction bias",
                (false, true) => ", the router has a bias",
                _ => "",
            },
            if r.n_group > 1 { format!(", best {} of {} groups", r.topk_group, r.n_group) } else { String::new() },
            if r.scale != 1.0 { format!(", weights x {}", r.scale) } else { String::new() },
            if c.shared_expert_intermediate_size > 0 {
                if c.shared_expert_gated { "; shared expert gated by sigmoid" } else { "; shared expert ungated" }
            } else {
                ""
            }
        );
        println!("bytes/expert   {expert_bytes} ({expert_fmt})");
        let per_tok = expert_bytes * (c.num_experts_per_tok * n_moe) as u64;
        let all = expert_bytes * (c.num_experts * n_moe) as u64;
        println!(
            "expert bytes   {} per token at top-{}, {} in all",
            gib(per_tok as f64),
            c.num_experts_per_tok,
            gib(all as f64)
        );
    }
    if let Some(m) = &manifest {
        println!("formats        dense {}, experts {}", m.dense, expert_fmt);
    } else {
        let mix: Vec<String> = mix.iter().map(|(k, b)| format!("{k} {}", gib(*b as f64))).collect();
        println!("formats        {}", mix.join(", "));
    }
    let store = StoreOptions::default();
    let slots = if flash { expert_bytes * store.max_batch.max(c.num_experts_per_tok) as u64 } else { 0 };
    println!(
        "footprint      resident weights {}{}, expert buffers {} (os cache; direct adds --cache-size), \
         state {} at 4096 tokens",
        gib(resident_bytes as f64),
        if flash { " (mapped)" } else { "" },
        gib(slots as f64),
        gib(c.state_bytes(4096) as f64)
    );
    Ok(())
}

pub(crate) fn gib(b: f64) -> String {
    if b >= 1e9 { format!("{:.2} GB", b / 1e9) } else { format!("{:.2} MB", b / 1e6) }
}

/// `flashmoe template`: the rendered prompt, exactly (no newline added).
pub(crate) fn cmd_template(
    model: &Path,
    template: Option<PathBuf>,
    messages: &Path,
    tools: Option<PathBuf>,
    set: &[String],
    generation_prompt: bool,
) -> Result<()> {
    let read_json = |p: &Path, flag: &str| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).with_context(|| format!("--{flag}: cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("--{flag}: {} is not JSON", p.display()))
    };
    let conv = read_json(messages, "messages")?;
    // a bare list, or an object holding `messages` (and perhaps `tools`)
    let (msgs, mut tool_defs) = match &conv {
        serde_json::Value::Array(_) => (conv.clone(), None),
        serde_json::Value::Object(o) => match o.get("messages") {
            Some(m @ serde_json::Value::Array(_)) => (m.clone(), o.get("tools").filter(|t| !t.is_null()).cloned()),
            _ => bail!("--messages: {} holds no `messages` list", messages.display()),
        },
        _ => bail!("--messages: {} must hold a list of messages", messages.display()),
    };
    if let Some(p) = &tools {
        let t = read_json(p, "tools")?;
        if !t.is_array() {
            bail!("--tools: {} must hold a list of tools", p.display());
        }
        tool_defs = Some(t);
    }
    let mut extra = serde_json::Map::new();
    for kv in set {
        let (name, value) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {kv}: expected NAME=JSON, e.g. enable_thinking=false"))?;
        let v = serde_json::from_str(value)
            .with_context(|| format!("--set {kv}: `{value}` is not JSON (a string needs quotes: NAME='\"text\"')"))?;
        extra.insert(name.to_string(), v);
    }
    let mut tok = flashmoe::tokenizer::TextTokenizer::load(model)?;
    if let Some(p) = &template {
        let t = std::fs::read_to_string(p).with_context(|| format!("--template: cannot read {}", p.display()))?;
        tok.set_chat_template(t);
    }
    let out = tok.apply_chat_template(&msgs, tool_defs.as_ref(), generation_prompt, &extra)?;
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
