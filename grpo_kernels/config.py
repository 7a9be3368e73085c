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
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple


class LossType(NamedTuple):
    """How one ``loss_type`` computes its per-token loss and reduces it (docs/contract.md#reductions).

    policy : str
        The per-token policy term: "clip" (``-min(c1 A, clamp(c1, 1 - epsilon_low, 1 + epsilon_high) A)``),
        "cispo" (``-sg(min(c1, epsilon_high)) A logp``), "sapo" (a soft sigmoid gate) or "vespo"
        (``-phi A logp`` with a detached sequence weight phi).
    normaliser : str
        What the masked sum of the per-token losses is divided by:
        "sequence_tokens": each sequence's kept tokens, then the mean over the B sequences;
        "sequences": B (each sequence's sum, then the mean over sequences: long sequences weigh more);
        "batch_tokens": the batch's kept tokens;
        "max_length": B * max_completion_length (T when None);
        "num_items": ``num_items_in_batch``, the kept tokens of every micro-batch and rank of the optimizer
        step (the batch's kept tokens when None).
    micro_batch_weight : str
        The factor a training loop multiplies one micro-batch's loss by so that the gradients accumulated
        over micro-batches equal the whole batch's: "sequences" (its share of the batch's sequences),
        "tokens" (its share of the kept tokens), "one" (the normaliser already spans every micro-batch).
    needs_every_token : bool
        A token's gradient weight depends on the log-probs of the other tokens of its sequence, whatever the
        other options: no single-pass kernel (the fused backends run the forward over every token first).
    """

    policy: str
    normaliser: str
    micro_batch_weight: str
    needs_every_token: bool


# The one table of the loss types, TRL 1.16's (GRPOTrainer._compute_loss).
LOSS_TYPE_TABLE = {
    "grpo": LossType("clip", "sequence_tokens", "sequences", False),
    "bnpo": LossType("clip", "batch_tokens", "tokens", False),
    "dr_grpo": LossType("clip", "max_length", "sequences", False),
    "dapo": LossType("clip", "num_items", "one", False),
    "cispo": LossType("cispo", "num_items", "one", False),
    "sapo": LossType("sapo", "sequence_tokens", "sequences", False),
    "luspo": LossType("clip", "sequences", "sequences", False),
    "vespo": LossType("vespo", "num_items", "one", True),
}
LOSS_TYPES = tuple(LOSS_TYPE_TABLE)
CLIP_LOSS_TYPES = tuple(name for name, t in LOSS_TYPE_TABLE.items() if t.policy == "clip")
LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")

# Kernel-side code of the per-token policy loss (a compile-time flag of the kernels).
LOSS_CODE_CLIP, LOSS_CODE_CISPO, LOSS_CODE_SAPO = 0, 1, 2
_LOSS_CODES = {"clip": LOSS_CODE_CLIP, "cispo": LOSS_CODE_CISPO, "sapo": LOSS_CODE_SAPO}


# TRL 1.16 GRPOConfig options that change the loss and have no field here, with the value that leaves the
# loss unchanged: a TRL config that sets one otherwise is rejected rather than silently computed without it.
# (TRL's adaptive entropy coefficient changes entropy_coef between optimizer steps: training-loop state.)
_TRL_OPTIONS_WITHOUT_FIELD = {"use_adaptive_entropy": False}
DEFAULT_EPSILON_LOW = 0.2


