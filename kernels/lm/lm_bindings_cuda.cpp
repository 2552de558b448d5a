// Thin torch glue for the CUDA gradient cache (lm_cache_cuda.cu): checks devices, shapes and
// dtypes, allocates outputs and scratch with torch's caching allocator and hands raw pointers and
// the current stream to the launchers. Same Python-facing functions, arguments and results as
// the CPU extension (lm_cache_cpu.cpp), so fieldkit/optim/lm_native.py calls either one; the
// entry count of build_cache comes back as a CPU int64 tensor (the glue reads it to allocate).
//
// Only light headers: ATen core and c10/cuda (as kernels/bindings/cuda_bindings.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <utility>
#include <vector>

#include "../bindings/cuda_glue.h"
#include "lm_cache_cuda.cuh"

namespace {

using at::Tensor;
namespace lmc = fieldkit::lm::cuda;

using fieldkit::glue::check_cuda;
using fieldkit::glue::check_shape;
using fieldkit::glue::current_stream;

void ok(cudaError_t status, const char* what) { fieldkit::glue::check_status(status, "fieldkit LM CUDA", what); }

at::ScalarType float_dtype(const Tensor& means2d) {
    const auto dtype = means2d.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 only, got ", dtype);
    return dtype;
}

// Calls fn(tag) with tag a float or a double, by dtype (like the CPU build's body lambdas).
template <typename Fn>
void by_dtype(at::ScalarType dtype, Fn&& fn) {
    if (dtype == at::kFloat) fn(float{});
    else fn(double{});
}

// The pair arrays every product takes, and the cache's entry arrays.
void check_pairs(const Tensor& means2d, const Tensor& conics, const Tensor& opac, at::ScalarType dtype,
                 const at::Device& device, int64_t V) {
    check_cuda(means2d, "means2d", dtype, device);
    check_cuda(conics, "conics", dtype, device);
    check_cuda(opac, "opacities", dtype, device);
    check_shape(means2d, "means2d", {V, 2});
    check_shape(conics, "conics", {V, 3});
    check_shape(opac, "opacities", {V});
}

int64_t check_entries(const Tensor& pair_offsets, const Tensor& e_pix, const Tensor& e_w, const Tensor& e_a,
                      const Tensor& e_dc, at::ScalarType dtype, const at::Device& device, int64_t V) {
    check_cuda(pair_offsets, "pair_offsets", at::kLong, device);
    check_shape(pair_offsets, "pair_offsets", {V + 1});
    const int64_t E = e_w.numel();
    check_cuda(e_pix, "e_pix", at::kInt, device);
    check_cuda(e_w, "e_w", dtype, device);
    check_cuda(e_a, "e_a", dtype, device);
    check_cuda(e_dc, "e_dc", dtype, device);
    check_shape(e_pix, "e_pix", {E});
    check_shape(e_w, "e_w", {E});
    check_shape(e_a, "e_a", {E});
    check_shape(e_dc, "e_dc", {E, 3});
    return E;
}

// See lm_cache_cpu.cpp::build_cache. Returns [image [C,H,W,3], entries (CPU int64 [1])] and, with
// build, [pair_offsets [V+1], e_pix [E] int32, e_w [E], e_a [E], e_dc [E,3], pixel_offsets [P+1],
// pix_entries [E] int32].
std::vector<Tensor> build_cache(Tensor means2d, Tensor conics, Tensor opac, Tensor colors, Tensor background,
                                Tensor ids, Tensor tile_offsets, int64_t width, int64_t height, int64_t tiles_x,
                                int64_t tiles_y, int64_t tile_size, bool build) {
    const auto dtype = float_dtype(means2d);
    const auto device = means2d.device();
    const int64_t V = means2d.size(0);
    check_pairs(means2d, conics, opac, dtype, device, V);
    check_cuda(colors, "colors", dtype, device);
    check_shape(colors, "colors", {V, 3});
    check_cuda(ids, "gaussian_ids", at::kLong, device);
    check_cuda(tile_offsets, "tile_offsets", at::kLong, device);
    TORCH_CHECK(ids.dim() == 1 && tile_offsets.dim() == 1, "gaussian_ids and tile_offsets must be 1-D");
    TORCH_CHECK(width > 0 && height > 0 && tiles_x > 0 && tiles_y > 0 && tile_size > 0, "empty image or tile grid");
    TORCH_CHECK(tiles_x * tile_size >= width && tiles_y * tile_size >= height, "tile grid does not cover the image");
    const int64_t per_cam = tiles_x * tiles_y;
    const int64_t num_tiles = tile_offsets.size(0) - 1;
    TORCH_CHECK(num_tiles >= 0 && num_tiles % per_cam == 0, "tile_offsets must have C * tiles_x * tiles_y + 1 entries");
    const int64_t C = num_tiles / per_cam;
    const int64_t M = ids.size(0);
    check_cuda(background, "background", dtype, device);
    check_shape(background, "background", {C, 3});
    const int64_t P = C * height * width;
    TORCH_CHECK(P < (int64_t(1) << 31) && V < (int64_t(1) << 31) && M < (int64_t(1) << 31),
                "batch too large for int32 ids");
    c10::cuda::CUDAGuard guard(device);
    const cudaStream_t stream = current_stream();
    auto opts = means2d.options();
    auto lopts = opts.dtype(at::kLong);
    Tensor image = at::empty({C, height, width, 3}, opts);
    Tensor pixel_offsets = at::empty({P + 1}, lopts);
    const int64_t chunks = lmc::build_chunks(int(tile_size));
    Tensor slot_counts = build ? at::empty({chunks * M}, opts.dtype(at::kInt)) : Tensor();
    int32_t* slot_ptr = build ? slot_counts.data_ptr<int32_t>() : nullptr;
    const size_t count_bytes = lmc::build_count_workspace_bytes(P);
    Tensor count_ws = at::empty({int64_t(count_bytes)}, opts.dtype(at::kByte));
    by_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        ok(lmc::launch_build_count<T>(V, M, num_tiles, means2d.data_ptr<T>(), conics.data_ptr<T>(), opac.data_ptr<T>(),
                                      colors.data_ptr<T>(), background.data_ptr<T>(), ids.data_ptr<int64_t>(),
                                      tile_offsets.data_ptr<int64_t>(), int(width), int(height), int(tiles_x),
                                      int(tiles_y), int(tile_size), image.data_ptr<T>(),
                                      pixel_offsets.data_ptr<int64_t>(), slot_ptr, count_ws.data_ptr(), count_bytes,
                                      stream),
           "cache count");
    });
    count_ws.reset();
    Tensor total = pixel_offsets.narrow(0, P, 1).to(at::kCPU);  // synchronises
    const int64_t E = total.data_ptr<int64_t>()[0];
    if (!build) return {image, total};
    TORCH_CHECK(E < (int64_t(1) << 31), "too many cache entries for int32 ids: ", E);
    Tensor pair_offsets = at::empty({V + 1}, lopts);
    Tensor e_pix = at::empty({E}, opts.dtype(at::kInt)), pix_entries = at::empty({E}, opts.dtype(at::kInt));
    Tensor e_w = at::empty({E}, opts), e_a = at::empty({E}, opts), e_dc = at::empty({E, 3}, opts);
    const size_t fill_bytes = lmc::build_fill_workspace_bytes(M, V);
    TORCH_CHECK(fill_bytes > 0, "cache build: tile lists too long");
    Tensor fill_ws = at::empty({int64_t(fill_bytes)}, opts.dtype(at::kByte));
    by_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        ok(lmc::launch_build_fill<T>(V, M, num_tiles, E, means2d.data_ptr<T>(), conics.data_ptr<T>(),
                                     opac.data_ptr<T>(), colors.data_ptr<T>(), background.data_ptr<T>(),
                                     ids.data_ptr<int64_t>(), tile_offsets.data_ptr<int64_t>(), int(width),
                                     int(height), int(tiles_x), int(tiles_y), int(tile_size),
                                     pixel_offsets.data_ptr<int64_t>(), slot_ptr, pair_offsets.data_ptr<int64_t>(),
                                     e_pix.data_ptr<int32_t>(), e_w.data_ptr<T>(), e_a.data_ptr<T>(),
                                     e_dc.data_ptr<T>(), pix_entries.data_ptr<int32_t>(), fill_ws.data_ptr(),
                                     fill_bytes, stream),
           "cache fill");
    });
    return {image, total, pair_offsets, e_pix, e_w, e_a, e_dc, pixel_offsets, pix_entries};
}

