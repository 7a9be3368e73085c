"""The C++ CPU kernels alone, per instruction-set build, against torch.exp over the same elements.

    python -m bench.cpu_isa --n 2048 --v 32000

For each build in ``grpo_kernels._cpu.ISAS`` that this CPU runs (baseline, avx2, avx512), the launchers of
``backend="cpu"`` with a preallocated output (no N x V allocation, no autograd, no loss reduction): the fused
loss kernel (log-probs, entropy and dL/dlogits in one pass, token level, dapo) and the forward kernel with
entropy. ``torch.exp(x, out=y)`` over N x V fp32 is the exp floor of the benchmarks (docs/contract.md#performance).
Prints median milliseconds over ``--repeats`` after 2 warm-up calls; writes nothing.
"""

from __future__ import annotations

import argparse

import torch

from grpo_kernels import _cpu
from grpo_kernels.backends.base import LossParams
from grpo_kernels.backends.cpu_backend import LAUNCHERS
from grpo_kernels.config import GRPOConfig

from .harness import DTYPES, median_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    cpu, n, v = torch.device("cpu"), args.n, args.v
    time = lambda fn: median_ms(fn, cpu, 2, args.repeats)  # noqa: E731

    x32, y = torch.randn(n, v), torch.empty(n, v)
    exp_ms = time(lambda: torch.exp(x32, out=y))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={n} V={v}: "
          f"torch.exp {exp_ms:.2f} ms ({n * v / exp_ms / 1e6:.2f} G exp/s)")
    x32 = y = None

    default = _cpu.isa()
    params = LossParams.from_config(GRPOConfig())
    try:
        for name in args.dtypes.split(","):
            x = (2 * torch.randn(1, n, v)).to(DTYPES[name])
            ids = torch.randint(0, v, (n,))
            out = torch.empty_like(x)
            adv, coef = torch.randn(n), torch.full((n,), 1.0 / n)
            fused = lambda x=x, ids=ids, adv=adv, coef=coef, out=out: LAUNCHERS.fused_fwd_bwd(  # noqa: E731
                x, ids, 1.0, None, None, adv, coef, params, out)
            fwd = lambda x=x, ids=ids: LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)  # noqa: E731
            for isa in _cpu.ISAS:
                if not _cpu.set_isa(isa):
                    print(f"  {name:5s} {isa:8s} not run: this build or CPU lacks it")
                    continue
                fused_ms, fwd_ms = time(fused), time(fwd)
                print(f"  {name:5s} {isa:8s} fused loss {fused_ms:7.2f} ms ({fused_ms / exp_ms:.2f}x exp)   "
                      f"forward + entropy {fwd_ms:7.2f} ms ({fwd_ms / exp_ms:.2f}x exp)")
    finally:
        _cpu.set_isa(default)


if __name__ == "__main__":
    main()
