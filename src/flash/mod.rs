//! The flash layout: a converted model whose non-expert weights sit in one memory-mapped
//! resident file and whose routed experts are packed per layer, one contiguous 4 KiB-aligned
//! extent per expert, so that one expert is one read.

pub mod convert;
pub mod format;
pub mod staging;
pub mod store;
pub mod synth;

pub use format::{MANIFEST, Manifest};
pub use store::{CacheMode, ExpertStore, HeapSlots, SlotAlloc, SlotMemory, StoreOptions, StoreStats};
