//! The import seam: where weights come from. A [`Source`] yields each tensor under its
//! canonical name (the checkpoint's own, as the family's [`crate::families::Names`] table
//! spells it) as a [`Tensor`]: logical shape, [`Format`], and the stored bytes borrowed from the
//! memory map. [`Tensor::rows`] is the one decoder of every stored format, so `load`, `convert`
//! and `inspect` read any source the same way.
//!
//! Implementations: Hugging Face safetensors ([`crate::checkpoint::Checkpoint`]: one file or
//! shards; f32/bf16/f16, FP8 with its block scales, compressed-tensors int groups, MXFP4
//! blocks), MLX ([`Mlx`]: quantized `weight`/`scales`/`biases` triples over the same files) and
//! the flash layout's resident file ([`crate::load::FlashResident`]), and GGUF files
//! ([`crate::gguf::Gguf`]: ggml's block types as [`WKind::Ggml`], kept as stored).

use crate::checkpoint::Checkpoint;
use crate::tensor::{AlignedBytes, Mat, WKind};
use anyhow::{Context, Result, anyhow, bail};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// How a tensor's stored parts encode its values.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// An engine format, stored as its sections ([`sections`]): one part for floats; packed
    /// rows, scales and biases for q-groups (MLX's `weight`/`scales`/`biases`); blocks and
    /// scales for MXFP4 (gpt-oss's `_blocks`/`_scales`). Read bit for bit.
    Native(WKind),
    /// FP8 e4m3 values (part 0) with one scale per `block` (part 1, `scale` a float kind, the
    /// checkpoint's `weight_scale_inv`), dequantized to f32.
    Fp8 { block: [usize; 2], scale: WKind },
    /// compressed-tensors `pack-quantized` symmetric ints: int32 words, each row padded to a
    /// word (part 0), and one scale per `group` inputs (part 1). With bf16 scales a q-group
    /// matrix holding the checkpoint's own values bit for bit, else dequantized to f32.
    PackedInt { bits: u8, group: usize, scale: WKind },
    /// ggml's MXFP4 blocks (GGUF): per 32 values an e8m0 scale byte, then 16 bytes holding
    /// values 0–15 in their low nibbles and 16–31 in their high ones. The values and scales of
    /// [`WKind::Mxfp4`] in another order: rows are repacked into it, bit for bit.
    GgmlMxfp4,
    /// Floats of `kind` holding −exp(x) of the logical values x (llama.cpp's `ssm_a`, which
    /// its converter computes from Gated DeltaNet's `A_log`): decoded as ln(−v), in f32.
    NegExp(WKind),
    /// Stored in a type the engine does not read (the type's name).
    Unsupported(String),
}

impl Format {
    /// A short description for `inspect` (the stored format, before any decoding).
    pub fn describe(&self) -> String {
        match self {
            Format::Native(k) => k.name(),
            Format::Fp8 { block: [r, c], .. } => format!("fp8 e4m3 ({r}x{c} blocks)"),
            Format::PackedInt { bits, group, .. } => format!("int{bits} g{group} (compressed-tensors)"),
            Format::GgmlMxfp4 => "mxfp4 (ggml blocks)".into(),
            Format::NegExp(k) => format!("{} (-exp)", k.name()),
            Format::Unsupported(t) => t.clone(),
        }
    }
}

/// One tensor of a source: everything needed to decode it, nothing copied yet.
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    /// Its canonical name.
    pub name: &'a str,
    /// The file it is in (for messages).
    pub file: &'a Path,
    /// Logical shape (of the values, not of the packed storage).
    pub shape: Vec<usize>,
    pub format: Format,
    /// The stored bytes, as [`Format`] lists them.
    pub parts: SmallVec<[&'a [u8]; 3]>,
    /// Bytes stored beside it that hold no values (compressed-tensors' `weight_shape`).
    pub aux_bytes: usize,
    /// Where each logical row is stored.
    pub order: RowOrder,
}

