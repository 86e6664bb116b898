//! Where a family's checkpoint keeps each tensor, by role: the loader, the converter and synth
//! build every tensor name from one table. The Qwen families share the common `transformers`
//! names ([`HF`]); a family whose checkpoint names things otherwise supplies its own table.

/// Tensor names of one family's checkpoints, relative to their module. Linear layers are
/// named without `.weight` (MLX stores `.scales` and `.biases` beside it).
#[derive(Debug)]
pub struct Names {
    /// Prefixes of the text model, tried in order: plain models, then multimodal wrappers.
    pub text_prefixes: &'static [&'static str],
    pub multimodal_prefixes: &'static [&'static str],
    /// The output head, outside the prefix, tried in order.
    pub lm_head: &'static [&'static str],
    pub embed: &'static str,
    pub final_norm: &'static str,
    /// `{prefix}{layers}.{i}` is layer i.
    pub layers: &'static str,
    pub input_norm: &'static str,
    pub post_norm: &'static str,
    /// Softmax attention and its projections and q/k norms.
    pub attention: &'static str,
    pub q_proj: &'static str,
    pub k_proj: &'static str,
    pub v_proj: &'static str,
    pub o_proj: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    /// Per-head attention sinks (gpt-oss).
    pub sinks: &'static str,
    /// Gated DeltaNet and its parameters (its input projections are the family's own:
    /// `Family::deltanet_inputs`).
    pub deltanet: &'static str,
    pub conv1d: &'static str,
    pub dt_bias: &'static str,
    pub a_log: &'static str,
    pub gated_norm: &'static str,
    pub out_proj: &'static str,
    /// The feed-forward block: a dense SwiGLU, or router + experts (+ shared expert).
    pub ffn: &'static str,
    pub router: &'static str,
    pub gate_proj: &'static str,
    pub up_proj: &'static str,
    pub down_proj: &'static str,
    /// Routed experts: `{experts}.{e}.{gate_proj}` each, or fused 3-D `{experts}.{fused_gate_up}`
    /// and `{experts}.{down_proj}`, or MLX stacks `{mlx_experts}.{gate_proj}` etc.
    pub experts: &'static str,
    /// A routed expert's gate, up and down projections under `{experts}.{e}` (Mixtral and
    /// MiniMax checkpoints say `w1`, `w3`, `w2`; MLX stacks keep `gate_proj` etc.).
    pub expert_projs: [&'static str; 3],
    /// The router's score correction bias (`e_score_correction_bias`), under the block.
    pub correction_bias: &'static str,
    pub fused_gate_up: &'static str,
    pub mlx_experts: &'static str,
    pub shared_expert: &'static str,
    pub shared_expert_gate: &'static str,
    /// Latent attention's projections, under [`Names::attention`].
    pub mla: MlaNames,
}

/// The tensors of a latent-attention layer (DeepSeek's names, which every MLA family keeps).
#[derive(Debug)]
pub struct MlaNames {
    pub q_proj: &'static str,
    pub q_a: &'static str,
    pub q_a_norm: &'static str,
    pub q_b: &'static str,
    pub kv_a: &'static str,
    pub kv_a_norm: &'static str,
    pub kv_b: &'static str,
    /// `kv_b`'s key and value halves as llama.cpp's converter splits them (GGUF `attn_k_b`,
    /// each head's transposed: `[heads, kv_lora, nope]`; `attn_v_b`: `[heads, v, kv_lora]`).
    pub k_b: &'static str,
    pub v_b: &'static str,
    /// The lightning indexer and its parts.
    pub indexer: &'static str,
    pub index_q: &'static str,
    pub index_k: &'static str,
    pub index_k_norm: &'static str,
    pub index_weights: &'static str,
}

