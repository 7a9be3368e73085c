"""Peak CPU memory of one forward+backward of one implementation, in this fresh process.

    python -m bench.peak_rss_worker '{"op": "loss", "impl": "reference", "args": {...}}'

Prints one JSON line: ``peak_extra_bytes`` = peak RSS during the measured forward+backward minus the RSS
just before it, with the inputs allocated and the implementation warmed up (compiled, thread pools
started). The peak counter (VmHWM, the ru_maxrss of this process's live threads) is reset with
``/proc/self/clear_refs`` after the warm-up; where that is not possible, :func:`cold_run` measures one
cold forward+backward instead (one-off allocations included; a lower bound where building the inputs
peaked higher, which it then says).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import sys

import torch

from bench import harness
from grpo_kernels import _memory


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(spec_json: str) -> dict:
    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec["args"])
    module = importlib.import_module(f"bench.{spec['op']}")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    inputs = module.make_inputs(args, device)
    case = module.build(spec["impl"], inputs, args)

    if not harness.reset_peak_rss():
        if case.setup is not None:
            case.setup()
        return cold_run(case)
    for _ in range(max(1, args.warmup)):
        if case.setup is not None:
            case.setup()
        case.backward(case.forward())
        for t in case.leaves:
            t.grad = None
    if case.setup is not None:
        case.setup()
    # the fused CPU ops keep their last N x V gradient buffer for the next call: drop it, so that the measured
    # call allocates its buffer and the peak counts it (it is memory the op needs, cached or not)
    _memory.release_cached()
    gc.collect()
    harness.reset_peak_rss()
    base = harness.proc_status_kib("VmRSS") * 1024
    state = case.forward()
    case.backward(state)
    peak = harness.proc_status_kib("VmHWM") * 1024
    return {"peak_extra_bytes": peak - base, "memory_method":
            "CPU peak RSS (VmHWM) of a fresh process per implementation during one fwd+bwd, minus its RSS just "
            "before (inputs allocated, warmed up, grpo_kernels' cached gradient buffer released; peak reset via "
            "/proc/self/clear_refs)"}


def cold_run(case) -> dict:
    """Without a resettable peak: ru_maxrss after one cold fwd+bwd minus the RSS before it. Building the
    inputs may have peaked higher than the fwd+bwd; then the number is only a lower bound, and says so."""
    try:
        base = harness.proc_status_kib("VmRSS") * 1024
    except (OSError, RuntimeError):
        return {"peak_extra_bytes": None, "memory_error": "peak RSS needs Linux /proc/self/status"}
    before = _maxrss_bytes()
    state = case.forward()
    case.backward(state)
    peak = _maxrss_bytes()
    out = {"peak_extra_bytes": peak - base, "memory_method":
           "CPU ru_maxrss of a fresh process after one cold fwd+bwd (no warm-up: includes one-off allocations "
           "such as compilation) minus its RSS just before"}
    if peak == before:
        out["memory_method"] += "; LOWER BOUND: building the inputs peaked higher than the fwd+bwd"
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
