//! Reading Hugging Face checkpoints: one or many `*.safetensors` files, memory-mapped, with
//! shape and dtype checks that name the tensor and file on failure. Quantized releases are read
//! here too: FP8 block-scaled weights (dequantized with their `weight_scale_inv`) and
//! compressed-tensors `pack-quantized` integer weights (Kimi-K2.5's int4 experts), which are
//! presented under their logical name `X.weight` as group-quantized matrices holding exactly
//! the checkpoint's values.

use crate::tensor::{AlignedBytes, Mat, WKind};
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
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
    /// Logical shapes of the packed weights, by logical name (`X.weight` for `X.weight_packed`).
    packed_shapes: HashMap<String, Vec<usize>>,
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

/// An FP8 e4m3 (`float8_e4m3fn`: no infinities, S.1111.111 is NaN) value.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0xf, (b & 7) as f32);
    if e == 0xf && b & 7 == 7 {
        return f32::NAN;
    }
    sign * if e == 0 { m / 8.0 * (-6f32).exp2() } else { (1.0 + m / 8.0) * (e as f32 - 7.0).exp2() }
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
            packed_shapes: HashMap::new(),
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
        // packed weights under their logical names: [.., out, in], `in` from the packed words
        // (the exact value is checked against `weight_shape` when the weight is read)
        let bits = ck.packed.map_or(4, |p| p.bits as usize);
        for (name, e) in &ck.tensors {
            if let Some(base) = name.strip_suffix(".weight_packed")
                && let Some((&words, lead)) = e.shape.split_last()
            {
                let mut shape = lead.to_vec();
                shape.push(words * 32 / bits);
                ck.packed_shapes.insert(format!("{base}.weight"), shape);
            }
        }
        Ok(ck)
    }

    /// Whether tensor `name` is in the checkpoint (a packed weight under its logical name too).
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.packed_shapes.contains_key(name)
    }

    /// The checkpoint's compressed-tensors `pack-quantized` scheme, if it has one.
    pub fn packed_int(&self) -> Option<PackedInt> {
        self.packed
    }

    /// Whether `name` is stored part of a packed weight (`X.weight_packed`, `X.weight_scale`,
    /// `X.weight_shape`: read together as `X.weight`, never alone).
    pub fn is_packed_part(&self, name: &str) -> bool {
        ["_packed", "_scale", "_shape"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .any(|w| self.packed_shapes.contains_key(w))
    }

    /// Logical names (`X.weight`) of the packed weights (sorted).
    pub fn packed_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.packed_shapes.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Names of all tensors as stored (sorted).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing from the checkpoint", self.dir.display()))
    }

    /// Shape of tensor `name` (of a packed weight: its logical shape).
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        if let Some(s) = self.packed_shapes.get(name)
            && !self.tensors.contains_key(name)
        {
            return Ok(s);
        }
        Ok(&self.entry(name)?.shape)
    }

    fn file_of(&self, e: &TensorEntry) -> &Path {
        &self.files[e.file].0
    }

    /// Loads tensor `name`, checking its shape, as a `[rows, cols]` matrix where `rows` is the
    /// product of all leading dimensions (a 1-D tensor is one row).
    pub fn mat(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        self.mat_rows(name, shape, 0..rows)
    }

    /// Rows `range` of tensor `name` (viewed as above), reading only those bytes: one expert
    /// out of a fused `[experts, rows, cols]` tensor.
    pub fn mat_rows(&self, name: &str, shape: &[usize], range: std::ops::Range<usize>) -> Result<Mat> {
        if !self.tensors.contains_key(name)
            && let Some(base) = name.strip_suffix(".weight").filter(|_| self.packed_shapes.contains_key(name))
        {
            return self.packed_rows(base, shape, range);
        }
        let e = self.entry(name)?;
        let file = self.file_of(e).display();
        if e.shape != shape {
            bail!("{file}: tensor `{name}` has shape {:?}, expected {:?}", e.shape, shape);
        }
        let cols = *shape.last().unwrap_or(&1);
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let dt = match e.dtype {
            StDtype::F32 => WKind::F32,
            StDtype::BF16 => WKind::BF16,
            StDtype::F16 => WKind::F16,
            StDtype::F8_E4M3 => return self.fp8_rows(name, e, range),
            other => {
                bail!("{file}: tensor `{name}` has unsupported dtype {other:?} (supported: F32, BF16, F16, F8_E4M3)")
            }
        };
        let need = rows * cols * dt.size();
        if e.end - e.start != need {
            bail!("{file}: tensor `{name}` holds {} bytes, its shape needs {need}", e.end - e.start);
        }
        assert!(range.end <= rows, "row range out of bounds");
        let rb = cols * dt.size();
        let bytes = &self.files[e.file].1[e.start + range.start * rb..e.start + range.end * rb];
        Mat::from_bytes(range.len(), cols, dt, AlignedBytes::from_slice(bytes))
            .with_context(|| format!("tensor `{name}`"))
    }

    /// Rows `range` of an FP8 e4m3 weight with block scales (`{name}_scale_inv`, one f32 per
    /// block of `fp8_block`, as the DeepSeek, GLM and MiniMax releases ship them), as f32.
    fn fp8_rows(&self, name: &str, e: &TensorEntry, range: std::ops::Range<usize>) -> Result<Mat> {
        let file = self.file_of(e).display();
        let sname = format!("{name}_scale_inv");
        if e.shape.len() < 2 {
            bail!("{file}: FP8 tensor `{name}` must have at least 2 dimensions, has shape {:?}", e.shape);
        }
        let (r, c) = (e.shape[e.shape.len() - 2], e.shape[e.shape.len() - 1]);
        let mats: usize = e.shape[..e.shape.len() - 2].iter().product();
        if e.end - e.start != mats * r * c {
            bail!("{file}: tensor `{name}` holds {} bytes, its shape needs {}", e.end - e.start, mats * r * c);
        }
        let [br, bc] = self.fp8_block;
        let (sr, sc) = (r.div_ceil(br), c.div_ceil(bc));
        let mut want = e.shape[..e.shape.len() - 2].to_vec();
        want.extend([sr, sc]);
        let scales = match self.tensors.get(&sname) {
            Some(s) if s.shape == want || (mats == 1 && s.shape == [sr, sc]) => {
                self.vector(&sname, &s.shape.clone())?
            }
            Some(s) => bail!(
                "{file}: `{sname}` has shape {:?}; FP8 `{name}` {:?} in blocks of {br}x{bc} needs {want:?}",
                s.shape,
                e.shape
            ),
            None => bail!("{file}: FP8 tensor `{name}` has no `{sname}` beside it"),
        };
        let bytes = &self.files[e.file].1[e.start..e.end];
        let mut v = Vec::with_capacity(range.len() * c);
        for row in range.clone() {
            let (m, rr) = (row / r, row % r);
            let srow = &scales[(m * sr + rr / br) * sc..(m * sr + rr / br + 1) * sc];
            v.extend(bytes[row * c..(row + 1) * c].iter().enumerate().map(|(j, &b)| e4m3_to_f32(b) * srow[j / bc]));
        }
        Mat::from_f32(range.len(), c, v).with_context(|| format!("tensor `{name}`"))
    }

    /// Rows `range` of the compressed-tensors packed weight `{base}.weight` of logical `shape`
    /// (`[.., out, in]`, leading dimensions flattened into rows). With bf16 scales, a
    /// group-quantized matrix holding the checkpoint's own values bit for bit: its nibbles (or
    /// `bits`-bit fields) as q, its scales, and −2^(bits−1)·scale as bias (exact: a power of
    /// two times a bf16). With f16/f32 scales, the dequantized values in f32.
    fn packed_rows(&self, base: &str, shape: &[usize], range: std::ops::Range<usize>) -> Result<Mat> {
        use half::bf16;
        let (pn, sn, hn) =
            (format!("{base}.weight_packed"), format!("{base}.weight_scale"), format!("{base}.weight_shape"));
        let p = self.entry(&pn)?;
        let file = self.file_of(p).display();
        let Some(PackedInt { bits, group }) = self.packed else {
            bail!(
                "{file}: tensor `{pn}` is packed, but config.json has no compressed-tensors `pack-quantized` \
                 quantization_config"
            );
        };
        for extra in ["weight_zero_point", "weight_g_idx"] {
            if self.tensors.contains_key(&format!("{base}.{extra}")) {
                bail!(
                    "{file}: `{base}.{extra}` is not supported (only symmetric int weights without activation \
                     reordering import exactly)"
                );
            }
        }
        if p.dtype != StDtype::I32 {
            bail!("{file}: tensor `{pn}` has dtype {:?}, packed weights are I32", p.dtype);
        }
        // the logical shape the checkpoint states
        let Some(h) = self.tensors.get(&hn) else { bail!("{file}: packed tensor `{pn}` has no `{hn}` beside it") };
        let hb = &self.files[h.file].1[h.start..h.end];
        let stated: Vec<i64> = match h.dtype {
            StDtype::I32 => hb.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            StDtype::I64 => hb.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            d => bail!("{file}: `{hn}` has dtype {d:?}, expected I32 or I64"),
        };
        if shape.len() < 2 || stated.len() != shape.len() || stated.iter().zip(shape).any(|(&a, &b)| a != b as i64) {
            bail!("{file}: `{hn}` says the weight is {stated:?}, expected {shape:?}");
        }
        let cols = shape[shape.len() - 1];
        let rows: usize = shape[..shape.len() - 1].iter().product();
        if !cols.is_multiple_of(group) {
            bail!("{file}: packed weight `{pn}` has {cols} inputs, not a multiple of its group size {group}");
        }
        let words = (cols * bits as usize).div_ceil(32);
        let mut want = shape[..shape.len() - 1].to_vec();
        want.push(words);
        if p.shape != want || p.end - p.start != rows * words * 4 {
            bail!("{file}: tensor `{pn}` has shape {:?}; {bits}-bit packing of {shape:?} needs {want:?}", p.shape);
        }
        let Some(s) = self.tensors.get(&sn) else { bail!("{file}: packed tensor `{pn}` has no `{sn}` beside it") };
        let ng = cols / group;
        let mut swant = shape[..shape.len() - 1].to_vec();
        swant.push(ng);
        let ssize = match s.dtype {
            StDtype::BF16 | StDtype::F16 => 2,
            StDtype::F32 => 4,
            d => bail!("{file}: `{sn}` has dtype {d:?}; scales of packed weights are BF16, F16 or F32"),
        };
        if s.shape != swant || s.end - s.start != rows * ng * ssize {
            bail!("{file}: `{sn}` has shape {:?}; `{pn}` {shape:?} in groups of {group} needs {swant:?}", s.shape);
        }
        assert!(range.end <= rows, "row range out of bounds");
        let packed = &self.files[p.file].1[p.start..p.end];
        let scales = &self.files[s.file].1[s.start..s.end];
        let (prow, qrow) = (words * 4, crate::quant::row_bytes(cols, bits));
        let offset = (1u32 << (bits - 1)) as f32;
        if s.dtype == StDtype::BF16 {
            let kind = WKind::Q { bits, group: group as u16 };
            let mut blob = AlignedBytes::zeroed(kind.bytes(range.len(), cols));
            let b = blob.bytes_mut();
            for (i, r) in range.clone().enumerate() {
                b[i * qrow..(i + 1) * qrow].copy_from_slice(&packed[r * prow..r * prow + qrow]);
            }
            let aux = b.len() - 4 * range.len() * ng;
            let (sc, bi) = b[aux..].split_at_mut(2 * range.len() * ng);
            sc.copy_from_slice(&scales[range.start * ng * 2..range.end * ng * 2]);
            for (k, (o, s)) in bi.chunks_exact_mut(2).zip(sc.chunks_exact(2)).enumerate() {
                let bias = bf16::from_f32(-offset * bf16::from_le_bytes([s[0], s[1]]).to_f32());
                if bias.is_infinite() {
                    let (r, g) = (range.start + k / ng, k % ng);
                    bail!("{file}: `{sn}` row {r} group {g}: the scale is too large to hold as a group bias");
                }
                o.copy_from_slice(&bias.to_le_bytes());
            }
            return Mat::from_bytes(range.len(), cols, kind, blob).with_context(|| format!("tensor `{pn}`"));
        }
        let scale = |k: usize| match s.dtype {
            StDtype::F16 => half::f16::from_le_bytes([scales[2 * k], scales[2 * k + 1]]).to_f32(),
            _ => f32::from_le_bytes(scales[4 * k..4 * k + 4].try_into().unwrap()),
        };
        let mask = (1u64 << bits) - 1;
        let mut v = Vec::with_capacity(range.len() * cols);
        for r in range.clone() {
            let row = &packed[r * prow..(r + 1) * prow];
            for j in 0..cols {
                let bit = j * bits as usize;
                let mut w = 0u64;
                for (i, &byte) in row[bit / 8..(bit / 8 + 2).min(row.len())].iter().enumerate() {
                    w |= (byte as u64) << (8 * i);
                }
                let u = ((w >> (bit % 8)) & mask) as f32;
                v.push((u - offset) * scale(r * ng + j / group));
            }
        }
        Mat::from_f32(range.len(), cols, v).with_context(|| format!("tensor `{pn}`"))
    }

    /// Raw bytes, dtype and shape of tensor `name` (no conversion).
    pub fn raw(&self, name: &str) -> Result<(&[u8], StDtype, &[usize])> {
        let e = self.entry(name)?;
        Ok((&self.files[e.file].1[e.start..e.end], e.dtype, &e.shape))
    }

    /// Storage dtype of tensor `name` (`None` for types the engine does not read; a packed
    /// weight's logical name: its group-quantized kind).
    pub fn dtype(&self, name: &str) -> Result<Option<WKind>> {
        if let (Some(p), false) = (self.packed, self.tensors.contains_key(name))
            && self.packed_shapes.contains_key(name)
        {
            return Ok(Some(WKind::Q { bits: p.bits, group: p.group as u16 }));
        }
        Ok(match self.entry(name)?.dtype {
            StDtype::F32 => Some(WKind::F32),
            StDtype::BF16 => Some(WKind::BF16),
            StDtype::F16 => Some(WKind::F16),
            _ => None,
        })
    }

    /// Whether `name` is the block scales of an FP8 weight (read with the weight, never alone).
    pub fn is_fp8_scale(&self, name: &str) -> bool {
        name.strip_suffix("_scale_inv").and_then(|w| self.tensors.get(w)).is_some_and(|w| w.dtype == StDtype::F8_E4M3)
    }

    /// Loads a tensor of `len` elements as f32 (norm weights, biases, per-head scalars). The
    /// shape may carry extra unit dimensions only where `shape` says so.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.mat(name, shape)?.to_f32())
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
    use super::{Checkpoint, e4m3_to_f32};
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

    #[test]
    fn e4m3_decodes_every_byte_as_the_format_defines() {
        // float8_e4m3fn: bias 7, subnormals below 2^-6, max 448, NaN only at S.1111.111
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x78), 256.0);
        // every non-NaN byte: monotone in its magnitude bits
        let pos: Vec<f32> = (0u8..0x7f).map(e4m3_to_f32).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
    }
}
