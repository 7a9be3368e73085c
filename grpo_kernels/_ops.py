"""Custom ops and autograd around the fused backends' launchers (see ``backends/base.py``).

The ops are registered once, at import, under static names; the backend is an argument (a string, a constant
under torch.compile), looked up in the registry of ``grpo_kernels.backends`` when the op runs:

- ``grpo_kernels::logprobs_fwd``  (autograd -> ``grpo_kernels::logprobs_bwd`` / ``logprobs_bwd_inplace``)
- ``grpo_kernels::fused`` / ``fused_inplace``: loss gradient computed in the forward pass
- ``grpo_kernels::attach_grad``: makes the loss value (computed in torch from the log-probs) carry the
  gradient that the fused pass already wrote.

Paths of :func:`grpo_loss_fused`:
- no gradient needed: forward kernel only (one read of the logits);
- token-level weights: single pass (forward kernel writes dL/dlogits; backward only scales it);
- weights that need every token first (GSPO's sequence mean, VESPO's sequence weight, the off-policy and
  top-entropy masks) or the entropy's own gradient (the entropy bonus): two passes, forward kernel ->
  loss in torch -> backward kernel with g = dL/dlogp (and dL/dentropy).
In every path the loss value and the metrics come from :func:`logp_loss.loss_from_logps`, the one copy
of the loss math; the kernels hold only its derivative. The gradients of the other tensor inputs (advantages,
old / ref log-probs, ratio, token weights) are autograd's of that loss math in every path: in the single
pass it runs with autograd on the detached log-probs when one of them requires grad.
"""

from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import logp_loss
from ._memory import empty_grad
from .backends import launchers
from .backends.base import LossParams
from .config import GRPOConfig


def _f32(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)


def _scalar_is_one(g: Tensor) -> bool:
    """True when the upstream gradient is known to be 1 (skips an N x V multiply; a host read of one
    scalar, skipped under torch.compile where the multiply is always done)."""
    return not torch.compiler.is_compiling() and bool(g == 1)


