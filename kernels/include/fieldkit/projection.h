// Projection of one 3D Gaussian into one pinhole camera (EWA splatting), and its
// vector-Jacobian products. Mirrors fieldkit/render/projection.py (the torch reference):
//
//   p = R mean + t                         (world -> camera, OpenCV axes)
//   culled if p.z <= near or p.z >= far
//   Sigma  = Rq diag(s^2) Rq^T             (Rq from the normalised quaternion w,x,y,z)
//   Sigma_c = R Sigma R^T
//   u = clamp(x/z, -lim_neg, lim_pos) (1.3 x half FOV), tx = z u (same for y)
//   J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]
//   cov2d = J Sigma_c J^T + eps2d I;  culled if det <= 0;  conic = cov2d^-1 (a, b, c)
//   mean2d = (fx x/z + cx, fy y/z + cy)    (mean not clamped)
//   radius = ceil(3 sqrt(diag(cov2d)));  culled if the box misses [0,W] x [0,H]
//
// Culled Gaussians get radii 0 and zero outputs; their gradients are zero.
#pragma once

#include "fieldkit/common.h"

namespace fieldkit {

template <typename T>
struct PinholeCamera {
    Mat3<T> R;  // world -> camera rotation
    Vec3<T> t;  // world -> camera translation
    T fx, fy, cx, cy;
    T lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;  // clamp of x/z, y/z for the Jacobian
    int width, height;
};

// viewmat: 16 values (row-major 4x4 world->camera); K: 9 values (row-major 3x3).
template <typename T, typename S>
FK_HD PinholeCamera<T> make_pinhole_camera(const S* viewmat, const S* K, int width, int height) {
    PinholeCamera<T> cam;
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) cam.R.m[i][j] = T(viewmat[4 * i + j]);
    }
    cam.t = Vec3<T>{T(viewmat[3]), T(viewmat[7]), T(viewmat[11])};
    cam.fx = T(K[0]);
    cam.fy = T(K[4]);
    cam.cx = T(K[2]);
    cam.cy = T(K[5]);
    const T tan_fovx = T(0.5) * T(width) / cam.fx;
    const T tan_fovy = T(0.5) * T(height) / cam.fy;
    cam.lim_x_pos = (T(width) - cam.cx) / cam.fx + T(kFovClampMargin) * tan_fovx;
    cam.lim_x_neg = cam.cx / cam.fx + T(kFovClampMargin) * tan_fovx;
    cam.lim_y_pos = (T(height) - cam.cy) / cam.fy + T(kFovClampMargin) * tan_fovy;
    cam.lim_y_neg = cam.cy / cam.fy + T(kFovClampMargin) * tan_fovy;
    cam.width = width;
    cam.height = height;
    return cam;
}

// ---------------------------------------------------------------------------------------------
// Quaternion (w, x, y, z; any norm) -> rotation matrix, and its VJP w.r.t. the raw quaternion.
// ---------------------------------------------------------------------------------------------
template <typename T>
FK_HD Mat3<T> quat_to_rotmat(const T q_raw[4]) {
    const T inv_norm = T(1) / fk_sqrt(q_raw[0] * q_raw[0] + q_raw[1] * q_raw[1] + q_raw[2] * q_raw[2] + q_raw[3] * q_raw[3]);
    const T w = q_raw[0] * inv_norm, x = q_raw[1] * inv_norm, y = q_raw[2] * inv_norm, z = q_raw[3] * inv_norm;
    Mat3<T> R;
    R.m[0][0] = T(1) - T(2) * (y * y + z * z);
    R.m[0][1] = T(2) * (x * y - w * z);
    R.m[0][2] = T(2) * (x * z + w * y);
    R.m[1][0] = T(2) * (x * y + w * z);
    R.m[1][1] = T(1) - T(2) * (x * x + z * z);
    R.m[1][2] = T(2) * (y * z - w * x);
    R.m[2][0] = T(2) * (x * z - w * y);
    R.m[2][1] = T(2) * (y * z + w * x);
    R.m[2][2] = T(1) - T(2) * (x * x + y * y);
    return R;
}

