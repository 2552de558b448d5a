// CPU compositing kernels (forward and backward), SIMD over pixel rows.
//
// Included by two translation units: rasterize_cpu.cpp (baseline ISA, 16-byte vectors) and
// composite_avx2.cpp (compiled for AVX2, 32-byte vectors), which rasterize_cpu.cpp calls when
// the CPU supports AVX2. Both compute bit-identical results: every lane does the same scalar
// arithmetic in the same order, and per-splat sums run over pixel columns in the same order
// whatever the lane count.
//
// Expects: FK_SIMD_BYTES defined (16 or 32), <algorithm>/<cstring>/<vector> and
// fieldkit/composite.h included, and to be included inside namespace fieldkit::cpu.
// Defines CompositeKernels<T>::forward / ::backward (internal linkage).

// =============================================================================================
// Compositing
// =============================================================================================
namespace {

// ---------------------------------------------------------------------------------------------
// SIMD lanes: GCC/Clang vector extensions of FK_SIMD_BYTES bytes (16: SSE2 on baseline x86-64
// or NEON; 32: AVX2 in composite_avx2.cpp); no intrinsics, no -march. Every lane does exactly the
// scalar arithmetic (no reassociation; no FMA contraction: -ffp-contract=off).
// ---------------------------------------------------------------------------------------------
#ifndef FK_SIMD_BYTES
#error "define FK_SIMD_BYTES before including composite_cpu.inl"
#endif
typedef float vfloat __attribute__((vector_size(FK_SIMD_BYTES)));
typedef int32_t vint32 __attribute__((vector_size(FK_SIMD_BYTES)));
typedef double vdouble __attribute__((vector_size(FK_SIMD_BYTES)));
typedef int64_t vint64 __attribute__((vector_size(FK_SIMD_BYTES)));

template <typename T>
struct Simd;
template <>
struct Simd<float> {
    using V = vfloat;  // values
    using M = vint32;  // masks / integer state (same lane width)
    using I = int32_t;
    static constexpr int W = FK_SIMD_BYTES / 4;
};
template <>
struct Simd<double> {
    using V = vdouble;
    using M = vint64;
    using I = int64_t;
    static constexpr int W = FK_SIMD_BYTES / 8;
};

template <typename V, typename S>
inline V vload(const S* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <typename V, typename S>
inline void vstore(S* p, const V& v) {
    std::memcpy(p, &v, sizeof(V));
}
// Memory holds plain T arrays and is accessed through memcpy (unaligned): the allocators are
// compiled for the baseline ISA, where GCC caps vector alignment at 16 bytes.
template <typename V, typename S>
inline void vadd(S* p, const V& v) {
    vstore(p, vload<V>(p) + v);
}
template <typename M>
inline bool any_lane(const M& m) {  // some lane non-zero (one vector compare, not a branch per lane)
    static const M zero{};
    return std::memcmp(&m, &zero, sizeof(M)) != 0;
}
template <typename V>
inline V iota() {
    V v;
    for (int i = 0; i < int(sizeof(V) / sizeof(v[0])); ++i) v[i] = i;
    return v;
}

}  // namespace
}  // namespace cpu

template <>
struct LaneOps<cpu::vfloat> {
    static inline cpu::vfloat k(double v) { return cpu::vfloat{} + float(v); }
    static inline cpu::vfloat pow2(cpu::vfloat n) { return (cpu::vfloat)((__builtin_convertvector(n, cpu::vint32) + 127) << 23); }
    static inline cpu::vfloat exp(cpu::vfloat x) { return splat_exp_poly(x); }
};

template <>
struct LaneOps<cpu::vdouble> {
    static inline cpu::vdouble k(double v) { return cpu::vdouble{} + v; }
    static inline cpu::vdouble exp(cpu::vdouble x) {
        cpu::vdouble r;
        for (int i = 0; i < int(sizeof(r) / sizeof(double)); ++i) r[i] = ::exp(x[i]);
        return r;
    }
};

