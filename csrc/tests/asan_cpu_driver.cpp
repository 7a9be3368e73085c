// asan_cpu_driver.cpp: the C++ CPU kernels (csrc/cpu/grpo_cpu.cpp) under AddressSanitizer + UBSan, no Python.
//
//   g++ -std=c++17 -O3 -g -fno-omit-frame-pointer -fopenmp -ffp-contract=fast -fno-math-errno -fno-trapping-math
//       -fsanitize=address,undefined -fno-sanitize-recover=all -Icsrc/include -Icsrc/cpu
//       csrc/cpu/grpo_cpu.cpp csrc/tests/asan_cpu_driver.cpp -o asan_cpu_driver
//   ./asan_cpu_driver          every case below on every ISA the CPU has; prints "ok" (exit 0) or FAIL lines
//   ./asan_cpu_driver oob      negative control: logprobs_fwd told a row is one element longer than its buffer
//                              (must die with a heap-buffer-overflow READ inside the kernel)
//   ./asan_cpu_driver ubsan    negative control: a signed integer overflow (must die with a UBSan report)
// (tests/test_sanitizers.py builds and runs it.)
//
// Every buffer is its own heap allocation of EXACTLY the size the layout needs: the first row starts at the
// allocation (after the storage offset) and the last row ends at its end, so a read or write one element before or
// after a row of the batch hits an ASan redzone. Cases: fp32 / bf16 / fp16; V = 1, odd, prime, around the kernels'
// 512-element sum chunks and the vector widths; contiguous and strided rows (row stride V + 3, batch stride
// T (V + 3) + 5, storage offset 2); masked rows (g = 0 or coef = 0) filled with NaN, which must come out as exact
// zeros without being read; ids V and -1 at the LAST row (x[id] there would be past the buffer); -inf entries;
// out of place and in place (out == logits); 1, 2 and 3 OpenMP threads; entropy on and off; every loss code.
// Results are checked against a plain double-precision computation of each row.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <limits.h>
#include <random>
#include <vector>

#include "grpo_cpu.h"
#include "grpo_math.h"

namespace {

int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (++failures <= 20) {                              \
        printf("FAIL %s:%d %s: ", __FILE__, __LINE__, #cond); \
        printf(__VA_ARGS__);                               \
        printf("\n");                                      \
      }                                                    \
    }                                                      \
  } while (0)

