//! The manifest (`flashmoe.json`) of a converted model: self-describing, versioned, with every
//! tensor's format, shape and offset, the expert extent layout, and a CRC32 per file.

use crate::layers::mlp::MlpRef;
use crate::tensor::{MatRef, WKind};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// File name of the manifest; written last, so a directory without it is not a model.
pub const MANIFEST: &str = "flashmoe.json";
pub const FORMAT: &str = "flashmoe";
pub const VERSION: u32 = 1;
/// Alignment of every expert extent (O_DIRECT needs block alignment).
pub const EXTENT_ALIGN: u64 = 4096;
/// Alignment of tensors inside the resident file and of matrices inside an extent.
pub const TENSOR_ALIGN: u64 = 64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The source `config.json`, verbatim.
    pub config: serde_json::Value,
    /// Format of the large dense matrices (`bf16` or `q8g64`).
    pub dense: String,
    pub resident: Resident,
    pub experts: Option<Experts>,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Resident {
    pub file: String,
    pub tensors: Vec<TensorEntry>,
}

/// One non-expert tensor, under its checkpoint name and logical shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// A [`WKind`] name: f32, bf16, f16, q8g64, ...
    pub kind: String,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
}

/// Where gate, up or down sits inside an expert extent.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Part {
    pub offset: u64,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Experts {
    pub kind: String,
    pub num_experts: usize,
    /// Bytes from one expert's extent to the next (a multiple of 4096).
    pub stride: u64,
    pub gate: Part,
    pub up: Part,
    pub down: Part,
    /// f32 biases of gate, up and down (gpt-oss), one row each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biases: Option<[Part; 3]>,
    pub layers: Vec<ExpertLayer>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExpertLayer {
    pub layer: usize,
    pub file: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// How one expert's extent splits into matrices: named parts, each with its place and format.
/// The store deals in raw extents; this builds the views a block computes with, so an expert of
/// other parts (biases, a fused gate/up, mixed formats) needs a layout, not a store change.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLayout {
    /// (name, place, format); SwiGLU experts have `gate`, `up` and `down`.
    pub parts: Vec<(&'static str, Part, WKind)>,
    /// Bytes from one extent to the next.
    pub stride: usize,
}

impl ExpertLayout {
    /// The layout a manifest describes, checked against its stride.
    pub fn of(ex: &Experts) -> Result<ExpertLayout> {
        let kind = ex.wkind()?;
        let mut parts = vec![("gate", ex.gate, kind), ("up", ex.up, kind), ("down", ex.down, kind)];
        if let Some([g, u, d]) = ex.biases {
            let want = [ex.gate.rows, ex.up.rows, ex.down.rows];
            if [g, u, d].iter().zip(want).any(|(p, n)| p.rows != 1 || p.cols != n || p.offset % 4 != 0) {
                bail!("manifest: expert biases {:?} do not match the parts' rows {want:?}", [g, u, d]);
            }
            parts.extend([("gate_bias", g, WKind::F32), ("up_bias", u, WKind::F32), ("down_bias", d, WKind::F32)]);
        }
        for (name, p, k) in &parts {
            let end = k.checked_bytes(p.rows, p.cols).and_then(|b| (p.offset as usize).checked_add(b));
            if end.is_none_or(|e| e as u64 > ex.stride) {
                bail!(
                    "manifest: expert part `{name}` ({}x{} at byte {}) overruns the {}-byte extent",
                    p.rows,
                    p.cols,
                    p.offset,
                    ex.stride
                );
            }
        }
        Ok(ExpertLayout { parts, stride: ex.stride as usize })
    }

    /// The part called `name` as a matrix over `extent`.
    pub fn part<'a>(&self, extent: &'a [u8], name: &str) -> Option<MatRef<'a>> {
        let (_, p, kind) = self.parts.iter().find(|(n, ..)| *n == name)?;
        let at = p.offset as usize;
        Some(MatRef { rows: p.rows, cols: p.cols, kind: *kind, data: &extent[at..at + kind.bytes(p.rows, p.cols)] })
    }

    /// A SwiGLU expert's view of `extent` (`of` guarantees the three parts), with the
    /// activation `act`.
    pub fn mlp<'a>(&self, extent: &'a [u8], act: crate::config::Act) -> MlpRef<'a> {
        let m = |n| self.part(extent, n).expect("a SwiGLU layout has gate, up and down");
        let f32s = |n| {
            self.part(extent, n).map(|p| {
                // 4-byte aligned inside an aligned extent (checked in `of`)
                bytemuck::cast_slice::<u8, f32>(p.data)
            })
        };
        let bias = match (f32s("gate_bias"), f32s("up_bias"), f32s("down_bias")) {
            (Some(g), Some(u), Some(d)) => Some([g, u, d]),
            _ => None,
        };
        MlpRef { gate: m("gate"), up: m("up"), down: m("down"), bias, act }
    }
}

