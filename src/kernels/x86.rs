//! x86-64 kernels: AVX-512 (F + BW) and AVX2 + FMA. Every function requires its features,
//! which the dispatcher in `mod.rs` checks at run time.

#![allow(unsafe_op_in_unsafe_fn)] // every function here is an unsafe SIMD kernel

use super::{QPrep, bf16_to_f32};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn widen_bf16_512(p: *const u16) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_bf16_256(p: *const u16) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
}

/// 16 bytes → 16 floats.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn u8x16_512(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
}

/// 16 bytes, times 16 floats at `x`, into `acc` (as two halves of 8).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_u8x16_256(v: __m128i, x: *const f32, acc: __m256) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
    _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), a1);
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), a0);
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), a1);
        i += 16;
    }
    let mut s = hsum256(_mm256_add_ps(a0, a1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot4_f32_avx512(row: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n = row.len();
    let pr = row.as_ptr();
    let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 16 <= n {
        let r = _mm512_loadu_ps(pr.add(i));
        for k in 0..4 {
            acc[k] = _mm512_fmadd_ps(r, _mm512_loadu_ps(px[k].add(i)), acc[k]);
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let r = _mm512_maskz_loadu_ps(m, pr.add(i));
        for k in 0..4 {
            acc[k] = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(m, px[k].add(i)), acc[k]);
        }
    }
    [
        _mm512_reduce_add_ps(acc[0]),
        _mm512_reduce_add_ps(acc[1]),
        _mm512_reduce_add_ps(acc[2]),
        _mm512_reduce_add_ps(acc[3]),
    ]
}

/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_f32_avx2(row: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n = row.len();
    let pr = row.as_ptr();
    let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= n {
        let r = _mm256_loadu_ps(pr.add(i));
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(r, _mm256_loadu_ps(px[k].add(i)), acc[k]);
        }
        i += 8;
    }
    let mut out = [hsum256(acc[0]), hsum256(acc[1]), hsum256(acc[2]), hsum256(acc[3])];
    while i < n {
        for k in 0..4 {
            out[k] += row[i] * x[k][i];
        }
        i += 1;
    }
    out
}

/// # Safety
/// AVX-512F and AVX-512BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_bf16_avx512(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(widen_bf16_512(pw.add(i)), _mm512_loadu_ps(px.add(i)), a0);
        a1 = _mm512_fmadd_ps(widen_bf16_512(pw.add(i + 16)), _mm512_loadu_ps(px.add(i + 16)), a1);
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    while i < n {
        s += bf16_to_f32(w[i]) * x[i];
        i += 1;
    }
    s
}

/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(widen_bf16_256(pw.add(i)), _mm256_loadu_ps(px.add(i)), a0);
        a1 = _mm256_fmadd_ps(widen_bf16_256(pw.add(i + 8)), _mm256_loadu_ps(px.add(i + 8)), a1);
        i += 16;
    }
    let mut s = hsum256(_mm256_add_ps(a0, a1));
    while i < n {
        s += bf16_to_f32(w[i]) * x[i];
        i += 1;
    }
    s
}

/// Quantized row · prepared x (see `QPrep`): bits 8, 4 or 2, group a multiple of the chunk.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `prep.fast` must hold for this row's sizes.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn qdot_avx512(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xp, p, group) = (prep.xp.as_ptr(), packed.as_ptr(), prep.group);
    let mut acc = _mm512_setzero_ps();
    let mut bacc = 0.0f32;
    let lo4 = _mm_set1_epi8(0x0f);
    let lo2 = _mm_set1_epi8(0x03);
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(prep.xp.len()));
        let mut ga = _mm512_setzero_ps();
        match prep.bits {
            4 => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 2) as *const __m128i);
                    ga = _mm512_fmadd_ps(u8x16_512(_mm_and_si128(v, lo4)), _mm512_loadu_ps(xp.add(e)), ga);
                    ga = _mm512_fmadd_ps(
                        u8x16_512(_mm_and_si128(_mm_srli_epi16(v, 4), lo4)),
                        _mm512_loadu_ps(xp.add(e + 16)),
                        ga,
                    );
                    e += 32;
                }
            }
            8 => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e) as *const __m128i);
                    ga = _mm512_fmadd_ps(u8x16_512(v), _mm512_loadu_ps(xp.add(e)), ga);
                    e += 16;
                }
            }
            _ => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 4) as *const __m128i);
                    ga = _mm512_fmadd_ps(u8x16_512(_mm_and_si128(v, lo2)), _mm512_loadu_ps(xp.add(e)), ga);
                    ga = _mm512_fmadd_ps(
                        u8x16_512(_mm_and_si128(_mm_srli_epi16(v, 2), lo2)),
                        _mm512_loadu_ps(xp.add(e + 16)),
                        ga,
                    );
                    ga = _mm512_fmadd_ps(
                        u8x16_512(_mm_and_si128(_mm_srli_epi16(v, 4), lo2)),
                        _mm512_loadu_ps(xp.add(e + 32)),
                        ga,
                    );
                    ga = _mm512_fmadd_ps(
                        u8x16_512(_mm_and_si128(_mm_srli_epi16(v, 6), lo2)),
                        _mm512_loadu_ps(xp.add(e + 48)),
                        ga,
                    );
                    e += 64;
                }
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(s)), ga, acc);
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    _mm512_reduce_add_ps(acc) + bacc
}

/// AVX2 version of [`qdot_avx512`].
///
/// # Safety
/// AVX2 and FMA must be available; `prep.fast` must hold for this row's sizes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn qdot_avx2(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xp, p, group) = (prep.xp.as_ptr(), packed.as_ptr(), prep.group);
    let mut acc = _mm256_setzero_ps();
    let mut bacc = 0.0f32;
    let lo4 = _mm_set1_epi8(0x0f);
    let lo2 = _mm_set1_epi8(0x03);
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(prep.xp.len()));
        let mut ga = _mm256_setzero_ps();
        match prep.bits {
            4 => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 2) as *const __m128i);
                    ga = fma_u8x16_256(_mm_and_si128(v, lo4), xp.add(e), ga);
                    ga = fma_u8x16_256(_mm_and_si128(_mm_srli_epi16(v, 4), lo4), xp.add(e + 16), ga);
                    e += 32;
                }
            }
            8 => {
                while e < end {
                    ga = fma_u8x16_256(_mm_loadu_si128(p.add(e) as *const __m128i), xp.add(e), ga);
                    e += 16;
                }
            }
            _ => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 4) as *const __m128i);
                    for ph in 0..4 {
                        let sh = _mm_srl_epi16(v, _mm_cvtsi32_si128(2 * ph as i32));
                        ga = fma_u8x16_256(_mm_and_si128(sh, lo2), xp.add(e + 16 * ph), ga);
                    }
                    e += 64;
                }
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_f32(s)), ga, acc);
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    hsum256(acc) + bacc
}

/// Quantized row · int8 activations with `vpdpbusd` (u8 weights × s8 activations → i32), one
/// 64-element block per instruction; then scaled per group by (weight scale × activation scale).
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; `prep.int8` must hold for this row's sizes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn qdot_vnni(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xq, p, group) = (prep.xq.as_ptr(), packed.as_ptr(), prep.group);
    let cols = prep.xp.len();
    let mut acc = _mm512_setzero_ps();
    let mut bacc = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm_set1_epi8(0x03);
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        let mut d = _mm512_setzero_si512();
        while e < end {
            let w = match prep.bits {
                4 => {
                    let v = _mm256_loadu_si256(p.add(e / 2) as *const __m256i);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                }
                8 => _mm512_loadu_si512(p.add(e) as *const __m512i),
                _ => {
                    let v = _mm_loadu_si128(p.add(e / 4) as *const __m128i);
                    let p0 = _mm_and_si128(v, m2);
                    let p1 = _mm_and_si128(_mm_srli_epi16(v, 2), m2);
                    let p2 = _mm_and_si128(_mm_srli_epi16(v, 4), m2);
                    let p3 = _mm_and_si128(_mm_srli_epi16(v, 6), m2);
                    let lo = _mm256_inserti128_si256(_mm256_castsi128_si256(p0), p1, 1);
                    let hi = _mm256_inserti128_si256(_mm256_castsi128_si256(p2), p3, 1);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                }
            };
            d = _mm512_dpbusd_epi32(d, w, _mm512_loadu_si512(xq.add(e) as *const __m512i));
            e += 64;
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bf16_to_f32(s) * prep.xscale[g]), acc);
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    _mm512_reduce_add_ps(acc) + bacc
}

