// flashmoe CUDA kernels, compiled at run time by NVRTC (no toolkit needed to build the crate).
// Activations are f32; weights stay in their stored format (f32, bf16, f16, or the MLX-style
// group-affine q2/q3/q4/q8 of src/quant.rs) and are dequantized in registers.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __uint_as_float(0xff800000u)

// Programmatic dependent launch (sm_90+, `Launch` in mod.rs): a kernel launched with it may
// start while the kernel before it still runs. Every kernel first waits here for the one before
// (its completion and its memory), then lets the next one start its blocks, so the launch and
// ramp of kernel i+1 overlap kernel i. Nothing may be read or written before this point.
#ifndef PDL_ENTRY
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY()
#endif
#endif

// A matrix inside a device buffer: offsets from a base pointer (an expert's extent, or the
// matrix's own allocation). kind: 0 f32, 1 bf16, 2 f16, 3 group-affine quantized, 4 MXFP4
// (per row `rb` bytes of e2m1 nibbles, low nibble first, then per row an e8m0 scale per 32).
struct MatD {
    u64 off;
    u64 soff;  // scales (bf16; MXFP4: e8m0 bytes), from `off`
    u64 boff;  // biases (bf16), from `off`
    int rows;
    int cols;
    int kind;
    int bits;
    int group;
    int rb;    // packed bytes per row (quantized, MXFP4)
};

#define MXFP4 0  // the `F` of the integer kernels' templates for MXFP4 rows (else the q bits)

__device__ __forceinline__ float bf(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float h2f(u16 h) {
    u32 s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? __int_as_float(0x7fc00000) : __int_as_float(0x7f800000);
    else v = ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}

// e8m0 scale s: 2^(s − 127) (exact, subnormal for s = 0).
__device__ __forceinline__ float e8m0(u32 s) { return s ? __uint_as_float(s << 23) : __uint_as_float(0x00400000u); }

// 2^(s − 128): the scale of the doubled e2m1 integers the int8 kernels multiply.
__device__ __forceinline__ float e8m0_half(u32 s) {
    return s >= 2 ? __uint_as_float((s - 1) << 23) : __uint_as_float(0x00200000u << s);
}

// The e2m1 value of a nibble: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, built from its bits.
__device__ __forceinline__ float e2m1(u32 c) {
    u32 m = c & 7, e = m >> 1;
    float v = e ? __uint_as_float(((e + 126) << 23) | ((m & 1) << 22)) : 0.5f * (float)(m & 1);
    return (c & 8) ? -v : v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

#define NT 8  // tokens a warp computes per weight row read (prefill); decode uses 1

// Σ_k w_k · x[t][k] over a row of a group-affine matrix, 16-byte loads: w = s·q + b, so a load's
// share is s·Σ q·x + b·Σ x (all its values sit in one group: checked by the caller).
template <int BITS, int T>
__device__ __forceinline__ void qdots(const u8* r, const u16* sc, const u16* bi, int cols, int group, const float* x,
                                      long long xs, int nt, int lane, float* acc) {
    constexpr int PER = 128 / BITS, VPW = 32 / BITS;
    constexpr u32 MASK = (1u << BITS) - 1;
    const uint4* r4 = (const uint4*)r;
    for (int i = lane; i < cols / PER; i += 32) {
        uint4 v = __ldg(r4 + i);
        u32 ws[4] = {v.x, v.y, v.z, v.w};
        int j0 = i * PER, g = j0 / group;
        float s = bf(__ldg(sc + g)), b = bf(__ldg(bi + g));
#pragma unroll
        for (int t = 0; t < T; t++) {
            if (t < nt) {
                const float4* x4 = (const float4*)(x + t * xs + j0);
                float qx = 0.f, sx = 0.f;
#pragma unroll
                for (int k4 = 0; k4 < PER / 4; k4++) {
                    float4 xv = x4[k4];
                    float xe[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int k = k4 * 4 + e;
                        qx = fmaf((float)((ws[k / VPW] >> ((k % VPW) * BITS)) & MASK), xe[e], qx);
                        sx += xe[e];
                    }
                }
                acc[t] = fmaf(s, qx, fmaf(b, sx, acc[t]));
            }
        }
    }
}

#ifndef HD_U
#define HD_U 1  // loads a lane issues at once (4, with this session's other router changes: 12.2–12.3 µs against 11.5; not separated)
#endif

// bf16 / f16 rows, 16-byte loads (cols a multiple of 8).
template <int KIND, int T>
__device__ __forceinline__ void hdots(const u16* r, int cols, const float* x, long long xs, int nt, int lane, float* acc) {
    const uint4* r4 = (const uint4*)r;
    const int n = cols / 8;
    // HD_U loads of a lane issued before the first use (a router's 2048 bf16 columns: 8 loads
    // a lane, which one at a time were 8 round trips)
    for (int i0 = lane; i0 < n; i0 += 32 * HD_U) {
        uint4 vs[HD_U];
#pragma unroll
        for (int e = 0; e < HD_U; e++) {
            int i = i0 + 32 * e;
            vs[e] = i < n ? __ldg(r4 + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int e = 0; e < HD_U; e++) {
            int i = i0 + 32 * e;
            if (i >= n) break;
            u32 ws[4] = {vs[e].x, vs[e].y, vs[e].z, vs[e].w};
            float w[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                u16 b = (u16)(ws[k >> 1] >> ((k & 1) * 16));
                w[k] = KIND == 1 ? bf(b) : h2f(b);
            }
#pragma unroll
            for (int t = 0; t < T; t++) {
                if (t < nt) {
                    const float4* x4 = (const float4*)(x + t * xs + i * 8);
                    float4 a = x4[0], c = x4[1];
                    acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * c.x + w[5] * c.y + w[6] * c.z + w[7] * c.w;
                }
            }
        }
    }
}

// MXFP4 rows of whole 32-value blocks: a 16-byte load is one block of one scale.
template <int T>
__device__ __forceinline__ void fp4dots(const u8* r, const u8* sc, int cols, const float* x, long long xs, int nt,
                                        int lane, float* acc) {
    const uint4* r4 = (const uint4*)r;
    for (int i = lane; i < cols / 32; i += 32) {
        uint4 v = __ldg(r4 + i);
        u32 ws[4] = {v.x, v.y, v.z, v.w};
        float s = e8m0(__ldg(sc + i));
        float w[32];
#pragma unroll
        for (int k = 0; k < 32; k++) w[k] = e2m1((ws[k >> 3] >> ((k & 7) * 4)) & 15);
#pragma unroll
        for (int t = 0; t < T; t++) {
            if (t < nt) {
                const float4* x4 = (const float4*)(x + t * xs + i * 32);
                float a = 0.f;
#pragma unroll
                for (int k4 = 0; k4 < 8; k4++) {
                    float4 xv = x4[k4];
                    a += w[4 * k4] * xv.x + w[4 * k4 + 1] * xv.y + w[4 * k4 + 2] * xv.z + w[4 * k4 + 3] * xv.w;
                }
                acc[t] = fmaf(s, a, acc[t]);
            }
        }
    }
}

// acc[t] += W[row] · x_t for t < nt (x_t = x + t · xs); the lanes of a warp split the row.
template <int T>
__device__ __forceinline__ void row_dots(const u8* base, const MatD& m, int row, const float* x, long long xs, int nt,
                                         int lane, float* acc) {
    const u8* w = base + m.off;
    int cols = m.cols;
    if (m.kind == 1 || m.kind == 2) {
        const u16* r = (const u16*)w + (long long)row * cols;
        if ((cols & 7) == 0 && (xs & 3) == 0) {
            if (m.kind == 1) hdots<1, T>(r, cols, x, xs, nt, lane, acc);
            else hdots<2, T>(r, cols, x, xs, nt, lane, acc);
            return;
        }
        for (int j = lane; j < cols; j += 32) {
            float wv = m.kind == 1 ? bf(r[j]) : h2f(r[j]);
#pragma unroll
            for (int t = 0; t < T; t++) if (t < nt) acc[t] += wv * x[t * xs + j];
        }
    } else if (m.kind == 4) {
        const u8* r = w + (long long)row * m.rb;
        const u8* sc = w + m.soff + (long long)row * ((cols + 31) / 32);
        if ((cols & 31) == 0 && (xs & 3) == 0) {
            fp4dots<T>(r, sc, cols, x, xs, nt, lane, acc);
            return;
        }
        for (int j = lane; j < cols; j += 32) {
            float wv = e2m1((r[j >> 1] >> ((j & 1) * 4)) & 15) * e8m0(sc[j >> 5]);
#pragma unroll
            for (int t = 0; t < T; t++) if (t < nt) acc[t] += wv * x[t * xs + j];
        }
    } else if (m.kind == 0) {
        const float* r = (const float*)w + (long long)row * cols;
        for (int j = lane; j < cols; j += 32) {
            float wv = r[j];
#pragma unroll
            for (int t = 0; t < T; t++) if (t < nt) acc[t] += wv * x[t * xs + j];
        }
    } else {
        int bits = m.bits, group = m.group;
        int groups = (cols + group - 1) / group;
        const u8* r = w + (long long)row * m.rb;
        const u16* sc = (const u16*)(w + m.soff) + (long long)row * groups;
        const u16* bi = (const u16*)(w + m.boff) + (long long)row * groups;
        int per = 128 / bits;
        if (bits != 3 && (m.rb & 15) == 0 && cols % per == 0 && group % per == 0 && (xs & 3) == 0) {
            if (bits == 4) qdots<4, T>(r, sc, bi, cols, group, x, xs, nt, lane, acc);
            else if (bits == 8) qdots<8, T>(r, sc, bi, cols, group, x, xs, nt, lane, acc);
            else qdots<2, T>(r, sc, bi, cols, group, x, xs, nt, lane, acc);
            return;
        }
        for (int j = lane; j < cols; j += 32) {
            long long bit = (long long)j * bits;
            long long byte = bit >> 3;
            u32 word = r[byte];
            if (byte + 1 < m.rb) word |= ((u32)r[byte + 1]) << 8;
            float q = (float)((word >> (bit & 7)) & ((1u << bits) - 1));
            int g = j / group;
            float wv = fmaf(bf(sc[g]), q, bf(bi[g]));
#pragma unroll
            for (int t = 0; t < T; t++) if (t < nt) acc[t] += wv * x[t * xs + j];
        }
    }
}

// y[t][r] = W[r] · x[t] for nt ≤ T consecutive tokens, a warp per row (grid.x: rows / warps).
template <int T>
__device__ __forceinline__ void rows_times_tokens(const u8* base, const MatD& m, const float* x, float* y, int nt,
                                                  const float* bias = nullptr) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= m.rows) return;
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    row_dots<T>(base, m, row, x, m.cols, nt, lane, acc);
#pragma unroll
    for (int t = 0; t < T; t++) {
        float v = warp_sum(acc[t]) + (bias ? bias[row] : 0.f);
        if (lane == 0 && t < nt) y[(long long)t * m.rows + row] = v;
    }
}

// y = W·x for ntok tokens; grid (rows / warps per block, tokens / T).
template <int T>
__device__ __forceinline__ void matmul_t(const u8* base, MatD m, const float* x, float* y, int ntok) {
    int t0 = blockIdx.y * T;
    rows_times_tokens<T>(base, m, x + (long long)t0 * m.cols, y + (long long)t0 * m.rows, min(T, ntok - t0));
}

// An input quantized for the integer kernels: int8 values, a scale per 32, the float sum of
// every 16 (the affine bias multiplies the exact sum). Null `q`: use the f32 input.
struct QX {
    const signed char* q;
    const float* d;
    const float* s16;
};

__device__ __forceinline__ QX qx_row(QX x, long long r, int cols) {
    if (!x.q) return x;
    return QX{x.q + r * cols, x.d + r * (cols / 32), x.s16 + r * (cols / 16)};
}

// One 16-byte load of a q4/q8 row (columns j0.., all in one group of scale s, bias b) times the
// int8 input with `dp4a`: it meets 16 bytes (q8) or 32 (q4) of input, nibbles put in column
// order with byte permutes.
// Four MXFP4 nibbles (a selector's low 16 bits, column order) as the signed bytes 2·e2m1:
// magnitudes and their negatives looked up with byte permutes, then picked by the sign bits.
__device__ __forceinline__ int fp4x4(u32 sel) {
    u32 mag = sel & 0x7777u;
    u32 pos = __byte_perm(0x03020100u, 0x0C080604u, mag);
    u32 neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, mag);
    return (int)__byte_perm(pos, neg, 0x3210u | ((sel >> 1) & 0x4444u));
}

