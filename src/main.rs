//! `flashmoe` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use flashmoe::config::{Ffn, Mixer, ModelConfig};
use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::flash::{CacheMode, Manifest, StoreOptions};
use flashmoe::generate::{Sampler, SamplingParams, generate};
use flashmoe::load::{LoadOptions, load_model_with};
use flashmoe::model::Model;
use flashmoe::tensor::{Precision, WKind};
use flashmoe::tokenizer::{StreamDecoder, TextTokenizer};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "flashmoe", version, about = "Mixture-of-Experts inference for models larger than memory")]
struct Cli {
    /// Compute threads (default: the physical cores this process may use, SMT siblings once,
    /// within its CPU affinity and cgroup quota; or $RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print the logits of every position of a token sequence as JSON.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        tokens: String,
        /// Compute as generate does (int8/bf16 activations) instead of exactly (f32
        /// activations, the default here: this command checks models against a reference).
        #[arg(long)]
        fast: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Convert a Hugging Face checkpoint to the expert-packed flash layout.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// Routed expert format: q2, q3, q4, q8 or bf16.
        #[arg(long, default_value = "q4")]
        experts: String,
        /// Format of the large dense matrices: bf16 or q8.
        #[arg(long, default_value = "bf16")]
        dense: String,
        #[arg(long, default_value_t = 64)]
        group_size: u16,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
    },
    /// Perplexity of a text; with --reference, KL divergence and top-1 agreement against it.
    Eval {
        /// Model directory (default: the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Reference model (e.g. the bf16 original of a quantized model).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Routed experts per token for the model (not the reference).
        #[arg(long)]
        experts_per_token: Option<usize>,
        /// Re-quantize the model's experts in memory: q2, q3, q4, q8 or bf16.
        #[arg(long)]
        experts: Option<String>,
        #[arg(long, default_value_t = 64)]
        group_size: u16,
        /// Tokens per window (each window starts from an empty state).
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Score at most this many tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write a full-size model of a published shape with random weights (flash layout).
    Synth {
        /// qwen3.5-397b-a17b, qwen3.5-122b-a10b, qwen3.5-35b-a3b, qwen3-next-80b-a3b,
        /// qwen3-235b-a22b or qwen3-30b-a3b.
        #[arg(long)]
        preset: String,
        /// Keep every per-layer shape but only the first N layers.
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long, default_value = "q4")]
        experts: String,
        #[arg(long, default_value = "bf16")]
        dense: String,
        /// uniform (worst case for caches) or skewed (trained-model-like popularity).
        #[arg(long, default_value = "skewed")]
        routing: flashmoe::flash::synth::Routing,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        to: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Measure prefill and decode speed, time per phase, bytes read, cache hit rate, memory.
    Bench {
        /// Model directory (default: the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        #[arg(long)]
        experts_per_token: Option<usize>,
        /// Evict the model's expert files from the page cache first (posix_fadvise).
        #[arg(long)]
        cold: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Measure this machine's limits: random expert-sized reads from a file, memory bandwidth.
    Sysbench {
        /// File to read from (e.g. an expert file); omit to measure memory only.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 7077888)]
        block: usize,
        #[arg(long, default_value_t = 8)]
        io_threads: usize,
        /// Bypass the page cache (O_DIRECT).
        #[arg(long)]
        direct: bool,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Also measure memory read bandwidth (1 GiB array; one thread, then all).
        #[arg(long)]
        memory: bool,
    },
    /// Re-check every checksum of a converted model.
    Verify {
        #[arg(long)]
        model: PathBuf,
    },
    /// Describe a model: architecture, layer pattern, sizes, parameters, bytes per expert.
    Inspect {
        /// Model directory (default: the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Interactive chat in the terminal (history, /reset /stats /save /load, Ctrl-C stops an answer).
    Chat {
        /// Model directory (default: the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// Read the system prompt from a file.
        #[arg(long, conflicts_with = "system")]
        system_file: Option<PathBuf>,
        /// Start with thinking off (Qwen3.x `enable_thinking=false`).
        #[arg(long)]
        no_think: bool,
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).
    Serve {
        /// Model directory (default: the built-in model).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Requests that may wait while one generates; more get 503.
        #[arg(long, default_value_t = 16)]
        max_queue: usize,
        /// Name clients use for the model (default: the directory name).
        #[arg(long)]
        model_id: Option<String>,
        /// Require this key (`Authorization: Bearer KEY`) on every endpoint but /health.
        #[arg(long, env = "FLASHMOE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// Model directory, a Hugging Face checkpoint or a converted one (default: the built-in model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Ask the template to skip the thinking block (Qwen3.x `enable_thinking=false`).
    #[arg(long)]
    no_think: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Routed experts per token (overrides the model's top-k).
    #[arg(long)]
    experts_per_token: Option<usize>,
    #[command(flatten)]
    store: StoreArgs,
}

/// Sampling settings, the same defaults for every command (a server request's own values
/// override them).
#[derive(Args, Clone)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f32,
    /// Sampling seed (fixed by default, so runs repeat).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            logit_bias: vec![],
        };
        p.validate()?;
        Ok(p)
    }
}

