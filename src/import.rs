//! Reading a source by role: the text model's prefix, and a routed expert's three matrices
//! whatever the layout it was saved in (one tensor per expert and projection, fused 3-D
//! `gate_up_proj` / `down_proj`, or MLX `switch_mlp` stacks, quantized or not). `load` and
//! `convert` both read experts through [`expert`], so the layouts are decoded in one place
//! (and the formats in one other: [`crate::source::Tensor::rows`]).

use crate::config::ModelConfig;
use crate::families::{Names, weight};
use crate::source::Source;
use crate::tensor::Mat;
use anyhow::{Result, bail};

/// Tensor prefix of the text model: the multimodal wrapper nests it under `language_model`.
pub fn text_prefix(cfg: &ModelConfig, ck: &dyn Source) -> Result<String> {
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

/// Expert `e` of MoE layer `layer`; quantized experts (MLX, compressed-tensors, MXFP4) keep
/// their source bytes and format. A family whose checkpoints store experts their own way
/// reads them itself ([`crate::families::Family::expert`]).
pub fn expert(ck: &dyn Source, cfg: &ModelConfig, pre: &str, layer: usize, e: usize) -> Result<Expert> {
    let family = crate::families::by_model_type(&cfg.model_type)?;
    if let Some(x) = family.expert(ck, cfg, pre, layer, e) {
        return x;
    }
    Ok(Expert { mats: common_expert(ck, cfg, pre, layer, e)?, bias: None })
}

/// [`expert`] in the layouts the Qwen families, Mixtral, MiniMax and GLM share.
fn common_expert(ck: &dyn Source, cfg: &ModelConfig, pre: &str, layer: usize, e: usize) -> Result<[Mat; 3]> {
    let n: &Names = crate::families::names_of(&cfg.model_type);
    let (h, inter, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let ffn = format!("{}.{}", n.layer(pre, layer), n.ffn);
    let (p, sw) = (format!("{ffn}.{}", n.experts), format!("{ffn}.{}", n.mlx_experts));
    let projs = [(n.gate_proj, inter, h), (n.up_proj, inter, h), (n.down_proj, h, inter)];
    // MLX `switch_mlp` stacks, quantized or not: rows of expert e
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