/// [`qdot_vnni`] for q4/q8 rows in groups of exactly 64 (one `vpdpbusd` per group): the
/// group scales (× activation scales) and the bias terms are computed 16 groups at a time in
/// vectors, and two accumulators break the FMA chain.
///
/// # Safety
/// AVX-512F/BW/VL/VNNI must be available; `prep.int8` must hold, with `prep.group == 64` and
/// `prep.bits` 4 or 8.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn qdot_vnni_g64<const BITS: usize>(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (xq, p) = (prep.xq.as_ptr(), packed.as_ptr());
    let (xscale, xsum) = (prep.xscale.as_ptr(), prep.xsum.as_ptr());
    let ng = scales.len();
    // the per-group step, shared with `qdot_vnni_g64_multi` (which must sum as this does)
    let dot = |g: usize| g64_dot(g64_weights::<BITS>(p, g), xq, g);
    let widen = |m: __mmask16, q: *const u16| widen_bf16_masked(m, q);
    let (mut acc0, mut acc1, mut bacc) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    let mut sc = [0f32; 16];
    let mut g = 0;
    while g < ng {
        let n = (ng - g).min(16);
        let m: __mmask16 = ((1u32 << n) - 1) as u16;
        let s = _mm512_mul_ps(widen(m, scales.as_ptr().add(g)), _mm512_maskz_loadu_ps(m, xscale.add(g)));
        _mm512_storeu_ps(sc.as_mut_ptr(), s);
        bacc = _mm512_fmadd_ps(widen(m, biases.as_ptr().add(g)), _mm512_maskz_loadu_ps(m, xsum.add(g)), bacc);
        let mut j = 0;
        while j + 2 <= n {
            acc0 = _mm512_fmadd_ps(dot(g + j), _mm512_set1_ps(sc[j]), acc0);
            acc1 = _mm512_fmadd_ps(dot(g + j + 1), _mm512_set1_ps(sc[j + 1]), acc1);
            j += 2;
        }
        if j < n {
            acc0 = _mm512_fmadd_ps(dot(g + j), _mm512_set1_ps(sc[j]), acc0);
        }
        g += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + _mm512_reduce_add_ps(bacc)
}

/// Group `g` of a group-64 q4 (low nibbles, then high) or q8 row as 64 weight bytes, lined up
/// with the prepared int8 activations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn g64_weights<const BITS: usize>(p: *const u8, g: usize) -> __m512i {
    if BITS == 4 {
        let m4 = _mm256_set1_epi8(0x0f);
        let v = _mm256_loadu_si256(p.add(g * 32) as *const __m256i);
        let (lo, hi) = (_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    } else {
        _mm512_loadu_si512(p.add(g * 64) as *const __m512i)
    }
}

/// Group `g`'s integer dot of weights `w` with the int8 activations `xq` (16 partial sums of
/// four products each), as floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn g64_dot(w: __m512i, xq: *const i8, g: usize) -> __m512 {
    let x = _mm512_loadu_si512(xq.add(g * 64) as *const __m512i);
    _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x))
}

/// The bf16 values at `q` in the lanes of `m` (the rest zero), widened to f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_bf16_masked(m: __mmask16, q: *const u16) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, q as *const i16)), 16))
}

/// [`qdot_vnni_g64`] of one row against `N` prepared activation vectors at once: each group's
/// weights are loaded and unpacked once for all of them (a batch of sequences' decode step),
/// and every vector keeps its own accumulators, updated in the one-token kernel's order, so
/// `out[t]` is bit for bit `qdot_vnni_g64(.., preps[t])`. Keep the two in step.
///
/// # Safety
/// As [`qdot_vnni_g64`], for every one of `preps`; `out` holds `N` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn qdot_vnni_g64_multi<const BITS: usize, const N: usize>(
    packed: &[u8],
    scales: &[u16],
    biases: &[u16],
    preps: [&QPrep; N],
    out: &mut [f32],
) {
    let p = packed.as_ptr();
    let xq: [*const i8; N] = std::array::from_fn(|t| preps[t].xq.as_ptr());
    let xscale: [*const f32; N] = std::array::from_fn(|t| preps[t].xscale.as_ptr());
    let xsum: [*const f32; N] = std::array::from_fn(|t| preps[t].xsum.as_ptr());
    let ng = scales.len();
    let (mut acc0, mut acc1, mut bacc) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
    let mut sc = [[0f32; 16]; N];
    let mut g = 0;
    while g < ng {
        let n = (ng - g).min(16);
        let m: __mmask16 = ((1u32 << n) - 1) as u16;
        let (ws, wb) = (widen_bf16_masked(m, scales.as_ptr().add(g)), widen_bf16_masked(m, biases.as_ptr().add(g)));
        for t in 0..N {
            let s = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(m, xscale[t].add(g)));
            _mm512_storeu_ps(sc[t].as_mut_ptr(), s);
            bacc[t] = _mm512_fmadd_ps(wb, _mm512_maskz_loadu_ps(m, xsum[t].add(g)), bacc[t]);
        }
        let mut j = 0;
        while j + 2 <= n {
            let (w0, w1) = (g64_weights::<BITS>(p, g + j), g64_weights::<BITS>(p, g + j + 1));
            for t in 0..N {
                acc0[t] = _mm512_fmadd_ps(g64_dot(w0, xq[t], g + j), _mm512_set1_ps(sc[t][j]), acc0[t]);
                acc1[t] = _mm512_fmadd_ps(g64_dot(w1, xq[t], g + j + 1), _mm512_set1_ps(sc[t][j + 1]), acc1[t]);
            }
            j += 2;
        }
        if j < n {
            let w0 = g64_weights::<BITS>(p, g + j);
            for t in 0..N {
                acc0[t] = _mm512_fmadd_ps(g64_dot(w0, xq[t], g + j), _mm512_set1_ps(sc[t][j]), acc0[t]);
            }
        }
        g += 16;
    }
    for t in 0..N {
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + _mm512_reduce_add_ps(bacc[t]);
    }
}

/// [`dot_bf16_avx512`] of `R` bf16 rows against `N` vectors, each row widened once for all
/// vectors and each vector loaded once for all rows: `out[r][t]` is bit for bit
/// `dot_bf16_avx512(w[r], xs[t])` (every pair keeps that kernel's two accumulators).
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; every row and every `xs[t]` has the same length.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_bf16_avx512_multi<const R: usize, const N: usize>(
    w: [&[u16]; R],
    xs: [&[f32]; N],
    out: &mut [[f32; N]; R],
) {
    let n = w[0].len();
    let pw: [*const u16; R] = std::array::from_fn(|r| w[r].as_ptr());
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let (mut a0, mut a1) = ([[_mm512_setzero_ps(); N]; R], [[_mm512_setzero_ps(); N]; R]);
    let mut i = 0;
    while i + 32 <= n {
        let w0: [__m512; R] = std::array::from_fn(|r| widen_bf16_512(pw[r].add(i)));
        let w1: [__m512; R] = std::array::from_fn(|r| widen_bf16_512(pw[r].add(i + 16)));
        for t in 0..N {
            let (x0, x1) = (_mm512_loadu_ps(px[t].add(i)), _mm512_loadu_ps(px[t].add(i + 16)));
            for r in 0..R {
                a0[r][t] = _mm512_fmadd_ps(w0[r], x0, a0[r][t]);
                a1[r][t] = _mm512_fmadd_ps(w1[r], x1, a1[r][t]);
            }
        }
        i += 32;
    }
    for r in 0..R {
        for t in 0..N {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][t], a1[r][t]));
            for k in i..n {
                s += bf16_to_f32(w[r][k]) * xs[t][k];
            }
            out[r][t] = s;
        }
    }
}

/// [`dot_f32_avx512`] of one row against `N` vectors, the row loaded once for all: `out[t]`
/// is bit for bit `dot_f32_avx512(a, xs[t])`.
///
/// # Safety
/// AVX-512F must be available; every `xs[t]` is as long as `a`; `out` holds `N`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f32_avx512_multi<const N: usize>(a: &[f32], xs: [&[f32]; N], out: &mut [f32]) {
    let n = a.len();
    let pa = a.as_ptr();
    let pb: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let (mut a0, mut a1) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
    let mut i = 0;
    while i + 32 <= n {
        let (r0, r1) = (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pa.add(i + 16)));
        for t in 0..N {
            a0[t] = _mm512_fmadd_ps(r0, _mm512_loadu_ps(pb[t].add(i)), a0[t]);
            a1[t] = _mm512_fmadd_ps(r1, _mm512_loadu_ps(pb[t].add(i + 16)), a1[t]);
        }
        i += 32;
    }
    if i + 16 <= n {
        let r0 = _mm512_loadu_ps(pa.add(i));
        for t in 0..N {
            a0[t] = _mm512_fmadd_ps(r0, _mm512_loadu_ps(pb[t].add(i)), a0[t]);
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let r = _mm512_maskz_loadu_ps(m, pa.add(i));
        for t in 0..N {
            a1[t] = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(m, pb[t].add(i)), a1[t]);
        }
    }
    for t in 0..N {
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
    }
}

