//! The persistent prompt cache: sequence states ([`State`]: KV caches, DeltaNet states) saved
//! to disk where prompts end, keyed by their tokens, so a new request, session or process whose
//! prompt begins with a saved prefix loads that state and prefills only the rest.
//!
//! One directory per model identity (`<cache dir>/prompt-cache/<model>-<hash>/` by default);
//! one file per entry, named by a hash of its tokens and their count. A file holds a header
//! (format version, model identity, the tokens themselves, each layer's state kind and buffer
//! lengths, a CRC) and then every buffer as raw little-endian values (f32; a bf16 or f16 KV cache's 16 bits, its kind
//! saying which) with a CRC of its own. Loading
//! checks all of it against the model; an entry that fails is removed and ignored. The hash
//! only names files: the stored tokens decide what an entry is, so a collision cannot serve a
//! wrong state.
//!
//! Entries are written to a temporary file and renamed into place (a reader never sees half a
//! file, two processes may share the directory), in the background while generation goes on.
//! The directory is bounded: past its limit the least recently used entries (by modification
//! time, which a use refreshes) are removed. Only entry files of this format, in this
//! directory, are ever removed.
//!
//! A KV cache of n tokens holds that of any shorter prefix (its first rows), so for a model of
//! attention layers only one entry serves every prefix of its tokens; a recurrent state is the
//! state after exactly its tokens, so such models need entries at the boundaries later prompts
//! share (the session saves where the prompt ends and at the positions it is told of: where the
//! last turn begins, where the system prompt and tools end).

use crate::model::{Model, State};
use anyhow::{Context, Result, bail};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const MAGIC: &[u8; 8] = b"FMPCACHE";
/// The file format's version; files of another are removed.
pub const VERSION: u32 = 1;
const EXT: &str = "fmpc";
const TMP_PREFIX: &str = ".tmp-";
/// The default size limit, before the free disk space lowers it.
pub const DEFAULT_LIMIT: u64 = 8 << 30;

/// FNV-1a, 64 bits: stable across builds and platforms (file and directory names).
fn fnv64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// The file name of the entry for `tokens`.
pub fn entry_name(tokens: &[u32]) -> String {
    let h = tokens.iter().fold(FNV0, |h, t| fnv64(h, &t.to_le_bytes()));
    format!("{h:016x}-{}.{EXT}", tokens.len())
}

/// What decides a model's states: its files (config, and each file's name, size and
/// modification time, so a converted-again or retrained model gets new entries) and the run
/// options that change the numbers (precision, experts per token, a 16-bit KV cache).
pub fn model_identity(dir: &Path, model: &Model) -> String {
    let mut h = fnv64(FNV0, &fs::read(dir.join("config.json")).unwrap_or_default());
    let mut files = vec![];
    let mut walk = |d: &Path, rel: &str| {
        let Ok(rd) = fs::read_dir(d) else { return vec![] };
        let mut subdirs = vec![];
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') {
                continue;
            }
            let name = format!("{rel}{file}");
            if md.is_dir() {
                subdirs.push((e.path(), format!("{name}/")));
            } else {
                let t = md.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
                files.push(format!("{name}:{}:{}", md.len(), t.map_or(0, |t| t.as_nanos())));
            }
        }
        subdirs
    };
    for (sub, rel) in walk(dir, "") {
        walk(&sub, &rel);
    }
    files.sort();
    for f in &files {
        h = fnv64(h, f.as_bytes());
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(64).collect();
    // an f32 cache adds nothing: files from before 16-bit caches keep their identity
    let kv = match model.opts.kv_cache {
        crate::layers::attention::KvType::F32 => String::new(),
        t => format!(" kv_cache={t}"),
    };
    format!(
        "{name}-{h:016x} layers={} precision={:?} experts_per_token={:?}{kv}",
        model.layers.len(),
        model.opts.precision,
        model.opts.experts_per_token
    )
}

/// The default directory of a model's entries: `<cache dir>/prompt-cache/<model>-<hash>/`.
pub fn default_dir(identity: &str) -> PathBuf {
    let name = identity.split(' ').next().unwrap_or("model");
    let h = fnv64(FNV0, identity.as_bytes());
    crate::builtin::cache_root().join("prompt-cache").join(format!("{name}-{:08x}", h as u32))
}

