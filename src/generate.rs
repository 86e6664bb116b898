//! Token generation: sampling (temperature, top-k, top-p, min-p, repetition penalty, seed) and
//! the prefill + decode loop with streaming and stop conditions.

use crate::model::{Model, State};
use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
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
    /// OpenAI's penalties over the generated tokens: subtracted once from the logit of every
    /// token generated so far (presence) and once per time it was (frequency); 0 disables.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Only tokens this grammar allows are sampled (structured output).
    pub constraint: Option<crate::grammar::Constraint>,
    /// Report each sampled token's log-probability and this many most likely alternatives
    /// ([`Sampler::logprobs`]); none: nothing is computed.
    pub logprobs: Option<usize>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            constraint: None,
            logprobs: None,
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
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                bail!("{name} must be in [-2, 2], got {v}");
            }
        }
        Ok(())
    }
}

/// Below this temperature sampling is greedy.
pub const MIN_TEMPERATURE: f32 = 1e-6;

/// Picks the next token from logits.
pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
    /// Per-token scratch, kept so sampling allocates nothing once warm: the candidates
    /// (token, weight), the top-k heap, and a bitset of the tokens seen in the history.
    cand: Vec<(u32, f32)>,
    heap: Vec<std::cmp::Reverse<Ranked>>,
    seen: Vec<u64>,
    /// Length of the history at the first call: the prompt (penalties count what follows).
    prompt_len: Option<usize>,
    /// Generated tokens, sorted, for the presence and frequency penalties.
    counts: Vec<u32>,
}

/// A logit with its token, ordered by logit (higher first), then token id (lower first).
#[derive(Clone, Copy, Debug)]
struct Ranked(f32, u32);

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for Ranked {}

/// Best first: larger weight, then lower token id.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest value (first on ties). A vocabulary's logits are scanned by the
/// decode team ([`crate::par`]) in parts: one thread reading back what all of them wrote held
/// every other one up between tokens.
pub fn argmax(x: &[f32]) -> usize {
    let threads = rayon::current_num_threads().min(64);
    if x.len() < 1 << 16 || threads < 2 {
        return argmax_serial(x);
    }
    let part = x.len().div_ceil(threads);
    let best: [AtomicUsize; 64] = std::array::from_fn(|_| AtomicUsize::new(usize::MAX));
    crate::par::for_each(x.len().div_ceil(part), |i| {
        let s = &x[i * part..x.len().min((i + 1) * part)];
        best[i].store(i * part + argmax_serial(s), Relaxed);
    });
    // the first part's best wins ties; a part of NaN only offers NaN, which never wins
    let mut top: Option<usize> = None;
    for b in best.iter().map(|b| b.load(Relaxed)).take_while(|&b| b != usize::MAX) {
        if !x[b].is_nan() && top.is_none_or(|t| x[b] > x[t]) {
            top = Some(b);
        }
    }
    top.unwrap_or(0)
}