/// [`dot_f32_avx2`] of one row against `N` vectors, the row loaded once for all: `out[t]` is
/// bit for bit `dot_f32_avx2(a, xs[t])`.
///
/// # Safety
/// AVX2 and FMA must be available; every `xs[t]` is as long as `a`; `out` holds `N`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2_multi<const N: usize>(a: &[f32], xs: [&[f32]; N], out: &mut [f32]) {
    let n = a.len();
    let pa = a.as_ptr();
    let pb: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let mut i = 0;
    while i + 16 <= n {
        let (r0, r1) = (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pa.add(i + 8)));
        for t in 0..N {
            a0[t] = _mm256_fmadd_ps(r0, _mm256_loadu_ps(pb[t].add(i)), a0[t]);
            a1[t] = _mm256_fmadd_ps(r1, _mm256_loadu_ps(pb[t].add(i + 8)), a1[t]);
        }
        i += 16;
    }
    for t in 0..N {
        let mut s = hsum256(_mm256_add_ps(a0[t], a1[t]));
        for k in i..n {
            s += a[k] * xs[t][k];
        }
        out[t] = s;
    }
}

/// [`dot_bf16_avx2`] of one row against `N` vectors, the row widened once for all: `out[t]`
/// is bit for bit `dot_bf16_avx2(w, xs[t])`.
///
/// # Safety
/// AVX2 and FMA must be available; every `xs[t]` is as long as `w`; `out` holds `N`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16_avx2_multi<const N: usize>(w: &[u16], xs: [&[f32]; N], out: &mut [f32]) {
    let n = w.len();
    let pw = w.as_ptr();
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = (widen_bf16_256(pw.add(i)), widen_bf16_256(pw.add(i + 8)));
        for t in 0..N {
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(px[t].add(i)), a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(px[t].add(i + 8)), a1[t]);
        }
        i += 16;
    }
    for t in 0..N {
        let mut s = hsum256(_mm256_add_ps(a0[t], a1[t]));
        for k in i..n {
            s += bf16_to_f32(w[k]) * xs[t][k];
        }
        out[t] = s;
    }
}

/// 16 bytes as two halves of 8 floats (as [`fma_u8x16_256`] widens them).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn u8x16_256(v: __m128i) -> (__m256, __m256) {
    (_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))))
}

/// `acc` + the widened 16 bytes `(a, b)` times 16 floats at `x`, in [`fma_u8x16_256`]'s order.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_wide_256((a, b): (__m256, __m256), x: *const f32, acc: __m256) -> __m256 {
    _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc))
}

/// [`qdot_avx2`] of one row against `N` prepared vectors, each 16 packed weights widened once
/// for all: `out[t]` is bit for bit `qdot_avx2(packed, scales, biases, preps[t])`.
///
/// # Safety
/// AVX2 and FMA must be available; `prep.fast` must hold for this row's sizes, and every prep
/// has the first one's bits, group and length; `out` holds `N`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn qdot_avx2_multi<const N: usize>(
    packed: &[u8],
    scales: &[u16],
    biases: &[u16],
    preps: [&QPrep; N],
    out: &mut [f32],
) {
    let (p, group, bits, cols) = (packed.as_ptr(), preps[0].group, preps[0].bits, preps[0].xp.len());
    let xp: [*const f32; N] = std::array::from_fn(|t| preps[t].xp.as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let mut bacc = [0.0f32; N];
    let lo4 = _mm_set1_epi8(0x0f);
    let lo2 = _mm_set1_epi8(0x03);
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        let mut ga = [_mm256_setzero_ps(); N];
        match bits {
            4 => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 2) as *const __m128i);
                    let (lo, hi) =
                        (u8x16_256(_mm_and_si128(v, lo4)), u8x16_256(_mm_and_si128(_mm_srli_epi16(v, 4), lo4)));
                    for t in 0..N {
                        ga[t] = fma_wide_256(lo, xp[t].add(e), ga[t]);
                        ga[t] = fma_wide_256(hi, xp[t].add(e + 16), ga[t]);
                    }
                    e += 32;
                }
            }
            8 => {
                while e < end {
                    let w = u8x16_256(_mm_loadu_si128(p.add(e) as *const __m128i));
                    for t in 0..N {
                        ga[t] = fma_wide_256(w, xp[t].add(e), ga[t]);
                    }
                    e += 16;
                }
            }
            _ => {
                while e < end {
                    let v = _mm_loadu_si128(p.add(e / 4) as *const __m128i);
                    for ph in 0..4 {
                        let sh = _mm_srl_epi16(v, _mm_cvtsi32_si128(2 * ph as i32));
                        let w = u8x16_256(_mm_and_si128(sh, lo2));
                        for t in 0..N {
                            ga[t] = fma_wide_256(w, xp[t].add(e + 16 * ph), ga[t]);
                        }
                    }
                    e += 64;
                }
            }
        }
        let sc = _mm256_set1_ps(bf16_to_f32(s));
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(sc, ga[t], acc[t]);
            bacc[t] += bf16_to_f32(b) * preps[t].xsum[g];
        }
    }
    for t in 0..N {
        out[t] = hsum256(acc[t]) + bacc[t];
    }
}

/// Dequantizes one q4 or q8 row (natural element order) into `out`: w = scale·q + bias.
///
/// # Safety
/// AVX-512F/BW must be available; `out.len()` and `group` must be multiples of 32.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dequant_row_avx512(
    packed: &[u8],
    scales: &[u16],
    biases: &[u16],
    bits: u8,
    group: usize,
    out: &mut [f32],
) {
    let (p, o) = (packed.as_ptr(), out.as_mut_ptr());
    let m4 = _mm_set1_epi8(0x0f);
    let cols = out.len();
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (vs, vb) = (_mm512_set1_ps(bf16_to_f32(s)), _mm512_set1_ps(bf16_to_f32(b)));
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        while e < end {
            let (a, c) = if bits == 4 {
                let v = _mm_loadu_si128(p.add(e / 2) as *const __m128i);
                let (lo, hi) = (_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
                (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
            } else {
                (_mm_loadu_si128(p.add(e) as *const __m128i), _mm_loadu_si128(p.add(e + 16) as *const __m128i))
            };
            _mm512_storeu_ps(o.add(e), _mm512_fmadd_ps(u8x16_512(a), vs, vb));
            _mm512_storeu_ps(o.add(e + 16), _mm512_fmadd_ps(u8x16_512(c), vs, vb));
            e += 32;
        }
    }
}

/// A 4×4 block of dot products: rows × vectors, 16 accumulators, so every loaded vector
/// feeds four FMAs (prefill's inner kernel).
///
/// # Safety
/// AVX-512F must be available; all eight slices must have the same length.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot4x4_avx512(rows: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = rows[0].len();
    let pr = [rows[0].as_ptr(), rows[1].as_ptr(), rows[2].as_ptr(), rows[3].as_ptr()];
    let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i + 16 <= n {
        let xv = [
            _mm512_loadu_ps(px[0].add(i)),
            _mm512_loadu_ps(px[1].add(i)),
            _mm512_loadu_ps(px[2].add(i)),
            _mm512_loadu_ps(px[3].add(i)),
        ];
        for r in 0..4 {
            let rv = _mm512_loadu_ps(pr[r].add(i));
            for t in 0..4 {
                acc[r][t] = _mm512_fmadd_ps(rv, xv[t], acc[r][t]);
            }
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let xv = [
            _mm512_maskz_loadu_ps(m, px[0].add(i)),
            _mm512_maskz_loadu_ps(m, px[1].add(i)),
            _mm512_maskz_loadu_ps(m, px[2].add(i)),
            _mm512_maskz_loadu_ps(m, px[3].add(i)),
        ];
        for r in 0..4 {
            let rv = _mm512_maskz_loadu_ps(m, pr[r].add(i));
            for t in 0..4 {
                acc[r][t] = _mm512_fmadd_ps(rv, xv[t], acc[r][t]);
            }
        }
    }
    let mut out = [[0.0f32; 4]; 4];
    _mm512_storeu_ps(
        out.as_mut_ptr() as *mut f32,
        reduce16(std::mem::transmute::<[[__m512; 4]; 4], [__m512; 16]>(acc)),
    );
    out
}

/// y += a·x.
///
/// # Safety
/// AVX-512F must be available; `x` and `y` have the same length.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))));
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, px.add(i)), _mm512_maskz_loadu_ps(m, py.add(i)));
        _mm512_mask_storeu_ps(py.add(i), m, v);
    }
}

/// y += a·x for a bf16 x.
///
/// # Safety
/// AVX-512F and BW must be available; `x` and `y` have the same length.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn axpy_bf16_avx512(a: f32, x: &[u16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, widen_bf16_512(px.add(i)), _mm512_loadu_ps(py.add(i))));
        i += 16;
    }
    for j in i..n {
        *py.add(j) += a * bf16_to_f32(*px.add(j));
    }
}

