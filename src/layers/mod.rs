//! The building blocks of a decoder layer. Every block works on `n` tokens at once
//! (`x` is `[n, hidden]`, row-major) so prefill and decode share one code path.

pub mod attention;
pub mod deltanet;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// ln(1 + eˣ), linear above 20 as in PyTorch.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}
