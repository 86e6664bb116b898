//! Time per `Model::forward_batch` step at batch sizes 1, 2, 4, 8 on a converted model, with
//! the phases of the profile (docs/PERFORMANCE.md, "Concurrent requests"); with CACHE_MB, the
//! experts are read with O_DIRECT through a direct cache of that size, and each batch size
//! also prints per token the distinct experts its steps needed, the reads and the cache hits.
//! Usage: cargo run --release --example batch_step -- MODEL_DIR [STEPS] [CACHE_MB]
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::profile::PROFILE;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or("/tmp/bM", |s| s.as_str()));
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let cache: Option<u64> = args.get(3).and_then(|s| s.parse().ok());
    let mut lo = LoadOptions::default();
    if let Some(mb) = cache {
        lo.store.mode = flashmoe::flash::CacheMode::Direct;
        lo.store.cache_bytes = mb << 20;
    }
    let m = load_model_with(&dir, &lo)?;
    let stats = || m.store.as_ref().map(|s| s.stats()).unwrap_or_default();
    let v = m.vocab_size() as u32;
    for b in [1usize, 2, 4, 8] {
        let mut states: Vec<_> = (0..b).map(|_| m.new_state()).collect();
        for (s, st) in states.iter_mut().enumerate() {
            m.forward(st, &[(s as u32 * 7 + 1) % v, (s as u32 * 13 + 2) % v], false)?;
        }
        let mut toks: Vec<u32> = (0..b as u32).map(|s| (s * 31 + 5) % v).collect();
        // one step to warm
        m.forward_batch(&mut states.iter_mut().collect::<Vec<_>>(), &toks)?;
        PROFILE.reset();
        let s0 = stats();
        let t = Instant::now();
        for i in 0..steps {
            toks.iter_mut().enumerate().for_each(|(s, k)| *k = (*k + 17 * i as u32 + s as u32) % v);
            m.forward_batch(&mut states.iter_mut().collect::<Vec<_>>(), &toks)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let p = PROFILE.snapshot();
        let per = |ns: u64| ns as f64 / 1e6 / steps as f64;
        println!(
            "B={b}: {ms:.1} ms/step, {:.1} tok/s; mixer {:.1} route {:.1} experts {:.1} shared {:.1} lm_head {:.1} ms",
            b as f64 * 1e3 / ms,
            per(p.mixer),
            per(p.route),
            per(p.experts),
            per(p.shared_expert),
            per(p.lm_head)
        );
        if cache.is_some() {
            let s1 = stats();
            let per_token = |v: u64| v as f64 / (steps * b) as f64;
            let (hits, misses) = (s1.hits - s0.hits, s1.misses - s0.misses);
            println!(
                "  experts per token: {:.1} distinct in the step, {:.1} read, {:.1} cache hits",
                per_token(hits + misses),
                per_token(misses),
                per_token(hits)
            );
        }
    }
    // and the check: a batched step gives every sequence exactly its logits alone
    let mut states: Vec<_> = (0..8u32).map(|_| m.new_state()).collect();
    for (s, st) in states.iter_mut().enumerate() {
        m.forward(st, &[(s as u32 * 7 + 1) % v, (s as u32 * 13 + 2) % v], false)?;
    }
    let toks: Vec<u32> = (0..8u32).map(|s| (s * 31 + 5) % v).collect();
    let alone: Vec<Vec<f32>> =
        states.iter().zip(&toks).map(|(st, &t)| m.forward(&mut st.clone(), &[t], false)).collect::<Result<_, _>>()?;
    let together = m.forward_batch(&mut states.iter_mut().collect::<Vec<_>>(), &toks)?;
    let same = together
        .chunks(m.vocab_size())
        .zip(&alone)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    println!("batch of 8 bit for bit each sequence alone: {same}");
    anyhow::ensure!(same, "a batched step differs from a sequence alone");
    Ok(())
}
