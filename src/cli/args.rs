//! The command line: every subcommand, its flags, and the flag groups they share.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use flashmoe::flash::CacheMode;
use flashmoe::generate::SamplingParams;
use flashmoe::layers::attention::KvType;
use flashmoe::load::LoadOptions;
use flashmoe::tensor::{Precision, WKind};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "flashmoe", version, about = "Mixture-of-Experts inference for models larger than memory")]
pub(crate) struct Cli {
    /// Compute threads (default: the physical cores this process may use, SMT siblings once,
    /// within its CPU affinity and cgroup quota; or $RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
        /// Feed the tokens one at a time through the cache (the decode path) instead of as one
        /// prompt; the same JSON.
        #[arg(long)]
        incremental: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Convert a Hugging Face checkpoint to the expert-packed flash layout.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// Routed expert format: q2, q3, q4, q8, bf16, mxfp4 (gpt-oss releases: kept bit for bit),
        /// or keep (the source's own, e.g. a GGUF's ggml blocks, copied).
        #[arg(long, default_value = "q4")]
        experts: String,
        /// Format of the resident matrices (attention, dense and shared-expert MLPs, embeddings,
        /// lm_head): bf16, q8 or q4 (MLX 4-bit releases keep them at 4 bits; norms stay f32 and
        /// routers bf16).
        #[arg(long, default_value = "bf16")]
        dense: String,
        /// Quantization group size (default 64; for experts already quantized at the bit width
        /// asked for, such as Kimi-K2.5's int4 or MLX releases, their own group, kept exactly).
        #[arg(long)]
        group_size: Option<u16>,
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
        /// A published shape: qwen3.5-397b-a17b, qwen3.5-122b-a10b, qwen3.5-35b-a3b,
        /// qwen3-next-80b-a3b, qwen3-235b-a22b, qwen3-30b-a3b, glm-4.5, glm-4.5-air, minimax-m2,
        /// mixtral-8x22b, gpt-oss-120b, gpt-oss-20b, deepseek-v3, deepseek-v3.2, kimi-k2.5, glm-5.
        #[arg(long)]
        preset: String,
        /// Keep every per-layer shape but only the first N layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Routed expert format (as `convert --experts`).
        #[arg(long, default_value = "q4")]
        experts: String,
        /// Resident matrices' format (as `convert --dense`); q4 by default, as MLX 4-bit
        /// releases ship them.
        #[arg(long, default_value = "q4")]
        dense: String,
        /// realistic (expert popularity fitted to a trained model's), uniform (near-uniform:
        /// the worst case for caches) or skewed (a heavy-tailed hot set: cache-friendly).
        #[arg(long, default_value = "realistic")]
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
        /// Prefill on this many threads, decode on `--threads` (decode's scaling after a long
        /// prompt, without the prompt's time at each thread count).
        #[arg(long)]
        prefill_threads: Option<usize>,
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
        /// Also measure memory read bandwidth (1 GiB array; one thread, then all), as a bare
        /// `sysbench` does.
        #[arg(long)]
        memory: bool,
        /// Also measure decode's expert products on this machine's threads (q4 experts of the
        /// 30B-A3B shape, 2 GB of them): as computed, as only read, and from the caches.
        #[arg(long)]
        products: bool,
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
    /// Print exactly the prompt a conversation renders to (the chat template, as transformers'
    /// apply_chat_template renders it), with the generation prompt.
    Template {
        /// Model directory (default: the built-in model); its tokenizer gives the special tokens.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A Jinja chat template to render instead of the model's own.
        #[arg(long)]
        template: Option<PathBuf>,
        /// The conversation: a JSON list of messages (or an object with `messages` and `tools`).
        #[arg(long)]
        messages: PathBuf,
        /// The tools: a JSON list of OpenAI-style tool definitions.
        #[arg(long)]
        tools: Option<PathBuf>,
        /// A template variable, NAME=JSON (e.g. enable_thinking=false); repeatable.
        #[arg(long = "set", value_name = "NAME=JSON")]
        set: Vec<String>,
        /// Leave the generation prompt out.
        #[arg(long)]
        no_generation_prompt: bool,
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
        #[command(flatten)]
        prompt_cache: PromptCacheArgs,
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
        /// Requests that may wait while others generate; more get 503.
        #[arg(long, default_value_t = 16)]
        max_queue: usize,
        /// Requests generating at once: their decode steps run together, one forward pass over
        /// the next token of each (a routed expert several need is read once); 1 serves one
        /// request at a time. CPU only (1 on an accelerator).
        #[arg(long, default_value_t = 8, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=256), usize::from))]
        max_batch: usize,
        /// How long a decode step waits (milliseconds) for the batch's other requests to hand
        /// in their next token before it runs without the late ones.
        #[arg(long, default_value_t = 20, value_name = "MS")]
        batch_wait_ms: u64,
        /// Name clients use for the model (default: the directory name).
        #[arg(long)]
        model_id: Option<String>,
        /// Require this key (`Authorization: Bearer KEY`) on every endpoint but /health.
        #[arg(long, env = "FLASHMOE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Let browser pages from this origin call the API (CORS); repeat it, or `*` for any.
        #[arg(long, value_name = "ORIGIN")]
        cors: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        prompt_cache: PromptCacheArgs,
    },
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// Model directory, a Hugging Face checkpoint or a converted one (default: the built-in model).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    #[arg(long)]
    pub(crate) prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub(crate) chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Ask the template to skip the thinking block (Qwen3.x `enable_thinking=false`).
    #[arg(long)]
    pub(crate) no_think: bool,
    #[arg(long, default_value_t = 128)]
    pub(crate) max_tokens: usize,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) prompt_cache: PromptCacheArgs,
}

