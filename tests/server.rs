//! The OpenAI-compatible server on a loopback port with the built-in model, driven by reqwest;
//! and (tests/openai_client.py) by the official `openai` Python package.

use flashmoe::load::load_model;
use flashmoe::server::ServerOptions;
use flashmoe::session::Session;
use flashmoe::tokenizer::TextTokenizer;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

fn model_dir() -> &'static Path {
    Path::new(flashmoe::builtin::SOURCE)
}

/// Starts a server on 127.0.0.1:<free port> in a background thread; returns its base URL.
fn start(max_queue: usize) -> String {
    start_with(ServerOptions {
        model_id: "flashmoe-default".into(),
        max_queue,
        default_max_tokens: 64,
        ..Default::default()
    })
}

fn start_with(opts: ServerOptions) -> String {
    let (base, stop, _) = start_stoppable(opts);
    std::mem::forget(stop); // dropping it would stop the server
    base
}

/// A server, a sender that stops it, and its thread (which ends when the server has stopped).
fn start_stoppable(opts: ServerOptions) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let dir = model_dir();
    let session = Session::new(load_model(dir).unwrap(), TextTokenizer::load(dir).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let stop = async {
                let _ = stop_rx.await;
            };
            flashmoe::server::serve_on(l, session, opts, stop).await.unwrap();
        });
    });
    (format!("http://{}", rx.recv().unwrap()), stop_tx, h)
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn post(url: &str, body: Value) -> (u16, Value) {
    let r = client().post(url).json(&body).send().unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

/// The `data:` payloads of an SSE response.
fn sse(url: &str, body: Value) -> Vec<String> {
    let r = client().post(url).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    BufReader::new(r).lines().map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(String::from)).collect()
}

