//! The Anthropic Messages API (`POST /v1/messages`), whole or streamed, with tool use and
//! thinking blocks, over the same engine, chat template and queue as the OpenAI endpoints.
//!
//! Requests are translated to the chat template's (OpenAI-shaped) messages: `system` becomes a
//! system message, `tool_use` blocks an assistant's `tool_calls`, `tool_result` blocks tool
//! messages. `tool_choice` any / tool force a call by constrained decoding, as on the OpenAI
//! endpoint. `thinking` sets the template's `enable_thinking` (absent, the template's default
//! holds), and the reply's text before `</think>` is a `thinking` block. Any `model` name is
//! served by the one loaded model (agents send their own names), and the reply says which.

use super::answer::{AnswerStream, Sink, split_answer};
use super::*;

/// What a Messages request asks for, translated.
struct Request {
    params: GenParams,
    messages: Value,
    tools: Option<Value>,
    /// `thinking` as asked; absent, the template's default applies.
    thinking: Option<bool>,
    choice: ToolChoice,
}

pub(super) async fn messages(State(app): State<Shared>, body: Result<Json<Value>, JsonRejection>) -> Response {
    app.metrics.requests.fetch_add(1, Relaxed);
    let resp = async {
        let Json(b) = body.map_err(body_error)?;
        let Request { mut params, messages, tools, thinking, choice } = parse(&app, &b)?;
        let mut extra = serde_json::Map::new();
        if let Some(t) = thinking {
            extra.insert("enable_thinking".into(), json!(t));
        }
        let thinking = thinking.unwrap_or(false);
        let names = tool_names(tools.as_ref());
        let has_tools = !names.is_empty();
        let Prepared { prompt, turn, constraint, thinking: opens } =
            prepare(&app, messages, tools, extra, &choice, None).await?;
        // a template that opens `<think>` for the answer starts it inside the reasoning
        let thinking = thinking || opens;
        params.sampling.constraint = constraint;
        let permit = acquire(&app).await?;
        let reply = Reply { id: new_id("msg"), model: app.opts.model_id.clone(), tools: names, thinking };
        if params.stream {
            return Ok(respond_stream(app.clone(), prompt, turn, params, reply, permit));
        }
        let o = match generate_whole(&app, prompt, turn, &params, permit).await {
            Ok(o) => o,
            Err(r) => return Ok(r), // counted already
        };
        let (think, answer) = split_answer(&o.text, thinking, app.tools);
        let (text, calls) =
            if has_tools { toolcall::parse_declared(&answer, &reply.tools, app.tools) } else { (answer, vec![]) };
        let mut content = vec![];
        if !think.is_empty() {
            content.push(json!({"type": "thinking", "thinking": think, "signature": ""}));
        }
        if !text.trim().is_empty() || calls.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        for c in &calls {
            content
                .push(json!({"type": "tool_use", "id": new_id("toolu"), "name": c.name, "input": input(&c.arguments)}));
        }
        let (reason, seq) = stop_reason(&o, !calls.is_empty());
        let body = json!({"id": reply.id, "type": "message", "role": "assistant", "model": reply.model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": usage(&o)});
        let mut resp = Json(body).into_response();
        resp.extensions_mut().insert(Tokens(o.prompt_tokens, o.tokens.len()));
        Ok(resp)
    }
    .await;
    counted(&app, resp)
}

/// Validates a Messages request and translates it.
fn parse(app: &App, b: &Value) -> Result<Request, Response> {
    if !b.is_object() {
        return Err(bad_request("the body must be a JSON object", None));
    }
    if b.get("max_tokens").is_none_or(Value::is_null) {
        return Err(bad_request("`max_tokens` is required", Some("max_tokens")));
    }
    if let Some(t) = b.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return Err(bad_request("`temperature` must be between 0 and 1", Some("temperature")));
    }
    // the sampling fields share the OpenAI endpoints' names and checks
    let mut o = serde_json::Map::new();
    for k in ["max_tokens", "temperature", "top_p", "top_k", "stream"] {
        if let Some(v) = b.get(k) {
            o.insert(k.into(), v.clone());
        }
    }
    let mut params = parse_params(app, &Value::Object(o))?;
    params.stop = match b.get("stop_sequences") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) if a.iter().all(|s| s.as_str().is_some_and(|s| !s.is_empty())) => {
            a.iter().filter_map(|s| s.as_str().map(String::from)).collect()
        }
        _ => return Err(bad_request("`stop_sequences` must be a list of non-empty strings", Some("stop_sequences"))),
    };
    let thinking = match b.pointer("/thinking/type").and_then(Value::as_str) {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(t) => return Err(bad_request(format!("`thinking.type` `{t}` is not supported"), Some("thinking"))),
    };
    let mut tools = match b.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(Value::Array(t.iter().enumerate().map(tool).collect::<Result<_, _>>()?)),
        Some(_) => return Err(bad_request("`tools` must be a list", Some("tools"))),
    };
    let choice = match b.pointer("/tool_choice/type").and_then(Value::as_str) {
        None | Some("auto") => ToolChoice::Auto,
        Some("none") => ToolChoice::None,
        Some("any") => ToolChoice::Required,
        Some("tool") => match b.pointer("/tool_choice/name").and_then(Value::as_str) {
            Some(n)
                if tools
                    .iter()
                    .flat_map(|t| t.as_array().into_iter().flatten())
                    .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(n)) =>
            {
                ToolChoice::Named(n.to_string())
            }
            _ => return Err(bad_request("`tool_choice.name` must name one of the `tools`", Some("tool_choice"))),
        },
        Some(t) => return Err(bad_request(format!("`tool_choice` `{t}` is not supported"), Some("tool_choice"))),
    };
    if matches!(choice, ToolChoice::None) {
        tools = None;
    }
    if !matches!(choice, ToolChoice::Auto | ToolChoice::None)
        && tools.as_ref().and_then(Value::as_array).is_none_or(|t| t.is_empty())
    {
        return Err(bad_request("a required tool call needs `tools`", Some("tool_choice")));
    }
    Ok(Request { params, messages: translate(b)?, tools, thinking, choice })
}

