// CUDA tile binning: the lists of fieldkit/render/tiles.py::intersect_tiles, element for element.
//
// What the reference computes. Entries (one per (flat id, overlapped tile)) are emitted in
// increasing flat id; then a stable sort by depth, then a stable sort by tile. Within a tile the
// result is therefore ordered by (depth, flat id): by depth, ties (equal depths, per torch's
// comparison) in increasing flat id. A Gaussian appears at most once per tile.
//
// How it is reproduced here:
//   1. count: tiles per (camera, Gaussian), with the reference's float arithmetic for the tile
//      rectangle; CUB inclusive scan -> the write position of each Gaussian's first entry.
//   2. emit: entry e of flat id g goes to position cum[g] - count[g] + k, so the entries are laid
//      out in increasing flat id, exactly the reference's input order.
//   3. sort (float32 depths): one 64-bit key per entry, key = tile << 32 | depth_key(depth), with
//      the flat id as the value, sorted by cub::DeviceRadixSort::SortPairs over the bits in use.
//      CUB's radix sort is stable, so equal keys keep their input order (increasing flat id).
//      Sorting by this key orders by tile, then by depth_key, then by flat id: the reference's
//      order, because depth_key is strictly monotonic in the float order and equal exactly when
//      torch's comparison says equal:
//        - finite and infinite values: the sign-magnitude bit pattern made monotonic (non-negative:
//          set the sign bit; negative: flip all bits), so negative depths (near_plane < 0) work;
//        - -0.0 is mapped to +0.0 (torch treats them as equal: a tie, decided by id);
//        - every NaN gets the largest key (torch.sort puts NaN last, all NaNs tied).
//      The tile index is C * tiles_y * tiles_x < 2^32, so the tile fits in the high 32 bits.
//   3'. sort (float64 depths): a double needs all 64 bits, so the reference's two passes are done
//      literally: stable sort of (depth_key64, entry index), gather tile and id through that
//      permutation, then a stable sort of (tile, id) over the tile bits.
//   4. offsets: tile_offsets[t] = first sorted position whose tile is >= t (M past the end).
// The tests check all of this against the reference on the GPU; test_backend_cuda.py also checks
// the key construction itself (a NumPy model of steps 2-3) on any machine.
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "rasterize_cuda.cuh"

