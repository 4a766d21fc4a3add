/* What the host does inside llama_decode (issue 17, benchmarks/README §10): an LD_PRELOAD library that
 * times the CUDA runtime calls ggml-cuda makes (launches, CUDA-graph capture and replay, copies, waits)
 * and the ggml scheduler calls llama.cpp makes (reset, allocation, compute), each with its start and end
 * on CLOCK_MONOTONIC, into one array that host_trace.py reads. Nsight Systems is not installed on the
 * GPU hosts, and Nsight Compute times kernels, not the host.
 *
 * Recording starts with kvq_trace_enable(1); kvq_trace_mark(label) puts the caller's marks between the
 * calls; kvq_trace_dump(path) writes the events. The wrapped functions are looked up at first use; on a
 * machine without CUDA only the scheduler's calls are seen.
 *
 *     gcc -O2 -shared -fPIC -o libhosttrace.so benchmarks/host_trace.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
    EV_MARK = 0,
    EV_LAUNCH = 1,        /* cudaLaunchKernel / cudaLaunchKernelExC */
    EV_GRAPH_LAUNCH = 2,  /* cudaGraphLaunch */
    EV_CAPTURE_BEGIN = 3, /* cudaStreamBeginCapture */
    EV_CAPTURE_END = 4,   /* cudaStreamEndCapture */
    EV_INSTANTIATE = 5,   /* cudaGraphInstantiate */
    EV_EXEC_UPDATE = 6,   /* cudaGraphExecUpdate */
    EV_STREAM_SYNC = 7,   /* cudaStreamSynchronize */
    EV_EVENT_SYNC = 8,    /* cudaEventSynchronize */
    EV_DEVICE_SYNC = 9,   /* cudaDeviceSynchronize */
    EV_MEMCPY_ASYNC = 10, /* cudaMemcpyAsync (arg: bytes, high bit: device to host) */
    EV_MEMCPY = 11,       /* cudaMemcpy */
    EV_MEMCPY2D = 12,     /* cudaMemcpy2DAsync */
    EV_MEMSET = 13,       /* cudaMemsetAsync */
    EV_MALLOC = 14,       /* cudaMalloc */
    EV_FREE = 15,         /* cudaFree */
    EV_HOST_ALLOC = 16,   /* cudaMallocHost / cudaHostAlloc */
    EV_HOST_FREE = 17,    /* cudaFreeHost */
    EV_HOST_REGISTER = 18,
    EV_SCHED_RESET = 19,  /* ggml_backend_sched_reset */
    EV_SCHED_ALLOC = 20,  /* ggml_backend_sched_alloc_graph */
    EV_SCHED_COMPUTE = 21, /* ggml_backend_sched_graph_compute_async */
    EV_SCHED_SYNC = 22,   /* ggml_backend_sched_synchronize */
    EV_TENSOR_SET = 23,   /* ggml_backend_tensor_set (arg: bytes) */
    EV_TENSOR_GET = 24,   /* ggml_backend_tensor_get (arg: bytes) */
    EV_STREAM_WAIT = 25,  /* cudaStreamWaitEvent */
    EV_EVENT_RECORD = 26, /* cudaEventRecord */
};

typedef struct {
    uint32_t kind;
    uint32_t thread;
    uint64_t t0;
    uint64_t t1;
    uint64_t arg;
} kvq_event;

#define CAPACITY (1u << 22)
static kvq_event events[CAPACITY];
static atomic_uint n_events;
static atomic_int enabled;

static inline uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static inline void record(uint32_t kind, uint64_t t0, uint64_t arg) {
    uint64_t t1 = now();
    unsigned i = atomic_fetch_add(&n_events, 1);
    if (i < CAPACITY) {
        static __thread uint32_t tid;
        if (!tid) {
            tid = (uint32_t) (uintptr_t) &tid;
        }
        events[i] = (kvq_event) { kind, tid, t0, t1, arg };
    }
}

void kvq_trace_enable(int on) { atomic_store(&enabled, on); }
void kvq_trace_reset(void) { atomic_store(&n_events, 0); }
unsigned kvq_trace_count(void) {
    unsigned n = atomic_load(&n_events);
    return n < CAPACITY ? n : CAPACITY;
}
void kvq_trace_mark(uint64_t label) {
    if (atomic_load(&enabled)) {
        record(EV_MARK, now(), label);
    }
}
/* the events so far, raw (kind u32, thread u32, t0 u64, t1 u64, arg u64 each); 0 on success */
int kvq_trace_dump(const char * path) {
    FILE * f = fopen(path, "wb");
    if (!f) {
        return -1;
    }
    size_t n = kvq_trace_count();
    int rc = fwrite(events, sizeof(kvq_event), n, f) == n ? 0 : -1;
    return fclose(f) == 0 ? rc : -1;
}

typedef struct {
    const char * name;
    const char * hint;
    void * found;
} lookup_t;

