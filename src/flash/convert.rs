//! `flashmoe convert`: a Hugging Face checkpoint → the flash layout, streamed tensor by tensor
//! (a 400 GB checkpoint converts on a 24 GB machine) and atomic: everything is written under a
//! temporary directory, checksums are re-verified, and only then is it renamed into place.

use super::format::{
    ExpertLayer, Experts, FileEntry, MANIFEST, Manifest, TENSOR_ALIGN, TensorEntry, expert_layout, file_crc32,
};
use super::staging::Staging;
use crate::config::{Ffn, ModelConfig};
use crate::families::Names;
use crate::import::{self, text_prefix};
use crate::source::Format;
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

/// Format of a resident tensor: vectors and small precision-critical tensors stay f32, routers
/// stay bf16, the big matrices take the `dense` format.
pub(crate) fn resident_kind(names: &Names, name: &str, shape: &[usize], dense: WKind) -> WKind {
    let small = shape.len() == 1
        || name.contains(&format!(".{}.", names.conv1d))
        || name.ends_with(&format!(".{}", names.a_log))
        || name.ends_with(&format!(".{}", names.dt_bias))
        || name.ends_with("norm.weight");
    if small {
        WKind::F32
    } else if names.is_gate(name) {
        WKind::BF16
    } else if let WKind::Q { group, .. } = dense {
        if shape.last().copied().unwrap_or(0) % group as usize == 0 { dense } else { WKind::BF16 }
    } else {
        dense
    }
}

