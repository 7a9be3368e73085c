// grpo_kernels._cpu: pybind11 bindings of the C++ CPU kernels (csrc/cpu/grpo_cpu.cpp).
//
// The kernels take the boundary structs of grpo_boundary.h (bound in boundary_py.h), whose pointers are
// integers from tensor.data_ptr(): no torch headers, no libtorch link, so one wheel works with any torch
// build. grpo_kernels/backends/cpu_backend.py validates and allocates; these functions only check what would
// make a kernel read out of bounds (shapes, dtype codes, missing pointers), then release the GIL and run.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "boundary_py.h"
#include "grpo_cpu.h"
#include "grpo_math.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "grpo_kernels C++ CPU kernels (boundary structs of raw pointers; see grpo_kernels/backends/cpu_backend.py)";
  gk_py::bind_boundary(m);

  m.def(
      "logprobs_fwd",
      [](const gk::Rows& x, const gk::Outputs& out, int num_threads) {
        gk_py::check_rows(x);
        if (x.B * x.T > 0 && (out.logp == nullptr || out.stats == nullptr))
          throw std::invalid_argument("out.logp and out.stats must be non-null");
        py::gil_scoped_release nogil;
        gkcpu::logprobs_fwd(x, out, num_threads);
      },
      py::arg("rows"), py::arg("out"), py::arg("num_threads"),
      "out.logp, out.stats = (m, log s) [N, 2] [, out.entropy] of each row (entropy 0: not computed)");

  m.def(
      "logprobs_bwd",
      [](const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, int num_threads) {
        gk_py::check_rows(x);
        if ((in.entropy == nullptr) != (in.g_entropy == nullptr))
          throw std::invalid_argument("inputs.entropy and inputs.g_entropy must both be given or both be 0");
        if (x.B * x.T > 0 && (in.stats == nullptr || in.g_logp == nullptr || out.grad == nullptr))
          throw std::invalid_argument("inputs.stats, inputs.g_logp and out.grad must be non-null");
        py::gil_scoped_release nogil;
        gkcpu::logprobs_bwd(x, in, out, num_threads);
      },
      py::arg("rows"), py::arg("inputs"), py::arg("out"), py::arg("num_threads"), "write dL/dlogits into out.grad");

  m.def(
      "fused_fwd_bwd",
      [](const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p, const gk::Outputs& out,
         int num_threads) {
        gk_py::check_rows(x);
        gk_py::check_loss_params(p);
        if (x.B * x.T > 0 && (in.advantages == nullptr || in.coef == nullptr || out.logp == nullptr ||
                              out.entropy == nullptr || out.grad == nullptr))
          throw std::invalid_argument("inputs.advantages, inputs.coef, out.logp, out.entropy and out.grad must be non-null");
        py::gil_scoped_release nogil;
        gkcpu::fused_fwd_bwd(x, in, p, out, num_threads);
      },
      py::arg("rows"), py::arg("inputs"), py::arg("params"), py::arg("out"), py::arg("num_threads"),
      "out.logp, out.entropy and the loss gradient w.r.t. the logits (out.grad) in one pass");

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