/// The common `transformers` names (Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE).
pub const HF: Names = Names {
    text_prefixes: &["model.", "model.language_model."],
    multimodal_prefixes: &["model.language_model.", "language_model.model.", "model."],
    lm_head: &["lm_head", "language_model.lm_head"],
    embed: "embed_tokens",
    final_norm: "norm",
    layers: "layers",
    input_norm: "input_layernorm",
    post_norm: "post_attention_layernorm",
    attention: "self_attn",
    q_proj: "q_proj",
    k_proj: "k_proj",
    v_proj: "v_proj",
    o_proj: "o_proj",
    q_norm: "q_norm",
    k_norm: "k_norm",
    sinks: "sinks",
    deltanet: "linear_attn",
    conv1d: "conv1d",
    dt_bias: "dt_bias",
    a_log: "A_log",
    gated_norm: "norm",
    out_proj: "out_proj",
    ffn: "mlp",
    router: "gate",
    gate_proj: "gate_proj",
    up_proj: "up_proj",
    down_proj: "down_proj",
    experts: "experts",
    expert_projs: ["gate_proj", "up_proj", "down_proj"],
    correction_bias: "gate.e_score_correction_bias",
    fused_gate_up: "gate_up_proj",
    mlx_experts: "switch_mlp",
    shared_expert: "shared_expert",
    shared_expert_gate: "shared_expert_gate",
    mla: MlaNames {
        q_proj: "q_proj",
        q_a: "q_a_proj",
        q_a_norm: "q_a_layernorm",
        q_b: "q_b_proj",
        kv_a: "kv_a_proj_with_mqa",
        kv_a_norm: "kv_a_layernorm",
        kv_b: "kv_b_proj",
        k_b: "k_b_proj",
        v_b: "v_b_proj",
        indexer: "indexer",
        index_q: "wq_b",
        index_k: "wk",
        index_k_norm: "k_norm",
        index_weights: "weights_proj",
    },
};

/// Mixtral and MiniMax-M2: the block is `block_sparse_moe`, experts `w1`/`w3`/`w2`.
pub const BLOCK_SPARSE: Names = Names {
    ffn: "block_sparse_moe",
    expert_projs: ["w1", "w3", "w2"],
    correction_bias: "e_score_correction_bias",
    ..HF
};

/// GLM-4.5 and the DeepSeek lineage: `shared_experts`, ungated.
pub const SHARED_EXPERTS: Names = Names { shared_expert: "shared_experts", ..HF };

/// `{module}.{name}.weight`.
pub fn weight(module: &str, name: &str) -> String {
    format!("{module}.{name}.weight")
}

impl Names {
    /// Layer `i`'s module under the text prefix `pre`.
    pub fn layer(&self, pre: &str, i: usize) -> String {
        format!("{pre}{}.{i}", self.layers)
    }

    /// Layer index of a tensor named under the text prefix `pre` (`{pre}{layers}.{i}.…`).
    pub fn layer_of(&self, pre: &str, name: &str) -> Option<usize> {
        let rest = name.strip_prefix(pre)?.strip_prefix(self.layers)?.strip_prefix('.')?;
        rest.split('.').next()?.parse().ok()
    }

    /// Whether `name` is a routed expert's tensor (converted into the expert files).
    pub fn is_expert(&self, name: &str) -> bool {
        [self.experts, self.mlx_experts].iter().any(|e| name.contains(&format!(".{}.{e}.", self.ffn)))
    }

    /// Whether `name` is a router or shared-expert gate (kept in bf16 by `convert`).
    pub fn is_gate(&self, name: &str) -> bool {
        name.ends_with(&format!(".{}.{}.weight", self.ffn, self.router))
            || name.ends_with(&format!(".{}.weight", self.shared_expert_gate))
    }

    /// Whether `name` is one of the RMSNorm weights a zero-centred family stores as offsets
    /// from one (the per-layer norms, q/k norms and the final norm under `pre`; not DeltaNet's
    /// gated norm, which is plain).
    pub fn is_offset_norm(&self, pre: &str, name: &str) -> bool {
        [self.input_norm, self.post_norm, self.q_norm, self.k_norm]
            .iter()
            .any(|n| name.ends_with(&format!(".{n}.weight")))
            || name == format!("{pre}{}.weight", self.final_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_recognised_by_name() {
        let p = HF.layer("model.", 3);
        assert_eq!(p, "model.layers.3");
        assert!(HF.is_expert("model.layers.3.mlp.experts.7.gate_proj.weight"));
        assert!(HF.is_expert("language_model.model.layers.0.mlp.switch_mlp.up_proj.scales"));
        assert!(!HF.is_expert("model.layers.3.mlp.shared_expert.gate_proj.weight"));
        assert!(HF.is_gate("model.layers.3.mlp.gate.weight"));
        assert!(HF.is_gate("model.layers.3.mlp.shared_expert_gate.weight"));
        assert!(!HF.is_gate("model.layers.3.mlp.gate_proj.weight"));
        assert!(HF.is_offset_norm("model.", "model.layers.1.self_attn.q_norm.weight"));
        assert!(HF.is_offset_norm("model.", "model.norm.weight"));
        // DeltaNet's gated norm is stored plain
        assert!(!HF.is_offset_norm("model.", "model.layers.0.linear_attn.norm.weight"));
        assert_eq!(weight(&p, HF.input_norm), "model.layers.3.input_layernorm.weight");
    }
}
