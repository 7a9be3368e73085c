"""The TRL drop-in (grpo_kernels.integrations.trl.GRPOKernelsTrainer) against TRL's own GRPOTrainer.

Both trainers load the same tiny model (the digit Qwen2 of python/tasks.py, built in code and saved to a
temporary directory; nothing is downloaded) and get the same hand-made batch: left-padded prompts,
completions of different lengths, old log-probs away from the current ones (so ratios leave the clip
range), reference log-probs. TRL's ``_compute_loss`` is run as shipped. The losses, the gradients of
every parameter and the logged metrics must agree to 1e-5: both compute in fp32 from the same hidden states
(TRL through its chunked LM head, the adapter through grpo_kernels' streamed head), so they differ by
rounding only. tests/test_trl_trainer_parity.py covers the rest of TRL's options.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import tasks  # noqa: E402

from grpo_kernels.integrations.trl import GRPOKernelsTrainer  # noqa: E402

G = 4


# tasks.partial_credit has TRL's reward signature: the same function serves train_grpo.py --reward.
digit_reward = tasks.partial_credit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = tasks.build_tokenizer()
    tasks.build_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_trainer(cls, model_dir, out_dir, **config):
    import random

    rng = random.Random(0)
    dataset = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(16)])
    options = dict(
        output_dir=str(out_dir), use_cpu=True, report_to="none", per_device_train_batch_size=G, num_generations=G,
        gradient_accumulation_steps=2, max_completion_length=4, max_steps=1, logging_steps=1, save_strategy="no",
        seed=0, learning_rate=1e-3, bf16=False,  # TRL defaults to bf16 autocast; fp32 for a 1e-5 comparison
    )
    options.update(config)
    tok = tasks.build_tokenizer()
    return cls(model=str(model_dir), reward_funcs=digit_reward, args=trl.GRPOConfig(**options),
               train_dataset=dataset, processing_class=tok)


def make_inputs(trainer, B=8, Lp=5, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, Lp), generator=g)
    prompt_mask = torch.ones(B, Lp, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # some left padding
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(3, tasks.VOCAB_SIZE - 2, (B, T), generator=g)
    lengths = torch.tensor([6, 3, 1, 6, 4, 2, 5, 6])[:B]
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": completion_mask.sum()}
    # Log-probs of the current model through TRL's own path, then perturbed: old and reference policies.
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, T, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(B, T, generator=g)
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 2  # as inside a training loop with accumulation
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


CONFIGS = [
    dict(loss_type="dapo"),
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, epsilon_high=0.28, delta=1.5),
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="cispo", epsilon_high=5.0),
    dict(loss_type="sapo"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_adapter_loss_equals_trl_loss(model_dir, tmp_path, config):
    ours = make_trainer(GRPOKernelsTrainer, model_dir, tmp_path / "ours", **config)
    theirs = make_trainer(trl.GRPOTrainer, model_dir, tmp_path / "theirs", **config)
    inputs = make_inputs(theirs)
    if config.get("beta", 0.0) == 0.0:
        del inputs["ref_per_token_logps"]
    loss_t, grads_t, metrics_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o, metrics_o = loss_and_grads(ours, inputs)

    assert torch.isfinite(loss_t) and loss_t.abs() > 1e-4  # a loss that can tell the two apart
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-5)
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_o[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")
    # The metrics grpo_kernels computes carry TRL's names and values.
    shared = set(metrics_o) & set(metrics_t)
    assert "entropy" in shared and (config.get("beta", 0.0) == 0.0 or "kl" in shared)
    if config["loss_type"] in ("dapo", "grpo", "bnpo", "dr_grpo"):
        assert "clip_ratio/region_mean" in shared
    for name in shared:
        assert metrics_o[name] == pytest.approx(metrics_t[name], rel=1e-5, abs=1e-6), name


def test_adapter_rejects_only_unknown_loss_types(model_dir, tmp_path):
    """The adapter refuses a loss type the library does not compute, before the model loads; the entropy
    bonus with the top-entropy mask, adaptive or not, builds and trains."""
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args.loss_type = "no-such-loss"
    with pytest.raises(ValueError, match="loss_type"):
        GRPOKernelsTrainer(model=str(tmp_path / "missing"), reward_funcs=digit_reward, args=args)
    trainer = make_trainer(GRPOKernelsTrainer, model_dir, tmp_path / "ok", top_entropy_quantile=0.5,
                           entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=0.5)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and "policy_loss" in logged[0] and "entropy_coef" in logged[0]


def test_adapter_training_steps_run(model_dir, tmp_path, monkeypatch):
    import grpo_kernels.integrations.trl as adapter

    calls, passes = [], []
    real = adapter.fused_linear_grpo_loss_with_config
    monkeypatch.setattr(adapter, "fused_linear_grpo_loss_with_config",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    real_lp = adapter.fused_linear_token_logprobs
    monkeypatch.setattr(adapter, "fused_linear_token_logprobs", lambda *a, **k: passes.append(a[0].shape) or real_lp(*a, **k))
    trainer = make_trainer(GRPOKernelsTrainer, model_dir, tmp_path, max_steps=2, num_iterations=2, beta=0.04)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert all("clip_ratio/region_mean" in h and "kl" in h and "entropy" in h for h in logged)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter moved in two optimizer steps"
    # Every micro-batch's loss went through grpo_kernels (2 steps x 2 accumulation micro-batches).
    assert len(calls) == 4 and calls[0].beta == 0.04 and calls[0].loss_type == "dapo"
    # The old-policy (num_iterations = 2) and reference log-prob passes went through the streamed head, over the
    # completion positions only (hidden [b, T, H] with T = max_completion_length at most).
    assert len(passes) >= 4 and all(s[1] <= 4 for s in passes)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_train_runs_per_loss_type(model_dir, tmp_path, loss_type):
    """A real trainer.train() step per loss type (generation, rewards, old/ref passes, loss, optimizer)."""
    from grpo_kernels.config import LOSS_TYPES

    config = dict(max_steps=1, loss_type=loss_type, beta=0.04, learning_rate=1e-2)
    if loss_type == "vespo":
        config["vllm_importance_sampling_mode"] = "token_truncate"
    assert loss_type in LOSS_TYPES
    trainer = make_trainer(GRPOKernelsTrainer, model_dir, tmp_path, **config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert "entropy" in logged[0] and "kl" in logged[0]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


def test_two_cpu_processes_with_accelerate_launch(model_dir, tmp_path):
    """One step under ``accelerate launch --multi_gpu --num_processes 2`` with ``use_cpu=True`` (torchrun, DDP
    over gloo; ``--cpu`` would start a single process): the parameters are equal on both ranks afterwards."""
    import os
    import subprocess

    script = Path(__file__).parent / "scripts" / "trl_two_process.py"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path), str(model_dir)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["world"] == 2
    logged = [h for h in log["history"] if "loss" in h]
    assert len(logged) == 1 and "kl" in logged[0] and "clip_ratio/region_mean" in logged[0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for n in r0:
        torch.testing.assert_close(r0[n], r1[n], rtol=0, atol=0, msg=lambda m, n=n: f"{n} differs across ranks: {m}")
