"""Backend "torch": the log-probs by a full-vocabulary log-softmax (in fp32, float64 for float64 logits, as
TRL materialises it) and the loss composed from them by autograd. It is the oracle of every test
(grpo_kernels.reference) and the "pure PyTorch" baseline of the benchmarks; the fused backends compute the
same log-probs without the N x V log-softmax, and every path computes the loss with
:func:`grpo_kernels.logp_loss.loss_from_logps`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import GRPOConfig
from .logp_loss import compute_dtype, kept, loss_from_logps


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
):
    """logp[..] = z[id] - logsumexp(z), z = logits / temperature; entropy = lse - sum_v p_v z_v.

    ``mask`` (bool, shape of ``ids``): rows where it is False are zeroed before the softmax so that
    garbage (NaN) logits or out-of-range ids there cannot leak into values or gradients.
    """
    z = logits.to(compute_dtype(logits)) / temperature
    if mask is not None:
        z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
        ids = ids.masked_fill(~mask, 0)
    logp_all = torch.log_softmax(z, dim=-1)  # [.., V]: the N x V tensor every fused backend avoids
    logp = logp_all.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p_v * z_v with z_v = -inf (a banned token) is 0, not NaN; masking z keeps the gradient finite too.
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    entropy = torch.logsumexp(z, -1) - (p * z_finite).sum(-1)
    return logp, entropy


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    cfg: GRPOConfig,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps=None,
    ref_logps=None,
    max_completion_length=None,
    num_items_in_batch=None,
    *,
    importance_sampling_ratio=None,
    sampling_logps=None,
    process_group=None,
):
    """Eager GRPO loss: full log-softmax (TRL-style), then :func:`loss_from_logps`.

    -> (loss, logps [B, T] detached, metrics).
    """
    keep = kept(mask)
    if cfg.entropy_coef != 0.0:  # the entropy bonus is differentiated: one graph for both
        logp, entropy = token_logprobs(logits, completion_ids, cfg.temperature, True, mask=keep)
    else:
        logp = token_logprobs(logits, completion_ids, cfg.temperature, mask=keep)
        with torch.no_grad():  # the entropy is a metric (and a mask) here: no N x V autograd graph for it
            _, entropy = token_logprobs(logits.detach(), completion_ids, cfg.temperature, True, mask=keep)
    loss, mets = loss_from_logps(
        logp, cfg, advantages, mask, old_logps, ref_logps, entropy, max_completion_length, num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group,
    )
    return loss, logp.detach(), mets

