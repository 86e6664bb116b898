//! Attention's kernels over a 16-bit KV cache (bf16 or f16 bits in `u16`s): scores and
//! weighted value sums that widen each row to f32 in registers, so no f32 copy of the cache is
//! ever made; and the rounding of new rows to 16 bits (nearest, ties to even).

use super::{Isa, bf16_to_f32, isa};

/// A KV cache's rows as stored: f32, or bf16 / f16 bits widened inside the kernels.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> KvRows<'a> {
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(r) => r.len(),
            KvRows::Bf16(r) | KvRows::F16(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows from element `at` on.
    pub fn skip(self, at: usize) -> KvRows<'a> {
        match self {
            KvRows::F32(r) => KvRows::F32(&r[at..]),
            KvRows::Bf16(r) => KvRows::Bf16(&r[at..]),
            KvRows::F16(r) => KvRows::F16(&r[at..]),
        }
    }

    /// Element `i`, widened (tests and references).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            KvRows::F32(r) => r[i],
            KvRows::Bf16(r) => bf16_to_f32(r[i]),
            KvRows::F16(r) => f16_to_f32(r[i]),
        }
    }
}

#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// f32 → bf16 bits, to nearest, ties to even (NaN stays NaN): a decode step's new cache rows.
pub fn round_bf16(x: &[f32], out: &mut [u16]) {
    round_h(isa(), false, x, out)
}

/// f32 → f16 bits, to nearest, ties to even; from 65520 on ±∞.
pub fn round_f16(x: &[f32], out: &mut [u16]) {
    round_h(isa(), true, x, out)
}

/// [`round_bf16`] (or [`round_f16`]) with the kernel of `isa`.
pub fn round_h(isa: Isa, f16: bool, x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    let done = match isa {
        // SAFETY (both): the caller checked the ISA; equal lengths
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::round_avx512(f16, x, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if f16c() => unsafe { x86::round_avx2(f16, x, out) },
        _ => 0,
    };
    round_scalar(f16, &x[done..], &mut out[done..]);
}

/// Scalar reference of [`round_h`].
pub fn round_scalar(f16: bool, x: &[f32], out: &mut [u16]) {
    if f16 {
        out.iter_mut().zip(x).for_each(|(o, v)| *o = half::f16::from_f32(*v).to_bits());
    } else {
        out.iter_mut().zip(x).for_each(|(o, v)| *o = half::bf16::from_f32(*v).to_bits());
    }
}

/// `out[p] = scale · q · rows[p·stride ..][..q.len()]` ([`super::dot_rows`] for any cache type).
pub fn dot_rows_kv(q: &[f32], rows: KvRows<'_>, stride: usize, scale: f32, out: &mut [f32]) {
    match rows {
        KvRows::F32(r) => super::dot_rows(q, r, stride, scale, out),
        KvRows::Bf16(r) => dot_rows_h(isa(), false, q, r, stride, scale, out),
        KvRows::F16(r) => dot_rows_h(isa(), true, q, r, stride, scale, out),
    }
}

/// `out += Σ_p w[p] · rows[p·stride ..][..out.len()]` ([`super::axpy_rows`] for any cache type).
pub fn axpy_rows_kv(w: &[f32], rows: KvRows<'_>, stride: usize, out: &mut [f32]) {
    match rows {
        KvRows::F32(r) => super::axpy_rows(w, r, stride, out),
        KvRows::Bf16(r) => axpy_rows_h(isa(), false, w, r, stride, out),
        KvRows::F16(r) => axpy_rows_h(isa(), true, w, r, stride, out),
    }
}

/// F16C, for the AVX2 path's f16 conversions.
#[cfg(target_arch = "x86_64")]
fn f16c() -> bool {
    static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F.get_or_init(|| is_x86_feature_detected!("f16c"))
}

/// The instruction sets this machine runs the 16-bit kernels with (tests try each).
pub fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            v.push(Isa::Avx512);
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        v.push(Isa::Neon);
    }
    v
}

