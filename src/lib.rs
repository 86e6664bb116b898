//! flashmoe: Mixture-of-Experts inference for models larger than memory.
//!
//! The library holds the model math ([`layers`], [`model`]), checkpoint reading
//! ([`source`], [`checkpoint`], [`load`]), generation ([`generate`]) and the tokenizer with its chat
//! template ([`tokenizer`]); the `flashmoe` binary is a thin CLI over it.

pub mod backend;
pub mod batch;
pub mod bench;
pub mod builtin;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod eval;
pub mod families;
pub mod flash;
pub mod generate;
pub mod gguf;
pub mod grammar;
pub mod harmony;
pub mod import;
pub mod kernels;
pub mod layers;
pub mod load;
pub mod model;
pub mod options;
pub mod par;
pub mod profile;
pub mod progress;
pub mod prompt_cache;
pub mod quant;
pub mod scratch;
pub mod server;
pub mod session;
pub mod source;
pub mod sysbench;
pub mod tensor;
#[cfg(test)]
mod testutil;
pub mod tokenizer;
pub mod toolcall;
