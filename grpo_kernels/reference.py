"""The eager reference (``backend="torch"``): docs/contract.md written to be read.

It is the oracle of every test (called on float64 inputs it computes in float64) and the "pure PyTorch"
baseline of the benchmarks: like TRL it materialises the full-vocabulary log-softmax in fp32.

The loss math on log-probs (:func:`loss_from_logps`) is shared by every backend: the fused kernels
produce log-probs (and, in the single-pass path, the gradient), and the loss value, its reduction and
the metrics are always computed here. The kernels' only copy of the loss math is its derivative,
specified by :func:`token_loss_grad`.

Shapes: B sequences (P prompts x G completions, contiguous groups), T completion tokens, V vocabulary.

``mask`` [B, T] of the loss functions below is the completion mask: bool, or real token weights (TRL's
formulas multiply by it: ``(l * m).sum(-1) / m.sum(-1)``, ``(l * m).sum() / m.sum()``). A position of
weight 0 (False) is dropped: its id, logits, old / ref log-probs and advantage may be anything.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import GRPOConfig


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the oracle); every other float type computes in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# log-probs and entropy
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """A = r - mean_g; divided by (std_g + eps) ("group"), (std(r) + eps) ("batch") or 1 ("none").

    std is unbiased (torch.std's default), as in TRL. A group whose rewards are all equal gets A = 0.
    """
    r = rewards.to(compute_dtype(rewards))
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (r.std() + eps)
    return centred


# --------------------------------------------------------------------------------------------------
# the loss on log-probs
# --------------------------------------------------------------------------------------------------
class TokenTerms(NamedTuple):
    loss_tok: torch.Tensor  # [B, T] per-token loss incl. beta * kl (masked positions: anything)
    coef_1: torch.Tensor  # [B, T] or [B, 1]: the ratio after the delta clip (for the clip metrics)
    kl: Optional[torch.Tensor]  # [B, T] after the bias correction, or None when beta == 0
    adv: torch.Tensor  # [B, 1] or [B, T]


def kept(mask: torch.Tensor) -> torch.Tensor:
    """The positions that count (bool): the mask itself, or where its weight is not 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum of x * mask, with garbage (NaN/inf) at weight-0 positions ignored, not multiplied by 0."""
    if mask.dtype != torch.bool:
        x = x * mask.to(x.dtype)
    x = torch.where(kept(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def log_importance_weights(logp, old, mask, level):
    """w = logp - old (token) or the (weighted) masked mean of it over the sequence (GSPO), shape [B, 1]."""
    log_ratio = logp - old
    if level == "token":
        return log_ratio
    return (_masked_sum(log_ratio, mask, -1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)


def token_terms(
    logp: torch.Tensor,
    cfg: GRPOConfig,
    advantages: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    mask: torch.Tensor,
) -> TokenTerms:
    """The per-token loss of SPEC section 1 (TRL's GRPOTrainer._compute_loss), differentiable in logp."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    old = logp.detach() if old_logps is None else old_logps
    # Garbage (NaN) at masked positions of old / ref / [B, T] advantages must not reach the gradient: a
    # per-sequence c1 [B, 1] sums cotangent * value over the row, and 0 * NaN = NaN there.
    fill, keep = logp.detach(), kept(mask)
    old = torch.where(keep, old, fill)
    if ref_logps is not None:
        ref_logps = torch.where(keep, ref_logps, fill)
    if adv.shape == mask.shape:
        adv = torch.where(keep, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    coef_1 = torch.exp(log_importance_weights(logp, old, mask, cfg.importance_sampling_level))

    kl = None
    if cfg.beta != 0.0:
        d = ref_logps - logp
        kl = torch.exp(d) - d - 1  # k3 estimator
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1  # before any delta clip, differentiable

    if cfg.loss_type == "cispo":
        loss_tok = -torch.clamp(coef_1, max=cfg.eps_high).detach() * adv * logp
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, logp.new_tensor(cfg.sapo_temperature_pos), cfg.sapo_temperature_neg)
        loss_tok = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.eps_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)  # two-sided clip, after coef_2
        loss_tok = -torch.min(coef_1 * adv, coef_2 * adv)
    loss_tok = loss_tok.expand_as(logp)
    if kl is not None:
        loss_tok = loss_tok + cfg.beta * kl
    return TokenTerms(loss_tok, coef_1, kl, adv)


def reduction_weights(
    mask: torch.Tensor, loss_type: str, max_completion_length=None, num_items_in_batch=None, dtype=torch.float32
) -> torch.Tensor:
    """coef[B, T] such that loss = sum coef * loss_tok (0 at masked positions); O(N), no N x V.

    The fused single pass needs it before the kernel runs, so it depends on the mask alone (bool, or token
    weights: coef = weight / normaliser, the normaliser being the weights' sum where TRL's is).
    """
    B, T = mask.shape
    m = mask.to(dtype)
    if loss_type in ("grpo", "sapo"):
        return m / (mask.sum(-1, keepdim=True).clamp(min=1) * B)
    if loss_type == "bnpo":
        return m / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return m / (B * (T if max_completion_length is None else max_completion_length))
    # dapo, cispo: one global normaliser (across accumulation steps and ranks when the caller passes it)
    if num_items_in_batch is None:
        return m / mask.sum().clamp(min=1)
    return m / torch.as_tensor(num_items_in_batch, dtype=dtype, device=mask.device).clamp(min=1)


def reduce_loss(loss_tok, mask, loss_type, max_completion_length=None, num_items_in_batch=None):
    """The reductions (docs/contract.md#reductions), written as TRL writes them."""
    B, T = mask.shape
    if loss_type in ("grpo", "sapo"):
        return (_masked_sum(loss_tok, mask, -1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return _masked_sum(loss_tok, mask) / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return _masked_sum(loss_tok, mask) / (B * (T if max_completion_length is None else max_completion_length))
    if num_items_in_batch is None:
        normaliser = mask.sum().clamp(min=1)
    else:
        normaliser = torch.as_tensor(num_items_in_batch, device=mask.device).clamp(min=1)
    return _masked_sum(loss_tok, mask) / normaliser


def _mean_metric(x: torch.Tensor, mask: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """Masked mean over tokens; a per-sequence flag [B, 1] is averaged over B (TRL's global_masked_mean).

    ``per_sequence`` is explicit: at T = 1 a [B, 1] tensor is also a per-token shape.
    """
    if per_sequence and x.shape[-1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return _masked_sum(x, mask) / mask.sum().clamp(min=1)


def metrics(terms: TokenTerms, entropy, mask, cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    """TRL's metric names; detached 0-d fp32 tensors, no host sync."""
    out: dict[str, torch.Tensor] = {}
    if entropy is not None:
        out["entropy"] = _mean_metric(entropy.detach(), mask)
    if terms.kl is not None:
        out["kl"] = _mean_metric(terms.kl.detach(), mask)
    c1, adv = terms.coef_1.detach(), terms.adv
    seq = cfg.importance_sampling_level == "sequence"
    if cfg.loss_type == "cispo":
        out["cispo_clip_ratio"] = _mean_metric(((c1 > cfg.eps_high) & (adv > 0)).to(c1.dtype), mask, seq)
    elif cfg.loss_type != "sapo":
        low = (c1 < 1 - cfg.epsilon_low) & (adv < 0)
        high = (c1 > 1 + cfg.eps_high) & (adv > 0)
        out["clip_ratio/low_mean"] = _mean_metric(low.to(c1.dtype), mask, seq)
        out["clip_ratio/high_mean"] = _mean_metric(high.to(c1.dtype), mask, seq)
        out["clip_ratio/region_mean"] = _mean_metric((low | high).to(c1.dtype), mask, seq)
    return {k: v.detach().float() for k, v in out.items()}


def loss_from_logps(
    logp: torch.Tensor,
    cfg: GRPOConfig,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    max_completion_length=None,
    num_items_in_batch=None,
):
    """-> (loss 0-d, metrics dict). Differentiable in ``logp``; ``mask`` is bool or token weights [B, T]."""
    terms = token_terms(logp, cfg, advantages, old_logps, ref_logps, mask)
    loss = reduce_loss(terms.loss_tok, mask, cfg.loss_type, max_completion_length, num_items_in_batch)
    return loss, metrics(terms, entropy, mask, cfg)


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
):
    """Eager GRPO loss: full log-softmax (TRL-style), then :func:`loss_from_logps`.

    -> (loss, logps [B, T] detached, metrics).
    """
    keep = kept(mask)
    logp = token_logprobs(logits, completion_ids, cfg.temperature, mask=keep)
    with torch.no_grad():  # the entropy is a metric here: no N x V autograd graph for it
        _, entropy = token_logprobs(logits.detach(), completion_ids, cfg.temperature, True, mask=keep)
    loss, mets = loss_from_logps(
        logp, cfg, advantages, mask, old_logps, ref_logps, entropy, max_completion_length, num_items_in_batch
    )
    return loss, logp.detach(), mets


# --------------------------------------------------------------------------------------------------
# the derivative the fused kernels compute in their single pass (token-level weights only)
# --------------------------------------------------------------------------------------------------
def token_loss_grad(logp, cfg: GRPOConfig, adv, old=None, ref=None):
    """d loss_tok / d logp at token level, elementwise; the spec the kernels mirror line for line.

    With w = logp - old (old = logp in value when None), c1 = exp(w), dc1/dlogp = c1:
    - clip family: c2 = clamp(c1, 1-el, 1+eh), dc2 = c1 * [1-el <= c1 <= 1+eh];
      c1' = min(c1, delta), dc1' = c1 * [c1 <= delta] (or c1' = c1, dc1' = c1 without delta);
      loss = -min(c1'*A, c2*A): torch.min sends the gradient to the smaller side, half to each on a tie:
      d = -(w_a * A * dc1' + w_b * A * dc2).
    - cispo: loss = -sg(min(c1, eh)) * A * logp  ->  d = -min(c1, eh) * A.
    - sapo: s = sigmoid(tau*(c1-1)), loss = -(4/tau) s A  ->  d = -4 A s (1-s) c1 (tau cancels).
    - KL (beta != 0): r = ref - logp, kl = e^r - r - 1, dkl = 1 - e^r; with the bias correction
      (kl * c1)' = dkl*c1 + kl*c1;  d += beta * that.
    """
    w = torch.zeros_like(logp) if old is None else logp - old
    c1 = torch.exp(w)
    if cfg.loss_type == "cispo":
        d = -torch.clamp(c1, max=cfg.eps_high) * adv
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, logp.new_tensor(cfg.sapo_temperature_pos), cfg.sapo_temperature_neg)
        s = torch.sigmoid(tau * (c1 - 1))
        d = -4 * adv * s * (1 - s) * c1
    else:
        lo, hi = 1 - cfg.epsilon_low, 1 + cfg.eps_high
        c2 = torch.clamp(c1, lo, hi)
        dc2 = torch.where((c1 >= lo) & (c1 <= hi), c1, 0.0)
        if cfg.delta is not None:
            c1d, dc1d = torch.clamp(c1, max=cfg.delta), torch.where(c1 <= cfg.delta, c1, 0.0)
        else:
            c1d, dc1d = c1, c1
        a, b = c1d * adv, c2 * adv
        wa = torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0))
        d = -(wa * adv * dc1d + (1 - wa) * adv * dc2)
    if cfg.beta != 0.0:
        r = ref - logp
        kl = torch.exp(r) - r - 1
        dkl = 1 - torch.exp(r)
        if cfg.use_bias_correction_kl:
            dkl = dkl * c1 + kl * c1
        d = d + cfg.beta * dkl
    return d
