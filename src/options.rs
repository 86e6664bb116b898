//! The store and precision choices a user makes (`--cache`, `--cache-size`, `--prefetch`, ...),
//! with their `auto` values resolved against the model and the machine, so that the CLI, the
//! server and library users choose alike.

use crate::flash::{CacheMode, StoreOptions};
use crate::layers::attention::KvType;
use crate::load::LoadOptions;
use crate::tensor::Precision;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// `auto`, or a fixed value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choice<T> {
    #[default]
    Auto,
    Is(T),
}

/// How a converted model's experts are cached and read.
#[derive(Clone, Debug)]
pub struct StoreChoices {
    /// `Auto`: direct when the expert files exceed half the memory this process may use (it won
    /// every beyond-RAM run: 1.9x on the 80B shape), else os (warm experts are computed in place
    /// from the page cache).
    pub cache: Choice<CacheMode>,
    /// Bytes of the own cache (direct mode). `Auto`: a quarter of the usable memory, 256 MiB to
    /// 32 GiB; never more than the expert files hold.
    pub cache_size: Choice<u64>,
    pub io_threads: usize,
    /// `Auto`: on in direct mode (+10-30% cold), off in os mode (where it lost).
    pub prefetch: Choice<bool>,
    pub experts_in_memory: bool,
    pub mlock: bool,
    pub precision: Precision,
    pub device: crate::backend::Device,
    /// The KV cache type; bf16 by default here (half the bytes of f32, no overflow).
    pub kv_cache: KvType,
}

impl Default for StoreChoices {
    fn default() -> Self {
        StoreChoices {
            cache: Choice::Auto,
            cache_size: Choice::Auto,
            io_threads: 8,
            prefetch: Choice::Auto,
            experts_in_memory: false,
            mlock: false,
            precision: Precision::Fast,
            device: crate::backend::Device::Cpu,
            kv_cache: KvType::Bf16,
        }
    }
}

impl StoreChoices {
    /// The load options for the model in `dir`, `auto` values resolved.
    pub fn resolve(&self, dir: &Path) -> Result<LoadOptions> {
        if self.io_threads == 0 {
            bail!("--io-threads must be at least 1");
        }
        if self.cache_size == Choice::Is(0) {
            bail!("--cache-size must be more than 0 bytes");
        }
        let usable = usable_memory();
        let experts = expert_file_bytes(dir);
        let mode = match self.cache {
            Choice::Is(m) => m,
            Choice::Auto => match usable {
                Some(m) if experts > m / 2 => CacheMode::Direct,
                _ => CacheMode::Os,
            },
        };
        let cache_bytes = match self.cache_size {
            Choice::Is(b) => b,
            Choice::Auto => {
                let b = usable.map_or(1 << 30, |m| (m / 4).clamp(256 << 20, 32 << 30));
                if experts > 0 { b.min(experts) } else { b }
            }
        };
        Ok(LoadOptions {
            store: StoreOptions {
                mode,
                cache_bytes,
                io_threads: self.io_threads,
                prefetch: match self.prefetch {
                    Choice::Is(p) => p,
                    Choice::Auto => mode == CacheMode::Direct,
                },
                ..Default::default()
            },
            experts_in_memory: self.experts_in_memory,
            mlock: self.mlock,
            precision: self.precision,
            device: self.device,
            kv_cache: self.kv_cache,
        })
    }
}

/// Parses sizes like 4096, 512K, 64M, 2G (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size `{s}`: unknown unit `{c}` (use K, M, G or T)"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num.parse().with_context(|| format!("size `{s}` is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("size `{s}` must be a non-negative number");
    }
    Ok((v * mul as f64) as u64)
}

/// Memory this process may use: `MemAvailable`, or its memory cgroup's limit if lower.
pub fn usable_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    let mut limit = u64::MAX;
    for line in std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default().lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let file = match ctrl {
            "" => format!("/sys/fs/cgroup{path}/memory.max"),
            c if c.split(',').any(|c| c == "memory") => format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
            _ => continue,
        };
        if let Some(v) = std::fs::read_to_string(file).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            limit = limit.min(v);
        }
    }
    Some(avail.min(limit))
}

/// Total size of a converted model's expert files (0 for a checkpoint).
pub fn expert_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("experts"))
        .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("12Q").is_err() && parse_size("-1G").is_err() && parse_size("G").is_err());
    }

    #[test]
    fn zero_threads_and_an_empty_cache_are_refused() {
        let dir = Path::new("/nonexistent");
        let c = StoreChoices { io_threads: 0, ..Default::default() };
        assert!(c.resolve(dir).unwrap_err().to_string().contains("--io-threads"));
        let c = StoreChoices { cache_size: Choice::Is(0), ..Default::default() };
        assert!(c.resolve(dir).unwrap_err().to_string().contains("--cache-size"));
        let lo = StoreChoices::default().resolve(dir).unwrap();
        assert_eq!(lo.store.mode, CacheMode::Os, "a checkpoint has no expert files");
    }
}