namespace fieldkit {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

inline size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

inline unsigned blocks_for(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

__device__ __forceinline__ float fk_floor(float x) { return floorf(x); }
__device__ __forceinline__ double fk_floor(double x) { return floor(x); }
__device__ __forceinline__ float fk_ceil_(float x) { return ceilf(x); }
__device__ __forceinline__ double fk_ceil_(double x) { return ceil(x); }

// Half-open tile rectangle [x0,x1) x [y0,y1) of a splat's box, clamped to the grid, with the same
// operations as tiles.py::tile_ranges (and kernels/cpu/rasterize_cpu.cpp::tile_rect). Empty for
// culled splats (radius_x <= 0); a NaN bound clamps to 0.
template <typename T>
__device__ __forceinline__ void tile_rect(const T* mean2d, const int32_t* radius, int tiles_x, int tiles_y,
                                          int tile_size, int64_t* x0, int64_t* x1, int64_t* y0, int64_t* y1) {
    const T ts = T(tile_size), rx = T(radius[0]), ry = T(radius[1]);
    auto clamp_to = [](T v, int hi) -> int64_t {
        return v == v ? int64_t(v < T(0) ? T(0) : (v > T(hi) ? T(hi) : v)) : int64_t(0);
    };
    *x0 = clamp_to(fk_floor((mean2d[0] - rx) / ts), tiles_x);
    *x1 = clamp_to(fk_ceil_((mean2d[0] + rx) / ts), tiles_x);
    *y0 = clamp_to(fk_floor((mean2d[1] - ry) / ts), tiles_y);
    *y1 = clamp_to(fk_ceil_((mean2d[1] + ry) / ts), tiles_y);
    if (radius[0] <= 0) *x1 = *x0;  // not visible
}

template <typename T>
__device__ __forceinline__ int64_t tile_count(const T* mean2d, const int32_t* radius, int tiles_x, int tiles_y,
                                              int tile_size) {
    int64_t x0, x1, y0, y1;
    tile_rect(mean2d, radius, tiles_x, tiles_y, tile_size, &x0, &x1, &y0, &y1);
    const int64_t w = x1 > x0 ? x1 - x0 : 0, h = y1 > y0 ? y1 - y0 : 0;
    return w * h;
}

// Order-preserving unsigned keys of depths (see the top of the file).
__device__ __forceinline__ uint64_t depth_key(float d) {
    if (d != d) return 0xffffffffull;  // NaN: last
    if (d == 0.0f) d = 0.0f;           // -0 -> +0
    const uint32_t u = (uint32_t)__float_as_int(d);
    return (uint64_t)((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}
__device__ __forceinline__ uint64_t depth_key(double d) {
    if (d != d) return 0xffffffffffffffffull;
    if (d == 0.0) d = 0.0;
    const uint64_t u = (uint64_t)__double_as_longlong(d);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

template <typename T>
__global__ void count_kernel(int64_t CN, const T* __restrict__ means2d, const int32_t* __restrict__ radii, int tiles_x,
                             int tiles_y, int tile_size, int64_t* __restrict__ counts) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= CN) return;
    counts[idx] = tile_count(means2d + 2 * idx, radii + 2 * idx, tiles_x, tiles_y, tile_size);
}

// One thread per flat id; its entries go to [cum[idx] - count, cum[idx]), tiles row-major.
// kCombined (float): key = tile << 32 | depth key, value = flat id.
// otherwise (double): key = depth key, tile and flat id stored separately, value = entry index.
template <typename T, bool kCombined>
__global__ void emit_kernel(int64_t CN, int64_t N, const T* __restrict__ means2d, const int32_t* __restrict__ radii,
                            const T* __restrict__ depths, int tiles_x, int tiles_y, int tile_size,
                            const int64_t* __restrict__ cum_counts, uint64_t* __restrict__ keys,
                            int64_t* __restrict__ values, uint64_t* __restrict__ tiles, int64_t* __restrict__ ids) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= CN) return;
    int64_t x0, x1, y0, y1;
    tile_rect(means2d + 2 * idx, radii + 2 * idx, tiles_x, tiles_y, tile_size, &x0, &x1, &y0, &y1);
    if (x1 <= x0 || y1 <= y0) return;
    const int64_t count = (x1 - x0) * (y1 - y0);
    int64_t e = cum_counts[idx] - count;
    const uint64_t dkey = depth_key(depths[idx]);
    const int64_t base = (idx / N) * (int64_t)tiles_x * tiles_y;
    for (int64_t ty = y0; ty < y1; ++ty) {
        for (int64_t tx = x0; tx < x1; ++tx, ++e) {
            const uint64_t tile = (uint64_t)(base + ty * tiles_x + tx);
            if (kCombined) {
                keys[e] = (tile << 32) | dkey;
                values[e] = idx;
            } else {
                keys[e] = dkey;
                values[e] = e;
                tiles[e] = tile;
                ids[e] = idx;
            }
        }
    }
}

// tiles_out[i] = tiles[perm[i]], ids_out[i] = ids[perm[i]].
__global__ void gather_kernel(int64_t M, const int64_t* __restrict__ perm, const uint64_t* __restrict__ tiles,
                              const int64_t* __restrict__ ids, uint64_t* __restrict__ tiles_out,
                              int64_t* __restrict__ ids_out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M) return;
    const int64_t p = perm[i];
    tiles_out[i] = tiles[p];
    ids_out[i] = ids[p];
}

// sorted tile of entry i = sorted_keys[i] >> shift. Thread i in [0, M] writes offsets[t] for the
// tiles t in (tile of i-1, tile of i] (thread M: up to num_tiles), each t exactly once.
__global__ void offsets_kernel(int64_t M, int64_t num_tiles, const uint64_t* __restrict__ sorted_keys, int shift,
                               int64_t* __restrict__ offsets) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i > M) return;
    const int64_t prev = i == 0 ? -1 : (int64_t)(sorted_keys[i - 1] >> shift);
    const int64_t cur = i == M ? num_tiles : (int64_t)(sorted_keys[i] >> shift);
    for (int64_t t = prev + 1; t <= cur; ++t) offsets[t] = i;
}

