//! aarch64 NEON kernels (compile-checked with `cargo check --target aarch64-unknown-linux-gnu`;
//! no aarch64 machine was available to run them).

#![allow(unsafe_op_in_unsafe_fn)] // every function here is an unsafe SIMD kernel

use std::arch::aarch64::*;

/// # Safety
/// NEON must be available (it is on every aarch64 Linux target).
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i)));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a.as_ptr().add(i + 4)), vld1q_f32(b.as_ptr().add(i + 4)));
        i += 8;
    }
    let mut s = vaddvq_f32(vaddq_f32(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 4 <= n {
        let h = vld1_u16(w.as_ptr().add(i));
        let f = vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(h), 16));
        acc = vfmaq_f32(acc, f, vld1q_f32(x.as_ptr().add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(acc);
    while i < n {
        s += super::bf16_to_f32(w[i]) * x[i];
        i += 1;
    }
    s
}
