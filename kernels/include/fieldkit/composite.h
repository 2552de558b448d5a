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
    if (sigma < T(0)) return false;
    const T vis = fk_exp(-sigma);
    const T alpha_raw = opacity * vis;
    const T alpha = fk_min(alpha_raw, CompositeConstants<T>::alpha_max());
    if (alpha < CompositeConstants<T>::alpha_min()) return false;
    *dx_out = dx;
    *dy_out = dy;
    *vis_out = vis;
    *alpha_raw_out = alpha_raw;
    *alpha_out = alpha;
    return true;
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
