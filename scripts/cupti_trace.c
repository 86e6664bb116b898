// Kernel timestamps of any CUDA program, graph-launched kernels included, through CUPTI's
// activity API: build it as a shared library and load it with the driver's injection hook,
//   gcc -shared -fPIC -O2 -I$CUPTI/include scripts/cupti_trace.c -L$CUPTI/lib64 -lcupti -o cupti_trace.so
//   CUDA_INJECTION64_PATH=$PWD/cupti_trace.so CUPTI_TRACE_OUT=trace.txt flashmoe bench ...
// One line per kernel: start and end (ns, the GPU's clock), grid x/y/z, block x, name;
// scripts/cupti_table.py sums them per decode token. (ncu replays kernels one at a time with
// idle gaps between, where the clocks drop: this reads the kernels as a graph replays them.)
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define BUF_BYTES (16u << 20)

static FILE* out;

static void CUPTIAPI requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = (uint8_t*)aligned_alloc(8, BUF_BYTES);
    *size = *buffer ? BUF_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity* rec = NULL;
    while (out && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
        // the fields read here sit at the same offsets in every kernel record version since 5
        const CUpti_ActivityKernel9* k = (const CUpti_ActivityKernel9*)rec;
        fprintf(out, "%llu %llu %d %d %d %d %s\n", (unsigned long long)k->start, (unsigned long long)k->end, k->gridX,
                k->gridY, k->gridZ, k->blockX, k->name ? k->name : "?");
    }
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
    out = NULL;
}

int InitializeInjection(void) {
    const char* path = getenv("CUPTI_TRACE_OUT");
    out = fopen(path ? path : "cupti_trace.txt", "w");
    if (!out) return 0;
    if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: CUPTI activity tracing could not be enabled\n");
        return 0;
    }
    atexit(finish);
    return 1;
}
