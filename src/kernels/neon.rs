//! aarch64 NEON kernels. The tests run them under `qemu-aarch64` (see `scripts/test_aarch64.sh`):
//! once with the dot-product extension (`sdot`) and once on a CPU without it.

#![allow(unsafe_op_in_unsafe_fn)] // every function here is an unsafe SIMD kernel

use super::{QPrep, bf16_to_f32};
use std::arch::aarch64::*;
use std::arch::asm;

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

/// y += a·x.
///
/// # Safety
/// NEON must be available.
#[target_feature(enable = "neon")]
pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 4 <= n {
        vst1q_f32(py.add(i), vfmaq_n_f32(vld1q_f32(py.add(i)), vld1q_f32(px.add(i)), a));
        i += 4;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

/// 4 rows × 4 vectors of dot products (the prefill tile): 16 accumulators, each row and
/// vector load used four times.
///
/// # Safety
/// NEON must be available; all eight slices have the same length.
#[target_feature(enable = "neon")]
pub unsafe fn dot4x4(rows: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = rows[0].len();
    let mut acc = [[vdupq_n_f32(0.0); 4]; 4];
    let mut i = 0;
    while i + 4 <= n {
        let xv = [0, 1, 2, 3].map(|t| vld1q_f32(x[t].as_ptr().add(i)));
        for r in 0..4 {
            let w = vld1q_f32(rows[r].as_ptr().add(i));
            for t in 0..4 {
                acc[r][t] = vfmaq_f32(acc[r][t], w, xv[t]);
            }
        }
        i += 4;
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            let mut s = vaddvq_f32(acc[r][t]);
            for j in i..n {
                s += rows[r][j] * x[t][j];
            }
            out[r][t] = s;
        }
    }
    out
}

/// 16 bytes as integers, times the 16 floats at `x`, into two accumulators.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma_u8x16(v: uint8x16_t, x: *const f32, acc: (float32x4_t, float32x4_t)) -> (float32x4_t, float32x4_t) {
    let (lo, hi) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
    let f0 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    let f1 = vcvtq_f32_u32(vmovl_high_u16(lo));
    let f2 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    let f3 = vcvtq_f32_u32(vmovl_high_u16(hi));
    let a0 = vfmaq_f32(acc.0, f0, vld1q_f32(x));
    let a1 = vfmaq_f32(acc.1, f1, vld1q_f32(x.add(4)));
    let a0 = vfmaq_f32(a0, f2, vld1q_f32(x.add(8)));
    let a1 = vfmaq_f32(a1, f3, vld1q_f32(x.add(12)));
    (a0, a1)
}

/// Quantized row · prepared x on f32 activations (see `QPrep`): bits 8, 4 or 2, group a
/// multiple of the chunk. The same lane layout as the x86 kernels: a 16-byte load, masked and
/// shifted, lines up with consecutive elements of the permuted x.
///
/// # Safety
/// NEON must be available; `prep.fast` must hold for this row's sizes.
#[target_feature(enable = "neon")]
pub unsafe fn qdot(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xp, p, group) = (prep.xp.as_ptr(), packed.as_ptr(), prep.group);
    let mut acc = vdupq_n_f32(0.0);
    let mut bacc = 0.0f32;
    let (m4, m2) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x03));
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(prep.xp.len()));
        let mut ga = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        match prep.bits {
            4 => {
                while e < end {
                    let v = vld1q_u8(p.add(e / 2));
                    ga = fma_u8x16(vandq_u8(v, m4), xp.add(e), ga);
                    ga = fma_u8x16(vshrq_n_u8::<4>(v), xp.add(e + 16), ga);
                    e += 32;
                }
            }
            8 => {
                while e < end {
                    ga = fma_u8x16(vld1q_u8(p.add(e)), xp.add(e), ga);
                    e += 16;
                }
            }
            _ => {
                while e < end {
                    let v = vld1q_u8(p.add(e / 4));
                    ga = fma_u8x16(vandq_u8(v, m2), xp.add(e), ga);
                    ga = fma_u8x16(vandq_u8(vshrq_n_u8::<2>(v), m2), xp.add(e + 16), ga);
                    ga = fma_u8x16(vandq_u8(vshrq_n_u8::<4>(v), m2), xp.add(e + 32), ga);
                    ga = fma_u8x16(vshrq_n_u8::<6>(v), xp.add(e + 48), ga);
                    e += 64;
                }
            }
        }
        acc = vfmaq_n_f32(acc, vaddq_f32(ga.0, ga.1), bf16_to_f32(s));
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    vaddvq_f32(acc) + bacc
}

/// `acc += Σ a·b` per 4-byte lane group (`sdot`; the intrinsic is not stable in Rust yet).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: uint8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) r, in(vreg) a, in(vreg) b,
         options(pure, nomem, nostack));
    r
}

/// Quantized row · int8 activations with `sdot` (q4 and q2 only: their unpacked weights fit a
/// signed byte), the int8 counterpart of the x86 `qdot_vnni`; each 64-element block of
/// `prep.xq` is ordered like the weight bytes it meets.
///
/// # Safety
/// NEON and the dot-product extension must be available; `prep.int8` must hold, bits 4 or 2.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn qdot_sdot(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xq, p, group) = (prep.xq.as_ptr(), packed.as_ptr(), prep.group);
    let cols = prep.xp.len();
    let mut acc = vdupq_n_f32(0.0);
    let mut bacc = 0.0f32;
    let (m4, m2) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x03));
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        let (mut d0, mut d1) = (vdupq_n_s32(0), vdupq_n_s32(0));
        let x = |k: usize| vld1q_s8(xq.add(k));
        while e < end {
            if prep.bits == 4 {
                let (v0, v1) = (vld1q_u8(p.add(e / 2)), vld1q_u8(p.add(e / 2 + 16)));
                d0 = sdot(d0, vandq_u8(v0, m4), x(e));
                d1 = sdot(d1, vandq_u8(v1, m4), x(e + 16));
                d0 = sdot(d0, vshrq_n_u8::<4>(v0), x(e + 32));
                d1 = sdot(d1, vshrq_n_u8::<4>(v1), x(e + 48));
            } else {
                let v = vld1q_u8(p.add(e / 4));
                d0 = sdot(d0, vandq_u8(v, m2), x(e));
                d1 = sdot(d1, vandq_u8(vshrq_n_u8::<2>(v), m2), x(e + 16));
                d0 = sdot(d0, vandq_u8(vshrq_n_u8::<4>(v), m2), x(e + 32));
                d1 = sdot(d1, vshrq_n_u8::<6>(v), x(e + 48));
            }
            e += 64;
        }
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(vaddq_s32(d0, d1)), bf16_to_f32(s) * prep.xscale[g]);
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    vaddvq_f32(acc) + bacc
}
