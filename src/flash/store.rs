//! The expert store: reads routed experts from the per-layer expert files on demand.
//!
//! All reads of a layer are issued at once to a pool of I/O threads doing `pread` into
//! reusable 4 KiB-aligned slots (no allocation per token); the caller computes each expert as
//! soon as its bytes are in. Two cache modes:
//! - `os`: buffered reads, the kernel's page cache is the cache (as in the original engine);
//!   an expert already fully in the page cache (asked with mincore) is computed in place from a
//!   read-only mapping of its file, without a read or a copy;
//! - `direct`: `O_DIRECT` reads, and the slots themselves form an in-process cache of
//!   `cache_bytes`, evicting the expert needed again last (see `Slots::victim`: a batch's step
//!   may need more experts than it holds, which plain LRU turns into a miss per read).

use super::format::{ExpertLayout, Experts};
use crate::scratch::{self, Pool};
use crate::tensor::MatRef;
use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Sender, bounded};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// Where the store's slot memory comes from: the backend that computes from the slots
/// supplies it. The default, [`HeapSlots`], is 4 KiB-aligned heap pages; a GPU backend would
/// supply pinned (page-locked) host memory, so that a slot's bytes go to the device by DMA
/// without a staging copy — a second implementation, not a change to the store.
pub trait SlotAlloc: Send + Sync {
    /// `bytes` of zeroed memory, 4 KiB-aligned (O_DIRECT reads land in it). An error, not an
    /// abort, when it cannot be had: the size is user input (`--cache-size`).
    fn alloc(&self, bytes: usize) -> Result<Box<dyn SlotMemory>>;
}

/// Memory from a [`SlotAlloc`], given back when dropped.
///
/// # Safety
/// `ptr()` points to `bytes()` writable bytes, 4 KiB-aligned, that stay valid and in place
/// until the value is dropped and may be written and read from any thread.
pub unsafe trait SlotMemory: Send + Sync {
    fn ptr(&self) -> *mut u8;
    fn bytes(&self) -> usize;
}

/// The default slot memory: the heap, zeroed (pages are committed by the OS when touched).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapSlots;

impl SlotAlloc for HeapSlots {
    fn alloc(&self, bytes: usize) -> Result<Box<dyn SlotMemory>> {
        Ok(Box::new(Arena::new(bytes)?))
    }
}

/// 4 KiB-aligned heap memory.
struct Arena {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the arena is plain memory; the store's protocol gives each slot one writer (an I/O
// thread, while the slot is `Reading`) or readers (callers that pinned it once `Ready`),
// never both.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

// SAFETY: `ptr` is `layout.size()` bytes aligned to 4 KiB, freed only in `drop`.
unsafe impl SlotMemory for Arena {
    fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.layout.size()
    }
}

impl Arena {
    fn new(bytes: usize) -> Result<Arena> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096)
            .map_err(|_| anyhow!("{bytes} bytes of expert slots is more than this machine can address"))?;
        // SAFETY: non-zero size; zeroed pages are only committed by the OS when touched.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {bytes} bytes for expert slots (lower --cache-size)");
        }
        Ok(Arena { ptr, layout })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One read: `len` bytes at `off` of `fd` into slot `slot` (at `dst`), for `key`.
struct Job {
    fd: i32,
    off: u64,
    len: usize,
    dst: usize,
    slot: usize,
    key: Key,
}

/// (layer, expert).
type Key = (usize, usize);

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

/// What a slot holds.
#[derive(Clone, Debug, PartialEq)]
enum SlotState {
    Empty,
    /// An I/O thread is writing it.
    Reading,
    /// The bytes of `Slots::key` are in.
    Ready,
    /// Its read failed (kept until the callers waiting for it have seen the error).
    Failed(String),
}

