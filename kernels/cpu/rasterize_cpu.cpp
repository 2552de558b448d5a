// CPU (C++/OpenMP) implementation of the rasterizer's differentiable stages.
// The math lives in kernels/include/fieldkit/*.h, shared with the CUDA build; this file only
// schedules it over (camera, Gaussian) pairs and over tiles.
#include "rasterize_cpu.h"

#include <algorithm>
#include <cstring>
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
// Compositing
// =============================================================================================
namespace {

// One tile's Gaussians gathered into contiguous arrays (structure of arrays), with the pixel box
// of each (tile-local, inclusive; empty when x0 > x1).
template <typename T>
struct TileSplats {
    std::vector<T> mx, my, ca, cb, cc, op, feat;
    std::vector<int> bx0, bx1, by0, by1;
    void gather(const int64_t* ids, int64_t count, int64_t D, const T* means2d, const T* conics, const T* opacities,
                const T* features, int64_t tile_x0, int64_t tile_y0, int64_t tile_w, int64_t tile_h) {
        for (auto* v : {&mx, &my, &ca, &cb, &cc, &op}) v->resize(count);
        for (auto* v : {&bx0, &bx1, &by0, &by1}) v->resize(count);
        feat.resize(count * D);
        for (int64_t l = 0; l < count; ++l) {
            const int64_t g = ids[l];
            mx[l] = means2d[2 * g];
            my[l] = means2d[2 * g + 1];
            ca[l] = conics[3 * g];
            cb[l] = conics[3 * g + 1];
            cc[l] = conics[3 * g + 2];
            op[l] = opacities[g];
            std::memcpy(feat.data() + l * D, features + g * D, sizeof(T) * D);
            int x0, x1, y0, y1;
            if (splat_pixel_box<double>(mx[l], my[l], ca[l], cb[l], cc[l], op[l], &x0, &x1, &y0, &y1)) {
                bx0[l] = int(std::max<int64_t>(int64_t(x0) - tile_x0, 0));
                bx1[l] = int(std::min<int64_t>(int64_t(x1) - tile_x0, tile_w - 1));
                by0[l] = int(std::max<int64_t>(int64_t(y0) - tile_y0, 0));
                by1[l] = int(std::min<int64_t>(int64_t(y1) - tile_y0, tile_h - 1));
            } else {
                bx0[l] = by0[l] = 0;
                bx1[l] = by1[l] = -1;
            }
        }
    }
};

struct TileGeometry {
    int64_t camera, x0, y0, w, h;  // pixel rectangle [x0, x0+w) x [y0, y0+h), clipped to the image
};

inline TileGeometry tile_geometry(int64_t tile, int width, int height, int tiles_x, int tiles_y, int tile_size) {
    const int64_t per_cam = int64_t(tiles_x) * tiles_y;
    const int64_t local = tile % per_cam;
    TileGeometry g;
    g.camera = tile / per_cam;
    g.x0 = (local % tiles_x) * tile_size;
    g.y0 = (local / tiles_x) * tile_size;
    g.w = std::max<int64_t>(std::min<int64_t>(g.x0 + tile_size, width) - g.x0, 0);
    g.h = std::max<int64_t>(std::min<int64_t>(g.y0 + tile_size, height) - g.y0, 0);
    return g;
}

// Forward, one tile at a time. Splats are the outer loop (front to back) and each visits only
// the pixels of its box, keeping per-pixel state (T, accumulated features, last index, done);
// this is, per pixel, exactly the sequential walk of the reference.
// DT > 0: channel count known at compile time; DT == 0: any D.
template <typename T, int DT>
void composite_forward_impl(int64_t C, int64_t N, int64_t D_runtime, const T* means2d, const T* conics,
                            const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                            const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                            int tile_size, T* image, T* alpha_out, T* final_T, int64_t* last_index, int nt) {
    const int64_t D = DT > 0 ? DT : D_runtime;
    const int64_t num_tiles = C * int64_t(tiles_x) * tiles_y;
    const int64_t P_max = int64_t(tile_size) * tile_size;
#pragma omp parallel num_threads(nt)
    {
        TileSplats<T> splats;
        std::vector<T> trans(P_max), acc(P_max * D);
        std::vector<int64_t> last(P_max);
        std::vector<unsigned char> done(P_max);
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
            const TileGeometry geo = tile_geometry(tile, width, height, tiles_x, tiles_y, tile_size);
            const int64_t P = geo.w * geo.h;
            if (P == 0) continue;
            const int64_t start = tile_offsets[tile], count = tile_offsets[tile + 1] - start;
            splats.gather(gaussian_ids + start, count, D, means2d, conics, opacities, features, geo.x0, geo.y0, geo.w,
                          geo.h);
            std::fill(trans.begin(), trans.begin() + P, T(1));
            std::fill(acc.begin(), acc.begin() + P * D, T(0));
            std::fill(last.begin(), last.begin() + P, int64_t(-1));
            std::fill(done.begin(), done.begin() + P, 0);
            int64_t n_done = 0;
            for (int64_t l = 0; l < count && n_done < P; ++l) {
                const T* f = splats.feat.data() + l * D;
                for (int64_t yy = splats.by0[l]; yy <= splats.by1[l]; ++yy) {
                    const T py = T(yy) + T(0.5) + T(geo.y0);
                    for (int64_t xx = splats.bx0[l]; xx <= splats.bx1[l]; ++xx) {
                        const int64_t p = yy * geo.w + xx;
                        if (done[p]) continue;
                        const T px = T(xx) + T(0.5) + T(geo.x0);
                        T dx, dy, vis, alpha_raw, alpha;
                        if (!splat_alpha(splats.mx[l], splats.my[l], splats.ca[l], splats.cb[l], splats.cc[l],
                                         splats.op[l], px, py, &dx, &dy, &vis, &alpha_raw, &alpha))
                            continue;
                        const T next_T = trans[p] * (T(1) - alpha);
                        if (transmittance_exhausted(next_T)) {
                            done[p] = 1;
                            ++n_done;
                            continue;
                        }
                        const T w = alpha * trans[p];
                        T* a = acc.data() + p * D;
                        for (int64_t d = 0; d < D; ++d) a[d] += w * f[d];
                        trans[p] = next_T;
                        last[p] = start + l;
                    }
                }
            }
            const T* bg = background + geo.camera * D;
            for (int64_t yy = 0; yy < geo.h; ++yy) {
                for (int64_t xx = 0; xx < geo.w; ++xx) {
                    const int64_t p = yy * geo.w + xx;
                    const int64_t pix = (geo.camera * height + geo.y0 + yy) * width + geo.x0 + xx;
                    T* out = image + pix * D;
                    const T* a = acc.data() + p * D;
                    for (int64_t d = 0; d < D; ++d) out[d] = a[d] + trans[p] * bg[d];
                    alpha_out[pix] = T(1) - trans[p];
                    final_T[pix] = trans[p];
                    last_index[pix] = last[p];
                }
            }
        }
    }
}