#[test]
fn chat_completions_streamed_and_not_agree_with_usage_and_prefix_reuse() {
    let base = start(8);
    assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
    let models: Value = client().get(format!("{base}/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(models["data"][0]["id"], "flashmoe-default");

    let msgs = json!([{"role": "system", "content": "You are a player in Shakespeare's company."},
                      {"role": "user", "content": "Speak as ROMEO."}]);
    let body = json!({"model": "flashmoe-default", "messages": msgs, "max_tokens": 24, "temperature": 0});
    let (st, a) = post(&format!("{base}/v1/chat/completions"), body.clone());
    assert_eq!(st, 200, "{a}");
    let text = a["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let u = &a["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&a["choices"][0]["finish_reason"].as_str().unwrap()));

    // the same request streamed gives the same text, then usage, then [DONE]
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let events = sse(&format!("{base}/v1/chat/completions"), sb);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], a["usage"]["completion_tokens"]);
    // identical prompt: all but its last token come from the cache
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() - 1
    );

    // the next turn extends the conversation: its prefix is reused
    let mut next = msgs.as_array().unwrap().clone();
    next.push(json!({"role": "assistant", "content": text}));
    next.push(json!({"role": "user", "content": "Speak as JULIET."}));
    let (st, b) = post(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": next, "max_tokens": 8, "temperature": 0.7, "seed": 3}),
    );
    assert_eq!(st, 200, "{b}");
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= u["prompt_tokens"].as_u64().unwrap() - 1, "cached {cached}: {b}");

    // plain completions, streamed and not
    let (st, c) =
        post(&format!("{base}/v1/completions"), json!({"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0}));
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    let ev = sse(
        &format!("{base}/v1/completions"),
        json!({"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0, "stream": true}),
    );
    let s: String = ev[..ev.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(s, c["choices"][0]["text"].as_str().unwrap());

    let m = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    assert!(m.contains("flashmoe_completion_tokens_total") && m.contains("flashmoe_queue_depth 0"), "{m}");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_survives() {
    let base = start(8);
    let url = format!("{base}/v1/chat/completions");
    let r = client().post(&url).header("content-type", "application/json").body("{not json").send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"model": "gpt-4", "messages": user}), 404, Some("model_not_found")),
        (json!({"messages": []}), 400, None),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), 400, None),
        (json!({"messages": user, "temperature": -1}), 400, None),
        (json!({"messages": user, "max_tokens": 0}), 400, None),
        (json!({"messages": user, "n": 2}), 400, None),
        (json!({"messages": user, "stop": 7}), 400, None),
        // in range as f64, out of range as the sampler's f32
        (json!({"messages": user, "repetition_penalty": 1e39}), 400, None),
        (json!({"messages": user, "top_p": 1e-46}), 400, None),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(3000)}]}),
            400,
            Some("context_length_exceeded"),
        ),
    ];
    for (body, status, code) in cases {
        let (st, e) = post(&url, body.clone());
        assert_eq!(st, status, "{body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(c) = code {
            assert_eq!(e["error"]["code"], c);
        }
    }
    let (st, _) = post(&format!("{base}/v1/completions"), json!({"prompt": 5}));
    assert_eq!(st, 400);
    // a vanishing temperature is greedy, not NaN weights
    let text = |t: f64| {
        let (st, a) =
            post(&format!("{base}/v1/completions"), json!({"prompt": "ROMEO:", "max_tokens": 12, "temperature": t}));
        assert_eq!(st, 200, "{a}");
        a["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(text(1e-40), text(0.0));
    assert_eq!(client().get(format!("{base}/nope")).send().unwrap().status().as_u16(), 404);
    assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
}

/// `/v1/models/{id}`, `reasoning_effort`, the penalties, and fields the server does not
/// implement: refused with 400 and the field named, never silently ignored.
#[test]
fn api_completeness_and_refused_fields() {
    let base = start(8);
    let get = |path: &str| client().get(format!("{base}{path}")).send().unwrap().status().as_u16();
    assert_eq!(get("/v1/models/flashmoe-default"), 200);
    assert_eq!(get("/v1/models/gpt-4o"), 404);
    let chat = format!("{base}/v1/chat/completions");
    let ask = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Speak as ROMEO."}], "max_tokens": 4});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post(&chat, b)
    };
    for ok in [
        json!({"reasoning_effort": "none"}),
        json!({"reasoning_effort": "high"}),
        json!({"presence_penalty": 1.5, "frequency_penalty": -0.5}),
        json!({"logprobs": false, "n": 1}),
        json!({"response_format": {"type": "text"}}),
    ] {
        let (status, body) = ask(ok.clone());
        assert_eq!(status, 200, "{ok}: {body}");
    }
    for (bad, param) in [
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"n": 2}), "n"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"reasoning_effort": "max"}), "reasoning_effort"),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (json!({"response_format": {"type": "json_schema"}}), "response_format"),
        (json!({"tool_choice": "required"}), "tool_choice"),
    ] {
        let (status, body) = ask(bad.clone());
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["param"], param, "{bad}: {body}");
    }
    let (status, body) = post(&format!("{base}/v1/completions"), json!({"prompt": "ROMEO:", "echo": true}));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("echo")), "{body}");
}

