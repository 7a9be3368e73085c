"""One GRPOKernelsTrainer step under ``accelerate launch --num_processes 2`` on the CPU (gloo), for
tests/test_trl_adapter.py. Argument: an output directory; rank 0 writes ``log.json`` there (the logged
metrics) and every rank writes ``rank{r}.pt`` (its parameters after the step: DDP must keep them equal)."""

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

from grpo_kernels.integrations.trl import GRPOKernelsTrainer  # noqa: E402


def reward(prompts, completions, answer, **_):
    return tasks.partial_credit(prompts, completions, answer)


def main(out: Path, model_dir: Path):
    rng = random.Random(0)
    data = datasets.Dataset.from_list([tasks.make_example("copy", 3, rng) for _ in range(16)])
    args = trl.GRPOConfig(output_dir=str(out / "run"), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=4, max_steps=1, logging_steps=1,
                          save_strategy="no", seed=0, learning_rate=1e-2, bf16=False, beta=0.04,
                          gradient_accumulation_steps=2)
    trainer = GRPOKernelsTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                                 processing_class=tasks.build_tokenizer(), backend="cpu")
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "log.json").write_text(json.dumps({"world": trainer.accelerator.num_processes,
                                                  "history": trainer.state.log_history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
