//! Hugging Face checkpoints as a [`Source`]: one or many `*.safetensors` files, memory-mapped,
//! with shape and dtype checks that name the tensor and file on failure. Quantized releases
//! are presented as one tensor under their logical name, their parts checked against each
//! other here and decoded by [`Tensor::rows`]: FP8 block-scaled weights (with their
//! `weight_scale_inv`), compressed-tensors `pack-quantized` integer weights (Kimi-K2.5's int4
//! experts, as `X.weight`) and gpt-oss's MXFP4 `X_blocks`/`X_scales` (as `X`).

use crate::source::{self, Format, RowOrder, Source, Tensor};
use crate::tensor::{Mat, WKind};
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

struct TensorEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
    /// Rows and columns of one scale block of FP8 weights (`quantization_config.weight_block_size`).
    fp8_block: [usize; 2],
    /// The compressed-tensors `pack-quantized` scheme of `quantization_config`, if any.
    packed: Option<PackedInt>,
    /// The tensors it yields as a [`Source`], by logical name.
    logical: BTreeMap<String, Stored>,
}

/// compressed-tensors' `pack-quantized` integer weights: `X.weight_packed` (int32 words, the
/// `bits`-bit values of a row one after the other from the lowest bit, each stored plus
/// 2^(bits−1) so it is unsigned), `X.weight_scale` (one per `group` inputs of a row) and
/// `X.weight_shape` (the logical shape). Symmetric: w = (u − 2^(bits−1))·scale, which flashmoe's
/// affine groups hold exactly as q = u, scale, bias = −2^(bits−1)·scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedInt {
    pub bits: u8,
    pub group: usize,
}