// Values per 16-byte load of an integer-kernel row (F: q bits, or MXFP4).
#define PER_LOAD(F) ((F) == MXFP4 ? 32 : 128 / (F))

// Load i (16 bytes) of row `row` of a q4/q8/MXFP4 matrix at w, with its scale and bias (MXFP4:
// the scale of the doubled e2m1 integers, no bias).
template <int F>
__device__ __forceinline__ void load16(const u8* w, const MatD& m, long long row, int i, uint4& v, float& s, float& b) {
    v = __ldg((const uint4*)(w + row * m.rb) + i);
    if (F == MXFP4) {
        s = e8m0_half(__ldg(w + m.soff + row * (m.cols / 32) + i));
        b = 0.f;
    } else {
        int groups = (m.cols + m.group - 1) / m.group, g = i * PER_LOAD(F) / m.group;
        s = bf(__ldg((const u16*)(w + m.soff) + row * groups + g));
        b = bf(__ldg((const u16*)(w + m.boff) + row * groups + g));
    }
}

template <int BITS>
__device__ __forceinline__ float chunk_i8(uint4 v, float s, float b, QX x, int j0) {
    const int* xq = (const int*)(x.q + j0);
    int isum = 0;
    if (BITS == MXFP4) {
        u32 ws[4] = {v.x, v.y, v.z, v.w};
        int4 xa = *(const int4*)xq, xb = *(const int4*)(xq + 4);
        int xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            isum = __dp4a(fp4x4(ws[w] & 0xFFFFu), xs[2 * w], isum);
            isum = __dp4a(fp4x4(ws[w] >> 16), xs[2 * w + 1], isum);
        }
        return s * x.d[j0 / 32] * (float)isum;
    }
    if (BITS == 4) {
        u32 ws[4] = {v.x, v.y, v.z, v.w};
        int4 xa = *(const int4*)xq, xb = *(const int4*)(xq + 4);
        int xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            u32 lo = ws[w] & 0x0F0F0F0Fu, hi = (ws[w] >> 4) & 0x0F0F0F0Fu;
            isum = __dp4a((int)__byte_perm(lo, hi, 0x5140), xs[2 * w], isum);
            isum = __dp4a((int)__byte_perm(lo, hi, 0x7362), xs[2 * w + 1], isum);
        }
        float sx = x.s16[j0 / 16] + x.s16[j0 / 16 + 1];
        return s * x.d[j0 / 32] * (float)isum + b * sx;
    }
    // q - 128 as signed bytes; the offset moves into the bias: s·q + b = s·(q-128) + (b + 128 s)
    int4 xa = *(const int4*)xq;
    isum = __dp4a((int)(v.x ^ 0x80808080u), xa.x, isum);
    isum = __dp4a((int)(v.y ^ 0x80808080u), xa.y, isum);
    isum = __dp4a((int)(v.z ^ 0x80808080u), xa.z, isum);
    isum = __dp4a((int)(v.w ^ 0x80808080u), xa.w, isum);
    return s * x.d[j0 / 32] * (float)isum + (b + 128.f * s) * x.s16[j0 / 16];
}

// Whether the int8-input kernels take matrix m: q4/q8 rows of whole 16-byte loads, groups of
// 32s, or MXFP4 rows of whole 32-value blocks.
__device__ __forceinline__ bool i8_ok(const MatD& m) {
    if (m.kind == 4) return (m.cols & 31) == 0;
    return m.kind == 3 && (m.bits == 4 || m.bits == 8) && (m.cols & 31) == 0 && (m.group & 31) == 0 && (m.rb & 15) == 0;
}

// The integer-kernel format of an `i8_ok` matrix: MXFP4 or its q bits.
__device__ __forceinline__ int i8_format(const MatD& m) { return m.kind == 4 ? MXFP4 : m.bits; }

#ifndef QD_U
#define QD_U 2  // 16-byte loads a lane issues before the first use (a warp stalls at a load's first use)
#endif

// Σ w·x over a q4/q8 row on the int8 input: each lane's loads (up to QD_U of them) issued at once.
template <int BITS>
__device__ __forceinline__ float qdot_i8(const u8* w, const MatD& m, int row, QX x, int lane) {
    constexpr int PER = PER_LOAD(BITS);
    const int n = m.cols / PER;
    float acc = 0.f;
    for (int i0 = lane; i0 < n; i0 += 32 * QD_U) {
        uint4 v[QD_U];
        float s[QD_U], b[QD_U];
#pragma unroll
        for (int e = 0; e < QD_U; e++) {
            int i = i0 + 32 * e;
            if (i < n) load16<BITS>(w, m, row, i, v[e], s[e], b[e]);
        }
#pragma unroll
        for (int e = 0; e < QD_U; e++) {
            int i = i0 + 32 * e;
            if (i < n) acc += chunk_i8<BITS>(v[e], s[e], b[e], x, i * PER);
        }
    }
    return acc;
}

// One token's W[row]·x, the lanes' partial sums: the integer kernel where the format allows it.
__device__ __forceinline__ float vec_dot(const u8* base, const MatD& m, int row, const float* x, QX qx, int lane) {
    if (qx.q && i8_ok(m)) {
        const u8* w = base + m.off;
        int f = i8_format(m);
        return f == 4 ? qdot_i8<4>(w, m, row, qx, lane)
                      : f == 8 ? qdot_i8<8>(w, m, row, qx, lane) : qdot_i8<MXFP4>(w, m, row, qx, lane);
    }
    float a[1] = {0.f};
    row_dots<1>(base, m, row, x, 0, 1, lane, a);
    return a[0];
}

// Quantizes `rows` rows of `cols` (a multiple of 32) for the integer kernels; a warp per 32.
extern "C" __global__ void quant_x(const float* x, int rows, int cols, signed char* q, float* d, float* s16) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    long long c = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    long long chunks = (long long)rows * (cols / 32);
    if (c >= chunks) return;
    float v = x[c * 32 + lane];
    float amax = warp_max(fabsf(v));
    float dd = amax / 127.f;
    q[c * 32 + lane] = (signed char)__float2int_rn(dd > 0.f ? v / dd : 0.f);
    float h = v;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) h += __shfl_xor_sync(0xffffffff, h, o);
    if (lane == 0) d[c] = dd;
    if (lane == 0 || lane == 16) s16[c * 2 + lane / 16] = h;
}

extern "C" __global__ void matvec_q(const u8* base, MatD m, const float* x, float* y, QX qx) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    PDL_ENTRY();
    if (row >= m.rows) return;
    float v = warp_sum(vec_dot(base, m, row, x, qx, lane));
    if (lane == 0) y[row] = v;
}

// Up to four products of one token on the same int8 input in one launch (q/k/v, DeltaNet's
// input projections): the grid's rows run through the matrices in order.
struct Multi {
    u64 base[4];
    MatD m[4];
    u64 y[4];
    int n;
};

extern "C" __global__ void matvec_multi(Multi p, const float* x, QX qx) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int i = 0;
    while (i < p.n && row >= p.m[i].rows) row -= p.m[i++].rows;
    PDL_ENTRY();
    if (i >= p.n) return;
    float v = warp_sum(vec_dot((const u8*)p.base[i], p.m[i], row, x, qx, lane));
    if (lane == 0) ((float*)p.y[i])[row] = v;
}

extern "C" __global__ void matmul(const u8* base, MatD m, const float* x, float* y, int ntok) {
    PDL_ENTRY();
    matmul_t<NT>(base, m, x, y, ntok);
}

extern "C" __global__ void matvec(const u8* base, MatD m, const float* x, float* y, int ntok) {
    PDL_ENTRY();
    matmul_t<1>(base, m, x, y, ntok);
}

// Block reduction of one value (blockDim a multiple of 32, at most 1024).
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

// The int8 form of value v at index c·32 + lane of an input (the warp's 32 lanes hold one
// chunk of 32 consecutive values): as quant_x computes it.
__device__ __forceinline__ void quant_chunk(float v, long long c, int lane, QX q) {
    float amax = warp_max(fabsf(v));
    float dd = amax / 127.f;
    ((signed char*)q.q)[c * 32 + lane] = (signed char)__float2int_rn(dd > 0.f ? v / dd : 0.f);
    float h = v;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) h += __shfl_xor_sync(0xffffffff, h, o);
    if (lane == 0) ((float*)q.d)[c] = dd;
    if (lane == 0 || lane == 16) ((float*)q.s16)[c * 2 + lane / 16] = h;
}

// x[t] += y[t] (when y is given); h[t] = rmsnorm(x[t]) · w, and its int8 form into `q` when
// q.q is set (one token, dim a multiple of 32: the next products' input). One block per token.
// Each thread's values are loaded into registers at once (a warp issues loads in order and
// stalls at the first use: a loop over the row would wait once per iteration).
#define NORM_PER 8
// The block's row at offset o (y read past L1: another block of the same launch may have written it).
// yb: a bias added with y (an output projection's, gpt-oss), or null.
__device__ __forceinline__ void rmsnorm_row(float* x, const float* y, const float* yb, const float* w, float* h, int dim,
                                            float eps, QX q, long long o) {
    __shared__ float sh[32];
    int nb = blockDim.x;
    if (dim > NORM_PER * nb) {
        // wider than the registers hold: the plain loops
        float ss = 0.f;
        for (int i = threadIdx.x; i < dim; i += nb) {
            float v = x[o + i];
            if (y) { v += __ldcg(y + o + i) + (yb ? yb[i] : 0.f); x[o + i] = v; }
            ss += v * v;
        }
        float inv = rsqrtf(block_sum(ss, sh) / dim + eps);
        for (int i = threadIdx.x; i < dim; i += nb) {
            float v = x[o + i] * inv * w[i];
            h[o + i] = v;
            if (q.q) quant_chunk(v, (o + i) / 32, threadIdx.x & 31, q);
        }
        return;
    }
    // every load issued before the first use, none behind a branch: a load whose use sits in
    // its own branch is waited for there, one round trip per value (this norm took 6 µs)
    float v[NORM_PER], ww[NORM_PER], yv[NORM_PER];
    const float* yy = y ? y : x;
#pragma unroll
    for (int r = 0; r < NORM_PER; r++) {
        int i = threadIdx.x + r * nb;
        bool in = i < dim;
        v[r] = in ? x[o + i] : 0.f;
        yv[r] = in ? __ldcg(yy + o + i) : 0.f;
        ww[r] = in ? w[i] : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int r = 0; r < NORM_PER; r++) {
        int i = threadIdx.x + r * nb;
        // (a bias, gpt-oss's, is loaded only here: one more round trip where there is one)
        if (y) v[r] += yv[r] + (yb && i < dim ? yb[i] : 0.f);
        if (y && i < dim) x[o + i] = v[r];
        ss += v[r] * v[r];
    }
    float inv = rsqrtf(block_sum(ss, sh) / dim + eps);
#pragma unroll
    for (int r = 0; r < NORM_PER; r++) {
        int i = threadIdx.x + r * nb;
        // blockDim and dim are multiples of 32 when q is set: a warp's lanes hold one chunk
        if (i < dim) {
            float hv = v[r] * inv * ww[r];
            h[o + i] = hv;
            if (q.q) quant_chunk(hv, (o + i) / 32, threadIdx.x & 31, q);
        }
    }
}

// (at most 64 registers: a block of 1024 threads must fit the register file; DeepSeek-V3's 7168
// values take 896)
extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm(float* x, const float* y, const float* yb, const float* w, float* h, int dim,
                                       float eps, QX q) {
    PDL_ENTRY();
    rmsnorm_row(x, y, yb, w, h, dim, eps, q, (long long)blockIdx.x * dim);
}

// Whether this block is the launch's last to get here (counted in `*done`), every block's
// writes before this point visible to it. One acquire-release atomic per block after the
// barrier (a fence by every thread, sequentially consistent, cost more than the rest of a
// small kernel); the barrier carries the block's writes into its release and the last
// block's acquire out to all its threads.
__device__ __forceinline__ bool last_block(unsigned* done) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned old;
        asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(done) : "memory");
        last = old == gridDim.x - 1;
    }
    __syncthreads();
    return last;
}

// One token's y = W·xin (a warp per row, as matvec_q) and then, in the block that finishes last
// (counted in `*done`, set back to 0 for the next launch), x += y and h = rmsnorm(x) · w with
// h's int8 form into `hq` when hq.q is set, as add_rmsnorm: a mixer's output projection and
// the norm after it in one launch. W's rows are x's dim.
extern "C" __global__ void matvec_norm(const u8* base, MatD m, const float* xin, QX qx, float* y, const float* yb,
                                       unsigned* done, float* x, const float* w, float* h, float eps, QX hq) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    PDL_ENTRY();
    if (row < m.rows) {
        float v = warp_sum(vec_dot(base, m, row, xin, qx, lane));
        if (lane == 0) y[row] = v;
    }
    if (!last_block(done)) return;
    rmsnorm_row(x, y, yb, w, h, m.rows, eps, hq, 0);
    if (threadIdx.x == 0) *done = 0;
}

