//! The persistent prompt cache: a saved state loads back bit for bit on every fixture family
//! and continues exactly as the state in memory does; entries are found again by a new store (a
//! restart) and by new sessions; broken, truncated and foreign entries are refused and removed;
//! the size bound holds, least recently used first.

mod common;

use common::FIXTURES;
use flashmoe::generate::SamplingParams;
use flashmoe::layers::attention::KvType;
use flashmoe::load::load_model;
use flashmoe::model::{Model, State, StateBuf};
use flashmoe::prompt_cache::{self, PromptCache, entry_name, model_identity, read_state, write_state};
use flashmoe::session::Session;
use flashmoe::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn model(name: &str) -> Model {
    let mut m = load_model(&dir(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    m.opts.precision = flashmoe::tensor::Precision::Exact;
    m
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + 11) % 300).collect()
}

fn same_state(a: &State, b: &State, what: &str) {
    assert_eq!(a.pos, b.pos, "{what}: positions");
    assert_eq!(a.layers.len(), b.layers.len());
    for (i, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        assert_eq!(x.kind(), y.kind(), "{what}: layer {i}");
        for (p, q) in x.buffers().iter().zip(y.buffers()) {
            let bytes = |b: &flashmoe::model::StateBuf<'_>| {
                let mut v = vec![];
                b.le_bytes(0, b.len(), &mut v);
                v
            };
            assert!(bytes(p) == bytes(&q), "{what}: layer {i} differs");
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn saved_states_load_bit_for_bit_and_continue_identically_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, kv) in FIXTURES.iter().flat_map(|n| [KvType::F32, KvType::Bf16, KvType::F16].map(|t| (n, t))) {
        let mut m = model(name);
        m.opts.kv_cache = kv;
        let name = &format!("{name} {kv}");
        let id = model_identity(&dir(name.split(' ').next().unwrap()), &m);
        let p = prompt(40);
        let mut st = m.new_state();
        m.forward(&mut st, &p[..30], false).unwrap();
        let path = tmp.path().join(format!("{name}.fmpc"));
        let mut f = std::fs::File::create(&path).unwrap();
        write_state(&mut f, &id, &p[..30], &st).unwrap();
        drop(f);
        let (tokens, mut loaded) = read_state(&path, &m, &id).unwrap();
        assert_eq!(tokens, p[..30]);
        same_state(&st, &loaded, name);
        // the rest of the prompt, then decode steps: the same logits, bit for bit
        let a = m.forward(&mut st, &p[30..38], true).unwrap();
        let b = m.forward(&mut loaded, &p[30..38], true).unwrap();
        assert!(bits(&a) == bits(&b), "{name}: prefill after loading differs");
        for &t in &p[38..40] {
            let a = m.forward(&mut st, &[t], false).unwrap();
            let b = m.forward(&mut loaded, &[t], false).unwrap();
            assert!(bits(&a) == bits(&b), "{name}: decode after loading differs");
        }
    }
}

#[test]
fn a_kv_entry_serves_shorter_prefixes_and_a_recurrent_one_only_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    // gpt-oss's sliding layers keep only their window's rows: like a recurrent state, not a
    // prefix's
    for (name, truncatable, kv) in [
        ("qwen3_moe", true, KvType::F32),
        ("qwen3_moe", true, KvType::Bf16),
        ("deepseek_v3", true, KvType::F16),
        ("gpt_oss", false, KvType::Bf16),
        ("qwen3_next", false, KvType::F32),
    ] {
        let mut m = model(name);
        m.opts.kv_cache = kv;
        let id = model_identity(&dir(name), &m);
        let mut pc = PromptCache::open(tmp.path().join(format!("{name}-{kv}")), id, 1 << 30).unwrap();
        let p = prompt(40);
        let mut st = m.new_state();
        m.forward(&mut st, &p[..30], false).unwrap();
        pc.save(&p[..30], &st, truncatable).unwrap();
        pc.flush();
        // a prompt that agrees on 20 tokens, then differs
        let mut q = p[..20].to_vec();
        q.extend([1, 2, 3, 4, 5]);
        let hit = pc.lookup(&q, truncatable, 0);
        if !truncatable {
            assert_eq!(hit, None, "{name}");
            assert_eq!(pc.lookup(&p[..31], false, 0).map(|h| h.1), Some(30));
            continue;
        }
        let (entry, n) = hit.unwrap();
        assert_eq!(n, 20);
        let cut = pc.load(&m, &entry, 20).unwrap();
        let mut fresh = m.new_state();
        m.forward(&mut fresh, &p[..30], false).unwrap();
        for l in &mut fresh.layers {
            assert!(l.truncate(30, 20));
        }
        fresh.pos = 20;
        same_state(&fresh, &cut, name);
        // the whole entry is never all of a prompt: one token is left to give the logits
        assert_eq!(pc.lookup(&p[..30], true, 0).map(|h| h.1), Some(29));
        assert_eq!(pc.lookup(&p[..30], true, 29), None);
    }
}

