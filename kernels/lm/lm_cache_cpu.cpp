// 3DGS-LM gradient cache, CPU (C++/OpenMP): built once per batch after the forward pass, then
// read by every Jacobian product of the conjugate-gradient solve instead of re-marching rays.
// Python side: fieldkit/optim/lm_native.py (extension fieldkit_lm_cpu).
//
// Compositing semantics are those of kernels/include/fieldkit/composite.h (and the torch
// reference fieldkit/render/composite.py): per pixel, front to back over its tile's list,
//   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, alpha = min(0.999, o exp(-sigma)),
//   skip if sigma < 0 or alpha < 1/255, stop before T (1 - alpha) <= 1e-4.
// Gaussians are addressed by "pair" ids: one per visible (camera, Gaussian), with its 2D mean,
// conic, opacity and RGB colour; the tile lists hold pair ids.
//
// Cache entry = one blended (pixel, pair), stored sorted by pair (CSR: pair_offsets):
//   pixel id (int32), w = alpha T (colour weight), a = alpha where the 0.999 clamp is inactive
//   else 0 (d alpha / d sigma = -a, d alpha / d opacity = a / o), and
//   dC/dalpha (3) = T c - S / (1 - alpha), S = sum over the splats behind (w c) + T_final bg.
// Plus, per pixel front to back (CSR: pixel_offsets), the index of each of its entries.
// The 2D derivatives of alpha are recomputed from the pixel position, not stored.
//   J p   (cache_jvp):  per-entry contributions in parallel over pairs, then each pixel sums
//                       its own entries in compositing order (no atomics);
//   J^T u (cache_vjp):  parallel over pairs, each summing its own contiguous entries;
//   hessian_blocks:     per pair the 9x9 block sum_p (dC_p/dq)^T W_p (dC_p/dq) for diag(J^T J),
//                       q = (mean x, mean y, conic a, b, c, opacity, r, g, b), W_p symmetric 3x3.
// The build is two splat-outer passes per tile (like the native forward): pass 1 counts entries
// per pixel and per tile-list slot, which fixes every entry's position in pair order; pass 2
// writes them there directly (no temporary copy) and sweeps each pixel back to front.
// All results are deterministic for any thread count. The per-entry math (dC/dalpha sweep, J p,
// J^T u and Hessian terms) is kernels/include/fieldkit/lm_cache.h, shared with the CUDA build
// (kernels/lm/lm_cache_cuda.cu), which produces the same cache layout, entry for entry.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fieldkit/composite.h"
#include "fieldkit/lm_cache.h"

