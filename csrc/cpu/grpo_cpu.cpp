// grpo_cpu.cpp: C++ CPU kernels of grpo_kernels (backend="cpu"); the math lives in csrc/include/grpo_math.h.
//
// Parallelism: OpenMP over rows (schedule(static)); within a row, loops marked `omp simd` that the compiler
// vectorises (no -ffast-math: -inf / NaN semantics are kept, see exp_le0_clamped).
//
// Passes over one row of V logits (z = x * inv_tau):
//   forward   1) m = max x             2) s = sum e^{d}, t = sum e^{d} d, d = (x - m)/tau -> (m, log s), logp, H
//   backward  1) out_v = (g_logp (onehot - p_v) - g_ent p_v (d_v + H)) / tau,  p_v = e^{d_v},
//                d_v = (x_v - m)/tau - log s from the saved pair (m, log s) (grpo_boundary.h)
//   fused     1) m   2) e_v = e^{(x_v-m)/tau} kept in a per-thread fp32 scratch row, s, t -> logp, entropy,
//             g = coef * dloss/dlogp   3) out_v = g (onehot - e_v / s) / tau   (one exp per element)
// The row is read from memory once; passes 2 and 3 hit the cache (a 32k-vocabulary row is 128 KiB in fp32).
// Pass 3 of a large fp32 gradient is written with streaming stores: see StreamRowFn.
//
// ISA: every row kernel is compiled from one template body for the compiler's baseline ISA and, on x86-64,
// twice more through function attributes: AVX2+FMA+F16C (256-bit vectors) and AVX-512 F/BW/DQ/VL with
// 512-bit vectors preferred. The widest set the CPU reports is chosen at load time (GRPO_KERNELS_CPU_ISA=
// avx2 or =baseline, any case, asks for less), so one wheel runs on any x86-64 CPU. AVX-512 halves the instructions
// of the exp loops; bf16 gains less because GCC keeps 256-bit vectors in the loops that load 16-bit
// elements. The OpenMP row loops are baseline code that call the row kernel through a function pointer
// (one call per row).
#include "grpo_cpu.h"

#include <omp.h>
#include <new>
#include <stdlib.h>
#include <string.h>
#include <strings.h>  // strcasecmp

