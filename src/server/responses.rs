//! The OpenAI Responses API (`POST /v1/responses`), whole or streamed, with function tools,
//! structured output and reasoning items, over the same engine, chat template and queue as the
//! other endpoints.
//!
//! `instructions` and the `input` items are translated to the chat template's messages: a
//! string input is one user message, `function_call` items an assistant's `tool_calls`,
//! `function_call_output` items tool messages; earlier `reasoning` items are dropped (the
//! templates leave reasoning out of history). Responses are not stored: `store` true and
//! `previous_response_id` are refused, so each request carries its whole conversation (whose
//! cached prefix the engine reuses). `text.format` json_object / json_schema and `tool_choice`
//! required / a named function are enforced by constrained decoding, as on the chat endpoint;
//! `reasoning.effort` sets the template's `enable_thinking`, and what the model writes before
//! `</think>` is a `reasoning` item (its text as `reasoning_text` content, no summary).

use super::answer::{AnswerStream, Sink};
use super::*;

/// The fields a request may carry (some only switched off); any other is refused.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "text",
    "reasoning",
    "parallel_tool_calls",
    "metadata",
    "store",
    "user",
    "previous_response_id",
    "conversation",
    "include",
    "truncation",
    "background",
    "prompt_cache_key",
    "safety_identifier",
];

/// What a Responses request asks for, translated.
struct Request {
    params: GenParams,
    messages: Value,
    /// Chat-shaped (`{"type": "function", "function": {...}}`), as the template takes them.
    tools: Option<Value>,
    choice: ToolChoice,
    /// The JSON schema of `text.format`.
    schema: Option<Value>,
    /// Template arguments (`enable_thinking`).
    extra: serde_json::Map<String, Value>,
    parallel: bool,
    /// The settings the response object repeats.
    echo: serde_json::Map<String, Value>,
}

/// What every event and the response object of one request carry.
struct Reply {
    id: String,
    created: u64,
    model: String,
    echo: serde_json::Map<String, Value>,
    /// The declared tools whose calls are taken out of the text (none: the text is the answer).
    tools: Vec<String>,
    /// The prompt leaves the model inside a reasoning block.
    thinking: bool,
    /// `parallel_tool_calls`: false reports the first call only.
    parallel: bool,
}

pub(super) async fn responses(State(app): State<Shared>, body: Result<Json<Value>, JsonRejection>) -> Response {
    app.metrics.requests.fetch_add(1, Relaxed);
    let resp = async {
        let Json(b) = body.map_err(body_error)?;
        let Request { mut params, messages, tools, choice, schema, extra, parallel, echo } = parse(&app, &b)?;
        // text held to a format is the answer itself: no tool calls in it
        let names = if schema.is_none() { tool_names(tools.as_ref()) } else { vec![] };
        let schema = schema.map(|s| (s, "text"));
        let Prepared { prompt, turn, constraint, thinking } =
            prepare(&app, messages, tools, extra, &choice, schema).await?;
        let thinking = constraint.is_none() && thinking;
        params.sampling.constraint = constraint;
        let permit = acquire(&app).await?;
        let model = app.opts.model_id.clone();
        let r = Reply { id: rid("resp"), created: now(), model, echo, tools: names, thinking, parallel };
        if params.stream {
            return Ok(respond_stream(app.clone(), prompt, turn, params, r, permit));
        }
        Ok(match generate_whole(&app, prompt, turn, &params, permit).await {
            Ok(o) => respond_whole(&app, &r, &o),
            Err(resp) => resp, // counted already
        })
    }
    .await;
    counted(&app, resp)
}

/// An id as OpenAI writes them (`resp_…`, `msg_…`).
fn rid(prefix: &str) -> String {
    new_id(prefix).replacen('-', "_", 1)
}

/// Validates a Responses request and translates it.
fn parse(app: &App, b: &Value) -> Result<Request, Response> {
    let o = b.as_object().ok_or_else(|| bad_request("the body must be a JSON object", None))?;
    check_fields(o)?;
    let params = sampling(app, b)?;
    let tools = tools(b)?;
    let choice = choice(b, tools.as_ref())?;
    let tools = if matches!(choice, ToolChoice::None) { None } else { tools };
    let mut extra = serde_json::Map::new();
    if let Some(on) = reasoning(b)? {
        extra.insert("enable_thinking".into(), json!(on));
    }
    Ok(Request {
        params,
        messages: translate(b)?,
        tools,
        choice,
        schema: text_format(b)?,
        extra,
        parallel: b.get("parallel_tool_calls") != Some(&json!(false)),
        echo: echo(b),
    })
}

