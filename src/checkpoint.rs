//! Reading Hugging Face checkpoints: one or many `*.safetensors` files, memory-mapped, with
//! shape and dtype checks that name the tensor and file on failure.

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
        let fp8_block = fp8_block_size(dir)?;
        let mut ck = Checkpoint { dir: dir.to_path_buf(), files: vec![], tensors: HashMap::new(), fp8_block };
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
        Ok(ck)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all tensors (sorted).
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

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
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

    /// Raw bytes, dtype and shape of tensor `name` (no conversion).
    pub fn raw(&self, name: &str) -> Result<(&[u8], StDtype, &[usize])> {
        let e = self.entry(name)?;
        Ok((&self.files[e.file].1[e.start..e.end], e.dtype, &e.shape))
    }

    /// Storage dtype of tensor `name` (`None` for types the engine does not read).
    pub fn dtype(&self, name: &str) -> Result<Option<WKind>> {
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

/// The FP8 scale block of the checkpoint in `dir` (128×128 unless its config.json says otherwise).
fn fp8_block_size(dir: &Path) -> Result<[usize; 2]> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok([128, 128]) };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return Ok([128, 128]) };
    let q = v.get("quantization_config").or_else(|| v.get("text_config").and_then(|t| t.get("quantization_config")));
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
    use super::e4m3_to_f32;

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
