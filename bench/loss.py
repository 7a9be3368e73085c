"""Benchmark of grpo_loss: forward, backward and forward+backward, every implementation side by side.

    python -m bench.loss --n 2048 --v 32000 --dtype bf16
    python -m bench.loss --n 2048 --v 32000 --dtype fp32 --impls trl,cpu

Implementations (rows):
- ``trl``: TRL 1.16's own code, what a TRL user runs: ``GRPOTrainer._compute_loss`` (the loss terms and the
  logged metrics) with its log-probs and entropy from TRL's ``selective_log_softmax_and_entropy`` on the
  logits (on CPU tensors: ``selective_log_softmax`` + ``entropy_from_logits``; on CUDA: TRL's Triton
  kernel); see :mod:`bench._trl`. A speed-up baseline.
- every fused backend in ``grpo_kernels.available_backends(device)`` ("cpu", "triton", "cuda"), picked up
  automatically; the ones that cannot run are listed with the reason. ``<backend>_inplace``: the same with
  ``inplace=True`` (the gradient written into the logits, which are then a fresh non-leaf copy of the
  shared logits made before each repeat, untimed).
- ``compile``: ``torch.compile(grpo_kernels.reference.grpo_loss)`` (Inductor; compilation happens in the
  warm-up, outside the timing). A speed-up baseline.
- ``liger``: Liger-Kernel's Triton GRPO loss on logits (GPU only), with the same options, ``inplace=False``.
- ``reference``: ``grpo_kernels.grpo_loss(backend="torch")``, the float64-capable reference the kernels are
  tested against (full fp32 log-softmax, every intermediate kept). Not what users run: no speed-up is quoted
  against it.

The batch: B sequences x T tokens (N = B*T), a random completion mask (lengths in [T/2, T]), advantages
[B], old and reference log-probs near the current ones so that some ratios are clipped, loss_type dapo,
beta 0.04 (the KL path included) unless changed. Logits layout (``--layout``):
- ``contiguous`` (default): the logits are a contiguous [B, T, V] leaf: the numbers are the op's own.
- ``view``: the logits are the view ``model_logits[:, :-1]`` of a [B, T+1, V] leaf, as a causal LM gives
  them. Every row then also pays autograd's backward of the slice (a zero-filled [B, T+1, V] gradient and
  a copy into it), which is the framework's cost, not the op's.
Liger's kernel takes [B, T+1, V] logits (it drops the last position): it gets the leaf itself with
``view`` and a padded copy of the logits (its own leaf, allocated before any measurement) otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.backends import unavailable_reason
from grpo_kernels.config import GRPOConfig

from . import _trl, runner

NAME = "loss"
FUSED = ("cpu", "triton", "cuda")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t", type=int, default=256, help="T tokens per sequence (B = N / T; T = N when N < T)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no KL term, no ref_logps)")
    p.add_argument("--loss-type", default="dapo", help="grpo | bnpo | dr_grpo | dapo | cispo | sapo")
    p.add_argument("--level", default="token", choices=("token", "sequence"), help="importance_sampling_level")
    p.add_argument("--temperature", type=float, default=1.0)
    add_layout_argument(p)


def add_layout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("contiguous", "view"), default="contiguous",
                   help="logits as a contiguous [B, T, V] leaf, or as the view [:, :-1] of a [B, T+1, V] leaf")


def batch_shape(n: int, t: int) -> tuple[int, int]:
    t = min(t, n)
    if n % t:
        raise ValueError(f"--n ({n}) must be a multiple of --t ({t}): N = B*T")
    return n // t, t


def make_logit_batch(args, device: torch.device) -> dict:
    """The inputs shared by bench.loss and bench.logprobs: the logits leaf (see --layout), ids, mask."""
    B, T = batch_shape(args.n, args.t)
    g = torch.Generator(device=device).manual_seed(args.seed)
    model_logits = (torch.randn(B, T + 1, args.v, device=device, generator=g) * 2.0).to(runner.DTYPES[args.dtype])
    view = args.layout == "view"
    leaf = model_logits if view else model_logits[:, :-1].contiguous()
    del model_logits
    leaf.requires_grad_(True)
    ids = torch.randint(0, args.v, (B, T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return {"leaf": leaf, "view": view, "ids": ids, "mask": mask, "generator": g, "B": B, "T": T}


def logits_of(x: dict) -> torch.Tensor:
    """[B, T, V] logits of the batch: the leaf itself, or its view [:, :-1] (inside the timed forward)."""
    return x["leaf"][:, :-1] if x["view"] else x["leaf"]


def make_inputs(args, device: torch.device) -> dict:
    x = make_logit_batch(args, device)
    g, B, T = x.pop("generator"), x["B"], x["T"]
    with torch.no_grad():
        logp = reference.token_logprobs(logits_of(x), x["ids"], args.temperature)
    x["advantages"] = torch.randn(B, device=device, generator=g)
    x["old_logps"] = (logp + 0.3 * torch.randn(B, T, device=device, generator=g)).contiguous()
    x["ref_logps"] = (logp + 0.1 * torch.randn(B, T, device=device, generator=g)).contiguous() if args.beta else None
    return x


def config(args) -> GRPOConfig:
    return GRPOConfig(beta=args.beta, loss_type=args.loss_type, importance_sampling_level=args.level,
                      temperature=args.temperature)


def fused_backends(device: torch.device) -> list[tuple[str, str | None]]:
    """Every fused backend with None (runs here) or the reason it does not; new backends appear by themselves."""
    out = []
    avail = grpo_kernels.available_backends(device)
    for name in FUSED:
        if name == "triton" and device.type == "cpu":
            out.append((name, "Triton on CPU tensors runs only in its interpreter (TRITON_INTERPRET=1), a "
                              "correctness tool, not a benchmark"))
        elif name in avail:
            out.append((name, None))
        else:
            out.append((name, unavailable_reason(name, device.type) or "not available"))
    return out


LIGER_CPU_REASON = (
    "Liger-Kernel's GRPO loss on logits (liger_kernel.ops.grpo_loss / transformers.grpo_loss.triton_grpo_loss) "
    "is a Triton GPU kernel: on CPU tensors it fails with 'RuntimeError: 0 active drivers'. Liger's CPU-capable "
    "GRPO path, LigerFusedLinearGRPOLoss (chunked torch), starts from hidden states and the LM head, so it is "
    "compared in bench.train_step"
)


def liger_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel --no-deps)"
    if device.type != "cuda":
        return LIGER_CPU_REASON
    return None


def inplace_rows(device: torch.device) -> list[tuple[str, str | None]]:
    return [(f"{name}_inplace", reason) for name, reason in fused_backends(device)]


def implementations(args, device: torch.device) -> list:
    return [("trl", _trl.missing_reason()), ("compile", None), ("liger", liger_reason(device)),
            *fused_backends(device), *inplace_rows(device), ("reference", None)]


def inplace_case(x: dict, forward_on, note: str) -> runner.Case:
    """A Case whose forward overwrites its logits with their gradient. inplace=True takes logits that are not
    a leaf (a model's output): before each repeat (outside the timing) they are made afresh as a copy of the
    shared leaf, through which the gradient reaches the leaf; the shared leaf itself is never written."""
    leaf, state = x["leaf"], {}

    def setup():
        state["logits"] = leaf.clone()  # a non-leaf with autograd history back to the leaf

    def fwd():
        logits = state.pop("logits")
        return forward_on(logits[:, :-1] if x["view"] else logits)

    return runner.Case(fwd, lambda loss: loss.backward(), [leaf], note, setup)


def work(args) -> runner.Work:
    return runner.Work.logits_pass(args.n, args.v, runner.DTYPES[args.dtype])


def build(impl: str, x: dict, args) -> runner.Case:
    leaf, cfg = x["leaf"], config(args)
    common = dict(completion_mask=x["mask"], advantages=x["advantages"], old_logps=x["old_logps"],
                  ref_logps=x["ref_logps"], beta=args.beta, loss_type=args.loss_type,
                  importance_sampling_level=args.level, temperature=args.temperature)
    backward = lambda loss: loss.backward()  # noqa: E731
    if impl == "reference" or impl in FUSED:
        backend = "torch" if impl == "reference" else impl
        note = ("grpo_kernels.grpo_loss(backend='torch'): the float64-capable reference (full fp32 log-softmax, "
                "every intermediate kept); a correctness tool, not what users run" if impl == "reference"
                else f"grpo_kernels.grpo_loss(backend={backend!r})")
        if impl != "reference" and args.level == "token":
            note += ("; single pass: the gradient is computed in the forward (so the N x V gradient is what autograd "
                     "holds between forward and backward), backward only hands it over")
        return runner.Case(lambda: grpo_kernels.grpo_loss(logits_of(x), x["ids"], backend=backend, **common).loss,
                           backward, [leaf], note)
    if impl.endswith("_inplace") and impl[: -len("_inplace")] in FUSED:
        backend = impl[: -len("_inplace")]
        return inplace_case(
            x, lambda logits: grpo_kernels.grpo_loss(logits, x["ids"], backend=backend, inplace=True, **common).loss,
            f"grpo_kernels.grpo_loss(backend={backend!r}, inplace=True): the gradient overwrites the logits")
    if impl == "trl":
        trainer = _trl.trainer_on_logits(cfg, lambda: logits_of(x), x["ids"], x["mask"])
        batch = _trl.loss_inputs(x["ids"], x["mask"], x["advantages"], x["old_logps"], x["ref_logps"])
        return runner.Case(lambda: trainer._compute_loss(None, batch), backward, [leaf], TRL_NOTE)
    if impl == "compile":
        fn = torch.compile(reference.grpo_loss, dynamic=False)
        return runner.Case(lambda: fn(logits_of(x), x["ids"], cfg, x["advantages"], x["mask"], x["old_logps"],
                                      x["ref_logps"])[0],
                           backward, [leaf], "torch.compile(grpo_kernels.reference.grpo_loss, dynamic=False)")
    if impl == "liger":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        eps_high = cfg.resolved_epsilon_high
        if not x["view"]:  # Liger reads [B, T+1, V] and ignores the last position: pad a copy, once
            with torch.no_grad():
                leaf = torch.cat([leaf, leaf.new_zeros(leaf.shape[0], 1, leaf.shape[2])], 1).requires_grad_(True)
        mask = x["mask"].to(torch.int32).contiguous()  # an attention-style 0/1 mask, as TRL hands it over

        def fwd():
            loss, _ = triton_grpo_loss(
                leaf, x["old_logps"], x["ref_logps"], x["ids"], x["advantages"], mask,
                temperature=args.temperature, beta=args.beta, eps_low=cfg.epsilon_low, eps_high=eps_high,
                inplace=False, loss_type=args.loss_type, importance_sampling_level=args.level, reduce=True,
                use_bias_correction_kl=cfg.use_bias_correction_kl)
            return loss

        return runner.Case(fwd, backward, [leaf], "liger_kernel triton_grpo_loss(inplace=False, reduce=True), "
                                                  "the same options; input: contiguous [B, T+1, V] logits")
    raise ValueError(f"unknown implementation {impl!r}")


TRL_NOTE = ("TRL 1.16 GRPOTrainer._compute_loss (its loss terms and logged metrics), log-probs and entropy from "
            "trl.trainer.utils.selective_log_softmax_and_entropy on the logits (CPU: selective_log_softmax + "
            "entropy_from_logits; CUDA: TRL's Triton kernel)")


def _at(result, n, v, dtypes) -> bool:
    c = result["config"]
    return c["n"] == n and c["v"] == v and c["dtype"] in dtypes


def targets(result: dict) -> list[dict]:
    """The performance targets for this run's device, met or missed by how much."""
    c = result["config"]
    why = {s["impl"]: s["reason"] for s in result["skipped"]}
    out = []
    if c["device"] == "cpu":
        where = "" if _at(result, 2048, 32000, ("fp32", "bf16")) else \
            f" [set at N=2048, V=32000 fp32/bf16; this run N={c['n']}, V={c['v']} {c['dtype']}: informative only]"
        cpu = runner.row_of(result, "cpu")
        miss = f"backend cpu did not run: {why.get('cpu', 'not selected')}"
        fresh = result.get("floor", {}).get("fresh_buffer_extra_ms")
        out += [
            runner.target("cpu fwd+bwd speed-up vs reference" + where, runner.ratio(result, "reference", "cpu"),
                          ">=", 3, why_missing=miss),
            runner.target("cpu fwd+bwd speed-up vs torch.compile" + where, runner.ratio(result, "compile", "cpu"),
                          ">=", 1.5, why_missing=miss if cpu is None else f"compile: {why.get('compile', '')}"),
            runner.target("cpu fwd+bwd time / floor (max of copy and exp time)" + where,
                          None if cpu is None else cpu["fwd_bwd"].get("x_floor"), "<=", 1.5, why_missing=miss),
        ]
        if fresh is not None and out[-1]["status"] == "missed":
            out[-1]["detail"] += (f"; the op allocates its N x V gradient: in this run a fresh buffer cost {fresh:.1f} ms "
                                  "more to fill than a reused one (allocation and first-touch page faults, measured "
                                  "without the huge-page hint the op gives its buffer); inplace=True needs none")
        out += [
            runner.target("cpu peak extra memory / one N x V gradient buffer" + where,
                          None if cpu is None else cpu.get("peak_extra_x_grad"), "<=", 1.2, why_missing=miss),
        ]
    else:
        where = "" if _at(result, 8192, 151936, ("bf16",)) else \
            f" [set at N=8192, V=151936 bf16; this run N={c['n']}, V={c['v']} {c['dtype']}: informative only]"
        copy = result.get("floor", {}).get("copy_GBps")
        for name in ("cuda", "triton"):
            row = runner.row_of(result, name)
            miss = f"backend {name} did not run: {why.get(name, 'not selected')}"
            frac = None if row is None or not copy else row["fwd_bwd"]["GBps"] / copy
            out += [
                runner.target(f"{name} fwd+bwd GB/s / copy rate" + where, frac, ">=", 0.9, unit="", why_missing=miss),
                runner.target(f"{name} fwd+bwd speed-up vs Liger" + where, runner.ratio(result, "liger", name),
                              ">=", 1.3, why_missing=miss if row is None else f"liger: {why.get('liger', '')}"),
                runner.target(f"{name} fwd+bwd speed-up vs reference" + where,
                              runner.ratio(result, "reference", name), ">=", 5, why_missing=miss),
            ]
    return out


def main(argv=None) -> dict:
    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
