//! GGUF files (llama.cpp's format) as a [`Source`]: the header, the metadata key-values, the
//! tensor infos and the data section of one file or of every shard of a split set
//! (`NAME-00001-of-00003.gguf`), memory-mapped. Tensors are presented under the canonical
//! names the family's [`crate::families::Names`] table spells ([`arch`]), with their logical
//! shape (GGUF's `ne` reversed: `ne[0]` is the fastest-varying, the columns), so `load`,
//! `convert` and `inspect` read a GGUF as they read a Hugging Face checkpoint. F32/F16/BF16 are
//! the engine's own kinds; ggml's block types are [`WKind::Ggml`], kept as stored.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md> (version 2 and 3; 64-bit
//! counts, little-endian).

pub mod arch;
pub mod vocab;

use crate::kernels::ggml::Ggml;
use crate::source::{Format, RowOrder, Source, Tensor};
use crate::tensor::{Mat, WKind};
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(s) = self { Some(s) } else { None }
    }
    pub fn as_bool(&self) -> Option<bool> {
        if let Value::Bool(b) = *self { Some(b) } else { None }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        if let Value::Array(a) = self { Some(a) } else { None }
    }
    /// The GGUF type's name (for messages).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// How a ggml type is stored: an engine kind, or a type refused by name.
fn storage(ty: u32) -> Option<std::result::Result<WKind, &'static str>> {
    Some(Ok(match ty {
        0 => WKind::F32,
        1 => WKind::F16,
        30 => WKind::BF16,
        // repacked into the engine's own MXFP4 (its kernels, CUDA's included); the same size
        39 => WKind::Mxfp4,
        _ => match Ggml::from_id(ty) {
            Some(t) => WKind::Ggml(t),
            None => {
                return Some(Err(match ty {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    40 => "NVFP4",
                    41 => "Q1_0",
                    42 => "Q2_0",
                    _ => return None,
                }));
            }
        },
    }))
}

/// One tensor's entry in a file's header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// `ne`: dimensions, fastest-varying first.
    pub ne: Vec<u64>,
    pub ggml_type: u32,
    /// Which shard holds it, and where its bytes start in that shard's map.
    pub shard: usize,
    pub start: usize,
    pub len: usize,
    /// Its engine kind, or the name of a type the engine does not compute.
    pub kind: std::result::Result<WKind, &'static str>,
}

impl TensorInfo {
    /// The logical shape: `ne` reversed, rows first.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
    /// ggml's name of its type.
    pub fn type_name(&self) -> String {
        match self.kind {
            Ok(WKind::F32) => "F32".into(),
            Ok(WKind::F16) => "F16".into(),
            Ok(WKind::BF16) => "BF16".into(),
            Ok(WKind::Mxfp4) => "MXFP4".into(),
            Ok(WKind::Ggml(t)) => t.name().into(),
            Ok(k) => k.name(),
            Err(n) => n.into(),
        }
    }
}

/// One file of a GGUF model, mapped.
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// A GGUF model: its metadata, and its tensors by canonical name.
pub struct Gguf {
    /// The first shard (what the user named, or shard 1 of its set).
    path: PathBuf,
    shards: Vec<Shard>,
    pub meta: BTreeMap<String, Value>,
    /// Every tensor, in file order.
    pub infos: Vec<TensorInfo>,
    /// Canonical name → index into `infos`.
    by_name: HashMap<String, usize>,
    /// How each tensor of `infos` is presented (`None`: not read).
    views: Vec<Option<arch::Mapped>>,
    /// The `config.json` value this model's family parses.
    config: serde_json::Value,
}

/// Whether `path` is a GGUF file (by its magic).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut m = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut m)).is_ok() && &m == MAGIC
}