/// The default size limit in `dir`: [`DEFAULT_LIMIT`], at most a quarter of the free space.
pub fn default_limit(dir: &Path) -> u64 {
    let free = free_space(dir).unwrap_or(u64::MAX);
    DEFAULT_LIMIT.min(free / 4)
}

fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs to fill
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

// ---- the file format ----

fn put_u32(h: &mut Vec<u8>, v: u32) {
    h.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(h: &mut Vec<u8>, v: u64) {
    h.extend_from_slice(&v.to_le_bytes());
}

/// Bytes a file of `st` after `tokens` takes.
pub fn file_bytes(identity: &str, tokens: &[u32], st: &State) -> u64 {
    let data: usize = st.layers.iter().flat_map(|l| l.buffers()).map(|b| b.len() * b.value_bytes()).sum();
    (header(identity, tokens, st).len() + data + 4) as u64
}

fn header(identity: &str, tokens: &[u32], st: &State) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + identity.len() + tokens.len() * 4 + st.layers.len() * 24);
    h.extend_from_slice(MAGIC);
    put_u32(&mut h, VERSION);
    put_u32(&mut h, identity.len() as u32);
    h.extend_from_slice(identity.as_bytes());
    put_u64(&mut h, tokens.len() as u64);
    for &t in tokens {
        put_u32(&mut h, t);
    }
    put_u32(&mut h, st.layers.len() as u32);
    for l in &st.layers {
        let kind = l.kind();
        h.push(kind.len() as u8);
        h.extend_from_slice(kind.as_bytes());
        let bufs = l.buffers();
        h.push(bufs.len() as u8);
        for b in bufs {
            put_u64(&mut h, b.len() as u64);
        }
    }
    let crc = crc32fast::hash(&h);
    put_u32(&mut h, crc);
    h
}

/// Writes `st`, the state after `tokens`, in the cache file format.
pub fn write_state(w: &mut impl Write, identity: &str, tokens: &[u32], st: &State) -> Result<()> {
    if st.poisoned {
        bail!("an incomplete sequence state cannot be saved");
    }
    if st.device.is_some() {
        bail!("a sequence state held on an accelerator cannot be saved (yet)");
    }
    if st.pos != tokens.len() {
        bail!("the state holds {} tokens, not the {} given", st.pos, tokens.len());
    }
    w.write_all(&header(identity, tokens, st))?;
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = vec![];
    for l in &st.layers {
        for b in l.buffers() {
            for from in (0..b.len()).step_by(1 << 16) {
                bytes.clear();
                b.le_bytes(from, b.len().min(from + (1 << 16)), &mut bytes);
                crc.update(&bytes);
                w.write_all(&bytes)?;
            }
        }
    }
    w.write_all(&crc.finalize().to_le_bytes())?;
    Ok(())
}

/// What a file's header says.
#[derive(Clone, Debug)]
pub struct Header {
    pub identity: String,
    pub tokens: Vec<u32>,
    /// Each layer's state kind and buffer lengths (values: 2 bytes each in a 16-bit KV cache,
    /// `kv-bf16` or `kv-f16`, else 4).
    pub layers: Vec<(String, SmallVec<[u64; 4]>)>,
    /// Bytes of the header, its CRC included.
    pub bytes: u64,
}

/// A reader that keeps a CRC and a count of what it read.
struct Tracked<R> {
    r: R,
    crc: crc32fast::Hasher,
    n: u64,
}

impl<R: Read> Tracked<R> {
    fn bytes(&mut self, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut b = vec![0; len];
        self.r.read_exact(&mut b).with_context(|| format!("truncated ({what})"))?;
        self.crc.update(&b);
        self.n += len as u64;
        Ok(b)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.bytes(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8, what)?.try_into().unwrap()))
    }
}