/// Refuses fields this server does not know or implement, naming them, and checks the types of
/// the plain ones.
fn check_fields(b: &serde_json::Map<String, Value>) -> Result<(), Response> {
    for (k, v) in b {
        let off = v.is_null() || v == &json!(false) || v == &json!([]);
        let refusal = match k.as_str() {
            "previous_response_id" | "conversation" if !v.is_null() => {
                "responses are not stored: send the whole conversation as `input`"
            }
            "store" if v == &json!(true) => "responses are not stored: send `store` false",
            "background" if !off => "background responses are not supported",
            "include" if !off => "`include` is not supported (there is nothing to add to the output)",
            "truncation" if !(v.is_null() || v == "disabled") => {
                "only `truncation` disabled is supported (an input over the context is refused)"
            }
            k if FIELDS.contains(&k) => continue,
            _ => return Err(bad_request(format!("`{k}` is not supported"), Some(k))),
        };
        return Err(bad_request(refusal, Some(k)));
    }
    let (text, flag) = ("a string", "a boolean");
    for (k, what) in [
        ("store", flag),
        ("parallel_tool_calls", flag),
        ("instructions", text),
        ("user", text),
        ("prompt_cache_key", text),
        ("safety_identifier", text),
        ("stream_options", "an object"),
    ] {
        let ok = |v: &Value| match what {
            "a string" => v.is_string(),
            "a boolean" => v.is_boolean(),
            _ => v.is_object(),
        };
        if b.get(k).is_some_and(|v| !v.is_null() && !ok(v)) {
            return Err(bad_request(format!("`{k}` must be {what}"), Some(k)));
        }
    }
    metadata(b.get("metadata").unwrap_or(&Value::Null))
}

/// `metadata`: at most 16 string values, keys of at most 64 characters, values of at most 512.
fn metadata(m: &Value) -> Result<(), Response> {
    let ok = match m {
        Value::Null => true,
        Value::Object(m) => {
            m.len() <= 16
                && m.iter()
                    .all(|(k, v)| k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512))
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(bad_request(
        "`metadata` must map at most 16 keys (64 characters at most) to strings (512 characters at most)",
        Some("metadata"),
    ))
}

/// The sampling fields, checked as the chat endpoint checks them.
fn sampling(app: &App, b: &Value) -> Result<GenParams, Response> {
    let mut o = serde_json::Map::new();
    match b.get("max_output_tokens") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => _ = o.insert("max_tokens".into(), json!(n)),
            _ => return Err(bad_request("`max_output_tokens` must be a positive integer", Some("max_output_tokens"))),
        },
    }
    for k in ["model", "temperature", "top_p", "stream"] {
        if let Some(v) = b.get(k) {
            o.insert(k.into(), v.clone());
        }
    }
    parse_params(app, &Value::Object(o))
}

/// `tools` (function tools only) in the chat template's shape.
fn tools(b: &Value) -> Result<Option<Value>, Response> {
    match b.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(t)) => Ok(Some(Value::Array(t.iter().enumerate().map(tool).collect::<Result<_, _>>()?))),
        Some(_) => Err(bad_request("`tools` must be a list", Some("tools"))),
    }
}

/// A Responses function tool (flat: name, description and parameters beside its type) as the
/// chat template's nested one.
fn tool((i, t): (usize, &Value)) -> Result<Value, Response> {
    let bad = |m: &str| bad_request(format!("tools[{i}]: {m}"), Some("tools"));
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(k) => return Err(bad(&format!("`{k}` tools are not supported (function tools only)"))),
        None => return Err(bad("`type` is missing")),
    }
    let name =
        t.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| bad("`name` is missing"))?;
    let parameters = match t.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => return Err(bad("`parameters` must be a JSON schema object")),
    };
    let description = match t.get("description") {
        None | Some(Value::Null) => "",
        Some(Value::String(d)) => d,
        Some(_) => return Err(bad("`description` must be a string")),
    };
    Ok(json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}))
}