// meta = [pos0, k cache of layer 0, v cache of layer 0, k cache of layer 1, ...]: what changes
// from call to call is read from device memory, so a captured decode graph replays for any
// sequence and position.

// q/k biases (when given) and RMSNorm per head (when `norm`), then RoPE on the first `rot` dims
// ("rotate half") at the frequencies `freqs` (rot/2, from the layer's RoPE: plain or YaRN),
// cos and sin times `fscale` (YaRN's attention factor); k and v (plus its bias) of token t are
// written into the caches at position pos0 + t. Grid (tokens, heads + kv heads), one warp each.
extern "C" __global__ void qk_norm_rope(float* q, const float* k, const float* v, const float* qn, const float* kn,
                                        const long long* meta, int layer, int nh, int nkv, int d, int qw, int rot,
                                        const double* freqs, float fscale, float eps, const float* bq, const float* bk,
                                        const float* bv, int norm) {
    PDL_ENTRY();
    __shared__ float head[512];
    int pos0 = (int)meta[0];
    float* kc = (float*)meta[1 + 2 * layer];
    float* vc = (float*)meta[2 + 2 * layer];
    int t = blockIdx.x, hh = blockIdx.y, lane = threadIdx.x;
    int pos = pos0 + t;
    float* src;
    float* dst;
    const float* nw;
    const float* bias;
    if (hh < nh) {
        src = q + ((long long)t * nh + hh) * qw;
        dst = src;
        nw = qn;
        bias = bq ? bq + (long long)hh * qw : nullptr;
    } else {
        int kh = hh - nh;
        src = (float*)k + ((long long)t * nkv + kh) * d;
        dst = kc + ((long long)pos * nkv + kh) * d;
        nw = kn;
        bias = bk ? bk + (long long)kh * d : nullptr;
        float vv[8];
#pragma unroll
        for (int r = 0; r < 8; r++) {
            int i = lane + 32 * r;
            vv[r] = i < d ? v[((long long)t * nkv + kh) * d + i] + (bv ? bv[kh * d + i] : 0.f) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < 8; r++) if (lane + 32 * r < d) vc[((long long)pos * nkv + kh) * d + lane + 32 * r] = vv[r];
    }
    // every load first (see add_rmsnorm), d ≤ 256
    float hv[8], nv[8];
    float ss = 0.f;
#pragma unroll
    for (int r = 0; r < 8; r++) {
        int i = lane + 32 * r;
        hv[r] = i < d ? src[i] + (bias ? bias[i] : 0.f) : 0.f;
        nv[r] = i < d && norm ? nw[i] : 1.f;
        ss += hv[r] * hv[r];
    }
    float inv = norm ? rsqrtf(warp_sum(ss) / d + eps) : 1.f;
#pragma unroll
    for (int r = 0; r < 8; r++) {
        int i = lane + 32 * r;
        if (i < d) head[i] = hv[r] * inv * nv[r];
    }
    __syncwarp();
    int half = rot / 2;
    for (int i = lane; i < d; i += 32) {
        float out = head[i];
        if (i < rot) {
            int j = i < half ? i : i - half;
            // the angle in double (positions reach 1e5+), reduced to [-π, π] before float sin/cos:
            // double-precision sin and cos took most of this kernel's time
            double a = (double)pos * freqs[j];
            const double two_pi = 6.283185307179586;
            float r = (float)(a - rint(a / two_pi) * two_pi), c, s;
            sincosf(r, &s, &c);
            c *= fscale;
            s *= fscale;
            out = i < half ? head[i] * c - head[i + half] * s : head[i] * c + head[i - half] * s;
        }
        dst[i] = out;
    }
}

// MiniMax-M2's q/k RMSNorm over each token's whole projection (before the head split and RoPE),
// in place, biases added first when given: block (t, 0) normalises q's row (qd wide), (t, 1) k's.
extern "C" __global__ void whole_norm(float* q, float* k, const float* qn, const float* kn, const float* bq,
                                      const float* bk, int qd, int kd, float eps) {
    PDL_ENTRY();
    __shared__ float sh[32];
    int t = blockIdx.x, which = blockIdx.y;
    int dim = which ? kd : qd;
    float* row = (which ? k : q) + (long long)t * dim;
    const float* w = which ? kn : qn;
    const float* b = which ? bk : bq;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = row[i] + (b ? b[i] : 0.f);
        row[i] = v;
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, sh) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = row[i] * inv * w[i];
}

// Softmax attention of token t (position pos0 + t) over cache positions 0..=pos0 + t, split
// across blocks (flash-decoding): block (t·heads + h, c) covers positions c·CHUNK.. of head h,
// its 4 warps each an online softmax over every 4th position (U positions' loads in flight
// at a time), merged into part[(t·heads + h)·parts + c] = (max, sum, acc[d]).
#define CHUNK 128
template <int U>
__device__ __forceinline__ void attn_part_t(const float* q, const long long* meta, int layer, float* part, int nh,
                                            int nkv, int d, int qw, int parts, int window) {
    __shared__ float sm[4], sl[4];
    __shared__ float sacc[4][256];
    int th = blockIdx.x, c = blockIdx.y;
    int t = th / nh, h = th % nh, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int pos0 = (int)meta[0];
    const float* kc = (const float*)meta[1 + 2 * layer];
    const float* vc = (const float*)meta[2 + 2 * layer];
    int kvh = h / (nh / nkv);
    // a sliding layer's token sees the last `window` positions, itself included: the chunks
    // start at the window's first position
    int len = pos0 + t + 1, start = max(0, len - window);
    int p0 = start + c * CHUNK, p1 = min(len, p0 + CHUNK);
    float* out = part + ((long long)th * parts + c) * (d + 2);
    if (p0 >= len) {
        for (int i = threadIdx.x; i < d + 2; i += blockDim.x) out[i] = i == 0 ? NEG_INF : 0.f;
        return;
    }
    const float* qh = q + ((long long)t * nh + h) * qw;
    float scale = rsqrtf((float)d);
    float qr[8], acc[8];
    int per = (d + 31) / 32;
#pragma unroll
    for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; qr[i] = (i < per && cc < d) ? qh[cc] * scale : 0.f; acc[i] = 0.f; }
    float m = NEG_INF, l = 0.f;
    long long stride = (long long)nkv * d;
    if (U == 4) {
        // a prompt's blocks (many, each a short walk): few registers, many blocks per SM
        for (int pb = p0 + w; pb < p1; pb += 16) {
            float sc[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int p = pb + 4 * u;
                float sv = 0.f;
                if (p < p1) {
                    const float* kp = kc + p * stride + kvh * d;
#pragma unroll
                    for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; if (i < per && cc < d) sv += qr[i] * kp[cc]; }
                }
                sc[u] = sv;
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int p = pb + 4 * u;
                if (p >= p1) break;
                float sv = warp_sum(sc[u]);
                float mn = fmaxf(m, sv);
                float corr = __expf(m - mn), e = __expf(sv - mn);
                l = l * corr + e;
                const float* vp = vc + p * stride + kvh * d;
#pragma unroll
                for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; if (i < per && cc < d) acc[i] = acc[i] * corr + e * vp[cc]; }
                m = mn;
            }
        }
    } else {
        // one token's (few blocks, each a long walk): every load of U positions in flight
        // U positions a warp's loads cover at a time (every 4th position of the chunk): their
        // k rows, then their v rows, are all loaded before the first use
        for (int pb = p0 + w; pb < p1; pb += 4 * U) {
            float sc[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int p = pb + 4 * u;
                float sv = 0.f;
                if (p < p1) {
                    const float* kp = kc + p * stride + kvh * d;
#pragma unroll
                    for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; if (i < per && cc < d) sv += qr[i] * kp[cc]; }
                }
                sc[u] = sv;
            }
            float vv[U][8];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int p = pb + 4 * u;
                const float* vp = vc + p * stride + kvh * d;
#pragma unroll
                for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; vv[u][i] = (p < p1 && i < per && cc < d) ? vp[cc] : 0.f; }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (pb + 4 * u < p1) {
                    float sv = warp_sum(sc[u]);
                    float mn = fmaxf(m, sv);
                    float corr = __expf(m - mn), e = __expf(sv - mn);
                    l = l * corr + e;
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[i] = acc[i] * corr + e * vv[u][i];
                    m = mn;
                }
            }
        }
    }
    if (lane == 0) { sm[w] = m; sl[w] = l; }
#pragma unroll
    for (int i = 0; i < 8; i++) { int cc = lane + 32 * i; if (i < per && cc < d) sacc[w][cc] = acc[i]; }
    __syncthreads();
    float top = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
    float wt[4], tot = 0.f;
    for (int i = 0; i < 4; i++) { wt[i] = sm[i] == NEG_INF ? 0.f : __expf(sm[i] - top); tot += wt[i] * sl[i]; }
    for (int cc = threadIdx.x; cc < d; cc += blockDim.x) {
        float v = 0.f;
        for (int i = 0; i < 4; i++) v += wt[i] * sacc[i][cc];
        out[2 + cc] = v;
    }
    if (threadIdx.x == 0) { out[0] = top; out[1] = tot; }
}

// (the kernels: a prompt's, 4 positions' k loads a warp in flight; one token's, 16 positions'
// k and then v loads: 25 µs against 44 µs a layer at 512 positions on the H200)
extern "C" __global__ void attn_part(const float* q, const long long* meta, int layer, float* part, int nh, int nkv,
                                     int d, int qw, int parts, int window) {
    PDL_ENTRY();
    attn_part_t<4>(q, meta, layer, part, nh, nkv, d, qw, parts, window);
}

extern "C" __global__ void attn_part1(const float* q, const long long* meta, int layer, float* part, int nh, int nkv,
                                      int d, int qw, int parts, int window) {
    PDL_ENTRY();
    attn_part_t<16>(q, meta, layer, part, nh, nkv, d, qw, parts, window);
}

// One decode token's attention for `gh` query heads of a GQA group, a lane per position: block
// (kv head · groups + g, c) covers positions c·CHUNK.. (4 warps of 32) for query heads
// kvh·(nh/nkv) + g·gh.. . A lane scores its position against all gh queries (its k row read
// once for the group, in 16-byte loads; the queries from shared memory), each warp takes the
// softmax of its 32 scores per head with one max and one sum, then Σ e·v over its positions
// with the lanes splitting the dims. No reduction per position: the old kernel's per-position
// shuffles and online rescaling were its critical path. Writes attn_part's parts.
template <int DV>  // head dim / 32
__device__ __forceinline__ void attn_dec_t(const float* q, const long long* meta, int layer, float* part, int nh,
                                           int nkv, int qw, int parts, int window, int gh) {
    constexpr int D = 32 * DV, GH = 32 / DV;  // GH · DV = 32 accumulators a lane at most
    __shared__ float4 sq[GH * D / 4];
    __shared__ float se[4][GH][32];
    __shared__ float sm[4][GH], sl[4][GH];
    __shared__ float sacc[4][GH][D];
    int groups = (nh / nkv) / gh;
    int kvh = blockIdx.x / groups, h0 = kvh * (nh / nkv) + (blockIdx.x % groups) * gh;
    int c = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int pos0 = (int)meta[0];
    const float* kc = (const float*)meta[1 + 2 * layer];
    const float* vc = (const float*)meta[2 + 2 * layer];
    int len = pos0 + 1, start = max(0, len - window);
    int p0 = start + c * CHUNK, p1 = min(len, p0 + CHUNK);
    if (p0 >= len) {
        for (int i = threadIdx.x; i < gh * (D + 2); i += blockDim.x) {
            int hh = i / (D + 2), j = i - hh * (D + 2);
            part[((long long)(h0 + hh) * parts + c) * (D + 2) + j] = j == 0 ? NEG_INF : 0.f;
        }
        return;
    }
    float scale = rsqrtf((float)D);
    float* sqf = (float*)sq;
    for (int i = threadIdx.x; i < gh * D; i += blockDim.x) sqf[i] = q[(long long)(h0 + i / D) * qw + i % D] * scale;
    __syncthreads();
    long long stride = (long long)nkv * D;
    int pw = p0 + 32 * w, nw = min(32, p1 - pw);  // the warp's first position and count (≤ 0: none)
    float s[GH];
#pragma unroll
    for (int h = 0; h < GH; h++) s[h] = 0.f;
    if (lane < nw) {
        const float4* kp = (const float4*)(kc + (long long)(pw + lane) * stride + kvh * D);
#pragma unroll
        for (int j0 = 0; j0 < D / 4; j0 += 8) {
            float4 kv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) kv[u] = kp[j0 + u];
#pragma unroll
            for (int u = 0; u < 8; u++) {
#pragma unroll
                for (int h = 0; h < GH; h++) {
                    if (h < gh) {
                        float4 qq = sq[h * (D / 4) + j0 + u];
                        s[h] += qq.x * kv[u].x + qq.y * kv[u].y + qq.z * kv[u].z + qq.w * kv[u].w;
                    }
                }
            }
        }
    }
    float m[GH], l[GH];