/// `cors` answers a browser's preflight before the API key is asked for, and marks answers
/// for the allowed origin only.
#[test]
fn cors_preflight_and_allowed_origin() {
    let base = start_with(ServerOptions {
        model_id: "flashmoe-default".into(),
        api_key: Some("k".into()),
        cors: vec!["http://localhost:3000".into()],
        ..Default::default()
    });
    let url = format!("{base}/v1/chat/completions");
    let pre = client()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .unwrap();
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(pre.headers()["access-control-allow-origin"], "http://localhost:3000");
    let r = client()
        .get(format!("{base}/v1/models"))
        .header("origin", "http://evil.example")
        .bearer_auth("k")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn tool_call_round_trip() {
    let base = start(8);
    let url = format!("{base}/v1/chat/completions");
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let q = json!({"role": "user", "content": "What is the weather in Verona?"});
    let (st, a) = post(&url, json!({"messages": [q], "tools": tools, "temperature": 0, "max_tokens": 60}));
    assert_eq!(st, 200, "{a}");
    let choice = &a["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{a}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Verona");

    // streamed: the call arrives as a tool_calls delta
    let ev = sse(&url, json!({"messages": [q], "tools": tools, "temperature": 0, "max_tokens": 60, "stream": true}));
    let chunks: Vec<Value> = ev.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let streamed_call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"][0].as_object().cloned())
        .expect("a tool_calls delta");
    assert_eq!(streamed_call["function"]["name"], "get_weather");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));

    // the tool's result goes back as a `tool` message; the model answers from it
    let msgs = json!([q, choice["message"], {"role": "tool", "tool_call_id": call["id"],
        "content": "{\"city\": \"Verona\", \"weather\": \"sunny\", \"temperature\": 21}"}]);
    let (st, b) = post(&url, json!({"messages": msgs, "tools": tools, "temperature": 0, "max_tokens": 40}));
    assert_eq!(st, 200, "{b}");
    let answer = b["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Verona") && answer.contains("sunny"), "{answer}");
    assert!(b["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn disconnect_stops_generation_and_the_queue_is_bounded() {
    let base = start(0);
    let url = format!("{base}/v1/completions");
    // end-of-text banned, so only the disconnect can end this one early
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let mut bias = serde_json::Map::new();
    for s in ["<|endoftext|>", "<|im_end|>"] {
        bias.insert(tok.token_to_id(s).unwrap().to_string(), json!(-100));
    }
    let body = json!({"prompt": "ROMEO:", "max_tokens": 900, "stream": true, "temperature": 1, "logit_bias": bias});
    let c = client();
    let r = c.post(&url).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    // while that one holds the engine, a queue of size 0 refuses the next
    let t0 = std::time::Instant::now();
    let r2 = c.post(&url).json(&json!({"prompt": "JULIET:", "max_tokens": 4})).send().unwrap();
    let (st, e): (u16, Value) = (r2.status().as_u16(), r2.json().unwrap());
    assert_eq!(st, 503, "{e} after {:?}", t0.elapsed());
    assert_eq!(e["error"]["code"], "queue_full");
    drop(lines); // the client goes away
    // the engine frees up well before 900 tokens would have been made
    let t = std::time::Instant::now();
    loop {
        let (st, _) = post(&url, json!({"prompt": "JULIET:", "max_tokens": 4}));
        if st == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "engine still busy after the client left");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    let done: f64 =
        m.lines().find_map(|l| l.strip_prefix("flashmoe_completion_tokens_total ")).unwrap().parse().unwrap();
    assert!(done < 900.0, "generation went on after the disconnect: {done} tokens");
}

/// `--api-key`: every endpoint but /health wants it (Bearer or x-api-key); oversized bodies get
/// 413, a wrong method 405 with an OpenAI error body, and refusals count as errors.
#[test]
fn api_key_body_limit_and_method_errors() {
    let base = start_with(ServerOptions {
        model_id: "m".into(),
        max_queue: 2,
        default_max_tokens: 8,
        api_key: Some("sekrit".into()),
        max_body_bytes: 1 << 16,
        ..Default::default()
    });
    let url = format!("{base}/v1/completions");
    let body = json!({"prompt": "ROMEO:", "max_tokens": 2});
    let c = client();
    assert_eq!(c.get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
    for auth in [None, Some("Bearer wrong"), Some("sekrit")] {
        let mut r = c.post(&url).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        let e: Value = r.json().unwrap();
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    assert_eq!(c.get(format!("{base}/v1/models")).send().unwrap().status().as_u16(), 401);
    let ok = c.post(&url).bearer_auth("sekrit").json(&body).send().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let ok = c.post(&url).header("x-api-key", "sekrit").json(&body).send().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let big = json!({"prompt": "x".repeat(1 << 17)});
    let r = c.post(&url).bearer_auth("sekrit").json(&big).send().unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let r = c.get(&url).bearer_auth("sekrit").send().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "method_not_allowed");
    let m = c.get(format!("{base}/metrics")).bearer_auth("sekrit").send().unwrap().text().unwrap();
    let errors: f64 =
        m.lines().find_map(|l| l.strip_prefix("flashmoe_request_errors_total ")).unwrap().parse().unwrap();
    assert!(errors >= 5.0, "{errors} errors counted");
}

/// Huge prompts are refused by their length before tokenizing, off the async threads:
/// `/health` keeps answering during a burst of them.
#[test]
fn huge_prompts_do_not_stall_the_server() {
    let base = start(4);
    let url = format!("{base}/v1/chat/completions");
    let big = json!({"messages": [{"role": "user", "content": "word ".repeat(800_000)}]});
    let slowest = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| post(&url, big.clone()))).collect();
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in hs {
            let (st, e) = h.join().unwrap();
            assert_eq!(st, 400, "{e}");
            assert_eq!(e["error"]["code"], "context_length_exceeded");
        }
        slowest
    });
    eprintln!("slowest /health during 8 concurrent 4 MB prompts: {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "/health took {slowest:?} during the burst");
}

