// Thin torch glue for the CPU hash-grid kernels (hashgrid_cpu.cpp): checks, allocation, pointers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "hashgrid_cpu.h"

namespace {

using at::Tensor;
using fieldkit::hashgrid::Level;

std::vector<Level> make_levels(const Tensor& scales, const Tensor& meta) {
    TORCH_CHECK(scales.scalar_type() == at::kDouble && scales.dim() == 1, "scales must be float64 [L]");
    TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(1) == 4 && meta.size(0) == scales.size(0),
                "meta must be int64 [L,4] (resolution, size, offset, hashed)");
    auto s = scales.contiguous();
    auto m = meta.contiguous();
    std::vector<Level> levels(s.size(0));
    for (int64_t l = 0; l < s.size(0); ++l) {
        const int64_t* row = m.data_ptr<int64_t>() + 4 * l;
        levels[l] = Level{s.data_ptr<double>()[l], (uint32_t)row[0], (uint32_t)row[1], (uint32_t)row[2], (uint32_t)row[3]};
    }
    return levels;
}

void check(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims");
}

Tensor forward(Tensor x, Tensor table, Tensor scales, Tensor meta) {
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "points must be float32 or float64");
    check(x, "points", dtype, 2);
    check(table, "table", dtype, 2);
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size(), F = table.size(1);
    TORCH_CHECK(D >= 1 && D <= fieldkit::hashgrid::kMaxDims, "points must have 1..4 dims");
    Tensor out = at::empty({N, L * F}, x.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_forward", [&] {
        fieldkit::hashgrid::cpu::forward<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(),
                                                   table.data_ptr<scalar_t>(), levels.data(), out.data_ptr<scalar_t>(),
                                                   at::get_num_threads());
    });
    return out;
}

Tensor backward_table(Tensor x, Tensor grad_out, Tensor scales, Tensor meta, int64_t rows, int64_t F) {
    const auto dtype = x.scalar_type();
    check(x, "points", dtype, 2);
    check(grad_out, "grad_out", dtype, 2);
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size();
    TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == L * F, "grad_out must be [N, L*F]");
    Tensor grad_table = at::zeros({rows, F}, x.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_backward_table", [&] {
        fieldkit::hashgrid::cpu::backward_table<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(), levels.data(),
                                                          grad_out.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(),
                                                          at::get_num_threads());
    });
    return grad_table;
}

Tensor backward_points(Tensor x, Tensor table, Tensor grad_out, Tensor scales, Tensor meta) {
    const auto dtype = x.scalar_type();
    check(x, "points", dtype, 2);
    check(table, "table", dtype, 2);
    check(grad_out, "grad_out", dtype, 2);
    auto levels = make_levels(scales, meta);
    const int64_t N = x.size(0), D = x.size(1), L = (int64_t)levels.size(), F = table.size(1);
    TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == L * F, "grad_out must be [N, L*F]");
    Tensor grad_x = at::empty({N, D}, x.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "hashgrid_backward_points", [&] {
        fieldkit::hashgrid::cpu::backward_points<scalar_t>(N, int(D), int(L), int(F), x.data_ptr<scalar_t>(),
                                                           table.data_ptr<scalar_t>(), levels.data(),
                                                           grad_out.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                                           at::get_num_threads());
    });
    return grad_x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit hash-grid encoding, CPU kernels";
    m.def("forward", &forward);
    m.def("backward_table", &backward_table);
    m.def("backward_points", &backward_points);
}