/// The order rows are stored in, against the logical (Hugging Face) order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOrder {
    Plain,
    /// In each block of `head` rows, logical row `s·head/2 + i` is stored at `2i + s`: the
    /// permutation llama.cpp's converter applies to `llama` Q/K projections for its RoPE of
    /// adjacent pairs (Hugging Face rotates the two halves of a head).
    RopePairs {
        head: usize,
    },
}

impl RowOrder {
    /// The stored row of logical row `r`.
    pub fn stored(self, r: usize) -> usize {
        match self {
            RowOrder::Plain => r,
            RowOrder::RopePairs { head } => {
                let (h, j, half) = (r / head, r % head, head / 2);
                h * head + 2 * (j % half) + j / half
            }
        }
    }
}

/// Byte offsets of the sections of a `[rows, cols]` matrix of `kind` in the engine's layout
/// (q-groups: packed rows, then scales, then biases; MXFP4: blocks, then scales).
pub fn sections(kind: WKind, rows: usize, cols: usize) -> SmallVec<[Range<usize>; 3]> {
    let total = kind.bytes(rows, cols);
    match kind {
        WKind::Q { bits, group } => {
            let (pb, sb) = (crate::quant::packed_bytes(rows, cols, bits), 2 * rows * cols.div_ceil(group as usize));
            let packed = rows * crate::quant::row_bytes(cols, bits);
            SmallVec::from_iter([0..packed, pb..pb + sb, pb + sb..total])
        }
        WKind::Mxfp4 => {
            let b = rows * cols.div_ceil(32) * 16;
            SmallVec::from_iter([0..b, b..total])
        }
        _ => std::iter::once(0..total).collect(),
    }
}

impl<'a> Tensor<'a> {
    /// A tensor stored as one blob in the engine's layout (the flash layout's resident file).
    pub fn native(name: &'a str, file: &'a Path, shape: Vec<usize>, kind: WKind, blob: &'a [u8]) -> Result<Tensor<'a>> {
        let (rows, cols) = rows_cols(&shape);
        let need = kind.checked_bytes(rows, cols).unwrap_or(usize::MAX);
        if blob.len() != need {
            bail!("{}: tensor `{name}` holds {} bytes, its shape {shape:?} needs {need}", file.display(), blob.len());
        }
        let parts = sections(kind, rows, cols).into_iter().map(|r| &blob[r]).collect();
        Ok(Tensor { name, file, shape, format: Format::Native(kind), parts, aux_bytes: 0, order: RowOrder::Plain })
    }

    /// Bytes as stored, all parts.
    pub fn stored_bytes(&self) -> u64 {
        (self.parts.iter().map(|p| p.len()).sum::<usize>() + self.aux_bytes) as u64
    }

    /// `[rows, cols]`: the leading dimensions flattened into rows (a 1-D tensor is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        rows_cols(&self.shape)
    }

    /// Fails unless the logical shape is `shape`.
    pub fn expect(self, shape: &[usize]) -> Result<Self> {
        if self.shape != shape {
            bail!("{}: tensor `{}` has shape {:?}, expected {:?}", self.file.display(), self.name, self.shape, shape);
        }
        Ok(self)
    }

    /// The whole tensor as a `[rows, cols]` matrix.
    pub fn mat(&self) -> Result<Mat> {
        self.rows(0..self.rows_cols().0)
    }

    /// Rows `range` of the tensor as a matrix, decoding only those rows (one expert out of a
    /// fused `[experts, rows, cols]` tensor). Native formats keep their bytes.
    pub fn rows(&self, range: Range<usize>) -> Result<Mat> {
        let (rows, cols) = self.rows_cols();
        let (file, name) = (self.file.display(), self.name);
        if range.start > range.end || range.end > rows {
            bail!("{file}: tensor `{name}`: rows {range:?} out of its {rows}");
        }
        if let RowOrder::RopePairs { head } = self.order {
            if head < 2 || !head.is_multiple_of(2) || !rows.is_multiple_of(head) {
                bail!("{file}: tensor `{name}`: {rows} rows do not split into RoPE heads of {head}");
            }
            let all = Tensor { order: RowOrder::Plain, ..self.clone() }.rows(0..rows)?;
            let at: Vec<Range<usize>> = range.map(|r| self.order.stored(r)).map(|s| s..s + 1).collect();
            return Ok(all.gather_rows(&at));
        }
        let m = match &self.format {
            Format::Native(kind) => self.native_rows(*kind, rows, cols, range),
            Format::Fp8 { block, scale } => self.fp8_rows(*block, *scale, range),
            Format::PackedInt { bits, group, scale } => self.packed_rows(*bits, *group, *scale, range),
            Format::GgmlMxfp4 => self.ggml_mxfp4_rows(rows, cols, range),
            Format::NegExp(kind) => self.neg_exp_rows(*kind, rows, cols, range),
            Format::Unsupported(t) => {
                bail!("{file}: tensor `{name}` has unsupported dtype {t} (supported: F32, BF16, F16, F8_E4M3)")
            }
        };
        m.with_context(|| format!("tensor `{name}`"))
    }