fn argmax_serial(x: &[f32]) -> usize {
    // the largest value by 16 independent lanes (a loop the compiler vectorizes: a scan that
    // carries the best index took ~230 µs per token over a 152k vocabulary), then its first
    // index; NaN is never the largest, as in a scan with `>`
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let top = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    x.iter().position(|&v| v == top).unwrap_or(0)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            cand: Vec::new(),
            heap: Vec::new(),
            seen: Vec::new(),
            prompt_len: None,
            counts: Vec::new(),
        }
    }

    /// Samples one token id; `history` is every token so far (for the repetition penalty).
    ///
    /// Nothing here sorts the vocabulary: top-k keeps a heap of k, min-p is a filter, and top-p
    /// sorts only as long a prefix of the most likely tokens as it needs.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let Some(c) = self.params.constraint.clone() else {
            return self.pick(logits, history);
        };
        c.mask(logits);
        let t = self.pick(logits, history);
        c.accept(t);
        t
    }

    fn pick(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if !self.candidates(logits, history) {
            return argmax(logits) as u32;
        }
        let total: f32 = self.cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in self.cand.iter() {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        self.cand.last().map_or(argmax(logits) as u32, |c| c.0)
    }

    /// The log-probabilities of `token`, just sampled from `logits` (which [`Sampler::sample`]
    /// left processed: bias, penalties and grammar mask applied), when they were asked for.
    ///
    /// They are those of the distribution the token was drawn from: the processed logits at
    /// the temperature (1 when greedy), before the top-k, top-p and min-p truncation (which
    /// would leave every other token at −∞). OpenAI reports the distribution after its
    /// processing too; vLLM's default is the raw model's.
    pub fn logprobs(&self, logits: &[f32], token: u32) -> Option<TokenLogprob> {
        let k = self.params.logprobs?;
        Some(log_probs(logits, self.inv_temperature(), token, k))
    }

    /// The log-probabilities of a token that was not sampled (a prompt token), as if it were
    /// drawn after `history` under these settings: bias and repetition penalty apply, the
    /// presence and frequency penalties count nothing (no token was generated yet).
    pub fn score(&mut self, logits: &mut [f32], history: &[u32], token: u32) -> TokenLogprob {
        let start = self.prompt_len.replace(history.len());
        self.adjust(logits, history);
        self.prompt_len = start;
        log_probs(logits, self.inv_temperature(), token, self.params.logprobs.unwrap_or(0))
    }

    /// 1/T, or 1 when greedy (the logits as they are).
    fn inv_temperature(&self) -> f32 {
        if self.params.temperature < MIN_TEMPERATURE { 1.0 } else { 1.0 / self.params.temperature }
    }

    /// Applies the bias and the penalties to `logits`, then leaves in `self.cand` the tokens
    /// the filters keep, with unnormalized weights. False when decoding is greedy.
    fn candidates(&mut self, logits: &mut [f32], history: &[u32]) -> bool {
        self.adjust(logits, history);
        let p = &self.params;
        // temperatures this small are greedy (1/T would overflow f32 and turn every weight
        // into NaN)
        if p.temperature < MIN_TEMPERATURE {
            return false;
        }
        self.filter(logits);
        true
    }

    /// Adds the logit bias and applies the penalties to `logits`, in place.
    fn adjust(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            self.seen.resize(logits.len().div_ceil(64), 0);
            for &t in history {
                let t = t as usize;
                if t < logits.len() && self.seen[t / 64] & (1 << (t % 64)) == 0 {
                    self.seen[t / 64] |= 1 << (t % 64);
                    let l = &mut logits[t];
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
            for &t in history {
                if let Some(w) = self.seen.get_mut(t as usize / 64) {
                    *w = 0;
                }
            }
        }
        let start = (*self.prompt_len.get_or_insert(history.len())).min(history.len());
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.counts.clear();
            self.counts.extend_from_slice(&history[start..]);
            self.counts.sort_unstable();
            for run in self.counts.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
    }

    /// Leaves in `self.cand` the tokens top-k, min-p and top-p keep, weighted exp((l − max)/T).
    fn filter(&mut self, logits: &[f32]) {
        let p = &self.params;
        let cand = &mut self.cand;
        cand.clear();
        let sorted = p.top_k > 0 && p.top_k < logits.len();
        if sorted {
            // the k best in a min-heap whose root is the worst kept
            let mut heap = std::collections::BinaryHeap::from(std::mem::take(&mut self.heap));
            heap.clear();
            for (i, &l) in logits.iter().enumerate() {
                let r = Ranked(l, i as u32);
                if heap.len() < p.top_k {
                    heap.push(std::cmp::Reverse(r));
                } else if let Some(mut worst) = heap.peek_mut()
                    && r > worst.0
                {
                    *worst = std::cmp::Reverse(r);
                }
            }
            cand.extend(heap.iter().map(|r| (r.0.1, r.0.0)));
            self.heap = heap.into_vec();
            cand.sort_unstable_by(best_first);
        } else {
            cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        }
        // weights relative to the most likely candidate: exp((l − max) / T)
        let m = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let inv_t = 1.0 / p.temperature;
        let mut z = 0.0f32;
        for c in cand.iter_mut() {
            c.1 = ((c.1 - m) * inv_t).exp();
            z += c.1;
        }
        if p.min_p > 0.0 {
            // probability ≥ min_p × the best one's; the best has weight 1
            cand.retain(|c| c.1 >= p.min_p);
        }
        if p.top_p < 1.0 {
            let keep = sort_prefix_reaching(cand, p.top_p * z);
            cand.truncate(keep);
        }
    }
}

/// A token's log-probability, and the most likely tokens with theirs (best first).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits × scale` at `token`, and at the `k` largest logits (ties: lower
/// id first; tokens at −∞, such as those a grammar forbids, are never among them). Summed in
/// f64, so a large vocabulary loses no precision.
pub fn log_probs(logits: &[f32], scale: f32, token: u32, k: usize) -> TokenLogprob {
    let m = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let lse = logits.iter().map(|&l| ((l - m) as f64 * scale as f64).exp()).sum::<f64>().ln();
    let lp = |l: f32| if m.is_finite() { ((l - m) as f64 * scale as f64 - lse) as f32 } else { f32::NEG_INFINITY };
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    let top = top_k(logits, k).into_iter().map(|(t, l)| (t, lp(l))).collect();
    TokenLogprob { token, logprob, top }
}

/// The `k` largest finite logits with their tokens, best first (ties: lower id first).
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    use std::cmp::Reverse;
    let mut heap = std::collections::BinaryHeap::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate().filter(|(_, l)| l.is_finite()) {
            heap.push(Reverse(Ranked(l, i as u32)));
            if heap.len() > k {
                heap.pop();
            }
        }
    }
    let mut top: Vec<(u32, f32)> = heap.into_iter().map(|Reverse(r)| (r.1, r.0)).collect();
    top.sort_unstable_by(best_first);
    top
}