/// Slot bookkeeping, shared by the callers and the I/O threads. The lock is held only to
/// change it, never while computing or waiting for a read.
struct Slots {
    key: Vec<Option<Key>>,
    state: Vec<SlotState>,
    /// Callers computing from the slot or waiting for its read: it is not evicted meanwhile.
    pins: Vec<u32>,
    last_use: Vec<u64>,
    /// Direct mode: the cache, key → slot holding its bytes.
    map: HashMap<Key, usize>,
    /// Reads in flight (demand reads and prefetches): key → slot.
    inflight: HashMap<Key, usize>,
    tick: u64,
    /// Uses of the slot's expert since it was read (saturating), halved every `key.len()`
    /// reads: the frequency part of the eviction order.
    uses: Vec<u8>,
    /// Reads started, for the halving.
    claims: usize,
    /// Per layer index: its place in the pass over the expert layers (the eviction order's
    /// next-use part); empty: every layer alike.
    rank: Vec<usize>,
    /// Expert layers in the pass, and their indices in its order.
    layers: usize,
    order: Vec<usize>,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            key: vec![None; n],
            state: vec![SlotState::Empty; n],
            pins: vec![0; n],
            last_use: vec![0; n],
            map: HashMap::new(),
            inflight: HashMap::new(),
            tick: 0,
            uses: vec![0; n],
            claims: 0,
            rank: vec![],
            layers: 1,
            order: vec![],
        }
    }

    /// [`Slots::new`] for a store whose expert layers are `layers`, in the order a forward
    /// pass visits them.
    fn for_layers(n: usize, layers: &[usize]) -> Slots {
        let mut g = Slots::new(n);
        g.rank = vec![0; layers.iter().max().map_or(0, |&l| l + 1)];
        for (r, &l) in layers.iter().enumerate() {
            g.rank[l] = r;
        }
        g.layers = layers.len().max(1);
        g.order = layers.to_vec();
        g
    }

    /// The slot to read an expert of `layer` into, among those nobody reads, computes from or
    /// waits for; `wanted` are the experts the caller itself still needs (not taken while
    /// another slot is free). Empty slots first; then the expert whose next use is furthest
    /// away: a forward pass visits the expert layers in order, so one of `layer` itself that
    /// the caller does not want is needed again a whole pass later at the earliest, one of the
    /// layer just passed a layer sooner, and so on back; among a layer's experts, the least
    /// used since it was read, then the least recently used. Plain LRU would, once a batch's step needs more experts than the
    /// cache holds, evict each expert just before the next step asks for it again (every
    /// read a miss); this order keeps most of the cache across steps and cycles the rest.
    fn victim(&self, layer: usize, wanted: impl Fn(Key) -> bool) -> Option<usize> {
        let layers = self.layers;
        let at = self.rank.get(layer).copied().unwrap_or(0);
        let order = |s: usize| match self.key[s] {
            None => (0, false, 0, 0, 0),
            Some(k) => {
                // layers until its next use, counted from `layer` (`layers` for `layer` itself)
                let ahead = (self.rank.get(k.0).copied().unwrap_or(0) + layers - at) % layers;
                let next = if ahead == 0 { layers } else { ahead };
                (1, wanted(k), layers - next, self.uses[s], self.last_use[s])
            }
        };
        (0..self.key.len()).filter(|&s| self.free(s)).min_by_key(|&s| order(s))
    }

    /// The expert layer a pass visits before `layer` (the last one before the first).
    fn before(&self, layer: usize) -> usize {
        let at = self.rank.get(layer).copied().unwrap_or(0);
        self.order.get((at + self.layers - 1) % self.layers).copied().unwrap_or(layer)
    }

    /// A use of slot `s`'s expert (a hit, or a wait for its read) at `tick`.
    fn touch(&mut self, s: usize, tick: u64) {
        self.last_use[s] = tick;
        self.uses[s] = self.uses[s].saturating_add(1);
    }

    fn free(&self, s: usize) -> bool {
        self.pins[s] == 0 && self.state[s] != SlotState::Reading
    }

    /// Takes slot `s` for a read of `key`: its old content leaves the cache.
    fn claim(&mut self, s: usize, key: Key, tick: u64) {
        if let Some(old) = self.key[s].take()
            && self.map.get(&old) == Some(&s)
        {
            self.map.remove(&old);
        }
        self.key[s] = Some(key);
        self.state[s] = SlotState::Reading;
        self.last_use[s] = tick;
        self.uses[s] = 1;
        self.inflight.insert(key, s);
        // the frequencies fade, so that experts popular long ago leave the cache in time
        self.claims += 1;
        if self.claims.is_multiple_of(self.key.len()) {
            self.uses.iter_mut().for_each(|u| *u /= 2);
        }
    }

    fn unpin(&mut self, s: usize) {
        self.pins[s] -= 1;
        if self.pins[s] == 0 && matches!(self.state[s], SlotState::Failed(_)) {
            self.forget(s);
        }
    }

    fn forget(&mut self, s: usize) {
        self.state[s] = SlotState::Empty;
        self.key[s] = None;
        self.last_use[s] = 0;
        self.uses[s] = 0;
    }
}

/// What the store's I/O threads share with its callers.
struct Shared {
    slots: Mutex<Slots>,
    /// Signalled when a read completes or a slot is released.
    changed: Condvar,
    counters: Counters,
    direct: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An I/O thread's completion of `j`: the slot becomes readable (and, in direct mode, a
    /// cache entry), or failed for whoever waits for it.
    fn complete(&self, j: &Job, result: std::io::Result<()>, path: &Path) {
        let mut g = self.lock();
        if g.inflight.get(&j.key) == Some(&j.slot) {
            g.inflight.remove(&j.key);
        }
        match result {
            Ok(()) => {
                g.state[j.slot] = SlotState::Ready;
                if self.direct {
                    g.map.insert(j.key, j.slot);
                }
                self.counters.bytes_read.fetch_add(j.len as u64, Relaxed);
                self.counters.reads.fetch_add(1, Relaxed);
            }
            Err(e) if g.pins[j.slot] > 0 => {
                g.state[j.slot] = SlotState::Failed(format!(
                    "{}: reading expert {} of layer {} ({} bytes at offset {}) failed: {e}",
                    path.display(),
                    j.key.1,
                    j.key.0,
                    j.len,
                    j.off
                ));
            }
            Err(_) => g.forget(j.slot),
        }
        drop(g);
        self.changed.notify_all();
    }
}

/// Where the bytes of an expert that is already in memory are.
#[derive(Clone, Copy, Debug)]
enum Ready {
    /// A slot of the store (pinned by the caller until computed).
    Slot(usize),
    /// The page cache, through the read-only mapping of the layer's file (os mode).
    Mapped { addr: usize },
}