    fn native_rows(&self, kind: WKind, rows: usize, cols: usize, range: Range<usize>) -> Result<Mat> {
        let want = sections(kind, rows, cols);
        let sizes: Vec<usize> = self.parts.iter().map(|p| p.len()).collect();
        if want.len() != sizes.len() || want.iter().zip(&sizes).any(|(w, &s)| w.len() != s) {
            let want: Vec<usize> = want.iter().map(|r| r.len()).collect();
            bail!(
                "{}: tensor `{}` holds {sizes:?} bytes, its shape {:?} in {} needs {want:?}",
                self.file.display(),
                self.name,
                self.shape,
                kind.name()
            );
        }
        let n = range.len();
        if self.parts.len() == 1 {
            let rb = self.parts[0].len() / rows.max(1);
            return Mat::from_bytes(
                n,
                cols,
                kind,
                AlignedBytes::from_slice(&self.parts[0][range.start * rb..range.end * rb]),
            );
        }
        let mut blob = AlignedBytes::zeroed(kind.bytes(n, cols));
        let out = sections(kind, n, cols);
        let b = blob.bytes_mut();
        for (part, at) in self.parts.iter().zip(out) {
            let rb = part.len() / rows.max(1);
            b[at].copy_from_slice(&part[range.start * rb..range.end * rb]);
        }
        Mat::from_bytes(n, cols, kind, blob)
    }

