//! `flashmoe chat`: an interactive multi-turn chat in the terminal. The sequence state carries
//! over between turns (only new tokens are prefilled); Ctrl-C stops the current answer.

use crate::generate::SamplingParams;
use crate::session::Session;
use anyhow::{Context, Result};
use rustyline::error::ReadlineError;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

pub struct ChatOptions {
    pub system: Option<String>,
    pub thinking: bool,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
}

const HELP: &str = "commands: /reset  /stats  /save FILE  /load FILE  /system TEXT  /think on|off  /help  /exit";

fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".flashmoe_history"))
}

/// Largest conversation file `/load` reads.
const MAX_LOAD_BYTES: u64 = 64 << 20;

/// A conversation written by `/save`: its system prompt and messages, checked (a regular
/// file of at most [`MAX_LOAD_BYTES`], an object with a `messages` list of role/content
/// objects).
fn load_conversation(path: &std::path::Path) -> Result<(Option<String>, Vec<Value>)> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        anyhow::bail!("not a regular file");
    }
    if meta.len() > MAX_LOAD_BYTES {
        anyhow::bail!(
            "{} bytes: larger than the {} MiB a conversation file may have",
            meta.len(),
            MAX_LOAD_BYTES >> 20
        );
    }
    let mut text = String::new();
    f.take(MAX_LOAD_BYTES + 1).read_to_string(&mut text)?;
    parse_conversation(&text)
}

fn parse_conversation(text: &str) -> Result<(Option<String>, Vec<Value>)> {
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    let Some(msgs) = v.get("messages").and_then(Value::as_array) else {
        anyhow::bail!("no `messages` list (files written by /save have one)");
    };
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !["system", "user", "assistant", "tool"].contains(&role) {
            anyhow::bail!("message {i}: `role` must be system, user, assistant or tool");
        }
        let content_ok = match m.get("content") {
            Some(Value::String(_)) => true,
            Some(Value::Null) | None => role == "assistant" && m.get("tool_calls").is_some_and(Value::is_array),
            _ => false,
        };
        if !content_ok {
            anyhow::bail!("message {i}: `content` must be a string");
        }
    }
    let system = match v.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => anyhow::bail!("`system` must be a string"),
    };
    Ok((system, msgs.clone()))
}

/// Runs the chat loop until end of input or /exit.
/// (reasoning, answer) of text in the canonical `<think>…</think>answer` form.
fn split_canonical(text: &str) -> (String, String) {
    match text.trim_start().strip_prefix("<think>").and_then(|b| b.split_once("</think>")) {
        Some((r, a)) => (r.trim().to_string(), a.trim_start().to_string()),
        None => (String::new(), text.to_string()),
    }
}

