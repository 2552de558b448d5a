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
#pragma once

#include "fieldkit/common.h"

namespace fieldkit {

// Thresholds in the compute type, as torch compares a float32 tensor with a Python float.
template <typename T>
struct CompositeConstants {
    static constexpr T alpha_max() { return T(kAlphaMax); }
    static constexpr T alpha_min() { return T(kAlphaMin); }
    static constexpr T transmittance_min() { return T(kTransmittanceMin); }
};

// One Gaussian at one pixel. Returns false when it is skipped (sigma < 0 or alpha < 1/255).
// vis = exp(-sigma); alpha_raw = opacity vis (before the clamp); alpha = min(0.999, alpha_raw).
template <typename T>
FK_HD bool splat_alpha(T mx, T my, T ca, T cb, T cc, T opacity, T px, T py, T* dx_out, T* dy_out, T* vis_out,
                       T* alpha_raw_out, T* alpha_out) {
    const T dx = mx - px;
    const T dy = my - py;
    const T sigma = T(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
    if (!(sigma >= T(0))) return false;  // written so that NaN is skipped, as in the reference
    const T vis = fk_exp(-sigma);
    const T alpha_raw = opacity * vis;
    const T alpha = fk_min(alpha_raw, CompositeConstants<T>::alpha_max());
    if (!(alpha >= CompositeConstants<T>::alpha_min())) return false;
    *dx_out = dx;
    *dy_out = dy;
    *vis_out = vis;
    *alpha_raw_out = alpha_raw;
    *alpha_out = alpha;
    return true;
}

// Transmittance stop: true when the Gaussian that would bring T to next_T must not be blended
// (and the pixel is finished).
template <typename T>
FK_HD bool transmittance_exhausted(T next_T) {
    return !(next_T > CompositeConstants<T>::transmittance_min());
}

// Conservative pixel box of a splat: pixels (global column X, row Y; centre X+0.5, Y+0.5) outside
// [x0,x1] x [y0,y1] have opacity exp(-sigma) below 1/255 with a margin, so splat_alpha would skip
// them. Used to visit only the pixels a splat can touch; forward and backward use the same box,
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
        // Ellipse 0.5 d^T Q d <= tau: half extents sqrt(2 tau (Q^-1)_xx), sqrt(2 tau (Q^-1)_yy), + 1 px margin.
        const C ex = sqrt(C(2) * tau * c / det) + C(1);
        const C ey = sqrt(C(2) * tau * a / det) + C(1);
        if (ex < C(1e8) && ey < C(1e8) && C(mx) == C(mx) && C(my) == C(my) && fabs(C(mx)) < C(1e8) && fabs(C(my)) < C(1e8)) {
            *x0 = int(ceil(C(mx) - ex - C(0.5)));
            *x1 = int(floor(C(mx) + ex - C(0.5)));
            *y0 = int(ceil(C(my) - ey - C(0.5)));
            *y1 = int(floor(C(my) + ey - C(0.5)));
        }
    }
    return *x0 <= *x1 && *y0 <= *y1;
}

// Gradient of the composited pixel w.r.t. one Gaussian's alpha, walking back to front.
//   T_i      transmittance before this Gaussian
//   g_f      <dL/dimage, feature_i>
//   g_behind <dL/dimage, sum_{j>i} feature_j alpha_j T_j>  (contributions behind this one)
//   g_bg     <dL/dimage, background>,  v_alpha = dL/d(pixel alpha),  T_final = final transmittance
// Everything behind i (and the background, and 1 - alpha) scales with (1 - alpha_i).
template <typename T>
FK_HD T blend_alpha_vjp(T alpha, T T_i, T g_f, T g_behind, T g_bg, T v_alpha, T T_final) {
    return T_i * g_f - (g_behind + T_final * g_bg - v_alpha * T_final) / (T(1) - alpha);
}

// Gradient of alpha = min(0.999, opacity exp(-sigma(mean2d, conic))) w.r.t. mean2d, conic,
// opacity, given dL/dalpha. Accumulates into the outputs (+=).
template <typename T>
FK_HD void splat_alpha_vjp(T dx, T dy, T ca, T cb, T cc, T opacity, T vis, T alpha_raw, T v_alpha_g, T dmean[2],
                           T dconic[3], T* dopacity) {
    if (alpha_raw > CompositeConstants<T>::alpha_max()) return;  // clamped: torch.clamp passes no gradient
    *dopacity += v_alpha_g * vis;
    const T v_sigma = -v_alpha_g * opacity * vis;
    dconic[0] += T(0.5) * v_sigma * dx * dx;
    dconic[1] += v_sigma * dx * dy;
    dconic[2] += T(0.5) * v_sigma * dy * dy;
    dmean[0] += v_sigma * (ca * dx + cb * dy);
    dmean[1] += v_sigma * (cb * dx + cc * dy);
}

}  // namespace fieldkit
