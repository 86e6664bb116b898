//! Tool calls in generated text, in each family's format, become OpenAI `tool_calls`, whole
//! (after generation) or as they complete (streaming):
//! - Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; Qwen3.5 and
//!   Qwen3-Coder: `<tool_call><function=NAME><parameter=K>V</parameter>…</function></tool_call>`
//!   (the XML form their released templates ask for; one format reads both);
//! - GLM-4.5 to 4.7: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`;
//! - MiniMax-M2: `<minimax:tool_call><invoke name="NAME"><parameter name="K">V</parameter>…</invoke></minimax:tool_call>`;
//! - gpt-oss (harmony): read after [`crate::harmony`] has turned its messages into Qwen's form;
//! - DeepSeek, three forms in one format, as the released templates write them:
//!   V3 / R1 `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`,
//!   V3.1 the same block with `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` calls,
//!   V3.2 `<｜DSML｜function_calls><｜DSML｜invoke name="NAME"><｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>…</｜DSML｜invoke></｜DSML｜function_calls>`;
//! - Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>…<|tool_calls_section_end|>`.
//!
//! GLM's and MiniMax's values are text; one that parses as JSON (a number, an object, …) is
//! taken as that value, as their templates write non-string arguments as JSON. DeepSeek V3.2
//! says which values are strings (`string="true"`); the other DeepSeek forms and Kimi's write
//! the arguments as one JSON object.

use serde_json::{Map, Value};

/// A family's tool-call syntax ([`crate::families::Family::tool_format`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ToolFormat {
    #[default]
    Qwen,
    Glm,
    MiniMax,
    /// gpt-oss: harmony messages, in Qwen's form once [`crate::harmony::Harmony`] has read them.
    Harmony,
    /// DeepSeek V3, R1, V3.1 and V3.2 (one family writes any of the three forms).
    DeepSeek,
    /// Kimi-K2 and K2.5.
    Kimi,
}

const DS_CALLS: (&str, &str) = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>");
const DS_CALL: (&str, &str) = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>");
const DS_SEP: &str = "<｜tool▁sep｜>";
const DSML_CALLS: (&str, &str) = ("<｜DSML｜function_calls>", "</｜DSML｜function_calls>");
const KIMI_CALLS: (&str, &str) = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>");
const KIMI_CALL: (&str, &str) = ("<|tool_call_begin|>", "<|tool_call_end|>");
const KIMI_ARGS: &str = "<|tool_call_argument_begin|>";

impl ToolFormat {
    /// The tags around a block of calls as this format writes one (MiniMax's, DeepSeek's and
    /// Kimi's blocks may hold several calls).
    pub fn tags(self) -> (&'static str, &'static str) {
        match self {
            ToolFormat::Qwen | ToolFormat::Glm | ToolFormat::Harmony => ("<tool_call>", "</tool_call>"),
            ToolFormat::MiniMax => ("<minimax:tool_call>", "</minimax:tool_call>"),
            ToolFormat::DeepSeek => DS_CALLS,
            ToolFormat::Kimi => KIMI_CALLS,
        }
    }