/// Whether a resident tensor is copied as stored: source q-groups (MLX) are already in a
/// format the engine computes.
fn keeps_bytes(f: &Format) -> bool {
    matches!(f, Format::Native(WKind::Q { .. } | WKind::Ggml(_)))
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

/// The format of the routed experts of the checkpoint at `from` as [`import::expert`] reads
/// them (the first MoE layer's first expert): a group-quantized kind for MLX and
/// compressed-tensors int releases, MXFP4 for gpt-oss's, the stored float kind otherwise (f32
/// for FP8, dequantized). `None` for a model without MoE layers.
pub fn source_expert_kind(from: &Path) -> Result<Option<WKind>> {
    let cfg = ModelConfig::load(from)?;
    let Some(l) = (0..cfg.num_layers).find(|&i| cfg.ffns[i] == Ffn::Moe) else { return Ok(None) };
    let src = crate::source::open(from)?;
    let pre = text_prefix(&cfg, src.as_ref())?;
    Ok(Some(import::expert(src.as_ref(), &cfg, &pre, l, 0)?.mats[0].kind))
}

/// Converts the checkpoint at `from` into the flash layout at `to`.
pub fn convert(from: &Path, to: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if matches!(opts.dense, WKind::Q { bits, .. } if bits != 8 && bits != 4) || matches!(opts.dense, WKind::Mxfp4) {
        bail!("--dense must be bf16, q8 or q4 (below 4 bits the attention and embedding weights lose too much)");
    }
    let cfg = ModelConfig::load(from)?;
    // a GGUF's config and tokenizer files come from its metadata
    let gguf = if crate::gguf::is_gguf(from) { Some(crate::gguf::Gguf::open(from)?) } else { None };
    let raw_cfg: serde_json::Value = match &gguf {
        Some(g) => g.config().clone(),
        None => serde_json::from_str(&std::fs::read_to_string(from.join("config.json"))?)?,
    };
    let src = crate::source::open(from)?;
    let ck = src.as_ref();
    let pre = text_prefix(&cfg, ck)?;

    let names = crate::families::names_of(&cfg.model_type);
    let is_expert = |n: &str| names.is_expert(n);
    // MLX conversions store conv1d as [C, K, 1] and zero-centred norms already shifted by +1
    let conv = format!(".{}.weight", names.conv1d);
    let mlx_layout = ck.mlx_layout();
    let head = |n: &str| names.lm_head.iter().any(|h| n.strip_suffix(".weight") == Some(h));
    let mut resident_names: Vec<&str> = ck
        .tensors()
        .into_iter()
        .filter(|n| (n.starts_with(pre.as_str()) || head(n)) && !is_expert(n))
        // layers past the text model's (GLM's and DeepSeek's MTP layers) are not converted
        .filter(|n| names.layer_of(&pre, n).is_none_or(|i| i < cfg.num_layers))
        .collect();
    resident_names.sort();
    let moe_layers: Vec<usize> = (0..cfg.num_layers).filter(|&i| cfg.ffns[i] == Ffn::Moe).collect();
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ek = opts.experts;
    let ([gate, up, down], biases, stride) = expert_layout(ek, h, inter, cfg.expert_bias);

    // the output's size, for the free-space check
    let mut expected = stride * (moe_layers.len() * ne) as u64;
    for n in &resident_names {
        let t = ck.tensor(n)?;
        let (rows, cols) = t.rows_cols();
        expected += TENSOR_ALIGN
            + if keeps_bytes(&t.format) {
                t.stored_bytes()
            } else {
                resident_kind(names, n, &t.shape, opts.dense).bytes(rows, cols) as u64
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
    for n in &resident_names {
        let t = ck.tensor(n)?;
        let (shape, bytes, kind) = if keeps_bytes(&t.format) {
            // already quantized: keep the source bytes
            let m = t.mat()?;
            finite(&m, n, from)?;
            (vec![m.rows, m.cols], m.data().to_vec(), m.kind)
        } else {
            let mut shape = t.shape.clone();
            let kind = resident_kind(names, n, &shape, opts.dense);
            let mut m = t.mat()?;
            if mlx_layout && n.ends_with(&conv) && shape.len() == 3 {
                shape = vec![shape[0], 1, shape[1]]; // [C, K, 1] and [C, 1, K] share one memory order
            }
            if ck.shifted_norms() && cfg.zero_centered_norm() && names.is_offset_norm(&pre, n) {
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
        for e in 0..ne {
            let x = import::expert(ck, &cfg, &pre, l, e)?;
            let [g, u, d] = &x.mats;
            for (m, which) in [(g, "gate"), (u, "up"), (d, "down")] {
                finite(m, &format!("layer {l} expert {e} {which}_proj"), from)?;
                // ggml blocks are copied, never encoded: the layout holds one expert format
                if matches!(ek, WKind::Ggml(_)) && m.kind != ek {
                    bail!(
                        "{}: layer {l} expert {e} {which}_proj is {}, not {} as the first expert's gate: the flash \
                         layout holds one expert format (choose one with --experts q4, q8, ...)",
                        from.display(),
                        m.kind.name(),
                        ek.name()
                    );
                }
            }
            extent.iter_mut().for_each(|b| *b = 0);
            for (m, part) in [(g, &gate), (u, &up), (d, &down)] {
                let b = m.encode(ek);
                extent[part.offset as usize..part.offset as usize + b.len()].copy_from_slice(&b);
            }
            if let (Some(bias), Some(parts)) = (&x.bias, &biases) {
                for (v, part) in bias.iter().zip(parts) {
                    if v.iter().any(|x| !x.is_finite()) {
                        bail!("{}: layer {l} expert {e}: a bias holds a non-finite value", from.display());
                    }
                    let b: &[u8] = bytemuck::cast_slice(v);
                    extent[part.offset as usize..part.offset as usize + b.len()].copy_from_slice(b);
                }
            }
            out.write(&extent)?;
            pb.inc(1);
        }
        expert_bytes += out.pos;
        files.push(out.finish()?);
        layers.push(ExpertLayer { layer: l, file: fname });
    }

    // 3. side files
    if let Some(g) = &gguf {
        for (f, b) in crate::gguf::vocab::side_files(g)? {
            let mut out = Out::create(&tmp, f)?;
            out.write(&b)?;
            files.push(out.finish()?);
        }
    }
    for f in SIDE_FILES {
        let src = from.join(f);
        if src.exists() {
            let b = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            let mut out = Out::create(&tmp, f)?;
            out.write(&b)?;
            files.push(out.finish()?);
        }
    }

    let experts = (!moe_layers.is_empty()).then(|| Experts {
        kind: ek.name(),
        num_experts: ne,
        stride,
        gate,
        up,
        down,
        biases,
        layers,
    });
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
