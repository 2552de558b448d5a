// CUDA rasterizer: plain launchers over raw, contiguous, row-major device buffers and a
// cudaStream_t. No torch headers: nvcc compiles the .cu files on any machine, GPU or not, and the
// torch glue (kernels/bindings/cuda_bindings.cpp) only allocates tensors and calls these.
//
// Same stages, shapes and semantics as the CPU build (kernels/cpu/rasterize_cpu.h) and the torch
// reference (fieldkit/render/{projection,tiles,composite}.py); the per-Gaussian and per-pixel
// math is the shared header-only code in kernels/include/fieldkit/. Instantiated for float and
// double. Every launcher returns cudaGetLastError() after its launches (asynchronous: errors in
// the kernels themselves surface at the next synchronising call).
//
// This header is host-only C++ (it is included by the g++-compiled bindings too).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace fieldkit {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Projection (projection.cu): one thread per (camera, Gaussian); evaluated in double internally
// whatever T is, like the CPU build.
// ---------------------------------------------------------------------------------------------

// means [N,3], quats [N,4] (w,x,y,z), scales [N,3] (linear), viewmats [C,4,4] (world->camera),
// Ks [C,3,3] -> means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N,2] (0 = culled; culled
// rows of the other outputs are 0). Outputs are overwritten.
template <typename T>
cudaError_t launch_project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                                   const T* viewmats, const T* Ks, int width, int height, double eps2d,
                                   double near_plane, double far_plane, T* means2d, T* conics, T* depths,
                                   int32_t* radii, cudaStream_t stream);

// Gradients v_means2d [C,N,2], v_conics [C,N,3], v_depths [C,N] -> v_means [N,3], v_quats [N,4],
// v_scales [N,3] and, when non-null, v_viewmats [C,4,4] (last row untouched). Outputs are
// ACCUMULATED with atomicAdd: the caller zero-fills them.
template <typename T>
cudaError_t launch_project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                                    const T* viewmats, const T* Ks, int width, int height, double eps2d,
                                    const int32_t* radii, const T* v_means2d, const T* v_conics, const T* v_depths,
                                    T* v_means, T* v_quats, T* v_scales, T* v_viewmats, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Tile binning (intersect.cu), not differentiable. Produces exactly the lists of
// fieldkit/render/tiles.py::intersect_tiles: per tile (camera-major, then row-major), the flat ids
// camera * N + n of the Gaussians whose box overlaps it, by depth, ties by id. Two steps, because
// the caller must allocate the M intersections in between:
//
//   1. launch_intersect_count: counts[C*N] tiles per (camera, Gaussian) and their inclusive
//      prefix sum cum_counts[C*N] (CUB DeviceScan). M = cum_counts[C*N - 1] (0 when C*N == 0).
//   2. launch_intersect_fill: emit one (key, flat id) pair per intersection, radix-sort them (CUB
//      DeviceRadixSort, stable) and write gaussian_ids [M] and tile_offsets [C*tiles_y*tiles_x+1].
//
// Each takes a scratch buffer of at least *_workspace_bytes() bytes (any alignment >= 256 B).
// Limits: C*N and M below 2^31 (CUB item counts are int).
// ---------------------------------------------------------------------------------------------
size_t intersect_count_workspace_bytes(int64_t C, int64_t N);

template <typename T>
cudaError_t launch_intersect_count(int64_t C, int64_t N, const T* means2d, const int32_t* radii, int tiles_x,
                                   int tiles_y, int tile_size, int64_t* counts, int64_t* cum_counts,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

template <typename T>
size_t intersect_fill_workspace_bytes(int64_t M, int64_t num_tiles);  // num_tiles = C*tiles_y*tiles_x

template <typename T>
cudaError_t launch_intersect_fill(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths,
                                  int tiles_x, int tiles_y, int tile_size, const int64_t* cum_counts, int64_t M,
                                  int64_t* gaussian_ids, int64_t* tile_offsets, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Compositing (composite.cu): one block per (tile, 16x16 pixel square of the tile), one thread per
// pixel, the tile's Gaussians staged through shared memory in batches of 256.
// ---------------------------------------------------------------------------------------------

// means2d [C*N,2], conics [C*N,3], opacities [C*N], features [C*N,D] (any D), background [C,D],
// gaussian_ids [M], tile_offsets [C*tiles_y*tiles_x+1] -> image [C,H,W,D], alpha [C,H,W],
// final_T [C,H,W], last_index [C,H,W] (global intersection index of the last Gaussian blended
// into the pixel, -1 if none). Outputs are overwritten.
template <typename T>
cudaError_t launch_composite_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                                     const T* opacities, const T* features, const T* background,
                                     const int64_t* gaussian_ids, const int64_t* tile_offsets, int width, int height,
                                     int tiles_x, int tiles_y, int tile_size, T* image, T* alpha, T* final_T,
                                     int64_t* last_index, cudaStream_t stream);

// Walks each pixel back to front from last_index with final_T. v_image [C,H,W,D], v_alpha
// [C,H,W] -> v_means2d [C*N,2], v_conics [C*N,3], v_opacities [C*N], v_features [C*N,D],
// ACCUMULATED with atomicAdd (one per warp and Gaussian): the caller zero-fills them. The
// background gradient (sum of v_image * final_T) is left to the caller.
template <typename T>
cudaError_t launch_composite_backward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                                      const T* opacities, const T* features, const T* background,
                                      const int64_t* gaussian_ids, const int64_t* tile_offsets, int width,
                                      int height, int tiles_x, int tiles_y, int tile_size, const T* final_T,
                                      const int64_t* last_index, const T* v_image, const T* v_alpha, T* v_means2d,
                                      T* v_conics, T* v_opacities, T* v_features, cudaStream_t stream);

}  // namespace cuda
}  // namespace fieldkit
