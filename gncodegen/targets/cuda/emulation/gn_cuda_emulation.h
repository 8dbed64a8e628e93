/*
 * gn_cuda_emulation.h: run gncodegen's generated CUDA on the host, unchanged, with g++.
 *
 * The folder holding this file also holds stand-ins for <cuda_runtime.h>, <cuda_fp16.h>,
 * <cuda_bf16.h> and <cooperative_groups.h>; put it first on the include path and compile the
 * generated .cu as C++17 with -pthread. What it models:
 *
 *   - one host thread per CUDA thread; threadIdx, blockIdx, blockDim, gridDim are thread-local;
 *   - the blocks of one cluster run together (clusters one after another), so __syncthreads,
 *     cluster barriers and warp shuffles have real concurrency behind them;
 *   - __syncthreads is a barrier of the block's threads (__syncthreads_or also ORs a vote); a
 *     warp shuffle (or vote) writes the lane's value into a per-warp buffer, waits for the warp,
 *     reads its source lane (or every lane), waits again;
 *   - shared memory (GN_BLOCK_SHARED) is one arena per block, filled with 0xff bytes (a NaN
 *     pattern) at the start so a read before a write shows; the cluster maps a peer's address
 *     at the same offset in the peer's arena;
 *   - barriers are a mutex and a condition variable, so ThreadSanitizer sees every
 *     happens-before edge they create and reports an access that no barrier orders.
 *
 * Device attributes come from the environment: GN_EMU_CC_MAJOR (default 9) and GN_EMU_SMS
 * (default 4). Device memory is host memory; GN_EMU_NO_POOL=1 makes the device one without
 * memory pools (no pool to create, cudaMallocAsync fails). Streams run their work at once, in
 * order; GN_EMU_CAPTURING=1 makes every stream report an active graph capture.
 * GN_EMU_TRACE=1 prints every launch's geometry and every stream-ordered allocation's pool to
 * stderr, so tests can hold the host code to the plan's account of it.
 */
#ifndef GN_CUDA_EMULATION_H
#define GN_CUDA_EMULATION_H

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#define GN_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__ const
#define __launch_bounds__(...)

/* ------------------------------------------------------------------ runtime types */

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
};

inline const char *cudaGetErrorString(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unspecified launch failure";
    }
}

struct CUstream_st;
typedef CUstream_st *cudaStream_t;

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) uint2 {
    unsigned x, y;
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

/* Cache-hinted stores are plain stores on the host. */
template <typename T>
inline void __stwb(T *p, T value) { *p = value; }

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };

union cudaLaunchAttributeValue {
    struct {
        unsigned x, y, z;
    } clusterDim;
};

struct cudaLaunchAttribute {
    cudaLaunchAttributeID id;
    cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute *attrs;
    unsigned numAttrs;
};

enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrMemoryPoolsSupported = 115,
};

/* Memory pools: a pool is a name; device memory is host memory either way. */
struct CUmemPoolHandle_st {
    int device;
};
typedef CUmemPoolHandle_st *cudaMemPool_t;
enum cudaMemAllocationType { cudaMemAllocationTypeInvalid = 0, cudaMemAllocationTypePinned = 1 };
enum cudaMemAllocationHandleType { cudaMemHandleTypeNone = 0 };
enum cudaMemLocationType { cudaMemLocationTypeInvalid = 0, cudaMemLocationTypeDevice = 1 };
struct cudaMemLocation {
    cudaMemLocationType type;
    int id;
};
struct cudaMemPoolProps {
    cudaMemAllocationType allocType;
    cudaMemAllocationHandleType handleTypes;
    cudaMemLocation location;
};
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
};

/* ------------------------------------------------------------------ half and bfloat16 */

struct __half {
    _Float16 value;
};

inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }

inline unsigned short __half_as_ushort(__half h)
{
    unsigned short bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b)
{
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)}; /* quiet NaN */
    }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

/* ------------------------------------------------------------------ the machine */

namespace gn_emu {

/* A reusable barrier whose arrive and wait may be split (as a cluster barrier's may). */
class Barrier {
public:
    explicit Barrier(unsigned count) : count_(count) {}

    unsigned arrive()
    {
        std::lock_guard<std::mutex> lock(m_);
        const unsigned gen = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
        }
        return gen;
    }

