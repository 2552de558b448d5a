// Thin torch glue for the CPU rasterizer kernels (kernels/cpu/rasterize_cpu.cpp).
// Checks shapes/dtypes, allocates outputs and hands raw pointers to the kernels.
//
// Only the ATen pieces used here are included, not <torch/extension.h> (which pulls in the
// whole C++ frontend): this file then compiles in ~13 s instead of ~40 s, which is what a
// first JIT build costs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <utility>
#include <vector>

#include "../cpu/rasterize_cpu.h"

namespace {

using at::Tensor;

void check_cpu(const Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.sizes().vec() == shape, name, " has shape ", t.sizes(), ", expected ", at::IntArrayRef(shape));
}

std::vector<Tensor> project_forward(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks, int64_t width,
                                    int64_t height, double eps2d, double near_plane, double far_plane) {
    const auto dtype = means.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "means must be float32 or float64");
    const int64_t N = means.size(0), C = viewmats.size(0);
    check_cpu(means, "means", dtype);
    check_cpu(quats, "quats", dtype);
    check_cpu(scales, "scales", dtype);
    check_cpu(viewmats, "world_to_cam", dtype);
    check_cpu(Ks, "K", dtype);
    check_shape(means, "means", {N, 3});
    check_shape(quats, "quats", {N, 4});
    check_shape(scales, "scales", {N, 3});
    check_shape(viewmats, "world_to_cam", {C, 4, 4});
    check_shape(Ks, "K", {C, 3, 3});
    auto opts = means.options();
    Tensor means2d = at::empty({C, N, 2}, opts);
    Tensor conics = at::empty({C, N, 3}, opts);
    Tensor depths = at::empty({C, N}, opts);
    Tensor radii = at::empty({C, N, 2}, opts.dtype(at::kInt));
    AT_DISPATCH_FLOATING_TYPES(dtype, "project_forward", [&] {
        fieldkit::cpu::project_forward<scalar_t>(
            C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
            viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), int(width), int(height), eps2d, near_plane,
            far_plane, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(),
            radii.data_ptr<int32_t>(), at::get_num_threads());
    });
    return {means2d, conics, depths, radii};
}

std::vector<Tensor> project_backward(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks,
                                     int64_t width, int64_t height, double eps2d, Tensor radii, Tensor v_means2d,
                                     Tensor v_conics, Tensor v_depths, bool viewmat_grad) {
    const auto dtype = means.scalar_type();
    const int64_t N = means.size(0), C = viewmats.size(0);
    for (auto& pair : std::vector<std::pair<Tensor*, const char*>>{{&means, "means"}, {&quats, "quats"},
                                                                  {&scales, "scales"}, {&viewmats, "world_to_cam"},
                                                                  {&Ks, "K"}, {&v_means2d, "v_means2d"},
                                                                  {&v_conics, "v_conics"}, {&v_depths, "v_depths"}})
        check_cpu(*pair.first, pair.second, dtype);
    check_cpu(radii, "radii", at::kInt);
    check_shape(radii, "radii", {C, N, 2});
    check_shape(v_means2d, "v_means2d", {C, N, 2});
    check_shape(v_conics, "v_conics", {C, N, 3});
    check_shape(v_depths, "v_depths", {C, N});
    Tensor v_means = at::empty({N, 3}, means.options());
    Tensor v_quats = at::empty({N, 4}, means.options());
    Tensor v_scales = at::empty({N, 3}, means.options());
    Tensor v_viewmats = viewmat_grad ? at::zeros({C, 4, 4}, means.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(dtype, "project_backward", [&] {
        fieldkit::cpu::project_backward<scalar_t>(
            C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
            viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), int(width), int(height), eps2d,
            radii.data_ptr<int32_t>(), v_means2d.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(),
            v_depths.data_ptr<scalar_t>(), v_means.data_ptr<scalar_t>(), v_quats.data_ptr<scalar_t>(),
            v_scales.data_ptr<scalar_t>(), viewmat_grad ? v_viewmats.data_ptr<scalar_t>() : nullptr, at::get_num_threads());
    });
    return {v_means, v_quats, v_scales, v_viewmats};
}

void check_isect(const Tensor& gaussian_ids, const Tensor& tile_offsets, int64_t C, int64_t tiles_x, int64_t tiles_y) {
    check_cpu(gaussian_ids, "gaussian_ids", at::kLong);
    check_cpu(tile_offsets, "tile_offsets", at::kLong);
    TORCH_CHECK(gaussian_ids.dim() == 1, "gaussian_ids must be 1-D");
    check_shape(tile_offsets, "tile_offsets", {C * tiles_x * tiles_y + 1});
}

std::vector<Tensor> composite_forward(Tensor means2d, Tensor conics, Tensor opacities, Tensor features, Tensor background,
                                      Tensor gaussian_ids, Tensor tile_offsets, int64_t width, int64_t height,
                                      int64_t tiles_x, int64_t tiles_y, int64_t tile_size) {
    const auto dtype = features.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "features must be float32 or float64");
    TORCH_CHECK(features.dim() == 3, "features must be [C,N,D]");
    const int64_t C = features.size(0), N = features.size(1), D = features.size(2);
    check_cpu(means2d, "means2d", dtype);
    check_cpu(conics, "conics", dtype);
    check_cpu(opacities, "opacities", dtype);
    check_cpu(features, "features", dtype);
    check_cpu(background, "background", dtype);
    check_shape(means2d, "means2d", {C, N, 2});
    check_shape(conics, "conics", {C, N, 3});
    check_shape(opacities, "opacities", {C, N});
    check_shape(background, "background", {C, D});
    check_isect(gaussian_ids, tile_offsets, C, tiles_x, tiles_y);
    TORCH_CHECK(tiles_x * tile_size >= width && tiles_y * tile_size >= height, "tile grid does not cover the image");
    auto opts = features.options();
    Tensor image = at::empty({C, height, width, D}, opts);
    Tensor alpha = at::empty({C, height, width, 1}, opts);
    Tensor final_T = at::empty({C, height, width}, opts);
    Tensor last_index = at::empty({C, height, width}, opts.dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(dtype, "composite_forward", [&] {
        fieldkit::cpu::composite_forward<scalar_t>(
            C, N, D, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
            features.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(), gaussian_ids.data_ptr<int64_t>(),
            tile_offsets.data_ptr<int64_t>(), int(width), int(height), int(tiles_x), int(tiles_y), int(tile_size),
            image.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), final_T.data_ptr<scalar_t>(),
            last_index.data_ptr<int64_t>(), at::get_num_threads());
    });
    return {image, alpha, final_T, last_index};
}