impl Checkpoint {
    /// Opens every safetensors file of `dir` (those named by `model.safetensors.index.json`
    /// when present) and reads their headers.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: field `weight_map` is missing", index.display()))?;
            let set: BTreeSet<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            set.into_iter().collect()
        } else {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read model directory {}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            v
        };
        if names.is_empty() {
            bail!("{}: no *.safetensors files found", dir.display());
        }
        let qcfg = quantization_config(dir);
        let fp8_block = fp8_block_size(dir, qcfg.as_ref())?;
        let packed = match &qcfg {
            Some(q) => packed_int(&dir.join("config.json"), q)?,
            None => None,
        };
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            files: vec![],
            tensors: HashMap::new(),
            fp8_block,
            packed,
            logical: BTreeMap::new(),
        };
        for name in names {
            let path = dir.join(&name);
            let file = File::open(&path).with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the mapping is read-only; a file truncated underneath us is a user error that
            // the header check below catches at load for the common (already truncated) case.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow!("{}: corrupt or truncated safetensors header: {e}", path.display()))?;
            let base = 8 + header_len;
            let fi = ck.files.len();
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                if end > map.len() {
                    bail!(
                        "{}: file is truncated: tensor `{tname}` needs bytes up to {end}, the file has {}",
                        path.display(),
                        map.len()
                    );
                }
                ck.tensors.insert(
                    tname.clone(),
                    TensorEntry { file: fi, dtype: info.dtype, shape: info.shape.clone(), start, end },
                );
            }
            ck.files.push((path, map));
        }
        // the tensors by logical name: a packed weight's parts as `X.weight`, MXFP4 blocks and
        // scales as `X`, an FP8 weight's scales with it
        let logical: Vec<(String, Stored)> = ck
            .tensors
            .keys()
            .filter_map(|name| {
                if let Some(base) = name.strip_suffix(".weight_packed") {
                    Some((format!("{base}.weight"), Stored::Packed))
                } else if let Some(base) =
                    name.strip_suffix("_blocks").filter(|b| ck.tensors.contains_key(&format!("{b}_scales")))
                {
                    Some((base.to_string(), Stored::Mxfp4))
                } else {
                    (!ck.is_part(name)).then(|| (name.clone(), Stored::Plain))
                }
            })
            .collect();
        ck.logical.extend(logical);
        Ok(ck)
    }

    /// Whether stored tensor `name` is read as part of another: an FP8 weight's scales, a
    /// packed weight's scales and shape, MXFP4 scales.
    fn is_part(&self, name: &str) -> bool {
        self.is_fp8_scale(name)
            || self.is_packed_part(name)
            || name.strip_suffix("_scales").is_some_and(|b| self.tensors.contains_key(&format!("{b}_blocks")))
    }

    /// Whether tensor `name` is in the checkpoint, stored or by its logical name.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.logical.contains_key(name)
    }

    /// Whether `name` is stored part of a packed weight (`X.weight_packed`, `X.weight_scale`,
    /// `X.weight_shape`: read together as `X.weight`, never alone).
    pub fn is_packed_part(&self, name: &str) -> bool {
        ["_packed", "_scale", "_shape"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .any(|w| self.tensors.contains_key(&format!("{w}_packed")))
    }

    /// Names of all tensors as stored (sorted).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| source::missing(&self.dir, name))
    }

    /// Shape of tensor `name` as stored, or of a logical tensor (a packed weight: as its
    /// `weight_shape` states).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self.tensors.get(name) {
            Some(e) => Ok(e.shape.clone()),
            None => Source::shape(self, name),
        }
    }

    /// Tensor `name` with exactly `shape` ([`Source::mat`]).
    pub fn mat(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        Source::mat(self, name, shape)
    }

    /// The file holding stored tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|e| self.files[e.file].0.as_path())
    }

    /// Raw bytes, dtype and shape of stored tensor `name` (no conversion).
    pub fn raw(&self, name: &str) -> Result<(&[u8], StDtype, &[usize])> {
        let e = self.entry(name)?;
        Ok((&self.files[e.file].1[e.start..e.end], e.dtype, &e.shape))
    }

    /// Whether `name` is the block scales of an FP8 weight (read with the weight, never alone).
    pub fn is_fp8_scale(&self, name: &str) -> bool {
        name.strip_suffix("_scale_inv").and_then(|w| self.tensors.get(w)).is_some_and(|w| w.dtype == StDtype::F8_E4M3)
    }

    /// A stored tensor: floats as they are, FP8 with its block scales.
    fn plain(&self, name: &str) -> Result<Tensor<'_>> {
        let (key, e) = self.tensors.get_key_value(name).ok_or_else(|| source::missing(&self.dir, name))?;
        let file = self.files[e.file].0.as_path();
        let bytes = &self.files[e.file].1[e.start..e.end];
        let t = |format, parts| Tensor {
            name: key,
            file,
            shape: e.shape.clone(),
            format,
            parts,
            aux_bytes: 0,
            order: RowOrder::Plain,
        };
        Ok(match float_kind(e.dtype) {
            Some(kind) => t(Format::Native(kind), SmallVec::from_iter([bytes])),
            None if e.dtype == StDtype::F8_E4M3 => {
                let f = file.display();
                let sname = format!("{name}_scale_inv");
                if e.shape.len() < 2 {
                    bail!("{f}: FP8 tensor `{name}` must have at least 2 dimensions, has shape {:?}", e.shape);
                }
                let (r, c) = (e.shape[e.shape.len() - 2], e.shape[e.shape.len() - 1]);
                let mats: usize = e.shape[..e.shape.len() - 2].iter().product();
                if bytes.len() != mats * r * c {
                    bail!("{f}: tensor `{name}` holds {} bytes, its shape needs {}", bytes.len(), mats * r * c);
                }
                let [br, bc] = self.fp8_block;
                let (sr, sc) = (r.div_ceil(br), c.div_ceil(bc));
                let mut want = e.shape[..e.shape.len() - 2].to_vec();
                want.extend([sr, sc]);
                let s = match self.tensors.get(&sname) {
                    Some(s) if s.shape == want || (mats == 1 && s.shape == [sr, sc]) => s,
                    Some(s) => bail!(
                        "{f}: `{sname}` has shape {:?}; FP8 `{name}` {:?} in blocks of {br}x{bc} needs {want:?}",
                        s.shape,
                        e.shape
                    ),
                    None => bail!("{f}: FP8 tensor `{name}` has no `{sname}` beside it"),
                };
                let Some(scale) = float_kind(s.dtype) else {
                    bail!("{f}: `{sname}` has dtype {:?}, expected F32 or BF16", s.dtype)
                };
                let sb = &self.files[s.file].1[s.start..s.end];
                if sb.len() != mats * sr * sc * scale.size() {
                    bail!("{f}: `{sname}` holds {} bytes, its shape needs {}", sb.len(), mats * sr * sc * scale.size());
                }
                t(Format::Fp8 { block: [br, bc], scale }, SmallVec::from_iter([bytes, sb]))
            }
            None => t(Format::Unsupported(format!("{:?}", e.dtype)), SmallVec::from_iter([bytes])),
        })
    }

    /// The compressed-tensors packed weight `{base}.weight`, of the logical shape its
    /// `weight_shape` states, its parts checked against each other.
    fn packed_tensor<'a>(&'a self, key: &'a str, base: &str) -> Result<Tensor<'a>> {
        let (pn, sn, hn) =
            (format!("{base}.weight_packed"), format!("{base}.weight_scale"), format!("{base}.weight_shape"));
        let p = self.entry(&pn)?;
        let file = self.files[p.file].0.as_path();
        let f = file.display();
        let Some(PackedInt { bits, group }) = self.packed else {
            bail!(
                "{f}: tensor `{pn}` is packed, but config.json has no compressed-tensors `pack-quantized` \
                 quantization_config"
            );
        };
        for extra in ["weight_zero_point", "weight_g_idx"] {
            if self.tensors.contains_key(&format!("{base}.{extra}")) {
                bail!(
                    "{f}: `{base}.{extra}` is not supported (only symmetric int weights without activation \
                     reordering import exactly)"
                );
            }
        }
        if p.dtype != StDtype::I32 {
            bail!("{f}: tensor `{pn}` has dtype {:?}, packed weights are I32", p.dtype);
        }
        // the logical shape the checkpoint states
        let Some(h) = self.tensors.get(&hn) else { bail!("{f}: packed tensor `{pn}` has no `{hn}` beside it") };
        let hb = &self.files[h.file].1[h.start..h.end];
        let stated: Vec<i64> = match h.dtype {
            StDtype::I32 => hb.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            StDtype::I64 => hb.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            d => bail!("{f}: `{hn}` has dtype {d:?}, expected I32 or I64"),
        };
        if stated.len() < 2 || stated.iter().any(|&x| x <= 0 || x > u32::MAX as i64) {
            bail!("{f}: `{hn}` says the weight is {stated:?}, not a matrix shape");
        }
        let shape: Vec<usize> = stated.iter().map(|&x| x as usize).collect();
        let cols = shape[shape.len() - 1];
        let rows: usize = shape[..shape.len() - 1].iter().product();
        if !cols.is_multiple_of(group) {
            bail!("{f}: packed weight `{pn}` has {cols} inputs, not a multiple of its group size {group}");
        }
        let words = (cols * bits as usize).div_ceil(32);
        let mut want = shape[..shape.len() - 1].to_vec();
        want.push(words);
        if p.shape != want || p.end - p.start != rows * words * 4 {
            bail!(
                "{f}: tensor `{pn}` has shape {:?}; {bits}-bit packing of {shape:?} (as `{hn}` states) needs {want:?}",
                p.shape
            );
        }
        let Some(s) = self.tensors.get(&sn) else { bail!("{f}: packed tensor `{pn}` has no `{sn}` beside it") };
        let ng = cols / group;
        let mut swant = shape[..shape.len() - 1].to_vec();
        swant.push(ng);
        let Some(scale) = float_kind(s.dtype) else {
            bail!("{f}: `{sn}` has dtype {:?}; scales of packed weights are BF16, F16 or F32", s.dtype)
        };
        if s.shape != swant || s.end - s.start != rows * ng * scale.size() {
            bail!("{f}: `{sn}` has shape {:?}; `{pn}` {shape:?} in groups of {group} needs {swant:?}", s.shape);
        }
        let parts = SmallVec::from_iter([&self.files[p.file].1[p.start..p.end], &self.files[s.file].1[s.start..s.end]]);
        Ok(Tensor {
            name: key,
            file,
            shape,
            format: Format::PackedInt { bits, group, scale },
            parts,
            aux_bytes: h.end - h.start,
            order: RowOrder::Plain,
        })
    }

    /// gpt-oss's MXFP4 tensor `{base}`: `{base}_blocks` `[.., rows, cols/32, 16]` (two e2m1
    /// values a byte, the low nibble first) and `{base}_scales` `[.., rows, cols/32]` (e8m0).
    fn mxfp4_tensor<'a>(&'a self, key: &'a str) -> Result<Tensor<'a>> {
        let (bn, sn) = (format!("{key}_blocks"), format!("{key}_scales"));
        let (b, s) = (self.entry(&bn)?, self.entry(&sn)?);
        let file = self.files[b.file].0.as_path();
        let f = file.display();
        let lead = &b.shape[..b.shape.len().saturating_sub(2)];
        if b.dtype != StDtype::U8 || b.shape.len() < 3 || b.shape[b.shape.len() - 1] != 16 {
            bail!("{f}: `{bn}` is {:?} {:?}; MXFP4 blocks are U8 [.., rows, cols/32, 16]", b.dtype, b.shape);
        }
        if !matches!(s.dtype, StDtype::U8 | StDtype::F8_E8M0) || s.shape != b.shape[..b.shape.len() - 1] {
            bail!(
                "{f}: `{sn}` is {:?} {:?}; the MXFP4 scales of `{bn}` are U8 {:?}",
                s.dtype,
                s.shape,
                &b.shape[..b.shape.len() - 1]
            );
        }
        let mut shape = lead.to_vec();
        shape.push(b.shape[b.shape.len() - 2] * 32);
        let parts = SmallVec::from_iter([&self.files[b.file].1[b.start..b.end], &self.files[s.file].1[s.start..s.end]]);
        Ok(Tensor {
            name: key,
            file,
            shape,
            format: Format::Native(WKind::Mxfp4),
            parts,
            aux_bytes: 0,
            order: RowOrder::Plain,
        })
    }
}

