//! Building a [`Model`] from a Hugging Face checkpoint directory or a converted (flash) one:
//! tensor names per family, un-fusing Qwen3-Next's DeltaNet projections and fused expert
//! tensors, shape checks.

use crate::config::{Ffn, LinearAttnConfig, Mixer, ModelConfig, QkNorm};
use crate::families::{Names, weight};
use crate::flash::{ExpertStore, Manifest, StoreOptions};
use crate::import::{self, text_prefix};
use crate::layers::attention::{Attention, QkNorms};
use crate::layers::deltanet::DeltaNet;
use crate::layers::mla::{Indexer, Mla, QProj, join_kv_b, split_kv_b};
use crate::layers::mlp::Mlp;
use crate::layers::moe::Experts;
use crate::layers::moe::{Moe, Scoring, SharedExpert};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::model::{FfnWeights, Layer, MixerWeights, Model, RunOptions};
use crate::source::{Format, Source, Tensor};
use crate::tensor::{Mat, WKind};
use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

/// The resident file of a converted model, memory-mapped: a [`Source`] whose matrices are
/// views of the mapping (no copy).
pub struct FlashResident {
    dir: PathBuf,
    path: PathBuf,
    map: Arc<Mmap>,
    entries: HashMap<String, crate::flash::format::TensorEntry>,
}

impl FlashResident {
    pub fn open(dir: &Path, m: &Manifest) -> Result<FlashResident> {
        let path = dir.join(&m.resident.file);
        let f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a file this process does not modify.
        let map = Arc::new(unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?);
        let entries = m.resident.tensors.iter().map(|t| (t.name.clone(), t.clone())).collect();
        Ok(FlashResident { dir: dir.to_path_buf(), path, map, entries })
    }
}

impl Source for FlashResident {
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn tensors(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort();
        v
    }
    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<Tensor<'_>> {
        let d = self.dir.display();
        let (key, e) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| anyhow::anyhow!("{d}: tensor `{name}` is missing from the manifest"))?;
        let kind = WKind::parse(&e.kind)
            .ok_or_else(|| anyhow::anyhow!("{d}: tensor `{name}` has unsupported format `{}`", e.kind))?;
        let blob = usize::try_from(e.offset)
            .ok()
            .zip(usize::try_from(e.bytes).ok())
            .and_then(|(o, b)| self.map.get(o..o.checked_add(b)?))
            .ok_or_else(|| anyhow::anyhow!("{d}: tensor `{name}` lies outside {}", self.path.display()))?;
        Tensor::native(key, &self.path, e.shape.clone(), kind, blob)
            .map_err(|err| anyhow::anyhow!("{d}: tensor `{name}` is recorded with {} bytes: {err}", e.bytes))
    }
    /// The whole tensor as a view of the mapping; a part of it decoded as any source's.
    fn mat_rows(&self, name: &str, shape: &[usize], range: std::ops::Range<usize>) -> Result<Mat> {
        let t = self.tensor(name)?.expect(shape)?;
        let (rows, cols) = t.rows_cols();
        let (Format::Native(kind), true) = (&t.format, range == (0..rows)) else { return t.rows(range) };
        let kind = *kind;
        Mat::mapped(rows, cols, kind, self.map.clone(), self.entries[name].offset as usize)
            .with_context(|| format!("{}: tensor `{name}`", self.dir.display()))
    }
}

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Expert store settings (converted models).
    pub store: StoreOptions,
    /// Read every expert of a converted model into memory at load (no streaming).
    pub experts_in_memory: bool,
    /// Lock the resident weights of a converted model in RAM (mlock).
    pub mlock: bool,
    /// How products treat activations ([`crate::model::RunOptions::precision`]).
    pub precision: crate::tensor::Precision,
    /// Where the forward pass runs.
    pub device: crate::backend::Device,
    /// The CPU's KV cache type ([`crate::model::RunOptions::kv_cache`]; a GPU keeps f32).
    pub kv_cache: crate::layers::attention::KvType,
}

/// Loads config and weights from `dir` (a Hugging Face checkpoint or a converted model).
pub fn load_model(dir: &Path) -> Result<Model> {
    load_model_with(dir, &LoadOptions::default())
}

