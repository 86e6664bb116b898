//! The expert store: reads routed experts from the per-layer expert files on demand.
//!
//! All reads of a layer are issued at once to a pool of I/O threads doing `pread` into
//! reusable 4 KiB-aligned slots (no allocation per token); the caller computes each expert as
//! soon as its bytes are in. Two cache modes:
//! - `os`: buffered reads, the kernel's page cache is the cache (as in the original engine);
//!   an expert already fully in the page cache (asked with mincore) is computed in place from a
//!   read-only mapping of its file, without a read or a copy;
//! - `direct`: `O_DIRECT` reads, and the slots themselves form an in-process LRU cache of
//!   `cache_bytes`.

use super::format::{Experts, Part};
use crate::layers::mlp::MlpRef;
use crate::tensor::{MatRef, WKind};
use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Receiver, Sender, bounded};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::mem::take;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Who caches expert bytes between tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    Os,
    Direct,
}

impl std::str::FromStr for CacheMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "os" => Ok(CacheMode::Os),
            "direct" => Ok(CacheMode::Direct),
            _ => bail!("cache mode must be `os` or `direct`, got `{s}`"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub mode: CacheMode,
    /// Size of the in-process cache (direct mode).
    pub cache_bytes: u64,
    pub io_threads: usize,
    /// Most experts read at once (slots in flight); at least the routed experts per token.
    pub max_batch: usize,
    /// Experiment: before each decode layer, predict the next layer's experts (its router on
    /// the current hidden state) and read them ahead: a page-cache hint in os mode, O_DIRECT
    /// reads into the own cache in direct mode.
    pub prefetch: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { mode: CacheMode::Os, cache_bytes: 1 << 30, io_threads: 8, max_batch: 16, prefetch: false }
    }
}

/// Counters since open (or the last reset).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    pub bytes_read: u64,
    pub reads: u64,
    /// Experts found in memory: the own cache (direct mode), or fully resident in the page
    /// cache just before the read (os mode, asked with mincore).
    pub hits: u64,
    pub misses: u64,
    /// Time the compute thread waited for expert bytes.
    pub io_wait_ns: u64,
    /// Time spent computing experts.
    pub compute_ns: u64,
    /// Experts predicted by the prefetcher, and how many of them were then routed to.
    pub prefetched: u64,
    pub prefetch_used: u64,
}

impl StoreStats {
    pub fn hit_rate(&self) -> f64 {
        if self.hits + self.misses == 0 { 0.0 } else { self.hits as f64 / (self.hits + self.misses) as f64 }
    }
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    reads: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    io_wait_ns: AtomicU64,
    compute_ns: AtomicU64,
    prefetched: AtomicU64,
    prefetch_used: AtomicU64,
}

/// 4 KiB-aligned memory for the slots.
struct Arena {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the arena is plain memory; the store's protocol gives each slot one writer (an I/O
// thread, until its completion is received) or readers (the compute thread), never both.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    fn new(bytes: usize) -> Arena {
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096).expect("arena layout");
        // SAFETY: non-zero size; zeroed pages are only committed by the OS when touched.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "cannot allocate {bytes} bytes for expert slots");
        Arena { ptr, layout }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct Job {
    fd: i32,
    off: u64,
    len: usize,
    dst: usize,
    tag: usize,
}

struct Done {
    tag: usize,
    result: std::io::Result<()>,
}

struct LayerFile {
    path: PathBuf,
    file: File,
    /// Read-only mapping used only to ask the kernel which pages are cached (os mode).
    map: Option<(usize, usize)>,
}