/// Slow and idle clients cannot hold the server: connections over the cap are closed at once,
/// and one that does not finish its request header in time is closed; then /health answers.
#[test]
fn slow_and_idle_clients_are_cut_off() {
    use std::io::{Read, Write};
    let header_timeout = Duration::from_millis(800);
    let base =
        start_with(ServerOptions { model_id: "m".into(), max_connections: 16, header_timeout, ..Default::default() });
    let addr = base.trim_start_matches("http://").to_string();
    // 40 sockets: slowloris (a header never finished) and idle ones, past the cap of 16
    let mut socks: Vec<std::net::TcpStream> = (0..40)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            if i % 2 == 0 {
                write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            }
            s
        })
        .collect();
    let t = std::time::Instant::now();
    // every one of them is closed by the server: at once (over the cap) or at the timeout
    for (i, s) in socks.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // a 408 or similar before closing
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("connection {i} still open after {:?}: {e}", t.elapsed()),
            }
        }
    }
    eprintln!("40 slow/idle sockets (cap 16, header timeout {header_timeout:?}) all closed after {:?}", t.elapsed());
    assert!(t.elapsed() < header_timeout * 5, "took {:?}", t.elapsed());
    // a header in time, then a body that trickles: 408 at the timeout
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    // a kept-alive connection idle after its request is closed at the timeout too
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = std::time::Instant::now();
    let mut all = vec![];
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("idle kept-alive connection still open after {:?}: {e}", t.elapsed()),
        }
    }
    assert!(all.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&all));
    assert!(t.elapsed() >= header_timeout / 2, "closed at once, not kept alive");
    assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
}

/// Stopping (SIGTERM in `serve`): the running stream ends with an error event and `[DONE]`, a
/// queued request gets 503, and the server returns.
#[test]
fn stopping_ends_streams_cleanly_and_answers_the_queue() {
    let (base, stop, server) = start_stoppable(ServerOptions { model_id: "m".into(), ..Default::default() });
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let mut bias = serde_json::Map::new();
    for s in ["<|endoftext|>", "<|im_end|>"] {
        bias.insert(tok.token_to_id(s).unwrap().to_string(), json!(-100));
    }
    let body = json!({"prompt": "ROMEO:", "max_tokens": 1000, "stream": true, "logit_bias": bias});
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("data: "));
    let url = format!("{base}/v1/completions");
    let queued = std::thread::spawn(move || post(&url, json!({"prompt": "JULIET:", "max_tokens": 4})));
    let t = std::time::Instant::now();
    while queue_depth(&base) < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the second request never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.send(()).unwrap();
    let rest: Vec<String> =
        lines.map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(String::from)).collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{:?}", rest.last());
    let err: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "shutting_down", "{err}");
    let (st, e) = queued.join().unwrap();
    assert_eq!(st, 503, "{e}");
    server.join().unwrap();
}