/// Reads and checks a file's header (magic, version, CRC, sane lengths).
pub fn read_header(r: &mut impl Read) -> Result<Header> {
    let mut t = Tracked { r, crc: crc32fast::Hasher::new(), n: 0 };
    if t.bytes(8, "magic")? != MAGIC {
        bail!("not a flashmoe prompt-cache file");
    }
    let version = t.u32("version")?;
    if version != VERSION {
        bail!("format version {version}, this flashmoe reads version {VERSION}");
    }
    let n = t.u32("identity")? as usize;
    if n > 4096 {
        bail!("corrupt header (identity of {n} bytes)");
    }
    let identity = String::from_utf8(t.bytes(n, "identity")?).context("corrupt header (identity)")?;
    let n = t.u64("token count")?;
    if n == 0 || n > 1 << 26 {
        bail!("corrupt header ({n} tokens)");
    }
    let raw = t.bytes(n as usize * 4, "tokens")?;
    let tokens = raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let n = t.u32("layer count")?;
    if n > 1 << 16 {
        bail!("corrupt header ({n} layers)");
    }
    let mut layers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let k = t.u8("layer kind")? as usize;
        let kind = String::from_utf8(t.bytes(k, "layer kind")?).context("corrupt header (layer kind)")?;
        let nb = t.u8("buffer count")?;
        let lens = (0..nb).map(|_| t.u64("buffer length")).collect::<Result<_>>()?;
        layers.push((kind, lens));
    }
    let want = t.crc.clone().finalize();
    let mut c = [0u8; 4];
    t.r.read_exact(&mut c).context("truncated (header checksum)")?;
    if u32::from_le_bytes(c) != want {
        bail!("corrupt header (checksum mismatch)");
    }
    Ok(Header { identity, tokens, layers, bytes: t.n + 4 })
}

/// Reads the state in `path` for `model` (of `identity`), checking everything: the format, the
/// identity, the file's size, each layer's kind and shape, both checksums. Returns its tokens.
pub fn read_state(path: &Path, model: &Model, identity: &str) -> Result<(Vec<u32>, State)> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let h = read_header(&mut r)?;
    // another KV cache type is named as such (its identity differs too)
    let run = model.opts.kv_cache;
    if let Some(t) = h.layers.iter().find_map(|(k, _)| crate::model::kv_kind_type(k)).filter(|&t| t != run) {
        bail!(
            "{}: holds a KV cache of type {t}, this run's is {run} (--kv-cache {t} reads it; entries of one type never \
             serve another)",
            path.display()
        );
    }
    if h.identity != identity {
        bail!("made by another model or with other options ({}; this is {identity})", h.identity);
    }
    let n = h.tokens.len();
    if h.layers.len() != model.layers.len() {
        bail!("{} layers, the model has {}", h.layers.len(), model.layers.len());
    }
    let mut st = model.new_state();
    for (i, ((kind, lens), layer)) in h.layers.iter().zip(&model.layers).enumerate() {
        let (want_kind, want) = layer.state_shape(n, run);
        if kind != want_kind || lens.len() != want.len() || lens.iter().zip(&want).any(|(a, b)| *a != *b as u64) {
            bail!(
                "layer {i}: a {kind} state of lengths {lens:?}, the model's is {want_kind} {want:?} after {n} tokens"
            );
        }
    }
    let data: u64 = st
        .layers
        .iter()
        .zip(&h.layers)
        .flat_map(|(l, (_, lens))| l.buffers().into_iter().zip(lens).map(|(b, n)| n * b.value_bytes() as u64))
        .sum();
    if size != h.bytes + data + 4 {
        bail!("{} bytes, the header says {} (truncated or corrupt)", size, h.bytes + data + 4);
    }
    let mut crc = crc32fast::Hasher::new();
    for (l, (_, lens)) in st.layers.iter_mut().zip(&h.layers) {
        for (mut b, &len) in l.buffers_mut().into_iter().zip(lens) {
            let bytes = b.zeroed_bytes(len as usize);
            r.read_exact(bytes).context("truncated (state data)")?;
            crc.update(bytes);
            b.from_le();
        }
    }
    let mut c = [0u8; 4];
    r.read_exact(&mut c).context("truncated (data checksum)")?;
    if u32::from_le_bytes(c) != crc.finalize() {
        bail!("corrupt state data (checksum mismatch)");
    }
    st.pos = n;
    Ok((h.tokens, st))
}

// ---- the store ----

