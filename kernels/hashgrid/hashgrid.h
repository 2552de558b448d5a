// Multiresolution hash encoding: per-point, per-level math shared by the CPU and CUDA builds.
//
// tiny-cuda-nn conventions (encodings/grid.h, common_device.h): level l has scale s_l and
// resolution r_l (computed on the host, passed in); a point x in [0,1]^D maps to
// p = s_l * x + 0.5, cell floor(p), weights from p - floor(p). Dense levels index
// sum_d p_d * r_l^d, hashed levels XOR_d (p_d * prime_d) (uint32 arithmetic); both modulo the
// level's row count, plus the level's row offset. Header-only, no STL: compiled by g++ and nvcc.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FKH_HD __host__ __device__ __forceinline__
#else
#define FKH_HD inline
#endif

namespace fieldkit {
namespace hashgrid {

constexpr int kMaxDims = 4;

struct Level {
    double scale;        // s_l (a float32 value, stored exactly)
    uint32_t resolution; // r_l
    uint32_t size;       // rows of this level (P_l)
    uint32_t offset;     // first row of this level
    uint32_t hashed;     // 1: hashed, 0: dense
};

FKH_HD uint32_t prime(int d) {
    switch (d) {
        case 0: return 1u;
        case 1: return 2654435761u;
        case 2: return 805459861u;
        default: return 3674653429u;
    }
}

FKH_HD float fkh_floor(float x) { return floorf(x); }
FKH_HD double fkh_floor(double x) { return floor(x); }

// Row (offset included) of integer vertex `cell` on a level.
template <int D>
FKH_HD uint32_t vertex_row(const uint32_t* cell, const Level& level) {
    uint32_t index = 0;
    if (level.hashed) {
        for (int d = 0; d < D; ++d) index ^= cell[d] * prime(d);
    } else {
        uint32_t stride = 1;
        for (int d = 0; d < D; ++d) {
            index += cell[d] * stride;
            stride *= level.resolution;
        }
    }
    return index % level.size + level.offset;
}

// Cell and fractional position of point x on a level, in the point's precision.
template <typename T, int D>
FKH_HD void locate(const T* x, const Level& level, uint32_t* cell, T* frac) {
    const T scale = (T)level.scale;
    for (int d = 0; d < D; ++d) {
        T p = x[d] * scale + (T)0.5;
        T f = fkh_floor(p);
        cell[d] = (uint32_t)(int32_t)f;
        frac[d] = p - f;
    }
}

// Rows and weights of the 2^D corners around x on one level.
template <typename T, int D>
FKH_HD void corners(const T* x, const Level& level, uint32_t* rows, T* weights, T* frac) {
    uint32_t cell[D];
    locate<T, D>(x, level, cell, frac);
    for (int c = 0; c < (1 << D); ++c) {
        uint32_t v[D];
        T w = (T)1;
        for (int d = 0; d < D; ++d) {
            const uint32_t bit = (c >> d) & 1u;
            v[d] = cell[d] + bit;
            w *= bit ? frac[d] : (T)1 - frac[d];
        }
        rows[c] = vertex_row<D>(v, level);
        weights[c] = w;
    }
}

// d weight_c / d frac_d
template <typename T, int D>
FKH_HD T weight_derivative(int c, int d, const T* frac) {
    T w = (T)1;
    for (int e = 0; e < D; ++e) {
        const uint32_t bit = (c >> e) & 1u;
        if (e == d) {
            w *= bit ? (T)1 : (T)-1;
        } else {
            w *= bit ? frac[e] : (T)1 - frac[e];
        }
    }
    return w;
}

}  // namespace hashgrid
}  // namespace fieldkit
