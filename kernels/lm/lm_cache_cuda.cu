// 3DGS-LM gradient cache, CUDA build of kernels/lm/lm_cache_cpu.cpp: same functions, same cache
// layout entry for entry, same per-entry math (kernels/include/fieldkit/lm_cache.h and, for the
// compositing walk, kernels/include/fieldkit/composite.h). Plain launchers (lm_cache_cuda.cuh);
// the torch glue is lm_bindings_cuda.cpp. Every result is deterministic: integer counts only, no
// float atomics, and every floating-point sum has a fixed order.
//
// The entry order, fixed by the CPU build: sorted by pair; inside a pair by tile (the pair's
// tile-list slots in list order, i.e. increasing tile index); inside a (tile, pair) slot by pixel,
// row-major in the tile (the CPU walk visits a splat's box rows top to bottom). Pixel lists are
// in compositing (front-to-back) order.
//
// build_cache
//   count  (build_walk_kernel<T, false>): one block per (tile, chunk of up to 256 pixels of the
//          tile, row-major), one thread per pixel, the tile's list staged through shared memory in
//          batches of blockDim splats. Each pixel walks the list front to back with the CPU walk's
//          tests (pixel box, splat_alpha, transmittance stop) and operations, so the image is the
//          CPU build's bit for bit (no FMA: nvcc --fmad=false, g++ -ffp-contract=off). Per splat
//          of a batch each warp records the ballot of its blending lanes in shared memory; after
//          the batch, per slot, the popcounts give the slot's entries in this chunk:
//          slot_counts[chunk][slot]. Entries per pixel -> CUB inclusive scan -> pixel_offsets.
//   fill   positions: the slots are sorted by pair (CUB radix sort, stable: ties keep list order,
//          i.e. tile order), their totals (sum over chunks) exclusive-scanned in that order: the
//          first position of each slot in pair-major order; each (slot, chunk) then starts after
//          the slot's earlier chunks (row-major pixel order again). pair_offsets come from the
//          sorted keys (pairs without slots get empty ranges).
//          (build_walk_kernel<T, true>): the same walk again; per batch, stage 1 redoes the
//          blend decisions and ballots, then each blended (pixel, splat) takes position
//            base(slot, chunk) + popcounts of the ballots of lower warps + its rank in its warp,
//          i.e. its row-major rank among the chunk's pixels blending that splat. The entry is
//          written there (alpha with the clamp flag as its sign, T before it, the pair id in the
//          dC/dalpha slot) and its index appended to the pixel's list. Finally every pixel sweeps
//          its own list back to front for dC/dalpha = T c - S / (1 - alpha), w = alpha T.
// cache_jvp   one warp per pair writes the per-entry contributions (lanes stride over the pair's
//             entries), then one thread per pixel sums its entries in compositing order (the
//             CPU build's expressions and order: equal bit for bit).
// cache_vjp, hessian_blocks
//             one warp per pair; each lane accumulates a strided subset of the pair's entries in
//             double, then a fixed shuffle tree sums the lanes (deterministic; the CPU build sums
//             sequentially, so the two differ by double rounding only).
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "fieldkit/composite.h"
#include "fieldkit/lm_cache.h"
#include "lm_cache_cuda.cuh"