@dataclass(frozen=True)
class GRPOConfig:
    """The options of the GRPO loss; every default is TRL 1.16's ``trl.GRPOConfig`` default.

    Parameters
    ----------
    beta : float, default 0.0
        Weight of the KL penalty ``beta * KL(policy || reference)`` (k3 estimator per token). 0 turns the
        term off; any other value needs ``ref_logps``.
    epsilon_low : float, default 0.2
        Lower clip offset: the ratio is clipped below at ``1 - epsilon_low``.
    epsilon_high : float or None, default None
        Upper clip offset (``1 + epsilon_high``); None means ``epsilon_low`` (symmetric clip). For
        ``loss_type="cispo"`` it is the raw upper bound of the ratio (MiniMax-M1 uses e.g. 5.0), not an
        offset from 1.
    delta : float or None, default None
        Two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at ``delta``. None: off.
    temperature : float, default 1.0
        Sampling temperature: the log-probs are those of ``softmax(logits / temperature)``.
    loss_type : str, default "dapo"
        One of "grpo" (per-sequence mean, then mean over sequences), "bnpo" (mean over the batch's kept
        tokens), "dr_grpo" (sum / (B * max_completion_length)), "dapo" (sum / num_items_in_batch, or the
        batch's kept tokens), "cispo" (clipped-ratio REINFORCE, normalised as dapo), "sapo" (soft gate,
        normalised as grpo), "luspo" (the clip loss summed over each sequence, then mean over sequences),
        "vespo" (``-phi * A * logp`` with VESPO's detached sequence weight phi, normalised as dapo).
    importance_sampling_level : str, default "token"
        "token": one ratio per token; "sequence" (GSPO): one ratio per sequence, the exponential of the
        masked mean log-ratio.
    use_bias_correction_kl : bool, default True
        Multiply the KL term by the importance ratio (TRL's default).
    sapo_temperature_pos, sapo_temperature_neg : float, default 1.0, 1.05
        SAPO's gate temperatures for positive / non-positive advantages.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg : float, default 2.0, 3.0, 3.0, 2.0
        VESPO's weight ``phi(w) = e^lam w^k e^(-lam w)`` (w the sequence's importance ratio): exponent ``k``
        and decay ``lam`` for non-negative / negative advantages (``lam`` is clamped to >= 1e-4).
    off_policy_mask_threshold : float or None, default None
        DeepSeek-V3.2's off-policy sequence mask: a sequence with A < 0 whose mean
        ``sampling_logps - logp`` over its kept tokens exceeds this is dropped from the policy loss. None: off.
    top_entropy_quantile : float, default 1.0
        Keep in the policy loss only the tokens whose entropy is >= the ``1 - top_entropy_quantile``
        quantile of the kept tokens' entropies (of every rank of ``process_group`` when one is given);
        1.0 keeps all, 0.0 the highest-entropy token. The normalisers are unchanged.
    entropy_coef : float, default 0.0
        Entropy bonus: ``loss -= entropy_coef * mean entropy`` over the kept (and top-entropy) tokens,
        differentiated through the entropy; independent of the loss type's normaliser.
    epsilon : float or None, default None
        TRL's name for ``epsilon_low``, accepted as an alias: ``GRPOConfig(epsilon=0.3)`` sets
        ``epsilon_low = 0.3`` and the field reads None afterwards. Giving both ``epsilon`` and an
        ``epsilon_low`` other than its default (and other than ``epsilon``) raises ``ValueError``.

    Notes
    -----
    ``GRPOConfig.from_trl(trl_config)`` reads these options from a ``trl.GRPOConfig``; every function
    that takes ``config=`` also accepts a ``trl.GRPOConfig`` directly.
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
    epsilon: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            _check_epsilon_alias(self.epsilon, self.epsilon_low,
                                 self.epsilon_low not in (DEFAULT_EPSILON_LOW, self.epsilon))
            object.__setattr__(self, "epsilon_low", self.epsilon)
            object.__setattr__(self, "epsilon", None)
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
    def resolved_epsilon_high(self) -> float:
        """The upper clip offset (or the cispo bound) with ``None`` resolved to ``epsilon_low``."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_every_token(self) -> bool:
        """True when a token's gradient weight depends on other tokens' log-probs or entropies (a sequence
        mean, VESPO's sequence weight, the off-policy mask, the entropy quantile) or on the entropy's own
        gradient (the entropy bonus): the fused backends then run the forward pass over every token first."""
        return (self.importance_sampling_level == "sequence" or self.loss_type_info.needs_every_token
                or self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0
                or self.entropy_coef != 0.0)

    @property
    def loss_type_info(self) -> LossType:
        """The row of :data:`LOSS_TYPE_TABLE` for ``loss_type``."""
        return LOSS_TYPE_TABLE[self.loss_type]

    @property
    def loss_code(self) -> int:
        policy = self.loss_type_info.policy
        if policy not in _LOSS_CODES:  # vespo: its weight is a sequence sum, never a single-pass kernel flag
            raise ValueError(
                f"loss_type={self.loss_type!r} has no single-pass kernel code (its weight needs every token)")
        return _LOSS_CODES[policy]

    def replace(self, **changes) -> GRPOConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: dict, *, partial: bool = False) -> GRPOConfig:
        """The config of the loss options in ``options``.

        ``partial=False`` (a keyword-wide wrapper's ``locals()``): every field must be present, so a wrapper
        cannot silently drop one. ``partial=True`` (a module's ``**options``): absent fields keep their
        defaults, and ``epsilon`` with ``epsilon_low`` both present is an error whatever their values.
        """
        if partial:
            if options.get("epsilon") is not None and "epsilon_low" in options:
                _check_epsilon_alias(options["epsilon"], options["epsilon_low"], True)
            return cls(**options)
        return cls(**{name: options[name] for name in _FIELD_NAMES})

    @classmethod
    def from_trl(cls, trl_config) -> GRPOConfig:
        """The loss options of a ``trl.GRPOConfig`` (TRL's ``epsilon`` is ``epsilon_low`` here).

        Every field is read from the TRL attribute of the same name. A TRL option that changes the loss and
        has no field here (use_adaptive_entropy, whose coefficient is training-loop state) raises
        ``ValueError`` instead of being dropped. ``max_completion_length`` is not a loss option here but an
        argument of the loss functions; given a TRL config they take it from there when it is not passed.
        """
        values = {}
        for name in _FIELD_NAMES:
            source = "epsilon" if name == "epsilon_low" else name
            if name != "epsilon" and hasattr(trl_config, source):
                values[name] = getattr(trl_config, source)
        for name, neutral in _TRL_OPTIONS_WITHOUT_FIELD.items():
            if name not in values and hasattr(trl_config, name) and getattr(trl_config, name) != neutral:
                raise ValueError(
                    f"trl.GRPOConfig option {name}={getattr(trl_config, name)!r} has no counterpart in grpo_kernels "
                    f"(only {neutral!r}); the loss would silently differ from TRL's"
                )
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise type(e)(f"trl.GRPOConfig: {e}") from None


def is_trl_config(config) -> bool:
    """True for a ``trl.GRPOConfig`` (or a subclass); trl itself is not imported for the check."""
    return any(c.__name__ == "GRPOConfig" and c.__module__.split(".")[0] == "trl" for c in type(config).__mro__)


def _check_epsilon_alias(epsilon, epsilon_low, low_given: bool) -> None:
    """``epsilon`` (TRL's name) is ``epsilon_low``: both given is ambiguous. ``low_given`` is what the caller
    can tell: key presence for a dict of options, a value other than the default (or ``epsilon``) otherwise."""
    if low_given:
        raise ValueError(
            f"epsilon is TRL's name for epsilon_low: pass one of them, not both (got epsilon={epsilon!r}, "
            f"epsilon_low={epsilon_low!r})"
        )


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
