//! `flashmoe convert`: a Hugging Face checkpoint → the flash layout, streamed tensor by tensor
//! (a 400 GB checkpoint converts on a 24 GB machine) and atomic: everything is written under a
//! temporary directory, checksums are re-verified, and only then is it renamed into place.

use super::format::{
    ExpertLayer, Experts, FileEntry, MANIFEST, Manifest, TENSOR_ALIGN, TensorEntry, expert_layout, file_crc32,
};
use super::staging::Staging;
use crate::checkpoint::Checkpoint;
use crate::config::{Ffn, ModelConfig};
use crate::load::text_prefix;
use crate::quant;
use crate::tensor::{Mat, WKind};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Files copied verbatim next to the weights, so the converted directory is self-contained.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Format of routed experts (`q4g64`, ..., `bf16`).
    pub experts: WKind,
    /// Format of large dense matrices (`bf16` or `q8g64`).
    pub dense: WKind,
    /// Replace an existing output directory.
    pub force: bool,
    pub progress: bool,
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub resident_bytes: u64,
    pub expert_bytes: u64,
    pub expert_stride: u64,
    pub tensors: usize,
    pub experts: usize,
}

/// A file being written with its running CRC32.
pub(crate) struct Out {
    w: BufWriter<File>,
    crc: crc32fast::Hasher,
    pub(crate) pos: u64,
    name: String,
    path: PathBuf,
}

impl Out {
    pub(crate) fn create(dir: &Path, name: &str) -> Result<Out> {
        let path = dir.join(name);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Out {
            w: BufWriter::with_capacity(8 << 20, f),
            crc: crc32fast::Hasher::new(),
            pos: 0,
            name: name.into(),
            path,
        })
    }
    pub(crate) fn write(&mut self, b: &[u8]) -> Result<()> {
        let (path, at) = (&self.path, self.pos);
        self.w.write_all(b).with_context(|| format!("writing {} at byte {at}", path.display()))?;
        self.crc.update(b);
        self.pos += b.len() as u64;
        Ok(())
    }
    pub(crate) fn pad_to(&mut self, align: u64) -> Result<()> {
        let pad = self.pos.next_multiple_of(align) - self.pos;
        self.write(&vec![0u8; pad as usize])
    }
    pub(crate) fn finish(mut self) -> Result<FileEntry> {
        let path = self.path.clone();
        self.w.flush().with_context(|| format!("writing {}", path.display()))?;
        self.w.get_ref().sync_all().with_context(|| format!("syncing {} to disk", path.display()))?;
        Ok(FileEntry { name: self.name, bytes: self.pos, crc32: self.crc.finalize() })
    }
}

/// An MLX-quantized tensor (`X.weight` packed as uint32 beside `X.scales` and `X.biases`),
/// optionally only rows `rows` of its flattened `[.., out]` leading dimensions, as a quantized
/// matrix holding exactly the source bytes.
fn mlx_mat(ck: &Checkpoint, weight: &str, group: usize, rows: Option<std::ops::Range<usize>>) -> Result<Mat> {
    use safetensors::tensor::Dtype;
    let base = weight.strip_suffix(".weight").unwrap_or(weight);
    let (w, wd, wshape) = ck.raw(weight)?;
    let (sc, sd, sshape) = ck.raw(&format!("{base}.scales"))?;
    let (bi, bd, _) = ck.raw(&format!("{base}.biases"))?;
    if wd != Dtype::U32 {
        bail!("{}: MLX tensor `{weight}` has dtype {wd:?}, expected U32", ck.dir.display());
    }
    if sd != Dtype::BF16 || bd != Dtype::BF16 {
        bail!("{}: MLX scales/biases of `{weight}` are {sd:?}/{bd:?}; only BF16 imports bit-exactly", ck.dir.display());
    }
    let packed_cols = *wshape.last().unwrap_or(&0);
    let ngroups = *sshape.last().unwrap_or(&0);
    let total_rows: usize = wshape[..wshape.len().saturating_sub(1)].iter().product();
    if ngroups == 0 || (packed_cols * 32) % (ngroups * group) != 0 {
        bail!(
            "{}: MLX tensor `{weight}`: {packed_cols} packed words and {ngroups} groups of {group} do not fit",
            ck.dir.display()
        );
    }
    let bits = (packed_cols * 32 / (ngroups * group)) as u8;
    if !quant::BITS.contains(&bits) {
        bail!("{}: MLX tensor `{weight}` is {bits}-bit; supported: 2, 3, 4, 8", ck.dir.display());
    }
    let cols = ngroups * group;
    let r = rows.unwrap_or(0..total_rows);
    let kind = WKind::Q { bits, group: group as u16 };
    let mut blob = crate::tensor::AlignedBytes::zeroed(kind.bytes(r.len(), cols));
    let b = blob.bytes_mut();
    let (rb, sb) = (packed_cols * 4, ngroups * 2);
    b[..r.len() * rb].copy_from_slice(&w[r.start * rb..r.end * rb]);
    let aux = b.len() - 2 * r.len() * sb;
    b[aux..aux + r.len() * sb].copy_from_slice(&sc[r.start * sb..r.end * sb]);
    b[aux + r.len() * sb..].copy_from_slice(&bi[r.start * sb..r.end * sb]);
    Mat::from_bytes(r.len(), cols, kind, blob)
}

