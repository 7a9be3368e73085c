"""Public functions: validate, pick a backend, run it (SPEC section 2)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _validate, reference
from ._ops import grpo_loss_fused, token_logprobs_fused
from .backends import check_backend_name, resolve_backend
from .config import ADVANTAGE_SCALES, GRPOConfig, takes_config_options


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-d, differentiable w.r.t. the logits
    logps: torch.Tensor  # [B, T] fp32, detached, 0 at masked positions; reusable as old_logps
    metrics: dict  # TRL's names -> detached 0-d fp32 tensors


def _kernel_dtype_check(backend: str, logits: torch.Tensor) -> None:
    if backend != "torch" and logits.dtype == torch.float64:
        raise TypeError(f"logits of dtype float64 run only on backend='torch' (the reference), not {backend!r}")


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = GRPOConfig.temperature,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log-probs ``log softmax(logits / temperature)[ids]`` without a full log-softmax.

    logits ``[..., V]`` (any strides but the last), ids ``[...]`` integer. Returns logps ``[...]`` fp32
    (and the entropy of ``softmax(logits / temperature)`` if ``return_entropy``); both differentiable.
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
        return reference.token_logprobs(logits, ids, tau, return_entropy)
    return token_logprobs_fused(name, logits, ids, tau, return_entropy)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages ``A [B]`` (fp32; float64 for float64 rewards) from rewards ``[B]``.

    Groups are ``group_size`` contiguous entries. ``scale``: "group" divides by each group's unbiased std
    plus ``eps``, "batch" by the whole batch's, "none" only centres.
    """
    _validate.check_tensor("rewards", rewards, ndim=1, floating=True)
    _validate.check_group_size(group_size, rewards.shape[0])
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return reference.group_advantages(rewards, group_size, scale, eps)


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
    inplace: bool = False,
    backend: str = "auto",
) -> GRPOLossOutput:
    """:func:`grpo_loss` with the loss options given as one :class:`GRPOConfig`."""
    x = _validate.validate_loss_inputs(
        logits, completion_ids, config, completion_mask=completion_mask, advantages=advantages,
        rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
    )
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    name = resolve_backend(backend, logits.device)
    _kernel_dtype_check(name, logits)
    if name == "torch":
        if inplace:
            raise ValueError("inplace=True needs a fused backend ('cuda', 'triton' or 'cpu'); backend='torch' cannot write the gradient into the logits")
        loss, logps, metrics = reference.grpo_loss(
            x.logits, x.ids, config, x.advantages, x.mask, x.old_logps, x.ref_logps,
            x.max_completion_length, x.num_items_in_batch,
        )
    else:
        loss, logps, metrics = grpo_loss_fused(name, x, config, inplace)
    logps = torch.where(x.mask, logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).float()
    return GRPOLossOutput(loss, logps, metrics)


@takes_config_options
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
    inplace: bool = False,
    backend: str = "auto",
    **options,
) -> GRPOLossOutput:
    """The GRPO loss over logits ``[B, T, V]`` (any strides but the last) in one pass, no N x V softmax.

    Give ``advantages`` ([B] or [B, T]) or ``rewards`` [B] with ``group_size``. ``options``: the fields of
    :class:`GRPOConfig` (the signature lists them with their defaults, TRL 1.16's). Returns
    ``GRPOLossOutput(loss, logps, metrics)``.
    """
    config = _validate.resolve_config(None, options, "grpo_loss")
    return grpo_loss_with_config(
        logits, completion_ids, config, completion_mask=completion_mask, advantages=advantages, rewards=rewards,
        group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        inplace=inplace, backend=backend,
    )


class GRPOLoss(nn.Module):
    """``grpo_loss`` configured once: ``GRPOLoss(loss_type="grpo", beta=0.04)(logits, ids, advantages=A)``."""

    def __init__(self, config: Optional[GRPOConfig] = None, *, backend: str = "auto", inplace: bool = False, **options):
        super().__init__()
        self.config = _validate.resolve_config(config, options, "GRPOLoss")
        check_backend_name(backend)
        self.backend, self.inplace = backend, inplace

    def forward(self, logits, completion_ids, **inputs) -> GRPOLossOutput:
        inputs.setdefault("inplace", self.inplace)
        inputs.setdefault("backend", self.backend)
        return grpo_loss_with_config(logits, completion_ids, self.config, **inputs)

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}"
