// CPU (C++/OpenMP) forward and backward of the two differentiable rasterizer stages.
// Plain functions over raw, contiguous, row-major buffers (no torch headers); instantiated for
// float and double. num_threads: OpenMP threads to use (<= 0: the OpenMP default); the torch
// glue passes at::get_num_threads() so torch.set_num_threads() applies here too. Shapes use C cameras, N Gaussians, D feature channels, M tile intersections.
#pragma once

#include <stdint.h>

namespace fieldkit {
namespace cpu {

// Projection forward. Inputs: means [N,3], quats [N,4] (w,x,y,z), scales [N,3] (linear),
// viewmats [C,4,4] (world->camera), Ks [C,3,3]. Outputs: means2d [C,N,2], conics [C,N,3],
// depths [C,N], radii [C,N,2] (0 = culled; culled rows of the other outputs are 0).
template <typename T>
void project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales, const T* viewmats, const T* Ks,
                     int width, int height, double eps2d, double near_plane, double far_plane, T* means2d, T* conics,
                     T* depths, int32_t* radii, int num_threads);

// Projection backward (race-free: parallel over Gaussians, serial over cameras). Gradients
// v_means2d [C,N,2], v_conics [C,N,3], v_depths [C,N]. Outputs (overwritten): v_means [N,3],
// v_quats [N,4], v_scales [N,3], and v_viewmats [C,4,4] when non-null (last row stays 0).
template <typename T>
void project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales, const T* viewmats,
                      const T* Ks, int width, int height, double eps2d, const int32_t* radii, const T* v_means2d,
                      const T* v_conics, const T* v_depths, T* v_means, T* v_quats, T* v_scales, T* v_viewmats,
                      int num_threads);

// Compositing forward. means2d [C*N,2], conics [C*N,3], opacities [C*N], features [C*N,D],
// background [C,D]; gaussian_ids [M] (flat camera * N + n), tile_offsets [C*tiles_y*tiles_x + 1].
// Outputs: image [C,H,W,D], alpha [C,H,W], final_T [C,H,W], last_index [C,H,W] (the global
// intersection index of the last Gaussian blended into the pixel, -1 if none).
template <typename T>
void composite_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                       const T* features, const T* background, const int64_t* gaussian_ids, const int64_t* tile_offsets,
                       int width, int height, int tiles_x, int tiles_y, int tile_size, T* image, T* alpha, T* final_T,
                       int64_t* last_index, int num_threads);

// Compositing backward: walks each pixel back to front from last_index using final_T.
// v_image [C,H,W,D], v_alpha [C,H,W]. Outputs (overwritten): v_means2d [C*N,2], v_conics [C*N,3],
// v_opacities [C*N], v_features [C*N,D]. The background gradient (sum of v_image * final_T)
// is left to the caller. Race-free: each tile writes its own intersection rows, which are then
// summed per Gaussian in a fixed order (deterministic for any thread count).
template <typename T>
void composite_backward(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                        const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                        const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y, int tile_size,
                        const T* final_T, const int64_t* last_index, const T* v_image, const T* v_alpha, T* v_means2d,
                        T* v_conics, T* v_opacities, T* v_features, int num_threads);

// Tile binning (non-differentiable), bit-identical to fieldkit/render/tiles.py::intersect_tiles.
// means2d [C,N,2], radii [C,N,2] (0 = culled), depths [C,N]. Two passes: tile_offsets
// [C*tiles_y*tiles_x + 1] (the caller then allocates gaussian_ids [tile_offsets[last]]), then the
// per-tile lists of flat ids (camera * N + n), front to back (depth, ties by id).
template <typename T>
void intersect_offsets(int64_t C, int64_t N, const T* means2d, const int32_t* radii, int tiles_x, int tiles_y,
                       int tile_size, int64_t* tile_offsets, int num_threads);
template <typename T>
void intersect_fill(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths, int tiles_x,
                    int tiles_y, int tile_size, const int64_t* tile_offsets, int64_t* gaussian_ids, int num_threads);

// Which compositing build runs: "avx2" or "baseline" (FIELDKIT_CPU_SIMD=baseline forces it).
const char* simd_level();

}  // namespace cpu
}  // namespace fieldkit
