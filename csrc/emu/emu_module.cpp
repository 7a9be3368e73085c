// grpo_kernels_cuda_emu: TEST-ONLY module. The CUDA kernels of csrc/cuda (the same .cu / .cuh sources that
// nvcc compiles into grpo_kernels._cuda) and the same binding code (csrc/bindings/cuda_module.cpp),
// compiled by g++ against the CPU emulation of the CUDA execution model (csrc/emu/cuda_emu.h). Pointers
// are host pointers (CPU tensors); the stream argument is ignored. Built by tests/test_cuda_emu.py:
//   g++ -std=c++20 -O2 -pthread -fPIC -shared -fno-strict-aliasing -Icsrc/include -Icsrc/cuda
//       $(python -m pybind11 --includes) csrc/emu/emu_module.cpp -o build/.../grpo_kernels_cuda_emu$(EXT)
#include "cuda_emu.h"

#include "../cuda/grpo_cuda.cu"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

// Emulator-only functions: the emulated device's compute capability (the kernel choice of fused_fwd_bwd
// reads it) and the configuration of the last launch (which kernel variant ran).
#define GK_CUDA_EMU_EXTRA(m)                                                                                \
  m.def("set_device_cc", &gk_emu::set_device_cc, pybind11::arg("major"), pybind11::arg("minor") = 0);         \
  m.def("device_cc", [] { return std::make_pair(gk_emu::device_cc().major, gk_emu::device_cc().minor); });   \
  m.def("last_launch", [] {                                                                                 \
    const gk_emu::LaunchRecord r = gk_emu::last_launch();                                                   \
    pybind11::dict d;                                                                                       \
    d["grid"] = r.grid.x;                                                                                   \
    d["block"] = r.block.x;                                                                                 \
    d["cluster"] = r.cluster.x;                                                                             \
    d["dyn_smem"] = r.dyn_smem;                                                                             \
    d["count"] = r.count;                                                                                   \
    return d;                                                                                               \
  })

#define GK_CUDA_PYMODULE grpo_kernels_cuda_emu
#include "../bindings/cuda_module.cpp"
