"""Extreme inputs, each a test, against every fused backend: the C++ CPU kernels, Triton (the interpreter on
CPU tensors here, the GPU where there is one), the CUDA kernels through their CPU emulation (and on a GPU).

Checks are those of ``kernel_checks`` (float64 reference, the tolerance rule derived from the dtype, non-finite
values only where the reference has them):
- logits of +-1e4; banned (-inf) tokens and rows that are -inf except the target; fp16 near its range (+-65504,
  subnormals); temperature 1e-3 and 1e3; old_logps 80 nats away from logps (ratio exp(+-80)); all rewards equal
  in a group; a fully masked batch (loss 0, finite zero gradient); NaN / inf garbage at masked positions.

Regression tests of the two numerical choices of docs/contract.md#row-statistics, on every backend:
- test_fp32_logprob_gradient_at_large_lse: the backward takes p from the pair (m, log s), so fp32 log-prob
  gradients stay within the dtype rule where |lse| is large (logits ~1e4, temperature 1e-3);
- test_single_token_vocabulary_and_peaked_rows / _cpu_every_isa: d = (x - max x) / tau with the shift first,
  so a V = 1 row has logp = 0 and entropy = 0 exactly and no top token gets logp > 0, in every CPU ISA build.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import (
    DTYPES,
    LOSS_TYPES,
    backend_for_test,
    check_logprobs,
    check_loss,
    loss_outputs,
    one_thread,
)

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels.config import CLIP_LOSS_TYPES, GRPOConfig

pytestmark = [  # numpy warnings of the Triton interpreter on -inf / NaN rows
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

BACKENDS = ["cpu", "triton", "cuda_emu"] + (["cuda"] if torch.cuda.is_available() else [])
LEVELS = ["token", "sequence"]
NAN, INF = float("nan"), float("inf")

def ref_logps(*args, **kw):
    with one_thread():
        return reference.token_logprobs(*args, **kw)


def thin(items: list, backend: str, salt: int = 0, fast: int = 1) -> list:
    """Every ``fast``-th of ``items`` on the fast backends, every ``3 * fast``-th where every row is interpreted
    or emulated (Triton interpreter, CUDA emulation); starting from ``salt``, so that the parameters of a test
    together cover all."""
    slow = backend.startswith("cuda_emu") or (backend == "triton" and not torch.cuda.is_available())
    k = 3 * fast if slow else fast
    return items[salt % k :: k]


@pytest.fixture(params=BACKENDS)
def be(request):
    """(backend, device) of each fused backend (skipped where it cannot run)."""
    return backend_for_test(request.param, request)


def on_policy_inputs(x, tau, *, B, T, p_keep=0.8, spread=0.3):
    """ids, and grpo_loss inputs with a random mask, advantages, old / ref log-probs around the reference's."""
    ids = torch.randint(0, x.shape[-1], (B, T))
    mask = torch.rand(B, T) < p_keep
    mask[0, 0] = True
    lp = ref_logps(x.double(), ids, tau, mask=mask)
    return ids, dict(completion_mask=mask, advantages=torch.randn(B),
                     old_logps=(lp + spread * torch.randn(B, T)).float(),
                     ref_logps=(lp + 0.3 * torch.randn(B, T)).float())


def check_everything(x, tau, be, *, B, T):
    """token_logprobs (values and gradient, with and without the entropy) and grpo_loss at both importance levels,
    against the float64 reference."""
    backend, device = be
    ids = torch.randint(0, x.shape[-1], (B, T))
    check_logprobs(x, ids, tau, backend, device, entropy=True)
    check_logprobs(x, ids, tau, backend, device, entropy=False)
    ids, inputs = on_policy_inputs(x, tau, B=B, T=T)
    for level in LEVELS:
        cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04, delta=2.0, temperature=tau)
        check_loss(x, ids, cfg, backend, inputs, device=device)