/// A bounds-checked little-endian reader over a file's header.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    file: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        match self.at.checked_add(n).filter(|&e| e <= self.b.len()) {
            Some(end) => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => bail!(
                "{}: truncated: {} needs {n} bytes at offset {}, the file has {}",
                self.file.display(),
                what(),
                self.at,
                self.b.len()
            ),
        }
    }
    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count that must fit what is left of the file (each item takes at least `min` bytes).
    fn count(&mut self, min: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min as u64) > left {
            bail!("{}: {} says {n} items, more than the {left} bytes left could hold", self.file.display(), what());
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow!("{}: {} is not UTF-8", self.file.display(), what()))
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{}: {} is a bool of value {b}", self.file.display(), what()),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 8 {
                    bail!("{}: {} nests arrays more than 8 deep", self.file.display(), what());
                }
                let et = self.u32(what)?;
                let n = self.count(if et == 9 || et == 8 { 8 } else { 1 }, what)?;
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.value(et, &|| format!("{}[{i}]", what()), depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => bail!("{}: {} has unknown value type {t}", self.file.display(), what()),
        })
    }
}

/// One file's header: metadata, and tensor infos with absolute offsets into it.
fn parse(path: &Path, b: &[u8], shard: usize) -> Result<(BTreeMap<String, Value>, Vec<TensorInfo>)> {
    let mut r = Reader { b, at: 0, file: path };
    let magic = r.arr::<4>(&|| "the magic".into())?;
    if &magic != MAGIC {
        bail!("{}: not a GGUF file (magic {magic:02x?}, expected \"GGUF\")", path.display());
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => bail!("{}: GGUF version 1 (32-bit counts) is not supported; re-convert it with llama.cpp", path.display()),
        v if v.swap_bytes() <= 3 => {
            bail!("{}: a big-endian GGUF (version {}) is not supported", path.display(), v.swap_bytes())
        }
        v => bail!("{}: unknown GGUF version {v} (supported: 2, 3)", path.display()),
    }
    let n_tensors = r.count(24, &|| "the tensor count".into())?;
    let n_kv = r.count(12, &|| "the metadata count".into())?;
    let mut meta = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key {i}"))?;
        let ty = r.u32(&|| format!("the type of metadata `{key}`"))?;
        let v = r.value(ty, &|| format!("metadata `{key}`"), 0)?;
        if meta.insert(key.clone(), v).is_some() {
            bail!("{}: metadata key `{key}` appears twice", path.display());
        }
    }
    let align = match meta.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a % 8 == 0 => a,
            _ => bail!("{}: general.alignment is {v:?}, not a power of two of at least 8", path.display()),
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        let what = |f: &str| format!("tensor `{name}`'s {f}");
        let nd = r.u32(&|| what("dimension count"))? as usize;
        if nd == 0 || nd > 4 {
            bail!("{}: tensor `{name}` has {nd} dimensions (1 to 4 allowed)", path.display());
        }
        let ne: Vec<u64> = (0..nd).map(|_| r.u64(&|| what("dimensions"))).collect::<Result<_>>()?;
        let ty = r.u32(&|| what("type"))?;
        let off = r.u64(&|| what("offset"))?;
        raw.push((name, ne, ty, off));
    }
    let data = (r.at as u64).next_multiple_of(align);
    let mut infos = Vec::with_capacity(n_tensors);
    for (name, ne, ty, off) in raw {
        let d = path.display();
        let kind = storage(ty).ok_or_else(|| anyhow!("{d}: tensor `{name}` has unknown ggml type {ty}"))?;
        if off % align != 0 {
            bail!("{d}: tensor `{name}` starts at offset {off}, not a multiple of the alignment {align}");
        }
        let len = match kind {
            Ok(k) => {
                let block = match k {
                    WKind::Ggml(t) => Some((t.name(), t.block() as u64)),
                    WKind::Mxfp4 => Some(("MXFP4", 32)),
                    _ => None,
                };
                if let Some((t, b)) = block
                    && ne[0] % b != 0
                {
                    bail!("{d}: tensor `{name}` is {t} with rows of {}, not a multiple of its block of {b}", ne[0]);
                }
                let rows = ne[1..].iter().try_fold(1u64, |a, &x| a.checked_mul(x));
                rows.and_then(|rw| usize::try_from(rw).ok())
                    .zip(usize::try_from(ne[0]).ok())
                    .and_then(|(rw, c)| k.checked_bytes(rw, c))
                    .ok_or_else(|| anyhow!("{d}: tensor `{name}` has dimensions {ne:?} too large"))?
            }
            // refused by name when read; its extent is unknown to the engine
            Err(_) => 0,
        };
        let start = data.checked_add(off).and_then(|s| usize::try_from(s).ok());
        let start = start
            .filter(|&s| s.checked_add(len).is_some_and(|e| e <= b.len()))
            .ok_or_else(|| anyhow!("{d}: truncated: tensor `{name}` ({len} bytes at data offset {off}) lies past the end of the {}-byte file", b.len()))?;
        infos.push(TensorInfo { name, ne, ggml_type: ty, shard, start, len, kind });
    }
    Ok((meta, infos))
}

