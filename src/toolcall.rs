//! Tool calls in generated text, in each family's format, become OpenAI `tool_calls`, whole
//! (after generation) or as they complete (streaming):
//! - Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
//! - GLM-4.5: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`;
//! - MiniMax-M2: `<minimax:tool_call><invoke name="NAME"><parameter name="K">V</parameter>…</invoke></minimax:tool_call>`;
//! - gpt-oss (harmony): read after [`crate::harmony`] has turned its messages into Qwen's form.
//!
//! GLM's and MiniMax's values are text; one that parses as JSON (a number, an object, …) is
//! taken as that value, as their templates write non-string arguments as JSON.

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
}

impl ToolFormat {
    /// The tags around one call (MiniMax's block may hold several `<invoke>`s).
    pub fn tags(self) -> (&'static str, &'static str) {
        match self {
            ToolFormat::Qwen | ToolFormat::Glm | ToolFormat::Harmony => ("<tool_call>", "</tool_call>"),
            ToolFormat::MiniMax => ("<minimax:tool_call>", "</minimax:tool_call>"),
        }
    }

    /// The calls inside one block; `None` if it is not a well-formed one.
    pub fn parse_block(self, inner: &str) -> Option<Vec<ToolCall>> {
        match self {
            ToolFormat::Qwen | ToolFormat::Harmony => parse_block(inner).map(|c| vec![c]),
            ToolFormat::Glm => {
                let inner = inner.trim();
                let (name, mut rest) = match inner.find("<arg_key>") {
                    Some(i) => (inner[..i].trim(), &inner[i..]),
                    None => (inner, ""),
                };
                if name.is_empty() || name.contains('<') || name.contains('\n') {
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
            ToolFormat::MiniMax => {
                let mut calls = vec![];
                let mut rest = inner.trim();
                while !rest.is_empty() {
                    let r = rest.strip_prefix("<invoke name=\"")?;
                    let q = r.find("\">")?;
                    let name = r[..q].to_string();
                    let (body, after) = r[q + 2..].split_once("</invoke>")?;
                    let mut args = Map::new();
                    let mut b = body.trim();
                    while !b.is_empty() {
                        let r = b.strip_prefix("<parameter name=\"")?;
                        let q = r.find("\">")?;
                        let (v, after) = r[q + 2..].split_once("</parameter>")?;
                        args.insert(r[..q].to_string(), text_value(v.trim_matches('\n')));
                        b = after.trim();
                    }
                    calls.push(ToolCall { name, arguments: Value::Object(args).to_string() });
                    rest = after.trim();
                }
                (!calls.is_empty()).then_some(calls)
            }
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
        }
    }
}

/// The text between `open` (which `s` must start with) and `close`, and what follows.
fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str)> {
    s.strip_prefix(open)?.split_once(close)
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
    in_call: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> ToolStream {
        ToolStream { format, ..Default::default() }
    }

    pub fn push(&mut self, piece: &str) -> Vec<StreamEvent> {
        let (open, close) = self.format.tags();
        self.buf.push_str(piece);
        let mut out = vec![];
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(close) else { break };
                let inner = self.buf[..end].to_string();
                self.buf.drain(..end + close.len());
                self.in_call = false;
                match self.format.parse_block(&inner) {
                    Some(calls) => out.extend(calls.into_iter().map(StreamEvent::Call)),
                    None => out.push(StreamEvent::Content(format!("{open}{inner}{close}"))),
                }
            } else if let Some(start) = self.buf.find(open) {
                if start > 0 {
                    out.push(StreamEvent::Content(self.buf[..start].to_string()));
                }
                self.buf.drain(..start + open.len());
                self.in_call = true;
            } else {
                // hold back a tail that could be the beginning of the opening tag
                let keep = (1..open.len())
                    .rev()
                    .find(|&k| {
                        self.buf.len() >= k
                            && self.buf.is_char_boundary(self.buf.len() - k)
                            && open.starts_with(&self.buf[self.buf.len() - k..])
                    })
                    .unwrap_or(0);
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

    /// Releases whatever is left (an unterminated call becomes content).
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let rest = std::mem::take(&mut self.buf);
        let open = self.format.tags().0;
        let text = if std::mem::take(&mut self.in_call) { format!("{open}{rest}") } else { rest };
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
                ToolFormat::Glm,
                "a <tool_ca b <tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call> c <tool_call>g</tool_call>",
            ),
            (
                ToolFormat::MiniMax,
                "a <minimax:to b <minimax:tool_call>\n<invoke name=\"f\">\n<parameter name=\"x\">1</parameter>\n</invoke>\n<invoke name=\"g\">\n</invoke>\n</minimax:tool_call> c",
            ),
        ] {
            stream_matches_whole(f, t);
        }
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