/// Four rows of `out` (`d` = `out.len() / 4` each) += `p[i]` · the rows of `rows`: 64 columns
/// at a time in 16 accumulators, then 16 at a time (the last one masked).
///
/// # Safety
/// AVX-512F must be available; every `p[i]` has k elements and `rows` holds
/// `(k − 1)·stride + d` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy4_rows_avx512(p: [&[f32]; 4], rows: &[f32], stride: usize, out: &mut [f32]) {
    let (k, d) = (p[0].len(), out.len() / 4);
    let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
    let pp = [p[0].as_ptr(), p[1].as_ptr(), p[2].as_ptr(), p[3].as_ptr()];
    let mut c = 0;
    while c + 64 <= d {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(po.add(i * d + c + 16 * j));
            }
        }
        for s in 0..k {
            let r = pr.add(s * stride + c);
            let v = [
                _mm512_loadu_ps(r),
                _mm512_loadu_ps(r.add(16)),
                _mm512_loadu_ps(r.add(32)),
                _mm512_loadu_ps(r.add(48)),
            ];
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*pp[i].add(s));
                for j in 0..4 {
                    a[j] = _mm512_fmadd_ps(w, v[j], a[j]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                _mm512_storeu_ps(po.add(i * d + c + 16 * j), *v);
            }
        }
        c += 64;
    }
    while c < d {
        let m: __mmask16 = if d - c >= 16 { 0xffff } else { ((1u32 << (d - c)) - 1) as u16 };
        let mut acc = [_mm512_setzero_ps(); 4];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(m, po.add(i * d + c));
        }
        for s in 0..k {
            let v = _mm512_maskz_loadu_ps(m, pr.add(s * stride + c));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*pp[i].add(s)), v, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(po.add(i * d + c), m, *a);
        }
        c += 16;
    }
}

/// Byte-gather and shift tables turning 24 bytes of 3-bit values into 64 16-bit lanes (two
/// registers of 32): lane j takes bytes 3j/8 and 3j/8+1 and shifts right by 3j mod 8.
type Q3Tables = ([u8; 64], [u8; 64], [u16; 32], [u16; 32]);

fn q3_tables() -> &'static Q3Tables {
    static T: std::sync::OnceLock<Q3Tables> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let (mut ia, mut ib, mut sa, mut sb) = ([0u8; 64], [0u8; 64], [0u16; 32], [0u16; 32]);
        for j in 0..32 {
            for (idx, sh, e) in [(&mut ia, &mut sa, j), (&mut ib, &mut sb, j + 32)] {
                let bit = 3 * e;
                idx[2 * j] = (bit / 8) as u8;
                idx[2 * j + 1] = (bit / 8 + 1) as u8;
                sh[j] = (bit % 8) as u16;
            }
        }
        (ia, ib, sa, sb)
    })
}

/// q3 row · int8 activations: 64 three-bit weights (24 bytes) unpacked with `vpermb` and
/// variable shifts, then one `vpdpbusd`.
///
/// # Safety
/// AVX-512F/BW/VBMI/VNNI must be available; `prep.int8` must hold for this row (bits 3).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub unsafe fn qdot_vnni_q3(packed: &[u8], scales: &[u16], biases: &[u16], prep: &QPrep) -> f32 {
    let (ia, ib, sa, sb) = q3_tables();
    let (ia, ib) =
        (_mm512_loadu_si512(ia.as_ptr() as *const __m512i), _mm512_loadu_si512(ib.as_ptr() as *const __m512i));
    let (sa, sb) =
        (_mm512_loadu_si512(sa.as_ptr() as *const __m512i), _mm512_loadu_si512(sb.as_ptr() as *const __m512i));
    let m7 = _mm512_set1_epi16(7);
    let (xq, p, group) = (prep.xq.as_ptr(), packed.as_ptr(), prep.group);
    let cols = prep.xp.len();
    let mut acc = _mm512_setzero_ps();
    let mut bacc = 0.0f32;
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        let mut d = _mm512_setzero_si512();
        while e < end {
            let v = _mm512_maskz_loadu_epi8(0x00ff_ffff, p.add(e * 3 / 8) as *const i8);
            let a = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(ia, v), sa), m7);
            let c = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(ib, v), sb), m7);
            let w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(a)), _mm512_cvtepi16_epi8(c), 1);
            d = _mm512_dpbusd_epi32(d, w, _mm512_loadu_si512(xq.add(e) as *const __m512i));
            e += 64;
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bf16_to_f32(s) * prep.xscale[g]), acc);
        bacc += bf16_to_f32(b) * prep.xsum[g];
    }
    _mm512_reduce_add_ps(acc) + bacc
}

/// 32 bf16 values at `p` (the lanes below `m` only; the rest read as zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_bh(p: *const u16, m: __mmask32) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p as *const i16))
}

/// A 4×4 block of dot products on bf16 rows and bf16 vectors, accumulated in f32 by
/// `vdpbf16ps` (two multiply-adds per lane per instruction: twice the f32 FMA's work).
///
/// # Safety
/// AVX-512F/BW/BF16 must be available; all eight slices must have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dot4x4_bf16_avx512(rows: [&[u16]; 4], x: [&[u16]; 4]) -> [[f32; 4]; 4] {
    let n = rows[0].len();
    let pr = [rows[0].as_ptr(), rows[1].as_ptr(), rows[2].as_ptr(), rows[3].as_ptr()];
    let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i < n {
        let m: __mmask32 = if i + 32 <= n { !0 } else { (1u32 << (n - i)) - 1 };
        let xv =
            [load_bh(px[0].add(i), m), load_bh(px[1].add(i), m), load_bh(px[2].add(i), m), load_bh(px[3].add(i), m)];
        for r in 0..4 {
            let rv = load_bh(pr[r].add(i), m);
            for t in 0..4 {
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], rv, xv[t]);
            }
        }
        i += 32;
    }
    let mut out = [[0.0f32; 4]; 4];
    _mm512_storeu_ps(
        out.as_mut_ptr() as *mut f32,
        reduce16(std::mem::transmute::<[[__m512; 4]; 4], [__m512; 16]>(acc)),
    );
    out
}

/// Lane j of the result is the sum of the lanes of `v[j]` (16 horizontal sums in 45
/// shuffles and adds instead of 16 separate reductions).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn reduce16(v: [__m512; 16]) -> __m512 {
    // pairs: per 128-bit lane [a, b, a, b] partial sums
    let p: [__m512; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // quads: per 128-bit lane [a, b, c, d]
    let q: [__m512; 4] = std::array::from_fn(|k| {
        let (x, y) = (_mm512_castps_pd(p[2 * k]), _mm512_castps_pd(p[2 * k + 1]));
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
    });
    // across the four 128-bit lanes
    let u = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x44), _mm512_shuffle_f32x4(q[0], q[1], 0xee));
    let w = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x44), _mm512_shuffle_f32x4(q[2], q[3], 0xee));
    _mm512_add_ps(_mm512_shuffle_f32x4(u, w, 0x88), _mm512_shuffle_f32x4(u, w, 0xdd))
}

/// f32 → bf16, rounding to nearest even (`vcvtneps2bf16`).
///
/// # Safety
/// AVX-512F/BW/VL/BF16 must be available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn f32_to_bf16_avx512(x: &[f32], out: &mut [u16]) {
    let n = x.len().min(out.len());
    let (p, o) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if i + 16 <= n { !0 } else { ((1u32 << (n - i)) - 1) as u16 };
        let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p.add(i)));
        _mm256_mask_storeu_epi16(o.add(i) as *mut i16, m, std::mem::transmute::<__m256bh, __m256i>(v));
        i += 16;
    }
}

/// Dequantizes one q4 or q8 row like [`dequant_row_avx512`], rounding to bf16. A q4 group's
/// sixteen possible values are computed once and its nibbles index them (`vpermw`): the same
/// bits as rounding each `scale·q + bias`, at a third of the instructions.
///
/// # Safety
/// AVX-512F/BW/BF16 must be available; `out.len()` and `group` must be multiples of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dequant_row_bf16_avx512(
    packed: &[u8],
    scales: &[u16],
    biases: &[u16],
    bits: u8,
    group: usize,
    out: &mut [u16],
) {
    let (p, o) = (packed.as_ptr(), out.as_mut_ptr());
    let m4 = _mm_set1_epi8(0x0f);
    let cols = out.len();
    let q16 = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    for (g, (&s, &b)) in scales.iter().zip(biases).enumerate() {
        let (vs, vb) = (_mm512_set1_ps(bf16_to_f32(s)), _mm512_set1_ps(bf16_to_f32(b)));
        let (mut e, end) = (g * group, ((g + 1) * group).min(cols));
        if bits == 4 {
            let lut = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_fmadd_ps(q16, vs, vb)));
            let lut = _mm512_castsi256_si512(lut);
            while e < end {
                let v = _mm_loadu_si128(p.add(e / 2) as *const __m128i);
                let (lo, hi) = (_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
                let idx = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                let w = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), lut);
                _mm512_storeu_si512(o.add(e) as *mut _, w);
                e += 32;
            }
            continue;
        }
        while e < end {
            let (a, c) =
                (_mm_loadu_si128(p.add(e) as *const __m128i), _mm_loadu_si128(p.add(e + 16) as *const __m128i));
            let (fa, fc) = (_mm512_fmadd_ps(u8x16_512(a), vs, vb), _mm512_fmadd_ps(u8x16_512(c), vs, vb));
            // cvtne2ps puts its second operand in the low half
            _mm512_storeu_si512(
                o.add(e) as *mut _,
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(fc, fa)),
            );
            e += 32;
        }
    }
}