namespace cpu {
namespace {

// Image-space pixel box of every (camera, Gaussian): [x0, x1, y0, y1] inclusive, x0 > x1 when the
// splat is never blended. Computed once per splat instead of once per tile it touches.
template <typename T>
std::vector<int> splat_boxes(int64_t G, const T* means2d, const T* conics, const T* opacities, int nt) {
    std::vector<int> boxes(size_t(4 * G));
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t g = 0; g < G; ++g) {
        int* b = boxes.data() + 4 * g;
        if (!splat_pixel_box<double>(means2d[2 * g], means2d[2 * g + 1], conics[3 * g], conics[3 * g + 1],
                                     conics[3 * g + 2], opacities[g], &b[0], &b[1], &b[2], &b[3])) {
            b[0] = b[2] = 0;
            b[1] = b[3] = -1;
        }
    }
    return boxes;
}

// One tile's Gaussians gathered into contiguous arrays (structure of arrays), with the pixel box
// of each (tile-local, inclusive; empty when x0 > x1).
template <typename T>
struct TileSplats {
    std::vector<T> mx, my, ca, cb, cc, op, feat;
    std::vector<int> bx0, bx1, by0, by1;
    void gather(const int64_t* ids, int64_t count, int64_t D, const T* means2d, const T* conics, const T* opacities,
                const T* features, const int* boxes, int64_t tile_x0, int64_t tile_y0, int64_t tile_w,
                int64_t tile_h) {
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
            const int* b = boxes + 4 * g;
            if (b[0] <= b[1]) {
                bx0[l] = int(std::max<int64_t>(int64_t(b[0]) - tile_x0, 0));
                bx1[l] = int(std::min<int64_t>(int64_t(b[1]) - tile_x0, tile_w - 1));
                by0[l] = int(std::max<int64_t>(int64_t(b[2]) - tile_y0, 0));
                by1[l] = int(std::min<int64_t>(int64_t(b[3]) - tile_y0, tile_h - 1));
            } else {
                bx0[l] = by0[l] = 0;
                bx1[l] = by1[l] = -1;
            }
        }
    }
};

// Per-row pixel sets of a tile as bit masks (bit x = tile column x). Tiles wider than 64 columns
// get no masks: row_bits() then returns 0, so no row is ever skipped.
using RowMask = uint64_t;
constexpr int kMaxMaskedTile = 64;
inline RowMask row_bits(int x0, int x1, int tile_size) {  // columns x0..x1 (inclusive, 0 <= x0 <= x1 < tile_size)
    if (tile_size > kMaxMaskedTile) return 0;
    return (~RowMask(0) >> (63 - (x1 - x0))) << x0;
}

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