/// How a logical tensor of a checkpoint is stored.
#[derive(Clone, Copy, Debug)]
enum Stored {
    Plain,
    /// compressed-tensors: `X.weight_packed`, `X.weight_scale`, `X.weight_shape`.
    Packed,
    /// gpt-oss: `X_blocks`, `X_scales`.
    Mxfp4,
}

fn float_kind(d: StDtype) -> Option<WKind> {
    match d {
        StDtype::F32 => Some(WKind::F32),
        StDtype::BF16 => Some(WKind::BF16),
        StDtype::F16 => Some(WKind::F16),
        _ => None,
    }
}

impl Source for Checkpoint {
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn tensors(&self) -> Vec<&str> {
        self.logical.keys().map(String::as_str).collect()
    }
    fn has(&self, name: &str) -> bool {
        self.logical.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        let (key, how) = self.logical.get_key_value(name).ok_or_else(|| source::missing(&self.dir, name))?;
        match how {
            Stored::Plain => self.plain(key),
            Stored::Packed => self.packed_tensor(key, &key[..key.len() - ".weight".len()]),
            Stored::Mxfp4 => self.mxfp4_tensor(key),
        }
    }
}

/// The `quantization_config` of the checkpoint in `dir` (top level, or in a wrapper's
/// `text_config`), if its config.json has one.
fn quantization_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v = serde_json::from_str::<serde_json::Value>(&text).ok()?;
    let q = v.get("quantization_config").or_else(|| v.get("text_config").and_then(|t| t.get("quantization_config")));
    q.filter(|q| !q.is_null()).cloned()
}

