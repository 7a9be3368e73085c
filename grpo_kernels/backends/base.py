"""The contract between the fused kernels and the autograd layer.

A fused backend (Triton, C++ CPU, CUDA) provides three raw launchers. They do no validation, no autograd
and no reduction over the batch: ``grpo_kernels._ops`` validated, laid out and allocated everything
before the call, and turns the launchers into ``torch.library`` custom ops with fakes and autograd.

Layout handed to every launcher
-------------------------------
- ``logits``: ``[B, T, V]`` of fp32 / bf16 / fp16, ANY strides for B and T (a view such as
  ``model_logits[:, P-1:-1]`` arrives without a copy), stride 1 along V. Row ``n = b*T + t`` starts at
  ``b*logits.stride(0) + t*logits.stride(1)``: use 64-bit offsets.
- ``ids``: ``[N]`` int64, contiguous, ``N = B*T``. Masked-out positions were set to 0 by the caller, so
  every id a launcher sees at a masked position is in range. An id outside ``[0, V)`` at an unmasked
  position must not be read out of bounds: the launcher writes ``logp = NaN`` for that row (the CPU API
  raises before launching; see SPEC section 4).
- per-token vectors (``entropy``, ``g_logp``, ``old``, ``ref``, ``adv``, ``coef``): ``[N]`` fp32
  contiguous. Optional ones are ``None``.
- ``stats``: the row statistics, ``[N, 2]`` fp32 contiguous: ``stats[n] = (m, log s)`` with ``m`` the max of
  the RAW logits of row n and ``s = sum_v e^{(x_v - m) / tau}``, so ``lse = m / tau + log s``. The backward
  takes the pair, never one rounded lse: ``z_v - lse = (x_v - m) / tau - log s`` keeps p_v to a few eps
  where ``z_v - fl(lse)`` loses ``|lse| eps / 2`` (5e-4 relative at logits ~1e4, or temperature 1e-3).
- ``out``: ``[B, T, V]`` in the logits' dtype with its own strides (a fresh contiguous buffer, or the
  logits tensor itself when ``inplace=True``: then read and write each element in place, never read a
  value already overwritten).
- ``tau`` (temperature) is a Python float; ``z = x / tau``; all arithmetic in fp32.

Math (SPEC section 1), per row, with ``p = softmax(z)``, ``lse = logsumexp(z)``:
- ``logp = z[id] - lse`` (computed as ``(x[id] - m) / tau - log s``);  ``entropy = lse - sum_v p_v z_v``
  (terms with ``p_v = 0``, e.g. ``z_v = -inf``, contribute 0, never NaN).
- backward: ``dL/dx_v = ( g_logp * (onehot(id)_v - p_v) - g_ent * p_v * (z_v - lse + entropy) ) / tau``.
  A row whose ``g_logp`` and ``g_ent`` are both exactly 0 (masked tokens) is written as exact zeros
  WITHOUT using its logits (they may be NaN garbage).
- fused (token-level importance weights only): the per-token gradient weight
  ``g_logp = coef * dloss_tok/dlogp`` is computed in the kernel from ``logp`` as soon as the row's
  ``(m, log s)`` are known, then the row's gradient is written in the same launch. ``dloss_tok/dlogp`` is specified
  exactly by :func:`grpo_kernels.reference.token_loss_grad` (float64 torch, tested against autograd of
  the reference loss): mirror it line for line, including torch's tie rules of ``min`` and ``clamp``.
  ``old=None`` means on-policy: ``old = logp`` in value (ratio 1) while ``d(logp - old)/dlogp`` stays 1.
  ``coef`` already holds the mask and the reduction's normaliser (0 at masked positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..config import GRPOConfig


@dataclass(frozen=True)
class TokenLossParams:
    """Scalars of the per-token loss derivative, as the kernels take them (flags are compile-time)."""

    loss_code: int  # config.LOSS_CODE_CLIP / _CISPO / _SAPO
    epsilon_low: float
    epsilon_high: float
    has_delta: bool
    delta: float  # unused unless has_delta
    beta: float  # KL term active iff beta != 0 (then ref is given)
    bias_correction_kl: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float

    @classmethod
    def from_config(cls, cfg: GRPOConfig) -> TokenLossParams:
        return cls(
            loss_code=cfg.loss_code,
            epsilon_low=float(cfg.epsilon_low),
            epsilon_high=float(cfg.eps_high),
            has_delta=cfg.delta is not None,
            delta=float(cfg.delta) if cfg.delta is not None else 0.0,
            beta=float(cfg.beta),
            bias_correction_kl=bool(cfg.use_bias_correction_kl),
            sapo_temperature_pos=float(cfg.sapo_temperature_pos),
            sapo_temperature_neg=float(cfg.sapo_temperature_neg),
        )


class Launchers(Protocol):
    """What a backend module exposes as ``LAUNCHERS``."""

    def logprobs_fwd(
        self, logits: torch.Tensor, ids: torch.Tensor, tau: float, want_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (logp [N] f32, stats [N, 2] f32 = (m, log s) per row, entropy [N] f32, or an empty tensor when
        not wanted)."""

    def logprobs_bwd(
        self,
        logits: torch.Tensor,
        ids: torch.Tensor,
        stats: torch.Tensor,
        entropy: Optional[torch.Tensor],
        g_logp: torch.Tensor,
        g_ent: Optional[torch.Tensor],
        tau: float,
        out: torch.Tensor,
    ) -> None:
        """Write dL/dlogits into ``out`` (``entropy`` and ``g_ent`` are both given or both None)."""

    def fused_fwd_bwd(
        self,
        logits: torch.Tensor,
        ids: torch.Tensor,
        tau: float,
        old: Optional[torch.Tensor],
        ref: Optional[torch.Tensor],
        adv: torch.Tensor,
        coef: torch.Tensor,
        params: TokenLossParams,
        out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One launch: -> (logp [N] f32, entropy [N] f32) and the gradient of sum_t coef_t*loss_tok_t
        w.r.t. the logits written into ``out``."""


@dataclass(frozen=True)
class BackendInfo:
    """A registry entry. ``unavailable(device_type)`` returns None when usable, else the reason."""

    name: str
    device_types: tuple[str, ...]
    unavailable: Callable[[str], Optional[str]]
    load: Callable[[], Launchers]  # imports the kernels lazily
    supports: str  # one line for the README's backend table
