"""The loss on log-probs, the one copy every backend runs: per-token terms, reductions, metrics, and the
per-token derivative the fused kernels apply (docs/contract.md written as code).

The fused kernels produce log-probs and entropies (and, in the single-pass path, the gradient); the loss
value, its reduction and the metrics are always computed here, from those [B, T] tensors. The kernels' only
copy of the loss math is its derivative, specified by :func:`token_loss_grad`. What distinguishes the loss
types (policy term, normaliser) is read from their one table, :data:`grpo_kernels.config.LOSS_TYPE_TABLE`.

Shapes: B sequences (P prompts x G completions, contiguous groups), T completion tokens, V vocabulary.

``mask`` [B, T] of the loss functions below is the completion mask: bool, or real token weights (TRL's
formulas multiply by it: ``(l * m).sum(-1) / m.sum(-1)``, ``(l * m).sum() / m.sum()``). A position of
weight 0 (False) is dropped: its id, logits, old / ref log-probs and advantage may be anything. Called on
float64 tensors every function computes in float64 (the test oracle, grpo_kernels.reference, does so).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .config import LOSS_TYPE_TABLE, GRPOConfig

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the oracle); every other float type computes in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kept(mask: torch.Tensor) -> torch.Tensor:
    """The positions that count (bool): the mask itself, or where its weight is not 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum of x * mask, with garbage (NaN/inf) at weight-0 positions ignored, not multiplied by 0."""
    if mask.dtype != torch.bool:
        x = x * mask.to(x.dtype)
    x = torch.where(kept(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


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
    phi: Optional[torch.Tensor] = None  # vespo: the gamma weight [B, 1] ([B, T] for [B, T] advantages)
    entropy_mask: Optional[torch.Tensor] = None  # [B, T] bool: the top-entropy tokens, or None when off


def log_importance_weights(logp, old, mask, level):
    """w = logp - old (token) or the (weighted) masked mean of it over the sequence (GSPO), shape [B, 1]."""
    log_ratio = logp - old
    if level == "token":
        return log_ratio
    return (_masked_sum(log_ratio, mask, -1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)


def sampler_importance_ratio(old_logps, sampling_logps, mask, mode="sequence_mask", clip_min=None, clip_max=3.0):
    """The sampler's importance-sampling correction of TRL 1.16 (``vllm_importance_sampling_correction``).

    ``d = nan_to_num((old - sampling) * m, nan=0)`` (a NaN sampling log-prob, which vLLM returns for a token it
    could not score, gives ratio 1); token modes: ``rho = exp(d)`` [B, T]; sequence modes:
    ``rho = exp(sum_t d)`` [B, 1]. ``*_truncate`` clamps rho to [clip_min, clip_max]; ``*_mask`` sets it to 0
    outside that range. ``None`` bounds are open. Detached (it is data, not a function of the policy).
    """
    with torch.no_grad():
        d = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
        if mode.startswith("sequence"):
            d = d.sum(-1, keepdim=True)
        rho = torch.exp(d)
        if mode.endswith("truncate"):
            if clip_min is not None or clip_max is not None:
                rho = torch.clamp(rho, min=clip_min, max=clip_max)
        else:
            lo = -math.inf if clip_min is None else clip_min
            hi = math.inf if clip_max is None else clip_max
            rho = rho.masked_fill((rho < lo) | (rho > hi), 0.0)
    return rho


def ratio_scaled_advantages(adv, rho, mask):
    """``adv * rho``, the advantages a single-pass kernel takes in place of a sampler importance ratio
    ``rho >= 0`` ([B, T] or [B, 1]; ``rho`` is 0 at dropped positions, where it may be garbage). -> [B, T] or
    [B, 1] for ``adv`` [B] or [B, T]. ``rho`` scales the policy term only (not the KL), and for every loss type
    but vespo ``rho * loss(A) = loss(rho * A)``: ``-min(c1 A, c2 A) rho = -min(c1 rho A, c2 rho A)``, and
    sapo's temperature follows the sign of ``rho * A`` wherever the term is not 0."""
    if rho.shape == mask.shape:
        rho = torch.where(mask, rho, 0.0)
    return (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * rho


def gamma_weights(adv, log_ratio, mask, rho, cfg: GRPOConfig):
    """VESPO's sequence weight phi(w) = e^lam w^k e^(-lam w) (phi(1) = 1), detached; TRL's get_gamma_weights.

    ``log w = clamp(sum_t m * clamp(log_ratio, -20, 20) + sum_t clamp(log rho, log 1e-8, 20), log 1e-8, 20)``
    (the sampler ratio ``rho`` over all positions), ``k, lam`` by the sign of A (``lam >= 1e-4``); a NaN or
    infinite phi is 0. -> [B, 1] ([B, T] when the advantages are per token).
    """
    with torch.no_grad():
        lower = math.log(1e-8)
        seq = _masked_sum(torch.clamp(log_ratio, -20.0, 20.0), mask, -1).unsqueeze(-1)
        if rho is not None:
            seq = seq + torch.clamp(torch.log(rho), lower, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, lower, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(adv, logp, sampling, mask, threshold):
    """DeepSeek-V3.2's off-policy sequence mask (TRL's get_off_policy_mask): keep a sequence when A >= 0 or
    its mean ``sampling - sg(logp)`` over kept tokens is <= ``threshold`` (NaN differences count 0).
    -> float {0, 1}, [B, 1] ([B, T] for per-token advantages)."""
    d = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    mean = _masked_sum(d, mask, -1).unsqueeze(-1) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((adv >= 0) | (mean <= threshold)).to(logp.dtype)


def entropy_quantile(entropy, mask, q: float, process_group=None):
    """The q-quantile (linear interpolation, as torch.quantile) of the entropies at kept positions, in fp32 as
    TRL computes it; with a ``process_group`` over the kept entropies of every rank of the group. NaN when no
    rank has a kept token (then no entropy is >= it). Sorts on the device: no host sync without a group, and
    no limit on the number of tokens (torch.quantile takes at most 2**24)."""
    mask = kept(mask)
    vals = torch.where(mask, entropy.detach().float(), math.inf).reshape(-1)
    counts = torch.stack([mask.sum(), (mask & torch.isnan(entropy)).sum()]).to(torch.float64)
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        sizes = [torch.zeros(1, dtype=torch.long, device=vals.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([vals.numel()], device=vals.device), group=process_group)
        longest = max(int(n) for n in sizes)  # ranks may hold different numbers of tokens
        vals = torch.cat([vals, vals.new_full((longest - vals.numel(),), math.inf)])
        parts = [torch.empty_like(vals) for _ in range(world)]
        dist.all_gather(parts, vals, group=process_group)
        vals = torch.cat(parts)
        dist.all_reduce(counts, group=process_group)
    n, n_nan = counts.unbind()
    ordered = torch.sort(vals).values  # the kept entropies first (NaN ones last, where they only flag n_nan)
    if ordered.numel() == 0:  # no token on any rank (B = 0 or T = 0): no threshold, so an empty mask, as TRL
        return torch.full((), math.nan, dtype=torch.float32, device=vals.device)
    rank = torch.tensor(q, dtype=torch.float32, device=vals.device) * (n - 1).float()
    below = rank.long().clamp(0, ordered.numel() - 1)
    above = rank.ceil().long().clamp(0, ordered.numel() - 1)
    thr = torch.lerp(ordered[below], ordered[above], rank - below.float())
    return torch.where((n > 0) & (n_nan == 0), thr, math.nan)


def token_terms(
    logp: torch.Tensor,
    cfg: GRPOConfig,
    advantages: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    process_group=None,
) -> TokenTerms:
    """The per-token loss (docs/contract.md#per-token-loss; TRL's GRPOTrainer._compute_loss), differentiable in
    logp (``mask``: bool or token weights), in TRL's order: loss by type -> * off-policy mask -> * top-entropy
    mask -> * sampler ratio (not vespo) -> + beta * kl."""
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
    rho = importance_sampling_ratio
    if rho is not None and rho.shape == mask.shape:  # ratio 1 at dropped positions, where it may be garbage
        rho = torch.where(keep, rho, torch.ones((), dtype=rho.dtype, device=rho.device))
    log_ratio = logp - old
    coef_1 = torch.exp(log_importance_weights(logp, old, mask, cfg.importance_sampling_level))

    kl = None
    if cfg.beta != 0.0:
        d = ref_logps - logp
        kl = torch.exp(d) - d - 1  # k3 estimator
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1  # before any delta clip, differentiable

    phi = None
    policy = cfg.loss_type_info.policy
    if policy == "cispo":
        loss_tok = -torch.clamp(coef_1, max=cfg.resolved_epsilon_high).detach() * adv * logp
    elif policy == "sapo":
        tau = torch.where(adv > 0, logp.new_tensor(cfg.sapo_temperature_pos), cfg.sapo_temperature_neg)
        loss_tok = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    elif policy == "vespo":
        phi = gamma_weights(adv, log_ratio, mask, rho, cfg)
        loss_tok = -phi * adv * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.resolved_epsilon_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)  # two-sided clip, after coef_2
        loss_tok = -torch.min(coef_1 * adv, coef_2 * adv)
    loss_tok = loss_tok.expand_as(logp)
    if cfg.off_policy_mask_threshold is not None:
        sampling = old if sampling_logps is None else sampling_logps
        loss_tok = loss_tok * off_policy_mask(adv, logp, sampling, mask, cfg.off_policy_mask_threshold)
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the entropies of the tokens")
        thr = entropy_quantile(entropy, keep, 1 - cfg.top_entropy_quantile, process_group)
        entropy_mask = (entropy.detach() * mask >= thr) & keep  # TRL compares the weighted entropy
        loss_tok = loss_tok * entropy_mask
    if rho is not None and policy != "vespo":  # vespo has it inside its sequence weight
        loss_tok = loss_tok * rho
    if kl is not None:
        loss_tok = loss_tok + cfg.beta * kl
    return TokenTerms(loss_tok, coef_1, kl, adv, phi, entropy_mask)


def reduction_weights(
    mask: torch.Tensor, loss_type: str, max_completion_length=None, num_items_in_batch=None, dtype=torch.float32
) -> torch.Tensor:
    """coef[B, T] such that loss = sum coef * loss_tok (0 at masked positions); O(N), no N x V.

    The fused single pass needs it before the kernel runs, so it depends on the mask alone (bool, or token
    weights: coef = weight / normaliser, the normaliser being the weights' sum where TRL's is).
    """
    B, T = mask.shape
    m = mask.to(dtype)
    normaliser = LOSS_TYPE_TABLE[loss_type].normaliser
    if normaliser == "sequence_tokens":
        return m / (mask.sum(-1, keepdim=True).clamp(min=1) * B)
    if normaliser == "sequences":
        return m / B
    if normaliser == "batch_tokens":
        return m / mask.sum().clamp(min=1)
    if normaliser == "max_length":
        return m / (B * (T if max_completion_length is None else max_completion_length))
    # "num_items": one global normaliser (across accumulation steps and ranks when the caller passes it)
    if num_items_in_batch is None:
        return m / mask.sum().clamp(min=1)
    return m / torch.as_tensor(num_items_in_batch, dtype=dtype, device=mask.device).clamp(min=1)


def reduce_loss(loss_tok, mask, loss_type, max_completion_length=None, num_items_in_batch=None):
    """The reductions (docs/contract.md#reductions), written as TRL writes them, except that a batch of no
    sequences (B = 0) has loss 0 where TRL's mean over sequences (and dr_grpo's 0 / 0) would give NaN."""
    B, T = mask.shape
    normaliser = LOSS_TYPE_TABLE[loss_type].normaliser
    if normaliser == "sequence_tokens":
        return (_masked_sum(loss_tok, mask, -1) / mask.sum(-1).clamp(min=1)).sum() / max(B, 1)
    if normaliser == "sequences":  # a sum over each sequence's tokens: long sequences weigh more
        return _masked_sum(loss_tok, mask, -1).sum() / max(B, 1)
    if normaliser == "batch_tokens":
        return _masked_sum(loss_tok, mask) / mask.sum().clamp(min=1)
    if normaliser == "max_length":
        return _masked_sum(loss_tok, mask) / max(B * (T if max_completion_length is None else max_completion_length), 1)
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


def _seq_extreme(flag: torch.Tensor, mask: torch.Tensor, per_sequence: bool, largest: bool) -> torch.Tensor:
    """min (or max) over sequences of each sequence's masked mean of ``flag``, sequences with no kept token
    skipped (TRL's nanmin / nanmax of masked_seq_mean); NaN when no sequence counts. No host sync."""
    if per_sequence and flag.shape[-1] == 1:
        per_seq = flag.reshape(-1)
        valid = torch.ones_like(per_seq, dtype=torch.bool)
    else:
        counts = mask.sum(-1)
        valid = counts > 0
        per_seq = _masked_sum(flag, mask, -1) / torch.where(valid, counts, 1)  # TRL divides by the weight sum
    if per_seq.numel() == 0:
        return flag.new_full((), math.nan)
    fill = -math.inf if largest else math.inf
    ext = torch.where(valid, per_seq, fill)
    ext = ext.max() if largest else ext.min()
    return torch.where(valid.any(), ext, math.nan)


def metrics(terms: TokenTerms, entropy, mask, cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    """TRL's metric names; detached 0-d fp32 tensors, no host sync."""
    out: dict[str, torch.Tensor] = {}
    if entropy is not None:
        out["entropy"] = _mean_metric(entropy.detach(), mask)
    if terms.kl is not None:
        out["kl"] = _mean_metric(terms.kl.detach(), mask)
    c1, adv = terms.coef_1.detach(), terms.adv
    seq = cfg.importance_sampling_level == "sequence"
    policy = cfg.loss_type_info.policy
    if policy == "cispo":
        out["cispo_clip_ratio"] = _mean_metric(((c1 > cfg.resolved_epsilon_high) & (adv > 0)).to(c1.dtype), mask, seq)
    elif policy == "clip":
        low = ((c1 < 1 - cfg.epsilon_low) & (adv < 0)).to(c1.dtype)
        high = ((c1 > 1 + cfg.resolved_epsilon_high) & (adv > 0)).to(c1.dtype)
        out["clip_ratio/low_mean"] = _mean_metric(low, mask, seq)
        out["clip_ratio/high_mean"] = _mean_metric(high, mask, seq)
        out["clip_ratio/region_mean"] = _mean_metric(torch.maximum(low, high), mask, seq)
        out["clip_ratio/low_min"] = _seq_extreme(low, mask, seq, largest=False)
        out["clip_ratio/high_max"] = _seq_extreme(high, mask, seq, largest=True)
    elif policy == "vespo":
        out["vespo/phi_seq_mean"] = _mean_metric(terms.phi, mask, terms.phi.shape[-1] == 1 and adv.shape[-1] == 1)
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
    *,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    process_group=None,
):
    """-> (loss 0-d, metrics dict). Differentiable in ``logp`` (and in ``entropy`` for the entropy bonus);
    ``mask`` is bool or token weights [B, T]."""
    terms = token_terms(logp, cfg, advantages, old_logps, ref_logps, mask,
                        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
                        entropy=entropy, process_group=process_group)
    loss = reduce_loss(terms.loss_tok, mask, cfg.loss_type, max_completion_length, num_items_in_batch)
    mets = metrics(terms, entropy, mask, cfg)
    m_e = mask if terms.entropy_mask is None else mask * terms.entropy_mask
    if terms.entropy_mask is not None:
        # the entropy over the tokens the mask keeps and their share of the kept weight: what an entropy
        # controller (TRL's adaptive coefficient) reads, whatever entropy_coef is now
        n_e = m_e.sum()
        mets["top_entropy/entropy"] = (_masked_sum(entropy.detach(), m_e) / n_e.clamp(min=1)).float()
        mets["top_entropy/fraction"] = (n_e / mask.sum().clamp(min=1)).float()
    if cfg.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the entropies of the tokens")
        # the bonus acts on the tokens the policy loss acts on; its mean ignores the loss type's normaliser
        mets["policy_loss"] = loss.detach().float()
        loss = loss - cfg.entropy_coef * (_masked_sum(entropy, m_e) / m_e.sum().clamp(min=1))
    return loss, mets


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
    policy = cfg.loss_type_info.policy
    if cfg.loss_type_info.needs_every_token:
        raise ValueError(
            f"loss_type={cfg.loss_type!r} has no per-token derivative: its weight needs the whole sequence")
    w = torch.zeros_like(logp) if old is None else logp - old
    c1 = torch.exp(w)
    if policy == "cispo":
        d = -torch.clamp(c1, max=cfg.resolved_epsilon_high) * adv
    elif policy == "sapo":
        tau = torch.where(adv > 0, logp.new_tensor(cfg.sapo_temperature_pos), cfg.sapo_temperature_neg)
        s = torch.sigmoid(tau * (c1 - 1))
        d = -4 * adv * s * (1 - s) * c1
    else:
        lo, hi = 1 - cfg.epsilon_low, 1 + cfg.resolved_epsilon_high
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