/// The error names the file, the entry is removed, nothing panics.
fn rejected(pc: &mut PromptCache, m: &Model, name: &str, len: usize, what: &str) {
    let path = pc.dir().join(name);
    let e = format!("{:#}", pc.load(m, name, len).err().unwrap_or_else(|| panic!("{what}: loaded")));
    assert!(e.contains(&path.display().to_string()), "{what}: {e}");
    assert!(!path.exists(), "{what}: not removed");
    eprintln!("{what}: {e}");
}

/// A KV cache of another type is refused, the error naming the file and both types (each run's
/// identity names a 16-bit type too, so a store never offers one); a file written before
/// caches had a type (an f32 cache, kind `kv`: scripts/make_old_prompt_cache.sh) loads as one.
#[test]
fn another_cache_type_is_refused_by_name_and_an_old_file_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = prompt(20);
    for (wrote, read) in [(KvType::Bf16, KvType::F32), (KvType::F32, KvType::F16), (KvType::F16, KvType::Bf16)] {
        let mut m = model("qwen3_moe");
        m.opts.kv_cache = wrote;
        let id = model_identity(&dir("qwen3_moe"), &m);
        let mut st = m.new_state();
        m.forward(&mut st, &p, false).unwrap();
        let path = tmp.path().join(format!("{wrote}.fmpc"));
        write_state(&mut std::fs::File::create(&path).unwrap(), &id, &p, &st).unwrap();
        m.opts.kv_cache = read;
        assert_ne!(model_identity(&dir("qwen3_moe"), &m), id, "{wrote} vs {read}: one identity");
        let e = format!("{:#}", read_state(&path, &m, &id).expect_err("loaded another type"));
        let (w, r) = (format!("a KV cache of type {wrote}"), format!("this run's is {read}"));
        assert!(e.contains(&path.display().to_string()) && e.contains(&w) && e.contains(&r), "{e}");
        // the files say their type: an f32 cache as every file before them did
        let h = prompt_cache::read_header(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let want = match wrote {
            KvType::F32 => "kv",
            KvType::Bf16 => "kv-bf16",
            KvType::F16 => "kv-f16",
        };
        assert!(h.layers.iter().all(|(k, _)| k == want || k == "delta"), "{:?}", h.layers);
    }
    // the old file: its own identity (the fixture's files had other modification times)
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompt_cache_v1/gpt_oss.fmpc");
    let h = prompt_cache::read_header(&mut std::fs::File::open(&old).unwrap()).unwrap();
    assert!(h.identity.contains("precision=Exact") && !h.identity.contains("kv_cache"), "{}", h.identity);
    let m = model("gpt_oss");
    let (tokens, mut loaded) = read_state(&old, &m, &h.identity).unwrap();
    let mut fresh = m.new_state();
    m.forward(&mut fresh, &tokens, false).unwrap();
    // the file was computed on x86 with AVX-512: the same numbers up to the kernels' rounding
    // (bit for bit there; another ISA sums in another order)
    let close = |a: &[f32], b: &[f32], what: &str| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.len() == b.len() && err <= 1e-4 * scale, "{what}: error {err} of {scale}");
    };
    for (i, (x, y)) in fresh.layers.iter().zip(&loaded.layers).enumerate() {
        assert_eq!(x.kind(), y.kind(), "old file: layer {i}");
        for (p, q) in x.buffers().into_iter().zip(y.buffers()) {
            let (StateBuf::F32(p), StateBuf::F32(q)) = (p, q) else { panic!("old file: layer {i} is not f32") };
            close(p, q, &format!("old file: layer {i}"));
        }
    }
    let (a, b) = (m.forward(&mut fresh, &[5], false).unwrap(), m.forward(&mut loaded, &[5], false).unwrap());
    close(&b, &a, "decode after the old file");
    let mut m16 = model("gpt_oss");
    m16.opts.kv_cache = KvType::Bf16;
    let e = format!("{:#}", read_state(&old, &m16, &h.identity).expect_err("an f32 file in a bf16 run"));
    assert!(e.contains("a KV cache of type f32, this run's is bf16") && e.contains("gpt_oss.fmpc"), "{e}");
}

