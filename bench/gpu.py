"""The GPU benchmark in one command, for a machine with a GPU: nothing is downloaded.

    python -m bench.gpu                          # check the machine, then the whole suite
    python -m bench.gpu --check                  # only say what is installed and what is missing
    python -m bench.gpu --ops loss --v 151936    # a part of it (each command of the device tool has 10 min)

The suite: N=8,192 tokens, bf16 logits, V in {32,000; 128,256; 151,936}: ``bench.loss`` and
``bench.logprobs`` (every grpo_kernels backend available on the GPU, eager, torch.compile, Liger's Triton
GRPO loss), and ``bench.train_step`` at V=151,936 with N=4,096 (half: the eager rows of a model step at
N=8,192 would hold ~10 fp32 [N, V] tensors, too close to 80 GB). Results: ``bench/results/gpu-*.json`` and ``.md``,
then ``python -m bench.report`` regenerates the Markdown and the plot (``--readme`` also the README table).

The machine gets a copy of the working tree and no internet: the check lists, for each piece, whether it
is there and how to provide it offline (e.g. a wheel carried in ``bench/wheels/``, installed with
``--install-wheels``). Each configuration runs in its own process, so one failure does not stop the rest.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(__file__).resolve().parent / "wheels"
VOCABS = (32000, 128256, 151936)
OPS = ("loss", "logprobs", "train_step")


def _dist_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check() -> tuple[bool, list[str]]:
    """-> (can run at all, report lines). Imports nothing that is not needed to answer."""
    lines, fatal = [], False

    def line(ok: str, what: str, detail: str):
        lines.append(f"  [{ok:^7}] {what:<22} {detail}")

    line("ok", "python", sys.version.split()[0])
    try:
        import torch
    except ImportError:
        line("MISSING", "torch", "not importable: install a CUDA build of torch (offline: pip install --no-index "
                                 "--find-links DIR torch) - nothing can run without it")
        return False, lines
    cuda_ok = torch.cuda.is_available()
    line("ok", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    if cuda_ok:
        line("ok", "CUDA device", f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible")
    else:
        fatal = True
        line("MISSING", "CUDA device", "torch.cuda.is_available() is False" + (
            " (this torch is a CPU-only build: install a CUDA build)" if torch.version.cuda is None else
            " (driver / CUDA_VISIBLE_DEVICES?)"))
    tv = _dist_version("triton")
    line("ok" if tv else "MISSING", "triton", tv or "not installed: the Triton backend, Liger and torch.compile on "
                                                    "GPU need it (it ships with CUDA builds of torch)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        line("WARN", "TRITON_INTERPRET", "is set: Triton would run in its interpreter; unset it for benchmarks")
    try:
        import grpo_kernels
        from grpo_kernels.backends import unavailable_reason
    except ImportError as e:
        line("MISSING", "grpo_kernels", f"not importable ({e}): run from the repository root, or "
                                        "pip install --no-build-isolation -e .")
        return False, lines
    dev = "cuda" if cuda_ok else "cpu"
    avail = grpo_kernels.available_backends(dev)
    line("ok", "grpo_kernels", f"{grpo_kernels.__version__}, backends on {dev}: {avail}")
    for name in ("cuda", "triton"):
        reason = unavailable_reason(name, dev)
        if reason:
            hint = " (build: pip install --no-build-isolation -e . with nvcc on PATH)" if name == "cuda" else ""
            line("MISSING", f"backend {name}", reason + hint)
    lv = _dist_version("liger-kernel")
    if lv:
        line("ok", "liger-kernel", lv)
    else:
        wheels = sorted(WHEELS.glob("liger_kernel-*.whl")) if WHEELS.is_dir() else []
        line("MISSING", "liger-kernel", "its rows will be skipped; " + (
            f"a wheel is here: python -m bench.gpu --install-wheels (installs {wheels[-1].name} --no-deps)" if wheels
            else "offline: pip download liger-kernel==0.8.5 --no-deps -d bench/wheels on a connected machine, "
                 "carry bench/wheels, then python -m bench.gpu --install-wheels"))
    mv = _dist_version("matplotlib")
    line("ok" if mv else "MISSING", "matplotlib", mv or "the plot will be skipped (the JSON and Markdown are written)")
    return not fatal, lines


def install_wheels() -> int:
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if not wheels:
        print(f"no wheels in {WHEELS}")
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, wheels)]
    print("$ " + " ".join(cmd))
    return subprocess.call(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check the machine")
    p.add_argument("--install-wheels", action="store_true", help=f"pip install {WHEELS}/*.whl offline, no deps")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--v", default=",".join(map(str, VOCABS)), help="comma list of vocabulary sizes")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--readme", action="store_true", help="also regenerate the README table at the end")
    p.add_argument("--dry-run", action="store_true", help="check, then print the commands without running them")
    args = p.parse_args(argv)

    if args.install_wheels:
        rc = install_wheels()
        if rc:
            return rc
    ok, lines = check()
    print("bench.gpu: what this machine has\n" + "\n".join(lines))
    if args.check:
        return 0 if ok else 2
    if not ok and not args.dry_run:
        print("bench.gpu: cannot run the GPU benchmark here (see MISSING above)", file=sys.stderr)
        return 2

    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"--ops must be a comma list of {OPS}, got {bad}")
    vocabs = [int(v) for v in args.v.split(",") if v]
    runs = []
    for op in ops:
        for v in vocabs:
            if op == "train_step" and v != max(vocabs):
                continue  # one model step, at the largest vocabulary
            n = args.n // 2 if op == "train_step" else args.n
            extra = ["--hidden", "1024", "--layers", "2"] if op == "train_step" else []
            runs.append([sys.executable, "-m", f"bench.{op}", "--device", "cuda", "--n", str(n), "--v", str(v),
                         "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup), *extra])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if args.dry_run:
        print("\n".join(" ".join(cmd[1:]) for cmd in runs))
        return 0
    failed = []
    for cmd in runs:
        print("\n$ " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"  ({time.time() - t0:.0f} s, exit {rc})", flush=True)
        if rc:
            failed.append(" ".join(cmd[2:]))
    report = [sys.executable, "-m", "bench.report"] + (["--readme"] if args.readme else [])
    subprocess.call(report, cwd=ROOT, env=env)
    if failed:
        print("bench.gpu: these runs failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
