"""The runner of the op benchmarks (loss, logprobs, train_step): every implementation of an op side by side.

The environment record, timers, peak-RSS measurement, fresh worker processes and file writing it uses are
:mod:`bench.harness`'s, shared with every other bench script; what is here is the op-level part: the op
interface, per-phase timing, saved-for-backward bytes, the copy / exp floor, targets and the op Markdown.

An op script (``bench/loss.py``, ``bench/logprobs.py``, ``bench/train_step.py``) is a module that provides

- ``NAME``: the op's name in result files ("loss", "logprobs", "train_step");
- ``add_arguments(parser)``: its own command-line options (the shared ones are added here);
- ``make_inputs(args, device) -> dict``: the inputs, built once and shared by every implementation;
- ``implementations(args, device) -> list[(impl, reason | None)]``: what to compare; a reason = skipped;
- ``build(impl, inputs, args) -> Case``: one implementation ready to run;
- ``work(args) -> Work | None``: what the op must at least move and evaluate (for GB/s and the floor);
- ``targets(result) -> list[dict]`` (optional): the op's performance targets, met or missed by how much.

Measurement (timing in this process; CPU memory in one fresh subprocess per implementation):

- time: each repeat runs forward then backward, timed separately (CUDA events around each phase on a GPU,
  ``perf_counter`` with the work synchronous on the CPU), after ``--warmup`` untimed repeats (which also
  absorb torch.compile's and Triton's compilation). forward+backward is the sum of the two phases of the
  same repeat. median, p50 (nearest rank: a measured call), p90, min and max over ``--repeats`` (the steady
  calls), and the first warm-up call (``first_ms``: one-off costs such as lazy imports, compilation, the first
  page faults) where there is a warm-up.
- memory, CUDA: ``max_memory_allocated`` during one forward+backward minus what was allocated before it
  (inputs and warm state excluded). CPU: a fresh ``python -m bench.peak_rss_worker`` subprocess per implementation
  builds the inputs, warms up, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), records
  the RSS, runs one forward+backward and reports the peak RSS (VmHWM) minus that RSS. Where the counter cannot
  be reset, it measures one cold forward+backward instead (one-off allocations such as compilation included;
  flagged as a lower bound where building the inputs peaked higher).
- saved for backward: the distinct storages autograd keeps from the forward
  (``torch.autograd.graph.saved_tensors_hooks``), excluding the inputs' own storages, per token.
- the floor (docs/contract.md#performance): copy rate of the same bytes (``dst.copy_(src)`` over an N x V tensor of the
  logits' dtype: bytes = read + write) and exp rate (``torch.exp(x, out=y)`` over N x V fp32), both
  measured on the same device in the same run, before and after the implementations (the faster of the
  two is used: the stricter floor). Also recorded, outside the floor: what a freshly allocated N x V
  buffer costs beyond writing it (allocation, first-touch page faults), which every implementation that
  returns a new gradient pays.
- load: the CPU time other processes took during the run (``LoadMeter``); a CPU result where others took
  more than a quarter of a CPU says in its Markdown that it is not representative.
- ``torch.set_num_threads`` is never called: every implementation runs with the machine's default.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .harness import (
    BUSY_CPUS,
    DTYPES,
    MALLOC_RETURN,
    RESULTS_DIR,
    LoadMeter,
    WorkerFailed,
    environment,
    fmt,
    median_ms,
    run_fresh,
    stats,
    synchronize,
    write_results,
)

SCHEMA = 1


# --------------------------------------------------------------------------------------------------
# what an op script hands the runner
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One implementation of an op, ready to run on shared inputs.

    ``forward()`` returns whatever ``backward(state)`` needs (e.g. the loss); ``leaves`` are the tensors
    whose ``.grad`` the backward fills (cleared between repeats, excluded from saved-bytes counts).
    ``setup()``, when given, runs before every repeat, untimed (e.g. restoring logits that ``inplace=True``
    overwrote with their gradient).
    """

    forward: Callable[[], Any]
    backward: Callable[[Any], None]
    leaves: list
    note: str = ""
    setup: Callable[[], None] | None = None