#include "grpo_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gkcpu {
namespace {

using gk::Elem;

#define GK_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr float kInf = __builtin_inff();

GK_ALWAYS_INLINE float bitsf(uint32_t u) { return gk::bits_f32(u); }
GK_ALWAYS_INLINE uint32_t fbits(float f) { return gk::f32_bits(f); }

// e^x for the arguments of a softmax, x <= 0 (a shifted logit (z - max z) / tau, or that minus log s), -inf
// or NaN; branch-free so that a loop of it vectorises; <= 2 ulp on [-86, 0].
//   x = n ln2 + r, |r| <= ln2/2, n = round(x log2 e) (the 1.5*2^23 trick: RNE, and the integer n sits in
//   the low mantissa bits of the sum);  e^r by its degree-7 Taylor polynomial (truncation r^8/8! < 6e-9
//   relative);  2^n for n in [-124, 0] is a normal float built from its exponent bits.
//   x < -86 returns 0 (true value < 4.5e-38: an absolute error far below any fp32 sum of e^(z-m) >= 1),
//   NaN returns NaN (the comparison is false for NaN). x > 0 is outside the domain (n > 127 would overflow
//   the exponent field); the callers' arguments are <= 0 by construction. Leaving out the upper clamp and
//   its inf select takes a compare and two blends out of every vector of the exp loops (measured in
//   bench/results/NOTES.md, "Two CPU kernel changes, paired"); the results are bit-identical to a general exp's.
// exp_le0_clamped is the same for x already in [-86, 0] (or NaN): the forward loops keep that clamped
// argument to weight the entropy sum, which spares them a mask for e = 0 at x = -inf.
GK_ALWAYS_INLINE float exp_le0_clamped(float xc) {
  const float magic = 12582912.f;  // 1.5 * 2^23
  const float tn = xc * 1.44269504088896341f + magic;
  const float n = tn - magic;
  const int32_t ni = static_cast<int32_t>(fbits(tn) - fbits(magic));
  float r = xc - n * 0.693145751953125f;  // ln2 high part: 9 significant bits, n * it is exact
  r = r - n * 1.428606765330187045e-06f;  // ln2 low part
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * bitsf(static_cast<uint32_t>(ni + 127) << 23);  // p * 2^n, exact: the product is normal
}

GK_ALWAYS_INLINE float clamp_exp_arg(float x) { return x < -86.f ? -86.f : x; }

GK_ALWAYS_INLINE float vexp(float x) {
  const float y = exp_le0_clamped(clamp_exp_arg(x));
  return x < -86.f ? 0.f : y;
}

template <int DT>
using ET = typename Elem<DT>::T;

// Sums over a row run in chunks of kChunk elements whose (vector-lane) partial sums are then added: a lane
// adds kChunk / width terms, the row adds V / kChunk chunk sums, so the rounding error of s grows like
// (kChunk / width + V / kChunk) eps instead of (V / width) eps (measured at V = 32k: 3x torch's logp error
// with one running sum, on par with it chunked).
constexpr int64_t kChunk = 512;

// ---- row bodies (inlined into each ISA's wrapper) --------------------------------------------------

// r[0] = logp, r[1] = m (max of the raw logits), r[2] = log s, r[3] = entropy
// d = (x - max x) / tau, never x / tau - m: see "Shifted logits" in grpo_boundary.h.
template <int DT, bool ENT>
GK_ALWAYS_INLINE void fwd_row_body(const void* xv, int64_t V, int64_t id, float inv_tau, float* r) {
  const ET<DT>* x = static_cast<const ET<DT>*>(xv);
  float mx = -kInf;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) {
    const float z = Elem<DT>::load(x[v]);
    mx = z > mx ? z : mx;
  }
  float s = 0.f, t = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {  // two-level sums, see kChunk
    const int64_t c1 = c0 + kChunk < V ? c0 + kChunk : V;
    float sc = 0.f, tc = 0.f;
#pragma omp simd reduction(+ : sc, tc)
    for (int64_t v = c0; v < c1; ++v) {
      const float d = (Elem<DT>::load(x[v]) - mx) * inv_tau;  // shifted logit, see above
      const float dc = clamp_exp_arg(d);
      const float e = d < -86.f ? 0.f : exp_le0_clamped(dc);
      sc += e;
      if (ENT) tc += e * dc;  // e = 0 wherever dc != d: z = -inf contributes 0, not 0 * -inf
    }
    s += sc;
    t += tc;
  }
  const float ls = logf(s);
  r[0] = (id >= 0 && id < V) ? (Elem<DT>::load(x[id]) - mx) * inv_tau - ls : gk::quiet_nan();
  r[1] = mx;
  r[2] = ls;
  if (ENT) r[3] = ls - t / s;
}

template <int DT, bool ENT>
GK_ALWAYS_INLINE void bwd_row_body(const void* xv, void* ov, int64_t V, int64_t id, float m, float ls, float H,
                                   float g, float ge, float inv_tau) {
  const ET<DT>* x = static_cast<const ET<DT>*>(xv);
  ET<DT>* o = static_cast<ET<DT>*>(ov);
  const bool has_t = id >= 0 && id < V;
  const float x_id = has_t ? Elem<DT>::load(x[id]) : 0.f;  // read before an in-place write
  // x and o may be the same row (inplace): each iteration reads x[v] before writing o[v], same index.
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float d = gk::shifted_logit(Elem<DT>::load(x[v]), m, ls, inv_tau);
    const float p = vexp(d);
    float gr = -g * p;
    if (ENT) gr -= p != 0.f ? ge * p * (d + H) : 0.f;
    o[v] = Elem<DT>::store(gr * inv_tau);
  }
  if (has_t) o[id] = Elem<DT>::store(gk::grad_elem(gk::shifted_logit(x_id, m, ls, inv_tau), H, 1, g, ENT ? ge : 0.f,
                                                    inv_tau));
}

// Pass 3 of the fused kernel for an fp32 gradient row, with non-temporal (streaming) stores:
// o[v] = a * (e[v] * b), the same products as the plain loop (so the same bits), or o[v] = 0 when zero;
// then a store fence, so that the caller's plain store of the target element lands after them. A plain
// store to a line that is not in the cache first reads the line from memory (read-for-ownership), so writing
// an N x V gradient far larger than the cache moves three bytes for every two it stores; a streaming store
// writes the line without reading it. Used when the gradient has at least kStreamMinBytes (below that it may
// still be in the cache for the op that reads it next) and is not the logits themselves (in place, the row
// was just read: its lines are in the cache and nothing is saved). Measured in bench/results/NOTES.md, "Two
// CPU kernel changes, paired".
typedef void (*StreamRowFn)(float* o, const float* e, int64_t V, float a, float b, bool zero);
constexpr size_t kStreamMinBytes = size_t(32) << 20;  // the last-level cache of one server CPU's core complex

