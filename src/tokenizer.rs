//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and chat template
//! (`chat_template.jinja` or `tokenizer_config.json`, rendered with minijinja the way
//! transformers renders it: trim_blocks, lstrip_blocks, loop controls, Python string methods
//! and a Python-compatible `tojson`).

use anyhow::{Context, Result, anyhow};
use minijinja::{Environment, Error as JError, ErrorKind, Value as JValue};
use serde_json::Value;
use std::path::Path;

/// Tokenizer plus chat template of a model directory.
#[derive(Clone)]
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The decoder is byte-level (GPT-2's byte-to-character map): a token's bytes are its
    /// characters mapped back.
    byte_level: bool,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// The id of `text` when it is one special token of this tokenizer (grammars must name
    /// such tokens, not spell them).
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.tok.get_added_tokens_decoder().iter().find(|(_, t)| t.special && t.content == text).map(|(&id, _)| id)
    }

    /// The tokenizer as `tokenizer.json` text (for the grammar engine).
    pub fn to_json(&self) -> anyhow::Result<String> {
        self.tok.to_string(false).map_err(|e| anyhow!("serializing the tokenizer: {e}"))
    }

    /// The tokenizer of the model in `dir` (a GGUF file: from its metadata).
    pub fn load(dir: &Path) -> Result<TextTokenizer> {
        if crate::gguf::is_gguf(dir) {
            let v = crate::gguf::vocab::vocab(&crate::gguf::Gguf::open(dir)?)?;
            return Ok(TextTokenizer {
                byte_level: is_byte_level(v.tokenizer.get_decoder()),
                tok: v.tokenizer,
                template: v.template,
                bos_token: v.bos,
                eos_token: v.eos,
            });
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            anyhow::bail!("{}: tokenizer file is missing", path.display());
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", cfg_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?)
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(String::from),
                _ => None,
            }
        };
        let byte_level = is_byte_level(tok.get_decoder());
        Ok(TextTokenizer {
            byte_level,
            tok,
            template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tok.encode(text, true).map_err(|e| anyhow!("tokenizer: {e}"))?;
        let ids = enc.get_ids();
        // a BOS the tokenizer adds before a text that starts with it (a chat template's
        // `{{ bos_token }}`) is given once, as llama.cpp's chat path does
        if ids.len() > 1 && ids[0] == ids[1] && enc.get_special_tokens_mask().first() == Some(&1) {
            return Ok(ids[1..].to_vec());
        }
        Ok(ids.to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tok.decode(ids, skip_special).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// An upper bound of the bytes one token stands for (the longest vocabulary entry in
    /// UTF-8; a byte-level entry is never shorter than its bytes): a text of `b` bytes has at
    /// least `b / max_token_bytes()` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.tok.get_vocab(true).keys().map(|k| k.len()).max().unwrap_or(1).max(1)
    }

    /// The bytes one token stands for, which may be part of a character (the text of a lone
    /// token would not show them): an added token's content, a byte-level token's characters
    /// mapped back to bytes, a byte-fallback `<0xNN>` its byte, else the token decoded alone.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let added = self.tok.get_added_vocabulary().simple_id_to_token(id);
        if let Some(a) = added {
            return a.into_bytes();
        }
        let Some(piece) = self.tok.id_to_token(id) else { return vec![] };
        if let Some(b) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
            && let Ok(b) = u8::from_str_radix(b, 16)
            && piece.len() == 6
        {
            return vec![b];
        }
        if self.byte_level
            && let Some(bytes) = piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
        if is_sentencepiece(self.tok.get_decoder()) {
            return piece.replace('\u{2581}', " ").into_bytes();
        }
        self.decode(&[id], false).map(String::into_bytes).unwrap_or_default()
    }

    /// A token as text: its bytes when they are UTF-8, else `bytes:` and each byte as `\xNN`
    /// (OpenAI's spelling of a token that splits a character).
    pub fn token_text(&self, id: u32) -> String {
        bytes_text(&self.token_bytes(id))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.tok.token_to_id(s)
    }

    /// EOS id named by `tokenizer_config.json`, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|s| self.token_to_id(s))
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders with this Jinja chat template instead of the model's own.
    pub fn set_chat_template(&mut self, template: String) {
        self.template = Some(template);
    }

    /// Renders the chat template. `extra` holds further template variables (e.g.
    /// `enable_thinking`).
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let src = self.template.as_deref().ok_or_else(|| anyhow!("this model has no chat template"))?;
        render_template(
            src,
            messages,
            tools,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            extra,
        )
    }
}

