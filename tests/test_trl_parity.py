"""Parity with TRL 1.16's own code: ``GRPOTrainer._compute_loss`` run on the same inputs.

TRL's method is called for real, on a GRPOTrainer instance built without ``__init__`` that carries only
the attributes ``_compute_loss`` reads (one process, no gradient accumulation, no vLLM, no entropy mask,
no entropy bonus, training mode). Two ways of feeding it log-probs:

- ``_get_per_token_logps_and_entropies`` replaced by TRL's own ``selective_log_softmax_and_entropy`` on
  fixed float64 logits: loss, gradient w.r.t. the logits and the metrics must agree to float64 rounding
  (rtol 1e-10: the two sum in different orders) for every loss type, level, beta (with / without KL bias
  correction), delta, on- / off-policy, temperature, num_items_in_batch and max_completion_length;
- end to end through TRL's real ``_get_per_token_logps_and_entropies`` with a tiny random Llama patched by
  TRL's ``add_fused_lm_head`` (TRL's chunked LM head, which computes in fp32), against our loss on
  ``model(...).logits[:, P-1:-1]``: agreement to fp32 rounding, gradient w.r.t. every model parameter.

TRL also logs ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (min / max over sequences); those are not
part of SPEC section 1 and are not produced here. Advantages: TRL computes them inside generation; the
test below reproduces those lines with TRL's own ``nanstd``.
"""

from __future__ import annotations

import collections
import contextlib
import types

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.config import CLIP_LOSS_TYPES, LOSS_TYPES

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

F64 = torch.float64
TRL_ONLY_METRICS = {"clip_ratio/low_min", "clip_ratio/high_max"}


class OneProcessAccelerator:
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def autocast(self):
        return contextlib.nullcontext()


# TRL builds the sapo temperatures with torch.where(A > 0, pos, neg) from Python floats: an fp32 tensor
# whatever the dtype of the loss, so 1.05 is rounded to fp32 there. Temperatures exactly representable in
# fp32 keep the float64 comparison exact; test_parity_sapo_temperatures covers 1.05 at fp32 rounding.
SAPO_EXACT = (1.0, 1.125)


def trl_trainer(loss_type, level, beta, bias_correction, delta, eps_low, eps_high, max_completion_length,
                sapo=SAPO_EXACT):
    """A GRPOTrainer with exactly the state _compute_loss reads (TRL 1.16)."""
    t = object.__new__(trl_grpo.GRPOTrainer)
    args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, sapo_temperature_pos=sapo[0],
                                 sapo_temperature_neg=sapo[1], steps_per_generation=1)
    state = dict(
        args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=eps_low,
        epsilon_high=eps_high, max_completion_length=max_completion_length, top_entropy_quantile=1.0,
        aux_loss_enabled=False, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, model=torch.nn.Linear(1, 1), current_gradient_accumulation_steps=1,
        accelerator=OneProcessAccelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    for k, v in state.items():
        setattr(t, k, v)
    return t


def trl_metrics(trainer):
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


# the ratio design of test_reference.py: every clip region is hit (B = 6, G = 2, T = 3)
MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]]
ADV = [0.8, -1.1, 0.5, -0.6, 0.3, -0.9]
TOKEN_RATIOS = [[1.5, 1.05, 0.6], [0.5, 2.0, 1.1], [1.0, 1.0, 1.0], [0.7, 1.0, 1.45], [0.9, 1.1, 1.15],
                [1.0, 0.95, 1.7]]
SEQ_RATIOS = [1.45, 0.6, 1.0, 2.0, 1.1, 0.9]
SEQ_JITTER = [[0.1, -0.2, 0.1], [0.15, -0.15, 0.3], [0.0, 0.0, 0.0], [0.1, 0.5, -0.1], [0.05, -0.1, 0.05],
              [0.4, 0.1, -0.1]]
EL, EH, DELTA, CISPO_EH = 0.2, 0.28, 1.6, 1.3


