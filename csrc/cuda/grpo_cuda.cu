// grpo_cuda.cu: launch code of the CUDA kernels (csrc/cuda/grpo_cuda_kernels.cuh); API in grpo_cuda.cuh.
//
// Compiled by nvcc into grpo_kernels._cuda (setup.py) and, unchanged, by g++ against csrc/emu/cuda_emu.h
// for the CPU execution tests (GK_LAUNCH is then the emulator's launch).
#include "grpo_cuda.cuh"
#include "grpo_cuda_kernels.cuh"
#include "grpo_cuda_cluster.cuh"

#ifndef GK_LAUNCH
#define GK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace gkcuda {

int default_block(int64_t V) { return V <= 2048 ? 128 : (V <= 16384 ? 256 : kMaxBlock); }

int64_t cluster_smem_bytes(int64_t V, int dtype, int C) {
  const int64_t per_vec = dtype == gk::DT_F32 ? 4 : 8;
  return (V / per_vec + C - 1) / C * 16;
}

int fused_cluster_size(const gk::Rows& x, int cc_major) {
  const int64_t es = x.dtype == gk::DT_F32 ? 4 : 2;
  if (cc_major < 9 || x.V < 1 || reinterpret_cast<uintptr_t>(x.logits) % es != 0) return 0;
  for (int C = 2; C <= 8; C *= 2)
    if (cluster_smem_bytes(x.V, x.dtype, C) <= kClusterSmemPreferred) return C;
  return cluster_smem_bytes(x.V, x.dtype, 8) <= kClusterSmemMax ? 8 : 0;
}

namespace {

typedef void (*Kernel)(KArgs);

KArgs make_args(const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p, const gk::Outputs& out) {
  KArgs a;
  a.x = x;
  a.in = in;
  a.out = out;
  a.lp = p;
  a.inv_tau = static_cast<float>(1.0 / x.tau);
  return a;
}

cudaError_t launch(Kernel k, const KArgs& a, int64_t N, int block, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (block == 0) block = default_block(a.x.V);
  // one block per row: gridDim.x <= 2^31 - 1 rows; a multiple of 32 threads (the reductions use whole warps)
  if (N < 0 || N > 0x7fffffffLL || a.x.V < 1 || a.x.T < 1 || block < 32 || block > kMaxBlock || block % 32 != 0)
    return cudaErrorInvalidValue;
  GK_LAUNCH(k, dim3(static_cast<unsigned>(N)), dim3(static_cast<unsigned>(block)), 0, stream, a);
  return cudaGetLastError();
}

// kernel<DT> for the runtime dtype code (templates, one source for every dtype)
template <template <int> class K>
Kernel by_dtype(int dtype) {
  switch (dtype) {
    case gk::DT_F32: return K<gk::DT_F32>::get();
    case gk::DT_BF16: return K<gk::DT_BF16>::get();
    case gk::DT_F16: return K<gk::DT_F16>::get();
  }
  return nullptr;
}

template <int DT>
struct FwdEnt {
  static Kernel get() { return fwd_kernel<DT, true>; }
};
template <int DT>
struct FwdNoEnt {
  static Kernel get() { return fwd_kernel<DT, false>; }
};
template <int DT>
struct BwdEnt {
  static Kernel get() { return bwd_kernel<DT, true>; }
};
template <int DT>
struct BwdNoEnt {
  static Kernel get() { return bwd_kernel<DT, false>; }
};
template <int DT>
struct Fused {
  static Kernel get() { return fused_kernel<DT>; }
};
template <int DT>
struct FusedCluster {
  static Kernel get() { return fused_cluster_kernel<DT>; }
};

// C blocks per row in clusters of C, `smem` bytes of dynamic shared memory per block.
cudaError_t launch_cluster(Kernel k, const KArgs& a, int64_t N, int C, int block, int64_t smem, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (block == 0) block = default_block((a.x.V + C - 1) / C);
  if (N < 0 || N * C > 0x7fffffffLL || a.x.V < 1 || a.x.T < 1 || block < 32 || block > kMaxBlock ||
      block % 32 != 0 || smem > kClusterSmemMax)
    return cudaErrorInvalidValue;
  cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(N * C));
  cfg.blockDim = dim3(static_cast<unsigned>(block));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  e = cudaLaunchKernelEx(&cfg, k, a);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

int current_cc_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return 0;
  return major;
}

}  // namespace

cudaError_t logprobs_fwd(const gk::Rows& x, const gk::Outputs& out, int block, cudaStream_t stream) {
  const Kernel k = out.entropy ? by_dtype<FwdEnt>(x.dtype) : by_dtype<FwdNoEnt>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch(k, make_args(x, gk::TokenInputs{}, gk::LossParams{}, out), x.B * x.T, block, stream);
}

cudaError_t logprobs_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, int block,
                         cudaStream_t stream) {
  if ((in.entropy == nullptr) != (in.g_entropy == nullptr)) return cudaErrorInvalidValue;
  const Kernel k = in.entropy ? by_dtype<BwdEnt>(x.dtype) : by_dtype<BwdNoEnt>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch(k, make_args(x, in, gk::LossParams{}, out), x.B * x.T, block, stream);
}

cudaError_t fused_fwd_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p,
                          const gk::Outputs& out, int block, cudaStream_t stream, int cluster) {
  if (cluster == 0) cluster = x.B * x.T == 0 ? 1 : fused_cluster_size(x, current_cc_major());
  if (cluster == 0 || cluster == 1) {
    const Kernel k = by_dtype<Fused>(x.dtype);
    if (!k) return cudaErrorInvalidValue;
    return launch(k, make_args(x, in, p, out), x.B * x.T, block, stream);
  }
  const int64_t es = x.dtype == gk::DT_F32 ? 4 : 2;
  if ((cluster != 2 && cluster != 4 && cluster != 8) || reinterpret_cast<uintptr_t>(x.logits) % es != 0)
    return cudaErrorInvalidValue;
  const Kernel k = by_dtype<FusedCluster>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch_cluster(k, make_args(x, in, p, out), x.B * x.T, cluster, block,
                        cluster_smem_bytes(x.V, x.dtype, cluster), stream);
}

}  // namespace gkcuda
