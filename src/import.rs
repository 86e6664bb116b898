//! Reading a source checkpoint by role: the text model's prefix, and a routed expert's three
//! matrices whatever the layout it was saved in (one tensor per expert and projection, fused
//! 3-D `gate_up_proj` / `down_proj`, or MLX `switch_mlp` stacks, quantized or not). `load` and
//! `convert` both read experts through [`expert`], so the layouts are decoded in one place.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::families::{Names, weight};
use crate::load::TensorSource;
use crate::quant;
use crate::tensor::{Mat, WKind};
use anyhow::{Result, bail};

/// Tensor prefix of the text model: the multimodal wrapper nests it under `language_model`.
pub fn text_prefix(cfg: &ModelConfig, ck: &dyn TensorSource) -> Result<String> {
    let n = crate::families::names_of(&cfg.model_type);
    let candidates = if cfg.multimodal() { n.multimodal_prefixes } else { n.text_prefixes };
    for p in candidates {
        if ck.has(&format!("{p}{}.weight", n.embed)) {
            return Ok(p.to_string());
        }
    }
    bail!("{}: tensor `{}{}.weight` is missing from the checkpoint", ck.dir().display(), candidates[0], n.embed)
}

/// One routed expert as read from a checkpoint: gate and up `[inter, hidden]`, down
/// `[hidden, inter]`, and their biases where the family has them.
pub struct Expert {
    pub mats: [Mat; 3],
    pub bias: Option<[Vec<f32>; 3]>,
}

impl Expert {
    /// The block it computes, with `act`.
    pub fn mlp(self, act: crate::config::Act) -> crate::layers::mlp::Mlp {
        let [gate, up, down] = self.mats;
        crate::layers::mlp::Mlp { gate, up, down, bias: self.bias.map(std::sync::Arc::new), act }
    }
}

/// Expert `e` of MoE layer `layer`; MLX-quantized experts keep their source bytes and format.
/// `raw_cfg` is the checkpoint's config.json (MLX group sizes). A family whose checkpoints
/// store experts their own way reads them itself ([`crate::families::Family::expert`]).
pub fn expert(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    raw_cfg: &serde_json::Value,
    pre: &str,
    layer: usize,
    e: usize,
) -> Result<Expert> {
    let family = crate::families::by_model_type(&cfg.model_type)?;
    if let Some(x) = family.expert(ck, cfg, pre, layer, e) {
        return x;
    }
    Ok(Expert { mats: common_expert(ck, cfg, raw_cfg, pre, layer, e)?, bias: None })
}

/// [`expert`] in the layouts the Qwen families, Mixtral, MiniMax and GLM share.
fn common_expert(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    raw_cfg: &serde_json::Value,
    pre: &str,
    layer: usize,
    e: usize,
) -> Result<[Mat; 3]> {
    let n: &Names = crate::families::names_of(&cfg.model_type);
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ffn = format!("{}.{}", n.layer(pre, layer), n.ffn);
    let (p, sw) = (format!("{ffn}.{}", n.experts), format!("{ffn}.{}", n.mlx_experts));
    let projs = [(n.gate_proj, inter, h), (n.up_proj, inter, h), (n.down_proj, h, inter)];
    if ck.has(&format!("{sw}.{}.scales", n.gate_proj)) {
        // MLX stacks, quantized: rows of expert e, source bytes kept
        let m = |&(proj, rows, _): &(&str, usize, usize)| {
            let base = format!("{sw}.{proj}");
            mlx_mat(ck, &format!("{base}.weight"), mlx_group(raw_cfg, &base), Some(e * rows..(e + 1) * rows))
        };
        return Ok([m(&projs[0])?, m(&projs[1])?, m(&projs[2])?]);
    }
    if ck.has(&weight(&sw, n.gate_proj)) {
        let m = |&(proj, rows, cols): &(&str, usize, usize)| {
            ck.mat_rows(&weight(&sw, proj), &[ne, rows, cols], e * rows..(e + 1) * rows)
        };
        return Ok([m(&projs[0])?, m(&projs[1])?, m(&projs[2])?]);
    }
    let fused = format!("{p}.{}", n.fused_gate_up);
    if ck.has(&fused) {
        let dn = format!("{p}.{}", n.down_proj);
        return Ok([
            ck.mat_rows(&fused, &[ne, 2 * inter, h], e * 2 * inter..e * 2 * inter + inter)?,
            ck.mat_rows(&fused, &[ne, 2 * inter, h], e * 2 * inter + inter..(e + 1) * 2 * inter)?,
            ck.mat_rows(&dn, &[ne, h, inter], e * h..(e + 1) * h)?,
        ]);
    }
    // one tensor per expert and projection, under the checkpoint's own projection names
    let m = |i: usize| {
        let (_, rows, cols) = projs[i];
        ck.mat(&weight(&format!("{p}.{e}"), n.expert_projs[i]), &[rows, cols])
    };
    Ok([m(0)?, m(1)?, m(2)?])
}

/// An MLX-quantized tensor (`X.weight` packed as uint32 beside `X.scales` and `X.biases`),
/// optionally only rows `rows` of its flattened `[.., out]` leading dimensions, as a quantized
/// matrix holding exactly the source bytes.
pub fn mlx_mat(ck: &Checkpoint, weight: &str, group: usize, rows: Option<std::ops::Range<usize>>) -> Result<Mat> {
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
pub fn mlx_group(cfg: &serde_json::Value, base: &str) -> usize {
    let q = cfg.get("quantization").or_else(|| cfg.get("quantization_config"));
    let get = |v: Option<&serde_json::Value>| v.and_then(|x| x.get("group_size")).and_then(|g| g.as_u64());
    get(q.and_then(|q| q.get(base))).or(get(q)).unwrap_or(64) as usize
}
