"""Vocab-parallel log-probs and GRPO loss: logits sharded over V across a torch.distributed group.

Tensor-parallel LM heads leave each rank with the logits of its own vocabulary columns
``[vocab_start, vocab_start + V_r)``; gathering the full ``[N, V]`` would undo the sharding. Per row, with
z = x / tau, everything the loss needs is a handful of sums over V, so each rank reduces its shard to O(N)
numbers and two all-reduces combine them:

    MAX:  m = max_v z_v                                     (for a stable exp)
    SUM:  s = sum_v e^{z_v - m},  u = sum_v e^{z_v - m} z_v,  t = z[id] (only the owning rank adds it),
          found = [id in this shard]  (sums to 1; 0 means id outside the global vocabulary)

    lse = m + log s,  logp = t - lse,  entropy = lse - u / s   (= lse - sum_v p_v z_v)

Backward needs no communication: with p_v = e^{z_v - lse} (the GLOBAL lse), each rank's gradient is
    dL/dx_v = ( g_logp * ([v == id] - p_v) - g_ent * p_v * (z_v - lse + entropy) ) / tau
on its own columns, and g_logp, g_ent are the same on every rank because the loss is computed from the
all-reduced log-probs on every rank (no all-reduce of an N x V gradient).

With a fused backend (``backend="auto"``: the C++ CPU kernels on CPU tensors, CUDA / Triton on GPUs) each
rank runs the ordinary fused forward kernel on its shard with shard-local ids (-1 where the id is another
rank's: no target term), which gives per row the shard's own statistics ``(m_r, log s_r)`` (max of its raw
logits, ``s_r = sum e^{(x_v - m_r) / tau}``), entropy ``H_r`` and ``logp_r``; one MAX and one SUM all-reduce
combine them. With ``M = max_r m_r``, ``c_r = (m_r - M) / tau + log s_r`` (the log of the shard's share of the
mass, up to the common log S) and ``e_r = e^{c_r}``, ``S = sum_r e_r``, ``w_r = e_r / S``:

    row statistics (M, log S),   H = sum_r w_r H_r - sum_r w_r log w_r = (sum_r e_r (H_r - c_r)) / S + log S,
    logp = logp_r + c_r - log S  on the rank that owns the id

(``H = -sum p log p`` split by shard, ``p_v = w_r q_v`` with ``q`` the shard softmax). The global lse
``M / tau + log S`` is never formed as one float (docs/contract.md#row-statistics). The backward is the ordinary
fused backward kernel fed the GLOBAL (M, log S) and H: O(N) saved, nothing of size N x V_r but the
gradient. With ``backend="torch"`` (and for float64 shards, the reference's dtype) the per-shard arithmetic is
eager torch (an fp32 / float64 copy of the shard and its exp, O(N x V_r)). The loss math is
:func:`logp_loss.loss_from_logps`, the same as every other path. Every rank must call these functions
with the same N, ids and loss inputs (they are collectives), and call ``backward`` on its loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validate, logp_loss
from ._docs import fill
from ._memory import empty_grad
from ._ops import layout_3d
from .api import GRPOLossOutput
from .backends import launchers, resolve_backend
from .config import GRPOConfig, takes_config_options


def _vocab_group(group):
    """The process group the vocabulary is sharded over (the public argument ``group``; None: the world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("grpo_kernels.vocab_parallel needs torch.distributed to be initialised "
                           "(dist.init_process_group) before the call")
    return dist.group.WORLD if group is None else group


def _check_shard(logits_shard, ids, vocab_start, vocab_group, arg="ids"):
    _validate.check_logits(logits_shard, "logits_shard")
    _validate.check_tensor(arg, ids, integer=True)
    if tuple(ids.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"{arg} must have shape logits_shard.shape[:-1] = {tuple(logits_shard.shape[:-1])}, "
                         f"got {tuple(ids.shape)}")
    if ids.device != logits_shard.device:
        raise ValueError(f"{arg} is on {ids.device} but logits_shard is on {logits_shard.device}")
    if vocab_start is None:
        # equal shards in rank order: rank r holds columns [r * V_r, (r + 1) * V_r)
        return dist.get_rank(vocab_group) * logits_shard.shape[-1]
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (the first global vocabulary index of this rank's "
                         f"columns), got {vocab_start!r}")
    return vocab_start


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, ids, vocab_start: int, tau: float, vocab_group, mask):
        # shard [N, V_r]; ids [N] global; mask [N] bool or None (rows that may hold garbage logits)
        cdt = logp_loss.compute_dtype(shard)
        z = shard.to(cdt) / tau
        if mask is not None:
            z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
        V_r = shard.shape[-1]
        local = ids.long() - vocab_start
        in_shard = (local >= 0) & (local < V_r)
        local = torch.where(in_shard, local, 0)

        m = z.amax(-1)  # [N]
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=vocab_group)
        e = torch.exp(z - m.unsqueeze(-1))  # [N, V_r]; z = -inf gives 0
        z_fin = z.masked_fill(torch.isneginf(z), 0.0)  # p_v * z_v with z_v = -inf is 0, not NaN
        t = torch.where(in_shard, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
        stats = torch.stack([e.sum(-1), (e * z_fin).sum(-1), t, in_shard.to(cdt)], -1)  # [N, 4]
        del e, z_fin
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=vocab_group)
        s, u, t, found = stats.unbind(-1)
        lse = m + torch.log(s)
        logp = torch.where(found > 0, t - lse, torch.full_like(t, float("nan")))
        ent = lse - u / s
        ctx.save_for_backward(shard, local, in_shard, lse, ent, mask)
        ctx.tau = tau
        return logp, ent, found

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_found):
        shard, local, in_shard, lse, ent, mask = ctx.saved_tensors
        cdt = lse.dtype
        z = shard.to(cdt) / ctx.tau
        if mask is not None:
            z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
        p = torch.exp(z - lse.unsqueeze(-1))  # [N, V_r] global softmax on this rank's columns
        d = torch.zeros_like(p)
        if g_logp is not None:
            d -= g_logp.to(cdt).unsqueeze(-1) * p
            d.scatter_add_(-1, local.unsqueeze(-1), torch.where(in_shard, g_logp.to(cdt), 0.0).unsqueeze(-1))
        if g_ent is not None:
            # dH/dz_v = -p_v (z_v - lse + H); zero where p_v = 0 (z_v = -inf) instead of 0 * inf
            term = p * (z - (lse - ent).unsqueeze(-1))
            d -= g_ent.to(cdt).unsqueeze(-1) * torch.where(p > 0, term, 0.0)
        d /= ctx.tau
        if mask is not None:
            d = d.masked_fill(~mask.unsqueeze(-1), 0.0)
        return d.to(shard.dtype), None, None, None, None, None


