// Argument checks and stream access shared by the torch glue of every CUDA extension
// (kernels/bindings/cuda_bindings.cpp for the rasterizer, kernels/lm/lm_bindings_cuda.cpp for the
// LM gradient cache). Light headers only: ATen core and c10/cuda.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <vector>

namespace fieldkit {
namespace glue {

// t is a contiguous CUDA tensor of ``dtype`` on ``device``.
inline void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.sizes().vec() == shape, name, " has shape ", t.sizes(), ", expected ", at::IntArrayRef(shape));
}

// A launcher's status as a Python exception naming the extension and the step.
inline void check_status(cudaError_t status, const char* extension, const char* what) {
    TORCH_CHECK(status == cudaSuccess, extension, " ", what, " failed: ", cudaGetErrorString(status));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace glue
}  // namespace fieldkit