struct RowLoss {
  gk::LossParams p;
  int has_old, has_ref;
  float old, ref, adv, coef;
};

// r[0] = logp, r[1] = entropy; scratch: V floats; stream: pass 3 of an fp32 row (nullptr: plain stores)
template <int DT>
GK_ALWAYS_INLINE void fused_row_body(const void* xv, void* ov, int64_t V, int64_t id, float inv_tau,
                                     const RowLoss& L, float* scratch, StreamRowFn stream, float* r) {
  const ET<DT>* x = static_cast<const ET<DT>*>(xv);
  ET<DT>* o = static_cast<ET<DT>*>(ov);
  const bool has_t = id >= 0 && id < V;
  const float x_id = has_t ? Elem<DT>::load(x[id]) : 0.f;
  float mx = -kInf;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) {
    const float z = Elem<DT>::load(x[v]);
    mx = z > mx ? z : mx;
  }
  float s = 0.f, t = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < V ? c0 + kChunk : V;
    float sc = 0.f, tc = 0.f;
#pragma omp simd reduction(+ : sc, tc)
    for (int64_t v = c0; v < c1; ++v) {
      const float d = (Elem<DT>::load(x[v]) - mx) * inv_tau;
      const float dc = clamp_exp_arg(d);
      const float e = d < -86.f ? 0.f : exp_le0_clamped(dc);
      scratch[v] = e;
      sc += e;
      tc += e * dc;  // as in fwd_row_body
    }
    s += sc;
    t += tc;
  }
  const float ls = logf(s);
  const float logp = has_t ? (x_id - mx) * inv_tau - ls : gk::quiet_nan();
  r[0] = logp;
  r[1] = ls - t / s;
  if (L.coef == 0.f) {  // masked token: exact zeros (its logits may be garbage)
    if (DT == 0 && stream) {
      stream(static_cast<float*>(ov), scratch, V, 0.f, 0.f, true);
      return;
    }
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) o[v] = Elem<DT>::store(0.f);
    return;
  }
  const float g = L.coef * gk::dloss_dlogp(logp, L.has_old, L.old, L.has_ref, L.ref, L.adv, L.p);
  const float gs = g * inv_tau, inv_s = 1.f / s;
  if (DT == 0 && stream) {
    stream(static_cast<float*>(ov), scratch, V, -gs, inv_s, false);
    if (has_t) o[id] = Elem<DT>::store(gs * (1.f - scratch[id] * inv_s));
    return;
  }
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) o[v] = Elem<DT>::store(-gs * (scratch[v] * inv_s));
  if (has_t) o[id] = Elem<DT>::store(gs * (1.f - scratch[id] * inv_s));
}

// ---- per-ISA instantiations -----------------------------------------------------------------------
typedef void (*FwdRowFn)(const void*, int64_t, int64_t, float, float*);
typedef void (*BwdRowFn)(const void*, void*, int64_t, int64_t, float, float, float, float, float, float);
typedef void (*FusedRowFn)(const void*, void*, int64_t, int64_t, float, const RowLoss&, float*, StreamRowFn,
                           float*);

struct RowKernels {
  FwdRowFn fwd[3][2];  // [dtype][entropy]
  BwdRowFn bwd[3][2];
  FusedRowFn fused[3];
  StreamRowFn stream_f32;  // nullptr: this build writes every row with plain stores
};

#define GK_DEFINE_ISA(NS, ATTR, STREAM)                                                                  \
  namespace NS {                                                                                         \
  template <int DT, bool ENT>                                                                            \
  ATTR void fwd_row(const void* x, int64_t V, int64_t id, float it, float* r) {                          \
    fwd_row_body<DT, ENT>(x, V, id, it, r);                                                              \
  }                                                                                                      \
  template <int DT, bool ENT>                                                                            \
  ATTR void bwd_row(const void* x, void* o, int64_t V, int64_t id, float m, float ls, float H, float g,   \
                    float ge, float it) {                                                                \
    bwd_row_body<DT, ENT>(x, o, V, id, m, ls, H, g, ge, it);                                             \
  }                                                                                                      \
  template <int DT>                                                                                      \
  ATTR void fused_row(const void* x, void* o, int64_t V, int64_t id, float it, const RowLoss& L,         \
                      float* sc, StreamRowFn st, float* r) {                                             \
    fused_row_body<DT>(x, o, V, id, it, L, sc, st, r);                                                   \
  }                                                                                                      \
  const RowKernels table = {                                                                             \
      {{fwd_row<0, false>, fwd_row<0, true>},                                                            \
       {fwd_row<1, false>, fwd_row<1, true>},                                                            \
       {fwd_row<2, false>, fwd_row<2, true>}},                                                           \
      {{bwd_row<0, false>, bwd_row<0, true>},                                                            \
       {bwd_row<1, false>, bwd_row<1, true>},                                                            \
       {bwd_row<2, false>, bwd_row<2, true>}},                                                           \
      {fused_row<0>, fused_row<1>, fused_row<2>},                                                        \
      STREAM,                                                                                            \
  };                                                                                                     \
  }

