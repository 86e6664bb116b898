//! SwiGLU feed-forward: down(silu(gate·x) ⊙ up·x). Used for routed experts, the shared
//! expert and dense layers. gpt-oss's experts add biases to all three products and clamp
//! their activation ([`Act`]).

pub use crate::config::Act;
use crate::tensor::{Mat, MatRef, Precision, Product, products, products_rows};
use smallvec::SmallVec;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
    /// Biases of gate, up and down.
    pub bias: Option<Arc<[Vec<f32>; 3]>>,
    pub act: Act,
}

/// A borrowed SwiGLU block (an expert read into a buffer, or a view of an [`Mlp`]).
#[derive(Clone, Copy, Debug)]
pub struct MlpRef<'a> {
    pub gate: MatRef<'a>,
    pub up: MatRef<'a>,
    pub down: MatRef<'a>,
    pub bias: Option<[&'a [f32]; 3]>,
    pub act: Act,
}

impl Mlp {
    /// A plain SwiGLU block.
    pub fn new(gate: Mat, up: Mat, down: Mat) -> Mlp {
        Mlp { gate, up, down, bias: None, act: Act::Swiglu }
    }

    pub fn view(&self) -> MlpRef<'_> {
        let bias = self.bias.as_deref().map(|[g, u, d]| [&g[..], &u[..], &d[..]]);
        MlpRef { gate: self.gate.view(), up: self.up.view(), down: self.down.view(), bias, act: self.act }
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `out = mlp(x)` for `n` tokens.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], p: Precision) {
        self.view().forward(x, n, out, p)
    }
}

/// The hidden activation of rows `r0..` of a block, in place on `g` (`u`: the same rows of
/// the up product): biases first, then the block's activation.
pub fn activate(g: &mut [f32], u: &mut [f32], r0: usize, bias: Option<[&[f32]; 3]>, act: Act) {
    if let Some([bg, bu, _]) = bias {
        crate::kernels::axpy(1.0, &bg[r0..r0 + g.len()], g);
        crate::kernels::axpy(1.0, &bu[r0..r0 + u.len()], u);
    }
    match act {
        Act::Swiglu => crate::kernels::swiglu(g, u),
        Act::ClampedSwiglu { alpha, limit } => {
            for (g, &u) in g.iter_mut().zip(u.iter()) {
                let x = g.min(limit);
                *g = x / (1.0 + (-alpha * x).exp()) * (u.clamp(-limit, limit) + 1.0);
            }
        }
    }
}

impl MlpRef<'_> {
    /// `out = mlp(x)` for `n` tokens.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], p: Precision) {
        if n == 1 {
            return forward_each(&mut [(*self, x, out)], p);
        }
        let i = self.gate.rows;
        let mut g = crate::scratch::zeros(n * i);
        let mut u = crate::scratch::zeros(n * i);
        products(&mut [Product { w: self.gate, x, y: &mut g }, Product { w: self.up, x, y: &mut u }], n, p);
        if self.bias.is_none() && self.act == Act::Swiglu {
            crate::kernels::swiglu(&mut g, &u);
        } else {
            g.chunks_mut(i).zip(u.chunks_mut(i)).for_each(|(g, u)| activate(g, u, 0, self.bias, self.act));
        }
        self.down.matmul(&g, n, out, p);
        if let Some([_, _, bd]) = self.bias {
            out.chunks_exact_mut(bd.len()).for_each(|o| crate::kernels::axpy(1.0, bd, o));
        }
    }
}

