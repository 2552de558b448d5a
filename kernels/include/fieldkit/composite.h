// Per-pixel front-to-back alpha compositing of screen-space Gaussians, and its VJP.
// Mirrors fieldkit/render/composite.py (the torch reference):
//
//   pixel (row i, col j) sampled at (j + 0.5, i + 0.5);  d = mean2d - pixel
//   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy            skip if sigma < 0
//   alpha = min(0.999, opacity exp(-sigma))            skip if alpha < 1/255
//   next_T = T (1 - alpha); stop (Gaussian not added) if next_T <= 1e-4
//   out += feature alpha T;  T = next_T
//   image = out + T background;  pixel alpha = 1 - T
//
// The clamp at 0.999 follows torch.clamp: gradient 0 w.r.t. opacity and sigma when
// opacity exp(-sigma) > 0.999 (strictly), passed through otherwise.
//
// "Lane-generic" functions below are templates over a lane type L: a scalar (float, double;
// CUDA and scalar CPU code) or a SIMD vector of them (the CPU backend adds LaneOps
// specialisations for GCC vector types). They use only arithmetic, comparisons and ?: so the
// same source serves both; comparisons give bool for scalars and lane masks for vectors.
#pragma once

#include "fieldkit/common.h"

namespace fieldkit {

// Per-lane-type helpers: broadcast constant, exp for the falloff, 2^n.
template <typename L>
struct LaneOps;

// ---------------------------------------------------------------------------------------------
// exp(x) for the splat falloff, x = -sigma. float lanes: a portable polynomial (Cody-Waite
// range reduction, degree-7 Taylor on |r| <= ln2/2; at most ~1.2 ulp from the exact value)
// without branches or calls, so SIMD lanes, scalar code and the CUDA build compute the same
// value. The input is clamped to [-87, 0]: sigma < 0 (or NaN) is skipped by the caller anyway,
// and below -87 alpha is far under 1/255. double lanes: libm exp.
// ---------------------------------------------------------------------------------------------
FK_HD float fk_bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
    return __int_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
#endif
}

template <typename L>
FK_HD L splat_exp_poly(L x) {
    using Ops = LaneOps<L>;
    x = fk_min(fk_max(x, Ops::k(-87.0)), Ops::k(0.0));  // also maps NaN to -87 (fk_max(NaN, a) = a)
    const L shifter = Ops::k(12582912.0);                 // 1.5 * 2^23: x * log2(e) + shifter rounds
    const L t = x * Ops::k(1.44269504088896341) + shifter;
    const L n = t - shifter;                                                          // round(x / ln 2)
    const L r = (x - n * Ops::k(0.693145751953125)) - n * Ops::k(1.428606820309417e-06);  // x - n ln 2
    // Degree-7 Taylor polynomial of exp(r), |r| <= ln 2 / 2, in Estrin's form: four independent
    // pairs, then two levels, so its latency is about half of Horner's chain of seven.
    const L r2 = r * r;
    const L r4 = r2 * r2;
    const L p01 = Ops::k(1.0) + r;
    const L p23 = Ops::k(0.5) + r * Ops::k(1.0 / 6.0);
    const L p45 = Ops::k(1.0 / 24.0) + r * Ops::k(1.0 / 120.0);
    const L p67 = Ops::k(1.0 / 720.0) + r * Ops::k(1.0 / 5040.0);
    const L p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
    return p * Ops::pow2(n);  // n integral in [-126, 0]
}

template <>
struct LaneOps<float> {
    static FK_HD float k(double v) { return float(v); }
    static FK_HD float pow2(float n) { return fk_bits_to_float((int32_t(n) + 127) << 23); }
    static FK_HD float exp(float x) { return splat_exp_poly(x); }
};

template <>
struct LaneOps<double> {
    static FK_HD double k(double v) { return v; }
    static FK_HD double exp(double x) { return ::exp(x); }
};

// ---------------------------------------------------------------------------------------------
// Lane-generic compositing math.
// ---------------------------------------------------------------------------------------------