/// Packs rows `r0..r0 + nrows` (at most 16) of a q4/q8 matrix for [`gemm_panel_vnni`]: per
/// 64-column block, 16 vectors of 64 bytes, vector d holding weight bytes 4d..4d+4 of each of
/// the 16 rows (a 16×16 dword transpose of the unpacked rows); per group, the 16 rows' scales
/// and biases as f32. Missing rows are zero.
///
/// # Safety
/// AVX-512F/BW/VL must be available; `q.bits` is 4 or 8, `q.cols` a multiple of 64 and
/// `q.group` a multiple of 64; `wp` holds `16·cols` bytes, `sp` and `bp` `16·groups` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn pack_panel_vnni(
    q: &crate::quant::QMat<'_>,
    r0: usize,
    nrows: usize,
    wp: &mut [u8],
    sp: &mut [f32],
    bp: &mut [f32],
) {
    let (cols, ng) = (q.cols, q.cols.div_ceil(q.group));
    let rb = crate::quant::row_bytes(cols, q.bits);
    // scales and biases: 16 rows × 16 groups at a time, widened to f32 and transposed
    for (src, dst) in [(q.scales, sp), (q.biases, bp)] {
        for g0 in (0..ng).step_by(16) {
            let m: __mmask16 = ((1u32 << (ng - g0).min(16)) - 1) as u16;
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, ri) in r.iter_mut().enumerate().take(nrows) {
                let v = _mm256_maskz_loadu_epi16(m, src.as_ptr().add((r0 + i) * ng + g0) as *const i16);
                *ri = _mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16);
            }
            let t = transpose16(&r);
            for (k, v) in t.iter().enumerate().take((ng - g0).min(16)) {
                _mm512_storeu_si512(dst.as_mut_ptr().add((g0 + k) * 16) as *mut _, *v);
            }
        }
    }
    let out = wp.as_mut_ptr();
    if q.bits == 4 {
        return pack_q4(q, r0, nrows, rb, out);
    }
    for blk in 0..cols / 64 {
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, ri) in r.iter_mut().enumerate().take(nrows) {
            *ri = _mm512_loadu_si512(q.packed.as_ptr().add((r0 + i) * rb + blk * 64) as *const __m512i);
        }
        let t = transpose16(&r);
        for (d, v) in t.iter().enumerate() {
            _mm512_storeu_si512(out.add((blk * 16 + d) * 64) as *mut _, *v);
        }
    }
}

/// 16×16 transpose of 32-bit elements: lane i of result d is lane d of `r[i]`.
#[allow(clippy::needless_range_loop)] // constant-index loops over registers unroll fully
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    // u[4i + j], 128-bit lane L: rows 4i..4i+4 of dword 4L + j
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut o = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
        let v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        let w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        let w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        o[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        o[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
        o[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        o[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
    }
    o
}

/// q4 panels without unpacking first: the 16 rows' packed dwords are transposed (two 8×8
/// transposes side by side, 32 shuffles per 64 columns), then the low nibbles of packed dword j
/// give vector 2j (elements 8j, 8j+2, 8j+4, 8j+6 of each row) and the high nibbles vector
/// 2j+1 (the odd ones); [`super::QTokens`] orders the activations to match.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_q4(q: &crate::quant::QMat<'_>, r0: usize, nrows: usize, rb: usize, out: *mut u8) {
    let zero = [0u8; 32];
    let m4 = _mm512_set1_epi8(0x0f);
    let lo_idx = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi_idx = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for blk in 0..q.cols / 64 {
        let src = |i: usize| -> *const __m256i {
            if i < nrows {
                q.packed.as_ptr().add((r0 + i) * rb + blk * 32) as *const __m256i
            } else {
                zero.as_ptr() as *const __m256i
            }
        };
        // r[i]: row i's 8 packed dwords, then row i + 8's
        let mut r = [_mm512_setzero_si512(); 8];
        for i in 0..8 {
            r[i] = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256(src(i))),
                _mm256_loadu_si256(src(i + 8)),
                1,
            );
        }
        let mut t = [_mm512_setzero_si512(); 8];
        for k in 0..4 {
            t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
        }
        // u[4h + j], 128-bit lane L: rows 4h..4h+4 (+8 in the upper half) of dword 4(L%2) + j
        let mut u = [_mm512_setzero_si512(); 8];
        for h in 0..2 {
            u[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
            u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
            u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
            u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
        }
        let o = out.add(blk * 16 * 64);
        for j in 0..4 {
            // packed dword j and j + 4 of all 16 rows
            let dj = _mm512_permutex2var_epi64(u[j], lo_idx, u[4 + j]);
            let dj4 = _mm512_permutex2var_epi64(u[j], hi_idx, u[4 + j]);
            for (d, v) in [(j, dj), (j + 4, dj4)] {
                _mm512_storeu_si512(o.add(2 * d * 64) as *mut _, _mm512_and_si512(v, m4));
                _mm512_storeu_si512(o.add((2 * d + 1) * 64) as *mut _, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            }
        }
    }
}

/// Int8 activations of `T` tokens for [`gemm_panel_vnni`]: per token, x quantized per weight
/// group (natural order), the groups' scales and the groups' sums of the unquantized x.
pub struct Int8Tokens<'a, const T: usize> {
    pub xq: [&'a [i8]; T],
    pub xs: [&'a [f32]; T],
    pub xsum: [&'a [f32]; T],
}

/// 16 rows (a packed panel) × `T` tokens with `vpdpbusd`: lanes are rows, each activation
/// dword is broadcast, and the group scales are applied once per 64 columns to 16 rows at a
/// time. Writes `y[t·rows + r0 + i]` for `i < nrows`.
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; the panel is packed by [`pack_panel_vnni`] for `cols`
/// columns in groups of `group` (multiples of 64); `y` holds `T` rows of `rows` floats from
/// which `r0 + nrows <= rows`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // register arrays, unrolled
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn gemm_panel_vnni<const T: usize>(
    wp: &[u8],
    sp: &[f32],
    bp: &[f32],
    cols: usize,
    group: usize,
    x: &Int8Tokens<'_, T>,
    y: *mut f32,
    rows: usize,
    r0: usize,
    nrows: usize,
) {
    let mut acc = [_mm512_setzero_ps(); T];
    for blk in 0..cols / 64 {
        let g = blk * 64 / group;
        let mut ai = [_mm512_setzero_si512(); T];
        let w = wp.as_ptr().add(blk * 16 * 64);
        for d in 0..16 {
            let wv = _mm512_loadu_si512(w.add(d * 64) as *const __m512i);
            for t in 0..T {
                let xd = (x.xq[t].as_ptr().add(blk * 64 + d * 4) as *const i32).read_unaligned();
                ai[t] = _mm512_dpbusd_epi32(ai[t], wv, _mm512_set1_epi32(xd));
            }
        }
        let ws = _mm512_loadu_ps(sp.as_ptr().add(g * 16));
        for t in 0..T {
            let s = _mm512_mul_ps(ws, _mm512_set1_ps(x.xs[t][g]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[t]), s, acc[t]);
        }
        if (blk * 64).is_multiple_of(group) {
            let wb = _mm512_loadu_ps(bp.as_ptr().add(g * 16));
            for t in 0..T {
                acc[t] = _mm512_fmadd_ps(wb, _mm512_set1_ps(x.xsum[t][g]), acc[t]);
            }
        }
    }
    let m: __mmask16 = ((1u32 << nrows) - 1) as u16;
    for (t, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(y.add(t * rows + r0), m, *a);
    }
}

/// One group of activations to int8: returns (scale, Σ x); `xq` gets round-half-even(x / s)
/// clamped to ±127, as the scalar [`super::QTokens::quantize`] computes it.
///
/// # Safety
/// AVX-512F/BW must be available; `x.len() == xq.len()`, a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_group_avx512(x: &[f32], xq: &mut [i8]) -> (f32, f32) {
    let (p, n) = (x.as_ptr(), x.len());
    let (mut amax, mut sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(p.add(i));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
    }
    let s = _mm512_reduce_max_ps(amax) / 127.0;
    let inv = _mm512_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for i in (0..n).step_by(16) {
        // cvtps2dq rounds to nearest even under the default MXCSR
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        let q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        _mm_storeu_si128(xq.as_mut_ptr().add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
    }
    (s, _mm512_reduce_add_ps(sum))
}

/// [`gemm_panel_vnni`] for AVX2 CPUs (no VNNI), q4 panels only: `vpmaddubsw` multiplies the
/// unsigned weight bytes by the int8 activations into 16-bit pair sums, at most
/// 2·15·127 = 3,810 each, so eight of them add up in 16 bits (≤ 30,480) before `vpmaddwd`
/// widens them; rows 0–7 and 8–15 of the panel are two vectors.
///
/// # Safety
/// AVX2 and FMA must be available; as [`gemm_panel_vnni`], with 4-bit weights.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // register arrays, unrolled
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_panel_q4_avx2<const T: usize>(
    wp: &[u8],
    sp: &[f32],
    bp: &[f32],
    cols: usize,
    group: usize,
    x: &Int8Tokens<'_, T>,
    y: *mut f32,
    rows: usize,
    r0: usize,
    nrows: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    for blk in 0..cols / 64 {
        let g = blk * 64 / group;
        let w = wp.as_ptr().add(blk * 16 * 64);
        let mut ai = [[_mm256_setzero_si256(); T]; 2];
        for d0 in (0..16).step_by(8) {
            let mut a16 = [[_mm256_setzero_si256(); T]; 2];
            for d in d0..d0 + 8 {
                let w0 = _mm256_loadu_si256(w.add(d * 64) as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(d * 64 + 32) as *const __m256i);
                for t in 0..T {
                    let xd = (x.xq[t].as_ptr().add(blk * 64 + d * 4) as *const i32).read_unaligned();
                    let xb = _mm256_set1_epi32(xd);
                    a16[0][t] = _mm256_add_epi16(a16[0][t], _mm256_maddubs_epi16(w0, xb));
                    a16[1][t] = _mm256_add_epi16(a16[1][t], _mm256_maddubs_epi16(w1, xb));
                }
            }
            for h in 0..2 {
                for t in 0..T {
                    ai[h][t] = _mm256_add_epi32(ai[h][t], _mm256_madd_epi16(a16[h][t], ones));
                }
            }
        }
        for h in 0..2 {
            let ws = _mm256_loadu_ps(sp.as_ptr().add(g * 16 + 8 * h));
            for t in 0..T {
                let s = _mm256_mul_ps(ws, _mm256_set1_ps(x.xs[t][g]));
                acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[h][t]), s, acc[h][t]);
            }
            if (blk * 64).is_multiple_of(group) {
                let wb = _mm256_loadu_ps(bp.as_ptr().add(g * 16 + 8 * h));
                for t in 0..T {
                    acc[h][t] = _mm256_fmadd_ps(wb, _mm256_set1_ps(x.xsum[t][g]), acc[h][t]);
                }
            }
        }
    }
    for t in 0..T {
        let mut out = [0f32; 16];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0][t]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1][t]);
        std::ptr::copy_nonoverlapping(out.as_ptr(), y.add(t * rows + r0), nrows);
    }
}