pub fn load_model_with(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    if Manifest::is_flash(dir) {
        let m = Manifest::load(dir)?;
        let cfg = ModelConfig::from_json(&m.config).with_context(|| format!("{}: config", dir.display()))?;
        let mut cfg = cfg;
        cfg.eos_token_ids = ModelConfig::load_eos(dir, cfg.eos_token_ids)?;
        if let Some(ex) = &m.experts {
            let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
            let dims = [ex.gate, ex.up, ex.down].map(|p| (p.rows, p.cols));
            if ex.biases.is_some() != cfg.expert_bias {
                bail!(
                    "{}: the manifest's experts {} biases, the config's {}",
                    dir.display(),
                    if ex.biases.is_some() { "have" } else { "have no" },
                    if cfg.expert_bias { "do" } else { "do not" }
                );
            }
            if ex.num_experts != cfg.num_experts || dims != [(i, h), (i, h), (h, i)] {
                bail!(
                    "{}: the manifest's experts ({} of {dims:?}) do not match the config ({} experts, hidden {h}, \
                     intermediate {i})",
                    dir.display(),
                    ex.num_experts,
                    cfg.num_experts
                );
            }
            if let Some(l) = (0..cfg.num_layers)
                .find(|&l| cfg.ffns[l] == crate::config::Ffn::Moe && !ex.layers.iter().any(|x| x.layer == l))
            {
                bail!("{}: MoE layer {l} has no expert file in the manifest", dir.display());
            }
        }
        let res = FlashResident::open(dir, &m)?;
        if opts.mlock {
            // keep the resident weights in RAM: under memory pressure the page cache would
            // otherwise evict them in favour of expert pages and re-read them every token
            if let Err(e) = res.map.lock() {
                eprintln!("warning: cannot lock the resident weights in memory ({e}); running without --mlock");
            }
        }
        let store = match &m.experts {
            Some(ex) => {
                let mut so = opts.store.clone();
                so.max_batch = so.max_batch.max(cfg.num_experts_per_tok);
                Some(Arc::new(ExpertStore::open(dir, ex, &so)?))
            }
            None => None,
        };
        let (store, preload) = if opts.experts_in_memory { (None, store) } else { (store, None) };
        let mut m =
            build(cfg, &res, store, preload).with_context(|| format!("loading model from {}", dir.display()))?;
        m.opts.precision = opts.precision;
        m.opts.kv_cache = opts.kv_cache;
        m.accel = crate::backend::attach(&m, opts.device)?;
        return Ok(m);
    }
    let cfg = ModelConfig::load(dir)?;
    let src = crate::source::open(dir)?;
    let mut m =
        build(cfg, src.as_ref(), None, None).with_context(|| format!("loading model from {}", dir.display()))?;
    m.opts.precision = opts.precision;
    m.opts.kv_cache = opts.kv_cache;
    m.accel = crate::backend::attach(&m, opts.device)?;
    Ok(m)
}

/// The q and kv latents' RMSNorm epsilon: fixed, not `rms_norm_eps` (transformers and
/// DeepSeek's reference build those norms with their default).
const MLA_NORM_EPS: f32 = 1e-6;

struct Loader<'a> {
    ck: &'a dyn Source,
    cfg: &'a ModelConfig,
    names: &'static Names,
    /// The text model's tensor prefix.
    pre: String,
    store: Option<Arc<ExpertStore>>,
    /// Converted experts to read into memory instead of streaming.
    preload: Option<Arc<ExpertStore>>,
}