@dataclass
class Work:
    """The least an op must move and evaluate, per phase (docs/contract.md#performance).

    Single pass (the loss with token-level weights: the gradient weight is known in the forward): the
    logits read once (fwd) or read once + the gradient written once (fwd+bwd). Two passes (log-probs:
    the upstream gradient arrives only in the backward): the forward reads the logits, the backward reads
    them again and writes the gradient. exps: one per logit and pass (each p_v needs one; the row's lse
    reuses them).
    """

    n: int
    v: int
    elem_size: int
    bytes: dict = field(default_factory=dict)  # phase -> bytes
    exps: dict = field(default_factory=dict)  # phase -> exponentials
    passes: int = 1

    @classmethod
    def logits_pass(cls, n: int, v: int, dtype: torch.dtype, passes: int = 1) -> Work:
        es = torch.empty((), dtype=dtype).element_size()
        nv = n * v
        if passes == 1:
            return cls(n, v, es, {"fwd": nv * es, "fwd_bwd": 2 * nv * es}, {"fwd": nv, "fwd_bwd": nv}, 1)
        return cls(n, v, es, {"fwd": nv * es, "fwd_bwd": 3 * nv * es}, {"fwd": nv, "fwd_bwd": 2 * nv}, 2)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def time_case(case: Case, device: torch.device, warmup: int, repeats: int) -> dict:
    """-> {"fwd": stats, "bwd": stats, "fwd_bwd": stats}; forward and backward timed in the same repeat."""
    fwd, bwd, first = [], [], None
    for i in range(warmup + repeats):
        for t in case.leaves:
            t.grad = None
        if case.setup is not None:
            case.setup()
        gc.collect()
        synchronize(device)
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            state = case.forward()
            e1.record()
            case.backward(state)
            e2.record()
            torch.cuda.synchronize(device)
            f_ms, b_ms = e0.elapsed_time(e1), e1.elapsed_time(e2)
        else:
            t0 = time.perf_counter()
            state = case.forward()
            t1 = time.perf_counter()
            case.backward(state)
            t2 = time.perf_counter()
            f_ms, b_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        del state
        if i == 0:
            first = f_ms + b_ms
        if i >= warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
    for t in case.leaves:
        t.grad = None
    out = {"fwd": stats(fwd), "bwd": stats(bwd), "fwd_bwd": stats([f + b for f, b in zip(fwd, bwd, strict=False)])}
    out["fwd_bwd"]["first_ms"] = first if warmup else None
    return out


def _copy_ms(n, v, dtype, device, warmup, repeats) -> float:
    src = torch.randn(n, v, device=device).to(dtype)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device, warmup, repeats)


def _exp_ms(n, v, device, warmup, repeats) -> float:
    x = torch.randn(n, v, device=device)
    y = torch.empty_like(x)
    return median_ms(lambda: torch.exp(x, out=y), device, warmup, repeats)


def _fill_ms(n, v, dtype, device, warmup, repeats, fresh: bool) -> float:
    if fresh:
        return median_ms(lambda: torch.empty(n, v, dtype=dtype, device=device).fill_(1.0), device, warmup, repeats)
    buf = torch.empty(n, v, dtype=dtype, device=device)
    return median_ms(lambda: buf.fill_(1.0), device, warmup, repeats)


def measure_rates(n: int, v: int, dtype: torch.dtype, device: torch.device, warmup: int = 2, repeats: int = 7) -> dict:
    """Copy rate of an N x V tensor of ``dtype`` (bytes = read + write) and exp rate over N x V fp32.

    Also what a fresh N x V buffer costs beyond writing it: allocation and, on the CPU, the page faults of
    its first touch (the OS zeroes every new page). Every implementation that returns a new gradient pays
    it; the floor does not include it.
    """
    copy_ms = _copy_ms(n, v, dtype, device, warmup, repeats)
    copy_bytes = 2 * n * v * torch.empty((), dtype=dtype).element_size()
    exp_ms = _exp_ms(n, v, device, warmup, repeats)
    reused_ms = _fill_ms(n, v, dtype, device, warmup, repeats, fresh=False)
    fresh_ms = _fill_ms(n, v, dtype, device, warmup, repeats, fresh=True)
    return {
        "copy_ms": copy_ms, "copy_bytes": copy_bytes, "copy_GBps": copy_bytes / copy_ms / 1e6,
        "exp_ms": exp_ms, "exp_count": n * v, "exp_Gps": n * v / exp_ms / 1e6,
        "fill_reused_ms": reused_ms, "fill_fresh_ms": fresh_ms,
    }


def floor_ms(work: Work, phase: str, rates: dict) -> dict | None:
    if phase not in work.bytes:
        return None
    byte_ms = work.bytes[phase] / (rates["copy_GBps"] * 1e6)
    exp_ms = work.exps[phase] / (rates["exp_Gps"] * 1e6)
    return {"bytes": work.bytes[phase], "exps": work.exps[phase], "bytes_ms": byte_ms, "exps_ms": exp_ms,
            "floor_ms": max(byte_ms, exp_ms), "bound": "bytes" if byte_ms >= exp_ms else "exp"}


