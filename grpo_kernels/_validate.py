"""Input validation (docs/contract.md#bad-input), in one place, used by every backend before any kernel launches.

Errors are ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, value, device or
layout) and always name the argument and what was expected.

Out-of-range ids at unmasked positions: on CPU tensors a ``ValueError`` here (the check is free there).
On a GPU the check would need a host sync, so it only runs with ``GRPO_KERNELS_DEBUG=1``; otherwise the
fused kernels write ``logp = NaN`` for such a row, so the loss is NaN, never a silently wrong number.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .config import _FIELD_NAMES, ADVANTAGE_SCALES, GRPOConfig, is_trl_config

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def debug_checks_enabled() -> bool:
    return os.environ.get("GRPO_KERNELS_DEBUG", "0") not in ("", "0")


def check_tensor(name: str, t, *, ndim=None, floating=False, integer=False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    check_tensor(name, logits)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 for the reference), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(
            f"{name} must have stride 1 in its last dimension, got strides {logits.stride()}; "
            f"pass {name}.contiguous() (other strides of a view are accepted without a copy)"
        )
    return logits


def check_config(config) -> GRPOConfig:
    """A ``grpo_kernels.GRPOConfig``, or the loss options read from a ``trl.GRPOConfig``."""
    if isinstance(config, GRPOConfig):
        return config
    if is_trl_config(config):
        return GRPOConfig.from_trl(config)
    kind = type(config)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"config must be a grpo_kernels.GRPOConfig or a trl.GRPOConfig, got {name}")


def loss_config(config, max_completion_length):
    """-> (GRPOConfig, max_completion_length): a TRL config also supplies max_completion_length (used by
    dr_grpo) when the call does not pass one, as TRL's trainer reads it from the same config."""
    cfg = check_config(config)
    if max_completion_length is None and is_trl_config(config):
        max_completion_length = config.max_completion_length
    return cfg, max_completion_length


def resolve_config(config, options: dict, where: str) -> GRPOConfig:
    """The loss options of an entry point: ``config`` (checked by :func:`check_config`) or the keyword
    ``options`` (every key a GRPOConfig field, the values validated by GRPOConfig itself); both at once is an
    error. Every public entry point builds its config here."""
    if config is not None:
        if options:
            raise ValueError(f"pass either config= or keyword options, not both (got {sorted(options)})")
        return check_config(config)
    unknown = [name for name in options if name not in _FIELD_NAMES]
    if unknown:
        raise TypeError(f"unknown {where} options {sorted(unknown)}; valid: {_FIELD_NAMES}")
    return GRPOConfig.from_options(options, partial=True)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_same_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {ref.device}; put every tensor on one device")


def check_ids_in_range(ids: torch.Tensor, vocab: int, mask: Optional[torch.Tensor], name: str) -> None:
    """Raise ValueError for an id outside [0, V) at an unmasked position (CPU, or any device in debug mode)."""
    if ids.device.type != "cpu" and not debug_checks_enabled():
        return
    bad = (ids < 0) | (ids >= vocab)
    if mask is not None:
        bad &= mask
    if torch.compiler.is_compiling():  # no host sync in a graph: the same check as an op of the graph
        torch._assert_async(~bad.any(), f"{name} holds an id outside the vocabulary [0, {vocab}) of logits")
        return
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        where = " (at a position the completion_mask keeps)" if mask is not None else ""

        raise ValueError(
            f"{name} holds {int(ids[idx])} at index {idx}, outside the vocabulary [0, {vocab}) of logits{where}"
        )