#pragma unroll
    for (int h = 0; h < GH; h++) {
        if (h < gh) {
            float v = lane < nw ? s[h] : NEG_INF;
            float mx = warp_max(v);
            float e = lane < nw ? __expf(v - mx) : 0.f;
            m[h] = mx;
            l[h] = warp_sum(e);
            se[w][h][lane] = e;
        }
    }
    __syncwarp();
    float acc[GH][DV];
#pragma unroll
    for (int h = 0; h < GH; h++)
#pragma unroll
        for (int i = 0; i < DV; i++) acc[h][i] = 0.f;
    for (int j0 = 0; j0 < nw; j0 += 8) {
        float vv[8][DV];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const float* vp = vc + (long long)(pw + j0 + u) * stride + kvh * D;
#pragma unroll
            for (int i = 0; i < DV; i++) vv[u][i] = j0 + u < nw ? vp[lane + 32 * i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            if (j0 + u < nw) {
#pragma unroll
                for (int h = 0; h < GH; h++) {
                    if (h < gh) {
                        float e = se[w][h][j0 + u];
#pragma unroll
                        for (int i = 0; i < DV; i++) acc[h][i] += e * vv[u][i];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int h = 0; h < GH; h++) {
        if (h < gh) {
            if (lane == 0) { sm[w][h] = m[h]; sl[w][h] = l[h]; }
#pragma unroll
            for (int i = 0; i < DV; i++) sacc[w][h][lane + 32 * i] = acc[h][i];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < gh * D; i += blockDim.x) {
        int hh = i / D, cc = i - hh * D;
        float top = fmaxf(fmaxf(sm[0][hh], sm[1][hh]), fmaxf(sm[2][hh], sm[3][hh]));
        float v = 0.f, tot = 0.f;
#pragma unroll
        for (int ww = 0; ww < 4; ww++) {
            float wt = sm[ww][hh] == NEG_INF ? 0.f : __expf(sm[ww][hh] - top);
            v += wt * sacc[ww][hh][cc];
            tot += wt * sl[ww][hh];
        }
        float* out = part + ((long long)(h0 + hh) * parts + c) * (D + 2);
        out[2 + cc] = v;
        if (cc == 0) { out[0] = top; out[1] = tot; }
    }
}

extern "C" __global__ void attn_dec2(const float* q, const long long* meta, int layer, float* part, int nh, int nkv,
                                     int qw, int parts, int window, int gh) {
    PDL_ENTRY();
    attn_dec_t<2>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

extern "C" __global__ void attn_dec4(const float* q, const long long* meta, int layer, float* part, int nh, int nkv,
                                     int qw, int parts, int window, int gh) {
    PDL_ENTRY();
    attn_dec_t<4>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

extern "C" __global__ void attn_dec8(const float* q, const long long* meta, int layer, float* part, int nh, int nkv,
                                     int qw, int parts, int window, int gh) {
    PDL_ENTRY();
    attn_dec_t<8>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

// One decode token's attention for `gh` (≤ GM) query heads of a GQA group over one part of
// VW·PW = 64 positions (a CHUNK holds VP_SUB of them): each of the VW warps takes PW
// positions, a lane holding DL = D/32 consecutive dims of each row, so rows are read
// coalesced, each k and v row once for the block's heads, and every load of a lane (PW k and
// PW v pieces) is in flight at once: one memory round trip where attn_dec walked its
// positions in several. A warp's scores are summed across its lanes; the warps' softmax
// pieces are merged in shared memory into part[(h·parts + c)] = (max, sum, acc[D]).
#define VW 16
#define VPW 4
#define VP_SUB (CHUNK / (VW * VPW))
template <int D, int GM>
__device__ __forceinline__ void attn_vec_t(const float* q, const long long* meta, int layer, float* part, int nh,
                                           int nkv, int qw, int parts, int window, int gh) {
    constexpr int DL = D / 32, PW = VPW;
    __shared__ float sm[VW][GM], sl[VW][GM];
    __shared__ float sacc[VW][GM][D];
    int groups = (nh / nkv) / gh;
    int kvh = blockIdx.x / groups, h0 = kvh * (nh / nkv) + (blockIdx.x % groups) * gh;
    int c = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int pos0 = (int)meta[0];
    const float* kc = (const float*)meta[1 + 2 * layer];
    const float* vc = (const float*)meta[2 + 2 * layer];
    int len = pos0 + 1, start = max(0, len - window);
    int p0 = start + c * (VW * PW), p1 = min(len, p0 + VW * PW);
    if (p0 >= len) {
        for (int i = threadIdx.x; i < gh * (D + 2); i += blockDim.x) {
            int hh = i / (D + 2), j = i - hh * (D + 2);
            part[((long long)(h0 + hh) * parts + c) * (D + 2) + j] = j == 0 ? NEG_INF : 0.f;
        }
        return;
    }
    long long stride = (long long)nkv * D;
    int pw0 = p0 + w * PW;
    // every load first: the heads' queries (this lane's dims), then the warp's k and v pieces
    float qv[GM][DL], kr[PW][DL], vr[PW][DL];
#pragma unroll
    for (int h = 0; h < GM; h++)
#pragma unroll
        for (int i = 0; i < DL; i++) qv[h][i] = h < gh ? q[(long long)(h0 + h) * qw + lane * DL + i] : 0.f;
#pragma unroll
    for (int u = 0; u < PW; u++) {
        bool in = pw0 + u < p1;
        const float* kp = kc + (long long)(pw0 + u) * stride + kvh * D + lane * DL;
        const float* vp = vc + (long long)(pw0 + u) * stride + kvh * D + lane * DL;
#pragma unroll
        for (int i = 0; i < DL; i += 2) {
            float2 a = in ? *(const float2*)(kp + i) : make_float2(0.f, 0.f);
            float2 b = in ? *(const float2*)(vp + i) : make_float2(0.f, 0.f);
            kr[u][i] = a.x; kr[u][i + 1] = a.y;
            vr[u][i] = b.x; vr[u][i + 1] = b.y;
        }
    }
    float scale = rsqrtf((float)D);
#pragma unroll
    for (int h = 0; h < GM; h++) {
        if (h < gh) {
            float sc[PW];
#pragma unroll
            for (int u = 0; u < PW; u++) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < DL; i++) a += qv[h][i] * kr[u][i];
                sc[u] = warp_sum(a) * scale;
            }
            float mx = NEG_INF;
#pragma unroll
            for (int u = 0; u < PW; u++) if (pw0 + u < p1) mx = fmaxf(mx, sc[u]);
            float l = 0.f, acc[DL];
#pragma unroll
            for (int i = 0; i < DL; i++) acc[i] = 0.f;
#pragma unroll
            for (int u = 0; u < PW; u++) {
                float e = pw0 + u < p1 ? __expf(sc[u] - mx) : 0.f;
                l += e;
#pragma unroll
                for (int i = 0; i < DL; i++) acc[i] += e * vr[u][i];
            }
            if (lane == 0) { sm[w][h] = mx; sl[w][h] = l; }
#pragma unroll
            for (int i = 0; i < DL; i++) sacc[w][h][lane * DL + i] = acc[i];
        }
    }
    __syncthreads();
    // a warp with no position left its max at −∞: weight 0
    for (int i = threadIdx.x; i < gh * D; i += blockDim.x) {
        int hh = i / D, cc = i - hh * D;
        float top = NEG_INF;
#pragma unroll
        for (int ww = 0; ww < VW; ww++) top = fmaxf(top, sm[ww][hh]);
        float v = 0.f, tot = 0.f;
#pragma unroll
        for (int ww = 0; ww < VW; ww++) {
            float wt = sm[ww][hh] == NEG_INF ? 0.f : __expf(sm[ww][hh] - top);
            v += wt * sacc[ww][hh][cc];
            tot += wt * sl[ww][hh];
        }
        float* out = part + ((long long)(h0 + hh) * parts + c) * (D + 2);
        out[2 + cc] = v;
        if (cc == 0) { out[0] = top; out[1] = tot; }
    }
}

// (sacc: VW · GM · D floats, 32 KB for each)
extern "C" __global__ void __launch_bounds__(32 * VW) attn_vec64(const float* q, const long long* meta, int layer,
                                                                 float* part, int nh, int nkv, int qw, int parts,
                                                                 int window, int gh) {
    PDL_ENTRY();
    attn_vec_t<64, 8>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

extern "C" __global__ void __launch_bounds__(32 * VW) attn_vec128(const float* q, const long long* meta, int layer,
                                                                  float* part, int nh, int nkv, int qw, int parts,
                                                                  int window, int gh) {
    PDL_ENTRY();
    attn_vec_t<128, 4>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

extern "C" __global__ void __launch_bounds__(32 * VW) attn_vec256(const float* q, const long long* meta, int layer,
                                                                  float* part, int nh, int nkv, int qw, int parts,
                                                                  int window, int gh) {
    PDL_ENTRY();
    attn_vec_t<256, 2>(q, meta, layer, part, nh, nkv, qw, parts, window, gh);
}

// o[t][h] = the parts of (t, h) merged, times sigmoid of the gate when gated. One block each.
// sinks (gpt-oss): a logit per head that joins the softmax's sum and adds no value.
extern "C" __global__ void attn_merge(const float* q, const float* part, float* o, int nh, int d, int qw, int gated,
                                      int parts, QX oq, const float* sinks) {
    PDL_ENTRY();
    int th = blockIdx.x;
    const float* pp = part + (long long)th * parts * (d + 2);
    float top = sinks ? sinks[th % nh] : NEG_INF;
    for (int c = 0; c < parts; c++) top = fmaxf(top, pp[c * (d + 2)]);
    float tot = sinks ? __expf(sinks[th % nh] - top) : 0.f;
    for (int c = 0; c < parts; c++) {
        float mc = pp[c * (d + 2)];
        if (mc != NEG_INF) tot += pp[c * (d + 2) + 1] * __expf(mc - top);
    }
    const float* qh = q + (long long)th * qw;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = 0.f;
        for (int c = 0; c < parts; c++) {
            float mc = pp[c * (d + 2)];
            if (mc != NEG_INF) v += pp[c * (d + 2) + 2 + i] * __expf(mc - top);
        }
        v /= tot;
        if (gated) v *= 1.f / (1.f + __expf(-qh[d + i]));
        o[(long long)th * d + i] = v;
        // one token, d a multiple of 32 and blockDim == d: a warp holds one chunk of 32
        if (oq.q) quant_chunk(v, ((long long)th * d + i) / 32, threadIdx.x & 31, oq);
    }
}

// How a router turns logits into experts and weights (`RouterSpec` in src/config.rs): the
// router's own bias on the logits (`lbias`), then softmax or sigmoid weights, the choice by
// weight + correction bias (`cbias`) within the best `topk_group` of `n_group` groups, or
// (gpt-oss, `chosen`) the top-k logits softmaxed among themselves; renormalised, scaled.
struct RouteD {
    const float* lbias;
    const float* cbias;
    int sigmoid;
    int renorm;
    int chosen;
    int n_group;
    int topk_group;
    float scale;
};

// Whether (v, i) ranks before (bv, bi): higher, ties to the lower index; NaN (taken) never; any
// value before the empty pick (bi = INT_MAX), −∞ included.
__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
    if (v != v) return false;
    return bi == 0x7fffffff || v > bv || (v == bv && i < bi);
}

// The warp's best (v, i) by `ranks_before`; every lane gets it.
__device__ __forceinline__ void warp_best(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, bv, o);
        int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (oi != 0x7fffffff && ranks_before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
}

// Routes token t's `e` logits to k experts (ids, wts), as `moe::route_into`; one warp, `p` and
// `c` room for e floats each in shared memory (the weights, and what the choice ranks by).
__device__ __forceinline__ void topk_warp(const float* lg, int e, int k, const RouteD& rd, int* ids, float* wts,
                                          float* p, float* c, float* chosen_w, int t, int lane) {
    __shared__ float gsum[64];
    float m = NEG_INF;
    // unrolled, so that a lane's loads are issued together (a warp stalls at a load's first use)
#pragma unroll 4
    for (int i = lane; i < e; i += 32) {
        float v = __ldcg(lg + i) + (rd.lbias ? rd.lbias[i] : 0.f);
        p[i] = v;
        m = fmaxf(m, v);
    }
    __syncwarp();
    if (rd.chosen) {
        for (int i = lane; i < e; i += 32) c[i] = p[i];
    } else if (rd.sigmoid) {
        for (int i = lane; i < e; i += 32) p[i] = 1.f / (1.f + expf(-p[i]));
    } else {
        m = warp_max(m);
        float s = 0.f;
        for (int i = lane; i < e; i += 32) { float v = expf(p[i] - m); p[i] = v; s += v; }
        s = warp_sum(s);
        __syncwarp();
        for (int i = lane; i < e; i += 32) p[i] /= s;
    }
    if (!rd.chosen) for (int i = lane; i < e; i += 32) c[i] = p[i] + (rd.cbias ? rd.cbias[i] : 0.f);
    __syncwarp();
    if (rd.n_group > 1) {
        // only the best topk_group groups, by the sum of each group's two best scores
        int per = e / rd.n_group;
        for (int g = lane; g < rd.n_group; g += 32) {
            float a = NEG_INF, b = NEG_INF;
            for (int i = g * per; i < (g + 1) * per; i++) {
                float v = c[i];
                if (v > a) { b = a; a = v; } else if (v > b) b = v;
            }
            gsum[g] = a + b;
        }
        __syncwarp();
        for (int j = 0; j < rd.topk_group && j < rd.n_group; j++) {
            float bv = 0.f;
            int bi = 0x7fffffff;
            for (int g = lane; g < rd.n_group; g += 32) if (ranks_before(gsum[g], g, bv, bi)) { bv = gsum[g]; bi = g; }
            warp_best(bv, bi);
            __syncwarp();
            if (lane == 0) gsum[bi] = __int_as_float(0x7fc00000);  // kept: NaN marks it
            __syncwarp();
        }
        for (int i = lane; i < e; i += 32) if (gsum[i / per] == gsum[i / per]) c[i] = NEG_INF;
        __syncwarp();
    }
    float chosen = 0.f, top = 0.f;
    for (int j = 0; j < k; j++) {
        float bv = 0.f;
        int bi = 0x7fffffff;
        for (int i = lane; i < e; i += 32) if (ranks_before(c[i], i, bv, bi)) { bv = c[i]; bi = i; }
        warp_best(bv, bi);
        float w = p[bi];
        if (rd.chosen) {
            // the softmax over the chosen logits, from the first (the largest)
            if (j == 0) top = w;
            w = expf(w - top);
        }
        if (lane == 0) { ids[t * k + j] = bi; chosen_w[j] = w; }
        chosen += w;
        __syncwarp();
        if (lane == 0) c[bi] = __int_as_float(0x7fc00000);
        __syncwarp();
    }
    // sigmoid weights can all be tiny; softmax ones never sum to zero
    float div = rd.chosen ? chosen : rd.renorm ? (rd.sigmoid ? chosen + 1e-20f : chosen) : 1.f;
    // from shared memory: dividing the stored weights in place cost a global round trip each
    for (int j = lane; j < k; j += 32) {
        float w = rd.chosen ? chosen_w[j] / div * rd.scale : chosen_w[j] / div;
        wts[t * k + j] = (!rd.chosen && rd.scale != 1.f) ? w * rd.scale : w;
    }
}

// One warp per token; shared memory 2·e floats.
extern "C" __global__ void route_topk(const float* logits, int e, int k, RouteD rd, int* ids, float* wts) {
    PDL_ENTRY();
    extern __shared__ float p[];
    __shared__ float chosen_w[64];
    int t = blockIdx.x;
    topk_warp(logits + (long long)t * e, e, k, rd, ids, wts, p, p + e, chosen_w, t, threadIdx.x & 31);
}

// One token's router product and top-k in one launch: a warp per row writes the logits, and
// the block that finishes last (counted in `*done`, which it sets back to 0 for the next
// launch) runs the top-k on them. Grid rows / warps; shared memory 2·e floats.
extern "C" __global__ void router_topk(const u8* base, MatD m, const float* x, QX qx, float* logits, int k, RouteD rd,
                                       int* ids, float* wts, unsigned* done) {
    extern __shared__ float p[];
    __shared__ float chosen_w[64];
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    PDL_ENTRY();
    if (row < m.rows) {
        float v = warp_sum(vec_dot(base, m, row, x, qx, lane));
        if (lane == 0) logits[row] = v;
    }
    if (!last_block(done)) return;
    if (threadIdx.x < 32) topk_warp(logits, m.rows, k, rd, ids, wts, p, p + m.rows, chosen_w, 0, lane);
    if (threadIdx.x == 0) *done = 0;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// An expert block's activation: biases of gate, up and down (f32 rows at these offsets from
// the expert's base, when `bias`), and SwiGLU or gpt-oss's clamped form.
struct ActD {
    u64 bg, bu, bd;
    int bias;
    int clamped;
    float alpha;
    float limit;
};

// The hidden activation of row r from its gate and up products (`b`: the expert's base).
__device__ __forceinline__ float act_row(const ActD& a, const u8* b, int r, float g, float u) {
    if (a.bias) {
        g += ((const float*)(b + a.bg))[r];
        u += ((const float*)(b + a.bu))[r];
    }
    if (a.clamped) {
        float x = fminf(g, a.limit);
        return x / (1.f + __expf(-a.alpha * x)) * (fminf(fmaxf(u, -a.limit), a.limit) + 1.f);
    }
    return silu(g) * u;
}

// The down product's bias of row r (0 without biases).
__device__ __forceinline__ float down_bias(const ActD& a, const u8* b, int r) {
    return a.bias ? ((const float*)(b + a.bd))[r] : 0.f;
}

// act[p][r] = act(gate_e · x_t, up_e · x_t)[r] for pair p = t·k + j, e = ids[p] (or the one
// matrix at `base` when ids is null). Grid (inter rows / warps, pairs).
extern "C" __global__ void swiglu_gate_up(const u8* base, u64 stride, const int* ids, MatD g, MatD u, const float* x,
                                          float* act, int k, QX qx, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= g.rows) return;
    int pr = blockIdx.y, t = pr / k;
    const u8* b = base + (ids ? (u64)ids[pr] * stride : 0);
    const float* xt = x + (long long)t * g.cols;
    QX qt = qx_row(qx, t, g.cols);
    float gv = warp_sum(vec_dot(b, g, row, xt, qt, lane)), uv = warp_sum(vec_dot(b, u, row, xt, qt, lane));
    if (lane == 0) act[(long long)pr * g.rows + row] = act_row(ad, b, row, gv, uv);
}

// out[t][r] (+)= Σ_j wts[t·k + j] · (down_e · act[t·k + j] + bias_e)[r], the experts of token t
// in routing order (weight 1 and the matrix at `base` when ids is null). Grid (hidden rows /
// warps, tokens).
extern "C" __global__ void down_sum(const u8* base, u64 stride, const int* ids, const float* wts, MatD dn,
                                    const float* act, float* out, int k, int accumulate, QX qx, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= dn.rows) return;
    int t = blockIdx.y;
    float total = 0.f;
    for (int j = 0; j < k; j++) {
        int pr = t * k + j;
        const u8* b = base + (ids ? (u64)ids[pr] * stride : 0);
        float a = vec_dot(b, dn, row, act + (long long)pr * dn.cols, qx_row(qx, pr, dn.cols), lane);
        total += (wts ? wts[pr] : 1.f) * (warp_sum(a) + down_bias(ad, b, row));
    }
    if (lane == 0) {
        long long i = (long long)t * dn.rows + row;
        out[i] = accumulate ? out[i] + total : total;
    }
}

#ifndef GU_R
#define GU_R 1  // rows a warp computes of gate and up (`GU_ROWS` in mod.rs); 2 and 4 measured no faster
#endif

// The lanes' partial sums of rows row0.. (GU_R of them, clamped to the last row) of gate and
// up on the int8 input; every load of an iteration (2 per lane per row and matrix) issued first.
template <int BITS>
__device__ __forceinline__ void gate_up_i8(const u8* b, const MatD& g, const MatD& u, int row0, QX x, int lane,
                                           float* ga, float* ua) {
    constexpr int PER = PER_LOAD(BITS);
    const int n = g.cols / PER;
    const u8* wg = b + g.off;
    const u8* wu = b + u.off;
    for (int i0 = lane; i0 < n; i0 += 64) {
        uint4 vg[2][GU_R], vu[2][GU_R];
        float sg[2][GU_R], bg[2][GU_R], su[2][GU_R], bu[2][GU_R];
#pragma unroll
        for (int c = 0; c < 2; c++) {
            int i = i0 + 32 * c;
            if (i < n) {
#pragma unroll
                for (int r = 0; r < GU_R; r++) {
                    long long rr = min(row0 + r, g.rows - 1);
                    load16<BITS>(wg, g, rr, i, vg[c][r], sg[c][r], bg[c][r]);
                    load16<BITS>(wu, u, rr, i, vu[c][r], su[c][r], bu[c][r]);
                }
            }
        }
#pragma unroll
        for (int c = 0; c < 2; c++) {
            int i = i0 + 32 * c;
            if (i < n) {
#pragma unroll
                for (int r = 0; r < GU_R; r++) {
                    ga[r] += chunk_i8<BITS>(vg[c][r], sg[c][r], bg[c][r], x, i * PER);
                    ua[r] += chunk_i8<BITS>(vu[c][r], su[c][r], bu[c][r], x, i * PER);
                }
            }
        }
    }
}

// swiglu_gate_up on the int8 input, for q4/q8/MXFP4 gate and up of one layout (`i8_ok`): a
// warp computes GU_R rows of one pair, every load of both matrices issued before the first
// use; grid (inter rows / (warps · GU_R), pairs).
extern "C" __global__ void swiglu_gate_up_i8(const u8* base, u64 stride, const int* ids, MatD g, MatD u, float* act,
                                             int k, QX qx, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * GU_R;
    if (row0 >= g.rows) return;
    int pr = blockIdx.y;
    const u8* b = base + (ids ? (u64)ids[pr] * stride : 0);
    QX qt = qx_row(qx, pr / k, g.cols);
    float ga[GU_R], ua[GU_R];
#pragma unroll
    for (int r = 0; r < GU_R; r++) { ga[r] = 0.f; ua[r] = 0.f; }
    int f = i8_format(g);
    if (f == 4) gate_up_i8<4>(b, g, u, row0, qt, lane, ga, ua);
    else if (f == 8) gate_up_i8<8>(b, g, u, row0, qt, lane, ga, ua);
    else gate_up_i8<MXFP4>(b, g, u, row0, qt, lane, ga, ua);
#pragma unroll
    for (int r = 0; r < GU_R; r++) {
        float gv = warp_sum(ga[r]), uv = warp_sum(ua[r]);
        if (lane == 0 && row0 + r < g.rows) act[(long long)pr * g.rows + row0 + r] = act_row(ad, b, row0 + r, gv, uv);
    }
}

#ifndef DN_I
#define DN_I 8  // 16-byte loads a lane of the down kernel issues at once
#endif

// Σ_j wts[t·k + j] · (down_e · act[t·k + j])[row] on the int8 activations, the lanes' partial
// sums: the k experts' rows cut into 16-byte loads dealt to the lanes together, so that every
// expert's loads are in flight at once (rows of 768 q4 values are only 24 loads each).
template <int BITS>
__device__ __forceinline__ float down_i8(const u8* base, u64 stride, const int* ids, const float* wts, const MatD& dn,
                                         int row, int t, int k, QX qx, int lane) {
    constexpr int PER = PER_LOAD(BITS);
    const int nch = dn.cols / PER, items = k * nch;
    float total = 0.f;
    for (int i0 = lane; i0 < items; i0 += 32 * DN_I) {
        uint4 v[DN_I];
        float s[DN_I], bb[DN_I], wj[DN_I];
        int pj[DN_I], cj[DN_I];
#pragma unroll
        for (int e = 0; e < DN_I; e++) {
            int it = i0 + 32 * e;
            if (it < items) {
                int j = it / nch, c = it - j * nch, pr = t * k + j;
                const u8* w = base + (ids ? (u64)ids[pr] * stride : 0) + dn.off;
                load16<BITS>(w, dn, row, c, v[e], s[e], bb[e]);
                wj[e] = wts ? wts[pr] : 1.f;
                pj[e] = pr;
                cj[e] = c;
            }
        }
#pragma unroll
        for (int e = 0; e < DN_I; e++) {
            if (i0 + 32 * e < items)
                total += wj[e] * chunk_i8<BITS>(v[e], s[e], bb[e], qx_row(qx, pj[e], dn.cols), cj[e] * PER);
        }
    }
    return total;
}

// down_sum on the int8 activations `qx`, for a q4/q8/MXFP4 down matrix (`i8_ok`); the same grid.
extern "C" __global__ void down_sum_i8(const u8* base, u64 stride, const int* ids, const float* wts, MatD dn, float* out,
                                       int k, int accumulate, QX qx, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= dn.rows) return;
    int t = blockIdx.y;
    int f = i8_format(dn);
    float total = warp_sum(f == 4   ? down_i8<4>(base, stride, ids, wts, dn, row, t, k, qx, lane)
                           : f == 8 ? down_i8<8>(base, stride, ids, wts, dn, row, t, k, qx, lane)
                                    : down_i8<MXFP4>(base, stride, ids, wts, dn, row, t, k, qx, lane));
    if (ad.bias) {
        for (int j = 0; j < k; j++) {
            int pr = t * k + j;
            total += (wts ? wts[pr] : 1.f) * down_bias(ad, base + (ids ? (u64)ids[pr] * stride : 0), row);
        }
    }
    if (lane == 0) {
        long long o = (long long)t * dn.rows + row;
        out[o] = accumulate ? out[o] + total : total;
    }
}

// out[t] += sigmoid(gw · x[t]) · y[t]: the shared expert's gated contribution (weight 1 when gw
// is null: GLM's ungated one). One block per token.
extern "C" __global__ void gated_add(float* out, const float* y, const float* gw, const float* x, int dim) {
    PDL_ENTRY();
    __shared__ float sh[32];
    long long o = (long long)blockIdx.x * dim;
    float s = 0.f;
    if (gw) for (int i = threadIdx.x; i < dim; i += blockDim.x) s += gw[i] * x[o + i];
    float g = gw ? 1.f / (1.f + expf(-block_sum(s, sh))) : 1.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[o + i] += g * y[o + i];
}

// Prefill's routed experts, grouped by expert: slot s of `order` is the pair (token · k + j)
// computed s-th; a tile is up to NT consecutive slots of one expert (expert, first slot, count).

// xg[s] = x[order[s] / k]: each slot's token row, so a tile's inputs are contiguous.
extern "C" __global__ void gather_rows(const float* x, const int* order, float* xg, int dim, int k) {
    PDL_ENTRY();
    int s = blockIdx.x;
    const float* src = x + (long long)(order[s] / k) * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xg[(long long)s * dim + i] = src[i];
}

// act[s][r] = silu(gate_e · xg[s])[r] · (up_e · xg[s])[r] for the slots of tile blockIdx.y.
extern "C" __global__ void gate_up_tiles(const u8* base, u64 stride, const int* tiles, MatD g, MatD u, const float* xg,
                                         float* act, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= g.rows) return;
    const int* tl = tiles + 3 * blockIdx.y;
    const u8* b = base + (u64)tl[0] * stride;
    int s0 = tl[1], nt = tl[2];
    float a[NT], c[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) { a[t] = 0.f; c[t] = 0.f; }
    const float* x = xg + (long long)s0 * g.cols;
    row_dots<NT>(b, g, row, x, g.cols, nt, lane, a);
    row_dots<NT>(b, u, row, x, g.cols, nt, lane, c);
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float gv = warp_sum(a[t]), uv = warp_sum(c[t]);
        if (lane == 0 && t < nt) act[(long long)(s0 + t) * g.rows + row] = act_row(ad, b, row, gv, uv);
    }
}

// ys[s][r] = (down_e · act[s] + bias_e)[r] for the slots of tile blockIdx.y.
extern "C" __global__ void down_tiles(const u8* base, u64 stride, const int* tiles, MatD dn, const float* act, float* ys,
                                      ActD ad) {
    PDL_ENTRY();
    const int* tl = tiles + 3 * blockIdx.y;
    int s0 = tl[1];
    const u8* b = base + (u64)tl[0] * stride;
    const float* bias = ad.bias ? (const float*)(b + ad.bd) : nullptr;
    rows_times_tokens<NT>(b, dn, act + (long long)s0 * dn.cols, ys + (long long)s0 * dn.rows, tl[2], bias);
}

// out[t] = Σ_j wts[t·k + j] · ys[slot_of[t·k + j]], in routing order. One block per token.
extern "C" __global__ void combine_slots(const float* ys, const int* slot_of, const float* wts, float* out, int dim, int k) {
    PDL_ENTRY();
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = 0.f;
        for (int j = 0; j < k; j++) v += wts[t * k + j] * ys[(long long)slot_of[t * k + j] * dim + i];
        out[(long long)t * dim + i] = v;
    }
}

