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
  position must not be read out of bounds: the launcher writes ``logp = NaN`` for that row (the public
  API raises before launching).
- per-token vectors (``entropy``, ``g_logp``, ``old``, ``ref``, ``adv``, ``coef``): ``[N]`` fp32
  contiguous. Optional ones are ``None``.
- ``stats``: the row statistics, ``[N, 2]`` fp32 contiguous: ``stats[n] = (m, log s)`` with ``m`` the max of
  the RAW logits of row n and ``s = sum_v e^{(x_v - m) / tau}``, so ``lse = m / tau + log s`` (why a pair and
  not one lse: ``csrc/include/grpo_boundary.h``).
- ``out``: ``[B, T, V]`` in the logits' dtype with its own strides (a fresh contiguous buffer, or the
  logits tensor itself when ``inplace=True``: then read and write each element in place, never read a
  value already overwritten).
- ``tau`` (temperature) is a Python float; ``z = x / tau``; all arithmetic in fp32.

Math, per row, with ``p = softmax(z)``, ``lse = logsumexp(z)``:
- ``logp = z[id] - lse`` (computed as ``(x[id] - m) / tau - log s``);  ``entropy = lse - sum_v p_v z_v``
  (terms with ``p_v = 0``, e.g. ``z_v = -inf``, contribute 0, never NaN).
- backward: ``dL/dx_v = ( g_logp * (onehot(id)_v - p_v) - g_ent * p_v * (z_v - lse + entropy) ) / tau``.
  A row whose ``g_logp`` and ``g_ent`` are both exactly 0 (masked tokens) is written as exact zeros
  WITHOUT using its logits (they may be NaN garbage).
- fused (token-level importance weights only): the per-token gradient weight
  ``g_logp = coef * dloss_tok/dlogp`` is computed in the kernel from ``logp`` as soon as the row's
  ``(m, log s)`` are known, then the row's gradient is written in the same launch. ``dloss_tok/dlogp`` is specified
  exactly by :func:`grpo_kernels.logp_loss.token_loss_grad` (float64 torch, tested against autograd of
  the reference loss): mirror it line for line, including torch's tie rules of ``min`` and ``clamp``.
  ``old=None`` means on-policy: ``old = logp`` in value (ratio 1) while ``d(logp - old)/dlogp`` stays 1.
  ``coef`` already holds the mask and the reduction's normaliser (0 at masked positions).

The C++ modules take this layout as the named structs of ``csrc/include/grpo_boundary.h`` (``Rows``,
``TokenInputs``, ``Outputs``, ``LossParams``), each bound once with one attribute per field; :func:`native`
builds one by field name. :class:`LossParams` here is the Python mirror of the C++ ``LossParams``: the same
fields, the same names; the Triton launcher reads it directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Protocol

import torch

from ..config import GRPOConfig


@dataclass(frozen=True)
class LossParams:
    """Scalars of the per-token loss derivative as the kernels take them; mirrors ``gk::LossParams``
    (``csrc/include/grpo_boundary.h``) field for field, under the same names."""

    loss_code: int  # config.LOSS_CODE_CLIP / _CISPO / _SAPO
    epsilon_low: float
    epsilon_high: float  # resolved: epsilon_low when the config leaves it None
    has_delta: bool
    delta: float  # unused unless has_delta
    beta: float  # KL term active iff beta != 0 (then ref is given)
    use_bias_correction_kl: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float

    @classmethod
    def from_config(cls, cfg: GRPOConfig) -> LossParams:
        values = {name: getattr(cfg, name) for name in _SHARED}
        values.update(loss_code=cfg.loss_code, epsilon_high=cfg.resolved_epsilon_high, has_delta=cfg.delta is not None,
                      delta=0.0 if cfg.delta is None else cfg.delta)
        return cls(**{name: _TYPES[name](values[name]) for name in _NAMES})

    def to_config(self, **options) -> GRPOConfig:
        """A GRPOConfig with these scalars (``options``: the fields the kernels do not take, e.g. loss_type)."""
        values = {name: getattr(self, name) for name in _SHARED}
        values["delta"] = self.delta if self.has_delta else None
        return GRPOConfig(**values, **options)

    def pack(self) -> list[float]:
        """The fields as floats in declaration order: a ``torch.library`` op takes ``list[float]``, not a
        dataclass. :meth:`unpack` is the inverse."""
        return [float(getattr(self, name)) for name in _NAMES]

    @classmethod
    def unpack(cls, values: list[float]) -> LossParams:
        if len(values) != len(_NAMES):
            raise ValueError(f"LossParams.unpack needs {len(_NAMES)} values {_NAMES}, got {len(values)}")
        return cls(**{name: _TYPES[name](v) for name, v in zip(_NAMES, values, strict=True)})

    def to_native(self, module):
        """The C++ struct of ``module`` (a pybind11 extension of grpo_kernels) with these fields."""
        values = asdict(self)
        if module.LossParams.FIELDS != tuple(values):
            raise RuntimeError(f"{module.__name__}.LossParams has the fields {module.LossParams.FIELDS}, the Python "
                               f"mirror {tuple(values)}: rebuild the extension (pip install -e .)")
        return native(module.LossParams, **values)


# constants (torch.compile traces from_config and pack, and cannot call dataclasses.fields on a class)
_NAMES = tuple(f.name for f in fields(LossParams))
_SHARED = tuple(name for name in _NAMES if name in {f.name for f in fields(GRPOConfig)})  # same name, same value
_TYPES = {name: float for name in _NAMES} | {"loss_code": int, "has_delta": bool, "use_bias_correction_kl": bool}


def native(cls, **values):
    """An instance of the bound C++ struct ``cls`` with the given fields set by name (the others are 0, i.e.
    null pointers); a name the struct does not have raises AttributeError."""
    obj = cls()
    for name, value in values.items():
        setattr(obj, name, value)
    return obj


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
        params: LossParams,
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
    supports: str  # one line for the backend table of docs/backends.md
