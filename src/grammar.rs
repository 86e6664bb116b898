//! Constrained decoding through `llguidance`: a JSON schema (or any JSON object, or a Lark
//! grammar) becomes, at every step, the set of tokens that keep the output valid.

use crate::tokenizer::TextTokenizer;
use crate::toolcall::ToolFormat;
use anyhow::{Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// The tokenizer's vocabulary as the grammar engine sees it; built once (it walks every token).
pub struct Grammars {
    factory: ParserFactory,
    stops: Arc<[u32]>,
}

impl Grammars {
    /// For `tok`'s vocabulary padded to the model's `vocab` rows; `stop_ids` end a sequence
    /// (the grammar allows them once its text is complete).
    pub fn new(tok: &TextTokenizer, vocab: usize, stop_ids: &[u32]) -> Result<Grammars> {
        let json = tok.to_json()?;
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())?;
        let stops: Vec<u32> = stop_ids.iter().copied().filter(|&t| (t as usize) < vocab).collect();
        if !stops.is_empty() {
            bt.set_eos_tokens(&stops);
        }
        let env = bt.into_tok_env(Some(vocab))?;
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Grammars { factory, stops: stops.into() })
    }

    /// Output that is one JSON value matching `schema` (JSON Schema).
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint> {
        self.build(TopLevelGrammar::from_json_schema(schema.clone()))
    }

    /// Output in the Lark grammar `lark` (`%json{...}` embeds a JSON schema).
    pub fn lark(&self, lark: &str) -> Result<Constraint> {
        self.build(TopLevelGrammar::from_lark(lark.to_string()))
    }

    fn build(&self, g: TopLevelGrammar) -> Result<Constraint> {
        let parser = self.factory.create_parser(g).map_err(|e| anyhow!("the grammar is not usable: {e}"))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(anyhow!("the grammar is not usable: {e}"));
        }
        Ok(Constraint(Arc::new(std::sync::Mutex::new(m)), self.stops.clone()))
    }
}

