//! A conversation engine over one model: keeps the sequence state between requests so a prompt
//! that extends the previous one only prefills its new tokens, streams text, honours stop
//! strings and cancellation.
//!
//! DeltaNet state cannot be rolled back token by token, so besides the live state the session
//! keeps snapshots taken where prompts ended; a prompt that diverges from the cached tokens
//! resumes from the latest snapshot at or before the divergence (the chat template rewrites
//! earlier assistant turns, e.g. dropping their thinking, so this matters). Chat callers also
//! name where the prompt's last turn begins ([`Session::snapshot_at`]): the next turn's prompt
//! re-renders everything after it (the generation prompt's empty `<think></think>` with
//! thinking off is gone from history), so a snapshot there is what the next turn resumes from.
//!
//! With a prompt cache ([`Session::set_prompt_cache`], [`crate::prompt_cache`]) the snapshots
//! are also saved to disk, and a prompt that begins with a saved prefix longer than what memory
//! holds loads it: across conversations, sessions and processes.

use crate::generate::{GenStats, Sampler, SamplingParams, StopReason, TokenLogprob};
use crate::model::{Model, State};
use crate::prompt_cache::PromptCache;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use anyhow::{Result, bail};
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Instant;

/// Snapshots kept (each is a full copy of the sequence state).
const MAX_SNAPSHOTS: usize = 4;

/// Why a generation ended, in OpenAI terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The caller cancelled (Ctrl-C, client gone).
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// Result of [`Session::generate`].
#[derive(Clone, Debug)]
pub struct Output {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens that were already in the state (not prefilled again).
    pub reused_tokens: usize,
    /// Of those, the tokens loaded from the prompt cache on disk.
    pub loaded_tokens: usize,
    /// The stop string that ended the text, if one did.
    pub stop_string: Option<String>,
    pub stats: GenStats,
    /// With `logprobs` asked for: those of the generated tokens whose text begins in `text`
    /// (a stop string's own tokens are not among them).
    pub logprobs: Vec<Scored>,
}

/// A generated token's log-probabilities, and the byte offset in the output text where its
/// text begins (always a character boundary: a token that completes a character begins where
/// that character does).
#[derive(Clone, Debug)]
pub struct Scored {
    pub logprob: TokenLogprob,
    pub offset: usize,
}

/// A prompt that does not fit the model's context.
#[derive(Debug)]
pub struct ContextExceeded {
    pub prompt_tokens: usize,
    pub context: usize,
}

impl std::fmt::Display for ContextExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the prompt has {} tokens, the model's context is {} tokens", self.prompt_tokens, self.context)
    }
}

impl std::error::Error for ContextExceeded {}

pub struct Session {
    /// Shared with decodes that run outside the session ([`crate::batch`]).
    pub model: Arc<Model>,
    pub tok: TextTokenizer,
    pub stop_ids: Vec<u32>,
    state: State,
    /// Tokens whose effect `state` holds.
    cached: Vec<u32>,
    /// States after the given tokens (prefixes of earlier prompts), least recently used first.
    snapshots: Vec<(Vec<u32>, State)>,
    max_snapshots: usize,
    /// Positions of the next prompt to keep snapshots at ([`Session::snapshot_at`]).
    marks: SmallVec<[usize; 2]>,
    prompt_cache: Option<PromptCache>,
    /// Every layer's state can be cut to a prefix (attention only: no recurrent state).
    truncatable: bool,
    /// Tokens the last prefill loaded from the prompt cache.
    loaded: usize,
}

/// Positions of a prompt to keep snapshots at ([`Session::snapshot_at`]): where its last turn
/// begins, where its system prompt and tools end.
pub type Marks = [Option<usize>; 2];

/// The chat prompt of `messages` (generation prompt added) and where its last turn begins:
/// the length of the same messages rendered without the generation prompt, when their tokens
/// are a prefix of the prompt's (the place a snapshot serves the next turn).
pub fn chat_prompt(
    tok: &TextTokenizer,
    messages: &serde_json::Value,
    tools: Option<&serde_json::Value>,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Vec<u32>, Option<usize>)> {
    let prompt = tok.encode(&tok.apply_chat_template(messages, tools, true, extra)?)?;
    // the same tokens, not merely the same text, or no snapshot is asked for
    let turns = tok.apply_chat_template(messages, tools, false, extra).and_then(|t| tok.encode(&t));
    let turn = turns.ok().filter(|t| !t.is_empty() && t.len() < prompt.len() && prompt.starts_with(t)).map(|t| t.len());
    Ok((prompt, turn))
}