// dq (w.r.t. the unnormalised quaternion) from dR.
template <typename T>
FK_HD void quat_to_rotmat_vjp(const T q_raw[4], const Mat3<T>& dR, T dq_raw[4]) {
    const T inv_norm = T(1) / fk_sqrt(q_raw[0] * q_raw[0] + q_raw[1] * q_raw[1] + q_raw[2] * q_raw[2] + q_raw[3] * q_raw[3]);
    const T w = q_raw[0] * inv_norm, x = q_raw[1] * inv_norm, y = q_raw[2] * inv_norm, z = q_raw[3] * inv_norm;
    const T(&g)[3][3] = dR.m;
    // Derivatives of the matrix entries w.r.t. the unit quaternion.
    T dw = T(2) * (-z * g[0][1] + y * g[0][2] + z * g[1][0] - x * g[1][2] - y * g[2][0] + x * g[2][1]);
    T dx = T(2) * (y * g[0][1] + z * g[0][2] + y * g[1][0] - T(2) * x * g[1][1] - w * g[1][2] + z * g[2][0] + w * g[2][1] -
                   T(2) * x * g[2][2]);
    T dy = T(2) * (-T(2) * y * g[0][0] + x * g[0][1] + w * g[0][2] + x * g[1][0] + z * g[1][2] - w * g[2][0] + z * g[2][1] -
                   T(2) * y * g[2][2]);
    T dz = T(2) * (-T(2) * z * g[0][0] - w * g[0][1] + x * g[0][2] + w * g[1][0] - T(2) * z * g[1][1] + y * g[1][2] +
                   x * g[2][0] + y * g[2][1]);
    // Through the normalisation qn = q / |q|: dq = (dqn - qn (qn . dqn)) / |q|.
    const T proj = w * dw + x * dx + y * dy + z * dz;
    dq_raw[0] = (dw - w * proj) * inv_norm;
    dq_raw[1] = (dx - x * proj) * inv_norm;
    dq_raw[2] = (dy - y * proj) * inv_norm;
    dq_raw[3] = (dz - z * proj) * inv_norm;
}

// ---------------------------------------------------------------------------------------------
// Quaternion + linear scale -> world covariance Sigma = M M^T, M = Rq diag(s).
// ---------------------------------------------------------------------------------------------
template <typename T>
FK_HD Mat3<T> quat_scale_to_covar(const T q[4], const T s[3]) {
    const Mat3<T> Rq = quat_to_rotmat(q);
    Mat3<T> M;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) M.m[i][j] = Rq.m[i][j] * s[j];
    return mat3_mul_bt(M, M);
}

template <typename T>
FK_HD void quat_scale_to_covar_vjp(const T q[4], const T s[3], const Mat3<T>& dSigma, T dq[4], T ds[3]) {
    const Mat3<T> Rq = quat_to_rotmat(q);
    Mat3<T> M;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) M.m[i][j] = Rq.m[i][j] * s[j];
    // Sigma = M M^T  =>  dM = (dSigma + dSigma^T) M
    const Mat3<T> dM = mat3_mul(mat3_add(dSigma, mat3_transpose(dSigma)), M);
    Mat3<T> dRq;
    for (int j = 0; j < 3; ++j) {
        ds[j] = dM.m[0][j] * Rq.m[0][j] + dM.m[1][j] * Rq.m[1][j] + dM.m[2][j] * Rq.m[2][j];
        for (int i = 0; i < 3; ++i) dRq.m[i][j] = dM.m[i][j] * s[j];
    }
    quat_to_rotmat_vjp(q, dRq, dq);
}

// ---------------------------------------------------------------------------------------------
// World -> camera for the mean and the covariance.
// ---------------------------------------------------------------------------------------------
template <typename T>
FK_HD Vec3<T> world_to_cam_point(const PinholeCamera<T>& cam, const Vec3<T>& m) {
    const Vec3<T> r = mat3_vec(cam.R, m);
    return Vec3<T>{r.x + cam.t.x, r.y + cam.t.y, r.z + cam.t.z};
}

template <typename T>
FK_HD Mat3<T> world_to_cam_covar(const PinholeCamera<T>& cam, const Mat3<T>& Sigma) {
    return mat3_mul_bt(mat3_mul(cam.R, Sigma), cam.R);
}