#[test]
fn broken_truncated_and_foreign_entries_are_refused_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("qwen3_next");
    let id = model_identity(&dir("qwen3_next"), &m);
    let p = prompt(30);
    let mut st = m.new_state();
    m.forward(&mut st, &p, false).unwrap();
    let mut good = vec![];
    write_state(&mut good, &id, &p, &st).unwrap();
    let name = entry_name(&p);
    let mut pc = PromptCache::open(tmp.path().to_path_buf(), id.clone(), 1 << 30).unwrap();
    let put = |bytes: &[u8]| std::fs::write(tmp.path().join(&name), bytes).unwrap();

    put(&good);
    assert!(pc.load(&m, &name, 30).is_ok());
    // a flipped bit in the data, in the header, a cut file, a longer one, another version
    let mut bad = good.clone();
    let at = bad.len() - 100;
    bad[at] ^= 1;
    put(&bad);
    rejected(&mut pc, &m, &name, 30, "flipped data bit");
    let mut bad = good.clone();
    bad[20] ^= 0x40;
    put(&bad);
    rejected(&mut pc, &m, &name, 30, "flipped header bit");
    put(&good[..good.len() / 2]);
    rejected(&mut pc, &m, &name, 30, "truncated");
    put(&good[..10]);
    rejected(&mut pc, &m, &name, 30, "truncated header");
    let mut bad = good.clone();
    bad.extend([0; 8]);
    put(&bad);
    rejected(&mut pc, &m, &name, 30, "trailing bytes");
    let mut bad = good.clone();
    bad[8] = 99;
    put(&bad);
    rejected(&mut pc, &m, &name, 30, "version");
    put(b"not a cache file at all");
    rejected(&mut pc, &m, &name, 30, "garbage");
    // another model's state under this model's identity: the shapes do not match
    let other = model("qwen3_moe");
    let mut ost = other.new_state();
    other.forward(&mut ost, &p, false).unwrap();
    let mut foreign = vec![];
    write_state(&mut foreign, &id, &p, &ost).unwrap();
    put(&foreign);
    rejected(&mut pc, &m, &name, 30, "another model's shapes");
    // the same model with other options is another identity
    let mut fast = model("qwen3_next");
    fast.opts.precision = flashmoe::tensor::Precision::Fast;
    assert_ne!(model_identity(&dir("qwen3_next"), &fast), id);
    let mut foreign = vec![];
    write_state(&mut foreign, &model_identity(&dir("qwen3_next"), &fast), &p, &st).unwrap();
    put(&foreign);
    rejected(&mut pc, &m, &name, 30, "another identity");
    // lookup skips (and removes) what fails its header check
    put(&good[..good.len() - 1]);
    assert!(pc.load(&m, &name, 30).is_err());
    put(&good[..40]);
    assert_eq!(pc.lookup(&prompt(31), false, 0), None);
    assert!(!tmp.path().join(&name).exists());
}

