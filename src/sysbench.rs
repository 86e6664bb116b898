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

/// Decode's products as the engine runs them, against the bandwidth they could reach: the
/// routed experts of a 30B-A3B-shaped layer (8 of a pool of q4 experts larger than the caches,
/// `tensor::swiglu_sum`'s two team steps), the same steps' items only reading their bytes, and
/// the products on one expert taken 8 times, which stays in the caches (compute alone). GB/s
/// of weight bytes.
pub struct ProductRates {
    pub experts_gb_s: f64,
    pub read_only_gb_s: f64,
    pub in_cache_gb_s: f64,
    /// One thread, one expert's gate (rows of 2048 columns) and down (768) matrix, 0.9 MB each,
    /// multiplied again and again (from L2 where it holds them).
    pub kernel_l2_gb_s: [f64; 2],
}

/// [`ProductRates`] on the calling thread's rayon pool (`threads` members), over `pool_bytes` of
/// experts, each case timed for about `secs`.
pub fn products(pool_bytes: usize, secs: f64) -> ProductRates {
    use crate::tensor::{MatRef, Precision, SwigluTerm, WKind};
    let (hidden, inter, k) = (2048usize, 768usize, 8usize);
    let kind = WKind::Q { bits: 4, group: 64 };
    let mat_bytes = kind.bytes(inter, hidden);
    let expert_bytes = 3 * mat_bytes;
    let n = (pool_bytes / expert_bytes).max(k);
    // packed nibbles random; every scale and bias a normal bf16 (no denormal assists)
    let mut data = vec![0u8; n * expert_bytes];
    let packed = inter * hidden / 2;
    data.par_chunks_mut(mat_bytes).enumerate().for_each(|(m, c)| {
        let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ m as u64;
        for b in &mut c[..packed] {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (s >> 56) as u8;
        }
        for (i, b) in c[packed..].chunks_exact_mut(2).enumerate() {
            b.copy_from_slice(&(if i % 3 == 0 { 0xbc00u16 } else { 0x3c00 }).to_le_bytes());
        }
    });
    let mat = |e: usize, j: usize, rows: usize, cols: usize| MatRef {
        rows,
        cols,
        kind,
        data: &data[(3 * e + j) * mat_bytes..(3 * e + j + 1) * mat_bytes],
    };
    let x: Vec<f32> = (0..hidden).map(|i| ((i % 19) as f32 - 9.0) * 0.01).collect();
    let mut out = vec![0f32; hidden];
    let terms = |t: usize, spread: bool| -> Vec<SwigluTerm<'_>> {
        (0..k)
            .map(|i| {
                let e = if spread { (t * k + i) % n } else { 0 };
                SwigluTerm {
                    gate: mat(e, 0, inter, hidden),
                    up: mat(e, 1, inter, hidden),
                    down: mat(e, 2, hidden, inter),
                    x: &x,
                    weight: 0.125,
                    bias: None,
                    act: crate::config::Act::Swiglu,
                }
            })
            .collect()
    };
    let timed = |f: &mut dyn FnMut(usize)| {
        let _hold = crate::par::hold();
        let (t0, mut t) = (Instant::now(), 0);
        while t0.elapsed().as_secs_f64() < secs {
            f(t);
            t += 1;
        }
        (t * k * expert_bytes) as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    let experts_gb_s = timed(&mut |t| crate::tensor::swiglu_sum(&terms(t, true), &mut out, Precision::Fast));
    let in_cache_gb_s = timed(&mut |t| crate::tensor::swiglu_sum(&terms(t, false), &mut out, Precision::Fast));
    let mut sink = 0u64;
    let read_only_gb_s = timed(&mut |t| sink ^= crate::tensor::swiglu_sum_read_only(&terms(t, true)));
    std::hint::black_box(sink);
    std::hint::black_box(&out);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    let kernel = |m: MatRef<'_>| {
        let (x, mut y) = (vec![0.01f32; m.cols], vec![0f32; m.rows]);
        one.install(|| {
            let (t0, mut t) = (Instant::now(), 0);
            while t0.elapsed().as_secs_f64() < secs / 2.0 {
                m.matvec(&x, &mut y, Precision::Fast);
                t += 1;
            }
            (t * m.data.len()) as f64 / t0.elapsed().as_secs_f64() / 1e9
        })
    };
    let kernel_l2_gb_s = [kernel(mat(0, 0, inter, hidden)), kernel(mat(0, 2, hidden, inter))];
    ProductRates { experts_gb_s, read_only_gb_s, in_cache_gb_s, kernel_l2_gb_s }
}
