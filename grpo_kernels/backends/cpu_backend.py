"""``backend="cpu"``: the launchers of the C++ CPU kernels (``csrc/cpu/grpo_cpu.cpp`` via ``grpo_kernels._cpu``).

The extension takes the boundary structs of ``csrc/include/grpo_boundary.h`` (raw pointers, shapes, element
strides, dtype codes; it links no libtorch); this module builds them from tensors and allocates the outputs
(see ``base.py`` for the layout contract).
The kernels use ``torch.get_num_threads()`` OpenMP threads, so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _cpu
from .base import LossParams, native

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ISA_ENV = "GRPO_KERNELS_CPU_ISA"


def check_isa_env() -> None:
    """Validate ``GRPO_KERNELS_CPU_ISA``, which caps the instruction set of the row kernels.

    The extension reads the variable when it loads (any case; the widest build the CPU runs, no wider than
    the named one) and cannot raise there, so an unknown value is rejected here, when the cpu backend is
    first used, rather than silently running the widest build.
    """
    value = os.environ.get(ISA_ENV, "")
    if value and value.lower() not in _cpu.ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(_cpu.ISAS)} (any case), got {value!r}")


check_isa_env()  # this module is imported at the first use of backend "cpu"


def _rows(logits: torch.Tensor, ids: torch.Tensor, tau) -> _cpu.Rows:
    """The row layout of a [B, T, V] tensor with stride 1 along V."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPE_CODE:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.device.type != "cpu":
        raise ValueError(f"the cpu backend needs cpu tensors, got logits on {logits.device}")
    B, T, V = logits.shape
    if V > 1 and logits.stride(2) != 1:
        raise ValueError(f"logits must have stride 1 along V, got strides {logits.stride()}")
    return native(_cpu.Rows, logits=logits.data_ptr(), dtype=_DTYPE_CODE[logits.dtype], B=B, T=T, V=V,
                  stride_b=logits.stride(0), stride_t=logits.stride(1), ids=_vec(ids, B * T, "ids", torch.int64),
                  tau=float(tau))


def _vec(t: Optional[torch.Tensor], n: int, name: str, dtype=torch.float32) -> int:
    """Pointer of an [n] contiguous vector (0 for None), after checking what the kernel relies on."""
    if t is None:
        return 0
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous cpu {dtype} tensor of {n} elements, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def _grad(out: torch.Tensor, logits: torch.Tensor) -> dict:
    if out.shape != logits.shape or out.dtype != logits.dtype or (out.shape[2] > 1 and out.stride(2) != 1):
        raise ValueError(f"out must be {logits.dtype} of shape {tuple(logits.shape)} with stride 1 along V, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    return dict(grad=out.data_ptr(), grad_stride_b=out.stride(0), grad_stride_t=out.stride(1))


class CpuLaunchers:
    """The :class:`~grpo_kernels.backends.base.Launchers` of the C++ CPU kernels."""

    @staticmethod
    def logprobs_fwd(logits, ids, tau, want_entropy):
        rows = _rows(logits, ids, tau)
        n = rows.B * rows.T
        logp = torch.empty(n, dtype=torch.float32)
        stats = torch.empty(n, 2, dtype=torch.float32)
        ent = torch.empty(n if want_entropy else 0, dtype=torch.float32)
        out = native(_cpu.Outputs, logp=logp.data_ptr(), stats=stats.data_ptr(),
                     entropy=ent.data_ptr() if want_entropy else 0)
        _cpu.logprobs_fwd(rows, out, torch.get_num_threads())
        return logp, stats, ent

    @staticmethod
    def logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out):
        rows = _rows(logits, ids, tau)
        n = rows.B * rows.T
        if (entropy is None) != (g_ent is None):
            raise ValueError("entropy and g_ent must both be given or both be None")
        inputs = native(_cpu.TokenInputs, stats=_vec(stats, 2 * n, "stats"), entropy=_vec(entropy, n, "entropy"),
                        g_logp=_vec(g_logp, n, "g_logp"), g_entropy=_vec(g_ent, n, "g_ent"))
        _cpu.logprobs_bwd(rows, inputs, native(_cpu.Outputs, **_grad(out, logits)), torch.get_num_threads())

    @staticmethod
    def fused_fwd_bwd(logits, ids, tau, old, ref, adv, coef, params: LossParams, out):
        rows = _rows(logits, ids, tau)
        n = rows.B * rows.T
        if params.beta != 0.0 and ref is None:
            raise ValueError("ref (reference log-probs) is required when beta != 0")
        logp = torch.empty(n, dtype=torch.float32)
        ent = torch.empty(n, dtype=torch.float32)
        inputs = native(_cpu.TokenInputs, old_logps=_vec(old, n, "old"),
                        ref_logps=_vec(ref if params.beta != 0.0 else None, n, "ref"),
                        advantages=_vec(adv, n, "adv"), coef=_vec(coef, n, "coef"))
        outputs = native(_cpu.Outputs, logp=logp.data_ptr(), entropy=ent.data_ptr(), **_grad(out, logits))
        _cpu.fused_fwd_bwd(rows, inputs, params.to_native(_cpu), outputs, torch.get_num_threads())
        return logp, ent


LAUNCHERS = CpuLaunchers()
