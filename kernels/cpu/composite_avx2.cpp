// AVX2 build of the CPU compositing kernels (composite_cpu.inl with 32-byte vectors).
// rasterize_cpu.cpp calls these only when __builtin_cpu_supports("avx2"); elsewhere (and on
// non-x86 targets, where this file is empty) the baseline build runs. Results are identical.
//
// Standard and fieldkit headers are included *before* the target pragma so that their inline
// functions are compiled for the baseline ISA here too (no AVX2 copy of a shared inline function
// can then be picked by the linker for baseline callers); only the code of composite_cpu.inl,
// which has internal linkage, and the two entry points below are compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fieldkit/composite.h"
#include "rasterize_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)

#pragma GCC push_options
#pragma GCC target("avx2")

namespace fieldkit {
namespace cpu {

#define FK_SIMD_BYTES 32
#include "composite_cpu.inl"
#undef FK_SIMD_BYTES

template <typename T>
void composite_forward_avx2(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                            const T* features, const T* background, const int64_t* gaussian_ids,
                            const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                            int tile_size, T* image, T* alpha, T* final_T, int64_t* last_index, int nt) {
    CompositeKernels<T>::forward(C, N, D, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
                                 width, height, tiles_x, tiles_y, tile_size, image, alpha, final_T, last_index, nt);
}

template <typename T>
void composite_backward_avx2(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                             const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                             const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                             int tile_size, const T* final_T, const int64_t* last_index, const T* v_image,
                             const T* v_alpha, T* v_means2d, T* v_conics, T* v_opacities, T* v_features, int nt) {
    CompositeKernels<T>::backward(C, N, D, M, means2d, conics, opacities, features, background, gaussian_ids,
                                  tile_offsets, width, height, tiles_x, tiles_y, tile_size, final_T, last_index,
                                  v_image, v_alpha, v_means2d, v_conics, v_opacities, v_features, nt);
}

#define FK_INSTANTIATE(T)                                                                                             \
    template void composite_forward_avx2<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*,       \
                                            const T*, const int64_t*, const int64_t*, int, int, int, int, int, T*,   \
                                            T*, T*, int64_t*, int);                                                  \
    template void composite_backward_avx2<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*,       \
                                             const T*, const T*, const int64_t*, const int64_t*, int, int, int, int, \
                                             int, const T*, const int64_t*, const T*, const T*, T*, T*, T*, T*, int);
FK_INSTANTIATE(float)
FK_INSTANTIATE(double)
#undef FK_INSTANTIATE

}  // namespace cpu
}  // namespace fieldkit

#pragma GCC pop_options

#endif  // x86-64 GCC/Clang
