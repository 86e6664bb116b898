//! An answer's parts as the Messages and Responses APIs report them: reasoning (the text before
//! `</think>`), answer text, and calls of the declared tools, whole or as they stream.

use super::*;

/// (thinking, answer) of generated text: what precedes `</think>` is reasoning (a leading
/// `<think>` dropped); with thinking on and no `</think>` yet, all of it is.
pub(super) fn split_thinking(text: &str, thinking: bool) -> (String, String) {
    let t = text.trim_start();
    let opened = t.starts_with("<think>");
    let body = t.strip_prefix("<think>").unwrap_or(text);
    match body.find("</think>") {
        Some(i) if opened || thinking => (body[..i].trim().to_string(), body[i + 8..].trim_start().to_string()),
        None if opened || thinking => (body.trim().to_string(), String::new()),
        _ => (String::new(), text.to_string()),
    }
}

/// Whether a rendered prompt leaves the model inside a reasoning block (its last `<think>` is
/// not closed: the template opened it for the answer).
pub(super) fn opens_thinking(prompt: &str) -> bool {
    match (prompt.rfind("<think>"), prompt.rfind("</think>")) {
        (Some(open), Some(close)) => open > close,
        (open, _) => open.is_some(),
    }
}

/// [`split_thinking`] of an answer in `format` (harmony read into its canonical form first).
pub(super) fn split_answer(text: &str, thinking: bool, format: toolcall::ToolFormat) -> (String, String) {
    match format {
        toolcall::ToolFormat::Harmony => split_thinking(&crate::harmony::canonical(text), thinking),
        _ => split_thinking(text, thinking),
    }
}

/// Splits streamed text into reasoning and answer as it arrives (see [`split_thinking`]),
/// holding back what could still be the start of a tag.
pub(super) struct ThinkSplit {
    /// None before the first non-blank text, then whether inside the reasoning.
    inside: Option<bool>,
    thinking: bool,
    buf: String,
    /// Blanks right after `</think>` are dropped.
    after_close: bool,
    /// gpt-oss's messages, read into the canonical form before the split.
    harmony: Option<crate::harmony::Harmony>,
}

impl ThinkSplit {
    pub(super) fn new(thinking: bool) -> Self {
        ThinkSplit { inside: None, thinking, buf: String::new(), after_close: false, harmony: None }
    }

    /// [`ThinkSplit::new`] for answers in `format`.
    pub(super) fn for_format(thinking: bool, format: toolcall::ToolFormat) -> Self {
        let harmony = (format == toolcall::ToolFormat::Harmony).then(crate::harmony::Harmony::default);
        ThinkSplit { harmony, ..ThinkSplit::new(thinking) }
    }

    pub(super) fn push(&mut self, piece: &str, out: &mut Vec<(bool, String)>) {
        match self.harmony.as_mut().map(|h| h.push(piece)) {
            Some(canonical) => self.split(&canonical, out),
            None => self.split(piece, out),
        }
    }

    fn split(&mut self, piece: &str, out: &mut Vec<(bool, String)>) {
        self.buf.push_str(piece);
        if self.inside.is_none() {
            let t = self.buf.trim_start();
            if let Some(rest) = t.strip_prefix("<think>") {
                self.buf = rest.to_string();
                self.inside = Some(true);
            } else if "<think>".starts_with(t) {
                return;
            } else {
                self.inside = Some(self.thinking);
            }
        }
        if self.inside == Some(true) {
            if let Some(i) = self.buf.find("</think>") {
                out.push((true, self.buf[..i].to_string()));
                self.buf.drain(..i + 8);
                self.inside = Some(false);
                self.after_close = true;
            } else {
                let hold = (1..8).rev().find(|&k| self.buf.ends_with(&"</think>"[..k])).unwrap_or(0);
                let cut = self.buf.len() - hold;
                out.push((true, self.buf[..cut].to_string()));
                self.buf.drain(..cut);
                return;
            }
        }
        if self.after_close {
            let t = self.buf.trim_start().to_string();
            self.buf = t;
            if self.buf.is_empty() {
                return;
            }
            self.after_close = false;
        }
        out.push((false, std::mem::take(&mut self.buf)));
    }

    pub(super) fn finish(&mut self, out: &mut Vec<(bool, String)>) {
        if let Some(rest) = self.harmony.as_mut().map(|h| h.finish()) {
            self.split(&rest, out);
        }
        let inside = self.inside == Some(true);
        let rest = std::mem::take(&mut self.buf);
        let blank_tail = self.after_close && rest.trim().is_empty();
        if !rest.is_empty() && !blank_tail {
            out.push((inside, rest));
        }
    }
}

