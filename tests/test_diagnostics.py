"""``python -m grpo_kernels`` / ``grpo_kernels.show_config()`` and the CUDA architecture choice of setup.py.

- the report names every backend on each device type it serves with the registry's verdict, the CPU ISA build
  in use, the OpenMP runtimes mapped, and the versions of torch, triton, numpy, trl, transformers and
  accelerate in this process ("not installed" for a missing one);
- the fatbin reader (used for "CUDA architectures in _cuda") agrees with cuobjdump on the built module, and
  finds nothing in a module without CUDA code (the C++ CPU module);
- setup.py's architecture list: GRPO_KERNELS_CUDA_ARCHS spellings, torch's TORCH_CUDA_ARCH_LIST convention
  (+PTX), ``native`` from nvidia-smi (a stand-in script on PATH here) and its error without a GPU.
Seconds, no build.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import grpo_kernels
from grpo_kernels import _diagnostics
from grpo_kernels.backends import REGISTRY, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def _report() -> str:
    buf = io.StringIO()
    grpo_kernels.show_config(file=buf)
    return buf.getvalue()


def test_report_lists_backends_with_reasons():
    out = _report()
    for name, info in REGISTRY.items():
        for dt in info.device_types:
            reason = unavailable_reason(name, dt)
            want = "available" if reason is None else f"unavailable: {reason}"
            assert re.search(rf"^\s+{dt}\s+{name}\s+{re.escape(want)}$", out, re.M), (dt, name, out)
    assert f"torch:                {torch.__version__}" in out
    if importlib.util.find_spec("triton"):
        assert f"triton:               {version('triton')}" in out


@pytest.mark.parametrize("name", ["triton", "numpy", "trl", "transformers", "accelerate"])
def test_report_names_the_versions_a_bug_report_needs(name, monkeypatch):
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = None
    want = installed if installed is not None else "not installed"
    assert re.search(rf"^  {name}:\s+{re.escape(want)}$", _report(), re.M), _report()
    # a missing distribution is reported as such, not skipped or guessed
    real = _diagnostics._version
    monkeypatch.setattr(_diagnostics, "_version", lambda dist: None if dist == name else real(dist))
    assert re.search(rf"^  {name}:\s+not installed$", _report(), re.M), _report()


def test_report_cpu_isa_and_openmp():
    C = pytest.importorskip("grpo_kernels._cpu")
    out = _report()
    assert f"ISA builds: {', '.join(C.ISAS)}; in use: {C.isa()}" in out, out
    runtimes = _diagnostics.openmp_runtimes()
    assert len(runtimes) == 1 and "libgomp" in runtimes[0], runtimes  # torch's, and the module shares it
    assert f"OpenMP runtimes mapped: {runtimes[0]}" in out


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec and not found else []:
        found = next((str(c) for c in sorted(Path(root).glob("**/bin/cuobjdump"))), None)
        if found:
            break
    return found


def test_fatbin_reader_matches_cuobjdump():
    so = _diagnostics._module_file("grpo_kernels._cuda")
    if so is None:
        pytest.skip("grpo_kernels._cuda is not built here")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PyPI nvidia-cuda-cuobjdump, in the test extra)")
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", so], capture_output=True, text=True,
                             check=True).stdout
    sass = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)), key=lambda s: int(s[3:].rstrip("a")))
    ptx = sorted({"compute_" + a for a in re.findall(r"\.sm_(\d+a?)\.ptx", listing)})
    got = _diagnostics.fatbin_architectures(so)
    assert got == {"sass": sass, "ptx": ptx} and sass, (got, listing)
    assert f"SASS: {', '.join(sass)}; PTX: {', '.join(ptx) or 'none'}" in _report()


def test_fatbin_reader_on_a_module_without_cuda():
    so = _diagnostics._module_file("grpo_kernels._cpu")
    if so is None:
        pytest.skip("grpo_kernels._cpu is not built here")
    assert _diagnostics.fatbin_architectures(so) == {"sass": [], "ptx": []}


def test_python_dash_m_runs_outside_the_tree(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "grpo_kernels"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"grpo_kernels {grpo_kernels.__version__}") and "backends" in p.stdout, p.stdout


# ---- setup.py's CUDA architecture list -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _setup_functions() -> dict:
    """The architecture functions of setup.py, without running setup() (which would build)."""
    src = (ROOT / "setup.py").read_text()
    src = src[src.index("def _find_nvcc"):src.index("CUDA_SOURCES =")]
    ns = {"os": os, "subprocess": subprocess, "functools": functools, "Path": Path, "shutil": shutil}
    exec(compile("from __future__ import annotations\n" + src, "setup.py", "exec"), ns)
    return ns


def _archs(monkeypatch, own: str | None, torch_list: str | None):
    for var, value in (("GRPO_KERNELS_CUDA_ARCHS", own), ("TORCH_CUDA_ARCH_LIST", torch_list)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    f = _setup_functions()["_cuda_archs"]
    f.cache_clear()
    return f()


def _gencode_pairs(flags: list[str]) -> list[str]:
    return [flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "-gencode"]


@pytest.mark.parametrize("own, torch_list, sass, ptx", [
    (None, None, ["80", "90", "100"], ["100"]),
    ("80;90", None, ["80", "90"], ["90"]),
    ("8.0, sm_90", "7.5", ["80", "90"], ["90"]),  # ours wins over torch's
    (None, "8.0;9.0+PTX", ["80", "90"], ["90"]),
    (None, "8.0 9.0a+PTX 10.0", ["80", "90a", "100"], ["90a"]),
    (None, "8.0 9.0", ["80", "90"], []),  # torch's meaning: no PTX unless +PTX
])
def test_arch_lists(monkeypatch, own, torch_list, sass, ptx):
    _, flags = _archs(monkeypatch, own, torch_list)
    want = [f"arch=compute_{a},code=sm_{a}" for a in sass] + [f"arch=compute_{a},code=compute_{a}" for a in ptx]
    assert _gencode_pairs(flags) == want


def test_arch_list_rejects_garbage(monkeypatch):
    with pytest.raises(ValueError, match="GRPO_KERNELS_CUDA_ARCHS: '8x' is not a CUDA architecture"):
        _archs(monkeypatch, "80;8x", None)


def _fake_nvidia_smi(tmp_path, monkeypatch, body: str) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_native_uses_the_local_gpus(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "printf '9.0\\n9.0\\n8.0\\n'")
    desc, flags = _archs(monkeypatch, "native", None)
    assert _gencode_pairs(flags) == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"]
    assert desc == "native: 80;90"
    desc, flags = _archs(monkeypatch, None, "native")  # torch's variable may say it too
    assert desc == "native: 80;90"


def test_native_without_gpu_is_an_error(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    with pytest.raises(ValueError, match="nvidia-smi finds no GPU"):
        _archs(monkeypatch, "native", None)
