// Standalone check of csrc/include/grpo_math.h on the host (no Python, no torch):
//   g++ -O2 -std=c++17 -Icsrc/include csrc/tests/test_grpo_math.cpp -o /tmp/t && /tmp/t
// - fp16: all 65536 bit patterns against the compiler's _Float16 (IEEE binary16, RNE), both directions,
//   plus float -> half on a sweep of floats including ties, subnormals, overflow, inf, NaN;
// - bf16: float -> bf16 against an independent rounding in double (nearest, ties to even);
// - the online log-sum-exp (push and merge) against a double two-pass computation, -inf entries included.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <vector>

#include "grpo_math.h"

static int failures = 0;
#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      if (++failures < 20) {                  \
        std::printf("FAIL %s: ", #cond);      \
        std::printf(__VA_ARGS__);             \
        std::printf("\n");                    \
      }                                       \
    }                                         \
  } while (0)

// the row's lse as one float m / tau + log s (the kernels keep the pair (m, log s), see grpo_boundary.h)
static float lse_value(const gk::LseState& st, float inv_tau) { return st.m * inv_tau + std::log(st.s); }

static uint16_t half_bits(_Float16 h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }
static _Float16 bits_half(uint16_t u) { _Float16 h; std::memcpy(&h, &u, 2); return h; }

// float -> bf16 in double arithmetic: the two bf16 neighbours of f, pick the nearer, ties to even mantissa.
static uint16_t bf16_ref(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u = gk::f32_bits(f);
  uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation toward zero
  uint16_t hi = static_cast<uint16_t>(lo + 1);   // next magnitude (may be inf)
  double vl = gk::bf16_to_f32(lo), vh = gk::bf16_to_f32(hi);
  if (std::isinf(vh)) vh = std::copysign(std::ldexp(1.0, 128), (double)f);  // the value past the largest bf16
  double dl = std::fabs((double)f - vl), dh = std::fabs(vh - (double)f);
  if ((u & 0xffff) == 0) return lo;
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo & 1) ? hi : lo;
}

int main() {
  // fp16 -> fp32, exhaustive
  for (uint32_t b = 0; b < 65536; ++b) {
    float mine = gk::f16_to_f32(static_cast<uint16_t>(b));
    float ref = static_cast<float>(bits_half(static_cast<uint16_t>(b)));
    if (std::isnan(ref)) CHECK(std::isnan(mine), "h=%04x", b);
    else CHECK(gk::f32_bits(mine) == gk::f32_bits(ref), "h=%04x mine=%g ref=%g", b, mine, ref);
    // round trip
    if (!std::isnan(ref)) CHECK(gk::f32_to_f16(mine) == b, "roundtrip h=%04x", b);
  }
  // bf16 -> fp32 -> bf16, exhaustive
  for (uint32_t b = 0; b < 65536; ++b) {
    float f = gk::bf16_to_f32(static_cast<uint16_t>(b));
    if (std::isnan(f)) CHECK(std::isnan(gk::bf16_to_f32(gk::f32_to_bf16(f))), "bf16 nan %04x", b);
    else CHECK(gk::f32_to_bf16(f) == b, "bf16 roundtrip %04x", b);
  }
  // float -> half / bf16 on a sweep: every 2^-13-ulp step pattern around half and bf16 boundaries, and random bits
  std::mt19937 rng(1234);
  std::vector<uint32_t> pats;
  for (uint32_t e = 0; e < 256; ++e)
    for (uint32_t m : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x2000u, 0x3000u, 0x7fffu, 0x8000u, 0x8001u, 0x18000u,
                       0x7fffffu, 0x7fe000u, 0x7ff000u, 0x400000u})
      for (uint32_t s : {0u, 0x80000000u}) pats.push_back(s | (e << 23) | m);
  for (int i = 0; i < 2000000; ++i) pats.push_back(rng());
  for (uint32_t u : pats) {
    float f = gk::bits_f32(u);
    uint16_t ref = half_bits(static_cast<_Float16>(f));
    uint16_t mine = gk::f32_to_f16(f);
    if (std::isnan(f)) CHECK((mine & 0x7c00) == 0x7c00 && (mine & 0x3ff), "f2h nan %08x", u);
    else CHECK(mine == ref, "f2h %08x (%g): mine=%04x ref=%04x", u, f, mine, ref);
    uint16_t bm = gk::f32_to_bf16(f);
    if (std::isnan(f)) CHECK(std::isnan(gk::bf16_to_f32(bm)), "f2bf nan %08x", u);
    else CHECK(bm == bf16_ref(f), "f2bf %08x (%g): mine=%04x ref=%04x", u, f, bm, bf16_ref(f));
  }
  // online (m, log s, entropy) in raw-logit units, with -inf entries, large magnitudes, temperatures, push
  // order and a 3-way merge: m is the exact raw max, log s and H within a few eps log V of float64
  const float taus[3] = {1.f, 0.37f, 2.5f};
  for (int trial = 0; trial < 200; ++trial) {
    int V = 1 + (int)(rng() % 3000);
    float scale = (trial % 4 == 0) ? 1e4f : 3.f;
    const float tau = taus[trial % 3], it = 1.f / tau;
    std::normal_distribution<float> nd(0.f, scale);
    std::vector<float> x(V);
    for (auto& v : x) v = nd(rng) + (trial % 4 == 0 ? 1e4f : 0.f);
    for (int k = 0; k < V / 10; ++k) x[rng() % V] = -INFINITY;
    double m = -INFINITY;
    for (float v : x) m = std::max(m, (double)v);
    double s = 0, t = 0;
    for (float v : x) if (v != -INFINITY) { double d = (v - m) * (double)it, e = std::exp(d); s += e; t += e * d; }
    const double ls = std::log(s), H = ls - t / s;
    gk::LseState st, parts[3];
    gk::lse_init(st);
    for (auto& p : parts) gk::lse_init(p);
    for (int v = 0; v < V; ++v) { gk::lse_push(st, x[v], it); gk::lse_push(parts[v % 3], x[v], it); }
    gk::lse_merge(parts[0], parts[1], it);
    gk::lse_merge(parts[0], parts[2], it);
    for (auto* q : {&st, &parts[0]}) {
      if (std::isinf(m)) continue;
      CHECK(q->m == (float)m, "raw max V=%d m=%g expected %g", V, q->m, m);
      double els = std::fabs(std::log((double)q->s) - ls), eh = std::fabs(gk::entropy_value(*q) - H);
      CHECK(els <= 1e-5 * std::log(V + 1.0), "log s V=%d err=%g", V, els);
      CHECK(eh <= 1e-5 * (1 + H) * std::log(V + 1.0), "entropy V=%d err=%g H=%g", V, eh, H);
      // the row's d of its top logit is exactly -log s (x - m = 0), whatever tau
      CHECK(gk::shifted_logit((float)m, q->m, std::log(q->s), it) == -std::log(q->s), "top d");
    }
  }
  // all -inf row: lse = -inf, no NaN from the state
  gk::LseState st;
  gk::lse_init(st);
  for (int i = 0; i < 5; ++i) gk::lse_push(st, -INFINITY, 1.f);
  CHECK(st.s == 0.f && st.t == 0.f && lse_value(st, 1.f) == -INFINITY, "all -inf");
  // NaN entry poisons
  gk::lse_push(st, 1.f, 1.f);
  gk::lse_push(st, NAN, 1.f);
  CHECK(std::isnan(lse_value(st, 1.f)), "nan propagates");
  std::printf(failures ? "FAILED (%d)\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