fn resolve(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(m) => Ok(m),
        None => flashmoe::builtin::default_model(),
    }
}

/// Expert store settings (converted models).
#[derive(Args, Clone)]
struct StoreArgs {
    /// `os`: buffered reads, the page cache caches; `direct`: O_DIRECT + own LRU cache;
    /// `auto`: direct when the expert files exceed half the memory this process may use (it won
    /// every beyond-RAM run: 1.9x on the 80B shape), else os (warm experts are computed in
    /// place from the page cache).
    #[arg(long, default_value = "auto", value_parser = ["auto", "os", "direct"])]
    cache: String,
    /// Size of the own expert cache with --cache direct (e.g. 512M, 4G); `auto`: a quarter of
    /// the memory this process may use, 256M to 32G, at most the expert files' size.
    #[arg(long, default_value = "auto")]
    cache_size: String,
    /// Threads issuing expert reads.
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// Read all experts of a converted model into memory at load instead of streaming them.
    #[arg(long)]
    experts_in_memory: bool,
    /// Read the next layer's predicted experts ahead while this layer computes: on, off, or
    /// auto (on with --cache direct, where it measured +10-30% cold; off with os, where it lost).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    prefetch: String,
    /// Lock the resident (non-expert) weights in RAM so expert reads cannot evict them.
    #[arg(long)]
    mlock: bool,
    /// Multi-token (prefill) products on f32 activations, as the reference does, instead of
    /// bf16 activations on CPUs with AVX-512 BF16.
    #[arg(long)]
    exact: bool,
}

impl StoreArgs {
    /// The store settings for the model in `dir`, `auto` values resolved.
    fn load_options(&self, dir: &Path) -> Result<LoadOptions> {
        use flashmoe::options::{Choice, StoreChoices, parse_size};
        StoreChoices {
            cache: match self.cache.as_str() {
                "os" => Choice::Is(CacheMode::Os),
                "direct" => Choice::Is(CacheMode::Direct),
                _ => Choice::Auto,
            },
            cache_size: match self.cache_size.as_str() {
                "auto" => Choice::Auto,
                s => Choice::Is(parse_size(s).context("--cache-size")?),
            },
            io_threads: self.io_threads,
            prefetch: match self.prefetch.as_str() {
                "on" => Choice::Is(true),
                "off" => Choice::Is(false),
                _ => Choice::Auto,
            },
            experts_in_memory: self.experts_in_memory,
            mlock: self.mlock,
            precision: if self.exact { Precision::Exact } else { Precision::Fast },
        }
        .resolve(dir)
    }
}