@dataclass
class LossInputs:
    """Validated inputs of grpo_loss: everything a backend needs, nothing of size N x V but the logits."""

    logits: torch.Tensor  # [B, T, V]
    ids: torch.Tensor  # [B, T] integer
    mask: torch.Tensor  # [B, T] bool: the positions that count (weight != 0)
    advantages: torch.Tensor  # [B] or [B, T], compute dtype
    old_logps: Optional[torch.Tensor]
    ref_logps: Optional[torch.Tensor]
    max_completion_length: Optional[int]
    num_items_in_batch: object
    # [B, T] the completion_mask as token weights, for every sum and normaliser of the loss and metrics:
    # ``mask`` itself (bool) for a boolean or absent mask, else the mask in the compute dtype.
    weights: Optional[torch.Tensor] = None
    importance_sampling_ratio: Optional[torch.Tensor] = None  # [B, T] or [B, 1], compute dtype
    sampling_logps: Optional[torch.Tensor] = None  # [B, T], compute dtype
    process_group: object = None

    def loss_kwargs(self) -> dict:
        """The keyword inputs of ``logp_loss.loss_from_logps`` beyond the log-probs, entropy and config."""
        return dict(advantages=self.advantages, mask=self.weights, old_logps=self.old_logps, ref_logps=self.ref_logps,
                    max_completion_length=self.max_completion_length, num_items_in_batch=self.num_items_in_batch,
                    importance_sampling_ratio=self.importance_sampling_ratio, sampling_logps=self.sampling_logps,
                    process_group=self.process_group)


def slice_hint(name: str, positions: int, T: int) -> str:
    """The fix for ``name`` (logits / hidden) of ``positions`` > T positions next to T completion ids."""
    if positions == T + 1:
        return (f"; {name} has one position more than completion_ids: position t of a causal LM predicts token "
                f"t + 1, so pass {name}[:, :-1] (or {name}[:, P-1:-1] of the whole prompt + completion, P = the "
                "prompt length)")
    if positions > T + 1:
        return (f"; if {name} covers the prompt too, pass {name}[:, P-1:-1] (P = the prompt length, here "
                f"{name}[:, {positions - T - 1}:-1] if every row is prompt + completion)")
    return ""


def check_mask_values(mask: torch.Tensor) -> None:
    """A non-boolean completion_mask is a weight per token: finite and >= 0 (CPU, or any device in debug mode;
    on a GPU the check would cost a host sync)."""
    if mask.dtype == torch.bool or (mask.device.type != "cpu" and not debug_checks_enabled()):
        return
    bad = (mask < 0) | ~torch.isfinite(mask) if mask.is_floating_point() else mask < 0
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "completion_mask holds a negative or non-finite weight")
        return
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"completion_mask holds {mask[idx].item()} at index {idx}: its values are token weights, finite and "
            ">= 0 (0 drops a token; fractions and values above 1 weight it as TRL's formulas do)"
        )


