//! Gated DeltaNet (linear attention): a causal depthwise conv over the q/k/v projection,
//! then per value head a d_k×d_v state updated by the gated delta rule, then a gated RMSNorm.
//! Prefill runs the same token recurrence as decode, so both give identical results; the value
//! heads are independent and run in parallel.

use super::norm::inv_rms;
use super::{sigmoid, softplus};
use crate::config::LinearAttnConfig;
use crate::scratch;
use crate::tensor::{Mat, Precision, Product, products, products_rows};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct DeltaNet {
    pub cfg: LinearAttnConfig,
    /// Rows `[q | k | v]`, each head-major.
    pub in_proj_qkv: Mat,
    pub in_proj_z: Mat,
    pub in_proj_b: Mat,
    pub in_proj_a: Mat,
    /// `[kernel][conv_dim]` (transposed from the checkpoint's `[conv_dim, 1, kernel]`).
    pub conv_w: Vec<f32>,
    pub dt_bias: Vec<f32>,
    /// −exp(A_log), per value head.
    pub neg_a: Vec<f32>,
    /// Plain (not zero-centred) weight of the gated output norm, `v_head_dim` long.
    pub norm_w: Vec<f32>,
    pub eps: f32,
    pub out_proj: Mat,
}

/// Recurrent state of one DeltaNet layer.
#[derive(Clone, Debug)]
pub struct DeltaState {
    /// The last `kernel-1` conv inputs, oldest first: `[kernel-1][conv_dim]`.
    pub conv: Vec<f32>,
    /// `[v_head][d_k][d_v]`.
    pub s: Vec<f32>,
}

impl DeltaState {
    pub fn new(c: &LinearAttnConfig) -> DeltaState {
        DeltaState {
            conv: vec![0.0; (c.conv_kernel - 1) * c.conv_dim()],
            s: vec![0.0; c.num_v_heads * c.k_head_dim * c.v_head_dim],
        }
    }

    pub fn bytes(&self) -> usize {
        (self.conv.len() + self.s.len()) * 4
    }
}