# --------------------------------------------------------------------------------------------------
# saved for backward
# --------------------------------------------------------------------------------------------------
def saved_bytes(case: Case) -> dict:
    """Distinct storages autograd saves during ``case.forward()``, inputs' storages excluded."""
    seen: dict[int, int] = {}
    leaf_ptrs = {t.untyped_storage().data_ptr() for t in case.leaves}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            pass
        return t

    for t in case.leaves:
        t.grad = None
    if case.setup is not None:
        case.setup()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        state = case.forward()
    value = float(state.detach()) if isinstance(state, torch.Tensor) and state.numel() == 1 else None
    del state
    total = sum(seen.values())
    non_input = sum(b for p, b in seen.items() if p not in leaf_ptrs)
    return {"saved_bytes": non_input, "saved_bytes_incl_inputs": total, "value": value}


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------
def cuda_peak_extra(case: Case, device: torch.device) -> dict:
    for t in case.leaves:
        t.grad = None
    if case.setup is not None:
        case.setup()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    state = case.forward()
    case.backward(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del state
    for t in case.leaves:
        t.grad = None
    return {"peak_extra_bytes": peak, "memory_method": "cuda max_memory_allocated - allocated before"}


def cpu_peak_extra(op: str, impl: str, args: argparse.Namespace) -> dict:
    """Peak RSS of one forward+backward in a fresh subprocess (see :mod:`bench.peak_rss_worker`)."""
    spec = json.dumps({"op": op, "impl": impl, "args": vars(args)})
    env = {k: os.environ.get(k, v) for k, v in MALLOC_RETURN.items()}
    try:
        return run_fresh("bench.peak_rss_worker", [spec], env=env)
    except WorkerFailed as e:
        return {"peak_extra_bytes": None, "memory_error": str(e)}


# --------------------------------------------------------------------------------------------------
# the benchmark driver
# --------------------------------------------------------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=2048, help="N = B*T rows of logits (tokens)")
    p.add_argument("--v", type=int, default=32000, help="V vocabulary entries")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the logits")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats (absorb compilation)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median, min, max)")
    p.add_argument("--impls", default=None, help="comma list: only these implementations")
    p.add_argument("--skip", default=None, help="comma list: leave these implementations out")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON and Markdown")
    p.add_argument("--tag", default=None, help="file-name prefix (default: cpu or gpu)")
    p.add_argument("--seed", type=int, default=0)