// An exact-size heap allocation (ASan puts redzones right after its last byte).
template <class T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) { p = static_cast<T*>(malloc(count ? count * sizeof(T) : 1)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { free(p); }
};

size_t elem_size(int dt) { return dt == gk::DT_F32 ? 4 : 2; }

float load(const void* base, int dt, int64_t i) {
  if (dt == gk::DT_F32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dt == gk::DT_BF16 ? gk::bf16_to_f32(h) : gk::f16_to_f32(h);
}

void store(void* base, int dt, int64_t i, float v) {
  if (dt == gk::DT_F32) static_cast<float*>(base)[i] = v;
  else static_cast<uint16_t*>(base)[i] = dt == gk::DT_BF16 ? gk::f32_to_bf16(v) : gk::f32_to_f16(v);
}

struct Layout {
  int64_t B, T, V, sb, st, off;
  int64_t elems() const { return B * T == 0 ? 0 : off + (B - 1) * sb + (T - 1) * st + V; }
  int64_t row(int64_t n) const { return off + (n / T) * sb + (n % T) * st; }
};

// double-precision row statistics of z = x / tau
struct RowRef {
  double lse, ent;
  std::vector<double> p;
};

RowRef row_ref(const void* x, int dt, const Layout& L, int64_t n, double tau) {
  RowRef r;
  const int64_t o = L.row(n);
  double m = -INFINITY;
  for (int64_t v = 0; v < L.V; ++v) m = fmax(m, load(x, dt, o + v) / tau);
  double s = 0, t = 0;
  for (int64_t v = 0; v < L.V; ++v) {
    const double z = load(x, dt, o + v) / tau;
    const double e = exp(z - m);
    s += e;
    if (e > 0) t += e * (z - m);
  }
  r.lse = m + log(s);
  r.ent = log(s) - t / s;
  r.p.resize(L.V);
  for (int64_t v = 0; v < L.V; ++v) r.p[v] = exp(load(x, dt, o + v) / tau - r.lse);
  return r;
}

bool close(double got, double want, double tol) { return fabs(got - want) <= tol; }

struct Case {
  int dt;
  Layout L;
  double tau;
  int threads;
  bool inplace, entropy;
  int loss_code;
  bool has_old;
};

// logits: N(0, 2^2), a few -inf; rows n % 4 == 1 are "masked" (NaN, g = 0 / coef = 0)
void fill(void* x, const Case& c, std::mt19937& rng, std::vector<int64_t>& ids) {
  const Layout& L = c.L;
  std::normal_distribution<float> nd(0.f, 2.f);
  std::uniform_int_distribution<int64_t> idd(0, L.V - 1);
  const int64_t N = L.B * L.T;
  for (int64_t i = 0; i < L.elems(); ++i) store(x, c.dt, i, nd(rng));  // the gaps between rows too
  ids.assign(N, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = L.row(n);
    ids[n] = idd(rng);
    if (L.V > 3 && n % 3 == 0) store(x, c.dt, o + (ids[n] + 1) % L.V, -INFINITY);  // a banned token
    if (n % 4 == 1)
      for (int64_t v = 0; v < L.V; ++v) store(x, c.dt, o + v, NAN);
  }
  if (N >= 2) ids[N - 1] = L.V;  // out of range at the last row: x[id] would be one past the buffer
  if (N >= 3) ids[N - 3] = -1;
}

bool masked(int64_t n) { return n % 4 == 1; }

double grad_tol(int dt, double scale) { return (dt == gk::DT_F32 ? 2e-5 : (dt == gk::DT_BF16 ? 1e-2 : 2e-3)) * scale; }

void run_logprobs(const Case& c, std::mt19937& rng) {
  const Layout& L = c.L;
  const int64_t N = L.B * L.T;
  const size_t es = elem_size(c.dt);
  Buf<char> xb(L.elems() * es);
  std::vector<int64_t> idv;
  fill(xb.p, c, rng, idv);
  Buf<int64_t> ids(N);
  memcpy(ids.p, idv.data(), N * sizeof(int64_t));
  Buf<char> x0(L.elems() * es);  // pristine copy (in place overwrites xb)
  memcpy(x0.p, xb.p, L.elems() * es);
  Buf<float> logp(N), stats(2 * N), ent(c.entropy ? N : 0), g(N), ge(c.entropy ? N : 0);
  const gk::Rows rv{xb.p + L.off * es, c.dt, L.B, L.T, L.V, L.sb, L.st, ids.p, c.tau};
  gkcpu::logprobs_fwd(rv, gk::Outputs{logp.p, stats.p, c.entropy ? ent.p : nullptr, nullptr, 0, 0}, c.threads);

  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t n = 0; n < N; ++n) {
    g.p[n] = masked(n) ? 0.f : nd(rng);
    if (c.entropy) ge.p[n] = masked(n) ? 0.f : nd(rng);
  }
  // out: a separate exact buffer with the same layout, or the logits themselves
  Buf<char> ob(c.inplace ? 0 : L.elems() * es);
  char* out = c.inplace ? xb.p : ob.p;
  if (!c.inplace)
    for (int64_t i = 0; i < L.elems(); ++i) store(out, c.dt, i, 7.f);
  gk::TokenInputs grads{};
  grads.stats = stats.p;
  grads.entropy = c.entropy ? ent.p : nullptr;
  grads.g_logp = g.p;
  grads.g_entropy = c.entropy ? ge.p : nullptr;
  gkcpu::logprobs_bwd(rv, grads, gk::Outputs{nullptr, nullptr, nullptr, out + L.off * es, L.sb, L.st}, c.threads);

  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = L.row(n);
    if (masked(n)) {
      CHECK(std::isnan(logp.p[n]), "masked NaN row n=%lld: logp %g", (long long)n, logp.p[n]);
      for (int64_t v = 0; v < L.V; ++v) CHECK(load(out, c.dt, o + v) == 0.f, "masked row n=%lld v=%lld not zero", (long long)n, (long long)v);
      continue;
    }
    const RowRef r = row_ref(x0.p, c.dt, L, n, c.tau);
    const bool valid = idv[n] >= 0 && idv[n] < L.V;
    const double lse = stats.p[2 * n] / c.tau + stats.p[2 * n + 1];  // row statistics (m, log s)
    CHECK(close(lse, r.lse, 1e-5 * fmax(1.0, fabs(r.lse))), "lse n=%lld: %g vs %g", (long long)n, lse, r.lse);
    if (valid) {
      const double lp = load(x0.p, c.dt, o + idv[n]) / c.tau - r.lse;
      CHECK(close(logp.p[n], lp, 1e-5 * fmax(1.0, fabs(r.lse))), "logp n=%lld: %g vs %g", (long long)n, logp.p[n], lp);
    } else {
      CHECK(std::isnan(logp.p[n]), "bad id n=%lld: logp %g, not NaN", (long long)n, logp.p[n]);
    }
    if (c.entropy) CHECK(close(ent.p[n], r.ent, 1e-5 * fmax(1.0, fabs(r.ent))), "entropy n=%lld: %g vs %g", (long long)n, ent.p[n], r.ent);
    // dL/dx_v = (g (onehot - p) - g_H p (z - lse + H)) / tau
    double scale = 1.0;
    std::vector<double> want(L.V);
    for (int64_t v = 0; v < L.V; ++v) {
      const double z = load(x0.p, c.dt, o + v) / c.tau, p = r.p[v];
      double d = g.p[n] * ((valid && v == idv[n] ? 1.0 : 0.0) - p);
      if (c.entropy && p > 0) d -= ge.p[n] * p * (z - r.lse + r.ent);
      want[v] = d / c.tau;
      scale = fmax(scale, fabs(want[v]));
    }
    for (int64_t v = 0; v < L.V; ++v)
      CHECK(close(load(out, c.dt, o + v), want[v], grad_tol(c.dt, scale)), "grad n=%lld v=%lld: %g vs %g",
            (long long)n, (long long)v, load(out, c.dt, o + v), want[v]);
  }
  if (!c.inplace) {  // the gaps between rows of the output are not written
    std::vector<char> row_elem(L.elems(), 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t v = 0; v < L.V; ++v) row_elem[L.row(n) + v] = 1;
    for (int64_t i = 0; i < L.elems(); ++i)
      if (!row_elem[i]) CHECK(load(out, c.dt, i) == 7.f, "gap element %lld of the output written", (long long)i);
  }
}