/// [`pack_panel_vnni`]'s layout for q4 with AVX2: each half of the panel (rows 0–7, 8–15) has
/// its 8 packed dwords per 64 columns transposed (8×8), then dword j's low nibbles are vector
/// 2j and its high nibbles vector 2j + 1. Scales and biases are widened by the caller.
///
/// # Safety
/// AVX2 must be available; `q.bits == 4`, `q.cols` a multiple of 64, `q.rows >= nrows`,
/// `nrows <= 16`; `wp` holds `16·cols` bytes.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2")]
pub unsafe fn pack_q4_avx2(q: &crate::quant::QMat<'_>, nrows: usize, wp: &mut [u8]) {
    let rb = crate::quant::row_bytes(q.cols, 4);
    let zero = [0u8; 32];
    let m4 = _mm256_set1_epi8(0x0f);
    let out = wp.as_mut_ptr();
    for blk in 0..q.cols / 64 {
        for half in 0..2 {
            let mut r = [_mm256_setzero_si256(); 8];
            for i in 0..8 {
                let row = 8 * half + i;
                let src = if row < nrows { q.packed.as_ptr().add(row * rb + blk * 32) } else { zero.as_ptr() };
                r[i] = _mm256_loadu_si256(src as *const __m256i);
            }
            let t = transpose8x8_epi32(&r);
            for j in 0..8 {
                let o = out.add((blk * 16 + 2 * j) * 64 + 32 * half);
                _mm256_storeu_si256(o as *mut __m256i, _mm256_and_si256(t[j], m4));
                let hi = _mm256_and_si256(_mm256_srli_epi16(t[j], 4), m4);
                _mm256_storeu_si256(o.add(64) as *mut __m256i, hi);
            }
        }
    }
}

/// 8×8 transpose of 32-bit elements: lane i of result j is lane j of `r[i]`.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose8x8_epi32(r: &[__m256i; 8]) -> [__m256i; 8] {
    let mut t = [_mm256_setzero_si256(); 8];
    for k in 0..4 {
        t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    let mut u = [_mm256_setzero_si256(); 8];
    for h in 0..2 {
        u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    // u[j] (j < 4) holds dwords j and j + 4 of rows 0–3 in its two 128-bit lanes; u[4 + j] of rows 4–7
    let mut o = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        o[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        o[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
    o
}

/// [`quantize_group_avx512`] with AVX2.
///
/// # Safety
/// AVX2 must be available; `x.len() == xq.len()`, a multiple of 32.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_group_avx2(x: &[f32], xq: &mut [i8]) -> (f32, f32) {
    let (p, n) = (x.as_ptr(), x.len());
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (mut amax, mut sum) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(p.add(i));
        amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs));
        sum = _mm256_add_ps(sum, v);
    }
    let mut m = [0f32; 8];
    _mm256_storeu_ps(m.as_mut_ptr(), amax);
    let s = m.iter().fold(0f32, |a, &b| a.max(b)) / 127.0;
    let inv = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in (0..n).step_by(32) {
        // cvtps2dq rounds to nearest even under the default MXCSR
        let q: [__m256i; 4] = std::array::from_fn(|k| {
            let v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i + 8 * k)), inv));
            _mm256_min_epi32(_mm256_max_epi32(v, lo), hi)
        });
        let b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(xq.as_mut_ptr().add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(b, order));
    }
    (s, hsum256(sum))
}

/// 4 rows × 4 vectors of dot products with AVX2 (16 registers: two passes of 2 rows × 4
/// vectors, so each vector load serves two rows).
///
/// # Safety
/// AVX2 and FMA must be available; all eight slices have the same length.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4x4_f32_avx2(rows: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = rows[0].len();
    let px = x.map(|v| v.as_ptr());
    let mut out = [[0f32; 4]; 4];
    for pair in 0..2 {
        let (r0, r1) = (rows[2 * pair], rows[2 * pair + 1]);
        let (p0, p1) = (r0.as_ptr(), r1.as_ptr());
        let mut a = [[_mm256_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 8 <= n {
            let (w0, w1) = (_mm256_loadu_ps(p0.add(i)), _mm256_loadu_ps(p1.add(i)));
            for k in 0..4 {
                let xv = _mm256_loadu_ps(px[k].add(i));
                a[0][k] = _mm256_fmadd_ps(w0, xv, a[0][k]);
                a[1][k] = _mm256_fmadd_ps(w1, xv, a[1][k]);
            }
            i += 8;
        }
        for (h, row) in [r0, r1].iter().enumerate() {
            for k in 0..4 {
                let mut s = hsum256(a[h][k]);
                for j in i..n {
                    s += row[j] * x[k][j];
                }
                out[2 * pair + h][k] = s;
            }
        }
    }
    out
}

/// `out[p] = scale · q · rows[p·stride ..][..d]` for `d = 16·C` (attention scores over a KV
/// cache): q stays in registers across the positions.
///
/// # Safety
/// AVX-512F must be available; `rows` holds `(out.len() - 1)·stride + d` elements.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_rows_avx512<const C: usize>(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let mut qv = [_mm512_setzero_ps(); C];
    for (c, v) in qv.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(q.as_ptr().add(16 * c));
    }
    let base = rows.as_ptr();
    for (p, o) in out.iter_mut().enumerate() {
        let r = base.add(p * stride);
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut c = 0;
        while c + 2 <= C {
            a0 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(r.add(16 * c)), a0);
            a1 = _mm512_fmadd_ps(qv[c + 1], _mm512_loadu_ps(r.add(16 * c + 16)), a1);
            c += 2;
        }
        if c < C {
            a0 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(r.add(16 * c)), a0);
        }
        *o = scale * _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/// `out += Σ_p w[p] · rows[p·stride ..][..d]` for `d = 16·C` (attention's weighted sum of