/// MLX's group size for module `base` (per-module overrides first), 64 if unstated.
fn mlx_group(cfg: &serde_json::Value, base: &str) -> usize {
    let q = cfg.get("quantization").or_else(|| cfg.get("quantization_config"));
    let get = |v: Option<&serde_json::Value>| v.and_then(|x| x.get("group_size")).and_then(|g| g.as_u64());
    get(q.and_then(|q| q.get(base))).or(get(q)).unwrap_or(64) as usize
}

/// Format of a resident tensor: vectors and small precision-critical tensors stay f32, routers
/// stay bf16, the big matrices take the `dense` format.
pub(crate) fn resident_kind(name: &str, shape: &[usize], dense: WKind) -> WKind {
    let small = shape.len() == 1
        || name.contains("conv1d")
        || name.ends_with("A_log")
        || name.ends_with("dt_bias")
        || name.ends_with("norm.weight");
    if small {
        WKind::F32
    } else if name.ends_with(".mlp.gate.weight") || name.ends_with("shared_expert_gate.weight") {
        WKind::BF16
    } else if let WKind::Q { group, .. } = dense {
        if shape.last().copied().unwrap_or(0) % group as usize == 0 { dense } else { WKind::BF16 }
    } else {
        dense
    }
}

/// Refuses weights holding NaN or Inf: a model converted from them would only ever produce
/// non-finite logits.
fn finite(m: &Mat, name: &str, from: &Path) -> Result<()> {
    match m.first_nonfinite() {
        None => Ok(()),
        Some(i) => bail!(
            "{}: tensor `{name}` holds a non-finite value (NaN or Inf) at element {i} ({}): refusing to convert",
            from.display(),
            if matches!(m.kind, WKind::Q { .. }) { "a group scale or bias" } else { "a weight" }
        ),
    }
}