// J_img p: image tangent [P,3] from per-pair tangents dq [V,9].
Tensor cache_jvp(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w, Tensor e_a,
                 Tensor e_dc, Tensor pixel_offsets, Tensor pix_entries, Tensor dq, int64_t width, int64_t height) {
    const auto dtype = float_dtype(means2d);
    const auto device = means2d.device();
    const int64_t V = means2d.size(0);
    check_pairs(means2d, conics, opac, dtype, device, V);
    const int64_t E = check_entries(pair_offsets, e_pix, e_w, e_a, e_dc, dtype, device, V);
    check_cuda(pixel_offsets, "pixel_offsets", at::kLong, device);
    check_cuda(pix_entries, "pix_entries", at::kInt, device);
    check_shape(pix_entries, "pix_entries", {E});
    TORCH_CHECK(pixel_offsets.dim() == 1 && pixel_offsets.size(0) >= 1, "pixel_offsets must be [P+1]");
    check_cuda(dq, "dq", dtype, device);
    check_shape(dq, "dq", {V, 9});
    const int64_t P = pixel_offsets.size(0) - 1;
    c10::cuda::CUDAGuard guard(device);
    Tensor out = at::empty({P, 3}, means2d.options());
    Tensor contrib = at::empty({E, 3}, means2d.options());
    by_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        ok(lmc::launch_cache_jvp<T>(V, P, means2d.data_ptr<T>(), conics.data_ptr<T>(), opac.data_ptr<T>(),
                                    pair_offsets.data_ptr<int64_t>(), e_pix.data_ptr<int32_t>(), e_w.data_ptr<T>(),
                                    e_a.data_ptr<T>(), e_dc.data_ptr<T>(), pixel_offsets.data_ptr<int64_t>(),
                                    pix_entries.data_ptr<int32_t>(), dq.data_ptr<T>(), int(width), int(height),
                                    contrib.data_ptr<T>(), out.data_ptr<T>(), current_stream()),
           "cache_jvp");
    });
    return out;
}