/// `tool_choice`: auto, none, required, or `{"type": "function", "name": ...}`.
fn choice(b: &Value, tools: Option<&Value>) -> Result<ToolChoice, Response> {
    let v = match b.get("tool_choice") {
        Some(Value::Object(o)) => {
            match (o.get("type").and_then(Value::as_str), o.get("name").and_then(Value::as_str)) {
                (Some("function"), Some(n)) => Some(json!({"type": "function", "function": {"name": n}})),
                _ => {
                    return Err(bad_request(
                        "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
                        Some("tool_choice"),
                    ));
                }
            }
        }
        v => v.cloned(),
    };
    tool_choice(v.as_ref(), tools)
}

/// `reasoning`: whether its `effort` turns thinking on (none: the template's default). A
/// `summary` is accepted; the reasoning item carries the reasoning itself, not a summary.
fn reasoning(b: &Value) -> Result<Option<bool>, Response> {
    let bad = |m: String| bad_request(m, Some("reasoning"));
    let r = match b.get("reasoning") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(r)) => r,
        Some(_) => return Err(bad("`reasoning` must be an object".into())),
    };
    for (k, v) in r {
        match (k.as_str(), v.as_str()) {
            (_, None) if v.is_null() => {}
            ("effort", Some(_)) => {}
            ("summary" | "generate_summary", Some("auto" | "concise" | "detailed")) => {}
            _ => return Err(bad(format!("`reasoning.{k}` {v} is not supported"))),
        }
    }
    match r.get("effort").and_then(Value::as_str) {
        None => Ok(None),
        Some(e) => effort_thinking(e)
            .map(Some)
            .ok_or_else(|| bad(format!("`reasoning.effort` `{e}` is not one of none, minimal, low, medium, high"))),
    }
}

/// The JSON schema `text.format` holds the answer to (none for plain text); `text.verbosity`
/// only at its default.
fn text_format(b: &Value) -> Result<Option<Value>, Response> {
    let bad = |m: &str| bad_request(m.to_string(), Some("text"));
    let t = match b.get("text") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(t)) => t,
        Some(_) => return Err(bad("`text` must be an object")),
    };
    for (k, v) in t {
        match k.as_str() {
            "format" => {}
            "verbosity" if v.is_null() || v == "medium" => {}
            "verbosity" => return Err(bad("only the default `text.verbosity`, medium, is supported")),
            k => return Err(bad(&format!("`text.{k}` is not supported"))),
        }
    }
    let Some(f) = t.get("format").filter(|f| !f.is_null()) else { return Ok(None) };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") if !f.get("name").is_some_and(Value::is_string) => {
            Err(bad("`text.format.name` is required for json_schema"))
        }
        Some("json_schema") => f
            .get("schema")
            .filter(|s| s.is_object())
            .cloned()
            .map(Some)
            .ok_or_else(|| bad("`text.format.schema` must be a JSON schema object")),
        _ => Err(bad("`text.format.type` must be text, json_object or json_schema")),
    }
}

/// The settings the response object repeats: as given, or their defaults.
fn echo(b: &Value) -> serde_json::Map<String, Value> {
    let given = |k: &str, default: Value| b.get(k).filter(|v| !v.is_null()).cloned().unwrap_or(default);
    let mut text = given("text", json!({}));
    if text.get("format").is_none_or(Value::is_null) {
        text["format"] = json!({"type": "text"});
    }
    let reasoning = given("reasoning", json!({}));
    let e = json!({"instructions": given("instructions", Value::Null),
        "max_output_tokens": given("max_output_tokens", Value::Null), "metadata": given("metadata", json!({})),
        "parallel_tool_calls": given("parallel_tool_calls", json!(true)), "previous_response_id": null,
        "reasoning": {"effort": reasoning.get("effort").cloned().unwrap_or(Value::Null),
            "summary": reasoning.get("summary").cloned().unwrap_or(Value::Null)},
        "store": false, "temperature": given("temperature", json!(1.0)), "text": text,
        "tool_choice": given("tool_choice", json!("auto")), "tools": given("tools", json!([])),
        "top_p": given("top_p", json!(1.0)), "truncation": "disabled", "user": given("user", Value::Null),
        "background": false});
    e.as_object().cloned().unwrap_or_default()
}