// Forward, one tile at a time. Splats are the outer loop (front to back); each visits only the
// pixels of its box, a row at a time, W pixels per SIMD step. Per-pixel state (T, accumulated
// features, last blended splat, done) lives in padded structure-of-arrays rows (stride RS), so
// a step can read past the box end into padding; lanes outside the box are left unchanged by
// the selects. Per pixel this is exactly the sequential walk of the reference.
// DT > 0: channel count known at compile time; DT == 0: any D.
template <typename T, int DT>
void composite_forward_impl(int64_t C, int64_t N, int64_t D_runtime, const T* means2d, const T* conics,
                            const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                            const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y,
                            int tile_size, T* image, T* alpha_out, T* final_T, int64_t* last_index, int nt) {
    using V = typename Simd<T>::V;
    using M = typename Simd<T>::M;
    using I = typename Simd<T>::I;
    using Ops = LaneOps<V>;
    constexpr int W = Simd<T>::W;
    const int64_t D = DT > 0 ? DT : D_runtime;
    const int64_t num_tiles = C * int64_t(tiles_x) * tiles_y;
    const int64_t RS = tile_size + W;          // padded row stride
    const int64_t PS = int64_t(tile_size) * RS;  // padded plane size
    const std::vector<int> boxes = splat_boxes(C * N, means2d, conics, opacities, nt);
#pragma omp parallel num_threads(nt)
    {
        TileSplats<T> splats;
        std::vector<T> trans(PS), acc(PS * D);
        std::vector<I> last(PS), done(PS);
        std::vector<RowMask> row_done(tile_size);  // bit x of row y: pixel (x, y) has finished
        const V lane = iota<V>();
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < num_tiles; ++tile) {
            const TileGeometry geo = tile_geometry(tile, width, height, tiles_x, tiles_y, tile_size);
            const int64_t P = geo.w * geo.h;
            if (P == 0) continue;
            const int64_t start = tile_offsets[tile], count = tile_offsets[tile + 1] - start;
            splats.gather(gaussian_ids + start, count, D, means2d, conics, opacities, features, boxes.data(), geo.x0,
                          geo.y0, geo.w, geo.h);
            std::fill(trans.begin(), trans.end(), T(1));
            std::fill(acc.begin(), acc.end(), T(0));
            std::fill(last.begin(), last.end(), I(-1));
            std::fill(done.begin(), done.end(), I(0));
            std::fill(row_done.begin(), row_done.end(), RowMask(0));
            const V gx0 = Ops::k(double(geo.x0));
            int64_t n_done = 0;
            for (int64_t l = 0; l < count && n_done < P; ++l) {
                const int x0 = splats.bx0[l], x1 = splats.bx1[l];
                if (x0 > x1 || splats.by0[l] > splats.by1[l]) continue;
                const V mx = V{} + splats.mx[l], ca = V{} + splats.ca[l], cb = V{} + splats.cb[l];
                const V cc = V{} + splats.cc[l], op = V{} + splats.op[l];
                const V vx1 = Ops::k(double(x1));
                const M li = M{} + I(l);
                const T* f = splats.feat.data() + l * D;
                M stops = M{};
                const RowMask box = row_bits(x0, x1, tile_size);
                for (int64_t yy = splats.by0[l]; yy <= splats.by1[l]; ++yy) {
                    if (box && (row_done[yy] & box) == box) continue;  // every pixel of this box row has finished
                    const V dy = V{} + (splats.my[l] - (T(geo.y0) + (T(yy) + T(0.5))));
                    for (int xx = x0; xx <= x1; xx += W) {
                        const int64_t o = yy * RS + xx;
                        const V xs = Ops::k(double(xx)) + lane;
                        const V dx = mx - (gx0 + (xs + Ops::k(0.5)));
                        const V sigma = splat_sigma(dx, dy, ca, cb, cc);
                        V vis, alpha_raw, alpha;
                        splat_opacity(sigma, op, &vis, &alpha_raw, &alpha);
                        const V Tp = vload<V>(trans.data() + o);
                        const M dn = vload<M>(done.data() + o);
                        const M ok = splat_visible(sigma, alpha) & (xs <= vx1) & (dn == 0);
                        const V next_T = Tp * (Ops::k(1.0) - alpha);
                        const M cont = transmittance_continues(next_T);
                        const M blend = ok & cont;
                        const M stop = ok & ~cont;
                        const V w = alpha * Tp;
                        for (int64_t d = 0; d < D; ++d) {
                            T* a_ptr = acc.data() + d * PS + o;
                            const V a = vload<V>(a_ptr);
                            vstore(a_ptr, blend ? a + w * f[d] : a);
                        }
                        vstore(trans.data() + o, blend ? next_T : Tp);
                        vstore(last.data() + o, blend ? li : vload<M>(last.data() + o));
                        vstore(done.data() + o, dn | stop);
                        stops -= stop;  // stop lanes are -1
                        if (box && any_lane(stop))  // box == 0: no masks for this tile width
                            for (int i = 0; i < W; ++i)
                                if (stop[i]) row_done[yy] |= RowMask(1) << (xx + i);
                    }
                }
                for (int i = 0; i < W; ++i) n_done += stops[i];
            }
            const T* bg = background + geo.camera * D;
            for (int64_t yy = 0; yy < geo.h; ++yy) {
                for (int64_t xx = 0; xx < geo.w; ++xx) {
                    const int64_t o = yy * RS + xx;
                    const int64_t pix = (geo.camera * height + geo.y0 + yy) * width + geo.x0 + xx;
                    T* out = image + pix * D;
                    for (int64_t d = 0; d < D; ++d) out[d] = acc[d * PS + o] + trans[o] * bg[d];
                    alpha_out[pix] = T(1) - trans[o];
                    final_T[pix] = trans[o];
                    last_index[pix] = last[o] >= 0 ? start + int64_t(last[o]) : -1;
                }
            }
        }
    }
}

