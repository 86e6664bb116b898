//! The OpenAI-compatible server on a loopback port with the built-in model, driven by reqwest;
//! and by the official clients: the `openai`, `anthropic` and LangChain Python packages
//! (tests/*_client.py) and the `openai` and `@anthropic-ai/sdk` Node packages
//! (tests/node_clients.mjs).

mod common;

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
    start_model(model_dir(), opts)
}

/// [`start_stoppable`] with the model in `dir`.
fn start_model(
    dir: &Path,
    opts: ServerOptions,
) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    start_session(Session::new(load_model(dir).unwrap(), TextTokenizer::load(dir).unwrap()), opts)
}

/// [`start_stoppable`] with a session of one's own.
fn start_session(
    session: Session,
    opts: ServerOptions,
) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    common::serve(session, opts)
}

/// Fixture `name` copied into `dir_name` under the test's target folder with room for a call (a
/// 1024-token context; the fixtures have 64) and `template` as its chat template.
fn fixture_with_template(name: &str, dir_name: &str, template: &str) -> std::path::PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir_name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1024);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    dir
}

/// The first `tool_calls` delta of `body` sent streamed.
fn streamed_tool_call(url: &str, mut body: Value) -> Value {
    body["stream"] = json!(true);
    let ev = sse(url, body);
    ev.iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .expect("a tool_calls delta")
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
        (json!({"messages": user, "n": 17}), 400, None),
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
        (json!({"logprobs": 3}), "logprobs"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs"),
        (json!({"echo": true}), "echo"),
        (json!({"n": 17}), "n"),
        (json!({"n": 0}), "n"),
        (json!({"n": 1.5}), "n"),
        (json!({"best_of": 2}), "best_of"),
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
    let text = format!("{base}/v1/completions");
    for (bad, param) in [
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"echo": "yes"}), "echo"),
        (json!({"n": 17}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"suffix": "!"}), "suffix"),
    ] {
        let mut b = json!({"prompt": "ROMEO:", "max_tokens": 2});
        b.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let (status, body) = post(&text, b);
        assert_eq!((status, body["error"]["param"].as_str()), (400, Some(param)), "{bad}: {body}");
    }
}

/// log_softmax of one row of logits, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row.iter().map(|&x| x as f64 - m - z.ln()).collect()
}

/// The model's next-token log-probabilities after `prompt`, computed here in the parts the
/// session prefills it in (batched prefill rounds differently from one token at a time): up
/// to the chat's last turn, up to the last token, the last token.
fn next_logprobs(model: &flashmoe::model::Model, prompt: &[u32], turn: Option<usize>) -> Vec<f64> {
    let mut st = model.new_state();
    let n = prompt.len();
    for part in [&prompt[..turn.unwrap_or(0)], &prompt[turn.unwrap_or(0)..n - 1]] {
        if !part.is_empty() {
            model.forward(&mut st, part, false).unwrap();
        }
    }
    log_softmax(&model.forward(&mut st, &prompt[n - 1..], false).unwrap())
}

/// Checks one chat `logprobs` entry list: finite and ≤ 0, the top lists sorted and of `k`
/// entries whose probabilities sum to at most 1, bytes that spell the token.
fn check_chat_entries(content: &[Value], k: usize) {
    assert!(!content.is_empty());
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp.is_finite() && lp <= 0.0, "{e}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), k, "{e}");
        let tl: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tl.iter().all(|l| l.is_finite() && *l <= 0.0), "{e}");
        assert!(tl.windows(2).all(|w| w[0] >= w[1]), "unsorted: {e}");
        assert!(tl.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4, "{e}");
        let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        if let Ok(t) = std::str::from_utf8(&bytes) {
            assert_eq!(e["token"], t);
        }
        // the chosen token is at least as likely as the top list says, or among it
        if let Some(same) = top.iter().find(|t| t["token"] == e["token"]) {
            assert!((same["logprob"].as_f64().unwrap() - lp).abs() < 1e-6, "{e}");
        } else if k > 0 {
            assert!(lp <= tl[k - 1] + 1e-6, "{e}");
        }
    }
}

