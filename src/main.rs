//! `flashmoe` command line: parses, sets up threads, dispatches to `cli/`.

mod cli;

use clap::Parser;
use cli::args::*;
use cli::{bench::*, chat::*, convert::*, eval::*, generate::*, inspect::*};

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
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        // a closed pipe (`flashmoe inspect | head`) ends the process quietly, as for any
        // command-line tool, instead of panicking in println!; the server keeps Rust's default
        // SAFETY: sets a signal disposition before any other thread exists
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
    let threads = cli.threads.or(env).filter(|&t| t > 0).unwrap_or_else(flashmoe::cpu::default_threads);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits { model, tokens, fast, incremental, store } => {
            cmd_logits(model, &tokens, fast, incremental, &store)
        }
        Cmd::Inspect { model } => resolve(model).and_then(cmd_inspect),
        Cmd::Template { model, template, messages, tools, set, no_generation_prompt } => resolve(model)
            .and_then(|model| cmd_template(&model, template, &messages, tools, &set, !no_generation_prompt)),
        Cmd::Chat { model, system, system_file, no_think, max_tokens, sampling, store, prompt_cache } => {
            cmd_chat(model, system, system_file, no_think, max_tokens, &sampling, &store, &prompt_cache)
        }
        Cmd::Serve {
            model,
            host,
            port,
            max_queue,
            max_batch,
            batch_wait_ms,
            model_id,
            api_key,
            cors,
            store,
            prompt_cache,
        } => {
            let batch_wait = std::time::Duration::from_millis(batch_wait_ms);
            let opts = flashmoe::server::ServerOptions {
                max_queue,
                max_batch,
                batch_wait,
                api_key,
                cors,
                ..Default::default()
            };
            cmd_serve(model, &host, port, model_id, opts, &store, &prompt_cache)
        }
        Cmd::Convert { from, to, experts, dense, group_size, force } => {
            cmd_convert(from, to, &experts, &dense, group_size, force)
        }
        Cmd::Verify { model } => cmd_verify(model),
        Cmd::Sysbench { file, block, io_threads, direct, seconds, memory, products } => {
            cmd_sysbench(file, block, io_threads, direct, seconds, memory, products)
        }
        Cmd::Synth { preset, layers, experts, dense, routing, seed, to, force } => {
            cmd_synth(&preset, layers, &experts, &dense, routing, seed, &to, force)
        }
        Cmd::Bench { model, prompt_tokens, gen_tokens, prefill_threads, cold, seed, json, store } => resolve(model)
            .and_then(|model| cmd_bench(&model, prompt_tokens, gen_tokens, prefill_threads, cold, seed, json, &store)),
        Cmd::Eval { model, text, reference, experts, group_size, window, max_tokens, json, store } => resolve(model)
            .and_then(|model| {
                cmd_eval(EvalArgs { model, text, reference, experts, group_size, window, max_tokens, json }, &store)
            }),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
