// grpo_math.h: the per-element GRPO math, written once for every C++ backend.
//
// Every function is `GK_HD` (__host__ __device__ inline under nvcc, plain inline under g++), uses no
// std:: function in device code and only the float math API (expf, logf, ...), which nvcc provides on
// the device and <cmath> on the host. All arithmetic is fp32; inputs of any storage dtype are converted
// with Elem<DT>::load.
//
// One row of the logits (z = x / tau, V entries):
//   lse = log sum_v e^{z_v},  p_v = e^{z_v - lse},  logp = z[id] - lse,
//   entropy H = lse - sum_v p_v z_v = log s - t / s   with   s = sum_v e^{d_v},  t = sum_v e^{d_v} d_v,
//   d_v = (x_v - m) / tau for the running max m of the RAW logits. Writing H through (s, t) relative to m
//   avoids the cancellation of "lse - sum p z" when |z| ~ 1e4 (both terms ~1e4, their difference ~1).
//   dL/dx_v = ( g_logp (onehot_v - p_v) - g_ent p_v (z_v - lse + H) ) / tau.
// Why a row is kept as the pair (m, log s) and why d is formed from x - m: grpo_boundary.h.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#include "grpo_boundary.h"

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gk {

// ------------------------------------------------------------------------------------------------
// bit casts (memcpy on the host is the defined-behaviour cast; compilers turn it into a move)
// ------------------------------------------------------------------------------------------------
GK_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

GK_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

GK_HD float neg_inf() { return bits_f32(0xff800000u); }
GK_HD float quiet_nan() { return bits_f32(0x7fc00000u); }

// ------------------------------------------------------------------------------------------------
// online log-sum-exp with the entropy moment
// ------------------------------------------------------------------------------------------------
struct LseState {
  float m;  // running max of the raw logits x (-inf while empty)
  float s;  // sum e^{d},      d = (x - m) * inv_tau
  float t;  // sum e^{d} d
};

GK_HD void lse_init(LseState& st) {
  st.m = neg_inf();
  st.s = 0.f;
  st.t = 0.f;
}

// Adds one raw logit x. Rescaling to a new max m' > m with c = (m - m') / tau:  e^{(x-m')/tau} =
// e^{(x-m)/tau} e^{c},  so s' = s e^{c} + 1 and t' = e^{c} (t + c s) (+ 0 for the new element, whose d = 0).
// x = -inf adds e^{-inf} = 0 to s and 0 (not 0 * -inf = NaN) to t. A NaN x makes s and t NaN.
GK_HD void lse_push(LseState& st, float x, float inv_tau) {
  if (x > st.m) {
    if (st.s == 0.f) {  // first finite element (m was -inf): nothing to rescale
      st.s = 1.f;
      st.t = 0.f;
    } else {
      const float c = (st.m - x) * inv_tau;  // < 0
      const float a = expf(c);
      st.t = a * (st.t + c * st.s);
      st.s = st.s * a + 1.f;
    }
    st.m = x;
  } else if (x != neg_inf()) {  // x <= m, or NaN (propagates through d)
    const float d = (x - st.m) * inv_tau;
    const float e = expf(d);
    st.s += e;
    st.t += e * d;
  }
}

// Combines two partial states (parallel reductions); an empty side (s == 0) is the identity.
GK_HD void lse_merge(LseState& a, const LseState& b, float inv_tau) {
  if (b.s == 0.f) return;
  if (a.s == 0.f) {
    a = b;
    return;
  }
  const float m = a.m > b.m ? a.m : b.m;
  const float da = (a.m - m) * inv_tau, db = (b.m - m) * inv_tau;  // <= 0, one of them is 0
  const float ea = expf(da), eb = expf(db);
  a.t = ea * (a.t + da * a.s) + eb * (b.t + db * b.s);
  a.s = a.s * ea + b.s * eb;
  a.m = m;
}

GK_HD float entropy_value(const LseState& st) { return logf(st.s) - st.t / st.s; }

// d_v = z_v - lse from the row statistics (m, log s): the argument of p_v = e^{d_v}, and logp = d[id]
GK_HD float shifted_logit(float x, float m, float log_s, float inv_tau) { return (x - m) * inv_tau - log_s; }

// ------------------------------------------------------------------------------------------------
// d loss_tok / d logp, token level (mirrors grpo_kernels.logp_loss.token_loss_grad line by line)
// ------------------------------------------------------------------------------------------------
// w = logp - old (0 when has_old == 0: on-policy, ratio 1, while d(logp - old)/dlogp stays 1),
// c1 = e^w, dc1/dlogp = c1.
// clip:  c2 = clamp(c1, 1-el, 1+eh), dc2 = c1 [1-el <= c1 <= 1+eh];  c1' = min(c1, delta), dc1' = c1 [c1 <= delta];
//        loss = -min(c1' A, c2 A): torch.min's gradient goes to the smaller side, half to each on a tie.
// cispo: loss = -sg(min(c1, eh)) A logp  ->  d = -min(c1, eh) A.
// sapo:  s = sigmoid(tau (c1 - 1)), loss = -(4/tau) s A  ->  d = -4 A s (1 - s) c1.
// KL:    r = ref - logp, kl = e^r - r - 1, dkl = 1 - e^r; bias-corrected (kl c1)' = dkl c1 + kl c1.
GK_HD float dloss_dlogp(float logp, int has_old, float old, int has_ref, float ref, float adv,
                        const LossParams& p) {
  const float w = has_old ? logp - old : 0.f;
  const float c1 = expf(w);
  float d;
  if (p.loss_code == LOSS_CISPO) {
    // torch.clamp(c1, max=eh): NaN stays NaN
    const float c = c1 > p.epsilon_high ? p.epsilon_high : c1;
    d = -c * adv;
  } else if (p.loss_code == LOSS_SAPO) {
    const float tau = adv > 0.f ? p.sapo_temperature_pos : p.sapo_temperature_neg;
    const float s = 1.f / (1.f + expf(-tau * (c1 - 1.f)));
    d = -4.f * adv * s * (1.f - s) * c1;
  } else {
    const float lo = 1.f - p.epsilon_low, hi = 1.f + p.epsilon_high;
    float c2 = c1 < lo ? lo : c1;  // torch.clamp(c1, lo, hi) = min(max(c1, lo), hi), NaN kept
    c2 = c2 > hi ? hi : c2;
    const float dc2 = (c1 >= lo && c1 <= hi) ? c1 : 0.f;
    float c1d = c1, dc1d = c1;
    if (p.has_delta) {
      c1d = c1 > p.delta ? p.delta : c1;
      dc1d = c1 <= p.delta ? c1 : 0.f;
    }
    const float a = c1d * adv, b = c2 * adv;
    const float wa = a < b ? 1.f : (a == b ? 0.5f : 0.f);
    d = -(wa * adv * dc1d + (1.f - wa) * adv * dc2);
  }
  if (has_ref && p.beta != 0.f) {
    const float r = ref - logp;
    const float er = expf(r);
    const float kl = er - r - 1.f;
    float dkl = 1.f - er;
    if (p.use_bias_correction_kl) dkl = dkl * c1 + kl * c1;
    d = d + p.beta * dkl;
  }
  return d;
}

// ------------------------------------------------------------------------------------------------
// gradient of one logit
// ------------------------------------------------------------------------------------------------
// (g_logp (onehot - p) - g_ent p (d + H)) / tau with p = e^d, d = z - lse = shifted_logit(x, m, log s). A
// d = -inf entry has p = 0 and contributes 0 (not 0 * -inf); a NaN d gives NaN.
GK_HD float grad_elem(float d, float H, int is_target, float g_logp, float g_ent, float inv_tau) {
  const float p = expf(d);
  const float ent = p != 0.f ? g_ent * p * (d + H) : 0.f;
  return (g_logp * ((is_target ? 1.f : 0.f) - p) - ent) * inv_tau;
}

// ------------------------------------------------------------------------------------------------
// storage dtypes (codes DT_* in grpo_boundary.h): fp32 (float), bf16 and fp16 (uint16_t bits)
// ------------------------------------------------------------------------------------------------
GK_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even; NaN stays NaN (quiet bit set, sign kept), overflow rounds to inf.
GK_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Branch-free (vectorisable) and exact for all 65536 patterns: the exponent is rebiased 15 -> 127;
// inf/NaN get the remaining (128 - 16) of the bias; a subnormal h = m 2^-24 is built as the float
// 2^-14 (1 + m/1024) (the bits with exponent 113) minus 2^-14, which is exact.
GK_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t em = (static_cast<uint32_t>(h) & 0x7fffu) << 13;  // exponent+mantissa in float position
  const uint32_t e = em & 0x0f800000u;
  const uint32_t normal = em + ((127u - 15u) << 23);
  const uint32_t infnan = normal + ((128u - 16u) << 23);
  const float sub = bits_f32(em + (113u << 23)) - bits_f32(113u << 23);
  uint32_t o = e == 0x0f800000u ? infnan : normal;
  o = e == 0u ? f32_bits(sub) : o;
  return bits_f32(o | sign);
#endif
}