/// Where gate, up and down (and, with `biases`, their f32 biases) sit in an extent of `kind`
/// experts, and the extent stride: parts aligned to [`TENSOR_ALIGN`], extents to [`EXTENT_ALIGN`].
pub fn expert_layout(kind: WKind, hidden: usize, inter: usize, biases: bool) -> ([Part; 3], Option<[Part; 3]>, u64) {
    let a = |x: u64| x.next_multiple_of(TENSOR_ALIGN);
    let gate = Part { offset: 0, rows: inter, cols: hidden };
    let up = Part { offset: a(kind.bytes(inter, hidden) as u64), rows: inter, cols: hidden };
    let down = Part { offset: a(up.offset + kind.bytes(inter, hidden) as u64), rows: hidden, cols: inter };
    let mut end = down.offset + kind.bytes(hidden, inter) as u64;
    let bias = biases.then(|| {
        [inter, inter, hidden].map(|n| {
            let p = Part { offset: a(end), rows: 1, cols: n };
            end = p.offset + 4 * n as u64;
            p
        })
    });
    ([gate, up, down], bias, end.next_multiple_of(EXTENT_ALIGN))
}

impl Manifest {
    /// A manifest of the current format version.
    pub fn new(
        config: serde_json::Value,
        dense: WKind,
        tensors: Vec<TensorEntry>,
        experts: Option<Experts>,
        files: Vec<FileEntry>,
    ) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            config,
            dense: dense.name(),
            resident: Resident { file: "resident.bin".into(), tensors },
            experts,
            files,
        }
    }
}

impl Experts {
    pub fn wkind(&self) -> Result<WKind> {
        WKind::parse(&self.kind).ok_or_else(|| anyhow!("{MANIFEST}: unsupported expert format `{}`", self.kind))
    }
}