namespace fieldkit {
namespace lm {
namespace cuda {

namespace {

constexpr int kThreads = 256;  // build: most pixels per block (= splats per batch); products: block size
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kAlign = 256;

inline size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

inline unsigned blocks_for(int64_t threads) { return (unsigned)((threads + kThreads - 1) / kThreads); }

// Threads per build block: the tile's pixels rounded up to whole warps, at most kThreads.
inline int build_threads(int tile_size) {
    const int64_t pixels = (int64_t)tile_size * tile_size;
    return pixels >= kThreads ? kThreads : (int)((pixels + 31) / 32 * 32);
}

// A pair id parked in a dC/dalpha slot between the fill walk and the sweep (bit pattern, no
// arithmetic on it, so any id survives).
__device__ __forceinline__ void put_id(float* slot, int32_t id) { *slot = __int_as_float(id); }
__device__ __forceinline__ void put_id(double* slot, int32_t id) { *slot = __longlong_as_double((long long)id); }
__device__ __forceinline__ int32_t get_id(const float* slot) { return __float_as_int(*slot); }
__device__ __forceinline__ int32_t get_id(const double* slot) { return (int32_t)__double_as_longlong(*slot); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
    return v;  // complete in lane 0
}

// The tile's camera and clipped pixel rectangle (as tile_rect in lm_cache_cpu.cpp).
struct TileRect {
    int64_t cam;
    int x0, y0, w, h;
};

__device__ __forceinline__ TileRect tile_rect(int64_t tile, int width, int height, int tiles_x, int tiles_y,
                                              int tile_size) {
    const int64_t per_cam = (int64_t)tiles_x * tiles_y;
    const int64_t local = tile % per_cam;
    TileRect r;
    r.cam = tile / per_cam;
    r.x0 = (int)(local % tiles_x) * tile_size;
    r.y0 = (int)(local / tiles_x) * tile_size;
    const int x1 = r.x0 + tile_size < width ? r.x0 + tile_size : width;
    const int y1 = r.y0 + tile_size < height ? r.y0 + tile_size : height;
    r.w = x1 > r.x0 ? x1 - r.x0 : 0;
    r.h = y1 > r.y0 ? y1 - r.y0 : 0;
    return r;
}

// One batch of a tile's list in shared memory.
template <typename T>
struct Batch {
    T mx[kThreads], my[kThreads], ca[kThreads], cb[kThreads], cc[kThreads], op[kThreads];
    T col[kThreads][3];                  // count pass: colour
    int32_t pair[kThreads];              // pair id
    int32_t bx0[kThreads], bx1[kThreads], by0[kThreads], by1[kThreads];  // pixel box (empty: bx0 > bx1)
    int32_t base[kThreads];              // fill pass: first position of this (slot, chunk)'s entries
    uint32_t ballot[kThreads][kWarps];   // lanes of each warp that blend the splat
};

// kFill = false: count pass (image, entries per pixel and per (slot, chunk)).
// kFill = true:  fill pass (entries, pixel lists, dC/dalpha).
// grid = (num_tiles, chunks per tile), block = build_threads(tile_size).
template <typename T, bool kFill>
__global__ void __launch_bounds__(kThreads)
    build_walk_kernel(int64_t M, const T* __restrict__ means2d, const T* __restrict__ conics,
                      const T* __restrict__ opacities, const T* __restrict__ colors, const T* __restrict__ background,
                      const int64_t* __restrict__ ids, const int64_t* __restrict__ tile_offsets, int width, int height,
                      int tiles_x, int tiles_y, int tile_size, T* __restrict__ image, int64_t* __restrict__ pix_count,
                      int32_t* __restrict__ slot_counts, const int64_t* __restrict__ pixel_offsets,
                      const int32_t* __restrict__ slot_base, int32_t* __restrict__ e_pix, T* __restrict__ e_w,
                      T* __restrict__ e_a, T* __restrict__ e_dc, int32_t* __restrict__ pix_entries) {
    __shared__ Batch<T> s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x;
    const unsigned lanes_below = (1u << lane) - 1u;
    const int64_t tile = blockIdx.x;
    const int chunk = blockIdx.y;
    const TileRect r = tile_rect(tile, width, height, tiles_x, tiles_y, tile_size);
    const int o = chunk * nthreads + tid;  // pixel index inside the tile, row-major
    const bool inside = o < r.w * r.h;
    const int x = inside ? r.x0 + o % r.w : 0, y = inside ? r.y0 + o / r.w : 0;
    const int64_t pix = (r.cam * height + y) * (int64_t)width + x;
    const T px = T(x) + T(0.5), py = T(y) + T(0.5);
    const int64_t start = tile_offsets[tile], end = tile_offsets[tile + 1];
    const int64_t first = (kFill && inside) ? pixel_offsets[pix] : 0;  // this pixel's list in pix_entries

    T trans = T(1);
    T acc[3] = {T(0), T(0), T(0)};
    int64_t count = 0;    // entries of this pixel so far (stage 1)
    int64_t written = 0;  // entries written so far (fill, stage 2)
    bool done = !inside;

    for (int64_t b0 = start; b0 < end; b0 += nthreads) {
        // Barrier: the previous batch is consumed; stop when every pixel of the block is finished.
        if (__syncthreads_count(!done) == 0) break;
        const int n = (int)(end - b0 < nthreads ? end - b0 : nthreads);
        if (tid < n) {
            const int64_t l = b0 + tid;
            const int64_t g = ids[l];
            const T mx = means2d[2 * g], my = means2d[2 * g + 1];
            const T ca = conics[3 * g], cb = conics[3 * g + 1], cc = conics[3 * g + 2], op = opacities[g];
            s.pair[tid] = (int32_t)g;
            s.mx[tid] = mx;
            s.my[tid] = my;
            s.ca[tid] = ca;
            s.cb[tid] = cb;
            s.cc[tid] = cc;
            s.op[tid] = op;
            int bx0, bx1, by0, by1;
            if (!splat_pixel_box<double>(mx, my, ca, cb, cc, op, &bx0, &bx1, &by0, &by1)) {
                bx0 = by0 = 1;  // never blended (the CPU walk skips the splat)
                bx1 = by1 = 0;
            }
            s.bx0[tid] = bx0;
            s.bx1[tid] = bx1;
            s.by0[tid] = by0;
            s.by1[tid] = by1;
            if constexpr (kFill) {
                s.base[tid] = slot_base[(int64_t)chunk * M + l];
            } else {
                s.col[tid][0] = colors[3 * g];
                s.col[tid][1] = colors[3 * g + 1];
                s.col[tid][2] = colors[3 * g + 2];
            }
#pragma unroll
            for (int w = 0; w < kWarps; ++w) s.ballot[tid][w] = 0u;
        }
        __syncthreads();

        // Stage 1: front to back over the batch, exactly the CPU walk per pixel; ballots per warp.
        const T trans0 = trans;
        for (int j = 0; j < n; ++j) {
            if (__all_sync(kFullMask, done)) break;  // warp-uniform; the ballots left are 0
            bool blend = false;
            if (!done && x >= s.bx0[j] && x <= s.bx1[j] && y >= s.by0[j] && y <= s.by1[j]) {
                T dx, dy, vis, alpha_raw, alpha;
                if (splat_alpha(s.mx[j], s.my[j], s.ca[j], s.cb[j], s.cc[j], s.op[j], px, py, &dx, &dy, &vis,
                                &alpha_raw, &alpha)) {
                    const T next_T = trans * (T(1) - alpha);
                    if (transmittance_exhausted(next_T)) {
                        done = true;  // not blended; the pixel is finished
                    } else {
                        blend = true;
                        if constexpr (!kFill) {
                            const T wgt = alpha * trans;
#pragma unroll
                            for (int d = 0; d < 3; ++d) acc[d] += wgt * s.col[j][d];
                        }
                        trans = next_T;
                        ++count;
                    }
                }
            }
            const unsigned bal = __ballot_sync(kFullMask, blend);
            if (lane == 0 && bal != 0u) s.ballot[j][warp] = bal;
        }
        __syncthreads();  // all ballots of the batch are in

        if constexpr (!kFill) {
            // Entries of each slot in this chunk.
            if (slot_counts != nullptr && tid < n) {
                int total = 0;
#pragma unroll
                for (int w = 0; w < kWarps; ++w) total += __popc(s.ballot[tid][w]);
                slot_counts[(int64_t)chunk * M + b0 + tid] = total;
            }
        } else {
            // Stage 2: replay this pixel's blends of the batch and write them at their positions.
            T tr = trans0;
            for (int j = 0; j < n; ++j) {
                const unsigned bal = s.ballot[j][warp];
                if (((bal >> lane) & 1u) == 0u) continue;
                int64_t k = s.base[j] + __popc(bal & lanes_below);
                for (int w = 0; w < warp; ++w) k += __popc(s.ballot[j][w]);
                T dx, dy, vis, alpha_raw, alpha;
                splat_alpha(s.mx[j], s.my[j], s.ca[j], s.cb[j], s.cc[j], s.op[j], px, py, &dx, &dy, &vis, &alpha_raw,
                            &alpha);  // blended in stage 1: the same values again
                e_pix[k] = (int32_t)pix;
                e_a[k] = alpha_unclamped(alpha_raw) ? alpha : -alpha;  // sign: clamp flag, until the sweep
                e_w[k] = tr;                                            // T before, until the sweep
                put_id(e_dc + 3 * k, s.pair[j]);
                pix_entries[first + written++] = (int32_t)k;
                tr = tr * (T(1) - alpha);
            }
        }
    }
    if (!inside) return;
    const T* bg = background + 3 * r.cam;
    if constexpr (!kFill) {
#pragma unroll
        for (int d = 0; d < 3; ++d) image[3 * pix + d] = acc[d] + trans * bg[d];
        pix_count[pix] = count;
    } else {
        // Back-to-front sweep over this pixel's entries (compositing order reversed).
        T S[3];
#pragma unroll
        for (int d = 0; d < 3; ++d) S[d] = trans * bg[d];
        for (int64_t j = count - 1; j >= 0; --j) {
            const int64_t k = pix_entries[first + j];
            const T* c = colors + 3 * (int64_t)get_id(e_dc + 3 * k);
            const bool clamped = e_a[k] < T(0);
            const T alpha = clamped ? -e_a[k] : e_a[k];
            const T Tb = e_w[k];
            sweep_entry(alpha, Tb, c, S, e_dc + 3 * k);
            e_w[k] = alpha * Tb;
            e_a[k] = clamped ? T(0) : alpha;
        }
    }
}

// Fill-pass helpers over the M tile-list slots.
__global__ void slot_keys_kernel(int64_t M, const int64_t* __restrict__ ids, uint32_t* __restrict__ keys,
                                 int32_t* __restrict__ slots) {
    const int64_t s = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= M) return;
    keys[s] = (uint32_t)ids[s];
    slots[s] = (int32_t)s;
}

// totals[i] = entries of slot order[i] over all chunks.
__global__ void slot_totals_kernel(int64_t M, int chunks, const int32_t* __restrict__ slot_counts,
                                   const int32_t* __restrict__ order, int64_t* __restrict__ totals) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M) return;
    const int64_t s = order[i];
    int64_t total = 0;
    for (int c = 0; c < chunks; ++c) total += slot_counts[(int64_t)c * M + s];
    totals[i] = total;
}

// Thread i in [0, M]: the (slot, chunk) counts of slot order[i] become first positions, and
// pair_offsets[v] = starts[i] for the pairs v in (key[i-1], key[i]] (thread M: up to V, with E).
__global__ void slot_bases_kernel(int64_t M, int64_t V, int64_t E, int chunks, const uint32_t* __restrict__ keys,
                                  const int32_t* __restrict__ order, const int64_t* __restrict__ starts,
                                  int32_t* __restrict__ slot_counts, int64_t* __restrict__ pair_offsets) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i > M) return;
    const int64_t pos = i == M ? E : starts[i];
    if (i < M) {
        const int64_t s = order[i];
        int64_t base = pos;
        for (int c = 0; c < chunks; ++c) {
            const int64_t n = slot_counts[(int64_t)c * M + s];
            slot_counts[(int64_t)c * M + s] = (int32_t)base;
            base += n;
        }
    }
    const int64_t prev = i == 0 ? -1 : (int64_t)keys[i - 1];
    int64_t cur = i == M ? V : (int64_t)keys[i];
    if (cur > V) cur = V;
    for (int64_t v = prev + 1; v <= cur; ++v) pair_offsets[v] = pos;
}