/// values): `out` stays in registers across the positions.
///
/// # Safety
/// AVX-512F must be available; `rows` holds `(w.len() - 1)·stride + d` elements.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy_rows_avx512<const C: usize>(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let mut acc = [_mm512_setzero_ps(); C];
    for (c, v) in acc.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(out.as_ptr().add(16 * c));
    }
    let base = rows.as_ptr();
    for (p, &wp) in w.iter().enumerate() {
        let r = base.add(p * stride);
        let wv = _mm512_set1_ps(wp);
        for (c, v) in acc.iter_mut().enumerate() {
            *v = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r.add(16 * c)), *v);
        }
    }
    for (c, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *v);
    }
}

/// e^x for 16 lanes, x ≤ 0 or moderate (Cephes' single-precision polynomial on
/// [-ln2/2, ln2/2], then `vscalefps` by the power of two: underflow goes smoothly to 0).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), 0x08);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(e, n)
}

/// `g ← silu(g) · u = g · u / (1 + e^(−g))`, or `silu(g)` alone without `u`; e^(−g)
/// overflows to +∞ for very negative g, giving −0 as the scalar form does.
///
/// # Safety
/// AVX-512F must be available; `u`, when given, is at least as long as `g`.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_avx512(g: &mut [f32], u: Option<&[f32]>) {
    let n = g.len();
    let pg = g.as_mut_ptr();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let k: __mmask16 = ((1u32 << (n - i).min(16)) - 1) as u16;
        let a = _mm512_maskz_loadu_ps(k, pg.add(i));
        let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), a));
        let num = match u {
            Some(u) => _mm512_mul_ps(a, _mm512_maskz_loadu_ps(k, u.as_ptr().add(i))),
            None => a,
        };
        _mm512_mask_storeu_ps(pg.add(i), k, _mm512_div_ps(num, _mm512_add_ps(one, e)));
        i += 16;
    }
}

/// Softmax in place: x ← e^(x − max x) / Σ.
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_avx512(x: &mut [f32]) -> (f32, f32) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let tail = |i: usize| -> __mmask16 { ((1u32 << (n - i).min(16)) - 1) as u16 };
    let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail(i), p.add(i)));
        i += 16;
    }
    let max = _mm512_reduce_max_ps(vm);
    let m = _mm512_set1_ps(max);
    let mut vs = _mm512_setzero_ps();
    i = 0;
    while i < n {
        let k = tail(i);
        let e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
        _mm512_mask_storeu_ps(p.add(i), k, e);
        vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(k, e));
        i += 16;
    }
    let sum = _mm512_reduce_add_ps(vs);
    let inv = _mm512_set1_ps(1.0 / sum);
    i = 0;
    while i < n {
        let k = tail(i);
        _mm512_mask_storeu_ps(p.add(i), k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), inv));
        i += 16;
    }
    (max, sum)
}

/// [`super::dot_mxfp4`] on AVX-512: per block of 32, the 16 bytes widened to lanes, their
/// nibbles looked up in the e2m1 table held in one register, multiplied with the even and odd
/// inputs, and the block's sum scaled.
///
/// # Safety
/// AVX-512F must be present; `x.len()` a multiple of 32, `vals` and `scales` the row's.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_mxfp4_avx512(vals: &[u8], scales: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let lut = _mm512_loadu_ps(super::E2M1.as_ptr());
    // even and odd positions of two 16-lane registers of x
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let fifteen = _mm512_set1_epi32(15);
    let mut total = _mm512_setzero_ps();
    for (k, &scale) in scales.iter().enumerate().take(x.len() / 32) {
        // SAFETY: 16 bytes of block k and 32 floats of x are in bounds
        let (b, x0, x1) = unsafe {
            (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(vals.as_ptr().add(k * 16) as *const __m128i)),
                _mm512_loadu_ps(x.as_ptr().add(k * 32)),
                _mm512_loadu_ps(x.as_ptr().add(k * 32 + 16)),
            )
        };
        let lo = _mm512_permutexvar_ps(_mm512_and_si512(b, fifteen), lut);
        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
        let acc = _mm512_mul_ps(lo, _mm512_permutex2var_ps(x0, even, x1));
        let acc = _mm512_fmadd_ps(hi, _mm512_permutex2var_ps(x0, odd, x1), acc);
        total = _mm512_fmadd_ps(acc, _mm512_set1_ps(super::e8m0(scale)), total);
    }
    _mm512_reduce_add_ps(total)
}

/// 16 bytes at `p` widened to f32 lanes (unsigned).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn u8x16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

#[inline]
fn half_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// [`super::ggml::dot`] for Q8_0 rows: per block of 32, the int8 values widened and multiplied
/// with x, the block's sum scaled by its f16 scale.
///
/// # Safety
/// AVX-512F must be present; `x.len()` a multiple of 32 and `row` that many values' blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_q8_0_avx512(row: &[u8], x: &[f32]) -> f32 {
    let mut total = _mm512_setzero_ps();
    for k in 0..x.len() / 32 {
        let b = &row[k * 34..(k + 1) * 34];
        let (p, xp) = (b.as_ptr().add(2), x.as_ptr().add(k * 32));
        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)));
        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)));
        let acc = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xp.add(16)), _mm512_mul_ps(q0, _mm512_loadu_ps(xp)));
        total = _mm512_fmadd_ps(acc, _mm512_set1_ps(half_at(b, 0)), total);
    }
    _mm512_reduce_add_ps(total)
}

/// [`super::ggml::dot`] for Q4_K rows: per 32 values, Σ (d·s·q − dmin·m)·x as
/// d·s·Σ q·x − dmin·m·Σ x, the nibbles widened in registers.
///
/// # Safety
/// AVX-512F must be present; `x.len()` a multiple of 256 and `row` that many values' blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_q4_k_avx512(row: &[u8], x: &[f32]) -> f32 {
    let fifteen = _mm512_set1_epi32(15);
    let mut total = _mm512_setzero_ps();
    for k in 0..x.len() / 256 {
        let b = &row[k * 144..(k + 1) * 144];
        let (d, dmin) = (half_at(b, 0), half_at(b, 2));
        for j in 0..4 {
            let (s1, m1) = super::ggml::scale_min_k4(2 * j, &b[4..16]);
            let (s2, m2) = super::ggml::scale_min_k4(2 * j + 1, &b[4..16]);
            let q = b.as_ptr().add(16 + 32 * j);
            let xp = x.as_ptr().add(k * 256 + 64 * j);
            let (b0, b1) = (u8x16(q), u8x16(q.add(16)));
            let (x0, x1, x2, x3) = (
                _mm512_loadu_ps(xp),
                _mm512_loadu_ps(xp.add(16)),
                _mm512_loadu_ps(xp.add(32)),
                _mm512_loadu_ps(xp.add(48)),
            );
            let lo = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(b1, fifteen)),
                x1,
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, fifteen)), x0),
            );
            let hi = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)),
                x3,
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), x2),
            );
            total = _mm512_fmadd_ps(lo, _mm512_set1_ps(d * s1 as f32), total);
            total = _mm512_fmadd_ps(hi, _mm512_set1_ps(d * s2 as f32), total);
            total = _mm512_fnmadd_ps(_mm512_add_ps(x0, x1), _mm512_set1_ps(dmin * m1 as f32), total);
            total = _mm512_fnmadd_ps(_mm512_add_ps(x2, x3), _mm512_set1_ps(dmin * m2 as f32), total);
        }
    }
    _mm512_reduce_add_ps(total)
}

/// [`super::ggml::dot`] for Q6_K rows: the 4 low and 2 high bits of 16 values at a time
/// joined in registers, minus 32, times x and the sub-block's scale.
///
/// # Safety
/// AVX-512F must be present; `x.len()` a multiple of 256 and `row` that many values' blocks.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_q6_k_avx512(row: &[u8], x: &[f32]) -> f32 {
    let (fifteen, three, off) = (_mm512_set1_epi32(15), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
    let mut total = _mm512_setzero_ps();
    for k in 0..x.len() / 256 {
        let b = &row[k * 210..(k + 1) * 210];
        let d = half_at(b, 208);
        for n in 0..2 {
            let (ql, qh) = (b.as_ptr().add(64 * n), b.as_ptr().add(128 + 32 * n));
            let sc = &b[192 + 8 * n..200 + 8 * n];
            let xp = x.as_ptr().add(k * 256 + 128 * n);
            for c in 0..2 {
                let (a, bb, h) = (u8x16(ql.add(16 * c)), u8x16(ql.add(32 + 16 * c)), u8x16(qh.add(16 * c)));
                let q = [
                    _mm512_or_si512(_mm512_and_si512(a, fifteen), _mm512_slli_epi32(_mm512_and_si512(h, three), 4)),
                    _mm512_or_si512(
                        _mm512_and_si512(bb, fifteen),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4),
                    ),
                    _mm512_or_si512(
                        _mm512_srli_epi32(a, 4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), three), 4),
                    ),
                    _mm512_or_si512(_mm512_srli_epi32(bb, 4), _mm512_slli_epi32(_mm512_srli_epi32(h, 6), 4)),
                ];
                for (i, qi) in q.into_iter().enumerate() {
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(qi, off));
                    let s = d * (sc[c + 2 * i] as i8) as f32;
                    total = _mm512_fmadd_ps(
                        _mm512_mul_ps(v, _mm512_loadu_ps(xp.add(32 * i + 16 * c))),
                        _mm512_set1_ps(s),
                        total,
                    );
                }
            }
        }
    }
    _mm512_reduce_add_ps(total)
}

