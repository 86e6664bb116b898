//! Token generation: sampling (temperature, top-k, top-p, min-p, repetition penalty, seed) and
//! the prefill + decode loop with streaming and stop conditions.

use crate::model::{Model, State};
use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Sampling settings; the defaults are greedy decoding.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one; 0 disables.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already seen tokens; 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Added to the logits of these tokens before anything else (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            logit_bias: vec![],
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty);
        }
        Ok(())
    }
}

/// Picks the next token from logits.
pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (first on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Samples one token id; `history` is every token so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let l = &mut logits[t as usize];
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let mut cand: Vec<(usize, f32)> = logits.iter().map(|&l| l / p.temperature).enumerate().collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let m = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - m).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].0 as u32;
            }
        }
        cand[keep - 1].0 as u32
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is not part of the output).
    Eos,
    /// `max_tokens` were produced.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The token callback asked to stop.
    Cancelled,
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub generated_tokens: usize,
    pub generate_secs: f64,
    pub stop: StopReason,
}

impl GenStats {
    pub fn prompt_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    pub fn gen_tok_s(&self) -> f64 {
        self.generated_tokens as f64 / self.generate_secs.max(1e-9)
    }
    pub fn line(&self) -> String {
        format!(
            "prompt: {} tokens, {:.2} tok/s | generated: {} tokens, {:.2} tok/s | stop: {:?}",
            self.prompt_tokens,
            self.prompt_tok_s(),
            self.generated_tokens,
            self.gen_tok_s(),
            self.stop
        )
    }
}

/// Prefills `prompt` after what `state` holds, then decodes up to `max_tokens` new tokens.
/// `on_token` sees each new token as it is made and returns false to stop.
pub fn generate(
    model: &Model,
    state: &mut State,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenStats)> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let ctx = model.max_context();
    if state.pos + prompt.len() > ctx {
        bail!(
            "the prompt has {} tokens{}, more than the context of {} tokens",
            prompt.len(),
            if state.pos > 0 { format!(" after {} cached", state.pos) } else { String::new() },
            ctx
        );
    }
    let mut history: Vec<u32> = prompt.to_vec();
    let t0 = Instant::now();
    let mut logits = model.forward(state, prompt, false)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let stop = loop {
        if out.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        let tok = sampler.sample(&mut logits, &history);
        if stop_ids.contains(&tok) {
            break StopReason::Eos;
        }
        out.push(tok);
        history.push(tok);
        if !on_token(tok) {
            break StopReason::Cancelled;
        }
        if out.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if state.pos + 1 >= ctx {
            // the sequence (cached positions + this token) fills the context
            break StopReason::ContextFull;
        }
        logits = model.forward(state, &[tok], false)?;
    };
    let stats = GenStats {
        prompt_tokens: prompt.len(),
        prompt_secs,
        generated_tokens: out.len(),
        generate_secs: t1.elapsed().as_secs_f64(),
        stop,
    };
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0], &[]), 1);
        // repetition penalty pushes the seen best token below the next one
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 2.0, -1.0], &[1]), 0);
        // top-k 1 with temperature is greedy
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, seed: 3, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
        // min-p removes the unlikely tail
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, seed: 1, ..Default::default() });
        for _ in 0..50 {
            assert_ne!(s.sample(&mut [5.0, 4.9, -10.0], &[]), 2);
        }
        // same seed, same draws
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed, ..Default::default() });
            (0..16).map(|_| s.sample(&mut [0.0; 50], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