/// A model's prompt cache directory.
pub struct PromptCache {
    dir: PathBuf,
    identity: String,
    limit: u64,
    /// Tokens of the entries seen, by file name.
    index: HashMap<String, Vec<u32>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// A temporary file of this process.
fn tmp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{TMP_PREFIX}{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Entry files in `dir`: (name, bytes, last use).
fn entries(dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let Ok(rd) = fs::read_dir(dir) else { return vec![] };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') || !name.ends_with(&format!(".{EXT}")) {
                return None;
            }
            let md = e.metadata().ok().filter(|m| m.is_file())?;
            Some((name, md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        })
        .collect()
}

/// Removes the least recently used entries of `dir` until they take at most `limit` bytes
/// (`keep` stays).
fn evict(dir: &Path, limit: u64, keep: &str) {
    let mut all = entries(dir);
    let mut total: u64 = all.iter().map(|e| e.1).sum();
    all.sort_by_key(|e| e.2);
    for (name, bytes, _) in all {
        if total <= limit {
            break;
        }
        if name != keep {
            // another process may have removed it first
            let _ = fs::remove_file(dir.join(&name));
            total -= bytes;
        }
    }
}

impl PromptCache {
    /// The cache in `dir` (created if missing) for states of `identity` ([`model_identity`]),
    /// holding at most `limit` bytes.
    pub fn open(dir: PathBuf, identity: String, limit: u64) -> Result<PromptCache> {
        fs::create_dir_all(&dir).with_context(|| format!("cannot create the prompt cache {}", dir.display()))?;
        // temporary files a killed process left (an hour old: never one being written)
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let stale = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                    && stale.is_some_and(|s| s > Duration::from_secs(3600))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(PromptCache { dir, identity, limit, index: HashMap::new(), writer: None })
    }

