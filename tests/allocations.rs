//! Heap allocations on the per-token decode path, counted by a wrapping global allocator.

use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::{CacheMode, StoreOptions};
use flashmoe::load::{LoadOptions, load_model, load_model_with};
use flashmoe::model::Model;
use flashmoe::tensor::WKind;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(l.size() as u64, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(n as u64, Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Allocations per decoded token of `m`, after a prompt and a few tokens of warm-up.
fn per_token(m: &Model) -> f64 {
    let mut st = m.new_state();
    m.forward(&mut st, &[1, 2, 3, 4], false).unwrap();
    for t in 0..4 {
        m.forward(&mut st, &[5 + t], false).unwrap();
    }
    let a0 = ALLOCS.load(Relaxed);
    let steps = 24;
    for t in 0..steps {
        m.forward(&mut st, &[10 + t], false).unwrap();
    }
    (ALLOCS.load(Relaxed) - a0) as f64 / steps as f64
}

/// Once warm, a decode step allocates only the logits it returns, plus the occasional growth
/// of the KV cache (amortized doubling): every temporary of the layers, the routing and the
/// expert store comes from reused buffers. Counted over all threads, so the models run one
/// at a time in this test binary.
#[test]
fn decode_steps_allocate_only_their_logits() {
    let fixture = |name: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let tmp = tempfile::tempdir().unwrap();
    // latent attention (deepseek_v3) and sliding-window layers (gpt_oss) too: 1.00 each
    for name in ["qwen35_text", "qwen3_moe", "qwen3_next", "deepseek_v3", "gpt_oss"] {
        let m = load_model(&fixture(name)).unwrap();
        let a = per_token(&m);
        eprintln!("{name}, in memory: {a:.2} allocations / token");
        assert!(a <= 1.5, "{name}: {a:.2} allocations per decoded token");
        let out = tmp.path().join(name);
        let opts = ConvertOptions {
            experts: WKind::Q { bits: 4, group: 64 },
            dense: WKind::BF16,
            force: false,
            progress: false,
        };
        convert(&fixture(name), &out, &opts).unwrap();
        for (mode, prefetch) in [(CacheMode::Os, false), (CacheMode::Direct, true)] {
            let lo = LoadOptions {
                store: StoreOptions { mode, cache_bytes: 1 << 30, io_threads: 2, max_batch: 8, prefetch },
                ..Default::default()
            };
            let m = load_model_with(&out, &lo).unwrap();
            let a = per_token(&m);
            eprintln!("{name}, {mode:?} store, prefetch {prefetch}: {a:.2} allocations / token");
            assert!(a <= 1.5, "{name} {mode:?}: {a:.2} allocations per decoded token");
        }
    }
}
