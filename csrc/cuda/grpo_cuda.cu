// grpo_cuda.cu: launch code of the CUDA kernels (csrc/cuda/grpo_cuda_kernels.cuh); API in grpo_cuda.cuh.
//
// Compiled by nvcc into grpo_kernels._cuda (setup.py) and, unchanged, by g++ against csrc/emu/cuda_emu.h
// for the CPU execution tests (GK_LAUNCH is then the emulator's launch).
#include "grpo_cuda.cuh"
#include "grpo_cuda_kernels.cuh"

#ifndef GK_LAUNCH
#define GK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace gkcuda {

int default_block(int64_t V) { return V <= 2048 ? 128 : (V <= 16384 ? 256 : kMaxBlock); }

namespace {

typedef void (*Kernel)(KArgs);

KArgs base_args(const Rows& x, const int64_t* ids, float inv_tau) {
  KArgs a;
  memset(&a, 0, sizeof a);
  a.x = x.x;
  a.ids = ids;
  a.T = x.T;
  a.V = x.V;
  a.sb = x.sb;
  a.st = x.st;
  a.inv_tau = inv_tau;
  return a;
}

cudaError_t launch(Kernel k, const KArgs& a, int64_t N, int block, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (block == 0) block = default_block(a.V);
  // one block per row: gridDim.x <= 2^31 - 1 rows; a multiple of 32 threads (the reductions use whole warps)
  if (N < 0 || N > 0x7fffffffLL || a.V < 1 || a.T < 1 || block < 32 || block > kMaxBlock || block % 32 != 0)
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

}  // namespace

cudaError_t logprobs_fwd(const Rows& x, const int64_t* ids, float inv_tau, float* logp, float* stats, float* ent,
                         int block, cudaStream_t stream) {
  KArgs a = base_args(x, ids, inv_tau);
  a.logp = logp;
  a.stats = stats;
  a.ent = ent;
  const Kernel k = ent ? by_dtype<FwdEnt>(x.dtype) : by_dtype<FwdNoEnt>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch(k, a, x.B * x.T, block, stream);
}

cudaError_t logprobs_bwd(const Rows& x, const int64_t* ids, const float* stats, const float* ent, const float* g_logp,
                         const float* g_ent, float inv_tau, const Out& out, int block, cudaStream_t stream) {
  if ((ent == nullptr) != (g_ent == nullptr)) return cudaErrorInvalidValue;
  KArgs a = base_args(x, ids, inv_tau);
  a.out = out.p;
  a.osb = out.sb;
  a.ost = out.st;
  a.stats_in = stats;
  a.ent_in = ent;
  a.g_logp = g_logp;
  a.g_ent = g_ent;
  const Kernel k = ent ? by_dtype<BwdEnt>(x.dtype) : by_dtype<BwdNoEnt>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch(k, a, x.B * x.T, block, stream);
}

cudaError_t fused_fwd_bwd(const Rows& x, const int64_t* ids, float inv_tau, const FusedArgs& f, float* logp,
                          float* ent, const Out& out, int block, cudaStream_t stream) {
  KArgs a = base_args(x, ids, inv_tau);
  a.out = out.p;
  a.osb = out.sb;
  a.ost = out.st;
  a.logp = logp;
  a.ent = ent;
  a.old = f.old;
  a.ref = f.ref;
  a.adv = f.adv;
  a.coef = f.coef;
  a.lp = f.p;
  const Kernel k = by_dtype<Fused>(x.dtype);
  if (!k) return cudaErrorInvalidValue;
  return launch(k, a, x.B * x.T, block, stream);
}

}  // namespace gkcuda