class _FusedVocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, ids, vocab_start: int, tau: float, vocab_group, name: str):
        # x3 [B, T, V_r] fp32 / bf16 / fp16, a view with its strides (no copy); ids [N = B * T] global
        kernels = launchers(name)
        local = ids.long() - vocab_start
        in_shard = (local >= 0) & (local < x3.shape[-1])
        local = torch.where(in_shard, local, -1).contiguous()  # -1: another rank's id, no target term here
        logp_r, stats_r, ent_r = kernels.logprobs_fwd(x3, local, tau, True)
        m_r, log_s_r = stats_r.unbind(-1)
        M = m_r.clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=vocab_group)
        # c_r = -inf (e_r = 0) for a shard whose logits are all -inf (m_r = -inf: no -inf - -inf)
        c = torch.where(m_r == float("-inf"), float("-inf"), (m_r - M) / tau + log_s_r)
        e = torch.exp(c)
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        sums = torch.stack([
            e,
            torch.where(e > 0, e * (ent_r - c), zero),
            torch.where(in_shard, logp_r + c, zero),
            in_shard.to(e.dtype),
        ], -1)  # [N, 4]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=vocab_group)
        S, A, logp_own, found = sums.unbind(-1)
        log_S = torch.log(S)
        ent = A / S + log_S
        logp = torch.where(found > 0, logp_own - log_S, torch.full_like(log_S, float("nan")))
        ctx.save_for_backward(x3, local, torch.stack([M, log_S], -1), ent.contiguous())
        ctx.tau, ctx.name = tau, name
        return logp, ent, found

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_found):
        x3, local, stats, ent = ctx.saved_tensors
        g = torch.zeros_like(ent) if g_logp is None else g_logp.float().contiguous()
        out = empty_grad(x3.shape, x3.dtype, x3.device)
        has_ent = g_ent is not None
        launchers(ctx.name).logprobs_bwd(x3, local, stats, ent if has_ent else None, g,
                                         g_ent.float().contiguous() if has_ent else None, ctx.tau, out)
        return out, None, None, None, None, None