impl Manifest {
    pub fn is_flash(dir: &Path) -> bool {
        dir.join(MANIFEST).exists()
    }

    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{}: malformed manifest", p.display()))?;
        if m.format != FORMAT {
            bail!("{}: format is `{}`, expected `{FORMAT}`", p.display(), m.format);
        }
        if m.version != VERSION {
            bail!("{}: format version {} is not supported (this build reads {VERSION})", p.display(), m.version);
        }
        // Truncated or missing files are caught here, at load; content is checked by `verify`.
        for f in &m.files {
            confined(&p, &f.name)?;
            let path = dir.join(&f.name);
            let len = std::fs::metadata(&path).with_context(|| format!("missing model file {}", path.display()))?.len();
            if len != f.bytes {
                bail!(
                    "{}: file has {len} bytes, the manifest says {} (truncated or replaced?)",
                    path.display(),
                    f.bytes
                );
            }
        }
        m.validate(&p)?;
        Ok(m)
    }

    /// Every size and offset the manifest states is consistent and inside its file, so that no
    /// later use can overflow or read outside the store (`p`: the manifest's path, for errors).
    fn validate(&self, p: &Path) -> Result<()> {
        let size = |name: &str| -> Result<u64> {
            confined(p, name)?;
            self.files
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.bytes)
                .ok_or_else(|| anyhow!("{}: `{name}` is not among the manifest's files", p.display()))
        };
        let resident = size(&self.resident.file)?;
        for t in &self.resident.tensors {
            let bad = |why: String| anyhow!("{}: tensor `{}`: {why}", p.display(), t.name);
            let kind = WKind::parse(&t.kind).ok_or_else(|| bad(format!("unsupported format `{}`", t.kind)))?;
            let cols = *t.shape.last().unwrap_or(&1);
            let rows = t.shape[..t.shape.len().saturating_sub(1)]
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
            let need = kind.checked_bytes(rows, cols).ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
            if need as u64 != t.bytes {
                bail!(bad(format!("recorded with {} bytes, its shape needs {need}", t.bytes)));
            }
            match t.offset.checked_add(t.bytes) {
                Some(end) if end <= resident && t.offset % 8 == 0 => {}
                _ => bail!(bad(format!(
                    "{} bytes at offset {} do not fit an aligned place in the {resident}-byte {}",
                    t.bytes, t.offset, self.resident.file
                ))),
            }
        }
        if let Some(ex) = &self.experts {
            let bad = |why: String| anyhow!("{}: experts: {why}", p.display());
            let kind = ex.wkind()?;
            if ex.num_experts == 0 || ex.stride == 0 || ex.stride % 4096 != 0 {
                bail!(bad(format!("{} experts of stride {} (a positive multiple of 4096)", ex.num_experts, ex.stride)));
            }
            for (name, part) in [("gate", ex.gate), ("up", ex.up), ("down", ex.down)] {
                let end = kind
                    .checked_bytes(part.rows, part.cols)
                    .and_then(|b| part.offset.checked_add(b as u64))
                    .filter(|&end| end <= ex.stride);
                if end.is_none() || part.offset % 8 != 0 {
                    bail!(bad(format!(
                        "{name} ({}x{} at offset {}) does not fit an aligned place in the {}-byte extent",
                        part.rows, part.cols, part.offset, ex.stride
                    )));
                }
            }
            let want = ex.stride.checked_mul(ex.num_experts as u64).ok_or_else(|| bad("size overflows".into()))?;
            for l in &ex.layers {
                let got = size(&l.file)?;
                if got != want {
                    bail!(bad(format!(
                        "{} has {got} bytes, {} experts of {} need {want}",
                        l.file, ex.num_experts, ex.stride
                    )));
                }
            }
        }
        Ok(())
    }

    /// Re-reads every file and checks its CRC32. Returns the number of bytes checked.
    pub fn verify(&self, dir: &Path, mut progress: impl FnMut(u64)) -> Result<u64> {
        let mut total = 0;
        for f in &self.files {
            let path = dir.join(&f.name);
            let crc = file_crc32(&path, &mut progress)?;
            if crc != f.crc32 {
                bail!(
                    "{}: checksum mismatch (crc32 {crc:08x}, manifest {:08x}): the file is corrupt",
                    path.display(),
                    f.crc32
                );
            }
            total += f.bytes;
        }
        Ok(total)
    }
}

/// A file name of the manifest must stay inside the store: relative, no `..`.
fn confined(manifest: &Path, name: &str) -> Result<()> {
    use std::path::Component;
    let p = Path::new(name);
    if name.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{}: file name `{name}` points outside the model directory", manifest.display());
    }
    Ok(())
}

/// CRC32 of a whole file, streamed.
pub fn file_crc32(path: &Path, progress: &mut impl FnMut(u64)) -> Result<u32> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("read error in {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts(kind: WKind, h: usize, i: usize) -> Experts {
        let ([gate, up, down], biases, stride) = expert_layout(kind, h, i, false);
        Experts { kind: kind.name(), num_experts: 2, stride, gate, up, down, biases, layers: vec![] }
    }

    #[test]
    fn a_layout_views_each_part_and_refuses_parts_past_the_extent() {
        let kind = WKind::Q { bits: 4, group: 64 };
        let ex = experts(kind, 128, 64);
        let l = ExpertLayout::of(&ex).unwrap();
        let extent = vec![0u8; l.stride];
        let m = l.mlp(&extent, crate::config::Act::Swiglu);
        assert_eq!((m.gate.rows, m.gate.cols, m.down.rows, m.down.cols), (64, 128, 128, 64));
        assert_eq!(m.up.data.len(), kind.bytes(64, 128));
        assert!(l.part(&extent, "bias").is_none());
        let mut bad = ex.clone();
        bad.down.rows = 4096;
        let err = ExpertLayout::of(&bad).unwrap_err().to_string();
        assert!(err.contains("`down`") && err.contains("overruns"), "{err}");
    }
}