    /// Every pair of tags a block may come in ([`ToolFormat::tags`] first): DeepSeek V3.2
    /// writes its calls in a block of its own.
    pub fn blocks(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ToolFormat::Qwen | ToolFormat::Glm | ToolFormat::Harmony => &[("<tool_call>", "</tool_call>")],
            ToolFormat::MiniMax => &[("<minimax:tool_call>", "</minimax:tool_call>")],
            ToolFormat::DeepSeek => &[DS_CALLS, DSML_CALLS],
            ToolFormat::Kimi => &[KIMI_CALLS],
        }
    }

    /// The calls inside one block; `None` if it is not a well-formed one.
    pub fn parse_block(self, inner: &str) -> Option<Vec<ToolCall>> {
        match self {
            ToolFormat::Qwen | ToolFormat::Harmony => parse_block(inner).or_else(|| qwen_xml(inner)).map(|c| vec![c]),
            ToolFormat::Glm => {
                let inner = inner.trim();
                let (name, mut rest) = match inner.find("<arg_key>") {
                    Some(i) => (inner[..i].trim(), &inner[i..]),
                    None => (inner, ""),
                };
                if !plain_name(name) {
                    return None;
                }
                let mut args = Map::new();
                while !rest.trim().is_empty() {
                    let (k, r) = between(rest.trim_start(), "<arg_key>", "</arg_key>")?;
                    let (v, r) = between(r.trim_start(), "<arg_value>", "</arg_value>")?;
                    args.insert(k.trim().to_string(), text_value(v));
                    rest = r;
                }
                Some(vec![ToolCall { name: name.to_string(), arguments: Value::Object(args).to_string() }])
            }
            ToolFormat::MiniMax => invokes(inner, "<invoke name=\"", "</invoke>", "<parameter name=\"", "</parameter>"),
            ToolFormat::DeepSeek if inner.trim_start().starts_with("<｜DSML｜invoke") => invokes(
                inner,
                "<｜DSML｜invoke name=\"",
                "</｜DSML｜invoke>",
                "<｜DSML｜parameter name=\"",
                "</｜DSML｜parameter>",
            ),
            ToolFormat::DeepSeek => calls(inner, DS_CALL, |c| {
                let (kind, rest) = c.split_once(DS_SEP)?;
                // V3 / R1: the type, then the name and the arguments in a fenced JSON block
                let fenced = rest.split_once('\n').and_then(|(name, body)| {
                    let json = body.trim().strip_prefix("```json")?.strip_suffix("```")?;
                    Some((name, json))
                });
                match fenced {
                    Some((name, json)) if kind.trim() == "function" => Some((name, json)),
                    _ => Some((kind, rest)),
                }
            }),
            ToolFormat::Kimi => calls(inner, KIMI_CALL, |c| {
                let (id, args) = c.split_once(KIMI_ARGS)?;
                // the id is `functions.NAME:IDX`
                let id = id.trim();
                let id = id.strip_prefix("functions.").unwrap_or(id);
                let name = match id.rsplit_once(':') {
                    Some((n, i)) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => n,
                    _ => id,
                };
                Some((name, args))
            }),
        }
    }

    /// A call written back in this format (a call of an undeclared tool stays text).
    pub fn as_text(self, c: &ToolCall) -> String {
        let (open, close) = self.tags();
        let args: Map<String, Value> = serde_json::from_str(&c.arguments).unwrap_or_default();
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        match self {
            ToolFormat::Qwen | ToolFormat::Harmony => {
                let name = serde_json::to_string(&c.name).unwrap_or_default();
                format!("{open}\n{{\"name\": {name}, \"arguments\": {}}}\n{close}", c.arguments)
            }
            ToolFormat::Glm => {
                let kv: String = args
                    .iter()
                    .map(|(k, v)| format!("<arg_key>{k}</arg_key>\n<arg_value>{}</arg_value>\n", text(v)))
                    .collect();
                format!("{open}{}\n{kv}{close}", c.name)
            }
            ToolFormat::MiniMax => {
                let ps: String =
                    args.iter().map(|(k, v)| format!("<parameter name=\"{k}\">{}</parameter>\n", text(v))).collect();
                format!("{open}\n<invoke name=\"{}\">\n{ps}</invoke>\n{close}", c.name)
            }
            // V3.1's form
            ToolFormat::DeepSeek => {
                format!("{open}{}{}{DS_SEP}{}{}{close}", DS_CALL.0, c.name, Value::Object(args), DS_CALL.1)
            }
            ToolFormat::Kimi => {
                let (b, e) = KIMI_CALL;
                format!("{open}{b}functions.{}:0{KIMI_ARGS}{}{e}{close}", c.name, Value::Object(args))
            }
        }
    }
}

/// A tool name as the tag formats write it: one line, no markup.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('<') && !name.contains('\n')
}

/// The calls of a block made of `call`-tagged items (nothing else but blanks between them),
/// `split` giving each item's name and JSON arguments.
fn calls<'a>(
    inner: &'a str,
    call: (&str, &str),
    split: impl Fn(&'a str) -> Option<(&'a str, &'a str)>,
) -> Option<Vec<ToolCall>> {
    let mut out = vec![];
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let (item, after) = between(rest, call.0, call.1)?;
        let (name, args) = split(item)?;
        let name = name.trim();
        if !plain_name(name) {
            return None;
        }
        out.push(ToolCall { name: name.to_string(), arguments: json_arguments(args)? });
        rest = after.trim();
    }
    (!out.is_empty()).then_some(out)
}