/// `instructions` and `input` as the chat template's messages.
fn translate(b: &Value) -> Result<Value, Response> {
    let mut out = vec![];
    if let Some(s) = b.get("instructions").and_then(Value::as_str) {
        out.push(json!({"role": "system", "content": s}));
    }
    match b.get("input") {
        Some(Value::String(s)) => out.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, it) in items.iter().enumerate() {
                input_item(&mut out, it).map_err(|m| bad_request(format!("input[{i}]: {m}"), Some("input")))?;
            }
        }
        _ => return Err(bad_request("`input` must be a string or a non-empty list of items", Some("input"))),
    }
    Ok(Value::Array(out))
}

/// One input item as the template's messages; the error says what is wrong with it.
fn input_item(out: &mut Vec<Value>, it: &Value) -> Result<(), String> {
    let field = |k: &str| it.get(k).and_then(Value::as_str).ok_or_else(|| format!("`{k}` must be a string"));
    let text = |k: &str| {
        parts_text(it.get(k).unwrap_or(&Value::Null), &["input_text", "output_text"])
            .ok_or_else(|| format!("`{k}` must be a string or a list of input_text / output_text parts"))
    };
    let kind = it.get("type").and_then(Value::as_str);
    match kind.or(it.get("role").map(|_| "message")) {
        Some("message") => {
            let role = field("role")?;
            if !["user", "system", "developer", "assistant"].contains(&role) {
                return Err(format!("role `{role}` is not supported (user, system, developer or assistant)"));
            }
            let role = if role == "developer" { "system" } else { role };
            out.push(json!({"role": role, "content": text("content")?}));
        }
        Some("function_call") => {
            let call = json!({"id": field("call_id")?, "type": "function",
                "function": {"name": field("name")?, "arguments": field("arguments")?}});
            // the calls of one turn join the assistant message before them
            match out.last_mut().filter(|m| m["role"] == "assistant") {
                Some(m) => match m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => m["tool_calls"] = json!([call]),
                },
                None => out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
            }
        }
        Some("function_call_output") => {
            if it.get("output").is_none() {
                return Err("`output` is missing".into());
            }
            out.push(json!({"role": "tool", "tool_call_id": field("call_id")?, "content": text("output")?}));
        }
        // earlier reasoning is not replayed (the templates leave it out of history)
        Some("reasoning") => {}
        Some(k) => return Err(format!("`{k}` items are not supported")),
        None => return Err("an item needs a `type` (or a `role`)".into()),
    }
    Ok(())
}

fn status(o: &Output) -> &'static str {
    if o.finish == Finish::Length { "incomplete" } else { "completed" }
}

/// The response object: the request's settings, `output` as made so far, `usage` once done.
fn response(r: &Reply, status: &str, output: &[Value], usage: Option<Value>) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    let mut b = json!({"id": r.id, "object": "response", "created_at": r.created, "status": status,
        "model": r.model, "output": output, "error": null, "incomplete_details": incomplete, "usage": usage});
    if let Some(o) = b.as_object_mut() {
        o.extend(r.echo.clone());
    }
    b
}

/// Output tokens up to the end of the reasoning (its `</think>` included).
fn reasoning_tokens(app: &App, o: &Output, thinking: bool) -> usize {
    if !(thinking || o.text.trim_start().starts_with("<think>")) {
        return 0;
    }
    let end = o.text.find("</think>").map_or(o.text.len(), |i| i + "</think>".len());
    let mut at = 0;
    o.tokens
        .iter()
        .take_while(|&&t| {
            let start = at;
            at += app.tok.token_bytes(t).len();
            start < end
        })
        .count()
}

/// Cached prompt tokens count among the input tokens, as OpenAI counts them.
fn usage(app: &App, o: &Output, thinking: bool) -> Value {
    json!({"input_tokens": o.prompt_tokens, "input_tokens_details": {"cached_tokens": o.reused_tokens},
        "output_tokens": o.tokens.len(), "output_tokens_details": {"reasoning_tokens": reasoning_tokens(app, o, thinking)},
        "total_tokens": o.prompt_tokens + o.tokens.len()})
}

/// A whole response: the output items made exactly as a stream makes them.
fn respond_whole(app: &App, r: &Reply, o: &Output) -> Response {
    let mut items = Items::new(|_: &str, _: Value| true, r.parallel);
    let mut answer = AnswerStream::new(app.tools, r.tools.clone(), r.thinking);
    let _ = answer.push(&o.text, &mut items) && answer.finish(&mut items) && items.end(status(o));
    let body = response(r, status(o), &items.output, Some(usage(app, o, r.thinking)));
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(Tokens(o.prompt_tokens, o.tokens.len()));
    resp
}

