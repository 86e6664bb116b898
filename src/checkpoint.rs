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
        let mut ck = Checkpoint { dir: dir.to_path_buf(), files: vec![], tensors: HashMap::new() };
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
            other => bail!("{file}: tensor `{name}` has unsupported dtype {other:?} (supported: F32, BF16, F16)"),
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

    /// Loads a tensor of `len` elements as f32 (norm weights, biases, per-head scalars). The
    /// shape may carry extra unit dimensions only where `shape` says so.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.mat(name, shape)?.to_f32())
    }
}
