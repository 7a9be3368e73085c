"""Call-by-call latency of one fused loss in a fresh process: the first call, then every later call.

    python -m bench.latency                          # cpu backend, N=2,048, V=32,000 fp32, 30 calls
    python -m bench.latency --calls 30 --out bench/results   # also writes cpu-latency-n2048-v32000-fp32.json / .md
    python -m bench.latency --backend cpu --inplace  # the gradient written into the logits

Each call is what a training step does with the loss: ``grpo_loss(...)`` on the same logits leaf, then
``loss.backward()``, with the leaf's ``.grad`` cleared before the call (so every call receives a new
N x V gradient, as autograd hands one to a model each step). Nothing is warmed up: call 1 includes the
first-use costs (torch's lazy imports on the custom-op autograd path, thread-pool start, the first page
faults of the gradient buffer). "Steady" is every call after the first; the script prints their median,
p50 (nearest rank), p90 and max, and the ratio max / median that says how far the worst call strays.
Run it on a quiet machine: another process taking the CPU shows up as a slow call.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

import grpo_kernels

from .harness import BUSY_CPUS, DTYPES, LoadMeter, environment, fmt, percentile, thp_settings, write_results


def summarize(ms: list[float]) -> dict:
    steady = ms[1:]
    out = {"first_ms": ms[0], "calls": len(ms), "times_ms": ms}
    if steady:
        med = statistics.median(steady)
        out.update(steady_median_ms=med, steady_p50_ms=percentile(steady, 50), steady_p90_ms=percentile(steady, 90),
                   steady_max_ms=max(steady), steady_min_ms=min(steady), steady_max_over_median=max(steady) / med)
    return out


def measure(n: int, v: int, dtype: torch.dtype, calls: int, backend: str = "cpu", inplace: bool = False,
            t: int = 256, seed: int = 0) -> dict:
    t = min(t, n)
    B = n // t
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, t, v, generator=g) * 2.0).to(dtype)
    ids = torch.randint(0, v, (B, t), generator=g)
    mask = torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (B,), generator=g)[:, None]
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    opts = dict(completion_mask=mask, advantages=torch.randn(B, generator=g),
                old_logps=logp + 0.3 * torch.randn(B, t, generator=g),
                ref_logps=logp + 0.1 * torch.randn(B, t, generator=g), beta=0.04, loss_type="dapo", backend=backend)
    del logp
    leaf = logits.requires_grad_(True)
    ms, cpu = [], []
    for _ in range(calls):
        leaf.grad = None
        # inplace=True overwrites its logits and takes only a non-leaf (a model's output): a copy, untimed
        x = leaf.clone() if inplace else leaf
        c0, t0 = _cpu_s(), time.perf_counter()
        out = grpo_kernels.grpo_loss(x, ids, inplace=inplace, **opts)
        out.loss.backward()
        ms.append((time.perf_counter() - t0) * 1e3)
        cpu.append((_cpu_s() - c0) * 1e3)
        del out, x
    r = summarize(ms)
    r["cpu_times_ms"] = cpu
    r["steady_cpu_median_ms"] = statistics.median(cpu[1:])
    r["steady_cpu_max_ms"] = max(cpu[1:])
    return r


def _cpu_s() -> float:
    """CPU time of this process, every thread, user + system (page faults and compaction are system time)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--t", type=int, default=256)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--inplace", action="store_true")
    p.add_argument("--out", help="also write <device>-latency-n<N>-v<V>-<dtype>[-inplace].json and .md (with the "
                                 "environment) into this directory")
    args = p.parse_args(argv)
    if args.calls < 2:
        p.error(f"--calls must be >= 2 (the first call and at least one steady call), got {args.calls}")
    meter = LoadMeter()
    r = measure(args.n, args.v, DTYPES[args.dtype], args.calls, args.backend, args.inplace, args.t)
    others = meter.others_cpus()
    r["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    r["env"] = environment(torch.device("cpu"))
    r["env"]["other_processes_cpus"] = None if others is None else round(others, 3)
    r["env"]["thp"] = thp_settings()
    print(f"bench.latency: {args.backend}{' inplace' if args.inplace else ''} N={args.n} V={args.v} {args.dtype}, "
          f"{args.calls} calls in a fresh process; THP {r['env']['thp']}")
    print(f"  first call {r['first_ms']:.1f} ms; steady (calls 2-{args.calls}): median {r['steady_median_ms']:.1f} ms, "
          f"p50 {r['steady_p50_ms']:.1f}, p90 {r['steady_p90_ms']:.1f}, max {r['steady_max_ms']:.1f} ms "
          f"(max / median {r['steady_max_over_median']:.2f})")
    print(f"  CPU time of the process per call (all threads; less sensitive to other processes): first "
          f"{r['cpu_times_ms'][0]:.0f} ms, steady median {r['steady_cpu_median_ms']:.1f} ms, max {r['steady_cpu_max_ms']:.1f} ms")
    print("  calls ms: " + " ".join(f"{x:.0f}" for x in r["times_ms"]))
    if others is not None and others > BUSY_CPUS:
        print(f"  warning: other processes used {others:.2f} CPUs during the run: not representative")
    if args.out:
        stem = f"cpu-latency-n{args.n}-v{args.v}-{args.dtype}" + ("-inplace" if args.inplace else "")
        r["files"] = [str(p) for p in write_results(args.out, stem, r, markdown(r, stem))]
    return r


def markdown(r: dict, stem: str) -> str:
    c, e = r["config"], r["env"]
    lines = [
        f"# bench.latency: {c['backend']}{' inplace' if c['inplace'] else ''}, N={c['n']}, V={c['v']}, {c['dtype']}",
        "",
        f"Generated by `python -m bench.latency --calls {c['calls']} --n {c['n']} --v {c['v']} --dtype {c['dtype']}"
        f"{' --inplace' if c['inplace'] else ''} --out DIR` into `{stem}.json`.",
        "",
        f"- device: {e['device']} ({e['cpu_count']} logical CPUs, torch threads {e['torch_threads']}); torch "
        f"{e['torch']}, grpo_kernels {e['grpo_kernels']}; commit {e['git_commit']}"
        f"{' (uncommitted changes present)' if e.get('git_dirty') else ''}, {e['date_utc']}",
        f"- transparent huge pages: enabled `{e['thp'].get('enabled')}`, defrag `{e['thp'].get('defrag')}`",
        f"- load: other processes used {fmt(e.get('other_processes_cpus'), '.2f')} CPUs on average during the "
        "run",
        f"- {c['calls']} calls in a fresh process, nothing warmed up: `grpo_loss` + `loss.backward()` on the same "
        "logits, `.grad` cleared before each call; steady = every call after the first; p50 / p90 nearest-rank",
        "",
    ]
    if (e.get("other_processes_cpus") or 0) > BUSY_CPUS:
        lines += [f"**Warning: other processes used {e['other_processes_cpus']:.2f} CPUs on average during this run: "
                  "not representative; rerun on an idle machine.**", ""]
    lines += [
        "| first call ms | steady median ms | p50 | p90 | max | max / median | CPU time per call, median / max ms |",
        "|---|---|---|---|---|---|---|",
        f"| {r['first_ms']:.1f} | {r['steady_median_ms']:.1f} | {r['steady_p50_ms']:.1f} | {r['steady_p90_ms']:.1f} | "
        f"{r['steady_max_ms']:.1f} | {r['steady_max_over_median']:.2f} | {r['steady_cpu_median_ms']:.1f} / "
        f"{r['steady_cpu_max_ms']:.1f} |",
        "",
        "Every call, ms: " + ", ".join(f"{x:.1f}" for x in r["times_ms"]) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
    sys.exit(0)
