"""``backend="triton"``: the launchers of the Triton kernels (``triton_kernels.py``; layout contract: ``base.py``).

Each launcher first builds a :class:`Launch` (kernel, grid, arguments, compile-time constants) and then runs
it. The plans are public so that the tests can compile exactly what a real call launches, ahead of time for
sm_80 / sm_90 without a GPU (``tests/test_triton_ptx.py``), and count the specialisations a sequence of
calls produces (a new N, T or row stride must not compile again).

Launch configuration (no autotuning: one choice per (V, dtype), so a new N, T or stride never compiles again):
``BLOCK = min(next_pow2(V), 4096 // (elsize / 2))`` elements per chunk (8 KiB of logits: 16 bf16 or
8 fp32 per thread at 8 warps, i.e. two 128-bit loads per thread in flight) and 8 warps from 2,048 lanes
up, 4 below. On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from . import triton_kernels as K
from .base import LossParams

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""

    kernel: object
    grid: tuple[int]
    args: tuple
    constexprs: dict
    num_warps: int

    def __call__(self) -> None:
        if self.grid[0] == 0:
            return
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def block_config(V: int, dtype: torch.dtype) -> dict:
    """The compile-time tile of a (V, dtype): ALIGN = elements per 16 bytes, BLOCK = elements per chunk."""
    es = torch.empty((), dtype=dtype).element_size()
    block = min(max(16, 1 << max(0, (V - 1).bit_length())), 8192 // es)
    return {"ALIGN": 16 // es, "BLOCK": block}


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _aligned(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """-> (a 1-D view of ``t``'s storage that starts at a 16-byte boundary, the element offset of t[0] in it).

    The kernels address rows from that base, so Triton sees a 16-byte-aligned pointer (its "divisible by
    16" specialisation) and each row's head / body split is computed from absolute addresses.
    """
    es = t.element_size()
    mis = (t.data_ptr() % 16) // es
    if t.numel() == 0:  # nothing to address (the launch is skipped), and no extent to view
        return t, 0
    if t.data_ptr() % es or t.storage_offset() < mis:  # storage itself off the grid: no alignment to gain
        return t, 0
    extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride(), strict=True) if d > 0)
    return t.as_strided((mis + extent,), (1,), t.storage_offset() - mis), mis


def _rows(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int, int]:
    """-> (aligned base, shift, B, T, V, stride_b, stride_t) of a [B, T, V] tensor with stride 1 along V."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, T, V = logits.shape
    if V > 1 and logits.stride(2) != 1:
        raise ValueError(f"logits must have stride 1 along V, got strides {logits.stride()}")
    base, shift = _aligned(logits)
    return base, shift, B, T, V, logits.stride(0), logits.stride(1)


def _vec(t: torch.Tensor | None, n: int, name: str, like: torch.Tensor, dtype=torch.float32):
    if t is None:
        return None
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != like.device:
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of {n} elements on {like.device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return t


def _out(out: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
            or (out.shape[2] > 1 and out.stride(2) != 1)):
        raise ValueError(f"out must be {logits.dtype} of shape {tuple(logits.shape)} on {logits.device} with stride 1 "
                         f"along V, got {out.dtype} {tuple(out.shape)} on {out.device} strides {out.stride()}")
    base, shift = _aligned(out)
    return base, out.stride(0), out.stride(1), shift


def _inv_tau(tau) -> float:
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau (the temperature) must be finite and > 0, got {tau}")
    return 1.0 / tau


def _f32(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)


# ---- plans ---------------------------------------------------------------------------------------------
def plan_logprobs_fwd(logits, ids, tau, want_entropy, logp, stats, ent) -> Launch:
    x, shift, B, T, V, sb, st = _rows(logits)
    n = B * T
    _vec(ids, n, "ids", logits, torch.int64)
    cfg = block_config(V, logits.dtype)
    return Launch(K.logprobs_fwd_kernel, (n,),
                  (x, ids, logp, stats, ent if want_entropy else logp, T, V, sb, st, shift, _inv_tau(tau)),
                  {"WANT_ENT": bool(want_entropy), **cfg}, _num_warps(cfg["BLOCK"]))


def plan_logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out) -> Launch:
    x, shift, B, T, V, sb, st = _rows(logits)
    n = B * T
    if (entropy is None) != (g_ent is None):
        raise ValueError("entropy and g_ent must both be given or both be None")
    _vec(stats, 2 * n, "stats", logits)
    for t, name in ((entropy, "entropy"), (g_logp, "g_logp"), (g_ent, "g_ent")):
        _vec(t, n, name, logits)
    _vec(ids, n, "ids", logits, torch.int64)
    o, osb, ost, oshift = _out(out, logits)
    has_ent = entropy is not None
    cfg = block_config(V, logits.dtype)
    return Launch(K.logprobs_bwd_kernel, (n,),
                  (x, ids, stats, entropy if has_ent else g_logp, g_logp, g_ent if has_ent else g_logp, o, T, V, sb, st,
                   shift, osb, ost, oshift, _inv_tau(tau)),
                  {"HAS_ENT": has_ent, **cfg}, _num_warps(cfg["BLOCK"]))


def plan_fused(logits, ids, tau, old, ref, adv, coef, params: LossParams, out, logp, ent) -> Launch:
    x, shift, B, T, V, sb, st = _rows(logits)
    n = B * T
    has_ref = params.beta != 0.0
    if has_ref and ref is None:
        raise ValueError("ref (reference log-probs) is required when beta != 0")
    for t, name in ((old, "old"), (ref, "ref"), (adv, "adv"), (coef, "coef")):
        _vec(t, n, name, logits)
    _vec(ids, n, "ids", logits, torch.int64)
    o, osb, ost, oshift = _out(out, logits)
    cfg = block_config(V, logits.dtype)
    return Launch(
        K.fused_fwd_bwd_kernel, (n,),
        (x, ids, adv if old is None else old, ref if has_ref else adv, adv, coef, logp, ent, o, T, V, sb, st, shift,
         osb, ost, oshift, _inv_tau(tau), params.epsilon_low, params.epsilon_high, params.delta, params.beta,
         params.sapo_temperature_pos, params.sapo_temperature_neg),
        {"HAS_OLD": old is not None, "HAS_REF": has_ref, "LOSS": int(params.loss_code),
         "HAS_DELTA": bool(params.has_delta), "BIAS_CORR": bool(params.use_bias_correction_kl), **cfg},
        _num_warps(cfg["BLOCK"]),
    )


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class TritonLaunchers:
    """The :class:`~grpo_kernels.backends.base.Launchers` of the Triton kernels (on the current stream)."""

    @staticmethod
    def logprobs_fwd(logits, ids, tau, want_entropy):
        n = ids.numel()
        logp, ent = _f32(n, logits), _f32(n if want_entropy else 0, logits)
        stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
        with _device_ctx(logits):
            plan_logprobs_fwd(logits, ids, tau, want_entropy, logp, stats, ent)()
        return logp, stats, ent

    @staticmethod
    def logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out):
        with _device_ctx(logits):
            plan_logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out)()

    @staticmethod
    def fused_fwd_bwd(logits, ids, tau, old, ref, adv, coef, params: LossParams, out):
        n = ids.numel()
        logp, ent = _f32(n, logits), _f32(n, logits)
        with _device_ctx(logits):
            plan_fused(logits, ids, tau, old, ref, adv, coef, params, out, logp, ent)()
        return logp, ent


LAUNCHERS = TritonLaunchers()