/// The response as OpenAI's server-sent events: response.created and .in_progress, each output
/// item added, filled by deltas and done, then response.completed (or .incomplete, or .failed);
/// a client that leaves cancels the generation.
fn respond_stream(
    app: Shared,
    prompt: Vec<u32>,
    turn: Marks,
    p: GenParams,
    r: Reply,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    named_stream(permit, move |events| {
        let send = |kind: &str, data: Value| events.send(kind, data);
        let mut items = Items::new(send, r.parallel);
        let start = json!({"response": response(&r, "in_progress", &[], None)});
        if !(items.event("response.created", start.clone()) && items.event("response.in_progress", start)) {
            return;
        }
        let mut answer = AnswerStream::new(app.tools, r.tools.clone(), r.thinking);
        let res = on_engine(&app, &prompt, turn, &p, |piece| !events.left() && answer.push(piece, &mut items));
        finish_stream(&app, &r, res, answer, items);
    })
}

/// The stream's last events: what the answer held back and the final response, or
/// response.failed when the generation failed or the server is stopping.
fn finish_stream(
    app: &App,
    r: &Reply,
    res: anyhow::Result<Output>,
    mut answer: AnswerStream,
    mut items: Items<impl FnMut(&str, Value) -> bool>,
) {
    let message = match res {
        Ok(o) => {
            record(app, std::slice::from_ref(&o));
            if o.finish != Finish::Cancelled {
                let status = status(&o);
                let _ = answer.finish(&mut items)
                    && items.end(status)
                    && items.event(
                        &format!("response.{status}"),
                        json!({"response": response(r, status, &items.output, Some(usage(app, &o, r.thinking)))}),
                    );
                return;
            }
            if !app.stopping.load(Relaxed) {
                return; // the client left
            }
            "the server is shutting down".to_string()
        }
        Err(e) => format!("{e:#}"),
    };
    app.metrics.errors.fetch_add(1, Relaxed);
    let mut failed = response(r, "failed", &items.output, None);
    failed["error"] = json!({"code": "server_error", "message": message});
    items.event("response.failed", json!({"response": failed}));
}

/// The output items of a response as they are made, each announced, filled and finished by
/// events (`send`; a whole response sends them nowhere).
struct Items<F: FnMut(&str, Value) -> bool> {
    send: F,
    seq: u64,
    output: Vec<Value>,
    /// The reasoning or message item being written: (reasoning, id, text so far).
    open: Option<(bool, String, String)>,
    /// Answer text held while it is blank and no message is open (blanks around tool calls
    /// make no message).
    blank: String,
    parallel: bool,
}

impl<F: FnMut(&str, Value) -> bool> Items<F> {
    fn new(send: F, parallel: bool) -> Self {
        Items { send, seq: 0, output: vec![], open: None, blank: String::new(), parallel }
    }

    /// Sends one event, numbered.
    fn event(&mut self, kind: &str, body: Value) -> bool {
        let mut e = json!({"type": kind, "sequence_number": self.seq});
        if let (Some(e), Value::Object(body)) = (e.as_object_mut(), body) {
            e.extend(body);
        }
        self.seq += 1;
        (self.send)(kind, e)
    }

    /// Opens a reasoning or message item.
    fn begin(&mut self, reasoning: bool) -> bool {
        let id = rid(if reasoning { "rs" } else { "msg" });
        let i = self.output.len();
        let added = json!({"output_index": i, "item": text_item(reasoning, &id, None, "in_progress")});
        let part = json!({"item_id": id, "output_index": i, "content_index": 0, "part": part(reasoning, "")});
        self.open = Some((reasoning, id, String::new()));
        self.event("response.output_item.added", added) && self.event("response.content_part.added", part)
    }

    /// More text of the open item.
    fn delta(&mut self, s: &str) -> bool {
        let Some((reasoning, id, text)) = self.open.as_mut() else { return true };
        text.push_str(s);
        let (reasoning, mut body) =
            (*reasoning, json!({"item_id": id, "output_index": self.output.len(), "content_index": 0, "delta": s}));
        if reasoning {
            return self.event("response.reasoning_text.delta", body);
        }
        body["logprobs"] = json!([]);
        self.event("response.output_text.delta", body)
    }

