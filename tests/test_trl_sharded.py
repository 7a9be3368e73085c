"""GRPOKernelsTrainer under sharded data parallelism: two CPU processes over gloo under ``accelerate launch``.

tests/scripts/trl_sharded.py runs two ``train()`` steps (plain SGD, so that parameters differ by the rounding of
the gradients only) of stock ``trl.GRPOTrainer`` or of ``GRPOKernelsTrainer``; every logged value and every
parameter (gathered to full size) is compared to 1e-5.

- FSDP2, tied embeddings (the digit Qwen2 of python/tasks.py): the head is in the root unit, which FSDP
  unshards around the model's forward; the adapter must equal stock TRL under the same launch.
- FSDP2 with an untied ``lm_head`` that is its own ``fully_shard`` unit (``Qwen2DecoderLayer,Linear`` wrapping):
  the adapter gets a DTensor head and must equal a plain DDP run of stock TRL (the gradient averaged over the
  ranks). Stock TRL's own fused head is not the reference here: its ``full_tensor()`` gives each rank's shard
  the gradient of that rank's batch only, since FSDP never reduces the gradient of a unit whose forward did
  not run.
- DeepSpeed ZeRO-3 (DeepSpeed's CPU accelerator, gloo), untied head: the head is a partitioned ZeRO-3
  parameter, gathered TRL's way for the forward and again in backward until its gradient is accumulated (it is
  partitioned again by then). The
  adapter must equal stock TRL under the same launch (which equals DDP there). DeepSpeed builds its CPU
  shared-memory communication extension on first use (a C++ compile of about a minute, cached afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import tasks  # noqa: E402

SCRIPT = ROOT / "tests" / "scripts" / "trl_sharded.py"
BASE = """compute_environment: LOCAL_MACHINE
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
"""
FSDP2 = BASE + """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: {wrap}
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
DDP = BASE + "distributed_type: MULTI_GPU\n"
ZERO3 = BASE + """distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
  gradient_accumulation_steps: 2
"""


def save_model(path: Path, tied: bool) -> Path:
    from transformers import Qwen2ForCausalLM

    tok = tasks.build_tokenizer()
    model = tasks.build_model(tok, seed=0)
    if not tied:
        config = model.config
        config.tie_word_embeddings = False
        with torch.random.fork_rng():
            torch.manual_seed(1)
            untied = Qwen2ForCausalLM(config)
        untied.generation_config = model.generation_config
        model = untied
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_models")
    return {"tied": save_model(root / "tied", True), "untied": save_model(root / "untied", False)}


def launch(config_text: str, kind: str, model: Path, out: Path, level: str = "token") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "accelerate.yaml"
    config.write_text(config_text)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT), kind,
           str(out), str(model), level]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    log = json.loads((out / "log.json").read_text())
    log["params"] = torch.load(out / "params.pt")
    return log


def assert_same_run(ours: dict, theirs: dict) -> None:
    steps_o = [h for h in ours["history"] if "loss" in h]
    steps_t = [h for h in theirs["history"] if "loss" in h]
    assert len(steps_o) == len(steps_t) == 2
    for o, t in zip(steps_o, steps_t):
        assert set(o) == set(t), set(o) ^ set(t)
        for k in o:
            if k == "step_time":
                continue
            assert o[k] == pytest.approx(t[k], rel=1e-5, abs=1e-6), k
    assert set(ours["params"]) == set(theirs["params"])
    for n, p in theirs["params"].items():
        torch.testing.assert_close(ours["params"][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_fsdp2_tied_head_equals_trl(models, tmp_path):
    config = FSDP2.format(wrap="Qwen2DecoderLayer")
    theirs = launch(config, "trl", models["tied"], tmp_path / "trl")
    ours = launch(config, "gk", models["tied"], tmp_path / "gk")
    assert ours["world"] == theirs["world"] == 2
    assert ours["distributed_type"] == theirs["distributed_type"] == "DistributedType.FSDP"
    kinds = {c[0] for c in ours["kernel_calls"]}
    assert {"fused_linear_grpo_loss_with_config", "fused_linear_token_logprobs"} <= kinds
    assert_same_run(ours, theirs)


def test_fsdp2_sharded_head_equals_ddp(models, tmp_path):
    """The head is a DTensor when the adapter reads it; its gradient must be averaged over the ranks as DDP's."""
    reference = launch(DDP, "trl", models["untied"], tmp_path / "ddp")
    ours = launch(FSDP2.format(wrap="Qwen2DecoderLayer,Linear"), "gk", models["untied"], tmp_path / "gk")
    assert reference["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ours["distributed_type"] == "DistributedType.FSDP"
    calls = ours["kernel_calls"]
    # the training forwards (not the log-prob passes under generation's gathered parameters) get the DTensor
    heads = [calls[i - 1] for i, c in enumerate(calls) if c[0] == "fused_linear_grpo_loss_with_config"]
    assert heads and all(h[:2] == ["lm_head", "DTensor"] for h in heads), calls
    assert_same_run(ours, reference)
    # the steps moved the head far beyond the tolerance, so the comparison can fail
    from safetensors.torch import load_file

    start = load_file(models["untied"] / "model.safetensors")["lm_head.weight"]
    assert (ours["params"]["lm_head.weight"] - start).abs().max() > 1e-2


@pytest.mark.parametrize("level", ["token", "sequence"])  # the single-pass loss / the two-pass loss
def test_zero3_partitioned_head_equals_trl(models, tmp_path, level):
    pytest.importorskip("deepspeed")
    theirs = launch(ZERO3, "trl", models["untied"], tmp_path / "trl", level)
    ours = launch(ZERO3, "gk", models["untied"], tmp_path / "gk", level)
    assert ours["distributed_type"] == theirs["distributed_type"] == "DistributedType.DEEPSPEED"
    calls = ours["kernel_calls"]
    heads = [calls[i - 1] for i, c in enumerate(calls) if c[0] == "fused_linear_grpo_loss_with_config"]
    # a ZeRO-3 parameter (partitioned outside the forward; inside it, ZeRO-3's prefetch may have gathered it)
    assert heads and all(h[0] == "lm_head" and h[3] in ("AVAILABLE", "NOT_AVAILABLE", "INFLIGHT") for h in heads)
    assert_same_run(ours, theirs)
