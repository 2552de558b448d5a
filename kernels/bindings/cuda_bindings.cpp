// Thin torch glue for the CUDA rasterizer launchers (kernels/cuda/*.cu). Checks devices, shapes
// and dtypes, allocates outputs and scratch with torch's caching allocator, and hands raw
// pointers and the current stream to the launchers. Same Python-facing functions, arguments and
// results as the CPU glue (cpu_bindings.cpp), so fieldkit/render/backends/cuda.py mirrors cpu.py.
//
// Only light headers: ATen core, c10/cuda stream and guard (not ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS/cuSPARSE headers that a CUDA toolkit without those libraries lacks).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <utility>
#include <vector>

#include "../cuda/rasterize_cuda.cuh"
#include "cuda_glue.h"

namespace {

using at::Tensor;

using fieldkit::glue::check_cuda;
using fieldkit::glue::check_shape;
using fieldkit::glue::current_stream;

void ok(cudaError_t status, const char* what) { fieldkit::glue::check_status(status, "fieldkit CUDA", what); }

std::vector<Tensor> project_forward(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks, int64_t width,
                                    int64_t height, double eps2d, double near_plane, double far_plane) {
    const auto dtype = means.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "means must be float32 or float64");
    TORCH_CHECK(means.dim() == 2 && viewmats.dim() == 3, "means must be [N,3] and world_to_cam [C,4,4]");
    const int64_t N = means.size(0), C = viewmats.size(0);
    const auto device = means.device();
    check_cuda(means, "means", dtype, device);
    check_cuda(quats, "quats", dtype, device);
    check_cuda(scales, "scales", dtype, device);
    check_cuda(viewmats, "world_to_cam", dtype, device);
    check_cuda(Ks, "K", dtype, device);
    check_shape(means, "means", {N, 3});
    check_shape(quats, "quats", {N, 4});
    check_shape(scales, "scales", {N, 3});
    check_shape(viewmats, "world_to_cam", {C, 4, 4});
    check_shape(Ks, "K", {C, 3, 3});
    c10::cuda::CUDAGuard guard(device);
    auto opts = means.options();
    Tensor means2d = at::empty({C, N, 2}, opts);
    Tensor conics = at::empty({C, N, 3}, opts);
    Tensor depths = at::empty({C, N}, opts);
    Tensor radii = at::empty({C, N, 2}, opts.dtype(at::kInt));
    AT_DISPATCH_FLOATING_TYPES(dtype, "project_forward_cuda", [&] {
        ok(fieldkit::cuda::launch_project_forward<scalar_t>(
               C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
               viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), int(width), int(height), eps2d, near_plane,
               far_plane, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(),
               radii.data_ptr<int32_t>(), current_stream()),
           "projection forward");
    });
    return {means2d, conics, depths, radii};
}

std::vector<Tensor> project_backward(Tensor means, Tensor quats, Tensor scales, Tensor viewmats, Tensor Ks,
                                     int64_t width, int64_t height, double eps2d, Tensor radii, Tensor v_means2d,
                                     Tensor v_conics, Tensor v_depths, bool viewmat_grad) {
    const auto dtype = means.scalar_type();
    const int64_t N = means.size(0), C = viewmats.size(0);
    const auto device = means.device();
    for (auto& pair : std::vector<std::pair<Tensor*, const char*>>{{&means, "means"}, {&quats, "quats"},
                                                                  {&scales, "scales"}, {&viewmats, "world_to_cam"},
                                                                  {&Ks, "K"}, {&v_means2d, "v_means2d"},
                                                                  {&v_conics, "v_conics"}, {&v_depths, "v_depths"}})
        check_cuda(*pair.first, pair.second, dtype, device);
    check_cuda(radii, "radii", at::kInt, device);
    check_shape(radii, "radii", {C, N, 2});
    check_shape(v_means2d, "v_means2d", {C, N, 2});
    check_shape(v_conics, "v_conics", {C, N, 3});
    check_shape(v_depths, "v_depths", {C, N});
    c10::cuda::CUDAGuard guard(device);
    // The launcher accumulates (atomicAdd): outputs start at zero.
    Tensor v_means = at::zeros({N, 3}, means.options());
    Tensor v_quats = at::zeros({N, 4}, means.options());
    Tensor v_scales = at::zeros({N, 3}, means.options());
    Tensor v_viewmats = viewmat_grad ? at::zeros({C, 4, 4}, means.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(dtype, "project_backward_cuda", [&] {
        ok(fieldkit::cuda::launch_project_backward<scalar_t>(
               C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
               viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), int(width), int(height), eps2d,
               radii.data_ptr<int32_t>(), v_means2d.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(),
               v_depths.data_ptr<scalar_t>(), v_means.data_ptr<scalar_t>(), v_quats.data_ptr<scalar_t>(),
               v_scales.data_ptr<scalar_t>(), viewmat_grad ? v_viewmats.data_ptr<scalar_t>() : nullptr,
               current_stream()),
           "projection backward");
    });
    return {v_means, v_quats, v_scales, v_viewmats};
}