namespace {

using at::Tensor;

struct Geometry {
    int width, height, tiles_x, tiles_y, tile_size;
    int64_t C;
};

inline void tile_rect(const Geometry& g, int64_t tile, int64_t* cam, int64_t* x0, int64_t* y0, int64_t* w, int64_t* h) {
    const int64_t per_cam = int64_t(g.tiles_x) * g.tiles_y;
    const int64_t local = tile % per_cam;
    *cam = tile / per_cam;
    *x0 = (local % g.tiles_x) * g.tile_size;
    *y0 = (local / g.tiles_x) * g.tile_size;
    *w = std::max<int64_t>(std::min<int64_t>(*x0 + g.tile_size, g.width) - *x0, 0);
    *h = std::max<int64_t>(std::min<int64_t>(*y0 + g.tile_size, g.height) - *y0, 0);
}

// Per-tile scratch: pixel state of the splat-outer walk.
template <typename T>
struct TileState {
    std::vector<T> trans, acc;
    std::vector<int> done, count;
    void reset(int64_t n) {
        trans.assign(n, T(1));
        acc.assign(3 * n, T(0));
        done.assign(n, 0);
        count.assign(n, 0);
    }
};

// Splat-outer walk over one tile (front to back, each splat over the pixels of its box, as the
// native forward): per pixel exactly the sequential walk of the reference. For every blended
// (pixel, splat) calls blend(local pixel index, list position l, alpha, alpha_raw, T_before).
template <typename T, typename Blend>
inline void walk_tile(const int64_t* ids, int64_t count, const T* m, const T* cn, const T* op, const T* col,
                      int64_t x0, int64_t y0, int64_t w, int64_t h, TileState<T>& st, Blend&& blend) {
    st.reset(w * h);
    int64_t n_done = 0;
    for (int64_t l = 0; l < count && n_done < w * h; ++l) {
        const int64_t i = ids[l];
        int bx0, bx1, by0, by1;
        if (!fieldkit::splat_pixel_box<double>(m[2 * i], m[2 * i + 1], cn[3 * i], cn[3 * i + 1], cn[3 * i + 2], op[i],
                                               &bx0, &bx1, &by0, &by1))
            continue;
        const int64_t xa = std::max<int64_t>(bx0, x0), xb = std::min<int64_t>(bx1, x0 + w - 1);
        const int64_t ya = std::max<int64_t>(by0, y0), yb = std::min<int64_t>(by1, y0 + h - 1);
        for (int64_t yy = ya; yy <= yb; ++yy)
            for (int64_t xx = xa; xx <= xb; ++xx) {
                const int64_t o = (yy - y0) * w + (xx - x0);
                if (st.done[o]) continue;
                T dx, dy, vis, alpha_raw, alpha;
                if (!fieldkit::splat_alpha<T>(m[2 * i], m[2 * i + 1], cn[3 * i], cn[3 * i + 1], cn[3 * i + 2], op[i],
                                              T(xx) + T(0.5), T(yy) + T(0.5), &dx, &dy, &vis, &alpha_raw, &alpha))
                    continue;
                const T Tb = st.trans[o];
                const T next_T = Tb * (T(1) - alpha);
                if (fieldkit::transmittance_exhausted(next_T)) {
                    st.done[o] = 1;
                    ++n_done;
                    continue;
                }
                const T wgt = alpha * Tb;
                for (int d = 0; d < 3; ++d) st.acc[3 * o + d] += wgt * col[3 * i + d];
                st.trans[o] = next_T;
                blend(o, l, alpha, alpha_raw, Tb);
            }
    }
}

void check(const Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Forward + (optionally) the cache, stored in pair order. Returns
//   [image [C,H,W,3], entries (int64 scalar tensor)] and, with build, also
//   [pair_offsets [V+1] int64, e_pix [E] int32, e_w [E], e_a [E], e_dc [E,3],
//    pixel_offsets [C*H*W+1] int64, pix_entries [E] int32 (per pixel, front to back: entry index)].
std::vector<Tensor> build_cache(Tensor means2d, Tensor conics, Tensor opac, Tensor colors, Tensor background,
                                Tensor ids, Tensor tile_offsets, int64_t width, int64_t height, int64_t tiles_x,
                                int64_t tiles_y, int64_t tile_size, bool build) {
    const auto dtype = means2d.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 only");
    for (auto [t, n] : {std::pair{means2d, "means2d"}, {conics, "conics"}, {opac, "opacities"}, {colors, "colors"},
                        {background, "background"}})
        check(t, n, dtype);
    check(ids, "gaussian_ids", at::kLong);
    check(tile_offsets, "tile_offsets", at::kLong);
    const int64_t V = means2d.size(0);
    const int64_t per_cam = tiles_x * tiles_y;
    const int64_t num_tiles = tile_offsets.size(0) - 1;
    const int64_t C = num_tiles / per_cam;
    const int64_t M = ids.size(0);
    TORCH_CHECK(background.size(0) == C && background.size(1) == 3, "background must be [C,3]");
    const Geometry geo{int(width), int(height), int(tiles_x), int(tiles_y), int(tile_size), C};
    const int64_t P = C * height * width;
    TORCH_CHECK(P < (int64_t(1) << 31) && V < (int64_t(1) << 31), "batch too large for int32 ids");
    auto opts = means2d.options();
    auto lopts = opts.dtype(at::kLong);
    Tensor image = at::empty({C, height, width, 3}, opts);
    Tensor pixel_offsets = at::zeros({P + 1}, lopts);
    Tensor slot_count = at::zeros({M}, lopts);  // entries per tile-list slot (= per (tile, pair))
    std::vector<Tensor> out;
    const int nt = at::get_num_threads();
    // (a lambda, not AT_DISPATCH: OpenMP pragmas are not allowed inside macro arguments)
    auto body = [&](auto tag) {
        using T = decltype(tag);
        const T *m = means2d.data_ptr<T>(), *cn = conics.data_ptr<T>(), *op = opac.data_ptr<T>();
        const T *col = colors.data_ptr<T>(), *bg = background.data_ptr<T>();
        const int64_t *gid = ids.data_ptr<int64_t>(), *toff = tile_offsets.data_ptr<int64_t>();
        T* img = image.data_ptr<T>();
        int64_t *poff = pixel_offsets.data_ptr<int64_t>(), *scount = slot_count.data_ptr<int64_t>();
        // Pass 1: image, entries per pixel and per tile-list slot.
#pragma omp parallel num_threads(nt)
        {
            TileState<T> st;
#pragma omp for schedule(dynamic, 1)
            for (int64_t tile = 0; tile < num_tiles; ++tile) {
                int64_t cam, x0, y0, w, h;
                tile_rect(geo, tile, &cam, &x0, &y0, &w, &h);
                if (w * h == 0) continue;
                const int64_t start = toff[tile], count = toff[tile + 1] - start;
                walk_tile<T>(gid + start, count, m, cn, op, col, x0, y0, w, h, st,
                             [&](int64_t o, int64_t l, T, T, T) {
                                 st.count[o]++;
                                 scount[start + l]++;
                             });
                for (int64_t o = 0; o < w * h; ++o) {
                    const int64_t pix = (cam * height + y0 + o / w) * width + x0 + o % w;
                    for (int d = 0; d < 3; ++d) img[3 * pix + d] = st.acc[3 * o + d] + st.trans[o] * bg[3 * cam + d];
                    poff[pix + 1] = st.count[o];
                }
            }
        }
        for (int64_t p = 0; p < P; ++p) poff[p + 1] += poff[p];
        Tensor total = at::empty({1}, lopts);
        total.data_ptr<int64_t>()[0] = poff[P];
        out = {image, total};
        if (!build) return;
        const int64_t E = poff[P];
        TORCH_CHECK(E < (int64_t(1) << 31), "too many cache entries for int32 ids: ", E);
        // Entry ranges: pair-major, then tile-list order, then the walk's pixel order.
        Tensor pair_offsets = at::zeros({V + 1}, lopts);
        int64_t* pairoff = pair_offsets.data_ptr<int64_t>();
        for (int64_t s = 0; s < M; ++s) pairoff[gid[s] + 1] += scount[s];
        for (int64_t v = 0; v < V; ++v) pairoff[v + 1] += pairoff[v];
        std::vector<int64_t> slot_base(M), fill(pairoff, pairoff + V);
        for (int64_t s = 0; s < M; ++s) {
            slot_base[s] = fill[gid[s]];
            fill[gid[s]] += scount[s];
        }
        Tensor e_pix = at::empty({E}, opts.dtype(at::kInt)), pix_entries = at::empty({E}, opts.dtype(at::kInt));
        Tensor e_w = at::empty({E}, opts), e_a = at::empty({E}, opts), e_dc = at::empty({E, 3}, opts);
        int32_t *epx = e_pix.data_ptr<int32_t>(), *pent = pix_entries.data_ptr<int32_t>();
        T *pw = e_w.data_ptr<T>(), *pa = e_a.data_ptr<T>(), *pdc = e_dc.data_ptr<T>();
        // Pass 2: write entries (alpha and T first), then per pixel a back-to-front sweep for
        // w = alpha T, a and dC/dalpha = T c - S / (1 - alpha).
#pragma omp parallel num_threads(nt)
        {
            TileState<T> st;
            std::vector<int64_t> next, local_off;
            std::vector<int32_t> pair_of;  // pair id of each of the tile's entries, per pixel front to back
#pragma omp for schedule(dynamic, 1)
            for (int64_t tile = 0; tile < num_tiles; ++tile) {
                int64_t cam, x0, y0, w, h;
                tile_rect(geo, tile, &cam, &x0, &y0, &w, &h);
                if (w * h == 0) continue;
                const int64_t start = toff[tile], count = toff[tile + 1] - start;
                auto pixel_of = [&](int64_t o) { return (cam * height + y0 + o / w) * width + x0 + o % w; };
                local_off.assign(w * h + 1, 0);
                for (int64_t o = 0; o < w * h; ++o) local_off[o + 1] = local_off[o] + poff[pixel_of(o) + 1] - poff[pixel_of(o)];
                pair_of.resize(local_off[w * h]);
                next.assign(slot_base.begin() + start, slot_base.begin() + start + count);
                walk_tile<T>(gid + start, count, m, cn, op, col, x0, y0, w, h, st,
                             [&](int64_t o, int64_t l, T alpha, T alpha_raw, T Tb) {
                                 const int64_t pix = pixel_of(o);
                                 const int64_t k = next[l]++;
                                 epx[k] = int32_t(pix);
                                 pa[k] = fieldkit::alpha_unclamped(alpha_raw) ? alpha : -alpha;  // sign: clamp flag
                                 pw[k] = Tb;
                                 pair_of[local_off[o] + st.count[o]] = int32_t(gid[start + l]);
                                 pent[poff[pix] + st.count[o]++] = int32_t(k);
                             });
                for (int64_t o = 0; o < w * h; ++o) {
                    const int64_t pix = pixel_of(o);
                    T S[3];
                    for (int d = 0; d < 3; ++d) S[d] = st.trans[o] * bg[3 * cam + d];
                    for (int64_t j = st.count[o] - 1; j >= 0; --j) {
                        const int64_t k = pent[poff[pix] + j];
                        const T* c = col + 3 * int64_t(pair_of[local_off[o] + j]);
                        const bool clamped = pa[k] < T(0);
                        const T alpha = clamped ? -pa[k] : pa[k];
                        const T Tb = pw[k];
                        fieldkit::lm::sweep_entry(alpha, Tb, c, S, pdc + 3 * k);
                        pw[k] = alpha * Tb;
                        pa[k] = clamped ? T(0) : alpha;
                    }
                }
            }
        }
        out.insert(out.end(), {pair_offsets, e_pix, e_w, e_a, e_dc, pixel_offsets, pix_entries});
    };
    if (dtype == at::kFloat) body(float{}); else body(double{});
    return out;
}

// J_img p: image tangent [P,3] from per-pair tangents dq [V,9] (mean 2, conic 3, opacity 1, rgb 3).
// Parallel over pairs into a per-entry buffer, then each pixel sums its entries front to back.
Tensor cache_jvp(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w, Tensor e_a,
                 Tensor e_dc, Tensor pixel_offsets, Tensor pix_entries, Tensor dq, int64_t width, int64_t height) {
    const auto dtype = means2d.scalar_type();
    check(dq, "dq", dtype);
    const int64_t V = pair_offsets.size(0) - 1, P = pixel_offsets.size(0) - 1, E = e_w.size(0);
    TORCH_CHECK(dq.size(0) == V && dq.size(1) == 9, "dq must be [V,9]");
    Tensor out = at::empty({P, 3}, means2d.options());
    Tensor contrib = at::empty({E, 3}, means2d.options());
    const int nt = at::get_num_threads();
    auto body = [&](auto tag) {
        using T = decltype(tag);
        const T *m = means2d.data_ptr<T>(), *cn = conics.data_ptr<T>(), *op = opac.data_ptr<T>();
        const T *w = e_w.data_ptr<T>(), *a = e_a.data_ptr<T>(), *dc = e_dc.data_ptr<T>(), *q = dq.data_ptr<T>();
        const int32_t *px_of = e_pix.data_ptr<int32_t>(), *pent = pix_entries.data_ptr<int32_t>();
        const int64_t *off = pair_offsets.data_ptr<int64_t>(), *poff = pixel_offsets.data_ptr<int64_t>();
        T *o = out.data_ptr<T>(), *ct = contrib.data_ptr<T>();
        const int64_t HW = width * height;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
        for (int64_t i = 0; i < V; ++i) {
            const T* qi = q + 9 * i;
            const T mx = m[2 * i], my = m[2 * i + 1], ca = cn[3 * i], cb = cn[3 * i + 1], cc = cn[3 * i + 2];
            const T dop = qi[5] / op[i];
            for (int64_t k = off[i]; k < off[i + 1]; ++k) {
                T g[5];
                fieldkit::lm::sigma_partials(mx, my, int64_t(px_of[k]) % HW, width, ca, cb, cc, g);
                fieldkit::lm::entry_jvp(g, qi, dop, a[k], w[k], dc + 3 * k, ct + 3 * k);
            }
        }
#pragma omp parallel for num_threads(nt) schedule(static, 256)
        for (int64_t p = 0; p < P; ++p) {
            T acc[3] = {0, 0, 0};
            for (int64_t j = poff[p]; j < poff[p + 1]; ++j) {
                const int64_t k = pent[j];
                for (int d = 0; d < 3; ++d) acc[d] += ct[3 * k + d];
            }
            for (int d = 0; d < 3; ++d) o[3 * p + d] = acc[d];
        }
    };
    if (dtype == at::kFloat) body(float{}); else body(double{});
    return out;
}

// J_img^T u: per-pair cotangents [V,9] from an image cotangent u [P,3]; parallel over pairs.
Tensor cache_vjp(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w, Tensor e_a,
                 Tensor e_dc, Tensor u, int64_t width, int64_t height) {
    const auto dtype = means2d.scalar_type();
    check(u, "u", dtype);
    const int64_t V = pair_offsets.size(0) - 1;
    Tensor out = at::empty({V, 9}, means2d.options());
    const int nt = at::get_num_threads();
    auto body = [&](auto tag) {
        using T = decltype(tag);
        const T *m = means2d.data_ptr<T>(), *cn = conics.data_ptr<T>(), *op = opac.data_ptr<T>();
        const T *w = e_w.data_ptr<T>(), *a = e_a.data_ptr<T>(), *dc = e_dc.data_ptr<T>(), *uu = u.data_ptr<T>();
        const int32_t* px_of = e_pix.data_ptr<int32_t>();
        const int64_t* off = pair_offsets.data_ptr<int64_t>();
        T* o = out.data_ptr<T>();
        const int64_t HW = width * height;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
        for (int64_t i = 0; i < V; ++i) {
            double acc[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
            const T mx = m[2 * i], my = m[2 * i + 1], ca = cn[3 * i], cb = cn[3 * i + 1], cc = cn[3 * i + 2];
            for (int64_t k = off[i]; k < off[i + 1]; ++k) {
                const int64_t p = px_of[k];
                T g[5];
                fieldkit::lm::sigma_partials(mx, my, p % HW, width, ca, cb, cc, g);
                fieldkit::lm::entry_vjp(g, a[k], w[k], dc + 3 * k, uu + 3 * p, acc);
            }
            acc[5] /= op[i];
            for (int j = 0; j < 9; ++j) o[9 * i + j] = T(acc[j]);
        }
    };
    if (dtype == at::kFloat) body(float{}); else body(double{});
    return out;
}

// Per pair: the 45 upper-triangle entries (row-major) of sum_p (dC_p/dq)^T W_p (dC_p/dq),
// W_p given as 6 values per pixel (w00, w01, w02, w11, w12, w22).
Tensor hessian_blocks(Tensor means2d, Tensor conics, Tensor opac, Tensor pair_offsets, Tensor e_pix, Tensor e_w,
                      Tensor e_a, Tensor e_dc, Tensor Wp, int64_t width, int64_t height) {
    const auto dtype = means2d.scalar_type();
    check(Wp, "pixel_weights", dtype);
    const int64_t V = pair_offsets.size(0) - 1;
    Tensor out = at::empty({V, 45}, means2d.options());
    const int nt = at::get_num_threads();
    auto body = [&](auto tag) {
        using T = decltype(tag);
        const T *m = means2d.data_ptr<T>(), *cn = conics.data_ptr<T>(), *op = opac.data_ptr<T>();
        const T *w = e_w.data_ptr<T>(), *a = e_a.data_ptr<T>(), *dc = e_dc.data_ptr<T>(), *W6 = Wp.data_ptr<T>();
        const int32_t* px_of = e_pix.data_ptr<int32_t>();
        const int64_t* off = pair_offsets.data_ptr<int64_t>();
        T* o = out.data_ptr<T>();
        const int64_t HW = width * height;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
        for (int64_t i = 0; i < V; ++i) {
            double H[9][9] = {};
            const T mx = m[2 * i], my = m[2 * i + 1], ca = cn[3 * i], cb = cn[3 * i + 1], cc = cn[3 * i + 2];
            const double inv_op = 1.0 / double(op[i]);
            for (int64_t k = off[i]; k < off[i + 1]; ++k) {
                const int64_t p = px_of[k];
                T g[5];
                fieldkit::lm::sigma_partials(mx, my, p % HW, width, ca, cb, cc, g);
                fieldkit::lm::entry_hessian(g, a[k], inv_op, w[k], dc + 3 * k, W6 + 6 * p, H);
            }
            int t = 0;
            for (int r = 0; r < 9; ++r)
                for (int c = r; c < 9; ++c) o[45 * i + t++] = T(H[r][c]);
        }
    };
    if (dtype == at::kFloat) body(float{}); else body(double{});
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fieldkit 3DGS-LM gradient cache (CPU): build, J p, J^T u, diag(J^T J) blocks";
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;
    m.def("build_cache", &build_cache, release());
    m.def("cache_jvp", &cache_jvp, release());
    m.def("cache_vjp", &cache_vjp, release());
    m.def("hessian_blocks", &hessian_blocks, release());
}
