//! Intel AMX tiles for multi-token (prefill) products: `tdpbf16ps` for bf16 weights (and rows
//! dequantized to bf16), `tdpbusd` for q4/q8 weights on int8 activations. One instruction
//! multiplies a 16×64-byte weight tile by a 64-byte × 16-token activation tile (16·16·32 bf16
//! or 16·16·64 int8 products), 8–16× the work of one AVX-512 dot-product instruction.
//!
//! Layouts (every tile 16 rows × 64 bytes):
//! - weights (A): 16 rows of 64 bytes, natural column order: bf16 rows are used in place
//!   (stride: the row length), q4/q8 rows are unpacked to one byte per weight per 64 columns;
//! - activations (B): per tile of 16 tokens and per 64-byte column block, row k holds, for each
//!   token, the 4 bytes (2 bf16 or 4 int8) of columns 4k.. (bf16: 2k..) of that token;
//! - the int8 result of each weight group is scaled in AVX-512 registers, as the VNNI panels do.
//!
//! The tile instructions are written with `asm!` (their intrinsics are not stable). The layouts
//! are checked on any CPU against an emulation of the instructions; the instructions themselves
//! only where the CPU has AMX.

use super::QTokens;
use std::ops::Range;
use std::sync::OnceLock;

/// Tokens per tile, and rows per weight tile.
pub const T: usize = 16;

/// Whether AMX-BF16 / AMX-INT8 exist and may be used: the CPU has them (CPUID), the kernel
/// granted this process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and `FLASHMOE_AMX`
/// is not `off`. `FLASHMOE_AMX=emulate` runs the AMX paths on any CPU with the instructions
/// emulated (slow: for testing the layouts and the products around them).
fn amx() -> (bool, bool) {
    static AMX: OnceLock<(bool, bool)> = OnceLock::new();
    *AMX.get_or_init(|| {
        if emulate() {
            return (super::bf16_products(), true);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var("FLASHMOE_AMX").is_ok_and(|v| v == "off" || v == "0") {
                return (false, false);
            }
            if !matches!(super::isa(), super::Isa::Avx512Vnni) {
                return (false, false);
            }
            // leaf 7 exists on every CPU with AVX-512
            let c = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, bf16, int8) = (c.edx >> 24 & 1 == 1, c.edx >> 22 & 1 == 1, c.edx >> 25 & 1 == 1);
            if !tile {
                return (false, false);
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall asking for the tile state; it only changes this process.
            let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
            if rc != 0 {
                return (false, false);
            }
            (bf16 && super::bf16_products(), int8)
        }
        #[cfg(not(target_arch = "x86_64"))]
        (false, false)
    })
}

fn emulate() -> bool {
    static EMULATE: OnceLock<bool> = OnceLock::new();
    *EMULATE.get_or_init(|| std::env::var("FLASHMOE_AMX").is_ok_and(|v| v == "emulate"))
}

/// Prefill products of bf16 rows use AMX-BF16 (see [`amx`]).
pub fn amx_bf16() -> bool {
    amx().0
}

/// Prefill products of q4/q8 rows use AMX-INT8: only with `FLASHMOE_AMX=all` (or `emulate`).
/// Measured on a 16-core Sapphire Rapids, the VNNI panels were faster for routed experts
/// (3.9 vs 4.5 ms/token of an 80B-shape prefill): an expert sees ~10 tokens of a 512-token
/// prompt, a third of a 16-token tile, and every 64-column group's sums need rescaling.
pub fn amx_int8() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| amx_int8_present() && std::env::var("FLASHMOE_AMX").is_ok_and(|v| v == "all" || v == "emulate"))
}

/// The CPU has AMX-INT8 and the tile state was granted (or it is emulated).
pub fn amx_int8_present() -> bool {
    amx().1
}

/// bf16 activations of `n` tokens as B tiles: `[tile][block][k 0..16][token 0..16][2]`, tokens
/// past `n` zero.
#[derive(Default, Debug, Clone)]
pub struct Bf16Tokens {
    pub b: Vec<u16>,
    pub n: usize,
    pub tiles: usize,
    pub blocks: usize,
}