void run_fused(const Case& c, std::mt19937& rng) {
  const Layout& L = c.L;
  const int64_t N = L.B * L.T;
  const size_t es = elem_size(c.dt);
  Buf<char> xb(L.elems() * es);
  std::vector<int64_t> idv;
  fill(xb.p, c, rng, idv);
  Buf<int64_t> ids(N);
  memcpy(ids.p, idv.data(), N * sizeof(int64_t));
  Buf<char> x0(L.elems() * es);
  memcpy(x0.p, xb.p, L.elems() * es);
  Buf<float> old(N), ref(N), adv(N), coef(N), logp(N), ent(N);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.1f, 1.f);
  for (int64_t n = 0; n < N; ++n) {
    const bool valid = idv[n] >= 0 && idv[n] < L.V && !masked(n);
    const double lp = valid ? load(x0.p, c.dt, L.row(n) + idv[n]) / c.tau - row_ref(x0.p, c.dt, L, n, c.tau).lse : 0.0;
    old.p[n] = static_cast<float>(lp + 0.3 * nd(rng));
    ref.p[n] = static_cast<float>(lp + 0.3 * nd(rng));
    adv.p[n] = nd(rng);
    coef.p[n] = masked(n) ? 0.f : ud(rng);
  }
  gk::TokenInputs tok{};
  tok.old_logps = c.has_old ? old.p : nullptr;
  tok.ref_logps = ref.p;
  tok.advantages = adv.p;
  tok.coef = coef.p;
  gk::LossParams P{};
  P.loss_code = c.loss_code;
  P.epsilon_low = 0.2f;
  P.epsilon_high = c.loss_code == gk::LOSS_CISPO ? 4.f : 0.28f;
  P.has_delta = true;
  P.delta = 1.5f;
  P.beta = 0.04f;
  P.use_bias_correction_kl = true;
  P.sapo_temperature_pos = 1.f;
  P.sapo_temperature_neg = 1.05f;
  Buf<char> ob(c.inplace ? 0 : L.elems() * es);
  char* out = c.inplace ? xb.p : ob.p;
  const gk::Rows rv{xb.p + L.off * es, c.dt, L.B, L.T, L.V, L.sb, L.st, ids.p, c.tau};
  gkcpu::fused_fwd_bwd(rv, tok, P, gk::Outputs{logp.p, nullptr, ent.p, out + L.off * es, L.sb, L.st}, c.threads);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = L.row(n);
    if (masked(n)) {
      for (int64_t v = 0; v < L.V; ++v) CHECK(load(out, c.dt, o + v) == 0.f, "fused masked row n=%lld not zero", (long long)n);
      continue;
    }
    const RowRef r = row_ref(x0.p, c.dt, L, n, c.tau);
    const bool valid = idv[n] >= 0 && idv[n] < L.V;
    CHECK(close(ent.p[n], r.ent, 1e-5 * fmax(1.0, fabs(r.ent))), "fused entropy n=%lld", (long long)n);
    if (!valid) {
      CHECK(std::isnan(logp.p[n]), "fused bad id n=%lld: logp %g", (long long)n, logp.p[n]);
      continue;  // g = NaN: the row's gradient is NaN by design (the API never launches with such an id)
    }
    const double lp = load(x0.p, c.dt, o + idv[n]) / c.tau - r.lse;
    CHECK(close(logp.p[n], lp, 1e-5 * fmax(1.0, fabs(r.lse))), "fused logp n=%lld: %g vs %g", (long long)n, logp.p[n], lp);
    // the row weight as the kernel defines it (grpo_math.h, tested against torch elsewhere), on its own logp
    const double gw = coef.p[n] * gk::dloss_dlogp(logp.p[n], c.has_old, old.p[n], 1, ref.p[n], adv.p[n], P);
    double scale = 1.0;
    for (int64_t v = 0; v < L.V; ++v) scale = fmax(scale, fabs(gw * r.p[v] / c.tau));
    for (int64_t v = 0; v < L.V; ++v) {
      const double want = gw * ((v == idv[n] ? 1.0 : 0.0) - r.p[v]) / c.tau;
      CHECK(close(load(out, c.dt, o + v), want, grad_tol(c.dt, scale)), "fused grad n=%lld v=%lld: %g vs %g",
            (long long)n, (long long)v, load(out, c.dt, o + v), want);
    }
  }
}

