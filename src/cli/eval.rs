//! `eval` (perplexity) and `logits` (the verification tool).

use super::args::*;
use anyhow::{Context, Result, bail};
use flashmoe::load::load_model_with;
use flashmoe::tensor::Precision;
use flashmoe::tokenizer::TextTokenizer;
use serde_json::json;
use std::path::PathBuf;

pub(crate) fn cmd_eval(a: EvalArgs, store: &StoreArgs) -> Result<()> {
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
    let mut model = loading(&a.model, || load_model_with(&a.model, &lo))?;
    // the model only, not the reference
    store.apply_experts(&mut model)?;
    if let Some(e) = &a.experts {
        model.requantize_experts(parse_kind(e, a.group_size, "experts")?)?;
    }
    let reference =
        a.reference.as_ref().map(|r| loading(r, || load_model_with(r, &store.load_options(r)?))).transpose()?;
    let window = a.window.min(model.max_context());
    let pb = flashmoe::progress::bar(flashmoe::eval::predicted_tokens(&ids, window) as u64, "eval", "tokens");
    let r = flashmoe::eval::evaluate_with(&model, reference.as_ref(), &ids, window, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
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
        if !r.routing.layers.is_empty() {
            println!("{}", routing_line(&r.routing));
        }
    }
    Ok(())
}

pub(crate) fn cmd_logits(model: PathBuf, tokens: &str, fast: bool, incremental: bool, store: &StoreArgs) -> Result<()> {
    if fast && store.exact {
        bail!("logits: --fast and --exact contradict each other (logits is exact by default)");
    }
    let ids: Vec<u32> = tokens
        .split(',')
        .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
        .collect::<Result<_>>()?;
    let mut opts = store.load_options(&model)?;
    opts.precision = if fast { Precision::Fast } else { Precision::Exact };
    // the verification tool: an f32 cache unless asked
    opts.kv_cache = store.kv_cache(flashmoe::layers::attention::KvType::F32)?;
    let mut m = loading(&model, || load_model_with(&model, &opts))?;
    store.apply_experts(&mut m)?;
    if ids.is_empty() {
        bail!("--tokens: no token ids");
    }
    let mut st = m.new_state();
    let logits = if incremental {
        // the decode path: each token through the cache after the ones before it
        let mut all = Vec::with_capacity(ids.len() * m.vocab_size());
        for &t in &ids {
            all.extend(m.forward(&mut st, &[t], false)?);
        }
        all
    } else {
        m.forward(&mut st, &ids, true)?
    };
    let rows: Vec<&[f32]> = logits.chunks(m.vocab_size()).collect();
    println!("{}", json!({"tokens": ids, "logits": rows}));
    Ok(())
}

/// One line of routing statistics (means over the MoE layers).
pub(crate) fn routing_line(r: &flashmoe::profile::RoutingSummary) -> String {
    format!(
        "routing: top 10% of experts take {:.1}% of routings, popularity entropy {:.3} of uniform \
         (as {:.1}% of the experts uniformly), {:.1}% of a token's experts reused from the previous token \
         ({:.1}% from popularity alone), a {:.0}-token chunk needs {:.1}% of the experts (means over {} MoE layers)",
        100.0 * r.top10_share,
        r.entropy,
        100.0 * r.effective_share,
        100.0 * r.reuse,
        100.0 * r.independent_reuse,
        r.layers.iter().map(|l| l.chunk_tokens).sum::<f64>() / r.layers.len().max(1) as f64,
        100.0 * r.chunk_distinct_share,
        r.layers.len()
    )
}
