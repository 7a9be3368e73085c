// grpo_cuda_kernels.cuh: the CUDA kernels (templates over the storage dtype and the entropy flag).
//
// One block per row of V logits (row n = b*T + t at element offset b*sb + t*st, 64-bit), blockDim.x a
// multiple of 32 (several warps). Per row, with z = x * inv_tau (all arithmetic fp32):
//   forward   each thread folds its elements into an online state (m, s, t) with m the max of the RAW
//             logits, s = sum e^d, t = sum e^d d, d = (x - m) / tau (grpo_math.h); warp shuffles + shared
//             memory merge the states with gk::lse_merge -> row statistics (m, log s), entropy
//             H = log s - t/s, logp = (x[id] - m) / tau - log s.
//   backward  out_v = -p_v (a + b (d_v + H)) with p_v = e^{d_v}, d_v = (x_v - m) / tau - log s from the
//             saved pair (m, log s) (why the pair, and why x - m first: grpo_boundary.h), a = g_logp/tau,
//             b = g_ent/tau, and out[id] += a (written by thread 0 after a barrier with gk::grad_elem).
//   fused     forward, then g = coef * dloss/dlogp(logp) (gk::dloss_dlogp), then the backward with b = 0.
// Memory access: a row is split into a scalar head (up to the first 16-byte boundary of the row), an
// unmasked main loop of 16-byte vectors (float4 = 4 fp32, uint4 = 8 bf16/fp16), 4 independent vectors in
// flight per thread, and a scalar tail; rows of any stride / V therefore use 128-bit loads except for at
// most 2 x 7 elements. Stores are 128-bit when the output row has the same alignment as the input row
// (same offset mod 16 bytes), else per element.
// Exponentials: p = e^d for d <= 0 is computed as exp2f(d * log2 e) (one FMUL + MUFU.EX2;
// error <= 2 ulp + |d| 2^-24 relative, i.e. absolute <= ~3e-7 on p <= 1). d is clamped below at -127:
// e^-127 already underflows to 0 in fp32 (the smallest denormal is e^-103.3), so the clamp changes no value
// but makes a -inf logit give p = 0 and p * d = 0 (not 0 * -inf = NaN); NaN passes the clamp (the
// comparison is false) and propagates.
// Inplace (out == x): every element is read and then written by the same thread in the same iteration;
// z[id] is read before the first barrier that precedes any write.
#pragma once

#include <stdint.h>

#include "grpo_cuda.cuh"
#include "grpo_math.h"

#ifndef GK_SHARED
#define GK_SHARED(name, T, N) __shared__ T name[N]
#endif

namespace gkcuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kDMin = -127.f;

GK_HD float clamp_d(float d) { return d < kDMin ? kDMin : d; }
GK_HD float exp_nonpos(float d) { return exp2f(d * kLog2e); }

// ---- 16 bytes of a row ---------------------------------------------------------------------------------
template <int DT>
struct Vec {  // bf16 / fp16: 8 elements as uint4
  static constexpr int N = 8;
  typedef uint4 Raw;
  static GK_HD void unpack(const Raw& r, float* f) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = gk::Elem<DT>::load(static_cast<uint16_t>(w[i] & 0xffffu));
      f[2 * i + 1] = gk::Elem<DT>::load(static_cast<uint16_t>(w[i] >> 16));
    }
  }
  static GK_HD Raw pack(const float* f) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = unsigned(gk::Elem<DT>::store(f[2 * i])) | (unsigned(gk::Elem<DT>::store(f[2 * i + 1])) << 16);
    Raw r;
    r.x = w[0];
    r.y = w[1];
    r.z = w[2];
    r.w = w[3];
    return r;
  }
};

template <>
struct Vec<gk::DT_F32> {
  static constexpr int N = 4;
  typedef float4 Raw;
  static GK_HD void unpack(const Raw& r, float* f) {
    f[0] = r.x;
    f[1] = r.y;
    f[2] = r.z;
    f[3] = r.w;
  }
  static GK_HD Raw pack(const float* f) {
    Raw r;
    r.x = f[0];
    r.y = f[1];
    r.z = f[2];
    r.w = f[3];
    return r;
  }
};

// Elements [0, head) and [tail, V) are scalar, [head, tail) = nvec 16-byte vectors starting at a 16-byte
// boundary. A pointer that is not even element-aligned (never the case for torch tensors) is all scalar.
struct Span {
  int64_t head, nvec, tail;
};