def make_inputs(level, temperature, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = len(MASK), 3
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if level == "token":
        log_ratio = torch.tensor(TOKEN_RATIOS, dtype=F64).log()
    else:
        log_ratio = torch.tensor(SEQ_RATIOS, dtype=F64).log().unsqueeze(-1) + torch.tensor(SEQ_JITTER, dtype=F64)
    return dict(logits=logits, ids=ids, mask=torch.tensor(MASK), adv=torch.tensor(ADV, dtype=F64),
                old=logp - log_ratio, ref=logp + torch.rand(B, T, generator=g, dtype=F64) - 0.5)


def run_trl(x, trainer, temperature, old_logps, ref_logps, num_items_in_batch):
    logits = x["logits"].clone().requires_grad_(True)

    def logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **kw):
        assert logits_to_keep == x["ids"].shape[1]
        lp, ent = trl_utils.selective_log_softmax_and_entropy(logits, x["ids"], temperature=temperature,
                                                               row_mask=x["mask"])
        return lp, ent, None

    trainer._get_per_token_logps_and_entropies = types.MethodType(logps_and_entropies, trainer)
    B = x["ids"].shape[0]
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=x["ids"], completion_mask=x["mask"], advantages=x["adv"],
                  num_items_in_batch=torch.as_tensor(num_items_in_batch))
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), logits.grad, trl_metrics(trainer)


def run_ours(x, temperature, old_logps, ref_logps, **opts):
    logits = x["logits"].clone().requires_grad_(True)
    out = gk.grpo_loss(logits, x["ids"], completion_mask=x["mask"], advantages=x["adv"], old_logps=old_logps,
                       ref_logps=ref_logps, temperature=temperature, backend="torch", **opts)
    out.loss.backward()
    return out.loss.detach(), logits.grad, {k: v.item() for k, v in out.metrics.items()}


def assert_same(ours, trl, rtol):
    (l1, g1, m1), (l2, g2, m2) = ours, trl
    torch.testing.assert_close(l1, l2.to(l1.dtype), rtol=rtol, atol=1e-14)
    torch.testing.assert_close(g1, g2.to(g1.dtype), rtol=rtol, atol=1e-14)
    assert set(m1) <= set(m2) and set(m2) - set(m1) <= TRL_ONLY_METRICS, (sorted(m1), sorted(m2))
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-7), k  # ours are fp32 tensors


CASES = [
    (lt, lvl, beta, bc, delta, off)
    for lt in LOSS_TYPES
    for lvl in ("token", "sequence")
    for beta, bc in ((0.0, True), (0.04, True), (0.04, False))
    for delta in ((None, DELTA) if lt in CLIP_LOSS_TYPES else (None,))
    for off in (False, True)
]


@pytest.mark.parametrize(
    "case", CASES,
    ids=[f"{lt}-{lvl}-beta{b}{'' if bc else '-nobc'}{'-delta' if d else ''}-{'off' if o else 'on'}"
         for lt, lvl, b, bc, d, o in CASES],
)
def test_parity_with_trl_compute_loss(case):
    loss_type, level, beta, bc, delta, off_policy = case
    temperature = 0.7 if off_policy else 1.0
    x = make_inputs(level, temperature)
    eh = CISPO_EH if loss_type == "cispo" else EH
    T = x["ids"].shape[1]
    n_items = int(x["mask"].sum())
    trainer = trl_trainer(loss_type, level, beta, bc, delta, EL, eh, max_completion_length=T)
    old = x["old"] if off_policy else None
    ref = x["ref"] if beta else None
    trl = run_trl(x, trainer, temperature, old, ref, n_items)
    ours = run_ours(x, temperature, old, ref, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                    use_bias_correction_kl=bc, delta=delta, epsilon_low=EL, epsilon_high=eh,
                    sapo_temperature_pos=SAPO_EXACT[0], sapo_temperature_neg=SAPO_EXACT[1])
    assert_same(ours, trl, rtol=1e-10)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_parity_num_items_in_batch(loss_type):
    """A normaliser from outside the micro-batch (gradient accumulation / several ranks)."""
    x = make_inputs("token", 0.7)
    eh = CISPO_EH if loss_type == "cispo" else EH
    trainer = trl_trainer(loss_type, "token", 0.04, True, None, EL, eh, max_completion_length=3)
    trl = run_trl(x, trainer, 0.7, x["old"], x["ref"], 37)
    ours = run_ours(x, 0.7, x["old"], x["ref"], loss_type=loss_type, beta=0.04, epsilon_low=EL, epsilon_high=eh,
                    num_items_in_batch=37)
    assert_same(ours, trl, rtol=1e-10)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_delta_below_the_clip_range(level):
    """delta < 1 + eps_high: the delta clip then changes which ratios the clip metrics count."""
    x = make_inputs(level, 0.7)
    trainer = trl_trainer("bnpo", level, 0.0, True, 1.1, EL, EH, max_completion_length=3)
    trl = run_trl(x, trainer, 0.7, x["old"], None, 0)
    ours = run_ours(x, 0.7, x["old"], None, loss_type="bnpo", importance_sampling_level=level, delta=1.1,
                    epsilon_low=EL, epsilon_high=EH)
    assert_same(ours, trl, rtol=1e-10)
    assert trl[2]["clip_ratio/high_mean"] == 0.0  # every ratio above 1 + EH is capped at 1.1 first