// Round to nearest, ties to even; subnormal halves, overflow to inf, NaN kept (quiet). Branch-free:
// - |f| >= 2^16 (or inf/NaN): inf, or a quiet NaN with the top payload bits;
// - |f| < 2^-14 (half subnormal range): adding 0.5f (exponent 126) lines the half subnormal unit 2^-24 up
//   with the float's last mantissa bit, so the float addition itself rounds (RNE) and the low bits of the
//   sum are the half's bits;
// - otherwise rebias 127 -> 15 and round the 13 dropped bits to nearest even (carry may reach inf).
GK_HD uint16_t f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : 0x7c00u;
  const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3f000000u;
  const uint32_t nrm = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t o = a >= 0x47800000u ? big : nrm;
  o = a < 0x38800000u ? sub : o;
  return static_cast<uint16_t>(o | sign);
#endif
}

template <int DT>
struct Elem;

template <>
struct Elem<DT_F32> {
  typedef float T;
  static GK_HD float load(T v) { return v; }
  static GK_HD T store(float f) { return f; }
};

template <>
struct Elem<DT_BF16> {
  typedef uint16_t T;
  static GK_HD float load(T v) { return bf16_to_f32(v); }
  static GK_HD T store(float f) { return f32_to_bf16(f); }
};

template <>
struct Elem<DT_F16> {
  typedef uint16_t T;
  static GK_HD float load(T v) { return f16_to_f32(v); }
  static GK_HD T store(float f) { return f32_to_f16(f); }
};

}  // namespace gk