/// The seed of choice `i` of a request seeded `seed`: choice 0 draws what a single answer
/// would, the others distinct streams (mixed, so that seed s + 1 is not choice 1 of seed s).
pub fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    // splitmix64 of the pair
    let mut z = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Length of the shortest run of the best candidates whose weights reach `target`, left sorted
/// best first at the front: sorts a growing prefix (64, then 8× more each round), so an
/// already sorted list costs one pass.
fn sort_prefix_reaching(cand: &mut [(u32, f32)], target: f32) -> usize {
    let (mut done, mut acc, mut r) = (0, 0.0, 64);
    loop {
        let end = r.min(cand.len());
        let rest = &mut cand[done..];
        if end - done < rest.len() {
            rest.select_nth_unstable_by(end - done - 1, best_first);
        }
        rest[..end - done].sort_unstable_by(best_first);
        for (i, c) in cand[done..end].iter().enumerate() {
            acc += c.1;
            if acc >= target {
                return done + i + 1;
            }
        }
        if end == cand.len() {
            return end;
        }
        (done, r) = (end, r * 8);
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

impl StopReason {
    /// How `generate` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "end of text",
            StopReason::MaxTokens => "max tokens",
            StopReason::ContextFull => "context full",
            StopReason::Cancelled => "cancelled",
        }
    }
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
            "prompt: {} tokens, {:.2} tok/s | generated: {} tokens, {:.2} tok/s | stop: {}",
            self.prompt_tokens,
            self.prompt_tok_s(),
            self.generated_tokens,
            self.gen_tok_s(),
            self.stop.as_str()
        )
    }
}

