"""Public functions: validate, pick a backend, run it."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _validate, eager, logp_loss
from ._docs import fill
from ._ops import grpo_loss_fused, token_logprobs_fused
from .backends import check_backend_name, resolve_backend
from .config import ADVANTAGE_SCALES, GRPOConfig, takes_config_options


class GRPOLossOutput(NamedTuple):
    """What the loss functions return.

    Attributes
    ----------
    loss : Tensor
        0-d (fp32; float64 for float64 inputs), differentiable w.r.t. the logits (or hidden states and
        head). Already reduced as ``loss_type`` says; call ``loss.backward()``.
    logps : Tensor
        [B, T] fp32 per-token log-probs of ``completion_ids``, detached, 0 at dropped positions; reusable
        as ``old_logps`` of later iterations on the same batch.
    metrics : dict
        TRL's metric names -> detached 0-d fp32 tensors (no host sync): "entropy", "kl" (beta != 0),
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max" (clip loss types), "cispo_clip_ratio" (cispo) or "vespo/phi_seq_mean" (vespo),
        "policy_loss" (entropy bonus); "top_entropy/entropy" and "top_entropy/fraction" with the top-entropy
        mask (not logged by TRL: the entropy over the tokens the mask keeps, and their share).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    metrics: dict


def _kernel_dtype_check(backend: str, logits: torch.Tensor) -> None:
    if backend != "torch" and logits.dtype == torch.float64:
        raise TypeError(f"logits of dtype float64 run only on backend='torch' (the reference), not {backend!r}")


@fill
def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = GRPOConfig.temperature,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log-probs ``log_softmax(logits / temperature)[ids]`` without materialising the log-softmax.

    Parameters
    ----------
    logits : Tensor [..., V]
        float32, bfloat16 or float16 (float64 on backend "torch"); any strides but stride 1 along V.
    ids : Tensor [...], integer
        Token ids, the shape of ``logits.shape[:-1]``, each in [0, V) (checked on CPU tensors).
    temperature : float, default 1.0
        Softmax temperature (> 0).
    return_entropy : bool, default False
        Also return the entropy of ``softmax(logits / temperature)`` per position.
    {{backend}}

    Returns
    -------
    Tensor or (Tensor, Tensor)
        logps ``[...]`` fp32 (float64 for float64 logits), and the entropy ``[...]`` if
        ``return_entropy``; both differentiable w.r.t. ``logits``.
    """
    _validate.check_logits(logits)
    _validate.check_tensor("ids", ids, integer=True)
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(ids.shape)}")
    _validate.check_same_device(logits, ids=ids)
    tau = _validate.check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    _validate.check_ids_in_range(ids, logits.shape[-1], None, "ids")
    name = resolve_backend(backend, logits.device)
    _kernel_dtype_check(name, logits)
    if name == "torch":
        return eager.token_logprobs(logits, ids, tau, return_entropy)
    return token_logprobs_fused(name, logits, ids, tau, return_entropy)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages: each reward minus its group's mean, scaled (TRL's ``scale_rewards``).

    Parameters
    ----------
    rewards : Tensor [B], floating point
        One reward per completion; groups are ``group_size`` contiguous entries (P prompts x G).
    group_size : int
        G >= 2, dividing B.
    scale : str, default "group"
        "group": divide by each group's unbiased std plus ``eps``; "batch": by the whole batch's std plus
        ``eps``; "none": only centre.
    eps : float, default 1e-4
        Added to the std (TRL's value), so a group of equal rewards gets advantages 0.

    Returns
    -------
    Tensor [B]
        fp32 advantages (float64 for float64 rewards).
    """
    _validate.check_tensor("rewards", rewards, ndim=1, floating=True)
    _validate.check_group_size(group_size, rewards.shape[0])
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return logp_loss.group_advantages(rewards, group_size, scale, eps)