impl Bf16Tokens {
    /// Packs `x` (`[n, cols]` bf16, `cols` a multiple of 32).
    pub fn pack(&mut self, x: &[u16], n: usize, cols: usize) {
        assert!(cols.is_multiple_of(32) && x.len() == n * cols);
        (self.n, self.tiles, self.blocks) = (n, n.div_ceil(T), cols / 32);
        self.b.clear();
        self.b.resize(self.tiles * self.blocks * 512, 0);
        let blocks = self.blocks;
        // one token tile's blocks: token nn's pair k sits at [k][nn]
        let pack = |(tt, dst): (usize, &mut [u16])| {
            for nn in 0..T.min(n - tt * T) {
                let src = &x[(tt * T + nn) * cols..][..cols];
                for kb in 0..blocks {
                    for k in 0..16 {
                        let o = kb * 512 + k * 32 + nn * 2;
                        dst[o] = src[kb * 32 + 2 * k];
                        dst[o + 1] = src[kb * 32 + 2 * k + 1];
                    }
                }
            }
        };
        let chunks = self.b.chunks_mut(blocks * 512).enumerate();
        if crate::tensor::parallel(n * cols) && self.tiles > 1 {
            use rayon::prelude::*;
            self.b.par_chunks_mut(blocks * 512).enumerate().for_each(pack);
        } else {
            chunks.for_each(pack);
        }
    }

    fn tile(&self, tt: usize, kb: usize) -> &[u16] {
        &self.b[(tt * self.blocks + kb) * 512..][..512]
    }
}

/// int8 activations of `n` tokens as B tiles (`[tile][block][k 0..16][token 0..16][4]`), with
/// each group's scale and Σx per token (`[tile][group][token]`); tokens past `n` zero.
#[derive(Default, Debug, Clone)]
pub struct Int8Tokens {
    pub b: Vec<i8>,
    pub xs: Vec<f32>,
    pub xsum: Vec<f32>,
    pub n: usize,
    pub tiles: usize,
    pub blocks: usize,
    pub groups: usize,
}

impl Int8Tokens {
    /// Packs tokens quantized in natural column order (`QTokens::quantize` with 8 bits).
    pub fn pack(&mut self, x: &QTokens) {
        let (cols, groups) = (x.cols, x.groups);
        assert!(cols.is_multiple_of(64));
        let n = x.xq.len() / cols.max(1);
        (self.n, self.tiles, self.blocks, self.groups) = (n, n.div_ceil(T), cols / 64, groups);
        self.b.clear();
        self.b.resize(self.tiles * self.blocks * 1024, 0);
        self.xs.clear();
        self.xs.resize(self.tiles * groups * T, 0.0);
        self.xsum.clear();
        self.xsum.resize(self.tiles * groups * T, 0.0);
        for t in 0..n {
            let (tt, nn) = (t / T, t % T);
            for kb in 0..self.blocks {
                let tile = &mut self.b[(tt * self.blocks + kb) * 1024..][..1024];
                let src = &x.xq[t * cols + kb * 64..][..64];
                for k in 0..16 {
                    tile[k * 64 + nn * 4..][..4].copy_from_slice(&src[4 * k..4 * k + 4]);
                }
            }
            for g in 0..groups {
                self.xs[(tt * groups + g) * T + nn] = x.xs[t * groups + g];
                self.xsum[(tt * groups + g) * T + nn] = x.xsum[t * groups + g];
            }
        }
    }

    fn tile(&self, tt: usize, kb: usize) -> &[i8] {
        &self.b[(tt * self.blocks + kb) * 1024..][..1024]
    }
}

/// Up to 16 rows of a q4/q8 matrix as A tiles (`[block][row 0..16][64]`, one byte per weight,
/// absent rows zero) with their scales and biases (`[group][row]`).
#[derive(Default, Debug, Clone)]
pub struct Int8Panel {
    pub a: Vec<u8>,
    pub sp: Vec<f32>,
    pub bp: Vec<f32>,
    pub nrows: usize,
}

