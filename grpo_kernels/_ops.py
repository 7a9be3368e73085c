"""Custom ops and autograd around a fused backend's launchers (see ``backends/base.py``).

For each fused backend NAME this registers, once, ``torch.library`` custom ops with fakes:

- ``grpo_kernels::NAME_logprobs_fwd``  (autograd -> ``NAME_logprobs_bwd`` / ``NAME_logprobs_bwd_inplace``)
- ``grpo_kernels::NAME_fused`` / ``NAME_fused_inplace``: loss gradient computed in the forward pass
- ``grpo_kernels::attach_grad``: makes the loss value (computed in torch from the log-probs) carry the
  gradient that the fused pass already wrote.

Paths of :func:`grpo_loss_fused`:
- no gradient needed: forward kernel only (one read of the logits);
- token-level weights: single pass (forward kernel writes dL/dlogits; backward only scales it);
- sequence-level weights (GSPO): two passes (the weight of a token depends on its whole sequence):
  forward kernel -> loss in torch -> backward kernel with g = dL/dlogp.
In every path the loss value and the metrics come from :func:`reference.loss_from_logps`, the one copy
of the loss math; the kernels hold only its derivative.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference
from ._memory import empty_grad
from .backends import launchers
from .backends.base import LossParams
from .config import GRPOConfig

_OPS: dict[str, dict] = {}


def _f32(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)


def _scalar_is_one(g: Tensor) -> bool:
    """True when the upstream gradient is known to be 1 (skips an N x V multiply; a host read of one
    scalar, skipped under torch.compile where the multiply is always done)."""
    return not torch.compiler.is_compiling() and bool(g == 1)


def ops_for(name: str) -> dict:
    """Register (once) and return the custom ops of backend ``name``."""
    if name in _OPS:
        return _OPS[name]
    L = launchers(name)
    ns = f"grpo_kernels::{name}_"

    # ---- log-probs: forward ------------------------------------------------------------------
    @custom_op(ns + "logprobs_fwd", mutates_args=())
    def fwd(logits: Tensor, ids: Tensor, tau: float, want_entropy: bool, inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
        logp, stats, ent = L.logprobs_fwd(logits, ids, tau, want_entropy)
        return logp, stats, ent

    @fwd.register_fake
    def _(logits, ids, tau, want_entropy, inplace):
        n = ids.numel()
        stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)  # (m, log s) per row
        return _f32(n, logits), stats, _f32(n if want_entropy else 0, logits)

    # ---- log-probs: backward (into a fresh buffer, or into the logits themselves) -----------------
    def bwd_body(logits, ids, stats, entropy, g_logp, g_ent, tau, out):
        L.logprobs_bwd(logits, ids, stats, entropy, g_logp, g_ent, tau, out)

    @custom_op(ns + "logprobs_bwd", mutates_args=("out",))
    def bwd(logits: Tensor, ids: Tensor, stats: Tensor, entropy: Optional[Tensor], g_logp: Tensor,
            g_ent: Optional[Tensor], tau: float, out: Tensor) -> None:
        bwd_body(logits, ids, stats, entropy, g_logp, g_ent, tau, out)

    @custom_op(ns + "logprobs_bwd_inplace", mutates_args=("logits",))
    def bwd_inplace(logits: Tensor, ids: Tensor, stats: Tensor, entropy: Optional[Tensor], g_logp: Tensor,
                    g_ent: Optional[Tensor], tau: float) -> None:
        bwd_body(logits, ids, stats, entropy, g_logp, g_ent, tau, logits)

    bwd.register_fake(lambda *a: None)
    bwd_inplace.register_fake(lambda *a: None)

    def setup_context(ctx, inputs, output):
        logits, ids, tau, want_entropy, inplace = inputs
        _, stats, ent = output
        ctx.save_for_backward(logits, ids, stats, ent if want_entropy else None)
        ctx.tau, ctx.inplace = tau, inplace

    def backward(ctx, g_logp, g_stats, g_ent):
        logits, ids, stats, ent = ctx.saved_tensors
        g_logp = stats.new_zeros(stats.shape[0]) if g_logp is None else g_logp.float().contiguous()
        use_ent = ent is not None and g_ent is not None
        args = (ids, stats, ent if use_ent else None, g_logp, g_ent.float().contiguous() if use_ent else None, ctx.tau)
        if ctx.inplace:
            bwd_inplace(logits, *args)
            return logits, None, None, None, None
        out = empty_grad(logits.shape, logits.dtype, logits.device)
        bwd(logits, *args, out)
        return out, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)

    # ---- single pass: forward + gradient of sum(coef * loss_tok) --------------------------------
    def fused_body(logits, ids, tau, old, ref, adv, coef, params, out):
        return L.fused_fwd_bwd(logits, ids, tau, old, ref, adv, coef, LossParams.unpack(params), out)

    @custom_op(ns + "fused", mutates_args=("out",))
    def fused(logits: Tensor, ids: Tensor, tau: float, old: Optional[Tensor], ref: Optional[Tensor], adv: Tensor,
              coef: Tensor, params: list[float], out: Tensor) -> tuple[Tensor, Tensor]:
        return fused_body(logits, ids, tau, old, ref, adv, coef, params, out)

    @custom_op(ns + "fused_inplace", mutates_args=("logits",))
    def fused_inplace(logits: Tensor, ids: Tensor, tau: float, old: Optional[Tensor], ref: Optional[Tensor],
                      adv: Tensor, coef: Tensor, params: list[float]) -> tuple[Tensor, Tensor]:
        return fused_body(logits, ids, tau, old, ref, adv, coef, params, logits)

    def fused_fake(logits, ids, *rest):
        return _f32(ids.numel(), logits), _f32(ids.numel(), logits)

    fused.register_fake(fused_fake)
    fused_inplace.register_fake(fused_fake)

    _OPS[name] = {"fwd": fwd, "fused": fused, "fused_inplace": fused_inplace}
    return _OPS[name]


# ---- attach a precomputed gradient to a loss value ------------------------------------------------
@custom_op("grpo_kernels::attach_grad", mutates_args=())
def attach_grad(value: Tensor, logits: Tensor, grad: Tensor) -> Tensor:
    """Returns ``value``; its gradient w.r.t. ``logits`` is ``grad`` (times the upstream gradient)."""
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
    return None, grad, None


attach_grad.register_autograd(_attach_backward, setup_context=_attach_setup)


# ---- the public paths ----------------------------------------------------------------------------
def layout_3d(logits: Tensor) -> Tensor:
    """[..., V] -> [B, T, V] without a copy where the strides allow (always for 1-3 dims)."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])  # copies only if not viewable