/// Where the part of `prompt` that the system messages and the tools render to ends, when it is
/// a proper prefix in tokens: the boundary that other conversations with the same system prompt
/// and tools share (a prompt-cache entry there serves them all).
pub fn system_prefix(
    tok: &TextTokenizer,
    prompt: &[u32],
    messages: &serde_json::Value,
    tools: Option<&serde_json::Value>,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> Option<usize> {
    let all = messages.as_array()?;
    let n = all.iter().take_while(|m| m.get("role").and_then(|r| r.as_str()) == Some("system")).count();
    if n == 0 && tools.is_none() || n == all.len() {
        return None;
    }
    let head = serde_json::Value::Array(all[..n].to_vec());
    let t = tok.encode(&tok.apply_chat_template(&head, tools, false, extra).ok()?).ok()?;
    // a template may end the system part with tokens a following message changes
    let l = common_prefix(&t, prompt);
    (l >= 16 && l < prompt.len()).then_some(l)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Session {
    pub fn new(model: Model, tok: TextTokenizer) -> Session {
        Session::shared(Arc::new(model), tok)
    }

    /// A session over a model others share.
    pub fn shared(model: Arc<Model>, tok: TextTokenizer) -> Session {
        let stop_ids = crate::generate::stop_ids(&model.cfg, &tok);
        let state = model.new_state();
        let truncatable = state.layers.iter().all(|l| l.truncatable());
        Session {
            model,
            tok,
            stop_ids,
            state,
            cached: vec![],
            snapshots: vec![],
            max_snapshots: MAX_SNAPSHOTS,
            marks: SmallVec::new(),
            prompt_cache: None,
            truncatable,
            loaded: 0,
        }
    }

    /// Saves prompt states to `cache` and resumes from its entries (see the module doc).
    pub fn set_prompt_cache(&mut self, cache: Option<PromptCache>) {
        self.prompt_cache = cache;
    }

    pub fn has_prompt_cache(&self) -> bool {
        self.prompt_cache.is_some()
    }

    pub fn prompt_cache(&mut self) -> Option<&mut PromptCache> {
        self.prompt_cache.as_mut()
    }

    /// Asks the next [`Session::generate`] to keep a snapshot after the first `pos` tokens of
    /// its prompt (where its last turn begins, where the system prompt ends; see the module
    /// doc). Repeatable.
    pub fn snapshot_at(&mut self, pos: usize) {
        if !self.marks.contains(&pos) {
            self.marks.push(pos);
        }
    }

    /// The chat prompt of `messages` ([`chat_prompt`]), with a snapshot asked for where its
    /// last turn begins.
    pub fn chat_prompt(
        &mut self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let (prompt, turn) = chat_prompt(&self.tok, messages, tools, extra)?;
        self.marks.clear();
        if let Some(t) = turn {
            self.snapshot_at(t);
        }
        if self.prompt_cache.is_some()
            && let Some(t) = system_prefix(&self.tok, &prompt, messages, tools, extra)
        {
            self.snapshot_at(t);
        }
        Ok(prompt)
    }

    /// Keeps up to `n` snapshots (at least one; 4 by default): a server decoding several
    /// conversations at once keeps one or two per conversation.
    pub fn set_max_snapshots(&mut self, n: usize) {
        self.max_snapshots = n.max(1);
    }

    /// Forgets the conversation state.
    pub fn reset(&mut self) {
        self.state = self.model.new_state();
        self.cached.clear();
        self.snapshots.clear();
    }

    /// Tokens currently held in the state.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Brings the state to `prompt[..n]` for the largest reusable n < prompt.len(): the live
    /// state, a snapshot, or an entry of the prompt cache, whichever holds the most.
    fn rewind(&mut self, prompt: &[u32]) -> usize {
        self.loaded = 0;
        let l = common_prefix(&self.cached, prompt);
        let live = l == self.cached.len() && l < prompt.len() && !self.state.poisoned;
        let live_len = if live { l } else { 0 };
        let best = self
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| t.len() < prompt.len() && prompt.starts_with(t))
            .max_by_key(|(_, (t, _))| t.len())
            .map(|(i, (t, _))| (i, t.len()))
            .filter(|&(_, n)| n > live_len);
        let in_memory = best.map_or(live_len, |b| b.1);
        if let Some(pc) = &mut self.prompt_cache
            && let Some((name, n)) = pc.lookup(prompt, self.truncatable, in_memory)
        {
            match pc.load(&self.model, &name, n) {
                Ok(st) => {
                    self.state = st;
                    self.cached = prompt[..n].to_vec();
                    self.loaded = n;
                    return n;
                }
                Err(e) => eprintln!("note: {e:#} (removed; prefilling instead)"),
            }
        }
        match best {
            Some((i, n)) => {
                // the most recently used last
                let snap = self.snapshots.remove(i);
                self.state = snap.1.clone();
                self.cached = snap.0.clone();
                self.snapshots.push(snap);
                n
            }
            None if live => l,
            None => {
                self.state = self.model.new_state();
                self.cached.clear();
                0
            }
        }
    }

    /// Generates a continuation of `prompt`. `on_text` receives text as it completes (it is
    /// called once per generated token, with "" when nothing new is ready) and returns false
    /// to cancel.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        stop: &[String],
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Output> {
        self.generate_with(prompt, max_tokens, params, stop, |piece, _| on_text(piece))
    }

    /// [`Session::generate`], whose callback also gets the log-probabilities (when
    /// `params.logprobs` asks for them) of the tokens whose text begins in the piece it gets;
    /// the last call may bring some with an empty piece (tokens of no visible text).
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        stop: &[String],
        on_text: impl FnMut(&str, &[Scored]) -> bool,
    ) -> Result<Output> {
        let pre = self.prefill_alone(prompt, params)?;
        let model = self.model.clone();
        let step = |st: &mut State, t: u32, logits: &mut Vec<f32>| model.forward_into(st, &[t], false, logits);
        let (res, state, held) =
            decode_prefilled(&model, &self.tok, &self.stop_ids, prompt, pre, max_tokens, params, stop, step, on_text);
        self.give_back(state, &held);
        res
    }

    /// Brings a state of its own to `prompt` (reusing what the session holds, as
    /// [`Session::generate_with`] does), for a decode outside the session
    /// ([`decode_prefilled`]): the session keeps its snapshots, and its live state is left
    /// empty until [`Session::give_back`].
    pub fn prefill_alone(&mut self, prompt: &[u32], params: &SamplingParams) -> Result<Prefilled> {
        let ctx = self.model.max_context();
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= ctx {
            return Err(ContextExceeded { prompt_tokens: prompt.len(), context: ctx }.into());
        }
        params.validate()?;
        let t0 = Instant::now();
        let (reused, logits) = self.prefill(prompt)?;
        let state = std::mem::replace(&mut self.state, self.model.new_state());
        self.cached.clear();
        Ok(Prefilled { state, logits, reused, loaded: self.loaded, prompt_secs: t0.elapsed().as_secs_f64() })
    }

    /// Makes `state`, which holds `tokens` (as many as its position), the live state again:
    /// the next turn of its conversation resumes there. A live state it replaces becomes a
    /// snapshot. A poisoned state is dropped.
    pub fn give_back(&mut self, state: State, tokens: &[u32]) {
        if state.poisoned || state.pos > tokens.len() || state.pos == 0 {
            return;
        }
        let old = std::mem::replace(&mut self.state, state);
        let old_tokens = std::mem::replace(&mut self.cached, tokens[..self.state.pos].to_vec());
        if !old.poisoned && !old_tokens.is_empty() && !self.snapshots.iter().any(|(t, _)| *t == old_tokens) {
            self.snapshots.push((old_tokens, old));
            if self.snapshots.len() > self.max_snapshots {
                self.snapshots.remove(0);
            }
        }
    }

    /// Brings the state to the whole `prompt`, reusing what it can: prefills all but the last
    /// token, snapshots there (so the same prompt, or one that extends it, can resume; the
    /// choices of one request each resume there), then the last token gives the first logits.
    /// Returns the tokens reused and those logits.
    fn prefill(&mut self, prompt: &[u32]) -> Result<(usize, Vec<f32>)> {
        let reused = self.rewind(prompt);
        self.cached.truncate(reused);
        let n = prompt.len();
        let mut stops: SmallVec<[usize; 3]> =
            std::mem::take(&mut self.marks).into_iter().filter(|&m| m > reused && m < n - 1).collect();
        stops.sort_unstable();
        stops.push(n - 1);
        let mut at = reused;
        for stop in stops {
            if at < stop {
                self.model.forward(&mut self.state, &prompt[at..stop], false)?;
                self.cached.extend_from_slice(&prompt[at..stop]);
                at = stop;
            }
            if !self.snapshots.iter().any(|(t, _)| t[..] == prompt[..stop]) {
                self.snapshots.push((prompt[..stop].to_vec(), self.state.clone()));
                if self.snapshots.len() > self.max_snapshots {
                    self.snapshots.remove(0);
                }
            }
            // on disk: every boundary of a recurrent state; for KV caches only the longest,
            // which serves every shorter prefix
            if let Some(pc) = &mut self.prompt_cache
                && (stop == n - 1 || !self.truncatable)
                && stop > 0
                && let Err(e) = pc.save(&prompt[..stop], &self.state, self.truncatable)
            {
                eprintln!("note: prompt cache: {e:#}");
            }
        }
        let logits = self.model.forward(&mut self.state, &prompt[n - 1..], false)?;
        self.cached.push(prompt[n - 1]);
        Ok((reused, logits))
    }

    /// The log-probabilities of `prompt[1..]`, each token scored as if sampled under `params`
    /// after the tokens before it ([`Sampler::score`]); the first token has none.
    ///
    /// Every position's logits are needed, so the prompt runs from the start on a new state
    /// (in chunks, so a huge vocabulary never needs the whole prompt's logits at once); that
    /// state, holding all but the last token, then becomes the session's, so the generation
    /// that follows prefills only the last token.
    pub fn score_prompt(&mut self, prompt: &[u32], params: &SamplingParams) -> Result<Vec<TokenLogprob>> {
        const CHUNK: usize = 64;
        let ctx = self.model.max_context();
        if prompt.len() >= ctx {
            return Err(ContextExceeded { prompt_tokens: prompt.len(), context: ctx }.into());
        }
        params.validate()?;
        let Some(body) = prompt.len().checked_sub(1).map(|n| &prompt[..n]).filter(|b| !b.is_empty()) else {
            return Ok(vec![]);
        };
        let (v, mut st) = (self.model.vocab_size(), self.model.new_state());
        let mut sampler = Sampler::new(params.clone());
        let mut out = Vec::with_capacity(body.len());
        for (c, chunk) in body.chunks(CHUNK).enumerate() {
            let mut rows = self.model.forward(&mut st, chunk, true)?;
            for (j, row) in rows.chunks_mut(v).enumerate() {
                // the row of position i predicts token i + 1
                let i = c * CHUNK + j;
                out.push(sampler.score(row, &prompt[..=i], prompt[i + 1]));
            }
        }
        self.state = st;
        self.cached = body.to_vec();
        Ok(out)
    }
}