/// The files of the split set `path` belongs to (`NAME-00001-of-00003.gguf`), in order, or
/// `path` alone.
fn shard_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(stem) = name.strip_suffix(".gguf") else { return Ok(vec![path.to_path_buf()]) };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    // [count, "of", index, prefix]
    if parts.len() != 4 || parts[1] != "of" || parts[0].len() != 5 || parts[2].len() != 5 {
        return Ok(vec![path.to_path_buf()]);
    }
    let (Ok(n), Ok(_)) = (parts[0].parse::<usize>(), parts[2].parse::<usize>()) else {
        return Ok(vec![path.to_path_buf()]);
    };
    if n == 0 {
        bail!("{}: a split set of 0 files", path.display());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let all: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("{}-{i:05}-of-{n:05}.gguf", parts[3]))).collect();
    if let Some(m) = all.iter().find(|p| !p.is_file()) {
        bail!("{}: shard {} of the split set is missing", path.display(), m.display());
    }
    Ok(all)
}

impl Gguf {
    /// Opens `path` (a GGUF file, or any shard of a split set: every shard is read).
    pub fn open(path: &Path) -> Result<Gguf> {
        let paths = shard_paths(path)?;
        let mut shards = Vec::new();
        let (mut meta, mut infos) = (BTreeMap::new(), Vec::new());
        for (i, p) in paths.iter().enumerate() {
            let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            // SAFETY: read-only mapping of a file this process does not modify.
            let map = Arc::new(unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", p.display()))?);
            let (m, t) = parse(p, &map, i)?;
            if paths.len() > 1 {
                let no = m.get("split.no").and_then(Value::as_u64);
                let count = m.get("split.count").and_then(Value::as_u64);
                if no != Some(i as u64) || count != Some(paths.len() as u64) {
                    bail!(
                        "{}: split.no/split.count are {no:?}/{count:?}, expected {i}/{} for this shard",
                        p.display(),
                        paths.len()
                    );
                }
            }
            if i == 0 {
                meta = m;
            }
            infos.extend(t);
            shards.push(Shard { path: p.clone(), map });
        }
        if let Some(want) = meta.get("split.tensors.count").and_then(Value::as_u64)
            && want != infos.len() as u64
        {
            bail!("{}: split.tensors.count is {want}, the shards hold {} tensors", paths[0].display(), infos.len());
        }
        let (config, views) = arch::map(&paths[0], &meta, &infos)?;
        let mut by_name = HashMap::new();
        for (i, v) in views.iter().enumerate() {
            if let Some(v) = v
                && by_name.insert(v.name.clone(), i).is_some()
            {
                bail!("{}: tensor `{}` appears twice", paths[0].display(), infos[i].name);
            }
        }
        Ok(Gguf { path: paths[0].clone(), shards, meta, infos, by_name, views, config })
    }

    /// The `config.json` value of the model (what [`crate::config::ModelConfig::from_json`]
    /// parses).
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Metadata `key`, or an error naming it.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.meta.get(key).ok_or_else(|| anyhow!("{}: metadata `{key}` is missing", self.path.display()))
    }

    /// The files of the model.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.infos[i]).ok_or_else(|| crate::source::missing(&self.path, name))
    }
}