// Gated DeltaNet. The layer's conv history (`hist` = kernel − 1 rows of conv_dim) and its state
// (v heads × k dim × v dim) are read through meta like a KV cache: slots 1 + 2·layer and 2 + 2·layer.

// cv[t][c] = silu(Σ_j w[j][c] · in(t + j)): in(i) is history row i below `hist`, else qkv row i − hist.
extern "C" __global__ void delta_conv(const float* qkv, const long long* meta, int layer, const float* w, float* cv,
                                      int cd, int kern) {
    PDL_ENTRY();
    const float* hs = (const float*)meta[1 + 2 * layer];
    int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cd) return;
    int hist = kern - 1;
    float acc = 0.f;
    for (int j = 0; j < kern; j++) {
        int i = t + j;
        float v = i < hist ? hs[(long long)i * cd + c] : qkv[(long long)(i - hist) * cd + c];
        acc += w[(long long)j * cd + c] * v;
    }
    cv[(long long)t * cd + c] = acc / (1.f + expf(-acc));
}

// The history keeps the last `hist` input rows: row i ← in(n + i), ascending, so each channel
// reads a row before it is overwritten.
extern "C" __global__ void delta_shift(const float* qkv, const long long* meta, int layer, int n, int cd, int kern) {
    PDL_ENTRY();
    float* hs = (float*)meta[1 + 2 * layer];
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cd) return;
    int hist = kern - 1;
    for (int i = 0; i < hist; i++) {
        int src = n + i;
        hs[(long long)i * cd + c] = src < hist ? hs[(long long)src * cd + c] : qkv[(long long)(src - hist) * cd + c];
    }
}