/// The tokens that end a generation: the config's `eos_token_id`s, the tokenizer's EOS, and
/// the chat end-of-turn markers the vocabulary has (a chat model ends its turn with
/// `<|im_end|>` even where config.json names only `<|endoftext|>`). One policy for every
/// command.
pub fn stop_ids(cfg: &crate::config::ModelConfig, tok: &crate::tokenizer::TextTokenizer) -> Vec<u32> {
    let mut ids = cfg.eos_token_ids.clone();
    ids.extend(tok.eos_id());
    for s in ["<|im_end|>", "<|endoftext|>"] {
        ids.extend(tok.token_to_id(s));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
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
    let t0 = Instant::now();
    let logits = model.forward(state, prompt, false)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (out, stop) = decode(model, state, logits, prompt.to_vec(), max_tokens, sampler, stop_ids, |t, _| on_token(t))?;
    let stats = GenStats {
        prompt_tokens: prompt.len(),
        prompt_secs,
        generated_tokens: out.len(),
        generate_secs: t1.elapsed().as_secs_f64(),
        stop,
    };
    Ok((out, stats))
}

/// The decode loop every command shares (`generate`, [`crate::session::Session`], `bench`):
/// from the logits of the last token `state` holds, samples up to `max_tokens` tokens, each
/// fed back, until a stop token (not returned), the callback's false (the token it saw is
/// returned), or a full context. `history` is every token so far (repetition penalty). The
/// last returned token is fed to `state` only when the stop was a stop token. The callback also
/// gets the token's log-probabilities when the sampler's parameters ask for them.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    model: &Model,
    state: &mut State,
    logits: Vec<f32>,
    history: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    on_token: impl FnMut(u32, Option<TokenLogprob>) -> bool,
) -> Result<(Vec<u32>, StopReason)> {
    let ctx = model.max_context();
    decode_with(
        ctx,
        state,
        logits,
        history,
        max_tokens,
        sampler,
        stop_ids,
        |st, t, logits| model.forward_into(st, &[t], false, logits),
        on_token,
    )
}