/// A prompt prefilled into a state of its own ([`Session::prefill_alone`]).
pub struct Prefilled {
    pub state: State,
    /// The logits after the prompt's last token.
    logits: Vec<f32>,
    reused: usize,
    loaded: usize,
    prompt_secs: f64,
}

/// Generates the continuation of a prefilled `prompt` (see [`Session::generate_with`]), each
/// forward pass made by `step` (one token after what the state holds). Returns the output, the
/// state, and the tokens whose effect the state holds (for [`Session::give_back`]).
#[allow(clippy::too_many_arguments)]
pub fn decode_prefilled(
    model: &Model,
    tok: &TextTokenizer,
    stop_ids: &[u32],
    prompt: &[u32],
    pre: Prefilled,
    max_tokens: usize,
    params: &SamplingParams,
    stop: &[String],
    step: impl FnMut(&mut State, u32, &mut Vec<f32>) -> Result<()>,
    on_text: impl FnMut(&str, &[Scored]) -> bool,
) -> (Result<Output>, State, Vec<u32>) {
    let Prefilled { mut state, logits, reused, loaded, prompt_secs } = pre;
    let ctx = model.max_context();
    let t1 = Instant::now();
    let mut sampler = Sampler::new(params.clone());
    let mut text = TextOut::new(tok, stop, on_text);
    let max_tokens = max_tokens.min(ctx - prompt.len());
    let res = crate::generate::decode_with(
        ctx,
        &mut state,
        logits,
        prompt.to_vec(),
        max_tokens,
        &mut sampler,
        stop_ids,
        step,
        |tok, lp| text.token(tok, lp),
    );
    let (tokens, reason) = match res {
        Ok(r) => r,
        Err(e) => return (Err(e), state, vec![]),
    };
    // the tokens whose effect the state now holds (the last one made is fed only when a stop
    // token followed it)
    let mut held = prompt.to_vec();
    held.extend_from_slice(&tokens);
    held.truncate(state.pos);
    if let Some(e) = text.failed.take() {
        return (Err(e), state, held);
    }
    text.flush();
    let finish = match reason {
        _ if text.stop_string.is_some() => Finish::Stop,
        StopReason::Eos => Finish::Stop,
        StopReason::MaxTokens | StopReason::ContextFull => Finish::Length,
        StopReason::Cancelled => Finish::Cancelled,
    };
    let stats = GenStats {
        prompt_tokens: prompt.len() - reused,
        prompt_secs,
        generated_tokens: tokens.len(),
        generate_secs: t1.elapsed().as_secs_f64(),
        stop: match finish {
            Finish::Stop => StopReason::Eos,
            Finish::Length => StopReason::MaxTokens,
            Finish::Cancelled => StopReason::Cancelled,
        },
    };
    let TextOut { text, stop_string, sent: logprobs, .. } = text;
    let out = Output {
        text,
        tokens,
        finish,
        prompt_tokens: prompt.len(),
        reused_tokens: reused,
        loaded_tokens: loaded,
        stop_string,
        stats,
        logprobs,
    };
    (Ok(out), state, held)
}