def validate_loss_inputs(
    logits,
    completion_ids,
    cfg: GRPOConfig,
    *,
    completion_mask=None,
    advantages=None,
    rewards=None,
    group_size=None,
    old_logps=None,
    ref_logps=None,
    max_completion_length=None,
    num_items_in_batch=None,
    importance_sampling_ratio=None,
    sampling_logps=None,
    process_group=None,
    scale="group",
) -> LossInputs:
    from .logp_loss import compute_dtype, group_advantages

    check_config(cfg)
    check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    B, T, V = logits.shape
    check_tensor("completion_ids", completion_ids, ndim=2, integer=True)
    if tuple(completion_ids.shape) != (B, T):
        hint = slice_hint("logits", T, completion_ids.shape[1]) if completion_ids.shape[0] == B else ""
        raise ValueError(
            f"completion_ids must have shape [B, T] = {(B, T)} to match logits, got {tuple(completion_ids.shape)}{hint}"
        )

    cdt = compute_dtype(logits)
    if completion_mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        weights = mask
    else:
        check_tensor("completion_mask", completion_mask, ndim=2)
        if completion_mask.is_complex():
            raise TypeError(f"completion_mask must be bool, integer or real floating point, got {completion_mask.dtype}")
        if tuple(completion_mask.shape) != (B, T):
            raise ValueError(f"completion_mask must have shape [B, T] = {(B, T)}, got {tuple(completion_mask.shape)}")
        check_same_device(logits, completion_mask=completion_mask)
        check_mask_values(completion_mask)
        if completion_mask.dtype == torch.bool:
            mask = weights = completion_mask
        else:
            # Weights, as in TRL's (l * m).sum() / m.sum(): a 0 drops the token (any id and logits there).
            mask, weights = completion_mask != 0, completion_mask.to(cdt)

    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages= (shape [B] or [B, T]) or rewards= (shape [B], with group_size=)")
    if rewards is not None:
        check_tensor("rewards", rewards, ndim=1, floating=True)
        if rewards.shape[0] != B:
            raise ValueError(f"rewards must have shape [B] = [{B}], got {tuple(rewards.shape)}")
        check_same_device(logits, rewards=rewards)
        check_group_size(group_size, B)
        if scale not in ADVANTAGE_SCALES:
            raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
        advantages = group_advantages(rewards, group_size, scale)
    else:
        check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
        if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
            raise ValueError(
                f"advantages must have shape [B] = [{B}], [B, 1] = [{B}, 1] or [B, T] = {[B, T]}, got {tuple(advantages.shape)}"
            )
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]  # TRL's [B, 1]: one advantage per sequence
    advantages = advantages.to(cdt)

    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if t is not None:
            check_tensor(name, t, ndim=2, floating=True)
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape [B, T] = {(B, T)}, got {tuple(t.shape)}")
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={cfg.beta}): pass the reference model's log-probs")
    if importance_sampling_ratio is not None:
        check_tensor("importance_sampling_ratio", importance_sampling_ratio, ndim=2, floating=True)
        if tuple(importance_sampling_ratio.shape) not in ((B, T), (B, 1)):
            raise ValueError(f"importance_sampling_ratio must have shape [B, T] = {[B, T]} or [B, 1] = {[B, 1]}, "
                             f"got {tuple(importance_sampling_ratio.shape)}")
    check_same_device(
        logits, completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages,
        old_logps=old_logps, ref_logps=ref_logps, importance_sampling_ratio=importance_sampling_ratio,
        sampling_logps=sampling_logps,
    )
    if importance_sampling_ratio is not None:
        check_nonnegative_ratio(importance_sampling_ratio, mask)
    check_process_group(process_group)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            where = "the cpu" if logits.device.type == "cpu" else f"{logits.device} or the cpu"
            if num_items_in_batch.device.type == "meta" and logits.device.type != "meta":
                raise ValueError("num_items_in_batch is a tensor on the meta device (it holds no value); pass a "
                                 f"number or a 1-element tensor on {where}")
            if num_items_in_batch.device not in (logits.device, torch.device("cpu")):
                raise ValueError(f"num_items_in_batch is on {num_items_in_batch.device} but logits is on "
                                 f"{logits.device}; pass a number or a 1-element tensor on {where}")
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a 1-element tensor, got shape {tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) or not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}")
    check_ids_in_range(completion_ids, V, None if completion_mask is None else mask, "completion_ids")
    to_cdt = lambda t: None if t is None else t.to(cdt)  # noqa: E731
    return LossInputs(
        logits, completion_ids, mask, advantages, to_cdt(old_logps), to_cdt(ref_logps),
        max_completion_length, num_items_in_batch, weights, to_cdt(importance_sampling_ratio),
        to_cdt(sampling_logps), process_group,
    )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that the elements of ``t`` (non-empty, strides >= 0) occupy."""
    last = sum((d - 1) * s for d, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory ranges of ``a`` and ``b`` intersect (torch's rule for an in-place write next to
    another operand: partial or full overlap of the ranges)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if torch.compiler.is_compiling():  # traced tensors have no addresses
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _distinct_by_strides(t: torch.Tensor) -> bool:
    """A sufficient test: sorted by stride, each dim (of size > 1) steps past every offset the smaller dims
    reach, so no two elements share an offset."""
    reach = 0
    for stride, size in sorted((s, d) for d, s in zip(t.shape, t.stride(), strict=True) if d > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` are one memory location (an ``expand``ed dim, an overlapping
    ``as_strided`` view). torch's own check answers for dense tensors and stride-0 dims; other views are
    decided here from the strides: sorted by stride, a dim whose stride passes every offset the smaller dims
    reach cannot collide; failing that, the rows (the last dim, stride 1) are intervals of the storage,
    distinct iff their sorted start offsets are at least a row apart (computed on the CPU from the strides,
    O(rows), no device data read)."""
    if torch.compiler.is_compiling():
        # traced: the stride test alone (a layout it cannot prove distinct counts as overlapping)
        return t.numel() > 0 and not _distinct_by_strides(t)
    status = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard for torch to tell
    if status != 2 or t.numel() == 0:
        return status == 1
    if _distinct_by_strides(t):
        return False
    shape, strides = list(t.shape), list(t.stride())
    width = 1
    if shape and (strides[-1] == 1 or shape[-1] == 1):
        width = shape.pop()
        strides.pop()
    starts = torch.zeros((), dtype=torch.long)
    for d, s in zip(shape, strides, strict=True):
        starts = starts.unsqueeze(-1) + torch.arange(d, dtype=torch.long) * s
    starts = starts.reshape(-1).sort().values
    return bool((starts.diff() < width).any())