/// [`decode`] with each step's forward pass made by `step` (the server's shared batch step,
/// [`crate::batch`]) into the logits it is given, the previous step's (their buffer is
/// reused); `ctx` is the model's context.
#[allow(clippy::too_many_arguments)]
pub fn decode_with(
    ctx: usize,
    state: &mut State,
    mut logits: Vec<f32>,
    mut history: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut step: impl FnMut(&mut State, u32, &mut Vec<f32>) -> Result<()>,
    mut on_token: impl FnMut(u32, Option<TokenLogprob>) -> bool,
) -> Result<(Vec<u32>, StopReason)> {
    let mut out = Vec::new();
    let stop = loop {
        if out.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        let tok = sampler.sample(&mut logits, &history);
        if stop_ids.contains(&tok) {
            break StopReason::Eos;
        }
        let lp = sampler.logprobs(&logits, tok);
        out.push(tok);
        history.push(tok);
        if !on_token(tok, lp) {
            break StopReason::Cancelled;
        }
        if out.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if state.pos + 1 >= ctx {
            // the sequence (cached positions + this token) fills the context
            break StopReason::ContextFull;
        }
        step(state, tok, &mut logits)?;
    };
    Ok((out, stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_largest_value() {
        // the scan it replaces: strict >, so ties go to the lowest index and NaN never wins
        let scan = |x: &[f32]| (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b });
        let mut seed = 9u64;
        for len in [1usize, 2, 15, 16, 17, 33, 100, 1000] {
            for case in 0..6 {
                let mut x: Vec<f32> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) % 7) as f32 - 3.0
                    })
                    .collect();
                match case {
                    1 => x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    2 => x[len / 2] = f32::NAN,
                    3 => x[len - 1] = 100.0,
                    4 => x[0] = f32::INFINITY,
                    _ => {}
                }
                if case == 2 && len > 1 && x[0].is_nan() {
                    continue;
                }
                assert_eq!(argmax(&x), scan(&x), "len {len} case {case}: {x:?}");
            }
        }
    }

    #[test]
    fn argmax_in_parts_on_a_team_is_the_scan() {
        let scan = |x: &[f32]| (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b });
        for threads in [2usize, 3, 8, 32] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for len in [1usize << 16, (1 << 16) + 1, 151_936] {
                let part = len.div_ceil(threads.min(64));
                for case in 0..6 {
                    let mut x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1013) as f32 * 0.01).collect();
                    match case {
                        // equal maxima at the end of one part and the start of the next
                        1 => (x[part - 1], x[part]) = (50.0, 50.0),
                        // every value equal: the first index
                        2 => x.iter_mut().for_each(|v| *v = 1.5),
                        // a later part all NaN but the first
                        3 => x[part..(2 * part).min(len)].iter_mut().for_each(|v| *v = f32::NAN),
                        4 => x[len - 1] = f32::INFINITY,
                        5 => x.iter_mut().skip(1).for_each(|v| *v = f32::NEG_INFINITY),
                        _ => {}
                    }
                    let got = pool.install(|| {
                        let _hold = crate::par::hold();
                        argmax(&x)
                    });
                    assert_eq!(got, scan(&x), "threads {threads} len {len} case {case}");
                }
            }
        }
    }

    #[test]
    fn greedy_and_filters() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0], &[]), 1);
        // presence and frequency penalties count only what was generated after the prompt
        let mut s =
            Sampler::new(SamplingParams { presence_penalty: 1.0, frequency_penalty: 0.5, ..Default::default() });
        let prompt = [0u32, 0, 0];
        assert_eq!(s.sample(&mut [3.0, 2.9, 0.0], &prompt), 0, "the prompt's tokens carry no penalty");
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0], &[0, 0, 0, 0]), 1, "one generated 0: 3 − 1.5 < 2");
        assert_eq!(s.sample(&mut [3.0, 1.0, 0.0], &[0, 0, 0, 0, 1]), 0, "3 − 1.5 > 1 − 1.5");
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

    /// log_softmax(x × scale) in f64, directly.
    fn reference_log_softmax(x: &[f32], scale: f64) -> Vec<f64> {
        let z: f64 = x.iter().map(|&l| (l as f64 * scale).exp()).sum();
        x.iter().map(|&l| l as f64 * scale - z.ln()).collect()
    }

    #[test]
    fn log_probs_are_the_log_softmax_and_the_top_is_sorted() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 / 9.0).sin() * 6.0).collect();
        for scale in [1.0f32, 1.0 / 0.7, 1.0 / 1.8] {
            let want = reference_log_softmax(&logits, scale as f64);
            let lp = log_probs(&logits, scale, 17, 20);
            assert!((lp.logprob as f64 - want[17]).abs() < 1e-5, "{} vs {}", lp.logprob, want[17]);
            assert_eq!(lp.top.len(), 20);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
            for (&(t, l), &w) in lp.top.iter().zip(&order) {
                assert_eq!(t as usize, w);
                assert!((l as f64 - want[w]).abs() < 1e-5);
            }
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(lp.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() <= 1.0 + 1e-6);
        }
        // tokens a grammar forbids are never among the top; the ties go to the lower id
        let lp = log_probs(&[f32::NEG_INFINITY, 1.0, 1.0, f32::NEG_INFINITY], 1.0, 2, 5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(log_probs(&[f32::NEG_INFINITY; 3], 1.0, 0, 2).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn sampled_logprobs_are_those_of_the_processed_distribution() {
        let raw = [0.5f32, 2.0, 1.0, -1.0];
        // greedy: the chosen token is the top one, at the logits' own scale (bias applied)
        let p = SamplingParams { logprobs: Some(3), logit_bias: vec![(2, 3.0)], ..Default::default() };
        let mut s = Sampler::new(p);
        let mut l = raw;
        let t = s.sample(&mut l, &[]);
        let lp = s.logprobs(&l, t).unwrap();
        let biased = [0.5f32, 2.0, 4.0, -1.0];
        assert_eq!((t, lp.top[0].0), (2, 2));
        assert!((lp.logprob as f64 - reference_log_softmax(&biased, 1.0)[2]).abs() < 1e-6);
        assert_eq!(lp.logprob, lp.top[0].1);
        // sampled: the temperature divides, the truncation does not cut the reported distribution
        let p = SamplingParams { logprobs: Some(4), temperature: 0.5, top_k: 1, seed: 9, ..Default::default() };
        let mut s = Sampler::new(p);
        let mut l = raw;
        let t = s.sample(&mut l, &[]);
        let lp = s.logprobs(&l, t).unwrap();
        let want = reference_log_softmax(&raw, 2.0);
        assert_eq!(t, 1);
        assert!(lp.top.iter().all(|&(t, l)| (l as f64 - want[t as usize]).abs() < 1e-6), "{lp:?}");
        assert_eq!(lp.top.len(), 4);
        // nothing asked, nothing computed
        assert!(Sampler::new(SamplingParams::default()).logprobs(&raw, 1).is_none());
    }

    #[test]
    fn prompt_tokens_are_scored_without_generation_penalties() {
        let p = SamplingParams {
            logprobs: Some(1),
            presence_penalty: 2.0,
            repetition_penalty: 2.0,
            logit_bias: vec![(0, 1.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        // token 1 is in the history: the repetition penalty halves its logit; the presence
        // penalty counts no generated token
        let lp = s.score(&mut [0.0, 2.0, 1.0], &[1], 2);
        let want = reference_log_softmax(&[1.0, 1.0, 1.0], 1.0);
        assert!((lp.logprob as f64 - want[2]).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top, [(0, lp.logprob)]);
    }

    #[test]
    fn choice_seeds_are_distinct_and_the_first_is_the_seed() {
        assert_eq!(choice_seed(7, 0), 7);
        let seeds: std::collections::HashSet<u64> =
            (0..2).flat_map(|s| (0..16).map(move |i| choice_seed(s, i))).collect();
        assert_eq!(seeds.len(), 32, "choice 1 of seed 0 is not choice 0 of seed 1");
        assert_eq!(choice_seed(7, 3), choice_seed(7, 3));
    }

    /// The filters by a full sort of the vocabulary: the tokens kept and their probabilities.
    fn kept_by_full_sort(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
        let mut cand: Vec<(usize, f32)> = logits.iter().map(|&l| l / p.temperature).enumerate().collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let m = cand[0].1;
        let probs: Vec<f32> = cand.iter().map(|c| (c.1 - m).exp()).collect();
        let sum: f32 = probs.iter().sum();
        let probs: Vec<f32> = probs.iter().map(|x| x / sum).collect();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            if let Some(i) = probs.iter().position(|&q| {
                acc += q;
                acc >= p.top_p
            }) {
                keep = i + 1;
            }
        }
        if p.min_p > 0.0 {
            keep = keep.min(probs.iter().take_while(|&&q| q >= p.min_p * probs[0]).count().max(1));
        }
        cand[..keep].iter().zip(&probs).map(|(c, &q)| (c.0 as u32, q)).collect()
    }

    #[test]
    fn filters_keep_what_a_full_sort_keeps() {
        let mut st = 1u64;
        let mut rnd = || {
            st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (st >> 40) as f32 / (1u64 << 24) as f32
        };
        for case in 0..60 {
            let v = [1, 2, 7, 100, 1000, 5000][case % 6];
            // peaked and flat distributions, with ties
            let logits: Vec<f32> = (0..v).map(|_| (rnd() * 12.0).powi(1 + case as i32 % 3).round() / 4.0).collect();
            let p = SamplingParams {
                temperature: [0.3, 1.0, 1.7][case % 3],
                top_k: [0, 1, 5, 40, 2000][case % 5],
                top_p: [1.0, 0.9, 0.5, 0.999][case % 4],
                min_p: [0.0, 0.05, 0.3][case / 20],
                ..Default::default()
            };
            // tokens of zero weight (underflow) may be ordered differently: compare the rest, by id
            let mut want = kept_by_full_sort(&logits, &p);
            want.retain(|w| w.1 > 0.0);
            want.sort_by_key(|w| w.0);
            let mut s = Sampler::new(p.clone());
            assert!(s.candidates(&mut logits.clone(), &[]));
            let mut got = s.cand.clone();
            got.retain(|g| g.1 > 0.0);
            got.sort_by_key(|g| g.0);
            let z: f32 = if p.top_k > 0 && p.top_k < v {
                // weights of the top k
                let mut all: Vec<f32> = logits.clone();
                all.sort_by(|a, b| b.total_cmp(a));
                all[..p.top_k].iter().map(|l| ((l - all[0]) / p.temperature).exp()).sum()
            } else {
                let m = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
                logits.iter().map(|l| ((l - m) / p.temperature).exp()).sum()
            };
            let ids = |c: &[(u32, f32)]| c.iter().map(|c| c.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "case {case}: {p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 / z - w.1).abs() < 1e-5, "case {case}: {} vs {}", g.1 / z, w.1);
            }
        }
    }
}
