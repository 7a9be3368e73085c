"""GRPOKernelsTrainer against TRL 1.16's real GRPOTrainer, option by option, on one model and one batch.

One TRL trainer and one GRPOKernelsTrainer per backend are built once (the digit Qwen2 of python/tasks.py,
built in code; nothing is downloaded); each case then sets the loss options on BOTH trainers' attributes and
args, as a callback would between steps (the adapter must read them at every call), and runs TRL's own
``_compute_loss`` against the adapter's on the same inputs: the loss, the gradient of every parameter and
every metric TRL logs must agree. Both compute in fp32 from the same hidden states, so they differ by rounding:
1e-5 relative (fp32 sums over at most a few hundred terms).

The inputs include the sampler's log-probs with one NaN (as vLLM returns for a token it cannot score) and
the sampler importance ratio built as TRL builds it in each of its four modes.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import tasks  # noqa: E402

import grpo_kernels as gk  # noqa: E402
from grpo_kernels.config import GRPOConfig as LossConfig  # noqa: E402
from grpo_kernels.integrations.trl import GRPOKernelsTrainer, unsupported_options  # noqa: E402

G = 4
LIB_FIELDS = set(LossConfig.field_names())
BACKENDS = ["torch"] + (["cpu"] if "cpu" in gk.available_backends("cpu") else [])


def digit_reward(prompts, completions, answer, **_):
    return tasks.partial_credit(prompts, completions, answer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_parity")
    tok = tasks.build_tokenizer()
    tasks.build_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build(cls, model_dir, out_dir, **config):
    rng = random.Random(0)
    dataset = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(16)])
    options = dict(
        output_dir=str(out_dir), use_cpu=True, report_to="none", per_device_train_batch_size=G, num_generations=G,
        gradient_accumulation_steps=2, max_completion_length=6, max_steps=1, logging_steps=1, save_strategy="no",
        seed=0, learning_rate=1e-3, bf16=False,
    )
    options.update(config)
    extra = {} if cls is trl.GRPOTrainer else {"backend": options.pop("backend", "torch")}
    return cls(model=str(model_dir), reward_funcs=digit_reward, args=trl.GRPOConfig(**options), train_dataset=dataset,
               processing_class=tasks.build_tokenizer(), **extra)


@pytest.fixture(scope="module")
def trainers(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    made = {"trl": build(trl.GRPOTrainer, model_dir, out / "trl")}
    for b in BACKENDS:
        made[b] = build(GRPOKernelsTrainer, model_dir, out / b, backend=b)
    return made


def sampler_ratio(old, sampling, mask, mode, cmin, cmax):
    """TRL's vLLM importance ratio (GRPOTrainer._generate_and_score_completions, TRL 1.16) in ``mode``."""
    d = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=cmin, max=cmax)
    lo = -math.inf if cmin is None else cmin
    hi = math.inf if cmax is None else cmax
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def make_inputs(trainer, B=8, Lp=5, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, Lp), generator=g)
    prompt_mask = torch.ones(B, Lp, dtype=torch.long)
    prompt_mask[::3, :2] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, T), generator=g)
    lengths = torch.tensor([6, 3, 1, 6, 4, 2, 5, 6])[:B]
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    adv = torch.randn(B, generator=g)
    adv[1] = 0.0  # a zero advantage: the sign conventions of the off-policy mask and vespo meet here
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv,
              "num_items_in_batch": completion_mask.sum() * 3}  # a generation batch of 3 micro-batches
    with torch.no_grad():
        logps, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, T, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(B, T, generator=g)
    sampling = inputs["old_per_token_logps"] + 0.25 * torch.randn(B, T, generator=g)
    sampling[0, min(2, T - 1)] = float("nan")  # vLLM could not score this token
    inputs["sampling_per_token_logps"] = sampling
    return inputs


# (name, trainer attributes, args attributes, library fields the case needs)
BASE = dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
            vllm_importance_sampling_correction=False, entropy_coef=0.0, use_adaptive_entropy=False,
            _entropy_bonus_enabled=False, _last_world_entropy=math.inf, _entropy_window_stats=None)
BASE_ARGS = dict(delta=None, use_bias_correction_kl=True, steps_per_generation=2, sapo_temperature_pos=1.0,
                 sapo_temperature_neg=1.05, entropy_target=0.3)
CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
CASES = []
for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
    for level in ("token", "sequence"):
        if lt == "vespo" and level == "sequence":
            continue  # vespo builds its own sequence weight from token ratios
        for beta in (0.0, 0.04):
            attrs = dict(loss_type=lt, importance_sampling_level=level, beta=beta)
            if lt == "cispo":
                attrs["epsilon_high"] = 1.3
            elif lt in CLIP:
                attrs["epsilon_high"] = 0.28
            CASES.append((f"{lt}-{level}-beta{beta}", attrs, {}, set()))
