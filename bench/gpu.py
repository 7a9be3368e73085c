"""The GPU benchmark in one command, for a machine with a GPU: nothing is downloaded.

    python -m bench.gpu                          # check the machine, then the whole suite
    python -m bench.gpu --check                  # only say what is installed and what is missing
    python -m bench.gpu --ops loss --v 151936    # a part of it (each command of the device tool has 10 min)

The suite: N=8,192 tokens, bf16 logits, V in {32,000; 128,256; 151,936}: ``bench.loss`` and
``bench.logprobs`` (every grpo_kernels backend available on the GPU and its ``inplace=True`` row, TRL 1.16's
own code (``trl``), torch.compile, Liger's Triton GRPO loss, the reference), and ``bench.train_step`` at
V=151,936 with N=4,096 (half: the reference rows of a model step at N=8,192 would hold ~10 fp32 [N, V]
tensors, too close to 80 GB); then ``bench/trl_step.py`` (stock TRL against grpo_kernels' TRL trainer) when
that script is present, with the options of this suite it accepts (``--device``, ``--dtype``, ``--repeats``,
``--warmup``). Results: ``bench/results/gpu-*.json`` and ``.md``, then ``python -m bench.report``
regenerates the Markdown and the plot (``--readme`` also the table of docs/benchmarks.md).

Time (an estimate from ``bench/results/roofline.md`` until measured on the GPU): every kernel of a run takes
milliseconds (2.2 ms for the fused loss at N=8,192, V=151,936 bf16 on an H100), so 13 repeats of each row are
a few seconds; a run's time is its fixed costs: process start and imports (~10 s), torch.compile of the
reference's forward and backward (~20-40 s), Triton's JIT of each kernel variant (a few s each). About 30-60
s per run, 8 runs plus trl_step: 4-8 min. ``--budget-s`` (default 450) bounds it: no run starts past the
budget, a run in progress is stopped there, and the runs left out are listed.

``--ops fused_kernels`` (part of the suite) times the two fused CUDA kernels against each other at the
launcher level, on the same batch: the 3-pass ``fused_kernel`` and the 2-pass ``fused_cluster_kernel``
that backend="cuda" runs on sm_90+ (a row held in the shared memory of a thread-block cluster), with the HBM
bytes each must move and the bandwidth reached (``bench/results/gpu-fused-kernels.md``). In the other rows,
"cuda" is the kernel the extension chooses for the GPU: the cluster kernel on H100 / H200 / B200.

The machine gets a copy of the working tree and no internet: the check lists, for each piece, whether it
is there and how to provide it offline (e.g. a wheel carried in ``bench/wheels/``, installed with
``--install-wheels``). Each configuration runs in its own process, so one failure does not stop the rest.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(__file__).resolve().parent / "wheels"
VOCABS = (32000, 128256, 151936)
OPS = ("loss", "logprobs", "train_step", "fused_kernels", "trl_step")
TRL_STEP = Path(__file__).resolve().parent / "trl_step.py"
TRL_STEP_FLAGS = ("--device", "--dtype", "--repeats", "--warmup")


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
    trl = _dist_version("trl")
    line("ok" if trl else "MISSING", "trl", trl or "the trl rows will be skipped (pip install 'trl>=1.16' --no-deps, "
                                                "offline from a wheel in bench/wheels)")
    line("ok" if TRL_STEP.exists() else "absent", "bench/trl_step.py",
         "runs after the ops" if TRL_STEP.exists() else "not in this tree: that part of the suite is left out")
    mv = _dist_version("matplotlib")
    line("ok" if mv else "MISSING", "matplotlib", mv or "the plot will be skipped (the JSON and Markdown are written)")
    return not fatal, lines


def time_fused_kernels(n: int, vocabs, repeats: int = 10, warmup: int = 3, module=None, device: str = "cuda",
                       dtype=None) -> list[dict]:
    """Times CudaLaunchers.fused_fwd_bwd with the 3-pass kernel (cluster=1) and the extension's choice
    (cluster=0: the 2-pass cluster kernel where it runs), N rows of each V; median / min milliseconds and the
    bandwidth reached over the bytes each kernel must move (bench.roofline.traffic). ``module``: the
    extension (default grpo_kernels._cuda); the tests pass the CPU emulation with device="cpu"."""
    import statistics

    import torch

    from bench import harness, roofline
    from grpo_kernels.backends.base import LossParams
    from grpo_kernels.backends.cuda_backend import _DTYPE_CODE, CudaLaunchers
    from grpo_kernels.config import GRPOConfig

    if module is None:
        module = importlib.import_module("grpo_kernels._cuda")
    dtype = dtype or torch.bfloat16
    cc = torch.cuda.get_device_capability()[0] if device == "cuda" else module.device_cc()[0]
    params = LossParams.from_config(GRPOConfig(loss_type="dapo", beta=0.04))
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for V in vocabs:
        x = (torch.randn(1, n, V, generator=g, device=device) * 2).to(dtype)
        ids = torch.randint(0, V, (n,), generator=g, device=device)
        lp = torch.randn(n, generator=g, device=device) * 0.1 - 5
        old, ref, adv = lp + 0.1, lp - 0.1, torch.randn(n, generator=g, device=device)
        coef = torch.full((n,), 1.0 / n, device=device)
        out = torch.empty_like(x)
        chosen = module.fused_cluster_size(V, _DTYPE_CODE[dtype], cc, x.data_ptr())
        es = x.element_size()
        for cluster in (1, 0):
            L = CudaLaunchers(module, device, cluster=cluster)
            kernel = "fused_cluster_kernel" if cluster == 0 and chosen else "fused_kernel"
            nbytes = roofline.traffic("fused2" if kernel == "fused_cluster_kernel" else "fused", n, V, es)["bytes"]
            call = functools.partial(L.fused_fwd_bwd, x, ids, 1.0, old, ref, adv, coef, params, out)
            times = harness.times_ms(call, torch.device(device), warmup, repeats)
            med = statistics.median(times)
            rows.append({"V": V, "n": n, "dtype": str(dtype).replace("torch.", ""), "kernel": kernel,
                         "cluster": chosen if kernel == "fused_cluster_kernel" else 1,
                         "passes": 2 if kernel == "fused_cluster_kernel" else 3, "hbm_bytes": nbytes,
                         "median_ms": med, "min_ms": min(times), "tbps": nbytes / (med * 1e-3) / 1e12})
    return rows


def fused_kernels_markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"# The fused CUDA kernels on {device_name}", "",
             "Generated by `python -m bench.gpu --ops fused_kernels`: CudaLaunchers.fused_fwd_bwd on one "
             "batch (dtype in the table), CUDA events, median of the repeats. HBM bytes: what the kernel must move (bench.roofline: "
             "3 passes over the logits for fused_kernel as written, 2 for the cluster kernel).", "",
             "| N | V | dtype | kernel | blocks / row | passes | HBM GB | median ms | min ms | TB/s reached |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['V']:,} | {r['dtype']} | {r['kernel']} | {r['cluster']} | {r['passes']} | "
                     f"{r['hbm_bytes'] / 1e9:.2f} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['tbps']:.2f} |")
    return "\n".join(lines) + "\n"


def _run_fused_kernels(args) -> int:
    import torch

    from bench import harness

    rows = time_fused_kernels(args.n, [int(v) for v in args.v.split(",") if v], args.repeats, args.warmup,
                              dtype=harness.DTYPES[args.dtype])
    md = fused_kernels_markdown(rows, torch.cuda.get_device_name(0))
    out = ROOT / "bench" / "results" / "gpu-fused-kernels.md"
    out.write_text(md)
    print(md)
    return 0


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
    p.add_argument("--readme", action="store_true", help="also regenerate the table of docs/benchmarks.md at the end")
    p.add_argument("--dry-run", action="store_true", help="check, then print the commands without running them")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of the runs: none starts after it, a running one is stopped at it")
    p.add_argument("--fused-kernels-now", action="store_true", help=argparse.SUPPRESS)  # the fused_kernels run
    args = p.parse_args(argv)
    if args.fused_kernels_now:
        return _run_fused_kernels(args)

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
        if op == "trl_step":
            cmd = trl_step_command(args)
            if cmd is not None:
                runs.append(cmd)
            continue
        if op == "fused_kernels":  # one process for every V
            runs.append([sys.executable, "-m", "bench.gpu", "--fused-kernels-now", "--n", str(args.n), "--v",
                         ",".join(map(str, vocabs)), "--dtype", args.dtype, "--repeats", str(args.repeats),
                         "--warmup", str(args.warmup)])
            continue
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
    failed, left_out = [], []
    start = time.time()
    for cmd in runs:
        left = args.budget_s - (time.time() - start)
        if left <= 0:
            left_out.append(" ".join(cmd[2:]))
            continue
        print("\n$ " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        try:
            rc = subprocess.call(cmd, cwd=ROOT, env=env, timeout=left)
        except subprocess.TimeoutExpired:
            rc = "stopped at the --budget-s limit"
        print(f"  ({time.time() - t0:.0f} s, exit {rc}; {time.time() - start:.0f} s of the suite)", flush=True)
        if rc:
            failed.append(" ".join(cmd[2:]))
    if left_out:
        print("bench.gpu: not started (past --budget-s):\n  " + "\n  ".join(left_out), file=sys.stderr)
    report = [sys.executable, "-m", "bench.report"] + (["--readme"] if args.readme else [])
    subprocess.call(report, cwd=ROOT, env=env)
    if failed:
        print("bench.gpu: these runs failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def trl_step_command(args) -> list[str] | None:
    """``python -m bench.trl_step`` with the suite's options that its command line accepts (read from its
    ``--help``), or None where the script is not in this tree."""
    if not TRL_STEP.exists():
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        help_text = subprocess.run([sys.executable, "-m", "bench.trl_step", "--help"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        help_text = ""
    values = {"--device": "cuda", "--dtype": args.dtype, "--repeats": str(args.repeats), "--warmup": str(args.warmup)}
    cmd = [sys.executable, "-m", "bench.trl_step"]
    for flag in TRL_STEP_FLAGS:
        if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
            cmd += [flag, values[flag]]
    return cmd


if __name__ == "__main__":
    sys.exit(main())
