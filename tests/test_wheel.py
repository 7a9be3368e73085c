"""``pip wheel .`` gives a wheel that installs and imports without a GPU, and ``backend="cuda"`` then
raises a clear BackendUnavailableError ("no CUDA device"), it does not crash.

The wheel is built with ``pip wheel . --no-deps --no-build-isolation --no-index -w DIR`` from a copy of the
working tree (``git ls-files -co --exclude-standard``: tracked and untracked-but-not-ignored files) in a temporary
directory, so that the build neither reads nor writes the checkout's build/ and *.egg-info (setup.py reuses a
compiled .o in build/ whatever its architecture list) and is a clean build each time. It is built with
``GRPO_KERNELS_CUDA_ARCHS="80;90"`` (setup.py: SASS for sm_80 and sm_90, PTX of compute_90) to keep the nvcc
time down: about 35 s for the whole build on 2 cores, against about twice that for the default 80;90;100. The
wheel is then installed with ``pip install --no-deps --target DIR2`` and used from a subprocess whose working
directory is a fresh temporary directory and whose PYTHONPATH is DIR2 (torch comes from this interpreter's
environment): the source tree is not importable there, and the test checks that every module came from DIR2.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:  # the rule of setup.py
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump() -> str | None:
    """On PATH, else from the PyPI nvidia-cuda-cuobjdump wheel (site-packages/nvidia/*/bin)."""
    found = shutil.which("cuobjdump")
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec and not found else []:
        found = next((str(c) for c in sorted(Path(root).glob("**/bin/cuobjdump"))), None)
        if found:
            break
    return found


def _copy_tree(dst: Path) -> None:
    """The working tree as pip would see it, without the ignored build outputs (.venv, build/, *.so, ...)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is needed to list the working tree")
    for f in files:
        src = ROOT / f
        if src.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


_USE = r"""
import os, sys
target = os.environ["GK_TARGET"]
import torch
import grpo_kernels as gk
import grpo_kernels._C
mods = [gk, grpo_kernels._C]
if os.environ["GK_EXPECT_CUDA"] == "1":
    import grpo_kernels._cuda  # imports without a GPU (cudart is linked statically, no device query at import)
    mods.append(grpo_kernels._cuda)
for m in mods:
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(target)), (m.__name__, m.__file__)
print("FROM", [os.path.relpath(m.__file__, target) for m in mods])

torch.manual_seed(0)
x = torch.randn(2, 3, 37)
ids = torch.randint(0, 37, (2, 3))
logp = gk.token_logprobs(x, ids, backend="cpu")
ref = torch.log_softmax(x.double(), -1).gather(-1, ids[..., None])[..., 0]
assert torch.allclose(logp.double(), ref, atol=1e-5, rtol=0), (logp, ref)
print("CPU OK")

if torch.cuda.is_available():
    logp = gk.token_logprobs(x.cuda(), ids.cuda(), backend="cuda")
    assert torch.allclose(logp.double().cpu(), ref, atol=1e-5, rtol=0)
    print("CUDA OK")
else:
    from grpo_kernels.backends import unavailable_reason
    print("REASON", unavailable_reason("cuda", "cuda"))
    try:
        gk.token_logprobs(x, ids, backend="cuda")
    except gk.BackendUnavailableError as e:
        print("RAISED", e)
    else:
        sys.exit("backend='cuda' did not raise on a machine without a CUDA device")
"""


@pytest.mark.slow
def test_wheel_builds_installs_and_imports_without_gpu(tmp_path):
    src, wheels, target, work = (tmp_path / d for d in ("src", "wheels", "target", "work"))
    for d in (src, wheels, target, work):
        d.mkdir()
    _copy_tree(src)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRPO_KERNELS_SKIP_CUDA", "GRPO_KERNELS_NATIVE", "PYTHONPATH", "TRITON_INTERPRET")}
    env.update(GRPO_KERNELS_CUDA_ARCHS="80;90", MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(wheels)], cwd=src, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"pip wheel failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    (whl,) = glob.glob(str(wheels / "grpo_kernels-*.whl"))

    names = zipfile.ZipFile(whl).namelist()
    expect_cuda = _nvcc() is not None
    assert any(n.startswith("grpo_kernels/_C") and n.endswith(".so") for n in names), names
    has_cuda = any(n.startswith("grpo_kernels/_cuda") and n.endswith(".so") for n in names)
    assert has_cuda == expect_cuda, f"nvcc {'found' if expect_cuda else 'not found'}, wheel: {names}"
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names), names

    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                        whl], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"pip install failed:\n{p.stderr[-4000:]}"

    if has_cuda:  # the architectures the variable asked for, and only those (plus PTX for newer GPUs)
        cuobjdump = _cuobjdump()
        if cuobjdump:
            (so,) = glob.glob(str(target / "grpo_kernels" / "_cuda*.so"))
            elf = subprocess.run([str(cuobjdump), "--list-elf", so], capture_output=True, text=True).stdout
            assert "sm_80" in elf and "sm_90" in elf and "sm_100" not in elf, elf

    env_use = dict(env, PYTHONPATH=str(target), GK_TARGET=str(target), GK_EXPECT_CUDA="1" if has_cuda else "0")
    p = subprocess.run([sys.executable, "-c", _USE], cwd=work, env=env_use, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"using the installed wheel failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    assert "CPU OK" in p.stdout, p.stdout
    if not torch.cuda.is_available():
        assert "RAISED" in p.stdout and "no CUDA device" in p.stdout.split("RAISED", 1)[1], p.stdout
        assert "no CUDA device" in p.stdout.split("REASON", 1)[1], p.stdout
