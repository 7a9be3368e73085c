"""Two GRPO steps of stock ``trl.GRPOTrainer`` or ``GRPOKernelsTrainer`` under ``accelerate launch`` (2 CPU
processes over gloo, sharded by the accelerate config: FSDP2, DeepSpeed ZeRO-3 or DDP), for
tests/test_trl_sharded.py.

Arguments: ``trainer`` ("trl" or "gk"), an output directory, the model directory and optionally the importance
sampling level ("token": dapo, the single-pass loss; "sequence": grpo with GSPO weights, the two-pass loss whose
backward recomputes the head). Rank 0 writes
``log.json`` (the logged metrics; for "gk" also ``kernel_calls``, the head each grpo_kernels call read) and
``params.pt`` (every parameter after the steps, gathered to full size).
"""

import json
import random
import sys
from pathlib import Path

import datasets
import torch
import trl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
import tasks  # noqa: E402

import grpo_kernels.integrations.trl as gk_trl  # noqa: E402
from grpo_kernels.integrations.trl import GRPOKernelsTrainer  # noqa: E402


def reward(prompts, completions, answer, **_):
    return tasks.partial_credit(prompts, completions, answer)


def recording(fn, name, seen):
    def wrapper(hidden, weight, *args, **kwargs):
        seen.append([name, type(weight).__name__, list(weight.shape)])
        return fn(hidden, weight, *args, **kwargs)
    return wrapper


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter at full size on every rank (FSDP2: DTensor.full_tensor(); ZeRO-3: GatheredParameters)."""
    from torch.distributed.tensor import DTensor

    model = trainer.accelerator.unwrap_model(trainer.model)
    named = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def route_cpu_processes_to_fsdp() -> None:
    """accelerate 1.16 switches a launch to FSDP only on accelerator devices: CPU processes stay MULTI_CPU (plain
    DDP) even with an FSDP config. Under ``ACCELERATE_USE_FSDP`` this sets the state's distributed type and
    plugin as accelerate sets them on GPUs, so ``Accelerator.prepare`` shards the model with torch's
    ``fully_shard`` on the gloo group (FSDP2 itself supports CPU)."""
    import os

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)  # a no-op on the shared state after the first call
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies the distributed type from the process state
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def main(kind: str, out: Path, model_dir: Path, level: str = "token"):
    route_cpu_processes_to_fsdp()
    rng = random.Random(0)
    data = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(16)])
    args = trl.GRPOConfig(output_dir=str(out / "run"), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=4, max_steps=2, logging_steps=1,
                          save_strategy="no", seed=0, learning_rate=0.5, optim="sgd", bf16=False, beta=0.04,
                          gradient_accumulation_steps=2, importance_sampling_level=level,
                          loss_type="dapo" if level == "token" else "grpo")
    common = dict(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                  processing_class=tasks.build_tokenizer())
    seen = []  # the type of the head weight each grpo_kernels call received
    if kind == "trl":
        trainer = trl.GRPOTrainer(**common)
    else:
        for name in ("fused_linear_grpo_loss_with_config", "fused_linear_token_logprobs"):
            setattr(gk_trl, name, recording(getattr(gk_trl, name), name, seen))
        gathered = gk_trl._gathered_head

        def recording_gather(lm_head):
            w = lm_head.weight
            seen.append(["lm_head", type(w).__name__, list(w.shape), str(getattr(w, "ds_status", "")).split(".")[-1]])
            return gathered(lm_head)

        gk_trl._gathered_head = recording_gather
        trainer = GRPOKernelsTrainer(**common, backend="cpu")
    trainer.train()
    params = full_parameters(trainer)
    if trainer.accelerator.process_index == 0:
        torch.save(params, out / "params.pt")
        (out / "log.json").write_text(json.dumps({
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "history": trainer.state.log_history, "kernel_calls": seen}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])
