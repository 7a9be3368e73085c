// grpo_cpu.h: the C++ CPU kernels of grpo_kernels (backend="cpu"), called by csrc/bindings/cpu_module.cpp.
//
// Layout (see grpo_kernels/backends/base.py): logits [B, T, V] with element strides (sb, st) for B and T and
// stride 1 along V; row n = b*T + t; per-token vectors [N] fp32 contiguous; ids [N] int64. Optional vectors
// are nullptr. `out` has its own strides and may alias `x` (inplace). All offsets are int64.
#pragma once

#include <stdint.h>

namespace gkcpu {

struct RowsView {
  const void* x;  // logits, dtype `dtype` (0 fp32, 1 bf16, 2 fp16)
  int dtype;
  int64_t B, T, V;
  int64_t sb, st;  // element strides of B and T
};

struct OutView {
  void* p;  // same dtype as the logits
  int64_t sb, st;
};

// Row statistics: stats[2n] = m = max of the raw logits of row n, stats[2n + 1] = log s with
// s = sum_v e^{(x_v - m) * inv_tau}; lse = m * inv_tau + log s is never formed as one float (grpo_math.h).
// logp[n] = (x[id] - m) * inv_tau - log s, stats[2n .. 2n+1], ent[n] (ent may be nullptr: not computed).
void logprobs_fwd(const RowsView& x, const int64_t* ids, float inv_tau, float* logp, float* stats, float* ent,
                  int num_threads);

// out = dL/dx for dL = g_logp . logp + g_ent . entropy; ent and g_ent both null or both given.
// Rows with g_logp == 0 and (no g_ent or g_ent == 0) are written as zeros without reading x.
void logprobs_bwd(const RowsView& x, const int64_t* ids, const float* stats, const float* ent, const float* g_logp,
                  const float* g_ent, float inv_tau, const OutView& out, int num_threads);

struct FusedArgs {
  const float* old;  // nullptr: on-policy
  const float* ref;  // nullptr: no KL term
  const float* adv;  // [N]
  const float* coef;  // [N], 0 at masked positions
  int loss_code;
  float eps_low, eps_high;
  int has_delta;
  float delta, beta;
  int bias_corr;
  float sapo_pos, sapo_neg;
};

// logp, ent [N], and out = d(sum_n coef_n loss_tok_n)/dx, one pass over each row.
void fused_fwd_bwd(const RowsView& x, const int64_t* ids, float inv_tau, const FusedArgs& a, float* logp, float* ent,
                   const OutView& out, int num_threads);

// The row kernels' instruction sets, in order: "baseline" (the compiler's default ISA, x86-64 SSE2 /
// aarch64), and on x86-64 "avx2" (AVX2 + FMA + F16C) and "avx512" (AVX-512 F/BW/DQ/VL, 512-bit vectors).
extern const char* const kIsas[3];
// The ISA in use: the widest the CPU runs, unless GRPO_KERNELS_CPU_ISA (baseline / avx2) asked for less.
const char* isa();
// Force an ISA (tests, benchmarks): "baseline" always works, the others where this build has them and the
// CPU runs them; returns success.
bool set_isa(const char* name);

}  // namespace gkcpu
