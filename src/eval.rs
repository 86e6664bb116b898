//! Quality measurement: perplexity of a text, and agreement with a reference model (mean KL
//! divergence of the next-token distributions, top-1 agreement).

use crate::model::Model;
use anyhow::{Result, bail};
use std::time::Instant;

/// Result of [`evaluate`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    /// Tokens predicted (every token of a window but its first).
    pub tokens: usize,
    pub windows: usize,
    /// Mean negative log-likelihood (nats per token).
    pub nll: f64,
    pub perplexity: f64,
    /// Mean KL(reference ‖ model) per token, with a reference.
    pub kl: Option<f64>,
    /// Fraction of positions where both models' most likely token agree, with a reference.
    pub top1: Option<f64>,
    pub secs: f64,
    /// The model's routing over the text (not the reference's).
    pub routing: crate::profile::RoutingSummary,
}

fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    let ls = s.ln();
    out.clear();
    out.extend(row.iter().map(|&x| x as f64 - m - ls));
}

fn argmax(x: &[f64]) -> usize {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b]).then(b.cmp(&a))).unwrap_or(0)
}

/// Scores `ids` in consecutive windows of `window` tokens, each from a fresh state; within a
/// window every token is predicted from all before it. Positions are fed in chunks so the
/// logits of a huge vocabulary never need a whole window at once.
pub fn evaluate(model: &Model, reference: Option<&Model>, ids: &[u32], window: usize) -> Result<EvalResult> {
    evaluate_with(model, reference, ids, window, |_| {})
}

/// The tokens [`evaluate`] will predict: every token of a window but its first.
pub fn predicted_tokens(ids: &[u32], window: usize) -> usize {
    ids.chunks(window.max(2)).filter(|w| w.len() >= 2).map(|w| w.len() - 1).sum()
}

/// [`evaluate`], calling `progress(n)` after each chunk of `n` predicted tokens (a progress bar
/// of [`predicted_tokens`] steps).
pub fn evaluate_with(
    model: &Model,
    reference: Option<&Model>,
    ids: &[u32],
    window: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalResult> {
    if window < 2 {
        bail!("the evaluation window must hold at least 2 tokens");
    }
    if window > model.max_context() {
        bail!("window of {window} tokens exceeds the model's context of {}", model.max_context());
    }
    if ids.len() < 2 {
        bail!("the text has fewer than 2 tokens");
    }
    if let Some(r) = reference
        && r.vocab_size() != model.vocab_size()
    {
        bail!(
            "the reference model's vocabulary ({}) differs from the model's ({})",
            r.vocab_size(),
            model.vocab_size()
        );
    }
    let t0 = Instant::now();
    crate::profile::routing_start();
    let v = model.vocab_size();
    const CHUNK: usize = 64;
    let (mut nll, mut n, mut kl, mut agree, mut windows) = (0.0f64, 0usize, 0.0f64, 0usize, 0usize);
    let (mut lp, mut lq) = (Vec::new(), Vec::new());
    for win in ids.chunks(window) {
        if win.len() < 2 {
            break;
        }
        windows += 1;
        let mut st = model.new_state();
        let mut rst = reference.map(|r| r.new_state());
        // feed all but the last token; row i predicts win[i + 1]
        for (c, chunk) in win[..win.len() - 1].chunks(CHUNK).enumerate() {
            let logits = model.forward(&mut st, chunk, true)?;
            crate::profile::routing_record(false);
            let rlogits = match (reference, rst.as_mut()) {
                (Some(r), Some(s)) => Some(r.forward(s, chunk, true)?),
                _ => None,
            };
            crate::profile::routing_record(true);
            for i in 0..chunk.len() {
                let target = win[c * CHUNK + i + 1] as usize;
                log_softmax(&logits[i * v..(i + 1) * v], &mut lq);
                nll -= lq[target];
                n += 1;
                if let Some(rl) = &rlogits {
                    log_softmax(&rl[i * v..(i + 1) * v], &mut lp);
                    kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
                    agree += (argmax(&lp) == argmax(&lq)) as usize;
                }
            }
            progress(chunk.len());
        }
    }
    let mean = nll / n as f64;
    Ok(EvalResult {
        tokens: n,
        windows,
        nll: mean,
        perplexity: mean.exp(),
        kl: reference.map(|_| kl / n as f64),
        top1: reference.map(|_| agree as f64 / n as f64),
        secs: t0.elapsed().as_secs_f64(),
        routing: crate::profile::routing_take().summary(),
    })
}
