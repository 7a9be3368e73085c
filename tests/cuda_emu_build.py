"""Builds of the CUDA sources against the CPU emulation (csrc/emu/cuda_emu.h), cached per source hash in
``build/cuda_emu/``: the test-only extension module (the ``emu`` fixture of conftest.py) and the standalone
self-test driver (tests/test_cuda_emu.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++"))

COMMON_FLAGS = ["-std=c++20", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
                f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cuda'}"]


def _source_files() -> list[Path]:
    return [p for d in ("cuda", "emu", "include", "bindings") for p in sorted((ROOT / "csrc" / d).iterdir())
            if p.suffix in (".h", ".cuh", ".cu", ".cpp")]


def cache_dir(kind: str, flags: list[str]) -> Path:
    h = hashlib.sha256(" ".join([CXX or "", *flags]).encode())
    for p in _source_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    d = ROOT / "build" / "cuda_emu" / f"{kind}-{h.hexdigest()[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_to(cmd: list[str], target: Path) -> None:
    """Runs ``cmd -o target`` (through a temporary name: a concurrent session never imports a half-written
    file); raises RuntimeError with the compiler's message on failure."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    res = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")
    os.replace(tmp, target)


def build_emu_module():
    """The emulation module grpo_kernels_cuda_emu (built once per source hash, imported from its cache)."""
    import pybind11

    flags = [*COMMON_FLAGS, "-O2", "-fPIC", "-shared", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    name = "grpo_kernels_cuda_emu"
    target = cache_dir("module", flags) / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.exists():
        compile_to(["nice", CXX, *flags, str(ROOT / "csrc/emu/emu_module.cpp")], target)
    spec = importlib.util.spec_from_file_location(name, target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.EMULATED
    return mod