// L2-normalizes each q head (times 1/sqrt(dk)) and k head of cv in place. Grid (tokens, 2·nk), a warp each.
extern "C" __global__ void delta_l2norm(float* cv, int cd, int kd, int dk, int nk, float qscale) {
    PDL_ENTRY();
    int t = blockIdx.x, hh = blockIdx.y, lane = threadIdx.x;
    float* x = cv + (long long)t * cd + (hh < nk ? hh * dk : kd + (hh - nk) * dk);
    float scale = hh < nk ? qscale : 1.f;
    float ss = 0.f;
    for (int i = lane; i < dk; i += 32) ss += x[i] * x[i];
    float inv = scale / sqrtf(warp_sum(ss) + 1e-6f);
    for (int i = lane; i < dk; i += 32) x[i] *= inv;
}

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// The recurrence, token by token, one block per v head; thread m owns column m of the head's
// state (k dim ≤ 128 values in registers). Then the gated RMSNorm: o · inv_rms · w · silu(z).
extern "C" __global__ void delta_rec(const float* cv, const float* z, const float* bb, const float* aa,
                                     const long long* meta, int layer, const float* neg_a, const float* dt_bias,
                                     const float* norm_w, float* o, int n, int cd, int kd, int vd, int nk, int nv,
                                     int dk, int dv, float eps) {
    PDL_ENTRY();
    __shared__ float qs[128], ks[128], red[32];
    float* S = (float*)meta[2 + 2 * layer];
    int j = blockIdx.x, m = threadIdx.x;
    int kh = j / (nv / nk);
    float* Sj = S + (long long)j * dk * dv;
    float s[128];
#pragma unroll
    for (int i = 0; i < 128; i++) s[i] = (i < dk && m < dv) ? Sj[(long long)i * dv + m] : 0.f;
    for (int t = 0; t < n; t++) {
        const float* c = cv + (long long)t * cd;
        __syncthreads();
        for (int i = m; i < dk; i += blockDim.x) { qs[i] = c[kh * dk + i]; ks[i] = c[kd + kh * dk + i]; }
        __syncthreads();
        float beta = 1.f / (1.f + expf(-bb[t * nv + j]));
        float decay = expf(neg_a[j] * softplus_f(aa[t * nv + j] + dt_bias[j]));
        float u = 0.f;
#pragma unroll
        for (int i = 0; i < 128; i++) if (i < dk) { s[i] *= decay; u += s[i] * ks[i]; }
        float vv = m < dv ? c[2 * kd + j * dv + m] : 0.f;
        u = (vv - u) * beta;
        float ov = 0.f;
#pragma unroll
        for (int i = 0; i < 128; i++) if (i < dk) { s[i] += ks[i] * u; ov += s[i] * qs[i]; }
        float ss = block_sum(m < dv ? ov * ov : 0.f, red);
        float inv = rsqrtf(ss / dv + eps);
        if (m < dv) {
            float g = z[(long long)t * vd + j * dv + m];
            g = g / (1.f + expf(-g));
            o[(long long)t * vd + j * dv + m] = ov * inv * norm_w[m] * g;
        }
    }
#pragma unroll
    for (int i = 0; i < 128; i++) if (i < dk && m < dv) Sj[(long long)i * dv + m] = s[i];
}

// Prefill products on tensor cores: `mma.sync` m16n8k16, bf16 inputs, f32 accumulation. A warp
// computes 16 rows × 32 tokens; weights (bf16 or q4/q8 group-affine) are dequantized to bf16 in
// registers straight into the A fragments, inputs come pre-rounded to bf16 (`to_bf16`).
#define MT 32  // tokens per warp tile

__device__ __forceinline__ u32 bf16_bits(float f) {
    u32 a = __float_as_uint(f);
    return (a + 0x7fffu + ((a >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Whether the tensor-core path takes this matrix (columns and groups in steps of 16).
__device__ __forceinline__ bool mma_ok(const MatD& m) {
    if ((m.cols & 15) != 0) return false;
    if (m.kind == 1 || m.kind == 4) return true;
    return m.kind == 3 && (m.bits == 4 || m.bits == 8) && (m.group & 15) == 0;
}

// Two bf16-packed weight pairs of row r at columns (k, k+1) and (k+8, k+9); zeros past the rows.
__device__ __forceinline__ void wpairs(const u8* w, const MatD& m, int r, int k, u32& p0, u32& p1) {
    if (r >= m.rows) { p0 = 0; p1 = 0; return; }
    if (m.kind == 1) {
        const u16* row = (const u16*)w + (long long)r * m.cols;
        p0 = *(const u32*)(row + k);
        p1 = *(const u32*)(row + k + 8);
        return;
    }
    if (m.kind == 4) {
        // k..k+9 lie in one block of 32 (k = 16·i + 2t, t < 4): one scale; e2m1 · 2^e is exact in bf16
        const u8* row = w + (long long)r * m.rb;
        float s = e8m0(w[m.soff + (long long)r * ((m.cols + 31) / 32) + (k >> 5)]);
        u32 v0 = row[k >> 1], v1 = row[(k + 8) >> 1];
        p0 = pack2(s * e2m1(v0 & 15), s * e2m1(v0 >> 4));
        p1 = pack2(s * e2m1(v1 & 15), s * e2m1(v1 >> 4));
        return;
    }
    int groups = (m.cols + m.group - 1) / m.group, g = k / m.group;
    const u16* sc = (const u16*)(w + m.soff) + (long long)r * groups;
    const u16* bi = (const u16*)(w + m.boff) + (long long)r * groups;
    float s = bf(sc[g]), b = bf(bi[g]);
    const u8* row = w + (long long)r * m.rb;
    float q0, q1, q2, q3;
    if (m.bits == 4) {
        u32 v0 = row[k >> 1], v1 = row[(k + 8) >> 1];
        q0 = (float)(v0 & 15); q1 = (float)(v0 >> 4); q2 = (float)(v1 & 15); q3 = (float)(v1 >> 4);
    } else {
        q0 = (float)row[k]; q1 = (float)row[k + 1]; q2 = (float)row[k + 8]; q3 = (float)row[k + 9];
    }
    p0 = pack2(fmaf(s, q0, b), fmaf(s, q1, b));
    p1 = pack2(fmaf(s, q2, b), fmaf(s, q3, b));
}

// acc[j][0..4] += W[r0..r0+16] · xb[tok] for the 32 tokens of the tile (nt of them real; xb rows
// of `cols` bf16 values). C fragment: acc[j][0,1] row r0+g, tokens 8j+2t, +1; acc[j][2,3] row r0+g+8.
__device__ __forceinline__ void mma_tile(const u8* w, const MatD& m, int r0, const u16* xb, int nt, int lane,
                                         float acc[4][4]) {
    int g = lane >> 2, t = lane & 3;
    for (int k0 = 0; k0 < m.cols; k0 += 16) {
        u32 a0, a1, a2, a3;
        wpairs(w, m, r0 + g, k0 + 2 * t, a0, a2);
        wpairs(w, m, r0 + g + 8, k0 + 2 * t, a1, a3);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int tok = 8 * j + g;
            u32 b0 = 0, b1 = 0;
            if (tok < nt) {
                const u16* xr = xb + (long long)tok * m.cols + k0 + 2 * t;
                b0 = *(const u32*)xr;
                b1 = *(const u32*)(xr + 8);
            }
            mma16816(acc[j], a0, a1, a2, a3, b0, b1);
        }
    }
}

__device__ __forceinline__ void mma_store(float acc[4][4], float* y, int rows, int r0, int nt, int lane,
                                          const float* bias = nullptr) {
    int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int tok = 8 * j + 2 * t + (e & 1), r = r0 + g + (e >> 1) * 8;
            if (tok < nt && r < rows) y[(long long)tok * rows + r] = acc[j][e] + (bias ? bias[r] : 0.f);
        }
    }
}

// f32 → bf16 (round to nearest even), n values.
extern "C" __global__ void to_bf16(const float* x, u16* xb, long long n) {
    PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        xb[i] = (u16)bf16_bits(x[i]);
}

// y = W·x for ntok tokens on tensor cores; grid (rows / 64, tokens / 32), 4 warps.
extern "C" __global__ void mma_matmul(const u8* base, MatD m, const u16* xb, float* y, int ntok) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31, r0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 16, t0 = blockIdx.y * MT;
    if (r0 >= m.rows) return;
    float acc[4][4] = {};
    int nt = min(MT, ntok - t0);
    mma_tile(base + m.off, m, r0, xb + (long long)t0 * m.cols, nt, lane, acc);
    mma_store(acc, y + (long long)t0 * m.rows, m.rows, r0, nt, lane);
}

