"""Parameter descriptions shared by the docstrings of the public loss functions.

Several public functions take the same inputs and options; their docstrings name a fragment as
``{{name}}`` on a line of its own and :func:`fill` replaces it with the text below, indented like the
placeholder, so ``help()`` shows every parameter in place and the text exists once.
"""

from __future__ import annotations

import inspect
import re

FRAGMENTS = {
    "loss_inputs": """\
completion_mask : Tensor [B, T] or None, default None
    Which completion tokens count, TRL's ``completion_mask``: bool, integer or floating point. None keeps
    every token. Non-boolean values are token weights used exactly as TRL's formulas use the mask
    (``(l * m).sum(-1) / m.sum(-1)``, ``(l * m).sum() / m.sum()``, the sequence-level importance weight
    and the metrics' means): 0 drops a token (its id and logits may be anything, even NaN), 0.5 counts it
    half, 2 twice. Negative or non-finite values raise ``ValueError`` (checked on CPU tensors, and on a
    GPU with ``GRPO_KERNELS_DEBUG=1``).
advantages : Tensor [B], [B, 1] or [B, T], floating point, default None
    Per-sequence (or per-token) advantages. Give exactly one of ``advantages`` and ``rewards``.
rewards : Tensor [B], floating point, default None
    Rewards; the advantages are then ``group_advantages(rewards, group_size)`` (scale "group").
group_size : int or None, default None
    Completions per prompt G (groups are contiguous rows); required with ``rewards``.
old_logps : Tensor [B, T] or None, default None
    Log-probs of the completions under the policy that sampled them. None means on-policy: the ratio
    is exp(logp - logp.detach()) = 1 with the gradient of logp (TRL's ``num_iterations=1``).
ref_logps : Tensor [B, T] or None, default None
    Log-probs under the reference model; required when ``beta != 0``.
importance_sampling_ratio : Tensor [B, T] or [B, 1] or None, default None
    The sampler correction (TRL's ``importance_sampling_ratio`` with ``use_vllm``), >= 0: multiplies each
    token's policy loss (not the KL term); for vespo it is part of the sequence ratio w. Compute it with
    :func:`sampler_importance_ratio`. None: no correction.
sampling_logps : Tensor [B, T] or None, default None
    The sampler's log-probs (NaN where it gave none: such a token counts 0), for the off-policy mask
    only. None: ``old_logps`` (on-policy: the current log-probs).
process_group : torch.distributed group or None, default None
    The data-parallel group whose ranks hold the batch's other sequences: ``top_entropy_quantile`` takes
    its quantile over the entropies of every rank of it. None: this call's tokens only.""",
    "loss_options": None,  # GRPOConfig's own Parameters section, filled in below
    "reduction": """\
max_completion_length : int or None, default None
    The constant of dr_grpo's normaliser ``B * max_completion_length``. None means T, the width of this
    batch; TRL uses its config's ``max_completion_length`` (default 512), so with dr_grpo a batch of
    T = 5 gives a loss 512 / 5 ~ 100x TRL's unless you pass TRL's value (a ``trl.GRPOConfig`` given as
    ``config`` supplies it). Other loss types ignore it.
num_items_in_batch : int, float, 1-element Tensor or None, default None
    The normaliser of dapo / cispo / vespo, used as given: ``loss = sum(mask * loss_tok) /
    num_items_in_batch`` (clamped to >= 1). None: this batch's ``completion_mask.sum()``. TRL 1.16
    divides by the (weighted) kept tokens of the whole generation batch summed over every process,
    divided by the number of processes, and in training times ``gradient_accumulation_steps /
    steps_per_generation``: one process's share of an accumulation window. Under DDP pass that
    per-process value, not the all-process count: DDP averages the ranks' gradients, so the count over
    all ranks gives 1/world_size of TRL's loss and gradient. Other loss types ignore it.""",
    "backend": """\
backend : str, default "auto"
    "auto" (the ``GRPO_KERNELS_BACKEND`` environment variable if set, else the fastest available for
    the device: "cuda", then "triton", on GPUs; "cpu" on CPUs; "torch" as the last resort), "cuda",
    "triton", "cpu" or "torch" (the float64-capable eager reference). A named backend that cannot run
    raises ``BackendUnavailableError``; nothing falls back silently.""",
    "returns": """\
GRPOLossOutput
    A named tuple ``(loss, logps, metrics)``: ``loss`` a 0-d tensor (fp32; float64 for float64 inputs),
    differentiable, also w.r.t. every other tensor input that requires grad (advantages or rewards, old /
    ref / sampling log-probs, importance_sampling_ratio, floating completion_mask weights, a tensor
    num_items_in_batch): autograd's gradient of TRL's formulas, the same on every backend and path, at O(N)
    cost (none where TRL's formulas give none: an input read only through a comparison or a detached weight,
    e.g. sampling_logps in the off-policy mask); 0 for a batch with no kept token (B = 0 included);
    ``logps`` [B, T] fp32, detached, 0 at dropped positions (reusable as ``old_logps``);
    ``metrics`` a dict of detached 0-d fp32 tensors under TRL's names: "entropy" (mean token entropy),
    "kl" (when beta != 0), "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "clip_ratio/low_min", "clip_ratio/high_max" (clip loss types; min / max over sequences of each
    sequence's clip rate), "cispo_clip_ratio" (cispo) or "vespo/phi_seq_mean" (vespo), "policy_loss"
    (with an entropy bonus); means weighted by ``completion_mask``. With top_entropy_quantile < 1 also two
    that TRL does not log but its adaptive entropy coefficient reads: "top_entropy/entropy" (the mean
    entropy over the tokens the mask keeps, the entropy bonus's mean) and "top_entropy/fraction" (their
    share of the mask's weight).""",
}

_PLACEHOLDER = re.compile(r"^([ \t]*)\{\{(\w+)\}\}[ \t]*$", re.MULTILINE)


def _config_options() -> str:
    """The Parameters section of GRPOConfig's docstring: every loss option and its default is described once,
    beside the field that holds it."""
    from .config import GRPOConfig

    doc = inspect.cleandoc(GRPOConfig.__doc__)
    return doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]


FRAGMENTS["loss_options"] = _config_options()


def fill(obj):
    """Decorator: replace each ``{{name}}`` line of ``obj.__doc__`` by ``FRAGMENTS[name]``, indented alike."""

    def sub(m: re.Match) -> str:
        indent, name = m.group(1), m.group(2)
        return "\n".join(indent + line if line else line for line in FRAGMENTS[name].splitlines())

    obj.__doc__ = _PLACEHOLDER.sub(sub, obj.__doc__)
    return obj