/// An Anthropic tool as the chat template's OpenAI function.
fn tool((i, t): (usize, &Value)) -> Result<Value, Response> {
    let name = t.get("name").and_then(Value::as_str);
    let schema = t.get("input_schema").filter(|s| s.is_object());
    match (name, schema) {
        (Some(name), Some(schema)) => Ok(json!({"type": "function", "function": {"name": name,
            "description": t.get("description").and_then(Value::as_str).unwrap_or(""), "parameters": schema}})),
        _ => Err(bad_request(
            format!("tools[{i}] needs a `name` and an `input_schema` object (server tools are not supported)"),
            Some("tools"),
        )),
    }
}

/// `system` and `messages` as the chat template's messages.
fn translate(b: &Value) -> Result<Value, Response> {
    let mut out = vec![];
    match b.get("system") {
        None | Some(Value::Null) => {}
        Some(s) => {
            let text = parts_text(s, &["text"])
                .ok_or_else(|| bad_request("`system` must be a string or text blocks", Some("system")))?;
            out.push(json!({"role": "system", "content": text}));
        }
    }
    let msgs = b
        .get("messages")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad_request("`messages` must be a non-empty list", Some("messages")))?;
    for (i, m) in msgs.iter().enumerate() {
        let bad = |what: String| bad_request(format!("messages[{i}]: {what}"), Some("messages"));
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(bad(format!("role `{role}` is not supported (user or assistant)")));
        }
        let blocks = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(a)) => a.clone(),
            _ => return Err(bad("content must be a string or a list of blocks".into())),
        };
        let (mut text, mut calls) = (String::new(), vec![]);
        for blk in &blocks {
            match (blk.get("type").and_then(Value::as_str).unwrap_or(""), role) {
                ("text", _) => text.push_str(blk.get("text").and_then(Value::as_str).unwrap_or("")),
                // earlier reasoning is not replayed (the templates drop it from history)
                ("thinking" | "redacted_thinking", "assistant") => {}
                ("tool_use", "assistant") => {
                    let name =
                        blk.get("name").and_then(Value::as_str).ok_or_else(|| bad("tool_use without a name".into()))?;
                    let id = blk.get("id").and_then(Value::as_str).unwrap_or("");
                    let args = blk.get("input").cloned().unwrap_or_else(|| json!({})).to_string();
                    calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}));
                }
                ("tool_result", "user") => {
                    let id = blk.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    let content = parts_text(blk.get("content").unwrap_or(&Value::Null), &["text"])
                        .ok_or_else(|| bad("tool_result content must be a string or text blocks".into()))?;
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
                (t, _) => return Err(bad(format!("content block `{t}` is not supported in a {role} message"))),
            }
        }
        if role == "assistant" {
            let mut n = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                n["tool_calls"] = Value::Array(calls);
            }
            out.push(n);
        } else if !text.is_empty()
            || !blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        {
            out.push(json!({"role": "user", "content": text}));
        }
    }
    Ok(Value::Array(out))
}

/// A tool call's arguments as the `input` object.
fn input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments).ok().filter(Value::is_object).unwrap_or_else(|| json!({}))
}