impl Loader<'_> {
    fn norm(&self, name: &str, dim: usize, zero_centered: bool) -> Result<RmsNorm> {
        let mut w = self.ck.vector(name, &[dim])?;
        if zero_centered && self.ck.shifted_norms() {
            // MLX releases and GGUFs store zero-centred norms already shifted by +1 (as `convert` undoes)
            w.iter_mut().for_each(|x| *x -= 1.0);
        }
        Ok(RmsNorm::new(w, self.cfg.rms_norm_eps, zero_centered))
    }

    fn mlp(&self, p: &str, inter: usize) -> Result<Mlp> {
        let (h, n) = (self.cfg.hidden_size, self.names);
        Ok(Mlp::new(
            self.ck.mat(&weight(p, n.gate_proj), &[inter, h])?,
            self.ck.mat(&weight(p, n.up_proj), &[inter, h])?,
            self.ck.mat(&weight(p, n.down_proj), &[h, inter])?,
        ))
    }

    fn attention(&self, p: &str, layer: usize) -> Result<Attention> {
        let c = self.cfg;
        let (h, nh, nkv, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let gated = c.gated_attention();
        let zc = c.zero_centered_norm();
        let n = self.names;
        let qw = nh * d * if gated { 2 } else { 1 };
        let norms = |q: usize, k: usize| -> Result<(RmsNorm, RmsNorm)> {
            Ok((self.norm(&weight(p, n.q_norm), q, zc)?, self.norm(&weight(p, n.k_norm), k, zc)?))
        };
        let qk_norm = match c.attn.qk_norm {
            QkNorm::None => QkNorms::None,
            QkNorm::PerHead => norms(d, d).map(|(q, k)| QkNorms::PerHead { q, k })?,
            QkNorm::Whole => norms(nh * d, nkv * d).map(|(q, k)| QkNorms::Whole { q, k })?,
        };
        let bias = if c.attn.qkv_bias {
            let b = |proj: &str, len: usize| self.ck.vector(&format!("{p}.{proj}.bias"), &[len]);
            Some([b(n.q_proj, qw)?, b(n.k_proj, nkv * d)?, b(n.v_proj, nkv * d)?])
        } else {
            None
        };
        Ok(Attention {
            q_proj: self.ck.mat(&weight(p, n.q_proj), &[qw, h])?,
            k_proj: self.ck.mat(&weight(p, n.k_proj), &[nkv * d, h])?,
            v_proj: self.ck.mat(&weight(p, n.v_proj), &[nkv * d, h])?,
            o_proj: self.ck.mat(&weight(p, n.o_proj), &[h, nh * d])?,
            qk_norm,
            bias,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            gated,
            o_bias: if c.attn.o_bias { Some(self.ck.vector(&format!("{p}.{}.bias", n.o_proj), &[h])?) } else { None },
            sinks: if c.attn.sinks { Some(self.ck.vector(&format!("{p}.{}", n.sinks), &[nh])?) } else { None },
            rope: match &c.attn.yarn {
                Some(y) => Rope::yarn(c.rotary_dim(), c.rope_theta, y),
                None => Rope::new(c.rotary_dim(), c.rope_theta),
            },
            window: c.attn.window[layer],
        })
    }

    fn mla(&self, p: &str, layer: usize) -> Result<Mla> {
        let c = self.cfg;
        let m = c.mla.as_ref().expect("checked in config");
        let (h, nh, n) = (c.hidden_size, c.num_heads, &self.names.mla);
        let (nope, rd, kvl, vd) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim);
        let qd = nh * (nope + rd);
        let q = match m.q_lora_rank {
            None => QProj::Full(self.ck.mat(&weight(p, n.q_proj), &[qd, h])?),
            Some(r) => QProj::LoRA {
                a: self.ck.mat(&weight(p, n.q_a), &[r, h])?,
                norm: RmsNorm::new(self.ck.vector(&weight(p, n.q_a_norm), &[r])?, MLA_NORM_EPS, false),
                b: self.ck.mat(&weight(p, n.q_b), &[qd, r])?,
            },
        };
        let (uk, uv) = if self.ck.has(&weight(p, n.kv_b)) || !self.ck.has(&weight(p, n.k_b)) {
            split_kv_b(&self.ck.mat(&weight(p, n.kv_b), &[nh * (nope + vd), kvl])?, nh, nope, vd)
        } else {
            let flat = |name: &str, rows: usize, cols: usize| -> Result<Mat> {
                let t = self.ck.tensor(&weight(p, name))?;
                if t.rows_cols() != (rows, cols) {
                    bail!(
                        "{}: tensor `{}` has shape {:?}, expected {:?}",
                        t.file.display(),
                        t.name,
                        t.shape,
                        [nh, rows / nh, cols]
                    );
                }
                t.mat()
            };
            join_kv_b(&flat(n.k_b, nh * kvl, nope)?, &flat(n.v_b, nh * vd, kvl)?, nh)
        };
        let spec = m.indexer.as_ref();
        let indexer = match spec {
            Some(s) if s.own[layer] => {
                let (Some(r), i) = (m.q_lora_rank, format!("{p}.{}", n.indexer)) else {
                    bail!("config.json: the lightning indexer needs q_lora_rank");
                };
                let kn = format!("{i}.{}", n.index_k_norm);
                Some(Indexer {
                    wq_b: self.ck.mat(&weight(&i, n.index_q), &[s.heads * s.head_dim, r])?,
                    wk: self.ck.mat(&weight(&i, n.index_k), &[s.head_dim, h])?,
                    k_norm: (
                        self.ck.vector(&format!("{kn}.weight"), &[s.head_dim])?,
                        self.ck.vector(&format!("{kn}.bias"), &[s.head_dim])?,
                    ),
                    weights: self.ck.mat(&weight(&i, n.index_weights), &[s.heads, h])?,
                    spec: s.clone(),
                })
            }
            _ => None,
        };
        Ok(Mla {
            q,
            kv_a: self.ck.mat(&weight(p, n.kv_a), &[kvl + rd, h])?,
            kv_norm: RmsNorm::new(self.ck.vector(&weight(p, n.kv_a_norm), &[kvl])?, MLA_NORM_EPS, false),
            uk,
            uv,
            o_proj: self.ck.mat(&weight(p, self.names.o_proj), &[h, nh * vd])?,
            num_heads: nh,
            nope,
            rope_dim: rd,
            kv_lora: kvl,
            v_dim: vd,
            interleaved: m.interleaved,
            scale: m.softmax_scale,
            rope: match &c.attn.yarn {
                Some(y) => Rope::yarn(rd, c.rope_theta, y),
                None => Rope::new(rd, c.rope_theta),
            },
            shares_selection: spec.is_some() && indexer.is_none(),
            indexer,
        })
    }

    fn deltanet(&self, p: &str, l: &LinearAttnConfig) -> Result<DeltaNet> {
        let h = self.cfg.hidden_size;
        let (vd, nv, cd) = (l.value_dim(), l.num_v_heads, l.conv_dim());
        let family = crate::families::by_model_type(&self.cfg.model_type)?;
        let [in_proj_qkv, in_proj_z, in_proj_b, in_proj_a] = family.deltanet_inputs(self.ck, p, l, h)?;
        let n = self.names;
        let a_log = self.ck.vector(&format!("{p}.{}", n.a_log), &[nv])?;
        Ok(DeltaNet {
            cfg: l.clone(),
            in_proj_qkv,
            in_proj_z,
            in_proj_b,
            in_proj_a,
            conv_w: {
                // stored [channel][tap]; kept [tap][channel] so each tap is one vector pass
                // (MLX stores it [C, K, 1]: the same memory order)
                let shape = if self.ck.mlx_layout() { [cd, l.conv_kernel, 1] } else { [cd, 1, l.conv_kernel] };
                let w = self.ck.vector(&weight(p, n.conv1d), &shape)?;
                let kern = l.conv_kernel;
                (0..kern).flat_map(|j| (0..cd).map(move |ch| (ch, j))).map(|(ch, j)| w[ch * kern + j]).collect()
            },
            dt_bias: self.ck.vector(&format!("{p}.{}", n.dt_bias), &[nv])?,
            neg_a: a_log.iter().map(|v| -v.exp()).collect(),
            norm_w: self.ck.vector(&weight(p, n.gated_norm), &[l.v_head_dim])?,
            eps: self.cfg.rms_norm_eps,
            out_proj: self.ck.mat(&weight(p, n.out_proj), &[h, vd])?,
        })
    }

    /// Routed experts of `layer` read into memory, in any layout [`import::expert`] reads.
    fn experts(&self, layer: usize) -> Result<Vec<Mlp>> {
        (0..self.cfg.num_experts)
            .map(|e| Ok(import::expert(self.ck, self.cfg, &self.pre, layer, e)?.mlp(self.cfg.expert_act)))
            .collect()
    }

    fn moe(&self, p: &str, layer: usize) -> Result<Moe> {
        let (c, n) = (self.cfg, self.names);
        let shared = if c.shared_expert_intermediate_size > 0 {
            Some(SharedExpert {
                mlp: self.mlp(&format!("{p}.{}", n.shared_expert), c.shared_expert_intermediate_size)?,
                gate: if c.shared_expert_gated {
                    Some(self.ck.vector(&weight(p, n.shared_expert_gate), &[1, c.hidden_size])?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        Ok(Moe {
            router: self.ck.mat(&weight(p, n.router), &[c.num_experts, c.hidden_size])?,
            experts: match (&self.store, &self.preload) {
                (Some(store), _) => Experts::Flash { store: store.clone(), layer },
                (None, Some(pre)) => Experts::Memory(pre.load_layer(layer, c.expert_act)?),
                (None, None) => Experts::Memory(self.experts(layer)?),
            },
            shared,
            top_k: c.num_experts_per_tok,
            act: c.expert_act,
            scoring: Scoring {
                spec: c.router.clone(),
                bias: if c.router.correction_bias {
                    Some(self.ck.vector(&format!("{p}.{}", n.correction_bias), &[c.num_experts])?)
                } else {
                    None
                },
                logit_bias: if c.router.logit_bias {
                    Some(self.ck.vector(&format!("{p}.{}.bias", n.router), &[c.num_experts])?)
                } else {
                    None
                },
            },
            layer,
        })
    }
}

/// Assembles the model from a tensor source and, for converted models, an expert store.
pub fn build(
    cfg: ModelConfig,
    ck: &dyn Source,
    store: Option<Arc<ExpertStore>>,
    preload: Option<Arc<ExpertStore>>,
) -> Result<Model> {
    let pre = text_prefix(&cfg, ck)?;
    let n = crate::families::names_of(&cfg.model_type);
    let ld = Loader { ck, cfg: &cfg, names: n, pre: pre.clone(), store: store.clone(), preload };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let zc = cfg.zero_centered_norm();
    let embed = ck.mat(&format!("{pre}{}.weight", n.embed), &[v, h])?;
    // MLX conversions of the multimodal wrapper keep the head under `language_model.`
    let heads: Vec<String> = n.lm_head.iter().map(|h| format!("{h}.weight")).collect();
    let head_name = heads.iter().find(|h| ck.has(h)).unwrap_or(&heads[0]);
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(ck.mat(head_name, &[v, h])?) };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = n.layer(&pre, i);
        let mixer = match cfg.mixers[i] {
            Mixer::Attention => MixerWeights::Attention(ld.attention(&format!("{p}.{}", n.attention), i)?),
            Mixer::Mla => MixerWeights::Mla(ld.mla(&format!("{p}.{}", n.attention), i)?),
            Mixer::DeltaNet => {
                let l = cfg.linear.as_ref().expect("checked in config");
                MixerWeights::DeltaNet(ld.deltanet(&format!("{p}.{}", n.deltanet), l)?)
            }
        };
        let f = format!("{p}.{}", n.ffn);
        let ffn = match cfg.ffns[i] {
            Ffn::Moe => FfnWeights::Moe(ld.moe(&f, i)?),
            Ffn::Dense => FfnWeights::Dense(ld.mlp(&f, cfg.intermediate_size)?),
        };
        layers.push(Layer {
            input_norm: ld.norm(&weight(&p, n.input_norm), h, zc)?,
            post_norm: ld.norm(&weight(&p, n.post_norm), h, zc)?,
            mixer,
            ffn,
        });
    }
    let norm = ld.norm(&format!("{pre}{}.weight", n.final_norm), h, zc)?;
    Ok(Model { cfg, embed, layers, norm, lm_head, opts: RunOptions::default(), store, accel: None })
}
