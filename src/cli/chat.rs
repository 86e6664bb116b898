//! `chat` and `serve`.

use super::args::*;
use anyhow::{Context, Result};
use flashmoe::tokenizer::TextTokenizer;
use std::path::PathBuf;

#[allow(clippy::too_many_arguments)]
pub(crate) fn cmd_chat(
    model: Option<PathBuf>,
    system: Option<String>,
    system_file: Option<PathBuf>,
    no_think: bool,
    max_tokens: usize,
    sampling: &SamplingArgs,
    store: &StoreArgs,
    prompt_cache: &PromptCacheArgs,
) -> Result<()> {
    let dir = resolve(model)?;
    let system = match system_file {
        Some(f) => Some(
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?.trim().to_string(),
        ),
        None => system,
    };
    let model = store.load(&dir)?;
    let pc = prompt_cache.open(false, &dir, &model)?;
    let mut session = flashmoe::session::Session::new(model, TextTokenizer::load(&dir)?);
    session.set_prompt_cache(pc);
    let opts = flashmoe::chat::ChatOptions { system, thinking: !no_think, max_tokens, sampling: sampling.params()? };
    flashmoe::chat::run(session, opts)
}

pub(crate) fn cmd_serve(
    model: Option<PathBuf>,
    host: &str,
    port: u16,
    model_id: Option<String>,
    opts: flashmoe::server::ServerOptions,
    store: &StoreArgs,
    prompt_cache: &PromptCacheArgs,
) -> Result<()> {
    let api_key = opts.api_key.clone().filter(|k| !k.is_empty());
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
    if !loopback && api_key.is_none() {
        eprintln!("warning: serving on {host} without --api-key: anyone who can reach this address can use the model");
    }
    let dir = resolve(model)?;
    let tok = TextTokenizer::load(&dir)?;
    if !tok.has_chat_template() {
        eprintln!("warning: {} has no chat template; /v1/chat/completions will fail", dir.display());
    }
    let model = store.load(&dir)?;
    // on by default: agents resend long, mostly identical prompts, and a restart keeps them
    let pc = prompt_cache.open(true, &dir, &model)?;
    if let Some(pc) = &pc {
        eprintln!("prompt cache: {} (up to {:.1} GB)", pc.dir().display(), pc.limit() as f64 / 1e9);
    }
    let mut session = flashmoe::session::Session::new(model, tok);
    session.set_prompt_cache(pc);
    let model_id = model_id.unwrap_or_else(|| {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        if name.starts_with("default-") { "flashmoe-default".into() } else { name }
    });
    if let Some(bad) = opts.cors.iter().find(|o| *o != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
    {
        anyhow::bail!("--cors {bad}: an origin is `*` or scheme://host[:port], e.g. http://localhost:3000");
    }
    let opts = flashmoe::server::ServerOptions { model_id, api_key, ..opts };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(flashmoe::server::serve(session, host, port, opts))
}