// The grouped experts on tensor cores: tiles of up to 32 slots of one expert (see gate_up_tiles).
extern "C" __global__ void mma_gate_up_tiles(const u8* base, u64 stride, const int* tiles, MatD g, MatD u, const u16* xb,
                                             float* act, ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31, r0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 16;
    if (r0 >= g.rows) return;
    const int* tl = tiles + 3 * blockIdx.y;
    const u8* b = base + (u64)tl[0] * stride;
    int s0 = tl[1], nt = tl[2];
    float ga[4][4] = {}, ua[4][4] = {};
    const u16* x = xb + (long long)s0 * g.cols;
    mma_tile(b + g.off, g, r0, x, nt, lane, ga);
    mma_tile(b + u.off, u, r0, x, nt, lane, ua);
    int gq = lane >> 2;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = min(r0 + gq + (e >> 1) * 8, g.rows - 1);
            ga[j][e] = act_row(ad, b, r, ga[j][e], ua[j][e]);
        }
    mma_store(ga, act + (long long)s0 * g.rows, g.rows, r0, nt, lane);
}

extern "C" __global__ void mma_down_tiles(const u8* base, u64 stride, const int* tiles, MatD dn, const u16* actb, float* ys,
                                          ActD ad) {
    PDL_ENTRY();
    int lane = threadIdx.x & 31, r0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 16;
    if (r0 >= dn.rows) return;
    const int* tl = tiles + 3 * blockIdx.y;
    const u8* b = base + (u64)tl[0] * stride;
    int s0 = tl[1], nt = tl[2];
    float acc[4][4] = {};
    mma_tile(b + dn.off, dn, r0, actb + (long long)s0 * dn.cols, nt, lane, acc);
    mma_store(acc, ys + (long long)s0 * dn.rows, dn.rows, r0, nt, lane, ad.bias ? (const float*)(b + ad.bd) : nullptr);
}

// g = silu(g) · u, n values (a prompt's dense MLP between its gate/up and down products).
extern "C" __global__ void swiglu_mul(float* g, const float* u, long long n) {
    PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        g[i] = silu(g[i]) * u[i];
}

// Multi-head latent attention (DeepSeek-V3, Kimi-K2), in the latent space (src/layers/mla.rs).
// A layer's cache holds per position the row [c ‖ k_pe]: the RMS-normalised latent (kvl floats)
// and the rotated shared rope key (rd), lw = kvl + rd floats, at meta[1 + 2·layer]. Head h's
// query enters the latent space once per token (qc = [W_UK,hᵀ q_nope ‖ q_pe]·scale), its scores
// are qc·row, its output Σ p·c leaves through W_UV: the heads share every cached row (MQA of one
// 576-wide key whose first 512 values are also the value).

// Rotates the pair (a, b) for position pos at frequency f, cos and sin times fscale (as the
// CPU's tables: the angle in double, reduced to [-π, π] before float sincos).
__device__ __forceinline__ void rope_pair(float& a, float& b, int pos, double f, float fscale) {
    double ang = (double)pos * f;
    const double two_pi = 6.283185307179586;
    float r = (float)(ang - rint(ang / two_pi) * two_pi), c, s;
    sincosf(r, &s, &c);
    c *= fscale;
    s *= fscale;
    float x = a, y = b;
    a = x * c - y * s;
    b = y * c + x * s;
}

// Block (t, 0): token t's latent (lat rows of lw: [latent ‖ k_pe] as kv_a_proj wrote them)
// RMS-normalised (w, eps) and its k_pe rotated, written into the cache at position pos0 + t;
// block (t, 1 + h): the rope part of q head h (q rows of heads × (nope + rd)) rotated in place.
// Pairs (2i, 2i+1) when interleaved (DeepSeek's layout), else (i, i + rd/2).
extern "C" __global__ void mla_rope_cache(float* q, const float* lat, const long long* meta, int layer, const float* w,
                                          float eps, int nh, int nope, int rd, int kvl, const double* freqs,
                                          float fscale, int interleaved) {
    PDL_ENTRY();
    __shared__ float sh[32];
    int t = blockIdx.x, y = blockIdx.y;
    int pos = (int)meta[0] + t, half = rd / 2, lw = kvl + rd;
    const float* src;
    float* dst;
    if (y == 0) {
        const float* l = lat + (long long)t * lw;
        float* row = (float*)meta[1 + 2 * layer] + (long long)pos * lw;
        float ss = 0.f;
        for (int i = threadIdx.x; i < kvl; i += blockDim.x) ss += l[i] * l[i];
        float inv = rsqrtf(block_sum(ss, sh) / kvl + eps);
        for (int i = threadIdx.x; i < kvl; i += blockDim.x) row[i] = l[i] * inv * w[i];
        src = l + kvl;
        dst = row + kvl;
    } else {
        dst = q + ((long long)t * nh + (y - 1)) * (nope + rd) + nope;
        src = dst;
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        int a = interleaved ? 2 * j : j, b = interleaved ? 2 * j + 1 : j + half;
        float va = src[a], vb = src[b];
        rope_pair(va, vb, pos, freqs[j], fscale);
        dst[a] = va;
        dst[b] = vb;
    }
}

// qc[t][h] = [W_UK,hᵀ · q_nope ‖ q_pe] · scale, head h's query in the latent space (uk: the
// heads' nope rows of kvl, f32 or bf16). Block t·heads + h, a thread per latent column (the
// rows read across the block's threads: coalesced); shared memory: nope floats.
extern "C" __global__ void mla_absorb(const float* q, const u8* base, MatD uk, float* qc, int nh, int nope, int rd,
                                      float scale) {
    PDL_ENTRY();
    extern __shared__ float qn[];
    long long th = blockIdx.x;
    int h = (int)(th % nh), kvl = uk.cols, lw = kvl + rd;
    const float* qh = q + th * (nope + rd);
    for (int i = threadIdx.x; i < nope; i += blockDim.x) qn[i] = qh[i];
    __syncthreads();
    float* out = qc + th * lw;
    const u8* w = base + uk.off;
    long long r0 = (long long)h * nope;
    for (int j = threadIdx.x; j < kvl; j += blockDim.x) {
        float acc = 0.f;
        if (uk.kind == 1) {
            const u16* r = (const u16*)w + r0 * kvl + j;
#pragma unroll 8
            for (int i = 0; i < nope; i++) acc = fmaf(qn[i], bf(__ldg(r + (long long)i * kvl)), acc);
        } else {
            const float* r = (const float*)w + r0 * kvl + j;
#pragma unroll 8
            for (int i = 0; i < nope; i++) acc = fmaf(qn[i], __ldg(r + (long long)i * kvl), acc);
        }
        out[j] = acc * scale;
    }
    for (int i = threadIdx.x; i < rd; i += blockDim.x) out[kvl + i] = qh[nope + i] * scale;
}

#define MLA_PL 18  // row floats per lane: cache rows up to 576 wide (DeepSeek-V3, Kimi-K2, GLM-5)
#define MLA_TP 16  // positions per shared-memory tile
#define MLA_HW 8   // heads per block, a warp each

// Token t's attention over its cached rows in the latent space: scores qc·row, their softmax and
// Σ p·c. Block (t·groups + g, c): heads g·MLA_HW.. (a warp each) over positions c·chunk.. of
// 0..=pos0 + t, the rows staged MLA_TP at a time in shared memory (MLA_TP × lw floats), so the
// group's heads read each row from global memory once. One part: ol[t][h] = the normalised sum;
// else part[(t·heads + h)·parts + c] = (max, sum, acc[kvl]), merged by mla_merge. With a
// selection (DSA: sel not null), token t attends to the min(len, topk) positions listed at
// sel[t·topk ..] (ascending) instead, its parts cut from that list.
__device__ __forceinline__ void mla_part_body(const float* qc, const long long* meta, int layer, float* part, float* ol,
                                              int nh, int kvl, int rd, int parts, int chunk, const int* sel, int topk) {
    extern __shared__ float rows[];
    int lw = kvl + rd, groups = (nh + MLA_HW - 1) / MLA_HW;
    int t = blockIdx.x / groups, g = blockIdx.x % groups, c = blockIdx.y;
    int lane = threadIdx.x & 31, h = g * MLA_HW + (threadIdx.x >> 5);
    bool live = h < nh;
    int len = (int)meta[0] + t + 1;
    const int* pick = sel ? sel + (long long)t * topk : nullptr;
    if (sel) len = min(len, topk);
    long long p0l = (long long)c * chunk;
    int p0 = (int)min(p0l, (long long)len), p1 = (int)min((long long)len, p0l + chunk);
    const float* cache = (const float*)meta[1 + 2 * layer];
    float qr[MLA_PL], acc[MLA_PL];
    const float* qh = qc + ((long long)t * nh + (live ? h : 0)) * lw;
#pragma unroll
    for (int i = 0; i < MLA_PL; i++) {
        int cc = lane + 32 * i;
        qr[i] = cc < lw ? qh[cc] : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int pb = p0; pb < p1; pb += MLA_TP) {
        int np = min(MLA_TP, p1 - pb);
        __syncthreads();
        if (pick) {
            for (int i = threadIdx.x; i < np * lw; i += blockDim.x) {
                int j = i / lw;
                rows[i] = cache[(long long)pick[pb + j] * lw + (i - j * lw)];
            }
        } else {
            const float* src = cache + (long long)pb * lw;
            for (int i = threadIdx.x; i < np * lw; i += blockDim.x) rows[i] = src[i];
        }
        __syncthreads();
        if (!live) continue;
        float sc[MLA_TP];
        float mt = NEG_INF;
#pragma unroll
        for (int j = 0; j < MLA_TP; j++) {
            float s = 0.f;
            if (j < np) {
#pragma unroll
                for (int i = 0; i < MLA_PL; i++) {
                    int cc = lane + 32 * i;
                    if (cc < lw) s = fmaf(qr[i], rows[j * lw + cc], s);
                }
                s = warp_sum(s);
                mt = fmaxf(mt, s);
            }
            sc[j] = s;
        }
        float mn = fmaxf(m, mt);
        float corr = expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < MLA_PL; i++) acc[i] *= corr;
#pragma unroll
        for (int j = 0; j < MLA_TP; j++) {
            if (j < np) {
                float e = expf(sc[j] - mn);
                l += e;
#pragma unroll
                for (int i = 0; i < MLA_PL; i++) {
                    int cc = lane + 32 * i;
                    if (cc < kvl) acc[i] = fmaf(e, rows[j * lw + cc], acc[i]);
                }
            }
        }
        m = mn;
    }
    if (!live) return;
    long long th = (long long)t * nh + h;
    if (parts == 1) {
        float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < MLA_PL; i++) {
            int cc = lane + 32 * i;
            if (cc < kvl) ol[th * kvl + cc] = acc[i] * inv;
        }
        return;
    }
    float* o = part + (th * parts + c) * (kvl + 2);
    if (lane == 0) {
        o[0] = m;
        o[1] = l;
    }