#[test]
fn the_size_bound_evicts_the_least_recently_used() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("qwen3_next");
    let id = model_identity(&dir("qwen3_next"), &m);
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| prompt(20 + i))
        .map(|mut p| {
            p[0] = 299 - p.len() as u32;
            p
        })
        .collect();
    let states: Vec<State> = prompts
        .iter()
        .map(|p| {
            let mut st = m.new_state();
            m.forward(&mut st, p, false).unwrap();
            st
        })
        .collect();
    let one = prompt_cache::file_bytes(&id, &prompts[3], &states[3]);
    // room for three entries
    let mut pc = PromptCache::open(tmp.path().to_path_buf(), id.clone(), 3 * one + one / 2).unwrap();
    for i in 0..3 {
        pc.save(&prompts[i], &states[i], false).unwrap();
        pc.flush();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // using the oldest makes the second the least recently used
    let mut q = prompts[0].clone();
    q.push(7);
    let (entry, n) = pc.lookup(&q, false, 0).unwrap();
    assert_eq!(n, prompts[0].len());
    pc.load(&m, &entry, n).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    pc.save(&prompts[3], &states[3], false).unwrap();
    let held: Vec<Vec<u32>> = pc.list().into_iter().map(|e| e.0).collect();
    let total: u64 = pc.list().iter().map(|e| e.1).sum();
    assert!(total <= pc.limit(), "{total} bytes over the limit {}", pc.limit());
    assert_eq!(held.len(), 3);
    assert!(held.contains(&prompts[0]) && held.contains(&prompts[2]) && held.contains(&prompts[3]));
    assert!(!held.contains(&prompts[1]));
    // an entry larger than the whole bound is never written
    let mut tiny = PromptCache::open(tmp.path().join("tiny"), id, one / 2).unwrap();
    tiny.save(&prompts[0], &states[0], false).unwrap();
    assert!(tiny.list().is_empty());
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

fn session(name: &str, cache: Option<&Path>) -> Session {
    let m = model(name);
    let pc = cache.map(|d| PromptCache::open(d.to_path_buf(), model_identity(&dir(name), &m), 1 << 30).unwrap());
    let mut s = Session::new(m, TextTokenizer::load(&dir(name)).unwrap());
    s.set_prompt_cache(pc);
    s
}

/// What a new session (a restart: a new store on the same directory) finds: the whole prompt
/// again, one that extends it, and (KV caches) one that shares only a prefix; each generates
/// what a session without the cache generates.
#[test]
fn new_sessions_resume_from_the_cache_and_generate_the_same() {
    for name in ["qwen3_moe", "gpt_oss", "qwen3_next", "qwen35_text"] {
        let tmp = tempfile::tempdir().unwrap();
        let truncatable = !["qwen3_next", "qwen35_text", "gpt_oss"].contains(&name);
        let a = prompt(30);
        let mut longer = a.clone();
        longer.extend([5, 6, 7, 8]);
        let mut other = a[..24].to_vec();
        other.extend([9, 10, 11]);
        let cold = |p: &[u32]| session(name, None).generate(p, 6, &greedy(), &[], |_| true).unwrap().tokens;

        let mut s = session(name, Some(tmp.path()));
        // a boundary other prompts share (where a system prompt would end)
        s.snapshot_at(24);
        let o = s.generate(&a, 6, &greedy(), &[], |_| true).unwrap();
        assert_eq!((o.reused_tokens, o.loaded_tokens, &o.tokens), (0, 0, &cold(&a)), "{name}");
        drop(s);

        for (p, want) in [(&a, a.len() - 1), (&longer, a.len() - 1), (&other, 24)] {
            let mut s = session(name, Some(tmp.path()));
            let o = s.generate(p, 6, &greedy(), &[], |_| true).unwrap();
            eprintln!("{name}: {} of {} tokens loaded", o.loaded_tokens, p.len());
            assert_eq!((o.reused_tokens, o.loaded_tokens), (want, want), "{name}: {p:?}");
            assert_eq!(o.tokens, cold(p), "{name}: {p:?}");
        }
        let held = session(name, Some(tmp.path())).prompt_cache().unwrap().list();
        if truncatable {
            // one KV entry serves every prefix: the boundary's own was superseded
            assert!(
                held.iter().all(|e| e.0.len() != 24),
                "{name}: {:?}",
                held.iter().map(|e| e.0.len()).collect::<Vec<_>>()
            );
        } else {
            assert!(held.iter().any(|e| e.0.len() == 24), "{name}");
        }
    }
}
