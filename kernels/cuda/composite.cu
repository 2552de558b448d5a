// CUDA compositing forward/backward: one block per (tile, 16x16 pixel square of it), one thread per
// pixel, the tile's Gaussians staged through shared memory in batches of kBatch. The per-pixel,
// per-splat math is kernels/include/fieldkit/composite.h, the same lane-generic functions the CPU
// build (kernels/cpu/composite_cpu.inl) runs with SIMD lanes, here with scalar lanes, called in
// the same order, so the two builds evaluate the same expressions:
//
//   forward (front to back, per pixel): for each splat of the tile's list, skip unless
//     sigma >= 0 and alpha >= 1/255; stop (splat not blended) when T (1 - alpha) <= 1e-4;
//     otherwise acc += alpha T f, T *= 1 - alpha, last = list index.
//     image = acc + T background, alpha = 1 - T; final_T = T and last_index are kept for backward.
//   backward (back to front, per pixel, from its last blended splat): T_i = T_{i+1} / (1 - alpha_i)
//     recovers the transmittance in front of splat i; blend_alpha_vjp gives dL/dalpha_i from
//     g_f = <dL/dimage, f_i>, g_behind (what lies behind i), g_bg = <dL/dimage, background>,
//     dL/d(pixel alpha) and final_T; the gradient is passed through the 0.999 clamp as
//     torch.clamp does; then sigma's VJP gives mean2d and conic gradients.
//     Per splat, the block's contributions are summed over each warp (shuffles) and added to the
//     per-Gaussian gradients with one atomicAdd per warp (so the float result depends on the
//     order of those atomics: not bitwise deterministic, unlike the CPU build).
//
// Tile sizes other than 16 work: a tile is covered by ceil(tile_size / 16)^2 blocks of 16x16
// threads, each walking the whole tile list; threads outside the tile or the image idle (they
// still take part in barriers and warp reductions).
#include <cuda_runtime.h>
#include <stdint.h>

#include "fieldkit/composite.h"
#include "rasterize_cuda.cuh"