def grpo_loss_with_config(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    config: GRPOConfig,
    *,
    completion_mask: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    process_group=None,
    inplace: bool = False,
    backend: str = "auto",
) -> GRPOLossOutput:
    """:func:`grpo_loss` with the loss options given as one config object.

    Parameters
    ----------
    logits, completion_ids
        As in :func:`grpo_loss`.
    config : GRPOConfig or trl.GRPOConfig
        The loss options. A ``trl.GRPOConfig`` is read with :meth:`GRPOConfig.from_trl` (TRL's
        ``epsilon`` is ``epsilon_low``), and its ``max_completion_length`` (TRL default 512) is used when
        the call passes none.
    completion_mask, advantages, rewards, group_size, old_logps, ref_logps, max_completion_length,
    num_items_in_batch, importance_sampling_ratio, sampling_logps, process_group, inplace, backend
        As in :func:`grpo_loss`.

    Returns
    -------
    GRPOLossOutput
        ``(loss, logps, metrics)`` as in :func:`grpo_loss`.
    """
    config, max_completion_length = _validate.loss_config(config, max_completion_length)
    x = _validate.validate_loss_inputs(
        logits, completion_ids, config, completion_mask=completion_mask, advantages=advantages,
        rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group,
    )
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace:
        _validate.check_inplace_target(
            "logits", logits, completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages,
            rewards=rewards, old_logps=old_logps, ref_logps=ref_logps, num_items_in_batch=num_items_in_batch,
            importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        )
    name = resolve_backend(backend, logits.device)
    _kernel_dtype_check(name, logits)
    if name == "torch":
        if inplace:
            raise ValueError("inplace=True needs a fused backend ('cuda', 'triton' or 'cpu'); backend='torch' cannot write the gradient into the logits")
        loss, logps, metrics = eager.grpo_loss(
            x.logits, x.ids, config, x.advantages, x.weights, x.old_logps, x.ref_logps,
            x.max_completion_length, x.num_items_in_batch, importance_sampling_ratio=x.importance_sampling_ratio,
            sampling_logps=x.sampling_logps, process_group=x.process_group,
        )
    else:
        loss, logps, metrics = grpo_loss_fused(name, x, config, inplace)
    logps = torch.where(x.mask, logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).float()
    return GRPOLossOutput(loss, logps, metrics)


@takes_config_options
@fill
def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    completion_mask: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    process_group=None,
    inplace: bool = False,
    backend: str = "auto",
    **options,
) -> GRPOLossOutput:
    """The GRPO loss of TRL's ``GRPOTrainer`` from logits, without an N x V log-softmax.

    One pass over the logits computes each completion token's log-prob and entropy and, when a gradient is
    needed with token-level ratios, the gradient w.r.t. the logits; the per-token loss, its reduction and
    the metrics follow TRL 1.16's formulas (every default is ``trl.GRPOConfig``'s). With ``r`` the
    importance ratio ``exp(logp - old_logps)`` and ``A`` the advantage, the per-token loss of the clip
    family is ``-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)`` plus ``beta * KL``.

    Parameters
    ----------
    logits : Tensor [B, T, V]
        The logits that predict ``completion_ids``: for a causal LM run on prompt + completion (P prompt
        tokens), ``model(...).logits[:, P-1:-1]`` (or ``logits[:, :-1]`` of ``logits_to_keep=T+1``).
        float32, bfloat16 or float16 (float64 on backend "torch"); any strides but stride 1 along V.
    completion_ids : Tensor [B, T], integer
        The sampled completion tokens, each in [0, V) where the mask keeps it.
    {{loss_inputs}}
    {{loss_options}}
    {{reduction}}
    inplace : bool, default False
        Write the gradient w.r.t. the logits into the logits' own storage instead of a new N x V buffer
        (fused backends only). The caller's ``logits`` tensor is overwritten: with token-level ratios
        during this call, with sequence-level ones during ``backward``. Anything that reads those logits
        afterwards (another loss term, a metric, a second call) sees the gradient, silently. What can be
        detected is: an autograd node that saved these logits before the call raises at ``backward``
        ("modified by an inplace operation"), so does a write to them between the call and ``backward``,
        and a leaf tensor that requires grad is rejected (``ValueError``). Use it only when the loss is
        the logits' last reader.
    {{backend}}

    Returns
    -------
    {{returns}}

    Examples
    --------
    >>> out = grpo_loss(logits, completion_ids, completion_mask=mask, advantages=A, loss_type="grpo")
    >>> out.loss.backward()
    """
    config = _validate.resolve_config(None, options, "grpo_loss")
    return grpo_loss_with_config(
        logits, completion_ids, config, completion_mask=completion_mask, advantages=advantages, rewards=rewards,
        group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group, inplace=inplace, backend=backend,
    )