// VJP of (p = R m + t, Sigma_c = R Sigma R^T). dR/dt may be null (no pose gradient wanted).
template <typename T>
FK_HD void world_to_cam_vjp(const PinholeCamera<T>& cam, const Vec3<T>& m, const Mat3<T>& Sigma, const Vec3<T>& dp,
                            const Mat3<T>& dSigma_c, Vec3<T>* dm, Mat3<T>* dSigma, Mat3<T>* dR, Vec3<T>* dt) {
    *dm = mat3_t_vec(cam.R, dp);
    *dSigma = mat3_mul(mat3_mul_at(cam.R, dSigma_c), cam.R);  // R^T dSc R
    if (dR != nullptr) {
        // dR = dp m^T + dSc R Sigma^T + dSc^T R Sigma
        const Mat3<T> RS = mat3_mul(cam.R, Sigma);
        const Mat3<T> RSt = mat3_mul_bt(cam.R, Sigma);
        const Mat3<T> a = mat3_mul(dSigma_c, RSt);
        const Mat3<T> b = mat3_mul_at(dSigma_c, RS);
        const T pv[3] = {dp.x, dp.y, dp.z};
        const T mv[3] = {m.x, m.y, m.z};
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) dR->m[i][j] = pv[i] * mv[j] + a.m[i][j] + b.m[i][j];
    }
    if (dt != nullptr) *dt = dp;
}

// ---------------------------------------------------------------------------------------------
// EWA perspective projection: camera-space mean/covariance -> pixel mean and 2D covariance
// (upper triangle xx, xy, yy; not yet dilated).
// ---------------------------------------------------------------------------------------------

// Derivative gate of min(max(u, lo), hi) w.r.t. u, with torch's tie rule (half at equality).
template <typename T>
FK_HD T clamp_gate(T u, T lo, T hi) {
    const T g_lo = u > lo ? T(1) : (u == lo ? T(0.5) : T(0));
    const T v = fk_max(u, lo);
    const T g_hi = v < hi ? T(1) : (v == hi ? T(0.5) : T(0));
    return g_lo * g_hi;
}

template <typename T>
FK_HD Mat2x3<T> ewa_jacobian(const PinholeCamera<T>& cam, const Vec3<T>& p, T* tx_out = nullptr, T* ty_out = nullptr) {
    const T z = p.z;
    const T tx = z * fk_min(fk_max(p.x / z, -cam.lim_x_neg), cam.lim_x_pos);
    const T ty = z * fk_min(fk_max(p.y / z, -cam.lim_y_neg), cam.lim_y_pos);
    if (tx_out) *tx_out = tx;
    if (ty_out) *ty_out = ty;
    Mat2x3<T> J;
    J.m[0][0] = cam.fx / z;
    J.m[0][1] = T(0);
    J.m[0][2] = -cam.fx * tx / (z * z);
    J.m[1][0] = T(0);
    J.m[1][1] = cam.fy / z;
    J.m[1][2] = -cam.fy * ty / (z * z);
    return J;
}

template <typename T>
FK_HD void ewa_project(const PinholeCamera<T>& cam, const Vec3<T>& p, const Mat3<T>& Sc, T mean2d[2], T cov2d[3]) {
    const Mat2x3<T> J = ewa_jacobian(cam, p);
    // JS = J Sc (2x3); cov2d = JS J^T
    T JS[2][3];
    for (int a = 0; a < 2; ++a)
        for (int j = 0; j < 3; ++j) JS[a][j] = J.m[a][0] * Sc.m[0][j] + J.m[a][1] * Sc.m[1][j] + J.m[a][2] * Sc.m[2][j];
    cov2d[0] = JS[0][0] * J.m[0][0] + JS[0][1] * J.m[0][1] + JS[0][2] * J.m[0][2];
    cov2d[1] = JS[0][0] * J.m[1][0] + JS[0][1] * J.m[1][1] + JS[0][2] * J.m[1][2];
    cov2d[2] = JS[1][0] * J.m[1][0] + JS[1][1] * J.m[1][1] + JS[1][2] * J.m[1][2];
    mean2d[0] = cam.fx * p.x / p.z + cam.cx;
    mean2d[1] = cam.fy * p.y / p.z + cam.cy;
}