// Backward, one tile at a time: splats back to front (from the largest last index of the tile),
// each pixel starting at its own last index with its final T, and recovering the transmittance
// in front of each splat as T_i = T_{i+1} / (1 - alpha_i). One splat's gradient is summed over
// its pixels in registers and written once to its intersection row (no sharing between threads).
template <typename T, int DT>
void composite_backward_impl(int64_t C, int64_t N, int64_t D_runtime, int64_t M, const T* means2d, const T* conics,
                             const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                             const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                             int tile_size, const T* final_T, const int64_t* last_index, const T* v_image,
                             const T* v_alpha, T* v_means2d, T* v_conics, T* v_opacities, T* v_features, int nt) {
    const int64_t D = DT > 0 ? DT : D_runtime;
    const int64_t K = 6 + D;  // per intersection row: mean2d (2), conic (3), opacity (1), features (D)
    const int64_t num_tiles = C * int64_t(tiles_x) * tiles_y;
    const int64_t P_max = int64_t(tile_size) * tile_size;
    std::vector<T> rows(size_t(M * K));

#pragma omp parallel num_threads(nt)
    {
        TileSplats<T> splats;
        std::vector<T> trans(P_max), t_final(P_max), g(P_max * D), g_bg(P_max), g_behind(P_max), va(P_max);
        std::vector<int64_t> last(P_max);
        std::vector<T> row_acc(K);
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
            const int64_t start = tile_offsets[tile], count = tile_offsets[tile + 1] - start;
            if (count == 0) continue;
            T* tile_rows = rows.data() + start * K;
            std::fill(tile_rows, tile_rows + count * K, T(0));
            const TileGeometry geo = tile_geometry(tile, width, height, tiles_x, tiles_y, tile_size);
            const int64_t P = geo.w * geo.h;
            if (P == 0) continue;
            const T* bg = background + geo.camera * D;
            int64_t max_last = -1;
            for (int64_t yy = 0; yy < geo.h; ++yy) {
                for (int64_t xx = 0; xx < geo.w; ++xx) {
                    const int64_t p = yy * geo.w + xx;
                    const int64_t pix = (geo.camera * height + geo.y0 + yy) * width + geo.x0 + xx;
                    last[p] = last_index[pix] >= start ? last_index[pix] - start : -1;
                    max_last = std::max(max_last, last[p]);
                    trans[p] = t_final[p] = final_T[pix];
                    va[p] = v_alpha[pix];
                    g_behind[p] = T(0);
                    T gb = T(0);
                    for (int64_t d = 0; d < D; ++d) {
                        g[p * D + d] = v_image[pix * D + d];
                        gb += g[p * D + d] * bg[d];
                    }
                    g_bg[p] = gb;
                }
            }
            if (max_last < 0) continue;
            splats.gather(gaussian_ids + start, max_last + 1, D, means2d, conics, opacities, features, geo.x0, geo.y0,
                          geo.w, geo.h);
            for (int64_t l = max_last; l >= 0; --l) {
                const T* f = splats.feat.data() + l * D;
                std::fill(row_acc.begin(), row_acc.end(), T(0));
                T* r = row_acc.data();
                bool touched = false;
                for (int64_t yy = splats.by0[l]; yy <= splats.by1[l]; ++yy) {
                    const T py = T(yy) + T(0.5) + T(geo.y0);
                    for (int64_t xx = splats.bx0[l]; xx <= splats.bx1[l]; ++xx) {
                        const int64_t p = yy * geo.w + xx;
                        if (l > last[p]) continue;  // behind this pixel's last blended splat
                        const T px = T(xx) + T(0.5) + T(geo.x0);
                        T dx, dy, vis, alpha_raw, alpha;
                        if (!splat_alpha(splats.mx[l], splats.my[l], splats.ca[l], splats.cb[l], splats.cc[l],
                                         splats.op[l], px, py, &dx, &dy, &vis, &alpha_raw, &alpha))
                            continue;
                        touched = true;
                        const T T_i = trans[p] / (T(1) - alpha);
                        const T* gp = g.data() + p * D;
                        T g_f = T(0);
                        for (int64_t d = 0; d < D; ++d) g_f += gp[d] * f[d];
                        const T v_al = blend_alpha_vjp(alpha, T_i, g_f, g_behind[p], g_bg[p], va[p], t_final[p]);
                        const T w = alpha * T_i;
                        for (int64_t d = 0; d < D; ++d) r[6 + d] += w * gp[d];
                        g_behind[p] += w * g_f;
                        splat_alpha_vjp(dx, dy, splats.ca[l], splats.cb[l], splats.cc[l], splats.op[l], vis, alpha_raw,
                                        v_al, r, r + 2, r + 5);
                        trans[p] = T_i;
                    }
                }
                if (touched) std::memcpy(tile_rows + l * K, r, sizeof(T) * K);
            }
        }
    }

    // Sum intersection rows per Gaussian in intersection order (counting sort by Gaussian id).
    const int64_t G = C * N;
    std::vector<int64_t> begin(size_t(G + 1), 0);
    for (int64_t k = 0; k < M; ++k) ++begin[gaussian_ids[k] + 1];
    for (int64_t gi = 0; gi < G; ++gi) begin[gi + 1] += begin[gi];
    std::vector<int64_t> order(static_cast<size_t>(M));
    {
        std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
        for (int64_t k = 0; k < M; ++k) order[fill[gaussian_ids[k]]++] = k;
    }