CASES += [
    ("dapo-delta-nobiaskl", dict(beta=0.04), dict(delta=1.2, use_bias_correction_kl=False), set()),
    ("grpo-seq-delta", dict(loss_type="grpo", importance_sampling_level="sequence"), dict(delta=1.2), set()),
    ("sapo-temps", dict(loss_type="sapo"), dict(sapo_temperature_pos=0.75, sapo_temperature_neg=1.5), set()),
]
for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
    for lt in ("dapo", "grpo", "sapo"):
        CASES.append((f"vllm-is-{mode}-{lt}", dict(loss_type=lt, use_vllm=True, vllm_importance_sampling_correction=True,
                                                   _is_mode=mode), {}, {"importance_sampling_ratio"}))
CASES += [
    ("vespo-with-is", dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True,
                           _is_mode="token_truncate"), dict(vespo_k_pos=1.5, vespo_lambda_neg=2.5), {"vespo_k_pos"}),
    ("off-policy-mask", dict(off_policy_mask_threshold=0.05), {}, {"off_policy_mask_threshold"}),
    ("off-policy-mask-vllm", dict(off_policy_mask_threshold=0.05, use_vllm=True,
                                  vllm_importance_sampling_correction=True, _is_mode="sequence_mask"), {},
     {"off_policy_mask_threshold", "importance_sampling_ratio"}),
    ("top-entropy", dict(top_entropy_quantile=0.5, beta=0.04), {}, {"top_entropy_quantile"}),
    ("top-entropy-grpo-seq", dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.3),
     {}, {"top_entropy_quantile"}),
    ("entropy-bonus-dapo", dict(entropy_coef=0.05, _entropy_bonus_enabled=True), {}, {"entropy_coef"}),
    ("entropy-bonus-grpo", dict(loss_type="grpo", entropy_coef=0.05, _entropy_bonus_enabled=True), {},
     {"entropy_coef"}),
    # the entropy bonus over the top-entropy tokens; the adaptive controller reads their entropy (its window
    # state is compared below), gated off (last window above the target) and on
    ("entropy-bonus-top-entropy-dapo", dict(entropy_coef=0.05, _entropy_bonus_enabled=True,
                                            top_entropy_quantile=0.4), {}, {"entropy_coef"}),
    ("entropy-bonus-top-entropy-grpo-seq", dict(loss_type="grpo", importance_sampling_level="sequence",
                                                entropy_coef=0.05, _entropy_bonus_enabled=True,
                                                top_entropy_quantile=0.4, beta=0.04), {}, {"entropy_coef"}),
    ("adaptive-entropy-top-entropy-gated", dict(entropy_coef=0.05, use_adaptive_entropy=True,
                                                _entropy_bonus_enabled=True, top_entropy_quantile=0.4),
     dict(entropy_target=2.0), {"entropy_coef"}),
    ("adaptive-entropy-top-entropy-on", dict(loss_type="bnpo", entropy_coef=0.05, use_adaptive_entropy=True,
                                             _entropy_bonus_enabled=True, top_entropy_quantile=0.4,
                                             _last_world_entropy=0.1), dict(entropy_target=2.0), {"entropy_coef"}),
    ("adaptive-entropy", dict(loss_type="grpo", entropy_coef=0.05, use_adaptive_entropy=True,
                              _entropy_bonus_enabled=True, _last_world_entropy=0.1), dict(entropy_target=2.0),
     {"entropy_coef"}),
    ("everything", dict(loss_type="dapo", beta=0.04, off_policy_mask_threshold=0.05, top_entropy_quantile=0.6,
                        use_vllm=True, vllm_importance_sampling_correction=True, _is_mode="token_mask"),
     dict(delta=1.2), {"off_policy_mask_threshold", "top_entropy_quantile", "importance_sampling_ratio"}),
]




def library_has(needs):
    import inspect

    from grpo_kernels.fused_linear import fused_linear_grpo_loss_with_config as f

    have = LIB_FIELDS | set(inspect.signature(f).parameters)
    return needs <= have


def configure(trainer, attrs, args_attrs, training, accumulation):
    for k, v in {**BASE, **attrs}.items():
        if not k.startswith("_is_"):
            setattr(trainer, k, v)
    for k, v in {**BASE_ARGS, **args_attrs}.items():
        setattr(trainer.args, k, v)
    for k in ("loss_type", "top_entropy_quantile", "off_policy_mask_threshold", "use_vllm",
              "vllm_importance_sampling_correction", "entropy_coef", "use_adaptive_entropy"):
        setattr(trainer.args, k, getattr(trainer, k))
    trainer.vllm_importance_sampling_mode = attrs.get("_is_mode", "sequence_mask")
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.model.train(training)
    for mode in ("train", "eval"):
        trainer._metrics[mode].clear()


