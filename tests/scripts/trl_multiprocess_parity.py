"""Stock TRL ``GRPOTrainer`` against ``GRPOKernelsTrainer``, configuration after configuration, in ONE process
group started by ``accelerate launch`` on the CPU (gloo), for tests/test_trl_multiprocess.py.

Arguments: an output directory, the model directory, and a comma-separated list of configuration names
(``all`` for every one). For each configuration both trainers run ``train()`` for two optimizer steps from the
same model, data and seed; every rank then compares every logged value of every step (``state.log_history``,
timings excepted) and every parameter, and writes ``rank{r}.json``: per configuration the mismatches found
(empty when the two agree), how many values and parameters were compared, and the logged losses.

Completions come from a ``rollout_func`` (TRL's hook for custom generation): deterministic in the prompt, its
position and the step, with sampler log-probs = the model's own log-probs at the sampling temperature plus
seeded noise and one NaN token (vLLM returns NaN for a token it cannot score). The vLLM sampler correction
(``use_vllm`` + ``vllm_importance_sampling_correction``) is switched on after ``__init__`` with a no-op weight
sync, so TRL's own code computes the importance ratio from those log-probs in each of its four modes.
"""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import types
import zlib
from pathlib import Path

import datasets
import torch
import trl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
import tasks  # noqa: E402

import grpo_kernels.integrations.trl as adapter  # noqa: E402
from grpo_kernels.integrations.trl import GRPOKernelsTrainer  # noqa: E402

MAX_LEN = 5
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}

# name -> (TRL GRPOConfig options, harness options); harness: "is_mode" (the vLLM sampler correction's mode),
# "sampler" (the rollout returns sampler log-probs; default True), "control" (run the adapter with the
# top-entropy quantile taken per process: it must NOT match TRL, which shows the comparison can fail)
CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
CONFIGS: dict[str, tuple[dict, dict]] = {}
for _lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
    for _level in ("token", "sequence"):
        _opts = dict(loss_type=_lt, importance_sampling_level=_level, beta=0.04)
        if _lt == "cispo":
            _opts["epsilon_high"] = 1.1
        elif _lt in CLIP:
            _opts["epsilon_high"] = 0.28
        CONFIGS[f"{_lt}-{_level}"] = (_opts, {})
for _mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
    CONFIGS[f"vllm-is-{_mode}"] = (dict(loss_type="dapo", beta=0.04, vllm_importance_sampling_mode=_mode,
                                        vllm_importance_sampling_clip_min=0.7, vllm_importance_sampling_clip_max=1.5),
                                   {"is_mode": _mode})
CONFIGS.update({
    "vllm-is-grpo-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence",
                                   vllm_importance_sampling_mode="sequence_truncate",
                                   vllm_importance_sampling_clip_min=0.5), {"is_mode": "sequence_truncate"}),
    "vespo-vllm-is": (dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask",
                           vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0),
                      {"is_mode": "token_mask"}),
    "off-policy-mask": (dict(loss_type="dapo", off_policy_mask_threshold=0.02), {}),
    "off-policy-mask-no-sampler": (dict(loss_type="grpo", off_policy_mask_threshold=0.0), {"sampler": False}),
    "top-entropy": (dict(loss_type="dapo", top_entropy_quantile=0.3, beta=0.04), {}),
    "top-entropy-grpo-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence",
                                       top_entropy_quantile=0.5), {}),
    "entropy-bonus": (dict(loss_type="grpo", entropy_coef=0.05), {}),
    "entropy-bonus-top-entropy": (dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.4), {}),
    "adaptive-entropy-top-entropy": (dict(loss_type="bnpo", use_adaptive_entropy=True, entropy_coef=0.02,
                                          entropy_target=2.7, entropy_coef_delta=0.01, top_entropy_quantile=0.5), {}),
    "everything": (dict(loss_type="dapo", beta=0.04, delta=1.3, off_policy_mask_threshold=0.02,
                        top_entropy_quantile=0.6, entropy_coef=0.03, vllm_importance_sampling_mode="token_truncate",
                        vllm_importance_sampling_clip_min=0.5), {"is_mode": "token_truncate"}),
    "dapo-generation-spans-two-steps": (dict(loss_type="dapo", beta=0.04, steps_per_generation=4,
                                             num_iterations=1), {}),
    "top-entropy-control": (dict(loss_type="dapo", top_entropy_quantile=0.2), {"control": True}),
})


def reward(prompts, completions, answer, **_):
    return tasks.partial_credit(prompts, completions, answer)