/// 8 bytes at `p` widened to i32 lanes (unsigned).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// [`dot_q8_0_avx512`] on AVX2: eight values at a time.
///
/// # Safety
/// AVX2 and FMA must be present; `x.len()` a multiple of 32 and `row` that many values' blocks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q8_0_avx2(row: &[u8], x: &[f32]) -> f32 {
    let mut total = _mm256_setzero_ps();
    for k in 0..x.len() / 32 {
        let b = &row[k * 34..(k + 1) * 34];
        let (p, xp) = (b.as_ptr().add(2), x.as_ptr().add(k * 32));
        let mut acc = _mm256_setzero_ps();
        for i in 0..4 {
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * i) as *const __m128i)));
            acc = _mm256_fmadd_ps(q, _mm256_loadu_ps(xp.add(8 * i)), acc);
        }
        total = _mm256_fmadd_ps(acc, _mm256_set1_ps(half_at(b, 0)), total);
    }
    hsum256(total)
}

/// [`dot_q4_k_avx512`] on AVX2: eight values at a time.
///
/// # Safety
/// AVX2 and FMA must be present; `x.len()` a multiple of 256 and `row` that many values' blocks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q4_k_avx2(row: &[u8], x: &[f32]) -> f32 {
    let fifteen = _mm256_set1_epi32(15);
    let mut total = _mm256_setzero_ps();
    for k in 0..x.len() / 256 {
        let b = &row[k * 144..(k + 1) * 144];
        let (d, dmin) = (half_at(b, 0), half_at(b, 2));
        for j in 0..4 {
            let (s1, m1) = super::ggml::scale_min_k4(2 * j, &b[4..16]);
            let (s2, m2) = super::ggml::scale_min_k4(2 * j + 1, &b[4..16]);
            let (q, xp) = (b.as_ptr().add(16 + 32 * j), x.as_ptr().add(k * 256 + 64 * j));
            let (mut lo, mut hi, mut xl, mut xh) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            for i in 0..4 {
                let v = u8x8(q.add(8 * i));
                let (x0, x1) = (_mm256_loadu_ps(xp.add(8 * i)), _mm256_loadu_ps(xp.add(32 + 8 * i)));
                lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, fifteen)), x0, lo);
                hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x1, hi);
                (xl, xh) = (_mm256_add_ps(xl, x0), _mm256_add_ps(xh, x1));
            }
            total = _mm256_fmadd_ps(lo, _mm256_set1_ps(d * s1 as f32), total);
            total = _mm256_fmadd_ps(hi, _mm256_set1_ps(d * s2 as f32), total);
            total = _mm256_fnmadd_ps(xl, _mm256_set1_ps(dmin * m1 as f32), total);
            total = _mm256_fnmadd_ps(xh, _mm256_set1_ps(dmin * m2 as f32), total);
        }
    }
    hsum256(total)
}

/// [`dot_q6_k_avx512`] on AVX2: eight values at a time.
///
/// # Safety
/// AVX2 and FMA must be present; `x.len()` a multiple of 256 and `row` that many values' blocks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q6_k_avx2(row: &[u8], x: &[f32]) -> f32 {
    let (fifteen, three, off) = (_mm256_set1_epi32(15), _mm256_set1_epi32(3), _mm256_set1_epi32(32));
    let mut total = _mm256_setzero_ps();
    for k in 0..x.len() / 256 {
        let b = &row[k * 210..(k + 1) * 210];
        let d = half_at(b, 208);
        for n in 0..2 {
            let (ql, qh) = (b.as_ptr().add(64 * n), b.as_ptr().add(128 + 32 * n));
            let sc = &b[192 + 8 * n..200 + 8 * n];
            let xp = x.as_ptr().add(k * 256 + 128 * n);
            for c in 0..4 {
                let (a, bb, h) = (u8x8(ql.add(8 * c)), u8x8(ql.add(32 + 8 * c)), u8x8(qh.add(8 * c)));
                let h0 = _mm256_slli_epi32(_mm256_and_si256(h, three), 4);
                let h2 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2), three), 4);
                let h4 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 4), three), 4);
                let h6 = _mm256_slli_epi32(_mm256_srli_epi32(h, 6), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(a, fifteen), h0),
                    _mm256_or_si256(_mm256_and_si256(bb, fifteen), h2),
                    _mm256_or_si256(_mm256_srli_epi32(a, 4), h4),
                    _mm256_or_si256(_mm256_srli_epi32(bb, 4), h6),
                ];
                for (i, qi) in q.into_iter().enumerate() {
                    let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(qi, off));
                    let s = d * (sc[c / 2 + 2 * i] as i8) as f32;
                    let xv = _mm256_loadu_ps(xp.add(32 * i + 8 * c));
                    total = _mm256_fmadd_ps(_mm256_mul_ps(v, xv), _mm256_set1_ps(s), total);
                }
            }
        }
    }
    hsum256(total)
}

/// One Q4_K block (256 values) decoded into `y`, bit for bit [`super::ggml::decode_block`]'s
/// values: per value `d·s·q − dmin·m` as a product and a difference (no fused multiply-add).
///
/// # Safety
/// AVX-512F must be present; `b` one whole block (144 bytes), `y` 256 values.
#[target_feature(enable = "avx512f")]
pub unsafe fn decode_q4_k_avx512(b: &[u8], y: &mut [f32]) {
    assert!(b.len() >= 144 && y.len() >= 256);
    let fifteen = _mm512_set1_epi32(15);
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    for j in 0..4 {
        let (s1, m1) = super::ggml::scale_min_k4(2 * j, &b[4..16]);
        let (s2, m2) = super::ggml::scale_min_k4(2 * j + 1, &b[4..16]);
        let (d1, m1, d2, m2) = (d * s1 as f32, dmin * m1 as f32, d * s2 as f32, dmin * m2 as f32);
        for h in 0..2 {
            let q = u8x16(b.as_ptr().add(16 + 32 * j + 16 * h));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, fifteen));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            let o = y.as_mut_ptr().add(64 * j + 16 * h);
            _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_mul_ps(lo, _mm512_set1_ps(d1)), _mm512_set1_ps(m1)));
            _mm512_storeu_ps(o.add(32), _mm512_sub_ps(_mm512_mul_ps(hi, _mm512_set1_ps(d2)), _mm512_set1_ps(m2)));
        }
    }
}

/// One Q6_K block (256 values) decoded into `y`, bit for bit [`super::ggml::decode_block`]'s
/// values: per value `(d·s)·q` with q = low 4 | high 2 bits − 32.
///
/// # Safety
/// AVX-512F must be present; `b` one whole block (210 bytes), `y` 256 values.
#[target_feature(enable = "avx512f")]
pub unsafe fn decode_q6_k_avx512(b: &[u8], y: &mut [f32]) {
    assert!(b.len() >= 210 && y.len() >= 256);
    let (fifteen, three, off) = (_mm512_set1_epi32(15), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
    let d = half_at(b, 208);
    for n in 0..2 {
        let sc = &b[192 + 8 * n..200 + 8 * n];
        for h in 0..2 {
            let l0 = u8x16(b.as_ptr().add(64 * n + 16 * h));
            let l1 = u8x16(b.as_ptr().add(64 * n + 32 + 16 * h));
            let qh = u8x16(b.as_ptr().add(128 + 32 * n + 16 * h));
            let hb = |s: u32| {
                _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(qh, _mm512_set1_epi32(s as i32)), three), 4)
            };
            let qs = [
                _mm512_or_si512(_mm512_and_si512(l0, fifteen), hb(0)),
                _mm512_or_si512(_mm512_and_si512(l1, fifteen), hb(2)),
                _mm512_or_si512(_mm512_srli_epi32(l0, 4), hb(4)),
                _mm512_or_si512(_mm512_srli_epi32(l1, 4), hb(6)),
            ];
            for (k, q) in qs.into_iter().enumerate() {
                let ds = d * (sc[h + 2 * k] as i8 as f32);
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, off));
                _mm512_storeu_ps(y.as_mut_ptr().add(128 * n + 32 * k + 16 * h), _mm512_mul_ps(_mm512_set1_ps(ds), v));
            }
        }
    }
}
