// CPU (C++/OpenMP) implementation of the rasterizer's differentiable stages.
// The math lives in kernels/include/fieldkit/*.h, shared with the CUDA build; this file only
// schedules it over (camera, Gaussian) pairs and over tiles.
#include "rasterize_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fieldkit/composite.h"
#include "fieldkit/projection.h"

namespace fieldkit {
namespace cpu {

// Projection is cheap next to compositing, so it runs in double whatever the storage type:
// the result is then as close as possible to the exact function the float32 reference rounds.
using ProjT = double;

inline int resolve_threads(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

// =============================================================================================
// Projection
// =============================================================================================
template <typename T>
void project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales, const T* viewmats, const T* Ks,
                     int width, int height, double eps2d, double near_plane, double far_plane, T* means2d, T* conics,
                     T* depths, int32_t* radii, int num_threads) {
    const int nt = resolve_threads(num_threads);
    std::vector<PinholeCamera<ProjT>> cams(C);
    for (int64_t c = 0; c < C; ++c) cams[c] = make_pinhole_camera<ProjT>(viewmats + 16 * c, Ks + 9 * c, width, height);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t idx = 0; idx < C * N; ++idx) {
        const int64_t c = idx / N, n = idx % N;
        const Vec3<ProjT> mean = load_vec3<ProjT>(means + 3 * n);
        const ProjT q[4] = {ProjT(quats[4 * n]), ProjT(quats[4 * n + 1]), ProjT(quats[4 * n + 2]), ProjT(quats[4 * n + 3])};
        const ProjT s[3] = {ProjT(scales[3 * n]), ProjT(scales[3 * n + 1]), ProjT(scales[3 * n + 2])};
        ProjectedGaussian<ProjT> out;
        project_gaussian(cams[c], mean, q, s, ProjT(eps2d), ProjT(near_plane), ProjT(far_plane), &out);
        means2d[2 * idx] = T(out.mean2d[0]);
        means2d[2 * idx + 1] = T(out.mean2d[1]);
        conics[3 * idx] = T(out.conic[0]);
        conics[3 * idx + 1] = T(out.conic[1]);
        conics[3 * idx + 2] = T(out.conic[2]);
        depths[idx] = T(out.depth);
        radii[2 * idx] = out.radius[0];
        radii[2 * idx + 1] = out.radius[1];
    }
}

template <typename T>
void project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales, const T* viewmats,
                      const T* Ks, int width, int height, double eps2d, const int32_t* radii, const T* v_means2d,
                      const T* v_conics, const T* v_depths, T* v_means, T* v_quats, T* v_scales, T* v_viewmats,
                      int num_threads) {
    const int nt = resolve_threads(num_threads);
    std::vector<PinholeCamera<ProjT>> cams(C);
    for (int64_t c = 0; c < C; ++c) cams[c] = make_pinhole_camera<ProjT>(viewmats + 16 * c, Ks + 9 * c, width, height);
    const bool want_pose = v_viewmats != nullptr;
    // Per-(camera, Gaussian) pose partials [C][N][12], summed per camera afterwards.
    std::vector<ProjT> pose_partial(want_pose ? size_t(C * N * 12) : size_t(0), ProjT(0));

#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; ++n) {
        const Vec3<ProjT> mean = load_vec3<ProjT>(means + 3 * n);
        const ProjT q[4] = {ProjT(quats[4 * n]), ProjT(quats[4 * n + 1]), ProjT(quats[4 * n + 2]), ProjT(quats[4 * n + 3])};
        const ProjT s[3] = {ProjT(scales[3 * n]), ProjT(scales[3 * n + 1]), ProjT(scales[3 * n + 2])};
        ProjT gm[3] = {0, 0, 0}, gq[4] = {0, 0, 0, 0}, gs[3] = {0, 0, 0};
        for (int64_t c = 0; c < C; ++c) {
            const int64_t idx = c * N + n;
            if (radii[2 * idx] <= 0 && radii[2 * idx + 1] <= 0) continue;  // culled: zero gradient
            const ProjT dmean2d[2] = {ProjT(v_means2d[2 * idx]), ProjT(v_means2d[2 * idx + 1])};
            const ProjT dconic[3] = {ProjT(v_conics[3 * idx]), ProjT(v_conics[3 * idx + 1]), ProjT(v_conics[3 * idx + 2])};
            const ProjT ddepth = ProjT(v_depths[idx]);
            if (dmean2d[0] == 0 && dmean2d[1] == 0 && dconic[0] == 0 && dconic[1] == 0 && dconic[2] == 0 && ddepth == 0)
                continue;
            Vec3<ProjT> dm;
            ProjT dq[4], ds[3];
            Mat3<ProjT> dR;
            Vec3<ProjT> dt;
            project_gaussian_vjp(cams[c], mean, q, s, ProjT(eps2d), dmean2d, dconic, ddepth, &dm, dq, ds,
                                 want_pose ? &dR : nullptr, want_pose ? &dt : nullptr);
            gm[0] += dm.x;
            gm[1] += dm.y;
            gm[2] += dm.z;
            for (int k = 0; k < 4; ++k) gq[k] += dq[k];
            for (int k = 0; k < 3; ++k) gs[k] += ds[k];
            if (want_pose) {
                ProjT* out = pose_partial.data() + 12 * idx;
                for (int i = 0; i < 3; ++i)
                    for (int j = 0; j < 3; ++j) out[3 * i + j] = dR.m[i][j];
                out[9] = dt.x;
                out[10] = dt.y;
                out[11] = dt.z;
            }
        }
        for (int k = 0; k < 3; ++k) v_means[3 * n + k] = T(gm[k]);
        for (int k = 0; k < 4; ++k) v_quats[4 * n + k] = T(gq[k]);
        for (int k = 0; k < 3; ++k) v_scales[3 * n + k] = T(gs[k]);
    }

    if (want_pose) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t ck = 0; ck < C * 12; ++ck) {
            const int64_t c = ck / 12, k = ck % 12;
            ProjT sum = 0;
            const ProjT* base = pose_partial.data() + c * N * 12 + k;
            for (int64_t n = 0; n < N; ++n) sum += base[12 * n];
            const int row = k < 9 ? int(k / 3) : int(k - 9);
            const int col = k < 9 ? int(k % 3) : 3;
            v_viewmats[16 * c + 4 * row + col] = T(sum);
        }
        for (int64_t c = 0; c < C; ++c)
            for (int j = 0; j < 4; ++j) v_viewmats[16 * c + 12 + j] = T(0);
    }
}

