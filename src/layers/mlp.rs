//! SwiGLU feed-forward: down(silu(gate·x) ⊙ up·x). Used for routed experts, the shared
//! expert and dense layers.

use super::silu;
use crate::tensor::{Mat, MatRef, Precision};

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
        let i = self.gate.rows;
        let mut g = crate::scratch::zeros(n * i);
        let mut u = crate::scratch::zeros(n * i);
        rayon::join(|| self.gate.matmul(x, n, &mut g, p), || self.up.matmul(x, n, &mut u, p));
        for (a, b) in g.iter_mut().zip(&u) {
            *a = silu(*a) * b;
        }
        self.down.matmul(&g, n, out, p);
    }
}
