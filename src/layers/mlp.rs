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