/// The first line of a streamed completion that only a disconnect ends, left unread after
/// that: the generation blocks on the full channel and holds the engine until it is dropped.
fn hold_engine(base: &str) -> std::io::Lines<BufReader<reqwest::blocking::Response>> {
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let mut bias = serde_json::Map::new();
    for s in ["<|endoftext|>", "<|im_end|>"] {
        bias.insert(tok.token_to_id(s).unwrap().to_string(), json!(-100));
    }
    let body = json!({"prompt": "ROMEO:", "max_tokens": 900, "stream": true, "temperature": 1, "logit_bias": bias});
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("data: "));
    lines
}

fn queue_depth(base: &str) -> f64 {
    let m = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    m.lines().find_map(|l| l.strip_prefix("flashmoe_queue_depth ")).unwrap().parse().unwrap()
}

/// Clients that disconnect while queued give their place back: after 3 × max-queue of them,
/// a burst of max-queue + 1 requests is served in full (it got 503s when the places leaked).
#[test]
fn queued_clients_that_disconnect_give_their_place_back() {
    use std::io::Write;
    let max_queue = 2;
    let base = start(max_queue);
    let addr = base.trim_start_matches("http://").to_string();
    let held = hold_engine(&base);
    let body = json!({"prompt": "JULIET:", "max_tokens": 4}).to_string();
    for i in 0..3 * max_queue {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // queued (the engine is held)...
        let t = std::time::Instant::now();
        while queue_depth(&base) < 1.0 {
            assert!(t.elapsed() < Duration::from_secs(10), "client {i} never queued");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(s); // ...and gone
        let t = std::time::Instant::now();
        while queue_depth(&base) > 0.0 {
            assert!(t.elapsed() < Duration::from_secs(10), "client {i}'s place was not given back");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(held);
    let url = format!("{base}/v1/completions");
    let t = std::time::Instant::now();
    while post(&url, json!({"prompt": "JULIET:", "max_tokens": 2})).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(30), "engine still busy");
        std::thread::sleep(Duration::from_millis(50));
    }
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> =
            (0..=max_queue).map(|_| s.spawn(|| post(&url, json!({"prompt": "JULIET:", "max_tokens": 8})).0)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

/// A Python of a venv under target/ where `module` imports (installing `package` from PyPI if
/// not: PyPI must be reachable).
fn python_with(module: &str, package: &str) -> std::path::PathBuf {
    // the client tests run in parallel: one creates the venv and installs at a time
    static VENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = VENV.lock().unwrap_or_else(|p| p.into_inner());
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        let ok = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap().success();
        assert!(ok, "python3 -m venv failed");
    }
    // a probe: its ModuleNotFoundError is expected on a fresh machine, not worth printing
    let has = std::process::Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if !has {
        let ok =
            std::process::Command::new(&py).args(["-m", "pip", "install", "-q", package]).status().unwrap().success();
        assert!(ok, "pip install {package} failed (PyPI must be reachable)");
    }
    py
}

/// Runs `tests/<script>` with `py` against a fresh server and expects its success line.
fn run_client(py: &Path, script: &str, base: &str, done: &str) {
    let out = std::process::Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script))
        .arg(base)
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{so}\n{se}");
    assert!(so.contains(done), "{so}");
}

/// The official `openai` Python client against the server: a streamed chat, a non-streamed
/// chat and a tool call round trip.
#[test]
fn official_openai_python_client() {
    let py = python_with("openai", "openai");
    let base = start(8);
    run_client(&py, "openai_client.py", &format!("{base}/v1"), "all openai client checks passed");
}

/// The official `anthropic` Python client against `/v1/messages`: streamed and whole messages,
/// a stop sequence, a tool use round trip (whole and streamed) and a refused `tool_choice`.
#[test]
fn official_anthropic_python_client() {
    let py = python_with("anthropic", "anthropic");
    let base = start(8);
    run_client(&py, "anthropic_client.py", &base, "all anthropic client checks passed");
}

/// LangChain's `with_structured_output` (json_schema and function calling) against the server.
#[test]
fn langchain_structured_output() {
    let py = python_with("langchain_openai", "langchain-openai");
    let base = start(8);
    run_client(&py, "langchain_client.py", &format!("{base}/v1"), "all langchain checks passed");
}