std::vector<Tensor> composite_backward(Tensor means2d, Tensor conics, Tensor opacities, Tensor features,
                                       Tensor background, Tensor gaussian_ids, Tensor tile_offsets, int64_t width,
                                       int64_t height, int64_t tiles_x, int64_t tiles_y, int64_t tile_size,
                                       Tensor final_T, Tensor last_index, Tensor v_image, Tensor v_alpha) {
    const auto dtype = features.scalar_type();
    const int64_t C = features.size(0), N = features.size(1), D = features.size(2);
    for (auto& pair : std::vector<std::pair<Tensor*, const char*>>{
             {&means2d, "means2d"}, {&conics, "conics"}, {&opacities, "opacities"}, {&features, "features"},
             {&background, "background"}, {&final_T, "final_T"}, {&v_image, "v_image"}, {&v_alpha, "v_alpha"}})
        check_cpu(*pair.first, pair.second, dtype);
    check_cpu(last_index, "last_index", at::kLong);
    check_isect(gaussian_ids, tile_offsets, C, tiles_x, tiles_y);
    check_shape(v_image, "v_image", {C, height, width, D});
    check_shape(v_alpha, "v_alpha", {C, height, width, 1});
    check_shape(final_T, "final_T", {C, height, width});
    check_shape(last_index, "last_index", {C, height, width});
    const int64_t M = gaussian_ids.size(0);
    auto opts = features.options();
    Tensor v_means2d = at::empty({C, N, 2}, opts);
    Tensor v_conics = at::empty({C, N, 3}, opts);
    Tensor v_opacities = at::empty({C, N}, opts);
    Tensor v_features = at::empty({C, N, D}, opts);
    AT_DISPATCH_FLOATING_TYPES(dtype, "composite_backward", [&] {
        fieldkit::cpu::composite_backward<scalar_t>(
            C, N, D, M, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
            features.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(), gaussian_ids.data_ptr<int64_t>(),
            tile_offsets.data_ptr<int64_t>(), int(width), int(height), int(tiles_x), int(tiles_y), int(tile_size),
            final_T.data_ptr<scalar_t>(), last_index.data_ptr<int64_t>(), v_image.data_ptr<scalar_t>(),
            v_alpha.data_ptr<scalar_t>(), v_means2d.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(),
            v_opacities.data_ptr<scalar_t>(), v_features.data_ptr<scalar_t>(), at::get_num_threads());
    });
    return {v_means2d, v_conics, v_opacities, v_features};
}

std::vector<Tensor> intersect_tiles(Tensor means2d, Tensor radii, Tensor depths, int64_t tiles_x, int64_t tiles_y,
                                    int64_t tile_size) {
    const auto dtype = means2d.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "means2d must be float32 or float64");
    TORCH_CHECK(depths.dim() == 2, "depths must be [C,N]");
    const int64_t C = depths.size(0), N = depths.size(1);
    check_cpu(means2d, "means2d", dtype);
    check_cpu(depths, "depths", dtype);
    check_cpu(radii, "radii", at::kInt);
    check_shape(means2d, "means2d", {C, N, 2});
    check_shape(radii, "radii", {C, N, 2});
    Tensor offsets = at::empty({C * tiles_x * tiles_y + 1}, means2d.options().dtype(at::kLong));
    Tensor ids;
    AT_DISPATCH_FLOATING_TYPES(dtype, "intersect_tiles", [&] {
        fieldkit::cpu::intersect_offsets<scalar_t>(C, N, means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(),
                                                   int(tiles_x), int(tiles_y), int(tile_size),
                                                   offsets.data_ptr<int64_t>(), at::get_num_threads());
        ids = at::empty({offsets.data_ptr<int64_t>()[offsets.numel() - 1]}, offsets.options());
        fieldkit::cpu::intersect_fill<scalar_t>(C, N, means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(),
                                                depths.data_ptr<scalar_t>(), int(tiles_x), int(tiles_y),
                                                int(tile_size), offsets.data_ptr<int64_t>(),
                                                ids.data_ptr<int64_t>(), at::get_num_threads());
    });
    return {ids, offsets};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit native CPU rasterizer (projection + compositing, forward and backward)";
    // The GIL is released while the kernels run (they touch no Python objects), so other Python
    // threads (a viewer, a data loader) keep going.
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;
    m.def("project_forward", &project_forward, release());
    m.def("project_backward", &project_backward, release());
    m.def("composite_forward", &composite_forward, release());
    m.def("composite_backward", &composite_backward, release());
    m.def("intersect_tiles", &intersect_tiles, release());
    m.def("simd_level", [] { return std::string(fieldkit::cpu::simd_level()); });
}