def _backend(backend: str, shard: Tensor) -> str:
    name = resolve_backend(backend, shard.device)
    if name != "torch" and shard.dtype == torch.float64:
        raise TypeError(f"logits_shard of dtype float64 runs only on backend='torch' (the reference), not {name!r}")
    return name


def _logprobs(logits_shard, ids, vocab_start, tau, vocab_group, mask, name, arg):
    """-> (logp, entropy) of the global softmax; ``mask`` (or None) marks the rows that count; ``arg`` names
    ``ids`` in errors."""
    lead = ids.shape
    if name == "torch":
        shard = logits_shard.reshape(-1, logits_shard.shape[-1])
        flat_mask = None if mask is None else mask.reshape(-1)
        logp, ent, found = _VocabParallelLogprobs.apply(shard, ids.reshape(-1), vocab_start, tau, vocab_group,
                                                        flat_mask)
    else:  # masked rows need no zeroing: their gradient weights are 0, and the kernels then skip the row
        logp, ent, found = _FusedVocabParallelLogprobs.apply(layout_3d(logits_shard), ids.reshape(-1), vocab_start,
                                                             tau, vocab_group, name)
    if logits_shard.device.type == "cpu" or _validate.debug_checks_enabled():
        # every rank sees the same all-reduced `found`, so every rank raises together (no hang)
        bad = (found != 1).view(lead)
        if mask is not None:
            bad &= mask
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            n = int(found.view(lead)[idx])
            what = ("which no rank's vocabulary shard contains (outside the global vocabulary)" if n == 0
                    else f"which {n} ranks' shards contain: vocab_start must give disjoint shards")
            raise ValueError(f"{arg} holds {int(ids[idx])} at index {idx}, {what}")
    return logp.view(lead), ent.view(lead)


