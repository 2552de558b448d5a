// CUDA projection forward/backward: one thread per (camera, Gaussian). The math is
// kernels/include/fieldkit/projection.h, evaluated in double like the CPU build
// (kernels/cpu/rasterize_cpu.cpp, ProjT), whatever the storage type T.
#include <cuda_runtime.h>
#include <stdint.h>

#include "fieldkit/projection.h"
#include "rasterize_cuda.cuh"

namespace fieldkit {
namespace cuda {

namespace {

using ProjT = double;  // same compute type as the CPU build
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;  // complete in lane 0
}

// grid: (ceil(N / kThreads), C); thread -> (camera c = blockIdx.y, Gaussian n).
template <typename T>
__global__ void project_forward_kernel(int64_t C, int64_t N, const T* __restrict__ means, const T* __restrict__ quats,
                                       const T* __restrict__ scales, const T* __restrict__ viewmats,
                                       const T* __restrict__ Ks, int width, int height, ProjT eps2d, ProjT near_plane,
                                       ProjT far_plane, T* __restrict__ means2d, T* __restrict__ conics,
                                       T* __restrict__ depths, int32_t* __restrict__ radii) {
    const int64_t c = blockIdx.y;
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int64_t idx = c * N + n;
    const PinholeCamera<ProjT> cam = make_pinhole_camera<ProjT>(viewmats + 16 * c, Ks + 9 * c, width, height);
    const Vec3<ProjT> mean = load_vec3<ProjT>(means + 3 * n);
    const ProjT q[4] = {ProjT(quats[4 * n]), ProjT(quats[4 * n + 1]), ProjT(quats[4 * n + 2]), ProjT(quats[4 * n + 3])};
    const ProjT s[3] = {ProjT(scales[3 * n]), ProjT(scales[3 * n + 1]), ProjT(scales[3 * n + 2])};
    ProjectedGaussian<ProjT> out;
    project_gaussian(cam, mean, q, s, eps2d, near_plane, far_plane, &out);
    means2d[2 * idx] = T(out.mean2d[0]);
    means2d[2 * idx + 1] = T(out.mean2d[1]);
    conics[3 * idx] = T(out.conic[0]);
    conics[3 * idx + 1] = T(out.conic[1]);
    conics[3 * idx + 2] = T(out.conic[2]);
    depths[idx] = T(out.depth);
    radii[2 * idx] = out.radius[0];
    radii[2 * idx + 1] = out.radius[1];
}

// Same grid. Per-Gaussian gradients: atomicAdd (at most C adds per address). Pose gradient:
// reduced over the warp (all lanes of a warp share the camera), then one atomicAdd per warp.
// Lanes with nothing to add (n >= N, culled, zero incoming gradient) take part with zeros, so no
// thread returns before the shuffles.
template <typename T>
__global__ void project_backward_kernel(int64_t C, int64_t N, const T* __restrict__ means, const T* __restrict__ quats,
                                        const T* __restrict__ scales, const T* __restrict__ viewmats,
                                        const T* __restrict__ Ks, int width, int height, ProjT eps2d,
                                        const int32_t* __restrict__ radii, const T* __restrict__ v_means2d,
                                        const T* __restrict__ v_conics, const T* __restrict__ v_depths,
                                        T* __restrict__ v_means, T* __restrict__ v_quats, T* __restrict__ v_scales,
                                        T* __restrict__ v_viewmats) {
    const int64_t c = blockIdx.y;
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool want_pose = v_viewmats != nullptr;
    ProjT pose[12];
    for (int k = 0; k < 12; ++k) pose[k] = ProjT(0);

    bool active = n < N;
    int64_t idx = 0;
    ProjT dmean2d[2] = {0, 0}, dconic[3] = {0, 0, 0}, ddepth = 0;
    if (active) {
        idx = c * N + n;
        // Culled (radius_x and radius_y 0): zero gradient, as in the CPU build and the reference.
        active = !(radii[2 * idx] <= 0 && radii[2 * idx + 1] <= 0);
    }
    if (active) {
        dmean2d[0] = ProjT(v_means2d[2 * idx]);
        dmean2d[1] = ProjT(v_means2d[2 * idx + 1]);
        dconic[0] = ProjT(v_conics[3 * idx]);
        dconic[1] = ProjT(v_conics[3 * idx + 1]);
        dconic[2] = ProjT(v_conics[3 * idx + 2]);
        ddepth = ProjT(v_depths[idx]);
        active = !(dmean2d[0] == 0 && dmean2d[1] == 0 && dconic[0] == 0 && dconic[1] == 0 && dconic[2] == 0 &&
                   ddepth == 0);
    }
    if (active) {
        const PinholeCamera<ProjT> cam = make_pinhole_camera<ProjT>(viewmats + 16 * c, Ks + 9 * c, width, height);
        const Vec3<ProjT> mean = load_vec3<ProjT>(means + 3 * n);
        const ProjT q[4] = {ProjT(quats[4 * n]), ProjT(quats[4 * n + 1]), ProjT(quats[4 * n + 2]),
                            ProjT(quats[4 * n + 3])};
        const ProjT s[3] = {ProjT(scales[3 * n]), ProjT(scales[3 * n + 1]), ProjT(scales[3 * n + 2])};
        Vec3<ProjT> dm;
        ProjT dq[4], ds[3];
        Mat3<ProjT> dR;
        Vec3<ProjT> dt;
        project_gaussian_vjp(cam, mean, q, s, eps2d, dmean2d, dconic, ddepth, &dm, dq, ds, want_pose ? &dR : nullptr,
                             want_pose ? &dt : nullptr);
        atomicAdd(v_means + 3 * n, T(dm.x));
        atomicAdd(v_means + 3 * n + 1, T(dm.y));
        atomicAdd(v_means + 3 * n + 2, T(dm.z));
        for (int k = 0; k < 4; ++k) atomicAdd(v_quats + 4 * n + k, T(dq[k]));
        for (int k = 0; k < 3; ++k) atomicAdd(v_scales + 3 * n + k, T(ds[k]));
        if (want_pose) {
            for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j) pose[3 * i + j] = dR.m[i][j];
            pose[9] = dt.x;
            pose[10] = dt.y;
            pose[11] = dt.z;
        }
    }
    if (!want_pose) return;  // uniform across the grid
    for (int k = 0; k < 12; ++k) {
        const ProjT sum = warp_sum(pose[k]);
        if ((threadIdx.x & 31) == 0 && sum != ProjT(0)) {
            const int row = k < 9 ? k / 3 : k - 9;
            const int col = k < 9 ? k % 3 : 3;
            atomicAdd(v_viewmats + 16 * c + 4 * row + col, T(sum));
        }
    }
}

inline dim3 grid_for(int64_t C, int64_t N) { return dim3((unsigned)((N + kThreads - 1) / kThreads), (unsigned)C, 1); }

}  // namespace