impl Drop for LayerFile {
    fn drop(&mut self) {
        if let Some((p, len)) = self.map {
            // SAFETY: mapped in `ExpertStore::open` with this length; never dereferenced.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}

/// Slot bookkeeping (direct mode keeps (layer, expert) → slot across calls).
struct Slots {
    key: Vec<Option<(usize, usize)>>,
    last_use: Vec<u64>,
    map: HashMap<(usize, usize), usize>,
    tick: u64,
    /// mincore scratch (os mode).
    pages: Vec<u8>,
    /// A read is in flight into the slot.
    busy: Vec<bool>,
    /// Prefetched extents being read (direct mode): key → slot, and slot → key.
    inflight: HashMap<(usize, usize), usize>,
    inflight_key: Vec<Option<(usize, usize)>>,
    /// Per-call lists of `with_experts`, kept so a call allocates nothing once warm:
    /// (index, where its bytes are) of the experts already in memory, (index, slot) of the
    /// reads issued, (index, slot) of the prefetches in flight it waits for.
    ready: Vec<(usize, Ready)>,
    pending: Vec<(usize, usize)>,
    awaited: Vec<(usize, usize)>,
}

/// Where the bytes of an expert that is already in memory are.
#[derive(Clone, Copy, Debug)]
enum Ready {
    /// A slot of the own cache.
    Slot(usize),
    /// The page cache, through the read-only mapping of the layer's file (os mode).
    Mapped { addr: usize },
}

/// Completion tags at or above this are prefetches into slot `tag - PREFETCH_TAG`.
const PREFETCH_TAG: usize = usize::MAX / 2;

pub struct ExpertStore {
    kind: WKind,
    stride: usize,
    parts: [Part; 3],
    num_experts: usize,
    files: HashMap<usize, LayerFile>,
    pub mode: CacheMode,
    /// O_DIRECT could not be used (filesystem refused it); reads are buffered.
    pub direct_fallback: bool,
    nslots: usize,
    max_batch: usize,
    arena: Arena,
    slots: Mutex<Slots>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<std::thread::JoinHandle<()>>,
    counters: Counters,
    pub prefetch: bool,
    predicted: Mutex<HashMap<usize, Vec<usize>>>,
}

fn pread_full(fd: i32, dst: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
    let mut got = 0;
    while got < len {
        // SAFETY: dst..dst+len is a slot owned by this job until its completion is sent.
        let n = unsafe { libc::pread(fd, dst.add(got) as *mut libc::c_void, len - got, (off + got as u64) as i64) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("end of file after {} of {len} bytes", got),
            ));
        }
        got += n as usize;
    }
    Ok(())
}

impl ExpertStore {
    /// Opens the expert files of a converted model.
    pub fn open(dir: &Path, ex: &Experts, opts: &StoreOptions) -> Result<ExpertStore> {
        let kind = ex.wkind()?;
        let stride = ex.stride as usize;
        let max_batch = opts.max_batch.max(1);
        let mut direct_fallback = false;
        let mut files = HashMap::new();
        for l in &ex.layers {
            let path = dir.join(&l.file);
            let want = ex.stride * ex.num_experts as u64;
            let open = |direct: bool| {
                let mut o = std::fs::OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                o.open(&path)
            };
            let file = if opts.mode == CacheMode::Direct {
                match open(true) {
                    Ok(f) => f,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        direct_fallback = true;
                        open(false)?
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot open expert file {}", path.display())),
                }
            } else {
                open(false).with_context(|| format!("cannot open expert file {}", path.display()))?
            };
            let len = file.metadata()?.len();
            if len < want {
                bail!("{}: expert file has {len} bytes, {want} expected (truncated?)", path.display());
            }
            let map = if opts.mode == CacheMode::Os {
                // SAFETY: a read-only shared mapping of a file we keep open; only passed to mincore.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        file.as_raw_fd(),
                        0,
                    )
                };
                (p != libc::MAP_FAILED).then_some((p as usize, len as usize))
            } else {
                None
            };
            files.insert(l.layer, LayerFile { path, file, map });
        }
        let nslots = match opts.mode {
            CacheMode::Os => max_batch,
            CacheMode::Direct => ((opts.cache_bytes as usize) / stride).max(max_batch),
        };
        // a job holds a slot until its completion is received: never more than nslots queued
        let (jtx, jrx) = bounded::<Job>(nslots);
        let (dtx, drx) = bounded::<Done>(nslots);
        let workers = (0..opts.io_threads.max(1))
            .map(|i| {
                let (jrx, dtx) = (jrx.clone(), dtx.clone());
                std::thread::Builder::new()
                    .name(format!("flashmoe-io-{i}"))
                    .spawn(move || {
                        for j in jrx {
                            let result = pread_full(j.fd, j.dst as *mut u8, j.len, j.off);
                            if dtx.send(Done { tag: j.tag, result }).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn I/O thread")
            })
            .collect();
        Ok(ExpertStore {
            kind,
            stride,
            parts: [ex.gate, ex.up, ex.down],
            num_experts: ex.num_experts,
            files,
            mode: opts.mode,
            direct_fallback,
            nslots,
            max_batch: max_batch.min(nslots),
            arena: Arena::new(nslots * stride),
            slots: Mutex::new(Slots {
                key: vec![None; nslots],
                last_use: vec![0; nslots],
                map: HashMap::new(),
                tick: 0,
                pages: Vec::new(),
                busy: vec![false; nslots],
                inflight: HashMap::new(),
                inflight_key: vec![None; nslots],
                ready: Vec::new(),
                pending: Vec::new(),
                awaited: Vec::new(),
            }),
            jobs: Some(jtx),
            done: drx,
            workers,
            counters: Counters::default(),
            prefetch: opts.prefetch,
            predicted: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes of one expert extent.
    pub fn expert_bytes(&self) -> usize {
        self.stride
    }

    /// Bytes of memory the store holds for slots (its cache in direct mode).
    pub fn slot_bytes(&self) -> usize {
        self.nslots * self.stride
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            bytes_read: c.bytes_read.load(Relaxed),
            reads: c.reads.load(Relaxed),
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            io_wait_ns: c.io_wait_ns.load(Relaxed),
            compute_ns: c.compute_ns.load(Relaxed),
            prefetched: c.prefetched.load(Relaxed),
            prefetch_used: c.prefetch_used.load(Relaxed),
        }
    }

    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in
            [&c.bytes_read, &c.reads, &c.hits, &c.misses, &c.io_wait_ns, &c.compute_ns, &c.prefetched, &c.prefetch_used]
        {
            a.store(0, Relaxed);
        }
    }

    fn slot(&self, s: usize) -> &[u8] {
        // SAFETY: in bounds; only called for slots whose read has completed (or cache hits).
        unsafe { std::slice::from_raw_parts(self.arena.ptr.add(s * self.stride), self.stride) }
    }

    fn view<'a>(&self, bytes: &'a [u8]) -> MlpRef<'a> {
        let m = |p: &Part| MatRef {
            rows: p.rows,
            cols: p.cols,
            kind: self.kind,
            data: &bytes[p.offset as usize..p.offset as usize + self.kind.bytes(p.rows, p.cols)],
        };
        MlpRef { gate: m(&self.parts[0]), up: m(&self.parts[1]), down: m(&self.parts[2]) }
    }

    /// Reads experts `needed` of `layer` and calls `compute(i, expert)` exactly once for each
    /// `needed[i]`, as soon as its bytes are in memory (cache hits first). `during` runs once the first reads
    /// are in flight (the shared expert's compute hides I/O there). A failed read is an error,
    /// returned after every read in flight has finished.
    pub fn with_experts(
        &self,
        layer: usize,
        needed: &[usize],
        during: impl FnOnce(),
        compute: impl Fn(usize, MlpRef<'_>) + Sync,
    ) -> Result<()> {
        let lf = self.files.get(&layer).ok_or_else(|| anyhow!("layer {layer} has no expert file"))?;
        if let Some(&e) = needed.iter().find(|&&e| e >= self.num_experts) {
            bail!("expert {e} of layer {layer} is out of range ({} experts)", self.num_experts);
        }
        if self.prefetch
            && let Some(p) = self.predicted.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&layer)
        {
            let used = needed.iter().filter(|e| p.contains(e)).count();
            self.counters.prefetch_used.fetch_add(used as u64, Relaxed);
            p.clear();
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut during = Some(during);
        let jobs = self.jobs.as_ref().expect("store is open");
        for (ci, chunk) in needed.chunks(self.max_batch).enumerate() {
            let base = ci * self.max_batch;
            slots.tick += 1;
            let tick = slots.tick;
            // experts already in memory: the own cache, or the page cache through the mapping
            let (mut ready, mut pending, mut awaited) =
                (take(&mut slots.ready), take(&mut slots.pending), take(&mut slots.awaited));
            ready.clear();
            pending.clear();
            awaited.clear();
            for (j, &e) in chunk.iter().enumerate() {
                let i = base + j;
                if self.mode == CacheMode::Direct
                    && let Some(&s) = slots.map.get(&(layer, e))
                {
                    slots.last_use[s] = tick;
                    ready.push((i, Ready::Slot(s)));
                    continue;
                }
                if let Some(&s) = slots.inflight.get(&(layer, e)) {
                    // prefetched, still being read: wait for that read instead of issuing one
                    slots.last_use[s] = tick;
                    awaited.push((i, s));
                    continue;
                }
                if self.mode == CacheMode::Os {
                    // page-cache hit: every page of the extent is resident before the read
                    if let Some((p, _)) = lf.map {
                        let page = 4096;
                        slots.pages.resize(self.stride.div_ceil(page), 0);
                        // SAFETY: the range lies inside the mapping (file length checked at open).
                        let rc = unsafe {
                            libc::mincore(
                                (p + e * self.stride) as *mut libc::c_void,
                                self.stride,
                                slots.pages.as_mut_ptr(),
                            )
                        };
                        if rc == 0 && slots.pages.iter().all(|v| v & 1 == 1) {
                            // computed in place from the page cache: no read, no copy
                            ready.push((i, Ready::Mapped { addr: p + e * self.stride }));
                            continue;
                        }
                    }
                }
                let s = match self.mode {
                    CacheMode::Os => j,
                    CacheMode::Direct => {
                        // least recently used slot not used by this batch
                        let s = (0..self.nslots)
                            .filter(|&s| slots.last_use[s] != tick && !slots.busy[s])
                            .min_by_key(|&s| slots.last_use[s])
                            .expect("prefetches leave a batch of slots free");
                        if let Some(old) = slots.key[s].take() {
                            slots.map.remove(&old);
                        }
                        slots.last_use[s] = tick;
                        s
                    }
                };
                let dst = self.arena.ptr as usize + s * self.stride;
                let job = Job {
                    fd: lf.file.as_raw_fd(),
                    off: (e * self.stride) as u64,
                    len: self.stride,
                    dst,
                    tag: pending.len(),
                };
                jobs.send(job).map_err(|_| anyhow!("I/O threads are gone"))?;
                slots.busy[s] = true;
                pending.push((i, s));
            }
            let c = &self.counters;
            c.hits.fetch_add(ready.len() as u64, Relaxed);
            c.misses.fetch_add((pending.len() + awaited.len()) as u64, Relaxed);
            if let Some(f) = during.take() {
                f();
            }
            // the ready experts are computed as parallel tasks while the reads proceed
            let t = Instant::now();
            ready.par_iter().for_each(|&(i, at)| {
                let bytes = match at {
                    Ready::Slot(s) => self.slot(s),
                    // SAFETY: a read-only mapping of a file this process never writes, alive as
                    // long as the store; the extent lies inside it (length checked at open).
                    // Were the file truncated by someone else in between, this would fault: the
                    // same contract as any mmap of model weights (the resident file too).
                    Ready::Mapped { addr } => unsafe { std::slice::from_raw_parts(addr as *const u8, self.stride) },
                };
                compute(i, self.view(bytes))
            });
            c.compute_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            let mut first_err = None;
            let mut left = pending.len() + awaited.len();
            while left > 0 {
                let t = Instant::now();
                let done = self.done.recv().map_err(|_| anyhow!("I/O threads are gone"))?;
                c.io_wait_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                let (i, s, key) = if done.tag >= PREFETCH_TAG {
                    // a prefetch finished (for this layer or another): it joins the cache
                    let s = done.tag - PREFETCH_TAG;
                    let key = slots.inflight_key[s].take().expect("prefetch slot has a key");
                    slots.inflight.remove(&key);
                    slots.busy[s] = false;
                    if done.result.is_ok() {
                        c.bytes_read.fetch_add(self.stride as u64, Relaxed);
                        c.reads.fetch_add(1, Relaxed);
                        slots.key[s] = Some(key);
                        slots.map.insert(key, s);
                    } else {
                        slots.last_use[s] = 0;
                    }
                    let Some(at) = awaited.iter().position(|a| a.1 == s) else { continue };
                    (awaited.swap_remove(at).0, s, key)
                } else {
                    let (i, s) = pending[done.tag];
                    slots.busy[s] = false;
                    (i, s, (layer, needed[i]))
                };
                left -= 1;
                let e = key.1;
                if let Err(err) = done.result {
                    if self.mode == CacheMode::Direct {
                        slots.key[s] = None;
                        slots.last_use[s] = 0;
                    }
                    first_err.get_or_insert_with(|| {
                        anyhow!(
                            "{}: reading expert {e} of layer {layer} ({} bytes at offset {}) failed: {err}",
                            lf.path.display(),
                            self.stride,
                            e * self.stride
                        )
                    });
                    continue;
                }
                if done.tag < PREFETCH_TAG {
                    c.bytes_read.fetch_add(self.stride as u64, Relaxed);
                    c.reads.fetch_add(1, Relaxed);
                    if self.mode == CacheMode::Direct {
                        slots.key[s] = Some(key);
                        slots.map.insert(key, s);
                    }
                }
                if first_err.is_none() {
                    let t = Instant::now();
                    compute(i, self.view(self.slot(s)));
                    c.compute_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                }
            }
            (slots.ready, slots.pending, slots.awaited) = (ready, pending, awaited);
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        if let Some(f) = during.take() {
            f();
        }
        Ok(())
    }

    /// Reads every expert of `layer` into owned memory (for runs that keep experts resident).
    pub fn load_layer(&self, layer: usize) -> Result<Vec<crate::layers::mlp::Mlp>> {
        let lf = self.files.get(&layer).ok_or_else(|| anyhow!("layer {layer} has no expert file"))?;
        let f = File::open(&lf.path).with_context(|| format!("cannot open {}", lf.path.display()))?;
        let mut buf = crate::tensor::AlignedBytes::zeroed(self.stride);
        (0..self.num_experts)
            .map(|e| {
                pread_full(f.as_raw_fd(), buf.bytes_mut().as_mut_ptr(), self.stride, (e * self.stride) as u64)
                    .with_context(|| format!("{}: reading expert {e}", lf.path.display()))?;
                let v = self.view(buf.bytes());
                let own = |m: MatRef<'_>| {
                    crate::tensor::Mat::from_bytes(
                        m.rows,
                        m.cols,
                        m.kind,
                        crate::tensor::AlignedBytes::from_slice(m.data),
                    )
                };
                Ok(crate::layers::mlp::Mlp { gate: own(v.gate)?, up: own(v.up)?, down: own(v.down)? })
            })
            .collect()
    }

    /// Starts reading these experts of `layer` ahead (a prediction): a page-cache hint in os
    /// mode; in direct mode O_DIRECT reads into least recently used slots of the own cache,
    /// always leaving a batch of slots free for the reads the routing will ask for.
    pub fn prefetch(&self, layer: usize, experts: &[usize]) {
        let Some(lf) = self.files.get(&layer) else { return };
        if self.mode == CacheMode::Direct
            && let Some(jobs) = self.jobs.as_ref()
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.tick += 1;
            let tick = slots.tick;
            for &e in experts.iter().filter(|&&e| e < self.num_experts) {
                if slots.map.contains_key(&(layer, e)) || slots.inflight.contains_key(&(layer, e)) {
                    continue;
                }
                if slots.busy.iter().filter(|b| !**b).count() <= self.max_batch {
                    break;
                }
                let Some(s) = (0..self.nslots).filter(|&s| !slots.busy[s]).min_by_key(|&s| slots.last_use[s]) else {
                    break;
                };
                if let Some(old) = slots.key[s].take() {
                    slots.map.remove(&old);
                }
                let job = Job {
                    fd: lf.file.as_raw_fd(),
                    off: (e * self.stride) as u64,
                    len: self.stride,
                    dst: self.arena.ptr as usize + s * self.stride,
                    tag: PREFETCH_TAG + s,
                };
                if jobs.send(job).is_err() {
                    break;
                }
                slots.busy[s] = true;
                slots.last_use[s] = tick;
                slots.inflight.insert((layer, e), s);
                slots.inflight_key[s] = Some((layer, e));
            }
        }
        if self.mode == CacheMode::Os {
            for &e in experts {
                // SAFETY: plain syscall on an open descriptor; a hint, errors are irrelevant.
                unsafe {
                    libc::posix_fadvise(
                        lf.file.as_raw_fd(),
                        (e * self.stride) as i64,
                        self.stride as i64,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
        }
        self.counters.prefetched.fetch_add(experts.len() as u64, Relaxed);
        let mut predicted = self.predicted.lock().unwrap_or_else(|p| p.into_inner());
        let p = predicted.entry(layer).or_default();
        p.clear();
        p.extend_from_slice(experts);
    }

    /// Fraction of the expert files resident in the page cache: (resident bytes, total bytes).
    pub fn page_cache_residency(&self) -> Result<(u64, u64)> {
        let mut res = 0u64;
        let mut total = 0u64;
        for lf in self.files.values() {
            let (r, t) = residency(&lf.path)?;
            res += r;
            total += t;
        }
        Ok((res, total))
    }

    /// Asks the kernel to drop the expert files from the page cache (cold-start runs).
    pub fn drop_page_cache(&self) {
        for lf in self.files.values() {
            // SAFETY: plain syscall on an open descriptor.
            unsafe { libc::posix_fadvise(lf.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Resident bytes of a file in the page cache (mincore over a read-only mapping).
pub fn residency(path: &Path) -> Result<(u64, u64)> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok((0, 0));
    }
    // SAFETY: a fresh read-only shared mapping, unmapped before returning; never dereferenced.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        if p == libc::MAP_FAILED {
            bail!("{}: mmap failed: {}", path.display(), std::io::Error::last_os_error());
        }
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        if rc != 0 {
            bail!("{}: mincore failed: {}", path.display(), std::io::Error::last_os_error());
        }
        let pages = vec.iter().filter(|&&v| v & 1 == 1).count();
        Ok(((pages * page).min(len) as u64, len as u64))
    }
}