impl Int8Panel {
    /// Packs rows `r0..r0 + nrows` (`nrows <= 16`) of `q` (4 or 8 bits, groups and columns
    /// multiples of 64).
    pub fn pack(&mut self, q: &crate::quant::QMat<'_>, r0: usize, nrows: usize) {
        assert!(matches!(q.bits, 4 | 8) && q.group.is_multiple_of(64) && q.cols.is_multiple_of(64));
        assert!(nrows <= T && r0 + nrows <= q.rows);
        let (cols, blocks) = (q.cols, q.cols / 64);
        let ng = cols / q.group;
        self.nrows = nrows;
        self.a.clear();
        self.a.resize(blocks * 1024, 0);
        let rb = crate::quant::row_bytes(cols, q.bits);
        for i in 0..nrows {
            let p = &q.packed[(r0 + i) * rb..(r0 + i + 1) * rb];
            for kb in 0..blocks {
                let dst = &mut self.a[kb * 1024 + i * 64..][..64];
                if q.bits == 8 {
                    dst.copy_from_slice(&p[kb * 64..kb * 64 + 64]);
                } else {
                    unpack_q4(&p[kb * 32..kb * 32 + 32], dst);
                }
            }
        }
        self.sp.resize(ng * T, 0.0);
        self.bp.resize(ng * T, 0.0);
        // the VNNI panels' layout: [group][row], 16 rows per group
        let rows = crate::quant::QMat { rows: nrows, scales: &q.scales[r0 * ng..], biases: &q.biases[r0 * ng..], ..*q };
        super::pack_scales(&rows, nrows, &mut self.sp, &mut self.bp);
    }

    fn tile(&self, kb: usize) -> &[u8] {
        &self.a[kb * 1024..][..1024]
    }
}

/// 32 bytes of q4 (column 2j in the low nibble of byte j, 2j + 1 in the high) → 64 bytes.
#[inline]
fn unpack_q4(src: &[u8], dst: &mut [u8]) {
    assert!(src.len() == 32 && dst.len() == 64);
    #[cfg(target_arch = "x86_64")]
    if matches!(super::isa(), super::Isa::Avx512 | super::Isa::Avx512Vnni) {
        // SAFETY: AVX-512F/BW detected; 32 bytes read, 64 written (asserted).
        return unsafe { unpack_q4_avx512(src, dst) };
    }
    for (j, &b) in src.iter().enumerate() {
        dst[2 * j] = b & 15;
        dst[2 * j + 1] = b >> 4;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_q4_avx512(src: &[u8], dst: &mut [u8]) {
    use std::arch::x86_64::*;
    // SAFETY: lengths checked by the caller.
    unsafe {
        // word j = byte j; its low byte keeps the low nibble, its high byte gets the high one
        let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.as_ptr() as *const __m256i));
        let lo = _mm512_and_si512(w, _mm512_set1_epi16(0x000f));
        let hi = _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0f00));
        _mm512_storeu_si512(dst.as_mut_ptr() as *mut _, _mm512_or_si512(lo, hi));
    }
}

/// The tile instructions, or (`Emulated`, for the layout tests on any CPU) their definition.
trait Tiles {
    /// C(16×16 i32) = Σ over blocks `kbs` of the panel's A(u8) · token tile `tt`'s B(s8).
    fn int8(&mut self, p: &Int8Panel, x: &Int8Tokens, tt: usize, kbs: Range<usize>, c: &mut [i32; 256]);
    /// C(16×16 f32) = Σ over the blocks of A(bf16 rows at `stride` u16s) · B(bf16).
    fn bf16(&mut self, a: &[u16], stride: usize, blocks: usize, b: &Bf16Tokens, tt: usize, c: &mut [f32; 256]);
}

/// The instructions' definition in scalar code.
struct Emulated;

impl Tiles for Emulated {
    fn int8(&mut self, p: &Int8Panel, x: &Int8Tokens, tt: usize, kbs: Range<usize>, c: &mut [i32; 256]) {
        c.fill(0);
        for (a, b) in kbs.map(|kb| (p.tile(kb), x.tile(tt, kb))) {
            for m in 0..16 {
                for n in 0..16 {
                    let mut s = 0i32;
                    for k in 0..16 {
                        for i in 0..4 {
                            s += a[m * 64 + 4 * k + i] as i32 * b[k * 64 + 4 * n + i] as i32;
                        }
                    }
                    c[m * 16 + n] += s;
                }
            }
        }
    }

