"""Loss options, stated once with TRL 1.16's GRPOConfig defaults.

Every layer (reference, kernels, public API, training loop) receives a :class:`GRPOConfig` instead of a
wide list of keyword arguments, so there is exactly one place where a default lives. The keyword-wide public
functions take the options as ``**options`` and publish them through :func:`takes_config_options` (their
signature lists every field with the default written here); ``_validate.resolve_config`` turns the options
(or a given config) into the one checked :class:`GRPOConfig` at every entry point.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # -min(c1*A, clamp(c1)*A)
LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")

# Kernel-side code of the per-token policy loss (a compile-time flag of the kernels).
LOSS_CODE_CLIP, LOSS_CODE_CISPO, LOSS_CODE_SAPO = 0, 1, 2


@dataclass(frozen=True)
class GRPOConfig:
    """The options of the GRPO loss; defaults are TRL 1.16's ``GRPOConfig``.

    ``epsilon_high=None`` means ``epsilon_low`` (symmetric clip). For ``loss_type="cispo"`` ``epsilon_high``
    is the raw upper bound of the ratio (MiniMax-M1 uses e.g. 5.0), not an offset from 1.
    """

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    temperature: float = 1.0
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {LEVELS}, got {self.importance_sampling_level!r}"
            )
        _check_number("temperature", self.temperature, positive=True)
        _check_number("beta", self.beta)
        _check_number("epsilon_low", self.epsilon_low, nonnegative=True)
        if self.epsilon_high is not None:
            _check_number("epsilon_high", self.epsilon_high, nonnegative=True)
        if self.delta is not None:
            _check_number("delta", self.delta, positive=True)
        _check_number("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _check_number("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {type(self.use_bias_correction_kl).__name__}")

    @property
    def eps_high(self) -> float:
        """The upper clip offset (or the cispo bound) with ``None`` resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def loss_code(self) -> int:
        if self.loss_type == "cispo":
            return LOSS_CODE_CISPO
        if self.loss_type == "sapo":
            return LOSS_CODE_SAPO
        return LOSS_CODE_CLIP

    def replace(self, **changes) -> GRPOConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: dict) -> GRPOConfig:
        """The config of the loss options in ``options`` (e.g. a keyword-wide wrapper's ``locals()``); every
        field must be present, so a wrapper cannot silently drop one."""
        return cls(**{name: options[name] for name in _FIELD_NAMES})


_FIELD_NAMES = GRPOConfig.field_names()  # a constant: torch.compile traces through from_options


def takes_config_options(fn):
    """Publishes ``fn(..., **options)`` as taking every GRPOConfig field as a keyword-only argument: the
    signature seen by ``inspect.signature`` / ``help()`` lists them with GRPOConfig's defaults, so a default
    is never written twice. ``fn`` itself passes ``options`` to ``_validate.resolve_config``."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(params) == len(sig.parameters):
        raise TypeError(f"{fn.__qualname__} must take **options")
    taken = {p.name for p in params} & set(_FIELD_NAMES)
    if taken:
        raise TypeError(f"{fn.__qualname__} spells the GRPOConfig fields {sorted(taken)} itself")
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(GRPOConfig)]
    fn.__signature__ = sig.replace(parameters=params + options)
    return fn


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
