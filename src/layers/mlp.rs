//! SwiGLU feed-forward: down(silu(gate·x) ⊙ up·x). Used for routed experts, the shared
//! expert and dense layers.

use crate::tensor::{Mat, MatRef, Precision, Product, products};
use smallvec::SmallVec;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

/// A borrowed SwiGLU block (an expert read into a buffer, or a view of an [`Mlp`]).
#[derive(Clone, Copy, Debug)]
pub struct MlpRef<'a> {
    pub gate: MatRef<'a>,
    pub up: MatRef<'a>,
    pub down: MatRef<'a>,
}

impl Mlp {
    pub fn view(&self) -> MlpRef<'_> {
        MlpRef { gate: self.gate.view(), up: self.up.view(), down: self.down.view() }
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `out = mlp(x)` for `n` tokens.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], p: Precision) {
        self.view().forward(x, n, out, p)
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
        crate::kernels::swiglu(&mut g, &u);
        self.down.matmul(&g, n, out, p);
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
    crate::kernels::swiglu(&mut g, &u);
    let mut jobs: SmallVec<[Product<'_>; 16]> = SmallVec::new();
    let mut gs = &g[..];
    for (m, _, out) in items.iter_mut() {
        let (ga, rest) = gs.split_at(m.gate.rows);
        gs = rest;
        jobs.push(Product { w: m.down, x: ga, y: out });
    }
    products(&mut jobs, 1, p);
}
