// CUDA hash-grid launchers (same buffers and semantics as hashgrid_cpu.h; device pointers).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "hashgrid.h"

namespace fieldkit {
namespace hashgrid {
namespace cuda {

template <typename T>
cudaError_t forward(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels, T* out,
                    cudaStream_t stream);

template <typename T>
cudaError_t backward_table(int64_t N, int D, int L, int F, const T* x, const Level* levels, const T* grad_out,
                           T* grad_table, cudaStream_t stream);

template <typename T>
cudaError_t backward_points(int64_t N, int D, int L, int F, const T* x, const T* table, const Level* levels,
                            const T* grad_out, T* grad_x, cudaStream_t stream);

}  // namespace cuda
}  // namespace hashgrid
}  // namespace fieldkit