def run(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    if trainer.model.training:
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics


def case_inputs(trainer, attrs):
    inputs = make_inputs(trainer)
    mode = attrs.get("_is_mode")
    if mode is not None:
        inputs["importance_sampling_ratio"] = sampler_ratio(
            inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], inputs["completion_mask"], mode,
            0.5 if mode.endswith("truncate") else 0.8, 1.6)
    if not attrs.get("use_vllm"):
        inputs.pop("sampling_per_token_logps")
    return inputs


# every case on every backend, training with gradient accumulation 2; a representative subset also without
# accumulation and in eval mode (no accumulation division, TRL's eval normalisers), on the torch backend
SUBSET = ("dapo-token-beta0.04", "grpo-sequence-beta0.04", "sapo-token-beta0.0", "vespo-with-is",
          "vllm-is-sequence_mask-dapo", "vllm-is-token_truncate-grpo", "entropy-bonus-grpo", "off-policy-mask")
PARAMS = [pytest.param(b, True, 2, *c, id=f"{c[0]}-train-acc2-{b}") for c in CASES for b in BACKENDS]
PARAMS += [pytest.param("torch", training, acc, *c, id=f"{c[0]}-{tag}-torch") for c in CASES if c[0] in SUBSET
           for training, acc, tag in ((True, 1, "train"), (False, 2, "eval"))]


