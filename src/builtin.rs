//! The built-in default model: a tiny Shakespeare MoE shipped in `models/default` (a normal
//! Hugging Face checkpoint made by scripts/train_default.py). On first use it is converted to
//! the flash layout in the user's cache directory, so it runs like any giant: resident weights
//! mapped, experts streamed from disk.

use crate::flash::Manifest;
use crate::flash::convert::{ConvertOptions, convert};
use crate::tensor::WKind;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Where the checkpoint ships (the crate's source tree).
pub const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default");

/// Expert format of the converted built-in model (see docs/QUALITY.md for what it costs).
pub const EXPERTS: WKind = WKind::Q { bits: 4, group: 64 };

/// The user's cache directory for flashmoe: `$XDG_CACHE_HOME/flashmoe`, else `~/.cache/flashmoe`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("flashmoe")
}

/// The model directory to use when none is given: `$FLASHMOE_MODEL`, else the built-in model,
/// converted on first use.
pub fn default_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHMOE_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let src = Path::new(SOURCE);
    if !src.join("config.json").exists() {
        bail!("no --model given and the built-in model is missing from {} (pass --model DIR)", src.display());
    }
    // the cache key covers the checkpoint's identity, so a retrained model is converted again
    let mut h = crc32fast::Hasher::new();
    for f in ["config.json", "model.safetensors.index.json", "tokenizer.json"] {
        if let Ok(b) = std::fs::read(src.join(f)) {
            h.update(&b);
        }
    }
    let dst = cache_root().join(format!("default-{}-{:08x}", EXPERTS.name(), h.finalize()));
    if !Manifest::is_flash(&dst) {
        std::fs::create_dir_all(cache_root())?;
        eprintln!("preparing the built-in model (first run): converting to {}", dst.display());
        let opts = ConvertOptions {
            experts: EXPERTS,
            dense: WKind::BF16,
            force: false,
            progress: crate::progress::on_terminal(),
        };
        if let Err(e) = convert(src, &dst, &opts) {
            if !format!("{e:#}").contains("another flashmoe") {
                return Err(e);
            }
            // another process converting it at the same moment: use its result
            let t = std::time::Instant::now();
            while !Manifest::is_flash(&dst) && t.elapsed().as_secs() < 120 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !Manifest::is_flash(&dst) {
                return Err(e);
            }
        }
    }
    Ok(dst)
}
