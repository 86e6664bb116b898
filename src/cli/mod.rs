//! The `flashmoe` binary's subcommands, one file each, over the library.

pub mod args;
pub mod bench;
pub mod chat;
pub mod convert;
pub mod eval;
pub mod generate;
pub mod inspect;