// J_img^T u: per-pair cotangents [V,9] from an image cotangent u [P,3].
Tensor cache_vjp(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w, Tensor e_a,
                 Tensor e_dc, Tensor u, int64_t width, int64_t height) {
    const auto dtype = float_dtype(means2d);
    const auto device = means2d.device();
    const int64_t V = means2d.size(0);
    check_pairs(means2d, conics, opac, dtype, device, V);
    check_entries(pair_offsets, e_pix, e_w, e_a, e_dc, dtype, device, V);
    check_cuda(u, "u", dtype, device);
    TORCH_CHECK(u.dim() == 2 && u.size(1) == 3, "u must be [P,3]");
    c10::cuda::CUDAGuard guard(device);
    Tensor out = at::empty({V, 9}, means2d.options());
    by_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        ok(lmc::launch_cache_vjp<T>(V, means2d.data_ptr<T>(), conics.data_ptr<T>(), opac.data_ptr<T>(),
                                    pair_offsets.data_ptr<int64_t>(), e_pix.data_ptr<int32_t>(), e_w.data_ptr<T>(),
                                    e_a.data_ptr<T>(), e_dc.data_ptr<T>(), u.data_ptr<T>(), int(width), int(height),
                                    out.data_ptr<T>(), current_stream()),
           "cache_vjp");
    });
    return out;
}

// Per pair the 45 upper-triangle entries of sum_p (dC_p/dq)^T W_p (dC_p/dq), W_p [P,6].
Tensor hessian_blocks(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w,
                      Tensor e_a, Tensor e_dc, Tensor Wp, int64_t width, int64_t height) {
    const auto dtype = float_dtype(means2d);
    const auto device = means2d.device();
    const int64_t V = means2d.size(0);
    check_pairs(means2d, conics, opac, dtype, device, V);
    check_entries(pair_offsets, e_pix, e_w, e_a, e_dc, dtype, device, V);
    check_cuda(Wp, "pixel_weights", dtype, device);
    TORCH_CHECK(Wp.dim() == 2 && Wp.size(1) == 6, "pixel_weights must be [P,6]");
    c10::cuda::CUDAGuard guard(device);
    Tensor out = at::empty({V, 45}, means2d.options());
    by_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        ok(lmc::launch_hessian_blocks<T>(V, means2d.data_ptr<T>(), conics.data_ptr<T>(), opac.data_ptr<T>(),
                                         pair_offsets.data_ptr<int64_t>(), e_pix.data_ptr<int32_t>(),
                                         e_w.data_ptr<T>(), e_a.data_ptr<T>(), e_dc.data_ptr<T>(), Wp.data_ptr<T>(),
                                         int(width), int(height), out.data_ptr<T>(), current_stream()),
           "hessian_blocks");
    });
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit 3DGS-LM gradient cache (CUDA): build, J p, J^T u, diag(J^T J) blocks";
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;
    m.def("build_cache", &build_cache, release());
    m.def("cache_jvp", &cache_jvp, release());
    m.def("cache_vjp", &cache_vjp, release());
    m.def("hessian_blocks", &hessian_blocks, release());
}
