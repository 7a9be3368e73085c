// grpo_cuda.cuh: host API of the CUDA kernels (csrc/cuda/grpo_cuda.cu), used by the pybind11 module
// csrc/bindings/cuda_module.cpp (compiled by the host compiler, no torch headers) and, under the CPU
// emulator (csrc/emu/cuda_emu.h), by the test-only module csrc/emu/emu_module.cpp.
//
// Layout (grpo_kernels/backends/base.py): logits [B, T, V] with element strides (sb, st) for B and T and
// stride 1 along V; row n = b*T + t; per-token vectors [N] fp32 contiguous; ids [N] int64; optional
// vectors are nullptr; `out` has its own strides and may alias the logits (inplace). 64-bit offsets.
// Every function enqueues one kernel on `stream` (nothing when N == 0) and returns the launch status.
#pragma once

#include <stdint.h>

#ifndef GK_CUDA_EMU
#include <cuda_runtime_api.h>
#endif

#include "grpo_math.h"

namespace gkcuda {

constexpr int kMaxBlock = 512;  // threads per block: a multiple of 32 in [32, kMaxBlock]

struct Rows {
  const void* x;  // logits, dtype code `dtype` (0 fp32, 1 bf16, 2 fp16)
  int dtype;
  int64_t B, T, V;
  int64_t sb, st;  // element strides of B and T
};

struct Out {
  void* p;  // same dtype as the logits; may equal Rows::x (inplace)
  int64_t sb, st;
};

struct FusedArgs {
  const float* old;   // nullptr: on-policy (ratio 1)
  const float* ref;   // nullptr: no KL term
  const float* adv;   // [N]
  const float* coef;  // [N]: mask * reduction weight; 0 = masked row (gradient written as exact zeros)
  gk::LossParams p;
};

// Threads per block that the launch functions use for block == 0: enough warps to keep several 16-byte loads
// in flight per thread on long rows, fewer on short rows so that threads are not idle.
int default_block(int64_t V);

// Row statistics: stats[2n] = m = max of the raw logits of row n, stats[2n + 1] = log s with
// s = sum_v e^{(x_v - m) * inv_tau} (lse = m * inv_tau + log s is never formed as one float; grpo_math.h).
// logp[n] = (x[id] - m) * inv_tau - log s, stats[2n .. 2n+1], ent[n] (ent == nullptr: entropy not computed).
// An id outside [0, V) gives logp = NaN and is never dereferenced.
cudaError_t logprobs_fwd(const Rows& x, const int64_t* ids, float inv_tau, float* logp, float* stats, float* ent,
                         int block, cudaStream_t stream);

// out = dL/dx for dL = g_logp . logp + g_ent . entropy (ent and g_ent both null or both given). Rows with
// g_logp == 0 and g_ent == 0 (or null) are written as exact zeros without reading x.
cudaError_t logprobs_bwd(const Rows& x, const int64_t* ids, const float* stats, const float* ent, const float* g_logp,
                         const float* g_ent, float inv_tau, const Out& out, int block, cudaStream_t stream);

// logp, ent [N] and out = d(sum_n coef_n loss_tok_n)/dx in one launch (token-level importance weights).
// cluster: 0 = choose (fused_cluster_size for the current device), 1 = the 3-pass fused_kernel, 2 / 4 / 8 =
// the 2-pass cluster kernel with that many blocks per row (cudaErrorInvalidValue where it cannot run).
// block: threads per block of either kernel (0 = default_block of the V each block covers).
cudaError_t fused_fwd_bwd(const Rows& x, const int64_t* ids, float inv_tau, const FusedArgs& a, float* logp,
                          float* ent, const Out& out, int block, cudaStream_t stream, int cluster = 0);

// The kernel choice of fused_fwd_bwd, in one place: the number of blocks per row of the 2-pass cluster kernel
// (csrc/cuda/grpo_cuda_cluster.cuh) for rows of x on a GPU of compute capability cc_major, or 0 for the
// 3-pass fused_kernel. Clusters need sm_90+ and an element-aligned logits pointer; C is the smallest of
// 2, 4, 8 whose per-block share of the row fits kClusterSmemPreferred (two blocks per SM), else 8 if it
// fits kClusterSmemMax, else 0 (the row is too long to be held on chip).
constexpr int64_t kClusterSmemPreferred = 96 * 1024;
constexpr int64_t kClusterSmemMax = 200 * 1024;
int fused_cluster_size(const Rows& x, int cc_major);
// Dynamic shared memory per block of the cluster kernel with C blocks per row (the row's 16-byte vectors,
// ceil(nvec / C) of them at most, for any row alignment).
int64_t cluster_smem_bytes(int64_t V, int dtype, int C);

}  // namespace gkcuda