impl Source for Gguf {
    fn dir(&self) -> &Path {
        &self.path
    }
    fn tensors(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort();
        v
    }
    fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
    /// llama.cpp's converters store zero-centred norms (Qwen3-Next, Qwen3.5) as their multiplier.
    fn shifted_norms(&self) -> bool {
        true
    }
    fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        let (key, &i) = self.by_name.get_key_value(name).ok_or_else(|| crate::source::missing(&self.path, name))?;
        let (t, v) = (&self.infos[i], self.views[i].as_ref().expect("a named tensor is presented"));
        let sh = &self.shards[t.shard];
        let bytes = SmallVec::from_iter([&sh.map[t.start..t.start + t.len]]);
        let (format, parts) = match t.kind {
            Ok(WKind::Mxfp4) => (Format::GgmlMxfp4, bytes),
            Ok(k @ (WKind::F32 | WKind::F16 | WKind::BF16)) if v.neg_exp => (Format::NegExp(k), bytes),
            Ok(k) if v.neg_exp => (Format::Unsupported(format!("{} for −exp values", k.name())), bytes),
            Ok(k) => (Format::Native(k), bytes),
            Err(n) => (Format::Unsupported(format!("{n} (GGUF tensor `{}`)", t.name)), SmallVec::new()),
        };
        Ok(Tensor { name: key, file: &sh.path, shape: v.shape.clone(), format, parts, aux_bytes: 0, order: v.order })
    }
    /// Rows of a tensor as a view of the mapping (no copy) where they start 8-byte aligned.
    fn mat_rows(&self, name: &str, shape: &[usize], range: std::ops::Range<usize>) -> Result<Mat> {
        let t = self.tensor(name)?.expect(shape)?;
        let info = self.info(name)?;
        let (rows, cols) = t.rows_cols();
        let kind = match (info.kind, &t.format, t.order) {
            (Ok(k), Format::Native(_), RowOrder::Plain) if k != WKind::Mxfp4 => k,
            _ => return t.rows(range),
        };
        let at = info.start + range.start * kind.bytes(1, cols);
        if range.end > rows || range.start > range.end || !at.is_multiple_of(8) {
            return t.rows(range);
        }
        Mat::mapped(range.len(), cols, kind, self.shards[info.shard].map.clone(), at)
            .with_context(|| format!("{}: tensor `{}`", self.path.display(), info.name))
    }
}

/// Writes GGUF files for tests and fixtures: metadata and tensors as given.
pub mod write {
    use super::Value;

    fn put_str(o: &mut Vec<u8>, s: &str) {
        o.extend((s.len() as u64).to_le_bytes());
        o.extend(s.as_bytes());
    }