/// Where a streamed answer's parts go, in order; false: the client left.
pub(super) trait Sink {
    /// Reasoning (`reasoning`) or answer text.
    fn text(&mut self, reasoning: bool, s: &str) -> bool;
    /// A call of a declared tool.
    fn call(&mut self, c: &toolcall::ToolCall) -> bool;
}

/// Routes a streamed answer to a [`Sink`]: reasoning, then answer text with the declared
/// tools' calls taken out of it (calls of other tools stay text, as the model wrote them).
pub(super) struct AnswerStream {
    split: ThinkSplit,
    calls: ToolStream,
    format: toolcall::ToolFormat,
    /// The declared tools; none: the text is not searched for calls.
    tools: Vec<String>,
    parts: Vec<(bool, String)>,
}

impl AnswerStream {
    pub(super) fn new(format: toolcall::ToolFormat, tools: Vec<String>, thinking: bool) -> Self {
        AnswerStream {
            split: ThinkSplit::for_format(thinking, format),
            calls: ToolStream::new(format),
            format,
            tools,
            parts: vec![],
        }
    }

    pub(super) fn push(&mut self, piece: &str, sink: &mut impl Sink) -> bool {
        self.split.push(piece, &mut self.parts);
        self.emit(sink, false)
    }

    /// The end of the answer: what was held back.
    pub(super) fn finish(&mut self, sink: &mut impl Sink) -> bool {
        self.split.finish(&mut self.parts);
        self.emit(sink, true)
    }

    fn emit(&mut self, sink: &mut impl Sink, last: bool) -> bool {
        for (reasoning, s) in std::mem::take(&mut self.parts) {
            let events = match (reasoning, self.tools.is_empty()) {
                (true, _) if sink.text(true, &s) => continue,
                (true, _) => return false,
                (false, true) => vec![StreamEvent::Content(s)],
                (false, false) => self.calls.push(&s),
            };
            if !self.route(sink, events) {
                return false;
            }
        }
        let rest = if last && !self.tools.is_empty() { self.calls.finish() } else { vec![] };
        self.route(sink, rest)
    }

