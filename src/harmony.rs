//! gpt-oss's "harmony" output in the form the answer splitters read. The model writes a
//! sequence of messages, each a header then `<|message|>` and a body ended by `<|end|>` (and
//! the next `<|start|>assistant`), or by `<|call|>` / `<|return|>` (stop tokens, so not in the
//! text):
//!
//! ```text
//! <|channel|>analysis<|message|>Reasoning.<|end|><|start|>assistant<|channel|>final<|message|>Answer.
//! <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}
//! ```
//!
//! The `analysis` channel becomes a `<think>…</think>` block (the first one, before any answer;
//! later ones are dropped, as the templates drop reasoning from history), `final` and
//! recipient-less `commentary` bodies the answer text, and a body addressed `to=functions.NAME`
//! a Qwen-style `<tool_call>{"name": NAME, "arguments": "…"}</tool_call>` block. Text that does
//! not open with a header passes through unchanged.

const MESSAGE: &str = "<|message|>";
/// What ends a body.
const ENDS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"];

#[derive(Clone, Debug, PartialEq)]
enum Body {
    Reasoning,
    Text,
    Call(String),
    Dropped,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    /// Before a message's `<|message|>`.
    Header,
    Body(Body),
    /// The text is not harmony: everything passes.
    Plain,
}

/// A streaming transducer from harmony text to the canonical form (see the module doc).
#[derive(Clone, Debug)]
pub struct Harmony {
    state: State,
    buf: String,
    /// A call's arguments, gathered until its body ends.
    args: String,
    /// Reasoning or answer text has been written (later reasoning is dropped).
    reasoned: bool,
    answered: bool,
    first: bool,
}

impl Default for Harmony {
    fn default() -> Self {
        Harmony {
            state: State::Header,
            buf: String::new(),
            args: String::new(),
            reasoned: false,
            answered: false,
            first: true,
        }
    }
}

/// The length of the longest suffix of `s` that could begin one of `marks`.
fn partial_mark(s: &str, marks: &[&str]) -> usize {
    let Some(i) = s.rfind('<') else { return 0 };
    let tail = &s[i..];
    if marks.iter().any(|m| m.starts_with(tail) && m.len() > tail.len()) { tail.len() } else { 0 }
}

impl Harmony {
    /// The canonical text ready after `piece` (parts of a marker are held back).
    pub fn push(&mut self, piece: &str) -> String {
        self.buf.push_str(piece);
        let mut out = String::new();
        loop {
            match self.state.clone() {
                State::Plain => {
                    out.push_str(&std::mem::take(&mut self.buf));
                    return out;
                }
                State::Header => {
                    let t = self.buf.trim_start();
                    if self.first
                        && !t.is_empty()
                        && !["<|channel|>", "<|start|>", "assistant", "to="]
                            .iter()
                            .any(|h| t.starts_with(h) || h.starts_with(t))
                    {
                        self.state = State::Plain;
                        continue;
                    }
                    let Some(i) = self.buf.find(MESSAGE) else { return out };
                    let header = self.buf[..i].to_string();
                    self.buf.drain(..i + MESSAGE.len());
                    self.first = false;
                    let body = self.body_of(&header);
                    if body == Body::Reasoning {
                        out.push_str("<think>");
                    }
                    self.state = State::Body(body);
                }
                State::Body(body) => {
                    let end = ENDS.iter().filter_map(|m| self.buf.find(m).map(|i| (i, *m))).min();
                    let (cut, rest) = match end {
                        Some((i, _)) => (i, true),
                        None => (self.buf.len() - partial_mark(&self.buf, &ENDS), false),
                    };
                    let text: String = self.buf.drain(..cut).collect();
                    self.body_text(&body, &text, &mut out);
                    if !rest {
                        return out;
                    }
                    let (_, m) = end.expect("an end was found");
                    self.buf.drain(..m.len());
                    self.close(&body, &mut out);
                    self.state = State::Header;
                }
            }
        }
    }