/// `out_i = mlp_i(x_i)` for one token each (decode's routed experts): the gate and up products
/// of every block form one parallel step and the down products a second, so the threads start
/// twice per layer rather than three times per expert, and a shared input is prepared once.
pub fn forward_each(items: &mut [(MlpRef<'_>, &[f32], &mut [f32])], p: Precision) {
    let inter: usize = items.iter().map(|it| it.0.gate.rows).sum();
    let mut g = crate::scratch::zeros(inter);
    let mut u = crate::scratch::zeros(inter);
    let mut jobs: SmallVec<[Product<'_>; 32]> = SmallVec::new();
    let (mut gs, mut us) = (&mut g[..], &mut u[..]);
    for (m, x, _) in items.iter() {
        let (ga, rest) = std::mem::take(&mut gs).split_at_mut(m.gate.rows);
        gs = rest;
        let (ua, rest) = std::mem::take(&mut us).split_at_mut(m.up.rows);
        us = rest;
        jobs.push(Product { w: m.gate, x, y: ga });
        jobs.push(Product { w: m.up, x, y: ua });
    }
    products(&mut jobs, 1, p);
    drop(jobs);
    if items.iter().all(|it| it.0.bias.is_none() && it.0.act == Act::Swiglu) {
        crate::kernels::swiglu(&mut g, &u);
    } else {
        let (mut gs, mut us) = (&mut g[..], &mut u[..]);
        for (m, _, _) in items.iter() {
            let (ga, rest) = std::mem::take(&mut gs).split_at_mut(m.gate.rows);
            gs = rest;
            let (ua, rest) = std::mem::take(&mut us).split_at_mut(m.up.rows);
            us = rest;
            activate(ga, ua, 0, m.bias, m.act);
        }
    }
    let mut jobs: SmallVec<[Product<'_>; 16]> = SmallVec::new();
    let mut gs = &g[..];
    for (m, _, out) in items.iter_mut() {
        let (ga, rest) = gs.split_at(m.gate.rows);
        gs = rest;
        jobs.push(Product { w: m.down, x: ga, y: out });
    }
    products(&mut jobs, 1, p);
    drop(jobs);
    for (m, _, out) in items.iter_mut() {
        if let Some([_, _, bd]) = m.bias {
            crate::kernels::axpy(1.0, bd, out);
        }
    }
}

/// [`forward_each`] for blocks that each take several tokens, each token one decode step of
/// its own sequence (a batch of sequences; a routed expert and the rows that chose it): `x` is
/// `[n, cols]`, `out` `[n, hidden]`. Every token's output is bit for bit what [`forward_each`]
/// gives it alone, while each weight row is read once for all of a block's tokens
/// ([`products_rows`]).
pub fn forward_rows_each(items: &mut [(MlpRef<'_>, &[f32], &mut [f32])], p: Precision) {
    let tokens = |m: &MlpRef<'_>, x: &[f32]| x.len() / m.gate.cols.max(1);
    let inter: usize = items.iter().map(|it| it.0.gate.rows * tokens(&it.0, it.1)).sum();
    let mut g = crate::scratch::zeros(inter);
    let mut u = crate::scratch::zeros(inter);
    let mut jobs: SmallVec<[Product<'_>; 32]> = SmallVec::new();
    let (mut gs, mut us) = (&mut g[..], &mut u[..]);
    for (m, x, _) in items.iter() {
        let n = tokens(m, x);
        let (ga, rest) = std::mem::take(&mut gs).split_at_mut(m.gate.rows * n);
        gs = rest;
        let (ua, rest) = std::mem::take(&mut us).split_at_mut(m.up.rows * n);
        us = rest;
        jobs.push(Product { w: m.gate, x, y: ga });
        jobs.push(Product { w: m.up, x, y: ua });
    }
    products_rows(&mut jobs, p);
    drop(jobs);
    if items.iter().all(|it| it.0.bias.is_none() && it.0.act == Act::Swiglu) {
        crate::kernels::swiglu(&mut g, &u);
    } else {
        let (mut gs, mut us) = (&mut g[..], &mut u[..]);
        for (m, x, _) in items.iter() {
            for _ in 0..tokens(m, x) {
                let (ga, rest) = std::mem::take(&mut gs).split_at_mut(m.gate.rows);
                gs = rest;
                let (ua, rest) = std::mem::take(&mut us).split_at_mut(m.up.rows);
                us = rest;
                activate(ga, ua, 0, m.bias, m.act);
            }
        }
    }
    let mut jobs: SmallVec<[Product<'_>; 16]> = SmallVec::new();
    let mut gs = &g[..];
    for (m, x, out) in items.iter_mut() {
        let (ga, rest) = gs.split_at(m.gate.rows * tokens(m, x));
        gs = rest;
        jobs.push(Product { w: m.down, x: ga, y: out });
    }
    products_rows(&mut jobs, p);
    drop(jobs);
    for (m, _, out) in items.iter_mut() {
        if let Some([_, _, bd]) = m.bias {
            out.chunks_exact_mut(bd.len()).for_each(|o| crate::kernels::axpy(1.0, bd, o));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::WKind;
    use crate::testutil::uniform;

    #[test]
    fn blocks_over_rows_are_each_row_alone_bit_for_bit() {
        let mat = |rows: usize, cols: usize, seed: u64, kind: WKind| {
            Mat::from_f32(rows, cols, uniform(rows * cols, seed).iter().map(|v| v * 0.5).collect())
                .unwrap()
                .to_kind(kind)
        };
        for kind in [WKind::BF16, WKind::Q { bits: 4, group: 64 }, WKind::Q { bits: 8, group: 64 }, WKind::F32] {
            for (hidden, inter) in [(128, 192), (64, 40)] {
                let blocks: Vec<Mlp> = (0..3)
                    .map(|e| {
                        Mlp::new(
                            mat(inter, hidden, 10 + e, kind),
                            mat(inter, hidden, 20 + e, kind),
                            mat(hidden, inter, 30 + e, kind),
                        )
                    })
                    .collect();
                let mut clamped = blocks[2].clone();
                clamped.act = Act::ClampedSwiglu { alpha: 1.7, limit: 0.4 };
                clamped.bias = Some(Arc::new([uniform(inter, 1), uniform(inter, 2), uniform(hidden, 3)]));
                let blocks = [&blocks[0], &blocks[1], &clamped];
                // block i takes i + 2 rows
                let xs: Vec<Vec<f32>> = (0..3).map(|i| uniform((i + 2) * hidden, 50 + i as u64)).collect();
                for p in [Precision::Exact, Precision::Fast] {
                    let mut want: Vec<Vec<f32>> = xs.iter().map(|x| vec![0.0; x.len()]).collect();
                    for ((b, x), w) in blocks.iter().zip(&xs).zip(want.iter_mut()) {
                        for (xt, wt) in x.chunks(hidden).zip(w.chunks_mut(hidden)) {
                            forward_each(&mut [(b.view(), xt, wt)], p);
                        }
                    }
                    let mut got: Vec<Vec<f32>> = xs.iter().map(|x| vec![f32::NAN; x.len()]).collect();
                    let mut items: Vec<_> = blocks
                        .iter()
                        .zip(&xs)
                        .zip(got.iter_mut())
                        .map(|((b, x), g)| (b.view(), &x[..], &mut g[..]))
                        .collect();
                    forward_rows_each(&mut items, p);
                    assert_eq!(got, want, "{kind:?} {hidden}x{inter} {p:?}");
                }
            }
        }
    }
}
