//! The tokenizer a GGUF carries (`tokenizer.ggml.*`) as a `tokenizers` tokenizer built in
//! memory, and its chat template (`tokenizer.chat_template`). Two kinds are read:
//! GPT-2-style byte-level BPE (`tokenizer.ggml.model` = `gpt2`), whose pre-tokenizer's split
//! regex comes from `tokenizer.ggml.pre` as llama.cpp's `llama-vocab.cpp` chooses it, and
//! SentencePiece (`llama`, the Llama lineage's), tokenized as llama.cpp's SPM tokenizer does:
//! spaces become U+2581, a leading one is added before each stretch of text (at the start and
//! after each special token) unless `tokenizer.ggml.add_space_prefix` is false, adjacent pieces
//! merge greedily by the score of the piece they make (llama.cpp takes the leftmost of equal
//! scores, the ranks here the lower id, then the earlier split: alike where scores differ), and
//! a character no piece covers becomes its UTF-8 bytes' `<0xXX>` tokens. As a `tokenizers` BPE
//! model that is: merges ranked by the merged piece's score, byte fallback, and a
//! prepend-and-replace normalizer.

use super::{Gguf, Value};
use anyhow::{Result, anyhow, bail};
use serde_json::{Value as Json, json};

/// llama.cpp's token types (`llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const BYTE: i64 = 6;

/// SentencePiece's whitespace mark.
const SPACE: &str = "\u{2581}";

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
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        _ => bail!(
            "{file}: tokenizer.ggml.model `{model}` is not supported (supported: gpt2, byte-level BPE; llama, SentencePiece)"
        ),
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        Some(v) => bail!("{file}: metadata `tokenizer.ggml.token_type` is {}, not an array", v.type_name()),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!("{file}: tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}", types.len(), tokens.len());
    }
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
    let (normalizer, pre_tokenizer, decoder, merges, unk) =
        if spm { spm_parts(g, &tokens, &types, &vocab)? } else { gpt2_parts(g, &vocab)? };
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
    // llama.cpp's default: BOS for SentencePiece, none for GPT-2-style BPE
    let add_bos = match g.meta.get("tokenizer.ggml.add_bos_token") {
        None => spm,
        Some(v) => v.as_bool().ok_or_else(|| {
            anyhow!("{file}: metadata `tokenizer.ggml.add_bos_token` is {}, not a bool", v.type_name())
        })?,
    };
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
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": spm, "ignore_merges": false,
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

/// The normalizer, pre-tokenizer, decoder, merges and unknown token of a tokenizer.
type Parts = (Json, Json, Json, Vec<Json>, Json);

/// GPT-2-style byte-level BPE: `tokenizer.ggml.merges` and the split regex of `tokenizer.ggml.pre`.
fn gpt2_parts(g: &Gguf, vocab: &serde_json::Map<String, Json>) -> Result<Parts> {
    let file = g.path.display();
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let pre = g.meta.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let regex = pre_regex(pre).ok_or_else(|| {
        anyhow!(
            "{file}: tokenizer.ggml.pre `{pre}` is not supported (supported: qwen2, qwen35, llama-bpe, gpt2, default)"
        )
    })?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            bail!("{file}: tokenizer.ggml.merges[{i}] `{m}` is not two tokens")
        };
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            bail!("{file}: tokenizer.ggml.merges[{i}] `{m}` names a token not in the vocabulary");
        }
        pairs.push(json!([a, b]));
    }
    let pre_tokenizer = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    Ok((Json::Null, pre_tokenizer, decoder, pairs, Json::Null))
}

/// SentencePiece (llama.cpp's SPM tokenizer): `tokenizer.ggml.scores` rank the merges, each
/// piece made from any two pieces that spell it, at its own score; the 256 byte pieces
/// `<0x00>`..`<0xFF>` catch what no piece covers.
fn spm_parts(g: &Gguf, tokens: &[&str], types: &[i64], vocab: &serde_json::Map<String, Json>) -> Result<Parts> {
    let file = g.path.display();
    let key = "tokenizer.ggml.scores";
    let scores = g.meta.get(key).ok_or_else(|| {
        anyhow!("{file}: metadata `{key}` is missing (a SentencePiece vocabulary ranks its pieces by score)")
    })?;
    let scores =
        scores.as_array().ok_or_else(|| anyhow!("{file}: metadata `{key}` is {}, not an array", scores.type_name()))?;
    if scores.len() != tokens.len() {
        bail!("{file}: {key} has {} entries, tokenizer.ggml.tokens {}", scores.len(), tokens.len());
    }
    let scores: Vec<f64> = scores
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| anyhow!("{file}: metadata `{key}`[{i}] is {v:?}, not a finite number"))
        })
        .collect::<Result<_>>()?;
    for b in 0..=255u8 {
        let t = format!("<0x{b:02X}>");
        match vocab.get(&t).and_then(Json::as_u64) {
            None => bail!(
                "{file}: tokenizer.ggml.tokens has no byte piece `{t}` (a SentencePiece vocabulary falls back to all 256)"
            ),
            Some(i) if types[i as usize] != BYTE => {
                bail!(
                    "{file}: tokenizer.ggml.token_type[{i}] of byte piece `{t}` is {}, not {BYTE} (byte)",
                    types[i as usize]
                )
            }
            Some(_) => {}
        }
    }
    // every (a, b) with a, b and a+b pieces, ranked by a+b's score (ties: the lower id first)
    let mut merges: Vec<(f64, usize, &str, &str)> = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                merges.push((scores[id], id, a, b));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = merges.into_iter().map(|(_, _, a, b)| json!([a, b])).collect();
    let prefix = match g.meta.get("tokenizer.ggml.add_space_prefix") {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| {
            anyhow!("{file}: metadata `tokenizer.ggml.add_space_prefix` is {}, not a bool", v.type_name())
        })?,
    };
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    let (normalizer, mut decoders) = if prefix {
        (json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]}), vec![])
    } else {
        (replace, vec![])
    };
    decoders.push(json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}));
    decoders.push(json!({"type": "ByteFallback"}));
    decoders.push(json!({"type": "Fuse"}));
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = match g.meta.get("tokenizer.ggml.unknown_token_id").and_then(Value::as_u64) {
        Some(u) if (u as usize) < tokens.len() => json!(tokens[u as usize]),
        _ => Json::Null,
    };
    Ok((normalizer, Json::Null, json!({"type": "Sequence", "decoders": decoders}), merges, unk))
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
