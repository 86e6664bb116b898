//! Qwen-style tool calls in generated text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks become OpenAI `tool_calls`, whole (after generation) or as they complete (streaming).

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// Parses the inside of a `<tool_call>` block; `None` if it is not a call.
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
pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
    let mut s = ToolStream::default();
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
pub fn parse_declared(text: &str, declared: &[String]) -> (String, Vec<ToolCall>) {
    let (mut content, calls) = parse(text);
    let (kept, other): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| declared.contains(&c.name));
    for c in &other {
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&as_text(c));
    }
    (content, kept)
}

/// A call as the `<tool_call>` block it was parsed from.
pub fn as_text(c: &ToolCall) -> String {
    let name = serde_json::to_string(&c.name).unwrap_or_default();
    format!("{OPEN}\n{{\"name\": {name}, \"arguments\": {}}}\n{CLOSE}", c.arguments)
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
    buf: String,
    in_call: bool,
}

impl ToolStream {
    pub fn push(&mut self, piece: &str) -> Vec<StreamEvent> {
        self.buf.push_str(piece);
        let mut out = vec![];
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else { break };
                let inner = self.buf[..end].to_string();
                self.buf.drain(..end + CLOSE.len());
                self.in_call = false;
                match parse_block(&inner) {
                    Some(c) => out.push(StreamEvent::Call(c)),
                    None => out.push(StreamEvent::Content(format!("{OPEN}{inner}{CLOSE}"))),
                }
            } else if let Some(start) = self.buf.find(OPEN) {
                if start > 0 {
                    out.push(StreamEvent::Content(self.buf[..start].to_string()));
                }
                self.buf.drain(..start + OPEN.len());
                self.in_call = true;
            } else {
                // hold back a tail that could be the beginning of "<tool_call>"
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&k| {
                        self.buf.len() >= k
                            && self.buf.is_char_boundary(self.buf.len() - k)
                            && OPEN.starts_with(&self.buf[self.buf.len() - k..])
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
        let text = if std::mem::take(&mut self.in_call) { format!("{OPEN}{rest}") } else { rest };
        if text.is_empty() { vec![] } else { vec![StreamEvent::Content(text)] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls_and_keeps_content() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Verona\"}}\n</tool_call>";
        let (c, calls) = parse(t);
        assert_eq!(c, "Let me check.");
        assert_eq!(calls, vec![ToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Verona\"}".into() }]);
        let (c, calls) = parse("<tool_call>not json</tool_call> tail");
        assert!(calls.is_empty() && c.contains("not json"));
    }

    #[test]
    fn streaming_split_matches_whole_parse_for_any_chunking() {
        let t = "a <tool_ca b <tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call> c <tool_call>{\"name\": \"g\"}</tool_call>";
        let whole = parse(t);
        for step in 1..8 {
            let mut s = ToolStream::default();
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
            assert_eq!((content.trim().to_string(), calls), whole, "chunk {step}");
        }
    }
}