    /// Finishes the open item with `status`.
    fn close(&mut self, status: &str) -> bool {
        let Some((reasoning, id, text)) = self.open.take() else { return true };
        let i = self.output.len();
        let mut done = json!({"item_id": id, "output_index": i, "content_index": 0, "text": text});
        let kind = if reasoning { "response.reasoning_text.done" } else { "response.output_text.done" };
        if !reasoning {
            done["logprobs"] = json!([]);
        }
        let part = json!({"item_id": id, "output_index": i, "content_index": 0, "part": part(reasoning, &text)});
        let item = text_item(reasoning, &id, Some(&text), status);
        self.output.push(item.clone());
        self.event(kind, done)
            && self.event("response.content_part.done", part)
            && self.event("response.output_item.done", json!({"output_index": i, "item": item}))
    }

    /// The end of the answer: the open item finishes with `status`; an empty answer is still
    /// one (empty) message.
    fn end(&mut self, status: &str) -> bool {
        if self.output.is_empty() && self.open.is_none() {
            let blank = std::mem::take(&mut self.blank);
            if !(self.begin(false) && (blank.is_empty() || self.delta(&blank))) {
                return false;
            }
        }
        self.close(status)
    }
}

impl<F: FnMut(&str, Value) -> bool> Sink for Items<F> {
    fn text(&mut self, reasoning: bool, s: &str) -> bool {
        if s.is_empty() {
            return true;
        }
        if self.open.as_ref().is_some_and(|o| o.0 == reasoning) {
            return self.delta(s);
        }
        if !reasoning && s.trim().is_empty() {
            self.blank.push_str(s);
            return true;
        }
        let s = if reasoning { s.to_string() } else { std::mem::take(&mut self.blank) + s };
        self.close("completed") && self.begin(reasoning) && self.delta(&s)
    }

    fn call(&mut self, c: &toolcall::ToolCall) -> bool {
        self.blank.clear();
        if !self.parallel && self.output.iter().any(|o| o["type"] == "function_call") {
            return true;
        }
        if !self.close("completed") {
            return false;
        }
        let (i, id, call_id) = (self.output.len(), rid("fc"), rid("call"));
        let item = |arguments: &str, status: &str| {
            json!({"type": "function_call", "id": id, "call_id": call_id, "name": c.name,
                "arguments": arguments, "status": status})
        };
        let (added, done) = (item("", "in_progress"), item(&c.arguments, "completed"));
        self.output.push(done.clone());
        let at = json!({"item_id": id, "output_index": i});
        let mut delta = at.clone();
        delta["delta"] = json!(c.arguments);
        let mut args = at;
        args["name"] = json!(c.name);
        args["arguments"] = json!(c.arguments);
        self.event("response.output_item.added", json!({"output_index": i, "item": added}))
            && self.event("response.function_call_arguments.delta", delta)
            && self.event("response.function_call_arguments.done", args)
            && self.event("response.output_item.done", json!({"output_index": i, "item": done}))
    }
}

/// A reasoning or message item, with its text once done.
fn text_item(reasoning: bool, id: &str, text: Option<&str>, status: &str) -> Value {
    let content: Vec<Value> = text.map(|t| part(reasoning, t)).into_iter().collect();
    if reasoning {
        json!({"type": "reasoning", "id": id, "summary": [], "content": content, "status": status})
    } else {
        json!({"type": "message", "id": id, "role": "assistant", "status": status, "content": content})
    }
}

