// grpo_kernels._cuda: pybind11 bindings of the CUDA kernels (csrc/cuda/grpo_cuda.cu).
//
// The kernels take the boundary structs of grpo_boundary.h (bound in boundary_py.h), whose pointers are
// integers from tensor.data_ptr() (device pointers), plus the caller's stream (uintptr_t of
// torch.cuda.current_stream().cuda_stream): no torch headers, no libtorch link, cudart linked statically.
// grpo_kernels/backends/cuda_backend.py validates and allocates; these functions check what would make a
// kernel access memory out of bounds (shapes, dtype codes, missing pointers, block size), enqueue the kernel
// without waiting for it, and raise RuntimeError on a launch error (cudaGetLastError).
//
// The same file is compiled into the test-only module grpo_kernels_cuda_emu (csrc/emu/emu_module.cpp),
// where GK_CUDA_EMU is defined and the kernels run on the CPU emulator; GK_CUDA_PYMODULE names the module.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "boundary_py.h"
#include "grpo_cuda.cuh"

#ifndef GK_CUDA_PYMODULE
#define GK_CUDA_PYMODULE _cuda
#endif

namespace py = pybind11;

namespace {

void check_rows(const gk::Rows& x) {
  gk_py::check_rows(x);
  if (x.B * x.T > 0x7fffffffLL) throw std::invalid_argument("more than 2^31 - 1 rows (B*T) in one launch");
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

  gk_py::bind_boundary(m);

  m.def(
      "logprobs_fwd",
      [](const gk::Rows& x, const gk::Outputs& out, uintptr_t stream, int block) {
        check_rows(x);
        check_block(block);
        if (x.B * x.T > 0 && (out.logp == nullptr || out.stats == nullptr))
          throw std::invalid_argument("out.logp and out.stats must be non-null");
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::logprobs_fwd(x, out, block, stream_of(stream));
        }
        check(e, "logprobs_fwd");
      },
      py::arg("rows"), py::arg("out"), py::arg("stream"), py::arg("block") = 0,
      "out.logp, out.stats = (m, log s) [N, 2] [, out.entropy] of each row (entropy 0: not computed)");

  m.def(
      "logprobs_bwd",
      [](const gk::Rows& x, const gk::TokenInputs& in, const gk::Outputs& out, uintptr_t stream, int block) {
        check_rows(x);
        check_block(block);
        if ((in.entropy == nullptr) != (in.g_entropy == nullptr))
          throw std::invalid_argument("inputs.entropy and inputs.g_entropy must both be given or both be 0");
        if (x.B * x.T > 0 && (in.stats == nullptr || in.g_logp == nullptr || out.grad == nullptr))
          throw std::invalid_argument("inputs.stats, inputs.g_logp and out.grad must be non-null");
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::logprobs_bwd(x, in, out, block, stream_of(stream));
        }
        check(e, "logprobs_bwd");
      },
      py::arg("rows"), py::arg("inputs"), py::arg("out"), py::arg("stream"), py::arg("block") = 0,
      "write dL/dlogits into out.grad");

  m.def(
      "fused_fwd_bwd",
      [](const gk::Rows& x, const gk::TokenInputs& in, const gk::LossParams& p, const gk::Outputs& out,
         uintptr_t stream, int block, int cluster) {
        check_rows(x);
        check_block(block);
        gk_py::check_loss_params(p);
        if (cluster != 0 && cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8)
          throw std::invalid_argument("cluster must be 0 (choose), 1 (3-pass kernel), 2, 4 or 8, got " +
                                      std::to_string(cluster));
        if (cluster >= 2 && gkcuda::cluster_smem_bytes(x.V, x.dtype, cluster) > gkcuda::kClusterSmemMax)
          throw std::invalid_argument("cluster=" + std::to_string(cluster) + ": a row of V=" + std::to_string(x.V) +
                                      " does not fit the shared memory of that cluster");
        if (x.B * x.T > 0 && (in.advantages == nullptr || in.coef == nullptr || out.logp == nullptr ||
                              out.entropy == nullptr || out.grad == nullptr))
          throw std::invalid_argument("inputs.advantages, inputs.coef, out.logp, out.entropy and out.grad must be non-null");
        cudaError_t e;
        {
          py::gil_scoped_release nogil;
          e = gkcuda::fused_fwd_bwd(x, in, p, out, block, stream_of(stream), cluster);
        }
        check(e, "fused_fwd_bwd");
      },
      py::arg("rows"), py::arg("inputs"), py::arg("params"), py::arg("out"), py::arg("stream"), py::arg("block") = 0,
      py::arg("cluster") = 0,
      "out.logp, out.entropy and the loss gradient w.r.t. the logits (out.grad) in one launch (cluster: 0 = "
      "choose, 1 = the 3-pass kernel, 2 / 4 / 8 = the 2-pass cluster kernel with that many blocks per row)");

  m.def(
      "fused_cluster_size",
      [](int64_t V, int dtype, int cc_major, uintptr_t x) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
        gk::Rows r{};
        r.logits = reinterpret_cast<const void*>(x);
        r.dtype = dtype;
        r.B = r.T = 1;
        r.V = V;
        return gkcuda::fused_cluster_size(r, cc_major);
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
