// grpo_cuda.cuh: host API of the CUDA kernels (csrc/cuda/grpo_cuda.cu), used by the pybind11 module
// csrc/bindings/cuda_module.cpp (compiled by the host compiler, no torch headers) and, under the CPU
// emulator (csrc/emu/cuda_emu.h), by the test-only module csrc/emu/emu_module.cpp.
//
// Arguments are the boundary structs of grpo_boundary.h (layout rules and row statistics there). Every
// function enqueues one kernel on `stream` (nothing when N == 0) and returns the launch status; `block` is the
// number of threads per block (0: default_block(V)).
#pragma once

#include <stdint.h>

#ifndef GK_CUDA_EMU
#include <cuda_runtime_api.h>
#endif

#include "grpo_math.h"

namespace gkcuda {

constexpr int kMaxBlock = 512;  // threads per block: a multiple of 32 in [32, kMaxBlock]

// Threads per block that the launch functions use for block == 0: enough warps to keep several 16-byte loads
// in flight per thread on long rows, fewer on short rows so that threads are not idle.
int default_block(int64_t V);

// out.logp[n] = (x[id] - m) / tau - log s, out.stats[2n .. 2n+1] = (m, log s), out.entropy[n] (entropy
// nullptr: not computed).
cudaError_t logprobs_fwd(const gk::Rows& x, const gk::Outputs& out, int block, cudaStream_t stream);

// out.grad = dL/dx for dL = g_logp . logp + g_entropy . entropy, from in.stats (in.entropy and in.g_entropy
// both null or both given). Rows with g_logp == 0 and g_entropy == 0 (or null) are written as exact zeros
// without reading x.
cudaError_t logprobs_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, int block,
                         cudaStream_t stream);

// out.logp, out.entropy [N] and out.grad = d(sum_n coef_n loss_tok_n)/dx in one launch (token-level
// importance weights). cluster: 0 = choose (fused_cluster_size for the current device), 1 = the 3-pass
// fused_kernel, 2 / 4 / 8 = the 2-pass cluster kernel with that many blocks per row (cudaErrorInvalidValue
// where it cannot run); block: threads per block of either kernel (0 = default_block of the V each block covers).
cudaError_t fused_fwd_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p,
                          const gk::Outputs& out, int block, cudaStream_t stream, int cluster = 0);

// The kernel choice of fused_fwd_bwd, in one place: the number of blocks per row of the 2-pass cluster kernel
// (csrc/cuda/grpo_cuda_cluster.cuh) for rows of x on a GPU of compute capability cc_major, or 0 for the
// 3-pass fused_kernel. Clusters need sm_90+ and an element-aligned logits pointer; C is the smallest of
// 2, 4, 8 whose per-block share of the row fits kClusterSmemPreferred (two blocks per SM), else 8 if it
// fits kClusterSmemMax, else 0 (the row is too long to be held on chip).
constexpr int64_t kClusterSmemPreferred = 96 * 1024;
constexpr int64_t kClusterSmemMax = 200 * 1024;
int fused_cluster_size(const gk::Rows& x, int cc_major);
// Dynamic shared memory per block of the cluster kernel with C blocks per row (the row's 16-byte vectors,
// ceil(nvec / C) of them at most, for any row alignment).
int64_t cluster_smem_bytes(int64_t V, int dtype, int C);

}  // namespace gkcuda