/// Σ h(w)·x for 16-bit `w` (f16 when `f16`, else bf16), with the kernel of `isa` (which the
/// caller has checked this machine has).
pub fn dot_h(isa: Isa, f16: bool, w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    match (isa, f16) {
        // SAFETY (all): the caller checked the ISA; equal lengths
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx512Vnni, _) => unsafe { x86::dot_h_avx512(f16, w, x) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, false) => unsafe { super::x86::dot_bf16_avx2(w, x) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, true) if f16c() => unsafe { x86::dot_f16_avx2(w, x) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, _) => unsafe { neon::dot_h(f16, w, x) },
        _ => dot_h_scalar(f16, w, x),
    }
}

/// Scalar reference of [`dot_h`]: eight running sums, then the tail.
pub fn dot_h_scalar(f16: bool, w: &[u16], x: &[f32]) -> f32 {
    if f16 { super::dot_widened_scalar(w, x, f16_to_f32) } else { super::dot_bf16_scalar(w, x) }
}

/// y += a·h(x) for 16-bit `x`, with the kernel of `isa`.
pub fn axpy_h(isa: Isa, f16: bool, a: f32, x: &[u16], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    match (isa, f16) {
        // SAFETY (all): the caller checked the ISA; equal lengths
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx512Vnni, _) => unsafe { x86::axpy_h_avx512(f16, a, x, y) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, false) => unsafe { x86::axpy_h_avx2::<false>(a, x, y) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, true) if f16c() => unsafe { x86::axpy_h_avx2::<true>(a, x, y) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, _) => unsafe { neon::axpy_h(f16, a, x, y) },
        _ => {
            let widen = |h: u16| if f16 { f16_to_f32(h) } else { bf16_to_f32(h) };
            y.iter_mut().zip(x).for_each(|(y, x)| *y += a * widen(*x));
        }
    }
}

/// [`dot_rows_kv`] of 16-bit rows with the kernels of `isa`: AVX-512 keeps q in registers for
/// head dims 64, 128 and 256; other shapes and ISAs run [`dot_h`] per row.
pub fn dot_rows_h(isa: Isa, f16: bool, q: &[f32], rows: &[u16], stride: usize, scale: f32, out: &mut [f32]) {
    let d = q.len();
    assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + d, "rows too short");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the caller checked the ISA; `rows` length checked above
        unsafe {
            match (d, f16) {
                (64, false) => return x86::dot_rows_avx512::<4, false>(q, rows, stride, scale, out),
                (128, false) => return x86::dot_rows_avx512::<8, false>(q, rows, stride, scale, out),
                (256, false) => return x86::dot_rows_avx512::<16, false>(q, rows, stride, scale, out),
                (64, true) => return x86::dot_rows_avx512::<4, true>(q, rows, stride, scale, out),
                (128, true) => return x86::dot_rows_avx512::<8, true>(q, rows, stride, scale, out),
                (256, true) => return x86::dot_rows_avx512::<16, true>(q, rows, stride, scale, out),
                _ => {}
            }
        }
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = scale * dot_h(isa, f16, &rows[p * stride..p * stride + d], q);
    }
}

/// [`axpy_rows_kv`] of 16-bit rows with the kernels of `isa` (as [`dot_rows_h`]: `out` in
/// registers on AVX-512 for head dims 64, 128, 256; else [`axpy_h`] per row).
pub fn axpy_rows_h(isa: Isa, f16: bool, w: &[f32], rows: &[u16], stride: usize, out: &mut [f32]) {
    let d = out.len();
    assert!(w.is_empty() || rows.len() >= (w.len() - 1) * stride + d, "rows too short");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the caller checked the ISA; `rows` length checked above
        unsafe {
            match (d, f16) {
                (64, false) => return x86::axpy_rows_avx512::<4, false>(w, rows, stride, out),
                (128, false) => return x86::axpy_rows_avx512::<8, false>(w, rows, stride, out),
                (256, false) => return x86::axpy_rows_avx512::<16, false>(w, rows, stride, out),
                (64, true) => return x86::axpy_rows_avx512::<4, true>(w, rows, stride, out),
                (128, true) => return x86::axpy_rows_avx512::<8, true>(w, rows, stride, out),
                (256, true) => return x86::axpy_rows_avx512::<16, true>(w, rows, stride, out),
                _ => {}
            }
        }
    }
    for (p, &wp) in w.iter().enumerate() {
        axpy_h(isa, f16, wp, &rows[p * stride..p * stride + d], out);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)] // every function here is an unsafe SIMD kernel