// =============================================================================================
// Tile binning
// =============================================================================================
namespace {

// Half-open tile rectangle [x0,x1) x [y0,y1) of a splat's box, clamped to the grid, computed with
// the same float operations as tiles.py::tile_ranges. Empty for culled splats (radius_x == 0);
// a NaN mean gives an empty range (undefined in the reference).
template <typename T>
inline void tile_rect(const T* mean2d, const int32_t* radius, int tiles_x, int tiles_y, int tile_size, int64_t* x0,
                      int64_t* x1, int64_t* y0, int64_t* y1) {
    const T ts = T(tile_size), rx = T(radius[0]), ry = T(radius[1]);
    auto clamp_to = [](T v, int hi) { return v == v ? int64_t(std::min(std::max(v, T(0)), T(hi))) : int64_t(0); };
    *x0 = clamp_to(std::floor((mean2d[0] - rx) / ts), tiles_x);
    *x1 = clamp_to(std::ceil((mean2d[0] + rx) / ts), tiles_x);
    *y0 = clamp_to(std::floor((mean2d[1] - ry) / ts), tiles_y);
    *y1 = clamp_to(std::ceil((mean2d[1] + ry) / ts), tiles_y);
    if (radius[0] <= 0) *x1 = *x0;  // not visible
}

}  // namespace

// Tile counts of the Gaussians [begin, end) of the flat (camera, Gaussian) range, added to count
// (indexed by flat tile).
template <typename T>
void count_tiles(int64_t begin, int64_t end, int64_t N, const T* means2d, const int32_t* radii, int tiles_x,
                 int tiles_y, int tile_size, int64_t* count) {
    const int64_t per_cam = int64_t(tiles_x) * tiles_y;
    for (int64_t idx = begin; idx < end; ++idx) {
        if (radii[2 * idx] <= 0) continue;
        int64_t x0, x1, y0, y1;
        tile_rect(means2d + 2 * idx, radii + 2 * idx, tiles_x, tiles_y, tile_size, &x0, &x1, &y0, &y1);
        int64_t* row = count + (idx / N) * per_cam;
        for (int64_t ty = y0; ty < y1; ++ty)
            for (int64_t tx = x0; tx < x1; ++tx) ++row[ty * tiles_x + tx];
    }
}

template <typename T>
void intersect_offsets(int64_t C, int64_t N, const T* means2d, const int32_t* radii, int tiles_x, int tiles_y,
                       int tile_size, int64_t* tile_offsets, int num_threads) {
    const int nt = resolve_threads(num_threads);
    const int64_t num_tiles = C * int64_t(tiles_x) * tiles_y;
    std::vector<int64_t> counts(size_t(nt * num_tiles), 0);  // one row of tile counts per thread
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int j = 0; j < nt; ++j)
        count_tiles(C * N * j / nt, C * N * (j + 1) / nt, N, means2d, radii, tiles_x, tiles_y, tile_size,
                    counts.data() + j * num_tiles);
    tile_offsets[0] = 0;
    for (int64_t t = 0; t < num_tiles; ++t) {
        int64_t total = 0;
        for (int j = 0; j < nt; ++j) total += counts[j * num_tiles + t];
        tile_offsets[t + 1] = tile_offsets[t] + total;
    }
}

