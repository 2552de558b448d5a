// 3DGS-LM gradient cache, CUDA: plain launchers over raw, contiguous device buffers and a
// cudaStream_t. No torch headers: nvcc compiles lm_cache_cuda.cu on any machine, and the torch
// glue (lm_bindings_cuda.cpp) only checks, allocates and calls these. This header is host-only
// C++ (the g++-compiled glue includes it too).
//
// Same functions, buffers and semantics as the CPU build (lm_cache_cpu.cpp; see its header
// comment): the cache of one batch is
//   pair_offsets [V+1] int64   entries of pair v are [pair_offsets[v], pair_offsets[v+1])
//   e_pix [E] int32            pixel id (camera * H + y) * W + x of each entry
//   e_w, e_a [E], e_dc [E,3]   alpha T, alpha (0 where the 0.999 clamp is active), dC/dalpha
//   pixel_offsets [P+1] int64  entries of pixel p are pix_entries[pixel_offsets[p] .. [p+1])
//   pix_entries [E] int32      entry index, per pixel front to back (compositing order)
// with the entries in exactly the CPU build's order: by pair, then by tile, then by pixel
// (row-major inside the tile). Every launcher returns cudaGetLastError() after its launches
// (or the first failing CUDA call); kernel faults surface at the next synchronising call.
// Instantiated for float and double. Limits: P, M (tile-list length), V and E below 2^31.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace fieldkit {
namespace lm {
namespace cuda {

// Blocks per tile of the build kernels (one thread per pixel, up to 256 pixels per block).
// The per-slot counts buffer of build_cache holds build_chunks(tile_size) * M int32.
int build_chunks(int tile_size);

// ---------------------------------------------------------------------------------------------
// build_cache, in two launches because the caller must allocate the E entries in between.
//
//   1. launch_build_count: forward (image [C,H,W,3]), entries per pixel -> pixel_offsets [P+1]
//      (inclusive scan, pixel_offsets[0] = 0, E = pixel_offsets[P]) and, when slot_counts is
//      not null, entries per (tile-list slot, pixel chunk) -> slot_counts [chunks * M].
//   2. launch_build_fill: per-slot positions in pair order (CUB stable radix sort of the slots
//      by pair, exclusive scan), pair_offsets, then the entries (second walk) and the per-pixel
//      back-to-front sweep for dC/dalpha. slot_counts is consumed (overwritten with positions).
//
// Inputs: per pair means2d [V,2], conics [V,3], opacities [V], colors [V,3]; background [C,3];
// tile lists ids [M] (pair ids, per tile by depth) and tile_offsets [num_tiles+1], num_tiles =
// C * tiles_y * tiles_x. Each launch takes a scratch buffer of at least *_workspace_bytes().
// ---------------------------------------------------------------------------------------------
size_t build_count_workspace_bytes(int64_t P);

template <typename T>
cudaError_t launch_build_count(int64_t V, int64_t M, int64_t num_tiles, const T* means2d, const T* conics,
                               const T* opacities, const T* colors, const T* background, const int64_t* ids,
                               const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                               int tile_size, T* image, int64_t* pixel_offsets, int32_t* slot_counts,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

size_t build_fill_workspace_bytes(int64_t M, int64_t V);

template <typename T>
cudaError_t launch_build_fill(int64_t V, int64_t M, int64_t num_tiles, int64_t E, const T* means2d, const T* conics,
                              const T* opacities, const T* colors, const T* background, const int64_t* ids,
                              const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                              int tile_size, const int64_t* pixel_offsets, int32_t* slot_counts,
                              int64_t* pair_offsets, int32_t* e_pix, T* e_w, T* e_a, T* e_dc, int32_t* pix_entries,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Products over the cache. Pair arrays as above; width/height of one camera's image.
// ---------------------------------------------------------------------------------------------

// J_img p: dq [V,9] -> out [P,3]. contrib [E,3] is scratch (per-entry contributions).
template <typename T>
cudaError_t launch_cache_jvp(int64_t V, int64_t P, const T* means2d, const T* conics, const T* opacities,
                             const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                             const T* e_dc, const int64_t* pixel_offsets, const int32_t* pix_entries, const T* dq,
                             int width, int height, T* contrib, T* out, cudaStream_t stream);

// J_img^T u: u [P,3] -> out [V,9] (overwritten).
template <typename T>
cudaError_t launch_cache_vjp(int64_t V, const T* means2d, const T* conics, const T* opacities,
                             const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                             const T* e_dc, const T* u, int width, int height, T* out, cudaStream_t stream);

// Per pair the packed upper triangle (45, row-major) of sum_p (dC_p/dq)^T W_p (dC_p/dq), W_p
// given per pixel as 6 values (w00, w01, w02, w11, w12, w22): pixel_weights [P,6] -> out [V,45].
template <typename T>
cudaError_t launch_hessian_blocks(int64_t V, const T* means2d, const T* conics, const T* opacities,
                                  const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                                  const T* e_dc, const T* pixel_weights, int width, int height, T* out,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace lm
}  // namespace fieldkit