template <int DT>
GK_HD Span split_row(const void* p, int64_t V) {
  constexpr int ES = sizeof(typename gk::Elem<DT>::T), N = Vec<DT>::N;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Span s;
  if (a % ES != 0) {
    s.head = V;
    s.nvec = 0;
    s.tail = V;
    return s;
  }
  int64_t h = int64_t((16u - (a & 15u)) & 15u) / ES;
  s.head = h < V ? h : V;
  s.nvec = (V - s.head) / N;
  s.tail = s.head + s.nvec * N;
  return s;
}

// Visits a row: f.scalar(i, x_i) for the head and tail, f.vec(k, xs) for vector k (elements head + k*N ...),
// each thread taking every blockDim.x-th item; the main loop keeps 4 vector loads in flight per thread.
template <int DT, class F>
__device__ __forceinline__ void visit_row(const typename gk::Elem<DT>::T* row, int64_t V, const Span& sp, F& f) {
  typedef Vec<DT> Vc;
  constexpr int N = Vc::N;
  const int64_t tid = threadIdx.x, bs = blockDim.x;
  for (int64_t i = tid; i < sp.head; i += bs) f.scalar(i, gk::Elem<DT>::load(row[i]));
  for (int64_t i = sp.tail + tid; i < V; i += bs) f.scalar(i, gk::Elem<DT>::load(row[i]));
  const typename Vc::Raw* vp = reinterpret_cast<const typename Vc::Raw*>(row + sp.head);
  int64_t k = tid;
  for (; k + 3 * bs < sp.nvec; k += 4 * bs) {
    typename Vc::Raw r[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) r[u] = vp[k + u * bs];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float xs[N];
      Vc::unpack(r[u], xs);
      f.vec(k + u * bs, xs);
    }
  }
  for (; k < sp.nvec; k += bs) {
    float xs[N];
    Vc::unpack(vp[k], xs);
    f.vec(k, xs);
  }
}

// ---- forward: per-thread online state -----------------------------------------------------------------
template <bool ENT>
struct StatsOp {
  float it;  // 1 / tau
  float m, s, t;

  template <int K>
  GK_HD void push(const float* x) {
    float vm = x[0];
#pragma unroll
    for (int i = 1; i < K; ++i) vm = x[i] > vm ? x[i] : vm;
    if (vm > m) {  // rescale to the new max: d = (m - m')/tau, s' = s e^d, t' = e^d (t + d s)   (grpo_math.h)
      if (s != 0.f) {
        const float d = (m - vm) * it, c = exp_nonpos(d);
        if (ENT) t = c * fmaf(d, s, t);
        s *= c;
      }
      m = vm;
    }
    if (m == gk::neg_inf()) return;  // all elements so far are -inf: nothing to add
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const float d = clamp_d((x[i] - m) * it), e = exp_nonpos(d);
      s += e;
      if (ENT) t = fmaf(e, d, t);
    }
  }
  GK_HD void scalar(int64_t, float x) { push<1>(&x); }
  template <int N>
  GK_HD void vec(int64_t, const float (&xs)[N]) {
    push<N>(xs);
  }
};

template <bool ENT>
__device__ __forceinline__ gk::LseState warp_reduce(gk::LseState st, float it) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    gk::LseState b;
    b.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    b.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    b.t = ENT ? __shfl_xor_sync(0xffffffffu, st.t, o) : 0.f;
    gk::lse_merge(st, b, it);
  }
  return st;
}

// Block-wide merge of the per-thread states; every thread gets the result. sh: 33 entries of shared memory
// (32 warp partials + the broadcast slot). Called once per kernel (no barrier protects a second use).
template <bool ENT>
__device__ __forceinline__ gk::LseState block_reduce(gk::LseState st, float it, gk::LseState* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  st = warp_reduce<ENT>(st, it);
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    gk::LseState v;
    if (lane < nwarps) v = sh[lane];
    else gk::lse_init(v);
    v = warp_reduce<ENT>(v, it);
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  return sh[32];
}

template <int DT, bool ENT>
__device__ __forceinline__ gk::LseState row_state(const typename gk::Elem<DT>::T* row, int64_t V, float it,
                                                  const Span& sp, gk::LseState* sh) {
  StatsOp<ENT> op{it, gk::neg_inf(), 0.f, 0.f};
  visit_row<DT>(row, V, sp, op);
  gk::LseState st;
  st.m = op.m;
  st.s = op.s;
  st.t = op.t;
  return block_reduce<ENT>(st, it, sh);
}