    fn type_of(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(o: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => o.push(*x),
            Value::I8(x) => o.push(*x as u8),
            Value::U16(x) => o.extend(x.to_le_bytes()),
            Value::I16(x) => o.extend(x.to_le_bytes()),
            Value::U32(x) => o.extend(x.to_le_bytes()),
            Value::I32(x) => o.extend(x.to_le_bytes()),
            Value::U64(x) => o.extend(x.to_le_bytes()),
            Value::I64(x) => o.extend(x.to_le_bytes()),
            Value::F32(x) => o.extend(x.to_le_bytes()),
            Value::F64(x) => o.extend(x.to_le_bytes()),
            Value::Bool(x) => o.push(*x as u8),
            Value::Str(s) => put_str(o, s),
            Value::Array(a) => {
                o.extend(a.first().map_or(4, type_of).to_le_bytes());
                o.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| put_value(o, x));
            }
        }
    }

    /// A version-3 GGUF of `meta` and `tensors` (name, `ne`, ggml type, bytes), aligned to 32.
    pub fn gguf(meta: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut o = b"GGUF".to_vec();
        o.extend(3u32.to_le_bytes());
        o.extend((tensors.len() as u64).to_le_bytes());
        o.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_str(&mut o, k);
            o.extend(type_of(v).to_le_bytes());
            put_value(&mut o, v);
        }
        let mut off = 0u64;
        for (name, ne, ty, data) in tensors {
            put_str(&mut o, name);
            o.extend((ne.len() as u32).to_le_bytes());
            ne.iter().for_each(|d| o.extend(d.to_le_bytes()));
            o.extend(ty.to_le_bytes());
            o.extend(off.to_le_bytes());
            off = (off + data.len() as u64).next_multiple_of(32);
        }
        o.resize(o.len().next_multiple_of(32), 0);
        for (_, _, _, data) in tensors {
            o.extend(data);
            o.resize(o.len().next_multiple_of(32), 0);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::write::gguf;
    use super::*;

    /// The metadata of a one-layer qwen3moe of hidden 32, 2 experts.
    fn meta(extra: &[(&'static str, Value)]) -> Vec<(&'static str, Value)> {
        let mut m = vec![
            ("general.architecture", Value::Str("qwen3moe".into())),
            ("general.alignment", Value::U32(32)),
            ("qwen3moe.block_count", Value::U32(1)),
            ("qwen3moe.embedding_length", Value::U32(32)),
            ("qwen3moe.attention.head_count", Value::U32(2)),
            ("qwen3moe.attention.head_count_kv", Value::Array(vec![Value::I32(1)])),
            ("qwen3moe.attention.key_length", Value::U32(16)),
            ("qwen3moe.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("qwen3moe.rope.freq_base", Value::F32(1e6)),
            ("qwen3moe.expert_count", Value::U32(2)),
            ("qwen3moe.expert_used_count", Value::U32(1)),
            ("qwen3moe.expert_feed_forward_length", Value::U64(32)),
            ("tokenizer.ggml.eos_token_id", Value::U32(3)),
            ("nested", Value::Array(vec![Value::Array(vec![Value::Bool(true)]), Value::Array(vec![])])),
        ];
        m.extend(extra.iter().cloned());
        m
    }

    /// `ne` of every tensor of that model, F32 except the experts (Q8_0).
    fn tensors() -> Vec<(&'static str, Vec<u64>, u32, Vec<u8>)> {
        let f32s = |ne: Vec<u64>| {
            let n: u64 = ne.iter().product();
            let data: Vec<u8> = (0..n).flat_map(|i| (i as f32 / 64.0).to_le_bytes()).collect();
            (ne, 0u32, data)
        };
        let q8 = |ne: Vec<u64>| {
            let rows: u64 = ne[1..].iter().product();
            (ne, 8u32, crate::kernels::ggml::tests::random_row(Ggml::Q8_0, rows as usize, 5))
        };
        let mut v = Vec::new();
        for (n, (ne, ty, d)) in [
            ("token_embd.weight", f32s(vec![32, 8])),
            ("output_norm.weight", f32s(vec![32])),
            ("blk.0.attn_norm.weight", f32s(vec![32])),
            ("blk.0.ffn_norm.weight", f32s(vec![32])),
            ("blk.0.attn_q.weight", f32s(vec![32, 32])),
            ("blk.0.attn_k.weight", f32s(vec![32, 16])),
            ("blk.0.attn_v.weight", f32s(vec![32, 16])),
            ("blk.0.attn_output.weight", f32s(vec![32, 32])),
            ("blk.0.attn_q_norm.weight", f32s(vec![16])),
            ("blk.0.attn_k_norm.weight", f32s(vec![16])),
            ("blk.0.ffn_gate_inp.weight", f32s(vec![32, 2])),
            ("blk.0.ffn_gate_exps.weight", q8(vec![32, 32, 2])),
            ("blk.0.ffn_up_exps.weight", q8(vec![32, 32, 2])),
            ("blk.0.ffn_down_exps.weight", q8(vec![32, 32, 2])),
        ] {
            v.push((n, ne, ty, d));
        }
        v
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err(p: &Path) -> String {
        format!("{:#}", Gguf::open(p).err().expect("an error"))
    }

    #[test]
    fn a_written_gguf_reads_back_under_canonical_names_and_builds_a_model() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "m.gguf", &gguf(&meta(&[]), &tensors()));
        assert!(is_gguf(&p) && !is_gguf(d.path()));
        let g = Gguf::open(&p).unwrap();
        assert_eq!(
            g.get("nested").unwrap(),
            &Value::Array(vec![Value::Array(vec![Value::Bool(true)]), Value::Array(vec![])])
        );
        let c = g.config();
        assert_eq!(
            (c["hidden_size"].as_u64(), c["num_key_value_heads"].as_u64(), c["vocab_size"].as_u64()),
            (Some(32), Some(1), Some(8))
        );
        assert_eq!(c["tie_word_embeddings"], serde_json::json!(true));
        let t = g.tensor("model.layers.0.mlp.switch_mlp.down_proj.weight").unwrap();
        assert_eq!((t.shape.clone(), t.format.clone()), (vec![2, 32, 32], Format::Native(WKind::Ggml(Ggml::Q8_0))));
        // rows of one expert, as a view or a copy, are the same bytes
        let all = g.mat("model.layers.0.mlp.switch_mlp.down_proj.weight", &[2, 32, 32]).unwrap();
        let e1 = g.mat_rows("model.layers.0.mlp.switch_mlp.down_proj.weight", &[2, 32, 32], 32..64).unwrap();
        assert_eq!(e1.data(), &all.data()[32 * 34..]);
        let emb = g.mat("model.embed_tokens.weight", &[8, 32]).unwrap().to_f32();
        assert_eq!((emb[1], emb[32]), (1.0 / 64.0, 0.5));
        let cfg = crate::config::ModelConfig::load(&p).unwrap();
        assert_eq!((cfg.num_experts, cfg.eos_token_ids.clone()), (2, vec![3]));
        let m = crate::load::load_model(&p).unwrap();
        let logits = m.forward(&mut m.new_state(), &[1, 2, 3], true).unwrap();
        assert!(logits.len() == 24 && logits.iter().all(|v| v.is_finite()));
    }

    /// ggml's MXFP4 blocks become the engine's MXFP4 rows holding the same values (ggml's own
    /// decoder, tested against gguf-py's, is the reference), any row range; a tensor of the
    /// wrong size is refused naming it.
    #[test]
    fn ggml_mxfp4_rows_repack_into_the_engines_mxfp4_with_the_same_values() {
        let (rows, cols) = (5, 96);
        let data = crate::kernels::ggml::tests::random_row(Ggml::MXFP4, rows * cols / 32, 7);
        let p = Path::new("x.gguf");
        let t = Tensor {
            name: "e",
            file: p,
            shape: vec![rows, cols],
            format: Format::GgmlMxfp4,
            parts: SmallVec::from_iter([&data[..]]),
            aux_bytes: 0,
            order: RowOrder::Plain,
        };
        let row_bytes = cols / 32 * 17;
        for range in [0..rows, 1..4, 4..5, 2..2] {
            let m = t.rows(range.clone()).unwrap();
            assert_eq!((m.kind, m.rows, m.cols), (WKind::Mxfp4, range.len(), cols));
            let mut want = vec![0f32; range.len() * cols];
            for (i, r) in range.clone().enumerate() {
                let row = &data[r * row_bytes..(r + 1) * row_bytes];
                crate::kernels::ggml::decode_row(Ggml::MXFP4, row, &mut want[i * cols..(i + 1) * cols]);
                let x: Vec<f32> = (0..cols).map(|j| ((j * 37 % 11) as f32 - 5.0) / 3.0).collect();
                let y = &mut [0f32];
                m.slice_rows(i, i + 1).matvec(&x, y, crate::tensor::Precision::Exact);
                let d = crate::kernels::ggml::dot_scalar(Ggml::MXFP4, row, &x);
                assert!((y[0] - d).abs() <= 1e-4 * (1.0 + d.abs()), "row {r}: {} vs {d}", y[0]);
            }
            assert_eq!(m.to_f32(), want, "{range:?}");
        }
        let short = Tensor { parts: SmallVec::from_iter([&data[1..]]), ..t.clone() };
        let e = format!("{:#}", short.rows(0..1).unwrap_err());
        assert!(e.contains("MXFP4 tensor `e`") && e.contains("x.gguf"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let good = gguf(&meta(&[]), &tensors());
        // truncated anywhere: an error, never a panic
        for cut in [3, 10, 30, 200, 700, good.len() / 2, good.len() - 1] {
            let p = write(d.path(), "t.gguf", &good[..cut]);
            let e = err(&p);
            assert!(e.contains("t.gguf") && (e.contains("truncated") || e.contains("more than")), "{cut}: {e}");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(err(&write(d.path(), "m.gguf", &bad)).contains("not a GGUF file"));
        for (v, want) in [(1u32, "version 1"), (99, "unknown GGUF version 99"), (3u32.swap_bytes(), "big-endian")] {
            let mut b = good.clone();
            b[4..8].copy_from_slice(&v.to_le_bytes());
            let e = err(&write(d.path(), "m.gguf", &b));
            assert!(e.contains(want), "{e}");
        }
        // an unknown ggml type, and one refused by name when read
        let mut t = tensors();
        t[4].2 = 99;
        assert!(
            err(&write(d.path(), "m.gguf", &gguf(&meta(&[]), &t)))
                .contains("tensor `blk.0.attn_q.weight` has unknown ggml type 99")
        );
        t[4].2 = 16;
        let g = Gguf::open(&write(d.path(), "m.gguf", &gguf(&meta(&[]), &t))).unwrap();
        let e = format!("{:#}", g.mat("model.layers.0.self_attn.q_proj.weight", &[32, 32]).unwrap_err());
        assert!(e.contains("IQ2_XXS") && e.contains("blk.0.attn_q.weight"), "{e}");
        // a block type whose rows are not whole blocks
        let mut t = tensors();
        t[11].1 = vec![16, 64, 2];
        assert!(err(&write(d.path(), "m.gguf", &gguf(&meta(&[]), &t))).contains("not a multiple of its block of 32"));
        // missing or mistyped metadata, an unsupported architecture
        let m: Vec<_> = meta(&[]).into_iter().filter(|(k, _)| *k != "qwen3moe.expert_count").collect();
        assert!(
            err(&write(d.path(), "m.gguf", &gguf(&m, &tensors())))
                .contains("metadata `qwen3moe.expert_count` is missing")
        );
        let m = meta(&[("qwen3moe.block_count", Value::Str("two".into()))]);
        let m: Vec<_> = m.into_iter().rev().collect();
        assert!(err(&write(d.path(), "m.gguf", &gguf(&m, &tensors()))).contains("appears twice"));
        let mut m = meta(&[]);
        m[0].1 = Value::Str("mamba".into());
        assert!(
            err(&write(d.path(), "m.gguf", &gguf(&m, &tensors()))).contains("architecture `mamba` is not supported")
        );
        let mut m = meta(&[]);
        m[2].1 = Value::F32(1.5);
        assert!(err(&write(d.path(), "m.gguf", &gguf(&m, &tensors()))).contains("`qwen3moe.block_count` is float32"));
        let mut m = meta(&[]);
        m[1].1 = Value::U32(12);
        assert!(err(&write(d.path(), "m.gguf", &gguf(&m, &tensors()))).contains("general.alignment"));
    }

    #[test]
    fn a_split_set_reads_every_shard_from_any_of_them() {
        let d = tempfile::tempdir().unwrap();
        let (t, split) = (tensors(), |no: u16| {
            vec![("split.no", Value::U16(no)), ("split.count", Value::U16(2)), ("split.tensors.count", Value::I32(14))]
        });
        let first = gguf(&meta(&split(0)), &t[..5]);
        let second = gguf(&split(1), &t[5..]);
        let a = write(d.path(), "m-00001-of-00002.gguf", &first);
        let b = write(d.path(), "m-00002-of-00002.gguf", &second);
        for p in [&a, &b] {
            let g = Gguf::open(p).unwrap();
            assert_eq!(g.files().count(), 2);
            assert!(g.has("model.embed_tokens.weight") && g.has("model.layers.0.mlp.switch_mlp.up_proj.weight"));
        }
        crate::load::load_model(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
        assert!(err(&a).contains("m-00002-of-00002.gguf"));
        write(d.path(), "m-00002-of-00002.gguf", &gguf(&split(0), &t[5..]));
        assert!(err(&a).contains("split.no"));
    }
}
