//! Qwen3-Next (`qwen3_next`; Qwen3-Next-80B-A3B): the Qwen3.5 layer math, with the DeltaNet
//! input projections fused in the checkpoint (`in_proj_qkvz` grouped per key head, `in_proj_ba`)
//! and dense layers by `decoder_sparse_step` / `mlp_only_layers`.
//! transformers: `models/qwen3_next/modeling_qwen3_next.py`.

use super::{Family, Traits};
use crate::config::LinearAttnConfig;
use crate::source::Source;
use crate::tensor::Mat;
use anyhow::Result;
use serde_json::{Value, json};

pub struct Qwen3Next;

impl Family for Qwen3Next {
    fn name(&self) -> &'static str {
        "Qwen3-Next"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3_next"]
    }

    fn traits(&self, _: &str) -> Traits {
        Traits {
            multimodal: false,
            deltanet_layers: true,
            dense_layers: true,
            shared_expert: true,
            zero_centered_norm: true,
            gated_attention: true,
            partial_rotary_default: 0.25,
            always_renormalize: false,
        }
    }

    fn presets(&self) -> &'static [&'static str] {
        &["qwen3-next-80b-a3b"]
    }

    /// From ../shared/reference/model-math.md (checked against the published config).
    fn preset(&self, name: &str) -> Option<Value> {
        (name == "qwen3-next-80b-a3b").then(|| {
            json!({
                "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
                "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
                "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "num_experts": 512,
                "num_experts_per_tok": 10, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                "intermediate_size": 5120, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "max_position_embeddings": 262144,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            })
        })
    }

    /// Un-fuses the checkpoint's projections. Rows of `in_proj_qkvz` come grouped per key head
    /// g: [q_g, k_g, v of g's value heads, z of the same]; `in_proj_ba` per key head: [b of g's
    /// value heads, a of the same]. llama.cpp's converter splits `in_proj_qkvz` into the
    /// `in_proj_qkv` and `in_proj_z` of Qwen3.5's layout (GGUF `attn_qkv`, `attn_gate`), read
    /// as they are where the fused tensor is absent.
    fn deltanet_inputs(&self, ck: &dyn Source, p: &str, l: &LinearAttnConfig, h: usize) -> Result<[Mat; 4]> {
        let (kd, vd, nv, nk) = (l.key_dim(), l.value_dim(), l.num_v_heads, l.num_k_heads);
        let ba = ck.mat(&format!("{p}.in_proj_ba.weight"), &[2 * nv, h])?;
        let per = nv / nk;
        let b_rows: Vec<_> = (0..nk).map(|g| 2 * per * g..2 * per * g + per).collect();
        let a_rows: Vec<_> = (0..nk).map(|g| 2 * per * g + per..2 * per * (g + 1)).collect();
        let (b, a) = (ba.gather_rows(&b_rows), ba.gather_rows(&a_rows));
        let name = format!("{p}.in_proj_qkvz.weight");
        if !ck.has(&name) && ck.has(&format!("{p}.in_proj_qkv.weight")) {
            let qkv = ck.mat(&format!("{p}.in_proj_qkv.weight"), &[l.conv_dim(), h])?;
            return Ok([qkv, ck.mat(&format!("{p}.in_proj_z.weight"), &[vd, h])?, b, a]);
        }
        let fused = ck.mat(&name, &[2 * kd + 2 * vd, h])?;
        let (dk, vg) = (l.k_head_dim, (nv / nk) * l.v_head_dim);
        let gs = 2 * dk + 2 * vg;
        let part = |off: usize, len: usize| (0..nk).map(|g| g * gs + off..g * gs + off + len).collect::<Vec<_>>();
        let mut qkv = part(0, dk);
        qkv.extend(part(dk, dk));
        qkv.extend(part(2 * dk, vg));
        let z = fused.gather_rows(&part(2 * dk + vg, vg));
        Ok([fused.gather_rows(&qkv), z, b, a])
    }

    fn deltanet_input_tensors(&self, p: &str, l: &LinearAttnConfig, h: usize) -> Vec<(String, Vec<usize>)> {
        vec![
            (format!("{p}.in_proj_qkvz.weight"), vec![l.conv_dim() + l.value_dim(), h]),
            (format!("{p}.in_proj_ba.weight"), vec![2 * l.num_v_heads, h]),
        ]
    }
}
