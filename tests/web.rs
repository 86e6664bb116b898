//! The chat page at `/` and its metrics stream: the page loads without the API key while the
//! API wants it, the stream's counters agree with `/metrics` and the work done, an open stream
//! does not hold a graceful stop; and (tests/web_browser.js) the page driven in a real headless
//! Chromium against `flashmoe serve`.

mod common;

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::{CacheMode, StoreOptions};
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::server::ServerOptions;
use flashmoe::session::Session;
use flashmoe::tensor::WKind;
use flashmoe::tokenizer::TextTokenizer;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The built-in model converted to the flash layout as `flashmoe` converts it on first use
/// (its experts streamed from disk), in a directory of this test's own.
fn flash_model() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let opts =
            ConvertOptions { experts: flashmoe::builtin::EXPERTS, dense: WKind::BF16, force: false, progress: false };
        convert(Path::new(flashmoe::builtin::SOURCE), &t.path().join("default"), &opts).unwrap();
        t
    });
    dir.path().join("default")
}

/// A server on a loopback port with the converted built-in model, its experts read with
/// O_DIRECT into a 1 MiB cache (so the counters move); its URL, a sender that stops it, and
/// its thread.
fn start(opts: ServerOptions) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let dir = flash_model();
    let lo = LoadOptions {
        store: StoreOptions { mode: CacheMode::Direct, cache_bytes: 1 << 20, ..Default::default() },
        ..Default::default()
    };
    let session = Session::new(load_model_with(&dir, &lo).unwrap(), TextTokenizer::load(&dir).unwrap());
    common::serve(session, opts)
}

fn options(api_key: Option<&str>) -> ServerOptions {
    ServerOptions { model_id: "flashmoe-default".into(), api_key: api_key.map(String::from), ..Default::default() }
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// A Prometheus value from `/metrics`.
fn metric(base: &str, name: &str) -> f64 {
    let text = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("{name}: {text}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_page_loads_without_the_key_and_the_api_wants_it() {
    let (base, stop, h) = start(options(Some("sesame")));
    let c = client();
    for (path, kind, marker) in [
        ("/", "text/html; charset=utf-8", "<script src=\"app.js\""),
        ("/app.js", "text/javascript; charset=utf-8", "/v1/chat/completions"),
        ("/app.css", "text/css; charset=utf-8", "prefers-color-scheme: dark"),
    ] {
        let r = c.get(format!("{base}{path}")).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind, "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{path}: {csp}");
        let body = r.text().unwrap();
        assert!(body.contains(marker), "{path}");
        // nothing from the network: no CDN, no fonts (the SVG namespace is a name, not a fetch)
        let local = body.replace("http://www.w3.org/2000/svg", "");
        assert!(!local.contains("http://") && !local.contains("https://") && !local.contains("@import"), "{path}");
    }
    // the API behind the page still wants the key
    for path in ["/v1/metrics/stream", "/v1/metrics/snapshot", "/v1/models"] {
        assert_eq!(c.get(format!("{base}{path}")).send().unwrap().status().as_u16(), 401, "{path}");
    }
    let r = c.get(format!("{base}/v1/metrics/snapshot")).bearer_auth("sesame").send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s: Value = r.json().unwrap();
    assert_eq!((s["model"].as_str(), s["context"].as_u64()), (Some("flashmoe-default"), Some(1024)), "{s}");
    assert!(s["experts"]["bytes_read"].is_u64(), "a streamed model reports its expert I/O: {s}");
    // a bad interval is named
    for q in ["interval_ms=5", "interval_ms=abc"] {
        let r = c.get(format!("{base}/v1/metrics/stream?{q}")).bearer_auth("sesame").send().unwrap();
        assert_eq!(r.status().as_u16(), 400, "{q}");
        let e: Value = r.json().unwrap();
        assert_eq!(e["error"]["param"], "interval_ms", "{q}: {e}");
    }
    // a path next to the page's is not public
    assert_eq!(c.get(format!("{base}/app.json")).send().unwrap().status().as_u16(), 401);
    let _ = stop.send(());
    h.join().unwrap();
}

/// The snapshots of `/v1/metrics/stream`, read on a thread of their own.
fn snapshots(url: String) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = Client::builder().build().unwrap().get(url).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Some(d) = line.strip_prefix("data: ")
                && tx.send(serde_json::from_str::<Value>(d).unwrap()).is_err()
            {
                return;
            }
        }
    });
    rx
}