mod x86 {
    use super::{bf16_to_f32, f16_to_f32};
    use std::arch::x86_64::*;

    /// 16 values at `p` widened: f16 by `vcvtph2ps`, bf16 by a shift into the high half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn widen512<const F16: bool>(p: *const u16) -> __m512 {
        let v = _mm256_loadu_si256(p as *const __m256i);
        if F16 { _mm512_cvtph_ps(v) } else { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)) }
    }

    #[inline]
    fn widen1<const F16: bool>(h: u16) -> f32 {
        if F16 { f16_to_f32(h) } else { bf16_to_f32(h) }
    }

    /// # Safety
    /// AVX-512F/BW must be available; `w.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_h_avx512(f16: bool, w: &[u16], x: &[f32]) -> f32 {
        if f16 { dot_avx512::<true>(w, x) } else { dot_avx512::<false>(w, x) }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot_avx512<const F16: bool>(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            a0 = _mm512_fmadd_ps(widen512::<F16>(pw.add(i)), _mm512_loadu_ps(px.add(i)), a0);
            a1 = _mm512_fmadd_ps(widen512::<F16>(pw.add(i + 16)), _mm512_loadu_ps(px.add(i + 16)), a1);
            i += 32;
        }
        if i + 16 <= n {
            a0 = _mm512_fmadd_ps(widen512::<F16>(pw.add(i)), _mm512_loadu_ps(px.add(i)), a0);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        while i < n {
            s += widen1::<F16>(w[i]) * x[i];
            i += 1;
        }
        s
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            let (h0, h1) = (_mm_loadu_si128(pw.add(i) as *const __m128i), _mm_loadu_si128(pw.add(i + 8) as *const _));
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(h0), _mm256_loadu_ps(px.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(h1), _mm256_loadu_ps(px.add(i + 8)), a1);
            i += 16;
        }
        let v = _mm256_add_ps(a0, a1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let mut s = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
        while i < n {
            s += f16_to_f32(w[i]) * x[i];
            i += 1;
        }
        s
    }

    /// # Safety
    /// AVX-512F/BW must be available; `x.len() == y.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn axpy_h_avx512(f16: bool, a: f32, x: &[u16], y: &mut [f32]) {
        if f16 { axpy_avx512::<true>(a, x, y) } else { axpy_avx512::<false>(a, x, y) }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn axpy_avx512<const F16: bool>(a: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, widen512::<F16>(px.add(i)), _mm512_loadu_ps(py.add(i))));
            i += 16;
        }
        for j in i..n {
            *py.add(j) += a * widen1::<F16>(*px.add(j));
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available, and F16C for `F16`; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_h_avx2<const F16: bool>(a: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(px.add(i) as *const __m128i);
            let v = if F16 {
                _mm256_cvtph_ps(h)
            } else {
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            };
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, v, _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        for j in i..n {
            *py.add(j) += a * widen1::<F16>(*px.add(j));
        }
    }

    /// Rounds whole groups of 16 to bf16 (the bits plus 0x7fff plus the kept lowest bit, then
    /// the high half; NaN quieted as `half` does) or f16 (`vcvtps2ph`); returns how many.
    ///
    /// # Safety
    /// AVX-512F/BW must be available; `out.len() >= x.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn round_avx512(f16: bool, x: &[f32], out: &mut [u16]) -> usize {
        let n = x.len() / 16 * 16;
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        for i in (0..n).step_by(16) {
            let v = _mm512_loadu_ps(px.add(i));
            let h = if f16 {
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
            } else {
                let b = _mm512_castps_si512(v);
                let odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
                let r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), odd), 16);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let q = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
                _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q))
            };
            _mm256_storeu_si256(po.add(i) as *mut __m256i, h);
        }
        n
    }

    /// [`round_avx512`] 8 at a time (F16C's `vcvtps2ph` for f16).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `out.len() >= x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn round_avx2(f16: bool, x: &[f32], out: &mut [u16]) -> usize {
        let n = x.len() / 8 * 8;
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(px.add(i));
            let h = if f16 {
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
            } else {
                let b = _mm256_castps_si256(v);
                let odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
                let r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), odd), 16);
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                let q = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
                let w = _mm256_blendv_epi8(r, q, nan);
                // 8 × 32 bits → 8 × 16 (each value fits: no saturation)
                _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w))
            };
            _mm_storeu_si128(po.add(i) as *mut __m128i, h);
        }
        n
    }

    /// Scores of `d = 16·C` wide rows: q in registers across the positions.
    ///
    /// # Safety
    /// AVX-512F/BW must be available; `q` holds `d` floats, `rows` `(out.len() − 1)·stride + d`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_rows_avx512<const C: usize, const F16: bool>(
        q: &[f32],
        rows: &[u16],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
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
                a0 = _mm512_fmadd_ps(qv[c], widen512::<F16>(r.add(16 * c)), a0);
                a1 = _mm512_fmadd_ps(qv[c + 1], widen512::<F16>(r.add(16 * c + 16)), a1);
                c += 2;
            }
            if c < C {
                a0 = _mm512_fmadd_ps(qv[c], widen512::<F16>(r.add(16 * c)), a0);
            }
            *o = scale * _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        }
    }

    /// Weighted sum of `d = 16·C` wide rows: `out` in registers across the positions.
    ///
    /// # Safety
    /// AVX-512F/BW must be available; `out` holds `d` floats, `rows` `(w.len() − 1)·stride + d`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn axpy_rows_avx512<const C: usize, const F16: bool>(
        w: &[f32],
        rows: &[u16],
        stride: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm512_setzero_ps(); C];
        for (c, v) in acc.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(out.as_ptr().add(16 * c));
        }
        let base = rows.as_ptr();
        for (p, &wp) in w.iter().enumerate() {
            let r = base.add(p * stride);
            let wv = _mm512_set1_ps(wp);
            for (c, v) in acc.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(wv, widen512::<F16>(r.add(16 * c)), *v);
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *v);
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_op_in_unsafe_fn)] // every function here is an unsafe SIMD kernel
mod neon {
    use super::{bf16_to_f32, f16_to_f32};
    use std::arch::aarch64::*;