/// The compressed-tensors scheme of quantization config `q` (from `path`): `None` unless its
/// `quant_method` is `compressed-tensors`; an error for what flashmoe cannot import exactly
/// (another format, asymmetric, activation quantization, a bit width or strategy it lacks).
fn packed_int(path: &Path, q: &serde_json::Value) -> Result<Option<PackedInt>> {
    if q.get("quant_method").and_then(|m| m.as_str()) != Some("compressed-tensors") {
        return Ok(None);
    }
    let p = path.display();
    let groups = q.get("config_groups").and_then(|g| g.as_object()).filter(|g| !g.is_empty());
    let Some(groups) = groups else { bail!("{p}: compressed-tensors quantization_config has no config_groups") };
    let mut found: Option<PackedInt> = None;
    for (gname, g) in groups {
        let at = format!("{p}: quantization_config.config_groups.{gname}");
        let format = g.get("format").or_else(|| q.get("format")).and_then(|f| f.as_str()).unwrap_or("");
        if format != "pack-quantized" {
            bail!("{at}: format `{format}` is not supported (only `pack-quantized` int weights)");
        }
        for act in ["input_activations", "output_activations"] {
            if g.get(act).is_some_and(|a| !a.is_null()) {
                bail!("{at}: `{act}` quantization is not supported (weight-only schemes)");
            }
        }
        let Some(w) = g.get("weights").filter(|w| !w.is_null()) else { continue };
        let field = |k: &str| w.get(k).filter(|v| !v.is_null());
        let bits = field("num_bits").and_then(|b| b.as_u64()).unwrap_or(0);
        if !crate::quant::BITS.iter().any(|&b| b as u64 == bits) {
            bail!("{at}: weights.num_bits {bits} is not supported (2, 3, 4 or 8)");
        }
        if let Some(t) = field("type").and_then(|t| t.as_str())
            && t != "int"
        {
            bail!("{at}: weights.type `{t}` is not supported (int)");
        }
        if field("symmetric").and_then(|s| s.as_bool()) != Some(true) {
            bail!("{at}: asymmetric weights (zero points) are not supported: weights.symmetric must be true");
        }
        let strategy = field("strategy").and_then(|s| s.as_str()).unwrap_or("");
        if strategy != "group" {
            bail!("{at}: weights.strategy `{strategy}` is not supported (group)");
        }
        if let Some(a) = field("actorder").and_then(|a| a.as_str())
            && a != "weight"
        {
            bail!("{at}: weights.actorder `{a}` is not supported");
        }
        let group = field("group_size").and_then(|g| g.as_u64()).unwrap_or(0);
        if group == 0 || group > u16::MAX as u64 {
            bail!("{at}: weights.group_size must be a positive integer below 65536, got {group}");
        }
        let this = PackedInt { bits: bits as u8, group: group as usize };
        match found {
            Some(f) if f != this => {
                bail!("{at}: a second scheme ({bits} bits, group {group}) beside {f:?} is not supported")
            }
            _ => found = Some(this),
        }
    }
    Ok(found)
}