void check_isect(const Tensor& gaussian_ids, const Tensor& tile_offsets, int64_t C, int64_t tiles_x, int64_t tiles_y,
                 const at::Device& device) {
    check_cuda(gaussian_ids, "gaussian_ids", at::kLong, device);
    check_cuda(tile_offsets, "tile_offsets", at::kLong, device);
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
    const auto device = features.device();
    check_cuda(means2d, "means2d", dtype, device);
    check_cuda(conics, "conics", dtype, device);
    check_cuda(opacities, "opacities", dtype, device);
    check_cuda(features, "features", dtype, device);
    check_cuda(background, "background", dtype, device);
    check_shape(means2d, "means2d", {C, N, 2});
    check_shape(conics, "conics", {C, N, 3});
    check_shape(opacities, "opacities", {C, N});
    check_shape(background, "background", {C, D});
    check_isect(gaussian_ids, tile_offsets, C, tiles_x, tiles_y, device);
    TORCH_CHECK(tiles_x * tile_size >= width && tiles_y * tile_size >= height, "tile grid does not cover the image");
    c10::cuda::CUDAGuard guard(device);
    auto opts = features.options();
    Tensor image = at::empty({C, height, width, D}, opts);
    Tensor alpha = at::empty({C, height, width, 1}, opts);
    Tensor final_T = at::empty({C, height, width}, opts);
    Tensor last_index = at::empty({C, height, width}, opts.dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(dtype, "composite_forward_cuda", [&] {
        ok(fieldkit::cuda::launch_composite_forward<scalar_t>(
               C, N, D, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
               features.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(), gaussian_ids.data_ptr<int64_t>(),
               tile_offsets.data_ptr<int64_t>(), int(width), int(height), int(tiles_x), int(tiles_y), int(tile_size),
               image.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), final_T.data_ptr<scalar_t>(),
               last_index.data_ptr<int64_t>(), current_stream()),
           "compositing forward");
    });
    return {image, alpha, final_T, last_index};
}

std::vector<Tensor> composite_backward(Tensor means2d, Tensor conics, Tensor opacities, Tensor features,
                                       Tensor background, Tensor gaussian_ids, Tensor tile_offsets, int64_t width,
                                       int64_t height, int64_t tiles_x, int64_t tiles_y, int64_t tile_size,
                                       Tensor final_T, Tensor last_index, Tensor v_image, Tensor v_alpha) {
    const auto dtype = features.scalar_type();
    const int64_t C = features.size(0), N = features.size(1), D = features.size(2);
    const auto device = features.device();
    for (auto& pair : std::vector<std::pair<Tensor*, const char*>>{
             {&means2d, "means2d"}, {&conics, "conics"}, {&opacities, "opacities"}, {&features, "features"},
             {&background, "background"}, {&final_T, "final_T"}, {&v_image, "v_image"}, {&v_alpha, "v_alpha"}})
        check_cuda(*pair.first, pair.second, dtype, device);
    check_cuda(last_index, "last_index", at::kLong, device);
    check_isect(gaussian_ids, tile_offsets, C, tiles_x, tiles_y, device);
    check_shape(v_image, "v_image", {C, height, width, D});
    check_shape(v_alpha, "v_alpha", {C, height, width, 1});
    check_shape(final_T, "final_T", {C, height, width});
    check_shape(last_index, "last_index", {C, height, width});
    c10::cuda::CUDAGuard guard(device);
    auto opts = features.options();
    // The launcher accumulates (atomicAdd): outputs start at zero.
    Tensor v_means2d = at::zeros({C, N, 2}, opts);
    Tensor v_conics = at::zeros({C, N, 3}, opts);
    Tensor v_opacities = at::zeros({C, N}, opts);
    Tensor v_features = at::zeros({C, N, D}, opts);
    AT_DISPATCH_FLOATING_TYPES(dtype, "composite_backward_cuda", [&] {
        ok(fieldkit::cuda::launch_composite_backward<scalar_t>(
               C, N, D, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
               features.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(), gaussian_ids.data_ptr<int64_t>(),
               tile_offsets.data_ptr<int64_t>(), int(width), int(height), int(tiles_x), int(tiles_y), int(tile_size),
               final_T.data_ptr<scalar_t>(), last_index.data_ptr<int64_t>(), v_image.data_ptr<scalar_t>(),
               v_alpha.data_ptr<scalar_t>(), v_means2d.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(),
               v_opacities.data_ptr<scalar_t>(), v_features.data_ptr<scalar_t>(), current_stream()),
           "compositing backward");
    });
    return {v_means2d, v_conics, v_opacities, v_features};
}