fn part(reasoning: bool, text: &str) -> Value {
    if reasoning {
        json!({"type": "reasoning_text", "text": text})
    } else {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_become_the_templates_messages() {
        let b = json!({"instructions": "Be brief.", "input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                {"type": "input_text", "text": "Mantua and Verona?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Mantua\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Verona\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "foggy"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "sunny"}]}]});
        let m = translate(&b).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1], json!({"role": "system", "content": "Use tools."}));
        assert_eq!(m[2], json!({"role": "user", "content": "Weather in Mantua and Verona?"}));
        assert_eq!((&m[3]["content"], m[3]["tool_calls"].as_array().map(Vec::len)), (&json!("Checking."), Some(2)));
        assert_eq!(
            m[3]["tool_calls"][1]["function"],
            json!({"name": "get_weather", "arguments": "{\"city\":\"Verona\"}"})
        );
        assert_eq!(m[5], json!({"role": "tool", "tool_call_id": "call_2", "content": "sunny"}));
        assert_eq!(m.as_array().unwrap().len(), 6);
        // a call with no assistant text before it is an assistant message of its own
        let b = json!({"input": [{"role": "user", "content": "x"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]});
        assert_eq!(translate(&b).unwrap()[1]["content"], "");
        for bad in [
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            json!({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}),
            json!({"input": [{"content": "no role or type"}]}),
        ] {
            assert!(translate(&bad).is_err(), "{bad}");
        }
    }

    /// The events and output items of an answer streamed in pieces of `size` characters.
    fn stream(text: &str, size: usize, parallel: bool) -> (Vec<(String, Value)>, Vec<Value>) {
        let mut events = vec![];
        let mut items = Items::new(
            |k: &str, v: Value| {
                events.push((k.to_string(), v));
                true
            },
            parallel,
        );
        let mut answer = AnswerStream::new(toolcall::ToolFormat::Qwen, vec!["get_weather".into()], false);
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(size) {
            assert!(answer.push(&piece.iter().collect::<String>(), &mut items));
        }
        assert!(answer.finish(&mut items) && items.end("completed"));
        let output = std::mem::take(&mut items.output);
        drop(items);
        (events, output)
    }

    #[test]
    fn reasoning_text_and_calls_stream_as_openai_items_whatever_the_pieces() {
        let call = |city: &str| {
            format!(
                "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>\n"
            )
        };
        let text = format!("<think>weigh it</think>\n\nLet me check.\n{}{}", call("Mantua"), call("Verona"));
        let (_, whole) = stream(&text, text.len(), true);
        let kinds: Vec<&str> = whole.iter().map(|o| o["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["reasoning", "message", "function_call", "function_call"]);
        assert_eq!(whole[0]["content"], json!([{"type": "reasoning_text", "text": "weigh it"}]));
        assert_eq!(whole[1]["content"][0]["text"], "Let me check.\n");
        assert_eq!(whole[3]["arguments"], "{\"city\":\"Verona\"}");
        for size in 1..6 {
            let (events, output) = stream(&text, size, true);
            let strip = |o: &[Value]| -> Vec<Value> {
                o.iter()
                    .map(|i| {
                        let mut i = i.clone();
                        i.as_object_mut().unwrap().retain(|k, _| k != "id" && k != "call_id");
                        i
                    })
                    .collect()
            };
            assert_eq!(strip(&output), strip(&whole), "pieces of {size}");
            assert!(events.iter().enumerate().all(|(i, e)| e.1["sequence_number"] == i && e.1["type"] == e.0.as_str()));
            let mut order: Vec<&str> = events.iter().map(|e| e.0.strip_prefix("response.").unwrap()).collect();
            order.dedup();
            let text_item = |d: &'static str| {
                ["output_item.added", "content_part.added", d, "", "content_part.done", "output_item.done"]
            };
            let mut want: Vec<&str> = vec![];
            want.extend(
                text_item("reasoning_text.delta").map(|k| if k.is_empty() { "reasoning_text.done" } else { k }),
            );
            want.extend(text_item("output_text.delta").map(|k| if k.is_empty() { "output_text.done" } else { k }));
            for _ in 0..2 {
                want.extend([
                    "output_item.added",
                    "function_call_arguments.delta",
                    "function_call_arguments.done",
                    "output_item.done",
                ]);
            }
            assert_eq!(order, want, "pieces of {size}");
            let deltas: String = events
                .iter()
                .filter(|e| e.0 == "response.output_text.delta")
                .map(|e| e.1["delta"].as_str().unwrap())
                .collect();
            assert_eq!(deltas, "Let me check.\n");
        }
        // parallel_tool_calls false: the first call only; blanks around calls make no message
        let (_, one) = stream(&format!("\n{}{}", call("Mantua"), call("Verona")), 3, false);
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!(one[0]["arguments"], "{\"city\":\"Mantua\"}");
        // an empty answer is one empty message
        let (_, empty) = stream("", 1, true);
        assert_eq!(empty[0]["content"][0]["text"], "");
    }
}