def test_parity_dr_grpo_max_completion_length():
    x = make_inputs("token", 0.7)
    trainer = trl_trainer("dr_grpo", "token", 0.0, True, None, EL, EH, max_completion_length=16)
    trl = run_trl(x, trainer, 0.7, x["old"], None, 0)
    ours = run_ours(x, 0.7, x["old"], None, loss_type="dr_grpo", epsilon_low=EL, epsilon_high=EH,
                    max_completion_length=16)
    assert_same(ours, trl, rtol=1e-10)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("pos,neg,rtol", [(0.625, 1.875, 1e-10), (1.875, 0.625, 1e-10), (1.0, 1.05, 1e-6)])
def test_parity_sapo_temperatures(level, pos, neg, rtol):
    """rtol 1e-6 for 1.05: TRL rounds it to fp32 (relative 2e-8, amplified by the sigmoid's slope)."""
    x = make_inputs(level, 1.3)
    trainer = trl_trainer("sapo", level, 0.0, True, None, EL, EH, 3, sapo=(pos, neg))
    trl = run_trl(x, trainer, 1.3, x["old"], None, 0)
    ours = run_ours(x, 1.3, x["old"], None, loss_type="sapo", importance_sampling_level=level,
                    sapo_temperature_pos=pos, sapo_temperature_neg=neg)
    assert_same(ours, trl, rtol=rtol)


# A fractional completion_mask: TRL multiplies by it in every sum ((l * m).sum(-1) / m.sum(-1), the GSPO
# mean log-ratio, the metrics' masked means) and uses it as the normaliser; 2 counts a token twice. A row of
# weights summing to 0.5 meets TRL's clamp(min=1) of the normaliser.
WEIGHTS = [[1, 1, 0.5], [0.5, 1, 0], [0, 0, 0], [2, 0, 0.25], [1, 1, 1], [0, 0.25, 0.25]]
WEIGHT_CASES = [(lt, lvl, beta) for lt in LOSS_TYPES for lvl in ("token", "sequence") for beta in (0.0, 0.04)]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[f"{lt}-{lvl}-beta{b}" for lt, lvl, b in WEIGHT_CASES])
def test_parity_fractional_completion_mask(case):
    loss_type, level, beta = case
    x = make_inputs(level, 0.7)
    x["mask"] = torch.tensor(WEIGHTS, dtype=F64)
    eh = CISPO_EH if loss_type == "cispo" else EH
    trainer = trl_trainer(loss_type, level, beta, True, None, EL, eh, max_completion_length=4)
    trl = run_trl(x, trainer, 0.7, x["old"], x["ref"] if beta else None, float(x["mask"].sum()))
    ours = run_ours(x, 0.7, x["old"], x["ref"] if beta else None, loss_type=loss_type,
                    importance_sampling_level=level, beta=beta, epsilon_low=EL, epsilon_high=eh,
                    max_completion_length=4, sapo_temperature_pos=SAPO_EXACT[0],
                    sapo_temperature_neg=SAPO_EXACT[1])
    assert_same(ours, trl, rtol=1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fractional_mask_is_not_a_binary_mask(loss_type):
    """The regression: [1, 1, 0.5, 0.5, 0] once gave the loss of [1, 1, 1, 1, 0]; now TRL's value, and another."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, dtype=F64)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    x = dict(logits=logits, ids=ids, adv=torch.tensor([0.7, -1.3], dtype=F64),
             old=logp - 0.3 * torch.randn(2, 5, generator=g, dtype=F64))
    losses = {}
    for name, row in (("weights", [1, 1, 0.5, 0.5, 0]), ("binary", [1, 1, 1, 1, 0])):
        x["mask"] = torch.tensor([row, [1, 1, 1, 0, 0]], dtype=F64)
        trainer = trl_trainer(loss_type, "token", 0.0, True, None, EL, EH, max_completion_length=5)
        trl = run_trl(x, trainer, 1.0, x["old"], None, float(x["mask"].sum()))
        ours = run_ours(x, 1.0, x["old"], None, loss_type=loss_type, epsilon_low=EL, epsilon_high=EH)
        assert_same(ours, trl, rtol=1e-10)
        losses[name] = ours[0].item()
    assert abs(losses["weights"] - losses["binary"]) > 1e-3, losses


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl_formula(scale):
    """TRL 1.16 _generate_and_score_completions ("sum_then_normalize", no NaN rewards), with TRL's nanstd."""
    G = 4
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.2, 0.2, 0.2, 0.2, 3.0, -1.0, 0.0, 2.5], dtype=F64)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    want = rewards - mean
    if scale != "none":
        want = want / (std + 1e-4)
    got = gk.group_advantages(rewards, G, scale=scale)
    # TRL's nanstd forms the Bessel factor count / (count - 1) in fp32 (int / int): ~3e-8 relative in std
    torch.testing.assert_close(got, want, rtol=1e-7 if scale != "none" else 1e-12, atol=0)
    assert torch.all(got[4:8] == 0)


