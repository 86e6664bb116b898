//! Constrained decoding through `llguidance`: a JSON schema (or any JSON object, or a Lark
//! grammar) becomes, at every step, the set of tokens that keep the output valid.

use crate::tokenizer::TextTokenizer;
use anyhow::{Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// The tokenizer's vocabulary as the grammar engine sees it; built once (it walks every token).
pub struct Grammars {
    factory: ParserFactory,
    stops: Arc<[u32]>,
}

impl Grammars {
    /// For `tok`'s vocabulary padded to the model's `vocab` rows; `stop_ids` end a sequence
    /// (the grammar allows them once its text is complete).
    pub fn new(tok: &TextTokenizer, vocab: usize, stop_ids: &[u32]) -> Result<Grammars> {
        let json = tok.to_json()?;
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())?;
        let stops: Vec<u32> = stop_ids.iter().copied().filter(|&t| (t as usize) < vocab).collect();
        if !stops.is_empty() {
            bt.set_eos_tokens(&stops);
        }
        let env = bt.into_tok_env(Some(vocab))?;
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Grammars { factory, stops: stops.into() })
    }

    /// Output that is one JSON value matching `schema` (JSON Schema).
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint> {
        self.build(TopLevelGrammar::from_json_schema(schema.clone()))
    }

    /// Output in the Lark grammar `lark` (`%json{...}` embeds a JSON schema).
    pub fn lark(&self, lark: &str) -> Result<Constraint> {
        self.build(TopLevelGrammar::from_lark(lark.to_string()))
    }

    fn build(&self, g: TopLevelGrammar) -> Result<Constraint> {
        let parser = self.factory.create_parser(g).map_err(|e| anyhow!("the grammar is not usable: {e}"))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(anyhow!("the grammar is not usable: {e}"));
        }
        Ok(Constraint(Arc::new(std::sync::Mutex::new(m)), self.stops.clone()))
    }
}

/// The state of one constrained generation: which tokens may come next. Cloning shares the
/// state (a sampler clones its parameters once).
#[derive(Clone)]
pub struct Constraint(Arc<std::sync::Mutex<Matcher>>, Arc<[u32]>);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logits of the tokens the grammar forbids here to −∞ (all but the stop tokens
    /// once the text is complete, or after an error in the grammar engine).
    pub fn mask(&self, logits: &mut [f32]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let allowed = m.compute_mask_or_eos();
        match allowed {
            Ok(mask) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !mask.is_allowed(t as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // the engine failed: only stopping is allowed
            Err(_) => {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !self.1.contains(&(t as u32)) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// An independent copy of this state (another answer to the same request goes its own way
    /// from here).
    pub fn fork(&self) -> Constraint {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Constraint(Arc::new(std::sync::Mutex::new(m.deep_clone())), self.1.clone())
    }

    /// Advances past the token that was chosen.
    pub fn accept(&self, token: u32) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !m.is_stopped() {
            let _ = m.consume_token(token);
        }
    }

    /// Whether the text so far is a complete match.
    pub fn is_accepting(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_accepting().unwrap_or(false)
    }

    /// Why the grammar engine gave up, if it did.
    pub fn error(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_error()
    }
}