# --------------------------------------------------------------------------------------------------
# large magnitudes and extreme temperatures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_plus_minus_1e4(be, dtype):
    """Half the vocabulary at +1e4, half at -1e4 (+ N(0, 1)): p = 0 exactly for the -1e4 half, logp ~ -2e4 there;
    the entropy through (s, t) has no cancellation; p from (m, log s), not from a rounded lse ~1e4."""
    x = (torch.where(torch.rand(3, 3, 257) < 0.5, 1e4, -1e4) + torch.randn(3, 3, 257)).to(dtype)
    check_everything(x, 1.0, be, B=3, T=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tau", [1e-3, 1e3])
def test_temperature_extremes(be, dtype, tau):
    """tau = 1e-3 (z ~ 3e3: near-greedy, gradients ~1/tau = 1e3) and tau = 1e3 (z ~ 3e-3: near-uniform)."""
    x = (torch.randn(3, 3, 257) * 3).to(dtype)
    check_everything(x, tau, be, B=3, T=3)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_fp16_near_its_range(be, tau):
    """fp16 logits at +-65504 (the largest half; spacing 32 there), a row of the largest values side by side, a
    row of subnormals (~6e-8 .. 6e-5) and one mixing both; z = x / tau leaves the fp16 range at tau = 0.5 (the
    kernels compute in fp32). Gradients ~1e-8 are fp16 subnormals."""
    x = (torch.rand(3, 2, 211) * 2 - 1) * 65504
    x[0, 0] = 65504 - 32 * torch.randint(0, 4, (211,))  # many entries at the top of the range
    x[1, 0] = torch.randn(211) * 1e-5  # subnormal halves
    x[2, 1] = torch.where(torch.rand(211) < 0.5, 65504.0, -65504.0)
    x[2, 1, :50] = torch.randn(50) * 1e-6
    check_everything(x.half(), tau, be, B=3, T=2)


# --------------------------------------------------------------------------------------------------
# banned tokens
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_banned_tokens_and_rows_banned_but_the_target(be, dtype):
    """-inf logits (banned tokens: half the vocabulary, never the sampled token), rows that are -inf except the
    target (logp = 0, entropy = 0, zero gradient) and except two tokens."""
    backend, device = be
    B, T, V = 3, 3, 263
    x = (torch.randn(B, T, V) * 3).to(dtype)
    ids = torch.randint(0, V, (B, T))
    ban = torch.rand(B, T, V) < 0.5
    ban.scatter_(-1, ids.unsqueeze(-1), False)
    x[ban] = -INF
    x[1, 0] = -INF  # everything banned but the target
    x[1, 0, ids[1, 0]] = 1.5
    x[2, 2] = -INF  # everything banned but the target and one other token
    x[2, 2, ids[2, 2]] = -2.0
    x[2, 2, (ids[2, 2] + 1) % V] = 3.0
    check_logprobs(x, ids, 0.8, backend, device, entropy=True)
    check_logprobs(x, ids, 0.8, backend, device, entropy=False)
    xi = x.detach().clone().to(device).requires_grad_()
    logp, ent = gk.token_logprobs(xi, ids.to(device), temperature=0.8, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert logp[1, 0].item() == 0.0 and ent[1, 0].item() == 0.0
    assert torch.all(xi.grad[1, 0] == 0), "only the target left: a zero gradient, no NaN"
    mask = torch.ones(B, T, dtype=torch.bool)
    lp = ref_logps(x.double(), ids, 0.8)
    inputs = dict(completion_mask=mask, advantages=torch.randn(B), old_logps=(lp + 0.3 * torch.randn(B, T)).float(),
                  ref_logps=(lp + 0.3 * torch.randn(B, T)).float())
    for level in LEVELS:
        cfg = GRPOConfig(loss_type="dapo", importance_sampling_level=level, beta=0.04, temperature=0.8)
        check_loss(x, ids, cfg, backend, inputs, device=device)


# --------------------------------------------------------------------------------------------------
# importance ratios exp(+-80)
# --------------------------------------------------------------------------------------------------
def ratio_configs(dtype, sign):
    """Every loss type and importance level, with and without delta / KL, whose gradient is representable in
    ``dtype``: a ratio e^80 = 5.5e34 times A is beyond fp16 (65504) wherever it reaches the gradient unclipped."""
    cfgs = []
    for loss_type in LOSS_TYPES:
        for delta in ([None, 2.0] if loss_type in CLIP_LOSS_TYPES else [None]):
            for beta, bias in ((0.0, True), (0.04, True), (0.04, False)):
                unbounded = (loss_type in CLIP_LOSS_TYPES and delta is None) or (beta != 0 and bias)
                if dtype == torch.float16 and sign > 0 and unbounded:
                    continue
                cfgs.append(dict(loss_type=loss_type, delta=delta, beta=beta, use_bias_correction_kl=bias,
                                 epsilon_high=5.0 if loss_type == "cispo" else None,
                                 importance_sampling_level=LEVELS[len(cfgs) % 2]))
    return cfgs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", [1, -1], ids=["ratio e^80", "ratio e^-80"])
def test_importance_ratio_exp_pm_80(be, dtype, sign):
    """old_logps = logps -+ 80 (+ N(0, 0.3^2)): ratios ~e^+-80, 5.5e34 and 1.8e-35, both finite in fp32; the loss
    and gradient reach ~1e34 (fp32 / bf16) or vanish; the clip metrics are 0 or 1."""
    backend, device = be
    B, T, V = 2, 3, 131
    x = (torch.randn(B, T, V) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.8
    mask[0, 0] = True
    lp = ref_logps(x.double(), ids, mask=mask)
    old = (lp - sign * 80 + 0.3 * torch.randn(B, T)).float()
    inputs = dict(completion_mask=mask, advantages=torch.tensor([1.3, -0.7]), old_logps=old,
                  ref_logps=(lp + 0.3 * torch.randn(B, T)).float())
    for kw in thin(ratio_configs(dtype, sign), backend, 2 * DTYPES.index(dtype) + (sign > 0), fast=2):
        cfg = GRPOConfig(**kw)
        k = check_loss(x, ids, cfg, backend, inputs, device=device)
        assert torch.isfinite(k.loss) and torch.isfinite(k.grad).all(), f"{cfg}: non-finite loss or gradient"


# --------------------------------------------------------------------------------------------------
# degenerate batches
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_rewards_equal_in_a_group(be, loss_type):
    """rewards with group_size: a group whose rewards are all equal has A = 0 (std 0 + eps), so without KL its
    tokens contribute exactly 0 to the loss and get an exactly zero gradient; a batch of such groups has loss 0."""
    backend, device = be
    level = LEVELS[LOSS_TYPES.index(loss_type) % 2]
    B, T, V, G = 6, 2, 97, 3
    x = torch.randn(B, T, V) * 2
    ids = torch.randint(0, V, (B, T))
    lp = ref_logps(x.double(), ids)
    old = (lp + 0.3 * torch.randn(B, T)).float()
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.3])  # group 0 tied, group 1 not
    for beta in (0.0, 0.04):
        cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                         epsilon_high=4.0 if loss_type == "cispo" else None)
        inputs = dict(rewards=rewards, group_size=G, old_logps=old, ref_logps=(lp + 0.2).float())
        k = check_loss(x, ids, cfg, backend, inputs, device=device)
        if beta == 0.0:
            assert torch.all(k.grad[:G] == 0), "A = 0: the tied group's gradient must be exactly 0"
            inputs = dict(inputs, rewards=torch.full((B,), 0.25))
            k = check_loss(x, ids, cfg, backend, inputs, device=device)
            assert k.loss.item() == 0.0 and torch.all(k.grad == 0), "every group tied: loss 0, zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_fully_masked_batch(be, dtype, level, inplace):
    """Nothing kept, every logit NaN, every id out of range, NaN old / ref / advantages: loss 0, logps 0, an exact
    (finite) zero gradient and zero metrics, for every loss type; except clip_ratio/low_min and high_max, TRL's
    nanmin / nanmax over sequences, which are NaN when no sequence has a kept token (as TRL logs them)."""
    backend, device = be
    B, T, V = 2, 3, 67
    x = torch.full((B, T, V), NAN, dtype=dtype)
    ids = torch.full((B, T), V + 7)
    nan = torch.full((B, T), NAN)
    inputs = dict(completion_mask=torch.zeros(B, T, dtype=torch.bool), advantages=nan, old_logps=nan, ref_logps=nan)
    for loss_type in thin(LOSS_TYPES, backend, DTYPES.index(dtype) + inplace):
        cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
        loss, logps, grad, metrics = loss_outputs(x, ids, cfg, backend, inputs, inplace=inplace, device=device)
        assert loss.item() == 0.0, f"{loss_type}: loss {loss.item()}"
        assert torch.equal(logps, torch.zeros(B, T))
        assert grad.dtype == dtype and torch.equal(grad, torch.zeros(B, T, V, dtype=dtype)), loss_type
        over_sequences = {"clip_ratio/low_min", "clip_ratio/high_max"}
        assert all(v.item() == 0.0 for k, v in metrics.items() if k not in over_sequences), metrics
        assert all(math.isnan(v.item()) for k, v in metrics.items() if k in over_sequences), metrics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_garbage_at_masked_positions_does_not_leak(be, dtype, level):
    """NaN / +inf / -inf logits, ids outside [0, V), NaN old / ref log-probs and [B, T] advantages at masked
    positions give bit for bit the results of clean values there: the same loss, logps, metrics and gradient,
    exact zeros at the masked rows, no NaN anywhere (every other loss type with inplace=True)."""
    backend, device = be
    B, T, V = 3, 4, 151
    x = (torch.randn(B, T, V) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.6
    mask[0, 0], mask[1] = True, False  # a fully masked sequence too
    lp = ref_logps(x.double(), ids)
    clean = dict(completion_mask=mask, advantages=torch.randn(B, T), old_logps=(lp + 0.3 * torch.randn(B, T)).float(),
                 ref_logps=(lp + 0.3 * torch.randn(B, T)).float())
    xg, idg = x.clone(), ids.clone()
    for i, bad in enumerate([NAN, INF, -INF]):
        sel = ~mask & (torch.arange(B * T).view(B, T) % 3 == i)
        xg[sel] = bad
    xg[~mask & (torch.rand(B, T) < 0.3), 5] = NAN  # NaN among finite garbage too
    idg[~mask] = V + 11
    idg[~mask & (torch.rand(B, T) < 0.5)] = -100
    garbage = dict(clean, advantages=clean["advantages"].masked_fill(~mask, NAN),
                   old_logps=clean["old_logps"].masked_fill(~mask, NAN),
                   ref_logps=clean["ref_logps"].masked_fill(~mask, INF))
    todo = thin(LOSS_TYPES, backend, DTYPES.index(dtype) + LEVELS.index(level))
    for i, loss_type in enumerate(LOSS_TYPES):
        if loss_type not in todo:
            continue
        inplace = bool(i % 2)
        cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                         epsilon_high=4.0 if loss_type == "cispo" else None)
        a = loss_outputs(x, ids, cfg, backend, clean, inplace=inplace, device=device)
        g = loss_outputs(xg, idg, cfg, backend, garbage, inplace=inplace, device=device)
        assert torch.isfinite(g.loss) and torch.isfinite(g.logps).all() and torch.isfinite(g.grad).all(), loss_type
        assert torch.equal(a.loss, g.loss) and torch.equal(a.logps, g.logps), \
            f"{loss_type}: garbage changed the loss / logps"
        assert torch.equal(a.grad, g.grad) and torch.all(g.grad[~mask] == 0), \
            f"{loss_type}: garbage reached the gradient"
        assert a.metrics.keys() == g.metrics.keys(), loss_type
        assert all(torch.equal(a.metrics[n], g.metrics[n]) for n in a.metrics), loss_type
        if loss_type == todo[0]:  # and against the reference, once (the values are tested elsewhere too)
            check_loss(xg, idg, cfg, backend, garbage, inplace=inplace, device=device)