/// One [`ExpertStore::with_experts`] call in progress: what it needs and what it holds.
struct Call<'a> {
    layer: usize,
    needed: &'a [usize],
    /// Index in `needed` of the next expert to place.
    next: usize,
    /// (index, where) of experts whose bytes are in, pinned until computed.
    ready: scratch::Pooled<Vec<(usize, Ready)>>,
    /// (index, slot) of those whose reads are in flight, pinned.
    waiting: scratch::Pooled<Vec<(usize, usize)>>,
    /// Per needed expert: where it sits in the mapping if all its pages are cached (os
    /// mode), else 0.
    resident: scratch::Pooled<Vec<usize>>,
    /// How many of the ready experts are computed in place from the page cache (no slot).
    mapped: usize,
    /// An expert read into a buffer of the call's own (every slot held by others).
    private: Option<usize>,
    failed: Option<String>,
    /// The needed experts as a bit set (kept in the cache while the call places the others).
    want: scratch::Pooled<Vec<u64>>,
}

impl Call<'_> {
    /// Whether the call needs expert `e`.
    fn wants(&self, e: usize) -> bool {
        self.want.get(e / 64).is_some_and(|w| w >> (e % 64) & 1 == 1)
    }

    /// Unpins the ready experts' slots and empties the ready list; whether a slot was released.
    fn release(&mut self, g: &mut Slots) -> bool {
        let mut released = false;
        for &(_, at) in self.ready.iter() {
            if let Ready::Slot(s) = at {
                g.unpin(s);
                released = true;
            }
        }
        self.ready.clear();
        self.mapped = 0;
        released
    }
}

thread_local! {
    /// Per-call lists of `with_experts` (no allocation per call once warm): (index, where)
    /// of experts whose bytes are in, (index, slot) of those whose reads are in flight.
    static READY: Pool<Vec<(usize, Ready)>> = const { Pool::new() };
    static WAITING: Pool<Vec<(usize, usize)>> = const { Pool::new() };
    /// Per call: where each needed expert sits in the mapping if all its pages are cached
    /// (os mode), else 0; per thread: `mincore`'s answer.
    static RESIDENT: Pool<Vec<usize>> = const { Pool::new() };
    static PAGES: Pool<Vec<u8>> = const { Pool::new() };
    /// Per call: the needed experts as a bit set.
    static WANT: Pool<Vec<u64>> = const { Pool::new() };
}

/// An expert's page-cache check is this many `mincore` calls, items of one step.
const RESIDENCY_PARTS: usize = 4;

pub struct ExpertStore {
    /// How an extent splits into matrices.
    pub layout: ExpertLayout,
    stride: usize,
    num_experts: usize,
    files: HashMap<usize, LayerFile>,
    pub mode: CacheMode,
    /// O_DIRECT could not be used (filesystem refused it); reads are buffered.
    pub direct_fallback: bool,
    nslots: usize,
    max_batch: usize,
    /// Owns the slots' memory, `nslots` extents one after the other at `base`.
    _memory: Box<dyn SlotMemory>,
    /// Where `arena` starts (an address: the store is shared between threads).
    base: usize,
    alloc: Arc<dyn SlotAlloc>,
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    pub prefetch: bool,
    predicted: Mutex<HashMap<usize, Vec<usize>>>,
}