/// Sampling settings, the same defaults for every command (a server request's own values
/// override them).
#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub(crate) min_p: f32,
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    pub(crate) repetition_penalty: f32,
    /// Sampling seed (fixed by default, so runs repeat).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            logit_bias: vec![],
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            constraint: None,
            logprobs: None,
        };
        p.validate()?;
        Ok(p)
    }
}

/// The persistent prompt cache (`flashmoe::prompt_cache`).
#[derive(Args, Clone)]
pub(crate) struct PromptCacheArgs {
    /// Save prompt states (KV caches, DeltaNet states) to disk, keyed by their tokens, and
    /// resume later prompts that begin the same way from them, across runs; in DIR if given
    /// (default: <cache dir>/prompt-cache/<model>-<hash>/). On by default for `serve`.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    pub(crate) prompt_cache: Option<PathBuf>,
    /// Do not use the prompt cache (serve).
    #[arg(long, conflicts_with = "prompt_cache")]
    pub(crate) no_prompt_cache: bool,
    /// Most bytes the prompt cache keeps, e.g. 4G; the least recently used entries go first
    /// (default: 8G, at most a quarter of the free disk space).
    #[arg(long, value_name = "SIZE")]
    pub(crate) prompt_cache_size: Option<String>,
}

impl PromptCacheArgs {
    /// The prompt cache of `model` (loaded from `dir`) when asked for, or `on_by_default` and
    /// not turned off. On by default, a model it cannot serve (on a GPU) goes without, saying so.
    pub(crate) fn open(
        &self,
        on_by_default: bool,
        dir: &Path,
        model: &flashmoe::model::Model,
    ) -> Result<Option<flashmoe::prompt_cache::PromptCache>> {
        let asked = self.prompt_cache.is_some();
        if self.no_prompt_cache || !(asked || on_by_default) {
            return Ok(None);
        }
        let limit = match &self.prompt_cache_size {
            Some(s) => Some(flashmoe::options::parse_size(s).context("--prompt-cache-size")?),
            None => None,
        };
        let at = self.prompt_cache.clone().filter(|p| !p.as_os_str().is_empty());
        match flashmoe::prompt_cache::PromptCache::for_model(dir, model, at, limit) {
            Ok(pc) => Ok(Some(pc)),
            Err(e) if !asked => {
                eprintln!("note: no prompt cache: {e:#}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Expert store settings (converted models).
#[derive(Args, Clone)]
pub(crate) struct StoreArgs {
    /// `os`: buffered reads, the page cache caches; `direct`: O_DIRECT + own cache;
    /// `auto`: direct when the expert files exceed half the memory this process may use (it won
    /// every beyond-RAM run: 1.9x on the 80B shape), else os (warm experts are computed in
    /// place from the page cache).
    #[arg(long, default_value = "auto", value_parser = ["auto", "os", "direct"])]
    pub(crate) cache: String,
    /// Size of the own expert cache with --cache direct (e.g. 512M, 4G); `auto`: a quarter of
    /// the memory this process may use, 256M to 32G, at most the expert files' size.
    #[arg(long, default_value = "auto")]
    pub(crate) cache_size: String,
    /// Threads issuing expert reads.
    #[arg(long, default_value_t = 8)]
    pub(crate) io_threads: usize,
    /// Read all experts of a converted model into memory at load instead of streaming them.
    #[arg(long)]
    pub(crate) experts_in_memory: bool,
    /// Read the next layer's predicted experts ahead while this layer computes: on, off, or
    /// auto (on with --cache direct, where it measured +10-30% cold; off with os, where it lost).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub(crate) prefetch: String,
    /// Lock the resident (non-expert) weights in RAM so expert reads cannot evict them.
    #[arg(long)]
    pub(crate) mlock: bool,
    /// Multi-token (prefill) products on f32 activations, as the reference does, instead of
    /// bf16 activations on CPUs with AVX-512 BF16.
    #[arg(long)]
    pub(crate) exact: bool,
    /// How the KV cache stores keys and values: bf16 (the default; `logits` and --exact: f32)
    /// or f16 at 2 bytes a value, f32 at 4. f16 keeps 3 more bits than bf16 but a value above
    /// 65504 becomes infinite.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub(crate) kv_cache: Option<String>,
    /// Routed experts per token (overrides the model's top-k; fewer read less per token).
    #[arg(long)]
    pub(crate) experts_per_token: Option<usize>,
    /// Where the model runs: auto (CUDA when built with it and a GPU is present), cpu, cuda,
    /// cuda:N.
    #[arg(long, default_value = "auto")]
    pub(crate) device: flashmoe::backend::Device,
}

impl StoreArgs {
    /// Loads the model in `dir` with these settings (`--experts-per-token` applied).
    pub(crate) fn load(&self, dir: &Path) -> Result<flashmoe::model::Model> {
        let mut model = loading(dir, || flashmoe::load::load_model_with(dir, &self.load_options(dir)?))?;
        self.apply_experts(&mut model)?;
        Ok(model)
    }

    /// Applies `--experts-per-token` to a loaded model.
    pub(crate) fn apply_experts(&self, model: &mut flashmoe::model::Model) -> Result<()> {
        if let Some(k) = self.experts_per_token {
            if k == 0 || k > model.cfg.num_experts {
                bail!("--experts-per-token must be in 1..={}", model.cfg.num_experts);
            }
            model.opts.experts_per_token = Some(k);
        }
        Ok(())
    }

    /// The `--kv-cache` type: `default` when not given, f32 with --exact (which refuses another).
    pub(crate) fn kv_cache(&self, default: KvType) -> Result<KvType> {
        match (self.kv_cache.as_deref(), self.exact) {
            (Some(t), true) if t != "f32" => {
                bail!("--exact computes with an f32 KV cache: --kv-cache {t} contradicts it (drop one)")
            }
            (Some(t), _) => t.parse(),
            (None, true) => Ok(KvType::F32),
            (None, false) => Ok(default),
        }
    }

    /// The store settings for the model in `dir`, `auto` values resolved.
    pub(crate) fn load_options(&self, dir: &Path) -> Result<LoadOptions> {
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
            device: self.device,
            kv_cache: self.kv_cache(KvType::Bf16)?,
        }
        .resolve(dir)
    }
}

pub(crate) struct EvalArgs {
    pub(crate) model: PathBuf,
    pub(crate) text: PathBuf,
    pub(crate) reference: Option<PathBuf>,
    pub(crate) experts: Option<String>,
    pub(crate) group_size: u16,
    pub(crate) window: usize,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) json: bool,
}

/// Runs `load` (a model's loading: mapping, checks, experts read into memory, the weights'
/// upload to a GPU) under a spinner naming `dir`, drawn only on a terminal.
pub(crate) fn loading<T>(dir: &Path, load: impl FnOnce() -> Result<T>) -> Result<T> {
    let pb = flashmoe::progress::spinner(format!("loading {}", dir.display()));
    let r = load();
    pb.finish_and_clear();
    r
}

pub(crate) fn resolve(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(m) => Ok(m),
        None => flashmoe::builtin::default_model(),
    }
}

/// `q4` → 4-bit groups of `group`; `bf16` etc. as is.
pub(crate) fn parse_kind(s: &str, group: u16, what: &str) -> Result<WKind> {
    match s {
        "q2" | "q3" | "q4" | "q8" => Ok(WKind::Q { bits: s[1..].parse()?, group }),
        "bf16" => Ok(WKind::BF16),
        "f16" => Ok(WKind::F16),
        "f32" => Ok(WKind::F32),
        "mxfp4" if what == "experts" => Ok(WKind::Mxfp4),
        _ => bail!(
            "--{what}: unsupported format `{s}` (q2, q3, q4, q8, bf16{})",
            if what == "experts" { ", mxfp4" } else { "" }
        ),
    }
}