    fn bf16(&mut self, a: &[u16], stride: usize, blocks: usize, b: &Bf16Tokens, tt: usize, c: &mut [f32; 256]) {
        c.fill(0.0);
        let f = super::bf16_to_f32;
        for kb in 0..blocks {
            let bt = b.tile(tt, kb);
            for m in 0..16 {
                for n in 0..16 {
                    let mut s = 0f32;
                    for k in 0..16 {
                        for i in 0..2 {
                            s += f(a[m * stride + kb * 32 + 2 * k + i]) * f(bt[k * 32 + 2 * n + i]);
                        }
                    }
                    c[m * 16 + n] += s;
                }
            }
        }
    }
}

/// The AMX instructions. Constructing it loads the tile configuration on this thread; dropping
/// it releases the tile state.
#[cfg(target_arch = "x86_64")]
struct Amx;

#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
impl Amx {
    /// # Safety
    /// [`amx`] must have granted the tile state.
    unsafe fn new() -> Amx {
        // tiles 0..8: 16 rows of 64 bytes each
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: a valid palette-1 configuration; the caller checked AMX.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        Amx
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Amx {
    fn drop(&mut self) {
        // SAFETY: tiles were configured in `new`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(target_arch = "x86_64")]
macro_rules! tileloadd {
    ($t:literal, $p:expr, $stride:expr) => {
        std::arch::asm!(concat!("tileloadd tmm", $t, ", [{0} + {1}*1]"), in(reg) $p, in(reg) $stride,
            options(nostack, readonly))
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! tilestored {
    ($t:literal, $p:expr, $stride:expr) => {
        std::arch::asm!(concat!("tilestored [{0} + {1}*1], tmm", $t), in(reg) $p, in(reg) $stride, options(nostack))
    };
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Amx {
    fn int8(&mut self, p: &Int8Panel, x: &Int8Tokens, tt: usize, kbs: Range<usize>, c: &mut [i32; 256]) {
        // SAFETY: tiles configured (`Amx::new`); every A and B tile is a 1024-byte slice, C 1024.
        unsafe {
            std::arch::asm!("tilezero tmm4", options(nostack, nomem));
            for (a, b) in kbs.map(|kb| (p.tile(kb), x.tile(tt, kb))) {
                tileloadd!(0, a.as_ptr(), 64usize);
                tileloadd!(2, b.as_ptr(), 64usize);
                std::arch::asm!("tdpbusd tmm4, tmm0, tmm2", options(nostack, nomem));
            }
            tilestored!(4, c.as_mut_ptr(), 64usize);
        }
    }

    fn bf16(&mut self, a: &[u16], stride: usize, blocks: usize, b: &Bf16Tokens, tt: usize, c: &mut [f32; 256]) {
        assert!(a.len() >= 15 * stride + blocks * 32 && blocks <= b.blocks && tt < b.tiles);
        // SAFETY: tiles configured; the A rows (16 × 64 bytes per block at `stride`) and the B
        // tiles lie inside their slices (asserted above).
        unsafe {
            std::arch::asm!("tilezero tmm4", options(nostack, nomem));
            for kb in 0..blocks {
                tileloadd!(0, a.as_ptr().add(kb * 32), stride * 2);
                tileloadd!(2, b.tile(tt, kb).as_ptr(), 64usize);
                std::arch::asm!("tdpbf16ps tmm4, tmm0, tmm2", options(nostack, nomem));
            }
            tilestored!(4, c.as_mut_ptr(), 64usize);
        }
    }
}

/// `y[t·rows + r0 + i] = Σ_j w[r0 + i][j]·x[t][j]` for the panel's rows and every token: per
/// weight group one tile product, its int32 sums scaled by the row's and the token's scales,
/// plus the group bias times Σx.
fn int8_panel<M: Tiles>(tiles: &mut M, p: &Int8Panel, x: &Int8Tokens, group: usize, y: &mut Out<'_>) {
    let per = group / 64;
    let mut c = [0i32; 256];
    let mut acc = [0f32; 256];
    for tt in 0..x.tiles {
        acc.fill(0.0);
        for g in 0..x.groups {
            tiles.int8(p, x, tt, g * per..(g + 1) * per, &mut c);
            let xs = &x.xs[(tt * x.groups + g) * T..][..T];
            let xsum = &x.xsum[(tt * x.groups + g) * T..][..T];
            scale_group(&c, &p.sp[g * T..][..T], &p.bp[g * T..][..T], xs, xsum, &mut acc);
        }
        y.put(&acc, tt, p.nrows, x.n);
    }
}

/// acc[m][n] += c[m][n]·sw[m]·xs[n] + bw[m]·xsum[n].
#[inline]
fn scale_group(c: &[i32; 256], sw: &[f32], bw: &[f32], xs: &[f32], xsum: &[f32], acc: &mut [f32; 256]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512Vnni {
        // SAFETY: AVX-512 detected; every slice holds 16 values.
        return unsafe { scale_group_avx512(c, sw, bw, xs, xsum, acc) };
    }
    for m in 0..16 {
        for n in 0..16 {
            acc[m * 16 + n] += c[m * 16 + n] as f32 * sw[m] * xs[n] + bw[m] * xsum[n];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_group_avx512(c: &[i32; 256], sw: &[f32], bw: &[f32], xs: &[f32], xsum: &[f32], acc: &mut [f32; 256]) {
    use std::arch::x86_64::*;
    assert!(sw.len() >= 16 && bw.len() >= 16 && xs.len() >= 16 && xsum.len() >= 16);
    // SAFETY: all loads and stores are of 16 values inside the checked slices.
    unsafe {
        let (vxs, vsum) = (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xsum.as_ptr()));
        for m in 0..16 {
            let a = acc.as_mut_ptr().add(m * 16);
            let v = _mm512_cvtepi32_ps(_mm512_loadu_si512(c.as_ptr().add(m * 16) as *const _));
            let v = _mm512_mul_ps(v, _mm512_set1_ps(sw[m]));
            let r = _mm512_fmadd_ps(v, vxs, _mm512_loadu_ps(a));
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(bw[m]), vsum, r));
        }
    }
}

/// bf16 rows `w` (`nr <= 16` rows of `cols`, `cols` a multiple of 32) times every token.
fn bf16_panel<M: Tiles>(tiles: &mut M, w: &[u16], nr: usize, cols: usize, x: &Bf16Tokens, y: &mut Out<'_>) {
    let mut c = [0f32; 256];
    for tt in 0..x.tiles {
        tiles.bf16(w, cols, cols / 32, x, tt, &mut c);
        y.put(&c, tt, nr, x.n);
    }
}

/// Where a panel's results go: rows `r0..` of a `[n, rows]` output.
pub struct Out<'a> {
    pub y: *mut f32,
    pub rows: usize,
    pub r0: usize,
    pub _life: std::marker::PhantomData<&'a mut [f32]>,
}

impl Out<'_> {
    /// Stores tile `tt`'s 16×16 results (`c[m·16 + n]`: row m, token n), dropping absent rows
    /// and tokens.
    fn put(&mut self, c: &[f32; 256], tt: usize, nrows: usize, n: usize) {
        for nn in 0..T.min(n - tt * T) {
            let t = tt * T + nn;
            for m in 0..nrows {
                // SAFETY: the caller of the product vouches that rows r0..r0 + nrows of every
                // token are inside `y` and this panel's alone.
                unsafe { *self.y.add(t * self.rows + self.r0 + m) = c[m * 16 + nn] };
            }
        }
    }
}

/// int8 product of a packed panel with packed tokens, on AMX tiles.
///
/// # Safety
/// [`amx_int8`] must hold; `y` as [`Out`] requires.
pub unsafe fn gemm_int8(p: &Int8Panel, x: &Int8Tokens, group: usize, y: &mut Out<'_>) {
    #[cfg(target_arch = "x86_64")]
    if !emulate() {
        // SAFETY: the caller checked AMX.
        let mut amx = unsafe { Amx::new() };
        return int8_panel(&mut amx, p, x, group, y);
    }
    int8_panel(&mut Emulated, p, x, group, y)
}

/// bf16 product of `nr <= 16` weight rows (`w`, 16 rows of `cols` readable: pad a short
/// panel) with packed tokens, on AMX tiles.
///
/// # Safety
/// [`amx_bf16`] must hold; `y` as [`Out`] requires.
pub unsafe fn gemm_bf16(w: &[u16], nr: usize, cols: usize, x: &Bf16Tokens, y: &mut Out<'_>) {
    #[cfg(target_arch = "x86_64")]
    if !emulate() {
        // SAFETY: the caller checked AMX.
        let mut amx = unsafe { Amx::new() };
        return bf16_panel(&mut amx, w, nr, cols, x, y);
    }
    bf16_panel(&mut Emulated, w, nr, cols, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{f32_to_bf16_scalar, int8_dot_scalar};
    use crate::testutil::uniform;

    fn out(y: &mut [f32], rows: usize, r0: usize) -> Out<'_> {
        Out { y: y.as_mut_ptr(), rows, r0, _life: std::marker::PhantomData }
    }

    /// Emulated tiles (any CPU), then the real ones where AMX is, against the scalar int8
    /// reference: odd token counts, a short panel, groups of one and two blocks.
    #[test]
    fn int8_tiles_match_scalar_reference() {
        for &(rows, cols, n, group, bits) in &[
            (16, 64, 1, 64, 4),
            (13, 128, 17, 64, 4),
            (16, 256, 33, 128, 8),
            (5, 192, 16, 64, 8),
            (16, 128, 40, 128, 4),
        ] {
            let w = uniform(rows * cols, 5);
            let blob = crate::quant::quantize(&w, rows, cols, bits, group);
            let q = crate::quant::QMat::new(&blob, rows, cols, bits, group);
            let x = uniform(n * cols, 6);
            let (mut nat, mut perm) = (QTokens::default(), QTokens::default());
            nat.quantize(&x, n, cols, group, 8);
            perm.quantize(&x, n, cols, group, bits);
            let mut xt = Int8Tokens::default();
            xt.pack(&nat);
            let mut p = Int8Panel::default();
            p.pack(&q, 0, rows);
            let mut runs: Vec<(&str, Vec<f32>)> = vec![];
            let mut y = vec![f32::NAN; n * rows];
            int8_panel(&mut Emulated, &p, &xt, group, &mut out(&mut y, rows, 0));
            runs.push(("emulated", y));
            if amx_int8_present() && !emulate() {
                let mut y = vec![f32::NAN; n * rows];
                // SAFETY: AMX checked; y is [n, rows].
                unsafe { gemm_int8(&p, &xt, group, &mut out(&mut y, rows, 0)) };
                runs.push(("amx", y));
            }
            for (what, y) in runs {
                for t in 0..n {
                    for r in 0..rows {
                        let want = int8_dot_scalar(&q, r, &perm, t);
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{what} {rows}x{cols} n={n}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_unpacking_matches_scalar() {
        let src: Vec<u8> = (0..32u32).map(|i| (i * 37 + 11) as u8).collect();
        let mut got = [0u8; 64];
        unpack_q4(&src, &mut got);
        for j in 0..64 {
            assert_eq!(got[j], (src[j / 2] >> (4 * (j % 2))) & 15, "column {j}");
        }
    }

    #[test]
    fn bf16_tiles_match_scalar_reference() {
        for &(rows, cols, n) in &[(16, 32, 1), (16, 96, 17), (7, 64, 33), (16, 256, 16)] {
            let wf = uniform(16 * cols, 8);
            let mut w = vec![0u16; 16 * cols];
            f32_to_bf16_scalar(&wf, &mut w);
            w[rows * cols..].fill(0);
            let x = uniform(n * cols, 9);
            let mut xb = vec![0u16; n * cols];
            f32_to_bf16_scalar(&x, &mut xb);
            let mut xt = Bf16Tokens::default();
            xt.pack(&xb, n, cols);
            let mut runs: Vec<(&str, Vec<f32>)> = vec![];
            let mut y = vec![f32::NAN; n * rows];
            bf16_panel(&mut Emulated, &w, rows, cols, &xt, &mut out(&mut y, rows, 0));
            runs.push(("emulated", y));
            if amx_bf16() && !emulate() {
                let mut y = vec![f32::NAN; n * rows];
                // SAFETY: AMX checked; y is [n, rows]; w holds 16 rows.
                unsafe { gemm_bf16(&w, rows, cols, &xt, &mut out(&mut y, rows, 0)) };
                runs.push(("amx", y));
            }
            let f = crate::kernels::bf16_to_f32;
            for (what, y) in runs {
                for t in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols).map(|j| f(w[r * cols + j]) as f64 * f(xb[t * cols + j]) as f64).sum();
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{what} {rows}x{cols} n={n}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