    /// The cache of the model loaded from `model_dir`: in `dir`, or the default directory
    /// ([`default_dir`]); at most `limit` bytes, or [`default_limit`].
    pub fn for_model(model_dir: &Path, model: &Model, dir: Option<PathBuf>, limit: Option<u64>) -> Result<PromptCache> {
        if model.accel.is_some() {
            bail!("the prompt cache does not yet save states held on an accelerator (use --device cpu)");
        }
        let identity = model_identity(model_dir, model);
        let dir = dir.unwrap_or_else(|| default_dir(&identity));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create the prompt cache {}", dir.display()))?;
        let limit = limit.unwrap_or_else(|| default_limit(&dir));
        PromptCache::open(dir, identity, limit)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Brings the index up to the directory: reads the headers of new entries (removing those
    /// that fail), forgets removed ones.
    fn refresh(&mut self) {
        let names: Vec<String> = entries(&self.dir).into_iter().map(|e| e.0).collect();
        self.index.retain(|n, _| names.contains(n));
        for name in names {
            if self.index.contains_key(&name) {
                continue;
            }
            let path = self.dir.join(&name);
            let h = File::open(&path).map_err(anyhow::Error::from).and_then(|f| read_header(&mut BufReader::new(f)));
            match h {
                Ok(h) if h.identity == self.identity => {
                    self.index.insert(name, h.tokens);
                }
                Ok(h) => self.reject(&name, anyhow::anyhow!("made by another model ({})", h.identity)),
                Err(e)
                    if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {
                }
                Err(e) => self.reject(&name, e),
            }
        }
    }

    /// Removes an entry that failed a check, saying why.
    fn reject(&mut self, name: &str, e: anyhow::Error) {
        eprintln!("note: prompt cache entry {} ignored and removed: {e:#}", self.dir.join(name).display());
        let _ = fs::remove_file(self.dir.join(name));
        self.index.remove(name);
    }

    /// The entry that serves the longest prefix of `prompt` (never all of it: its last token
    /// gives the logits), when longer than `at_least`: its name and the tokens it serves. With
    /// `truncatable` states a longer entry serves any prefix of its own tokens.
    pub fn lookup(&mut self, prompt: &[u32], truncatable: bool, at_least: usize) -> Option<(String, usize)> {
        self.refresh();
        let max = prompt.len().checked_sub(1)?;
        self.index
            .iter()
            .filter_map(|(name, t)| {
                let c = t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                let usable = if c == t.len() && c <= max {
                    c
                } else if truncatable {
                    c.min(max)
                } else {
                    0
                };
                Some((usable, std::cmp::Reverse(t.len()), name)).filter(|e| e.0 > at_least)
            })
            .max()
            .map(|(n, _, name)| (name.clone(), n))
    }

    /// The state after the first `len` tokens of entry `name` (a longer entry cut when its
    /// states allow). An entry that fails a check is removed, and the error names its file.
    pub fn load(&mut self, model: &Model, name: &str, len: usize) -> Result<State> {
        let path = self.dir.join(name);
        let r = read_state(&path, model, &self.identity).and_then(|(tokens, mut st)| {
            if len > tokens.len() || !st.layers.iter_mut().all(|l| l.truncate(tokens.len(), len)) {
                bail!("holds {} tokens and cannot be cut to {len}", tokens.len());
            }
            st.pos = len;
            Ok(st)
        });
        match r {
            Ok(st) => {
                touch(&path);
                Ok(st)
            }
            Err(e) => {
                let e = e.context(format!("prompt cache entry {}", path.display()));
                let not_found =
                    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound);
                if !not_found {
                    let _ = fs::remove_file(&path);
                }
                self.index.remove(name);
                Err(e)
            }
        }
    }

    /// Whether an entry for exactly `tokens` exists (and, if so, marks it used).
    pub fn contains(&mut self, tokens: &[u32]) -> bool {
        let name = entry_name(tokens);
        let path = self.dir.join(&name);
        if self.index.get(&name).is_some_and(|t| t == tokens) && path.exists() {
            touch(&path);
            return true;
        }
        false
    }

    /// Saves `st`, the state after `tokens`, in the background (a copy is taken now); one that
    /// is there already is only marked used. With `truncatable` states the entries it
    /// supersedes (those of a prefix of `tokens`) are removed once it is written.
    pub fn save(&mut self, tokens: &[u32], st: &State, truncatable: bool) -> Result<()> {
        if tokens.is_empty() || self.contains(tokens) {
            return Ok(());
        }
        if st.device.is_some() || st.poisoned {
            bail!("this sequence state cannot be saved");
        }
        let bytes = file_bytes(&self.identity, tokens, st);
        if bytes > self.limit {
            return Ok(());
        }
        self.flush();
        let name = entry_name(tokens);
        let superseded: Vec<String> = match truncatable {
            true => self
                .index
                .iter()
                .filter(|(n, t)| **n != name && t.len() < tokens.len() && tokens.starts_with(t))
                .map(|(n, _)| n.clone())
                .collect(),
            false => vec![],
        };
        let (dir, identity, limit) = (self.dir.clone(), self.identity.clone(), self.limit);
        let (tokens, st) = (tokens.to_vec(), st.clone());
        self.index.insert(name.clone(), tokens.clone());
        for n in &superseded {
            self.index.remove(n);
        }
        self.writer = Some(std::thread::spawn(move || {
            let tmp = dir.join(tmp_name(&name));
            let written = File::create(&tmp).map_err(anyhow::Error::from).and_then(|f| {
                let mut w = BufWriter::with_capacity(1 << 20, f);
                write_state(&mut w, &identity, &tokens, &st)?;
                w.into_inner().map_err(|e| e.into_error())?.sync_data()?;
                fs::rename(&tmp, dir.join(&name))?;
                Ok(())
            });
            match written {
                Ok(()) => {
                    for n in superseded {
                        let _ = fs::remove_file(dir.join(n));
                    }
                    evict(&dir, limit, &name);
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    eprintln!("note: prompt cache: could not save {}: {e:#}", dir.join(&name).display());
                }
            }
        }));
        Ok(())
    }

    /// Waits for the entry being written, if any.
    pub fn flush(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }

    /// The entries in the directory now: (tokens held, bytes).
    pub fn list(&mut self) -> Vec<(Vec<u32>, u64)> {
        self.flush();
        self.refresh();
        let sizes: HashMap<String, u64> = entries(&self.dir).into_iter().map(|e| (e.0, e.1)).collect();
        let mut v: Vec<_> = self.index.iter().map(|(n, t)| (t.clone(), sizes.get(n).copied().unwrap_or(0))).collect();
        v.sort();
        v
    }
}

impl Drop for PromptCache {
    fn drop(&mut self) {
        self.flush();
    }
}