    /// x = ln(−v) of floats v = −exp(x); a v that no real x gives is refused naming it.
    fn neg_exp_rows(&self, kind: WKind, rows: usize, cols: usize, range: Range<usize>) -> Result<Mat> {
        let start = range.start * cols;
        let v = self.native_rows(kind, rows, cols, range.clone())?.to_f32();
        let x: Vec<f32> = v.iter().map(|&v| (-v).ln()).collect();
        if let Some(i) = x.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{}` holds {} at element {}: not −exp of a finite value",
                self.file.display(),
                self.name,
                v[i],
                start + i
            );
        }
        Mat::from_f32(range.len(), cols, x)
    }

    /// ggml MXFP4 rows as [`WKind::Mxfp4`]: each block's scale to the scales, its values
    /// (0–15 low nibbles, 16–31 high) in order, two to a byte, the lower first.
    fn ggml_mxfp4_rows(&self, rows: usize, cols: usize, range: Range<usize>) -> Result<Mat> {
        let (nb, row) = (cols.div_ceil(32), cols.div_ceil(32) * 17);
        if !cols.is_multiple_of(32) || self.parts.len() != 1 || self.parts[0].len() != rows * row {
            bail!(
                "{}: MXFP4 tensor `{}` of shape {:?} holds {} bytes (whole 32-value blocks of 17 bytes expected)",
                self.file.display(),
                self.name,
                self.shape,
                self.parts.iter().map(|p| p.len()).sum::<usize>()
            );
        }
        let n = range.len();
        let mut blob = AlignedBytes::zeroed(WKind::Mxfp4.bytes(n, cols));
        let (vals, scales) = blob.bytes_mut().split_at_mut(n * nb * 16);
        for (i, r) in range.enumerate() {
            for (b, blk) in self.parts[0][r * row..(r + 1) * row].chunks_exact(17).enumerate() {
                scales[i * nb + b] = blk[0];
                let q = &blk[1..];
                let v = |j: usize| if j < 16 { q[j] & 15 } else { q[j - 16] >> 4 };
                for (k, o) in vals[(i * nb + b) * 16..][..16].iter_mut().enumerate() {
                    *o = v(2 * k) | (v(2 * k + 1) << 4);
                }
            }
        }
        Mat::from_bytes(n, cols, WKind::Mxfp4, blob)
    }

    /// FP8 e4m3 rows times their block scales, as f32 (the DeepSeek, GLM and MiniMax releases).
    fn fp8_rows(&self, [br, bc]: [usize; 2], skind: WKind, range: Range<usize>) -> Result<Mat> {
        let s = &self.shape;
        if s.len() < 2 {
            bail!(
                "{}: FP8 tensor `{}` must have at least 2 dimensions, has shape {s:?}",
                self.file.display(),
                self.name
            );
        }
        let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
        let (bytes, scales) = (self.parts[0], self.parts[1]);
        let sc = c.div_ceil(bc);
        let sr = r.div_ceil(br);
        let mut v = Vec::with_capacity(range.len() * c);
        for row in range.clone() {
            let (m, rr) = (row / r, row % r);
            let srow = (m * sr + rr / br) * sc;
            v.extend(
                bytes[row * c..(row + 1) * c]
                    .iter()
                    .enumerate()
                    .map(|(j, &b)| e4m3_to_f32(b) * float_at(scales, skind, srow + j / bc)),
            );
        }
        Mat::from_f32(range.len(), c, v)
    }

    /// compressed-tensors packed rows: with bf16 scales, a q-group matrix of the checkpoint's
    /// own values (its `bits`-bit fields as q, its scales, and −2^(bits−1)·scale as bias, exact:
    /// a power of two times a bf16); with f16/f32 scales, the dequantized values in f32.
    fn packed_rows(&self, bits: u8, group: usize, skind: WKind, range: Range<usize>) -> Result<Mat> {
        use half::bf16;
        let (rows, cols) = self.rows_cols();
        let (packed, scales) = (self.parts[0], self.parts[1]);
        let file = self.file.display();
        let ng = cols / group;
        let (prow, qrow) = (packed.len() / rows.max(1), crate::quant::row_bytes(cols, bits));
        let offset = (1u32 << (bits - 1)) as f32;
        if skind == WKind::BF16 {
            let kind = WKind::Q { bits, group: group as u16 };
            let mut blob = AlignedBytes::zeroed(kind.bytes(range.len(), cols));
            let at = sections(kind, range.len(), cols);
            let b = blob.bytes_mut();
            for (i, r) in range.clone().enumerate() {
                b[i * qrow..(i + 1) * qrow].copy_from_slice(&packed[r * prow..r * prow + qrow]);
            }
            let (sc, bi) = b[at[1].start..].split_at_mut(at[1].len());
            sc.copy_from_slice(&scales[range.start * ng * 2..range.end * ng * 2]);
            for (k, (o, s)) in bi.chunks_exact_mut(2).zip(sc.chunks_exact(2)).enumerate() {
                let bias = bf16::from_f32(-offset * bf16::from_le_bytes([s[0], s[1]]).to_f32());
                if bias.is_infinite() {
                    let (r, g) = (range.start + k / ng, k % ng);
                    bail!("{file}: `{}` row {r} group {g}: the scale is too large to hold as a group bias", self.name);
                }
                o.copy_from_slice(&bias.to_le_bytes());
            }
            return Mat::from_bytes(range.len(), cols, kind, blob);
        }
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
                v.push((u - offset) * float_at(scales, skind, r * ng + j / group));
            }
        }
        Mat::from_f32(range.len(), cols, v)
    }
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    (shape[..shape.len().saturating_sub(1)].iter().product(), *shape.last().unwrap_or(&1))
}

/// Element `k` of little-endian floats of `kind` (f32, bf16 or f16).
fn float_at(b: &[u8], kind: WKind, k: usize) -> f32 {
    match kind {
        WKind::BF16 => half::bf16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f32(),
        WKind::F16 => half::f16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f32(),
        _ => f32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap()),
    }
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

/// Where weights come from: tensors by canonical name.
pub trait Source: Sync {
    /// The model directory (for messages and side files).
    fn dir(&self) -> &Path;
    /// Canonical names of every tensor it yields, sorted (the parts of a quantized tensor,
    /// e.g. FP8 scales or MLX biases, are read with it and not listed).
    fn tensors(&self) -> Vec<&str>;
    fn has(&self, name: &str) -> bool;
    /// Tensor `name`, or an error naming it and the source.
    fn tensor(&self, name: &str) -> Result<Tensor<'_>>;
    /// Whether its layout is MLX's (conv1d stored `[C, K, 1]`, zero-centred norms shifted by +1).
    fn mlx_layout(&self) -> bool {
        false
    }
    /// Whether zero-centred norm weights are stored shifted by +1, as the multiplier (MLX's
    /// and llama.cpp's conversions).
    fn shifted_norms(&self) -> bool {
        self.mlx_layout()
    }

    /// Logical shape of tensor `name`.
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.tensor(name)?.shape)
    }
    /// Rows `range` of tensor `name`, whose shape must be `shape`, as a `[rows, cols]` matrix.
    fn mat_rows(&self, name: &str, shape: &[usize], range: Range<usize>) -> Result<Mat> {
        self.tensor(name)?.expect(shape)?.rows(range)
    }
    /// Tensor `name` with exactly `shape`, as a matrix of `[prod(leading dims), last dim]`.
    fn mat(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        self.mat_rows(name, shape, 0..rows_cols(shape).0)
    }
    /// Tensor `name` as f32 values (norm weights, biases, per-head scalars).
    fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.mat(name, shape)?.to_f32())
    }
}

/// The source checkpoint in `dir` (or a GGUF file): MLX when its safetensors hold MLX-quantized triples (or
/// MLX's conv layout), Hugging Face otherwise.
pub fn open(dir: &Path) -> Result<Box<dyn Source>> {
    if crate::gguf::is_gguf(dir) {
        return Ok(Box::new(crate::gguf::Gguf::open(dir)?));
    }
    let ck = Checkpoint::open(dir)?;
    Ok(match Mlx::over(ck)? {
        Ok(m) => Box::new(m),
        Err(ck) => Box::new(ck),
    })
}

/// An MLX checkpoint (mlx-lm's `save_weights`): safetensors where a quantized module's
/// `X.weight` is uint32 words beside bf16 `X.scales` and `X.biases`, read as one q-group
/// tensor holding exactly those bytes; everything else as in the safetensors.
pub struct Mlx {
    ck: Checkpoint,
    /// Quantized weights: name → (bits, group), from the words per row and the group size of
    /// `config.json`'s `quantization` (per module, else the default; 64 if unstated).
    quantized: HashMap<String, (u8, usize)>,
    layout: bool,
}

impl Mlx {
    /// `ck` as an MLX checkpoint if it is one, else `ck` back.
    pub fn over(ck: Checkpoint) -> Result<std::result::Result<Mlx, Checkpoint>> {
        let path = ck.dir.join("config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let mut quantized = HashMap::new();
        for n in ck.names() {
            let Some(base) = n.strip_suffix(".weight") else { continue };
            let (s, b) = (format!("{base}.scales"), format!("{base}.biases"));
            if !(ck.has(&s) && ck.has(&b)) {
                continue;
            }
            let (_, _, wshape) = ck.raw(n)?;
            let (_, _, sshape) = ck.raw(&s)?;
            let group = mlx_group(&cfg, base);
            let (words, ng) = (*wshape.last().unwrap_or(&0), *sshape.last().unwrap_or(&0));
            let d = ck.dir.display();
            if ng == 0 || group == 0 || (words * 32) % (ng * group) != 0 {
                bail!("{d}: MLX tensor `{n}`: {words} packed words and {ng} groups of {group} do not fit");
            }
            let bits = (words * 32 / (ng * group)) as u8;
            if !crate::quant::BITS.contains(&bits) {
                bail!("{d}: MLX tensor `{n}` is {bits}-bit; supported: 2, 3, 4, 8");
            }
            quantized.insert(n.to_string(), (bits, group));
        }
        // MLX stores conv1d as [C, K, 1] (transformers: [C, 1, K])
        let layout = ck
            .names()
            .iter()
            .any(|n| n.ends_with("conv1d.weight") && ck.raw(n).is_ok_and(|r| r.2.len() == 3 && r.2.last() == Some(&1)));
        Ok(if quantized.is_empty() && !layout { Err(ck) } else { Ok(Mlx { ck, quantized, layout }) })
    }

    fn is_part(&self, n: &str) -> bool {
        n.strip_suffix(".scales")
            .or(n.strip_suffix(".biases"))
            .is_some_and(|b| self.quantized.contains_key(&format!("{b}.weight")))
    }
}

impl Source for Mlx {
    fn dir(&self) -> &Path {
        &self.ck.dir
    }
    fn tensors(&self) -> Vec<&str> {
        self.ck.tensors().into_iter().filter(|n| !self.is_part(n)).collect()
    }
    fn has(&self, name: &str) -> bool {
        !self.is_part(name) && Source::has(&self.ck, name)
    }
    fn mlx_layout(&self) -> bool {
        self.layout
    }
    fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        let Some((key, &(bits, group))) = self.quantized.get_key_value(name) else { return self.ck.tensor(name) };
        let base = &name[..name.len() - ".weight".len()];
        let (w, wd, wshape) = self.ck.raw(name)?;
        let (sc, sd, _) = self.ck.raw(&format!("{base}.scales"))?;
        let (bi, bd, _) = self.ck.raw(&format!("{base}.biases"))?;
        use safetensors::tensor::Dtype;
        let d = self.ck.dir.display();
        if wd != Dtype::U32 {
            bail!("{d}: MLX tensor `{name}` has dtype {wd:?}, expected U32");
        }
        if sd != Dtype::BF16 || bd != Dtype::BF16 {
            bail!("{d}: MLX scales/biases of `{name}` are {sd:?}/{bd:?}; only BF16 imports bit-exactly");
        }
        let mut shape = wshape.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = *last * 32 / bits as usize;
        }
        let file = self.ck.file_of(name).unwrap_or(&self.ck.dir);
        let kind = WKind::Q { bits, group: group as u16 };
        Ok(Tensor {
            name: key,
            file,
            shape,
            format: Format::Native(kind),
            parts: SmallVec::from_iter([w, sc, bi]),
            aux_bytes: 0,
            order: RowOrder::Plain,
        })
    }
}

/// MLX's group size for module `base` (per-module overrides first), 64 if unstated.
fn mlx_group(cfg: &serde_json::Value, base: &str) -> usize {
    let q = cfg.get("quantization").or_else(|| cfg.get("quantization_config"));
    let get = |v: Option<&serde_json::Value>| v.and_then(|x| x.get("group_size")).and_then(|g| g.as_u64());
    get(q.and_then(|q| q.get(base))).or(get(q)).unwrap_or(64) as usize
}

/// The error for a tensor a source lacks.
pub fn missing(dir: &Path, name: &str) -> anyhow::Error {
    anyhow!("{}: tensor `{name}` is missing from the checkpoint", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `RopePairs` undoes llama.cpp's Q/K permutation (each head viewed `[2, head/2]`, the two
    /// axes swapped) for any row range, for floats and ggml blocks alike; −exp values decode
    /// to their logarithm.
    #[test]
    fn rope_pairs_and_neg_exp_decode_to_the_logical_values() {
        let (heads, head, cols) = (3, 6, 32);
        let logical: Vec<f32> = (0..heads * head * cols).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 16.0).collect();
        // the converter's permutation: stored row h·head + 2i + s holds logical h·head + s·head/2 + i
        let mut stored = vec![0f32; logical.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..head / 2 {
                    let (from, to) = (h * head + s * head / 2 + i, h * head + 2 * i + s);
                    stored[to * cols..(to + 1) * cols].copy_from_slice(&logical[from * cols..(from + 1) * cols]);
                }
            }
        }
        // one Q8_0 block a row
        let q8 = crate::kernels::ggml::tests::random_row(crate::kernels::ggml::Ggml::Q8_0, heads * head, 3);
        let f32s: &[u8] = bytemuck::cast_slice(&stored);
        let p = Path::new("m.gguf");
        for (kind, bytes) in [(WKind::F32, f32s), (WKind::Ggml(crate::kernels::ggml::Ggml::Q8_0), &q8[..])] {
            let t = Tensor {
                name: "q",
                file: p,
                shape: vec![heads * head, cols],
                format: Format::Native(kind),
                parts: SmallVec::from_iter([bytes]),
                aux_bytes: 0,
                order: RowOrder::RopePairs { head },
            };
            let want = Tensor { order: RowOrder::Plain, ..t.clone() }.mat().unwrap().to_f32();
            for range in [0..heads * head, 4..11, 17..18] {
                let got = t.rows(range.clone()).unwrap().to_f32();
                let w: Vec<f32> = range
                    .clone()
                    .flat_map(|r| {
                        let s = RowOrder::RopePairs { head }.stored(r);
                        want[s * cols..(s + 1) * cols].to_vec()
                    })
                    .collect();
                assert_eq!(got, w, "{kind:?} {range:?}");
                if kind == WKind::F32 {
                    assert_eq!(got, logical[range.start * cols..range.end * cols], "{range:?}");
                }
            }
            let odd = Tensor { order: RowOrder::RopePairs { head: 4 }, ..t.clone() };
            assert!(format!("{:#}", odd.rows(0..1).unwrap_err()).contains("RoPE heads of 4"));
        }
        let a: Vec<f32> = vec![-1.0, -0.25, -7.5];
        let t = Tensor {
            name: "a",
            file: p,
            shape: vec![3],
            format: Format::NegExp(WKind::F32),
            parts: SmallVec::from_iter([bytemuck::cast_slice::<f32, u8>(&a)]),
            aux_bytes: 0,
            order: RowOrder::Plain,
        };
        let x = t.mat().unwrap().to_f32();
        assert!(x.iter().zip(&a).all(|(x, a)| (-x.exp() - a).abs() <= 1e-6 * a.abs()), "{x:?}");
        let bad: Vec<f32> = vec![-1.0, 0.0, -2.0];
        let t = Tensor { parts: SmallVec::from_iter([bytemuck::cast_slice::<f32, u8>(&bad)]), ..t };
        let e = format!("{:#}", t.mat().unwrap_err());
        assert!(e.contains("tensor `a`") && e.contains("element 1"), "{e}");
    }

    #[test]
    fn native_parts_concatenate_into_the_engine_layout_for_any_row_range() {
        // a q4g8 matrix of 5 rows by 16 (odd rows: the packed section is padded), and MXFP4
        for kind in [WKind::Q { bits: 4, group: 8 }, WKind::Q { bits: 3, group: 8 }, WKind::Mxfp4, WKind::BF16] {
            let (rows, cols) = (5, if kind == WKind::Mxfp4 { 64 } else { 16 });
            let blob: Vec<u8> = (0..kind.bytes(rows, cols)).map(|i| (i * 37 % 251) as u8).collect();
            let mut clean = AlignedBytes::zeroed(blob.len());
            // padding bytes of the engine layout are zero
            for r in sections(kind, rows, cols) {
                clean.bytes_mut()[r.clone()].copy_from_slice(&blob[r]);
            }
            let file = Path::new("x");
            let t = Tensor::native("w", file, vec![rows, cols], kind, clean.bytes()).unwrap();
            let whole = t.mat().unwrap();
            assert_eq!(whole.data(), clean.bytes());
            for range in [0..1, 1..4, 4..5, 0..5] {
                let m = t.rows(range.clone()).unwrap();
                let want = Mat::from_bytes(rows, cols, kind, clean.clone()).unwrap().to_f32();
                assert_eq!(m.to_f32(), want[range.start * cols..range.end * cols], "{kind:?} {range:?}");
            }
            assert!(t.rows(3..6).is_err());
            assert!(Tensor::native("w", file, vec![rows, cols + 8], kind, clean.bytes()).is_err());
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