// Backward, one tile at a time: splats back to front (from the largest last index in the tile),
// each pixel joining at its own last index with its final T and recovering the transmittance in
// front of each splat as T_i = T_{i+1} / (1 - alpha_i). A splat's gradient is summed over its
// pixels in SIMD lanes, then over lanes in a fixed order, and written once to its intersection
// row: nothing is shared between threads and the result does not depend on their number.
template <typename T, int DT>
void composite_backward_impl(int64_t C, int64_t N, int64_t D_runtime, int64_t M_isect, const T* means2d,
                             const T* conics, const T* opacities, const T* features, const T* background,
                             const int64_t* gaussian_ids, const int64_t* tile_offsets, int width, int height,
                             int tiles_x, int tiles_y, int tile_size, const T* final_T, const int64_t* last_index,
                             const T* v_image, const T* v_alpha, T* v_means2d, T* v_conics, T* v_opacities,
                             T* v_features, int nt) {
    using V = typename Simd<T>::V;
    using M = typename Simd<T>::M;
    using I = typename Simd<T>::I;
    using Ops = LaneOps<V>;
    constexpr int W = Simd<T>::W;
    const int64_t D = DT > 0 ? DT : D_runtime;
    const int64_t K = 6 + D;  // per intersection row: mean2d (2), conic (3), opacity (1), features (D)
    const int64_t num_tiles = C * int64_t(tiles_x) * tiles_y;
    const int64_t RS = tile_size + W;
    const int64_t PS = int64_t(tile_size) * RS;
    const int64_t chunks = (tile_size + W - 1) / W;
    // Up to 4 channels (RGB + depth) the per-splat feature sums live in registers like the six
    // geometry sums; more channels accumulate in the lanes buffer.
    constexpr int kRegisterChannels = 4;
    const bool features_in_registers = D <= kRegisterChannels;
    std::vector<T> rows(size_t(M_isect * K));
    const std::vector<int> boxes = splat_boxes(C * N, means2d, conics, opacities, nt);

#pragma omp parallel num_threads(nt)
    {
        TileSplats<T> splats;
        std::vector<T> trans(PS), t_final(PS), g(PS * D), g_bg(PS), g_behind(PS), va(PS);
        std::vector<I> last(PS);
        std::vector<T> lanes(K * chunks * W);  // plain T storage: see vload/vstore
        const V lane = iota<V>();
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
            std::fill(trans.begin(), trans.end(), T(1));
            std::fill(t_final.begin(), t_final.end(), T(1));
            std::fill(g.begin(), g.end(), T(0));
            std::fill(g_bg.begin(), g_bg.end(), T(0));
            std::fill(g_behind.begin(), g_behind.end(), T(0));
            std::fill(va.begin(), va.end(), T(0));
            std::fill(last.begin(), last.end(), I(-1));
            int64_t max_last = -1;
            for (int64_t yy = 0; yy < geo.h; ++yy) {
                for (int64_t xx = 0; xx < geo.w; ++xx) {
                    const int64_t o = yy * RS + xx;
                    const int64_t pix = (geo.camera * height + geo.y0 + yy) * width + geo.x0 + xx;
                    const int64_t li = last_index[pix] >= start ? last_index[pix] - start : -1;
                    last[o] = I(li);
                    max_last = std::max(max_last, li);
                    trans[o] = t_final[o] = final_T[pix];
                    va[o] = v_alpha[pix];
                    T gb = T(0);
                    for (int64_t d = 0; d < D; ++d) {
                        g[d * PS + o] = v_image[pix * D + d];
                        gb += v_image[pix * D + d] * bg[d];
                    }
                    g_bg[o] = gb;
                }
            }
            if (max_last < 0) continue;
            splats.gather(gaussian_ids + start, max_last + 1, D, means2d, conics, opacities, features, boxes.data(),
                          geo.x0, geo.y0, geo.w, geo.h);
            const V gx0 = Ops::k(double(geo.x0));
            for (int64_t l = max_last; l >= 0; --l) {
                const int x0 = splats.bx0[l], x1 = splats.bx1[l];
                if (x0 > x1 || splats.by0[l] > splats.by1[l]) continue;
                const V mx = V{} + splats.mx[l], ca = V{} + splats.ca[l], cb = V{} + splats.cb[l];
                const V cc = V{} + splats.cc[l], op = V{} + splats.op[l];
                const V vx1 = Ops::k(double(x1));
                const M li = M{} + I(l);
                const T* f = splats.feat.data() + l * D;
                if (!features_in_registers) std::fill(lanes.begin(), lanes.end(), T(0));
                // Column chunks outer, rows inner: each lane slot still sums its rows top to bottom (the
                // same order, so the same bits), while the six fixed sums stay in registers.
                const int64_t ks = chunks * W;
                for (int xx = x0, c = 0; xx <= x1; xx += W, ++c) {
                    const V xs = Ops::k(double(xx)) + lane;
                    const V dx = mx - (gx0 + (xs + Ops::k(0.5)));
                    T* ln = lanes.data() + c * W;  // lane sums of row k at ln + k * ks
                    V s_mx = V{}, s_my = V{}, s_ca = V{}, s_cb = V{}, s_cc = V{}, s_op = V{};
                    V s_f[kRegisterChannels] = {};
                    const M in_box = xs <= vx1;
                    for (int64_t yy = splats.by0[l]; yy <= splats.by1[l]; ++yy) {
                        // Pixels join the walk at their own last index; a chunk row where none has
                        // joined yet would add only zeros.
                        const M joined = in_box & (li <= vload<M>(last.data() + yy * RS + xx));
                        if (!any_lane(joined)) continue;
                        const V dy = V{} + (splats.my[l] - (T(geo.y0) + (T(yy) + T(0.5))));
                        const int64_t o = yy * RS + xx;
                        const V sigma = splat_sigma(dx, dy, ca, cb, cc);
                        V vis, alpha_raw, alpha;
                        splat_opacity(sigma, op, &vis, &alpha_raw, &alpha);
                        const M ok = splat_visible(sigma, alpha) & joined;
                        const V Tn = vload<V>(trans.data() + o);
                        const V T_i = Tn / (Ops::k(1.0) - alpha);
                        V g_f = V{};
                        for (int64_t d = 0; d < D; ++d) g_f += vload<V>(g.data() + d * PS + o) * f[d];
                        const V gbh = vload<V>(g_behind.data() + o);
                        const V v_al = blend_alpha_vjp(alpha, T_i, g_f, gbh, vload<V>(g_bg.data() + o),
                                                       vload<V>(va.data() + o), vload<V>(t_final.data() + o));
                        const V w = alpha * T_i;
                        const V v_eff = (ok & alpha_unclamped(alpha_raw)) ? v_al : V{};
                        V dmx, dmy, dca, dcb, dcc;
                        splat_sigma_vjp(-v_eff * op * vis, dx, dy, ca, cb, cc, &dmx, &dmy, &dca, &dcb, &dcc);
                        s_mx += dmx;
                        s_my += dmy;
                        s_ca += dca;
                        s_cb += dcb;
                        s_cc += dcc;
                        s_op += v_eff * vis;
                        if (features_in_registers) {
                            for (int d = 0; d < kRegisterChannels; ++d)
                                if (d < D) s_f[d] += ok ? w * vload<V>(g.data() + d * PS + o) : V{};
                        } else {
                            for (int64_t d = 0; d < D; ++d)
                                vadd(ln + (6 + d) * ks, ok ? w * vload<V>(g.data() + d * PS + o) : V{});
                        }
                        vstore(g_behind.data() + o, ok ? gbh + w * g_f : gbh);
                        vstore(trans.data() + o, ok ? T_i : Tn);
                    }
                    vstore(ln + 0 * ks, s_mx);
                    vstore(ln + 1 * ks, s_my);
                    vstore(ln + 2 * ks, s_ca);
                    vstore(ln + 3 * ks, s_cb);
                    vstore(ln + 4 * ks, s_cc);
                    vstore(ln + 5 * ks, s_op);
                    if (features_in_registers)
                        for (int d = 0; d < kRegisterChannels; ++d)
                            if (d < D) vstore(ln + (6 + d) * ks, s_f[d]);
                }
                T* r = tile_rows + l * K;
                const int used_chunks = (x1 - x0) / W + 1;
                for (int64_t k = 0; k < K; ++k) {
                    T sum = T(0);
                    for (int i = 0; i < used_chunks * W; ++i) sum += lanes[k * chunks * W + i];
                    r[k] = sum;
                }
            }
        }
    }

    // Sum intersection rows per Gaussian in intersection order (counting sort by Gaussian id).
    const int64_t G = C * N;
    std::vector<int64_t> begin(size_t(G + 1), 0);
    for (int64_t k = 0; k < M_isect; ++k) ++begin[gaussian_ids[k] + 1];
    for (int64_t gi = 0; gi < G; ++gi) begin[gi + 1] += begin[gi];
    std::vector<int64_t> order(static_cast<size_t>(M_isect));
    {
        std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
        for (int64_t k = 0; k < M_isect; ++k) order[fill[gaussian_ids[k]]++] = k;
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

namespace {

// Channel count: the kernels take DT > 0 to fix D at compile time, but measured on the garden
// scene the runtime-D build (DT = 0: the channel loops run over whole SIMD vectors anyway) is
// within ~5% of fixed D = 1, 3, 4, so only it is instantiated (a third of the compile time).
#define FK_DISPATCH_D(D, FN, ...) FN<T, 0>(__VA_ARGS__);

// Entry points of this translation unit's instantiation (argument lists as in rasterize_cpu.h).
template <typename T>
struct CompositeKernels {
    static void forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics, const T* opacities,
                        const T* features, const T* background, const int64_t* gaussian_ids,
                        const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y, int tile_size,
                        T* image, T* alpha, T* final_T, int64_t* last_index, int nt) {
        FK_DISPATCH_D(D, composite_forward_impl, C, N, D, means2d, conics, opacities, features, background,
                      gaussian_ids, tile_offsets, width, height, tiles_x, tiles_y, tile_size, image, alpha, final_T,
                      last_index, nt)
    }
    static void backward(int64_t C, int64_t N, int64_t D, int64_t M, const T* means2d, const T* conics,
                         const T* opacities, const T* features, const T* background, const int64_t* gaussian_ids,
                         const int64_t* tile_offsets, int width, int height, int tiles_x, int tiles_y, int tile_size,
                         const T* final_T, const int64_t* last_index, const T* v_image, const T* v_alpha,
                         T* v_means2d, T* v_conics, T* v_opacities, T* v_features, int nt) {
        FK_DISPATCH_D(D, composite_backward_impl, C, N, D, M, means2d, conics, opacities, features, background,
                      gaussian_ids, tile_offsets, width, height, tiles_x, tiles_y, tile_size, final_T, last_index,
                      v_image, v_alpha, v_means2d, v_conics, v_opacities, v_features, nt)
    }
};

#undef FK_DISPATCH_D

}  // namespace