    void wait(unsigned gen)
    {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return generation_ != gen; });
    }

    void arrive_and_wait() { wait(arrive()); }

private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned count_;
    unsigned arrived_ = 0;
    unsigned generation_ = 0;
};

constexpr size_t kSharedBytes = 96 * 1024;

struct Block {
    explicit Block(unsigned threads)
        : barrier(threads), shared(kSharedBytes, 0xff)
    {
        for (unsigned w = 0; w * 32 < threads; ++w) {
            const unsigned lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
            warps.emplace_back(new Barrier(lanes));
            slots.emplace_back(32, 0);
        }
    }
    Barrier barrier;
    std::vector<unsigned char> shared;
    std::vector<std::unique_ptr<Barrier>> warps;
    std::vector<std::vector<uint64_t>> slots;   /* one 8-byte slot per lane of each warp */
    std::mutex vote_m;                          /* __syncthreads_or's running vote */
    int vote = 0;
};

struct Launch {
    std::mutex m;
    std::map<const void *, size_t> offsets;      /* shared declaration -> arena offset */
    size_t used = 0;
};

struct Cluster {
    Cluster(unsigned blocks, unsigned threads) : barrier(blocks * threads)
    {
        for (unsigned b = 0; b < blocks; ++b) {
            members.emplace_back(new Block(threads));
        }
    }
    Barrier barrier;
    std::vector<std::unique_ptr<Block>> members;
};

struct Context {
    Launch *launch = nullptr;
    Cluster *cluster = nullptr;
    Block *block = nullptr;
    unsigned rank = 0;
    unsigned cluster_token = 0;
};

inline thread_local Context ctx;