/// Expert-store statistics of a run, one line per item, on stderr.
fn print_store_stats(m: &Model, tokens: usize) {
    let Some(store) = &m.store else { return };
    let s = store.stats();
    let per = |x: f64| x / tokens.max(1) as f64;
    eprintln!(
        "experts: {} reads, {:.2} MB read ({:.2} MB/token), io wait {:.2} ms/token, expert compute {:.2} ms/token",
        s.reads,
        s.bytes_read as f64 / 1e6,
        per(s.bytes_read as f64 / 1e6),
        per(s.io_wait_ns as f64 / 1e6),
        per(s.compute_ns as f64 / 1e6)
    );
    match store.mode {
        CacheMode::Direct => eprintln!(
            "cache: direct, {:.1}% hit rate ({} hits, {} misses), {:.1} MB own cache{}",
            100.0 * s.hit_rate(),
            s.hits,
            s.misses,
            store.slot_bytes() as f64 / 1e6,
            if store.direct_fallback { " (O_DIRECT unsupported here: buffered reads)" } else { "" }
        ),
        CacheMode::Os => {
            if let Ok((r, t)) = store.page_cache_residency() {
                eprintln!(
                    "cache: os, page cache holds {:.1}% of the expert files ({:.1} of {:.1} MB)",
                    100.0 * r as f64 / t.max(1) as f64,
                    r as f64 / 1e6,
                    t as f64 / 1e6
                );
            }
        }
    }
}

/// Prefill's activation buffers (tens of MB per layer) would otherwise be mmapped, faulted in
/// zeroed and unmapped again at every layer: keep them in the heap for reuse (measured: 512-token
/// prefill +12%, docs/PERFORMANCE.md).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called before any threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() {
    let cli = Cli::parse();
    tune_malloc();
    let env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
    let threads = cli.threads.or(env).filter(|&t| t > 0).unwrap_or_else(flashmoe::cpu::default_threads);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits { model, tokens, fast, store } => cmd_logits(model, &tokens, fast, &store),
        Cmd::Inspect { model } => resolve(model).and_then(cmd_inspect),
        Cmd::Chat { model, system, system_file, no_think, max_tokens, sampling, store } => {
            cmd_chat(model, system, system_file, no_think, max_tokens, &sampling, &store)
        }
        Cmd::Serve { model, host, port, max_queue, model_id, api_key, store } => {
            cmd_serve(model, &host, port, max_queue, model_id, api_key, &store)
        }
        Cmd::Convert { from, to, experts, dense, group_size, force } => {
            cmd_convert(from, to, &experts, &dense, group_size, force)
        }
        Cmd::Verify { model } => cmd_verify(model),
        Cmd::Sysbench { file, block, io_threads, direct, seconds, memory } => {
            cmd_sysbench(file, block, io_threads, direct, seconds, memory)
        }
        Cmd::Synth { preset, layers, experts, dense, routing, seed, to, force } => {
            cmd_synth(&preset, layers, &experts, &dense, routing, seed, &to, force)
        }
        Cmd::Bench { model, prompt_tokens, gen_tokens, experts_per_token, cold, seed, json, store } => resolve(model)
            .and_then(|model| {
                cmd_bench(&model, prompt_tokens, gen_tokens, experts_per_token, cold, seed, json, &store)
            }),
        Cmd::Eval {
            model,
            text,
            reference,
            experts_per_token,
            experts,
            group_size,
            window,
            max_tokens,
            json,
            store,
        } => resolve(model).and_then(|model| {
            cmd_eval(
                EvalArgs { model, text, reference, experts_per_token, experts, group_size, window, max_tokens, json },
                &store,
            )
        }),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let dir = resolve(a.model.clone())?;
    let mut model = load_model_with(&dir, &a.store.load_options(&dir)?)?;
    if let Some(k) = a.experts_per_token {
        if k == 0 || k > model.cfg.num_experts {
            bail!("--experts-per-token must be in 1..={}", model.cfg.num_experts);
        }
        model.opts.experts_per_token = Some(k);
    }
    let tok = TextTokenizer::load(&dir)?;
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.push(json!({"role": "user", "content": a.prompt}));
        let mut extra = serde_json::Map::new();
        if a.no_think {
            extra.insert("enable_thinking".into(), json!(false));
        }
        tok.apply_chat_template(&json!(msgs), None, true, &extra)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&text)?;
    let mut stops = model.cfg.eos_token_ids.clone();
    stops.extend(tok.eos_id());
    let mut state = model.new_state();
    let mut sampler = Sampler::new(params);
    let mut dec = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    if !a.chat {
        print!("{}", a.prompt);
    }
    let mut err = None;
    let (_, stats) =
        generate(&model, &mut state, &ids, a.max_tokens, &mut sampler, &stops, |t| match dec.push(&tok, t) {
            Ok(piece) => {
                print!("{piece}");
                stdout.flush().is_ok()
            }
            Err(e) => {
                err = Some(e);
                false
            }
        })?;
    if let Some(e) = err {
        return Err(e);
    }
    println!();
    eprintln!("{}", stats.line());
    print_store_stats(&model, stats.prompt_tokens + stats.generated_tokens);
    Ok(())
}

