"""The float64 eager reference (backend="torch"): the oracle of every other test, checked on its own.

Three independent kinds of evidence:
- values against a numpy transcription of docs/contract.md written in this file (``np_loss``) and against
  worked examples whose numbers are derived by hand in the test (nice logits: p in {1/4, 1/2, 1/3});
- gradients by ``torch.autograd.gradcheck`` in float64 (finite differences of the public ``grpo_loss``
  and ``token_logprobs``), over loss type x level x beta (with / without KL bias correction) x delta x
  on-policy / off-policy (old_logps chosen so that every clip region holds tokens) x temperature;
- ``logp_loss.token_loss_grad`` (the derivative the kernels mirror) against autograd of the per-token loss.

Tolerances: float64 throughout, so values are compared at rtol 1e-12 (a few hundred ulp of the sums
involved); gradcheck uses its float64 defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import logp_loss
from grpo_kernels.config import CLIP_LOSS_TYPES, LOSS_TYPES, GRPOConfig

F64 = torch.float64
RTOL = 1e-12

# --------------------------------------------------------------------------------------------------
# the shared case: B=6 (G=2), T=3, V=5, a fully masked row, ratios placed in every clip region
# --------------------------------------------------------------------------------------------------
EL, EH, DELTA, CISPO_EH = 0.2, 0.28, 1.6, 1.3
MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]]
ADV = [0.8, -1.1, 0.5, -0.6, 0.3, -0.9]
# token level: row 0 (A>0): high clip, inside, below range (unclipped); row 1 (A<0): low clip, above delta;
# row 3 (A<0): low clip, masked, between 1+EH and DELTA (unclipped); row 4 (A>0): inside;
# row 5 (A<0): masked, inside, above delta. Masked entries: anything.
TOKEN_RATIOS = [[1.5, 1.05, 0.6], [0.5, 2.0, 1.1], [1.0, 1.0, 1.0], [0.7, 1.0, 1.45], [0.9, 1.1, 1.15],
                [1.0, 0.95, 1.7]]
# sequence level (GSPO): the masked geometric mean of each row; jitter with masked mean 0 keeps token ratios apart
SEQ_RATIOS = [1.45, 0.6, 1.0, 2.0, 1.1, 0.9]
SEQ_JITTER = [[0.1, -0.2, 0.1], [0.15, -0.15, 0.3], [0.0, 0.0, 0.0], [0.1, 0.5, -0.1], [0.05, -0.1, 0.05],
              [0.4, 0.1, -0.1]]


def make_case(level="token", temperature=1.0, seed=0, B=6, T=3, V=5):
    """float64 inputs; old_logps put c1 = exp(logp - old) at the designed ratios for ``level``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor(MASK, dtype=torch.bool)
    adv = torch.tensor(ADV, dtype=F64)
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if level == "token":
        log_ratio = torch.tensor(TOKEN_RATIOS, dtype=F64).log()
    else:
        log_ratio = torch.tensor(SEQ_RATIOS, dtype=F64).log().unsqueeze(-1) + torch.tensor(SEQ_JITTER, dtype=F64)
    old = logp - log_ratio
    ref = logp + torch.rand(B, T, generator=g, dtype=F64) - 0.5
    return dict(logits=logits, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def effective_ratios(case, level):
    """c1 at the unmasked positions (token) or per live sequence (sequence), for the region asserts."""
    logp = torch.log_softmax(case["logits"], -1).gather(-1, case["ids"].unsqueeze(-1)).squeeze(-1)
    lr, m = logp - case["old"], case["mask"]
    if level == "token":
        return lr.exp()[m], case["adv"].unsqueeze(-1).expand_as(lr)[m]
    live = m.any(-1)
    w = torch.where(m, lr, 0.0).sum(-1) / m.sum(-1).clamp(min=1)
    return w.exp()[live], case["adv"][live]


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_case_covers_every_clip_region(level):
    """The gradcheck below is only meaningful if tokens sit in every region and none on a boundary."""
    c1, a = effective_ratios(make_case(level), level)
    for b in (1 - EL, 1 + EH, DELTA, CISPO_EH):
        assert (c1 - b).abs().min() > 0.02, f"a ratio sits within 0.02 of the boundary {b}"
    assert bool(((c1 > 1 + EH) & (a > 0)).any()), "no high-clipped token"
    assert bool(((c1 < 1 - EL) & (a < 0)).any()), "no low-clipped token"
    assert bool(((c1 > DELTA) & (a < 0)).any()), "no token above delta"
    assert bool(((c1 > 1 - EL) & (c1 < 1 + EH)).any()), "no token inside the clip range"
    assert bool(((c1 > CISPO_EH) & (a > 0)).any()), "no cispo-clipped token"


def loss_options(loss_type, beta, bias_correction, delta):
    opts = dict(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias_correction, epsilon_low=EL,
                epsilon_high=CISPO_EH if loss_type == "cispo" else EH)
    if delta:
        opts["delta"] = DELTA
    if loss_type == "sapo":  # distinct, non-default temperatures: a swap of pos / neg changes the loss
        opts.update(sapo_temperature_pos=0.7, sapo_temperature_neg=1.6)
    return opts


BETAS = [(0.0, True), (0.3, True), (0.3, False)]  # (beta, use_bias_correction_kl)
GRAD_CASES = [
    (lt, lvl, beta, bc, delta, off)
    for lt in LOSS_TYPES
    for lvl in ("token", "sequence")
    for beta, bc in BETAS
    for delta in ((False, True) if lt in CLIP_LOSS_TYPES else (False,))  # delta is a clip-family option
    for off in (False, True)
]


def _ids(case):
    lt, lvl, beta, bc, delta, off = case
    return f"{lt}-{lvl}-beta{beta}{'' if bc else '-nobc'}{'-delta' if delta else ''}-{'off' if off else 'on'}"


def _logp(logits, ids, temperature):
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def check_loss_grad(c, opts, adv, old, temperature, level):
    """d loss / d logits of the public grpo_loss (backend="torch") against finite differences.

    - gradcheck (float64 central differences) w.r.t. the logits, with ``old`` a constant;
    - ``old=None`` (on-policy: old = sg(logp), so the value does not move with the logits and finite
      differences see nothing): its gradient must equal the one with ``old`` = logp(x0) given as a constant;
    - cispo's factor sg(min(c1, eps_high)) and vespo's weight sg(phi) are stop-gradients too: there the
      gradient is compared with central differences of the numpy transcription with that factor frozen at x0.
    """
    x0 = c["logits"]
    beta_ref = c["ref"] if opts["beta"] else None

    def f(logits, old_logps):
        return gk.grpo_loss(logits, c["ids"], completion_mask=c["mask"], advantages=adv, old_logps=old_logps,
                            ref_logps=beta_ref, temperature=temperature, importance_sampling_level=level,
                            backend="torch", **opts).loss

    def grad(old_logps):
        x = x0.clone().requires_grad_(True)
        f(x, old_logps).backward()
        return x.grad

    if old is None:
        old = _logp(x0, c["ids"], temperature).detach()
        torch.testing.assert_close(grad(None), grad(old), rtol=RTOL, atol=1e-15)
    g = grad(old)
    assert torch.all(g[~c["mask"]] == 0), "a masked position got a gradient"
    if opts["loss_type"] not in ("cispo", "vespo"):
        assert torch.autograd.gradcheck(lambda t: f(t, old), (x0.clone().requires_grad_(True),))
        return
    n = {k: v.numpy() for k, v in c.items()}
    n_adv, n_old = adv.numpy(), old.numpy()
    kw = dict(opts, importance_sampling_level=level)
    logp0 = np_logp_entropy(n["logits"], n["ids"], temperature)[0]
    if opts["loss_type"] == "cispo":
        kw["cispo_coef"] = np_cispo_ratio(logp0, n_old, n["mask"], level, opts["epsilon_high"])
    else:
        a = n_adv[:, None] if n_adv.ndim == 1 else n_adv
        kw["vespo_phi"] = np_vespo_phi(np.where(n["mask"], logp0 - n_old, 0.0), a, 2.0, 3.0, 3.0, 2.0)

    def np_f(logits):
        logp, ent = np_logp_entropy(logits, n["ids"], temperature)
        return np_loss(logp, ent, n["mask"], n_adv, n_old, n["ref"], **kw)[0]

    h, fd = 1e-6, np.zeros_like(n["logits"])
    for i in np.ndindex(*fd.shape):
        xp, xm = n["logits"].copy(), n["logits"].copy()
        xp[i] += h
        xm[i] -= h
        fd[i] = (np_f(xp) - np_f(xm)) / (2 * h)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", GRAD_CASES, ids=_ids)
def test_grpo_loss_gradient(case):
    loss_type, level, beta, bc, delta, off_policy = case
    temperature = 0.7 if off_policy else 1.0
    c = make_case(level, temperature)
    opts = loss_options(loss_type, beta, bc, delta)
    check_loss_grad(c, opts, c["adv"], c["old"] if off_policy else None, temperature, level)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_gradient_token_advantages(loss_type, level):
    """Advantages given per token [B, T] (mixed signs inside a row), off-policy, beta on, delta on."""
    c = make_case(level, 0.8)
    adv = torch.tensor([[0.8, -0.4, 1.2], [-1.1, 0.3, 0.0], [0.5, 0.5, 0.5], [-0.6, 2.0, 0.9], [0.3, -0.3, 0.1],
                        [1.0, -0.9, 0.4]], dtype=F64)
    opts = loss_options(loss_type, 0.3, True, True)
    check_loss_grad(c, opts, adv, c["old"], 0.8, level)
    out = gk.grpo_loss(c["logits"], c["ids"], completion_mask=c["mask"], advantages=adv, old_logps=c["old"],
                       ref_logps=c["ref"], temperature=0.8, importance_sampling_level=level, backend="torch", **opts)
    n = {k: v.numpy() for k, v in c.items()}
    logp, ent = np_logp_entropy(n["logits"], n["ids"], 0.8)
    want, want_m = np_loss(logp, ent, n["mask"], adv.numpy(), n["old"], n["ref"], importance_sampling_level=level,
                           **opts)
    np.testing.assert_allclose(out.loss.item(), want, rtol=RTOL)
    for k, v in want_m.items():  # flags [B, T] here even at sequence level (A varies along T): token means
        np.testing.assert_allclose(out.metrics[k].item(), v, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_gradcheck(temperature, entropy):
    x = (torch.randn(2, 3, 7, dtype=F64) * 2).requires_grad_(True)
    ids = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(
        lambda t: gk.token_logprobs(t, ids, temperature=temperature, return_entropy=entropy, backend="torch"), (x,)
    )


# --------------------------------------------------------------------------------------------------
# token_loss_grad: the hand-derived per-token derivative the kernels mirror
# --------------------------------------------------------------------------------------------------
TLG_RATIOS = [0.5, 0.7, 0.95, 1.1, 1.4, 2.0]  # below 1-el, inside, above 1+eh, above cispo's 1.3 and delta
SINGLE_PASS_LOSS_TYPES = [lt for lt in LOSS_TYPES if lt != "vespo"]  # vespo's weight needs its whole sequence


def test_token_loss_grad_refuses_vespo():
    logp = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="vespo"):
        logp_loss.token_loss_grad(logp, GRPOConfig(loss_type="vespo"), torch.ones(1, 1, dtype=F64))


@pytest.mark.parametrize("loss_type", SINGLE_PASS_LOSS_TYPES)
@pytest.mark.parametrize("beta,bc", BETAS)
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_token_loss_grad_matches_autograd(loss_type, beta, bc, delta, off_policy, adv_shape):
    g = torch.Generator().manual_seed(1)
    B, T = 2, len(TLG_RATIOS)
    logp = (-3 * torch.rand(B, T, generator=g, dtype=F64) - 0.05).requires_grad_(True)
    ratios = torch.tensor(TLG_RATIOS, dtype=F64).expand(B, T)
    old = (logp.detach() - ratios.log()) if off_policy else None
    ref = logp.detach() + torch.rand(B, T, generator=g, dtype=F64) - 0.5
    if adv_shape == "B":
        adv = torch.tensor([[0.7], [-1.3]], dtype=F64)
    else:
        adv = torch.randn(B, T, generator=g, dtype=F64)
    cfg = GRPOConfig(**loss_options(loss_type, beta, bc, delta))
    mask = torch.ones(B, T, dtype=torch.bool)
    terms = logp_loss.token_terms(logp, cfg, adv, old, ref, mask)
    (auto,) = torch.autograd.grad(terms.loss_tok.sum(), logp)
    hand = logp_loss.token_loss_grad(logp.detach(), cfg, adv, old, ref)
    torch.testing.assert_close(hand, auto, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("extra", [{}, {"max_completion_length": 5}, {"num_items_in_batch": 11}])
def test_reduction_weights_equal_reduce_loss(loss_type, extra):
    """The fused single pass weights each token by reduction_weights before the loss exists: same sum."""
    mask = torch.tensor(MASK, dtype=torch.bool)
    loss_tok = torch.randn(len(MASK), 3, dtype=F64)
    coef = logp_loss.reduction_weights(mask, loss_type, dtype=F64, **extra)
    want = logp_loss.reduce_loss(loss_tok, mask, loss_type, **extra)
    assert torch.all(coef[~mask] == 0)
    torch.testing.assert_close((coef * loss_tok).sum(), want, rtol=RTOL, atol=0)


# --------------------------------------------------------------------------------------------------
# an independent numpy transcription of the math in docs/contract.md
# --------------------------------------------------------------------------------------------------
def np_logp_entropy(logits, ids, temperature):
    z = logits / temperature
    zmax = z.max(-1, keepdims=True)
    lse = zmax[..., 0] + np.log(np.exp(z - zmax).sum(-1))
    logp = np.take_along_axis(z, ids[..., None], -1)[..., 0] - lse
    p = np.exp(z - lse[..., None])
    ent = lse - (p * np.where(np.isneginf(z), 0.0, z)).sum(-1)
    return logp, ent


def np_loss(logp, ent, mask, adv, old, ref, *, loss_type="dapo", importance_sampling_level="token", beta=0.0,
            use_bias_correction_kl=True, epsilon_low=0.2, epsilon_high=None, delta=None,
            sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, max_completion_length=None,
            num_items_in_batch=None, cispo_coef=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
            vespo_lambda_neg=2.0, vespo_phi=None):
    """-> (loss, metrics) in float64 numpy; masked positions may hold anything.

    ``cispo_coef`` / ``vespo_phi``: the stop-gradient factor min(c1, eps_high) / VESPO's sequence weight,
    frozen at another point (finite differences).
    """
    m = mask.astype(bool)
    B, T = m.shape
    eh = epsilon_low if epsilon_high is None else epsilon_high
    A = adv[:, None] if adv.ndim == 1 else adv
    old = logp if old is None else old
    lr = np.where(m, logp - old, 0.0)
    if importance_sampling_level == "token":
        w = lr
    else:
        w = (lr.sum(1) / np.maximum(m.sum(1), 1))[:, None]
    c1 = np.exp(w)
    kl = None
    if beta != 0.0:
        d = np.where(m, ref - logp, 0.0)
        kl = np.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * c1
    phi = None
    if loss_type == "cispo":
        lt = -(np.minimum(c1, eh) if cispo_coef is None else cispo_coef) * A * logp
    elif loss_type == "vespo":
        phi = np_vespo_phi(lr, A, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        lt = -(phi if vespo_phi is None else vespo_phi) * A * logp
    elif loss_type == "sapo":
        tau = np.where(A > 0, sapo_temperature_pos, sapo_temperature_neg)
        lt = -(1.0 / (1.0 + np.exp(-tau * (c1 - 1))) * 4 / tau) * A
    else:
        c2 = np.clip(c1, 1 - epsilon_low, 1 + eh)
        if delta is not None:
            c1 = np.minimum(c1, delta)
        lt = -np.minimum(c1 * A, c2 * A)
    lt = np.broadcast_to(lt, (B, T))
    if kl is not None:
        lt = lt + beta * kl
    lt = np.where(m, lt, 0.0)
    if loss_type in ("grpo", "sapo"):
        loss = (lt.sum(1) / np.maximum(m.sum(1), 1)).mean()
    elif loss_type == "luspo":
        loss = lt.sum(1).mean()
    elif loss_type == "bnpo":
        loss = lt.sum() / max(m.sum(), 1)
    elif loss_type == "dr_grpo":
        loss = lt.sum() / (B * (T if max_completion_length is None else max_completion_length))
    else:
        loss = lt.sum() / max(m.sum() if num_items_in_batch is None else num_items_in_batch, 1)

    def tok_mean(x):
        return np.where(m, x, 0.0).sum() / max(m.sum(), 1)

    def flag_mean(x):  # per-sequence flags [B, 1] are averaged over B (TRL's global_masked_mean)
        return x.mean() if importance_sampling_level == "sequence" and x.shape[1] == 1 else tok_mean(x)

    def seq_extreme(x, fn):  # fn over sequences of the masked per-sequence mean, empty sequences skipped
        if importance_sampling_level == "sequence" and x.shape[1] == 1:
            return fn(x[:, 0])
        n = m.sum(1)
        per_seq = np.where(m, x, 0.0).sum(1) / np.maximum(n, 1)
        return fn(per_seq[n > 0]) if (n > 0).any() else math.nan

    mets = {"entropy": tok_mean(ent)}
    if kl is not None:
        mets["kl"] = tok_mean(kl)
    if loss_type == "cispo":
        mets["cispo_clip_ratio"] = flag_mean(((c1 > eh) & (A > 0)).astype(float))
    elif loss_type == "vespo":
        mets["vespo/phi_seq_mean"] = phi.mean() if phi.shape[1] == 1 else tok_mean(phi)
    elif loss_type != "sapo":
        low, high = (c1 < 1 - epsilon_low) & (A < 0), (c1 > 1 + eh) & (A > 0)
        mets["clip_ratio/low_mean"] = flag_mean(low.astype(float))
        mets["clip_ratio/high_mean"] = flag_mean(high.astype(float))
        mets["clip_ratio/region_mean"] = flag_mean((low | high).astype(float))
        mets["clip_ratio/low_min"] = seq_extreme(low.astype(float), np.min)
        mets["clip_ratio/high_max"] = seq_extreme(high.astype(float), np.max)
    return loss, mets


def np_vespo_phi(log_ratio, A, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's weight phi(w) = e^lam w^k e^(-lam w), w = exp of the clamped sum of the clamped token log-ratios
    (masked entries of ``log_ratio`` are 0); k, lam by the sign of A; lam >= 1e-4; a non-finite phi is 0."""
    lo = math.log(1e-8)
    log_w = np.clip(np.clip(log_ratio, -20, 20).sum(1, keepdims=True), lo, 20)
    k = np.where(A >= 0, k_pos, k_neg)
    lam = np.maximum(np.where(A >= 0, lam_pos, lam_neg), 1e-4)
    with np.errstate(over="ignore", invalid="ignore"):
        phi = np.exp(lam + k * log_w - lam * np.exp(log_w))
    return np.where(np.isfinite(phi), phi, 0.0)


def np_cispo_ratio(logp, old, mask, level, eh):
    lr = np.where(mask, logp - old, 0.0)
    w = lr if level == "token" else (lr.sum(1) / np.maximum(mask.sum(1), 1))[:, None]
    return np.minimum(np.exp(w), eh)


def run_torch(c, opts, off_policy=True, beta_ref=True, temperature=1.0, **extra):
    out = gk.grpo_loss(c["logits"], c["ids"], completion_mask=c["mask"], advantages=c["adv"],
                       old_logps=c["old"] if off_policy else None, ref_logps=c["ref"] if beta_ref else None,
                       temperature=temperature, backend="torch", **opts, **extra)
    return out


@pytest.mark.parametrize("case", GRAD_CASES, ids=_ids)
def test_loss_and_metrics_match_numpy(case):
    loss_type, level, beta, bc, delta, off_policy = case
    temperature = 0.7 if off_policy else 1.0
    c = make_case(level, temperature)
    opts = loss_options(loss_type, beta, bc, delta)
    out = run_torch(c, opts, off_policy, True, temperature, importance_sampling_level=level)
    n = {k: v.numpy() for k, v in c.items()}
    logp, ent = np_logp_entropy(n["logits"], n["ids"], temperature)
    want, want_m = np_loss(logp, ent, n["mask"], n["adv"], n["old"] if off_policy else None, n["ref"],
                           importance_sampling_level=level, **opts)
    np.testing.assert_allclose(out.loss.item(), want, rtol=RTOL, atol=1e-15)
    assert out.logps.dtype == torch.float32 and not out.logps.requires_grad  # the contract: logps are fp32, detached
    np.testing.assert_allclose(out.logps.numpy(), np.where(n["mask"], logp, 0.0), rtol=1e-7, atol=0)
    assert set(out.metrics) == set(want_m)
    for k, v in want_m.items():
        np.testing.assert_allclose(out.metrics[k].item(), v, rtol=1e-6, atol=0, err_msg=k)  # metrics are fp32
        assert out.metrics[k].dtype == torch.float32 and out.metrics[k].dim() == 0 and not out.metrics[k].requires_grad


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
@pytest.mark.parametrize("nib", [7, 20, torch.tensor(13.0)])
def test_num_items_in_batch(loss_type, nib):
    c = make_case("token", 0.7)
    opts = loss_options(loss_type, 0.3, True, False)
    default = run_torch(c, opts, temperature=0.7).loss
    given = run_torch(c, opts, temperature=0.7, num_items_in_batch=nib).loss
    n_mask = int(c["mask"].sum())
    torch.testing.assert_close(given, default * n_mask / float(nib), rtol=RTOL, atol=0)


@pytest.mark.parametrize("mcl", [3, 4, 16])
def test_dr_grpo_max_completion_length(mcl):
    c = make_case("token", 0.7)
    opts = loss_options("dr_grpo", 0.0, True, False)
    default = run_torch(c, opts, beta_ref=False, temperature=0.7).loss  # normaliser B * T
    given = run_torch(c, opts, beta_ref=False, temperature=0.7, max_completion_length=mcl).loss
    torch.testing.assert_close(given, default * 3 / mcl, rtol=RTOL, atol=0)  # T = 3


# --------------------------------------------------------------------------------------------------
# worked examples with hand-derived numbers: B=2 (A = +1, -1), T=3, V=3
# --------------------------------------------------------------------------------------------------
# Logits are logs of integer weights, so p = w / sum(w): every target has p = 1/2 except row 1 token 0
# (p = 1/3). Entropy of [1,2,1]/4, [1,1,2]/4, [2,1,1]/4, [4,2,2]/8 is 1.5 ln 2; of [1,1,1]/3 it is ln 3.
W = [[[1, 2, 1], [1, 1, 2], [4, 2, 2]], [[1, 1, 1], [2, 1, 1], [1, 3, 4]]]
IDS = [[1, 2, 0], [0, 0, 2]]
HAND_MASK = [[1, 1, 1], [1, 1, 0]]
HAND_RATIOS = [[1.5, 1.0, 0.6], [1.5, 0.5, 2.0]]  # row 1 token 2 is masked
LN2, LN3 = math.log(2), math.log(3)


def hand_inputs(temperature=1.0):
    logits = torch.tensor(W, dtype=F64).log() * temperature  # z = logits / tau is the same for every tau
    ids = torch.tensor(IDS)
    logp = torch.tensor([[0.5, 0.5, 0.5], [1 / 3, 0.5, 0.5]], dtype=F64).log()
    old = logp - torch.tensor(HAND_RATIOS, dtype=F64).log()
    ref = logp + LN2  # r = ref - logp = ln 2: k3 = e^r - r - 1 = 1 - ln 2 at every token
    return logits, ids, torch.tensor(HAND_MASK), torch.tensor([1.0, -1.0], dtype=F64), old, ref


def hand_loss(temperature=1.0, **opts):
    logits, ids, mask, adv, old, ref = hand_inputs(temperature)
    return gk.grpo_loss(logits, ids, completion_mask=mask, advantages=adv, old_logps=old,
                        ref_logps=ref if opts.get("beta") else None, temperature=temperature, backend="torch", **opts)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_hand_logps_and_entropy(temperature):
    logits, ids, *_ = hand_inputs(temperature)
    logp, ent = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True, backend="torch")
    want_logp = [[-LN2, -LN2, -LN2], [-LN3, -LN2, -LN2]]
    h3 = -(1 / 8 * math.log(1 / 8) + 3 / 8 * math.log(3 / 8) + 1 / 2 * math.log(1 / 2))
    want_ent = [[1.5 * LN2] * 3, [LN3, 1.5 * LN2, h3]]
    np.testing.assert_allclose(logp.numpy(), want_logp, rtol=RTOL)
    np.testing.assert_allclose(ent.numpy(), want_ent, rtol=RTOL)
    out = hand_loss(temperature, loss_type="grpo")
    np.testing.assert_allclose(out.metrics["entropy"].item(), (4 * 1.5 * LN2 + LN3) / 5, rtol=1e-6)


# Per-token losses at eps 0.2 (range [0.8, 1.2]), -min(c1*A, clamp(c1)*A):
#   row 0 (A=+1): c1 1.5 -> -1.2 (high clip); 1.0 -> -1.0; 0.6 -> -0.6 (min takes c1*A)
#   row 1 (A=-1): c1 1.5 -> +1.5 (min takes c1*A); 0.5 -> +0.8 (low clip); masked
ROW0, ROW1 = [-1.2, -1.0, -0.6], [1.5, 0.8]
HAND_LOSSES = {
    "grpo": (sum(ROW0) / 3 + sum(ROW1) / 2) / 2,
    "bnpo": (sum(ROW0) + sum(ROW1)) / 5,
    "dr_grpo": (sum(ROW0) + sum(ROW1)) / (2 * 3),
    "dapo": (sum(ROW0) + sum(ROW1)) / 5,
}


@pytest.mark.parametrize("loss_type", list(HAND_LOSSES))
def test_hand_clip_losses_and_metrics(loss_type):
    out = hand_loss(loss_type=loss_type)
    assert out.loss.item() == pytest.approx(HAND_LOSSES[loss_type], rel=RTOL)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 5)  # row 1 token 1
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 5)  # row 0 token 0
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    assert "kl" not in m


def test_hand_normalisers():
    total = sum(ROW0) + sum(ROW1)
    assert hand_loss(loss_type="dapo", num_items_in_batch=8).loss.item() == pytest.approx(total / 8, rel=RTOL)
    assert hand_loss(loss_type="dr_grpo", max_completion_length=4).loss.item() == pytest.approx(total / 8, rel=RTOL)


def test_hand_delta_and_asymmetric_eps():
    # delta 1.3: row 1 token 0 (A<0, c1 1.5) becomes -min(-1.3, -1.2) = 1.3
    got = hand_loss(loss_type="grpo", delta=1.3).loss.item()
    assert got == pytest.approx((sum(ROW0) / 3 + (1.3 + 0.8) / 2) / 2, rel=RTOL)
    # delta 1.1 < 1 + eps: c1 -> min(c1, 1.1) before the min. Row 0 token 0: -min(1.1, 1.2) = -1.1 and, as the
    # clip metrics see the ratio after the delta clip (TRL reassigns coef_1), it is no longer high-clipped;
    # row 1 token 0 (A<0): -min(-1.1, -1.2) = +1.2
    out = hand_loss(loss_type="grpo", delta=1.1)
    assert out.loss.item() == pytest.approx(((-1.1 - 1.0 - 0.6) / 3 + (1.2 + 0.8) / 2) / 2, rel=RTOL)
    assert out.metrics["clip_ratio/high_mean"].item() == 0.0
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    # eps_high 0.6 (range [0.8, 1.6]): row 0 token 0 -> -1.5 (not clipped); row 1 token 0 -> +1.5
    out = hand_loss(loss_type="grpo", epsilon_high=0.6)
    assert out.loss.item() == pytest.approx(((-1.5 - 1.0 - 0.6) / 3 + (1.5 + 0.8) / 2) / 2, rel=RTOL)
    assert out.metrics["clip_ratio/high_mean"].item() == 0.0
    # eps_low 0.6, eps_high 0.2 (range [0.4, 1.2]): row 1 token 1 (c1 0.5) is no longer clipped: +0.5
    out = hand_loss(loss_type="grpo", epsilon_low=0.6, epsilon_high=0.2)
    assert out.loss.item() == pytest.approx((sum(ROW0) / 3 + (1.5 + 0.5) / 2) / 2, rel=RTOL)
    assert out.metrics["clip_ratio/low_mean"].item() == 0.0


@pytest.mark.parametrize("bias_correction", [True, False])
def test_hand_kl(bias_correction):
    k3 = 1 - LN2
    beta = 0.1
    out = hand_loss(loss_type="grpo", beta=beta, use_bias_correction_kl=bias_correction)
    c1 = [[1.5, 1.0, 0.6], [1.5, 0.5]] if bias_correction else [[1.0] * 3, [1.0] * 2]
    kl0, kl1 = [k3 * c for c in c1[0]], [k3 * c for c in c1[1]]
    want = ((sum(ROW0) + beta * sum(kl0)) / 3 + (sum(ROW1) + beta * sum(kl1)) / 2) / 2
    assert out.loss.item() == pytest.approx(want, rel=RTOL)
    assert out.metrics["kl"].item() == pytest.approx((sum(kl0) + sum(kl1)) / 5, rel=1e-6)


def test_hand_sequence_level():
    # w_b = mean of ln c1 over the unmasked tokens: c1_0 = (1.5 * 1.0 * 0.6)^(1/3) = 0.9^(1/3) ~ 0.9655,
    # c1_1 = (1.5 * 0.5)^(1/2) = 0.75^(1/2) ~ 0.8660; eps 0.1 -> range [0.9, 1.1]: row 1 is low-clipped (A<0).
    c0, c1 = 0.9 ** (1 / 3), 0.75 ** 0.5
    out = hand_loss(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.1)
    assert out.loss.item() == pytest.approx((-c0 + 0.9) / 2, rel=RTOL)
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 2)  # one of B = 2 sequences
    assert out.metrics["clip_ratio/high_mean"].item() == 0.0
    # GSPO with dapo: every token of a row carries the row's ratio
    out = hand_loss(loss_type="dapo", importance_sampling_level="sequence")
    assert out.loss.item() == pytest.approx((-3 * c0 + 2 * c1) / 5, rel=RTOL)


def test_hand_cispo():
    # loss_tok = -min(c1, 1.3) * A * logp (1.3 the raw bound); dapo reduction over 5 tokens
    out = hand_loss(loss_type="cispo", epsilon_high=1.3)
    row0 = -(1.3 * -LN2 + 1.0 * -LN2 + 0.6 * -LN2)
    row1 = +(1.3 * -LN3 + 0.5 * -LN2)
    assert out.loss.item() == pytest.approx((row0 + row1) / 5, rel=RTOL)
    assert out.metrics["cispo_clip_ratio"].item() == pytest.approx(1 / 5)  # row 0 token 0 (row 1 has A<0)
    # gradient of a cispo token w.r.t. its logp is -min(c1, bound) * A: the clipped ratio is a constant
    logits, ids, mask, adv, old, _ = hand_inputs()
    x = logits.clone().requires_grad_(True)
    gk.grpo_loss(x, ids, completion_mask=mask, advantages=adv, old_logps=old, loss_type="cispo",
                 epsilon_high=1.3, backend="torch").loss.backward()
    p = torch.tensor(W, dtype=F64)
    p = p / p.sum(-1, keepdim=True)
    g_logp = torch.tensor([[-1.3, -1.0, -0.6], [1.3, 0.5, 0.0]], dtype=F64) / 5
    want = g_logp.unsqueeze(-1) * (torch.nn.functional.one_hot(ids, 3).to(F64) - p)
    torch.testing.assert_close(x.grad, want, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("pos,neg", [(1.0, 1.05), (0.5, 2.0)])
def test_hand_sapo(pos, neg):
    def sig(v):
        return 1 / (1 + math.exp(-v))

    out = hand_loss(loss_type="sapo", sapo_temperature_pos=pos, sapo_temperature_neg=neg)
    row0 = [-(sig(pos * (c - 1)) * 4 / pos) for c in (1.5, 1.0, 0.6)]  # A = +1
    row1 = [+(sig(neg * (c - 1)) * 4 / neg) for c in (1.5, 0.5)]  # A = -1
    assert out.loss.item() == pytest.approx((sum(row0) / 3 + sum(row1) / 2) / 2, rel=RTOL)
    assert set(out.metrics) == {"entropy"}


def test_hand_on_policy_gradient():
    # old = None: ratio 1, loss = -A * exp(logp - sg(logp)); grpo: dL/dlogp = -A / (n_b * B)
    logits, ids, mask, adv, *_ = hand_inputs()
    x = logits.clone().requires_grad_(True)
    out = gk.grpo_loss(x, ids, completion_mask=mask, advantages=adv, loss_type="grpo", backend="torch")
    assert out.loss.item() == pytest.approx((-1.0 + 1.0) / 2)
    out.loss.backward()
    p = torch.tensor(W, dtype=F64)
    p = p / p.sum(-1, keepdim=True)
    g_logp = torch.tensor([[-1 / 3] * 3, [1 / 2, 1 / 2, 0.0]], dtype=F64) / 2
    want = g_logp.unsqueeze(-1) * (torch.nn.functional.one_hot(ids, 3).to(F64) - p)
    torch.testing.assert_close(x.grad, want, rtol=RTOL, atol=1e-15)
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0


# --------------------------------------------------------------------------------------------------
# masked garbage, fully masked rows, banned tokens
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_garbage_does_not_leak(loss_type, level):
    c = make_case(level, 0.7)
    opts = loss_options(loss_type, 0.3, True, loss_type in CLIP_LOSS_TYPES)
    m = c["mask"]

    adv = c["adv"].unsqueeze(-1).expand_as(m).clone()  # [B, T]: garbage is possible at masked positions

    def run(logits, ids, old, ref, adv):
        x = logits.clone().requires_grad_(True)
        out = gk.grpo_loss(x, ids, completion_mask=m, advantages=adv, old_logps=old, ref_logps=ref,
                           temperature=0.7, importance_sampling_level=level, backend="torch", **opts)
        out.loss.backward()
        return out, x.grad

    clean, g_clean = run(c["logits"], c["ids"], c["old"], c["ref"], adv)
    dirty_logits = c["logits"].clone()
    dirty_logits[~m] = float("nan")
    dirty_logits[0, 0, 1] = float("-inf")  # a banned (non-target) entry at a live position stays legal
    dirty_ids = c["ids"].masked_fill(~m, 10**6)
    dirty_ids[2, 0] = -100  # TRL's label padding
    nan = torch.full_like(c["old"], float("nan"))
    dirty, g_dirty = run(dirty_logits, dirty_ids, torch.where(m, c["old"], nan), torch.where(m, c["ref"], nan),
                         torch.where(m, adv, nan))
    assert torch.isfinite(dirty.loss) and torch.isfinite(g_dirty).all()
    assert torch.all(g_dirty[~m] == 0)
    assert torch.isfinite(dirty.logps).all() and torch.all(dirty.logps[~m] == 0)
    assert all(torch.isfinite(v) for v in dirty.metrics.values())
    # the banned entry changes the softmax of token (0, 0) only; compare with the limit logit = -1e30
    banned = c["logits"].clone()
    banned[0, 0, 1] = -1e30
    limit, g_limit = run(banned, c["ids"], c["old"], c["ref"], adv)
    torch.testing.assert_close(dirty.loss, limit.loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(g_dirty, g_limit, rtol=RTOL, atol=1e-15)
    for k in limit.metrics:
        torch.testing.assert_close(dirty.metrics[k], limit.metrics[k])
    assert not torch.equal(limit.loss, clean.loss)


def test_fully_masked_row_contributes_zero():
    """grpo: the empty row adds 0 to the sum but still counts in the mean over B (as in TRL)."""
    c = make_case("token", 1.0)
    opts = loss_options("grpo", 0.0, True, False)
    full = run_torch(c, opts, beta_ref=False)
    keep = torch.tensor([0, 1, 3, 4, 5])
    sub = {k: v[keep] for k, v in c.items()}
    part = run_torch(sub, opts, beta_ref=False)
    torch.testing.assert_close(full.loss, part.loss * 5 / 6, rtol=RTOL, atol=0)
    for lt in ("bnpo", "dapo", "cispo"):  # token-sum reductions: dropping the row changes nothing
        o = loss_options(lt, 0.3, True, False)
        torch.testing.assert_close(run_torch(c, o).loss, run_torch(sub, o).loss, rtol=RTOL, atol=0)


def test_all_masked_batch_is_zero_not_nan():
    c = make_case("token")
    c["mask"] = torch.zeros_like(c["mask"])
    for lt in LOSS_TYPES:
        for lvl in ("token", "sequence"):
            x = c["logits"].clone().requires_grad_(True)
            out = gk.grpo_loss(x, c["ids"], completion_mask=c["mask"], advantages=c["adv"], old_logps=c["old"],
                               ref_logps=c["ref"], importance_sampling_level=lvl, backend="torch",
                               **loss_options(lt, 0.3, True, False))
            out.loss.backward()
            assert out.loss.item() == 0.0 and torch.all(x.grad == 0), (lt, lvl)
            # TRL's values with no kept token: at token level the min / max over no sequence is NaN (at sequence
            # level the per-sequence flags of every sequence count, as TRL takes them: 0); phi(w = 1) = 1 for
            # every sequence (its mean is over sequences, kept or not); every other metric is 0
            empty = math.nan if lvl == "token" else 0.0
            want = {"clip_ratio/low_min": empty, "clip_ratio/high_max": empty, "vespo/phi_seq_mean": 1.0}
            for k, v in out.metrics.items():
                assert v.item() == pytest.approx(want.get(k, 0.0), nan_ok=True), (lt, lvl, k, v)


def test_target_next_to_banned_tokens_is_finite():
    logits = torch.tensor([[[0.0, float("-inf"), 1.0, float("-inf")]]], dtype=F64)
    ids = torch.tensor([[2]])
    x = logits.clone().requires_grad_(True)
    logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend="torch")
    want_logp = 1.0 - math.log(1 + math.e)
    p0, p2 = 1 / (1 + math.e), math.e / (1 + math.e)
    assert logp.item() == pytest.approx(want_logp, rel=RTOL)
    assert ent.item() == pytest.approx(-(p0 * math.log(p0) + p2 * math.log(p2)), rel=RTOL)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 0, 1] == 0 and x.grad[0, 0, 3] == 0


# --------------------------------------------------------------------------------------------------
# group advantages
# --------------------------------------------------------------------------------------------------
def np_advantages(r, G, scale, eps=1e-4):
    g = r.reshape(-1, G)
    centred = (g - g.mean(1, keepdims=True)).reshape(-1)
    if scale == "group":
        return centred / (np.repeat(g.std(1, ddof=1), G) + eps)
    if scale == "batch":
        return centred / (r.std(ddof=1) + eps)
    return centred


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_advantages_match_numpy(scale, G, dtype):
    g = torch.Generator().manual_seed(G)
    r = torch.randint(0, 3, (4 * G,), generator=g).to(dtype) + torch.rand(4 * G, generator=g, dtype=dtype)
    r[:G] = 0.75  # a zero-variance group
    got = gk.group_advantages(r, G, scale=scale)
    want = np_advantages(r.double().numpy(), G, scale)
    assert got.shape == (4 * G,) and got.dtype == dtype
    assert torch.isfinite(got).all()
    assert torch.all(got[:G] == 0)  # exactly 0: r - mean is exactly 0 for equal entries
    rtol = RTOL if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=1e-6 if dtype == torch.float32 else 0)


def test_group_advantages_hand():
    # group [0, 1]: mean 0.5, unbiased std sqrt(0.5); group [2, 2, ...]: A = 0
    r = torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=F64)
    s = math.sqrt(0.5)
    np.testing.assert_allclose(gk.group_advantages(r, 2).numpy(), [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0],
                               rtol=RTOL)
    batch_std = math.sqrt(((0 - 1.25) ** 2 + (1 - 1.25) ** 2 + 2 * (2 - 1.25) ** 2) / 3)
    np.testing.assert_allclose(gk.group_advantages(r, 2, scale="batch").numpy(),
                               np.array([-0.5, 0.5, 0, 0]) / (batch_std + 1e-4), rtol=RTOL)
    np.testing.assert_allclose(gk.group_advantages(r, 2, scale="none").numpy(), [-0.5, 0.5, 0, 0], rtol=RTOL)
    np.testing.assert_allclose(gk.group_advantages(r, 2, eps=0.5).numpy()[:2], [-0.5 / (s + 0.5), 0.5 / (s + 0.5)],
                               rtol=RTOL)


def test_rewards_path_equals_given_advantages():
    c = make_case("token", 0.7)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3, 0.2, 0.9], dtype=F64)  # second group: zero variance
    opts = loss_options("grpo", 0.3, True, True)
    a = gk.grpo_loss(c["logits"], c["ids"], completion_mask=c["mask"], rewards=rewards, group_size=2,
                     old_logps=c["old"], ref_logps=c["ref"], temperature=0.7, backend="torch", **opts)
    b = gk.grpo_loss(c["logits"], c["ids"], completion_mask=c["mask"],
                     advantages=torch.from_numpy(np_advantages(rewards.numpy(), 2, "group")), old_logps=c["old"],
                     ref_logps=c["ref"], temperature=0.7, backend="torch", **opts)
    torch.testing.assert_close(a.loss, b.loss, rtol=RTOL, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metrics_with_one_token_per_sequence(level):
    """T = 1: a [B, 1] tensor is then both a per-token and a per-sequence shape; the level decides.

    Token level: masked mean over tokens. Sequence level: per-sequence flags averaged over B (masked rows
    count, with flag 0), as for any T.
    """
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, 5, generator=g, dtype=F64)
    ids = torch.randint(0, 5, (4, 1), generator=g)
    mask = torch.tensor([[1], [1], [0], [1]], dtype=torch.bool)
    adv = torch.tensor([0.9, -0.7, 0.4, -0.2], dtype=F64)
    logp = _logp(logits, ids, 1.0)
    old = logp - torch.tensor([[1.5], [0.5], [1.0], [1.1]], dtype=F64).log()
    out = gk.grpo_loss(logits, ids, completion_mask=mask, advantages=adv, old_logps=old, loss_type="grpo",
                       importance_sampling_level=level, backend="torch")
    n_logp, ent = np_logp_entropy(logits.numpy(), ids.numpy(), 1.0)
    want, want_m = np_loss(n_logp, ent, mask.numpy(), adv.numpy(), old.numpy(), None, loss_type="grpo",
                           importance_sampling_level=level)
    assert out.loss.item() == pytest.approx(want, rel=RTOL)
    for k, v in want_m.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-6), k
    assert want_m["clip_ratio/high_mean"] == (1 / 3 if level == "token" else 1 / 4)


def test_sequence_weight_of_an_empty_row_is_zero():
    """w_b = sum_t m (logp - old) / max(sum_t m, 1): 0 for a row with no kept token (c1 = 1), never 0/0.

    The loss hides a NaN there (masked sums select, they do not multiply), so this is checked on the
    per-sequence weight itself, which fused backends compute and hand to their kernels.
    """
    c = make_case("sequence")
    logp = _logp(c["logits"], c["ids"], 1.0)
    w = logp_loss.log_importance_weights(logp, c["old"], c["mask"], "sequence")
    assert w.shape == (len(MASK), 1) and torch.isfinite(w).all()
    assert w[2].item() == 0.0
    terms = logp_loss.token_terms(logp, GRPOConfig(importance_sampling_level="sequence", beta=0.1), c["adv"],
                                  c["old"], c["ref"], c["mask"])
    assert terms.coef_1[2].item() == 1.0 and torch.isfinite(terms.loss_tok).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_logp_gradient_is_zero_at_masked_positions(loss_type, level):
    """The fused backends differentiate loss_from_logps w.r.t. logp [B, T] and feed dL/dlogp to their
    kernels: it must be exactly 0 (not NaN) at masked positions whatever old / ref / advantages hold there."""
    c = make_case(level)
    m = c["mask"]
    logp = _logp(c["logits"], c["ids"], 1.0).masked_fill(~m, 0.0).requires_grad_(True)
    nan = torch.full_like(c["old"], float("nan"))
    adv = torch.where(m, c["adv"].unsqueeze(-1).expand_as(m), nan)
    cfg = GRPOConfig(**loss_options(loss_type, 0.3, True, loss_type in CLIP_LOSS_TYPES),
                     importance_sampling_level=level)
    loss, mets = logp_loss.loss_from_logps(logp, cfg, adv, m, torch.where(m, c["old"], nan),
                                           torch.where(m, c["ref"], nan))
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.all(g[~m] == 0) and bool((g[m] != 0).any())
    assert all(torch.isfinite(v) for v in mets.values())


# --------------------------------------------------------------------------------------------------
# clip metrics at an exact bound: the inequalities are strict (docs/contract.md#metrics)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("opts", [dict(loss_type="grpo", epsilon_low=0.0, epsilon_high=0.0),
                                  dict(loss_type="dapo", epsilon_low=0.0),  # epsilon_high None -> 0 too
                                  dict(loss_type="cispo", epsilon_high=1.0)], ids=["grpo", "dapo", "cispo"])
def test_clip_metrics_are_strict_at_the_bound(level, opts):
    """On-policy every ratio is exp(0) = 1.0 exactly (token and sequence level). With eps_low = eps_high = 0
    both bounds are 1.0 too, as is cispo's raw bound 1.0: a ratio on a bound is not clipped, every flag is 0.
    (With <= / >= rows 0 (A = +1, 3 tokens) and 1 (A = -1, 2 tokens) would be flagged.)"""
    logits, ids, mask, adv, *_ = hand_inputs()
    out = gk.grpo_loss(logits, ids, completion_mask=mask, advantages=adv, importance_sampling_level=level,
                       backend="torch", **opts)
    flags = {k: v.item() for k, v in out.metrics.items() if k != "entropy"}
    want = {"cispo_clip_ratio"} if opts["loss_type"] == "cispo" else {
        "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
        "clip_ratio/high_max"}
    assert set(flags) == want
    assert all(v == 0.0 for v in flags.values()), flags


def test_clip_metric_of_a_ratio_clipped_onto_the_bound_by_delta():
    # delta 1.25 = 1 + eps_high (both exact in binary): row 0 token 0 (A=+1, c1 1.5) becomes exactly 1.25 after
    # the delta clip, on the upper bound: -min(1.25, 1.25) = -1.25 and it is NOT high-clipped (strict >).
    # Row 1 token 0 (A=-1, c1 1.5 -> 1.25): -min(-1.25, -1.25) = +1.25; row 1 token 1 (c1 0.5): +0.8, low-clipped.
    out = hand_loss(loss_type="grpo", epsilon_high=0.25, delta=1.25)
    assert out.loss.item() == pytest.approx(((-1.25 - 1.0 - 0.6) / 3 + (1.25 + 0.8) / 2) / 2, rel=RTOL)
    assert out.metrics["clip_ratio/high_mean"].item() == 0.0
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert out.metrics["clip_ratio/region_mean"].item() == pytest.approx(1 / 5)


def test_the_library_never_imports_the_oracle():
    """grpo_kernels.reference is for tests and benchmarks: no module of the library imports it (it would make
    the oracle part of what it checks), and ``import grpo_kernels`` does not load it."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    package = Path(gk.__file__).parent
    importers = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "reference.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            if any(n.split(".")[-1] == "reference" for n in names):
                importers.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not importers, importers
    code = "import sys, grpo_kernels, grpo_kernels.fused_linear; print('grpo_kernels.reference' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=package.parent).stdout.strip()
    assert loaded == "False"