inline int env_int(const char *name, int fallback)
{
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

/* Storage of one GN_BLOCK_SHARED declaration in the calling thread's block. */
template <typename T>
T *block_shared(const void *tag, size_t count)
{
    size_t offset;
    {
        std::lock_guard<std::mutex> lock(ctx.launch->m);
        auto it = ctx.launch->offsets.find(tag);
        if (it == ctx.launch->offsets.end()) {
            offset = (ctx.launch->used + 15) & ~(size_t)15;
            ctx.launch->used = offset + count * sizeof(T);
            if (ctx.launch->used > kSharedBytes) {
                fprintf(stderr, "gn_emu: shared memory exceeds %zu bytes\n", kSharedBytes);
                abort();
            }
            ctx.launch->offsets.emplace(tag, offset);
        } else {
            offset = it->second;
        }
    }
    return reinterpret_cast<T *>(ctx.block->shared.data() + offset);
}

}  // namespace gn_emu

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define GN_BLOCK_SHARED(type, name, count)                                                   \
    static const char gn_shared_tag_##name = 0;                                              \
    type *const name = gn_emu::block_shared<type>(&gn_shared_tag_##name, (size_t)(count))

inline void __syncthreads() { gn_emu::ctx.block->barrier.arrive_and_wait(); }

inline void __syncwarp(unsigned = 0xffffffffu)
{
    gn_emu::ctx.block->warps[threadIdx.x / 32]->arrive_and_wait();
}

/* A barrier of the block that returns nonzero when any thread's predicate is. */
inline int __syncthreads_or(int predicate)
{
    gn_emu::Block &b = *gn_emu::ctx.block;
    b.barrier.arrive_and_wait(); /* the previous vote has been read and cleared */
    if (predicate) {
        std::lock_guard<std::mutex> lock(b.vote_m);
        b.vote = 1;
    }
    b.barrier.arrive_and_wait();
    int any;
    {
        std::lock_guard<std::mutex> lock(b.vote_m);
        any = b.vote;
    }
    b.barrier.arrive_and_wait();
    if (threadIdx.x == 0) {
        std::lock_guard<std::mutex> lock(b.vote_m);
        b.vote = 0;
    }
    return any;
}

/* Nonzero in every lane when any lane of the warp has a nonzero predicate. */
inline int __any_sync(unsigned, int predicate)
{
    gn_emu::Block &b = *gn_emu::ctx.block;
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    const unsigned lanes = blockDim.x - warp * 32 < 32 ? blockDim.x - warp * 32 : 32;
    b.slots[warp][lane] = predicate != 0;
    b.warps[warp]->arrive_and_wait();
    int any = 0;
    for (unsigned l = 0; l < lanes; ++l) {
        any |= (int)b.slots[warp][l];
    }
    b.warps[warp]->arrive_and_wait();
    return any;
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32)
{
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    gn_emu::Block &b = *gn_emu::ctx.block;
    const unsigned warp = threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    unsigned src = lane ^ (unsigned)lane_mask;
    if (src / (unsigned)width != lane / (unsigned)width) {
        src = lane; /* as CUDA: a source outside the lane's segment gives its own value */
    }
    memcpy(&b.slots[warp][lane], &value, sizeof(T));
    b.warps[warp]->arrive_and_wait();
    T out;
    memcpy(&out, &b.slots[warp][src], sizeof(T));
    b.warps[warp]->arrive_and_wait();
    return out;
}

[[noreturn]] inline void __trap()
{
    fprintf(stderr, "gn_emu: __trap() in block %u thread %u\n", blockIdx.x, threadIdx.x);
    abort();
}

/* ------------------------------------------------------------------ cooperative groups */

namespace cooperative_groups {

class cluster_group {
public:
    struct arrival_token {};
    static void sync() { gn_emu::ctx.cluster->barrier.arrive_and_wait(); }
    static arrival_token barrier_arrive()
    {
        gn_emu::ctx.cluster_token = gn_emu::ctx.cluster->barrier.arrive();
        return arrival_token{};
    }
    static void barrier_wait() { gn_emu::ctx.cluster->barrier.wait(gn_emu::ctx.cluster_token); }
    static void barrier_wait(arrival_token &&) { barrier_wait(); }
    static unsigned block_rank() { return gn_emu::ctx.rank; }
    static unsigned num_blocks() { return (unsigned)gn_emu::ctx.cluster->members.size(); }
    template <typename T>
    static T *map_shared_rank(T *addr, int rank)
    {
        const unsigned char *base = gn_emu::ctx.block->shared.data();
        const size_t offset = (size_t)((const unsigned char *)addr - base);
        return (T *)(gn_emu::ctx.cluster->members[(size_t)rank]->shared.data() + offset);
    }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups

/* ------------------------------------------------------------------ launches */

namespace gn_emu {

struct ThreadStart {
    const std::function<void()> *body;
    Launch *launch;
    Cluster *cluster;
    Block *block;
    unsigned rank;
    dim3 thread, block_index, block_dim, grid_dim;
};

inline void *thread_main(void *arg)
{
    const ThreadStart &s = *static_cast<ThreadStart *>(arg);
    ctx.launch = s.launch;
    ctx.cluster = s.cluster;
    ctx.block = s.block;
    ctx.rank = s.rank;
    threadIdx = s.thread;
    blockIdx = s.block_index;
    blockDim = s.block_dim;
    gridDim = s.grid_dim;
    (*s.body)();
    return nullptr;
}

/* Run body once per CUDA thread: the clusters in turn, each cluster's threads together. */
inline cudaError_t run_grid(unsigned grid, unsigned threads, unsigned cluster,
                            const std::function<void()> &body)
{
    if (grid == 0 || threads == 0 || threads > 1024 || threads % 32 != 0 || cluster == 0
        || cluster > 8 || grid % cluster != 0) {
        return cudaErrorInvalidConfiguration;
    }
    Launch launch;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (unsigned first = 0; first < grid; first += cluster) {
        Cluster cl(cluster, threads);
        std::vector<ThreadStart> starts;
        starts.reserve((size_t)cluster * threads);
        for (unsigned r = 0; r < cluster; ++r) {
            for (unsigned t = 0; t < threads; ++t) {
                starts.push_back(ThreadStart{&body, &launch, &cl, cl.members[r].get(), r,
                                             dim3(t), dim3(first + r), dim3(threads),
                                             dim3(grid)});
            }
        }
        std::vector<pthread_t> ids(starts.size());
        for (size_t i = 0; i < starts.size(); ++i) {
            if (pthread_create(&ids[i], &attr, thread_main, &starts[i]) != 0) {
                fprintf(stderr, "gn_emu: cannot start thread %zu\n", i);
                abort();
            }
        }
        for (pthread_t id : ids) {
            pthread_join(id, nullptr);
        }
    }
    pthread_attr_destroy(&attr);
    return cudaSuccess;
}

}  // namespace gn_emu

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t *config, void (*kernel)(Params...),
                               Args &&...args)
{
    unsigned cluster = 1;
    for (unsigned i = 0; i < config->numAttrs; ++i) {
        if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
            cluster = config->attrs[i].val.clusterDim.x;
            if (cluster > 1 && gn_emu::env_int("GN_EMU_CC_MAJOR", 9) < 9) {
                return cudaErrorInvalidConfiguration; /* no clusters before sm_90 */
            }
        }
    }
    if (config->gridDim.y != 1 || config->gridDim.z != 1 || config->blockDim.y != 1
        || config->blockDim.z != 1) {
        return cudaErrorInvalidConfiguration; /* the generated kernels are one-dimensional */
    }
    if (gn_emu::env_int("GN_EMU_TRACE", 0) != 0) {
        fprintf(stderr, "gn_emu: launch %u blocks of %u threads, cluster %u\n", config->gridDim.x,
                config->blockDim.x, cluster);
    }
    std::tuple<Params...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    return gn_emu::run_grid(config->gridDim.x, config->blockDim.x, cluster, body);
}

/* ------------------------------------------------------------------ device and memory */

inline cudaError_t cudaGetDevice(int *device)
{
    *device = 0;
    return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int)
{
    switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = gn_emu::env_int("GN_EMU_CC_MAJOR", 9); break;
    case cudaDevAttrMultiProcessorCount: *value = gn_emu::env_int("GN_EMU_SMS", 4); break;
    case cudaDevAttrMemoryPoolsSupported: *value = gn_emu::env_int("GN_EMU_NO_POOL", 0) == 0; break;
    default: return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

inline cudaError_t cudaMalloc(void **ptr, size_t bytes)
{
    *ptr = aligned_alloc(256, (bytes + 255) & ~(size_t)255);
    return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}

template <typename T>
cudaError_t cudaMalloc(T **ptr, size_t bytes)
{
    return cudaMalloc(reinterpret_cast<void **>(ptr), bytes);
}

inline cudaError_t cudaFree(void *ptr)
{
    free(ptr);
    return cudaSuccess;
}

inline cudaError_t cudaMallocAsync(void **ptr, size_t bytes, cudaStream_t)
{
    if (gn_emu::env_int("GN_EMU_NO_POOL", 0) != 0) {
        return cudaErrorNotSupported;
    }
    if (gn_emu::env_int("GN_EMU_TRACE", 0) != 0) {
        fprintf(stderr, "gn_emu: %zu bytes from the default pool\n", bytes);
    }
    return cudaMalloc(ptr, bytes);
}

inline cudaError_t cudaMemPoolCreate(cudaMemPool_t *pool, const cudaMemPoolProps *props)
{
    if (gn_emu::env_int("GN_EMU_NO_POOL", 0) != 0) {
        return cudaErrorNotSupported;
    }
    if (props->allocType != cudaMemAllocationTypePinned
        || props->location.type != cudaMemLocationTypeDevice || props->location.id != 0) {
        return cudaErrorInvalidValue;
    }
    *pool = new CUmemPoolHandle_st{props->location.id}; /* lives as long as the process */
    return cudaSuccess;
}

inline cudaError_t cudaMemPoolDestroy(cudaMemPool_t pool)
{
    delete pool;
    return cudaSuccess;
}

inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr, void *value)
{
    return pool != nullptr && value != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}

inline cudaError_t cudaMallocFromPoolAsync(void **ptr, size_t bytes, cudaMemPool_t pool,
                                           cudaStream_t)
{
    if (pool == nullptr) {
        return cudaErrorInvalidValue;
    }
    if (gn_emu::env_int("GN_EMU_TRACE", 0) != 0) {
        fprintf(stderr, "gn_emu: %zu bytes from a created pool\n", bytes);
    }
    return cudaMalloc(ptr, bytes);
}

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus *status)
{
    *status = gn_emu::env_int("GN_EMU_CAPTURING", 0) != 0 ? cudaStreamCaptureStatusActive
                                                           : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

inline cudaError_t cudaFreeAsync(void *ptr, cudaStream_t) { return cudaFree(ptr); }

inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind)
{
    memmove(dst, src, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaMemset(void *dst, int value, size_t bytes)
{
    memset(dst, value, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#endif /* GN_CUDA_EMULATION_H */