/// The FP8 scale block of the checkpoint (128×128 unless its quantization config `q` says
/// otherwise).
fn fp8_block_size(dir: &Path, q: Option<&serde_json::Value>) -> Result<[usize; 2]> {
    let path = dir.join("config.json");
    match q.and_then(|q| q.get("weight_block_size")) {
        None | Some(serde_json::Value::Null) => Ok([128, 128]),
        Some(b) => match b.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>()).as_deref() {
            Some(&[r, c]) if r > 0 && c > 0 => Ok([r as usize, c as usize]),
            _ => bail!(
                "{}: quantization_config.weight_block_size must be two positive integers, got {b}",
                path.display()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Checkpoint;
    use crate::source::Source;
    use safetensors::tensor::{Dtype, TensorView};

    /// compressed-tensors' packing as its `pack_to_int32` defines it: value i of a row at bit
    /// i·bits of the row's int32 words, from the lowest bit, words little-endian.
    fn pack(u: &[u32], rows: usize, cols: usize, bits: usize) -> Vec<u8> {
        let words = (cols * bits).div_ceil(32);
        let mut w = vec![0u32; rows * words];
        for r in 0..rows {
            for j in 0..cols {
                let (bit, v) = (j * bits, u[r * cols + j] as u64);
                let (k, at) = (r * words + bit / 32, bit % 32);
                w[k] |= (v << at) as u32;
                if at + bits > 32 {
                    w[k + 1] |= (v >> (32 - at)) as u32; // a field straddling two words
                }
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn packed_int_weights_decode_to_their_dequantized_values_at_every_width() {
        let (rows, cols, group) = (3, 64, 32);
        for bits in [2usize, 3, 4, 8] {
            for scale_dtype in [Dtype::BF16, Dtype::F32] {
                let dir = tempfile::tempdir().unwrap();
                let cfg = serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors",
                    "format": "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
                    "weights": {"num_bits": bits, "type": "int", "symmetric": true, "group_size": group,
                                "strategy": "group"}}}}});
                std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
                let u: Vec<u32> = (0..rows * cols).map(|i| (i as u32 * 7 + 3) % (1 << bits)).collect();
                let packed = pack(&u, rows, cols, bits);
                let sv: Vec<f32> = (0..rows * 2).map(|i| 0.01 * (i as f32 + 1.0) + 0.00123).collect();
                let sv: Vec<f32> = sv.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
                let sbytes: Vec<u8> = match scale_dtype {
                    Dtype::BF16 => sv.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                    _ => sv.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                let shape: Vec<u8> = [rows as i64, cols as i64].iter().flat_map(|x| x.to_le_bytes()).collect();
                let words = (cols * bits).div_ceil(32);
                let t = [
                    ("w.weight_packed", TensorView::new(Dtype::I32, vec![rows, words], &packed).unwrap()),
                    ("w.weight_scale", TensorView::new(scale_dtype, vec![rows, 2], &sbytes).unwrap()),
                    ("w.weight_shape", TensorView::new(Dtype::I64, vec![2], &shape).unwrap()),
                ];
                let st = safetensors::serialize(t, None).unwrap();
                std::fs::write(dir.path().join("model.safetensors"), st).unwrap();
                let ck = Checkpoint::open(dir.path()).unwrap();
                assert!(ck.has("w.weight") && ck.is_packed_part("w.weight_scale"));
                assert_eq!(ck.shape("w.weight").unwrap(), [rows, cols]);
                let m = ck.mat("w.weight", &[rows, cols]).unwrap();
                if scale_dtype == Dtype::BF16 {
                    assert_eq!(m.kind, crate::tensor::WKind::Q { bits: bits as u8, group: group as u16 });
                }
                let off = (1u32 << (bits - 1)) as f32;
                let want: Vec<f32> =
                    (0..rows * cols).map(|i| (u[i] as f32 - off) * sv[(i / cols) * 2 + (i % cols) / group]).collect();
                assert_eq!(m.to_f32(), want, "{bits} bits, {scale_dtype:?} scales");
                // one row alone
                assert_eq!(ck.mat_rows("w.weight", &[rows, cols], 1..2).unwrap().to_f32(), want[cols..2 * cols]);
            }
        }
    }
}