/// The text of one generation as its tokens come: a stop string ends it, a tail that could
/// still become one is held back, and each token's log-probabilities go out with the piece of
/// text in which the token's text begins.
struct TextOut<'a, F> {
    tok: &'a TextTokenizer,
    stop: &'a [String],
    on_text: F,
    dec: StreamDecoder,
    text: String,
    /// Bytes of `text` handed out.
    emitted: usize,
    stop_string: Option<String>,
    failed: Option<anyhow::Error>,
    /// Log-probabilities of tokens whose text is not handed out yet, and of those that are.
    held: Vec<Scored>,
    sent: Vec<Scored>,
}

impl<'a, F: FnMut(&str, &[Scored]) -> bool> TextOut<'a, F> {
    fn new(tok: &'a TextTokenizer, stop: &'a [String], on_text: F) -> Self {
        TextOut {
            tok,
            stop,
            on_text,
            dec: StreamDecoder::new(),
            text: String::new(),
            emitted: 0,
            stop_string: None,
            failed: None,
            held: vec![],
            sent: vec![],
        }
    }

    /// One generated token; false to stop (a stop string, a decoding error, the callback).
    fn token(&mut self, tok: u32, lp: Option<TokenLogprob>) -> bool {
        let offset = self.text.len();
        match self.dec.push(self.tok, tok) {
            Ok(piece) => self.text.push_str(&piece),
            Err(e) => {
                self.failed = Some(e);
                return false;
            }
        }
        self.held.extend(lp.map(|logprob| Scored { logprob, offset }));
        // a stop string ends the text just before it
        if let Some((cut, s)) =
            self.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| Some((self.text.find(s.as_str())?, s))).min()
        {
            self.text.truncate(cut);
            self.stop_string = Some(s.clone());
            self.held.retain(|s| s.offset < cut);
            self.emit(cut);
            return false;
        }
        // hold back a tail that could still become a stop string
        let hold = self
            .stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(move |&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
            .filter(|pre| self.text.ends_with(pre))
            .map(|pre| pre.len())
            .max()
            .unwrap_or(0);
        self.emit(self.text.len() - hold)
    }

    /// Hands out the text up to `end` with the log-probabilities of the tokens that begin
    /// before it; once per token, with "" when there is nothing new (the caller may cancel).
    fn emit(&mut self, end: usize) -> bool {
        let n = self.held.iter().take_while(|s| s.offset < end).count();
        self.send(end, n)
    }

    fn send(&mut self, end: usize, n: usize) -> bool {
        let released: Vec<Scored> = self.held.drain(..n).collect();
        let piece = self.text.get(self.emitted..end).unwrap_or("");
        let ok = (self.on_text)(piece, &released);
        self.emitted = self.emitted.max(end);
        self.sent.extend(released);
        ok
    }

    /// After the last token: what was held back goes out, unless a stop string ended the text.
    fn flush(&mut self) {
        if self.stop_string.is_none() && (self.emitted < self.text.len() || !self.held.is_empty()) {
            self.send(self.text.len(), self.held.len());
        }
    }
}
