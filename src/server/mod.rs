//! OpenAI-compatible HTTP server (axum): `/v1/chat/completions` (streamed as SSE or not, with
//! tool calling), `/v1/completions`, `/v1/models`, `/health`, `/metrics` (Prometheus), the
//! Anthropic Messages API (`anthropic.rs`), the OpenAI Responses API (`responses.rs`), and a
//! chat page at `/` with a live metrics stream (`web.rs`).
//!
//! Prefills run one at a time on the session (its live state and snapshots are what let a
//! request that extends an earlier conversation reuse its cached prefix); up to `max_batch`
//! requests then decode together ([`crate::batch`]); further requests wait in a bounded FIFO
//! queue and get 503 when it is full. Generation stops when the client goes away. A request's
//! `n` choices share one prefill (each resumes from the snapshot it left) and decode together
//! in the batch's steps; log-probabilities are those of the distribution each token was drawn
//! from (see [`crate::generate::Sampler::logprobs`]).

// handlers return ready-made error responses; boxing them would only add noise
#![allow(clippy::result_large_err)]

mod answer;
mod anthropic;
mod responses;
mod web;

use crate::generate::{SamplingParams, TokenLogprob};
use crate::session::{ContextExceeded, Finish, Marks, Output, Scored, Session};
use crate::toolcall::{self, StreamEvent, ToolStream};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The id clients use in `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Requests that may wait for the engine; more get 503.
    pub max_queue: usize,
    /// Requests generating at once: their decode steps run as one batch (continuous
    /// batching, [`crate::batch`]); 1 serves one request at a time. Forced to 1 on an
    /// accelerator.
    pub max_batch: usize,
    /// How long a decode step waits for the batch's other sequences to hand in their next
    /// token before it runs without the late ones.
    pub batch_wait: std::time::Duration,
    /// Default `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Required as `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every endpoint but
    /// `/health`.
    pub api_key: Option<String>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A connection that has not sent a complete request header within this time (a new
    /// request on a kept-alive one included) is closed.
    pub header_timeout: std::time::Duration,
    /// Browser origins allowed to call the API (CORS; `*` for any); none by default.
    pub cors: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "flashmoe".into(),
            max_queue: 16,
            max_batch: 8,
            batch_wait: crate::batch::GATHER,
            default_max_tokens: 256,
            api_key: None,
            max_body_bytes: 8 << 20,
            max_connections: 256,
            header_timeout: std::time::Duration::from_secs(15),
            cors: vec![],
        }
    }
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    reused_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    prefill_ns: AtomicU64,
    decode_ns: AtomicU64,
    last_decode_tok_s_milli: AtomicU64,
}

struct App {
    /// Prefix reuse and prefill: one request at a time.
    session: Arc<Mutex<Session>>,
    /// The shared decode steps of the requests generating.
    batch: crate::batch::Batcher,
    /// A copy of the session's tokenizer, so requests can be prepared while one generates.
    tok: crate::tokenizer::TextTokenizer,
    context: usize,
    /// See [`crate::tokenizer::TextTokenizer::max_token_bytes`].
    max_token_bytes: usize,
    store: Option<Arc<crate::flash::ExpertStore>>,
    opts: ServerOptions,
    engine: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: Metrics,
    /// The server is stopping: generations end (streams with an error event and `[DONE]`).
    stopping: AtomicBool,
    /// The vocabulary for constrained decoding, built on the first request that needs it.
    grammars: std::sync::OnceLock<Result<crate::grammar::Grammars, String>>,
    vocab: usize,
    stop_ids: Vec<u32>,
    /// How the model's family writes tool calls.
    tools: toolcall::ToolFormat,
    /// The session saves prompt states to disk (then where the system prompt ends matters).
    prompt_cache: bool,
}

type Shared = Arc<App>;

/// An OpenAI-style error response.
fn error(
    status: StatusCode,
    message: impl Into<String>,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> Response {
    // the top-level "type" makes the same body an Anthropic error too
    let body =
        json!({"type": "error", "error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

fn bad_request(message: impl Into<String>, param: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error", None, param)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{:x}{:04x}", t, N.fetch_add(1, Relaxed) & 0xffff)
}

/// Builds the router (tests bind it to a loopback port themselves).
pub fn router(session: Session, opts: ServerOptions) -> Router {
    build(session, opts).0
}

fn build(mut session: Session, mut opts: ServerOptions) -> (Router, Shared) {
    opts.max_batch = opts.max_batch.max(1);
    if session.model.accel.is_some() && opts.max_batch > 1 {
        eprintln!("note: batched decoding runs on the CPU only: requests are served one at a time on the accelerator");
        opts.max_batch = 1;
    }
    // a snapshot or two per conversation generating at once
    session.set_max_snapshots(opts.max_batch.max(4));
    let batch = crate::batch::Batcher::new(session.model.clone(), opts.max_batch, opts.batch_wait);
    let (vocab, stop_ids) = (session.model.vocab_size(), session.stop_ids.clone());
    let mt = &session.model.cfg.model_type;
    let tools = crate::families::by_model_type(mt).map_or_else(|_| Default::default(), |f| f.tool_format(mt));
    let app = Arc::new(App {
        tools,
        prompt_cache: session.has_prompt_cache(),
        tok: session.tok.clone(),
        context: session.model.max_context(),
        max_token_bytes: session.tok.max_token_bytes(),
        store: session.model.store.clone(),
        session: Arc::new(Mutex::new(session)),
        batch,
        engine: Arc::new(Semaphore::new(opts.max_batch)),
        opts,
        waiting: AtomicUsize::new(0),
        metrics: Metrics::default(),
        stopping: AtomicBool::new(false),
        grammars: std::sync::OnceLock::new(),
        vocab,
        stop_ids,
    });
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/metrics", get(metrics))
        .merge(web::router())
        .fallback(|| async {
            error(StatusCode::NOT_FOUND, "unknown endpoint", "invalid_request_error", Some("not_found"), None)
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
                "invalid_request_error",
                Some("method_not_allowed"),
                None,
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(app.opts.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app.clone());
    // outermost, so that a browser's preflight is answered before the API key is asked for
    let router = match cors(&app.opts.cors) {
        Some(c) => router.layer(c),
        None => router,
    };
    (router, app)
}

/// The CORS policy for `origins` (`*`: any origin), or none.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Tokens of a finished request, for the log line (set by the handlers on their response).
#[derive(Clone, Copy)]
struct Tokens(usize, usize);

/// Every request: the API key (all but `/health` and the web page's files), then one log line
/// on stderr.
async fn gate(State(app): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let t = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = match &app.opts.api_key {
        Some(key) if path != "/health" && !web::is_public(&path) && !authorized(req.headers(), key) => {
            app.metrics.errors.fetch_add(1, Relaxed);
            error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send `Authorization: Bearer KEY` or `x-api-key: KEY`)",
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
            )
        }
        _ => match read_body(&app, req).await {
            Ok(req) => next.run(req).await,
            Err(r) => {
                app.metrics.errors.fetch_add(1, Relaxed);
                r
            }
        },
    };
    let tokens = resp.extensions().get::<Tokens>().map_or(String::new(), |t| format!(" {}+{} tokens", t.0, t.1));
    let stream =
        if resp.headers().get("content-type").is_some_and(|v| v == "text/event-stream") { " stream" } else { "" };
    eprintln!("{method} {path} {}{tokens}{stream} {} ms", resp.status().as_u16(), t.elapsed().as_millis());
    resp
}

/// The whole request body, read within `header_timeout` of the header (a client trickling
/// its body cannot hold a connection) and at most `max_body_bytes` (413).
async fn read_body(app: &App, req: axum::extract::Request) -> Result<axum::extract::Request, Response> {
    let (parts, body) = req.into_parts();
    let limit = app.opts.max_body_bytes;
    match tokio::time::timeout(app.opts.header_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))),
        Ok(Err(_)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large (the limit is {limit} bytes) or cut short"),
            "invalid_request_error",
            None,
            None,
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
            "invalid_request_error",
            None,
            None,
        )),
    }
}

fn authorized(h: &axum::http::HeaderMap, key: &str) -> bool {
    let bearer = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    let x = h.get("x-api-key").and_then(|v| v.to_str().ok());
    // compared in constant time: the key's bytes do not leak through the response time
    let eq = |a: &str| a.len() == key.len() && a.bytes().zip(key.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0;
    bearer.is_some_and(eq) || x.is_some_and(eq)
}

/// A body the JSON extractor refused: 413 when over the size limit, else 400.
fn body_error(e: JsonRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large", "invalid_request_error", None, None);
    }
    bad_request(format!("invalid JSON body: {e}"), None)
}

/// Serves until SIGTERM or Ctrl-C, then stops gracefully (see [`serve_on`]).
pub async fn serve(session: Session, host: &str, port: u16, opts: ServerOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port)).await?;
    eprintln!("flashmoe serving `{}` on http://{}", opts.model_id, listener.local_addr()?);
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!("stopping: finishing open requests");
    };
    serve_on(listener, session, opts, stop).await
}

/// Serves on a bound listener until `stop` completes: at most `max_connections` connections,
/// each closed when it does not deliver a request header within `header_timeout` (slow or
/// idle clients cannot hold the server's sockets). On `stop` it accepts no more connections,
/// answers queued requests with 503, ends the running generation (a stream with an error
/// event and `[DONE]`), and returns once the open connections are done (at most 30 s).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    session: Session,
    opts: ServerOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let conns = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(opts.header_timeout);
    let header_timeout = opts.header_timeout;
    let max_conns = opts.max_connections.max(1);
    let (app, state) = build(session, opts);
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let (stream, _) = match accepted {
            Ok(c) => c,
            // out of descriptors and the like: wait, then go on accepting
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            drop(stream); // over the cap
            continue;
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let (b, timeout) = (builder.clone(), header_timeout);
        tokio::spawn(async move {
            let _permit = permit;
            // the protocol detection waits for a first byte without hyper's header timeout
            // (which covers later requests on the connection): a client that sends nothing
            // at all is closed here
            let mut first = [0u8; 1];
            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let _ = b.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        });
    }
    drop(listener);
    state.stopping.store(true, Relaxed);
    state.engine.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conns.acquire_many(max_conns as u32)).await;
    Ok(())
}

fn model_object(app: &App) -> Value {
    json!({"id": app.opts.model_id, "object": "model", "created": 0, "owned_by": "flashmoe"})
}

async fn models(State(app): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&app)]}))
}

async fn model(State(app): State<Shared>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if id != app.opts.model_id {
        return error(
            StatusCode::NOT_FOUND,
            format!("The model `{id}` does not exist (this server serves `{}`)", app.opts.model_id),
            "invalid_request_error",
            Some("model_not_found"),
            None,
        );
    }
    Json(model_object(&app)).into_response()
}

async fn metrics(State(app): State<Shared>) -> Response {
    let m = &app.metrics;
    let store = app.store.as_ref().map(|s| s.stats());
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    metric("flashmoe_requests_total", "counter", "Requests received.", m.requests.load(Relaxed) as f64);
    metric(
        "flashmoe_request_errors_total",
        "counter",
        "Requests answered with an error.",
        m.errors.load(Relaxed) as f64,
    );
    metric(
        "flashmoe_prompt_tokens_total",
        "counter",
        "Prompt tokens of all requests.",
        m.prompt_tokens.load(Relaxed) as f64,
    );
    metric(
        "flashmoe_prompt_tokens_reused_total",
        "counter",
        "Prompt tokens served from the cached prefix.",
        m.reused_tokens.load(Relaxed) as f64,
    );
    metric(
        "flashmoe_completion_tokens_total",
        "counter",
        "Generated tokens.",
        m.completion_tokens.load(Relaxed) as f64,
    );
    let secs = |ns: &AtomicU64| ns.load(Relaxed) as f64 / 1e9;
    let prefilled = (m.prompt_tokens.load(Relaxed) - m.reused_tokens.load(Relaxed)) as f64;
    metric(
        "flashmoe_prefill_tokens_per_second",
        "gauge",
        "Prefill speed over all requests.",
        prefilled / secs(&m.prefill_ns).max(1e-9),
    );
    metric(
        "flashmoe_decode_tokens_per_second",
        "gauge",
        "Decode speed of the last request.",
        m.last_decode_tok_s_milli.load(Relaxed) as f64 / 1000.0,
    );
    metric("flashmoe_decode_seconds_total", "counter", "Time spent decoding.", secs(&m.decode_ns));
    metric("flashmoe_queue_depth", "gauge", "Requests waiting for the engine.", app.waiting.load(Relaxed) as f64);
    metric(
        "flashmoe_busy",
        "gauge",
        "1 while a generation runs.",
        if app.engine.available_permits() < app.opts.max_batch { 1.0 } else { 0.0 },
    );
    metric(
        "flashmoe_generating",
        "gauge",
        "Requests generating now (prefilling or in the decode batch).",
        (app.opts.max_batch - app.engine.available_permits()) as f64,
    );
    metric(
        "flashmoe_decode_steps_total",
        "counter",
        "Decode steps run (each one forward pass over every sequence in the batch).",
        app.batch.steps.load(Relaxed) as f64,
    );
    metric(
        "flashmoe_decode_step_sequences_total",
        "counter",
        "Sequences in all decode steps (divided by the steps: the mean batch).",
        app.batch.rows.load(Relaxed) as f64,
    );
    if let Some(s) = store {
        metric(
            "flashmoe_expert_bytes_read_total",
            "counter",
            "Expert bytes read from the expert files.",
            s.bytes_read as f64,
        );
        metric("flashmoe_expert_reads_total", "counter", "Expert reads issued.", s.reads as f64);
        metric("flashmoe_expert_cache_hit_rate", "gauge", "Expert fetches served from memory.", s.hit_rate());
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Parsed generation settings shared by both completion endpoints.
#[derive(Clone)]
struct GenParams {
    sampling: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Choices to make of the one prompt.
    n: usize,
    /// `/v1/completions`: the prompt comes back before each choice's text.
    echo: bool,
}

/// The most choices one request may ask for (each is a whole generation).
const MAX_N: usize = 16;

fn parse_params(app: &App, b: &Value) -> Result<GenParams, Response> {
    if let Some(m) = b.get("model").and_then(Value::as_str)
        && m != app.opts.model_id
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist (this server serves `{}`)", app.opts.model_id),
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
        ));
    }
    let num = |k: &str| -> Result<Option<f64>, Response> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad_request(format!("`{k}` must be a number"), Some(k))),
        }
    };
    let n = match num("n")? {
        None => 1,
        Some(n) if n.fract() == 0.0 && (1.0..=MAX_N as f64).contains(&n) => n as usize,
        Some(_) => return Err(bad_request(format!("`n` must be an integer from 1 to {MAX_N}"), Some("n"))),
    };
    // fields this server does not implement are refused, not ignored
    let on = |k: &str| {
        b.get(k).is_some_and(|v| {
            !(v.is_null() || v == &json!(false) || v == &json!(0) || (k == "best_of" && v == &json!(1)))
        })
    };
    for (k, what) in [
        ("best_of", "`best_of` is not supported"),
        ("suffix", "`suffix` (insertion) is not supported"),
        ("audio", "audio output is not supported"),
        ("prediction", "predicted outputs are not supported"),
        ("web_search_options", "web search is not supported"),
        ("functions", "the legacy `functions` are not supported; use `tools`"),
        ("function_call", "the legacy `function_call` is not supported; use `tool_choice`"),
    ] {
        if on(k) {
            return Err(bad_request(what, Some(k)));
        }
    }
    if let Some(m) = b.get("modalities").and_then(Value::as_array)
        && m.iter().any(|x| x != "text")
    {
        return Err(bad_request("only text output is supported", Some("modalities")));
    }
    let penalty = |k: &str| -> Result<f32, Response> {
        let v = num(k)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(bad_request(format!("`{k}` must be between -2 and 2"), Some(k)));
        }
        Ok(v as f32)
    };
    let (presence_penalty, frequency_penalty) = (penalty("presence_penalty")?, penalty("frequency_penalty")?);
    let temperature = num("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request("`temperature` must be between 0 and 2", Some("temperature")));
    }
    let top_p = num("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request("`top_p` must be in (0, 1]", Some("top_p")));
    }
    let min_p = num("min_p")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(bad_request("`min_p` must be in [0, 1]", Some("min_p")));
    }
    let top_k = num("top_k")?.unwrap_or(0.0);
    if top_k < 0.0 {
        return Err(bad_request("`top_k` must be >= 0", Some("top_k")));
    }
    let rep = num("repetition_penalty")?.unwrap_or(1.0);
    if rep <= 0.0 {
        return Err(bad_request("`repetition_penalty` must be > 0", Some("repetition_penalty")));
    }
    // 0 new tokens is asking for the echoed prompt's log-probabilities alone
    let echo = b.get("echo") == Some(&json!(true));
    let max_tokens = match num("max_completion_tokens")?.or(num("max_tokens")?) {
        Some(v) if v == 0.0 && echo => 0,
        Some(v) if v < 1.0 => {
            return Err(bad_request("`max_tokens` must be at least 1 (0 only with `echo`)", Some("max_tokens")));
        }
        Some(v) => v as usize,
        None => app.opts.default_max_tokens,
    };
    let stop = match b.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
            a.iter().filter_map(|s| s.as_str().map(String::from)).collect()
        }
        _ => return Err(bad_request("`stop` must be a string or a list of at most 4 strings", Some("stop"))),
    };
    // exact: a seed above 2^53 read as a float would lose its low bits (and a choice's seed,
    // `generate::choice_seed`, is any u64)
    let seed = match b.get("seed").and_then(|v| v.as_u64().or_else(|| v.as_i64().map(|i| i as u64))) {
        Some(s) => s,
        None => num("seed")?.map_or_else(
            || SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            |s| s as u64,
        ),
    };
    let stream = match b.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(x)) => *x,
        _ => return Err(bad_request("`stream` must be a boolean", Some("stream"))),
    };
    let include_usage = b.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let mut logit_bias = vec![];
    match b.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let (Ok(t), Some(x)) = (k.parse::<u32>(), v.as_f64()) else {
                    return Err(bad_request("`logit_bias` maps token ids to numbers", Some("logit_bias")));
                };
                if !(-100.0..=100.0).contains(&x) {
                    return Err(bad_request("`logit_bias` values must be in [-100, 100]", Some("logit_bias")));
                }
                logit_bias.push((t, x as f32));
            }
        }
        _ => return Err(bad_request("`logit_bias` must be an object", Some("logit_bias"))),
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: top_k as usize,
        top_p: top_p as f32,
        min_p: min_p as f32,
        repetition_penalty: rep as f32,
        seed,
        logit_bias,
        presence_penalty,
        frequency_penalty,
        constraint: None,
        logprobs: None,
    };
    // values that pass the checks above as f64 but not as the f32 the sampler uses (top_p
    // 1e-46 rounds to 0, repetition_penalty 1e39 to infinity)
    sampling.validate().map_err(|e| bad_request(format!("{e:#} (as a 32-bit float)"), None))?;
    Ok(GenParams { sampling, max_tokens, stop, stream, include_usage, n, echo: false })
}

/// Chat completions' `logprobs` (a boolean) and `top_logprobs` (0 to 20): the number of
/// alternatives to report per token, or none.
fn chat_logprobs_param(b: &Value) -> Result<Option<usize>, Response> {
    let on = match b.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(x)) => *x,
        Some(_) => return Err(bad_request("`logprobs` must be a boolean", Some("logprobs"))),
    };
    let top = match b.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(k) if k <= 20 => k as usize,
            _ => return Err(bad_request("`top_logprobs` must be an integer from 0 to 20", Some("top_logprobs"))),
        },
    };
    if top > 0 && !on {
        return Err(bad_request("`top_logprobs` needs `logprobs` set to true", Some("top_logprobs")));
    }
    if b.get("echo").is_some_and(|e| e != &json!(false) && !e.is_null()) {
        return Err(bad_request("`echo` is a /v1/completions field", Some("echo")));
    }
    Ok(on.then_some(top))
}

/// `/v1/completions`' `logprobs` (the alternatives to report per token, 0 to 5) and `echo`.
fn text_logprobs_param(b: &Value) -> Result<(Option<usize>, bool), Response> {
    let logprobs = match b.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= 5 => Some(k as usize),
            _ => return Err(bad_request("`logprobs` must be an integer from 0 to 5", Some("logprobs"))),
        },
    };
    if b.get("top_logprobs").is_some_and(|v| !v.is_null()) {
        return Err(bad_request(
            "`top_logprobs` is a chat completions field; here `logprobs` is the count",
            Some("top_logprobs"),
        ));
    }
    let echo = match b.get("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(x)) => *x,
        Some(_) => return Err(bad_request("`echo` must be a boolean", Some("echo"))),
    };
    Ok((logprobs, echo))
}

/// Message content as text: a string, or the text parts of a list of parts.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some(String::new()),
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            Some(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(""))
        }
        _ => None,
    }
}

/// Validates and normalises OpenAI messages for the chat template.
fn normalise_messages(msgs: &Value) -> Result<Value, Response> {
    let arr = msgs
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad_request("`messages` must be a non-empty list", Some("messages")))?;
    let mut out = vec![];
    for (i, m) in arr.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_request(format!("messages[{i}].role is missing"), Some("messages")))?;
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(bad_request(format!("messages[{i}].role `{role}` is not supported"), Some("messages")));
        }
        let content = content_text(m.get("content").unwrap_or(&Value::Null)).ok_or_else(|| {
            bad_request(format!("messages[{i}].content must be a string or a list of parts"), Some("messages"))
        })?;
        let mut n = json!({"role": if role == "developer" { "system" } else { role }, "content": content});
        if let Some(tc) = m.get("tool_calls").filter(|v| !v.is_null()) {
            n["tool_calls"] = tc.clone();
        }
        if let Some(id) = m.get("tool_call_id") {
            n["tool_call_id"] = id.clone();
        }
        out.push(n);
    }
    Ok(Value::Array(out))
}

/// Sets a flag when dropped: the handler future is dropped when its client disconnects.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// A place in the queue, given back when dropped: also when the client disconnects while it
/// waits (the handler's future is dropped at the `.await`).
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Waits for the engine in the bounded queue.
async fn acquire(app: &Shared) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    if let Ok(p) = app.engine.clone().try_acquire_owned() {
        return Ok(p);
    }
    let queued = app.waiting.fetch_add(1, Relaxed);
    let _slot = QueueSlot(&app.waiting);
    if queued >= app.opts.max_queue {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy: too many queued requests",
            "server_error",
            Some("queue_full"),
            None,
        ));
    }
    app.engine
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| error(StatusCode::SERVICE_UNAVAILABLE, "the engine is shutting down", "server_error", None, None))
}

/// The metrics of a request's choices; its prompt counts once (the choices after the first
/// resume from the snapshot its prefill left).
fn record(app: &App, choices: &[Output]) {
    let m = &app.metrics;
    if let Some(o) = choices.first() {
        m.prompt_tokens.fetch_add(o.prompt_tokens as u64, Relaxed);
        m.reused_tokens.fetch_add(o.reused_tokens as u64, Relaxed);
    }
    let (mut made, mut secs) = (0, 0.0);
    for o in choices {
        m.completion_tokens.fetch_add(o.tokens.len() as u64, Relaxed);
        m.prefill_ns.fetch_add((o.stats.prompt_secs * 1e9) as u64, Relaxed);
        m.decode_ns.fetch_add((o.stats.generate_secs * 1e9) as u64, Relaxed);
        (made, secs) = (made + o.tokens.len(), secs + o.stats.generate_secs);
    }
    if !choices.is_empty() {
        m.last_decode_tok_s_milli.store((made as f64 / secs.max(1e-9) * 1000.0) as u64, Relaxed);
    }
}

fn usage(g: &Generation) -> Value {
    let (prompt, completion) = (g.prompt_tokens(), g.completion_tokens());
    let cached = g.choices.first().map_or(0, |o| o.reused_tokens);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// A generation error, counted (for callers that answer with it directly).
fn gen_error(app: &App, e: anyhow::Error) -> Response {
    app.metrics.errors.fetch_add(1, Relaxed);
    error_response(e)
}

/// The response for a generation error: 400 for a prompt over the context, else 500.
fn error_response(e: anyhow::Error) -> Response {
    if let Some(c) = e.downcast_ref::<ContextExceeded>() {
        return error(
            StatusCode::BAD_REQUEST,
            c.to_string(),
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some("messages"),
        );
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), "server_error", None, None)
}

/// The response, counting a request refused before generation as an error.
fn counted(app: &App, resp: Result<Response, Response>) -> Response {
    resp.unwrap_or_else(|e| {
        app.metrics.errors.fetch_add(1, Relaxed);
        e
    })
}

enum Kind {
    /// The declared tools' names, when tool calls are parsed from the answer; whether the
    /// answer begins inside the reasoning, when reasoning is split out (`reasoning_content`).
    Chat { tools: Option<Vec<String>>, thinking: Option<bool> },
    /// The prompt's text, when it is echoed.
    Text { echo: Option<String> },
}

async fn chat_completions(State(app): State<Shared>, body: Result<Json<Value>, JsonRejection>) -> Response {
    app.metrics.requests.fetch_add(1, Relaxed);
    let resp = async {
        let Json(b) = body.map_err(body_error)?;
        let mut p = parse_params(&app, &b)?;
        p.sampling.logprobs = chat_logprobs_param(&b)?;
        let messages = normalise_messages(b.get("messages").unwrap_or(&Value::Null))?;
        let tools = b.get("tools").filter(|t| !t.is_null()).cloned();
        if let Some(t) = &tools
            && !t.is_array()
        {
            return Err(bad_request("`tools` must be a list", Some("tools")));
        }
        let choice = tool_choice(b.get("tool_choice"), tools.as_ref())?;
        let tools = if matches!(choice, ToolChoice::None) { None } else { tools };
        let mut extra = serde_json::Map::new();
        match b.get("reasoning_effort").and_then(Value::as_str) {
            None => {}
            Some(e) => match effort_thinking(e) {
                Some(on) => _ = extra.insert("enable_thinking".into(), json!(on)),
                None => {
                    return Err(bad_request(
                        format!("`reasoning_effort` `{e}` is not one of none, minimal, low, medium, high"),
                        Some("reasoning_effort"),
                    ));
                }
            },
        }
        // explicit template arguments win
        if let Some(kw) = b.get("chat_template_kwargs").and_then(Value::as_object) {
            extra.extend(kw.clone());
        }
        let names = tool_names(tools.as_ref());
        let schema = match b.get("response_format") {
            None | Some(Value::Null) => None,
            Some(f) => format_schema(f)?.map(|s| (s, "response_format")),
        };
        let forced = matches!(choice, ToolChoice::Required | ToolChoice::Named(_));
        let Prepared { prompt, turn, constraint, thinking } =
            prepare(&app, messages, tools, extra, &choice, schema).await?;
        // text constrained to a response format is the answer itself: no tool calls in it
        let tools = if constraint.is_none() || forced { Some(names) } else { None }.filter(|n| !n.is_empty());
        // nor reasoning: a grammar makes every token part of the format
        let thinking = if constraint.is_some() && !forced { None } else { Some(thinking) };
        p.sampling.constraint = constraint;
        Ok(run(app.clone(), prompt, turn, p, Kind::Chat { tools, thinking }).await)
    }
    .await;
    counted(&app, resp)
}

async fn completions(State(app): State<Shared>, body: Result<Json<Value>, JsonRejection>) -> Response {
    app.metrics.requests.fetch_add(1, Relaxed);
    let resp = async {
        let Json(b) = body.map_err(body_error)?;
        let mut p = parse_params(&app, &b)?;
        (p.sampling.logprobs, p.echo) = text_logprobs_param(&b)?;
        let text = match b.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
            _ => return Err(bad_request("`prompt` must be a string", Some("prompt"))),
        };
        if text.is_empty() {
            return Err(bad_request("`prompt` is empty", Some("prompt")));
        }
        let (a, t) = (app.clone(), text.clone());
        let prompt = blocking(move || tokenize(&a, &t, "prompt")).await?;
        let echo = p.echo.then_some(text);
        Ok(run(app.clone(), prompt, [None; 2], p, Kind::Text { echo }).await)
    }
    .await;
    counted(&app, resp)
}

/// OpenAI `tool_choice`.
#[derive(Clone)]
enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

fn tool_choice(v: Option<&Value>, tools: Option<&Value>) -> Result<ToolChoice, Response> {
    let bad = |m: String| bad_request(m, Some("tool_choice"));
    let declared = |n: &str| {
        tools
            .and_then(Value::as_array)
            .is_some_and(|t| t.iter().any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(n)))
    };
    let c = match v {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => return Ok(ToolChoice::None),
            "required" => ToolChoice::Required,
            s => {
                return Err(bad(format!("`tool_choice` `{s}` is not supported (auto, none, required, or a function)")));
            }
        },
        Some(o) => match o.pointer("/function/name").and_then(Value::as_str) {
            Some(n) if declared(n) => ToolChoice::Named(n.to_string()),
            Some(n) => return Err(bad(format!("`tool_choice` names `{n}`, which is not among the `tools`"))),
            None => {
                return Err(bad(
                    "`tool_choice` must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                ));
            }
        },
    };
    if tools.and_then(Value::as_array).is_none_or(|t| t.is_empty()) && !matches!(c, ToolChoice::Auto) {
        return Err(bad("a required tool call needs `tools`".into()));
    }
    Ok(c)
}

/// The engine's grammars (built on first use).
fn grammars(app: &App) -> Result<&crate::grammar::Grammars, Response> {
    app.grammars
        .get_or_init(|| crate::grammar::Grammars::new(&app.tok, app.vocab, &app.stop_ids).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("constrained decoding is unavailable: {e}"),
                "server_error",
                None,
                None,
            )
        })
}

/// A grammar that makes the answer one call of a declared tool (of the named one), in the
/// family's own call syntax, arguments matching the tool's parameter schema; `thinking`: the
/// prompt left a reasoning block open, which the answer closes first.
fn forced_call(
    app: &App,
    tools: Option<&Value>,
    choice: &ToolChoice,
    thinking: bool,
) -> Result<crate::grammar::Constraint, Response> {
    let only = match choice {
        ToolChoice::Named(n) => Some(n.as_str()),
        _ => None,
    };
    let declared: Vec<(String, Value)> = tools
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let name = t.pointer("/function/name")?.as_str()?;
            if only.is_some_and(|o| o != name) {
                return None;
            }
            let params = t
                .pointer("/function/parameters")
                .filter(|p| p.is_object())
                .cloned()
                .unwrap_or(json!({"type": "object"}));
            Some((name.to_string(), params))
        })
        .collect();
    let tag = |t: &str| crate::grammar::tag(&app.tok, t);
    let lark = crate::grammar::tool_call_lark(app.tools, &declared, thinking, &tag);
    grammars(app)?.lark(&lark).map_err(|e| bad_request(format!("{e:#}"), Some("tools")))
}

/// The JSON schema of a `response_format`: none for `text`, any JSON object for `json_object`,
/// the schema of `json_schema`.
fn format_schema(f: &Value) -> Result<Option<Value>, Response> {
    let bad = |m: String| bad_request(m, Some("response_format"));
    let kind = f.get("type").and_then(Value::as_str).ok_or_else(|| bad("`response_format.type` is missing".into()))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "object"}))),
        "json_schema" => f
            .pointer("/json_schema/schema")
            .filter(|s| s.is_object())
            .cloned()
            .map(Some)
            .ok_or_else(|| bad("`response_format.json_schema.schema` must be a JSON schema object".into())),
        k => Err(bad(format!("`response_format.type` `{k}` is not supported (text, json_object, json_schema)"))),
    }
}

/// Whether a reasoning effort turns the template's thinking on (none and minimal: off); None
/// for an unknown effort.
fn effort_thinking(effort: &str) -> Option<bool> {
    match effort {
        "none" | "minimal" => Some(false),
        "low" | "medium" | "high" => Some(true),
        _ => None,
    }
}

/// The names of the functions among chat-shaped `tools`.
fn tool_names(tools: Option<&Value>) -> Vec<String> {
    tools
        .iter()
        .flat_map(|t| t.as_array().into_iter().flatten())
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str).map(String::from))
        .collect()
}

/// A string, or the concatenated text of parts whose `type` is one of `kinds` (null: empty;
/// a part of any other type: None).
fn parts_text(v: &Value, kinds: &[&str]) -> Option<String> {
    match v {
        Value::Null => Some(String::new()),
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .map(|b| {
                let kind = b.get("type").and_then(Value::as_str)?;
                kinds.contains(&kind).then(|| b.get("text")?.as_str()).flatten()
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat()),
        _ => None,
    }
}

/// A chat request made ready to run.
struct Prepared {
    prompt: Vec<u32>,
    /// Where the prompt's last turn begins (see [`chat_prompt`]).
    turn: Marks,
    /// The grammar the answer is held to.
    constraint: Option<crate::grammar::Constraint>,
    /// The template leaves a `<think>` block open: the answer begins inside the reasoning.
    thinking: bool,
}

/// Renders and tokenizes a chat request off the async threads and builds the grammar of its
/// answer: the JSON `schema` of a response format (its errors name `param`), or one call of a
/// declared tool when `choice` requires one (the two exclude each other). Errors are not
/// counted (see [`counted`]).
async fn prepare(
    app: &Shared,
    messages: Value,
    tools: Option<Value>,
    extra: serde_json::Map<String, Value>,
    choice: &ToolChoice,
    schema: Option<(Value, &'static str)>,
) -> Result<Prepared, Response> {
    let forced = matches!(choice, ToolChoice::Required | ToolChoice::Named(_));
    if let (true, Some((_, param))) = (forced, &schema) {
        return Err(bad_request(format!("`{param}` and a required tool call exclude each other"), Some("tool_choice")));
    }
    let (a, choice) = (app.clone(), choice.clone());
    let p = blocking(move || {
        let ChatPrompt { prompt, turn, thinking } = chat_prompt(&a, &messages, tools.as_ref(), &extra)?;
        let constraint = match schema {
            Some((s, param)) => {
                Some(grammars(&a)?.json_schema(&s).map_err(|e| bad_request(format!("{e:#}"), Some(param)))?)
            }
            None if forced => Some(forced_call(&a, tools.as_ref(), &choice, thinking)?),
            None => None,
        };
        Ok(Prepared { prompt, turn, constraint, thinking })
    })
    .await?;
    if p.prompt.len() >= app.context {
        return Err(error_response(ContextExceeded { prompt_tokens: p.prompt.len(), context: app.context }.into()));
    }
    Ok(p)
}

/// Server-sent events from a channel; the channel closes (and so tells the generation to
/// stop) when the client leaves.
fn sse_response(rx: mpsc::Receiver<Event>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = tokio_stream::StreamExt::map(stream, Ok::<Event, Infallible>);
    Sse::new(stream).into_response()
}

/// Runs CPU-heavy request preparation (templates, tokenization) off the async threads, so a
/// few huge prompts cannot stall `/health` and every other connection.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Response> + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("request task failed: {e}"), "server_error", None, None))
    })
}

/// Tokens of `text`; a text too long for the context by its length alone is refused before
/// tokenizing it.
fn tokenize(app: &App, text: &str, param: &str) -> Result<Vec<u32>, Response> {
    let at_least = text.len() / app.max_token_bytes;
    if at_least >= app.context {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "the prompt ({} bytes, at least {at_least} tokens) exceeds the model's context of {} tokens",
                text.len(),
                app.context
            ),
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some(param),
        ));
    }
    app.tok.encode(text).map_err(|e| bad_request(format!("{e:#}"), Some(param)))
}

/// The chat prompt of a request, and where its last turn begins (for the session's snapshot:
/// see `session::chat_prompt`).
fn chat_prompt(
    app: &App,
    messages: &Value,
    tools: Option<&Value>,
    extra: &serde_json::Map<String, Value>,
) -> Result<ChatPrompt, Response> {
    let render = |add_generation_prompt: bool| {
        app.tok
            .apply_chat_template(messages, tools, add_generation_prompt, extra)
            .map_err(|e| bad_request(format!("{e:#}"), Some("messages")))
    };
    let text = render(true)?;
    let prompt = tokenize(app, &text, "messages")?;
    let turns = render(false).ok().and_then(|t| app.tok.encode(&t).ok());
    let last = turns.filter(|t| !t.is_empty() && t.len() < prompt.len() && prompt.starts_with(t)).map(|t| t.len());
    // where the system prompt and tools end: what other conversations share (prompt cache)
    let system =
        app.prompt_cache.then(|| crate::session::system_prefix(&app.tok, &prompt, messages, tools, extra)).flatten();
    Ok(ChatPrompt { prompt, turn: [last, system], thinking: answer::opens_thinking(&text) })
}

/// A rendered conversation: its tokens, where its last turn begins (prefix reuse), and
/// whether it leaves a `<think>` block open for the answer.
struct ChatPrompt {
    prompt: Vec<u32>,
    turn: Marks,
    thinking: bool,
}

/// A generation request: checks the context, waits for a generation slot, and answers whole
/// or streamed.
async fn run(app: Shared, prompt: Vec<u32>, turn: Marks, p: GenParams, kind: Kind) -> Response {
    let ctx = app.context;
    if prompt.len() >= ctx {
        return gen_error(&app, ContextExceeded { prompt_tokens: prompt.len(), context: ctx }.into());
    }
    let permit = match acquire(&app).await {
        Ok(p) => p,
        Err(r) => {
            app.metrics.errors.fetch_add(1, Relaxed);
            return r;
        }
    };
    let reply = Reply {
        id: new_id(if matches!(kind, Kind::Text { .. }) { "cmpl" } else { "chatcmpl" }),
        created: now(),
        model: app.opts.model_id.clone(),
        kind,
        turn,
    };
    if p.stream {
        respond_stream(app, prompt, p, reply, permit)
    } else {
        respond_once(app, prompt, p, reply, permit).await
    }
}

/// What every response of one request carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// Where the prompt's last turn begins (a snapshot there serves the next turn).
    turn: Marks,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (&self.kind, chunk) {
            (Kind::Text { .. }, _) => "text_completion",
            (Kind::Chat { .. }, false) => "chat.completion",
            (Kind::Chat { .. }, true) => "chat.completion.chunk",
        }
    }
}

/// The whole answer as one JSON body.
async fn respond_once(
    app: Shared,
    prompt: Vec<u32>,
    p: GenParams,
    r: Reply,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let g = match generate_all(&app, prompt.clone(), r.turn, &p, permit).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let logprobs = p.sampling.logprobs.is_some();
    let choices: Vec<Value> = g
        .choices
        .iter()
        .enumerate()
        .map(|(i, o)| match &r.kind {
            Kind::Text { echo } => {
                let echo = echo.as_deref().map(|text| Echo { text, tokens: &prompt, logprobs: g.prompt.as_deref() });
                text_choice(&app, i, o, echo.as_ref(), logprobs)
            }
            Kind::Chat { tools, thinking } => chat_choice(&app, i, o, tools.as_deref(), *thinking, logprobs),
        })
        .collect();
    let body = json!({"id": r.id, "object": r.object(false), "created": r.created, "model": r.model,
        "choices": choices, "usage": usage(&g)});
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(Tokens(g.prompt_tokens(), g.completion_tokens()));
    resp
}

fn finish_reason(f: Finish) -> &'static str {
    if f == Finish::Length { "length" } else { "stop" }
}

/// The echoed prompt of a `/v1/completions` request: its text, its tokens, and their
/// log-probabilities (of all but the first) when asked for.
struct Echo<'a> {
    text: &'a str,
    tokens: &'a [u32],
    logprobs: Option<&'a [TokenLogprob]>,
}

/// A `/v1/completions` choice, the echoed prompt first.
fn text_choice(app: &App, i: usize, o: &Output, echo: Option<&Echo>, logprobs: bool) -> Value {
    let prefix = echo.map_or("", |e| e.text);
    let lp = logprobs.then(|| {
        let mut t = TextLogprobs::default();
        if let Some(e) = echo {
            t.prompt(app, e);
        }
        let base = prefix.chars().count();
        let mut chars = Chars::default();
        for s in &o.logprobs {
            t.push(app, s.logprob.token, Some(&s.logprob), base + chars.at(&o.text, s.offset));
        }
        t.json()
    });
    json!({"index": i, "text": format!("{prefix}{}", o.text), "finish_reason": finish_reason(o.finish), "logprobs": lp})
}

/// A chat choice: the message (tool calls parsed out of it when `tools` are declared).
/// The reasoning before `</think>` goes to `reasoning_content` (as vLLM's and llama.cpp's
/// servers report it), the rest to `content`.
fn chat_choice(
    app: &App,
    i: usize,
    o: &Output,
    tools: Option<&[String]>,
    thinking: Option<bool>,
    logprobs: bool,
) -> Value {
    let (reasoning, answer) = match thinking {
        Some(t) => answer::split_answer(&o.text, t, app.tools),
        None => (String::new(), o.text.clone()),
    };
    let (content, calls) = match tools {
        Some(names) => toolcall::parse_declared(&answer, names, app.tools),
        None => (answer, vec![]),
    };
    let mut msg = json!({"role": "assistant", "content": content});
    if !reasoning.is_empty() {
        msg["reasoning_content"] = json!(reasoning);
    }
    let mut reason = finish_reason(o.finish);
    if !calls.is_empty() {
        msg["content"] = if content.is_empty() { Value::Null } else { json!(content) };
        msg["tool_calls"] = calls
            .iter()
            .map(|c| json!({"id": new_id("call"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        reason = "tool_calls";
    }
    let lp = logprobs.then(|| chat_logprobs(app, &o.logprobs));
    json!({"index": i, "message": msg, "finish_reason": reason, "logprobs": lp})
}

/// A log-probability as reported: JSON has no −∞ (a token a grammar forbids), so OpenAI's
/// floor of −9999 stands for it.
fn reported(l: f32) -> f32 {
    if l.is_finite() { l } else { -9999.0 }
}

/// A token as chat completions report it: its text, log-probability and bytes.
fn token_entry(app: &App, t: u32, logprob: f32) -> Value {
    let bytes = app.tok.token_bytes(t);
    json!({"token": crate::tokenizer::bytes_text(&bytes), "logprob": reported(logprob), "bytes": bytes})
}

/// Chat completions' `logprobs` of some generated tokens: every token generated, the text of
/// tool calls included (so a streamed answer's chunks carry them all).
fn chat_logprobs(app: &App, scored: &[Scored]) -> Value {
    let content: Vec<Value> = scored
        .iter()
        .map(|s| {
            let mut e = token_entry(app, s.logprob.token, s.logprob.logprob);
            e["top_logprobs"] = s.logprob.top.iter().map(|&(t, l)| token_entry(app, t, l)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// `/v1/completions`' `logprobs`: parallel lists, `text_offset` in characters of the choice's
/// text (echoed prompt included).
#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// `token` at `offset`; its `top_logprobs` holds the most likely tokens and the token
    /// itself (OpenAI: "up to logprobs + 1 elements"). None: the first prompt token (nothing
    /// predicts it).
    fn push(&mut self, app: &App, token: u32, lp: Option<&TokenLogprob>, offset: usize) {
        let text = app.tok.token_text(token);
        self.top_logprobs.push(lp.map(|lp| {
            let mut top: serde_json::Map<String, Value> =
                lp.top.iter().map(|&(t, l)| (app.tok.token_text(t), json!(reported(l)))).collect();
            top.entry(text.clone()).or_insert(json!(reported(lp.logprob)));
            top
        }));
        self.token_logprobs.push(lp.map(|lp| reported(lp.logprob)));
        self.tokens.push(text);
        self.text_offset.push(offset);
    }

    /// The echoed prompt's tokens, at the characters where their bytes begin.
    fn prompt(&mut self, app: &App, e: &Echo) {
        let (mut chars, mut bytes) = (Chars::default(), 0);
        for (i, &t) in e.tokens.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|i| e.logprobs.and_then(|l| l.get(i)));
            self.push(app, t, lp, chars.at(e.text, bytes));
            bytes += app.tok.token_bytes(t).len();
        }
    }

    fn json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset})
    }
}

/// Character offsets of non-decreasing byte offsets into a (growing) text, counted as they
/// come; a byte offset inside a character counts from that character's start.
#[derive(Default)]
struct Chars {
    byte: usize,
    char: usize,
}

impl Chars {
    fn at(&mut self, text: &str, byte: usize) -> usize {
        let mut b = byte.min(text.len());
        while !text.is_char_boundary(b) {
            b -= 1;
        }
        if b < self.byte {
            *self = Chars::default();
        }
        self.char += text[self.byte..b].chars().count();
        self.byte = b;
        self.char
    }
}

/// What the engine reports while it answers a request, choice after choice.
enum Step<'a> {
    /// Choice i begins; the prompt's log-probabilities come along when echoed ones were asked
    /// for.
    Begin(usize, Option<&'a [TokenLogprob]>),
    /// A new piece of choice i's text, with the log-probabilities of the tokens it begins.
    Text(usize, &'a str, &'a [Scored]),
    /// Choice i is done.
    End(usize, &'a Output),
}

/// The answer to one request: the prompt's log-probabilities (echo) and an output per choice
/// (fewer when cancelled).
struct Generation {
    prompt: Option<Vec<TokenLogprob>>,
    choices: Vec<Output>,
}

impl Generation {
    fn cancelled(&self, n: usize) -> bool {
        self.choices.len() < n || self.choices.iter().any(|o| o.finish == Finish::Cancelled)
    }

    /// The prompt counts once: it is prefilled once for all the choices.
    fn prompt_tokens(&self) -> usize {
        self.choices.first().map_or(0, |o| o.prompt_tokens)
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|o| o.tokens.len()).sum()
    }
}

/// The sampling of choice `i`: its own seed, and its own copy of the grammar (a grammar's
/// state follows the tokens of one answer).
fn choice_params(p: &SamplingParams, i: usize) -> SamplingParams {
    let mut s = p.clone();
    s.seed = crate::generate::choice_seed(p.seed, i);
    s.constraint = p.constraint.as_ref().map(crate::grammar::Constraint::fork);
    s
}

/// What a choice's decoding thread reports to the thread that answers the request.
enum ChoiceEvent {
    /// A new piece of text with the log-probabilities of the tokens it begins.
    Text(String, Vec<Scored>),
    /// The choice is done: its output, or None when it failed (its error comes with the join).
    Done(Option<Output>),
}

/// Passes the turn to the next choice when dropped (when choices decode one at a time; a
/// choice that fails still passes it).
struct NextTurn<'a>(Option<&'a (Mutex<usize>, std::sync::Condvar)>);

impl Drop for NextTurn<'_> {
    fn drop(&mut self) {
        if let Some((turn, cv)) = self.0 {
            *turn.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            cv.notify_all();
        }
    }
}

/// The request's generations on the engine, driven from the calling (blocking) thread:
/// resumes at the snapshot of `turn`, scores the prompt when echoed log-probabilities are
/// asked for, prefills the prompt once for all `n` choices (the first prefills it, the others
/// resume from the snapshot it left), then decodes the choices together, each on a thread of
/// its own in the batch's shared steps ([`crate::batch`]), so a step is one forward pass over
/// the next token of every choice (and of the other requests decoding). `on_step` sees the
/// choices one after another, as if they had been made in turn (a later choice's pieces wait
/// until the ones before it end); each choice's tokens are what it would draw alone. With
/// `--max-batch 1` the choices decode one after another. Stops
/// when `on_step` returns false or the server is stopping (it gets every token, with "" when
/// nothing new can be shown).
fn on_engine_n(
    app: &App,
    prompt: &[u32],
    turn: Marks,
    p: &GenParams,
    mut on_step: impl FnMut(Step) -> bool,
) -> anyhow::Result<Generation> {
    let lock = || app.session.lock().unwrap_or_else(|e| e.into_inner());
    // the marks, the scoring and the prefills under one lock: another request's prefill would
    // take the marks and the snapshot the choices resume from
    let mut s = lock();
    for t in turn.into_iter().flatten() {
        s.snapshot_at(t);
    }
    let scored = match p.echo && p.sampling.logprobs.is_some() {
        true => Some(s.score_prompt(prompt, &p.sampling)?),
        false => None,
    };
    if !on_step(Step::Begin(0, scored.as_deref())) {
        return Ok(Generation { prompt: scored, choices: vec![] });
    }
    let sampling: Vec<SamplingParams> = (0..p.n).map(|i| choice_params(&p.sampling, i)).collect();
    let mut prefilled = Vec::with_capacity(p.n);
    for sp in &sampling {
        prefilled.push(s.prefill_alone(prompt, sp)?);
    }
    drop(s);
    let live = || !app.stopping.load(Relaxed);
    let stop = AtomicBool::new(false);
    // with --max-batch 1 (always on an accelerator) one sequence decodes at a time: the
    // choices take turns, in order
    let turns = (app.batch.max_batch() == 1).then(|| (Mutex::new(0usize), std::sync::Condvar::new()));
    let (tx, rx) = std::sync::mpsc::channel::<(usize, ChoiceEvent)>();
    // the last choice whose Begin the caller took
    let mut begun = 0;
    let results: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = prefilled
            .into_iter()
            .zip(&sampling)
            .enumerate()
            .map(|(i, (pre, sp))| {
                let (tx, stop, live, turns) = (tx.clone(), &stop, &live, &turns);
                let unscored = scored.is_some() && i == 0;
                scope.spawn(move || {
                    if let Some((turn, cv)) = turns {
                        let mut t = turn.lock().unwrap_or_else(|e| e.into_inner());
                        while *t != i {
                            t = cv.wait(t).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    let _next = NextTurn(turns.as_ref());
                    let member = app.batch.join();
                    let step = |st: &mut crate::model::State, t: u32, logits: &mut Vec<f32>| {
                        *logits = member.step(st, t)?;
                        Ok(())
                    };
                    let (mut res, state, held) = crate::session::decode_prefilled(
                        app.batch.model(),
                        &app.tok,
                        &app.stop_ids,
                        prompt,
                        pre,
                        p.max_tokens,
                        sp,
                        &p.stop,
                        step,
                        |piece, lps| {
                            live()
                                && !stop.load(Relaxed)
                                && tx.send((i, ChoiceEvent::Text(piece.to_string(), lps.to_vec()))).is_ok()
                        },
                    );
                    drop(member);
                    if let (Ok(o), true) = (&mut res, unscored) {
                        // scoring prefilled the whole prompt for this request: none of it came from the cache
                        o.reused_tokens = 0;
                    }
                    let _ = tx.send((i, ChoiceEvent::Done(res.as_ref().ok().cloned())));
                    (res, state, held)
                })
            })
            .collect();
        drop(tx);
        // hand the events on in choice order, holding back those of the choices after the current one
        let mut waiting: Vec<std::collections::VecDeque<ChoiceEvent>> = (0..p.n).map(|_| Default::default()).collect();
        let (mut current, mut open) = (0, true);
        for (i, ev) in rx {
            waiting[i].push_back(ev);
            while open && current < p.n {
                let Some(ev) = waiting[current].pop_front() else { break };
                open = match ev {
                    ChoiceEvent::Text(piece, lps) => on_step(Step::Text(current, &piece, &lps)),
                    ChoiceEvent::Done(o) => {
                        let ended = o.is_some_and(|o| o.finish != Finish::Cancelled && on_step(Step::End(current, &o)));
                        current += 1;
                        let next = current < p.n && ended && on_step(Step::Begin(current, scored.as_deref()));
                        begun += next as usize;
                        ended && (next || current == p.n)
                    }
                };
                if !open {
                    stop.store(true, Relaxed);
                }
            }
        }
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    let dropped = crate::model::State { pos: 0, layers: vec![], poisoned: true, device: None };
                    (Err(anyhow::anyhow!("a choice's decoding panicked")), dropped, vec![])
                })
            })
            .collect()
    });
    let mut choices: Vec<Output> = vec![];
    let mut first_error = None;
    let mut s = lock();
    for (i, (res, state, held)) in results.into_iter().enumerate() {
        s.give_back(state, &held);
        match res {
            Ok(o) if i <= begun && first_error.is_none() => choices.push(o),
            Err(e) if i <= begun && first_error.is_none() => first_error = Some(e),
            _ => {}
        }
    }
    drop(s);
    match first_error {
        Some(e) => Err(e),
        None => Ok(Generation { prompt: scored, choices }),
    }
}

/// One generation ([`on_engine_n`] with a single choice), text pieces to `on_piece`.
fn on_engine(
    app: &App,
    prompt: &[u32],
    turn: Marks,
    p: &GenParams,
    mut on_piece: impl FnMut(&str) -> bool,
) -> anyhow::Result<Output> {
    let p = GenParams { n: 1, ..p.clone() };
    let g = on_engine_n(app, prompt, turn, &p, |step| match step {
        Step::Text(_, piece, _) => on_piece(piece),
        _ => true,
    })?;
    g.choices.into_iter().next().ok_or_else(|| anyhow::anyhow!("the generation made no answer"))
}

/// Every choice of a request, generated whole on the engine (resuming at the snapshot of
/// `turn`), recorded in the metrics; a client that leaves cancels it.
async fn generate_all(
    app: &Shared,
    prompt: Vec<u32>,
    turn: Marks,
    p: &GenParams,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Generation, Response> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let (a, p2) = (app.clone(), p.clone());
    let res = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        on_engine_n(&a, &prompt, turn, &p2, |_| !cancel.load(Relaxed))
    })
    .await;
    let g = match res {
        Ok(Ok(g)) if g.cancelled(p.n) && app.stopping.load(Relaxed) => {
            return Err(gen_error(app, anyhow::anyhow!("the server is shutting down")));
        }
        // the client left before the first choice began: no one reads this
        Ok(Ok(g)) if g.choices.is_empty() => return Err(gen_error(app, anyhow::anyhow!("cancelled"))),
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return Err(gen_error(app, e)),
        Err(e) => return Err(gen_error(app, anyhow::anyhow!("generation task failed: {e}"))),
    };
    record(app, &g.choices);
    Ok(g)
}

/// One whole generation (a single choice).
async fn generate_whole(
    app: &Shared,
    prompt: Vec<u32>,
    turn: Marks,
    p: &GenParams,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Output, Response> {
    let p = GenParams { n: 1, ..p.clone() };
    let g = generate_all(app, prompt, turn, &p, permit).await?;
    g.choices.into_iter().next().ok_or_else(|| gen_error(app, anyhow::anyhow!("the generation made no answer")))
}

/// The answer as server-sent events: chunks flow through a channel, and a closed channel
/// (the client left) cancels the generation.
fn respond_stream(
    app: Shared,
    prompt: Vec<u32>,
    p: GenParams,
    r: Reply,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let turn = r.turn;
        let mut s = Streamer::new(app.clone(), tx, r, p.sampling.logprobs.is_some());
        // a client that left stops the generation even while nothing is sent (held-back
        // characters, a tool call being assembled)
        let res = on_engine_n(&app, &prompt, turn, &p, |step| {
            !s.tx.is_closed()
                && match step {
                    Step::Begin(i, lp) => s.begin(i, &prompt, lp),
                    Step::Text(i, piece, lps) => s.text(i, piece, lps),
                    Step::End(i, o) => s.end(i, o),
                }
        });
        s.close(res, &p);
    });
    sse_response(rx)
}

/// Named server-sent events (`event:` and JSON `data:`), sent by the blocking thread that
/// generates them.
struct NamedEvents(mpsc::Sender<Event>);

impl NamedEvents {
    /// False once the client has left.
    fn send(&self, name: &str, data: Value) -> bool {
        self.0.blocking_send(Event::default().event(name).data(data.to_string())).is_ok()
    }

    fn left(&self) -> bool {
        self.0.is_closed()
    }
}

/// A stream of named events: `generate` runs on a blocking thread that holds the engine's
/// `permit` and sends them; a client that leaves closes the channel ([`NamedEvents::left`]).
fn named_stream(
    permit: tokio::sync::OwnedSemaphorePermit,
    generate: impl FnOnce(&NamedEvents) + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        generate(&NamedEvents(tx));
    });
    sse_response(rx)
}

/// One streamed answer: each choice's chunks in turn (marked with its index), then usage and
/// `[DONE]`.
struct Streamer {
    app: Shared,
    tx: mpsc::Sender<Event>,
    r: Reply,
    logprobs: bool,
    /// Of the choice being streamed: its reasoning split from its answer...
    think: answer::ThinkSplit,
    /// ...its tool calls as they are assembled...
    splitter: ToolStream,
    calls: usize,
    /// ...the log-probabilities of tokens whose text the splitter holds...
    held: Vec<Scored>,
    /// ...its text (echo left out) and the characters of the echo before it (`text_offset`).
    text: String,
    chars: Chars,
    base: usize,
}

impl Streamer {
    fn new(app: Shared, tx: mpsc::Sender<Event>, r: Reply, logprobs: bool) -> Self {
        let splitter = ToolStream::new(app.tools);
        let think = answer::ThinkSplit::new(false);
        Streamer {
            app,
            tx,
            r,
            logprobs,
            think,
            splitter,
            calls: 0,
            held: vec![],
            text: String::new(),
            chars: Chars::default(),
            base: 0,
        }
    }

    fn send(&self, body: Value) -> bool {
        self.tx.blocking_send(Event::default().data(body.to_string())).is_ok()
    }

    /// A chunk of choice i: a chat `delta` or a completion's text.
    fn chunk(&self, i: usize, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> bool {
        let choice = match self.r.kind {
            Kind::Text { .. } => json!({"index": i, "text": delta, "finish_reason": finish, "logprobs": logprobs}),
            Kind::Chat { .. } => json!({"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}),
        };
        self.send(json!({"id": self.r.id, "object": self.r.object(true), "created": self.r.created,
            "model": self.r.model, "choices": [choice]}))
    }

    /// A choice begins: the assistant's role (chat), or the echoed prompt (completions).
    fn begin(&mut self, i: usize, prompt: &[u32], lp: Option<&[TokenLogprob]>) -> bool {
        self.splitter = ToolStream::new(self.app.tools);
        if let Kind::Chat { thinking: Some(t), .. } = self.r.kind {
            self.think = answer::ThinkSplit::for_format(t, self.app.tools);
        }
        (self.calls, self.text, self.chars, self.base) = (0, String::new(), Chars::default(), 0);
        self.held.clear();
        match &self.r.kind {
            Kind::Chat { .. } => self.chunk(i, json!({"role": "assistant", "content": ""}), None, None),
            Kind::Text { echo: Some(text) } => {
                let e = Echo { text, tokens: prompt, logprobs: lp };
                let lps = self.logprobs.then(|| {
                    let mut t = TextLogprobs::default();
                    t.prompt(&self.app, &e);
                    t.json()
                });
                self.base = text.chars().count();
                self.chunk(i, json!(text), lps, None)
            }
            Kind::Text { echo: None } => true,
        }
    }

    /// A new piece of choice i's text.
    fn text(&mut self, i: usize, piece: &str, lps: &[Scored]) -> bool {
        self.held.extend_from_slice(lps);
        match &self.r.kind {
            Kind::Text { .. } => self.text_piece(i, piece),
            Kind::Chat { thinking: Some(_), .. } => {
                let mut parts = vec![];
                self.think.push(piece, &mut parts);
                self.answer_parts(i, parts)
            }
            Kind::Chat { thinking: None, .. } => self.answer(i, piece),
        }
    }

    /// Reasoning parts as `reasoning_content` deltas, the others through [`Self::answer`].
    fn answer_parts(&mut self, i: usize, parts: Vec<(bool, String)>) -> bool {
        parts.into_iter().all(|(reasoning, s)| {
            if !reasoning {
                return self.answer(i, &s);
            }
            let lps = self.take_held();
            s.is_empty() || self.chunk(i, json!({"reasoning_content": s}), lps, None)
        })
    }

    /// A piece of the answer: content, or tool calls where tools are declared.
    fn answer(&mut self, i: usize, piece: &str) -> bool {
        let events = match &self.r.kind {
            Kind::Chat { tools: Some(_), .. } => self.splitter.push(piece),
            _ => vec![StreamEvent::Content(piece.to_string())],
        };
        self.emit(i, events)
    }

    /// A completion's piece, with the log-probabilities of its tokens at their offsets.
    fn text_piece(&mut self, i: usize, piece: &str) -> bool {
        if piece.is_empty() && self.held.is_empty() {
            return true;
        }
        self.text.push_str(piece);
        let held = std::mem::take(&mut self.held);
        let lps = self.logprobs.then(|| {
            let mut t = TextLogprobs::default();
            for s in &held {
                t.push(&self.app, s.logprob.token, Some(&s.logprob), self.base + self.chars.at(&self.text, s.offset));
            }
            t.json()
        });
        self.chunk(i, json!(piece), lps, None)
    }

    /// Chat deltas of what the tool-call splitter let through; the held log-probabilities go
    /// with the first.
    fn emit(&mut self, i: usize, events: Vec<StreamEvent>) -> bool {
        let names = match &self.r.kind {
            Kind::Chat { tools: Some(n), .. } => n.clone(),
            _ => vec![],
        };
        for ev in events {
            let delta = match ev {
                StreamEvent::Content(c) if c.is_empty() => continue,
                StreamEvent::Content(c) => json!({"content": c}),
                StreamEvent::Call(c) if !names.contains(&c.name) => json!({"content": self.app.tools.as_text(&c)}),
                StreamEvent::Call(c) => {
                    self.calls += 1;
                    json!({"tool_calls": [{"index": self.calls - 1, "id": new_id("call"), "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}}]})
                }
            };
            let lps = self.take_held();
            if !self.chunk(i, delta, lps, None) {
                return false;
            }
        }
        true
    }

    /// The held log-probabilities as chat `logprobs` (none when none are held).
    fn take_held(&mut self) -> Option<Value> {
        if !self.logprobs || self.held.is_empty() {
            return None;
        }
        let held = std::mem::take(&mut self.held);
        Some(chat_logprobs(&self.app, &held))
    }

    /// Choice i is done: what the splitter held, then the finish reason.
    fn end(&mut self, i: usize, o: &Output) -> bool {
        if let Kind::Text { .. } = self.r.kind {
            return self.chunk(i, json!(""), None, Some(finish_reason(o.finish)));
        }
        let mut parts = vec![];
        self.think.finish(&mut parts);
        if !self.answer_parts(i, parts) {
            return false;
        }
        let rest = self.splitter.finish();
        if !self.emit(i, rest) {
            return false;
        }
        let reason = if self.calls > 0 { "tool_calls" } else { finish_reason(o.finish) };
        let lps = self.take_held();
        self.chunk(i, json!({}), lps, Some(reason))
    }

    /// After the last choice: usage when asked for and `[DONE]`; an error event when the
    /// generation failed or the server is stopping; nothing more for a client that left.
    fn close(&self, res: anyhow::Result<Generation>, p: &GenParams) {
        let (error, code) = match res {
            Ok(g) => {
                record(&self.app, &g.choices);
                if !g.cancelled(p.n) {
                    if p.include_usage {
                        self.send(json!({"id": self.r.id, "object": self.r.object(true), "created": self.r.created,
                            "model": self.r.model, "choices": [], "usage": usage(&g)}));
                    }
                    self.done();
                    return;
                }
                if !self.app.stopping.load(Relaxed) {
                    return;
                }
                ("the server is shutting down".to_string(), json!("shutting_down"))
            }
            Err(e) => (format!("{e:#}"), Value::Null),
        };
        self.app.metrics.errors.fetch_add(1, Relaxed);
        let body = json!({"error": {"message": error, "type": "server_error", "param": null, "code": code}});
        self.send(body);
        self.done();
    }

    fn done(&self) {
        let _ = self.tx.blocking_send(Event::default().data("[DONE]"));
    }
}
