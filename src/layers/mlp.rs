//! SwiGLU feed-forward: down(silu(gate·x) ⊙ up·x). Used for routed experts, the shared
//! expert and dense layers.

use super::silu;
use crate::tensor::Mat;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

impl Mlp {
    pub fn intermediate(&self) -> usize {
        self.gate.rows
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `out = mlp(x)` for `n` tokens.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let i = self.intermediate();
        let mut g = vec![0.0; n * i];
        let mut u = vec![0.0; n * i];
        self.gate.matmul(x, n, &mut g);
        self.up.matmul(x, n, &mut u);
        for (a, b) in g.iter_mut().zip(&u) {
            *a = silu(*a) * b;
        }
        self.down.matmul(&g, n, out);
    }
}
