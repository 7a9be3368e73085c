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

The rest of TRL's loss (luspo, vespo, the sampler importance ratio, the off-policy and top-entropy masks,
the entropy bonus) is driven through the same ``_compute_loss`` with the trainer state that switches it on;
the sampler ratio itself is compared with the lines of TRL's ``_generate_and_score_completions`` that compute
it, executed from TRL's installed source. Advantages: TRL computes them inside generation; the test below
reproduces those lines with TRL's own ``nanstd``.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.config import CLIP_LOSS_TYPES, LOSS_TYPES

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

F64 = torch.float64
TRL_ONLY_METRICS = {"entropy_coef"}  # the trainer's (possibly adaptive) coefficient: training-loop state
# what TRL's adaptive entropy controller reads but does not log (compared with TRL's own mask below)
OURS_ONLY_METRICS = {"top_entropy/entropy", "top_entropy/fraction"}


from bench._trl import OneProcessAccelerator  # noqa: E402  (the benchmark's trl row uses the same stand-in)


# TRL builds the sapo temperatures with torch.where(A > 0, pos, neg) from Python floats: an fp32 tensor
# whatever the dtype of the loss, so 1.05 is rounded to fp32 there. Temperatures exactly representable in
# fp32 keep the float64 comparison exact; test_parity_sapo_temperatures covers 1.05 at fp32 rounding.
SAPO_EXACT = (1.0, 1.125)


VESPO_DEFAULTS = dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)


def trl_trainer(loss_type, level, beta, bias_correction, delta, eps_low, eps_high, max_completion_length,
                sapo=SAPO_EXACT, vespo=None, off_policy_mask_threshold=None, top_entropy_quantile=1.0,
                entropy_coef=0.0, is_correction=False, accelerator=None):
    """A GRPOTrainer with exactly the state _compute_loss reads (TRL 1.16). ``is_correction``: the vLLM
    sampler correction is on (``inputs["importance_sampling_ratio"]`` is then read)."""
    t = object.__new__(trl_grpo.GRPOTrainer)
    args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, sapo_temperature_pos=sapo[0],
                                 sapo_temperature_neg=sapo[1], steps_per_generation=1,
                                 **(VESPO_DEFAULTS if vespo is None else vespo))
    state = dict(
        args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=eps_low,
        epsilon_high=eps_high, max_completion_length=max_completion_length, top_entropy_quantile=top_entropy_quantile,
        aux_loss_enabled=False, off_policy_mask_threshold=off_policy_mask_threshold, use_vllm=is_correction,
        vllm_importance_sampling_correction=is_correction, model=torch.nn.Linear(1, 1),
        current_gradient_accumulation_steps=1, accelerator=accelerator or OneProcessAccelerator(),
        entropy_coef=entropy_coef, use_adaptive_entropy=False, _entropy_bonus_enabled=entropy_coef != 0.0,
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


def run_trl(x, trainer, temperature, old_logps, ref_logps, num_items_in_batch, **extra_inputs):
    """``extra_inputs``: e.g. importance_sampling_ratio, sampling_per_token_logps (TRL's input names)."""
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
    inputs.update({k: v for k, v in extra_inputs.items() if v is not None})
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
    assert set(m1) - OURS_ONLY_METRICS <= set(m2) and set(m2) - set(m1) <= TRL_ONLY_METRICS, (sorted(m1), sorted(m2))
    for k in set(m1) - OURS_ONLY_METRICS:
        assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-7, nan_ok=True), k  # ours are fp32 tensors


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


# --------------------------------------------------------------------------------------------------
# the rest of TRL's loss: luspo, vespo, the sampler ratio, the two masks, the entropy bonus
# --------------------------------------------------------------------------------------------------
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def trl_sampler_ratio_code():
    """The lines of TRL's ``_generate_and_score_completions`` that compute ``vllm_importance_sampling_ratio``
    (from its installed source, dedented), compiled: run with ``self``, ``completion_mask``, ``tool_mask``,
    ``old_per_token_logps`` and ``sampling_per_token_logps`` in scope."""
    import inspect
    import textwrap

    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    start = src.index("            if self.use_vllm and self.vllm_importance_sampling_correction:\n"
                      "                mask = completion_mask")
    end = src.index("# Compute the per-token log probabilities for the reference model", start)
    return compile(textwrap.dedent(src[start:end]), "trl_sampler_ratio", "exec")


def trl_sampler_ratio(old, sampling, mask, mode, clip_min, clip_max):
    self = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                 vllm_importance_sampling_clip_max=clip_max)
    scope = dict(self=self, completion_mask=mask, tool_mask=None, old_per_token_logps=old,
                 sampling_per_token_logps=sampling, torch=torch, math=__import__("math"))
    exec(trl_sampler_ratio_code(), scope)
    return scope["vllm_importance_sampling_ratio"]


