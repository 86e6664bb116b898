// What a small kernel costs inside a CUDA graph on this GPU: each kernel launched 240 times
// back to back in one captured graph (one decode token has ~240), the graph replayed, µs per
// launch from events. Build: nvcc -O3 -arch=sm_90 floor.cu -o floor
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)
__global__ void empty() {}
__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// one block's RMSNorm of `dim` values, PER values a thread in registers
template <int PER>
__global__ void norm(float* x, const float* y, const float* w, float* h, int dim) {
    __shared__ float sh[32];
    float v[PER], ss = 0.f;
#pragma unroll
    for (int r = 0; r < PER; r++) {
        int i = threadIdx.x + r * blockDim.x;
        v[r] = x[i] + __ldcg(y + i);
        ss += v[r] * v[r];
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = ss;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += sh[i];
    float inv = rsqrtf(t / dim + 1e-6f);
#pragma unroll
    for (int r = 0; r < PER; r++) {
        int i = threadIdx.x + r * blockDim.x;
        x[i] = v[r];
        h[i] = v[r] * inv * w[i];
    }
}
// a grid of blocks that each add one atomic to a counter, the last one doing a block's work
__global__ void last_block(unsigned* done, float* x, const float* w, float* h, int dim) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += x[i] * x[i];
    ss = warp_sum(ss);
    if (threadIdx.x < 32 && ss > 1e30f) h[0] = ss;
    if (threadIdx.x == 0) *done = 0;
}
// streaming read of n float4 (grid-stride), one sum per block
__global__ void stream(const float4* a, float* out, long long n) {
    float s = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float4 v = __ldcs(a + i);
        s += v.x + v.y + v.z + v.w;
    }
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0 && s == 12345.f) out[0] = s;
}
template <class F>
float per_launch(cudaStream_t st, int count, F launch) {
    cudaGraph_t g; cudaGraphExec_t ge;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    for (int i = 0; i < count; i++) launch();
    cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&ge, g, 0);
    for (int i = 0; i < 5; i++) cudaGraphLaunch(ge, st);
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    cudaEventRecord(a, st);
    int reps = 50;
    for (int i = 0; i < reps; i++) cudaGraphLaunch(ge, st);
    cudaEventRecord(b, st);
    cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
    return ms * 1000.f / (reps * count);
}
int main() {
    cudaStream_t st; CK(cudaStreamCreate(&st));
    int dim = 2048;
    float *x, *y, *w, *h; unsigned* done;
    CK(cudaMalloc(&x, 4 * 8192)); CK(cudaMalloc(&y, 4 * 8192)); CK(cudaMalloc(&w, 4 * 8192)); CK(cudaMalloc(&h, 4 * 8192));
    CK(cudaMalloc(&done, 4)); cudaMemset(done, 0, 4); cudaMemset(x, 0, 4 * 8192); cudaMemset(y, 0, 4 * 8192); cudaMemset(w, 0, 4 * 8192);
    long long big = 512ll << 20; // 512 MB: far past the L2
    float4* a; CK(cudaMalloc(&a, big)); cudaMemset(a, 0, big);
    printf("empty kernel (1 block, 32 threads): %.2f us\n", per_launch(st, 240, [&] { empty<<<1, 32, 0, st>>>(); }));
    printf("empty kernel (256 blocks of 256): %.2f us\n", per_launch(st, 240, [&] { empty<<<256, 256, 0, st>>>(); }));
    printf("rmsnorm 2048, 1 block of 256 (8 a thread): %.2f us\n", per_launch(st, 240, [&] { norm<8><<<1, 256, 0, st>>>(x, y, w, h, dim); }));
    printf("rmsnorm 2048, 1 block of 1024 (2 a thread): %.2f us\n", per_launch(st, 240, [&] { norm<2><<<1, 1024, 0, st>>>(x, y, w, h, dim); }));
    printf("rmsnorm 2048, 1 block of 512 (4 a thread): %.2f us\n", per_launch(st, 240, [&] { norm<4><<<1, 512, 0, st>>>(x, y, w, h, dim); }));
    printf("last-block pattern, 256 blocks of 256: %.2f us\n", per_launch(st, 240, [&] { last_block<<<256, 256, 0, st>>>(done, x, w, h, dim); }));
    printf("last-block pattern, 16 blocks of 256: %.2f us\n", per_launch(st, 240, [&] { last_block<<<16, 256, 0, st>>>(done, x, w, h, dim); }));
    for (long long mb : {4ll, 16ll, 64ll, 512ll}) {
        long long n = (mb << 20) / 16;
        for (int blocks : {132, 264, 528, 1056}) {
            // each launch reads its own part of the 512 MB (as decode reads each layer's own weights)
            long long parts = big / 16 / n, i = 0;
            float us = per_launch(st, mb >= 64 ? 4 : 40, [&] { stream<<<blocks, 512, 0, st>>>(a + (i++ % parts) * n, h, n); });
            printf("stream %lld MB, %d blocks of 512: %.2f us, %.0f GB/s\n", mb, blocks, us, (mb << 20) / us / 1e3);
        }
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