GK_DEFINE_ISA(isa_base, , nullptr)
#if defined(__x86_64__) && defined(__GNUC__)
#define GK_HAVE_AVX2_PATH 1

// StreamRowFn on W-float vectors: plain stores up to the first aligned vector, streaming stores of whole
// vectors, plain stores for the tail, a fence.
#define GK_DEFINE_STREAM(NAME, ATTR, W, VEC, SET1, ZERO, MUL, LOADU, STREAM_STORE)                       \
  ATTR void NAME(float* o, const float* e, int64_t V, float a, float b, bool zero) {                     \
    int64_t v = 0;                                                                                       \
    for (; v < V && (reinterpret_cast<uintptr_t>(o + v) & (4 * W - 1)) != 0; ++v)                        \
      o[v] = zero ? 0.f : a * (e[v] * b);                                                                \
    const VEC va = SET1(a), vb = SET1(b);                                                                \
    if (zero)                                                                                            \
      for (; v + W <= V; v += W) STREAM_STORE(o + v, ZERO());                                            \
    else                                                                                                 \
      for (; v + W <= V; v += W) STREAM_STORE(o + v, MUL(va, MUL(LOADU(e + v), vb)));                    \
    for (; v < V; ++v) o[v] = zero ? 0.f : a * (e[v] * b);                                               \
    _mm_sfence();                                                                                        \
  }
GK_DEFINE_STREAM(stream_row_avx2, __attribute__((target("avx2,fma,f16c"))), 8, __m256, _mm256_set1_ps,
                 _mm256_setzero_ps, _mm256_mul_ps, _mm256_loadu_ps, _mm256_stream_ps)
GK_DEFINE_STREAM(stream_row_avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), 16,
                 __m512, _mm512_set1_ps, _mm512_setzero_ps, _mm512_mul_ps, _mm512_loadu_ps, _mm512_stream_ps)

GK_DEFINE_ISA(isa_avx2, __attribute__((target("avx2,fma,f16c"))), stream_row_avx2)
GK_DEFINE_ISA(isa_avx512,
              __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512"))),
              stream_row_avx512)
#endif

bool cpu_runs_all() { return true; }

#if GK_HAVE_AVX2_PATH
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

// The builds of this module, narrowest first (names as in kIsas).
struct IsaBuild {
  const char* name;
  const RowKernels* table;
  bool (*cpu_runs)();
};
const IsaBuild kBuilds[] = {
    {"baseline", &isa_base::table, cpu_runs_all},
#if GK_HAVE_AVX2_PATH
    {"avx2", &isa_avx2::table, cpu_has_avx2},
    {"avx512", &isa_avx512::table, cpu_has_avx512},
#endif
};

// The widest build the CPU runs, no wider than the one GRPO_KERNELS_CPU_ISA names (if it names one).
const RowKernels* choose_default() {
  const char* env = getenv("GRPO_KERNELS_CPU_ISA");
  const RowKernels* best = &isa_base::table;
  for (const IsaBuild& b : kBuilds) {
    if (b.cpu_runs()) best = b.table;
    if (env && strcasecmp(env, b.name) == 0) break;  // any case; unknown names are rejected in Python
  }
  return best;
}

const RowKernels* g_kernels = choose_default();

GK_ALWAYS_INLINE int64_t row_off(int64_t n, int64_t T, int64_t sb, int64_t st) { return (n / T) * sb + (n % T) * st; }

GK_ALWAYS_INLINE size_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

int threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace

void logprobs_fwd(const gk::Rows& x, const gk::Outputs& out, int num_threads) {
  const int64_t N = x.B * x.T;
  if (N == 0) return;
  const float inv_tau = static_cast<float>(1.0 / x.tau);
  float* ent = out.entropy;
  const FwdRowFn fn = g_kernels->fwd[x.dtype][ent != nullptr];
  const char* base = static_cast<const char*>(x.logits);
  const size_t es = elem_size(x.dtype);
#pragma omp parallel for schedule(static) num_threads(threads(num_threads))
  for (int64_t n = 0; n < N; ++n) {
    float r[4];
    fn(base + row_off(n, x.T, x.stride_b, x.stride_t) * es, x.V, x.ids[n], inv_tau, r);
    out.logp[n] = r[0];
    out.stats[2 * n] = r[1];
    out.stats[2 * n + 1] = r[2];
    if (ent) ent[n] = r[3];
  }
}

void logprobs_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, int num_threads) {
  const int64_t N = x.B * x.T;
  if (N == 0) return;
  const float inv_tau = static_cast<float>(1.0 / x.tau);
  const bool use_ent = in.entropy != nullptr && in.g_entropy != nullptr;
  const BwdRowFn fn = g_kernels->bwd[x.dtype][use_ent];
  const char* base = static_cast<const char*>(x.logits);
  char* obase = static_cast<char*>(out.grad);
  const size_t es = elem_size(x.dtype);
  const int64_t V = x.V;
#pragma omp parallel for schedule(static) num_threads(threads(num_threads))
  for (int64_t n = 0; n < N; ++n) {
    const float g = in.g_logp[n], ge = use_ent ? in.g_entropy[n] : 0.f;
    char* orow = obase + row_off(n, x.T, out.grad_stride_b, out.grad_stride_t) * es;
    if (g == 0.f && ge == 0.f) {  // masked token: zeros, its logits are not read
      memset(orow, 0, static_cast<size_t>(V) * es);
      continue;
    }
    fn(base + row_off(n, x.T, x.stride_b, x.stride_t) * es, orow, V, x.ids[n], in.stats[2 * n], in.stats[2 * n + 1],
       use_ent ? in.entropy[n] : 0.f, g, ge, inv_tau);
  }
}

void fused_fwd_bwd(const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p, const gk::Outputs& out,
                   int num_threads) {
  const int64_t N = x.B * x.T;
  if (N == 0) return;
  const float inv_tau = static_cast<float>(1.0 / x.tau);
  const FusedRowFn fn = g_kernels->fused[x.dtype];
  const char* base = static_cast<const char*>(x.logits);
  char* obase = static_cast<char*>(out.grad);
  const size_t es = elem_size(x.dtype);
  const int64_t V = x.V;
  const bool big = static_cast<size_t>(N) * static_cast<size_t>(V) * es >= kStreamMinBytes;
  const StreamRowFn stream = (x.dtype == 0 && big && out.grad != x.logits) ? g_kernels->stream_f32 : nullptr;
  bool alloc_failed = false;
#pragma omp parallel num_threads(threads(num_threads))
  {
    float* scratch = static_cast<float*>(aligned_alloc(64, ((static_cast<size_t>(V) * 4 + 63) / 64) * 64));
    if (!scratch) {
#pragma omp atomic write
      alloc_failed = true;
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (!scratch) continue;
      RowLoss L;
      L.p = p;
      L.has_old = in.old_logps != nullptr;
      L.has_ref = in.ref_logps != nullptr;
      L.old = in.old_logps ? in.old_logps[n] : 0.f;
      L.ref = in.ref_logps ? in.ref_logps[n] : 0.f;
      L.adv = in.advantages[n];
      L.coef = in.coef[n];
      float r[2];
      fn(base + row_off(n, x.T, x.stride_b, x.stride_t) * es,
         obase + row_off(n, x.T, out.grad_stride_b, out.grad_stride_t) * es, V, x.ids[n], inv_tau, L, scratch,
         stream, r);
      out.logp[n] = r[0];
      out.entropy[n] = r[1];
    }
    free(scratch);
  }
  if (alloc_failed) throw std::bad_alloc();
}

const char* const kIsas[3] = {"baseline", "avx2", "avx512"};

const char* isa() {
  for (const IsaBuild& b : kBuilds)
    if (g_kernels == b.table) return b.name;
  return "baseline";  // unreachable: g_kernels is always one of kBuilds
}

bool set_isa(const char* name) {
  for (const IsaBuild& b : kBuilds)
    if (strcmp(name, b.name) == 0 && b.cpu_runs()) {
      g_kernels = b.table;
      return true;
    }
  return false;
}

}  // namespace gkcpu