# --------------------------------------------------------------------------------------------------
# end to end: TRL's fused LM head and _get_per_token_logps_and_entropies on a tiny random Llama
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return cfg


@pytest.mark.parametrize("loss_type,level,beta", [("dapo", "token", 0.04), ("grpo", "sequence", 0.0),
                                                  ("cispo", "token", 0.0), ("sapo", "sequence", 0.04)])
def test_parity_end_to_end_with_trl_fused_head(tiny_llama, loss_type, level, beta):
    import transformers

    temperature = 0.8
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(tiny_llama).double()
    B, P, T, V = 4, 3, 5, tiny_llama.vocab_size
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, V, (B, P + T), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[3, 1:] = 0
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    ids = input_ids[:, P:]
    adv = torch.tensor([0.9, -0.5, 0.3, -1.2], dtype=F64)
    with torch.no_grad():
        logits0 = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, P - 1 : -1]
        logp0 = torch.log_softmax(logits0 / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp0 - torch.tensor([[0.4, 0.0, -0.5, 0.1, 0.3], [-0.7, 0.6, 0.0, -0.2, 0.0],
                                [0.2, -0.3, 0.5, 0.05, -0.6], [-0.4, 0, 0, 0, 0]], dtype=F64)
    ref = logp0 + torch.rand(B, T, generator=g, dtype=F64) - 0.5
    eh = CISPO_EH if loss_type == "cispo" else EH

    # ours: the caller slices the model's logits (a strided view, no copy)
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    out = gk.grpo_loss(logits[:, P - 1 : -1], ids, completion_mask=completion_mask, advantages=adv, old_logps=old,
                       ref_logps=ref if beta else None, beta=beta, temperature=temperature, loss_type=loss_type,
                       importance_sampling_level=level, epsilon_low=EL, epsilon_high=eh, backend="torch")
    out.loss.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # TRL: its fused LM head (chunked, fp32) and its log-prob gathering, then _compute_loss
    trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    model.zero_grad()
    trainer = trl_trainer(loss_type, level, beta, True, None, EL, eh, max_completion_length=T, sapo=(1.0, 1.05))
    inputs = dict(prompt_ids=input_ids[:, :P], prompt_mask=prompt_mask, completion_ids=ids,
                  completion_mask=completion_mask, advantages=adv, old_per_token_logps=old,
                  num_items_in_batch=completion_mask.sum())
    if beta:
        inputs["ref_per_token_logps"] = ref
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_m = trl_metrics(trainer)

    # TRL's head rounds log-probs to fp32: compare at fp32 precision, scaled to the largest entry
    torch.testing.assert_close(out.loss, trl_loss.to(F64), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        scale = max(1.0, ours_grads[n].abs().max().item())
        torch.testing.assert_close(ours_grads[n], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)
    for k, v in out.metrics.items():
        assert v.item() == pytest.approx(trl_m[k], rel=1e-4, abs=1e-6), k