def sampling_logps_of(x, old, seed=3):
    """The sampler's log-probs: the old ones plus noise, NaN at one kept token (vLLM returns NaN for a token it
    cannot score) and garbage at masked positions."""
    g = torch.Generator().manual_seed(seed)
    s = old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    s[0, 1] = float("nan")
    mask = x["mask"].bool()
    return torch.where(mask, s, torch.full_like(s, float("inf")))


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 1.5), (0.8, None), (None, None)])
def test_sampler_ratio_matches_trl(mode, clip_min, clip_max):
    x = make_inputs("token", 1.0)
    old = x["old"]
    sampling = sampling_logps_of(x, old)
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        pytest.skip("TRL's truncate modes call torch.clamp with no bound, which raises")
    want = trl_sampler_ratio(old, sampling, x["mask"], mode, clip_min, clip_max)
    got = gk.sampler_importance_ratio(old, sampling, x["mask"], mode=mode, clip_min=clip_min, clip_max=clip_max)
    assert got.shape == want.shape == ((6, 3) if mode.startswith("token") else (6, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if mode.endswith("mask") and (clip_min, clip_max) == (0.5, 1.5):
        assert bool((got == 0).any()) and bool((got > 0).any())  # both sides of the mask occur


# (option name, TRL trainer state, our keyword options); each option alone, then combined
NEW_OPTIONS = {
    "plain": ({}, {}),
    "is-ratio": ({}, {}),  # the ratio comes with the inputs (below)
    "off-policy": (dict(off_policy_mask_threshold=0.05), dict(off_policy_mask_threshold=0.05)),
    "top-entropy": (dict(top_entropy_quantile=0.5), dict(top_entropy_quantile=0.5)),
    # 0.0: the threshold is the largest entropy itself (an integer rank: the tie rule H >= q decides)
    "top-entropy-max": (dict(top_entropy_quantile=0.0), dict(top_entropy_quantile=0.0)),
    "entropy-bonus": (dict(entropy_coef=0.03), dict(entropy_coef=0.03)),
    "all": (dict(off_policy_mask_threshold=0.05, top_entropy_quantile=0.2, entropy_coef=0.03),
            dict(off_policy_mask_threshold=0.05, top_entropy_quantile=0.2, entropy_coef=0.03)),
}
NEW_CASES = [(lt, lvl, opt, mode, beta)
             for lt in LOSS_TYPES
             for lvl in (("token", "sequence") if lt in ("luspo", "vespo") else ("token",))
             for opt in NEW_OPTIONS
             for mode in ((IS_MODES if opt == "is-ratio" else ("token_mask",)) if opt in ("is-ratio", "all")
                          else (None,))
             for beta in ((0.0, 0.04) if opt in ("all", "plain") else (0.0,))]


@pytest.mark.parametrize("case", NEW_CASES, ids=["-".join(str(c) for c in case) for case in NEW_CASES])
def test_parity_rest_of_trl_loss(case):
    loss_type, level, opt, mode, beta = case
    trl_state, ours_opts = NEW_OPTIONS[opt]
    temperature = 0.7
    x = make_inputs(level, temperature)
    eh = CISPO_EH if loss_type == "cispo" else EH
    T = x["ids"].shape[1]
    old, ref = x["old"], x["ref"] if beta else None
    sampling = sampling_logps_of(x, old)
    rho = None if mode is None else gk.sampler_importance_ratio(old, sampling, x["mask"], mode=mode)
    vespo = dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.75, vespo_lambda_neg=1.25)
    trainer = trl_trainer(loss_type, level, beta, True, None, EL, eh, max_completion_length=T, vespo=vespo,
                          is_correction=rho is not None, **trl_state)
    trl = run_trl(x, trainer, temperature, old, ref, int(x["mask"].sum()), importance_sampling_ratio=rho,
                  sampling_per_token_logps=sampling)
    ours = run_ours(x, temperature, old, ref, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                    epsilon_low=EL, epsilon_high=eh, sapo_temperature_pos=SAPO_EXACT[0],
                    sapo_temperature_neg=SAPO_EXACT[1], importance_sampling_ratio=rho, sampling_logps=sampling,
                    **vespo, **ours_opts)
    assert_same(ours, trl, rtol=1e-10)
    assert set(trl[2]) - set(ours[2]) <= TRL_ONLY_METRICS
    q = trl_state.get("top_entropy_quantile", 1.0)
    assert (set(ours[2]) & OURS_ONLY_METRICS) == (OURS_ONLY_METRICS if q < 1.0 else set())
    if q < 1.0:  # the entropy over TRL's own top-entropy mask, and the mask's share of the tokens
        _, ent = trl_utils.selective_log_softmax_and_entropy(x["logits"], x["ids"], temperature=temperature,
                                                             row_mask=x["mask"])
        kept = trainer.get_high_entropy_mask(ent, x["mask"], 1 - q).to(F64) * x["mask"]
        assert 0 < kept.sum() < x["mask"].sum()
        want = dict(entropy=(ent * kept).sum() / kept.sum(), fraction=kept.sum() / x["mask"].sum())
        for k, v in want.items():
            assert ours[2][f"top_entropy/{k}"] == pytest.approx(v.item(), rel=1e-6), k


def test_parity_vespo_defaults_and_off_policy_without_sampler():
    """TRL's vespo defaults; the off-policy mask falls back to old_logps when no sampler log-probs exist."""
    x = make_inputs("token", 1.0)
    for loss_type in ("vespo", "dapo"):
        trainer = trl_trainer(loss_type, "token", 0.0, True, None, EL, EH, 3, off_policy_mask_threshold=-0.05)
        trl = run_trl(x, trainer, 1.0, x["old"], None, int(x["mask"].sum()))
        ours = run_ours(x, 1.0, x["old"], None, loss_type=loss_type, epsilon_low=EL, epsilon_high=EH,
                        off_policy_mask_threshold=-0.05)
        assert_same(ours, trl, rtol=1e-10)
