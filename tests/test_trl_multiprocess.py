"""GRPOKernelsTrainer against stock TRL 1.16 under ``accelerate launch`` with 2 and 3 CPU processes (gloo).

tests/scripts/trl_multiprocess_parity.py runs both trainers for two optimizer steps, configuration after
configuration, in one launched process group (the process start-up is paid once per launch): every loss type
at both importance-sampling levels with beta > 0, the vLLM sampler correction in TRL's four modes (sampler
log-probs from a rollout function, with NaN tokens), the off-policy mask (with and without sampler log-probs),
the top-entropy mask, the entropy bonus (static, with the top-entropy mask, adaptive), a generation batch
spanning two optimizer steps, and everything at once. Everything TRL reduces or gathers across processes must
come out the same: every logged value of every step (loss, grad_norm, rewards, each loss metric and its
reduction) and every parameter after the two steps agree to 1e-5 relative (vespo 5e-5: its weight is an
exponential of a sum of log-ratios) on every rank. With 3 processes the groups of 4 completions straddle
processes and the token counts differ between ranks.

One configuration is a control: the adapter with the top-entropy quantile taken per process (what it did
before) must NOT match, which shows the comparison detects a wrong cross-process reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import tasks  # noqa: E402
import trl_multiprocess_parity as harness  # noqa: E402

CONTROL = "top-entropy-control"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_mp")
    tok = tasks.build_tokenizer()
    tasks.build_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def launch(processes: int, names: list[str], out: Path, model_dir: Path) -> list[dict]:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(root / "tests" / "scripts" / "trl_multiprocess_parity.py"), str(out), str(model_dir), ",".join(names)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert all(r["world"] == processes for r in reports)
    return reports


@pytest.mark.parametrize("processes", [2, 3])
def test_adapter_matches_trl_across_processes(model_dir, tmp_path, processes):
    names = list(harness.CONFIGS)
    reports = launch(processes, names, tmp_path, model_dir)
    failures = []
    for rank, report in enumerate(reports):
        assert set(report["results"]) == set(names)
        for name, res in report["results"].items():
            # a comparison that could not fail would compare nothing: two steps, every parameter, real losses
            assert res["parameters"] > 10 and res["values"] >= 30, (name, res)
            assert len(res["losses"]) == 2 and any(abs(v) > 1e-4 for v in res["losses"]), (name, res["losses"])
            if name == CONTROL:
                assert res["mismatches"], f"rank {rank}: the per-process entropy quantile went undetected"
            elif res["mismatches"]:
                failures.append(f"rank {rank} {name}: " + "; ".join(res["mismatches"][:6]))
    assert not failures, "\n".join(failures)
    results = reports[0]["results"]
    keys = set().union(*(res["keys"] for res in results.values()))
    # the metrics of every option were logged (and so compared) somewhere in the matrix
    for k in ("kl", "entropy", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean",
              "policy_loss", "entropy_coef", "sampling/importance_sampling_ratio/mean", "grad_norm"):
        assert k in keys, k
    # and the options acted: the second step is off-policy enough to clip, the sampler ratio is not 1, the
    # adaptive controller moved its coefficient
    second = lambda name: [h for h in results[name]["trl_log"] if "loss" in h][1]  # noqa: E731
    assert second("dapo-token")["clip_ratio/region_mean"] > 0
    ratios = [h["sampling/importance_sampling_ratio/mean"] for h in results["vllm-is-token_mask"]["trl_log"]
              if "sampling/importance_sampling_ratio/mean" in h]  # logged at the steps that generate
    assert ratios and all(r != 1.0 for r in ratios)
    coefs = [h["entropy_coef"] for h in results["adaptive-entropy-top-entropy"]["trl_log"] if "loss" in h]
    assert coefs[0] != coefs[1] or coefs[0] != 0.02, coefs
