//! `bench` and `sysbench`.

use super::args::*;
use anyhow::Result;
use std::path::PathBuf;

#[allow(clippy::too_many_arguments)]
pub(crate) fn cmd_bench(
    dir: &std::path::Path,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_threads: Option<usize>,
    cold: bool,
    seed: u64,
    json: bool,
    store: &StoreArgs,
) -> Result<()> {
    let model = store.load(dir)?;
    let r = flashmoe::bench::run(
        &model,
        &flashmoe::bench::BenchOptions {
            prompt_tokens,
            gen_tokens,
            prefill_threads,
            cold,
            seed,
            progress: flashmoe::progress::on_terminal(),
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "model            {} ({}, top-{}, {} threads, cache {}, on {})",
        dir.display(),
        model.cfg.model_type,
        r.experts_per_token,
        r.threads,
        r.cache_mode,
        r.device
    );
    match r.cold_resident_fraction {
        Some(f) if f > 0.02 => println!(
            "cold start       NOT cold: {:.1}% of the expert files stayed in the page cache after dropping it \
             (another process maps or locks them?)",
            100.0 * f
        ),
        Some(f) => println!("cold start       expert files dropped from the page cache ({:.1}% left)", 100.0 * f),
        None => {}
    }
    println!(
        "prefill          {} tokens in {:.2}s: {:.2} tok/s{}",
        r.prompt_tokens,
        r.prefill_s,
        r.prefill_tok_s,
        if r.prefill_bytes_read_per_token > 0.0 {
            format!(
                "; experts {:.2} MB/token read, {:.3} GB/s",
                r.prefill_bytes_read_per_token / 1e6,
                r.prefill_disk_gb_s
            )
        } else {
            String::new()
        }
    );
    println!("decode           {} tokens in {:.2}s: {:.3} tok/s", r.gen_tokens, r.decode_s, r.decode_tok_s);
    println!("kv cache         {}, {:.2} MB/token read at the end", r.kv_cache, r.kv_bytes_per_token / 1e6);
    println!(
        "expert I/O       {:.2} MB/token read in {:.1} reads (prefetches included), {:.3} GB/s; \
         {:.2} MB/token missed when asked; cache hit rate {:.1}%",
        r.bytes_fetched_per_token / 1e6,
        r.reads_per_token,
        r.disk_gb_s,
        r.bytes_read_per_token / 1e6,
        100.0 * r.cache_hit_rate
    );
    println!(
        "weights/token    {:.2} MB touched (resident {:.2} GB)",
        r.weight_bytes_per_token / 1e6,
        r.resident_weight_bytes as f64 / 1e9
    );
    println!(
        "routing          top 10% of experts take {:.1}% of routings; {:.1}% of experts reused from the previous token",
        100.0 * r.top10pct_expert_share,
        100.0 * r.expert_reuse
    );
    if !r.prefill_routing.layers.is_empty() {
        println!("prefill          {}", super::eval::routing_line(&r.prefill_routing));
    }
    println!("peak RSS         {:.2} GB", r.peak_rss_bytes as f64 / 1e9);
    let line: Vec<String> = r.phases_ms.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    println!("ms/token         {}", line.join(", "));
    Ok(())
}

pub(crate) fn cmd_sysbench(
    file: Option<PathBuf>,
    block: usize,
    threads: usize,
    direct: bool,
    secs: f64,
    memory: bool,
    products: bool,
) -> Result<()> {
    let file_given = file.as_ref().map(|_| ());
    if let Some(f) = file {
        let bps = flashmoe::sysbench::disk_read(&f, block, threads, direct, secs)?;
        println!(
            "{{\"disk_gb_s\": {:.3}, \"block\": {block}, \"threads\": {threads}, \"direct\": {direct}}}",
            bps / 1e9
        );
    }
    // memory is what a bare `sysbench` measures (no file named)
    if products {
        let r = flashmoe::sysbench::products(2 << 30, secs.min(3.0));
        println!(
            "{{\"products_gb_s\": {:.2}, \"read_only_gb_s\": {:.2}, \"in_cache_gb_s\": {:.2}, \"kernel_l2_gb_s\": [{:.2}, {:.2}], \"threads\": {}}}",
            r.experts_gb_s,
            r.read_only_gb_s,
            r.in_cache_gb_s,
            r.kernel_l2_gb_s[0],
            r.kernel_l2_gb_s[1],
            rayon::current_num_threads()
        );
    }
    if memory || (file_given.is_none() && !products) {
        let one = flashmoe::sysbench::memory_read(1 << 30, 1);
        let all = flashmoe::sysbench::memory_read(1 << 30, rayon::current_num_threads());
        println!("{{\"mem_gb_s_1thread\": {:.2}, \"mem_gb_s_all\": {:.2}}}", one / 1e9, all / 1e9);
    }
    Ok(())
}
