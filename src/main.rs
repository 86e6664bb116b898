//! `flashmoe` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use flashmoe::config::{Ffn, Mixer, ModelConfig};
use flashmoe::generate::{Sampler, SamplingParams, generate};
use flashmoe::load::load_model;
use flashmoe::tokenizer::{StreamDecoder, TextTokenizer};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "flashmoe",
    version,
    about = "Mixture-of-Experts inference for models larger than memory"
)]
struct Cli {
    /// Worker threads for matrix products (default: all cores).
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
    },
    /// Describe a model: architecture, layer pattern, sizes, parameters, bytes per expert.
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// Model directory (Hugging Face checkpoint).
    #[arg(long)]
    model: PathBuf,
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
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Routed experts per token (overrides the model's top-k).
    #[arg(long)]
    experts_per_token: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits { model, tokens } => cmd_logits(model, &tokens),
        Cmd::Inspect { model } => cmd_inspect(model),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    params.validate()?;
    let mut model = load_model(&a.model)?;
    if let Some(k) = a.experts_per_token {
        if k == 0 || k > model.cfg.num_experts {
            bail!(
                "--experts-per-token must be in 1..={}",
                model.cfg.num_experts
            );
        }
        model.opts.experts_per_token = Some(k);
    }
    let tok = TextTokenizer::load(&a.model)?;
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
    let (_, stats) = generate(
        &model,
        &mut state,
        &ids,
        a.max_tokens,
        &mut sampler,
        &stops,
        |t| match dec.push(&tok, t) {
            Ok(piece) => {
                print!("{piece}");
                stdout.flush().is_ok()
            }
            Err(e) => {
                err = Some(e);
                false
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    println!();
    eprintln!("{}", stats.line());
    Ok(())
}

fn cmd_logits(model: PathBuf, tokens: &str) -> Result<()> {
    let ids: Vec<u32> = tokens
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .with_context(|| format!("--tokens: `{s}` is not a token id"))
        })
        .collect::<Result<_>>()?;
    let m = load_model(&model)?;
    let mut st = m.new_state();
    let logits = m.forward(&mut st, &ids, true)?;
    let rows: Vec<&[f32]> = logits.chunks(m.vocab_size()).collect();
    println!("{}", json!({"tokens": ids, "logits": rows}));
    Ok(())
}

fn gib(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.2} MB", b / 1e6)
    }
}

fn cmd_inspect(dir: PathBuf) -> Result<()> {
    let c = ModelConfig::load(&dir)?;
    let (total, active) = c.param_counts();
    let ck = flashmoe::checkpoint::Checkpoint::open(&dir)?;
    // bytes per element of the checkpoint's weights, from the embedding tensor
    let wbytes = ck
        .names()
        .iter()
        .find(|n| n.ends_with("embed_tokens.weight"))
        .and_then(|n| ck.mat(n, ck.shape(n).ok()?).ok())
        .map_or(2, |m| m.dtype().size());
    let n_attn = c.mixers.iter().filter(|m| **m == Mixer::Attention).count();
    let n_moe = c.ffns.iter().filter(|f| **f == Ffn::Moe).count();
    println!("model          {}", dir.display());
    println!(
        "architecture   {} ({:?}{})",
        c.model_type,
        c.arch,
        if c.multimodal {
            ", multimodal wrapper"
        } else {
            ""
        }
    );
    println!(
        "layers         {} ({} DeltaNet, {} full attention; {} MoE, {} dense)",
        c.num_layers,
        c.num_layers - n_attn,
        n_attn,
        n_moe,
        c.num_layers - n_moe
    );
    println!(
        "pattern        {}  (L DeltaNet, F attention; lower case = dense MLP)",
        c.layer_pattern()
    );
    println!(
        "hidden         {}, vocab {}, context {}",
        c.hidden_size, c.vocab_size, c.max_position_embeddings
    );
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
    if n_moe > 0 {
        println!(
            "experts        {} per layer, {} routed per token{}, intermediate {}, shared {}",
            c.num_experts,
            c.num_experts_per_tok,
            if c.norm_topk_prob {
                " (renormalised)"
            } else {
                ""
            },
            c.moe_intermediate_size,
            c.shared_expert_intermediate_size
        );
        let eb = c.expert_params() * wbytes;
        println!(
            "bytes/expert   {} ({} bytes, {}-byte weights)",
            gib(eb as f64),
            eb,
            wbytes
        );
        println!(
            "expert bytes   {} per token at top-{}",
            gib((eb * c.num_experts_per_tok * n_moe) as f64),
            c.num_experts_per_tok
        );
    }
    println!(
        "parameters     {} total, {} active per token",
        total, active
    );
    println!(
        "weights        {} at {}-byte weights",
        gib((total as usize * wbytes) as f64),
        wbytes
    );
    Ok(())
}
