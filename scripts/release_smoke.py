"""Installs a release wheel beside torch==2.13.0 in a fresh venv and checks it there, outside the source tree.

    python scripts/release_smoke.py WHEEL [--python PY]

PY (default: this interpreter) makes the venv; it must be the CPython the wheel is for. In the venv:
``pip install torch==2.13.0`` (pinned: pip takes whatever build of that version the configured indexes have for
PY, e.g. the CPU build from a local wheel directory or the CUDA build from PyPI; never an unpinned torch), then
``pip install WHEEL[triton]`` (numpy, and triton where torch did not bring it). Then, run from an empty
directory so that only the installed copy can be imported:

- grpo_kernels, grpo_kernels._cpu and grpo_kernels._cuda all come from the venv's site-packages;
- every CPU backend (cpu, torch, and triton under TRITON_INTERPRET=1) computes the GRPO loss and its gradient
  within float32 tolerance of the float64 reference (backend="torch" in float64);
- without a CUDA device, ``grpo_kernels._cuda`` imports (static cudart) and ``backend="cuda"`` raises
  BackendUnavailableError ("no CUDA device");
- exactly one OpenMP runtime is mapped, torch's libgomp;
- ``python -m grpo_kernels`` reports the torch version, the CUDA module's architectures, the CPU module's ISA
  builds, the release toolchain (glibc 2.28 target, zig, nvcc) and one OpenMP runtime.

Prints one ``release_smoke: OK ...`` line at the end; exits 1 when a check fails and 3 when pip cannot install
torch==2.13.0 for PY (scripts/build_release.sh --all reports that apart from a broken wheel).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_VERSION = "2.13.0"
NO_TORCH = 3

# run inside the venv by the venv's python, with GK_SITE = its site-packages
_INSIDE = r"""
import math, os, re, subprocess, sys
site = os.environ["GK_SITE"]
import torch  # first, as grpo_kernels itself does: its libgomp.so.1 is the one the CPU module binds to
import grpo_kernels as gk
import grpo_kernels._cpu, grpo_kernels._cuda  # the CUDA module imports without a GPU (static cudart)
for m in (gk, grpo_kernels._cpu, grpo_kernels._cuda):
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(site)), (m.__name__, m.__file__)
import triton
print("VERSIONS torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)

torch.manual_seed(0)
B, T, V, G = 4, 5, 301, 2
logits = torch.randn(B, T, V, dtype=torch.float32)
ids = torch.randint(0, V, (B, T))
mask = torch.rand(B, T) > 0.2
rewards = torch.randn(B)
old = torch.randn(B, T) * 0.1 - 5.0
ref = torch.randn(B, T) * 0.1 - 5.0
kw = dict(completion_mask=mask, rewards=rewards, group_size=G, old_logps=old, ref_logps=ref, beta=0.04)

def run(backend, dtype):
    x = logits.detach().to(dtype, copy=True).requires_grad_(True)
    out = gk.grpo_loss(x, ids, backend=backend, **kw)
    out.loss.backward()
    return out.loss.detach().double(), x.grad.double()

want, want_grad = run("torch", torch.float64)
backends = gk.available_backends("cpu")
assert set(backends) == {"cpu", "torch", "triton"}, backends
for b in backends:
    got, grad = run(b, torch.float32)
    # float32: the log-sum-exp over V terms is off by at most about log2(V) * eps * (1 + |lse|), |lse| ~ log V,
    # and the loss and its gradient are ratio-weighted means of per-token terms carrying that error
    # (x4 for the rounding of exp / log themselves)
    tol = 4 * math.log2(V) * (1 + math.log(V)) * torch.finfo(torch.float32).eps
    assert abs(got - want) <= tol * max(1.0, abs(want)), (b, got, want)
    assert (grad - want_grad).abs().max() <= tol * max(1.0, want_grad.abs().max()), b
    print("BACKEND OK", b)

if not torch.cuda.is_available():  # the CUDA module is there, the device is not: a clear error, no crash
    try:
        gk.token_logprobs(logits, ids, backend="cuda")
    except gk.BackendUnavailableError as e:
        assert "no CUDA device" in str(e), e
        print("CUDA RAISED", e)
    else:
        sys.exit("backend='cuda' did not raise on a machine without a CUDA device")
else:
    print("CUDA DEVICE", torch.cuda.get_device_name())

maps = {l.split()[-1] for l in open("/proc/self/maps") if len(l.split()) >= 6}
omp = sorted(p for p in maps if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp")))
print("OPENMP", omp)
assert len(omp) == 1 and os.path.realpath(omp[0]).startswith(os.path.realpath(os.path.dirname(torch.__file__))), omp

out = subprocess.run([sys.executable, "-m", "grpo_kernels"], capture_output=True, text=True, check=True).stdout
assert "torch:                " + torch.__version__ in out, out
assert "SASS: sm_80, sm_90, sm_100; PTX: compute_100" in out, out
assert re.search(r"ISA builds: baseline, avx2, avx512; in use: \w+", out) or os.uname().machine != "x86_64", out
assert re.search(r"cpu\s+cpu\s+available", out) and re.search(r"cpu\s+torch\s+available", out), out
assert "glibc_target:         2.28" in out and "zig:" in out and "nvcc:" in out, out
(omp_line,) = [ln for ln in out.splitlines() if "OpenMP runtimes mapped" in ln]
assert omp_line.count("libgomp") == 1 and "more than one" not in omp_line, omp_line
print("DIAGNOSTICS OK")
"""


def _clean_env() -> dict[str, str]:
    """This process's environment less what would point the venv at a source tree or pick a backend."""
    drop = ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET", "GRPO_KERNELS_BACKEND", "GRPO_KERNELS_CPU_ISA",
            "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_PROGRESS_BAR"] = "off"
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def smoke(wheel: Path, python: str, tmp: Path) -> int:
    start = time.monotonic()
    venv, work = tmp / "venv", tmp / "work"
    work.mkdir()
    env = _clean_env()
    p = _run([python, "-m", "venv", str(venv)], env=env, timeout=600)
    if p.returncode:
        print(f"release_smoke: {python} -m venv failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return 1
    py = str(venv / "bin" / "python")
    tag = _run([py, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
               env=env, check=True).stdout.strip()
    if f"-{tag}-" not in wheel.name:
        print(f"release_smoke: {wheel.name} is not a {tag} wheel ({python})", file=sys.stderr)
        return 1

    p = _run([py, "-m", "pip", "install", f"torch=={TORCH_VERSION}"], env=env, timeout=3600)
    if p.returncode:
        print(f"release_smoke: pip cannot install torch=={TORCH_VERSION} for {tag} ({python}):\n"
              f"{p.stdout[-1500:]}\n{p.stderr[-3000:]}", file=sys.stderr)
        return NO_TORCH
    p = _run([py, "-m", "pip", "install", f"{wheel}[triton]"], env=env, timeout=1800)
    if p.returncode:
        print(f"release_smoke: pip install {wheel.name}[triton] failed:\n{p.stderr[-4000:]}", file=sys.stderr)
        return 1
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env,
                check=True).stdout.strip()

    run_env = dict(env, GK_SITE=site, TRITON_INTERPRET="1")
    p = _run([py, "-c", _INSIDE], cwd=work, env=run_env, timeout=1800)
    print(p.stdout, end="")
    if p.returncode:
        print(f"release_smoke: the checks failed in the venv ({tag}):\n{p.stderr[-4000:]}", file=sys.stderr)
        return 1
    versions = next(ln for ln in p.stdout.splitlines() if ln.startswith("VERSIONS")).split()
    torch_v, cuda_v, triton_v = versions[2], versions[4], versions[6]
    build = "CPU build" if cuda_v == "None" else f"CUDA {cuda_v} build"
    cuda = "backend='cuda' raised BackendUnavailableError" if "CUDA RAISED" in p.stdout else "CUDA device present"
    backends = [ln.split()[-1] for ln in p.stdout.splitlines() if ln.startswith("BACKEND OK")]
    print(f"release_smoke: OK {tag} torch {torch_v} ({build}), triton {triton_v}: {', '.join(backends)} match the "
          f"float64 reference; {cuda}; one OpenMP runtime (torch's libgomp); python -m grpo_kernels OK "
          f"({time.monotonic() - start:.0f} s)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--python", default=sys.executable, help="the CPython that makes the venv (default: this one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gk-smoke-") as tmp:
        return smoke(args.wheel.resolve(), args.python, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
