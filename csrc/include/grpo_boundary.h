// grpo_boundary.h: the kernel boundary, one definition for every C++ build (CPU csrc/cpu, CUDA csrc/cuda, and
// the CUDA sources compiled against the CPU emulation in csrc/emu).
//
// A call hands the kernels four named structs: where the rows are (Rows), the per-token inputs it reads
// (TokenInputs), where it writes (Outputs) and the scalars of the loss (LossParams). The pybind11 modules bind
// them once, field by field (csrc/bindings/boundary_py.h); grpo_kernels/backends/base.py builds them by name
// and holds the Python mirror of LossParams. Plain C structs: no torch, no std, usable in device code, passed
// by value into CUDA kernels.
//
// Layout rules shared by every kernel:
// - logits [B, T, V] of dtype code `dtype` (DT_F32 / DT_BF16 / DT_F16) with element strides (stride_b,
//   stride_t) for B and T and stride 1 along V; row n = b*T + t starts at b*stride_b + t*stride_t. Offsets
//   are 64-bit.
// - per-token vectors are [N] fp32 contiguous (N = B*T), ids [N] int64; an optional vector is nullptr.
//   An id outside [0, V) gives logp = NaN and is never dereferenced.
// - grad [B, T, V] in the logits' dtype with its own strides; it may be the logits themselves (in place):
//   every element is read before it is written, by the same thread.
// - all arithmetic is fp32, with z = x / tau.
//
// Row statistics. A row is summarised by the PAIR (m, log s): m = max of the RAW logits of the row and
// s = sum_v e^{(x_v - m) / tau}, so lse = m / tau + log s. It is never stored as one float: the backward
// forms z_v - lse = (x_v - m) / tau - log s, which keeps p_v = e^{z_v - lse} to a few eps, while
// z_v - fl(lse) loses |lse| eps / 2 (5e-4 relative in p at |lse| = 1e4: logits ~1e4 or tau 1e-3).
//
// Shifted logits. d = (x - m) / tau is computed as a difference of RAW logits first, never as
// x * inv_tau - m * inv_tau: with FMA contraction (-ffp-contract=fast on the host, nvcc by default) the
// latter becomes fma(x, inv_tau, -fl(m * inv_tau)), whose exact product meets a ROUNDED m / tau, so the top
// logit gets d = (the rounding error of m / tau) instead of 0 (a V = 1 row then has a log-prob above 0).
// x - m is exact for the top logits (Sterbenz), so their d is exactly 0.
#pragma once

#include <stdint.h>

namespace gk {

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };  // storage dtype codes of the logits and the gradient

enum { LOSS_CLIP = 0, LOSS_CISPO = 1, LOSS_SAPO = 2 };  // == grpo_kernels.config.LOSS_CODE_*

// Where the rows are, and how one row is read.
struct Rows {
  const void* logits;  // [B, T, V], dtype code `dtype`
  int dtype;
  int64_t B, T, V;
  int64_t stride_b, stride_t;  // element strides of B and T (stride 1 along V)
  const int64_t* ids;          // [N] target token of each row
  double tau;                  // temperature: z = x / tau (> 0)
};

// Per-token inputs [N] fp32; each kernel reads the ones it names.
struct TokenInputs {
  const float* stats;       // backward: the row statistics (m, log s) of the forward, [N, 2]
  const float* entropy;     // backward: entropy of the forward (nullptr: no entropy gradient)
  const float* g_logp;      // backward: dL/dlogp
  const float* g_entropy;   // backward: dL/dentropy (nullptr together with `entropy`)
  const float* old_logps;   // fused: nullptr = on-policy (ratio 1 in value, d(logp - old)/dlogp = 1)
  const float* ref_logps;   // fused: nullptr = no KL term
  const float* advantages;  // fused
  const float* coef;        // fused: mask * reduction weight; 0 = masked row (gradient written as exact zeros)
};

// Where a kernel writes; each kernel writes the ones it names.
struct Outputs {
  float* logp;                          // [N]
  float* stats;                         // [N, 2] row statistics (m, log s)
  float* entropy;                       // [N]; nullptr in the forward: entropy not computed
  void* grad;                           // [B, T, V] dL/dlogits, in the logits' dtype
  int64_t grad_stride_b, grad_stride_t;  // element strides of grad (stride 1 along V)
};

// Scalars of the per-token loss derivative (gk::dloss_dlogp in grpo_math.h; the Python mirror is
// grpo_kernels.backends.base.LossParams, with the same field names).
struct LossParams {
  int loss_code;                 // LOSS_CLIP / LOSS_CISPO / LOSS_SAPO
  float epsilon_low;             // clip: ratio clamped to [1 - epsilon_low, 1 + epsilon_high]
  float epsilon_high;            // clip: upper offset; cispo: the raw upper bound of the ratio
  bool has_delta;                // clip: two-sided clip min(ratio, delta)
  float delta;
  float beta;                    // KL weight (the term is active iff ref_logps is given and beta != 0)
  bool use_bias_correction_kl;   // KL multiplied by the ratio
  float sapo_temperature_pos;    // sapo temperature for advantages > 0
  float sapo_temperature_neg;    // sapo temperature for advantages <= 0
};

}  // namespace gk