// VJP of ewa_project: (dmean2d, dcov2d[xx, xy, yy], plus ddepth on p.z) -> dp, dSc.
template <typename T>
FK_HD void ewa_project_vjp(const PinholeCamera<T>& cam, const Vec3<T>& p, const Mat3<T>& Sc, const T dmean2d[2],
                           const T dcov2d[3], T ddepth, Vec3<T>* dp, Mat3<T>* dSc) {
    const T x = p.x, y = p.y, z = p.z;
    T tx, ty;
    const Mat2x3<T> J = ewa_jacobian(cam, p, &tx, &ty);
    // cov2d uses entries (0,0), (0,1), (1,1) of J Sc J^T: G is the gradient on that 2x2 matrix.
    const T G[2][2] = {{dcov2d[0], dcov2d[1]}, {T(0), dcov2d[2]}};
    // dSc = J^T G J
    T GJ[2][3];
    for (int a = 0; a < 2; ++a)
        for (int k = 0; k < 3; ++k) GJ[a][k] = G[a][0] * J.m[0][k] + G[a][1] * J.m[1][k];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) dSc->m[i][k] = J.m[0][i] * GJ[0][k] + J.m[1][i] * GJ[1][k];
    // dJ = G J Sc^T + G^T J Sc
    T JSt[2][3], JS[2][3];
    for (int a = 0; a < 2; ++a)
        for (int j = 0; j < 3; ++j) {
            JSt[a][j] = J.m[a][0] * Sc.m[j][0] + J.m[a][1] * Sc.m[j][1] + J.m[a][2] * Sc.m[j][2];
            JS[a][j] = J.m[a][0] * Sc.m[0][j] + J.m[a][1] * Sc.m[1][j] + J.m[a][2] * Sc.m[2][j];
        }
    T dJ[2][3];
    for (int a = 0; a < 2; ++a)
        for (int j = 0; j < 3; ++j)
            dJ[a][j] = G[a][0] * JSt[0][j] + G[a][1] * JSt[1][j] + G[0][a] * JS[0][j] + G[1][a] * JS[1][j];

    const T z2 = z * z, z3 = z2 * z;
    T dx = T(0), dy = T(0), dz = ddepth;
    // J00 = fx/z, J11 = fy/z
    dz += -dJ[0][0] * cam.fx / z2 - dJ[1][1] * cam.fy / z2;
    // J02 = -fx tx / z^2, J12 = -fy ty / z^2
    const T dtx = -dJ[0][2] * cam.fx / z2;
    const T dty = -dJ[1][2] * cam.fy / z2;
    dz += T(2) * dJ[0][2] * cam.fx * tx / z3 + T(2) * dJ[1][2] * cam.fy * ty / z3;
    // tx = z * clamp(x/z): d/dz through the explicit z, and through u = x/z where not clamped.
    {
        const T u = x / z, uc = fk_min(fk_max(u, -cam.lim_x_neg), cam.lim_x_pos);
        const T du = dtx * z * clamp_gate(u, -cam.lim_x_neg, cam.lim_x_pos);
        dz += dtx * uc - du * x / z2;
        dx += du / z;
    }
    {
        const T u = y / z, uc = fk_min(fk_max(u, -cam.lim_y_neg), cam.lim_y_pos);
        const T du = dty * z * clamp_gate(u, -cam.lim_y_neg, cam.lim_y_pos);
        dz += dty * uc - du * y / z2;
        dy += du / z;
    }
    // mean2d = (fx x / z + cx, fy y / z + cy)
    dx += dmean2d[0] * cam.fx / z;
    dy += dmean2d[1] * cam.fy / z;
    dz += -dmean2d[0] * cam.fx * x / z2 - dmean2d[1] * cam.fy * y / z2;
    *dp = Vec3<T>{dx, dy, dz};
}

// ---------------------------------------------------------------------------------------------
// Dilation, inverse (conic) and screen-space extent.
// ---------------------------------------------------------------------------------------------

// cov2d (undilated) -> dilated (a, b, c), det and conic. Returns false when det <= 0.
template <typename T>
FK_HD bool dilate_and_invert(const T cov2d[3], T eps2d, T dilated[3], T conic[3]) {
    const T a = cov2d[0] + eps2d, b = cov2d[1], c = cov2d[2] + eps2d;
    dilated[0] = a;
    dilated[1] = b;
    dilated[2] = c;
    const T det = a * c - b * b;
    if (!(det > T(0))) return false;
    conic[0] = c / det;
    conic[1] = -b / det;
    conic[2] = a / det;
    return true;
}