// Bits of the sort key for pair ids 0 .. V-1 (at least 1).
int key_bits(int64_t V) {
    int bits = 1;
    while (bits < 32 && ((uint64_t)(V - 1) >> bits) != 0) ++bits;
    return bits;
}

size_t sort_bytes(int64_t M, int end_bit) {
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                    (const int32_t*)nullptr, (int32_t*)nullptr, (int)M, 0, end_bit, (cudaStream_t)0);
    return bytes;
}

size_t exclusive_scan_bytes(int64_t M) {
    size_t bytes = 0;
    cub::DeviceScan::ExclusiveSum(nullptr, bytes, (const int64_t*)nullptr, (int64_t*)nullptr, (int)M,
                                  (cudaStream_t)0);
    return bytes;
}

// Workspace of launch_build_fill: six M-long arrays, then CUB's temp storage.
struct FillLayout {
    size_t keys_in = 0, keys_out = 0, slots_in = 0, slots_out = 0, totals = 0, starts = 0, cub_temp = 0;
    size_t cub_bytes = 0, total = 0;
    FillLayout(int64_t M, int64_t V) {
        const size_t n = (size_t)(M > 0 ? M : 1);
        if (M > 0) {
            const size_t a = sort_bytes(M, key_bits(V)), b = exclusive_scan_bytes(M);
            cub_bytes = a > b ? a : b;
        }
        size_t offset = 0;
        keys_in = offset, offset += align_up(4 * n);
        keys_out = offset, offset += align_up(4 * n);
        slots_in = offset, offset += align_up(4 * n);
        slots_out = offset, offset += align_up(4 * n);
        totals = offset, offset += align_up(8 * n);
        starts = offset, offset += align_up(8 * n);
        cub_temp = offset, offset += align_up(cub_bytes > 0 ? cub_bytes : 1);
        total = offset;
    }
};

