// fieldkit kernels: shared definitions for the CPU (C++/OpenMP) and CUDA builds.
//
// Everything under kernels/include/fieldkit/ is header-only math, written once and compiled
// by both g++ (CPU backend) and nvcc (CUDA backend). Functions are marked FK_HD, which is
// `__host__ __device__` under nvcc and plain `inline` otherwise. No STL, no exceptions, no
// allocation: only scalars, fixed-size structs and raw pointers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// On the host FK_HD functions are always inlined: the CPU backend compiles the compositing
// kernels twice (baseline and AVX2, see kernels/cpu/composite_avx2.cpp) from one include of
// these headers, and an out-of-line call passing SIMD vectors between the two instruction sets
// would not agree on the calling convention.
#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FK_HD inline __attribute__((always_inline))
#else
#define FK_HD inline
#endif

namespace fieldkit {

// Constants of the rasterizer (gsplat v1.5.3 conventions, see docs / reference §1).
constexpr int kDefaultTileSize = 16;
constexpr double kAlphaMax = 0.999;           // alpha = min(kAlphaMax, opacity * exp(-sigma))
constexpr double kAlphaMin = 1.0 / 255.0;     // skip a Gaussian whose alpha is below this
constexpr double kTransmittanceMin = 1e-4;    // stop before T would drop to <= this
constexpr double kRadiusSigmas = 3.0;         // radius = ceil(3 sqrt(var))
constexpr double kFovClampMargin = 0.3;       // EWA Jacobian clamp: 1.3 x the half field of view

// Overloads so templated code calls the float or double libm function on host and device.
FK_HD float fk_sqrt(float x) { return sqrtf(x); }
FK_HD double fk_sqrt(double x) { return sqrt(x); }
FK_HD float fk_exp(float x) { return expf(x); }
FK_HD double fk_exp(double x) { return exp(x); }
FK_HD float fk_ceil(float x) { return ceilf(x); }
FK_HD double fk_ceil(double x) { return ceil(x); }
template <typename T>
FK_HD T fk_min(T a, T b) { return a < b ? a : b; }
template <typename T>
FK_HD T fk_max(T a, T b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Small fixed-size linear algebra (row-major).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Vec3 {
    T x, y, z;
};

template <typename T>
struct Mat3 {
    T m[3][3];
};

template <typename T>
struct Mat2x3 {
    T m[2][3];
};

template <typename T, typename S>
FK_HD Vec3<T> load_vec3(const S* p) {
    return Vec3<T>{T(p[0]), T(p[1]), T(p[2])};
}

template <typename T>
FK_HD Mat3<T> mat3_zero() {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = T(0);
    return r;
}

template <typename T>
FK_HD Mat3<T> mat3_mul(const Mat3<T>& a, const Mat3<T>& b) {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][0] * b.m[0][j] + a.m[i][1] * b.m[1][j] + a.m[i][2] * b.m[2][j];
    return r;
}

// a * b^T
template <typename T>
FK_HD Mat3<T> mat3_mul_bt(const Mat3<T>& a, const Mat3<T>& b) {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][0] * b.m[j][0] + a.m[i][1] * b.m[j][1] + a.m[i][2] * b.m[j][2];
    return r;
}

// a^T * b
template <typename T>
FK_HD Mat3<T> mat3_mul_at(const Mat3<T>& a, const Mat3<T>& b) {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[0][i] * b.m[0][j] + a.m[1][i] * b.m[1][j] + a.m[2][i] * b.m[2][j];
    return r;
}

template <typename T>
FK_HD Mat3<T> mat3_transpose(const Mat3<T>& a) {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[j][i];
    return r;
}

template <typename T>
FK_HD Mat3<T> mat3_add(const Mat3<T>& a, const Mat3<T>& b) {
    Mat3<T> r;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r.m[i][j] = a.m[i][j] + b.m[i][j];
    return r;
}

template <typename T>
FK_HD Vec3<T> mat3_vec(const Mat3<T>& a, const Vec3<T>& v) {
    return Vec3<T>{a.m[0][0] * v.x + a.m[0][1] * v.y + a.m[0][2] * v.z,
                   a.m[1][0] * v.x + a.m[1][1] * v.y + a.m[1][2] * v.z,
                   a.m[2][0] * v.x + a.m[2][1] * v.y + a.m[2][2] * v.z};
}

// a^T v
template <typename T>
FK_HD Vec3<T> mat3_t_vec(const Mat3<T>& a, const Vec3<T>& v) {
    return Vec3<T>{a.m[0][0] * v.x + a.m[1][0] * v.y + a.m[2][0] * v.z,
                   a.m[0][1] * v.x + a.m[1][1] * v.y + a.m[2][1] * v.z,
                   a.m[0][2] * v.x + a.m[1][2] * v.y + a.m[2][2] * v.z};
}

}  // namespace fieldkit