static int lookup_in(struct dl_phdr_info * info, size_t size, void * data) {
    (void) size;
    lookup_t * l = (lookup_t *) data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, l->hint)) {
        return 0;
    }
    void * h = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
    if (h) {
        l->found = dlsym(h, l->name);
        dlclose(h);
    }
    return l->found != NULL;
}

/* The wrapped function: the next definition after this library, or, where the library that defines it
 * was loaded into a local scope (ctypes loads llama.cpp so, and its dependencies with it), that library's */
static void * real(const char * name) {
    void * f = dlsym(RTLD_NEXT, name);
    if (!f) {
        lookup_t l = { name, strncmp(name, "cuda", 4) == 0 ? "libcudart" : "libggml-base", NULL };
        dl_iterate_phdr(lookup_in, &l);
        f = l.found;
    }
    if (!f) {
        fprintf(stderr, "host_trace: %s not found\n", name);
        abort();
    }
    return f;
}

#define REAL(name, ret, ...)                                     \
    static ret (*real_##name)(__VA_ARGS__);                      \
    if (!real_##name) {                                          \
        *(void **) (&real_##name) = real(#name);                 \
    }

#define TIMED(kind, arg, call)                                   \
    if (!atomic_load(&enabled)) {                                \
        return call;                                             \
    }                                                            \
    uint64_t t0 = now();                                         \
    __typeof__(call) r = call;                                   \
    record(kind, t0, (uint64_t) (arg));                          \
    return r;

#define TIMED_VOID(kind, arg, call)                              \
    if (!atomic_load(&enabled)) {                                \
        call;                                                    \
        return;                                                  \
    }                                                            \
    uint64_t t0 = now();                                         \
    call;                                                        \
    record(kind, t0, (uint64_t) (arg));

typedef struct { unsigned x, y, z; } dim3_t;
typedef int cuda_err;

cuda_err cudaLaunchKernel(const void * f, dim3_t g, dim3_t b, void ** a, size_t sm, void * s) {
    REAL(cudaLaunchKernel, cuda_err, const void *, dim3_t, dim3_t, void **, size_t, void *)
    TIMED(EV_LAUNCH, 0, real_cudaLaunchKernel(f, g, b, a, sm, s))
}
cuda_err cudaLaunchKernelExC(const void * config, const void * f, void ** a) {
    REAL(cudaLaunchKernelExC, cuda_err, const void *, const void *, void **)
    TIMED(EV_LAUNCH, 1, real_cudaLaunchKernelExC(config, f, a))
}
cuda_err cudaGraphLaunch(void * exec, void * s) {
    REAL(cudaGraphLaunch, cuda_err, void *, void *)
    TIMED(EV_GRAPH_LAUNCH, 0, real_cudaGraphLaunch(exec, s))
}
cuda_err cudaStreamBeginCapture(void * s, int mode) {
    REAL(cudaStreamBeginCapture, cuda_err, void *, int)
    TIMED(EV_CAPTURE_BEGIN, 0, real_cudaStreamBeginCapture(s, mode))
}
cuda_err cudaStreamEndCapture(void * s, void ** graph) {
    REAL(cudaStreamEndCapture, cuda_err, void *, void **)
    TIMED(EV_CAPTURE_END, 0, real_cudaStreamEndCapture(s, graph))
}
cuda_err cudaGraphInstantiate(void ** exec, void * graph, unsigned long long flags) {
    REAL(cudaGraphInstantiate, cuda_err, void **, void *, unsigned long long)
    TIMED(EV_INSTANTIATE, 0, real_cudaGraphInstantiate(exec, graph, flags))
}
cuda_err cudaGraphExecUpdate(void * exec, void * graph, void * info) {
    REAL(cudaGraphExecUpdate, cuda_err, void *, void *, void *)
    TIMED(EV_EXEC_UPDATE, 0, real_cudaGraphExecUpdate(exec, graph, info))
}
cuda_err cudaStreamSynchronize(void * s) {
    REAL(cudaStreamSynchronize, cuda_err, void *)
    TIMED(EV_STREAM_SYNC, (uintptr_t) s, real_cudaStreamSynchronize(s))
}
cuda_err cudaEventSynchronize(void * e) {
    REAL(cudaEventSynchronize, cuda_err, void *)
    TIMED(EV_EVENT_SYNC, 0, real_cudaEventSynchronize(e))
}
cuda_err cudaDeviceSynchronize(void) {
    REAL(cudaDeviceSynchronize, cuda_err, void)
    TIMED(EV_DEVICE_SYNC, 0, real_cudaDeviceSynchronize())
}
cuda_err cudaStreamWaitEvent(void * s, void * e, unsigned flags) {
    REAL(cudaStreamWaitEvent, cuda_err, void *, void *, unsigned)
    TIMED(EV_STREAM_WAIT, 0, real_cudaStreamWaitEvent(s, e, flags))
}
cuda_err cudaEventRecord(void * e, void * s) {
    REAL(cudaEventRecord, cuda_err, void *, void *)
    TIMED(EV_EVENT_RECORD, 0, real_cudaEventRecord(e, s))
}
/* kind 2: device to host */
cuda_err cudaMemcpyAsync(void * d, const void * src, size_t n, int kind, void * s) {
    REAL(cudaMemcpyAsync, cuda_err, void *, const void *, size_t, int, void *)
    TIMED(EV_MEMCPY_ASYNC, n | ((uint64_t) (kind == 2) << 63), real_cudaMemcpyAsync(d, src, n, kind, s))
}
cuda_err cudaMemcpy(void * d, const void * src, size_t n, int kind) {
    REAL(cudaMemcpy, cuda_err, void *, const void *, size_t, int)
    TIMED(EV_MEMCPY, n | ((uint64_t) (kind == 2) << 63), real_cudaMemcpy(d, src, n, kind))
}
cuda_err cudaMemcpy2DAsync(void * d, size_t dp, const void * src, size_t sp, size_t w, size_t h, int kind, void * s) {
    REAL(cudaMemcpy2DAsync, cuda_err, void *, size_t, const void *, size_t, size_t, size_t, int, void *)
    TIMED(EV_MEMCPY2D, (w * h) | ((uint64_t) (kind == 2) << 63), real_cudaMemcpy2DAsync(d, dp, src, sp, w, h, kind, s))
}
cuda_err cudaMemsetAsync(void * d, int v, size_t n, void * s) {
    REAL(cudaMemsetAsync, cuda_err, void *, int, size_t, void *)
    TIMED(EV_MEMSET, n, real_cudaMemsetAsync(d, v, n, s))
}
cuda_err cudaMalloc(void ** p, size_t n) {
    REAL(cudaMalloc, cuda_err, void **, size_t)
    TIMED(EV_MALLOC, n, real_cudaMalloc(p, n))
}
cuda_err cudaFree(void * p) {
    REAL(cudaFree, cuda_err, void *)
    TIMED(EV_FREE, 0, real_cudaFree(p))
}
cuda_err cudaMallocHost(void ** p, size_t n) {
    REAL(cudaMallocHost, cuda_err, void **, size_t)
    TIMED(EV_HOST_ALLOC, n, real_cudaMallocHost(p, n))
}
cuda_err cudaHostAlloc(void ** p, size_t n, unsigned flags) {
    REAL(cudaHostAlloc, cuda_err, void **, size_t, unsigned)
    TIMED(EV_HOST_ALLOC, n, real_cudaHostAlloc(p, n, flags))
}
cuda_err cudaFreeHost(void * p) {
    REAL(cudaFreeHost, cuda_err, void *)
    TIMED(EV_HOST_FREE, 0, real_cudaFreeHost(p))
}
cuda_err cudaHostRegister(void * p, size_t n, unsigned flags) {
    REAL(cudaHostRegister, cuda_err, void *, size_t, unsigned)
    TIMED(EV_HOST_REGISTER, n, real_cudaHostRegister(p, n, flags))
}

/* ggml's scheduler, as llama.cpp calls it (across libraries, so these are seen) */
void ggml_backend_sched_reset(void * sched) {
    REAL(ggml_backend_sched_reset, void, void *)
    TIMED_VOID(EV_SCHED_RESET, 0, real_ggml_backend_sched_reset(sched))
}
_Bool ggml_backend_sched_alloc_graph(void * sched, void * graph) {
    REAL(ggml_backend_sched_alloc_graph, _Bool, void *, void *)
    TIMED(EV_SCHED_ALLOC, 0, real_ggml_backend_sched_alloc_graph(sched, graph))
}
int ggml_backend_sched_graph_compute_async(void * sched, void * graph) {
    REAL(ggml_backend_sched_graph_compute_async, int, void *, void *)
    TIMED(EV_SCHED_COMPUTE, 0, real_ggml_backend_sched_graph_compute_async(sched, graph))
}
void ggml_backend_sched_synchronize(void * sched) {
    REAL(ggml_backend_sched_synchronize, void, void *)
    TIMED_VOID(EV_SCHED_SYNC, 0, real_ggml_backend_sched_synchronize(sched))
}
void ggml_backend_tensor_set(void * t, const void * data, size_t offset, size_t size) {
    REAL(ggml_backend_tensor_set, void, void *, const void *, size_t, size_t)
    TIMED_VOID(EV_TENSOR_SET, size, real_ggml_backend_tensor_set(t, data, offset, size))
}
void ggml_backend_tensor_get(const void * t, void * data, size_t offset, size_t size) {
    REAL(ggml_backend_tensor_get, void, const void *, void *, size_t, size_t)
    TIMED_VOID(EV_TENSOR_GET, size, real_ggml_backend_tensor_get(t, data, offset, size))
}