    /// Four 16-bit values at `p` widened. f16 in integer lanes (the f16 vector types are not
    /// stable Rust): sign, and exponent + mantissa moved to f32's places and scaled by 2^112,
    /// which also makes subnormals exact; an all-ones exponent (∞, NaN) becomes f32's.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn widen4<const F16: bool>(p: *const u16) -> float32x4_t {
        let h = vmovl_u16(vld1_u16(p));
        if !F16 {
            return vreinterpretq_f32_u32(vshlq_n_u32::<16>(h));
        }
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        let em = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
        let scaled =
            vreinterpretq_u32_f32(vmulq_f32(vreinterpretq_f32_u32(em), vdupq_n_f32(f32::from_bits(0x7780_0000))));
        let special = vceqq_u32(vandq_u32(h, vdupq_n_u32(0x7c00)), vdupq_n_u32(0x7c00));
        let v = vbslq_u32(special, vorrq_u32(em, vdupq_n_u32(0x7f80_0000)), scaled);
        vreinterpretq_f32_u32(vorrq_u32(v, sign))
    }

    #[inline]
    fn widen1<const F16: bool>(h: u16) -> f32 {
        if F16 { f16_to_f32(h) } else { bf16_to_f32(h) }
    }

    /// # Safety
    /// NEON must be available; `w.len() == x.len()`.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_h(f16: bool, w: &[u16], x: &[f32]) -> f32 {
        if f16 { dot::<true>(w, x) } else { dot::<false>(w, x) }
    }

    #[target_feature(enable = "neon")]
    unsafe fn dot<const F16: bool>(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i + 8 <= n {
            a0 = vfmaq_f32(a0, widen4::<F16>(pw.add(i)), vld1q_f32(px.add(i)));
            a1 = vfmaq_f32(a1, widen4::<F16>(pw.add(i + 4)), vld1q_f32(px.add(i + 4)));
            i += 8;
        }
        let mut s = vaddvq_f32(vaddq_f32(a0, a1));
        while i < n {
            s += widen1::<F16>(w[i]) * x[i];
            i += 1;
        }
        s
    }

    /// # Safety
    /// NEON must be available; `x.len() == y.len()`.
    #[target_feature(enable = "neon")]
    pub unsafe fn axpy_h(f16: bool, a: f32, x: &[u16], y: &mut [f32]) {
        if f16 { axpy::<true>(a, x, y) } else { axpy::<false>(a, x, y) }
    }

    #[target_feature(enable = "neon")]
    unsafe fn axpy<const F16: bool>(a: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 4 <= n {
            vst1q_f32(py.add(i), vfmaq_n_f32(vld1q_f32(py.add(i)), widen4::<F16>(px.add(i)), a));
            i += 4;
        }
        while i < n {
            y[i] += a * widen1::<F16>(x[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::uniform;

    /// Random 16-bit values of attention's range (|v| < 8), and a few ±0, subnormals, and
    /// values near each format's limits.
    fn halves(n: usize, seed: u64, f16: bool) -> Vec<u16> {
        let x: Vec<f32> = uniform(n, seed).iter().map(|v| v * 16.0).collect();
        let mut h = vec![0u16; n];
        if f16 {
            round_f16(&x, &mut h)
        } else {
            round_bf16(&x, &mut h)
        }
        let specials: &[u16] = if f16 { &[0x8000, 0x0001, 0x03ff, 0x7bff, 0xfbff] } else { &[0x8000, 0x0001, 0x7f7f] };
        for (i, s) in specials.iter().enumerate() {
            if i * 7 < n {
                h[i * 7] = *s;
            }
        }
        h
    }

    fn widen(f16: bool, h: u16) -> f64 {
        (if f16 { f16_to_f32(h) } else { bf16_to_f32(h) }) as f64
    }

    #[test]
    fn rounding_to_16_bits_is_to_nearest_even() {
        // bf16 by its definition on the bits: add half an ulp minus one, plus the kept lsb
        let xs: Vec<f32> = uniform(4000, 9)
            .iter()
            .map(|v| v * 1e3)
            .chain([0.0, -0.0, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::MAX, f32::MIN_POSITIVE])
            .collect();
        let mut got = vec![0u16; xs.len()];
        round_bf16(&xs, &mut got);
        for (x, g) in xs.iter().zip(&got) {
            let b = x.to_bits();
            let want = ((b as u64 + 0x7fff + ((b >> 16) & 1) as u64) >> 16) as u16;
            assert_eq!(*g, want, "bf16 of {x}");
        }
        // f16: the nearest of the two neighbours in f64, ties to the even code; overflow to ∞
        let xs: Vec<f32> = uniform(4000, 10)
            .iter()
            .map(|v| v * 1.4e5)
            .chain([65504.0, 65519.0, 65520.0, 1e-7, 2f32.powi(-25), 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)])
            .collect();
        let mut got = vec![0u16; xs.len()];
        round_f16(&xs, &mut got);
        for (x, &g) in xs.iter().zip(&got) {
            let v = f16_to_f32(g) as f64;
            if x.abs() >= 65520.0 {
                assert!(v.is_infinite() && v.signum() == x.signum() as f64, "f16 of {x}: {v}");
                continue;
            }
            // no code is nearer; of two as near, the even one
            let (sign, m) = (g & 0x8000, g & 0x7fff);
            let e = (*x as f64 - v).abs();
            for n in [m.wrapping_sub(1), m + 1].into_iter().filter(|&n| n < 0x7c00) {
                let en = (*x as f64 - f16_to_f32(sign | n) as f64).abs();
                assert!(e < en || (e == en && m & 1 == 0), "f16 of {x}: {v} against {}", f16_to_f32(sign | n));
            }
        }
    }

    #[test]
    fn every_isa_rounds_as_the_scalar_code() {
        let mut xs: Vec<f32> = uniform(1000, 11).iter().map(|v| v * 3e5).collect();
        xs.extend(uniform(1000, 12).iter().map(|v| v * 1e-3));
        // ties, the ends of both ranges, subnormals, infinities, NaNs
        xs.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-11), 65504.0, 65519.0, 65520.0]);
        xs.extend([f32::MAX, -f32::MAX, 1e-40, 2f32.powi(-25), f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN]);
        xs.extend([f32::from_bits(0x7f80_0001), -0.0, 0.0]);
        for isa in isas() {
            for f16 in [false, true] {
                for len in [0, 1, 7, 8, 15, 16, 17, 33, xs.len()] {
                    let (mut a, mut b) = (vec![0u16; len], vec![0u16; len]);
                    round_h(isa, f16, &xs[..len], &mut a);
                    round_scalar(f16, &xs[..len], &mut b);
                    for i in 0..len {
                        let nan = |h: u16| if f16 { f16_to_f32(h).is_nan() } else { bf16_to_f32(h).is_nan() };
                        assert!(
                            a[i] == b[i] || (nan(a[i]) && nan(b[i])),
                            "{isa:?} f16 {f16} {}: {:#x} vs {:#x}",
                            xs[i],
                            a[i],
                            b[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kv_kernels_match_a_float64_reference_on_every_isa() {
        for isa in isas() {
            for f16 in [false, true] {
                for d in [1usize, 7, 16, 31, 33, 64, 100, 128, 256] {
                    for n_pos in [1usize, 2, 5, 17] {
                        for stride in [d, d + 3, 3 * d] {
                            let len = (n_pos - 1) * stride + d;
                            let rows = halves(len, (d * 31 + n_pos) as u64, f16);
                            let q: Vec<f32> = uniform(d, 5 + d as u64).iter().map(|v| v * 2.0).collect();
                            let w = uniform(n_pos, 6);
                            let what = format!("{isa:?} f16 {f16} d {d} positions {n_pos} stride {stride}");
                            let mut got = vec![f32::NAN; n_pos];
                            dot_rows_h(isa, f16, &q, &rows, stride, 0.3, &mut got);
                            for (p, g) in got.iter().enumerate() {
                                let r = &rows[p * stride..p * stride + d];
                                let want: f64 =
                                    r.iter().zip(&q).map(|(h, x)| widen(f16, *h) * *x as f64).sum::<f64>() * 0.3;
                                let mag: f64 = r.iter().zip(&q).map(|(h, x)| (widen(f16, *h) * *x as f64).abs()).sum();
                                assert!(
                                    (*g as f64 - want).abs() <= 1e-6 * mag + 1e-30,
                                    "{what}: score {p} {g} vs {want}"
                                );
                            }
                            let init = uniform(d, 8);
                            let mut got = init.clone();
                            axpy_rows_h(isa, f16, &w, &rows, stride, &mut got);
                            for j in 0..d {
                                let want = init[j] as f64
                                    + (0..n_pos).map(|p| w[p] as f64 * widen(f16, rows[p * stride + j])).sum::<f64>();
                                let mag = init[j].abs() as f64
                                    + (0..n_pos)
                                        .map(|p| (w[p] as f64 * widen(f16, rows[p * stride + j])).abs())
                                        .sum::<f64>();
                                assert!((got[j] as f64 - want).abs() <= 1e-6 * mag + 1e-30, "{what}: sum {j}");
                            }
                            // the per-row kernels against their scalar forms
                            let (r0, x0) = (&rows[..d], &q[..]);
                            let (a, b) = (dot_h(isa, f16, r0, x0), dot_h_scalar(f16, r0, x0));
                            let mag: f64 = r0.iter().zip(x0).map(|(h, x)| (widen(f16, *h) * *x as f64).abs()).sum();
                            assert!(((a - b) as f64).abs() <= 2e-6 * mag + 1e-30, "{what}: dot {a} vs scalar {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_f16_code_widens_as_the_format_defines() {
        // each ISA's axpy with a = 1 onto zeros is the widening itself, bit for bit
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let want: Vec<f32> = all.iter().map(|&h| f16_to_f32(h)).collect();
        for isa in isas() {
            let mut got = vec![0f32; all.len()];
            axpy_h(isa, true, 1.0, &all, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // (0 + −0 is +0: compared as numbers)
                assert!(g == w || (g.is_nan() && w.is_nan()), "{isa:?} code {i:#06x}: {g} vs {w}");
            }
        }
    }
}
