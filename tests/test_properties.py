"""Property tests (hypothesis): every fused backend agrees with the float64 reference on random inputs.

Each example draws a batch (B = P x G sequences, T tokens, V from 1 and a list of primes or any size up to a
few thousand), a dtype, a temperature, a strided view or not, a mask (everything kept, random, a fully masked
row, nothing kept) with garbage (NaN / inf logits, out-of-range ids, NaN old / ref log-probs and advantages)
at the masked positions, banned (-inf) tokens, advantages [B] / [B, T] or rewards with group size G (tied
groups included), on- or off-policy ratios, and the loss options: every loss type, importance level, beta,
KL bias correction, epsilon_low / epsilon_high, delta, max_completion_length, num_items_in_batch, inplace.
The loss, log-probs, gradient and metrics are checked by ``kernel_checks.check_loss``: the tolerance
rule of kernel_checks.py (derived from the dtype) on the log-probs; on the loss, the kl metric and the
gradient the same rule plus what the kernel's own log-prob errors imply (the float64 loss math applied to the
kernel's log-probs: a row's loss weight is one function of its log-prob, so without that term the rule on a
scalar or on a row of V gradient entries compares two single samples of a rounding error); clip ratios, which
jump at the clip bounds, within the bounds a log-prob error allows.
A second property checks ``token_logprobs`` (log-probs, entropy, gradient) on 1- to 3-dim leading shapes.

Logits are drawn as z * temperature with z ~ N(0, zstd^2), zstd <= 3 (|z| <~ 15, the range of LLM logits at
temperature 1); the token_logprobs property adds a common offset to every logit (0, or 100, -2000, 1e4 in raw
units): the kernels must not lose precision where |lse| is large (docs/contract.md#row-statistics;
tests/test_extreme_inputs.py tests logits of +-1e4 and temperature 1e-3 besides).

Off-policy log-ratios are moved at least 1e-3 away from the clip bounds (1 - eps_low, 1 + eps_high, delta,
the cispo bound): at a bound the gradient jumps, and which side an fp32 kernel lands on is a measure-zero
choice the spec leaves open. On-policy ratios are exactly 1 in every implementation, so eps = 0 (a ratio ON
the bound) is drawn too and checks the tie rules of torch.min / clamp.

Examples per backend (derandomized: CI runs the same examples every time): 500 (+200 for token_logprobs)
for the C++ CPU kernels; 40 (+20) under the Triton interpreter and 40 (+20) through the CUDA emulation, on
smaller shapes (both interpret or emulate every row); 300 (+100) for the GPU backends where there is one.
Failures found here became regular tests in tests/test_extreme_inputs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import DTYPES, backend_for_test, check_logprobs, check_loss, one_thread

from grpo_kernels import logp_loss, reference
from grpo_kernels.config import CLIP_LOSS_TYPES, LEVELS, LOSS_TYPES, GRPOConfig

pytestmark = [  # numpy warnings of the Triton interpreter on the NaN / inf garbage of masked rows
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

PRIMES = [2, 3, 5, 7, 11, 13, 31, 127, 257, 509, 1021, 2053, 2999]
INTERPRETED = not torch.cuda.is_available()  # triton runs under the interpreter here
# name -> (loss examples, token_logprobs examples, max rows B*T, max V)
PLAN = {
    "cpu": (500, 200, 24, 3000),
    "cuda": (300, 100, 24, 3000),
    "triton": (40, 20, 12, 2100) if INTERPRETED else (300, 100, 24, 3000),
    "cuda_emu": (40, 20, 8, 1100),
}
BACKENDS = [name for name in PLAN if name != "cuda" or torch.cuda.is_available()]
# standard deviation of z = logits / temperature (see the module docstring: |z| stays below ~15)
ZSTD = [0.5, 1.0, 2.0, 3.0]


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _vocab(max_v: int):
    return st.sampled_from([1] + [p for p in PRIMES if p <= max_v]) | st.integers(1, max_v)


@st.composite
def loss_cases(draw, max_rows: int, max_v: int) -> dict:
    G = draw(st.integers(2, 4))
    P = draw(st.integers(1, max(1, min(3, max_rows // G))))
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    clip = loss_type in CLIP_LOSS_TYPES
    return dict(
        B=G * P, G=G, T=draw(st.integers(1, max(1, min(6, max_rows // (G * P))))), V=draw(_vocab(max_v)),
        dtype=draw(st.sampled_from(DTYPES)), strided=draw(st.booleans()), zstd=draw(st.sampled_from(ZSTD)),
        banned=draw(st.booleans()),
        cfg=dict(
            loss_type=loss_type, importance_sampling_level=draw(st.sampled_from(LEVELS)),
            temperature=draw(st.sampled_from([1.0, 0.7, 1.5]) | st.floats(0.1, 10.0)),
            beta=draw(st.sampled_from([0.0, 0.0, 0.04, 0.5])), use_bias_correction_kl=draw(st.booleans()),
            epsilon_low=draw(st.sampled_from([0.2, 0.1, 0.3, 0.0])),
            epsilon_high=draw(st.sampled_from([1.0, 2.0, 5.0]) | st.floats(0.5, 6.0)) if loss_type == "cispo"
            else draw(st.none() | st.sampled_from([0.28, 0.4, 0.0])),
            delta=draw(st.none() | st.floats(1.05, 3.0)) if clip else None,
        ),
        mask=draw(st.sampled_from(["all", "random", "random", "row", "none"])),
        garbage=draw(st.sampled_from([None, "nan", "inf"])),
        adv=draw(st.sampled_from(["B", "BT", "rewards", "tied rewards"])),
        old_spread=draw(st.sampled_from([None, 0.05, 0.3, 1.0])),
        extra=draw(st.sampled_from([None, None, "max_completion_length", "num_items_in_batch"])),
        inplace=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def logits(B, T, V, dtype, strided, scale):
    """[B, T, V] logits; ``strided``: a view with row stride V + 5, a sliced batch and a storage offset (what
    kernel_checks.make_logits gives, also where the view happens to be contiguous, e.g. B = T = V = 1)."""
    if strided:
        return (torch.randn(2 * B, T + 3, V + 5) * scale).to(dtype)[::2, 1:-2, 2:-3]
    return (torch.randn(B, T, V) * scale).to(dtype)


def clip_bounds(cfg: GRPOConfig) -> list[float]:
    if cfg.loss_type == "cispo":
        return [cfg.resolved_epsilon_high]
    if cfg.loss_type == "sapo":
        return []
    return [b for b in (1 - cfg.epsilon_low, 1 + cfg.resolved_epsilon_high, cfg.delta) if b is not None and b > 0]


def avoid_clip_bounds(lp64, old, mask, cfg: GRPOConfig, margin=1e-3):
    """Shift old log-probs (of a token, or of a whole sequence at sequence level) so that no log-ratio lies
    within ``margin`` of a clip bound."""
    logb = [math.log(b) for b in clip_bounds(cfg)]
    old = old.double()
    for _ in range(10):
        w = logp_loss.log_importance_weights(lp64, old, mask, cfg.importance_sampling_level)
        near = torch.zeros(w.shape, dtype=torch.bool)
        for lb in logb:
            near |= (w - lb).abs() < margin
        if not near.any():
            break
        old = old - torch.where(near, 3 * margin, 0.0)
    return old.float()


def build_loss_case(c: dict):
    """-> (logits, ids, GRPOConfig, inputs of grpo_loss, inplace) of a drawn case."""
    torch.manual_seed(c["seed"])
    B, T, V, G = c["B"], c["T"], c["V"], c["G"]
    cfg = GRPOConfig(**c["cfg"])
    x = logits(B, T, V, c["dtype"], c["strided"], c["zstd"] * cfg.temperature)
    ids = torch.randint(0, V, (B, T))
    if c["banned"] and V > 1:  # banned tokens (never the sampled one), at most all but the target
        ban = torch.rand(B, T, V) < 0.3
        ban.scatter_(-1, ids.unsqueeze(-1), False)
        x[ban] = float("-inf")
    if c["mask"] == "all":
        mask = torch.ones(B, T, dtype=torch.bool)
    elif c["mask"] == "none":
        mask = torch.zeros(B, T, dtype=torch.bool)
    else:
        mask = torch.rand(B, T) > 0.3
        if c["mask"] == "row":
            mask[torch.randint(0, B, ())] = False
    lp64 = reference.token_logprobs(x.double(), ids, cfg.temperature, mask=mask)
    old = None
    if c["old_spread"] is not None:
        old = avoid_clip_bounds(lp64, lp64 + c["old_spread"] * torch.randn(B, T), mask, cfg)
    ref = (lp64 + 0.3 * torch.randn(B, T)).float()
    inputs = dict(completion_mask=mask, old_logps=old, ref_logps=ref if cfg.beta != 0 or c["seed"] % 3 == 0 else None)
    if c["adv"] == "B":
        inputs["advantages"] = torch.randn(B)
    elif c["adv"] == "BT":
        inputs["advantages"] = torch.randn(B, T)
    else:  # rewards -> group advantages; 0/1 rewards tie often, a constant group has A = 0
        r = torch.randn(B) if c["adv"] == "rewards" else torch.randint(0, 2, (B,)).float()
        if c["adv"] == "tied rewards":
            r[:G] = 0.5
        inputs.update(rewards=r, group_size=G)
    if c["extra"] == "max_completion_length":
        inputs["max_completion_length"] = int(torch.randint(1, 2 * T + 1, ()))
    elif c["extra"] == "num_items_in_batch":
        inputs["num_items_in_batch"] = int(torch.randint(1, 2 * B * T + 1, ()))
    if c["garbage"] is not None and not mask.all():  # what masked positions may hold: anything
        bad = float(c["garbage"])
        with torch.no_grad():
            x[~mask] = bad
        ids = ids.masked_fill(~mask, V + 3)
        ids[~mask & (torch.rand(B, T) < 0.5)] = -100
        for name in ("old_logps", "ref_logps"):
            if inputs[name] is not None:
                inputs[name] = inputs[name].masked_fill(~mask, bad)
        if c["adv"] == "BT":
            inputs["advantages"] = inputs["advantages"].masked_fill(~mask, bad)
    return x, ids, cfg, inputs, c["inplace"]


@st.composite
def logprob_cases(draw, max_rows: int, max_v: int) -> dict:
    B = draw(st.integers(1, 4))
    return dict(
        B=B, T=draw(st.integers(1, max(1, min(6, max_rows // B)))), V=draw(_vocab(max_v)),
        dtype=draw(st.sampled_from(DTYPES)), strided=draw(st.booleans()),
        zstd=draw(st.sampled_from(ZSTD)), banned=draw(st.booleans()),
        tau=draw(st.sampled_from([1.0, 0.7]) | st.floats(0.1, 10.0)), lead=draw(st.sampled_from([1, 2, 3])),
        entropy=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
        offset=draw(st.sampled_from([0.0, 0.0, 0.0, 100.0, -2000.0, 1e4])),
    )


def build_logprob_case(c: dict):
    torch.manual_seed(c["seed"])
    x = logits(c["B"], c["T"], c["V"], c["dtype"], c["strided"], c["zstd"] * c["tau"])
    if c["offset"]:  # in fp32, then rounded once to the dtype (bf16 spacing at 1e4 is 64: many exact ties)
        x.copy_((x.float() + c["offset"]).to(x.dtype))
    ids = torch.randint(0, c["V"], (c["B"], c["T"]))
    if c["banned"] and c["V"] > 1:
        ban = torch.rand(x.shape) < 0.3
        ban.scatter_(-1, ids.unsqueeze(-1), False)
        x[ban] = float("-inf")
    if c["lead"] == 1:  # logits [T, V]
        return x[0], ids[0]
    if c["lead"] == 3:  # logits [1, B, T, V]
        return x.unsqueeze(0), ids.unsqueeze(0)
    return x, ids


@pytest.mark.parametrize("name", BACKENDS)
def test_loss_agrees_with_reference(name, request):
    backend, device = backend_for_test(name, request)
    n_loss, _, max_rows, max_v = PLAN[name]

    @_settings(n_loss)
    @given(case=loss_cases(max_rows, max_v))
    def prop(case):
        with one_thread():
            x, ids, cfg, inputs, inplace = build_loss_case(case)
        check_loss(x, ids, cfg, backend, inputs, inplace=inplace, device=device)

    prop()


@pytest.mark.parametrize("name", BACKENDS)
def test_logprobs_agree_with_reference(name, request):
    backend, device = backend_for_test(name, request)
    _, n_lp, max_rows, max_v = PLAN[name]

    @_settings(n_lp)
    @given(case=logprob_cases(max_rows, max_v))
    def prop(case):
        x, ids = build_logprob_case(case)
        check_logprobs(x, ids, case["tau"], backend, device, entropy=case["entropy"])

    prop()