    /// The end of the text: what was held back, and the open body closed.
    pub fn finish(&mut self) -> String {
        let mut out = self.push("");
        match std::mem::replace(&mut self.state, State::Header) {
            State::Body(body) => {
                let rest = std::mem::take(&mut self.buf);
                self.body_text(&body, &rest, &mut out);
                self.close(&body, &mut out);
            }
            // an unfinished header carries no text
            State::Header => self.buf.clear(),
            State::Plain => out.push_str(&std::mem::take(&mut self.buf)),
        }
        out
    }

    /// What a header's channel and recipient make of its body.
    fn body_of(&mut self, header: &str) -> Body {
        let word_after = |key: &str| {
            header.find(key).map(|i| {
                let w = &header[i + key.len()..];
                w[..w.find(|c: char| c.is_whitespace() || c == '<').unwrap_or(w.len())].to_string()
            })
        };
        if let Some(to) = word_after("to=")
            && let Some(name) = to.strip_prefix("functions.")
        {
            return Body::Call(name.to_string());
        }
        match word_after("<|channel|>").as_deref() {
            Some("analysis") if !self.answered && !self.reasoned => Body::Reasoning,
            Some("analysis") => Body::Dropped,
            _ => Body::Text,
        }
    }

    fn body_text(&mut self, body: &Body, text: &str, out: &mut String) {
        match body {
            Body::Reasoning => {
                self.reasoned = true;
                out.push_str(text);
            }
            Body::Text => {
                self.answered |= !text.trim().is_empty();
                out.push_str(text);
            }
            Body::Call(_) => self.args.push_str(text),
            Body::Dropped => {}
        }
    }

    fn close(&mut self, body: &Body, out: &mut String) {
        match body {
            Body::Reasoning => out.push_str("</think>\n\n"),
            Body::Call(name) => {
                let args = std::mem::take(&mut self.args);
                let call = serde_json::json!({"name": name, "arguments": args.trim()});
                out.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                self.answered = true;
            }
            Body::Text | Body::Dropped => {}
        }
    }
}

/// [`Harmony`] over a whole text.
pub fn canonical(text: &str) -> String {
    let mut h = Harmony::default();
    let mut out = h.push(text);
    out.push_str(&h.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> String {
        format!("<tool_call>\n{}\n</tool_call>", serde_json::json!({"name": name, "arguments": args}))
    }

    fn streamed(text: &str, size: usize) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut h = Harmony::default();
        let mut out: String = chars.chunks(size).map(|c| h.push(&c.iter().collect::<String>())).collect();
        out.push_str(&h.finish());
        out
    }

    #[test]
    fn channels_become_reasoning_answer_and_calls_whatever_the_pieces() {
        for (text, want) in [
            (
                "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hello!",
                &"<think>Think.</think>\n\nHello!".to_string(),
            ),
            (
                "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary \
                 to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}",
                &format!("<think>Need weather.</think>\n\n{}", call("get_weather", "{\"city\":\"Paris\"}")),
            ),
            // the recipient before the channel, as the template writes history
            ("<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>", &call("f", "{}")),
            // a preamble on the commentary channel is answer text; later reasoning is dropped
            (
                "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>analysis<|message|>x<|end|>",
                &"Checking.".to_string(),
            ),
            ("Plain text, no header.", &"Plain text, no header.".to_string()),
            ("<|channel|>analysis<|message|>cut off", &"<think>cut off</think>\n\n".to_string()),
            ("", &String::new()),
        ] {
            assert_eq!(&canonical(text), want, "{text}");
            for size in [1, 2, 3, 7] {
                assert_eq!(&streamed(text, size), want, "{text} in pieces of {size}");
            }
        }
    }

    #[test]
    fn canonical_calls_parse_as_qwen_calls() {
        let text = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\",\"days\":2}";
        let (content, calls) = crate::toolcall::parse(&canonical(text), crate::toolcall::ToolFormat::Harmony);
        assert_eq!(content, "");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("get_weather", "{\"city\":\"Paris\",\"days\":2}")
        );
    }
}
