//! What the integration tests share: a fixture's recorded float64 `transformers` outputs, the
//! ways logits are compared with them, and a server on a loopback port.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every fixture of scripts/make_fixtures.py: each family, and each of its checkpoint layouts.
pub const FIXTURES: &[&str] = &[
    "qwen35_text",
    "qwen35_fused",
    "qwen35_vl",
    "qwen3_next",
    "qwen3_moe",
    "qwen3_moe_norm",
    "mixtral",
    "minimax_m2",
    "glm4_moe",
    "glm4_moe_air",
    "minimax_m2_fp8",
    "gpt_oss",
    "gpt_oss_mxfp4",
    "deepseek_v3",
    "deepseek_v3_nolora",
    "deepseek_v3_fp8",
    "deepseek_v32",
    "glm_moe_dsa",
    "kimi_k25",
    "kimi_k25_int4",
];

/// Where the fixtures are: tests/fixtures, or `$FLASHMOE_FIXTURES` (variants made by
/// scripts/fixture_variants.sh, or the fixtures carried to another machine).
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("FLASHMOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

/// The directory of fixture `name`.
pub fn fixture_dir(name: &str) -> PathBuf {
    fixtures_root().join(name)
}

/// The fixtures of [`FIXTURES`] present under [`fixtures_root`] (all of them unless
/// `$FLASHMOE_FIXTURES` names a directory of only some).
pub fn fixtures() -> Vec<&'static str> {
    let root = fixtures_root();
    let have: Vec<&'static str> =
        FIXTURES.iter().copied().filter(|n| root.join(n).join("config.json").exists()).collect();
    assert!(!have.is_empty(), "no fixtures under {}", root.display());
    have
}

pub struct Reference {
    pub prompt: Vec<u32>,
    pub prefill: Vec<Vec<f64>>,
    pub greedy: Vec<u32>,
    pub decode: Vec<Vec<f64>>,
}

/// The `reference.json` of the fixture in `dir` (written by scripts/make_fixtures.py).
pub fn reference(dir: &Path) -> Reference {
    reference_file(&dir.join("reference.json"))
}

/// A reference record at `path` (a fixture's `reference.json`, or a copy of its fields).
pub fn reference_file(path: &Path) -> Reference {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let rows = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect::<Vec<Vec<f64>>>()
    };
    Reference {
        prompt: ids("prompt"),
        prefill: rows("prefill_logits"),
        greedy: ids("greedy"),
        decode: rows("decode_logits"),
    }
}

/// max |a − b| / max |b| over all rows.
pub fn rel_err(got: &[f32], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len() * want[0].len(), "row count");
    let scale = want.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = want.iter().flatten().zip(got).fold(0.0f64, |m, (w, g)| m.max((w - *g as f64).abs()));
    err / scale
}

/// (top-1 agreement, mean KL(reference ‖ got)) over rows of logits.
pub fn agreement(got: &[f32], want: &[Vec<f64>]) -> (f64, f64) {
    let v = want[0].len();
    let lsm = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        let z = r.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        r.iter().map(|x| x - z).collect::<Vec<_>>()
    };
    let argmax = |r: &[f64]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
    let (mut top, mut kl) = (0.0, 0.0);
    for (t, w) in want.iter().enumerate() {
        let g: Vec<f64> = got[t * v..(t + 1) * v].iter().map(|x| *x as f64).collect();
        top += (argmax(w) == argmax(&g)) as u8 as f64;
        let (p, q) = (lsm(w), lsm(&g));
        kl += p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
    }
    (top / want.len() as f64, kl / want.len() as f64)
}

/// `session` served on a loopback port on a thread of its own: its URL, a sender that stops it
/// gracefully, and the thread.
pub fn serve(
    session: flashmoe::session::Session,
    opts: flashmoe::server::ServerOptions,
) -> (String, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
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