    fn route(&self, sink: &mut impl Sink, events: Vec<StreamEvent>) -> bool {
        for e in events {
            let ok = match e {
                StreamEvent::Content(c) => sink.text(false, &c),
                StreamEvent::Call(c) if !self.tools.contains(&c.name) => sink.text(false, &self.format.as_text(&c)),
                StreamEvent::Call(c) => sink.call(&c),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_stream(pieces: &[&str], thinking: bool) -> (String, String) {
        let mut s = ThinkSplit::new(thinking);
        let mut out = vec![];
        pieces.iter().for_each(|p| s.push(p, &mut out));
        s.finish(&mut out);
        let pick = |t: bool| out.iter().filter(|o| o.0 == t).map(|o| o.1.as_str()).collect::<String>();
        (pick(true), pick(false))
    }

    #[test]
    fn thinking_splits_alike_whole_and_streamed_whatever_the_pieces() {
        for (text, thinking, want) in [
            ("<think>\nweigh it</think>\n\nHello", false, ("weigh it", "Hello")),
            ("weigh it\n</think>\n\nHello", true, ("weigh it", "Hello")),
            ("Hello </think> there", false, ("", "Hello </think> there")),
            ("<think>still going", false, ("still going", "")),
            ("Just text", false, ("", "Just text")),
            ("", true, ("", "")),
        ] {
            let whole = split_thinking(text, thinking);
            assert_eq!((whole.0.as_str(), whole.1.as_str()), want, "{text:?}");
            for size in 1..5 {
                let chars: Vec<char> = text.chars().collect();
                let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
                let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
                let (t, a) = split_stream(&refs, thinking);
                assert_eq!((t.trim(), a.as_str()), want, "{text:?} in pieces of {size}");
            }
        }
    }

    #[test]
    fn a_prompt_opens_thinking_when_its_last_think_is_unclosed() {
        assert!(opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!opens_thinking("<|im_start|>assistant\n"));
        assert!(opens_thinking("<think>a</think>b<|im_start|>assistant\n<think>"));
    }

    /// A sink that records what it is given.
    #[derive(Default)]
    struct Record(Vec<(String, String)>);

    impl Sink for Record {
        fn text(&mut self, reasoning: bool, s: &str) -> bool {
            self.0.push((if reasoning { "reasoning" } else { "text" }.into(), s.into()));
            true
        }
        fn call(&mut self, c: &toolcall::ToolCall) -> bool {
            self.0.push((c.name.clone(), c.arguments.clone()));
            true
        }
    }

    /// What an [`AnswerStream`] gives a sink for `text` in pieces of `size`, runs of text joined.
    fn routed(format: toolcall::ToolFormat, thinking: bool, text: &str, size: usize) -> Vec<(String, String)> {
        let mut a = AnswerStream::new(format, vec!["get_weather".into()], thinking);
        let mut r = Record::default();
        let chars: Vec<char> = text.chars().collect();
        for p in chars.chunks(size) {
            assert!(a.push(&p.iter().collect::<String>(), &mut r));
        }
        assert!(a.finish(&mut r));
        let mut out: Vec<(String, String)> = vec![];
        for (k, v) in r.0 {
            match out.last_mut() {
                Some((lk, lv)) if *lk == k && (k == "reasoning" || k == "text") => lv.push_str(&v),
                _ => out.push((k, v)),
            }
        }
        out.into_iter().filter(|(_, v)| !v.trim().is_empty()).map(|(k, v)| (k, v.trim().to_string())).collect()
    }

    #[test]
    fn deepseek_kimi_and_glm_answers_route_reasoning_text_and_calls() {
        use toolcall::ToolFormat::{DeepSeek, Glm, Kimi};
        // (the generation prompt's end, as the templates write it, the answer, its format)
        for (prompt, answer, f) in [
            // DeepSeek-R1 opens the reasoning for the answer
            (
                "<｜Assistant｜><think>\n",
                "Need the weather.\n</think>\n\nChecking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                DeepSeek,
            ),
            // V3.1 thinking
            (
                "<｜Assistant｜><think>",
                "Need the weather.</think>Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                DeepSeek,
            ),
            // V3.2 after a tool result
            (
                "</function_results>\n\n<think>",
                "Need the weather.</think>Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
                DeepSeek,
            ),
            // Kimi-K2-Thinking opens its own reasoning
            (
                "<|im_assistant|>assistant<|im_middle|>",
                "<think>Need the weather.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>",
                Kimi,
            ),
            // GLM-4.7
            (
                "<|assistant|><think>",
                "Need the weather.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
                Glm,
            ),
        ] {
            let want = vec![
                ("reasoning".to_string(), "Need the weather.".to_string()),
                ("text".to_string(), "Checking.".to_string()),
                ("get_weather".to_string(), "{\"city\":\"Paris\"}".to_string()),
            ];
            let thinking = opens_thinking(prompt);
            for size in [1, 2, 3, 7, answer.len()] {
                assert_eq!(routed(f, thinking, answer, size), want, "{answer} in pieces of {size}");
            }
            let (reasoning, rest) = split_answer(answer, thinking, f);
            assert_eq!(reasoning, "Need the weather.");
            let (text, calls) = toolcall::parse_declared(&rest, &["get_weather".into()], f);
            assert_eq!((text.as_str(), calls.len()), ("Checking.", 1), "{answer}");
        }
        // thinking off: the templates close the block in the prompt, the answer is all text
        for prompt in ["<｜Assistant｜><think></think>", "<｜Assistant｜><think>\n</think>", "<|assistant|></think>"]
        {
            assert!(!opens_thinking(prompt), "{prompt}");
            assert_eq!(routed(DeepSeek, false, "Hello.", 1), vec![("text".to_string(), "Hello.".to_string())]);
        }
    }

    #[test]
    fn harmony_answers_route_as_reasoning_text_and_calls_whole_and_streamed() {
        let text = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary \
                    to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}";
        let joined = |r: Record| {
            let mut out: Vec<(String, String)> = vec![];
            for (k, v) in r.0 {
                match out.last_mut() {
                    Some((lk, lv)) if *lk == k && (k == "reasoning" || k == "text") => lv.push_str(&v),
                    _ => out.push((k, v)),
                }
            }
            out.into_iter().filter(|(_, v)| !v.trim().is_empty()).collect::<Vec<_>>()
        };
        let want = vec![
            ("reasoning".to_string(), "Need the weather.".to_string()),
            ("get_weather".to_string(), "{\"city\":\"Paris\"}".to_string()),
        ];
        for size in [1, 4, text.len()] {
            let mut a = AnswerStream::new(toolcall::ToolFormat::Harmony, vec!["get_weather".into()], false);
            let mut r = Record::default();
            let chars: Vec<char> = text.chars().collect();
            for p in chars.chunks(size) {
                assert!(a.push(&p.iter().collect::<String>(), &mut r));
            }
            assert!(a.finish(&mut r));
            assert_eq!(joined(r), want, "pieces of {size}");
        }
        let final_answer = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hi!";
        assert_eq!(split_answer(final_answer, false, toolcall::ToolFormat::Harmony), ("Easy.".into(), "Hi!".into()));
        // other formats leave harmony markers alone
        assert_eq!(split_answer("plain", false, toolcall::ToolFormat::Qwen), (String::new(), "plain".into()));
    }
}