# --------------------------------------------------------------------------------------------------
# regression tests of the row statistics (docs/contract.md#row-statistics)
# --------------------------------------------------------------------------------------------------
def large_lse_cases():
    torch.manual_seed(1)
    pm = torch.where(torch.rand(8, 4, 257) < 0.5, 1e4, -1e4) + torch.randn(8, 4, 257)
    return {"logits +-1e4": (pm, 1.0), "logits 1e4 + N(0,1)": (1e4 + torch.randn(8, 4, 257), 1.0),
            "temperature 1e-3": (torch.randn(8, 4, 257) * 3, 1e-3)}


@pytest.mark.parametrize("case", list(large_lse_cases()))
def test_fp32_logprob_gradient_at_large_lse(be, case):
    """fp32 dL/dlogits of L = w . logp (no entropy) where |lse| is large, within the rule (p from the pair
    (m, log s); p from one rounded lse misses the rule by 8x-340x on these cases)."""
    backend, device = be
    x, tau = large_lse_cases()[case]
    check_logprobs(x, torch.randint(0, 257, (8, 4)), tau, backend, device, entropy=False)


def check_single_token_and_peaked_rows(backend, device):
    """V = 1: logp = 0 and entropy = 0 exactly (x - m = 0, log s = 0); a peaked row's top token: logp <= 0."""
    x = torch.tensor([15.41, -2.9343, 301.7, -88.0]).view(2, 2, 1)
    for tau in (0.109375, 1.0, 0.7):
        logp, ent = gk.token_logprobs(x.to(device), torch.zeros(2, 2, dtype=torch.long, device=device),
                                      temperature=tau, return_entropy=True, backend=backend)
        assert torch.equal(logp.cpu(), torch.zeros(2, 2)), f"V = 1, tau = {tau}: logp {logp.flatten().tolist()}"
        assert torch.equal(ent.cpu(), torch.zeros(2, 2)), f"V = 1, tau = {tau}: entropy {ent.flatten().tolist()}"
    peaked = torch.tensor([[[300.0, 0.0], [40.3, 1.0]]])
    logp = gk.token_logprobs(peaked.to(device), torch.zeros(1, 2, dtype=torch.long, device=device),
                             temperature=0.109375, backend=backend)
    assert torch.all(logp.cpu() <= 0), f"a log-probability above 0: {logp.flatten().tolist()}"


def test_single_token_vocabulary_and_peaked_rows(be):
    backend, device = be
    check_single_token_and_peaked_rows(backend, device)


def test_single_token_vocabulary_cpu_every_isa():
    """Every build of the C++ CPU kernels (baseline, and AVX2 / AVX-512 where the CPU has them): the cases
    above in each, so that no build forms d as x * (1/tau) - m / tau (grpo_boundary.h, "Shifted logits")."""
    from grpo_kernels import _cpu

    isa = _cpu.isa()
    try:
        for name in _cpu.ISAS:
            if _cpu.set_isa(name):
                check_single_token_and_peaked_rows("cpu", "cpu")
    finally:
        _cpu.set_isa(isa)