/// Arguments written as one JSON object (or as a JSON string holding one, as a template
/// writes OpenAI's string `arguments` through `tojson`), in OpenAI's compact form.
fn json_arguments(s: &str) -> Option<String> {
    match serde_json::from_str::<Value>(s.trim()).ok()? {
        v @ Value::Object(_) => Some(v.to_string()),
        Value::String(inner) => match serde_json::from_str::<Value>(&inner).ok()? {
            v @ Value::Object(_) => Some(v.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The calls of a block of `<invoke name="NAME">` items, each of `<parameter name="K">V`
/// items (MiniMax's and DeepSeek V3.2's): a value marked `string="true"` is that text, one
/// marked `string="false"` JSON, an unmarked one [`text_value`].
fn invokes(inner: &str, invoke: &str, invoke_end: &str, param: &str, param_end: &str) -> Option<Vec<ToolCall>> {
    let mut calls = vec![];
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let r = rest.strip_prefix(invoke)?;
        let q = r.find("\">")?;
        let name = &r[..q];
        if !plain_name(name) || name.contains('"') {
            return None;
        }
        let (body, after) = r[q + 2..].split_once(invoke_end)?;
        let mut args = Map::new();
        let mut b = body.trim();
        while !b.is_empty() {
            let r = b.strip_prefix(param)?;
            let q = r.find('>')?;
            let (head, r) = (&r[..q], &r[q + 1..]);
            let (key, marks) = head.split_once('"')?;
            let (v, after) = r.split_once(param_end)?;
            let value = match marks.trim() {
                "string=\"true\"" => Value::String(v.to_string()),
                "string=\"false\"" => serde_json::from_str(v.trim()).ok()?,
                "" => text_value(v.trim_matches('\n')),
                _ => return None,
            };
            args.insert(key.to_string(), value);
            b = after.trim();
        }
        calls.push(ToolCall { name: name.to_string(), arguments: Value::Object(args).to_string() });
        rest = after.trim();
    }
    (!calls.is_empty()).then_some(calls)
}

/// The text between `open` (which `s` must start with) and `close`, and what follows.
fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str)> {
    s.strip_prefix(open)?.split_once(close)
}

/// Qwen3.5's and Qwen3-Coder's call: `<function=NAME>`, then `<parameter=K>\nV\n</parameter>`
/// items, then `</function>`; a value's newlines at either end are the template's, and a value
/// that parses as JSON is that value (the templates write non-strings as JSON).
fn qwen_xml(inner: &str) -> Option<ToolCall> {
    let (name, r) = inner.trim().strip_prefix("<function=")?.split_once('>')?;
    if !plain_name(name) {
        return None;
    }
    let mut b = r.trim_end().strip_suffix("</function>")?.trim_start();
    let mut args = Map::new();
    while !b.is_empty() {
        let (key, r) = b.strip_prefix("<parameter=")?.split_once('>')?;
        let (v, after) = r.split_once("</parameter>")?;
        let v = v.strip_prefix('\n').unwrap_or(v);
        args.insert(key.trim().to_string(), text_value(v.strip_suffix('\n').unwrap_or(v)));
        b = after.trim_start();
    }
    Some(ToolCall { name: name.trim().to_string(), arguments: Value::Object(args).to_string() })
}

/// An argument written as text: the JSON value it spells, else the string itself.
fn text_value(v: &str) -> Value {
    match serde_json::from_str::<Value>(v.trim()) {
        Ok(x) if !x.is_string() => x,
        _ => Value::String(v.to_string()),
    }
}

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// Parses the inside of a Qwen `<tool_call>` block; `None` if it is not a call.
pub fn parse_block(inner: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => serde_json::to_string(a).ok()?,
        None => "{}".into(),
    };
    Some(ToolCall { name, arguments })
}

/// Splits finished text into its plain content and its tool calls. Blocks that do not parse
/// stay in the content.
pub fn parse(text: &str, f: ToolFormat) -> (String, Vec<ToolCall>) {
    let mut s = ToolStream::new(f);
    let mut content = String::new();
    let mut calls = vec![];
    for ev in s.push(text).into_iter().chain(s.finish()) {
        match ev {
            StreamEvent::Content(c) => content.push_str(&c),
            StreamEvent::Call(c) => calls.push(c),
        }
    }
    (content.trim().to_string(), calls)
}

/// [`parse`], keeping only calls of the `declared` tools: a call of any other stays in the
/// content, as the text it was.
pub fn parse_declared(text: &str, declared: &[String], f: ToolFormat) -> (String, Vec<ToolCall>) {
    let (mut content, calls) = parse(text, f);
    let (kept, other): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| declared.contains(&c.name));
    for c in &other {
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&f.as_text(c));
    }
    (content, kept)
}