def rollout(with_sampler: bool):
    """TRL's rollout_func: completions and sampler log-probs, deterministic in (prompt, position, step)."""

    def run(prompts, trainer):
        tok = trainer.processing_class
        digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        model = trainer.model
        for i, prompt in enumerate(prompts):
            key = f"{prompt}|{i}|{trainer.state.global_step}|{trainer.accelerator.process_index}"
            rng = random.Random(zlib.crc32(key.encode()))
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            n = rng.randint(1, MAX_LEN)
            c_ids = [rng.choice(digits) for _ in range(n)]
            if n < MAX_LEN:
                c_ids[-1] = tok.eos_token_id
            out["prompt_ids"].append(p_ids)
            out["completion_ids"].append(c_ids)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1:-1].float()
            lp = torch.log_softmax(logits / trainer.temperature, -1).gather(-1, torch.tensor(c_ids)[:, None])[:, 0]
            noisy = [v + rng.gauss(0.0, 0.3) for v in lp.tolist()]
            if i % 3 == 1:
                noisy[rng.randrange(n)] = None  # vLLM's NaN log-prob
            out["logprobs"].append(noisy)
        if not with_sampler:
            out["logprobs"] = None
        return out

    return run


def build(cls, model_dir, out_dir, options, harness):
    rng = random.Random(0)
    data = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(48)])
    config = dict(output_dir=str(out_dir), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                  num_generations=4, gradient_accumulation_steps=2, num_iterations=2, max_completion_length=MAX_LEN,
                  max_steps=2, logging_steps=1, save_strategy="no", seed=0, bf16=False, temperature=0.9,
                  # plain SGD: Adam's first step is lr * g / (|g| + eps), which turns the fp32 rounding of gradient
                  # entries near eps into parameter differences of a fraction of lr (two correct implementations
                  # would disagree); SGD moves each parameter by lr * g, so the parameters compare the gradients
                  optim="sgd", learning_rate=1.0)
    config.update(options)
    extra = {} if cls is trl.GRPOTrainer else {"backend": "cpu"}
    trainer = cls(model=str(model_dir), reward_funcs=reward, args=trl.GRPOConfig(**config), train_dataset=data,
                  processing_class=tasks.build_tokenizer(), rollout_func=rollout(harness.get("sampler", True)),
                  **extra)
    if "is_mode" in harness:  # the vLLM sampler correction, with TRL's own ratio code, without vLLM
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        trainer.vllm_generation = types.SimpleNamespace(sync_weights=lambda: None)
        trainer._last_loaded_step = -1
    return trainer


def close(a, b, rtol, atol=1e-6):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def compare(name, model_dir, out):
    options, harness = CONFIGS[name]
    rtol = 5e-5 if options.get("loss_type") == "vespo" else 1e-5
    runs = {}
    for label, cls in (("trl", trl.GRPOTrainer), ("ours", GRPOKernelsTrainer)):
        torch.manual_seed(0)
        trainer = build(cls, model_dir, out / name / label, options, harness)
        saved = adapter._quantile_group
        if harness.get("control") and label == "ours":
            adapter._quantile_group = lambda accelerator: None  # the per-process quantile: must be caught
        try:
            trainer.train()
        finally:
            adapter._quantile_group = saved
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs[label] = ([{k: v for k, v in h.items() if k not in TIMING} for h in trainer.state.log_history], params)
        del trainer
    (log_t, par_t), (log_o, par_o) = runs["trl"], runs["ours"]
    bad, values = [], 0
    if len(log_t) != len(log_o):
        bad.append(f"{len(log_o)} log entries, TRL {len(log_t)}")
    for step, (ht, ho) in enumerate(zip(log_t, log_o)):
        if set(ht) != set(ho):
            bad.append(f"entry {step}: keys {sorted(set(ho) ^ set(ht))} differ")
        for k in set(ht) & set(ho):
            values += 1
            if not close(float(ho[k]), float(ht[k]), rtol):
                bad.append(f"entry {step}: {k} = {ho[k]!r}, TRL {ht[k]!r}")
    worst = 0.0
    for n, t in par_t.items():
        err = ((par_o[n] - t).abs() - rtol * t.abs()).max().item()
        worst = max(worst, (par_o[n] - t).abs().max().item())
        if err > 1e-6:
            bad.append(f"parameter {n}: max |diff| {(par_o[n] - t).abs().max().item():.3g}")
    losses = [h["loss"] for h in log_t if "loss" in h]
    return {"mismatches": bad, "values": values, "parameters": len(par_t), "losses": losses,
            "max_param_diff": worst, "keys": sorted({k for h in log_t for k in h}), "trl_log": log_t}


def main(out: Path, model_dir: Path, names: str):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # the objects of the imports (torch, transformers, datasets) out of the collector's reach: accelerate
    # calls gc.collect() at the end of every train(), which otherwise walks them each time (seconds)
    gc.freeze()
    selected = list(CONFIGS) if names == "all" else names.split(",")
    results = {}
    world = rank = None
    for name in selected:
        results[name] = compare(name, model_dir, out)
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        print(f"[rank {rank}] {name}: {len(results[name]['mismatches'])} mismatches", flush=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "results": results}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
