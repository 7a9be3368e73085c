// grpo_kernels_cuda_emu: TEST-ONLY module. The CUDA kernels of csrc/cuda (the same .cu / .cuh sources that
// nvcc compiles into grpo_kernels._cuda) and the same binding code (csrc/bindings/cuda_module.cpp),
// compiled by g++ against the CPU emulation of the CUDA execution model (csrc/emu/cuda_emu.h). Pointers
// are host pointers (CPU tensors); the stream argument is ignored. Built by tests/test_cuda_emu.py:
//   g++ -std=c++20 -O2 -pthread -fPIC -shared -fno-strict-aliasing -Icsrc/include -Icsrc/cuda
//       $(python -m pybind11 --includes) csrc/emu/emu_module.cpp -o build/.../grpo_kernels_cuda_emu$(EXT)
#include "cuda_emu.h"

#include "../cuda/grpo_cuda.cu"

#define GK_CUDA_PYMODULE grpo_kernels_cuda_emu
#include "../bindings/cuda_module.cpp"