def sampler_importance_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: Optional[torch.Tensor] = None,
    mode: str = "sequence_mask",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> torch.Tensor:
    """The sampler importance-sampling ratio as TRL 1.16 computes it (``vllm_importance_sampling_mode``,
    ``vllm_importance_sampling_clip_min`` / ``_clip_max``; defaults are TRL's), for ``importance_sampling_ratio=``.

    Parameters
    ----------
    old_logps : Tensor [B, T]
        The trainer's log-probs of the sampled tokens before the update.
    sampling_logps : Tensor [B, T]
        The sampler's (vLLM's) log-probs; NaN where it returned none (ratio 1 there).
    completion_mask : Tensor [B, T] or None, default None
        Which tokens count (bool or weights): ``d = nan_to_num((old_logps - sampling_logps) * mask)``.
    mode : str, default "sequence_mask"
        "token_truncate" / "token_mask" -> ``exp(d)`` [B, T]; "sequence_truncate" / "sequence_mask" ->
        ``exp(sum_t d)`` [B, 1].
    clip_min, clip_max : float or None, default None, 3.0
        ``*_truncate`` clamps the ratio to ``[clip_min, clip_max]``, ``*_mask`` sets ratios outside it to 0;
        None leaves that side open.

    Returns
    -------
    Tensor [B, T] or [B, 1]
        The ratio, detached, in the dtype of old_logps: pass it as ``importance_sampling_ratio``.
    """
    _validate.check_tensor("old_logps", old_logps, ndim=2, floating=True)
    _validate.check_tensor("sampling_logps", sampling_logps, ndim=2, floating=True)
    if sampling_logps.shape != old_logps.shape:
        raise ValueError(f"sampling_logps must have the shape of old_logps {tuple(old_logps.shape)}, "
                         f"got {tuple(sampling_logps.shape)}")
    if completion_mask is None:
        completion_mask = torch.ones(old_logps.shape, dtype=torch.bool, device=old_logps.device)
    _validate.check_tensor("completion_mask", completion_mask, ndim=2)
    if completion_mask.shape != old_logps.shape:
        raise ValueError(f"completion_mask must have the shape of old_logps {tuple(old_logps.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    _validate.check_same_device(old_logps, sampling_logps=sampling_logps, completion_mask=completion_mask)
    if mode not in logp_loss.IS_MODES:
        raise ValueError(f"mode must be one of {logp_loss.IS_MODES}, got {mode!r}")
    for name, v in (("clip_min", clip_min), ("clip_max", clip_max)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
            raise ValueError(f"{name} must be None or a number, got {v!r}")
    return logp_loss.sampler_importance_ratio(old_logps, sampling_logps, completion_mask, mode, clip_min, clip_max)


class GRPOLoss(nn.Module):
    """:func:`grpo_loss` configured once, as a module: ``GRPOLoss(loss_type="grpo", beta=0.04)``.

    Parameters
    ----------
    config : GRPOConfig, trl.GRPOConfig or None, default None
        The loss options as one object (a ``trl.GRPOConfig`` is read with :meth:`GRPOConfig.from_trl`,
        its ``max_completion_length`` included). Give either ``config`` or keyword options.
    backend : str, default "auto"
        As in :func:`grpo_loss`; may be overridden per call.
    inplace : bool, default False
        As in :func:`grpo_loss` (overwrites the logits); may be overridden per call.
    **options
        The loss options of :func:`grpo_loss`: the fields of :class:`GRPOConfig`, defaults as there.

    Notes
    -----
    ``forward(logits, completion_ids, **inputs)`` takes the inputs of :func:`grpo_loss`
    (completion_mask, advantages or rewards with group_size, old_logps, ref_logps, max_completion_length,
    num_items_in_batch, importance_sampling_ratio, sampling_logps, process_group, inplace, backend) and
    returns its :class:`GRPOLossOutput`.
    """

    def __init__(self, config: Optional[GRPOConfig] = None, *, backend: str = "auto", inplace: bool = False, **options):
        super().__init__()
        self.config = _validate.resolve_config(config, options, "GRPOLoss")
        # a trl.GRPOConfig also supplies max_completion_length (dr_grpo), as TRL's trainer reads it
        self.max_completion_length = None if config is None else _validate.loss_config(config, None)[1]
        check_backend_name(backend)
        self.backend, self.inplace = backend, inplace

    def forward(self, logits, completion_ids, **inputs) -> GRPOLossOutput:
        inputs.setdefault("inplace", self.inplace)
        inputs.setdefault("backend", self.backend)
        if inputs.get("max_completion_length") is None:
            inputs["max_completion_length"] = self.max_completion_length
        return grpo_loss_with_config(logits, completion_ids, self.config, **inputs)

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}"