/// Converts the checkpoint at `from` into the flash layout at `to`.
pub fn convert(from: &Path, to: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if matches!(opts.dense, WKind::Q { bits, .. } if bits != 8) {
        bail!("--dense must be bf16 or q8 (lower precision for attention weights is not supported)");
    }
    let cfg = ModelConfig::load(from)?;
    let raw_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(from.join("config.json"))?)?;
    let ck = Checkpoint::open(from)?;
    let pre = text_prefix(&cfg, &ck)?;

    let is_expert = |n: &str| n.contains(".mlp.experts.") || n.contains(".mlp.switch_mlp.");
    let is_mlx_q = |n: &str| {
        n.ends_with(".weight")
            && ck.has(&format!("{}.scales", &n[..n.len() - 7]))
            && ck.dtype(n).ok().flatten().is_none()
    };
    let is_mlx_aux = |n: &str| {
        n.strip_suffix(".scales").or(n.strip_suffix(".biases")).is_some_and(|b| ck.has(&format!("{b}.weight")))
    };
    // MLX conversions store conv1d as [C, K, 1] and zero-centred norms already shifted by +1
    let mlx_layout =
        ck.names().iter().any(|n| n.ends_with("conv1d.weight") && ck.shape(n).is_ok_and(|s| s.last() == Some(&1)));
    let head = |n: &str| n == "lm_head.weight" || n == "language_model.lm_head.weight";
    let resident_names: Vec<&str> = ck
        .names()
        .into_iter()
        .filter(|n| (n.starts_with(pre.as_str()) || head(n)) && !is_expert(n) && !is_mlx_aux(n))
        .collect();
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.ffns[i] == Ffn::Moe).collect();
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ek = opts.experts;
    let ([gate, up, down], stride) = expert_layout(ek, h, inter);

    // the output's size, for the free-space check
    let mut expected = stride * (moe_layers.len() * ne) as u64;
    for n in &resident_names {
        expected += TENSOR_ALIGN
            + if is_mlx_q(n) {
                let base = &n[..n.len() - 7];
                ["weight", "scales", "biases"]
                    .iter()
                    .map(|s| ck.raw(&format!("{base}.{s}")).map_or(0, |r| r.0.len() as u64))
                    .sum()
            } else {
                let shape = ck.shape(n)?;
                let cols = *shape.last().unwrap_or(&1);
                let rows = shape.iter().product::<usize>() / cols.max(1);
                resident_kind(n, shape, opts.dense).bytes(rows, cols) as u64
            };
    }
    expected += SIDE_FILES.iter().filter_map(|f| std::fs::metadata(from.join(f)).ok()).map(|m| m.len()).sum::<u64>();
    let staging = Staging::begin(to, opts.force, &[from], expected)?;
    let tmp = staging.dir.clone();

    let total_work: u64 = resident_names.len() as u64 + (moe_layers.len() * ne) as u64;
    let pb = if opts.progress { ProgressBar::new(total_work) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} tensors+experts, {elapsed} (eta {eta})")
            .expect("template")
            .progress_chars("=> "),
    );

    // 1. resident weights
    pb.set_message("resident");
    let mut out = Out::create(&tmp, "resident.bin")?;
    let mut tensors = vec![];
    let shifted = [".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight"];
    for n in &resident_names {
        let (shape, bytes, kind) = if is_mlx_q(n) {
            // already quantized: keep the source bytes
            let m = mlx_mat(&ck, n, mlx_group(&raw_cfg, &n[..n.len() - 7]), None)?;
            finite(&m, n, from)?;
            (vec![m.rows, m.cols], m.data().to_vec(), m.kind)
        } else {
            let mut shape = ck.shape(n)?.to_vec();
            let kind = resident_kind(n, &shape, opts.dense);
            let mut m = ck.mat(n, &shape)?;
            if mlx_layout && n.ends_with("conv1d.weight") && shape.len() == 3 {
                shape = vec![shape[0], 1, shape[1]]; // [C, K, 1] and [C, 1, K] share one memory order
            }
            let norm = shifted.iter().any(|s| n.ends_with(s)) || *n == format!("{pre}norm.weight");
            if mlx_layout && cfg.zero_centered_norm() && norm {
                let v: Vec<f32> = m.to_f32().iter().map(|x| x - 1.0).collect();
                m = Mat::from_f32(m.rows, m.cols, v)?;
            }
            finite(&m, n, from)?;
            (shape.clone(), m.encode(kind), kind)
        };
        out.pad_to(TENSOR_ALIGN)?;
        tensors.push(TensorEntry {
            name: n.to_string(),
            kind: kind.name(),
            shape,
            offset: out.pos,
            bytes: bytes.len() as u64,
        });
        out.write(&bytes)?;
        pb.inc(1);
    }
    let resident_bytes = out.pos;
    let mut files = vec![out.finish()?];

    // 2. experts, one file per MoE layer, one aligned extent per expert
    let mut layers = vec![];
    let mut expert_bytes = 0;
    let mut extent = vec![0u8; stride as usize];
    for &l in &moe_layers {
        pb.set_message(format!("layer {l}"));
        let fname = format!("experts/layer_{l:03}.bin");
        let mut out = Out::create(&tmp, &fname)?;
        let p = format!("{pre}layers.{l}.mlp.experts");
        let fused = ck.has(&format!("{p}.gate_up_proj"));
        let sw = format!("{pre}layers.{l}.mlp.switch_mlp");
        let mlx = ck.has(&format!("{sw}.gate_proj.scales"));
        for e in 0..ne {
            let (g, u, d) = if mlx {
                let m = |proj: &str, rows: usize| {
                    let w = format!("{sw}.{proj}.weight");
                    mlx_mat(&ck, &w, mlx_group(&raw_cfg, &format!("{sw}.{proj}")), Some(e * rows..(e + 1) * rows))
                };
                (m("gate_proj", inter)?, m("up_proj", inter)?, m("down_proj", h)?)
            } else if ck.has(&format!("{sw}.gate_proj.weight")) {
                let m = |proj: &str, rows: usize, cols: usize| {
                    ck.mat_rows(&format!("{sw}.{proj}.weight"), &[ne, rows, cols], e * rows..(e + 1) * rows)
                };
                (m("gate_proj", inter, h)?, m("up_proj", inter, h)?, m("down_proj", h, inter)?)
            } else if fused {
                let (gu, dn) = (format!("{p}.gate_up_proj"), format!("{p}.down_proj"));
                (
                    ck.mat_rows(&gu, &[ne, 2 * inter, h], e * 2 * inter..e * 2 * inter + inter)?,
                    ck.mat_rows(&gu, &[ne, 2 * inter, h], e * 2 * inter + inter..(e + 1) * 2 * inter)?,
                    ck.mat_rows(&dn, &[ne, h, inter], e * h..(e + 1) * h)?,
                )
            } else {
                (
                    ck.mat(&format!("{p}.{e}.gate_proj.weight"), &[inter, h])?,
                    ck.mat(&format!("{p}.{e}.up_proj.weight"), &[inter, h])?,
                    ck.mat(&format!("{p}.{e}.down_proj.weight"), &[h, inter])?,
                )
            };
            for (m, which) in [(&g, "gate"), (&u, "up"), (&d, "down")] {
                finite(m, &format!("layer {l} expert {e} {which}_proj"), from)?;
            }
            extent.iter_mut().for_each(|b| *b = 0);
            for (m, part) in [(&g, &gate), (&u, &up), (&d, &down)] {
                let b = m.encode(ek);
                extent[part.offset as usize..part.offset as usize + b.len()].copy_from_slice(&b);
            }
            out.write(&extent)?;
            pb.inc(1);
        }
        expert_bytes += out.pos;
        files.push(out.finish()?);
        layers.push(ExpertLayer { layer: l, file: fname });
    }

    // 3. side files
    for f in SIDE_FILES {
        let src = from.join(f);
        if src.exists() {
            let b = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            let mut out = Out::create(&tmp, f)?;
            out.write(&b)?;
            files.push(out.finish()?);
        }
    }

    let experts =
        (!moe_layers.is_empty()).then(|| Experts { kind: ek.name(), num_experts: ne, stride, gate, up, down, layers });
    let manifest = Manifest::new(raw_cfg, opts.dense, tensors, experts, files);

    // 4. verify what reached the disk, then publish: manifest last, rename into place
    pb.set_message("verify");
    for f in &manifest.files {
        let crc = file_crc32(&tmp.join(&f.name), &mut |_| {})?;
        if crc != f.crc32 {
            bail!("{}: written file does not read back intact (crc32 mismatch)", tmp.join(&f.name).display());
        }
    }
    let text = serde_json::to_string_pretty(&manifest)?;
    let mpath = tmp.join(MANIFEST);
    std::fs::write(&mpath, text).with_context(|| format!("cannot write {}", mpath.display()))?;
    File::open(&mpath)?.sync_all()?;
    staging.publish()?;
    pb.finish_and_clear();
    Ok(ConvertReport {
        resident_bytes,
        expert_bytes,
        expert_stride: stride,
        tensors: manifest.resident.tensors.len(),
        experts: moe_layers.len() * ne,
    })
}