#pragma omp parallel num_threads(nt)
    {
        std::vector<T> sum(K);
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < G; ++gi) {
            std::fill(sum.begin(), sum.end(), T(0));
            for (int64_t e = begin[gi]; e < begin[gi + 1]; ++e) {
                const T* row = rows.data() + order[e] * K;
                for (int64_t k = 0; k < K; ++k) sum[k] += row[k];
            }
            v_means2d[2 * gi] = sum[0];
            v_means2d[2 * gi + 1] = sum[1];
            v_conics[3 * gi] = sum[2];
            v_conics[3 * gi + 1] = sum[3];
            v_conics[3 * gi + 2] = sum[4];
            v_opacities[gi] = sum[5];
            for (int64_t d = 0; d < D; ++d) v_features[gi * D + d] = sum[6 + d];
        }
    }
}

}  // namespace

#define FK_DISPATCH_D(D, FN, ...)                         \
    switch (D) {                                          \
        case 1: FN<T, 1>(__VA_ARGS__); break;             \
        case 3: FN<T, 3>(__VA_ARGS__); break;             \
        case 4: FN<T, 4>(__VA_ARGS__); break;             \
        default: FN<T, 0>(__VA_ARGS__); break;            \
    }

template <typename T>
void composite_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                       const T* features, const T* background, const int64_t* gaussian_ids, const int64_t* tile_offsets,
                       int width, int height, int tiles_x, int tiles_y, int tile_size, T* image, T* alpha, T* final_T,
                       int64_t* last_index, int num_threads) {
    FK_DISPATCH_D(D, composite_forward_impl, C, N, D, means2d, conics, opacities, features, background, gaussian_ids,
                  tile_offsets, width, height, tiles_x, tiles_y, tile_size, image, alpha, final_T, last_index, resolve_threads(num_threads))
}

template <typename T>
void composite_backward(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                        const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                        const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y, int tile_size,
                        const T* final_T, const int64_t* last_index, const T* v_image, const T* v_alpha, T* v_means2d,
                        T* v_conics, T* v_opacities, T* v_features, int num_threads) {
    FK_DISPATCH_D(D, composite_backward_impl, C, N, D, M, means2d, conics, opacities, features, background, gaussian_ids,
                  tile_offsets, width, height, tiles_x, tiles_y, tile_size, final_T, last_index, v_image, v_alpha,
                  v_means2d, v_conics, v_opacities, v_features, resolve_threads(num_threads))
}

#undef FK_DISPATCH_D

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
                                        const int64_t*, const T*, const T*, T*, T*, T*, T*, int);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cpu
}  // namespace fieldkit