namespace fieldkit {
namespace cuda {

namespace {

constexpr int kBlockSide = 16;
constexpr int kBatch = kBlockSide * kBlockSide;  // threads per block = splats per shared-memory batch
constexpr int kLocalChannels = 4;                // forward accumulates up to this many channels in registers
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
    return v;  // complete in lane 0
}

// The pixel this thread handles. grid = (num_tiles, sub-squares per tile side, same).
struct PixelSlot {
    int64_t tile, camera, start, end;  // tile list [start, end) in gaussian_ids
    int64_t pix;                       // (camera * H + y) * W + x, valid when inside
    int x, y;                          // global pixel column / row
    bool inside;                       // inside the tile and the image
};

__device__ __forceinline__ PixelSlot pixel_slot(const int64_t* tile_offsets, int width, int height, int tiles_x,
                                                int tiles_y, int tile_size) {
    PixelSlot s;
    s.tile = blockIdx.x;
    const int64_t per_cam = (int64_t)tiles_x * tiles_y;
    s.camera = s.tile / per_cam;
    const int64_t local = s.tile % per_cam;
    const int lx = (int)blockIdx.z * kBlockSide + (int)threadIdx.x;  // pixel within the tile
    const int ly = (int)blockIdx.y * kBlockSide + (int)threadIdx.y;
    s.x = (int)(local % tiles_x) * tile_size + lx;
    s.y = (int)(local / tiles_x) * tile_size + ly;
    s.inside = lx < tile_size && ly < tile_size && s.x < width && s.y < height;
    s.pix = (s.camera * height + s.y) * (int64_t)width + s.x;
    s.start = tile_offsets[s.tile];
    s.end = tile_offsets[s.tile + 1];
    return s;
}

template <typename T>
struct SplatBatch {
    int64_t id[kBatch];
    T mx[kBatch], my[kBatch], ca[kBatch], cb[kBatch], cc[kBatch], op[kBatch];
};

template <typename T>
__device__ __forceinline__ void stage_splat(SplatBatch<T>& batch, int slot, int64_t g, const T* means2d,
                                            const T* conics, const T* opacities) {
    batch.id[slot] = g;
    batch.mx[slot] = means2d[2 * g];
    batch.my[slot] = means2d[2 * g + 1];
    batch.ca[slot] = conics[3 * g];
    batch.cb[slot] = conics[3 * g + 1];
    batch.cc[slot] = conics[3 * g + 2];
    batch.op[slot] = opacities[g];
}

// DC > 0: the channel count is a compile-time constant (loops unroll, dL/dimage stays in registers);
// DC == 0: any channel count, read from D_runtime.
template <typename T, int DC>
__global__ void __launch_bounds__(kBatch)
    composite_forward_kernel(int64_t D_runtime, const T* __restrict__ means2d, const T* __restrict__ conics,
                             const T* __restrict__ opacities, const T* __restrict__ features,
                             const T* __restrict__ background, const int64_t* __restrict__ gaussian_ids,
                             const int64_t* __restrict__ tile_offsets, int width, int height, int tiles_x, int tiles_y,
                             int tile_size, T* __restrict__ image, T* __restrict__ alpha_out, T* __restrict__ final_T,
                             int64_t* __restrict__ last_index) {
    __shared__ SplatBatch<T> batch;
    const int64_t D = DC > 0 ? DC : D_runtime;
    const PixelSlot s = pixel_slot(tile_offsets, width, height, tiles_x, tiles_y, tile_size);
    const int tid = threadIdx.y * kBlockSide + threadIdx.x;
    // Pixel centre (x + 0.5, y + 0.5): exact in float for any realistic image size.
    const T px = T(s.x) + T(0.5), py = T(s.y) + T(0.5);
    const bool local_acc = D <= kLocalChannels;  // else accumulate straight into the image row
    T acc[kLocalChannels];
#pragma unroll
    for (int d = 0; d < kLocalChannels; ++d) acc[d] = T(0);
    T* out = image + s.pix * D;
    if (s.inside && !local_acc)
        for (int64_t d = 0; d < D; ++d) out[d] = T(0);
    T trans = T(1);
    int64_t last = -1;
    bool done = !s.inside;

    for (int64_t b0 = s.start; b0 < s.end; b0 += kBatch) {
        // Barrier: the previous batch is consumed; stop when every pixel of the block is finished.
        if (__syncthreads_count(done) == kBatch) break;
        if (b0 + tid < s.end) stage_splat(batch, tid, gaussian_ids[b0 + tid], means2d, conics, opacities);
        __syncthreads();
        const int count = (int)(s.end - b0 < kBatch ? s.end - b0 : kBatch);
        for (int j = 0; j < count && !done; ++j) {
            T dx, dy, vis, alpha_raw, alpha;
            if (!splat_alpha(batch.mx[j], batch.my[j], batch.ca[j], batch.cb[j], batch.cc[j], batch.op[j], px, py, &dx,
                             &dy, &vis, &alpha_raw, &alpha))
                continue;
            const T next_T = trans * (T(1) - alpha);
            if (transmittance_exhausted(next_T)) {
                done = true;  // this splat is not blended; the pixel is finished
                break;
            }
            const T w = alpha * trans;
            const T* f = features + batch.id[j] * D;
            if (local_acc) {
#pragma unroll
                for (int d = 0; d < kLocalChannels; ++d)
                    if (d < D) acc[d] = acc[d] + w * f[d];
            } else {
                for (int64_t d = 0; d < D; ++d) out[d] = out[d] + w * f[d];
            }
            trans = next_T;
            last = b0 + j;
        }
    }
    if (!s.inside) return;
    const T* bg = background + s.camera * D;
    if (local_acc) {
#pragma unroll
        for (int d = 0; d < kLocalChannels; ++d)
            if (d < D) out[d] = acc[d] + trans * bg[d];
    } else {
        for (int64_t d = 0; d < D; ++d) out[d] = out[d] + trans * bg[d];
    }
    alpha_out[s.pix] = T(1) - trans;
    final_T[s.pix] = trans;
    last_index[s.pix] = last;
}

template <typename T, int DC>
__global__ void __launch_bounds__(kBatch)
    composite_backward_kernel(int64_t D_runtime, const T* __restrict__ means2d, const T* __restrict__ conics,
                              const T* __restrict__ opacities, const T* __restrict__ features,
                              const T* __restrict__ background, const int64_t* __restrict__ gaussian_ids,
                              const int64_t* __restrict__ tile_offsets, int width, int height, int tiles_x,
                              int tiles_y, int tile_size, const T* __restrict__ final_T,
                              const int64_t* __restrict__ last_index, const T* __restrict__ v_image,
                              const T* __restrict__ v_alpha, T* __restrict__ v_means2d, T* __restrict__ v_conics,
                              T* __restrict__ v_opacities, T* __restrict__ v_features) {
    __shared__ SplatBatch<T> batch;
    __shared__ long long block_last;  // largest tile-local last index over the block's pixels
    const int64_t D = DC > 0 ? DC : D_runtime;
    const PixelSlot s = pixel_slot(tile_offsets, width, height, tiles_x, tiles_y, tile_size);
    const int tid = threadIdx.y * kBlockSide + threadIdx.x;
    const bool lane0 = (tid & 31) == 0;
    const T px = T(s.x) + T(0.5), py = T(s.y) + T(0.5);

    // Per-pixel state, as in the CPU build.
    long long li = -1;  // tile-local index of the last splat blended into this pixel
    T trans = T(1), t_final = T(1), va = T(0), g_bg = T(0), g_behind = T(0);
    const T* gi = v_image + s.pix * D;  // dL/dimage of this pixel (read only when inside)
    if (s.inside) {
        const int64_t last = last_index[s.pix];
        li = last >= s.start ? (long long)(last - s.start) : -1;
        trans = t_final = final_T[s.pix];
        va = v_alpha[s.pix];
        const T* bg = background + s.camera * D;
        for (int64_t d = 0; d < D; ++d) g_bg = g_bg + gi[d] * bg[d];
    }
    T gv[DC > 0 ? DC : 1];  // dL/dimage of this pixel in registers (compile-time channel count only)
#pragma unroll
    for (int d = 0; d < (DC > 0 ? DC : 1); ++d) gv[d] = (DC > 0 && s.inside) ? gi[d] : T(0);
    if (tid == 0) block_last = -1;
    __syncthreads();
    if (li >= 0) atomicMax(&block_last, li);
    __syncthreads();
    const int64_t n_entries = (int64_t)block_last + 1;  // the block walks list entries [0, n_entries) backwards

    for (int64_t b0 = 0; b0 < n_entries; b0 += kBatch) {
        __syncthreads();  // the previous batch is consumed
        const int64_t top = n_entries - 1 - b0;  // tile-local index of slot 0 of this batch
        if (top - tid >= 0) stage_splat(batch, tid, gaussian_ids[s.start + top - tid], means2d, conics, opacities);
        __syncthreads();
        const int count = (int)(n_entries - b0 < kBatch ? n_entries - b0 : kBatch);
        for (int j = 0; j < count; ++j) {  // uniform over the block: every lane reaches the shuffles
            const int64_t l = top - j;
            T dx = T(0), dy = T(0), vis = T(0), alpha_raw = T(0), alpha = T(0);
            bool ok = false;
            if (s.inside && l <= li)
                ok = splat_alpha(batch.mx[j], batch.my[j], batch.ca[j], batch.cb[j], batch.cc[j], batch.op[j], px, py,
                                 &dx, &dy, &vis, &alpha_raw, &alpha);
            if (!__any_sync(kFullMask, ok)) continue;  // warp-uniform
            const int64_t g = batch.id[j];
            const T* f = features + g * D;
            T w = T(0), dmx = T(0), dmy = T(0), dca = T(0), dcb = T(0), dcc = T(0), dop = T(0);
            if (ok) {
                const T T_i = trans / (T(1) - alpha);
                T g_f = T(0);
#pragma unroll
                for (int64_t d = 0; d < D; ++d) g_f = g_f + (DC > 0 ? gv[d] : gi[d]) * f[d];
                const T v_al = blend_alpha_vjp(alpha, T_i, g_f, g_behind, g_bg, va, t_final);
                w = alpha * T_i;
                const T v_eff = alpha_unclamped(alpha_raw) ? v_al : T(0);
                splat_sigma_vjp(-v_eff * batch.op[j] * vis, dx, dy, batch.ca[j], batch.cb[j], batch.cc[j], &dmx, &dmy,
                                &dca, &dcb, &dcc);
                dop = v_eff * vis;
                g_behind = g_behind + w * g_f;
                trans = T_i;
            }
            dmx = warp_sum(dmx);
            dmy = warp_sum(dmy);
            dca = warp_sum(dca);
            dcb = warp_sum(dcb);
            dcc = warp_sum(dcc);
            dop = warp_sum(dop);
            if (lane0) {
                atomicAdd(v_means2d + 2 * g, dmx);
                atomicAdd(v_means2d + 2 * g + 1, dmy);
                atomicAdd(v_conics + 3 * g, dca);
                atomicAdd(v_conics + 3 * g + 1, dcb);
                atomicAdd(v_conics + 3 * g + 2, dcc);
                atomicAdd(v_opacities + g, dop);
            }
#pragma unroll
            for (int64_t d = 0; d < D; ++d) {
                const T vf = warp_sum(ok ? w * (DC > 0 ? gv[d] : gi[d]) : T(0));
                if (lane0) atomicAdd(v_features + g * D + d, vf);
            }
        }
    }
}

inline dim3 grid_for(int64_t num_tiles, int tile_size) {
    const unsigned sub = (unsigned)((tile_size + kBlockSide - 1) / kBlockSide);
    return dim3((unsigned)num_tiles, sub, sub);
}

inline bool bad_geometry(int64_t num_tiles, int tile_size) {
    return num_tiles > 0x7fffffffLL || tile_size <= 0 || (tile_size + kBlockSide - 1) / kBlockSide > 65535;
}

}  // namespace

template <typename T>
cudaError_t launch_composite_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                                     const T* opacities, const T* features, const T* background,
                                     const int64_t* gaussian_ids, const int64_t* tile_offsets, int width, int height,
                                     int tiles_x, int tiles_y, int tile_size, T* image, T* alpha, T* final_T,
                                     int64_t* last_index, cudaStream_t stream) {
    (void)N;
    const int64_t num_tiles = C * (int64_t)tiles_x * tiles_y;
    if (num_tiles <= 0 || width <= 0 || height <= 0) return cudaSuccess;
    if (bad_geometry(num_tiles, tile_size)) return cudaErrorInvalidValue;
#define FK_LAUNCH(DC)                                                                                          \
    composite_forward_kernel<T, DC><<<grid_for(num_tiles, tile_size), dim3(kBlockSide, kBlockSide), 0, stream>>>( \
        D, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, width, height, tiles_x,     \
        tiles_y, tile_size, image, alpha, final_T, last_index)
    if (D == 3) FK_LAUNCH(3);
    else if (D == 4) FK_LAUNCH(4);
    else FK_LAUNCH(0);
#undef FK_LAUNCH
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_composite_backward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                                      const T* opacities, const T* features, const T* background,
                                      const int64_t* gaussian_ids, const int64_t* tile_offsets, int width,
                                      int height, int tiles_x, int tiles_y, int tile_size, const T* final_T,
                                      const int64_t* last_index, const T* v_image, const T* v_alpha, T* v_means2d,
                                      T* v_conics, T* v_opacities, T* v_features, cudaStream_t stream) {
    (void)N;
    const int64_t num_tiles = C * (int64_t)tiles_x * tiles_y;
    if (num_tiles <= 0 || width <= 0 || height <= 0) return cudaSuccess;
    if (bad_geometry(num_tiles, tile_size)) return cudaErrorInvalidValue;
#define FK_LAUNCH(DC)                                                                                           \
    composite_backward_kernel<T, DC><<<grid_for(num_tiles, tile_size), dim3(kBlockSide, kBlockSide), 0, stream>>>( \
        D, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets, width, height, tiles_x,      \
        tiles_y, tile_size, final_T, last_index, v_image, v_alpha, v_means2d, v_conics, v_opacities, v_features)
    if (D == 3) FK_LAUNCH(3);
    else if (D == 4) FK_LAUNCH(4);
    else FK_LAUNCH(0);
#undef FK_LAUNCH
    return cudaGetLastError();
}

#define FK_INSTANTIATE(T)                                                                                              \
    template cudaError_t launch_composite_forward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*,          \
                                                     const T*, const T*, const int64_t*, const int64_t*, int, int,     \
                                                     int, int, int, T*, T*, T*, int64_t*, cudaStream_t);               \
    template cudaError_t launch_composite_backward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*,         \
                                                      const T*, const T*, const int64_t*, const int64_t*, int, int,    \
                                                      int, int, int, const T*, const int64_t*, const T*, const T*, T*, \
                                                      T*, T*, T*, cudaStream_t);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cuda
}  // namespace fieldkit