def token_logprobs_fused(name: str, logits: Tensor, ids: Tensor, tau: float, return_entropy: bool):
    lead = ids.shape
    l3 = layout_3d(logits)
    flat_ids = ids.reshape(-1).long().contiguous()
    logp, _, ent = ops_for(name)["fwd"](l3, flat_ids, tau, return_entropy, False)
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def grpo_loss_fused(name: str, x, cfg: GRPOConfig, inplace: bool):
    """-> (loss, logps [B, T] detached, metrics). ``x`` is a validated ``_validate.LossInputs``."""
    ops = ops_for(name)
    logits, mask = x.logits, x.mask
    B, T, _ = logits.shape
    ids = torch.where(mask, x.ids, 0).reshape(-1).long().contiguous()  # masked ids may be garbage
    tau = cfg.temperature
    loss_args = dict(advantages=x.advantages, mask=x.weights, old_logps=x.old_logps, ref_logps=x.ref_logps,
                     max_completion_length=x.max_completion_length, num_items_in_batch=x.num_items_in_batch)
    need_grad = torch.is_grad_enabled() and logits.requires_grad

    if need_grad and cfg.importance_sampling_level == "token":
        coef = reference.reduction_weights(x.weights, cfg.loss_type, x.max_completion_length, x.num_items_in_batch)
        adv = x.advantages.float()
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand(B, T).reshape(-1).contiguous()
        vec = lambda t: None if t is None else t.float().reshape(-1).contiguous()  # noqa: E731
        args = (ids, tau, vec(x.old_logps), vec(x.ref_logps), adv, coef.reshape(-1).contiguous(),
                LossParams.from_config(cfg).pack())
        if inplace:
            grad = logits.detach()
            logp, ent = ops["fused_inplace"](grad, *args)
        else:
            grad = empty_grad((B, T, logits.shape[-1]), logits.dtype, logits.device)
            logp, ent = ops["fused"](logits.detach(), *args, grad)
        logp, ent = logp.view(B, T), ent.view(B, T)
        with torch.no_grad():
            loss, metrics = reference.loss_from_logps(logp, cfg, entropy=ent, **loss_args)
        loss = attach_grad(loss, logits, grad)
    else:
        logp, _, ent = ops["fwd"](logits, ids, tau, True, inplace)
        logp, ent = logp.view(B, T), ent.view(B, T).detach()
        # Masked rows may hold garbage logits (logp NaN): where() makes their g_logp exactly 0, where a
        # NaN logp would give 0 * NaN = NaN through exp() of the KL term / the sequence mean.
        logp = torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        loss, metrics = reference.loss_from_logps(logp, cfg, entropy=ent, **loss_args)
    return loss, logp.detach(), metrics
