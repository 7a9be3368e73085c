// grpo_kernels._cuda: pybind11 bindings of the CUDA kernels (csrc/cuda/grpo_cuda.cu).
//
// Raw device pointers (uintptr_t from tensor.data_ptr()), shapes, element strides, dtype codes and the
// caller's stream (uintptr_t of torch.cuda.current_stream().cuda_stream): no torch headers, no libtorch
// link, cudart linked statically. grpo_kernels/backends/cuda_backend.py validates and allocates; these
// functions check what would make a kernel access memory out of bounds (shapes, dtype codes, block size),
// enqueue the kernel without waiting for it, and raise RuntimeError on a launch error (cudaGetLastError).
//
// The same file is compiled into the test-only module grpo_kernels_cuda_emu (csrc/emu/emu_module.cpp),
// where GK_CUDA_EMU is defined and the kernels run on the CPU emulator; GK_CUDA_PYMODULE names the module.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "grpo_cuda.cuh"

#ifndef GK_CUDA_PYMODULE
#define GK_CUDA_PYMODULE _cuda
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

gkcuda::Rows rows(uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " + std::to_string(dtype));
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("logits shape [B, T, V] needs B, T >= 0 and V >= 1");
  if (B * T > 0x7fffffffLL) throw std::invalid_argument("more than 2^31 - 1 rows (B*T) in one launch");
  if (B * T > 0 && x == 0) throw std::invalid_argument("logits pointer is null");
  return gkcuda::Rows{ptr<const void>(x), dtype, B, T, V, sb, st};
}

float inv(double tau) {
  if (!(tau > 0.0)) throw std::invalid_argument("tau (temperature) must be > 0");
  return static_cast<float>(1.0 / tau);
}

