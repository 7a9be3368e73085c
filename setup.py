"""Build script of the compiled modules (the package metadata is in pyproject.toml).

- ``grpo_kernels._cpu``: the C++ CPU kernels (csrc/cpu, csrc/bindings/cpu_module.cpp), g++ -O3 -fopenmp.
  Portable by default: the module is compiled for the compiler's baseline ISA (x86-64 / aarch64) and, on
  x86-64, the row kernels twice more via function attributes, for AVX2+FMA+F16C and for AVX-512; the widest
  set the CPU runs is picked at import (see csrc/cpu/grpo_cpu.cpp). ``GRPO_KERNELS_NATIVE=1`` adds ``-march=native``
  for a local build (not for wheels that travel).
- ``grpo_kernels._cuda``: the CUDA kernels (csrc/cuda/*.cu + csrc/bindings/cuda_module.cpp), built when
  those sources exist and nvcc is found (``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH); SASS for sm_80,
  sm_90, sm_100 and compute_100 PTX (JIT-compiled by the driver on newer GPUs); cudart linked statically.
  ``GRPO_KERNELS_SKIP_CUDA=1`` skips it; without nvcc the CPU module alone is built, with a message.
  ``GRPO_KERNELS_CUDA_ARCHS="80;90"`` narrows the architecture list (faster local builds; PTX of the last one
  is added); ``GRPO_KERNELS_CUDA_ARCHS=native`` builds for the GPUs of the build machine only (their
  compute capability from nvidia-smi; an error without a GPU). Without it, torch's ``TORCH_CUDA_ARCH_LIST``
  ("8.0;9.0+PTX") is honoured if set.
- ``GRPO_KERNELS_GLIBC=2.28`` (release builds, scripts/build_release.sh): the pybind11 binding files are
  compiled and both modules linked by ``zig c++`` (PyPI ``ziglang``) against glibc 2.28's symbol versions,
  with LLVM's libc++ / libc++abi / libunwind linked statically and hidden; the kernel files stay on g++
  (OpenMP through libgomp, the runtime torch loads) and nvcc. See ``_zig_link`` for why the mix is safe.

Every build writes ``grpo_kernels/_build_info.py`` (compilers, flags, requested CUDA architectures), read by
``python -m grpo_kernels``.

Neither module includes a torch header or links libtorch: they take raw pointers, so one build works
with any torch version. Environment: ``MAX_JOBS`` (parallel nvcc jobs, default 2).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
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
        "grpo_kernels._cpu",
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


DEFAULT_CUDA_ARCHS = "80;90;100"


def _arch_number(item: str, var: str) -> str:
    """'80', '8.0', 'sm_80', '9.0a' -> '80' / '90a' (the spelling nvcc's compute_/sm_ names take)."""
    a = item.strip().lower().removeprefix("sm_").removeprefix("compute_")
    if "." in a:
        major, _, minor = a.partition(".")
        a = major + minor
    if not (a[:-1] if a.endswith(("a", "f")) else a).isdigit():
        raise ValueError(f"{var}: {item!r} is not a CUDA architecture (expected e.g. 80, 8.0, 9.0a or native)")
    return a


def _local_gpu_archs() -> list[str]:
    """Compute capabilities of this machine's GPUs (nvidia-smi). nvcc -arch=native is not used: without a
    GPU it warns and builds for its default architecture, which is not what was asked for."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        caps = out.stdout.split() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        caps = []
    if not caps:
        raise ValueError("CUDA architectures 'native': nvidia-smi finds no GPU on this machine; name the "
                         "architectures instead, e.g. GRPO_KERNELS_CUDA_ARCHS=90")
    return sorted({_arch_number(c, "nvidia-smi") for c in caps}, key=lambda a: int(a.rstrip("af")))


@functools.lru_cache(maxsize=None)
def _cuda_archs() -> tuple[str, list[str]]:
    """(description, nvcc architecture flags) from GRPO_KERNELS_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST."""
    own = os.environ.get("GRPO_KERNELS_CUDA_ARCHS", "").strip()
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if own.lower() == "native" or (not own and torch_list.lower() == "native"):
        archs = _local_gpu_archs()
        return f"native: {';'.join(archs)}", [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    if own or not torch_list:
        var, items = "GRPO_KERNELS_CUDA_ARCHS", (own or DEFAULT_CUDA_ARCHS).replace(",", ";").split(";")
        archs = [_arch_number(a, var) for a in items if a.strip()]
        ptx = {archs[-1]} if archs else set()  # PTX of the newest: the driver JIT-compiles it for later GPUs
    else:  # torch's convention: separated by ';' or spaces, PTX only where '+PTX' is written
        var, items = "TORCH_CUDA_ARCH_LIST", torch_list.replace(";", " ").split()
        archs = [_arch_number(a.removesuffix("+PTX"), var) for a in items]
        ptx = {_arch_number(a.removesuffix("+PTX"), var) for a in items if a.endswith("+PTX")}
    if not archs:
        raise ValueError(f"{var} names no CUDA architecture")
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    for a in archs:
        if a in ptx:
            flags += ["-gencode", f"arch=compute_{a},code=compute_{a}"]
    desc = ";".join(archs) + "".join(f" +PTX compute_{a}" for a in archs if a in ptx)
    return f"{desc} (from {var})" if var == "TORCH_CUDA_ARCH_LIST" else desc, flags


def _gencode() -> list[str]:
    return _cuda_archs()[1]


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


# ---- release toolchain (GRPO_KERNELS_GLIBC) -----------------------------------------------------------
GLIBC = os.environ.get("GRPO_KERNELS_GLIBC", "").strip()
if GLIBC and not all(part.isdigit() for part in GLIBC.split(".")):
    raise ValueError(f"GRPO_KERNELS_GLIBC must be a glibc version such as 2.28, got {GLIBC!r}")
ZIG = [sys.executable, "-m", "ziglang"]
BINDINGS_DIR = f"{CSRC}/bindings/"


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
    return lines[0] if out.returncode == 0 and lines else None


class BuildExt(build_ext):
    """build_ext that compiles the .cu files of grpo_kernels._cuda with nvcc first and, with
    GRPO_KERNELS_GLIBC, links with zig (see ``_zig_link``); it records the toolchain in _build_info.py."""

    def run(self):
        if GLIBC and find_spec("ziglang") is None:
            raise RuntimeError("GRPO_KERNELS_GLIBC needs zig: pip install ziglang (the PyPI build of zig)")
        super().run()
        self._write_build_info()

    def build_extension(self, ext):
        if ext.name == "grpo_kernels._cuda":
            ext.extra_objects = self._nvcc_objects(ext)
        if GLIBC:
            self._zig_link(ext)
        else:
            super().build_extension(ext)

    def _zig_link(self, ext) -> None:
        """Kernel files: g++ as usual (the OpenMP loops need GCC's libgomp ABI, the runtime torch already has
        in the process; clang would emit calls into LLVM's libomp, a second runtime). Binding files (pybind11)
        and the link: zig c++ for target <arch>-linux-gnu.<GLIBC>, so every glibc symbol is bound to a version
        no newer than GLIBC, and LLVM's libc++ is linked statically and hidden, so no libstdc++ symbol version
        is needed. The kernel objects only call the C++ ABI layer (__cxa_*, the personality routine,
        std::bad_alloc), which libc++abi implements with the same Itanium ABI, and pass nothing but C types
        to the bindings; the check after the link fails the build if a g++ object needs a libstdc++ symbol.
        Static C++ runtimes are safe here because no C++ object crosses the module boundary: Python sees
        PyInit_* and Python objects only; pybind11 keys its shared state by compiler and C++ library, so these
        modules never share it with a libstdc++-built pybind11 module."""
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / "zig" / ext.name
        tmp.mkdir(parents=True, exist_ok=True)
        target = f"{platform.machine()}-linux-gnu.{GLIBC}"
        py_inc = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        gcc_objs = self.compiler.compile(
            [s for s in ext.sources if not s.startswith(BINDINGS_DIR)], output_dir=str(tmp / "gcc"),
            macros=ext.define_macros, include_dirs=ext.include_dirs, extra_postargs=ext.extra_compile_args,
            depends=ext.depends)
        objs = list(gcc_objs)
        zig_flags = ["-target", target, "-fPIC", "-O3", "-g0", "-DNDEBUG", "-std=c++17", "-fvisibility=hidden",
                     *(f"-I{d}" for d in [*ext.include_dirs, *sorted(py_inc)])]
        for src in (s for s in ext.sources if s.startswith(BINDINGS_DIR)):
            obj = tmp / (Path(src).stem + ".zig.o")
            cmd = [*ZIG, "c++", *zig_flags, "-c", src, "-o", str(obj)]
            _log(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objs.append(str(obj))
        libs = [f"-L{d}" for d in ext.library_dirs] + [f"-l{lib}" for lib in ext.libraries]
        gcc_lib = Path(subprocess.run(["gcc", "-print-libgcc-file-name"], capture_output=True, text=True,
                                      check=True).stdout.strip())
        if "-fopenmp" in ext.extra_link_args:
            libs += [f"-L{gcc_lib.parent}", "-lgomp"]  # the soname libgomp.so.1: whatever copy the process has
        # libgcc.a: __cpu_model / __cpu_indicator_init of GCC's target_clones / __builtin_cpu_supports
        cmd = [*ZIG, "c++", "-target", target, "-shared", "-fPIC", "-s", "-o", str(out),
               *objs, *(ext.extra_objects or []), str(gcc_lib), *libs]
        _log(" ".join(cmd))
        subprocess.run(cmd, check=True)
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(out)], capture_output=True, text=True,
                                   check=True).stdout.split()
        cxx = sorted({u for u in undefined if u.startswith("_Z")})
        if cxx:
            raise RuntimeError(f"{out.name} needs C++ library symbols that the static libc++ does not provide "
                               f"(a g++ object passes a libstdc++ type?): {cxx[:10]}")

    def _write_build_info(self) -> None:
        """grpo_kernels/_build_info.py beside the built modules: what compiled them (python -m grpo_kernels)."""
        nvcc = None
        if NVCC:  # "Cuda compilation tools, release 13.0, V13.0.88"
            lines = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.splitlines()
            nvcc = next((ln.strip() for ln in lines if "release" in ln), None)
        info = {
            "cxx": _first_line([self.compiler.compiler_cxx[0], "--version"]),
            "nvcc": nvcc,
            "zig": _first_line([*ZIG, "version"]) if GLIBC else None,
            "glibc_target": GLIBC or None,
            "cuda_archs_requested": _cuda_archs()[0] if NVCC else None,
            "cpu_flags": CPU_FLAGS,
            "python": platform.python_version(),
            "pybind11": __import__("pybind11").__version__,
        }
        text = ('"""Written by setup.py when the compiled modules are built: the toolchain that built them."""\n\n'
                f"BUILD_INFO = {info!r}\n")
        dest = ROOT / "grpo_kernels" if self.inplace else Path(self.build_lib) / "grpo_kernels"
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "_build_info.py").write_text(text)

    def _nvcc_objects(self, ext) -> list[str]:
        # beside, not inside, the per-Python build_temp: the kernel objects include no Python header, so the
        # wheels of several CPython versions built from one tree (scripts/build_release.sh --all) share them
        out_dir = Path(self.build_temp).parent / "nvcc"
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
