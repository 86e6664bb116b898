//! `generate`.

use super::args::*;
use anyhow::{Result, bail};
use flashmoe::flash::CacheMode;
use flashmoe::generate::{Sampler, generate};
use flashmoe::model::Model;
use flashmoe::tokenizer::{StreamDecoder, TextTokenizer};
use serde_json::json;
use std::io::Write;

pub(crate) fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling.params()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if a.system.is_some() && !a.chat {
        bail!("--system needs --chat (the system message goes through the chat template)");
    }
    let dir = resolve(a.model.clone())?;
    let model = a.store.load(&dir)?;
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
    if let Some(pc) = a.prompt_cache.open(false, &dir, &model)? {
        return generate_cached(a, model, tok, pc, &ids, params);
    }
    let stops = flashmoe::generate::stop_ids(&model.cfg, &tok);
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

/// Expert-store statistics of a run, one line per item, on stderr.
pub(crate) fn print_store_stats(m: &Model, tokens: usize) {
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

/// `generate --prompt-cache`: the prompt through a session with the prompt cache, so it
/// resumes from the longest saved prefix and saves its own state for the next run.
fn generate_cached(
    a: GenerateArgs,
    model: Model,
    tok: TextTokenizer,
    pc: flashmoe::prompt_cache::PromptCache,
    ids: &[u32],
    params: flashmoe::generate::SamplingParams,
) -> Result<()> {
    let mut s = flashmoe::session::Session::new(model, tok);
    s.set_prompt_cache(Some(pc));
    if a.chat && a.system.is_some() {
        let msgs = json!([{"role": "system", "content": a.system}, {"role": "user", "content": a.prompt}]);
        let mut extra = serde_json::Map::new();
        if a.no_think {
            extra.insert("enable_thinking".into(), json!(false));
        }
        if let Some(t) = flashmoe::session::system_prefix(&s.tok, ids, &msgs, None, &extra) {
            s.snapshot_at(t);
        }
    }
    if !a.chat {
        print!("{}", a.prompt);
    }
    let mut stdout = std::io::stdout();
    let o = s.generate(ids, a.max_tokens, &params, &[], |piece| {
        print!("{piece}");
        stdout.flush().is_ok()
    })?;
    println!();
    eprintln!("{}", o.stats.line());
    eprintln!(
        "prompt cache: {} of {} prompt tokens loaded, {} prefilled, first token after {:.3} s",
        o.loaded_tokens,
        o.prompt_tokens,
        o.prompt_tokens - o.reused_tokens,
        o.stats.prompt_secs
    );
    print_store_stats(&s.model, o.prompt_tokens + o.tokens.len());
    Ok(())
}
