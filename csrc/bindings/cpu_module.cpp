// grpo_kernels._C: pybind11 bindings of the C++ CPU kernels (csrc/cpu/grpo_cpu.cpp).
//
// Raw pointers (uintptr_t from tensor.data_ptr()), shapes, element strides and dtype codes only: no torch
// headers, no libtorch link, so one wheel works with any torch build. grpo_kernels/backends/cpu_backend.py
// validates and allocates; these functions only check what would make a kernel read out of bounds
// (shapes, strides, dtype codes), then release the GIL and run.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "grpo_cpu.h"
#include "grpo_math.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

gkcpu::RowsView rows(uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " + std::to_string(dtype));
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("logits shape [B, T, V] needs B, T >= 0 and V >= 1");
  if (B * T > 0 && x == 0) throw std::invalid_argument("logits pointer is null");
  return gkcpu::RowsView{ptr<const void>(x), dtype, B, T, V, sb, st};
}

float inv(double tau) {
  if (!(tau > 0.0)) throw std::invalid_argument("tau (temperature) must be > 0");
  return static_cast<float>(1.0 / tau);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "grpo_kernels C++ CPU kernels (raw pointers; see grpo_kernels/backends/cpu_backend.py)";

  m.def(
      "logprobs_fwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids, double tau,
         uintptr_t logp, uintptr_t stats, uintptr_t ent, int num_threads) {
        const gkcpu::RowsView rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        py::gil_scoped_release nogil;
        gkcpu::logprobs_fwd(rv, ptr<const int64_t>(ids), it, ptr<float>(logp), ptr<float>(stats), ptr<float>(ent),
                            num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("tau"), py::arg("logp"), py::arg("stats"), py::arg("ent"), py::arg("num_threads"),
      "logp, row statistics (m, log s) [N, 2] [, entropy] of each row (ent = 0: not computed)");

  m.def(
      "logprobs_bwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids,
         uintptr_t stats, uintptr_t ent, uintptr_t g_logp, uintptr_t g_ent, double tau, uintptr_t out, int64_t osb,
         int64_t ost, int num_threads) {
        const gkcpu::RowsView rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        if ((ent == 0) != (g_ent == 0)) throw std::invalid_argument("ent and g_ent must both be given or both be 0");
        py::gil_scoped_release nogil;
        gkcpu::logprobs_bwd(rv, ptr<const int64_t>(ids), ptr<const float>(stats), ptr<const float>(ent),
                            ptr<const float>(g_logp), ptr<const float>(g_ent), it, gkcpu::OutView{ptr<void>(out), osb, ost},
                            num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("stats"), py::arg("ent"), py::arg("g_logp"), py::arg("g_ent"), py::arg("tau"),
      py::arg("out"), py::arg("osb"), py::arg("ost"), py::arg("num_threads"), "write dL/dlogits into out");

  m.def(
      "fused_fwd_bwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids, double tau,
         uintptr_t old, uintptr_t ref, uintptr_t adv, uintptr_t coef, int loss_code, double eps_low, double eps_high,
         bool has_delta, double delta, double beta, bool bias_corr, double sapo_pos, double sapo_neg, uintptr_t logp,
         uintptr_t ent, uintptr_t out, int64_t osb, int64_t ost, int num_threads) {
        const gkcpu::RowsView rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        if (loss_code < 0 || loss_code > 2) throw std::invalid_argument("loss_code must be 0 (clip), 1 (cispo) or 2 (sapo)");
        const gkcpu::FusedArgs a{ptr<const float>(old), ptr<const float>(ref), ptr<const float>(adv),
                                 ptr<const float>(coef), loss_code, static_cast<float>(eps_low),
                                 static_cast<float>(eps_high), has_delta, static_cast<float>(delta),
                                 static_cast<float>(beta), bias_corr, static_cast<float>(sapo_pos),
                                 static_cast<float>(sapo_neg)};
        py::gil_scoped_release nogil;
        gkcpu::fused_fwd_bwd(rv, ptr<const int64_t>(ids), it, a, ptr<float>(logp), ptr<float>(ent),
                             gkcpu::OutView{ptr<void>(out), osb, ost}, num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("tau"), py::arg("old"), py::arg("ref"), py::arg("adv"), py::arg("coef"),
      py::arg("loss_code"), py::arg("eps_low"), py::arg("eps_high"), py::arg("has_delta"), py::arg("delta"),
      py::arg("beta"), py::arg("bias_corr"), py::arg("sapo_pos"), py::arg("sapo_neg"), py::arg("logp"),
      py::arg("ent"), py::arg("out"), py::arg("osb"), py::arg("ost"), py::arg("num_threads"),
      "logp, entropy and the loss gradient w.r.t. the logits in one pass");

  m.attr("ISAS") = py::make_tuple(gkcpu::kIsas[0], gkcpu::kIsas[1], gkcpu::kIsas[2]);
  m.def("isa", &gkcpu::isa, "row-kernel instruction set in use: one of ISAS ('baseline', 'avx2', 'avx512')");
  m.def("set_isa", [](const std::string& s) { return gkcpu::set_isa(s.c_str()); }, py::arg("name"),
        "force one of ISAS (tests, benchmarks); returns False when this build or the CPU cannot run it");

  // The dtype conversions of grpo_math.h over arrays, for the exhaustive test against torch's conversions.
  m.def(
      "convert",
      [](uintptr_t src, uintptr_t dst, int64_t n, int dtype, bool to_f32) {
        if (dtype != gk::DT_BF16 && dtype != gk::DT_F16) throw std::invalid_argument("dtype must be 1 (bf16) or 2 (fp16)");
        const uint16_t* h = ptr<const uint16_t>(to_f32 ? src : dst);
        const float* f = ptr<const float>(to_f32 ? dst : src);
        for (int64_t i = 0; i < n; ++i) {
          if (to_f32) const_cast<float*>(f)[i] = dtype == gk::DT_BF16 ? gk::bf16_to_f32(h[i]) : gk::f16_to_f32(h[i]);
          else const_cast<uint16_t*>(h)[i] = dtype == gk::DT_BF16 ? gk::f32_to_bf16(f[i]) : gk::f32_to_f16(f[i]);
        }
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"), py::arg("to_f32"),
      "uint16 bits (dtype 1 bf16 / 2 fp16) <-> fp32 with the conversions of grpo_math.h");
}