def token_logprobs(
    logits_shard: Tensor,
    ids: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    temperature: float = GRPOConfig.temperature,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log-probs (and entropy) of ``softmax(logits / temperature)`` over the GLOBAL vocabulary.

    A collective: every rank calls it with the same ids.

    Parameters
    ----------
    logits_shard : Tensor [..., V_r]
        This rank's vocabulary columns ``[vocab_start, vocab_start + V_r)`` (stride 1 along V_r; the fused
        backends take other strides of 1- to 3-dim views without a copy).
    ids : Tensor [...], integer
        Global vocabulary ids, the same on every rank. An id in no shard raises ``ValueError`` on CPU tensors
        (every rank raises); on a GPU its logp is NaN (checked with ``GRPO_KERNELS_DEBUG=1``).
    group : ProcessGroup or None, default None
        The group the vocabulary is sharded over; None is the default (world) group.
    vocab_start : int or None, default None
        The first global id of this rank's columns; None means ``rank * V_r`` (equal shards in rank order).
    temperature : float, default 1.0
        Softmax temperature (> 0).
    return_entropy : bool, default False
        Also return the entropy of the global softmax per position.
    backend : str, default "auto"
        As in :func:`grpo_kernels.token_logprobs`; every rank must use the same one.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        logps ``[...]`` (fp32; float64 for float64 shards), identical on every rank, and the entropy if
        ``return_entropy``; differentiable w.r.t. this rank's shard.
    """
    vocab_group = _vocab_group(group)
    vocab_start = _check_shard(logits_shard, ids, vocab_start, vocab_group)
    tau = _validate.check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    logp, ent = _logprobs(logits_shard, ids, vocab_start, tau, vocab_group, None, _backend(backend, logits_shard),
                          "ids")
    return (logp, ent) if return_entropy else logp


def grpo_loss_with_config(
    logits_shard: Tensor,
    completion_ids: Tensor,
    config: GRPOConfig,
    *,
    group=None,
    vocab_start: int | None = None,
    completion_mask: Tensor | None = None,
    advantages: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    process_group=None,
    backend: str = "auto",
) -> GRPOLossOutput:
    """:func:`grpo_loss` with the options as one config object.

    Parameters
    ----------
    logits_shard, completion_ids
        As in :func:`grpo_loss`.
    config : GRPOConfig or trl.GRPOConfig
        The loss options; a ``trl.GRPOConfig`` is read with ``GRPOConfig.from_trl``, and its
        ``max_completion_length`` is used when the call passes none.
    group, vocab_start, completion_mask, advantages, rewards, group_size, old_logps, ref_logps,
    max_completion_length, num_items_in_batch, importance_sampling_ratio, sampling_logps, process_group, backend
        As in :func:`grpo_loss`.

    Returns
    -------
    GRPOLossOutput
        As in :func:`grpo_loss`.
    """
    config, max_completion_length = _validate.loss_config(config, max_completion_length)
    vocab_group = _vocab_group(group)
    _validate.check_logits(logits_shard, "logits_shard")
    _validate.check_tensor("completion_ids", completion_ids, ndim=2, integer=True)
    if logits_shard.dim() != 3:
        raise ValueError(f"logits_shard must have shape [B, T, V_r], got {tuple(logits_shard.shape)}")
    vocab_start = _check_shard(logits_shard, completion_ids, vocab_start, vocab_group, "completion_ids")
    # The ids are global (not < V_r): their range is checked after the all-reduce; the rest is validated
    # as grpo_loss validates it.
    x = _validate.validate_loss_inputs(
        logits_shard, torch.zeros_like(completion_ids), config, completion_mask=completion_mask,
        advantages=advantages, rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group,
    )
    mask = x.mask
    # masked ids may be garbage: give each rank an id of its own shard there (rows zeroed, g = 0, no error)
    ids = torch.where(mask, completion_ids, vocab_start)
    logp, ent = _logprobs(logits_shard, ids, vocab_start, config.temperature, vocab_group, mask,
                          _backend(backend, logits_shard), "completion_ids")
    logp = torch.where(mask, logp, 0.0)
    # the entropy bonus differentiates the entropy (every rank gets the gradient of its own columns)
    ent = torch.where(mask, ent, 0.0) if config.entropy_coef != 0.0 else ent.detach()
    loss, metrics = logp_loss.loss_from_logps(logp, config, entropy=ent, **x.loss_kwargs())
    return GRPOLossOutput(loss, logp.detach().float(), metrics)


@takes_config_options
@fill
def grpo_loss(
    logits_shard: Tensor,
    completion_ids: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    completion_mask: Tensor | None = None,
    advantages: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    process_group=None,
    backend: str = "auto",
    **options,
) -> GRPOLossOutput:
    """``grpo_kernels.grpo_loss`` on logits sharded over the vocabulary across a process group.

    The loss, logps and metrics are identical on every rank; ``loss.backward()`` on each rank gives the
    gradient of its shard. Every rank must call it with the same ids and loss inputs (a collective).

    Parameters
    ----------
    logits_shard : Tensor [B, T, V_r]
        This rank's vocabulary columns ``[vocab_start, vocab_start + V_r)`` of the logits that predict
        ``completion_ids`` (stride 1 along V_r).
    completion_ids : Tensor [B, T], integer
        Global vocabulary ids, the same on every rank.
    group : ProcessGroup or None, default None
        The group the vocabulary is sharded over (its ranks hold the same tokens); None is the default
        (world) group. ``process_group`` is another one: the data-parallel group of ``top_entropy_quantile``.
    vocab_start : int or None, default None
        The first global id of this rank's columns; None means ``rank * V_r`` (equal shards in rank order).
    {{loss_inputs}}
    {{loss_options}}
    {{reduction}}
    {{backend}}

    Returns
    -------
    {{returns}}
    """
    config = _validate.resolve_config(None, options, "vocab_parallel.grpo_loss")
    return grpo_loss_with_config(
        logits_shard, completion_ids, config, group=group, vocab_start=vocab_start, completion_mask=completion_mask,
        advantages=advantages, rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group, backend=backend,
    )