// Number of cameras for a tile count, or -1 when the geometry is unusable.
int64_t cameras_of(int64_t num_tiles, int tiles_x, int tiles_y, int tile_size, int width, int height) {
    const int64_t per_cam = (int64_t)tiles_x * tiles_y;
    if (num_tiles < 0 || tile_size <= 0 || width < 0 || height < 0 || per_cam <= 0 || num_tiles % per_cam != 0)
        return -1;
    if ((int64_t)tiles_x * tile_size < width || (int64_t)tiles_y * tile_size < height) return -1;
    if (num_tiles > INT_MAX || build_chunks(tile_size) > 65535) return -1;
    return num_tiles / per_cam;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    jvp_entries_kernel(int64_t V, const T* __restrict__ means2d, const T* __restrict__ conics,
                       const T* __restrict__ opacities, const int64_t* __restrict__ pair_offsets,
                       const int32_t* __restrict__ e_pix, const T* __restrict__ e_w, const T* __restrict__ e_a,
                       const T* __restrict__ e_dc, const T* __restrict__ dq, int width, int64_t HW,
                       T* __restrict__ contrib) {
    const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // one warp per pair
    const int lane = threadIdx.x & 31;
    if (i >= V) return;
    const T* q = dq + 9 * i;
    const T mx = means2d[2 * i], my = means2d[2 * i + 1];
    const T ca = conics[3 * i], cb = conics[3 * i + 1], cc = conics[3 * i + 2];
    const T dop = q[5] / opacities[i];
    for (int64_t k = pair_offsets[i] + lane; k < pair_offsets[i + 1]; k += 32) {
        T g[5];
        sigma_partials(mx, my, (int64_t)e_pix[k] % HW, (int64_t)width, ca, cb, cc, g);
        entry_jvp(g, q, dop, e_a[k], e_w[k], e_dc + 3 * k, contrib + 3 * k);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    jvp_pixels_kernel(int64_t P, const int64_t* __restrict__ pixel_offsets, const int32_t* __restrict__ pix_entries,
                      const T* __restrict__ contrib, T* __restrict__ out) {
    const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    T acc[3] = {T(0), T(0), T(0)};
    for (int64_t j = pixel_offsets[p]; j < pixel_offsets[p + 1]; ++j) {
        const int64_t k = pix_entries[j];
#pragma unroll
        for (int d = 0; d < 3; ++d) acc[d] += contrib[3 * k + d];
    }
#pragma unroll
    for (int d = 0; d < 3; ++d) out[3 * p + d] = acc[d];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    vjp_kernel(int64_t V, const T* __restrict__ means2d, const T* __restrict__ conics, const T* __restrict__ opacities,
               const int64_t* __restrict__ pair_offsets, const int32_t* __restrict__ e_pix, const T* __restrict__ e_w,
               const T* __restrict__ e_a, const T* __restrict__ e_dc, const T* __restrict__ u, int width, int64_t HW,
               T* __restrict__ out) {
    const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // one warp per pair (warp-uniform exit)
    const int lane = threadIdx.x & 31;
    if (i >= V) return;
    const T mx = means2d[2 * i], my = means2d[2 * i + 1];
    const T ca = conics[3 * i], cb = conics[3 * i + 1], cc = conics[3 * i + 2];
    double acc[9];
#pragma unroll
    for (int j = 0; j < 9; ++j) acc[j] = 0.0;
    for (int64_t k = pair_offsets[i] + lane; k < pair_offsets[i + 1]; k += 32) {
        const int64_t p = e_pix[k];
        T g[5];
        sigma_partials(mx, my, p % HW, (int64_t)width, ca, cb, cc, g);
        entry_vjp(g, e_a[k], e_w[k], e_dc + 3 * k, u + 3 * p, acc);
    }
#pragma unroll
    for (int j = 0; j < 9; ++j) acc[j] = warp_sum(acc[j]);
    if (lane != 0) return;
    acc[5] /= opacities[i];
#pragma unroll
    for (int j = 0; j < 9; ++j) out[9 * i + j] = T(acc[j]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    hessian_kernel(int64_t V, const T* __restrict__ means2d, const T* __restrict__ conics,
                   const T* __restrict__ opacities, const int64_t* __restrict__ pair_offsets,
                   const int32_t* __restrict__ e_pix, const T* __restrict__ e_w, const T* __restrict__ e_a,
                   const T* __restrict__ e_dc, const T* __restrict__ pixel_weights, int width, int64_t HW,
                   T* __restrict__ out) {
    const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // one warp per pair (warp-uniform exit)
    const int lane = threadIdx.x & 31;
    if (i >= V) return;
    const T mx = means2d[2 * i], my = means2d[2 * i + 1];
    const T ca = conics[3 * i], cb = conics[3 * i + 1], cc = conics[3 * i + 2];
    const double inv_op = 1.0 / double(opacities[i]);
    double H[9][9];  // upper triangle used
#pragma unroll
    for (int r = 0; r < 9; ++r)
#pragma unroll
        for (int c = 0; c < 9; ++c) H[r][c] = 0.0;
    for (int64_t k = pair_offsets[i] + lane; k < pair_offsets[i + 1]; k += 32) {
        const int64_t p = e_pix[k];
        T g[5];
        sigma_partials(mx, my, p % HW, (int64_t)width, ca, cb, cc, g);
        entry_hessian(g, e_a[k], inv_op, e_w[k], e_dc + 3 * k, pixel_weights + 6 * p, H);
    }
#pragma unroll
    for (int r = 0; r < 9; ++r)
#pragma unroll
        for (int c = r; c < 9; ++c) H[r][c] = warp_sum(H[r][c]);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < 9; ++r)
#pragma unroll
        for (int c = r; c < 9; ++c) out[45 * i + packed9(r, c)] = T(H[r][c]);
}

inline unsigned warp_blocks(int64_t V) { return blocks_for(V * 32); }

}  // namespace

int build_chunks(int tile_size) {
    if (tile_size <= 0) return 0;
    const int64_t pixels = (int64_t)tile_size * tile_size;
    const int threads = build_threads(tile_size);
    const int64_t chunks = (pixels + threads - 1) / threads;
    return chunks > INT_MAX ? INT_MAX : (int)chunks;
}

size_t build_count_workspace_bytes(int64_t P) {
    size_t bytes = 0;
    if (P > 0 && P <= INT_MAX)
        cub::DeviceScan::InclusiveSum(nullptr, bytes, (const int64_t*)nullptr, (int64_t*)nullptr, (int)P,
                                      (cudaStream_t)0);
    return align_up(8 * (size_t)(P > 0 ? P : 1)) + align_up(bytes > 0 ? bytes : 1);
}

template <typename T>
cudaError_t launch_build_count(int64_t V, int64_t M, int64_t num_tiles, const T* means2d, const T* conics,
                               const T* opacities, const T* colors, const T* background, const int64_t* ids,
                               const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                               int tile_size, T* image, int64_t* pixel_offsets, int32_t* slot_counts,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int64_t C = cameras_of(num_tiles, tiles_x, tiles_y, tile_size, width, height);
    if (C < 0 || V < 0 || V > INT_MAX || M < 0 || M > INT_MAX) return cudaErrorInvalidValue;
    const int64_t P = C * height * (int64_t)width;
    if (P > INT_MAX) return cudaErrorInvalidValue;
    cudaError_t status = cudaMemsetAsync(pixel_offsets, 0, sizeof(int64_t), stream);
    if (status != cudaSuccess) return status;
    const int chunks = build_chunks(tile_size);
    if (slot_counts != nullptr && M > 0) {
        status = cudaMemsetAsync(slot_counts, 0, sizeof(int32_t) * (size_t)chunks * (size_t)M, stream);
        if (status != cudaSuccess) return status;
    }
    if (P == 0) return cudaSuccess;
    if (workspace_bytes < build_count_workspace_bytes(P)) return cudaErrorInvalidValue;
    int64_t* pix_count = static_cast<int64_t*>(workspace);
    const size_t scan_offset = align_up(8 * (size_t)P);
    void* cub_temp = static_cast<char*>(workspace) + scan_offset;
    status = cudaMemsetAsync(pix_count, 0, 8 * (size_t)P, stream);
    if (status != cudaSuccess) return status;
    build_walk_kernel<T, false><<<dim3((unsigned)num_tiles, (unsigned)chunks), build_threads(tile_size), 0, stream>>>(
        M, means2d, conics, opacities, colors, background, ids, tile_offsets, width, height, tiles_x, tiles_y,
        tile_size, image, pix_count, slot_counts, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
    size_t bytes = 0;
    status = cub::DeviceScan::InclusiveSum(nullptr, bytes, pix_count, pixel_offsets + 1, (int)P, stream);
    if (status != cudaSuccess) return status;
    if (scan_offset + bytes > workspace_bytes) return cudaErrorInvalidValue;
    status = cub::DeviceScan::InclusiveSum(cub_temp, bytes, pix_count, pixel_offsets + 1, (int)P, stream);
    if (status != cudaSuccess) return status;
    return cudaGetLastError();
}

size_t build_fill_workspace_bytes(int64_t M, int64_t V) {
    if (M > INT_MAX || V > INT_MAX) return 0;
    return FillLayout(M, V).total;
}

template <typename T>
cudaError_t launch_build_fill(int64_t V, int64_t M, int64_t num_tiles, int64_t E, const T* means2d, const T* conics,
                              const T* opacities, const T* colors, const T* background, const int64_t* ids,
                              const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                              int tile_size, const int64_t* pixel_offsets, int32_t* slot_counts,
                              int64_t* pair_offsets, int32_t* e_pix, T* e_w, T* e_a, T* e_dc, int32_t* pix_entries,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int64_t C = cameras_of(num_tiles, tiles_x, tiles_y, tile_size, width, height);
    if (C < 0 || V < 0 || V > INT_MAX || M < 0 || M > INT_MAX || E < 0 || E > INT_MAX) return cudaErrorInvalidValue;
    if (M > 0 && V == 0) return cudaErrorInvalidValue;  // slots without pairs
    const FillLayout layout(M, V);
    if (layout.total > workspace_bytes) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(workspace);
    uint32_t* keys_in = reinterpret_cast<uint32_t*>(base + layout.keys_in);
    uint32_t* keys_out = reinterpret_cast<uint32_t*>(base + layout.keys_out);
    int32_t* slots_in = reinterpret_cast<int32_t*>(base + layout.slots_in);
    int32_t* slots_out = reinterpret_cast<int32_t*>(base + layout.slots_out);
    int64_t* totals = reinterpret_cast<int64_t*>(base + layout.totals);
    int64_t* starts = reinterpret_cast<int64_t*>(base + layout.starts);
    void* cub_temp = base + layout.cub_temp;
    const int chunks = build_chunks(tile_size);
    cudaError_t status;
    if (M > 0) {
        slot_keys_kernel<<<blocks_for(M), kThreads, 0, stream>>>(M, ids, keys_in, slots_in);
        if ((status = cudaGetLastError()) != cudaSuccess) return status;
        // Stable: the slots of one pair keep their list order (= tile order).
        size_t bytes = 0;
        const int bits = key_bits(V);
        status = cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, slots_in, slots_out, (int)M, 0,
                                                 bits, stream);
        if (status != cudaSuccess) return status;
        if (bytes > layout.cub_bytes) return cudaErrorInvalidValue;
        status = cub::DeviceRadixSort::SortPairs(cub_temp, bytes, keys_in, keys_out, slots_in, slots_out, (int)M, 0,
                                                 bits, stream);
        if (status != cudaSuccess) return status;
        slot_totals_kernel<<<blocks_for(M), kThreads, 0, stream>>>(M, chunks, slot_counts, slots_out, totals);
        if ((status = cudaGetLastError()) != cudaSuccess) return status;
        bytes = 0;
        status = cub::DeviceScan::ExclusiveSum(nullptr, bytes, totals, starts, (int)M, stream);
        if (status != cudaSuccess) return status;
        if (bytes > layout.cub_bytes) return cudaErrorInvalidValue;
        status = cub::DeviceScan::ExclusiveSum(cub_temp, bytes, totals, starts, (int)M, stream);
        if (status != cudaSuccess) return status;
    }
    slot_bases_kernel<<<blocks_for(M + 1), kThreads, 0, stream>>>(M, V, E, chunks, keys_out, slots_out, starts,
                                                                  slot_counts, pair_offsets);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
    if (E == 0 || num_tiles == 0) return cudaSuccess;
    build_walk_kernel<T, true><<<dim3((unsigned)num_tiles, (unsigned)chunks), build_threads(tile_size), 0, stream>>>(
        M, means2d, conics, opacities, colors, background, ids, tile_offsets, width, height, tiles_x, tiles_y,
        tile_size, nullptr, nullptr, nullptr, pixel_offsets, slot_counts, e_pix, e_w, e_a, e_dc, pix_entries);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cache_jvp(int64_t V, int64_t P, const T* means2d, const T* conics, const T* opacities,
                             const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                             const T* e_dc, const int64_t* pixel_offsets, const int32_t* pix_entries, const T* dq,
                             int width, int height, T* contrib, T* out, cudaStream_t stream) {
    if (V < 0 || P < 0 || width <= 0 || height <= 0) return cudaErrorInvalidValue;
    const int64_t HW = (int64_t)width * height;
    if (V > 0) {
        jvp_entries_kernel<T><<<warp_blocks(V), kThreads, 0, stream>>>(V, means2d, conics, opacities, pair_offsets,
                                                                       e_pix, e_w, e_a, e_dc, dq, width, HW, contrib);
        const cudaError_t status = cudaGetLastError();
        if (status != cudaSuccess) return status;
    }
    if (P > 0)
        jvp_pixels_kernel<T><<<blocks_for(P), kThreads, 0, stream>>>(P, pixel_offsets, pix_entries, contrib, out);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cache_vjp(int64_t V, const T* means2d, const T* conics, const T* opacities,
                             const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                             const T* e_dc, const T* u, int width, int height, T* out, cudaStream_t stream) {
    if (V < 0 || width <= 0 || height <= 0) return cudaErrorInvalidValue;
    if (V == 0) return cudaSuccess;
    vjp_kernel<T><<<warp_blocks(V), kThreads, 0, stream>>>(V, means2d, conics, opacities, pair_offsets, e_pix, e_w,
                                                           e_a, e_dc, u, width, (int64_t)width * height, out);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_hessian_blocks(int64_t V, const T* means2d, const T* conics, const T* opacities,
                                  const int64_t* pair_offsets, const int32_t* e_pix, const T* e_w, const T* e_a,
                                  const T* e_dc, const T* pixel_weights, int width, int height, T* out,
                                  cudaStream_t stream) {
    if (V < 0 || width <= 0 || height <= 0) return cudaErrorInvalidValue;
    if (V == 0) return cudaSuccess;
    hessian_kernel<T><<<warp_blocks(V), kThreads, 0, stream>>>(V, means2d, conics, opacities, pair_offsets, e_pix,
                                                               e_w, e_a, e_dc, pixel_weights, width,
                                                               (int64_t)width * height, out);
    return cudaGetLastError();
}

#define FK_INSTANTIATE(T)                                                                                              \
    template cudaError_t launch_build_count<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*,      \
                                               const T*, const int64_t*, const int64_t*, int, int, int, int, int, T*,  \
                                               int64_t*, int32_t*, void*, size_t, cudaStream_t);                      \
    template cudaError_t launch_build_fill<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*,        \
                                              const T*, const T*, const int64_t*, const int64_t*, int, int, int, int,  \
                                              int, const int64_t*, int32_t*, int64_t*, int32_t*, T*, T*, T*, int32_t*, \
                                              void*, size_t, cudaStream_t);                                            \
    template cudaError_t launch_cache_jvp<T>(int64_t, int64_t, const T*, const T*, const T*, const int64_t*,           \
                                             const int32_t*, const T*, const T*, const T*, const int64_t*,             \
                                             const int32_t*, const T*, int, int, T*, T*, cudaStream_t);                \
    template cudaError_t launch_cache_vjp<T>(int64_t, const T*, const T*, const T*, const int64_t*, const int32_t*,    \
                                             const T*, const T*, const T*, const T*, int, int, T*, cudaStream_t);      \
    template cudaError_t launch_hessian_blocks<T>(int64_t, const T*, const T*, const T*, const int64_t*,               \
                                                  const int32_t*, const T*, const T*, const T*, const T*, int, int,    \
                                                  T*, cudaStream_t);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cuda
}  // namespace lm
}  // namespace fieldkit
