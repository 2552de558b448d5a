// Per-entry math of the 3DGS-LM gradient cache, shared by the CPU build (kernels/lm/lm_cache_cpu.cpp)
// and the CUDA build (kernels/lm/lm_cache_cuda.cu), so the two cannot drift: both call these
// functions with the same arguments in the same order (and compile without FMA contraction), so
// per entry they compute the same values bit for bit; only the order of the per-pair sums differs.
//
// A cache entry is one blended (pixel, pair): w = alpha T (colour weight), a = alpha where the
// 0.999 clamp is inactive else 0, dc = dC/dalpha (3). The derivatives of alpha w.r.t. the pair's
// 2D mean, conic and opacity are recomputed from the pixel position:
//   d alpha / d sigma = -a,  d alpha / d opacity = a / opacity,  sigma = 0.5 (a dx^2 + c dy^2) + b dx dy.
// Pair quantities q = (mean x, mean y, conic a, b, c, opacity, r, g, b).
#pragma once

#include "fieldkit/common.h"

// Fully unrolled fixed-trip loops in device code (the accumulators stay in registers); host
// compilers choose for themselves. Unrolling changes no floating-point operation or its order.
#if defined(__CUDA_ARCH__)
#define FK_UNROLL _Pragma("unroll")
#else
#define FK_UNROLL
#endif

namespace fieldkit {
namespace lm {

// d sigma / d (mean x, mean y, conic a, b, c) for conic (a, b, c) at the pixel with index `local`
// (row-major) of a width-wide image: offset d = mean2d - pixel centre.
template <typename T>
FK_HD void sigma_partials(T mx, T my, int64_t local, int64_t width, T a, T b, T c, T g[5]) {
    const T dx = mx - (T(local % width) + T(0.5));
    const T dy = my - (T(local / width) + T(0.5));
    g[0] = a * dx + b * dy;   // d sigma / d mean x
    g[1] = b * dx + c * dy;   // d sigma / d mean y
    g[2] = T(0.5) * dx * dx;  // d sigma / d a
    g[3] = dx * dy;           // d sigma / d b
    g[4] = T(0.5) * dy * dy;  // d sigma / d c
}

// One step of a pixel's back-to-front sweep: dC/dalpha of the entry with alpha, transmittance in
// front T_before and colour, given S = sum of w c behind it plus T_final background; then adds
// its own w c to S.
template <typename T>
FK_HD void sweep_entry(T alpha, T T_before, const T* color, T S[3], T* dc) {
    const T wgt = alpha * T_before;
    for (int d = 0; d < 3; ++d) {
        dc[d] = T_before * color[d] - S[d] / (T(1) - alpha);
        S[d] += wgt * color[d];
    }
}

// J p: the colour tangent of one entry for the pair tangent q [9]; dop = q[5] / opacity.
template <typename T>
FK_HD void entry_jvp(const T g[5], const T* q, T dop, T a, T w, const T* dc, T out[3]) {
    const T dsigma = g[0] * q[0] + g[1] * q[1] + g[2] * q[2] + g[3] * q[3] + g[4] * q[4];
    const T dalpha = a * (dop - dsigma);
    for (int d = 0; d < 3; ++d) out[d] = dc[d] * dalpha + w * q[6 + d];
}

// J^T u: adds one entry's contribution for the pixel cotangent u [3] to acc [9] (double).
// acc[5] collects d/d opacity times the opacity: the caller divides by it once per pair.
template <typename T>
FK_HD void entry_vjp(const T g[5], T a, T w, const T* dc, const T* u, double acc[9]) {
    const T galpha = dc[0] * u[0] + dc[1] * u[1] + dc[2] * u[2];
    const T gsigma = -galpha * a;
    FK_UNROLL
    for (int j = 0; j < 5; ++j) acc[j] += gsigma * g[j];
    acc[5] += galpha * a;
    FK_UNROLL
    for (int d = 0; d < 3; ++d) acc[6 + d] += w * u[d];
}

// Index of (r, c), r <= c, in the row-major upper triangle of a 9x9 matrix (45 values).
FK_HD constexpr int packed9(int r, int c) { return r * 9 - r * (r - 1) / 2 + (c - r); }

// Adds one entry's (dC/dq)^T W (dC/dq) to the upper triangle (c >= r) of H (double), W the pixel's
// symmetric 3x3 weight as 6 values (w00, w01, w02, w11, w12, w22); inv_op = 1 / opacity. The lower
// triangle is not touched; the callers pack the upper one (packed9) when storing.
template <typename T>
FK_HD void entry_hessian(const T g[5], T a, double inv_op, T w, const T* dc, const T* W6, double H[9][9]) {
    const double Wm[3][3] = {{W6[0], W6[1], W6[2]}, {W6[1], W6[3], W6[4]}, {W6[2], W6[4], W6[5]}};
    double G[6];  // d alpha / d (mean x, mean y, a, b, c, opacity)
    FK_UNROLL
    for (int j = 0; j < 5; ++j) G[j] = -double(a) * g[j];
    G[5] = double(a) * inv_op;
    const double d[3] = {dc[0], dc[1], dc[2]};
    double Wd[3];
    FK_UNROLL
    for (int r = 0; r < 3; ++r) Wd[r] = Wm[r][0] * d[0] + Wm[r][1] * d[1] + Wm[r][2] * d[2];
    const double s = d[0] * Wd[0] + d[1] * Wd[1] + d[2] * Wd[2];
    const double we = w;
    FK_UNROLL
    for (int r = 0; r < 6; ++r) {
        const double sg = s * G[r];
        FK_UNROLL
        for (int c = r; c < 6; ++c) H[r][c] += sg * G[c];
        const double gw = G[r] * we;
        FK_UNROLL
        for (int c = 0; c < 3; ++c) H[r][6 + c] += gw * Wd[c];
    }
    const double w2 = we * we;
    FK_UNROLL
    for (int r = 0; r < 3; ++r)
        FK_UNROLL
        for (int c = r; c < 3; ++c) H[6 + r][6 + c] += w2 * Wm[r][c];
}

}  // namespace lm
}  // namespace fieldkit
