//! Machine limits the rooflines are computed from: random expert-sized reads from a file
//! (O_DIRECT or buffered, at a given parallelism) and memory read bandwidth.

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Random `block`-byte reads at block-aligned offsets of `path` from `threads` threads for
/// about `secs` seconds. Returns bytes per second.
pub fn disk_read(path: &Path, block: usize, threads: usize, direct: bool, secs: f64) -> Result<f64> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.len() as usize;
    let block = block.next_multiple_of(4096);
    if len < block {
        bail!("{} is smaller than one block of {block} bytes", path.display());
    }
    let slots = len / block;
    let total = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut hs = vec![];
        for t in 0..threads.max(1) {
            let total = &total;
            hs.push(s.spawn(move || -> Result<()> {
                let mut o = std::fs::OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                let f = o.open(path).with_context(|| format!("cannot open {}", path.display()))?;
                let layout = std::alloc::Layout::from_size_align(block, 4096)?;
                // SAFETY: non-zero size; freed below.
                let buf = unsafe { std::alloc::alloc(layout) };
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % slots as u64) * block as u64;
                    // SAFETY: buf holds `block` bytes.
                    let n = unsafe { libc::pread(f.as_raw_fd(), buf as *mut libc::c_void, block, off as i64) };
                    if n <= 0 {
                        unsafe { std::alloc::dealloc(buf, layout) };
                        bail!("{}: read failed: {}", path.display(), std::io::Error::last_os_error());
                    }
                    total.fetch_add(n as u64, Relaxed);
                }
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(buf, layout) };
                Ok(())
            }));
        }
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(total.load(Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Read bandwidth (bytes/s) summing a `bytes`-sized f32 array, on `threads` threads; best of 5.
pub fn memory_read(bytes: usize, threads: usize) -> f64 {
    let v: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("pool");
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = pool.install(|| v.par_chunks(1 << 20).map(|c| crate::kernels::dot(c, c).min(0.0) + c[0]).sum());
        let rate = bytes as f64 / t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(rate);
    }
    best
}