// Gaussian falloff sigma = 0.5 (a dx^2 + c dy^2) + b dx dy at offset d = mean2d - pixel
// (operation order as in the reference).
template <typename L>
FK_HD L splat_sigma(L dx, L dy, L ca, L cb, L cc) {
    return LaneOps<L>::k(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
}

// vis = exp(-sigma); alpha_raw = opacity vis; alpha = min(0.999, alpha_raw).
template <typename L>
FK_HD void splat_opacity(L sigma, L opacity, L* vis, L* alpha_raw, L* alpha) {
    *vis = LaneOps<L>::exp(-sigma);
    *alpha_raw = opacity * *vis;
    *alpha = fk_min(*alpha_raw, LaneOps<L>::k(kAlphaMax));
}

// Blended at all? sigma >= 0 and alpha >= 1/255 (NaN fails both, as in the reference).
template <typename L>
FK_HD auto splat_visible(L sigma, L alpha) {
    return (sigma >= LaneOps<L>::k(0.0)) & (alpha >= LaneOps<L>::k(kAlphaMin));
}

// The walk goes on while the transmittance after this splat stays above 1e-4; otherwise the
// splat is not blended and the pixel is finished.
template <typename L>
FK_HD auto transmittance_continues(L next_T) {
    return next_T > LaneOps<L>::k(kTransmittanceMin);
}

// torch.clamp(max=0.999) passes the gradient where its input is <= 0.999.
template <typename L>
FK_HD auto alpha_unclamped(L alpha_raw) {
    return alpha_raw <= LaneOps<L>::k(kAlphaMax);
}

// Gradient of the composited pixel w.r.t. one splat's alpha, walking back to front.
//   T_i      transmittance in front of this splat
//   g_f      <dL/dimage, feature_i>
//   g_behind <dL/dimage, sum_{j>i} feature_j alpha_j T_j>  (contributions behind this one)
//   g_bg     <dL/dimage, background>,  v_alpha = dL/d(pixel alpha),  T_final = final transmittance
// Everything behind i (and the background, and 1 - pixel alpha) scales with (1 - alpha_i).
template <typename L>
FK_HD L blend_alpha_vjp(L alpha, L T_i, L g_f, L g_behind, L g_bg, L v_alpha, L T_final) {
    return T_i * g_f - (g_behind + T_final * g_bg - v_alpha * T_final) / (LaneOps<L>::k(1.0) - alpha);
}

// VJP of sigma w.r.t. mean2d (through d = mean2d - pixel) and the conic (a, b, c).
template <typename L>
FK_HD void splat_sigma_vjp(L v_sigma, L dx, L dy, L ca, L cb, L cc, L* dmx, L* dmy, L* dca, L* dcb, L* dcc) {
    const L half = LaneOps<L>::k(0.5);
    *dca = half * v_sigma * dx * dx;
    *dcb = v_sigma * dx * dy;
    *dcc = half * v_sigma * dy * dy;
    *dmx = v_sigma * (ca * dx + cb * dy);
    *dmy = v_sigma * (cb * dx + cc * dy);
}

// ---------------------------------------------------------------------------------------------
// Scalar conveniences (one pixel, one splat), e.g. for the CUDA kernels.
// ---------------------------------------------------------------------------------------------

// Returns false when the splat is skipped at pixel centre (px, py).
template <typename T>
FK_HD bool splat_alpha(T mx, T my, T ca, T cb, T cc, T opacity, T px, T py, T* dx_out, T* dy_out, T* vis_out,
                       T* alpha_raw_out, T* alpha_out) {
    *dx_out = mx - px;
    *dy_out = my - py;
    const T sigma = splat_sigma(*dx_out, *dy_out, ca, cb, cc);
    splat_opacity(sigma, opacity, vis_out, alpha_raw_out, alpha_out);
    return bool(splat_visible(sigma, *alpha_out));
}

template <typename T>
FK_HD bool transmittance_exhausted(T next_T) {
    return !transmittance_continues(next_T);
}

// Gradient of alpha w.r.t. mean2d, conic, opacity given dL/dalpha; accumulates (+=).
template <typename T>
FK_HD void splat_alpha_vjp(T dx, T dy, T ca, T cb, T cc, T opacity, T vis, T alpha_raw, T v_alpha_g, T dmean[2],
                           T dconic[3], T* dopacity) {
    if (!alpha_unclamped(alpha_raw)) return;  // clamped: torch.clamp passes no gradient
    *dopacity += v_alpha_g * vis;
    T dmx, dmy, dca, dcb, dcc;
    splat_sigma_vjp(-v_alpha_g * opacity * vis, dx, dy, ca, cb, cc, &dmx, &dmy, &dca, &dcb, &dcc);
    dmean[0] += dmx;
    dmean[1] += dmy;
    dconic[0] += dca;
    dconic[1] += dcb;
    dconic[2] += dcc;
}

// Conservative pixel box of a splat: pixels (global column X, row Y; centre X+0.5, Y+0.5) outside
// [x0,x1] x [y0,y1] have opacity exp(-sigma) below 1/255 with a margin, so they are skipped
// anyway. Used to visit only the pixels a splat can touch; forward and backward use the same box,
// so they always agree on which (pixel, splat) pairs are evaluated. Returns false when the box is
// empty. A conic that is not positive definite gives the unbounded box (caller clamps to the tile).
// C is the compute type of the bound (double on CPU).
template <typename C, typename T>
FK_HD bool splat_pixel_box(T mx, T my, T ca, T cb, T cc, T opacity, int* x0, int* x1, int* y0, int* y1) {
    const C op = C(opacity);
    // alpha <= opacity (sigma >= 0), so below 1/255 the splat is never blended (margin: rounding).
    if (!(op * C(255) >= C(0.999))) return false;
    C tau = log(C(255) * op);  // sigma must stay below tau for alpha >= 1/255
    tau = fk_max(tau + C(1e-3) * (tau < C(0) ? -tau : tau) + C(1e-2), C(1e-2));
    const C a = C(ca), b = C(cb), c = C(cc);
    const C det = a * c - b * b;
    const int kBig = 1 << 30;
    *x0 = *y0 = -kBig;
    *x1 = *y1 = kBig;
    if (a > C(0) && c > C(0) && det > C(0)) {
        // Ellipse 0.5 d^T Q d <= tau: half extents sqrt(2 tau (Q^-1)_xx), sqrt(2 tau (Q^-1)_yy), + 1 px.
        const C ex = sqrt(C(2) * tau * c / det) + C(1);
        const C ey = sqrt(C(2) * tau * a / det) + C(1);
        if (ex < C(1e8) && ey < C(1e8) && fabs(C(mx)) < C(1e8) && fabs(C(my)) < C(1e8)) {
            *x0 = int(ceil(C(mx) - ex - C(0.5)));
            *x1 = int(floor(C(mx) + ex - C(0.5)));
            *y0 = int(ceil(C(my) - ey - C(0.5)));
            *y1 = int(floor(C(my) + ey - C(0.5)));
        }
    }
    return *x0 <= *x1 && *y0 <= *y1;
}

}  // namespace fieldkit