/// The state of one constrained generation: which tokens may come next. Cloning shares the
/// state (a sampler clones its parameters once).
#[derive(Clone)]
pub struct Constraint(Arc<std::sync::Mutex<Matcher>>, Arc<[u32]>);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logits of the tokens the grammar forbids here to −∞ (all but the stop tokens
    /// once the text is complete, or after an error in the grammar engine).
    pub fn mask(&self, logits: &mut [f32]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let allowed = m.compute_mask_or_eos();
        match allowed {
            Ok(mask) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !mask.is_allowed(t as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // the engine failed: only stopping is allowed
            Err(_) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !self.1.contains(&(t as u32)) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// An independent copy of this state (another answer to the same request goes its own way
    /// from here).
    pub fn fork(&self) -> Constraint {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Constraint(Arc::new(std::sync::Mutex::new(m.deep_clone())), self.1.clone())
    }

    /// Advances past the token that was chosen.
    pub fn accept(&self, token: u32) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !m.is_stopped() {
            let _ = m.consume_token(token);
        }
    }

    /// Whether the text so far is a complete match.
    pub fn is_accepting(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_accepting().unwrap_or(false)
    }

    /// Why the grammar engine gave up, if it did.
    pub fn error(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_error()
    }
}

/// The Lark grammar of an answer that is exactly one call of one of `tools` (name, parameters'
/// JSON schema) in `format`'s own syntax, the arguments held to the schema. `tag` spells a tag
/// as the tokenizer has it (a special token, else a literal); `close_think`: the prompt left a
/// `<think>` block open, which the answer closes first (the call would otherwise be read as
/// reasoning).
///
/// Harmony (gpt-oss): the answer follows the generation prompt's `<|start|>assistant` with a
/// commentary-channel message to the function, as openai-harmony renders it
/// (`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`) or as the released
/// template writes calls in history (` to=functions.NAME<|channel|>commentary json<|message|>`),
/// then the JSON arguments; `<|call|>` is a stop token, so the call ends where the model stops.
/// Reasoning has its own channel there, so `close_think` does not apply.
///
/// Qwen's format is the JSON object or Qwen3.5's XML form. The tag formats (Qwen3.5's XML,
/// GLM, MiniMax, DeepSeek V3.2) write each argument on its own: the
/// schema's properties in order, the required ones always; strings as text (one of an `enum`,
/// or up to `maxLength` characters), other values as JSON. DeepSeek's three forms are
/// alternatives: a model takes the one it was trained on.
pub fn tool_call_lark(
    format: ToolFormat,
    tools: &[(String, Value)],
    close_think: bool,
    tag: &dyn Fn(&str) -> String,
) -> String {
    let lit = |s: &str| format!("{s:?}");
    let mut rules = vec![];
    let call_alts = |rules: &mut Vec<String>, prefix: &str, call: CallRule| {
        let alts: Vec<String> = tools.iter().enumerate().map(|(i, (n, p))| call(rules, i, n, p)).collect();
        rules.push(format!("{prefix}: {}", alts.join(" | ")));
    };
    let body = match format {
        ToolFormat::Harmony => {
            let (channel, message, constrain) = (tag("<|channel|>"), tag("<|message|>"), tag("<|constrain|>"));
            call_alts(&mut rules, "call", &|_, _, name, params| {
                format!(
                    "({channel} {} {constrain} \"json\" | {} {channel} \"commentary json\") {message} %json {params}",
                    lit(&format!("commentary to=functions.{name} ")),
                    lit(&format!(" to=functions.{name}"))
                )
            });
            "call".to_string()
        }
        ToolFormat::Qwen => {
            call_alts(&mut rules, "call", &|_, _, name, params| {
                let schema = serde_json::json!({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"], "additionalProperties": false});
                format!("%json {schema}")
            });
            // Qwen3.5 and Qwen3-Coder write the XML form
            let kv = Keyed {
                key: &|k| format!("\"<parameter=\" {k} \">\\n\""),
                string: &|v| format!("{v} \"</parameter>\\n\""),
                json: &|v| format!("{v} \"\\n\"? \"</parameter>\\n\""),
            };
            call_alts(&mut rules, "xml", &|rules, i, name, params| {
                format!("{} {} \"</function>\\n\"", lit(&format!("<function={name}>\n")), kv.args(rules, i, params))
            });
            format!("{} \"\\n\" (call \"\\n\" | xml) {}", tag("<tool_call>"), tag("</tool_call>"))
        }
        ToolFormat::Glm => {
            let kv = Keyed {
                key: &|k| {
                    format!("\"\\n\"? {} {k} {} \"\\n\"? {}", tag("<arg_key>"), tag("</arg_key>"), tag("<arg_value>"))
                },
                string: &|v| format!("{v} {}", tag("</arg_value>")),
                json: &|v| format!("{v} {}", tag("</arg_value>")),
            };
            call_alts(&mut rules, "call", &|rules, i, name, params| {
                format!("{} {}", lit(name), kv.args(rules, i, params))
            });
            format!("{} call \"\\n\"? {}", tag("<tool_call>"), tag("</tool_call>"))
        }
        ToolFormat::MiniMax => {
            let kv = Keyed {
                key: &|k| format!("\"<parameter name=\\\"\" {k} \"\\\">\""),
                string: &|v| format!("{v} \"</parameter>\\n\""),
                json: &|v| format!("{v} \"</parameter>\\n\""),
            };
            call_alts(&mut rules, "call", &|rules, i, name, params| {
                format!(
                    "{} {} \"</invoke>\\n\"",
                    lit(&format!("<invoke name=\"{name}\">\n")),
                    kv.args(rules, i, params)
                )
            });
            format!("{} \"\\n\" call {}", tag("<minimax:tool_call>"), tag("</minimax:tool_call>"))
        }
        ToolFormat::DeepSeek => {
            let (calls, call, sep) =
                (tag("<｜tool▁calls▁begin｜>"), tag("<｜tool▁call▁begin｜>"), tag("<｜tool▁sep｜>"));
            let (end, calls_end) = (tag("<｜tool▁call▁end｜>"), tag("<｜tool▁calls▁end｜>"));
            call_alts(&mut rules, "v31", &|_, _, name, params| format!("{} {sep} %json {params}", lit(name)));
            call_alts(&mut rules, "r1", &|_, _, name, params| {
                format!("{} \"\\n```json\\n\" %json {params} \"\\n```\"", lit(name))
            });
            let kv = Keyed {
                key: &|k| format!("\"<｜DSML｜parameter name=\\\"\" {k} \"\\\"\""),
                string: &|v| format!("\" string=\\\"true\\\">\" {v} \"</｜DSML｜parameter>\\n\""),
                json: &|v| format!("\" string=\\\"false\\\">\" {v} \"</｜DSML｜parameter>\\n\""),
            };
            call_alts(&mut rules, "dsml", &|rules, i, name, params| {
                let invoke = lit(&format!("<｜DSML｜invoke name=\"{name}\">\n"));
                format!("{invoke} {} \"</｜DSML｜invoke>\\n\"", kv.args(rules, i, params))
            });
            format!(
                "{calls} {call} (v31 | \"function\" {sep} r1) {end} {calls_end} | \"\\n\\n\"? {} \"\\n\" dsml {}",
                tag("<｜DSML｜function_calls>"),
                tag("</｜DSML｜function_calls>")
            )
        }
        ToolFormat::Kimi => {
            call_alts(&mut rules, "call", &|_, _, name, params| {
                format!(
                    "{} /[0-9]+/ {} %json {params}",
                    lit(&format!("functions.{name}:")),
                    tag("<|tool_call_argument_begin|>")
                )
            });
            format!(
                "{} {} call {} {}",
                tag("<|tool_calls_section_begin|>"),
                tag("<|tool_call_begin|>"),
                tag("<|tool_call_end|>"),
                tag("<|tool_calls_section_end|>")
            )
        }
    };
    let think =
        if close_think && format != ToolFormat::Harmony { format!("{} ", tag("</think>")) } else { String::new() };
    format!("start: {think}({body})\n{}\n", rules.join("\n"))
}

/// The grammar of one tool's call (rules it needs added to the list), given the tool's index,
/// name and parameters' schema.
type CallRule<'a> = &'a dyn Fn(&mut Vec<String>, usize, &str, &Value) -> String;

/// A tag in a grammar: the tokenizer's special token for it, else the literal text.
pub fn tag(tok: &TextTokenizer, t: &str) -> String {
    tok.special_id(t).map_or_else(|| format!("{t:?}"), |id| format!("<[{id}]>"))
}

/// How a tag format writes one argument: what comes before its value (given the key's
/// grammar), and the value with what follows it (given the value's grammar), for a string and
/// for JSON.
struct Keyed<'a> {
    key: &'a dyn Fn(&str) -> String,
    string: &'a dyn Fn(&str) -> String,
    json: &'a dyn Fn(&str) -> String,
}

impl Keyed<'_> {
    /// The arguments of tool `i` (rules of their own added to `rules`): each property of the
    /// schema in order, optional unless required; without properties, any keys with text values.
    fn args(&self, rules: &mut Vec<String>, i: usize, params: &Value) -> String {
        let props = params.get("properties").and_then(Value::as_object).filter(|p| !p.is_empty());
        let Some(props) = props else {
            rules.push(format!("KEY{i}: /[A-Za-z0-9_.-]+/"));
            rules.push(format!("arg{i}: {} {}", (self.key)(&format!("KEY{i}")), (self.string)("/[^<]*/")));
            return format!("arg{i}*");
        };
        let required: Vec<&str> =
            params.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let mut out = vec![];
        for (j, (k, schema)) in props.iter().enumerate() {
            let value = match schema.get("type").and_then(Value::as_str) {
                Some("string") => (self.string)(&string_value(schema)),
                _ => (self.json)(&format!("%json {schema}")),
            };
            rules.push(format!("arg{i}_{j}: {} {value}", (self.key)(&format!("{k:?}"))));
            out.push(if required.contains(&k.as_str()) { format!("arg{i}_{j}") } else { format!("arg{i}_{j}?") });
        }
        out.join(" ")
    }
}

/// The grammar of a string argument written as text: one of its `enum`, else text without
/// markup, at most `maxLength` characters.
fn string_value(schema: &Value) -> String {
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.is_empty()
        && e.iter().all(Value::is_string)
    {
        return format!(
            "({})",
            e.iter().map(|v| format!("{:?}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(" | ")
        );
    }
    match schema.get("maxLength").and_then(Value::as_u64) {
        Some(n) => format!("/[^<]{{0,{n}}}/"),
        None => "/[^<]*/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::{ToolCall, parse};
    use serde_json::json;

    /// Whether the grammar takes `text` (as the tokenizer splits it) as a complete answer.
    fn accepts(g: &Grammars, lark: &str, tok: &TextTokenizer, text: &str) -> bool {
        let c = g.lark(lark).unwrap_or_else(|e| panic!("{e:#}\n{lark}"));
        for t in tok.encode(text).unwrap() {
            c.accept(t);
        }
        c.error().is_none() && c.is_accepting()
    }

    #[test]
    fn forced_calls_take_each_formats_own_syntax_and_the_schema() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glm4_moe");
        let tok = TextTokenizer::load(&dir).unwrap();
        let g = Grammars::new(&tok, 320, &[315]).unwrap();
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"]});
        let tools = vec![("get_weather".to_string(), params), ("now".to_string(), json!({"type": "object"}))];
        let call = ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris","days":2}"#.into() };
        let city_only = ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() };
        use ToolFormat::*;
        let r1 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"days\": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let dsml = "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";
        let qwen35 = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";
        let glm47 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>";
        for f in [Qwen, Glm, MiniMax, DeepSeek, Kimi] {
            let lark = tool_call_lark(f, &tools, false, &|t| tag(&tok, t));
            let mut texts = vec![f.as_text(&call), f.as_text(&city_only)];
            match f {
                DeepSeek => texts.extend([r1.to_string(), dsml.to_string()]),
                Glm => texts.push(glm47.to_string()),
                Qwen => texts.push(qwen35.to_string()),
                _ => {}
            }
            for t in &texts {
                assert!(accepts(&g, &lark, &tok, t), "{f:?} refuses {t:?}\n{lark}");
                assert!(!parse(t, f).1.is_empty(), "{f:?}: {t}");
            }
            // the schema holds: a required argument missing, a wrong type, an undeclared tool
            let missing = ToolCall { name: "get_weather".into(), arguments: r#"{"days":2}"#.into() };
            let wrong = ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris","days":"two"}"#.into() };
            let other = ToolCall { name: "get_time".into(), arguments: "{}".into() };
            for c in [missing, wrong, other] {
                let t = f.as_text(&c);
                assert!(!accepts(&g, &lark, &tok, &t), "{f:?} takes {t:?}");
            }
            // with the prompt's reasoning block open, the answer closes it first
            let lark = tool_call_lark(f, &tools, true, &|t| tag(&tok, t));
            assert!(accepts(&g, &lark, &tok, &format!("</think>{}", texts[0])), "{f:?}");
            assert!(!accepts(&g, &lark, &tok, &texts[0]), "{f:?}");
        }
    }

    #[test]
    fn forced_harmony_calls_are_commentary_messages_to_the_function() {
        // gpt-oss's fixture tokenizer lacks harmony's special tokens: they are spelled as text
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt_oss");
        let tok = TextTokenizer::load(&dir).unwrap();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
        let g = Grammars::new(&tok, vocab, &tok.eos_id().into_iter().collect::<Vec<_>>()).unwrap();
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"]});
        let tools = vec![("get_weather".to_string(), params), ("now".to_string(), json!({"type": "object"}))];
        for close_think in [false, true] {
            let lark = tool_call_lark(ToolFormat::Harmony, &tools, close_think, &|t| tag(&tok, t));
            let args = r#"{"city": "Paris", "days": 2}"#;
            for text in [
                format!("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{args}"),
                format!(" to=functions.get_weather<|channel|>commentary json<|message|>{args}"),
                "<|channel|>commentary to=functions.now <|constrain|>json<|message|>{}".to_string(),
            ] {
                assert!(accepts(&g, &lark, &tok, &text), "refuses {text:?}\n{lark}");
                let (content, calls) = parse(&crate::harmony::canonical(&text), ToolFormat::Harmony);
                assert_eq!((content.as_str(), calls.len()), ("", 1), "{text}");
            }
            for text in [
                // reasoning first, the answer channel, a schema broken, an undeclared tool
                "<|channel|>analysis<|message|>Hmm.<|end|>".to_string(),
                "<|channel|>final<|message|>Paris.".to_string(),
                format!(
                    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{}",
                    r#"{"days": 2}"#
                ),
                "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}".to_string(),
            ] {
                assert!(!accepts(&g, &lark, &tok, &text), "takes {text:?}");
            }
        }
    }
}