fn stop_reason(o: &Output, tool_use: bool) -> (&'static str, Value) {
    match (&o.stop_string, o.finish) {
        _ if tool_use => ("tool_use", Value::Null),
        (Some(s), _) => ("stop_sequence", json!(s)),
        (None, Finish::Length) => ("max_tokens", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// Prompt tokens read from the cache are not input tokens in Anthropic's accounting.
fn usage(o: &Output) -> Value {
    json!({"input_tokens": o.prompt_tokens - o.reused_tokens, "output_tokens": o.tokens.len(),
           "cache_read_input_tokens": o.reused_tokens, "cache_creation_input_tokens": 0})
}

struct Reply {
    id: String,
    model: String,
    /// The declared tools (calls of others stay text).
    tools: Vec<String>,
    thinking: bool,
}

/// The content blocks of a streamed reply, each started, filled by deltas and stopped.
struct Blocks<F: FnMut(&str, Value) -> bool> {
    send: F,
    index: usize,
    open: Option<&'static str>,
    started: bool,
    /// Tool use blocks sent.
    calls: usize,
}

impl<F: FnMut(&str, Value) -> bool> Sink for Blocks<F> {
    fn text(&mut self, reasoning: bool, s: &str) -> bool {
        self.block_text(if reasoning { "thinking" } else { "text" }, s)
    }

    fn call(&mut self, c: &toolcall::ToolCall) -> bool {
        self.calls += 1;
        self.tool(c)
    }
}

impl<F: FnMut(&str, Value) -> bool> Blocks<F> {
    fn block_text(&mut self, kind: &'static str, s: &str) -> bool {
        if s.is_empty() {
            return true;
        }
        if self.open != Some(kind) {
            if !self.close() {
                return false;
            }
            let block = if kind == "thinking" {
                json!({"type": "thinking", "thinking": "", "signature": ""})
            } else {
                json!({"type": "text", "text": ""})
            };
            if !self.start(block) {
                return false;
            }
            self.open = Some(kind);
        }
        let delta = if kind == "thinking" {
            json!({"type": "thinking_delta", "thinking": s})
        } else {
            json!({"type": "text_delta", "text": s})
        };
        (self.send)("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": delta}))
    }

    fn tool(&mut self, c: &toolcall::ToolCall) -> bool {
        self.close()
            && self.start(json!({"type": "tool_use", "id": new_id("toolu"), "name": c.name, "input": {}}))
            && (self.send)(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": input(&c.arguments).to_string()}}),
            )
            && {
                self.open = Some("tool_use");
                self.close()
            }
    }

    fn start(&mut self, block: Value) -> bool {
        self.started = true;
        (self.send)(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index, "content_block": block}),
        )
    }

    fn close(&mut self) -> bool {
        if self.open.take().is_none() {
            return true;
        }
        let ok = (self.send)("content_block_stop", json!({"type": "content_block_stop", "index": self.index}));
        self.index += 1;
        ok
    }
}

/// The reply as Anthropic's server-sent events (message_start, content blocks, message_delta,
/// message_stop); a client that leaves cancels the generation.
fn respond_stream(
    app: Shared,
    prompt: Vec<u32>,
    turn: Marks,
    p: GenParams,
    r: Reply,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    named_stream(permit, move |events| {
        let send = |name: &str, data: Value| events.send(name, data);
        let start = json!({"type": "message_start", "message": {"id": r.id, "type": "message", "role": "assistant",
            "model": r.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt.len(), "output_tokens": 0}}});
        if !send("message_start", start) || !send("ping", json!({"type": "ping"})) {
            return;
        }
        let mut blocks = Blocks { send, index: 0, open: None, started: false, calls: 0 };
        let mut answer = AnswerStream::new(app.tools, r.tools.clone(), r.thinking);
        let res = on_engine(&app, &prompt, turn, &p, |piece| !events.left() && answer.push(piece, &mut blocks));
        let error = |kind: &str, message: String| json!({"type": "error", "error": {"type": kind, "message": message}});
        match res {
            Ok(o) => {
                record(&app, std::slice::from_ref(&o));
                if o.finish == Finish::Cancelled {
                    if app.stopping.load(Relaxed) {
                        app.metrics.errors.fetch_add(1, Relaxed);
                        (blocks.send)("error", error("overloaded_error", "the server is shutting down".into()));
                    }
                    return;
                }
                if !answer.finish(&mut blocks) {
                    return;
                }
                if !blocks.started {
                    // an empty answer is still one (empty) text block
                    let _ = blocks.start(json!({"type": "text", "text": ""}));
                    blocks.open = Some("text");
                }
                if !blocks.close() {
                    return;
                }
                let (reason, seq) = stop_reason(&o, blocks.calls > 0);
                let delta = json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                    "usage": {"output_tokens": o.tokens.len()}});
                let _ = (blocks.send)("message_delta", delta)
                    && (blocks.send)("message_stop", json!({"type": "message_stop"}));
            }
            Err(e) => {
                app.metrics.errors.fetch_add(1, Relaxed);
                (blocks.send)("error", error("api_error", format!("{e:#}")));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_use_and_results_become_the_templates_messages() {
        let b = json!({"system": [{"type": "text", "text": "Be brief."}], "messages": [
            {"role": "user", "content": "Weather in Mantua?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Mantua"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "foggy"}]}]});
        let m = translate(&b).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(
            m[2]["tool_calls"][0]["function"],
            json!({"name": "get_weather", "arguments": "{\"city\":\"Mantua\"}"})
        );
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "foggy"}));
        assert_eq!(m.as_array().unwrap().len(), 4);
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]});
        assert!(translate(&image).is_err());
    }
}
