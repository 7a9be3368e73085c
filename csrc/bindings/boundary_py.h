// boundary_py.h: the pybind11 binding of the boundary structs (grpo_boundary.h), written once and included by
// every extension module (grpo_kernels._cpu, grpo_kernels._cuda and the test-only CUDA emulation module).
//
// Each struct becomes a Python class with one attribute per field, under the field's C++ name; pointers are
// integers (tensor.data_ptr(), 0 for nullptr). A default-constructed object is all zeros, and setting an
// attribute the struct does not have raises AttributeError, so a misspelt field cannot pass silently.
// `FIELDS` lists the attributes in declaration order (the Python mirror is checked against it). The classes
// are module-local: each module owns its own types, whatever compiler built it.
#pragma once

#include <pybind11/pybind11.h>

#include <stdint.h>
#include <stdexcept>
#include <string>
#include <vector>

#include "grpo_boundary.h"

namespace gk_py __attribute__((visibility("hidden"))) {  // as pybind11's own types

namespace py = pybind11;

template <class C>
class StructBinder {
 public:
  StructBinder(py::module_& m, const char* name, const char* doc) : cls_(m, name, doc, py::module_local()) {
    cls_.def(py::init<>());
  }

  template <class T>
  StructBinder& value(const char* name, T C::*field) {
    cls_.def_readwrite(name, field);
    names_.push_back(name);
    return *this;
  }

  template <class P>
  StructBinder& pointer(const char* name, P* C::*field) {
    cls_.def_property(
        name, [field](const C& o) { return reinterpret_cast<uintptr_t>(o.*field); },
        [field](C& o, uintptr_t v) { o.*field = reinterpret_cast<P*>(v); });
    names_.push_back(name);
    return *this;
  }

  void done() {
    py::tuple t(names_.size());
    for (size_t i = 0; i < names_.size(); ++i) t[i] = py::str(names_[i]);
    cls_.attr("FIELDS") = t;
  }

 private:
  py::class_<C> cls_;
  std::vector<std::string> names_;
};

inline void bind_boundary(py::module_& m) {
  StructBinder<gk::Rows>(m, "Rows", "row layout of the logits [B, T, V] (grpo_boundary.h)")
      .pointer("logits", &gk::Rows::logits)
      .value("dtype", &gk::Rows::dtype)
      .value("B", &gk::Rows::B)
      .value("T", &gk::Rows::T)
      .value("V", &gk::Rows::V)
      .value("stride_b", &gk::Rows::stride_b)
      .value("stride_t", &gk::Rows::stride_t)
      .pointer("ids", &gk::Rows::ids)
      .value("tau", &gk::Rows::tau)
      .done();
  StructBinder<gk::TokenInputs>(m, "TokenInputs", "per-token inputs [N] fp32 (grpo_boundary.h)")
      .pointer("stats", &gk::TokenInputs::stats)
      .pointer("entropy", &gk::TokenInputs::entropy)
      .pointer("g_logp", &gk::TokenInputs::g_logp)
      .pointer("g_entropy", &gk::TokenInputs::g_entropy)
      .pointer("old_logps", &gk::TokenInputs::old_logps)
      .pointer("ref_logps", &gk::TokenInputs::ref_logps)
      .pointer("advantages", &gk::TokenInputs::advantages)
      .pointer("coef", &gk::TokenInputs::coef)
      .done();
  StructBinder<gk::Outputs>(m, "Outputs", "where a kernel writes (grpo_boundary.h)")
      .pointer("logp", &gk::Outputs::logp)
      .pointer("stats", &gk::Outputs::stats)
      .pointer("entropy", &gk::Outputs::entropy)
      .pointer("grad", &gk::Outputs::grad)
      .value("grad_stride_b", &gk::Outputs::grad_stride_b)
      .value("grad_stride_t", &gk::Outputs::grad_stride_t)
      .done();
  StructBinder<gk::LossParams>(m, "LossParams", "scalars of the per-token loss derivative (grpo_boundary.h)")
      .value("loss_code", &gk::LossParams::loss_code)
      .value("epsilon_low", &gk::LossParams::epsilon_low)
      .value("epsilon_high", &gk::LossParams::epsilon_high)
      .value("has_delta", &gk::LossParams::has_delta)
      .value("delta", &gk::LossParams::delta)
      .value("beta", &gk::LossParams::beta)
      .value("use_bias_correction_kl", &gk::LossParams::use_bias_correction_kl)
      .value("sapo_temperature_pos", &gk::LossParams::sapo_temperature_pos)
      .value("sapo_temperature_neg", &gk::LossParams::sapo_temperature_neg)
      .done();
  // A LossParams passed into C++ by value and returned: the round-trip test of the Python mirror.
  m.def("echo_loss_params", [](gk::LossParams p) { return p; }, py::arg("params"),
        "returns a copy of params made in C++ (tests the binding of every field)");
}

// Checks shared by the modules: what would make a kernel read out of bounds.
inline void check_rows(const gk::Rows& x) {
  if (x.dtype < gk::DT_F32 || x.dtype > gk::DT_F16)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " + std::to_string(x.dtype));
  if (x.B < 0 || x.T < 0 || x.V < 1) throw std::invalid_argument("logits shape [B, T, V] needs B, T >= 0 and V >= 1");
  if (x.B * x.T > 0 && (x.logits == nullptr || x.ids == nullptr))
    throw std::invalid_argument("logits and ids pointers must be non-null");
  if (!(x.tau > 0.0)) throw std::invalid_argument("tau (temperature) must be > 0");
}

inline void check_loss_params(const gk::LossParams& p) {
  if (p.loss_code < gk::LOSS_CLIP || p.loss_code > gk::LOSS_SAPO)
    throw std::invalid_argument("loss_code must be 0 (clip), 1 (cispo) or 2 (sapo), got " + std::to_string(p.loss_code));
}

}  // namespace gk_py