// cub::DeviceRadixSort::SortPairs on (uint64 key, int64 value) with its temp storage checked: the
// size is queried with the exact arguments of the call (it depends on the item count and the bit
// range) and the call fails cleanly when the caller's buffer is too small.
cudaError_t sort_pairs(void* temp, size_t temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                       const int64_t* values_in, int64_t* values_out, int64_t M, int end_bit, cudaStream_t stream) {
    size_t needed = 0;
    cudaError_t status = cub::DeviceRadixSort::SortPairs(nullptr, needed, keys_in, keys_out, values_in, values_out,
                                                         (int)M, 0, end_bit, stream);
    if (status != cudaSuccess) return status;
    if (needed > temp_bytes) return cudaErrorInvalidValue;
    return cub::DeviceRadixSort::SortPairs(temp, needed, keys_in, keys_out, values_in, values_out, (int)M, 0, end_bit,
                                           stream);
}

size_t sort_pairs_bytes(int64_t M, int end_bit) {
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const uint64_t*)nullptr, (uint64_t*)nullptr,
                                    (const int64_t*)nullptr, (int64_t*)nullptr, (int)M, 0, end_bit, (cudaStream_t)0);
    return bytes;
}

int tile_bits_for(int64_t num_tiles) {  // bits needed for tile indices 0 .. num_tiles - 1 (at least 1)
    int bits = 1;
    while (bits < 64 && ((uint64_t)(num_tiles - 1) >> bits) != 0) ++bits;
    return bits;
}

// Workspace layout of launch_intersect_fill: M-long arrays of 8-byte elements, 256-B aligned,
// then CUB's temp storage (enough for every sort the dtype's path runs).
template <typename T>
struct FillLayout {
    static constexpr bool kCombined = sizeof(T) == 4;  // float32: one sort on a combined key
    size_t keys_in = 0, keys_out = 0, values_in = 0, values_out = 0, tiles = 0, ids = 0, cub_temp = 0;
    size_t cub_bytes = 0, total = 0;
    FillLayout(int64_t M, int64_t num_tiles) {
        const size_t array = align_up(sizeof(uint64_t) * (size_t)(M > 0 ? M : 1));
        const int tile_bits = tile_bits_for(num_tiles);
        if (kCombined) {
            cub_bytes = sort_pairs_bytes(M, 32 + tile_bits);
        } else {
            const size_t a = sort_pairs_bytes(M, 64), b = sort_pairs_bytes(M, tile_bits);
            cub_bytes = a > b ? a : b;
        }
        size_t offset = 0;
        keys_in = offset, offset += array;
        keys_out = offset, offset += array;
        values_in = offset, offset += array;
        if (!kCombined) {  // float64 only: permutation, and the tile and id of each entry
            values_out = offset, offset += array;
            tiles = offset, offset += array;
            ids = offset, offset += array;
        }
        cub_temp = offset, offset += align_up(cub_bytes > 0 ? cub_bytes : 1);
        total = offset;
    }
};

}  // namespace

size_t intersect_count_workspace_bytes(int64_t C, int64_t N) {
    const int64_t CN = C * N;
    size_t bytes = 0;
    if (CN > 0 && CN <= INT_MAX)
        cub::DeviceScan::InclusiveSum(nullptr, bytes, (const int64_t*)nullptr, (int64_t*)nullptr, (int)CN,
                                      (cudaStream_t)0);
    return align_up(bytes > 0 ? bytes : 1);
}

template <typename T>
cudaError_t launch_intersect_count(int64_t C, int64_t N, const T* means2d, const int32_t* radii, int tiles_x,
                                   int tiles_y, int tile_size, int64_t* counts, int64_t* cum_counts,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    const int64_t CN = C * N;
    if (CN <= 0) return cudaSuccess;
    if (CN > INT_MAX || (uint64_t)C * tiles_x * tiles_y >= (1ull << 32)) return cudaErrorInvalidValue;
    count_kernel<T><<<blocks_for(CN), kThreads, 0, stream>>>(CN, means2d, radii, tiles_x, tiles_y, tile_size, counts);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    size_t bytes = 0;
    status = cub::DeviceScan::InclusiveSum(nullptr, bytes, counts, cum_counts, (int)CN, stream);
    if (status != cudaSuccess) return status;
    if (bytes > workspace_bytes) return cudaErrorInvalidValue;
    return cub::DeviceScan::InclusiveSum(workspace, bytes, counts, cum_counts, (int)CN, stream);
}

template <typename T>
size_t intersect_fill_workspace_bytes(int64_t M, int64_t num_tiles) {
    if (M <= 0) return kAlign;
    if (M > INT_MAX) return 0;
    return FillLayout<T>(M, num_tiles).total;
}