// ---- backward: gradient of every element but the target ----------------------------------------------
template <int DT, bool ENT>
struct GradOp {
  typedef typename gk::Elem<DT>::T ET;
  float it, m, ls, H, a, b;  // row statistics (m, log s); a = g_logp / tau, b = g_ent / tau
  ET* orow;
  int64_t head;
  bool vec_out;

  GK_HD float g(float x) const {
    const float d = clamp_d(gk::shifted_logit(x, m, ls, it)), p = exp_nonpos(d);
    return ENT ? -p * fmaf(b, d + H, a) : -p * a;
  }
  GK_HD void scalar(int64_t i, float x) { orow[i] = gk::Elem<DT>::store(g(x)); }
  template <int N>
  GK_HD void vec(int64_t k, const float (&xs)[N]) {
    float o[N];
#pragma unroll
    for (int j = 0; j < N; ++j) o[j] = g(xs[j]);
    ET* dst = orow + head + k * N;
    if (vec_out) {
      // __stwb (st.global.wb): an explicit 16-byte store. A plain assignment here was merged by the
      // compiler with the per-element branch below into 32-bit stores (seen in the SASS).
      __stwb(reinterpret_cast<typename Vec<DT>::Raw*>(dst), Vec<DT>::pack(o));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) dst[j] = gk::Elem<DT>::store(o[j]);
    }
  }
};

template <int DT>
__device__ __forceinline__ void zero_row(typename gk::Elem<DT>::T* orow, int64_t V) {
  typedef Vec<DT> Vc;
  const Span sp = split_row<DT>(orow, V);
  const int64_t tid = threadIdx.x, bs = blockDim.x;
  const typename gk::Elem<DT>::T zero = gk::Elem<DT>::store(0.f);
  for (int64_t i = tid; i < sp.head; i += bs) orow[i] = zero;
  for (int64_t i = sp.tail + tid; i < V; i += bs) orow[i] = zero;
  float zs[Vc::N];
#pragma unroll
  for (int j = 0; j < Vc::N; ++j) zs[j] = 0.f;
  const typename Vc::Raw zv = Vc::pack(zs);
  typename Vc::Raw* vp = reinterpret_cast<typename Vc::Raw*>(orow + sp.head);
  for (int64_t k = tid; k < sp.nvec; k += bs) vp[k] = zv;
}

// Writes the gradient of row `xrow` into `orow` (every element but the target; see GradOp), then, after a
// barrier (the main loop may have written out[id] with the non-target value), out[id] from x_id (the raw
// target logit) with the target term, by thread 0 through the shared gk::grad_elem. valid: id in [0, V).
template <int DT, bool ENT>
__device__ __forceinline__ void write_grad(const typename gk::Elem<DT>::T* xrow, typename gk::Elem<DT>::T* orow,
                                           int64_t V, const Span& sp, float it, float m, float ls, float H,
                                           float g_logp, float g_ent, bool valid, int64_t id, float x_id) {
  const uintptr_t rel = reinterpret_cast<uintptr_t>(orow) - reinterpret_cast<uintptr_t>(xrow);
  GradOp<DT, ENT> op{it, m, ls, H, g_logp * it, g_ent * it, orow, sp.head, (rel & 15u) == 0};
  visit_row<DT>(xrow, V, sp, op);
  __syncthreads();
  if (threadIdx.x == 0 && valid)
    orow[id] = gk::Elem<DT>::store(gk::grad_elem(gk::shifted_logit(x_id, m, ls, it), H, 1, g_logp, g_ent, it));
}

// ---- kernel arguments (one struct for every kernel, passed by value) ---------------------------------
struct KArgs {
  gk::Rows x;
  gk::TokenInputs in;
  gk::Outputs out;
  gk::LossParams lp;
  float inv_tau;  // 1 / x.tau, rounded once on the host
};

__device__ __forceinline__ int64_t row_offset(int64_t n, int64_t T, int64_t sb, int64_t st) {
  const int64_t b = n / T, t = n - b * T;
  return b * sb + t * st;
}

