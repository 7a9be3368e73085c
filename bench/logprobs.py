"""Benchmark of token_logprobs (per-token log-probs and entropy): forward, backward, forward+backward.

    python -m bench.logprobs --n 2048 --v 32000 --dtype fp32
    python -m bench.logprobs --n 2048 --v 32000 --dtype bf16 --no-entropy

Rows: ``trl`` (TRL 1.16's ``selective_log_softmax_and_entropy``, entropy differentiable: on CPU tensors
``selective_log_softmax`` + ``entropy_from_logits``, on CUDA TRL's Triton kernel; ``selective_log_softmax``
alone with ``--no-entropy``), ``compile`` (``torch.compile(grpo_kernels.reference.token_logprobs)``), every
fused backend available for the device, and ``reference`` (``grpo_kernels.token_logprobs(backend="torch")``,
the float64-capable reference: a correctness tool, not what users run).
The backward takes random upstream gradients for the log-probs (and the entropy), as a loss downstream
would give; it is the two-pass path (the gradient is not known in the forward), so its floor counts two
reads of the logits. Logits, ids, mask and ``--layout`` are those of ``bench.loss``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import grpo_kernels
from grpo_kernels import reference

from . import _trl, runner
from .loss import FUSED, add_layout_argument, fused_backends, logits_of, make_logit_batch

NAME = "logprobs"

LIGER_REASON = (
    "Liger-Kernel has no differentiable log-prob op on logits (fused_selective_log_softmax in "
    "liger_kernel.ops.grpo_loss is a forward-only Triton GPU kernel)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t", type=int, default=256, help="T tokens per sequence (B = N / T; T = N when N < T)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-entropy", action="store_true", help="log-probs only (return_entropy=False)")
    add_layout_argument(p)


def make_inputs(args, device: torch.device) -> dict:
    x = make_logit_batch(args, device)
    g, B, T = x.pop("generator"), x["B"], x["T"]
    x["g_logp"] = torch.randn(B, T, device=device, generator=g)
    x["g_ent"] = torch.randn(B, T, device=device, generator=g)
    return x


def implementations(args, device: torch.device) -> list:
    return [("trl", _trl.missing_reason()), ("compile", None), ("liger", LIGER_REASON), *fused_backends(device),
            ("reference", None)]


def work(args) -> runner.Work:
    return runner.Work.logits_pass(args.n, args.v, runner.DTYPES[args.dtype], passes=2)


def build(impl: str, x: dict, args) -> runner.Case:
    leaf, ids, ent = x["leaf"], x["ids"], not args.no_entropy

    def surrogate(out):  # sum(g_logp * logp) (+ sum(g_ent * entropy)): a scalar whose gradient is the op's
        if ent:
            return (out[0] * x["g_logp"]).sum() + (out[1] * x["g_ent"]).sum()
        return (out * x["g_logp"]).sum()

    backward = lambda s: s.backward()  # noqa: E731
    if impl == "trl":
        from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

        if ent:
            fn = lambda: selective_log_softmax_and_entropy(logits_of(x), ids, temperature=args.temperature)  # noqa: E731
            note = "trl.trainer.utils.selective_log_softmax_and_entropy (entropy with gradient)"
        else:
            fn = lambda: selective_log_softmax(logits_of(x), ids, temperature=args.temperature)  # noqa: E731
            note = "trl.trainer.utils.selective_log_softmax"
        return runner.Case(lambda: surrogate(fn()), backward, [leaf], note)
    if impl == "reference" or impl in FUSED:
        backend = "torch" if impl == "reference" else impl
        return runner.Case(
            lambda: surrogate(grpo_kernels.token_logprobs(logits_of(x), ids, temperature=args.temperature,
                                                          return_entropy=ent, backend=backend)),
            backward, [leaf], f"grpo_kernels.token_logprobs(backend={backend!r}, return_entropy={ent})")
    if impl == "compile":
        fn = torch.compile(reference.token_logprobs, dynamic=False)
        return runner.Case(lambda: surrogate(fn(logits_of(x), ids, args.temperature, ent)), backward, [leaf],
                           "torch.compile(grpo_kernels.reference.token_logprobs, dynamic=False)")
    raise ValueError(f"unknown implementation {impl!r}")


def main(argv=None) -> dict:
    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