/// Renders a Hugging Face chat template.
pub fn render_template(
    src: &str,
    messages: &Value,
    tools: Option<&Value>,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    extra: &serde_json::Map<String, Value>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_filter("from_json", from_json);
    // Jinja2's `iterable` is Python's iter(): None is not (minijinja iterates none as empty);
    // Qwen3-Coder's `tools is iterable and tools | length > 0` relies on it
    env.add_test("iterable", |v: JValue| !v.is_none() && v.try_iter().is_ok());
    env.add_function("raise_exception", |msg: String| -> Result<JValue, JError> {
        Err(JError::new(ErrorKind::InvalidOperation, msg))
    });
    // transformers offers the local time to templates (gpt-oss's states "Current date")
    env.add_function("strftime_now", |fmt: String| -> Result<JValue, JError> { Ok(JValue::from(strftime_now(&fmt))) });
    env.add_template("chat", src).map_err(|e| anyhow!("chat template does not parse: {e:#}"))?;
    let mut ctx = extra.clone();
    ctx.insert("messages".into(), messages.clone());
    ctx.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
    ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
    ctx.insert("bos_token".into(), bos_token.map_or(Value::Null, |s| Value::String(s.into())));
    ctx.insert("eos_token".into(), eos_token.map_or(Value::Null, |s| Value::String(s.into())));
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(JValue::from(minijinja::value::Serde(&ctx))).map_err(|e| anyhow!("chat template failed: {e:#}"))
}

/// The local time formatted by C `strftime`, as Python's `datetime.now().strftime`.
fn strftime_now(fmt: &str) -> String {
    let Ok(cfmt) = std::ffi::CString::new(fmt) else { return String::new() };
    let mut buf = vec![0u8; 256];
    // SAFETY: `tm` is filled by localtime_r from the current time; strftime writes at most
    // `buf.len()` bytes and returns how many.
    let n = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return String::new();
        }
        libc::strftime(buf.as_mut_ptr() as *mut libc::c_char, buf.len(), cfmt.as_ptr(), &tm)
    };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `from_json`: a JSON text as the value it spells (Python's `json.loads`, keys in order).
/// DeepSeek V3.2's and V4's templates parse a call's string arguments with it; transformers'
/// environment lacks it, llama.cpp's has it.
fn from_json(s: &str) -> Result<JValue, JError> {
    let v: Value = serde_json::from_str(s)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, format!("from_json: not JSON ({e}): {s}")))?;
    Ok(JValue::from(minijinja::value::Serde(&v)))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=…,
/// separators=…, sort_keys=…)`, keys in insertion order, no HTML escaping.
fn tojson(v: JValue, kwargs: minijinja::value::Kwargs) -> Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json: Value = serde_json::to_value(&v).map_err(|e| JError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item, key) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        _ => (if indent.is_some() { ",".into() } else { ", ".into() }, ": ".into()),
    };
    let mut out = String::new();
    py_dump(&json, indent, 0, &item, &key, sort_keys.unwrap_or(false), &mut out);
    if ensure_ascii == Some(true) {
        // outside strings JSON is ASCII already: escape every other character as Python does
        out = out
            .chars()
            .flat_map(|c| {
                if c.is_ascii() {
                    vec![c.to_string()]
                } else {
                    c.encode_utf16(&mut [0; 2]).iter().map(|u| format!("\\u{u:04x}")).collect()
                }
            })
            .collect();
    }
    Ok(JValue::from_safe_string(out))
}

fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn py_dump(v: &Value, indent: Option<usize>, level: usize, item: &str, key: &str, sort: bool, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => py_str(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                return out.push_str("[]");
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                py_dump(x, indent, level + 1, item, key, sort, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) => {
            if o.is_empty() {
                return out.push_str("{}");
            }
            let mut entries: Vec<(&String, &Value)> = o.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                py_str(k, out);
                out.push_str(key);
                py_dump(x, indent, level + 1, item, key, sort, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// A token's bytes as text ([`TextTokenizer::token_text`]).
pub fn bytes_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.iter().fold(String::from("bytes:"), |mut s, b| {
            s.push_str(&format!("\\x{b:02x}"));
            s
        }),
    }
}

/// Whether a decoder is SentencePiece's (U+2581 for a space, the first one stripped): a lone
/// token decoded through it would lose its leading space.
fn is_sentencepiece(d: Option<&tokenizers::decoders::DecoderWrapper>) -> bool {
    use tokenizers::decoders::DecoderWrapper as D;
    match d {
        Some(D::Metaspace(_) | D::Strip(_)) => true,
        Some(D::Sequence(s)) => s.get_decoders().iter().any(|d| is_sentencepiece(Some(d))),
        _ => false,
    }
}

fn is_byte_level(d: Option<&tokenizers::decoders::DecoderWrapper>) -> bool {
    use tokenizers::decoders::DecoderWrapper as D;
    match d {
        Some(D::ByteLevel(_)) => true,
        Some(D::Sequence(s)) => s.get_decoders().iter().any(|d| is_byte_level(Some(d))),
        _ => false,
    }
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100 onwards, in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if c < 0x100 {
        return printable(c).then_some(c as u8);
    }
    (0..=255u32).filter(|&b| !printable(b)).nth((c - 0x100) as usize).map(|b| b as u8)
}

/// Turns a growing token sequence into text pieces without splitting multi-byte characters.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder { ids: vec![], emitted: 0 }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        // special tokens stay: <think> and <tool_call> are part of the answer (EOS never reaches here)
        let text = tok.decode(&self.ids, false)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
