"""python/train_grpo.py: a few real steps of the embedded demo, its outputs, resume, seeds, bad input, DDP.

Most runs call ``train_grpo.main(argv)`` in this process (the imports are paid once); one run goes
through the command line to check the error format, and one starts 2 processes with
``torch.distributed.run`` (gloo). Every run is tiny: 4 prompts x 4 completions, a few steps.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "train_grpo.py"
sys.path.insert(0, str(ROOT / "python"))
import train_grpo  # noqa: E402

from grpo_kernels.config import LOSS_TYPES  # noqa: E402

TINY = ["--prompts-per-step", "4", "--group-size", "4", "--target-reward", "0", "--time-budget", "0", "--no-progress"]
TIMINGS = ("step_time", "gen_time", "loss_time")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # main() sets 1 thread for the tiny model; give the other tests theirs back
    yield
    torch.set_num_threads(n)


def run(out, *extra, steps=3):
    train_grpo.main([*TINY, "--steps", str(steps), "--out", str(out), *map(str, extra)])
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timings(row):
    return {k: v for k, v in row.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """3 steps, seed 0, a checkpoint at step 2 and at the end."""
    out = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    try:
        rows = run(out, "--save-every", "2", "--seed", "0")
    finally:
        torch.set_num_threads(n)
    return out, rows


def test_smoke_outputs(reference_run, capsys):
    out, rows = reference_run
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "loss", "entropy", "kl_old", "clip_ratio/region_mean", "grad_norm", "num_items_in_batch"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert 0.0 <= r["reward"] <= 1.0
        assert r["num_items_in_batch"] == sum(r["tokens_per_rank"]) > 0
    assert (out / "train.png").stat().st_size > 10_000
    for step in (2, 3):
        ck = out / f"checkpoint-{step}"
        assert (ck / "config.json").is_file() and (ck / "tokenizer.json").is_file()
        assert torch.load(ck / "training_state.pt", weights_only=False)["step"] == step
    # The saved checkpoint is a normal Hugging Face model directory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    assert AutoTokenizer.from_pretrained(out / "checkpoint-3")("1 2 =")["input_ids"] == [1, 5, 6, 3]


def test_summary_is_printed(tmp_path, capsys):
    run(tmp_path, steps=2)
    text = capsys.readouterr().out
    for needle in ("start reward", "final reward", "steps/s", "completion tokens/s", "in grpo_kernels.grpo_loss"):
        assert needle in text, needle


def test_seed_reproduces_a_run(reference_run, tmp_path):
    _, rows = reference_run
    again = run(tmp_path / "again", "--seed", "0", steps=2)
    other = run(tmp_path / "other", "--seed", "1", steps=2)
    assert [without_timings(r) for r in again] == [without_timings(r) for r in rows[:2]]
    assert [r["reward"] for r in other] != [r["reward"] for r in rows[:2]]


def test_resume_continues_the_same_run(reference_run, tmp_path):
    out, rows = reference_run
    resumed = run(tmp_path, "--resume", out / "checkpoint-2", "--seed", "0")
    assert [r["step"] for r in resumed] == [3]
    assert without_timings(resumed[0]) == without_timings(rows[2])


def test_backend_torch_and_auto_give_the_same_first_step_loss(tmp_path):
    auto = run(tmp_path / "auto", "--backend", "auto", steps=1)[0]
    eager = run(tmp_path / "torch", "--backend", "torch", steps=1)[0]
    assert eager["loss"] == pytest.approx(auto["loss"], abs=1e-5)
    assert eager["reward"] == auto["reward"]  # the same samples: the rollout does not depend on the backend


def test_prompts_file_and_custom_reward(tmp_path, capsys):
    rows = [{"prompt": "1 2 3 =", "answer": "1 2 3"}, {"prompt": "4 5 6 =", "answer": "4 5 6"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    rew = tmp_path / "my_reward.py"
    rew.write_text("def first_digit(prompts, completions, answers):\n"
                   "    return [float(c.split()[:1] == a.split()[:1]) for c, a in zip(completions, answers)]\n")
    out = run(tmp_path / "out", "--prompts", data, "--reward", f"{rew}:first_digit", steps=2)
    assert len(out) == 2 and all(r["reward"] in [i / 16 for i in range(17)] for r in out)
    assert "max_new_tokens 4" in capsys.readouterr().out  # the longest answer (3 tokens) + EOS


def test_missing_model_path_is_a_clear_cli_error(tmp_path):
    missing = tmp_path / "no_such_model"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(missing), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error" in proc.stderr and str(missing) in proc.stderr and "not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1 =", "answer": "1"}\n{"prompt": "2 =", "answer": \n')
    with pytest.raises(train_grpo.UsageError, match=rf"{data}:2: not valid JSON"):
        run(tmp_path / "out", "--prompts", data)
    data.write_text('{"prompt": "1 =", "answer": "1"}\n\n{"prompt": "2 ="}\n')
    with pytest.raises(train_grpo.UsageError, match=rf"{data}:3: field 'answer' must be a string"):
        run(tmp_path / "out", "--prompts", data)


@pytest.mark.parametrize("body, message", [
    ("return [0.5]", r"returned 1 values for 16 completions"),
    ("return [float('nan')] * len(completions)", r"returned non-finite values at completions \[0, 1, 2"),
    ("return 'abc'", r"must return a list of floats"),
])
def test_bad_reward_function_is_a_clear_error(tmp_path, body, message):
    rew = tmp_path / "bad_reward.py"
    rew.write_text(f"def fn(prompts, completions, answers):\n    {body}\n")
    with pytest.raises(train_grpo.UsageError, match=rf"reward function '.*bad_reward.py:fn' {message}"):
        run(tmp_path / "out", "--reward", f"{rew}:fn", steps=1)
    with pytest.raises(train_grpo.UsageError, match="has no function 'nope'"):
        run(tmp_path / "out", "--reward", f"{rew}:nope", steps=1)


def test_two_processes_with_ddp_gloo(tmp_path):
    """torchrun with 2 CPU processes: finishes, and num_items_in_batch is the sum over both ranks."""
    rows = [{"prompt": " ".join(str((3 * i + k) % 10) for k in range(3)) + " =",
             "answer": " ".join(str((3 * i + k) % 10) for k in range(3))} for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *TINY, "--steps", "3", "--out", str(tmp_path / "out"), "--prompts", str(data), "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ranks: 2 (cpu)" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert len(m["tokens_per_rank"]) == 2 and min(m["tokens_per_rank"]) > 0
        assert m["num_items_in_batch"] == sum(m["tokens_per_rank"])
    # Rank 0 wrote a checkpoint that loads as a plain (not DDP-wrapped) model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-3")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_and_accumulates_like_one_micro_batch(tmp_path, loss_type):
    """Every --loss-type runs a few steps, and 16 sequences as micro-batches of 5, 5, 5, 1 give the loss,
    gradient norm and metrics of one micro-batch of 16: each loss type's micro-batch weight (its share of the
    batch's sequences or tokens, or 1 under the global num_items_in_batch normaliser) is the right one."""
    split = run(tmp_path / "split", "--micro-batch", "5", "--loss-type", loss_type, steps=3)
    whole = run(tmp_path / "whole", "--micro-batch", "16", "--loss-type", loss_type, steps=1)[0]
    assert [r["step"] for r in split] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in split)
    own = {"cispo": ["cispo_clip_ratio"], "sapo": [], "vespo": []}  # sapo and vespo: no clip metric
    for key in ["loss", "grad_norm", "entropy", "kl_old", *own.get(loss_type, ["clip_ratio/region_mean"])]:
        assert key in whole and split[0][key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), key