template <typename T>
cudaError_t launch_project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                                   const T* viewmats, const T* Ks, int width, int height, double eps2d,
                                   double near_plane, double far_plane, T* means2d, T* conics, T* depths,
                                   int32_t* radii, cudaStream_t stream) {
    if (C <= 0 || N <= 0) return cudaSuccess;
    if (C > 65535) return cudaErrorInvalidValue;  // grid.y
    project_forward_kernel<T><<<grid_for(C, N), kThreads, 0, stream>>>(C, N, means, quats, scales, viewmats, Ks, width,
                                                                       height, eps2d, near_plane, far_plane, means2d,
                                                                       conics, depths, radii);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                                    const T* viewmats, const T* Ks, int width, int height, double eps2d,
                                    const int32_t* radii, const T* v_means2d, const T* v_conics, const T* v_depths,
                                    T* v_means, T* v_quats, T* v_scales, T* v_viewmats, cudaStream_t stream) {
    if (C <= 0 || N <= 0) return cudaSuccess;
    if (C > 65535) return cudaErrorInvalidValue;
    project_backward_kernel<T><<<grid_for(C, N), kThreads, 0, stream>>>(
        C, N, means, quats, scales, viewmats, Ks, width, height, eps2d, radii, v_means2d, v_conics, v_depths, v_means,
        v_quats, v_scales, v_viewmats);
    return cudaGetLastError();
}

#define FK_INSTANTIATE(T)                                                                                              \
    template cudaError_t launch_project_forward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*, const T*, \
                                                   int, int, double, double, double, T*, T*, T*, int32_t*,             \
                                                   cudaStream_t);                                                      \
    template cudaError_t launch_project_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,          \
                                                    const T*, int, int, double, const int32_t*, const T*, const T*,    \
                                                    const T*, T*, T*, T*, T*, cudaStream_t);

FK_INSTANTIATE(float)
FK_INSTANTIATE(double)

#undef FK_INSTANTIATE

}  // namespace cuda
}  // namespace fieldkit
