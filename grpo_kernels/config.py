"""Loss options, stated once with TRL 1.16's GRPOConfig defaults.

Every layer (reference, kernels, public API, training loop) receives a :class:`GRPOConfig` instead of a
wide list of keyword arguments, so there is exactly one place where a default lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # -min(c1*A, clamp(c1)*A)
LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")

# Kernel-side code of the per-token policy loss (a compile-time flag of the kernels).
LOSS_CODE_CLIP, LOSS_CODE_CISPO, LOSS_CODE_SAPO = 0, 1, 2


@dataclass(frozen=True)
class GRPOConfig:
    """The options of the GRPO loss; defaults are TRL 1.16's ``GRPOConfig``.

    ``epsilon_high=None`` means ``epsilon_low`` (symmetric clip). For ``loss_type="cispo"`` ``epsilon_high``
    is the raw upper bound of the ratio (MiniMax-M1 uses e.g. 5.0), not an offset from 1.

    The rest of TRL's loss: ``vespo_*`` are VESPO's gamma-weight exponents ``k`` and decays ``lambda`` for
    non-negative / negative advantages; ``off_policy_mask_threshold`` drops a negative-advantage sequence whose
    mean ``sampling_logps - logp`` exceeds it (None: off); ``top_entropy_quantile`` keeps in the policy loss
    only the tokens whose entropy is in that top fraction (1.0: all); ``entropy_coef`` subtracts
    ``entropy_coef`` times the masked mean entropy from the loss, differentiated through the entropy.
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
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0

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
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            _check_number(name, getattr(self, name))
        if self.off_policy_mask_threshold is not None:
            _check_number("off_policy_mask_threshold", self.off_policy_mask_threshold)
        _check_number("top_entropy_quantile", self.top_entropy_quantile, nonnegative=True)
        if self.top_entropy_quantile > 1:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {type(self.use_bias_correction_kl).__name__}")

    @property
    def eps_high(self) -> float:
        """The upper clip offset (or the cispo bound) with ``None`` resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def loss_code(self) -> int:
        if self.loss_type == "vespo":  # its weight is a sequence sum: never a single-pass kernel flag
            raise ValueError("loss_type='vespo' has no single-pass kernel code (its weight needs every token)")
        if self.loss_type == "cispo":
            return LOSS_CODE_CISPO
        if self.loss_type == "sapo":
            return LOSS_CODE_SAPO
        return LOSS_CODE_CLIP

    @property
    def needs_every_token(self) -> bool:
        """True when a token's gradient weight depends on other tokens' log-probs or entropies (a sequence
        mean, VESPO's sequence weight, the off-policy mask, the entropy quantile) or on the entropy's own
        gradient (the entropy bonus): the fused backends then run the forward pass over every token first."""
        return (self.importance_sampling_level == "sequence" or self.loss_type == "vespo"
                or self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0
                or self.entropy_coef != 0.0)

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


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
