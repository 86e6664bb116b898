//! The tokenizer a GGUF carries (`tokenizer.ggml.*`) as a `tokenizers` tokenizer built in
//! memory, and its chat template (`tokenizer.chat_template`). Only GPT-2-style byte-level BPE
//! (`tokenizer.ggml.model` = `gpt2`) is read; the pre-tokenizer's split regex comes from
//! `tokenizer.ggml.pre`, as llama.cpp's `llama-vocab.cpp` chooses it.

use super::{Gguf, Value};
use anyhow::{Result, anyhow, bail};
use serde_json::{Value as Json, json};

/// llama.cpp's token types (`llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The split regex of a pre-tokenizer name, as llama.cpp's `llama_vocab` uses it.
fn pre_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "qwen2" | "deepseek-r1-qwen" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // Qwen3.5's: combining marks stay with the letters before them
        "qwen35" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" => {
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        "gpt2" | "default" | "gpt-2" => r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        _ => return None,
    })
}

/// What the tokenizer module needs: the tokenizer, the template, BOS/EOS as text.
pub struct Vocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: Option<String>,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    let file = g.path.display();
    let a = g.get(key)?.as_array().ok_or_else(|| anyhow!("{file}: metadata `{key}` is not an array"))?;
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| anyhow!("{file}: metadata `{key}`[{i}] is {}, not a string", v.type_name()))
        })
        .collect()
}

/// The tokenizer of GGUF `g`.
pub fn vocab(g: &Gguf) -> Result<Vocab> {
    let file = g.path.display();
    let model = g.get("tokenizer.ggml.model")?.as_str().unwrap_or("?");
    if model != "gpt2" {
        bail!("{file}: tokenizer.ggml.model `{model}` is not supported (supported: gpt2, byte-level BPE)");
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        Some(v) => bail!("{file}: metadata `tokenizer.ggml.token_type` is {}, not an array", v.type_name()),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!("{file}: tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}", types.len(), tokens.len());
    }
    let pre = g.meta.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let regex = pre_regex(pre).ok_or_else(|| {
        anyhow!(
            "{file}: tokenizer.ggml.pre `{pre}` is not supported (supported: qwen2, qwen35, llama-bpe, gpt2, default)"
        )
    })?;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(t.to_string(), json!(i)).is_some() {
            bail!("{file}: tokenizer.ggml.tokens[{i}] `{t}` appears twice");
        }
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == CONTROL}));
        }
    }
    for (i, m) in merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            bail!("{file}: tokenizer.ggml.merges[{i}] `{m}` is not two tokens")
        };
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            bail!("{file}: tokenizer.ggml.merges[{i}] `{m}` names a token not in the vocabulary");
        }
    }
    let id = |k: &str| -> Result<Option<usize>> {
        match g.meta.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64().map(|x| x as usize).filter(|&x| x < tokens.len()) {
                Some(x) => Ok(Some(x)),
                None => bail!("{file}: metadata `{k}` is {v:?}, not a token id below {}", tokens.len()),
            },
        }
    };
    let (bos, eos) = (id("tokenizer.ggml.bos_token_id")?, id("tokenizer.ggml.eos_token_id")?);
    let add_bos = g.meta.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let t = tokens[b];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [b], "tokens": [t]}}})
        }
        (true, None) => bail!("{file}: tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing"),
        _ => Json::Null,
    };
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let tokenizer: tokenizers::Tokenizer =
        spec.to_string().parse().map_err(|e| anyhow!("{file}: the tokenizer in its metadata does not build: {e}"))?;
    let template = match g.meta.get("tokenizer.chat_template") {
        None => None,
        Some(Value::Str(s)) => Some(s.clone()),
        Some(v) => bail!("{file}: metadata `tokenizer.chat_template` is {}, not a string", v.type_name()),
    };
    Ok(Vocab { tokenizer, template, bos: bos.map(|b| tokens[b].to_string()), eos: eos.map(|e| tokens[e].to_string()) })
}

/// The tokenizer files a converted model carries beside its weights (`convert --from
/// FILE.gguf`): `tokenizer.json`, `tokenizer_config.json` (BOS/EOS) and `chat_template.jinja`.
pub fn side_files(g: &Gguf) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let v = vocab(g)?;
    let json =
        v.tokenizer.to_string(false).map_err(|e| anyhow!("{}: serializing its tokenizer: {e}", g.path.display()))?;
    let cfg = json!({"bos_token": v.bos, "eos_token": v.eos});
    let mut files =
        vec![("tokenizer.json", json.into_bytes()), ("tokenizer_config.json", cfg.to_string().into_bytes())];
    if let Some(t) = v.template {
        files.push(("chat_template.jinja", t.into_bytes()));
    }
    Ok(files)
}