void check_block(int block) {
  if (block != 0 && (block < 32 || block > gkcuda::kMaxBlock || block % 32 != 0))
    throw std::invalid_argument("block must be 0 (default) or a multiple of 32 in [32, " +
                                std::to_string(gkcuda::kMaxBlock) + "], got " + std::to_string(block));
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::string msg = std::string("grpo_kernels CUDA ") + what + " launch failed: " + cudaGetErrorString(e);
#ifdef GK_CUDA_EMU
    msg += " (" + gk_emu::last_error_message() + ")";
#endif
    throw std::runtime_error(msg);
  }
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(GK_CUDA_PYMODULE, m) {
  m.doc() = "grpo_kernels CUDA kernels (raw pointers; see grpo_kernels/backends/cuda_backend.py)";
  m.attr("MAX_BLOCK") = gkcuda::kMaxBlock;
#ifdef GK_CUDA_EMU
  m.attr("EMULATED") = true;
#else
  m.attr("EMULATED") = false;
#endif

  m.def("default_block", &gkcuda::default_block, py::arg("V"), "threads per block used for block=0");

  m.def(
      "logprobs_fwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids, double tau,
         uintptr_t logp, uintptr_t stats, uintptr_t ent, uintptr_t stream, int block) {
        const gkcuda::Rows rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        check_block(block);
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::logprobs_fwd(rv, ptr<const int64_t>(ids), it, ptr<float>(logp), ptr<float>(stats),
                                   ptr<float>(ent), block, stream_of(stream));
        }
        check(e, "logprobs_fwd");
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("tau"), py::arg("logp"), py::arg("stats"), py::arg("ent"), py::arg("stream"),
      py::arg("block") = 0, "logp, row statistics (m, log s) [N, 2] [, entropy] of each row (ent = 0: not computed)");

  m.def(
      "logprobs_bwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids,
         uintptr_t stats, uintptr_t ent, uintptr_t g_logp, uintptr_t g_ent, double tau, uintptr_t out, int64_t osb,
         int64_t ost, uintptr_t stream, int block) {
        const gkcuda::Rows rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        check_block(block);
        if ((ent == 0) != (g_ent == 0)) throw std::invalid_argument("ent and g_ent must both be given or both be 0");
        if (B * T > 0 && out == 0) throw std::invalid_argument("out pointer is null");
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::logprobs_bwd(rv, ptr<const int64_t>(ids), ptr<const float>(stats), ptr<const float>(ent),
                                   ptr<const float>(g_logp), ptr<const float>(g_ent), it,
                                   gkcuda::Out{ptr<void>(out), osb, ost}, block, stream_of(stream));
        }
        check(e, "logprobs_bwd");
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("stats"), py::arg("ent"), py::arg("g_logp"), py::arg("g_ent"), py::arg("tau"),
      py::arg("out"), py::arg("osb"), py::arg("ost"), py::arg("stream"), py::arg("block") = 0,
      "write dL/dlogits into out");

  m.def(
      "fused_fwd_bwd",
      [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids, double tau,
         uintptr_t old, uintptr_t ref, uintptr_t adv, uintptr_t coef, int loss_code, double eps_low, double eps_high,
         bool has_delta, double delta, double beta, bool bias_corr, double sapo_pos, double sapo_neg, uintptr_t logp,
         uintptr_t ent, uintptr_t out, int64_t osb, int64_t ost, uintptr_t stream, int block, int cluster) {
        const gkcuda::Rows rv = rows(x, dtype, B, T, V, sb, st);
        const float it = inv(tau);
        check_block(block);
        if (cluster != 0 && cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8)
          throw std::invalid_argument("cluster must be 0 (choose), 1 (3-pass kernel), 2, 4 or 8, got " +
                                      std::to_string(cluster));
        if (cluster >= 2 && gkcuda::cluster_smem_bytes(V, dtype, cluster) > gkcuda::kClusterSmemMax)
          throw std::invalid_argument("cluster=" + std::to_string(cluster) + ": a row of V=" + std::to_string(V) +
                                      " does not fit the shared memory of that cluster");
        if (loss_code < 0 || loss_code > 2)
          throw std::invalid_argument("loss_code must be 0 (clip), 1 (cispo) or 2 (sapo), got " +
                                      std::to_string(loss_code));
        if (B * T > 0 && (adv == 0 || coef == 0 || logp == 0 || ent == 0 || out == 0))
          throw std::invalid_argument("adv, coef, logp, ent and out must be non-null");
        gkcuda::FusedArgs a;
        a.old = ptr<const float>(old);
        a.ref = ptr<const float>(ref);
        a.adv = ptr<const float>(adv);
        a.coef = ptr<const float>(coef);
        a.p = gk::LossParams{loss_code, static_cast<float>(eps_low), static_cast<float>(eps_high), has_delta ? 1 : 0,
                             static_cast<float>(delta), static_cast<float>(beta), bias_corr ? 1 : 0,
                             static_cast<float>(sapo_pos), static_cast<float>(sapo_neg)};
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::fused_fwd_bwd(rv, ptr<const int64_t>(ids), it, a, ptr<float>(logp), ptr<float>(ent),
                                    gkcuda::Out{ptr<void>(out), osb, ost}, block, stream_of(stream), cluster);
        }
        check(e, "fused_fwd_bwd");
      },
      py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"), py::arg("st"),
      py::arg("ids"), py::arg("tau"), py::arg("old"), py::arg("ref"), py::arg("adv"), py::arg("coef"),
      py::arg("loss_code"), py::arg("eps_low"), py::arg("eps_high"), py::arg("has_delta"), py::arg("delta"),
      py::arg("beta"), py::arg("bias_corr"), py::arg("sapo_pos"), py::arg("sapo_neg"), py::arg("logp"),
      py::arg("ent"), py::arg("out"), py::arg("osb"), py::arg("ost"), py::arg("stream"), py::arg("block") = 0,
      py::arg("cluster") = 0,
      "logp, entropy and the loss gradient w.r.t. the logits in one launch (cluster: 0 = choose, 1 = the "
      "3-pass kernel, 2 / 4 / 8 = the 2-pass cluster kernel with that many blocks per row)");

  m.def(
      "fused_cluster_size",
      [](int64_t V, int dtype, int cc_major, uintptr_t x) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
        return gkcuda::fused_cluster_size(gkcuda::Rows{ptr<const void>(x), dtype, 1, 1, V, V, V}, cc_major);
      },
      py::arg("V"), py::arg("dtype"), py::arg("cc_major"), py::arg("x") = 16,
      "blocks per row of the 2-pass cluster kernel that fused_fwd_bwd picks for rows of V elements of dtype on a "
      "GPU of compute capability cc_major (x: the logits pointer), 0 = the 3-pass kernel");
  m.def("cluster_smem_bytes", &gkcuda::cluster_smem_bytes, py::arg("V"), py::arg("dtype"), py::arg("C"),
        "dynamic shared memory per block of the cluster kernel");
  m.attr("CLUSTER_SMEM_PREFERRED") = gkcuda::kClusterSmemPreferred;
  m.attr("CLUSTER_SMEM_MAX") = gkcuda::kClusterSmemMax;
#ifdef GK_CUDA_EMU_EXTRA
  GK_CUDA_EMU_EXTRA(m);
#endif
}