def test_kl_to_a_frozen_reference_with_beta(tmp_path):
    rows = run(tmp_path, "--beta", "0.04", steps=2)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1, iteration 0: the policy is the reference
    assert rows[1]["kl"] > 1e-5  # one step later it has moved away from the frozen copy


def test_local_model_directory(tmp_path, capsys):
    import tasks

    tok = tasks.build_tokenizer()
    tasks.build_model(tok, seed=3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = run(tmp_path / "out", "--model", tmp_path / "model", steps=2)
    assert len(rows) == 2 and f"model: {tmp_path / 'model'}" in capsys.readouterr().out


def test_help_shows_every_default(capsys):
    """--help gives each option's default (the value, or a sentence saying what the default is)."""
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--help"])
    text = capsys.readouterr().out
    blocks = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            name = stripped.split()[0].rstrip(",")
            blocks[name] = stripped
        elif blocks and line.startswith(" " * 10):
            blocks[name] += " " + stripped
    for name in ("--group-size", "--lr", "--beta", "--mu", "--steps", "--micro-batch", "--seed", "--loss-type",
                 "--weight-decay", "--max-grad-norm", "--epsilon"):
        assert "default" in blocks[name], (name, blocks[name])
    assert "(default: 16)" in blocks["--group-size"] and "(default: 0.001)" in blocks["--lr"]
    missing = [n for n, b in blocks.items() if n not in ("--help",) and "default" not in b]
    assert not missing, missing


TRL_STYLE_REWARD = '''
def first_digit(completions, answer, prompts=None, completion_ids=None, source=None, **kwargs):
    """Written for trl.GRPOTrainer: data columns arrive as keyword lists."""
    assert len(prompts) == len(completions) == len(answer) == len(completion_ids) == len(source)
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in completion_ids)
    assert set(source) == {"file"}
    return [float(c.split()[:1] == a.split()[:1]) for c, a in zip(completions, answer)]
'''


def test_trl_style_reward_function(tmp_path):
    """A reward file written TRL's way (prompts, completions, **kwargs; columns such as answer= as keywords)."""
    rows = [{"prompt": "1 2 3 =", "answer": "1 2 3", "source": "file"},
            {"prompt": "4 5 6 =", "answer": "4 5 6", "source": "file"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rew = tmp_path / "trl_reward.py"
    rew.write_text(TRL_STYLE_REWARD)
    out = run(tmp_path / "out", "--prompts", data, "--reward", f"{rew}:first_digit", steps=1)
    assert len(out) == 1 and out[0]["reward"] in [i / 16 for i in range(17)]


def test_reward_conventions():
    """The built-in rewards take TRL's keywords and the positional (prompts, completions, answers) call alike."""
    import tasks

    prompts, completions, answers = ["1 2 ="] * 3, ["1 2", "1 3", ""], ["1 2"] * 3
    positional = tasks.partial_credit(prompts, completions, answers)
    assert positional == [1.0, 2 / 3, 0.0]
    assert tasks.partial_credit(prompts=prompts, completions=completions, answer=answers, completion_ids=[[]] * 3,
                                trainer_state=None) == positional
    assert train_grpo.takes_trl_keywords(tasks.partial_credit)
    legacy = lambda prompts, completions, answers: [len(a) for a in answers]  # noqa: E731
    assert not train_grpo.takes_trl_keywords(legacy)
    columns = {"answer": answers}
    assert train_grpo.call_reward(legacy, prompts, completions, [[]] * 3, columns) == [3, 3, 3]
    assert train_grpo.call_reward(tasks.partial_credit, prompts, completions, [[]] * 3, columns) == positional