int negative_control_oob() {
  // One row of V = 100 fp32 logits in a buffer of 99: the row's last element is one past the allocation.
  Buf<float> x(99);
  for (int i = 0; i < 99; ++i) x.p[i] = 0.01f * i;
  Buf<int64_t> ids(1);
  ids.p[0] = 3;
  Buf<float> logp(1), lse(1);
  const gk::Rows rv{x.p, gk::DT_F32, 1, 1, 100, 100, 100, ids.p, 1.0};
  gkcpu::logprobs_fwd(rv, gk::Outputs{logp.p, lse.p, nullptr, nullptr, 0, 0}, 1);
  printf("no report: logp %g\n", logp.p[0]);
  return 0;
}

int negative_control_ubsan(int argc) {
  volatile int big = INT_MAX;
  const int r = big + argc;  // signed overflow: undefined behaviour
  printf("no report: %d\n", r);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "oob") == 0) return negative_control_oob();
  if (argc > 1 && strcmp(argv[1], "ubsan") == 0) return negative_control_ubsan(argc);

  // B = 0: nothing to do, nothing read (null pointers)
  gkcpu::logprobs_fwd(gk::Rows{nullptr, 0, 0, 3, 7, 21, 7, nullptr, 1.0}, gk::Outputs{}, 2);

  const int64_t shapes[][3] = {{1, 1, 1}, {2, 3, 1}, {2, 3, 7}, {1, 5, 8}, {3, 2, 33}, {2, 2, 511}, {1, 3, 513},
                               {2, 2, 1025}, {1, 2, 4099}, {3, 3, 97}};
  std::mt19937 rng(1234);
  int cases = 0;
  for (const char* isa : gkcpu::kIsas) {
    if (!gkcpu::set_isa(isa)) continue;
    for (int dt = 0; dt < 3; ++dt)
      for (const auto& s : shapes)
        for (int strided = 0; strided < 2; ++strided)
          for (int inplace = 0; inplace < 2; ++inplace) {
            const int64_t B = s[0], T = s[1], V = s[2];
            Case c;
            c.dt = dt;
            c.L = strided ? Layout{B, T, V, T * (V + 3) + 5, V + 3, 2} : Layout{B, T, V, T * V, V, 0};
            c.tau = (cases % 3 == 0) ? 1.0 : (cases % 3 == 1 ? 0.7 : 1.9);
            c.threads = 1 + cases % 3;
            c.inplace = inplace;
            c.entropy = (cases / 2) % 2 == 0;
            c.loss_code = cases % 3;
            c.has_old = cases % 4 != 0;
            run_logprobs(c, rng);
            run_fused(c, rng);
            ++cases;
          }
  }
  gkcpu::set_isa("baseline");
  printf("%d cases (%s last)\n", cases, gkcpu::isa());
  if (failures) {
    printf("%d failures\n", failures);
    return 1;
  }
  printf("ok\n");
  return 0;
}
