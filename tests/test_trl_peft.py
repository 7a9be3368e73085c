"""GRPOKernelsTrainer with PEFT LoRA, one process, against TRL 1.16's GRPOTrainer (where TRL runs) and the float64
unfused head (where TRL refuses).

- LoRA on the attention projections with beta > 0: TRL's reference log-probs come from the same model with the
  adapter disabled; two ``train()`` steps (plain SGD) of both trainers must agree in every logged value and every
  parameter to 1e-5.
- LoRA with ``modules_to_save=["lm_head"]`` (a trained copy of the head): the same comparison.
- LoRA on ``lm_head`` itself, which TRL 1.16 refuses (its head reads ``lm_head.weight`` alone): the streamed head
  computes h W^T + s (h A^T) B^T. ``_compute_loss`` must equal, in loss and in the gradients of every trainable
  parameter (the head's A and B included), the unfused computation in float64: the model's own forward (PEFT's
  LoRA layer on the full logits), then ``grpo_loss`` on backend "torch".
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import tasks  # noqa: E402

import grpo_kernels as gk  # noqa: E402
from grpo_kernels.integrations.trl import GRPOKernelsTrainer  # noqa: E402

G = 4


def digit_reward(prompts, completions, answer, **_):
    return tasks.partial_credit(prompts, completions, answer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_peft")
    tok = tasks.build_tokenizer()
    from transformers import Qwen2ForCausalLM

    model = tasks.build_model(tok, seed=0)
    config = model.config
    config.tie_word_embeddings = False  # an lm_head of its own for modules_to_save / a LoRA head
    with torch.random.fork_rng():
        torch.manual_seed(1)
        untied = Qwen2ForCausalLM(config)
    untied.generation_config = model.generation_config
    untied.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build(cls, model_dir, out_dir, peft_config, **config):
    rng = random.Random(0)
    dataset = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(16)])
    options = dict(output_dir=str(out_dir), use_cpu=True, report_to="none", per_device_train_batch_size=G,
                   num_generations=G, gradient_accumulation_steps=2, max_completion_length=4, max_steps=2,
                   logging_steps=1, save_strategy="no", seed=0, learning_rate=0.5, optim="sgd", bf16=False,
                   beta=0.04)
    options.update(config)
    extra = {} if cls is trl.GRPOTrainer else {"backend": "cpu" if "cpu" in gk.available_backends("cpu") else "torch"}
    return cls(model=str(model_dir), reward_funcs=digit_reward, args=trl.GRPOConfig(**options), train_dataset=dataset,
               processing_class=tasks.build_tokenizer(), peft_config=copy.deepcopy(peft_config), **extra)


def trained(trainer):
    torch.manual_seed(0)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return steps, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


PEFT_CASES = {
    "lora-attention-beta": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False),
    "lora-modules-to-save-lm-head": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"], init_lora_weights=False),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_train_steps_equal_trl(model_dir, tmp_path, case):
    theirs_steps, theirs = trained(build(trl.GRPOTrainer, model_dir, tmp_path / "trl", PEFT_CASES[case]))
    ours_steps, ours = trained(build(GRPOKernelsTrainer, model_dir, tmp_path / "gk", PEFT_CASES[case]))
    assert len(ours_steps) == len(theirs_steps) == 2
    for o, t in zip(ours_steps, theirs_steps):
        assert set(o) == set(t)
        for k in o:
            if k != "step_time":
                assert o[k] == pytest.approx(t[k], rel=1e-5, abs=1e-6), k
    assert theirs_steps[1]["kl"] > 1e-6  # the reference pass (adapter disabled) differs from the policy
    assert set(ours) == set(theirs)
    for n, p in theirs.items():
        torch.testing.assert_close(ours[n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    trainable = [n for n in ours if "lora_" in n or "modules_to_save" in n]
    assert trainable


def lora_head_config():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"],
                           init_lora_weights=False)


def test_trl_refuses_a_lora_head(model_dir, tmp_path):
    with pytest.raises(ValueError, match="lm_head"):
        build(trl.GRPOTrainer, model_dir, tmp_path / "trl", lora_head_config())


def make_inputs(B=8, Lp=5, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, Lp), generator=g)
    prompt_mask = torch.ones(B, Lp, dtype=torch.long)
    completion_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, T), generator=g)
    completion_mask = (torch.arange(T)[None] < torch.tensor([4, 3, 1, 4, 2, 2, 3, 4])[:, None]).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
            "num_items_in_batch": completion_mask.sum() * 2,
            "old_per_token_logps": -2.5 + 0.3 * torch.randn(B, T, generator=g),
            "ref_per_token_logps": -2.5 + 0.3 * torch.randn(B, T, generator=g)}


def test_lora_head_loss_equals_float64_unfused(model_dir, tmp_path):
    trainer = build(GRPOKernelsTrainer, model_dir, tmp_path / "gk", lora_head_config())
    model = trainer.model
    head = model.get_output_embeddings()
    assert isinstance(head, peft.tuners.lora.LoraLayer)
    inputs = make_inputs()
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_A" in n for n in grads) and any("lm_head.lora_B" in n for n in grads)

    # the oracle: the model's own forward in float64 (PEFT applies the head's adapter to the full logits)
    # (a fresh copy: the trainer's model has the patched forward, which a deepcopy would still route to the original)
    from transformers import AutoModelForCausalLM

    ref = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_head_config())
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    ref.train()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    logits = ref(input_ids=ids, attention_mask=mask).logits[:, -T - 1:-1] / trainer.temperature
    num_items = inputs["num_items_in_batch"].double() / trainer.args.steps_per_generation * 2  # TRL's dapo rescaling
    out = gk.grpo_loss(logits, inputs["completion_ids"], backend="torch", loss_type=trainer.loss_type,
                       beta=trainer.beta, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                       completion_mask=inputs["completion_mask"], advantages=inputs["advantages"].double(),
                       old_logps=inputs["old_per_token_logps"].double(),
                       ref_logps=inputs["ref_per_token_logps"].double(), num_items_in_batch=num_items)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(loss.double(), out.loss, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n].double(), g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert grads[next(n for n in grads if "lm_head.lora_B" in n)].abs().max() > 1e-4


def test_lora_head_trains(model_dir, tmp_path):
    """Two train() steps: the head's adapter moves (TRL's own head would leave it untouched)."""
    trainer = build(GRPOKernelsTrainer, model_dir, tmp_path / "gk", lora_head_config())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lm_head.lora" in n}
    steps, after = trained(trainer)
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert before and all((after[n] - before[n]).abs().max() > 1e-4 for n in before)