/// `q4` → 4-bit groups of `group`; `bf16` etc. as is.
fn parse_kind(s: &str, group: u16, what: &str) -> Result<WKind> {
    match s {
        "q2" | "q3" | "q4" | "q8" => Ok(WKind::Q { bits: s[1..].parse()?, group }),
        "bf16" => Ok(WKind::BF16),
        "f16" => Ok(WKind::F16),
        "f32" => Ok(WKind::F32),
        _ => bail!("--{what}: unsupported format `{s}` (q2, q3, q4, q8, bf16)"),
    }
}

fn cmd_convert(from: PathBuf, to: PathBuf, experts: &str, dense: &str, group: u16, force: bool) -> Result<()> {
    if group == 0 {
        bail!("--group-size must be positive");
    }
    let opts = ConvertOptions {
        experts: parse_kind(experts, group, "experts")?,
        dense: parse_kind(dense, group, "dense")?,
        force,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t = std::time::Instant::now();
    let r = convert(&from, &to, &opts)?;
    eprintln!(
        "converted {} -> {} in {:.1}s: {} resident tensors ({:.2} MB), {} experts ({:.2} MB, {} bytes each)",
        from.display(),
        to.display(),
        t.elapsed().as_secs_f64(),
        r.tensors,
        r.resident_bytes as f64 / 1e6,
        r.experts,
        r.expert_bytes as f64 / 1e6,
        r.expert_stride
    );
    Ok(())
}

struct EvalArgs {
    model: PathBuf,
    text: PathBuf,
    reference: Option<PathBuf>,
    experts_per_token: Option<usize>,
    experts: Option<String>,
    group_size: u16,
    window: usize,
    max_tokens: Option<usize>,
    json: bool,
}

fn cmd_eval(a: EvalArgs, store: &StoreArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("cannot read {}", a.text.display()))?;
    let tok = TextTokenizer::load(&a.model)?;
    let mut ids = tok.encode(&text)?;
    if let Some(m) = a.max_tokens {
        ids.truncate(m);
    }
    let mut lo = store.load_options(&a.model)?;
    if a.experts.is_some() {
        lo.experts_in_memory = true;
    }
    let mut model = load_model_with(&a.model, &lo)?;
    if let Some(k) = a.experts_per_token {
        if k == 0 || k > model.cfg.num_experts {
            bail!("--experts-per-token must be in 1..={}", model.cfg.num_experts);
        }
        model.opts.experts_per_token = Some(k);
    }
    if let Some(e) = &a.experts {
        model.requantize_experts(parse_kind(e, a.group_size, "experts")?)?;
    }
    let reference = a.reference.as_ref().map(|r| load_model_with(r, &store.load_options(r)?)).transpose()?;
    let window = a.window.min(model.max_context());
    let r = flashmoe::eval::evaluate(&model, reference.as_ref(), &ids, window)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!(
            "perplexity {:.4} (nll {:.4}) over {} tokens in {} windows of {}",
            r.perplexity, r.nll, r.tokens, r.windows, window
        );
        if let (Some(kl), Some(t)) = (r.kl, r.top1) {
            print!(", KL {kl:.5}, top-1 agreement {:.2}%", 100.0 * t);
        }
        println!(
            " [{:.1}s, {:.0} tok/s]",
            r.secs,
            r.tokens as f64 * if reference.is_some() { 2.0 } else { 1.0 } / r.secs
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_synth(
    preset: &str,
    layers: Option<usize>,
    experts: &str,
    dense: &str,
    routing: flashmoe::flash::synth::Routing,
    seed: u64,
    to: &std::path::Path,
    force: bool,
) -> Result<()> {
    let opts = flashmoe::flash::synth::SynthOptions {
        experts: parse_kind(experts, 64, "experts")?,
        dense: parse_kind(dense, 64, "dense")?,
        routing,
        layers,
        seed,
        force,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t = std::time::Instant::now();
    let r = flashmoe::flash::synth::synth(preset, to, &opts)?;
    eprintln!(
        "wrote {} ({} layers) to {} in {:.1}s: resident {:.2} GB, experts {:.2} GB ({} bytes each)",
        preset,
        r.layers,
        to.display(),
        t.elapsed().as_secs_f64(),
        r.resident_bytes as f64 / 1e9,
        r.expert_bytes as f64 / 1e9,
        r.expert_stride
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_bench(
    dir: &std::path::Path,
    prompt_tokens: usize,
    gen_tokens: usize,
    experts_per_token: Option<usize>,
    cold: bool,
    seed: u64,
    json: bool,
    store: &StoreArgs,
) -> Result<()> {
    let mut model = load_model_with(dir, &store.load_options(dir)?)?;
    if let Some(k) = experts_per_token {
        if k == 0 || k > model.cfg.num_experts {
            bail!("--experts-per-token must be in 1..={}", model.cfg.num_experts);
        }
        model.opts.experts_per_token = Some(k);
    }
    let r = flashmoe::bench::run(&model, &flashmoe::bench::BenchOptions { prompt_tokens, gen_tokens, cold, seed })?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "model            {} ({}, top-{}, {} threads, cache {})",
        dir.display(),
        model.cfg.model_type,
        r.experts_per_token,
        r.threads,
        r.cache_mode
    );
    println!("prefill          {} tokens in {:.2}s: {:.2} tok/s", r.prompt_tokens, r.prefill_s, r.prefill_tok_s);
    println!("decode           {} tokens in {:.2}s: {:.3} tok/s", r.gen_tokens, r.decode_s, r.decode_tok_s);
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
    println!("peak RSS         {:.2} GB", r.peak_rss_bytes as f64 / 1e9);
    let line: Vec<String> = r.phases_ms.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    println!("ms/token         {}", line.join(", "));
    Ok(())
}

fn cmd_chat(
    model: Option<PathBuf>,
    system: Option<String>,
    system_file: Option<PathBuf>,
    no_think: bool,
    max_tokens: usize,
    sampling: &SamplingArgs,
    store: &StoreArgs,
) -> Result<()> {
    let dir = resolve(model)?;
    let system = match system_file {
        Some(f) => Some(
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?.trim().to_string(),
        ),
        None => system,
    };
    let session =
        flashmoe::session::Session::new(load_model_with(&dir, &store.load_options(&dir)?)?, TextTokenizer::load(&dir)?);
    let opts = flashmoe::chat::ChatOptions { system, thinking: !no_think, max_tokens, sampling: sampling.params()? };
    flashmoe::chat::run(session, opts)
}

fn cmd_serve(
    model: Option<PathBuf>,
    host: &str,
    port: u16,
    max_queue: usize,
    model_id: Option<String>,
    api_key: Option<String>,
    store: &StoreArgs,
) -> Result<()> {
    let api_key = api_key.filter(|k| !k.is_empty());
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
    if !loopback && api_key.is_none() {
        eprintln!("warning: serving on {host} without --api-key: anyone who can reach this address can use the model");
    }
    let dir = resolve(model)?;
    let tok = TextTokenizer::load(&dir)?;
    if !tok.has_chat_template() {
        eprintln!("warning: {} has no chat template; /v1/chat/completions will fail", dir.display());
    }
    let session = flashmoe::session::Session::new(load_model_with(&dir, &store.load_options(&dir)?)?, tok);
    let model_id = model_id.unwrap_or_else(|| {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        if name.starts_with("default-") { "flashmoe-default".into() } else { name }
    });
    let opts = flashmoe::server::ServerOptions { model_id, max_queue, api_key, ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(flashmoe::server::serve(session, host, port, opts))
}

fn cmd_sysbench(
    file: Option<PathBuf>,
    block: usize,
    threads: usize,
    direct: bool,
    secs: f64,
    memory: bool,
) -> Result<()> {
    if let Some(f) = file {
        let bps = flashmoe::sysbench::disk_read(&f, block, threads, direct, secs)?;
        println!(
            "{{\"disk_gb_s\": {:.3}, \"block\": {block}, \"threads\": {threads}, \"direct\": {direct}}}",
            bps / 1e9
        );
    }
    if memory {
        let one = flashmoe::sysbench::memory_read(1 << 30, 1);
        let all = flashmoe::sysbench::memory_read(1 << 30, rayon::current_num_threads());
        println!("{{\"mem_gb_s_1thread\": {:.2}, \"mem_gb_s_all\": {:.2}}}", one / 1e9, all / 1e9);
    }
    Ok(())
}

fn cmd_verify(dir: PathBuf) -> Result<()> {
    let m = Manifest::load(&dir)?;
    let total: u64 = m.files.iter().map(|f| f.bytes).sum();
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = m.verify(&dir, |b| pb.inc(b))?;
    pb.finish_and_clear();
    // intact files can still describe a model that does not load (config, shapes)
    load_model_with(&dir, &LoadOptions::default()).context("the checksums match, but the model does not load")?;
    println!("ok: {} files, {:.2} MB, every checksum matches", m.files.len(), n as f64 / 1e6);
    Ok(())
}

fn cmd_logits(model: PathBuf, tokens: &str, fast: bool, store: &StoreArgs) -> Result<()> {
    if fast && store.exact {
        bail!("logits: --fast and --exact contradict each other (logits is exact by default)");
    }
    let ids: Vec<u32> = tokens
        .split(',')
        .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
        .collect::<Result<_>>()?;
    let mut opts = store.load_options(&model)?;
    opts.precision = if fast { Precision::Fast } else { Precision::Exact };
    let m = load_model_with(&model, &opts)?;
    let mut st = m.new_state();
    let logits = m.forward(&mut st, &ids, true)?;
    let rows: Vec<&[f32]> = logits.chunks(m.vocab_size()).collect();
    println!("{}", json!({"tokens": ids, "logits": rows}));
    Ok(())
}

fn gib(b: f64) -> String {
    if b >= 1e9 { format!("{:.2} GB", b / 1e9) } else { format!("{:.2} MB", b / 1e6) }
}

fn cmd_inspect(dir: PathBuf) -> Result<()> {
    let flash = Manifest::is_flash(&dir);
    let (c, manifest) = if flash {
        let m = Manifest::load(&dir)?;
        (ModelConfig::from_json(&m.config)?, Some(m))
    } else {
        (ModelConfig::load(&dir)?, None)
    };
    let (total, active) = c.param_counts();
    let n_attn = c.mixers.iter().filter(|m| **m == Mixer::Attention).count();
    let n_moe = c.ffns.iter().filter(|f| **f == Ffn::Moe).count();
    println!(
        "model          {}{}",
        dir.display(),
        if flash { " (flash layout)" } else { " (Hugging Face checkpoint)" }
    );
    println!(
        "architecture   {} ({}{})",
        c.model_type,
        c.family,
        if c.multimodal() { ", multimodal wrapper" } else { "" }
    );
    println!(
        "layers         {} ({} DeltaNet, {} full attention; {} MoE, {} dense)",
        c.num_layers,
        c.num_layers - n_attn,
        n_attn,
        n_moe,
        c.num_layers - n_moe
    );
    println!("pattern        {}  (L DeltaNet, F attention; lower case = dense MLP)", c.layer_pattern());
    println!("hidden         {}, vocab {}, context {}", c.hidden_size, c.vocab_size, c.max_position_embeddings);
    println!(
        "attention      {} heads, {} kv heads, head dim {}, rotary dim {} (theta {}), gated {}",
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.rotary_dim(),
        c.rope_theta,
        c.gated_attention()
    );
    if let Some(l) = &c.linear {
        println!(
            "deltanet       {} k heads x {}, {} v heads x {}, conv kernel {}",
            l.num_k_heads, l.k_head_dim, l.num_v_heads, l.v_head_dim, l.conv_kernel
        );
    }
    println!("parameters     {total} total, {active} active per token");
    // bytes of one expert and of the resident weights, as stored
    let (expert_bytes, expert_fmt, resident_bytes) = match &manifest {
        Some(m) => {
            let res = m.files.iter().find(|f| f.name == m.resident.file).map_or(0, |f| f.bytes);
            match &m.experts {
                Some(e) => (e.stride, e.kind.clone(), res),
                None => (0, "-".into(), res),
            }
        }
        None => {
            let ck = flashmoe::checkpoint::Checkpoint::open(&dir)?;
            let size = ck
                .names()
                .iter()
                .find(|n| n.ends_with("embed_tokens.weight"))
                .and_then(|n| ck.dtype(n).ok().flatten())
                .map_or(2, |d| d.size());
            let eb = (c.expert_params() * size) as u64;
            let all_experts = eb * (c.num_experts * n_moe) as u64;
            (eb, format!("{}-byte weights", size), total * size as u64 - all_experts)
        }
    };
    if n_moe > 0 {
        println!(
            "experts        {} per layer, {} routed per token{}, intermediate {}, shared {}",
            c.num_experts,
            c.num_experts_per_tok,
            if c.norm_topk_prob { " (renormalised)" } else { "" },
            c.moe_intermediate_size,
            c.shared_expert_intermediate_size
        );
        println!("bytes/expert   {expert_bytes} ({expert_fmt})");
        let per_tok = expert_bytes * (c.num_experts_per_tok * n_moe) as u64;
        let all = expert_bytes * (c.num_experts * n_moe) as u64;
        println!(
            "expert bytes   {} per token at top-{}, {} in all",
            gib(per_tok as f64),
            c.num_experts_per_tok,
            gib(all as f64)
        );
    }
    if let Some(m) = &manifest {
        println!("formats        dense {}, experts {}", m.dense, expert_fmt);
    }
    let store = StoreOptions::default();
    let slots = if flash { expert_bytes * store.max_batch.max(c.num_experts_per_tok) as u64 } else { 0 };
    println!(
        "footprint      resident weights {}{}, expert buffers {} (os cache; direct adds --cache-size), \
         state {} at 4096 tokens",
        gib(resident_bytes as f64),
        if flash { " (mapped)" } else { "" },
        gib(slots as f64),
        gib(c.state_bytes(4096) as f64)
    );
    Ok(())
}
