// grpo_cpu.h: the C++ CPU kernels of grpo_kernels (backend="cpu"), called by csrc/bindings/cpu_module.cpp.
//
// Arguments are the boundary structs of grpo_boundary.h (layout rules and row statistics there). Every
// function runs `num_threads` OpenMP threads (<= 0: OpenMP's default) over the N = B*T rows.
#pragma once

#include <stdint.h>

#include "grpo_boundary.h"

namespace gkcpu {

// out.logp[n] = (x[id] - m) / tau - log s, out.stats[2n .. 2n+1] = (m, log s), out.entropy[n] (entropy
// nullptr: not computed).
void logprobs_fwd(const gk::Rows& x, const gk::Outputs& out, int num_threads);

// out.grad = dL/dx for dL = g_logp . logp + g_entropy . entropy, from in.stats (and in.entropy, in.g_entropy:
// both null or both given). Rows with g_logp == 0 and (no g_entropy or g_entropy == 0) are written as zeros
// without reading x.
void logprobs_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, int num_threads);

// out.logp, out.entropy [N] and out.grad = d(sum_n coef_n loss_tok_n)/dx, one pass over each row (token-level
// importance weights; in.old_logps, in.ref_logps, in.advantages, in.coef).
void fused_fwd_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p, const gk::Outputs& out,
                   int num_threads);

// The row kernels' instruction sets, in order: "baseline" (the compiler's default ISA, x86-64 SSE2 /
// aarch64), and on x86-64 "avx2" (AVX2 + FMA + F16C) and "avx512" (AVX-512 F/BW/DQ/VL, 512-bit vectors).
extern const char* const kIsas[3];
// The ISA in use: the widest the CPU runs, unless GRPO_KERNELS_CPU_ISA (baseline / avx2) asked for less.
const char* isa();
// Force an ISA (tests, benchmarks): "baseline" always works, the others where this build has them and the
// CPU runs them; returns success.
bool set_isa(const char* name);

}  // namespace gkcpu