fn pread_full(fd: i32, dst: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
    let mut got = 0;
    while got < len {
        // SAFETY: dst..dst+len is a slot owned by this job until its completion is recorded.
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
    /// Opens the expert files of a converted model, its slots on the heap.
    pub fn open(dir: &Path, ex: &Experts, opts: &StoreOptions) -> Result<ExpertStore> {
        Self::open_in(dir, ex, opts, Arc::new(HeapSlots))
    }

    /// [`Self::open`] with slot memory from `alloc` (the backend's).
    pub fn open_in(dir: &Path, ex: &Experts, opts: &StoreOptions, alloc: Arc<dyn SlotAlloc>) -> Result<ExpertStore> {
        let layout = ExpertLayout::of(ex)?;
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
        let mut layer_order: Vec<usize> = ex.layers.iter().map(|l| l.layer).collect();
        layer_order.sort_unstable();
        let nslots = match opts.mode {
            CacheMode::Os => max_batch,
            // a cache larger than every expert of the model holds nothing more
            CacheMode::Direct => {
                ((opts.cache_bytes / stride as u64).min((files.len() * ex.num_experts) as u64) as usize).max(max_batch)
            }
        };
        let shared = Arc::new(Shared {
            slots: Mutex::new(Slots::for_layers(nslots, &layer_order)),
            changed: Condvar::new(),
            counters: Counters::default(),
            direct: opts.mode == CacheMode::Direct,
        });
        let paths: Arc<HashMap<i32, PathBuf>> =
            Arc::new(files.values().map(|f: &LayerFile| (f.file.as_raw_fd(), f.path.clone())).collect());
        // at most one job per slot is ever queued: sending never blocks
        let (jtx, jrx) = bounded::<Job>(nslots);
        let workers = (0..opts.io_threads.max(1))
            .map(|i| {
                let (jrx, shared, paths) = (jrx.clone(), shared.clone(), paths.clone());
                std::thread::Builder::new()
                    .name(format!("flashmoe-io-{i}"))
                    .spawn(move || {
                        for j in jrx {
                            let result = pread_full(j.fd, j.dst as *mut u8, j.len, j.off);
                            shared.complete(&j, result, paths.get(&j.fd).map_or(Path::new("?"), |p| p));
                        }
                    })
                    .context("cannot start an I/O thread")
            })
            .collect::<Result<_>>()?;
        let arena = alloc.alloc(nslots.saturating_mul(stride))?;
        if arena.bytes() < nslots * stride || !(arena.ptr() as usize).is_multiple_of(4096) {
            bail!(
                "the slot allocator returned {} bytes, {} aligned to 4 KiB were asked for",
                arena.bytes(),
                nslots * stride
            );
        }
        Ok(ExpertStore {
            layout,
            stride,
            num_experts: ex.num_experts,
            files,
            mode: opts.mode,
            direct_fallback,
            nslots,
            max_batch: max_batch.min(nslots),
            base: arena.ptr() as usize,
            _memory: arena,
            alloc,
            shared,
            jobs: Some(jtx),
            workers,
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
        let c = &self.shared.counters;
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

    fn slot(&self, s: usize) -> &[u8] {
        // SAFETY: in bounds; only called for pinned slots whose read has completed.
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(s * self.stride), self.stride) }
    }

    /// Claims slot `s` for `key` and queues its read (false, the slot left empty, when the I/O
    /// threads are gone). Never blocks: at most one job per slot is ever queued.
    fn start_read(&self, g: &mut Slots, jobs: &Sender<Job>, lf: &LayerFile, s: usize, key: Key, tick: u64) -> bool {
        g.claim(s, key, tick);
        let job = Job {
            fd: lf.file.as_raw_fd(),
            off: (key.1 * self.stride) as u64,
            len: self.stride,
            dst: self.base + s * self.stride,
            slot: s,
            key,
        };
        if jobs.try_send(job).is_err() {
            g.inflight.remove(&key);
            g.forget(s);
            return false;
        }
        true
    }

    /// Whether part `part` of [`RESIDENCY_PARTS`] (whole pages) of expert `e`'s extent is in
    /// the page cache.
    fn part_cached(&self, lf: &LayerFile, e: usize, part: usize) -> bool {
        let Some((p, _)) = lf.map else { return false };
        let pages = self.stride.div_ceil(4096);
        let per = pages.div_ceil(RESIDENCY_PARTS);
        let (first, last) = ((part * per).min(pages), ((part + 1) * per).min(pages));
        if first == last {
            return true;
        }
        let mut vec = scratch::take(&PAGES);
        vec.resize(last - first, 0);
        let addr = p + e * self.stride + first * 4096;
        let len = ((last - first) * 4096).min(self.stride - first * 4096);
        // SAFETY: the range lies inside the mapping (file length checked at open).
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        rc == 0 && vec.iter().all(|v| v & 1 == 1)
    }

    /// Reads experts `needed` of `layer` and calls `compute` with batches of `(i, expert)`,
    /// each `needed[i]` in exactly one batch, as soon as its bytes are in memory (cache hits
    /// first; the caller computes a batch's experts in parallel). `during` runs once the first
    /// reads are in flight (the shared expert's compute hides I/O there). A failed read is an
    /// error. Several callers may use one store at once: no lock is held while computing or
    /// waiting.
    ///
    /// Three steps: [`Self::plan`] once (what is needed and where it already is), then until
    /// every expert is computed [`Self::issue`] (place the next experts: hits, reads already in
    /// flight, reads to start; at most a batch of slots held), [`Self::drain`] (which reads
    /// have arrived), and the ready batch computed outside the lock.
    pub fn with_experts(
        &self,
        layer: usize,
        needed: &[usize],
        during: impl FnOnce(),
        compute: impl Fn(&[(usize, &[u8])]),
    ) -> Result<()> {
        let lf = self.files.get(&layer).ok_or_else(|| anyhow!("layer {layer} has no expert file"))?;
        let mut call = self.plan(layer, lf, needed)?;
        let jobs = self.jobs.as_ref().expect("store is open");
        let c = &self.shared.counters;
        let mut during = Some(during);
        let mut g = self.shared.lock();
        let res = loop {
            self.issue(&mut g, &mut call, jobs, lf);
            self.drain(&mut g, &mut call);
            if let Some(msg) = call.failed.take() {
                call.release(&mut g);
                call.waiting.iter().for_each(|&(_, s)| g.unpin(s));
                call.waiting.clear();
                break Err(anyhow!(msg));
            }
            if call.ready.is_empty() && during.is_none() && call.private.is_none() {
                if call.waiting.is_empty() && call.next == needed.len() {
                    break Ok(());
                }
                // nothing to compute: wait for a read in flight (the I/O threads complete it
                // whatever the callers do)
                let t = Instant::now();
                g = self.shared.changed.wait(g).unwrap_or_else(|p| p.into_inner());
                c.io_wait_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                continue;
            }
            drop(g);
            if let Some(f) = during.take() {
                f();
            }
            self.compute_ready(&mut call, lf, &compute);
            g = self.shared.lock();
            if call.release(&mut g) {
                self.shared.changed.notify_all();
            }
        };
        drop(g);
        if res.is_ok()
            && let Some(f) = during.take()
        {
            f();
        }
        res
    }

    /// The first step of [`Self::with_experts`]: checks what is asked for, counts what the
    /// prefetcher predicted right, and asks the page cache which of the experts it holds whole.
    fn plan<'a>(&self, layer: usize, lf: &LayerFile, needed: &'a [usize]) -> Result<Call<'a>> {
        if let Some(&e) = needed.iter().find(|&&e| e >= self.num_experts) {
            bail!("expert {e} of layer {layer} is out of range ({} experts)", self.num_experts);
        }
        if self.prefetch
            && let Some(p) = self.predicted.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&layer)
        {
            let used = needed.iter().filter(|e| p.contains(e)).count();
            self.shared.counters.prefetch_used.fetch_add(used as u64, Relaxed);
            p.clear();
        }
        let mut call = Call {
            layer,
            needed,
            next: 0,
            ready: scratch::take(&READY),
            waiting: scratch::take(&WAITING),
            resident: scratch::take(&RESIDENT),
            mapped: 0,
            private: None,
            failed: None,
            want: scratch::take(&WANT),
        };
        call.ready.clear();
        call.waiting.clear();
        call.want.clear();
        call.want.resize(self.num_experts.div_ceil(64), 0);
        for &e in needed {
            call.want[e / 64] |= 1 << (e % 64);
        }
        // page-cache residency of every needed expert, asked up front and in parallel: `mincore`
        // visits each 4 KiB page of an extent, microseconds per expert, which one thread would
        // spend serially in every layer of a decode step while the others wait
        call.resident.clear();
        call.resident.resize(needed.len(), 0);
        if self.mode == CacheMode::Os && lf.map.is_some() {
            // in parts: a step of one item per expert (8 in a decode layer, 16+ threads) waited
            // for its slowest `mincore`
            let missing: SmallVec<[AtomicBool; 64]> = needed.iter().map(|_| AtomicBool::new(false)).collect();
            crate::par::for_each(needed.len() * RESIDENCY_PARTS, |i| {
                let (e, part) = (i / RESIDENCY_PARTS, i % RESIDENCY_PARTS);
                if !missing[e].load(Relaxed) && !self.part_cached(lf, needed[e], part) {
                    missing[e].store(true, Relaxed);
                }
            });
            let base = lf.map.map_or(0, |(p, _)| p);
            for (i, r) in call.resident.iter_mut().enumerate() {
                *r = if missing[i].load(Relaxed) { 0 } else { base + needed[i] * self.stride };
            }
        }
        Ok(call)
    }

    /// Places the call's next experts, at most a batch of slots held by it: a cached or
    /// in-flight expert is pinned, one whole in the page cache is computed in place, a miss
    /// claims the least recently used free slot and queues its read. With every slot held by
    /// others, the call reads one expert into a buffer of its own (`private`).
    fn issue(&self, g: &mut Slots, call: &mut Call<'_>, jobs: &Sender<Job>, lf: &LayerFile) {
        let c = &self.shared.counters;
        g.tick += 1;
        let tick = g.tick;
        // experts computed in place from the page cache (`mapped` of the ready ones) hold no
        // slot, so a prompt's cached experts form one batch (one parallel loop over all of
        // them, not a barrier every `max_batch`)
        while call.failed.is_none()
            && call.next < call.needed.len()
            && call.ready.len() - call.mapped + call.waiting.len() < self.max_batch
        {
            let next = call.next;
            let key = (call.layer, call.needed[next]);
            if let Some(s) = g.map.get(&key).or_else(|| g.inflight.get(&key)).copied() {
                // cached (direct mode), or being read already (a prefetch, another caller)
                g.pins[s] += 1;
                g.touch(s, tick);
                if g.state[s] == SlotState::Ready {
                    c.hits.fetch_add(1, Relaxed);
                    call.ready.push((next, Ready::Slot(s)));
                } else {
                    c.misses.fetch_add(1, Relaxed);
                    call.waiting.push((next, s));
                }
            } else if call.resident[next] != 0 {
                let addr = call.resident[next];
                // computed in place from the page cache: no read, no copy
                c.hits.fetch_add(1, Relaxed);
                call.ready.push((next, Ready::Mapped { addr }));
                call.mapped += 1;
            } else if let Some(s) = g.victim(call.layer, |k| k.0 == call.layer && call.wants(k.1)) {
                if !self.start_read(g, jobs, lf, s, key, tick) {
                    call.failed = Some("the expert store's I/O threads are gone".into());
                    return;
                }
                g.pins[s] += 1;
                c.misses.fetch_add(1, Relaxed);
                call.waiting.push((next, s));
            } else {
                // Every slot is pinned by other callers. Waiting for one to be released could
                // deadlock: rayon may be running this call on a thread whose stack holds,
                // further down, the very caller that pinned it. With nothing of its own in
                // flight, this call reads the expert into a buffer of its own instead.
                if call.ready.is_empty() && call.waiting.is_empty() && call.private.is_none() {
                    c.misses.fetch_add(1, Relaxed);
                    call.private = Some(next);
                    call.next += 1;
                }
                return;
            }
            call.next += 1;
        }
    }

    /// Moves the call's reads that have completed to its ready list; a failed read becomes
    /// the call's error.
    fn drain(&self, g: &mut Slots, call: &mut Call<'_>) {
        let mut k = 0;
        while k < call.waiting.len() {
            let (i, s) = call.waiting[k];
            match &g.state[s] {
                SlotState::Ready => call.ready.push((i, Ready::Slot(s))),
                SlotState::Failed(msg) => {
                    call.failed.get_or_insert_with(|| msg.clone());
                    g.unpin(s);
                }
                SlotState::Reading | SlotState::Empty => {
                    k += 1;
                    continue;
                }
            }
            call.waiting.swap_remove(k);
        }
    }

    /// Computes the call's ready experts (no lock held), then its private read if it has one.
    fn compute_ready(&self, call: &mut Call<'_>, lf: &LayerFile, compute: &impl Fn(&[(usize, &[u8])])) {
        let c = &self.shared.counters;
        let t = Instant::now();
        let batch: SmallVec<[(usize, &[u8]); 16]> = call
            .ready
            .iter()
            .map(|&(i, at)| {
                let bytes = match at {
                    Ready::Slot(s) => self.slot(s),
                    // SAFETY: a read-only mapping of a file this process never writes, alive
                    // as long as the store; the extent lies inside it (length checked at
                    // open). Were the file truncated by someone else in between, this would
                    // fault: the same contract as any mmap of model weights.
                    Ready::Mapped { addr } => unsafe { std::slice::from_raw_parts(addr as *const u8, self.stride) },
                };
                (i, bytes)
            })
            .collect();
        if !batch.is_empty() {
            compute(&batch);
        }
        c.compute_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        let Some(i) = call.private.take() else { return };
        let e = call.needed[i];
        let t = Instant::now();
        let res = self.alloc.alloc(self.stride).and_then(|buf| {
            // SAFETY: the buffer is this call's, `stride` bytes, 4 KiB-aligned for O_DIRECT.
            pread_full(lf.file.as_raw_fd(), buf.ptr(), self.stride, (e * self.stride) as u64)?;
            Ok(buf)
        });
        c.io_wait_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        match res {
            Ok(buf) => {
                c.bytes_read.fetch_add(self.stride as u64, Relaxed);
                c.reads.fetch_add(1, Relaxed);
                let t = Instant::now();
                // SAFETY: the buffer was filled above and lives to the end of this block.
                compute(&[(i, unsafe { std::slice::from_raw_parts(buf.ptr(), self.stride) })]);
                c.compute_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            }
            Err(err) => {
                call.failed = Some(format!(
                    "{}: reading expert {e} of layer {} ({} bytes at offset {}) failed: {err}",
                    lf.path.display(),
                    call.layer,
                    self.stride,
                    e * self.stride
                ))
            }
        }
    }

    /// Reads every expert of `layer` into owned memory (for runs that keep experts resident).
    pub fn load_layer(&self, layer: usize, act: crate::config::Act) -> Result<Vec<crate::layers::mlp::Mlp>> {
        let lf = self.files.get(&layer).ok_or_else(|| anyhow!("layer {layer} has no expert file"))?;
        let f = File::open(&lf.path).with_context(|| format!("cannot open {}", lf.path.display()))?;
        let mut buf = crate::tensor::AlignedBytes::zeroed(self.stride);
        (0..self.num_experts)
            .map(|e| {
                pread_full(f.as_raw_fd(), buf.bytes_mut().as_mut_ptr(), self.stride, (e * self.stride) as u64)
                    .with_context(|| format!("{}: reading expert {e}", lf.path.display()))?;
                let v = self.layout.mlp(buf.bytes(), act);
                let own = |m: MatRef<'_>| {
                    crate::tensor::Mat::from_bytes(
                        m.rows,
                        m.cols,
                        m.kind,
                        crate::tensor::AlignedBytes::from_slice(m.data),
                    )
                };
                let bias = v.bias.map(|b| std::sync::Arc::new(b.map(|x| x.to_vec())));
                Ok(crate::layers::mlp::Mlp { gate: own(v.gate)?, up: own(v.up)?, down: own(v.down)?, bias, act })
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
            let mut g = self.shared.lock();
            g.tick += 1;
            let tick = g.tick;
            for &e in experts.iter().filter(|&&e| e < self.num_experts) {
                let key = (layer, e);
                if g.map.contains_key(&key) || g.inflight.contains_key(&key) {
                    continue;
                }
                if (0..self.nslots).filter(|&s| g.free(s)).count() <= self.max_batch {
                    break;
                }
                // the layer before `layer` runs next, its experts unknown yet: neither they nor
                // the predicted ones make room for a guess
                let before = g.before(layer);
                let keep = |k: Key| k.0 == before || (k.0 == layer && experts.contains(&k.1));
                let Some(s) = g.victim(layer, keep) else { break };
                if g.key[s].is_some_and(keep) {
                    break;
                }
                if !self.start_read(&mut g, jobs, lf, s, key, tick) {
                    break;
                }
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
        self.shared.counters.prefetched.fetch_add(experts.len() as u64, Relaxed);
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

    /// Asks the kernel to drop the expert files from the page cache (cold-start runs), after
    /// writing back what is still dirty (a model just written by `synth` or `convert`: dirty
    /// pages are not dropped). Pages another process maps or locks stay: see
    /// [`Self::page_cache_residency`].
    pub fn drop_page_cache(&self) {
        for lf in self.files.values() {
            // SAFETY: plain syscalls on an open descriptor.
            unsafe {
                libc::fdatasync(lf.file.as_raw_fd());
                libc::posix_fadvise(lf.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
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

#[cfg(test)]
mod slot_policy {
    use super::*;

    /// A slot holding `key`, read and cached (direct mode), last used at `tick`.
    fn cached(g: &mut Slots, s: usize, key: Key, tick: u64) {
        g.claim(s, key, tick);
        g.inflight.remove(&key);
        g.state[s] = SlotState::Ready;
        g.map.insert(key, s);
    }

    #[test]
    fn the_victim_is_the_least_recently_used_slot_nobody_holds() {
        let mut g = Slots::new(4);
        // empty slots first (never used), lowest index among equals
        assert_eq!(g.victim(0, |_| false), Some(0));
        for (s, t) in [(0, 5), (1, 2), (2, 9), (3, 7)] {
            cached(&mut g, s, (0, s), t);
        }
        assert_eq!(g.victim(0, |_| false), Some(1));
        g.pins[1] = 1; // computing from it
        assert_eq!(g.victim(0, |_| false), Some(0));
        g.state[0] = SlotState::Reading; // a read in flight is never the victim
        assert_eq!(g.victim(0, |_| false), Some(3));
        g.pins[3] = 2;
        g.pins[2] = 1;
        assert_eq!(g.victim(0, |_| false), None, "every slot held: the caller reads into a buffer of its own");
        g.unpin(3);
        assert_eq!(g.victim(0, |_| false), None);
        g.unpin(3);
        assert_eq!(g.victim(0, |_| false), Some(3));
    }

    #[test]
    fn the_victim_is_the_expert_needed_again_last() {
        // expert layers 2, 5, 7, 9 (a pass visits them in that order)
        let mut g = Slots::for_layers(6, &[2, 5, 7, 9]);
        for (s, key) in [(0, (2, 0)), (1, (5, 1)), (2, (7, 2)), (3, (9, 3)), (4, (7, 4))] {
            cached(&mut g, s, key, 10 - s as u64);
        }
        assert_eq!(g.victim(9, |_| false), Some(5), "an empty slot first");
        cached(&mut g, 5, (7, 5), 1);
        let none = |_: Key| false;
        // reading for layer 9: its own experts it does not want are needed again only a whole
        // pass later; then layer 7's (the layer just passed), the least used, then the least
        // recently used
        assert_eq!(g.victim(9, none), Some(3));
        let nine = |k: Key| k.0 == 9;
        assert_eq!(g.victim(9, nine), Some(5));
        g.touch(5, 12);
        g.touch(5, 13);
        g.touch(2, 11);
        assert_eq!(g.victim(9, nine), Some(4), "slots 2 and 5 are used more");
        // reading for layer 2: layer 2's own experts it does not want come first, then layer 9's
        assert_eq!(g.victim(2, none), Some(0));
        assert_eq!(g.victim(2, |k| k == (2, 0)), Some(3), "an expert the call wants stays");
        g.pins[3] = 1;
        assert_eq!(g.victim(2, |k| k == (2, 0)), Some(4));
        assert_eq!((g.before(2), g.before(7), g.before(9)), (9, 5, 7), "the pass wraps around");
        // wanted experts only when every other slot is held
        for s in 1..6 {
            g.pins[s] = 1;
        }
        assert_eq!(g.victim(2, |k| k == (2, 0)), Some(0));
    }

    #[test]
    fn uses_fade_as_experts_are_read() {
        let mut g = Slots::new(2);
        cached(&mut g, 0, (0, 0), 1);
        (0..9).for_each(|t| g.touch(0, 2 + t));
        assert_eq!(g.uses, [10, 0]);
        // every second read (as many as there are slots) halves every count
        g.claim(1, (0, 1), 20);
        assert_eq!(g.uses, [5, 0]);
        g.claim(1, (0, 2), 21);
        assert_eq!(g.uses, [5, 1]);
        g.claim(1, (0, 3), 22);
        assert_eq!(g.uses, [2, 0]);
    }

    #[test]
    fn claiming_a_slot_evicts_its_old_expert_from_the_cache() {
        let mut g = Slots::new(2);
        cached(&mut g, 0, (1, 4), 1);
        assert_eq!(g.map.get(&(1, 4)), Some(&0));
        g.claim(0, (1, 5), 2);
        assert!(!g.map.contains_key(&(1, 4)), "the evicted expert is no longer a hit");
        assert_eq!(g.inflight.get(&(1, 5)), Some(&0));
        assert_eq!(g.state[0], SlotState::Reading);
        // a key cached in another slot is left alone when this slot's old key differs
        cached(&mut g, 1, (1, 6), 3);
        g.map.insert((1, 7), 1);
        g.key[0] = Some((1, 7));
        g.claim(0, (1, 8), 4);
        assert_eq!(g.map.get(&(1, 7)), Some(&1));
    }

    #[test]
    fn a_failed_read_is_forgotten_once_its_last_waiter_lets_go() {
        let mut g = Slots::new(1);
        g.claim(0, (2, 3), 1);
        g.pins[0] = 2;
        g.state[0] = SlotState::Failed("disk error".into());
        g.unpin(0);
        assert!(matches!(g.state[0], SlotState::Failed(_)), "one waiter has not seen it yet");
        g.unpin(0);
        assert_eq!(g.state[0], SlotState::Empty);
        assert_eq!(g.key[0], None);
        assert_eq!(g.victim(0, |_| false), Some(0));
    }
}

#[cfg(test)]
mod slot_memory {
    use super::*;
    use crate::flash::format::{ExpertLayer, expert_layout};
    use crate::tensor::WKind;
    use std::sync::atomic::AtomicUsize;

    /// Heap slots, counting what the store asks for; or too little memory.
    struct Counting {
        bytes: AtomicUsize,
        short: bool,
    }

    impl SlotAlloc for Counting {
        fn alloc(&self, bytes: usize) -> Result<Box<dyn SlotMemory>> {
            self.bytes.fetch_add(bytes, Relaxed);
            HeapSlots.alloc(if self.short { bytes / 2 } else { bytes })
        }
    }

    #[test]
    fn slots_come_from_the_allocator_the_backend_supplies() {
        let dir = tempfile::tempdir().unwrap();
        let (parts, _, stride) = expert_layout(WKind::BF16, 64, 32, false);
        let ex = Experts {
            kind: "bf16".into(),
            num_experts: 6,
            stride,
            gate: parts[0],
            up: parts[1],
            down: parts[2],
            biases: None,
            layers: vec![ExpertLayer { layer: 3, file: "l3.bin".into() }],
        };
        let data: Vec<u8> = (0..6 * stride as usize).map(|i| (i / stride as usize * 31 + i % 251) as u8).collect();
        std::fs::write(dir.path().join("l3.bin"), &data).unwrap();
        for mode in [CacheMode::Os, CacheMode::Direct] {
            let opts = StoreOptions { mode, cache_bytes: 4 * stride, io_threads: 2, max_batch: 2, prefetch: false };
            let alloc = Arc::new(Counting { bytes: AtomicUsize::new(0), short: false });
            let store = ExpertStore::open_in(dir.path(), &ex, &opts, alloc.clone()).unwrap();
            assert_eq!(alloc.bytes.load(Relaxed), store.slot_bytes(), "{mode:?}");
            let seen = Mutex::new(vec![]);
            let needed = [5, 0, 2, 5, 1];
            store
                .with_experts(
                    3,
                    &needed,
                    || {},
                    |batch| {
                        for &(i, b) in batch {
                            let e = needed[i];
                            assert_eq!(b, &data[e * stride as usize..(e + 1) * stride as usize], "{mode:?} expert {e}");
                            seen.lock().unwrap().push(i);
                        }
                    },
                )
                .unwrap();
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert_eq!(seen, [0, 1, 2, 3, 4], "each needed expert in exactly one batch");
            let short = Arc::new(Counting { bytes: AtomicUsize::new(0), short: true });
            let e = ExpertStore::open_in(dir.path(), &ex, &opts, short).err().unwrap().to_string();
            assert!(e.contains("slot allocator"), "{e}");
        }
    }

    /// Steps over four expert layers that need more experts than the cache holds (a batch's
    /// union): plain LRU would miss every one; the store keeps most of its cache across steps.
    #[test]
    fn a_step_needing_more_than_the_cache_holds_still_hits() {
        let dir = tempfile::tempdir().unwrap();
        let (parts, _, stride) = expert_layout(WKind::BF16, 64, 32, false);
        let layers = [1usize, 2, 4, 6];
        let ex = Experts {
            kind: "bf16".into(),
            num_experts: 8,
            stride,
            gate: parts[0],
            up: parts[1],
            down: parts[2],
            biases: None,
            layers: layers.iter().map(|&l| ExpertLayer { layer: l, file: format!("l{l}.bin") }).collect(),
        };
        let bytes = |l: usize, e: usize| -> Vec<u8> {
            (0..stride as usize).map(|i| (l * 67 + e * 31 + i % 251) as u8).collect()
        };
        for &l in &layers {
            let data: Vec<u8> = (0..8).flat_map(|e| bytes(l, e)).collect();
            std::fs::write(dir.path().join(format!("l{l}.bin")), &data).unwrap();
        }
        // ten slots; a step needs 4 × 4 = 16 experts
        let opts = StoreOptions {
            mode: CacheMode::Direct,
            cache_bytes: 10 * stride,
            io_threads: 2,
            max_batch: 3,
            prefetch: false,
        };
        let store = ExpertStore::open(dir.path(), &ex, &opts).unwrap();
        let needed = [[0, 2, 5, 7], [1, 2, 3, 6], [0, 4, 5, 6], [3, 5, 6, 7]];
        let mut hits = vec![];
        for _ in 0..8 {
            let before = store.stats();
            for (&l, need) in layers.iter().zip(&needed) {
                store
                    .with_experts(
                        l,
                        need,
                        || {},
                        |batch| {
                            for &(i, b) in batch {
                                assert_eq!(b, &bytes(l, need[i])[..], "layer {l} expert {}", need[i]);
                            }
                        },
                    )
                    .unwrap();
            }
            let after = store.stats();
            assert_eq!(after.hits + after.misses - before.hits - before.misses, 16);
            hits.push(after.hits - before.hits);
        }
        // the first step fills the cache; after it, the ten slots hold what the next step
        // needs but for the one batch of slots cycled through per layer
        assert_eq!(hits[0], 0);
        assert!(hits[2..].iter().all(|&h| h >= 5), "hits per step {hits:?}");
    }
}