def check_inplace_target(name: str, target: torch.Tensor, **others) -> None:
    """``inplace=True`` writes into ``target``: it must not alias itself (the write would land on elements that
    are still to be read, and torch's in-place ops refuse it too) nor any other input the kernels read."""
    if has_internal_overlap(target):
        raise ValueError(
            f"inplace=True writes the gradient into {name}, but {name} has elements that share memory (an expanded "
            f"or overlapping view, strides {tuple(target.stride())} for shape {tuple(target.shape)}); pass "
            f"{name}.contiguous() or inplace=False"
        )
    for other, t in others.items():
        if isinstance(t, torch.Tensor) and shares_memory(target, t):
            raise ValueError(f"inplace=True writes the gradient into {name}, but {other} shares memory with it; "
                             f"pass {other}.clone() or inplace=False")
    if not torch.is_grad_enabled():
        return
    # the write replaces the values of a leaf that requires grad, directly or through a view of it (torch refuses
    # in-place writes into both); a traced graph has no view bases, so under torch.compile only the leaf itself
    if target.is_leaf and target.requires_grad:
        raise ValueError(
            f"inplace=True overwrites {name} with their gradient, but {name} is a leaf tensor that requires grad "
            "(a parameter or an input of your own): its values would be lost and its .grad would share their "
            f"storage; pass the model's output {name} (a non-leaf) or inplace=False"
        )
    base = None if torch.compiler.is_compiling() else target._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(
            f"inplace=True overwrites {name} with their gradient, but {name} is a view of a leaf tensor that "
            "requires grad (torch refuses in-place writes into such views): the leaf's values would be lost; pass "
            f"the model's output {name} (a non-leaf) or inplace=False"
        )


def check_nonnegative_ratio(rho: torch.Tensor, mask: torch.Tensor) -> None:
    """An importance ratio is a ratio of probabilities: a negative entry (at a kept position) is an error. The
    fused single pass folds the ratio into the advantage, which is exact only for ratios >= 0. Checked on the
    CPU (free there) and, with GRPO_KERNELS_DEBUG=1, on any device (a host sync)."""
    if (rho.device.type != "cpu" and not debug_checks_enabled()) or torch.compiler.is_compiling():
        return
    bad = rho < 0
    if bad.shape == mask.shape:
        bad &= mask
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"importance_sampling_ratio must be >= 0 (a ratio of probabilities), got "
                         f"{float(rho[idx])} at index {idx}")


def check_process_group(process_group) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call dist.init_process_group first, or pass process_group=None)")


def check_group_size(group_size, batch: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {group_size}")
    if batch % group_size != 0:
        raise ValueError(f"the batch size B={batch} must be a multiple of group_size={group_size}")
    return group_size
