"""What every benchmark script shares: the environment record, timing, peak memory, fresh processes, result files.

- environment: :func:`environment` (device, versions, commit, date, load average) and :class:`LoadMeter` (the
  CPU time other processes took during a run: the noise of a shared machine).
- timing: :func:`median_ms` (CUDA events on a GPU, ``perf_counter`` on the CPU), :func:`percentile`
  (nearest rank: always a measured value), :func:`stats`.
- CPU peak memory: tracemalloc does not see torch's allocations, and torch's CPU allocator has no peak counter,
  so memory is the process's peak RSS: :func:`reset_peak_rss` resets the kernel's counter (VmHWM) and
  :func:`peak_rss_extra` runs a callable and reports its peak RSS minus the RSS just before it.
  :func:`run_fresh` runs a measurement in a fresh ``python -m`` process (with :data:`MALLOC_RETURN` in its
  environment so that freed buffers leave RSS instead of hiding a later peak in glibc's heap) and returns the
  JSON line it prints; it can kill the process when its RSS passes a limit.
- result files: :func:`write_results` (``<stem>.json`` and ``<stem>.md``, and any other text files).
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUSY_CPUS = 0.25  # other processes taking more than a quarter of a CPU on average make CPU timings noisy
# glibc: serve every block >= 64 KiB by mmap and unmap it on free, so that RSS follows what is live; otherwise a
# buffer freed in a warm-up stays resident, is reused, and a later peak is under-counted
MALLOC_RETURN = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, *dists: str) -> dict:
    """Device, versions (torch, triton, liger-kernel, grpo_kernels and ``dists``), commit, date, load average."""
    # the code's state: result files and the results table of docs/benchmarks.md, which a regeneration
    # rewrites as it goes, are not uncommitted code
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results",
                 ":(exclude)docs/benchmarks.md")
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_note": "torch.set_num_threads left at the machine's default for every implementation",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "liger_kernel": version("liger-kernel"),
        "grpo_kernels": version("grpo_kernels"),
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        # torch's CPU allocator asks for transparent huge pages when this is 1: first-touch page faults of a
        # fresh N x V buffer then cost several times less (measured: 84 -> 18 ms for 250 MiB here)
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    if hasattr(os, "getloadavg"):
        env["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    for d in dists:
        env[d.replace("-", "_")] = version(d)
    return env


def thp_settings() -> dict:
    """The kernel's transparent-huge-page settings (``enabled``, ``defrag``), None where unreadable."""
    out = {}
    for k in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{k}") as f:
                out[k] = f.read().strip()
        except OSError:
            out[k] = None
    return out


class LoadMeter:
    """CPU time used by OTHER processes during a run: the machine's busy time (/proc/stat, steal included)
    minus this process's and its reaped children's (getrusage). Divided by the wall time it is the average
    number of CPUs others took from the benchmark, the honest measure of a shared machine's noise."""

    def __init__(self):
        self.t0, self.machine0, self.own0 = time.time(), self._machine(), self._own()

    @staticmethod
    def _machine() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def others_cpus(self) -> float | None:
        m = self._machine()
        wall = time.time() - self.t0
        if m is None or self.machine0 is None or wall <= 0:
            return None
        return max(0.0, (m - self.machine0) - (self._own() - self.own0)) / wall


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(ms: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]): always one of the measured values."""
    s = sorted(ms)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def stats(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "min_ms": min(ms), "max_ms": max(ms), "times_ms": ms}


def times_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a GPU)."""
    ms = []
    for i in range(warmup + repeats):
        synchronize(device)
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize(device)
            dt = e0.elapsed_time(e1)
        else:
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            ms.append(dt)
    return ms


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(times_ms(fn, device, warmup, repeats))


# --------------------------------------------------------------------------------------------------
# CPU peak memory
# --------------------------------------------------------------------------------------------------
def proc_status_kib(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.

    ``ru_maxrss`` is the same counter, except that it also keeps the peak of threads that have exited
    (e.g. a compile worker thread), which no reset clears; so the reset peak is read from VmHWM.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status_kib("VmHWM") <= proc_status_kib("VmRSS") + 1024
    except (OSError, RuntimeError):
        return False


def peak_rss_extra(fn: Callable[[], object]) -> dict:
    """Runs ``fn`` once: its wall time, and its peak RSS (the counter reset just before) minus the RSS just
    before it. -> {"ms", "peak_extra_mib", "rss_before_mib", "peak_rss_mib"}."""
    gc.collect()
    if not reset_peak_rss():
        raise RuntimeError("the peak RSS counter cannot be reset (Linux /proc/self/clear_refs is needed)")
    before = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    peak = proc_status_kib("VmHWM")
    return {"ms": ms, "peak_extra_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "peak_rss_mib": peak / 1024}


class WorkerFailed(RuntimeError):
    """A fresh process of :func:`run_fresh` exited with an error; the message ends with its last output lines."""


class WorkerKilled(RuntimeError):
    """A fresh process of :func:`run_fresh` passed its RSS limit and was killed."""

    def __init__(self, rss_mib: float, limit_mib: float):
        super().__init__(f"RSS {rss_mib:.0f} MiB passed the limit {limit_mib:.0f} MiB")
        self.rss_mib, self.limit_mib = rss_mib, limit_mib


def _rss_of_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_fresh(module: str, args: list[str], env: dict | None = None, timeout: float = 3600,
              rss_limit_mib: float | None = None, tail_lines: int = 5) -> dict:
    """``python -m <module> <args>`` in a fresh process from the repository root (which leads its PYTHONPATH),
    with ``env`` added to its environment; -> the JSON object on the last line of its stdout.

    ``rss_limit_mib``: the process is killed when its RSS passes it (polled 4 times a second), raising
    :class:`WorkerKilled`. A failing process raises :class:`WorkerFailed` with its last ``tail_lines`` lines."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, text=True)
        t0 = time.monotonic()
        while p.poll() is None:
            if rss_limit_mib is not None:
                rss = _rss_of_mib(p.pid)
                if rss > rss_limit_mib:
                    p.kill()
                    p.wait()
                    raise WorkerKilled(rss, rss_limit_mib)
            if time.monotonic() - t0 > timeout:
                p.kill()
                p.wait()
                raise WorkerFailed(f"python -m {module} ran past {timeout:.0f} s")
            time.sleep(0.25)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-tail_lines:]
        raise WorkerFailed(" | ".join(tail))
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------------
def write_results(out_dir, stem: str, result: dict | None, markdown: str | None = None, **others: str) -> list[Path]:
    """``<stem>.json`` (``result``, indented) and ``<stem>.md`` (``markdown``) in ``out_dir``, created if needed,
    and one text file per keyword (``csv=...`` -> ``<stem>.csv``). -> the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if result is not None:
        paths.append(out / f"{stem}.json")
        paths[-1].write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        paths.append(out / f"{stem}.md")
        paths[-1].write_text(markdown)
    for ext, text in others.items():
        paths.append(out / f"{stem}.{ext}")
        paths[-1].write_text(text)
    return paths


def fmt(x, spec=".2f", none="n/a") -> str:
    return none if x is None else format(x, spec)