namespace {

// Sort key of a depth: unsigned integers in the order of the depths, -0 equal to +0, NaN last
// (after +inf), as torch.sort puts it.
inline uint32_t depth_key(float d) {
    if (d != d) return ~uint32_t(0);
    d += 0.0f;  // -0 -> +0
    uint32_t u;
    std::memcpy(&u, &d, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t depth_key(double d) {
    if (d != d) return ~uint64_t(0);
    d += 0.0;
    uint64_t u;
    std::memcpy(&u, &d, 8);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Stable LSD radix sort of (key, id) pairs by key, 8 bits per pass; passes whose digit is the same
// for every key are skipped. Stable, so equal keys keep their input (id) order.
template <typename K>
void radix_sort_pairs(std::vector<K>& keys, std::vector<int64_t>& ids) {
    const size_t n = keys.size();
    std::vector<K> keys_tmp(n);
    std::vector<int64_t> ids_tmp(n);
    for (int shift = 0; shift < int(8 * sizeof(K)); shift += 8) {
        size_t bucket[257] = {0};
        for (size_t i = 0; i < n; ++i) ++bucket[((keys[i] >> shift) & 0xff) + 1];
        if (n == 0 || bucket[((keys[0] >> shift) & 0xff) + 1] == n) continue;  // one digit: nothing moves
        for (int b = 0; b < 256; ++b) bucket[b + 1] += bucket[b];
        for (size_t i = 0; i < n; ++i) {
            const size_t at = bucket[(keys[i] >> shift) & 0xff]++;
            keys_tmp[at] = keys[i];
            ids_tmp[at] = ids[i];
        }
        keys.swap(keys_tmp);
        ids.swap(ids_tmp);
    }
}

}  // namespace

template <typename T>
void intersect_fill(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths, int tiles_x,
                    int tiles_y, int tile_size, const int64_t* tile_offsets, int64_t* gaussian_ids, int num_threads) {
    const int nt = resolve_threads(num_threads);
    const int64_t per_cam = int64_t(tiles_x) * tiles_y;
    // Each camera's visible Gaussians sorted once, front to back (depth, ties by id, NaN last, as
    // torch.sort(stable=True) does); filling the tiles in that order leaves every tile's list
    // sorted, so no per-tile sort is needed.
    using Key = decltype(depth_key(T(0)));
    std::vector<std::vector<int64_t>> order(static_cast<size_t>(C));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c = 0; c < C; ++c) {
        std::vector<Key> keys;
        std::vector<int64_t>& ids = order[c];
        for (int64_t n = 0; n < N; ++n)
            if (radii[2 * (c * N + n)] > 0) {
                keys.push_back(depth_key(depths[c * N + n]));
                ids.push_back(c * N + n);
            }
        radix_sort_pairs(keys, ids);
    }
    // Fill: each camera's sorted list is cut into chunks, one per thread; chunk j writes each of its
    // tiles after chunks 0..j-1 have written theirs (counted first).
    const int64_t chunks = nt;
    std::vector<int64_t> cursors(size_t(C * chunks * per_cam), 0);
    auto chunk_of = [&](int64_t job) {
        const std::vector<int64_t>& ids = order[job / chunks];
        const int64_t j = job % chunks, n = int64_t(ids.size());
        return std::make_pair(ids.data() + n * j / chunks, ids.data() + n * (j + 1) / chunks);
    };
    auto for_tiles = [&](int64_t idx, auto&& visit) {
        int64_t x0, x1, y0, y1;
        tile_rect(means2d + 2 * idx, radii + 2 * idx, tiles_x, tiles_y, tile_size, &x0, &x1, &y0, &y1);
        for (int64_t ty = y0; ty < y1; ++ty)
            for (int64_t tx = x0; tx < x1; ++tx) visit(ty * tiles_x + tx);
    };
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t job = 0; job < C * chunks; ++job) {
        int64_t* count = cursors.data() + job * per_cam;
        const auto range = chunk_of(job);
        for (const int64_t* it = range.first; it != range.second; ++it)
            for_tiles(*it, [count](int64_t t) { ++count[t]; });
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ct = 0; ct < C * per_cam; ++ct) {  // counts -> each chunk's first slot in the tile
        const int64_t c = ct / per_cam, t = ct % per_cam;
        int64_t cursor = tile_offsets[ct];
        for (int64_t j = 0; j < chunks; ++j) {
            int64_t& slot = cursors[(c * chunks + j) * per_cam + t];
            const int64_t n = slot;
            slot = cursor;
            cursor += n;
        }
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t job = 0; job < C * chunks; ++job) {
        int64_t* cursor = cursors.data() + job * per_cam;
        const auto range = chunk_of(job);
        for (const int64_t* it = range.first; it != range.second; ++it) {
            const int64_t idx = *it;
            for_tiles(idx, [cursor, idx, gaussian_ids](int64_t t) { gaussian_ids[cursor[t]++] = idx; });
        }
    }
}

// =============================================================================================
// Compositing: kernels in composite_cpu.inl (baseline ISA here, AVX2 in composite_avx2.cpp)
// =============================================================================================
#define FK_SIMD_BYTES 16
#include "composite_cpu.inl"
#undef FK_SIMD_BYTES

// The AVX2 build of the compositing kernels (composite_avx2.cpp), used when the CPU has AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
void composite_forward_avx2(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                            const T* features, const T* background, const int64_t* gaussian_ids,
                            const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                            int tile_size, T* image, T* alpha, T* final_T, int64_t* last_index, int nt);
template <typename T>
void composite_backward_avx2(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                             const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                             const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                             int tile_size, const T* final_T, const int64_t* last_index, const T* v_image,
                             const T* v_alpha, T* v_means2d, T* v_conics, T* v_opacities, T* v_features, int nt);
#endif

// AVX2 when the CPU has it, unless FIELDKIT_CPU_SIMD=baseline (both give identical results).
static bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool enabled = [] {
        const char* env = std::getenv("FIELDKIT_CPU_SIMD");
        if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
        __builtin_cpu_init();
        return bool(__builtin_cpu_supports("avx2"));
    }();
    return enabled;
#else
    return false;
#endif
}