// VJP of the inverse: dconic -> d(dilated cov2d) (= d(undilated cov2d), the dilation is a shift).
template <typename T>
FK_HD void invert_vjp(const T dilated[3], const T dconic[3], T dcov2d[3]) {
    const T a = dilated[0], b = dilated[1], c = dilated[2];
    const T det = a * c - b * b;
    const T inv = T(1) / det;
    const T ddet = -(dconic[0] * c - dconic[1] * b + dconic[2] * a) * inv * inv;
    dcov2d[0] = dconic[2] * inv + ddet * c;
    dcov2d[1] = -dconic[1] * inv - T(2) * b * ddet;
    dcov2d[2] = dconic[0] * inv + ddet * a;
}

template <typename T>
FK_HD int radius_from_variance(T var) {
    return int(fk_ceil(T(kRadiusSigmas) * fk_sqrt(var)));
}

// Box [mean +- r] overlaps the image [0,W] x [0,H] (strictly).
template <typename T>
FK_HD bool box_on_screen(const T mean2d[2], int rx, int ry, int width, int height) {
    return (mean2d[0] + T(rx) > T(0)) && (mean2d[0] - T(rx) < T(width)) && (mean2d[1] + T(ry) > T(0)) &&
           (mean2d[1] - T(ry) < T(height));
}

// ---------------------------------------------------------------------------------------------
// Fused per-(camera, Gaussian) forward and backward.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct ProjectedGaussian {
    T mean2d[2];
    T conic[3];
    T depth;
    int radius[2];  // 0, 0 when culled
};

template <typename T>
FK_HD bool project_gaussian(const PinholeCamera<T>& cam, const Vec3<T>& mean, const T quat[4], const T scale[3], T eps2d,
                            T near_plane, T far_plane, ProjectedGaussian<T>* out) {
    out->mean2d[0] = out->mean2d[1] = T(0);
    out->conic[0] = out->conic[1] = out->conic[2] = T(0);
    out->depth = T(0);
    out->radius[0] = out->radius[1] = 0;
    const Vec3<T> p = world_to_cam_point(cam, mean);
    if (!(p.z > near_plane && p.z < far_plane)) return false;
    const Mat3<T> Sc = world_to_cam_covar(cam, quat_scale_to_covar(quat, scale));
    T mean2d[2], cov2d[3], dilated[3], conic[3];
    ewa_project(cam, p, Sc, mean2d, cov2d);
    if (!dilate_and_invert(cov2d, eps2d, dilated, conic)) return false;
    const int rx = radius_from_variance(dilated[0]);
    const int ry = radius_from_variance(dilated[2]);
    if (!box_on_screen(mean2d, rx, ry, cam.width, cam.height)) return false;
    out->mean2d[0] = mean2d[0];
    out->mean2d[1] = mean2d[1];
    out->conic[0] = conic[0];
    out->conic[1] = conic[1];
    out->conic[2] = conic[2];
    out->depth = p.z;
    out->radius[0] = rx;
    out->radius[1] = ry;
    return true;
}

// Backward of project_gaussian for a Gaussian that was NOT culled. Recomputes the forward
// intermediates. dR/dt may be null.
template <typename T>
FK_HD void project_gaussian_vjp(const PinholeCamera<T>& cam, const Vec3<T>& mean, const T quat[4], const T scale[3],
                                T eps2d, const T dmean2d[2], const T dconic[3], T ddepth, Vec3<T>* dmean, T dquat[4],
                                T dscale[3], Mat3<T>* dR, Vec3<T>* dt) {
    const Vec3<T> p = world_to_cam_point(cam, mean);
    const Mat3<T> Sigma = quat_scale_to_covar(quat, scale);
    const Mat3<T> Sc = world_to_cam_covar(cam, Sigma);
    T mean2d[2], cov2d[3], dilated[3], conic[3];
    ewa_project(cam, p, Sc, mean2d, cov2d);
    dilate_and_invert(cov2d, eps2d, dilated, conic);

    T dcov2d[3];
    invert_vjp(dilated, dconic, dcov2d);
    Vec3<T> dp;
    Mat3<T> dSc;
    ewa_project_vjp(cam, p, Sc, dmean2d, dcov2d, ddepth, &dp, &dSc);
    Mat3<T> dSigma;
    world_to_cam_vjp(cam, mean, Sigma, dp, dSc, dmean, &dSigma, dR, dt);
    quat_scale_to_covar_vjp(quat, scale, dSigma, dquat, dscale);
}

}  // namespace fieldkit
