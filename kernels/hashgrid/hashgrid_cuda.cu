// CUDA hash-grid encoding: one thread per (point, level). Plain launchers over raw pointers and a
// cudaStream_t (no torch headers), so nvcc compiles this file anywhere. Same math as the CPU
// build (hashgrid.h). The table gradient uses atomicAdd.
#include <cuda_runtime.h>
#include <stdint.h>

#include "hashgrid.h"
#include "hashgrid_cuda.h"

namespace fieldkit {
namespace hashgrid {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxLevels = 32;

struct Levels {
    Level level[kMaxLevels];
};

template <typename T, int D>
__global__ void forward_kernel(int64_t N, int L, int F, const T* __restrict__ x, const T* __restrict__ table, Levels levels,
                               T* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * L) return;
    const int64_t n = i / L;
    const int l = (int)(i % L);
    uint32_t rows[1 << D];
    T weights[1 << D];
    T frac[D];
    corners<T, D>(x + n * D, levels.level[l], rows, weights, frac);
    T* o = out + n * (int64_t)L * F + (int64_t)l * F;
    for (int f = 0; f < F; ++f) {
        T acc = (T)0;
        for (int c = 0; c < (1 << D); ++c) acc += weights[c] * table[(int64_t)rows[c] * F + f];
        o[f] = acc;
    }
}

template <typename T, int D>
__global__ void backward_table_kernel(int64_t N, int L, int F, const T* __restrict__ x, Levels levels,
                                      const T* __restrict__ grad_out, T* __restrict__ grad_table) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * L) return;
    const int64_t n = i / L;
    const int l = (int)(i % L);
    uint32_t rows[1 << D];
    T weights[1 << D];
    T frac[D];
    corners<T, D>(x + n * D, levels.level[l], rows, weights, frac);
    const T* g = grad_out + n * (int64_t)L * F + (int64_t)l * F;
    for (int c = 0; c < (1 << D); ++c)
        for (int f = 0; f < F; ++f) atomicAdd(grad_table + (int64_t)rows[c] * F + f, weights[c] * g[f]);
}

template <typename T, int D>
__global__ void backward_points_kernel(int64_t N, int L, int F, const T* __restrict__ x, const T* __restrict__ table,
                                       Levels levels, const T* __restrict__ grad_out, T* __restrict__ grad_x) {
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    T acc[D];
    for (int d = 0; d < D; ++d) acc[d] = (T)0;
    uint32_t rows[1 << D];
    T weights[1 << D];
    T frac[D];
    for (int l = 0; l < L; ++l) {
        const Level& level = levels.level[l];
        corners<T, D>(x + n * D, level, rows, weights, frac);
        const T* g = grad_out + n * (int64_t)L * F + (int64_t)l * F;
        for (int c = 0; c < (1 << D); ++c) {
            T dot = (T)0;
            for (int f = 0; f < F; ++f) dot += g[f] * table[(int64_t)rows[c] * F + f];
            for (int d = 0; d < D; ++d) acc[d] += dot * weight_derivative<T, D>(c, d, frac) * (T)level.scale;
        }
    }
    for (int d = 0; d < D; ++d) grad_x[n * D + d] = acc[d];
}

Levels pack(const Level* levels, int L) {
    Levels packed;
    for (int l = 0; l < L && l < kMaxLevels; ++l) packed.level[l] = levels[l];
    return packed;
}

int blocks(int64_t work) { return (int)((work + kThreads - 1) / kThreads); }

}  // namespace

#define FKH_CUDA_DISPATCH(KERNEL, WORK, ...)                                                  \
    switch (D) {                                                                              \
        case 1: KERNEL<T, 1><<<blocks(WORK), kThreads, 0, stream>>>(__VA_ARGS__); break;     \
        case 2: KERNEL<T, 2><<<blocks(WORK), kThreads, 0, stream>>>(__VA_ARGS__); break;     \
        case 3: KERNEL<T, 3><<<blocks(WORK), kThreads, 0, stream>>>(__VA_ARGS__); break;     \
        default: KERNEL<T, 4><<<blocks(WORK), kThreads, 0, stream>>>(__VA_ARGS__); break;    \
    }

template <typename T>
cudaError_t forward(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, T* out,
                    cudaStream_t stream) {
    if (L > kMaxLevels) return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    FKH_CUDA_DISPATCH(forward_kernel, N * L, N, L, F, x, table, pack(levels, L), out)
    return cudaGetLastError();
}

template <typename T>
cudaError_t backward_table(int64_t N, int D, int L, int F, const T* x, const Level* levels, const T* grad_out,
                           T* grad_table, cudaStream_t stream) {
    if (L > kMaxLevels) return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    FKH_CUDA_DISPATCH(backward_table_kernel, N * L, N, L, F, x, pack(levels, L), grad_out, grad_table)
    return cudaGetLastError();
}

template <typename T>
cudaError_t backward_points(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels,
                            const T* grad_out, T* grad_x, cudaStream_t stream) {
    if (L > kMaxLevels) return cudaErrorInvalidValue;
    if (N == 0) return cudaSuccess;
    FKH_CUDA_DISPATCH(backward_points_kernel, N, N, L, F, x, table, pack(levels, L), grad_out, grad_x)
    return cudaGetLastError();
}

#define FKH_CUDA_INSTANTIATE(T)                                                                                     \
    template cudaError_t forward<T>(int64_t, int, int, int, const T*, const T*, const Level*, T*, cudaStream_t);   \
    template cudaError_t backward_table<T>(int64_t, int, int, int, const T*, const Level*, const T*, T*,          \
                                           cudaStream_t);                                                          \
    template cudaError_t backward_points<T>(int64_t, int, int, int, const T*, const T*, const Level*, const T*, T*, \
                                            cudaStream_t);
FKH_CUDA_INSTANTIATE(float)
FKH_CUDA_INSTANTIATE(double)

}  // namespace cuda
}  // namespace hashgrid
}  // namespace fieldkit