pub fn run(mut session: Session, mut opts: ChatOptions) -> Result<()> {
    let mt = session.model.cfg.model_type.clone();
    let harmony =
        crate::families::by_model_type(&mt).is_ok_and(|f| f.tool_format(&mt) == crate::toolcall::ToolFormat::Harmony);
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Relaxed)).context("cannot install the Ctrl-C handler")?;
    }
    let mut ed = rustyline::DefaultEditor::new()?;
    if let Some(h) = history_path() {
        let _ = ed.load_history(&h);
    }
    let mut messages: Vec<Value> = vec![];
    let mut last_stats: Option<String> = None;
    eprintln!(
        "flashmoe chat: {} ({}). {HELP}",
        session.model.cfg.model_type,
        if opts.thinking { "thinking on" } else { "thinking off" }
    );
    loop {
        let line = match ed.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        let _ = ed.add_history_entry(&line);
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map_or((cmd, ""), |(a, b)| (a, b.trim()));
            match name {
                "exit" | "quit" => break,
                "help" => eprintln!("{HELP}"),
                "reset" => {
                    messages.clear();
                    session.reset();
                    eprintln!("(conversation cleared)");
                }
                "stats" => {
                    eprintln!("{}", last_stats.as_deref().unwrap_or("(no answer yet)"));
                    eprintln!("cached tokens: {}, turns: {}", session.cached_tokens(), messages.len() / 2);
                    if let Some(s) = &session.model.store {
                        let st = s.stats();
                        eprintln!(
                            "experts: {} reads, {:.1} MB, hit rate {:.1}%",
                            st.reads,
                            st.bytes_read as f64 / 1e6,
                            100.0 * st.hit_rate()
                        );
                    }
                }
                "system" => {
                    opts.system = (!arg.is_empty()).then(|| arg.to_string());
                    eprintln!("(system prompt {})", if opts.system.is_some() { "set" } else { "cleared" });
                }
                "think" => {
                    opts.thinking = arg != "off";
                    eprintln!("(thinking {})", if opts.thinking { "on" } else { "off" });
                }
                "save" if !arg.is_empty() => {
                    let v = json!({"system": opts.system, "messages": messages});
                    match std::fs::write(arg, serde_json::to_string_pretty(&v)?) {
                        Ok(()) => eprintln!("(saved {} messages to {arg})", messages.len()),
                        Err(e) => eprintln!("error: cannot write {arg}: {e}"),
                    }
                }
                "load" if !arg.is_empty() => match load_conversation(std::path::Path::new(arg)) {
                    Ok((system, loaded)) => {
                        messages = loaded;
                        opts.system = system;
                        session.reset();
                        eprintln!("(loaded {} messages from {arg})", messages.len());
                    }
                    Err(e) => eprintln!("error: cannot load {arg}: {e:#} (the conversation is unchanged)"),
                },
                _ => eprintln!("unknown command. {HELP}"),
            }
            continue;
        }
        messages.push(json!({"role": "user", "content": line}));
        let ctx = session.model.max_context();
        let room = opts.max_tokens.clamp(1, 256);
        let mut dropped = 0;
        let prompt = loop {
            let mut all = vec![];
            if let Some(s) = &opts.system {
                all.push(json!({"role": "system", "content": s}));
            }
            all.extend(messages.iter().cloned());
            let mut extra = serde_json::Map::new();
            extra.insert("enable_thinking".into(), json!(opts.thinking));
            match session.chat_prompt(&Value::Array(all), None, &extra) {
                // a conversation grown past the context drops its oldest turns (not the one
                // just asked), so it goes on instead of failing at every later turn
                Ok(p) if p.len() + room > ctx && messages.len() > 1 => {
                    let next_user = messages.iter().skip(1).position(|m| m["role"] == "user").map_or(1, |i| i + 1);
                    dropped += messages.drain(..next_user).count();
                }
                other => break other,
            }
        };
        if dropped > 0 {
            eprintln!("(dropped the {dropped} oldest messages to fit the context of {ctx} tokens)");
        }
        let prompt = match prompt {
            Ok(p) => p,
            Err(e) => {
                // the turn is dropped, the conversation and the session go on
                eprintln!("error: {e:#}");
                messages.pop();
                continue;
            }
        };
        interrupted.store(false, Relaxed);
        let mut out = std::io::stdout();
        // gpt-oss writes harmony messages: shown as reasoning in <think> and the answer, as the
        // other families' output reads
        let mut harmony = harmony.then(crate::harmony::Harmony::default);
        let res = session.generate(&prompt, opts.max_tokens, &opts.sampling, &[], |piece| {
            match &mut harmony {
                Some(h) => print!("{}", h.push(piece)),
                None => print!("{piece}"),
            }
            let _ = out.flush();
            !interrupted.load(Relaxed)
        });
        if let Some(h) = &mut harmony {
            print!("{}", h.finish());
        }
        println!();
        match res {
            Ok(o) => {
                let stats = format!(
                    "[{} prompt tokens ({} reused{}), {:.1} tok/s prefill | {} tokens, {:.2} tok/s | {}]",
                    o.prompt_tokens,
                    o.reused_tokens,
                    match o.loaded_tokens {
                        0 => String::new(),
                        n => format!(", {n} from the prompt cache"),
                    },
                    o.stats.prompt_tok_s(),
                    o.tokens.len(),
                    o.stats.gen_tok_s(),
                    o.finish.as_str()
                );
                eprintln!("{stats}");
                last_stats = Some(stats);
                messages.push(if harmony.is_some() {
                    // the template writes the analysis channel from `thinking`, the final one from
                    // `content`
                    let (thinking, answer) = split_canonical(&crate::harmony::canonical(&o.text));
                    json!({"role": "assistant", "content": answer, "thinking": thinking})
                } else {
                    json!({"role": "assistant", "content": o.text})
                });
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                messages.pop();
            }
        }
    }
    if let Some(h) = history_path() {
        let _ = ed.save_history(&h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harmony_replies_split_into_thinking_and_content() {
        let raw = "<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>final<|message|>Hi!";
        let (t, a) = split_canonical(&crate::harmony::canonical(raw));
        assert_eq!((t.as_str(), a.as_str()), ("Think first.", "Hi!"));
        assert_eq!(split_canonical("plain"), (String::new(), "plain".to_string()));
    }

    #[test]
    fn load_checks_what_it_reads() {
        let ok = r#"{"system": "be brief", "messages": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": null, "tool_calls": []}]}"#;
        let (sys, m) = parse_conversation(ok).unwrap();
        assert_eq!((sys.as_deref(), m.len()), (Some("be brief"), 2));
        for bad in [
            "[]",
            "{}",
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            r#"{"messages": [], "system": 3}"#,
            "not json",
        ] {
            assert!(parse_conversation(bad).is_err(), "{bad}");
        }
        // a device that never ends is refused without reading it
        let e = load_conversation(std::path::Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("regular file"), "{e}");
    }
}