@pytest.mark.parametrize("backend, training, accumulation, name, attrs, args_attrs, needs", PARAMS)
def test_compute_loss_equals_trl(trainers, backend, training, accumulation, name, attrs, args_attrs, needs):
    ours, theirs = trainers[backend], trainers["trl"]
    configure(theirs, attrs, args_attrs, training, accumulation)
    configure(ours, attrs, args_attrs, training, accumulation)
    assert library_has(needs) and attrs.get("loss_type", "dapo") in gk.config.LOSS_TYPES, name
    assert not unsupported_options(ours.args), name
    inputs = case_inputs(theirs, attrs)
    loss_t, grads_t, metrics_t = run(theirs, inputs)
    loss_o, grads_o, metrics_o = run(ours, inputs)
    assert torch.isfinite(loss_t) and loss_t.abs() > 1e-5
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    for n, g in grads_t.items():
        if g is None:
            assert grads_o[n] is None or not training, n
            continue
        torch.testing.assert_close(grads_o[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"grad of {n}: {m}")
    assert set(metrics_o) == set(metrics_t), (sorted(metrics_o), sorted(metrics_t))
    for k in metrics_o:
        assert metrics_o[k] == pytest.approx(metrics_t[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    # the adaptive entropy controller's state after the call
    assert ours.entropy_coef == pytest.approx(theirs.entropy_coef, rel=1e-6)
    assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-6)


def test_options_are_read_at_every_call(trainers):
    """A callback changing beta and the clip range between two calls changes the adapter's loss as TRL's."""
    ours, theirs = trainers[BACKENDS[-1]], trainers["trl"]
    values = []
    for beta, eps in ((0.0, 0.2), (0.1, 0.05)):
        attrs = dict(beta=beta, epsilon_low=eps, epsilon_high=eps)
        configure(theirs, attrs, {}, True, 2)
        configure(ours, attrs, {}, True, 2)
        inputs = make_inputs(theirs)
        lt, _, _ = run(theirs, inputs)
        lo, _, _ = run(ours, inputs)
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
        values.append(lo.item())
    assert abs(values[0] - values[1]) > 1e-4


def test_the_loss_never_calls_the_lm_head_module(trainers):
    """The training loss streams the head from the hidden states: the [B, T, V] logits of lm_head never exist."""
    ours = trainers[BACKENDS[-1]]
    configure(ours, {}, {}, True, 2)
    calls = []
    hook = ours.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        run(ours, make_inputs(ours))
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_logps_and_entropies_carry_trls_gradient(trainers, backend):
    """With grad enabled ``_get_per_token_logps_and_entropies`` returns log-probs and entropies with gradient,
    as TRL's does (a subclass may build its loss from them): values and the gradient of every parameter of
    sum(u * logp + v * entropy) over the completion tokens equal TRL's; TRL's micro-batching (batch_size)
    included. Under no_grad nothing requires grad."""
    ours, theirs = trainers[backend], trainers["trl"]
    inputs = make_inputs(theirs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(ids.shape[0], T, generator=g), torch.randn(ids.shape[0], T, generator=g)
    got = {}
    for name, trainer in (("trl", theirs), ("ours", ours)):
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        lp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T, batch_size=3,
                                                                compute_entropy=True)
        assert lp.requires_grad and ent.requires_grad, name
        m = inputs["completion_mask"]
        ((lp * u * m).sum() + (ent * v * m).sum()).backward()
        got[name] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                                  if p.grad is not None})
        with torch.no_grad():
            lp0, ent0, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T,
                                                                      compute_entropy=True)
        assert not lp0.requires_grad and not ent0.requires_grad
    (lp_t, ent_t, g_t), (lp_o, ent_o, g_o) = got["trl"], got["ours"]
    torch.testing.assert_close(lp_o, lp_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_o, ent_t, rtol=1e-5, atol=1e-6)
    assert set(g_o) == set(g_t) and len(g_t) > 3
    for n, gt in g_t.items():
        # fp32 rounding relative to the largest entry: the entropy's gradient sums p * (log p + H) over the
        # vocabulary, where terms cancel
        scale = gt.abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(g_o[n], gt, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_shift_labels_are_scored_as_trls_head_scores_them(trainers):
    """Pre-shifted labels (context / sequence parallelism): the streamed head pairs each label with the hidden
    state at its own position, as TRL's fused head does (its log-probs, entropies and loss over the scored
    positions)."""
    from grpo_kernels.integrations.trl import _HeadJob

    ours, theirs = trainers[BACKENDS[-1]], trainers["trl"]
    inputs = make_inputs(theirs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-T] = -100
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    shift[:, :-T] = -100  # the streamed head scores the last T positions (all TRL's caller reads): the loss too
    with torch.no_grad():
        want = theirs.model(input_ids=ids, attention_mask=attention, shift_labels=shift, fused_lm_head=True)
        ours._gk_head_job = _HeadJob(T, True)
        try:
            got = ours.model(input_ids=ids, attention_mask=attention, shift_labels=shift, fused_lm_head=True)
        finally:
            ours._gk_head_job = None
    assert got.log_probs.shape == (ids.shape[0], T) and (got.log_probs != 0).any()
    torch.testing.assert_close(got.log_probs, want.log_probs[:, -T:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy, want.entropy[:, -T:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dapo-token-beta0.04", "grpo-token-beta0.04", "cispo-token-beta0.0",
                                  "grpo-sequence-beta0.04", "vespo-token-beta0.0"])
def test_single_token_completions_reduce_as_trl(trainers, name):
    """T = 1 with completions that keep no token (as mask_truncated_completions leaves them): TRL reads every
    [B, 1] tensor as one value per sequence, so its token metrics average over B and its clip min / max count
    those completions as 0; the adapter's metrics follow."""
    (attrs, args_attrs), = [(a, aa) for n, a, aa, _ in CASES if n == name]
    ours, theirs = trainers[BACKENDS[-1]], trainers["trl"]
    configure(theirs, attrs, args_attrs, True, 2)
    configure(ours, attrs, args_attrs, True, 2)
    inputs = make_inputs(theirs, T=1)
    empty = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    inputs["completion_mask"] = inputs["completion_mask"].masked_fill(empty[:, None], 0)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum() * 3
    for k in ("old_per_token_logps", "ref_per_token_logps"):  # TRL's head returns 0 where the label is dropped
        inputs[k] = inputs[k].masked_fill(empty[:, None], 0.0)
    inputs.pop("sampling_per_token_logps")
    loss_t, grads_t, metrics_t = run(theirs, inputs)
    loss_o, grads_o, metrics_o = run(ours, inputs)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    for n, g in grads_t.items():
        if g is not None:
            torch.testing.assert_close(grads_o[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"grad of {n}: {m}")
    assert set(metrics_o) == set(metrics_t)
    for k in metrics_o:
        assert metrics_o[k] == pytest.approx(metrics_t[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    if "clip_ratio/low_min" in metrics_t:
        assert metrics_t["clip_ratio/low_min"] == 0.0


# last: building a GRPOConfig resets accelerate's state, which the module's trainers read
def test_refusals_happen_before_the_model_is_loaded(tmp_path):
    """An option the library cannot compute raises in __init__ before the model path is even opened."""
    bad = [dict(loss_type="no-such-loss")]
    for config in bad:
        args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{
            k: v for k, v in config.items() if k != "loss_type"})
        if "loss_type" in config:
            args.loss_type = config["loss_type"]
        with pytest.raises(ValueError, match="GRPOKernelsTrainer cannot run"):
            GRPOKernelsTrainer(model=str(tmp_path / "does-not-exist"), reward_funcs=digit_reward, args=args)
    with pytest.raises(ValueError, match="backend must be one of"):
        GRPOKernelsTrainer(model=str(tmp_path / "does-not-exist"), reward_funcs=digit_reward, backend="tpu")