# ---- log-probs: forward --------------------------------------------------------------------------
@custom_op("grpo_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd(logits: Tensor, ids: Tensor, tau: float, want_entropy: bool, inplace: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (logp [N], stats [N, 2] = (m, log s) per row, entropy [N] or empty). ``inplace``: the backward
    writes the gradient into the logits."""
    logp, stats, ent = launchers(backend).logprobs_fwd(logits, ids, tau, want_entropy)
    return logp, stats, ent


@logprobs_fwd.register_fake
def _(logits, ids, tau, want_entropy, inplace, backend):
    n = ids.numel()
    stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)  # (m, log s) per row
    return _f32(n, logits), stats, _f32(n if want_entropy else 0, logits)


# ---- log-probs: backward (into a fresh buffer, or into the logits themselves) ---------------------
@custom_op("grpo_kernels::logprobs_bwd", mutates_args=("out",))
def logprobs_bwd(logits: Tensor, ids: Tensor, stats: Tensor, entropy: Optional[Tensor], g_logp: Tensor,
                 g_ent: Optional[Tensor], tau: float, backend: str, out: Tensor) -> None:
    launchers(backend).logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out)


@custom_op("grpo_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def logprobs_bwd_inplace(logits: Tensor, ids: Tensor, stats: Tensor, entropy: Optional[Tensor], g_logp: Tensor,
                         g_ent: Optional[Tensor], tau: float, backend: str) -> None:
    launchers(backend).logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, logits)


logprobs_bwd.register_fake(lambda *a: None)
logprobs_bwd_inplace.register_fake(lambda *a: None)


def _fwd_setup_context(ctx, inputs, output):
    logits, ids, tau, want_entropy, inplace, backend = inputs
    _, stats, ent = output
    ctx.save_for_backward(logits, ids, stats, ent if want_entropy else None)
    ctx.tau, ctx.inplace, ctx.backend = tau, inplace, backend


def _fwd_backward(ctx, g_logp, g_stats, g_ent):
    logits, ids, stats, ent = ctx.saved_tensors
    g_logp = stats.new_zeros(stats.shape[0]) if g_logp is None else g_logp.float().contiguous()
    use_ent = ent is not None and g_ent is not None
    args = (ids, stats, ent if use_ent else None, g_logp, g_ent.float().contiguous() if use_ent else None, ctx.tau,
            ctx.backend)
    if ctx.inplace:
        logprobs_bwd_inplace(logits, *args)
        return logits, None, None, None, None, None
    out = empty_grad(logits.shape, logits.dtype, logits.device)
    logprobs_bwd(logits, *args, out)
    return out, None, None, None, None, None


logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---- single pass: forward + gradient of sum(coef * loss_tok) -------------------------------------
# ``params`` is LossParams.pack(): an op takes list[float], not a dataclass.
@custom_op("grpo_kernels::fused", mutates_args=("out",))
def fused(logits: Tensor, ids: Tensor, tau: float, old: Optional[Tensor], ref: Optional[Tensor], adv: Tensor,
          coef: Tensor, params: list[float], backend: str, out: Tensor) -> tuple[Tensor, Tensor]:
    """-> (logp [N], entropy [N]); the gradient of sum(coef * loss_tok) w.r.t. the logits written into out."""
    return launchers(backend).fused_fwd_bwd(logits, ids, tau, old, ref, adv, coef, LossParams.unpack(params), out)


@custom_op("grpo_kernels::fused_inplace", mutates_args=("logits",))
def fused_inplace(logits: Tensor, ids: Tensor, tau: float, old: Optional[Tensor], ref: Optional[Tensor], adv: Tensor,
                  coef: Tensor, params: list[float], backend: str) -> tuple[Tensor, Tensor]:
    """:func:`fused` writing the gradient over the logits."""
    return launchers(backend).fused_fwd_bwd(logits, ids, tau, old, ref, adv, coef, LossParams.unpack(params),
                                            logits)


def _fused_fake(logits, ids, *rest):
    return _f32(ids.numel(), logits), _f32(ids.numel(), logits)


fused.register_fake(_fused_fake)
fused_inplace.register_fake(_fused_fake)


# ---- attach a precomputed gradient to a loss value ------------------------------------------------
@custom_op("grpo_kernels::attach_grad", mutates_args=())
def attach_grad(value: Tensor, logits: Tensor, grad: Tensor) -> Tensor:
    """Returns ``value``; its gradient w.r.t. ``logits`` is ``grad`` (times the upstream gradient), and the
    upstream gradient passes on to ``value`` itself."""
    return value.clone()


attach_grad.register_fake(lambda value, logits, grad: torch.empty_like(value))


def _attach_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.used = False


def _attach_backward(ctx, g):
    if ctx.used:
        raise RuntimeError(
            "grpo_kernels: the fused loss's gradient was computed in its forward pass and can be used by one "
            "backward only (retain_graph=True with a second backward is not supported)"
        )
    ctx.used = True
    (grad,) = ctx.saved_tensors
    if not _scalar_is_one(g):
        grad = grad.mul_(g.to(grad.dtype))  # in place: no second N x V buffer
    # ``value``'s own graph (the loss math on detached log-probs) carries the gradients of the O(N) inputs
    return g, grad, None


attach_grad.register_autograd(_attach_backward, setup_context=_attach_setup)


# ---- the public paths ----------------------------------------------------------------------------
def layout_3d(logits: Tensor) -> Tensor:
    """[..., V] -> [B, T, V] without a copy where the strides allow (always for 1-3 dims)."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    lead = math.prod(logits.shape[:-2])  # explicit, not -1: -1 is ambiguous for a tensor of 0 elements
    return logits.reshape(lead, logits.shape[-2], logits.shape[-1])  # copies only if not viewable


def token_logprobs_fused(name: str, logits: Tensor, ids: Tensor, tau: float, return_entropy: bool):
    lead = ids.shape
    l3 = layout_3d(logits)
    flat_ids = ids.reshape(-1).long().contiguous()
    logp, _, ent = logprobs_fwd(l3, flat_ids, tau, return_entropy, False, name)
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def inputs_need_grad(x) -> bool:
    """True when autograd is on and a loss input other than the logits (``x``: a ``_validate.LossInputs``)
    requires grad: advantages (or the rewards they come from), token weights, old / ref / sampling log-probs,
    the importance ratio or a tensor ``num_items_in_batch``."""
    if not torch.is_grad_enabled():
        return False
    small = (x.advantages, x.weights, x.old_logps, x.ref_logps, x.importance_sampling_ratio, x.sampling_logps,
             x.num_items_in_batch)
    return any(isinstance(t, Tensor) and t.requires_grad for t in small)


def grpo_loss_fused(name: str, x, cfg: GRPOConfig, inplace: bool):
    """-> (loss, logps [B, T] detached, metrics). ``x`` is a validated ``_validate.LossInputs``."""
    logits, mask = x.logits, x.mask
    B, T, _ = logits.shape
    ids = torch.where(mask, x.ids, 0).reshape(-1).long().contiguous()  # masked ids may be garbage
    tau = cfg.temperature
    loss_args = x.loss_kwargs()
    need_grad = torch.is_grad_enabled() and logits.requires_grad

    if need_grad and not cfg.needs_every_token:
        # The kernel gives dL/dlogits; the loss math on the (detached) log-probs runs with autograd when an O(N)
        # input (advantages, old / ref log-probs, ratio, weights, ...) wants its gradient, which attach_grad
        # passes on: the same gradients as the two-pass path and the reference, at O(N) cost.
        small_grad = inputs_need_grad(x)
        coef = logp_loss.reduction_weights(x.weights, cfg.loss_type, x.max_completion_length, x.num_items_in_batch)
        adv = x.advantages.float()
        if x.importance_sampling_ratio is not None:
            adv = logp_loss.ratio_scaled_advantages(adv, x.importance_sampling_ratio.float(), mask)
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand(B, T).reshape(-1).contiguous()
        vec = lambda t: None if t is None else t.detach().float().reshape(-1).contiguous()  # noqa: E731
        args = (ids, tau, vec(x.old_logps), vec(x.ref_logps), adv.detach(), vec(coef),
                LossParams.from_config(cfg).pack(), name)
        if inplace:
            grad = logits.detach()
            logp, ent = fused_inplace(grad, *args)
        else:
            grad = empty_grad((B, T, logits.shape[-1]), logits.dtype, logits.device)
            logp, ent = fused(logits.detach(), *args, grad)
        # dropped rows may hold garbage (logp NaN): zeros there, as in the two-pass path, keep 0 * NaN out of
        # the gradients of the token weights
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, ent = torch.where(mask, logp.view(B, T), zero), torch.where(mask, ent.view(B, T), zero)
        with torch.set_grad_enabled(small_grad):
            loss, metrics = logp_loss.loss_from_logps(logp, cfg, entropy=ent, **loss_args)
        loss = attach_grad(loss, logits, grad)
    else:
        # Two passes: a token's weight needs every token's log-prob / entropy first (or the entropy bonus
        # needs the entropy's gradient): forward kernel, the loss in torch, then the backward kernel with
        # g_logp (and g_ent).
        logp, _, ent = logprobs_fwd(logits, ids, tau, True, inplace, name)
        logp, ent = logp.view(B, T), ent.view(B, T)
        if cfg.entropy_coef == 0.0:
            ent = ent.detach()
        # Masked rows may hold garbage logits (logp NaN): where() makes their g_logp exactly 0, where a
        # NaN logp would give 0 * NaN = NaN through exp() of the KL term / the sequence mean.
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, ent = torch.where(mask, logp, zero), torch.where(mask, ent, zero)
        loss, metrics = logp_loss.loss_from_logps(logp, cfg, entropy=ent, **loss_args)
    return loss, logp.detach(), metrics
