// CPU (C++/OpenMP) hash-grid encoding: forward, backward to the table, backward to the points.
// Work is split by level (levels own disjoint table rows), so the table gradient needs no atomics.
#include "hashgrid_cpu.h"

#include <omp.h>

#include "hashgrid.h"

namespace fieldkit {
namespace hashgrid {
namespace cpu {

namespace {

template <typename T, int D>
void forward_impl(int64_t N, int L, int F, const T* x, const T* table, const Level* levels, T* out, int threads) {
#pragma omp parallel for schedule(dynamic, 1) collapse(2) num_threads(threads)
    for (int l = 0; l < L; ++l) {
        for (int64_t block = 0; block < (N + 4095) / 4096; ++block) {
            const Level level = levels[l];
            uint32_t rows[1 << D];
            T weights[1 << D];
            T frac[D];
            const int64_t end = (block + 1) * 4096 < N ? (block + 1) * 4096 : N;
            for (int64_t n = block * 4096; n < end; ++n) {
                corners<T, D>(x + n * D, level, rows, weights, frac);
                T* o = out + n * (int64_t)L * F + (int64_t)l * F;
                for (int f = 0; f < F; ++f) o[f] = (T)0;
                for (int c = 0; c < (1 << D); ++c) {
                    const T* row = table + (int64_t)rows[c] * F;
                    for (int f = 0; f < F; ++f) o[f] += weights[c] * row[f];
                }
            }
        }
    }
}

template <typename T, int D>
void backward_table_impl(int64_t N, int L, int F, const T* x, const Level* levels, const T* grad_out, T* grad_table,
                         int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int l = 0; l < L; ++l) {
        const Level level = levels[l];
        uint32_t rows[1 << D];
        T weights[1 << D];
        T frac[D];
        for (int64_t n = 0; n < N; ++n) {
            const T* g = grad_out + n * (int64_t)L * F + (int64_t)l * F;
            corners<T, D>(x + n * D, level, rows, weights, frac);
            for (int c = 0; c < (1 << D); ++c) {
                T* row = grad_table + (int64_t)rows[c] * F;
                for (int f = 0; f < F; ++f) row[f] += weights[c] * g[f];
            }
        }
    }
}

template <typename T, int D>
void backward_points_impl(int64_t N, int L, int F, const T* x, const T* table, const Level* levels, const T* grad_out,
                          T* grad_x, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        T acc[D];
        for (int d = 0; d < D; ++d) acc[d] = (T)0;
        uint32_t rows[1 << D];
        T weights[1 << D];
        T frac[D];
        for (int l = 0; l < L; ++l) {
            const Level level = levels[l];
            const T* g = grad_out + n * (int64_t)L * F + (int64_t)l * F;
            corners<T, D>(x + n * D, level, rows, weights, frac);
            for (int c = 0; c < (1 << D); ++c) {
                const T* row = table + (int64_t)rows[c] * F;
                T dot = (T)0;
                for (int f = 0; f < F; ++f) dot += g[f] * row[f];
                for (int d = 0; d < D; ++d) acc[d] += dot * weight_derivative<T, D>(c, d, frac) * (T)level.scale;
            }
        }
        for (int d = 0; d < D; ++d) grad_x[n * D + d] = acc[d];
    }
}

}  // namespace

#define FKH_DISPATCH_DIMS(D_VAR, FN, ...)                   \
    switch (D_VAR) {                                        \
        case 1: FN<T, 1>(__VA_ARGS__); break;               \
        case 2: FN<T, 2>(__VA_ARGS__); break;               \
        case 3: FN<T, 3>(__VA_ARGS__); break;               \
        default: FN<T, 4>(__VA_ARGS__); break;              \
    }

static int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

template <typename T>
void forward(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, T* out, int threads) {
    threads = resolve_threads(threads);
    FKH_DISPATCH_DIMS(D, forward_impl, N, L, F, x, table, levels, out, threads)
}

template <typename T>
void backward_table(int64_t N, int D, int L, int F, const T* x, const Level* levels, const T* grad_out, T* grad_table,
                    int threads) {
    threads = resolve_threads(threads);
    FKH_DISPATCH_DIMS(D, backward_table_impl, N, L, F, x, levels, grad_out, grad_table, threads)
}

template <typename T>
void backward_points(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, const T* grad_out,
                     T* grad_x, int threads) {
    threads = resolve_threads(threads);
    FKH_DISPATCH_DIMS(D, backward_points_impl, N, L, F, x, table, levels, grad_out, grad_x, threads)
}

#define FKH_INSTANTIATE(T)                                                                                           \
    template void forward<T>(int64_t, int, int, int, const T*, const T*, const Level*, T*, int);                    \
    template void backward_table<T>(int64_t, int, int, int, const T*, const Level*, const T*, T*, int);            \
    template void backward_points<T>(int64_t, int, int, int, const T*, const T*, const Level*, const T*, T*, int);
FKH_INSTANTIATE(float)
FKH_INSTANTIATE(double)

}  // namespace cpu
}  // namespace hashgrid
}  // namespace fieldkit