/// Chat `logprobs`/`top_logprobs`, whole and streamed: the log-softmax of the distribution
/// sampled from; greedy, the chosen token is the argmax, and the first token's numbers are
/// the model's own log-softmax computed here.
#[test]
fn chat_logprobs_whole_and_streamed() {
    let base = start(8);
    let url = format!("{base}/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "Speak as ROMEO."}]);
    let body = json!({"messages": msgs, "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 5});
    let (st, a) = post(&url, body.clone());
    assert_eq!(st, 200, "{a}");
    let content = a["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    check_chat_entries(&content, 5);
    for e in &content {
        assert_eq!(e["token"], e["top_logprobs"][0]["token"], "greedy picks the most likely: {e}");
        assert_eq!(e["logprob"], e["top_logprobs"][0]["logprob"]);
    }
    assert_eq!(content.len() as u64, a["usage"]["completion_tokens"].as_u64().unwrap());
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| e["bytes"].as_array().unwrap().clone())
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), a["choices"][0]["message"]["content"].as_str().unwrap());
    // independently: the model's distribution after the chat prompt
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let (prompt, turn) = flashmoe::session::chat_prompt(&tok, &msgs, None, &serde_json::Map::new()).unwrap();
    let want = next_logprobs(&load_model(model_dir()).unwrap(), &prompt, turn);
    let best = (0..want.len()).max_by(|&x, &y| want[x].total_cmp(&want[y]).then(y.cmp(&x))).unwrap();
    assert_eq!(content[0]["token"], tok.token_text(best as u32));
    for t in content[0]["top_logprobs"].as_array().unwrap() {
        let id = (0..want.len() as u32).find(|&i| tok.token_text(i) == t["token"].as_str().unwrap()).unwrap();
        assert!((t["logprob"].as_f64().unwrap() - want[id as usize]).abs() < 1e-5, "{t} vs {}", want[id as usize]);
    }

    // streamed: the chunks carry the same entries, each with the text it begins
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = sse(&url, sb);
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let mut streamed = vec![];
    for c in &chunks {
        let ch = &c["choices"][0];
        if ch["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
            assert!(ch["logprobs"]["content"].as_array().is_some_and(|l| !l.is_empty()), "{c}");
        }
        streamed.extend(ch["logprobs"]["content"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!(streamed, content);

    // sampled, with a bias: the distribution after bias and temperature, top-k not cutting it
    let biased = tok.token_to_id("ROMEO").map(|t| json!({t.to_string(): 5}));
    let (st, b) = post(
        &url,
        json!({"messages": msgs, "max_tokens": 12, "temperature": 0.7, "top_k": 3, "seed": 4, "logprobs": true,
            "top_logprobs": 20, "logit_bias": biased}),
    );
    assert_eq!(st, 200, "{b}");
    check_chat_entries(b["choices"][0]["logprobs"]["content"].as_array().unwrap(), 20);
    // without top_logprobs: empty top lists; without logprobs: none
    let (_, c) = post(&url, json!({"messages": msgs, "max_tokens": 3, "logprobs": true}));
    check_chat_entries(c["choices"][0]["logprobs"]["content"].as_array().unwrap(), 0);
    let (_, d) = post(&url, json!({"messages": msgs, "max_tokens": 3}));
    assert!(d["choices"][0]["logprobs"].is_null());
}

/// `/v1/completions` `logprobs: K` and `echo`, whole and streamed: parallel lists, top dicts of
/// at most K + 1 holding the token, `text_offset` in characters, the echoed prompt scored
/// (its first token has none) as the model's log-softmax computed here.
#[test]
fn completion_logprobs_and_echo() {
    let base = start(8);
    let url = format!("{base}/v1/completions");
    let (st, a) = post(&url, json!({"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0, "logprobs": 3}));
    assert_eq!(st, 200, "{a}");
    let text = a["choices"][0]["text"].as_str().unwrap().to_string();
    let lp = &a["choices"][0]["logprobs"];
    let tokens: Vec<String> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
    assert_eq!(tokens.concat(), text);
    let mut at = 0;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i].as_u64().unwrap() as usize, at);
        at += t.chars().count();
        let l = lp["token_logprobs"][i].as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 4 && top.contains_key(t), "{top:?}");
        let max = top.values().map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!(l.is_finite() && l <= 0.0 && l == max, "greedy: {l} is the best of {top:?}");
    }

    // echo: the prompt first, its first token unscored; max_tokens 0 scores the prompt alone
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let prompt = tok.encode("ROMEO: But soft").unwrap();
    let (st, e) = post(&url, json!({"prompt": "ROMEO: But soft", "max_tokens": 0, "echo": true, "logprobs": 2}));
    assert_eq!(st, 200, "{e}");
    let c = &e["choices"][0];
    assert_eq!((c["text"].as_str(), c["finish_reason"].as_str()), (Some("ROMEO: But soft"), Some("length")));
    assert_eq!(e["usage"]["completion_tokens"], 0);
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len());
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert_eq!(lp["text_offset"][0], 0);
    // the prompt's logits, every row, as `flashmoe logits --fast` computes them (the server
    // scores all but the last token in one batch)
    let model = load_model(model_dir()).unwrap();
    let v = model.vocab_size();
    let rows = model.forward(&mut model.new_state(), &prompt[..prompt.len() - 1], true).unwrap();
    for i in 1..prompt.len() {
        let want = log_softmax(&rows[(i - 1) * v..i * v])[prompt[i] as usize];
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "prompt token {i}: {got} vs {want}");
        assert!(lp["top_logprobs"][i].as_object().unwrap().len() <= 3);
    }

    // streamed, echo and generation: the same lists, chunk by chunk
    let body = json!({"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0, "logprobs": 1, "echo": true});
    let (_, whole) = post(&url, body.clone());
    let mut sb = body;
    sb["stream"] = json!(true);
    let chunks: Vec<Value> = sse(&url, sb).iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let field = |k: &str| -> Vec<Value> {
        chunks.iter().flat_map(|c| c["choices"][0]["logprobs"][k].as_array().cloned().unwrap_or_default()).collect()
    };
    let wl = &whole["choices"][0]["logprobs"];
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(field(k), *wl[k].as_array().unwrap(), "{k}");
    }
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());
    assert!(streamed.starts_with("ROMEO:"));
}

/// `n` > 1: n choices of the one prompt, indexed 0..n, usage summing their tokens; greedy ones
/// agree, seeded ones differ from each other and repeat; choice 0 is the n = 1 answer; streamed,
/// each chunk names its choice.
#[test]
fn n_choices_whole_and_streamed() {
    let base = start(8);
    let url = format!("{base}/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "Speak as JULIET."}]);
    let ask = |n: usize, t: f64| {
        let (st, a) = post(
            &url,
            json!({"messages": msgs, "max_tokens": 10, "temperature": t, "seed": 11, "n": n, "logprobs": true}),
        );
        assert_eq!(st, 200, "{a}");
        a
    };
    let texts = |a: &Value| -> Vec<String> {
        let cs = a["choices"].as_array().unwrap();
        assert!(cs.iter().enumerate().all(|(i, c)| c["index"] == i), "{a}");
        cs.iter().map(|c| c["message"]["content"].as_str().unwrap().to_string()).collect()
    };
    let a = ask(3, 1.0);
    let sampled = texts(&a);
    assert_eq!(sampled.len(), 3);
    assert!(sampled[0] != sampled[1] || sampled[1] != sampled[2], "{sampled:?}");
    let tokens: usize =
        a["choices"].as_array().unwrap().iter().map(|c| c["logprobs"]["content"].as_array().unwrap().len()).sum();
    assert_eq!(a["usage"]["completion_tokens"].as_u64().unwrap() as usize, tokens);
    assert_eq!(texts(&ask(3, 1.0)), sampled, "a seed repeats every choice");
    assert_eq!(texts(&ask(1, 1.0)), sampled[..1]);
    let greedy = texts(&ask(2, 0.0));
    assert_eq!(greedy[0], greedy[1]);

    // each choice follows its own copy of a grammar
    let (st, j) = post(
        &url,
        json!({"messages": msgs, "max_tokens": 200, "temperature": 0.8, "seed": 7, "n": 2,
            "response_format": {"type": "json_object"}}),
    );
    assert_eq!(st, 200, "{j}");
    for c in j["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()), "{text:?}");
    }

    let (st, c) =
        post(&format!("{base}/v1/completions"), json!({"prompt": "ROMEO:", "max_tokens": 6, "n": 2, "seed": 1}));
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["choices"].as_array().unwrap().len(), 2);

    let events = sse(
        &url,
        json!({"messages": msgs, "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 3, "stream": true,
            "stream_options": {"include_usage": true}}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let mut by_index = vec![String::new(); 3];
    let mut finished = [0; 3];
    for ch in chunks.iter().flat_map(|c| c["choices"].as_array().unwrap()) {
        let i = ch["index"].as_u64().unwrap() as usize;
        by_index[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        finished[i] += ch["finish_reason"].is_string() as usize;
    }
    assert_eq!(by_index, sampled);
    assert_eq!(finished, [1, 1, 1]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], a["usage"]["completion_tokens"]);
}

/// `n` > 1 choices decode together in the batch's steps (one forward pass over the next token
/// of each), and each choice's text is what a request for it alone (n = 1, the choice's own
/// seed) gets, whole and streamed, chat and completions.
#[test]
fn n_choices_decode_as_one_batch_each_as_alone() {
    // a gather window far above any pause the OS gives a thread on CI's 2 shared cores: a
    // choice kept off the CPU past the default 20 ms would step on its own until it caught up
    let base = start_with(ServerOptions {
        model_id: "m".into(),
        max_batch: 8,
        max_queue: 4,
        batch_wait: Duration::from_secs(2),
        ..Default::default()
    });
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let mut bias = serde_json::Map::new();
    for s in ["<|endoftext|>", "<|im_end|>"] {
        bias.insert(tok.token_to_id(s).unwrap().to_string(), json!(-100));
    }
    let url = format!("{base}/v1/completions");
    let body = |n: usize, seed: u64| json!({"prompt": "ROMEO:", "max_tokens": 24, "temperature": 1.0, "seed": seed, "n": n, "logit_bias": bias});
    let (steps0, rows0) =
        (metric(&base, "flashmoe_decode_steps_total"), metric(&base, "flashmoe_decode_step_sequences_total"));
    let (st, a) = post(&url, body(4, 5));
    assert_eq!(st, 200, "{a}");
    let (steps, rows) = (
        metric(&base, "flashmoe_decode_steps_total") - steps0,
        metric(&base, "flashmoe_decode_step_sequences_total") - rows0,
    );
    // 4 × 24 tokens: each choice feeds 23 (the last one drawn is not fed back)
    assert_eq!(rows, 4.0 * 23.0, "{a}");
    eprintln!("n choices: {rows} sequences in {steps} steps");
    // mostly all 4 (the choices join one by one, each after its own prefill)
    assert!(steps <= 0.5 * rows, "the choices' steps were not shared: {rows} sequences in {steps} steps");
    let texts: Vec<String> =
        a["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().into()).collect();
    assert_eq!(texts.len(), 4);
    assert!(texts.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{texts:?}");
    for (i, t) in texts.iter().enumerate() {
        let (st, one) = post(&url, body(1, flashmoe::generate::choice_seed(5, i)));
        assert_eq!(st, 200, "{one}");
        assert_eq!(one["choices"][0]["text"].as_str().unwrap(), t, "choice {i} differs from its answer alone");
    }
    // streamed: each choice's pieces in order, the same texts
    let mut streamed = body(4, 5);
    streamed["stream"] = json!(true);
    let mut by_index = vec![String::new(); 4];
    for e in sse(&url, streamed).iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            by_index[ch["index"].as_u64().unwrap() as usize].push_str(ch["text"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(by_index, texts);
    // one sequence at a time (--max-batch 1, as on an accelerator): the choices take turns
    let one = start_with(ServerOptions { model_id: "m".into(), max_batch: 1, max_queue: 4, ..Default::default() });
    let (st, b) = post(&format!("{one}/v1/completions"), body(4, 5));
    assert_eq!(st, 200, "{b}");
    let turns: Vec<&str> = b["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(turns, texts);
    // chat: the choices of a seeded request, each as it is alone
    let chat = format!("{base}/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "Speak as JULIET."}]);
    let ask = |n: usize, seed: u64| {
        let (st, a) =
            post(&chat, json!({"messages": msgs, "max_tokens": 16, "temperature": 1.0, "seed": seed, "n": n}));
        assert_eq!(st, 200, "{a}");
        a["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let all = ask(3, 9);
    for (i, t) in all.iter().enumerate() {
        assert_eq!(&ask(1, flashmoe::generate::choice_seed(9, i))[0], t, "chat choice {i}");
    }
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

/// `tool_choice` required or named with a GLM-family model: the GLM fixture's random model,
/// held to GLM's own `<tool_call>NAME<arg_key>…` syntax, answers with a call the server parses
/// into `tool_calls`, whole and streamed, its arguments within the schema.
#[test]
fn forced_tool_calls_in_the_glm_format() {
    // the fixture with room for a call (its context is 64) and a template that leaves the tools out
    let dir =
        fixture_with_template("glm4_moe", "glm4_moe_forced", "{% for m in messages %}{{ m.content }}{% endfor %}");
    let opts = ServerOptions { model_id: "glm".into(), max_queue: 2, default_max_tokens: 64, ..Default::default() };
    let (base, stop, _) = start_model(&dir, opts);
    let url = format!("{base}/v1/chat/completions");
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"]}}}, {"type": "function", "function": {"name": "now"}}]);
    let q = json!([{"role": "user", "content": "Weather?"}]);
    let check = |call: &Value| {
        assert_eq!(call["function"]["name"], "get_weather", "{call}");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(["Paris", "Rome"].contains(&args["city"].as_str().unwrap()), "{args}");
        assert!((1..=9).contains(&args["days"].as_i64().unwrap()), "{args}");
    };
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
        let body = json!({"messages": q, "tools": tools, "tool_choice": choice, "max_tokens": 300, "seed": 3});
        let (st, a) = post(&url, body.clone());
        assert_eq!(st, 200, "{a}");
        if choice == "required" && a["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "now" {
            continue;
        }
        assert_eq!(a["choices"][0]["finish_reason"], "tool_calls", "{a}");
        check(&a["choices"][0]["message"]["tool_calls"][0]);
        check(&streamed_tool_call(&url, body));
    }
    let _ = stop.send(());
}

/// `tool_choice` required or named with gpt-oss: the fixture's random model, under a harmony
/// template (the generation prompt ends `<|start|>assistant`), answers with a commentary-channel
/// message to `functions.NAME` whose JSON arguments keep to the schema, which the server reads
/// into `tool_calls`, whole and streamed, on the chat and Responses endpoints.
#[test]
fn forced_tool_calls_in_the_harmony_format() {
    let dir = fixture_with_template(
        "gpt_oss",
        "gpt_oss_forced",
        "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}\
         {% if add_generation_prompt %}<|start|>assistant{% endif %}",
    );
    let opts = ServerOptions { model_id: "oss".into(), max_queue: 2, default_max_tokens: 64, ..Default::default() };
    let (base, stop, _) = start_model(&dir, opts);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
        "additionalProperties": false}}}]);
    let check = |name: &Value, args: &Value, only_weather: bool| {
        let args: Value = serde_json::from_str(args.as_str().unwrap()).unwrap();
        if name == "now" && !only_weather {
            assert_eq!(args, json!({}));
            return;
        }
        assert_eq!(name, "get_weather", "{args}");
        assert!(["Paris", "Rome"].contains(&args["city"].as_str().unwrap()), "{args}");
        assert!((1..=9).contains(&args["days"].as_i64().unwrap()), "{args}");
    };
    let url = format!("{base}/v1/chat/completions");
    let q = json!([{"role": "user", "content": "Weather?"}]);
    for (choice, only) in
        [(json!("required"), false), (json!({"type": "function", "function": {"name": "get_weather"}}), true)]
    {
        let body = json!({"messages": q, "tools": tools, "tool_choice": choice, "max_tokens": 300, "seed": 3});
        let (st, a) = post(&url, body.clone());
        assert_eq!(st, 200, "{a}");
        assert_eq!(a["choices"][0]["finish_reason"], "tool_calls", "{a}");
        let call = &a["choices"][0]["message"]["tool_calls"][0]["function"];
        check(&call["name"], &call["arguments"], only);
        let call = streamed_tool_call(&url, body)["function"].clone();
        check(&call["name"], &call["arguments"], only);
    }
    // the Responses API's named function, through the same grammar
    let rtools: Vec<Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let f = &t["function"];
            json!({"type": "function", "name": f["name"], "parameters": f["parameters"]})
        })
        .collect();
    let body = json!({"input": "Weather?", "tools": rtools, "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 300});
    let (st, r) = post(&format!("{base}/v1/responses"), body);
    assert_eq!(st, 200, "{r}");
    let call = r["output"].as_array().unwrap().iter().find(|o| o["type"] == "function_call").expect("a function_call");
    check(&call["name"], &call["arguments"], true);
    let _ = stop.send(());
}

#[test]
fn disconnect_stops_generation_and_the_queue_is_bounded() {
    // two generate at once, none may wait
    let base = start_with(ServerOptions {
        model_id: "flashmoe-default".into(),
        max_queue: 0,
        max_batch: 2,
        default_max_tokens: 64,
        ..Default::default()
    });
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
    let r = c.post(&url).json(&body).send().unwrap();
    let mut other = BufReader::new(r).lines();
    assert!(other.next().unwrap().unwrap().starts_with("data: "));
    // while those two hold the engine, a queue of size 0 refuses the next
    let t0 = std::time::Instant::now();
    let r2 = c.post(&url).json(&json!({"prompt": "JULIET:", "max_tokens": 4})).send().unwrap();
    let (st, e): (u16, Value) = (r2.status().as_u16(), r2.json().unwrap());
    assert_eq!(st, 503, "{e} after {:?}", t0.elapsed());
    assert_eq!(e["error"]["code"], "queue_full");
    drop(lines); // the clients go away
    drop(other);
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
    let done = metric(&base, "flashmoe_completion_tokens_total");
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
    let (base, stop, server) =
        start_stoppable(ServerOptions { model_id: "m".into(), max_batch: 1, ..Default::default() });
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
    metric(base, "flashmoe_queue_depth")
}

/// A metric's value from `/metrics`.
fn metric(base: &str, name: &str) -> f64 {
    let m = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    m.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')).unwrap().parse().unwrap()
}

/// Clients that disconnect while queued give their place back: after 3 × max-queue of them,
/// a burst of max-queue + 1 requests is served in full (it got 503s when the places leaked).
#[test]
fn queued_clients_that_disconnect_give_their_place_back() {
    use std::io::Write;
    let max_queue = 2;
    let base = start_with(ServerOptions {
        model_id: "flashmoe-default".into(),
        max_queue,
        max_batch: 1,
        default_max_tokens: 64,
        ..Default::default()
    });
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

/// The official Node SDKs (`openai`, with its stream/parse helpers, tool runner and zod
/// formats, and `@anthropic-ai/sdk`) against the server: tests/node_clients.mjs. Skipped where
/// Node is not installed (as the browser test is).
#[test]
fn official_node_clients() {
    if !std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!("skipped: node not available (apt-get install nodejs npm)");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-clients");
    let pkgs = ["openai@6.49.0", "@anthropic-ai/sdk@1.16.0", "zod@4.6.7"];
    let installed = |p: &str| {
        let (name, version) = p.rsplit_once('@').unwrap();
        let meta =
            std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json")).unwrap_or_default();
        meta.contains(&format!("\"version\": \"{version}\""))
    };
    if !pkgs.iter().all(|p| installed(p)) {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(pkgs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "npm install {pkgs:?} failed (the npm registry must be reachable)");
    }
    let base = start(8);
    let out = std::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node_clients.mjs"))
        .arg(&base)
        .arg(&dir)
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node_clients.mjs failed:\n{so}\n{se}");
    assert!(so.contains("all openai node checks passed") && so.contains("all anthropic node checks passed"), "{so}");
}

/// LangChain's `with_structured_output` (json_schema and function calling) against the server.
#[test]
fn langchain_structured_output() {
    let py = python_with("langchain_openai", "langchain-openai");
    let base = start(8);
    run_client(&py, "langchain_client.py", &format!("{base}/v1"), "all langchain checks passed");
}

#[test]
fn reasoning_goes_to_reasoning_content_whole_and_streamed() {
    let base = start(8);
    let url = format!("{base}/v1/chat/completions");
    // the built-in model made to open a `<think>` block (id 4092) and stay in it
    let body = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Speak as ROMEO."}], "max_tokens": 6, "temperature": 0,
               "logit_bias": {"4092": 100}, "stream": stream})
    };
    let (st, a) = post(&url, body(false));
    assert_eq!(st, 200, "{a}");
    let msg = &a["choices"][0]["message"];
    let reasoning = msg["reasoning_content"].as_str().expect("reasoning_content");
    assert_eq!(reasoning, "<think>".repeat(5), "{a}");
    assert_eq!(msg["content"], "", "the answer holds no reasoning: {a}");
    let (mut think, mut content) = (String::new(), String::new());
    for d in sse(&url, body(true)).iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(d).unwrap();
        let delta = &v["choices"][0]["delta"];
        think += delta["reasoning_content"].as_str().unwrap_or("");
        content += delta["content"].as_str().unwrap_or("");
    }
    assert_eq!((think.trim(), content.as_str()), (reasoning, ""));
    // thinking off: the template closes the block, and the answer is all content
    let mut off = body(false);
    off["logit_bias"] = json!({});
    off["reasoning_effort"] = json!("none");
    let (st, b) = post(&url, off);
    assert_eq!(st, 200, "{b}");
    assert!(b["choices"][0]["message"].get("reasoning_content").is_none(), "{b}");
    assert!(!b["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{b}");
}

/// The named server-sent events of a response: (event name, data).
fn sse_named(url: &str, body: Value) -> Vec<(String, Value)> {
    let r = client().post(url).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut out = vec![];
    let mut name = String::new();
    for line in BufReader::new(r).lines().map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((std::mem::take(&mut name), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

/// A streamed response's events: each named as its `type`, numbered from 0 in order, and the
/// final response (completed or incomplete) last.
fn check_events(events: &[(String, Value)]) -> &Value {
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str(), "{data}");
        assert_eq!(data["sequence_number"], i, "{data}");
    }
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    let last = &events.last().unwrap().1["response"];
    assert!(["response.completed", "response.incomplete"].contains(kinds.last().unwrap()), "{kinds:?}");
    assert_eq!(format!("response.{}", last["status"].as_str().unwrap()), *kinds.last().unwrap());
    last
}

/// The kinds of events of one output item, in order (deltas once).
fn item_events(events: &[(String, Value)], index: usize) -> Vec<&str> {
    let mut kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.1["output_index"] == index)
        .map(|e| e.0.strip_prefix("response.").unwrap())
        .collect();
    kinds.dedup();
    kinds
}

#[test]
fn responses_whole_and_streamed_agree_in_openai_order() {
    let base = start(8);
    let url = format!("{base}/v1/responses");
    let body = json!({"model": "flashmoe-default", "input": "Speak as ROMEO.", "max_output_tokens": 24,
        "temperature": 0, "metadata": {"run": "1"}});
    let (st, a) = post(&url, body.clone());
    assert_eq!(st, 200, "{a}");
    assert!(a["id"].as_str().unwrap().starts_with("resp_") && a["object"] == "response", "{a}");
    let msg = a["output"].as_array().unwrap().last().unwrap();
    assert_eq!((msg["type"].as_str(), msg["role"].as_str()), (Some("message"), Some("assistant")), "{a}");
    assert!(msg["id"].as_str().unwrap().starts_with("msg_"));
    let text = msg["content"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty() && msg["content"][0]["type"] == "output_text");
    let u = &a["usage"];
    assert_eq!(u["total_tokens"], u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap());
    assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 0);
    for (k, v) in [
        ("temperature", json!(0)),
        ("max_output_tokens", json!(24)),
        ("metadata", json!({"run": "1"})),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("text", json!({"format": {"type": "text"}})),
        ("error", Value::Null),
    ] {
        assert_eq!(a[k], v, "{k}: {a}");
    }
    if a["status"] == "incomplete" {
        assert_eq!(a["incomplete_details"]["reason"], "max_output_tokens");
    }

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = sse_named(&url, sb);
    let last = check_events(&events);
    assert_eq!(
        item_events(&events, 0),
        [
            "output_item.added",
            "content_part.added",
            "output_text.delta",
            "output_text.done",
            "content_part.done",
            "output_item.done"
        ]
    );
    let deltas: String =
        events.iter().filter(|e| e.0 == "response.output_text.delta").map(|e| e.1["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, text);
    let done = events.iter().find(|e| e.0 == "response.output_text.done").unwrap();
    assert_eq!(done.1["text"], text);
    assert_eq!(done.1["item_id"], last["output"][0]["id"]);
    assert_eq!(last["output"][0]["content"], msg["content"]);
    assert_eq!((&last["status"], &last["usage"]["output_tokens"]), (&a["status"], &u["output_tokens"]));
    // identical prompt: all but its last token come from the cache
    assert_eq!(last["usage"]["input_tokens_details"]["cached_tokens"], u["input_tokens"].as_u64().unwrap() - 1);

    // instructions and a multi-turn input, cut short by max_output_tokens
    let turns = json!([{"role": "user", "content": "Speak as ROMEO."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Speak as JULIET."}]}]);
    let (st, b) = post(
        &url,
        json!({"input": turns, "instructions": "You are a player in Shakespeare's company.",
            "max_output_tokens": 2, "temperature": 0}),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        (b["status"].as_str(), b["incomplete_details"]["reason"].as_str()),
        (Some("incomplete"), Some("max_output_tokens"))
    );
    assert_eq!(
        (b["output"][0]["status"].as_str(), b["usage"]["output_tokens"].as_u64()),
        (Some("incomplete"), Some(2))
    );
    let mut sb = json!({"input": turns, "max_output_tokens": 2, "temperature": 0, "stream": true});
    sb["instructions"] = b["instructions"].clone();
    let events = sse_named(&url, sb);
    let s = check_events(&events);
    assert_eq!((&s["status"], &s["output"][0]["content"]), (&b["status"], &b["output"][0]["content"]));
}

#[test]
fn responses_tool_round_trip_and_structured_output() {
    let base = start(8);
    let url = format!("{base}/v1/responses");
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let q = json!({"role": "user", "content": "What is the weather in Verona?"});
    let (st, a) = post(&url, json!({"input": [q], "tools": tools, "temperature": 0, "max_output_tokens": 60}));
    assert_eq!(st, 200, "{a}");
    let call = a["output"].as_array().unwrap().iter().find(|o| o["type"] == "function_call").expect("a call").clone();
    assert_eq!((call["name"].as_str(), call["status"].as_str()), (Some("get_weather"), Some("completed")), "{a}");
    assert!(call["id"].as_str().unwrap().starts_with("fc_") && call["call_id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Verona");
    assert_eq!(a["tools"], tools);

    // forced and streamed: the call's own events, in OpenAI's order
    let events = sse_named(
        &url,
        json!({"input": [q], "tools": tools, "temperature": 0, "max_output_tokens": 60, "stream": true,
            "tool_choice": {"type": "function", "name": "get_weather"}}),
    );
    let last = check_events(&events);
    assert_eq!(last["output"].as_array().unwrap().len(), 1, "{last}");
    assert_eq!(
        item_events(&events, 0),
        ["output_item.added", "function_call_arguments.delta", "function_call_arguments.done", "output_item.done"]
    );
    assert_eq!(events[2].1["item"]["type"], "function_call");
    let delta = events.iter().find(|e| e.0 == "response.function_call_arguments.delta").unwrap();
    assert_eq!(delta.1["delta"], last["output"][0]["arguments"]);
    assert_eq!(delta.1["item_id"], last["output"][0]["id"]);

    // the call and its output go back as input items; the model answers from them
    let input = json!([q, call, {"type": "function_call_output", "call_id": call["call_id"],
        "output": "{\"city\": \"Verona\", \"weather\": \"sunny\", \"temperature\": 21}"}]);
    let (st, b) = post(&url, json!({"input": input, "tools": tools, "temperature": 0, "max_output_tokens": 40}));
    assert_eq!(st, 200, "{b}");
    let answer = b["output"][0]["content"][0]["text"].as_str().unwrap();
    assert!(answer.contains("Verona") && answer.contains("sunny"), "{answer}");
    assert!(b["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);

    // text.format json_schema: the answer is JSON of the schema
    let schema = json!({"type": "object", "properties": {"speaker": {"type": "string", "enum": ["ROMEO", "JULIET", "NURSE"]},
        "mood": {"type": "string", "enum": ["happy", "sad"]}, "aside": {"type": "boolean"}},
        "required": ["speaker", "mood", "aside"], "additionalProperties": false});
    let format = json!({"format": {"type": "json_schema", "name": "line", "schema": schema, "strict": true}});
    let (st, c) =
        post(&url, json!({"input": "Who speaks?", "text": format, "temperature": 0, "max_output_tokens": 60}));
    assert_eq!(st, 200, "{c}");
    let text = c["output"][0]["content"][0]["text"].as_str().unwrap();
    let line: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {c}"));
    assert!(["ROMEO", "JULIET", "NURSE"].contains(&line["speaker"].as_str().unwrap()), "{line}");
    assert!(["happy", "sad"].contains(&line["mood"].as_str().unwrap()) && line["aside"].is_boolean(), "{line}");
    assert_eq!(c["text"], format);
}

#[test]
fn responses_bad_input_is_refused_naming_the_field() {
    let base = start(8);
    let url = format!("{base}/v1/responses");
    let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
    for (bad, param) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": 5}), "input"),
        (json!({"input": [{"role": "wizard", "content": "x"}]}), "input"),
        (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}), "input"),
        (json!({"input": [{"type": "item_reference", "id": "msg_1"}]}), "input"),
        (json!({"input": [{"type": "function_call_output", "call_id": "c"}]}), "input"),
        (json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}), "input"),
        (json!({"seed": 1}), "seed"),
        (json!({"messages": []}), "messages"),
        (json!({"store": true}), "store"),
        (json!({"previous_response_id": "resp_1"}), "previous_response_id"),
        (json!({"include": ["reasoning.encrypted_content"]}), "include"),
        (json!({"background": true}), "background"),
        (json!({"truncation": "auto"}), "truncation"),
        (json!({"instructions": 3}), "instructions"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (json!({"max_output_tokens": 1.5}), "max_output_tokens"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"stream": "yes"}), "stream"),
        (json!({"metadata": {"k": 1}}), "metadata"),
        (json!({"parallel_tool_calls": "no"}), "parallel_tool_calls"),
        (json!({"tools": [{"type": "web_search"}]}), "tools"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": tools, "tool_choice": {"type": "function", "name": "g"}}), "tool_choice"),
        (json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}), "tool_choice"),
        (
            json!({"tools": tools, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}),
            "tool_choice",
        ),
        (json!({"text": {"format": {"type": "json_schema", "name": "x"}}}), "text"),
        (json!({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}), "text"),
        (json!({"text": {"format": {"type": "xml"}}}), "text"),
        (json!({"text": {"verbosity": "high"}}), "text"),
        (json!({"reasoning": {"effort": "max"}}), "reasoning"),
        (json!({"reasoning": {"budget": 10}}), "reasoning"),
    ] {
        let mut b = json!({"input": "Speak as ROMEO.", "max_output_tokens": 2});
        b.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        if bad.get("input").is_none() && param == "input" {
            b.as_object_mut().unwrap().remove("input");
        }
        let (st, e) = post(&url, b);
        assert_eq!((st, e["error"]["param"].as_str()), (400, Some(param)), "{bad}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let (st, e) = post(&url, json!({"model": "gpt-5", "input": "x"}));
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("model_not_found")));
    let r = client().post(&url).header("content-type", "application/json").body("[1]").send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    for ok in [
        json!({"store": false, "parallel_tool_calls": false, "user": "u", "prompt_cache_key": "k", "include": []}),
        json!({"reasoning": {"effort": "none", "summary": "auto"}, "text": {"format": {"type": "text"}}}),
        json!({"reasoning": {"effort": "high"}, "truncation": "disabled", "tool_choice": "none", "tools": tools}),
    ] {
        let mut b = json!({"input": "Speak as ROMEO.", "max_output_tokens": 2});
        b.as_object_mut().unwrap().extend(ok.as_object().unwrap().clone());
        let (st, r) = post(&url, b);
        assert_eq!(st, 200, "{ok}: {r}");
    }
    assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
}

#[test]
fn responses_disconnect_stops_generation() {
    let base = start(8);
    let url = format!("{base}/v1/responses");
    let body = json!({"input": "Speak as ROMEO.", "max_output_tokens": 900, "stream": true, "temperature": 1,
        "text": long_format(4000)});
    let mut whole = body.clone();
    (whole["stream"], whole["max_output_tokens"]) = (json!(false), json!(50));
    let (st, a) = post(&url, whole);
    assert_eq!((st, a["status"].as_str()), (200, Some("incomplete")), "{a}");
    let r = client().post(&url).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut lines = BufReader::new(r).lines();
    assert!(lines.by_ref().map_while(Result::ok).any(|l| l.contains("response.output_text.delta")));
    drop(lines); // the client goes away
    // queued behind it, this one runs once the engine is free
    let (st, a) = post(&url, json!({"input": "Speak as JULIET.", "max_output_tokens": 2}));
    assert_eq!(st, 200, "{a}");
    let done = metric(&base, "flashmoe_completion_tokens_total");
    assert!(done < 900.0 + 50.0, "generation went on after the disconnect: {done} tokens");
}

/// A JSON schema of one string of `n` characters at least: only `max_output_tokens`, a
/// disconnect or a stop can end its answer early.
fn long_format(n: usize) -> Value {
    let schema = json!({"type": "object", "properties": {"s": {"type": "string", "minLength": n}}, "required": ["s"]});
    json!({"format": {"type": "json_schema", "name": "long", "schema": schema}})
}

#[test]
fn stopping_fails_a_streamed_response() {
    let (base, stop, server) =
        start_stoppable(ServerOptions { model_id: "m".into(), max_batch: 1, ..Default::default() });
    let body =
        json!({"input": "Speak as ROMEO.", "max_output_tokens": 1000, "stream": true, "text": long_format(4000)});
    let r = client().post(format!("{base}/v1/responses")).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines().map_while(Result::ok);
    assert!(lines.by_ref().any(|l| l.contains("response.output_text.delta")));
    stop.send(()).unwrap();
    let last = lines.filter_map(|l| l.strip_prefix("data: ").map(String::from)).last().unwrap_or_default();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["type"], "response.failed", "{last}");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["message"], "the server is shutting down");
    server.join().unwrap();
}

/// The official `openai` Python client against `/v1/responses`: text whole and streamed (raw
/// events and the stream helper), instructions with a multi-turn input, a forced function call
/// and its output, `responses.parse` with a pydantic model, json_object, and refusals.
#[test]
fn official_openai_python_client_responses() {
    let py = python_with("openai", "openai");
    let base = start(8);
    run_client(&py, "responses_client.py", &format!("{base}/v1"), "all responses client checks passed");
}

/// The prompt cache across a restart: a new server on the same cache directory answers the
/// same request from the saved state (and says so in `usage`), and another conversation with
/// the same system prompt from its shared prefix; the answers are the ones computed cold.
#[test]
fn a_restarted_server_resumes_prompts_from_the_prompt_cache() {
    let cache = tempfile::tempdir().unwrap();
    let server = || {
        let dir = model_dir();
        let model = load_model(dir).unwrap();
        let pc = flashmoe::prompt_cache::PromptCache::for_model(dir, &model, Some(cache.path().into()), None).unwrap();
        let mut s = Session::new(model, TextTokenizer::load(dir).unwrap());
        s.set_prompt_cache(Some(pc));
        start_session(s, ServerOptions { default_max_tokens: 16, ..Default::default() })
    };
    let system =
        json!({"role": "system", "content": "You are a player in Shakespeare's company, and you answer in verse."});
    let ask = |base: &str, user: &str| {
        let body =
            json!({"model": "flashmoe", "messages": [system, {"role": "user", "content": user}], "temperature": 0});
        let (st, b) = post(&format!("{base}/v1/chat/completions"), body);
        assert_eq!(st, 200, "{b}");
        let u = &b["usage"];
        let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        (
            b["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
            u["prompt_tokens"].as_u64().unwrap(),
            cached,
        )
    };
    let (base, stop, h) = server();
    let (a, prompt, cached) = ask(&base, "Speak as ROMEO.");
    assert_eq!(cached, 0);
    let (other_cold, _, _) = ask(&base, "Now speak as JULIET, briefly.");
    stop.send(()).unwrap();
    h.join().unwrap();

    let (base, stop, h) = server();
    let (again, _, cached) = ask(&base, "Speak as ROMEO.");
    assert_eq!((again, cached), (a, prompt - 1));
    // a new server again: this one has only the disk, and the first answer's prompt in it
    stop.send(()).unwrap();
    h.join().unwrap();
    let (base, _stop, _h) = server();
    let (other, other_prompt, cached) = ask(&base, "Now speak as JULIET, briefly.");
    assert_eq!(other, other_cold);
    assert_eq!(cached, other_prompt - 1, "the second conversation's own entry");
    let (_, p, cached) = ask(&base, "And now as MERCUTIO.");
    assert!(cached > 10 && cached < p - 5, "the shared system prompt: {cached} of {p}");
}

/// Streamed text and the time of each content chunk, of one `/v1/completions` request.
fn timed_stream(url: &str, body: Value) -> (String, Vec<std::time::Instant>) {
    timed_stream_then(url, body, || {})
}

/// [`timed_stream`], calling `first` once the first content chunk has come.
fn timed_stream_then(url: &str, body: Value, first: impl FnOnce()) -> (String, Vec<std::time::Instant>) {
    let mut first = Some(first);
    let r = client().post(url).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (mut text, mut at) = (String::new(), vec![]);
    for l in BufReader::new(r).lines().map_while(Result::ok) {
        let Some(d) = l.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(t) = c["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
            text.push_str(t);
            at.push(std::time::Instant::now());
            if let Some(f) = first.take() {
                f();
            }
        }
    }
    (text, at)
}

/// Concurrent streamed requests decode together (continuous batching): each client gets the
/// greedy text it gets alone, the decode steps hold several sequences, and a request that
/// arrives while another generates streams its whole answer before that one has finished.
#[test]
fn concurrent_streams_decode_together_and_each_gets_its_text_alone() {
    // a long gather window: see n_choices_decode_as_one_batch_each_as_alone
    let base = start_with(ServerOptions {
        model_id: "m".into(),
        max_batch: 4,
        max_queue: 4,
        batch_wait: Duration::from_secs(2),
        ..Default::default()
    });
    let url = format!("{base}/v1/completions");
    let tok = TextTokenizer::load(model_dir()).unwrap();
    let mut bias = serde_json::Map::new();
    for s in ["<|endoftext|>", "<|im_end|>"] {
        bias.insert(tok.token_to_id(s).unwrap().to_string(), json!(-100));
    }
    let body = |prompt: &str, n: usize| json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true, "logit_bias": bias});
    let prompts = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "HAMLET:"];
    // long enough that clients whose requests arrive apart (each thread starts when the OS
    // lets it) still share most steps
    let n = 100;
    let alone: Vec<String> = prompts.iter().map(|p| timed_stream(&url, body(p, n)).0).collect();
    assert!(alone.iter().all(|t| !t.is_empty()));
    let (steps0, rows0) =
        (metric(&base, "flashmoe_decode_steps_total"), metric(&base, "flashmoe_decode_step_sequences_total"));
    for round in 0..2 {
        let together: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts.iter().map(|p| s.spawn(|| timed_stream(&url, body(p, n)).0)).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "round {round}: a client's text differs from its text alone");
    }
    let (steps, rows) = (
        metric(&base, "flashmoe_decode_steps_total") - steps0,
        metric(&base, "flashmoe_decode_step_sequences_total") - rows0,
    );
    eprintln!("concurrent streams: {rows} sequences in {steps} steps");
    assert!(rows > 1.5 * steps, "decode steps were not shared: {rows} sequences in {steps} steps");

    // a long answer, and a short one asked for once the long one streams
    let (long, short) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let long = s.spawn(|| timed_stream_then(&url, body("ROMEO:", 400), move || tx.send(()).unwrap()));
        rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let short = timed_stream(&url, body("JULIET:", 8));
        (long.join().unwrap(), short)
    });
    let (long_end, short_begin, short_end) =
        (*long.1.last().unwrap(), *short.1.first().unwrap(), *short.1.last().unwrap());
    assert!(long.1[0] < short_begin, "the long answer began first");
    assert!(short_end < long_end, "the second request waited for the first to finish");
}