const char* simd_level() { return use_avx2() ? "avx2" : "baseline"; }

template <typename T>
void composite_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                       const T* features, const T* background, const int64_t* gaussian_ids, const int64_t* tile_offsets,
                       int width, int height, int tiles_x, int tiles_y, int tile_size, T* image, T* alpha, T* final_T,
                       int64_t* last_index, int num_threads) {
    const int nt = resolve_threads(num_threads);
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx2())
        return composite_forward_avx2<T>(C, N, D, means2d, conics, opacities, features, background, gaussian_ids,
                                         tile_offsets, width, height, tiles_x, tiles_y, tile_size, image, alpha,
                                         final_T, last_index, nt);
#endif
    CompositeKernels<T>::forward(C, N, D, means2d, conics, opacities, features, background, gaussian_ids, tile_offsets,
                                 width, height, tiles_x, tiles_y, tile_size, image, alpha, final_T, last_index, nt);
}

template <typename T>
void composite_backward(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                        const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                        const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y, int tile_size,
                        const T* final_T, const int64_t* last_index, const T* v_image, const T* v_alpha, T* v_means2d,
                        T* v_conics, T* v_opacities, T* v_features, int num_threads) {
    const int nt = resolve_threads(num_threads);
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx2())
        return composite_backward_avx2<T>(C, N, D, M, means2d, conics, opacities, features, background, gaussian_ids,
                                          tile_offsets, width, height, tiles_x, tiles_y, tile_size, final_T,
                                          last_index, v_image, v_alpha, v_means2d, v_conics, v_opacities, v_features,
                                          nt);
#endif
    CompositeKernels<T>::backward(C, N, D, M, means2d, conics, opacities, features, background, gaussian_ids,
                                  tile_offsets, width, height, tiles_x, tiles_y, tile_size, final_T, last_index,
                                  v_image, v_alpha, v_means2d, v_conics, v_opacities, v_features, nt);
}

// Explicit instantiations.
#define FK_INSTANTIATE(T)                                                                                              \
    template void project_forward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, int, int,    \
                                     double, double, double, T*, T*, T*, int32_t*, int);                                    \
    template void project_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, int, int,   \
                                      double, const int32_t*, const T*, const T*, const T*, T*, T*, T*, T*, int);           \
    template void composite_forward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*, const T*,   \
                                       const int64_t*, const int64_t*, int, int, int, int, int, T*, T*, T*, int64_t*, int); \
    template void composite_backward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*,   \
                                        const T*, const int64_t*, const int64_t*, int, int, int, int, int, const T*,   \
                                        const int64_t*, const T*, const T*, T*, T*, T*, T*, int);      \
    template void intersect_offsets<T>(int64_t, int64_t, const T*, const int32_t*, int, int, int, int64_t*, int); \
    template void intersect_fill<T>(int64_t, int64_t, const T*, const int32_t*, const T*, int, int, int,           \
                                    const int64_t*, int64_t*, int);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cpu
}  // namespace fieldkit
