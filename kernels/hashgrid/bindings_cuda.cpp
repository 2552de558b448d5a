// Thin torch glue for the CUDA hash-grid launchers (hashgrid_cuda.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "hashgrid_cuda.h"

namespace {

using at::Tensor;
using fieldkit::hashgrid::Level;

std::vector<Level> make_levels(const Tensor& scales, const Tensor& meta) {
    auto s = scales.to(at::kCPU).contiguous();
    auto m = meta.to(at::kCPU).contiguous();
    TORCH_CHECK(s.scalar_type() == at::kDouble && m.scalar_type() == at::kLong && m.size(1) == 4, "bad level tables");
    std::vector<Level> levels(s.size(0));
    for (int64_t l = 0; l < s.size(0); ++l) {
        const int64_t* row = m.data_ptr<int64_t>() + 4 * l;
        levels[l] = Level{s.data_ptr<double>()[l], (uint32_t)row[0], (uint32_t)row[1], (uint32_t)row[2], (uint32_t)row[3]};
    }
    return levels;
}

void check(const Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void ok(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, "hash-grid CUDA kernel failed: ", cudaGetErrorString(status)); }

Tensor forward(Tensor x, Tensor table, Tensor scales, Tensor meta) {
    const auto dtype = x.scalar_type();
    check(x, "points", dtype);
    check(table, "table", dtype);
    c10::cuda::CUDAGuard guard(x.device());
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size(), F = table.size(1);
    Tensor out = at::empty({N, L * F}, x.options());
    auto stream = at::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_forward_cuda", [&] {
        ok(fieldkit::hashgrid::cuda::forward<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(),
                                                       table.data_ptr<scalar_t>(), levels.data(), out.data_ptr<scalar_t>(),
                                                       stream));
    });
    return out;
}

Tensor backward_table(Tensor x, Tensor grad_out, Tensor scales, Tensor meta, int64_t rows, int64_t F) {
    const auto dtype = x.scalar_type();
    check(x, "points", dtype);
    check(grad_out, "grad_out", dtype);
    c10::cuda::CUDAGuard guard(x.device());
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size();
    Tensor grad_table = at::zeros({rows, F}, x.options());
    auto stream = at::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_backward_table_cuda", [&] {
        ok(fieldkit::hashgrid::cuda::backward_table<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(),
                                                              levels.data(), grad_out.data_ptr<scalar_t>(),
                                                              grad_table.data_ptr<scalar_t>(), stream));
    });
    return grad_table;
}

Tensor backward_points(Tensor x, Tensor table, Tensor grad_out, Tensor scales, Tensor meta) {
    const auto dtype = x.scalar_type();
    check(x, "points", dtype);
    check(table, "table", dtype);
    check(grad_out, "grad_out", dtype);
    c10::cuda::CUDAGuard guard(x.device());
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size(), F = table.size(1);
    Tensor grad_x = at::empty({N, D}, x.options());
    auto stream = at::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_backward_points_cuda", [&] {
        ok(fieldkit::hashgrid::cuda::backward_points<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(),
                                                               table.data_ptr<scalar_t>(), levels.data(),
                                                               grad_out.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                                               stream));
    });
    return grad_x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit hash-grid encoding, CUDA kernels";
    m.def("forward", &forward);
    m.def("backward_table", &backward_table);
    m.def("backward_points", &backward_points);
}