std::vector<Tensor> intersect_tiles(Tensor means2d, Tensor radii, Tensor depths, int64_t tiles_x, int64_t tiles_y,
                                    int64_t tile_size) {
    const auto dtype = means2d.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "means2d must be float32 or float64");
    TORCH_CHECK(depths.dim() == 2, "depths must be [C,N]");
    const int64_t C = depths.size(0), N = depths.size(1);
    const auto device = means2d.device();
    check_cuda(means2d, "means2d", dtype, device);
    check_cuda(depths, "depths", dtype, device);
    check_cuda(radii, "radii", at::kInt, device);
    check_shape(means2d, "means2d", {C, N, 2});
    check_shape(radii, "radii", {C, N, 2});
    c10::cuda::CUDAGuard guard(device);
    const cudaStream_t stream = current_stream();
    const int64_t num_tiles = C * tiles_x * tiles_y;
    const auto long_opts = means2d.options().dtype(at::kLong);
    const auto byte_opts = means2d.options().dtype(at::kByte);
    Tensor counts = at::empty({C * N}, long_opts);
    Tensor cum_counts = at::empty({C * N}, long_opts);
    Tensor offsets = at::empty({num_tiles + 1}, long_opts);
    Tensor ids;
    AT_DISPATCH_FLOATING_TYPES(dtype, "intersect_tiles_cuda", [&] {
        Tensor scan_ws = at::empty({int64_t(fieldkit::cuda::intersect_count_workspace_bytes(C, N))}, byte_opts);
        ok(fieldkit::cuda::launch_intersect_count<scalar_t>(
               C, N, means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), int(tiles_x), int(tiles_y),
               int(tile_size), counts.data_ptr<int64_t>(), cum_counts.data_ptr<int64_t>(), scan_ws.data_ptr(),
               size_t(scan_ws.numel()), stream),
           "tile counting");
        // The number of intersections sizes the outputs: one device -> host copy (synchronises).
        const int64_t M = C * N > 0 ? cum_counts.select(0, C * N - 1).item<int64_t>() : 0;
        ids = at::empty({M}, long_opts);
        const size_t ws_bytes = fieldkit::cuda::intersect_fill_workspace_bytes<scalar_t>(M, num_tiles);
        TORCH_CHECK(ws_bytes > 0, "too many tile intersections for the CUDA sort (", M, ")");
        Tensor fill_ws = at::empty({int64_t(ws_bytes)}, byte_opts);
        ok(fieldkit::cuda::launch_intersect_fill<scalar_t>(
               C, N, means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), depths.data_ptr<scalar_t>(),
               int(tiles_x), int(tiles_y), int(tile_size), cum_counts.data_ptr<int64_t>(), M,
               ids.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), fill_ws.data_ptr(), ws_bytes, stream),
           "tile sorting");
    });
    return {ids, offsets};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit CUDA rasterizer (projection, tile binning, compositing; forward and backward)";
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;
    m.def("project_forward", &project_forward, release());
    m.def("project_backward", &project_backward, release());
    m.def("composite_forward", &composite_forward, release());
    m.def("composite_backward", &composite_backward, release());
    m.def("intersect_tiles", &intersect_tiles, release());
}