/// What [`ToolStream`] releases.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    Content(String),
    Call(ToolCall),
}

/// Incremental splitter: text is released as soon as it cannot be the start of a tool call;
/// a call is released when its closing tag arrives.
#[derive(Default)]
pub struct ToolStream {
    format: ToolFormat,
    buf: String,
    /// The tags of the block being read ([`ToolFormat::blocks`]), once its opening arrived.
    open: Option<(&'static str, &'static str)>,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> ToolStream {
        ToolStream { format, ..Default::default() }
    }

    pub fn push(&mut self, piece: &str) -> Vec<StreamEvent> {
        self.buf.push_str(piece);
        let mut out = vec![];
        loop {
            if let Some((open, close)) = self.open {
                let Some(end) = self.buf.find(close) else { break };
                let inner = self.buf[..end].to_string();
                self.buf.drain(..end + close.len());
                self.open = None;
                match self.format.parse_block(&inner) {
                    Some(calls) => out.extend(calls.into_iter().map(StreamEvent::Call)),
                    None => out.push(StreamEvent::Content(format!("{open}{inner}{close}"))),
                }
            } else if let Some((start, tags)) =
                self.format.blocks().iter().filter_map(|t| Some((self.buf.find(t.0)?, *t))).min_by_key(|b| b.0)
            {
                if start > 0 {
                    out.push(StreamEvent::Content(self.buf[..start].to_string()));
                }
                self.buf.drain(..start + tags.0.len());
                self.open = Some(tags);
            } else {
                // hold back a tail that could be the beginning of an opening tag
                let could_open = |k: usize| {
                    self.buf.is_char_boundary(self.buf.len() - k)
                        && self.format.blocks().iter().any(|t| t.0.starts_with(&self.buf[self.buf.len() - k..]))
                };
                let keep =
                    (1..=self.buf.len().min(self.longest_open() - 1)).rev().find(|&k| could_open(k)).unwrap_or(0);
                let cut = self.buf.len() - keep;
                if cut > 0 {
                    out.push(StreamEvent::Content(self.buf[..cut].to_string()));
                    self.buf.drain(..cut);
                }
                break;
            }
        }
        out
    }

    fn longest_open(&self) -> usize {
        self.format.blocks().iter().map(|t| t.0.len()).max().unwrap_or(0)
    }

