// CPU hash-grid encoding over raw contiguous buffers (no torch headers).
// x [N,D] in [0,1]; table [rows,F]; levels [L]; out / grad_out [N, L*F] (level-major);
// grad_table [rows,F] is accumulated into (zero it first); grad_x [N,D] is overwritten.
// threads <= 0: the OpenMP default.
#pragma once

#include <stdint.h>

#include "hashgrid.h"

namespace fieldkit {
namespace hashgrid {
namespace cpu {

template <typename T>
void forward(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, T* out, int threads);

template <typename T>
void backward_table(int64_t N, int D, int L, int F, const T* x, const Level* levels, const T* grad_out, T* grad_table,
                    int threads);

template <typename T>
void backward_points(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, const T* grad_out,
                     T* grad_x, int threads);

}  // namespace cpu
}  // namespace hashgrid
}  // namespace fieldkit