fn l2_normalize(x: &mut [f32], scale: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = scale / (ss + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

/// One token of the gated delta rule for one value head: S ← decay·S, u = (v − Sᵀk)·β,
/// S ← S + k uᵀ, o = Sᵀq (`s` is d_k×d_v row-major; `u` is scratch of d_v). Two passes over S.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn delta_step_body(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    decay: f32,
    o: &mut [f32],
    u: &mut [f32],
) {
    let dv = v.len();
    u.fill(0.0);
    for (row, &ki) in s.chunks_exact_mut(dv).zip(k) {
        for (sv, m) in row.iter_mut().zip(u.iter_mut()) {
            *sv *= decay;
            *m += *sv * ki;
        }
    }
    for (m, &vv) in u.iter_mut().zip(v) {
        *m = (vv - *m) * beta;
    }
    for ((row, &ki), &qi) in s.chunks_exact_mut(dv).zip(k).zip(q) {
        for ((sv, m), ov) in row.iter_mut().zip(u.iter()).zip(o.iter_mut()) {
            *sv += ki * m;
            *ov += *sv * qi;
        }
    }
}

// The same element-wise code compiled for wider vectors (identical results: no reassociation).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn delta_step_avx512(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    decay: f32,
    o: &mut [f32],
    u: &mut [f32],
) {
    delta_step_body(s, q, k, v, beta, decay, o, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn delta_step_avx2(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: f32,
    decay: f32,
    o: &mut [f32],
    u: &mut [f32],
) {
    delta_step_body(s, q, k, v, beta, decay, o, u)
}

#[allow(clippy::too_many_arguments)]
fn delta_step(s: &mut [f32], q: &[f32], k: &[f32], v: &[f32], beta: f32, decay: f32, o: &mut [f32], u: &mut [f32]) {
    match crate::kernels::isa() {
        // SAFETY: the ISA was detected at run time.
        #[cfg(target_arch = "x86_64")]
        crate::kernels::Isa::Avx512 | crate::kernels::Isa::Avx512Vnni => unsafe {
            delta_step_avx512(s, q, k, v, beta, decay, o, u)
        },
        #[cfg(target_arch = "x86_64")]
        crate::kernels::Isa::Avx2 => unsafe { delta_step_avx2(s, q, k, v, beta, decay, o, u) },
        _ => delta_step_body(s, q, k, v, beta, decay, o, u),
    }
}

impl DeltaNet {
    pub fn forward(&self, x: &[f32], n: usize, st: &mut DeltaState, out: &mut [f32], p: Precision) {
        let c = &self.cfg;
        let (cd, vd, nv) = (c.conv_dim(), c.value_dim(), c.num_v_heads);
        let mut qkv = scratch::zeros(n * cd);
        let mut z = scratch::zeros(n * vd);
        let mut b = scratch::zeros(n * nv);
        let mut a = scratch::zeros(n * nv);
        products(&mut self.in_products(x, &mut qkv, &mut z, &mut b, &mut a), n, p);
        let mut o = scratch::zeros(n * vd);
        self.recur(&qkv, &z, &b, &a, n, st, &mut o);
        self.out_proj.matmul(&o, n, out, p);
    }

    /// One decode step of each of several sequences (a batch, [`crate::model::Model::forward_batch`]):
    /// row `t` of `x` is the next token of the sequence whose state is `states[t]`. The input
    /// and output projections run over all the rows at once, each weight row read once for
    /// all ([`products_rows`]); the convolution and the delta rule run on each sequence's own
    /// state. Every row's output is bit for bit what [`DeltaNet::forward`] of that token
    /// alone gives it.
    pub fn decode_rows(&self, x: &[f32], states: &mut [&mut DeltaState], out: &mut [f32], p: Precision) {
        let c = &self.cfg;
        let (cd, vd, nv, m) = (c.conv_dim(), c.value_dim(), c.num_v_heads, states.len());
        assert!(x.len() == m * self.in_proj_qkv.cols && out.len() == m * self.out_proj.rows);
        // every product writes every row
        let (mut qkv, mut z, mut b, mut a) =
            (scratch::dirty(m * cd), scratch::dirty(m * vd), scratch::dirty(m * nv), scratch::dirty(m * nv));
        products_rows(&mut self.in_products(x, &mut qkv, &mut z, &mut b, &mut a), p);
        let mut o = scratch::zeros(m * vd);
        for (t, st) in states.iter_mut().enumerate() {
            let (zt, bt, at) = (&z[t * vd..(t + 1) * vd], &b[t * nv..(t + 1) * nv], &a[t * nv..(t + 1) * nv]);
            self.recur(&qkv[t * cd..(t + 1) * cd], zt, bt, at, 1, st, &mut o[t * vd..(t + 1) * vd]);
        }
        products_rows(&mut [Product { w: self.out_proj.view(), x: &o, y: out }], p);
    }

    /// The input projections of `x` into qkv, z, b and a.
    fn in_products<'a>(
        &'a self,
        x: &'a [f32],
        qkv: &'a mut [f32],
        z: &'a mut [f32],
        b: &'a mut [f32],
        a: &'a mut [f32],
    ) -> [Product<'a>; 4] {
        [
            Product { w: self.in_proj_qkv.view(), x, y: qkv },
            Product { w: self.in_proj_z.view(), x, y: z },
            Product { w: self.in_proj_b.view(), x, y: b },
            Product { w: self.in_proj_a.view(), x, y: a },
        ]
    }

    /// The recurrence over `n` tokens' projections (steps 1-5), from and into `st`; `o` gets
    /// the gated, normalised outputs, token-major `[n, value_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn recur(&self, qkv: &[f32], z: &[f32], b: &[f32], a: &[f32], n: usize, st: &mut DeltaState, o: &mut [f32]) {
        let c = &self.cfg;
        let (cd, kd, vd) = (c.conv_dim(), c.key_dim(), c.value_dim());
        let (nk, nv, dk, dv, kern) = (c.num_k_heads, c.num_v_heads, c.k_head_dim, c.v_head_dim, c.conv_kernel);
        // 1. causal depthwise conv over [history, x_0..x_n], then SiLU; the last kernel-1
        //    inputs become the history. Tokens are independent here: a prompt's run in parallel.
        let hist = st.conv.len() / cd;
        let input = |i: usize| {
            if i < hist { &st.conv[i * cd..(i + 1) * cd] } else { &qkv[(i - hist) * cd..(i - hist + 1) * cd] }
        };
        let mut cv = scratch::zeros(n * cd);
        let q_scale = 1.0 / (dk as f32).sqrt();
        let conv = |(t, ct): (usize, &mut [f32])| {
            for j in 0..kern {
                let (w, src) = (&self.conv_w[j * cd..(j + 1) * cd], input(t + j));
                ct.iter_mut().zip(w).zip(src).for_each(|((o, w), s)| *o += w * s);
            }
            crate::kernels::silu(ct);
            // 2. L2-normalise q and k per key head; q also scaled by 1/sqrt(d_k).
            for h in 0..nk {
                l2_normalize(&mut ct[h * dk..(h + 1) * dk], q_scale);
                l2_normalize(&mut ct[kd + h * dk..kd + (h + 1) * dk], 1.0);
            }
        };
        if n > 1 && crate::tensor::parallel(n * cd) {
            cv.par_chunks_exact_mut(cd).enumerate().for_each(conv);
        } else {
            cv.chunks_exact_mut(cd).enumerate().for_each(conv);
        }
        let mut keep = scratch::zeros(0);
        keep.vec().extend((n..n + hist).flat_map(input));
        st.conv.copy_from_slice(&keep);
        // 3-5. per value head, over the tokens: the gated delta rule, then the gated RMSNorm
        //      rms(o)·w·silu(z). Heads own disjoint states and outputs: one task each.
        let mut oh = scratch::zeros(nv * n * dv);
        let head = |(kv_mem, gate): &mut (scratch::Buf, scratch::Buf),
                    (j, (s, oj)): (usize, (&mut [f32], &mut [f32]))| {
            let kh = self.cfg.k_head_of(j);
            for (t, ot) in oj.chunks_exact_mut(dv).enumerate() {
                let c = &cv[t * cd..(t + 1) * cd];
                let (qj, kj) = (&c[kh * dk..(kh + 1) * dk], &c[kd + kh * dk..kd + (kh + 1) * dk]);
                let vj = &c[2 * kd + j * dv..2 * kd + (j + 1) * dv];
                let beta = sigmoid(b[t * nv + j]);
                let decay = (self.neg_a[j] * softplus(a[t * nv + j] + self.dt_bias[j])).exp();
                delta_step(s, qj, kj, vj, beta, decay, ot, kv_mem);
                let inv = inv_rms(ot, self.eps);
                gate.copy_from_slice(&z[t * vd + j * dv..t * vd + (j + 1) * dv]);
                crate::kernels::silu(gate);
                for ((ov, w), g) in ot.iter_mut().zip(&self.norm_w).zip(gate.iter()) {
                    *ov = *ov * inv * w * g;
                }
            }
        };
        if n == 1 {
            crate::par::zip_chunks_mut(&mut st.s, dk * dv, &mut oh, dv, |j, s, o| {
                head(&mut (scratch::zeros(dv), scratch::zeros(dv)), (j, (s, o)))
            });
        } else {
            st.s.par_chunks_mut(dk * dv)
                .zip(oh.par_chunks_mut(n * dv))
                .enumerate()
                .for_each_init(|| (scratch::zeros(dv), scratch::zeros(dv)), head);
        }
        // head-major → token-major
        let gather = |(t, ot): (usize, &mut [f32])| {
            for (j, oj) in ot.chunks_exact_mut(dv).enumerate() {
                oj.copy_from_slice(&oh[(j * n + t) * dv..(j * n + t + 1) * dv]);
            }
        };
        if n > 1 && crate::tensor::parallel(n * vd) {
            o.par_chunks_exact_mut(vd).enumerate().for_each(gather);
        } else {
            o.chunks_exact_mut(vd).enumerate().for_each(gather);
        }
    }
}