    /// Releases whatever is left (an unterminated call becomes content).
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let rest = std::mem::take(&mut self.buf);
        let text = match self.open.take() {
            Some((open, _)) => format!("{open}{rest}"),
            None => rest,
        };
        if text.is_empty() { vec![] } else { vec![StreamEvent::Content(text)] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls_and_keeps_content() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Verona\"}}\n</tool_call>";
        let (c, calls) = parse(t, ToolFormat::Qwen);
        assert_eq!(c, "Let me check.");
        assert_eq!(calls, vec![ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Verona\"}".into() }]);
        let (c, calls) = parse("<tool_call>not json</tool_call> tail", ToolFormat::Qwen);
        assert!(calls.is_empty() && c.contains("not json"));
    }

    #[test]
    fn streaming_split_matches_whole_parse_for_any_chunking() {
        for (f, t) in [
            (
                ToolFormat::Qwen,
                "a <tool_ca b <tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call> c <tool_call>{\"name\": \"g\"}</tool_call>",
            ),
            (
                // Qwen3.5's and Qwen3-Coder's XML form, a string kept as text
                ToolFormat::Qwen,
                "a <tool_ca b <tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call> c <tool_call>\n<function=g>\n<parameter=s>\nline one\nline two\n</parameter>\n</function>\n</tool_call>",
            ),
            (
                ToolFormat::Glm,
                "a <tool_ca b <tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call> c <tool_call>g</tool_call>",
            ),
            (
                ToolFormat::MiniMax,
                "a <minimax:to b <minimax:tool_call>\n<invoke name=\"f\">\n<parameter name=\"x\">1</parameter>\n</invoke>\n<invoke name=\"g\">\n</invoke>\n</minimax:tool_call> c",
            ),
            (
                ToolFormat::DeepSeek,
                "a <｜tool▁ca b <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"x\": 1}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜> c",
            ),
            (
                ToolFormat::DeepSeek,
                "a <｜DS b <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"x\": 1}<｜tool▁call▁end｜><｜tool▁call▁begin｜>g<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜> c",
            ),
            (
                ToolFormat::DeepSeek,
                "a <｜DSML｜func b\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n</｜DSML｜function_calls> c",
            ),
            (
                ToolFormat::Kimi,
                "a <|tool_calls_sec b <|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"x\": 1}<|tool_call_end|><|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|> c",
            ),
        ] {
            stream_matches_whole(f, t);
        }
        let (_, calls) = parse(
            "<tool_call>\n<function=g>\n<parameter=s>\nline one\nline two\n</parameter>\n</function>\n</tool_call>",
            ToolFormat::Qwen,
        );
        assert_eq!(calls[0].arguments, r#"{"s":"line one\nline two"}"#);
        // not a well-formed call: stays text
        let bad = "<tool_call>\n<function=g>\n<parameter=s>\nx\n</function>\n</tool_call>";
        assert_eq!(parse(bad, ToolFormat::Qwen), (bad.to_string(), vec![]));
    }

    fn stream_matches_whole(f: ToolFormat, t: &str) {
        let whole = parse(t, f);
        assert_eq!(whole.1.len(), 2, "{f:?}: {whole:?}");
        assert_eq!(whole.1[0], ToolCall { name: "f".into(), arguments: "{\"x\":1}".into() }, "{f:?}");
        for step in 1..8 {
            let mut s = ToolStream::new(f);
            let (mut content, mut calls) = (String::new(), vec![]);
            let chars: Vec<char> = t.chars().collect();
            for ch in chars.chunks(step) {
                for e in s.push(&ch.iter().collect::<String>()) {
                    match e {
                        StreamEvent::Content(c) => content.push_str(&c),
                        StreamEvent::Call(c) => calls.push(c),
                    }
                }
            }
            for e in s.finish() {
                if let StreamEvent::Content(c) = e {
                    content.push_str(&c)
                }
            }
            assert_eq!((content.trim().to_string(), calls), whole, "{f:?} chunk {step}");
        }
        // two pieces, cut at every place a piece can end
        for cut in (1..t.len()).filter(|&i| t.is_char_boundary(i)) {
            let mut s = ToolStream::new(f);
            let events: Vec<StreamEvent> = [s.push(&t[..cut]), s.push(&t[cut..]), s.finish()].concat();
            let mut content = String::new();
            let mut calls = vec![];
            for e in events {
                match e {
                    StreamEvent::Content(c) => content.push_str(&c),
                    StreamEvent::Call(c) => calls.push(c),
                }
            }
            assert_eq!((content.trim().to_string(), calls), whole, "{f:?} cut at {cut}");
        }
    }

    #[test]
    fn deepseek_and_kimi_calls_parse_as_their_templates_write_them() {
        let call = |name: &str, args: &str| ToolCall { name: name.into(), arguments: args.into() };
        let paris = call("get_weather", r#"{"city":"Paris","days":2}"#);
        let rome = call("get_weather", r#"{"city":"Rome","opts":{"unit":"C"}}"#);
        for (f, t) in [
            // DeepSeek V3 / R1
            (
                ToolFormat::DeepSeek,
                "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"days\": 2}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Rome\", \"opts\": {\"unit\": \"C\"}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            // V3.1, the second call's arguments a JSON string (OpenAI's string arguments through tojson)
            (
                ToolFormat::DeepSeek,
                "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"days\": 2}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>\"{\\\"city\\\": \\\"Rome\\\", \\\"opts\\\": {\\\"unit\\\": \\\"C\\\"}}\"<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            // V3.2
            (
                ToolFormat::DeepSeek,
                "Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n<｜DSML｜parameter name=\"opts\" string=\"false\">{\"unit\": \"C\"}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
            ),
            (
                ToolFormat::Kimi,
                "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\", \"days\": 2}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{\"city\": \"Rome\", \"opts\": {\"unit\": \"C\"}}<|tool_call_end|><|tool_calls_section_end|>",
            ),
        ] {
            assert_eq!(parse(t, f), ("Checking.".to_string(), vec![paris.clone(), rome.clone()]), "{t}");
        }
        // a DSML string value stays text even when it spells JSON
        let t = "<｜DSML｜function_calls><｜DSML｜invoke name=\"f\"><｜DSML｜parameter name=\"x\" string=\"true\">12</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜function_calls>";
        assert_eq!(parse(t, ToolFormat::DeepSeek).1, vec![call("f", r#"{"x":"12"}"#)]);
        // written back and parsed again: the same call
        for f in [ToolFormat::DeepSeek, ToolFormat::Kimi] {
            let text = f.as_text(&rome);
            assert_eq!(parse(&text, f).1, vec![rome.clone()], "{f:?}: {text}");
        }
        // malformed blocks stay text, whole and streamed (an unclosed one too)
        for (f, t) in [
            (ToolFormat::DeepSeek, "<｜tool▁calls▁begin｜>junk<｜tool▁calls▁end｜>"),
            (
                ToolFormat::DeepSeek,
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (
                ToolFormat::DeepSeek,
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>[1]<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (
                ToolFormat::DeepSeek,
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\"\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            ),
            (ToolFormat::DeepSeek, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}"),
            (
                ToolFormat::DeepSeek,
                "<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"$F\">\n...\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
            ),
            (
                ToolFormat::DeepSeek,
                "<｜DSML｜function_calls><｜DSML｜invoke name=\"f\"><｜DSML｜parameter name=\"x\" string=\"false\">{</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜function_calls>",
            ),
            (
                ToolFormat::Kimi,
                "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0{}<|tool_call_end|><|tool_calls_section_end|>",
            ),
            (
                ToolFormat::Kimi,
                "<|tool_calls_section_begin|><|tool_call_begin|>:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
            ),
            (ToolFormat::Kimi, "<|tool_calls_section_begin|>"),
        ] {
            let (c, calls) = parse(t, f);
            assert!(calls.is_empty() && c == t, "{f:?}: {t}");
        }
    }

    #[test]
    fn glm_and_minimax_calls_parse_as_their_templates_write_them() {
        // as GLM-4.6's template renders an assistant tool call (strings as is, the rest as JSON)
        let glm = "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>";
        let (c, calls) = parse(glm, ToolFormat::Glm);
        assert_eq!(c, "Checking.");
        assert_eq!(
            calls,
            vec![ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris","days":2}"#.into() }]
        );
        // MiniMax-M2: several invokes in one block
        let mm = "<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Paris</parameter>\n<parameter name=\"opts\">{\"unit\": \"C\"}</parameter>\n</invoke>\n<invoke name=\"now\">\n</invoke>\n</minimax:tool_call>";
        let (c, calls) = parse(mm, ToolFormat::MiniMax);
        assert!(c.is_empty());
        assert_eq!(calls[0].arguments, r#"{"city":"Paris","opts":{"unit":"C"}}"#);
        assert_eq!(calls[1], ToolCall { name: "now".into(), arguments: "{}".into() });
        // written back and parsed again: the same call
        for f in [ToolFormat::Qwen, ToolFormat::Glm, ToolFormat::MiniMax] {
            let text = f.as_text(&calls[0]);
            assert_eq!(parse(&text, f).1, vec![calls[0].clone()], "{f:?}: {text}");
        }
        // malformed blocks stay text
        for (f, t) in [
            (ToolFormat::Glm, "<tool_call>f<arg_key>x</arg_key></tool_call>"),
            (ToolFormat::MiniMax, "<minimax:tool_call>junk</minimax:tool_call>"),
        ] {
            let (c, calls) = parse(t, f);
            assert!(calls.is_empty() && c == t, "{f:?}");
        }
    }
}