#pragma unroll
    for (int i = 0; i < MLA_PL; i++) {
        int cc = lane + 32 * i;
        if (cc < kvl) o[2 + cc] = acc[i];
    }
}

extern "C" __global__ void mla_part(const float* qc, const long long* meta, int layer, float* part, float* ol, int nh,
                                    int kvl, int rd, int parts, int chunk) {
    PDL_ENTRY();
    mla_part_body(qc, meta, layer, part, ol, nh, kvl, rd, parts, chunk, nullptr, 0);
}

// mla_part over each token's selection (sel: tokens × topk positions, from dsa_select).
extern "C" __global__ void mla_part_sel(const float* qc, const long long* meta, int layer, float* part, float* ol,
                                        int nh, int kvl, int rd, int parts, int chunk, const int* sel, int topk) {
    PDL_ENTRY();
    mla_part_body(qc, meta, layer, part, ol, nh, kvl, rd, parts, chunk, sel, topk);
}

// ol[t][h] = the parts of (t, h) merged: each part weighs by its share Σ e^(x − m)·e^(m − max m)
// of the whole. Only the parts that hold positions of token t are read (a decode graph's grid
// covers the cache's capacity). Block t·heads + h; shared memory: a weight per part.
// topk > 0: a selection's parts (mla_part_sel), min(len, topk) positions.
__device__ __forceinline__ void mla_merge_body(const float* part, const long long* meta, float* ol, int nh, int kvl,
                                               int parts, int chunk, int topk) {
    extern __shared__ float wt[];
    __shared__ float tot;
    long long th = blockIdx.x;
    int len = (int)meta[0] + (int)(th / nh) + 1;
    if (topk > 0) len = min(len, topk);
    int live = min(parts, (len + chunk - 1) / chunk);
    const float* pp = part + th * parts * (kvl + 2);
    if (threadIdx.x == 0) {
        float top = NEG_INF;
        for (int c = 0; c < live; c++) top = fmaxf(top, pp[c * (kvl + 2)]);
        float s = 0.f;
        for (int c = 0; c < live; c++) {
            float mc = pp[c * (kvl + 2)];
            wt[c] = mc == NEG_INF ? 0.f : expf(mc - top);
            s += pp[c * (kvl + 2) + 1] * wt[c];
        }
        tot = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kvl; i += blockDim.x) {
        float v = 0.f;
        for (int c = 0; c < live; c++) v = fmaf(pp[c * (kvl + 2) + 2 + i], wt[c], v);
        ol[th * kvl + i] = v / tot;
    }
}

extern "C" __global__ void mla_merge(const float* part, const long long* meta, float* ol, int nh, int kvl, int parts,
                                     int chunk) {
    PDL_ENTRY();
    mla_merge_body(part, meta, ol, nh, kvl, parts, chunk, 0);
}

extern "C" __global__ void mla_merge_sel(const float* part, const long long* meta, float* ol, int nh, int kvl,
                                         int parts, int chunk, int topk) {
    PDL_ENTRY();
    mla_merge_body(part, meta, ol, nh, kvl, parts, chunk, topk);
}

// o[t][h·vd + j] = W_UV[h·vd + j] · ol[t][h]: each head's latent sum out to its values (uv: the
// heads' vd rows of kvl, f32 or bf16). Grid (t·heads + h, vd / warps), a warp per row.
extern "C" __global__ void mla_uv(const float* ol, const u8* base, MatD uv, float* o, int nh, int vd) {
    PDL_ENTRY();
    long long th = blockIdx.x;
    int h = (int)(th % nh), lane = threadIdx.x & 31;
    int j = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= vd) return;
    float a[1] = {0.f};
    row_dots<1>(base, uv, h * vd + j, ol + th * uv.cols, 0, 1, lane, a);
    float v = warp_sum(a[0]);
    if (lane == 0) o[th * vd + j] = v;
}

// DSA's lightning indexer (DeepSeek-V3.2, GLM-5; src/layers/mla.rs, `Indexer`). A layer with
// its own indexer keeps one key of hd floats per position beside its latent cache, at
// meta[2 + 2·layer]. Token t's score of position s is Σ_h w_h/√heads · ReLU(q_h·k_s/√hd); it
// attends to the topk positions scoring highest (ties: the lower position), or to all while it
// sees at most topk.

__device__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

// Block (t, 0): token t's index key (ik rows of hd, as wk wrote them) LayerNorm'd in double
// (weight nw, bias nb, eps 1e-6, as the CPU's layer_norm), its first rd values rotated, written
// into the index cache at position pos0 + t; block (t, 1 + h): the first rd values of indexer
// head h's query (iq rows of heads × hd) rotated in place. Pairs (2i, 2i+1) when interleaved,
// else (i, i + rd/2); the MLA's frequencies. blockDim: a multiple of 32.
extern "C" __global__ void dsa_prep(float* iq, const float* ik, const long long* meta, int layer, const float* nw,
                                    const float* nb, int heads, int hd, int rd, const double* freqs, float fscale,
                                    int interleaved) {
    PDL_ENTRY();
    __shared__ double sh[32];
    int t = blockIdx.x, y = blockIdx.y;
    int pos = (int)meta[0] + t, half = rd / 2;
    float* dst;
    if (y == 0) {
        const float* k = ik + (long long)t * hd;
        float* row = (float*)meta[2 + 2 * layer] + (long long)pos * hd;
        double s = 0.0;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) s += (double)k[i];
        double mean = block_sum_d(s, sh) / hd;
        double v = 0.0;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            double d = (double)k[i] - mean;
            v += d * d;
        }
        double inv = 1.0 / sqrt(block_sum_d(v, sh) / hd + 1e-6);
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            float z = (float)(((double)k[i] - mean) * inv);
            row[i] = __fadd_rn(__fmul_rn(z, nw[i]), nb[i]);
        }
        // the rotation reads values other threads wrote
        __syncthreads();
        dst = row;
    } else {
        dst = iq + ((long long)t * heads + (y - 1)) * hd;
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        int a = interleaved ? 2 * j : j, b = interleaved ? 2 * j + 1 : j + half;
        float va = dst[a], vb = dst[b];
        rope_pair(va, vb, pos, freqs[j], fscale);
        dst[a] = va;
        dst[b] = vb;
    }
}

#define DSA_SP 64  // positions per block of dsa_scores

// Shared memory of dsa_scores (floats): the token's queries, a row of heads·hd padded to an odd
// stride (a lane per head reads them without bank conflicts), the weights, a key per warp.
__device__ __forceinline__ int dsa_qstride(int hd) { return (hd & 1) ? hd : hd + 1; }

// Scores of tokens t0 + blockIdx.x over positions blockIdx.y·DSA_SP .. (up to their own: the
// grid may cover more, as a decode graph's covers the cache's capacity): scores[blockIdx.x ·
// stride + s]. iq: the rotated queries (tokens × heads × hd), iw: the weights (tokens × heads).
// A warp per position: its key staged in shared memory, a lane per head (heads past 32 looped),
// the heads' terms summed across the warp. Every score is computed the same way whatever block
// it falls in. blockDim 256.
extern "C" __global__ void dsa_scores(const float* iq, const float* iw, const long long* meta, int layer, int t0,
                                      int heads, int hd, float* scores, long long stride) {
    PDL_ENTRY();
    extern __shared__ float sm[];
    int qs = dsa_qstride(hd), nwarps = blockDim.x >> 5;
    float* qsh = sm;
    float* wsh = qsh + heads * qs;
    float* ksh = wsh + heads;
    int t = t0 + blockIdx.x;
    int len = (int)meta[0] + t + 1;
    int s0 = blockIdx.y * DSA_SP;
    if (s0 >= len) return;  // the whole block: before any barrier
    const float* q = iq + (long long)t * heads * hd;
    for (int i = threadIdx.x; i < heads * hd; i += blockDim.x) qsh[(i / hd) * qs + i % hd] = q[i];
    // as the CPU's constants: 1/√heads on the weights, 1/√hd on the dots
    float wscale = 1.f / sqrtf((float)heads), scale = 1.f / sqrtf((float)hd);
    for (int i = threadIdx.x; i < heads; i += blockDim.x) wsh[i] = iw[(long long)t * heads + i] * wscale;
    __syncthreads();
    const float* keys = (const float*)meta[2 + 2 * layer];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* kw = ksh + warp * hd;
    int s1 = min(len, s0 + DSA_SP);
    for (int s = s0 + warp; s < s1; s += nwarps) {
        for (int i = lane; i < hd; i += 32) kw[i] = keys[(long long)s * hd + i];
        __syncwarp();
        float acc = 0.f;
        for (int h = lane; h < heads; h += 32) {
            const float* qh = qsh + h * qs;
            float d = 0.f;
            for (int i = 0; i < hd; i++) d = fmaf(qh[i], kw[i], d);
            acc = fmaf(wsh[h], fmaxf(d * scale, 0.f), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) scores[(long long)blockIdx.x * stride + s] = acc;
        __syncwarp();
    }
}

// A float's bits as an unsigned key in the order of Rust's f32::total_cmp.
__device__ __forceinline__ unsigned int dsa_key(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive prefix sum of v over the block (blockDim a multiple of 32, at most 1024); *total:
// the block's sum. wsum: 32 ints of shared memory.
__device__ int block_scan(int v, int* wsum, int* total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int u = __shfl_up_sync(0xffffffff, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) wsum[w] = v;
    __syncthreads();
    if (w == 0) {
        int x = lane < nw ? wsum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int u = __shfl_up_sync(0xffffffff, x, o);
            if (lane >= o) x += u;
        }
        if (lane < nw) wsum[lane] = x;
    }
    __syncthreads();
    int r = v + (w > 0 ? wsum[w - 1] : 0);
    *total = wsum[nw - 1];
    __syncthreads();
    return r;
}

// Token t0 + blockIdx.x's selection from its scores (scores + blockIdx.x · stride, its len
// positions): sel[t·topk + j], ascending. At most topk positions: all of them. Else an exact
// threshold search: the topk-th largest key found by four 8-bit radix passes (a histogram each
// over the keys that share the digits found so far), then one pass in position order keeps the
// keys above it and the first `want` equal to it (the lower positions, as the CPU breaks ties),
// written in order by a block prefix sum: no sort. blockDim a multiple of 32, at most 1024.
extern "C" __global__ void __launch_bounds__(1024) dsa_select(const float* scores, long long stride,
                                                              const long long* meta, int t0, int topk, int* sel) {
    PDL_ENTRY();
    __shared__ unsigned int hist[256];
    __shared__ int wsum[32];
    __shared__ unsigned int s_prefix, s_mask;
    __shared__ int s_want;
    int t = t0 + blockIdx.x;
    int len = (int)meta[0] + t + 1;
    const float* sc = scores + (long long)blockIdx.x * stride;
    int* out = sel + (long long)t * topk;
    if (len <= topk) {
        for (int j = threadIdx.x; j < len; j += blockDim.x) out[j] = j;
        return;
    }
    if (threadIdx.x == 0) {
        s_prefix = 0u;
        s_mask = 0u;
        s_want = topk;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        unsigned int prefix = s_prefix, mask = s_mask;
        for (int s = threadIdx.x; s < len; s += blockDim.x) {
            unsigned int k = dsa_key(sc[s]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // the digit holding the want-th largest candidate: at least want candidates remain
            unsigned int above = 0u, want = (unsigned int)s_want;
            int b = 255;
            for (; b > 0; b--) {
                if (above + hist[b] >= want) break;
                above += hist[b];
            }
            s_want = (int)(want - above);
            s_prefix = prefix | ((unsigned int)b << shift);
            s_mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    unsigned int thr = s_prefix;
    int want = s_want, eq_base = 0, at = 0;
    for (int b0 = 0; b0 < len && at < topk; b0 += blockDim.x) {
        int s = b0 + threadIdx.x;
        unsigned int k = s < len ? dsa_key(sc[s]) : 0u;
        int gt = s < len && k > thr, eq = s < len && k == thr, tot;
        int rank = eq_base + block_scan(eq, wsum, &tot) - eq;
        eq_base += tot;
        int take = gt || (eq && rank < want);
        int j = at + block_scan(take, wsum, &tot) - take;
        if (take) out[j] = s;
        at += tot;
    }
}