// ---- kernels -----------------------------------------------------------------------------------------
template <int DT, bool ENT>
__global__ void __launch_bounds__(kMaxBlock) fwd_kernel(KArgs a) {
  typedef typename gk::Elem<DT>::T ET;
  GK_SHARED(sh, gk::LseState, 33);
  const int64_t n = blockIdx.x;
  const ET* row = static_cast<const ET*>(a.x.logits) + row_offset(n, a.x.T, a.x.stride_b, a.x.stride_t);
  const Span sp = split_row<DT>(row, a.x.V);
  const gk::LseState st = row_state<DT, ENT>(row, a.x.V, a.inv_tau, sp, sh);
  if (threadIdx.x == 0) {
    const float ls = logf(st.s);
    const int64_t id = a.x.ids[n];
    a.out.logp[n] = (id >= 0 && id < a.x.V) ? gk::shifted_logit(gk::Elem<DT>::load(row[id]), st.m, ls, a.inv_tau)
                                            : gk::quiet_nan();
    a.out.stats[2 * n] = st.m;
    a.out.stats[2 * n + 1] = ls;
    if (ENT) a.out.entropy[n] = gk::entropy_value(st);
  }
}

template <int DT, bool ENT>
__global__ void __launch_bounds__(kMaxBlock) bwd_kernel(KArgs a) {
  typedef typename gk::Elem<DT>::T ET;
  const int64_t n = blockIdx.x;
  ET* orow = static_cast<ET*>(a.out.grad) + row_offset(n, a.x.T, a.out.grad_stride_b, a.out.grad_stride_t);
  const float g_logp = a.in.g_logp[n], g_ent = ENT ? a.in.g_entropy[n] : 0.f;
  if (g_logp == 0.f && g_ent == 0.f) {  // masked row: exact zeros, its logits are not read (uniform branch)
    zero_row<DT>(orow, a.x.V);
    return;
  }
  const ET* xrow = static_cast<const ET*>(a.x.logits) + row_offset(n, a.x.T, a.x.stride_b, a.x.stride_t);
  const int64_t id = a.x.ids[n];
  const bool valid = id >= 0 && id < a.x.V;
  const float x_id = (threadIdx.x == 0 && valid) ? gk::Elem<DT>::load(xrow[id]) : 0.f;
  __syncthreads();  // inplace: x[id] is read before any thread overwrites it
  write_grad<DT, ENT>(xrow, orow, a.x.V, split_row<DT>(xrow, a.x.V), a.inv_tau, a.in.stats[2 * n],
                      a.in.stats[2 * n + 1], ENT ? a.in.entropy[n] : 0.f, g_logp, g_ent, valid, id, x_id);
}

template <int DT>
__global__ void __launch_bounds__(kMaxBlock) fused_kernel(KArgs a) {
  typedef typename gk::Elem<DT>::T ET;
  GK_SHARED(sh, gk::LseState, 33);
  const int64_t n = blockIdx.x;
  const ET* xrow = static_cast<const ET*>(a.x.logits) + row_offset(n, a.x.T, a.x.stride_b, a.x.stride_t);
  ET* orow = static_cast<ET*>(a.out.grad) + row_offset(n, a.x.T, a.out.grad_stride_b, a.out.grad_stride_t);
  const int64_t id = a.x.ids[n];
  const bool valid = id >= 0 && id < a.x.V;
  const float x_id = valid ? gk::Elem<DT>::load(xrow[id]) : gk::quiet_nan();  // same address: one load
  const Span sp = split_row<DT>(xrow, a.x.V);
  // the barriers inside row_state order every read of x above before any write below (inplace)
  const gk::LseState st = row_state<DT, true>(xrow, a.x.V, a.inv_tau, sp, sh);
  const float ls = logf(st.s), H = gk::entropy_value(st);
  const float logp = gk::shifted_logit(x_id, st.m, ls, a.inv_tau);  // NaN for an invalid id
  if (threadIdx.x == 0) {
    a.out.logp[n] = logp;
    a.out.entropy[n] = H;
  }
  const float coef = a.in.coef[n];
  if (coef == 0.f) {  // masked row: exact zeros whatever its logits (uniform branch)
    zero_row<DT>(orow, a.x.V);
    return;
  }
  const float* old = a.in.old_logps;
  const float* ref = a.in.ref_logps;
  const float g = coef * gk::dloss_dlogp(logp, old != nullptr, old ? old[n] : 0.f, ref != nullptr, ref ? ref[n] : 0.f,
                                         a.in.advantages[n], a.lp);
  write_grad<DT, false>(xrow, orow, a.x.V, sp, a.inv_tau, st.m, ls, H, g, 0.f, valid, id, x_id);
}

}  // namespace gkcuda
