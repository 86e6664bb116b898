//! The chat page at `/` and the live metrics stream it draws.
//!
//! The page is three plain files (`web/index.html`, `app.css`, `app.js`) embedded in the binary
//! at build time: no front-end build step, no CDN, no fonts. It talks to the server's own
//! OpenAI-compatible API (`/v1/chat/completions`, streamed) and reads
//! `/v1/metrics/stream`: server-sent JSON snapshots of the real counters (decoded tokens, the
//! expert store's bytes read, hits, misses and I/O wait), of which it charts the differences.
//! The page and its assets load without the API key (they hold nothing secret); the API calls
//! they make send it.

use super::{App, Shared, bad_request, sse_response};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("web/index.html");
const CSS: &str = include_str!("web/app.css");
const JS: &str = include_str!("web/app.js");

/// Paths served without the API key: the page and its assets.
const PUBLIC: [&str; 3] = ["/", "/app.css", "/app.js"];

/// Whether `path` is served without the API key.
pub(super) fn is_public(path: &str) -> bool {
    PUBLIC.contains(&path)
}

/// The page's routes.
pub(super) fn router() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/app.css", get(|| async { asset(CSS, "text/css; charset=utf-8") }))
        .route("/app.js", get(|| async { asset(JS, "text/javascript; charset=utf-8") }))
        .route("/v1/metrics/stream", get(metrics_stream))
        .route("/v1/metrics/snapshot", get(|State(app): State<Shared>| async move { Json(snapshot(&app, 0)) }))
}

/// An embedded file; the policy keeps the page to this server (no other origin is fetched, no
/// inline script runs), and `no-cache` makes a new binary's page replace an old one.
fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                 base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct StreamQuery {
    /// Milliseconds between snapshots, 100 to 10000 (500 by default).
    interval_ms: Option<u64>,
}

/// Server-sent snapshots ([`snapshot`]) every `interval_ms`, until the client leaves or the
/// server stops (an open stream must not hold a graceful stop).
async fn metrics_stream(
    State(app): State<Shared>,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let ms = match q {
        Ok(Query(q)) => q.interval_ms.unwrap_or(500),
        Err(e) => return bad_request(e.body_text(), Some("interval_ms")),
    };
    if !(100..=10_000).contains(&ms) {
        return bad_request("`interval_ms` must be from 100 to 10000", Some("interval_ms"));
    }
    let every = Duration::from_millis(ms);
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => break,
            }
            if app.stopping.load(Relaxed) {
                break;
            }
            let ms = start.elapsed().as_millis() as u64;
            if tx.send(Event::default().data(snapshot(&app, ms).to_string())).await.is_err() {
                break;
            }
        }
    });
    sse_response(rx)
}

/// The counters as they are now (cumulative since the server started; `t_ms` is the stream's
/// own clock): what the page differences into rates. `decoded_tokens` grows with every decode
/// step (the sum of the batch sizes), while the per-request totals grow only when a request
/// ends; `last_decode_tok_s` is the last finished request's decode speed, as `/metrics`
/// reports it. `experts` is null for a model whose experts are all in memory.
fn snapshot(app: &App, t_ms: u64) -> Value {
    let m = &app.metrics;
    let experts = app.store.as_ref().map(|s| {
        let st = s.stats();
        json!({"bytes_read": st.bytes_read, "reads": st.reads, "hits": st.hits, "misses": st.misses,
               "io_wait_ns": st.io_wait_ns, "compute_ns": st.compute_ns,
               "mode": format!("{:?}", s.mode).to_lowercase(), "expert_bytes": s.expert_bytes()})
    });
    json!({
        "t_ms": t_ms,
        "model": app.opts.model_id,
        "context": app.context,
        "requests": m.requests.load(Relaxed),
        "prompt_tokens": m.prompt_tokens.load(Relaxed),
        "completion_tokens": m.completion_tokens.load(Relaxed),
        "last_decode_tok_s": m.last_decode_tok_s_milli.load(Relaxed) as f64 / 1000.0,
        "decode_steps": app.batch.steps.load(Relaxed),
        "decoded_tokens": app.batch.rows.load(Relaxed),
        "generating": app.opts.max_batch - app.engine.available_permits(),
        "queued": app.waiting.load(Relaxed),
        "experts": experts,
    })
}
