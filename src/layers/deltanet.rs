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

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's value-head order for Qwen3.5 (tiled: value head `p·n_k + g` is the p-th of
    /// key head g, HF's `g·r + p`), with every value-indexed weight reordered so, gives each
    /// head bit for bit the outputs of HF's grouped order, over a prompt and a decode step.
    #[test]
    fn tiled_value_heads_compute_the_grouped_heads() {
        let (nk, nv, dk, dv, kern, h) = (2, 6, 3, 5, 4, 7);
        let r = nv / nk;
        let grouped = LinearAttnConfig {
            num_k_heads: nk,
            num_v_heads: nv,
            k_head_dim: dk,
            v_head_dim: dv,
            conv_kernel: kern,
            v_heads_tiled: false,
        };
        let (cd, kd, vd) = (grouped.conv_dim(), grouped.key_dim(), grouped.value_dim());
        let mut seed = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.8
                })
                .collect()
        };
        let mat = |rows: usize, cols: usize, v: Vec<f32>| Mat::from_f32(rows, cols, v).unwrap();
        let g = DeltaNet {
            cfg: grouped.clone(),
            in_proj_qkv: mat(cd, h, rnd(cd * h)),
            in_proj_z: mat(vd, h, rnd(vd * h)),
            in_proj_b: mat(nv, h, rnd(nv * h)),
            in_proj_a: mat(nv, h, rnd(nv * h)),
            conv_w: rnd(kern * cd),
            dt_bias: rnd(nv),
            neg_a: rnd(nv).iter().map(|v| -(v.abs() + 0.1)).collect(),
            norm_w: rnd(dv),
            eps: 1e-6,
            out_proj: mat(h, vd, rnd(h * vd)),
        };
        // tiled head i holds grouped head `of(i)`
        let of = |i: usize| (i % nk) * r + i / nk;
        let rows_of = |m: &Mat, base: usize, per: usize| {
            let mut rs: Vec<_> = (0..base).map(|x| x..x + 1).collect();
            rs.extend((0..nv).map(|i| base + of(i) * per..base + (of(i) + 1) * per));
            m.gather_rows(&rs)
        };
        let chans = |v: &[f32], width: usize| -> Vec<f32> {
            v.chunks_exact(width)
                .flat_map(|tap| {
                    let mut c = tap[..2 * kd].to_vec();
                    (0..nv).for_each(|i| c.extend(&tap[2 * kd + of(i) * dv..2 * kd + (of(i) + 1) * dv]));
                    c
                })
                .collect()
        };
        let per_head = |v: &[f32]| (0..nv).map(|i| v[of(i)]).collect::<Vec<f32>>();
        let t = DeltaNet {
            cfg: LinearAttnConfig { v_heads_tiled: true, ..grouped.clone() },
            in_proj_qkv: rows_of(&g.in_proj_qkv, 2 * kd, dv),
            in_proj_z: rows_of(&g.in_proj_z, 0, dv),
            in_proj_b: rows_of(&g.in_proj_b, 0, 1),
            in_proj_a: rows_of(&g.in_proj_a, 0, 1),
            conv_w: chans(&g.conv_w, cd),
            dt_bias: per_head(&g.dt_bias),
            neg_a: per_head(&g.neg_a),
            norm_w: g.norm_w.clone(),
            eps: g.eps,
            out_proj: g.out_proj.clone(),
        };
        let (mut sg, mut st) = (DeltaState::new(&g.cfg), DeltaState::new(&t.cfg));
        for n in [5, 1] {
            let x = rnd(n * h);
            let proj = |d: &DeltaNet| {
                let (mut qkv, mut z, mut b, mut a) =
                    (vec![0.0; n * cd], vec![0.0; n * vd], vec![0.0; n * nv], vec![0.0; n * nv]);
                products(&mut d.in_products(&x, &mut qkv, &mut z, &mut b, &mut a), n, Precision::Exact);
                (qkv, z, b, a)
            };
            let ((q1, z1, b1, a1), (q2, z2, b2, a2)) = (proj(&g), proj(&t));
            let (mut o1, mut o2) = (vec![0.0; n * vd], vec![0.0; n * vd]);
            g.recur(&q1, &z1, &b1, &a1, n, &mut sg, &mut o1);
            t.recur(&q2, &z2, &b2, &a2, n, &mut st, &mut o2);
            for tok in 0..n {
                for i in 0..nv {
                    let want = &o1[tok * vd + of(i) * dv..tok * vd + (of(i) + 1) * dv];
                    assert_eq!(&o2[tok * vd + i * dv..tok * vd + (i + 1) * dv], want, "token {tok} of {n}, head {i}");
                }
            }
        }
    }
}
