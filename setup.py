"""Build script of the compiled modules (the package metadata is in pyproject.toml).

- ``grpo_kernels._C``: the C++ CPU kernels (csrc/cpu, csrc/bindings/cpu_module.cpp), g++ -O3 -fopenmp.
  Portable by default: the module is compiled for the compiler's baseline ISA (x86-64 / aarch64) and, on
  x86-64, the row kernels twice more via function attributes, for AVX2+FMA+F16C and for AVX-512; the widest
  set the CPU runs is picked at import (see csrc/cpu/grpo_cpu.cpp). ``GRPO_KERNELS_NATIVE=1`` adds ``-march=native``
  for a local build (not for wheels that travel).
- ``grpo_kernels._cuda``: the CUDA kernels (csrc/cuda/*.cu + csrc/bindings/cuda_module.cpp), built when
  those sources exist and nvcc is found (``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH); SASS for sm_80,
  sm_90, sm_100 and compute_100 PTX (JIT-compiled by the driver on newer GPUs); cudart linked statically.
  ``GRPO_KERNELS_SKIP_CUDA=1`` skips it; without nvcc the CPU module alone is built, with a message.
  ``GRPO_KERNELS_CUDA_ARCHS="80;90"`` narrows the architecture list (faster local builds).

Neither module includes a torch header or links libtorch: they take raw pointers, so one build works
with any torch version. Environment: ``MAX_JOBS`` (parallel nvcc jobs, default 2).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _log(msg: str) -> None:
    print(f"grpo_kernels setup: {msg}", file=sys.stderr, flush=True)


# ---- CPU module --------------------------------------------------------------------------------------
CPU_FLAGS = [
    "-O3",
    "-fopenmp",
    "-ffp-contract=fast",  # a*b+c -> FMA inside the AVX2 / AVX-512 kernels (the exp polynomial, Horner steps)
    "-fno-math-errno",  # logf/expf without errno: inlinable; -ffast-math is NOT used (it breaks -inf/NaN)
    # FP comparisons may be evaluated unconditionally (selects instead of branches): without it GCC keeps
    # the clamps and masks of the exp loop as branches and the loop stays scalar (4x slower, measured).
    # Values are unchanged (IEEE results, NaN/inf kept); only FP exception flags may differ.
    "-fno-trapping-math",
    "-fvisibility=hidden",
]
if _flag("GRPO_KERNELS_NATIVE"):
    CPU_FLAGS.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "grpo_kernels._C",
        sources=[f"{CSRC}/cpu/grpo_cpu.cpp", f"{CSRC}/bindings/cpu_module.cpp"],
        include_dirs=[f"{CSRC}/include", f"{CSRC}/cpu"],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]


# ---- CUDA module -------------------------------------------------------------------------------------
def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> Path:
    """CUDA_HOME, else the toolkit that nvcc reports (nvcc may be a wrapper script on PATH)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    for cand in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (cand / "include" / "cuda_runtime.h").exists():
            return cand
    return Path(nvcc).resolve().parent.parent


def _cuda_lib_dir(home: Path) -> Path:
    for cand in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib",
                 home / "targets" / "sbsa-linux" / "lib"):
        if (cand / "libcudart_static.a").exists():
            return cand
    raise RuntimeError(f"libcudart_static.a not found under {home} (set CUDA_HOME to the CUDA toolkit)")


def _gencode() -> list[str]:
    archs = os.environ.get("GRPO_KERNELS_CUDA_ARCHS", "80;90;100").replace(",", ";").split(";")
    archs = [a.strip() for a in archs if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))
CUDA_BINDING = f"{CSRC}/bindings/cuda_module.cpp"
NVCC = None
if _flag("GRPO_KERNELS_SKIP_CUDA"):
    _log("GRPO_KERNELS_SKIP_CUDA is set: building the CPU module only (backend='cuda' will be unavailable)")
elif not CUDA_SOURCES or not (ROOT / CUDA_BINDING).exists():
    _log("no CUDA sources (csrc/cuda/*.cu, csrc/bindings/cuda_module.cpp): building the CPU module only")
else:
    NVCC = _find_nvcc()
    if NVCC is None:
        _log("nvcc not found (set CUDA_HOME or put nvcc on PATH): building the CPU module only; "
             "backend='cuda' will be unavailable")
    else:
        home = _cuda_home(NVCC)
        ext_modules.append(
            Pybind11Extension(
                "grpo_kernels._cuda",
                sources=[CUDA_BINDING],
                include_dirs=[f"{CSRC}/include", f"{CSRC}/cuda", str(home / "include")],
                extra_compile_args=["-O3", "-fvisibility=hidden"],
                library_dirs=[str(_cuda_lib_dir(home))],
                libraries=["cudart_static", "dl", "pthread", "rt"],
                cxx_std=17,
            )
        )


class BuildExt(build_ext):
    """build_ext that first compiles the .cu files of grpo_kernels._cuda with nvcc into objects."""

    def build_extension(self, ext):
        if ext.name == "grpo_kernels._cuda":
            ext.extra_objects = self._nvcc_objects(ext)
        super().build_extension(ext)

    def _nvcc_objects(self, ext) -> list[str]:
        out_dir = Path(self.build_temp) / "nvcc"
        out_dir.mkdir(parents=True, exist_ok=True)
        base = [NVCC, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
                f"-I{CSRC}/include", f"-I{CSRC}/cuda", *_gencode()]
        headers = [p for p in (ROOT / CSRC).rglob("*") if p.suffix in (".h", ".cuh")]
        newest_header = max((p.stat().st_mtime for p in headers), default=0.0)

        # the flags (architectures included) are part of the object's name: an object built for another
        # GRPO_KERNELS_CUDA_ARCHS is never reused
        flags_tag = hashlib.sha256(" ".join(base).encode()).hexdigest()[:12]

        def compile_one(src: str) -> str:
            obj = out_dir / f"{Path(src).stem}-{flags_tag}.o"
            if not self.force and obj.exists() and obj.stat().st_mtime >= max(Path(src).stat().st_mtime,
                                                                               newest_header):
                return str(obj)
            cmd = [*base, "-c", src, "-o", str(obj)]
            _log(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return str(obj)

        jobs = max(1, int(os.environ.get("MAX_JOBS", "2")))
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(compile_one, CUDA_SOURCES))


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