def parse(module, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m bench.{module.NAME}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    module.add_arguments(p)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.n < 1 or args.v < 2:
        p.error(f"--n must be >= 1 and --v >= 2, got n={args.n}, v={args.v}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    return args


def _selected(impls, args) -> list:
    only = set(args.impls.split(",")) if args.impls else None
    skip = set(args.skip.split(",")) if args.skip else set()
    out = []
    for name, reason in impls:
        if only is not None and name not in only:
            continue
        if name in skip:
            reason = reason or "left out with --skip"
        out.append((name, reason))
    return out


def run(module, args: argparse.Namespace, log=print) -> dict:
    """Benchmark every implementation of ``module``; write and return the result dict."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    meter = LoadMeter()
    env = environment(device)
    work = module.work(args)
    log(f"[bench.{module.NAME}] {env['device']} | torch {env['torch']} | threads {env['torch_threads']} | "
        f"N={args.n} V={args.v} {args.dtype} | load {env.get('load_avg_start')}")

    rates = []
    if work is not None:
        rates.append(measure_rates(args.n, args.v, DTYPES[args.dtype], device))
        log(f"  copy {rates[0]['copy_GBps']:.1f} GB/s, exp {rates[0]['exp_Gps']:.2f} G/s")

    inputs = module.make_inputs(args, device)
    rows, skipped = [], []
    for impl, reason in _selected(module.implementations(args, device), args):
        if reason is not None:
            skipped.append({"impl": impl, "reason": reason})
            log(f"  {impl:<16} skipped: {reason}")
            continue
        try:
            case = module.build(impl, inputs, args)
            timing = time_case(case, device, args.warmup, args.repeats)
            saved = saved_bytes(case)
        except Exception as e:  # one broken implementation must not hide the others' numbers
            skipped.append({"impl": impl, "reason": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            log(f"  {impl:<16} FAILED: {type(e).__name__}: {e}")
            continue
        row = {"impl": impl, "note": case.note, **{ph: timing[ph] for ph in ("fwd", "bwd", "fwd_bwd")}}
        row["value"] = saved["value"]  # the op's output (e.g. the loss): the same across impls, or a bug
        row["saved_bytes_per_token"] = saved["saved_bytes"] / args.n
        row["saved_bytes_per_token_incl_inputs"] = saved["saved_bytes_incl_inputs"] / args.n
        if not args.no_memory:
            if device.type == "cuda":
                row.update(cuda_peak_extra(case, device))
            else:
                del case
                gc.collect()
                row.update(cpu_peak_extra(module.NAME, impl, args))
        rows.append(row)
        log(f"  {impl:<16} fwd {timing['fwd']['median_ms']:9.2f} ms  bwd {timing['bwd']['median_ms']:9.2f} ms  "
            f"fwd+bwd {timing['fwd_bwd']['median_ms']:9.2f} ms  peak extra "
            f"{_mib(row.get('peak_extra_bytes'))} MiB")
        case = None
        gc.collect()

    del inputs
    gc.collect()
    if work is not None:
        rates.append(measure_rates(args.n, args.v, DTYPES[args.dtype], device))
    if hasattr(os, "getloadavg"):
        env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    others = meter.others_cpus()
    env["other_processes_cpus"] = None if others is None else round(others, 3)

    result = {"schema": SCHEMA, "op": module.NAME, "config": _config(args), "env": env, "rows": rows,
              "skipped": skipped}
    if work is not None:
        result["floor"] = _floor_block(work, rates)
        _derive(result, work)
    grad_bytes = args.n * args.v * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    for row in rows:
        pe = row.get("peak_extra_bytes")
        row["peak_extra_x_grad"] = None if pe is None else pe / grad_bytes
    result["grad_buffer_bytes"] = grad_bytes
    _speedups(result)
    result["targets"] = module.targets(result) if hasattr(module, "targets") else []
    paths = write_result(result, args.out, args.tag)
    log(f"  wrote {', '.join(str(p) for p in paths)}")
    return result


def _mib(b) -> str:
    return "   n/a" if b is None else f"{b / 2**20:7.1f}"


def _config(args) -> dict:
    skip = {"out", "impls", "skip", "no_memory", "tag"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _floor_block(work: Work, rates: list[dict]) -> dict:
    # The floor uses the faster (higher) of the rates measured before and after: the stricter floor.
    best = {"copy_GBps": max(r["copy_GBps"] for r in rates), "exp_Gps": max(r["exp_Gps"] for r in rates)}
    fresh = statistics.median(r["fill_fresh_ms"] - r["fill_reused_ms"] for r in rates)
    return {"rates": rates, "copy_GBps": best["copy_GBps"], "exp_Gps": best["exp_Gps"], "fresh_buffer_extra_ms": fresh,
            "phases": {ph: floor_ms(work, ph, best) for ph in work.bytes},
            "definition": "max(bytes / copy rate, exps / exp rate); " + (
                "single pass: bytes = logits read once (fwd) or read once + gradient written once (fwd+bwd); "
                "exps = one per logit" if work.passes == 1 else
                "two passes: bytes = logits read once (fwd) or read twice + gradient written once (fwd+bwd); "
                "exps = one per logit and pass")}


def _derive(result: dict, work: Work) -> None:
    for row in result["rows"]:
        for ph, fl in result["floor"]["phases"].items():
            t = row[ph]["median_ms"]
            row[ph]["GBps"] = work.bytes[ph] / t / 1e6
            row[ph]["x_floor"] = t / fl["floor_ms"]


BASELINES = ("trl", "compile", "reference")  # speed-ups are reported against each of these rows where it ran


def _speedups(result: dict) -> None:
    for name in BASELINES:
        base = row_of(result, name)
        for row in result["rows"]:
            for ph in ("fwd", "bwd", "fwd_bwd"):
                row[ph][f"speedup_vs_{name}"] = None if base is None else base[ph]["median_ms"] / row[ph]["median_ms"]


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------
def target(name: str, value: float | None, op: str, goal: float, unit: str = "x", why_missing: str = "") -> dict:
    """A target ``value op goal`` (op ">=" or "<="): met, or missed by how much (the value's shortfall)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"target": name, "goal": f"{op} {goal:g}{unit}", "value": None, "status": "not measured",
                "detail": why_missing or "an implementation it needs did not run"}
    met = value >= goal if op == ">=" else value <= goal
    if met:
        detail = f"{value:.2f}{unit} (goal {op} {goal:g}{unit})"
    elif op == ">=":
        detail = f"{value:.2f}{unit}: missed by a factor {goal / value:.2f} (goal >= {goal:g}{unit})"
    else:
        detail = f"{value:.2f}{unit}: missed by a factor {value / goal:.2f} (goal <= {goal:g}{unit})"
    return {"target": name, "goal": f"{op} {goal:g}{unit}", "value": value, "status": "met" if met else "missed",
            "detail": detail}


def row_of(result: dict, impl: str) -> dict | None:
    return next((r for r in result["rows"] if r["impl"] == impl), None)


def ratio(result: dict, slow: str, fast: str, phase: str = "fwd_bwd") -> float | None:
    a, b = row_of(result, slow), row_of(result, fast)
    if a is None or b is None:
        return None
    return a[phase]["median_ms"] / b[phase]["median_ms"]


# --------------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------------
def result_stem(result: dict, tag: str | None = None) -> str:
    c = result["config"]
    kind = tag or ("gpu" if c["device"].startswith("cuda") else "cpu")
    return f"{kind}-{result['op']}-n{c['n']}-v{c['v']}-{c['dtype']}"


def write_result(result: dict, out_dir, tag: str | None = None) -> list[Path]:
    stem = result_stem(result, tag)
    result["file"] = stem
    return write_results(out_dir, stem, result, markdown(result))


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def _tail(s: dict) -> str:
    if "p90_ms" not in s:
        return "n/a"
    return f"{s['p50_ms']:.2f} / {s['p90_ms']:.2f} / {s['max_ms']:.2f}"




def markdown(result: dict) -> str:
    c, e = result["config"], result["env"]
    lines = [
        f"# bench.{result['op']}: N={c['n']}, V={c['v']}, {c['dtype']}, {c['device']}",
        "",
        f"Generated from `{result.get('file', result_stem(result))}.json` by `bench/runner.py`; "
        f"reproduce with `python -m bench.{result['op']} {_cli(result)}`.",
        "",
        f"- device: {e['device']} ({e['cpu_count']} logical CPUs; torch threads {e['torch_threads']}, "
        "the machine's default, the same for every implementation)",
        f"- versions: python {e['python']}, torch {e['torch']}, triton {e['triton']}, liger-kernel "
        f"{e['liger_kernel']}, grpo_kernels {e['grpo_kernels']}" + (f", CUDA {e['cuda']}" if e.get("cuda") else ""),
        f"- environment: THP_MEM_ALLOC_ENABLE={e.get('THP_MEM_ALLOC_ENABLE') or 'unset'} (1: torch's CPU allocator "
        "uses transparent huge pages for large buffers)",
        f"- commit {e['git_commit']}{' (uncommitted changes present)' if e.get('git_dirty') else ''}, "
        f"{e['date_utc']}",
        f"- load: other processes used {fmt(e.get('other_processes_cpus'), '.2f')} CPUs on average during the run "
        f"(machine busy time minus this benchmark's own); load average (1/5/15 min, this run included) at start "
        f"{e.get('load_avg_start')}, at end {e.get('load_avg_end')}",
        f"- timing: median (min-max) over {c['repeats']} repeats after {c['warmup']} warm-up repeats "
        "(compilation excluded); fwd and bwd timed in the same repeat, fwd+bwd is their sum; p50 / p90 / max are "
        "nearest-rank over the same timed repeats; first call: the first warm-up repeat (one-off costs included)",
        "- speed-ups: the median fwd+bwd time of `trl` (TRL's own code, what TRL users run) and of `compile` "
        "divided by the row's; `reference` is grpo_kernels' float64-capable reference implementation, a "
        "correctness tool that no user runs for speed, so no speed-up is quoted against it",
    ]
    fl = result.get("floor")
    if fl:
        f = fl["phases"]["fwd_bwd"]
        lines += [
            f"- floor (same run): copy {fl['copy_GBps']:.1f} GB/s, exp {fl['exp_Gps']:.2f} G exp/s; fwd+bwd moves "
            f"{f['bytes'] / 1e6:.0f} MB ({f['bytes_ms']:.2f} ms at the copy rate) and evaluates "
            f"{f['exps'] / 1e6:.0f} M "
            f"exps ({f['exps_ms']:.2f} ms at the exp rate): floor {f['floor_ms']:.2f} ms ({f['bound']}-bound)",
        ]
        lines.append(f"  ({fl['definition']})")
        if "fresh_buffer_extra_ms" in fl:
            lines.append(f"- not in the floor: a freshly allocated N x V {c['dtype']} buffer costs "
                         f"{fl['fresh_buffer_extra_ms']:.2f} ms more to fill than a reused one (allocation and "
                         "first-touch page faults), paid by every implementation that returns a new gradient")
    if c.get("layout") == "view":
        lines.append("- logits layout: the view [:, :-1] of a [B, T+1, V] leaf; every row includes autograd's backward "
                     "of the slice (a zero-filled [B, T+1, V] gradient and a copy)")
    elif c.get("layout"):
        lines.append("- logits layout: a contiguous [B, T, V] leaf (the op's own cost; --layout view adds the slice of "
                     "a causal LM's [B, T+1, V] output)")
    lines += [f"- one N x V gradient buffer in {c['dtype']}: {result['grad_buffer_bytes'] / 2**20:.1f} MiB", ""]
    busy = busy_warning(result)
    if busy:
        lines += [f"**{busy}**", ""]

    has_floor = bool(fl)
    head = ["impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd p50 / p90 / max ms", "first call ms",
            "speed-up vs trl", "speed-up vs compile"]
    if has_floor:
        head += ["fwd+bwd GB/s", "fwd+bwd time / floor"]
    head += ["peak extra MiB", "x grad buffer", "saved B/token"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        fb = r["fwd_bwd"]
        cells = [f"`{r['impl']}`", _ms(r["fwd"]), _ms(r["bwd"]), _ms(fb), _tail(fb), fmt(fb.get("first_ms"), ".1f"),
                 fmt(fb.get("speedup_vs_trl"), ".2f", "-") + ("x" if fb.get("speedup_vs_trl") else ""),
                 fmt(fb.get("speedup_vs_compile"), ".2f", "-") + ("x" if fb.get("speedup_vs_compile") else "")]
        if has_floor:
            cells += [fmt(r["fwd_bwd"].get("GBps"), ".1f"), fmt(r["fwd_bwd"].get("x_floor"), ".2f")]
        pe = r.get("peak_extra_bytes")
        cells += [fmt(None if pe is None else pe / 2**20, ".1f"), fmt(r.get("peak_extra_x_grad"), ".2f"),
                  fmt(r.get("saved_bytes_per_token"), ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    values = [(r["impl"], r.get("value")) for r in result["rows"] if r.get("value") is not None]
    if values:
        lines += ["Output of the op (the loss, or the scalar the backward starts from) per implementation, the same "
                  "inputs: " + ", ".join(f"`{i}` {v:.6g}" for i, v in values) + ".", ""]
    notes = [r for r in result["rows"] if r.get("note")]
    if notes:
        lines += ["Notes:", ""] + [f"- `{r['impl']}`: {r['note']}" for r in notes] + [""]
    mem_errors = [r for r in result["rows"] if r.get("memory_error")]
    if mem_errors:
        lines += ["Memory measurement failed:", ""]
        lines += [f"- `{r['impl']}`: {r['memory_error']}" for r in mem_errors] + [""]
    method = next((r.get("memory_method") for r in result["rows"] if r.get("memory_method")), None)
    if method:
        lines += [f"Peak extra memory: {method}.", ""]
    if result["skipped"]:
        lines += ["Not run:", ""] + [f"- `{s['impl']}`: {s['reason']}" for s in result["skipped"]] + [""]
    if result.get("targets"):
        lines += ["## Targets", "", "| target | goal | status | detail |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['goal']} | {t['status']} | {t['detail']} |")
        lines.append("")
    return "\n".join(lines)


def busy_warning(result: dict) -> str | None:
    """A CPU result taken while other processes used the CPUs is not representative; say so in the file."""
    e = result["env"]
    others = e.get("other_processes_cpus")
    if result["config"]["device"] == "cpu" and others is not None and others > BUSY_CPUS:
        return (f"Warning: other processes used {others:.2f} of the {e.get('cpu_count')} logical CPUs on average "
                "during this run: these CPU numbers are not representative; rerun on an idle machine.")
    return None


def _cli(result: dict) -> str:
    c = result["config"]
    parts = [f"--n {c['n']}", f"--v {c['v']}", f"--dtype {c['dtype']}", f"--device {c['device']}"]
    for k, v in c.items():
        if k in ("n", "v", "dtype", "device", "seed", "warmup", "repeats") or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def main(module, argv=None) -> dict:
    return run(module, parse(module, argv))