#[test]
fn metrics_stream_counts_the_work_and_agrees_with_metrics() {
    let (base, stop, h) = start(options(None));
    let rx = snapshots(format!("{base}/v1/metrics/stream?interval_ms=100"));
    let next = || rx.recv_timeout(Duration::from_secs(10)).expect("a snapshot within 10 s");
    let first = next();
    assert_eq!(first["context"], 1024);
    let body = json!({"messages": [{"role": "user", "content": "Speak as ROMEO."}], "max_tokens": 16,
                      "temperature": 0});
    let r = client().post(format!("{base}/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let a: Value = r.json().unwrap();
    let made = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(made > 1, "{a}");
    // snapshots until the request has been counted, each later than the one before
    let (mut last, t0) = (first.clone(), Instant::now());
    loop {
        let s = next();
        assert!(s["t_ms"].as_u64() > last["t_ms"].as_u64(), "{s} after {last}");
        last = s;
        if last["completion_tokens"].as_u64() == Some(made) && last["generating"] == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the request never showed: {last}");
    }
    let n = |s: &Value, p: &str| s.pointer(p).and_then(Value::as_u64).unwrap_or_else(|| panic!("{p}: {s}"));
    // the first token comes from the prefill, each later one from a decode step
    let decoded = n(&last, "/decoded_tokens") - n(&first, "/decoded_tokens");
    assert!((made - 1..=made).contains(&decoded), "{decoded} decoded for {made} tokens");
    // each decode step routes 4 experts in each of the 8 layers, through the store
    let fetched = |s: &Value| n(s, "/experts/hits") + n(s, "/experts/misses");
    assert!(fetched(&last) - fetched(&first) >= 32 * decoded, "{first} → {last}");
    assert!(n(&last, "/experts/bytes_read") > n(&first, "/experts/bytes_read"), "a 1 MiB cache reads: {last}");
    assert!(n(&last, "/experts/io_wait_ns") > n(&first, "/experts/io_wait_ns"), "{last}");
    // the same counters as /metrics
    for (p, name) in [
        ("/decoded_tokens", "flashmoe_decode_step_sequences_total"),
        ("/decode_steps", "flashmoe_decode_steps_total"),
        ("/completion_tokens", "flashmoe_completion_tokens_total"),
        ("/experts/bytes_read", "flashmoe_expert_bytes_read_total"),
        ("/experts/reads", "flashmoe_expert_reads_total"),
    ] {
        assert_eq!(n(&last, p) as f64, metric(&base, name), "{p}");
    }
    let speed = last["last_decode_tok_s"].as_f64().unwrap();
    assert!(speed > 0.0 && speed == metric(&base, "flashmoe_decode_tokens_per_second"), "{last}");
    // an open stream does not hold a graceful stop, and it ends
    let t = Instant::now();
    let _ = stop.send(());
    h.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "the stop waited {:?}", t.elapsed());
    while rx.recv_timeout(Duration::from_secs(5)).is_ok() {}
}

/// Chromium's binary: $FLASHMOE_CHROMIUM when set, else Debian's package.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHMOE_CHROMIUM").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let known = ["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from);
    known.into_iter().find(|p| p.exists())
}

/// `node_modules` under target/ with puppeteer-core (no browser download) and pngjs, installed
/// from npm when missing.
fn node_modules() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-node");
    let modules = dir.join("node_modules");
    if !["puppeteer-core", "pngjs"].iter().all(|p| modules.join(p).join("package.json").exists()) {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(["puppeteer-core@24.43.1", "pngjs@7.0.0"])
            .env("PUPPETEER_SKIP_DOWNLOAD", "1")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "npm install puppeteer-core pngjs failed (the npm registry must be reachable)");
    }
    modules
}

/// `flashmoe serve`, killed when dropped.
struct Server {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary's `serve` on a free port; its URL once it listens.
fn serve(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env_remove("FLASHMOE_MODEL")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let (err, l) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(url) = line.split(" on http://").nth(1).filter(|_| line.starts_with("flashmoe serving")) {
                let _ = tx.send(format!("http://{url}"));
            }
            l.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let server = Server { child, log };
    let url = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
        panic!("flashmoe serve did not start:\n{}", server.log.lock().unwrap());
    });
    (server, url)
}

/// The page in headless Chromium (tests/web_browser.js): the key prompt, streamed replies
/// matching the API's, Esc stopping a reply and the server's decoding with it, collapsed
/// reasoning, a tool call, history and settings across a reload, keyboard focus, phone width,
/// and screenshots checked for colours.
#[test]
fn real_browser_drives_the_chat_page() {
    let Some(chromium) = chromium() else {
        println!("skipped: chromium not available (apt-get install chromium, or set FLASHMOE_CHROMIUM)");
        return;
    };
    if !Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!("skipped: node not available (apt-get install nodejs npm)");
        return;
    }
    let modules = node_modules();
    // the built-in model, as a user runs it (converted under ~/.cache/flashmoe on first use)
    let (server, base) =
        serve(&["--api-key", "sesame", "--cache", "direct", "--cache-size", "1M", "--no-prompt-cache"]);
    let tok = TextTokenizer::load(Path::new(flashmoe::builtin::SOURCE)).unwrap();
    let no_eos: serde_json::Map<String, Value> = ["<|endoftext|>", "<|im_end|>"]
        .iter()
        .map(|t| (tok.token_to_id(t).unwrap().to_string(), json!(-100)))
        .collect();
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-screenshots");
    std::fs::create_dir_all(&out_dir).unwrap();
    let t = Instant::now();
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web_browser.js"))
        .args([base.as_str(), "sesame"])
        .arg(&chromium)
        .arg(&out_dir)
        .arg(Value::Object(no_eos).to_string())
        .env("NODE_PATH", &modules)
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{so}browser checks took {:.1} s; screenshots in {}", t.elapsed().as_secs_f64(), out_dir.display());
    assert!(
        out.status.success() && so.contains("all browser checks passed"),
        "tests/web_browser.js failed:\n{so}\n{se}\nserver log:\n{}",
        server.log.lock().unwrap()
    );
}