template <typename T>
cudaError_t launch_intersect_fill(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths,
                                  int tiles_x, int tiles_y, int tile_size, const int64_t* cum_counts, int64_t M,
                                  int64_t* gaussian_ids, int64_t* tile_offsets, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
    const int64_t CN = C * N;
    const int64_t num_tiles = C * (int64_t)tiles_x * tiles_y;
    if (M > INT_MAX || CN > INT_MAX || (uint64_t)num_tiles >= (1ull << 32)) return cudaErrorInvalidValue;
    if (M <= 0) {  // no intersections: every offset is 0
        offsets_kernel<<<1, 1, 0, stream>>>(0, num_tiles, nullptr, 0, tile_offsets);
        return cudaGetLastError();
    }
    const FillLayout<T> layout(M, num_tiles);
    if (layout.total > workspace_bytes) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(workspace);
    uint64_t* keys_in = reinterpret_cast<uint64_t*>(base + layout.keys_in);
    uint64_t* keys_out = reinterpret_cast<uint64_t*>(base + layout.keys_out);
    int64_t* values_in = reinterpret_cast<int64_t*>(base + layout.values_in);
    void* cub_temp = base + layout.cub_temp;
    const int tile_bits = tile_bits_for(num_tiles);
    cudaError_t status;

    if constexpr (FillLayout<T>::kCombined) {
        // float32: key = tile << 32 | depth key, value = flat id; one stable sort.
        emit_kernel<T, true><<<blocks_for(CN), kThreads, 0, stream>>>(CN, N, means2d, radii, depths, tiles_x, tiles_y,
                                                                      tile_size, cum_counts, keys_in, values_in,
                                                                      nullptr, nullptr);
        if ((status = cudaGetLastError()) != cudaSuccess) return status;
        status = sort_pairs(cub_temp, layout.cub_bytes, keys_in, keys_out, values_in, gaussian_ids, M, 32 + tile_bits,
                            stream);
        if (status != cudaSuccess) return status;
        offsets_kernel<<<blocks_for(M + 1), kThreads, 0, stream>>>(M, num_tiles, keys_out, 32, tile_offsets);
        return cudaGetLastError();
    } else {
        // float64: stable sort by the 64-bit depth key (value: entry index), gather tile and id in
        // that order, then stable sort by tile (value: flat id).
        int64_t* perm = reinterpret_cast<int64_t*>(base + layout.values_out);
        uint64_t* tiles = reinterpret_cast<uint64_t*>(base + layout.tiles);
        int64_t* ids = reinterpret_cast<int64_t*>(base + layout.ids);
        emit_kernel<T, false><<<blocks_for(CN), kThreads, 0, stream>>>(CN, N, means2d, radii, depths, tiles_x,
                                                                       tiles_y, tile_size, cum_counts, keys_in,
                                                                       values_in, tiles, ids);
        if ((status = cudaGetLastError()) != cudaSuccess) return status;
        status = sort_pairs(cub_temp, layout.cub_bytes, keys_in, keys_out, values_in, perm, M, 64, stream);
        if (status != cudaSuccess) return status;
        // keys_in / values_in are free again: they receive the tiles and ids in depth order.
        gather_kernel<<<blocks_for(M), kThreads, 0, stream>>>(M, perm, tiles, ids, keys_in, values_in);
        if ((status = cudaGetLastError()) != cudaSuccess) return status;
        status = sort_pairs(cub_temp, layout.cub_bytes, keys_in, keys_out, values_in, gaussian_ids, M, tile_bits,
                            stream);
        if (status != cudaSuccess) return status;
        offsets_kernel<<<blocks_for(M + 1), kThreads, 0, stream>>>(M, num_tiles, keys_out, 0, tile_offsets);
        return cudaGetLastError();
    }
}

#define FK_INSTANTIATE(T)                                                                                              \
    template cudaError_t launch_intersect_count<T>(int64_t, int64_t, const T*, const int32_t*, int, int, int,          \
                                                   int64_t*, int64_t*, void*, size_t, cudaStream_t);                   \
    template size_t intersect_fill_workspace_bytes<T>(int64_t, int64_t);                                                        \
    template cudaError_t launch_intersect_fill<T>(int64_t, int64_t, const T*, const int32_t*, const T*, int, int, int, \
                                                  const int64_t*, int64_t, int64_t*, int64_t*, void*, size_t,          \
                                                  cudaStream_t);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cuda
}  // namespace fieldkit
