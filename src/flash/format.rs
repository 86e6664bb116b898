//! The manifest (`flashmoe.json`) of a converted model: self-describing, versioned, with every
//! tensor's format, shape and offset, the expert extent layout, and a CRC32 per file.

use crate::tensor::WKind;
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

/// Where gate, up and down sit in an extent of `kind` experts, and the extent stride: matrices
/// aligned to [`TENSOR_ALIGN`], extents to [`EXTENT_ALIGN`].
pub fn expert_layout(kind: WKind, hidden: usize, inter: usize) -> ([Part; 3], u64) {
    let a = |x: u64| x.next_multiple_of(TENSOR_ALIGN);
    let gate = Part { offset: 0, rows: inter, cols: hidden };
    let up = Part { offset: a(kind.bytes(inter, hidden) as u64), rows: inter, cols: hidden };
    let down = Part { offset: a(up.offset + kind.bytes(inter, hidden) as u64), rows: hidden, cols: inter };
    let stride = (down.offset + kind.bytes(hidden, inter) as u64).next_multiple_of(EXTENT_ALIGN);
    ([gate, up, down], stride)
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
        Ok(m)
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
