"""Bad input: every rejected input, checked against the table of docs/bad-inputs.md.

That page's table (between ``<!-- bad-input-table -->`` and ``<!-- /bad-input-table -->``) lists each rejected
input with its case id, the exception and the message (``…`` stands for a part that varies). Here each case id
is a call that makes that input; ``test_readme_row[<id>]`` runs it and checks that it raises exactly the listed
exception with a message matching the listed one, and ``test_table_and_cases_agree`` that every case is in the
table and every row has a case. (tests/test_api.py tests many of the same inputs for the argument name only.)
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import grpo_kernels as gk
from grpo_kernels import backends
from grpo_kernels import vocab_parallel as vp
from grpo_kernels.backends import BackendUnavailableError
from grpo_kernels.config import GRPOConfig
from kernel_checks import one_process_group

TABLE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
B, T, V, G = 4, 3, 7, 2
ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError,
          "BackendUnavailableError": BackendUnavailableError}


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return dict(logits=logits, ids=ids, mask=torch.ones(B, T, dtype=torch.bool), adv=torch.randn(B, generator=g),
                old=logp - 0.1, ref=logp + 0.1)


X = _inputs()


def loss(**over):
    """grpo_loss on valid inputs (off-policy, beta = 0.04, backend "torch") with some arguments replaced."""
    kw = dict(completion_mask=X["mask"], advantages=X["adv"], old_logps=X["old"], ref_logps=X["ref"], beta=0.04,
              backend="torch")
    logits, ids = over.pop("logits", X["logits"]), over.pop("completion_ids", X["ids"])
    kw.update(over)
    return gk.grpo_loss(logits, ids, **kw)


def logprobs(**over):
    kw = dict(backend="torch")
    logits, ids = over.pop("logits", X["logits"]), over.pop("ids", X["ids"])
    kw.update(over)
    return gk.token_logprobs(logits, ids, **kw)


def advantages(rewards=None, group_size=G, **kw):
    return gk.group_advantages(torch.zeros(B) if rewards is None else rewards, group_size, **kw)


def meta(t):
    """A tensor on another device ("meta" stands in for a second device on a one-device machine)."""
    return t.to("meta")


def ids_at(value, pos=(0, 1)):
    ids = X["ids"].clone()
    ids[pos] = value
    return ids


def mask_at(value, pos=(1, 1)):
    mask = X["mask"].float()
    mask[pos] = value
    return mask


def inplace_sharing(name):
    """inplace=True with ``name`` a view of the logits' own memory."""
    logits = X["logits"].clone()
    return loss(logits=logits, inplace=True, backend=FUSED_CPU or "cpu", **{name: logits[..., 0]})


def trl_config(**options):
    """A trl.GRPOConfig (trl is imported only by the rows that need it)."""
    trl = pytest.importorskip("trl")
    return trl.GRPOConfig(output_dir=tempfile.gettempdir(), report_to=[], bf16=False, **options)


def cpu_isa_env(mp, value):
    """The check the cpu backend runs when it is first used (its module is imported then)."""
    mp.setenv("GRPO_KERNELS_CPU_ISA", value)
    if FUSED_CPU != "cpu":
        pytest.skip("the C++ CPU backend is not built")
    from grpo_kernels.backends import cpu_backend

    return cpu_backend.check_isa_env()


def env_backend(mp, value, call):
    mp.setenv(backends.ENV_VAR, value)
    return call()


def no_module(mp, call):
    mp.setattr(backends.importlib.util, "find_spec", lambda name: None)
    return call()


H = 5
HIDDEN, WEIGHT = torch.randn(B, T, H), torch.randn(V, H)


def linear(**over):
    """fused_linear_grpo_loss on valid inputs (the X batch through a random [V, H] head, backend "torch") with
    some arguments replaced."""
    kw = dict(completion_mask=X["mask"], advantages=X["adv"], backend="torch")
    hidden, weight = over.pop("hidden", HIDDEN), over.pop("lm_head_weight", WEIGHT)
    ids = over.pop("completion_ids", X["ids"])
    kw.update(over)
    return gk.fused_linear_grpo_loss(hidden, weight, ids, **kw)


def vp_logprobs(**over):
    """vocab_parallel.token_logprobs of the X batch as the one shard of a world of 1, some arguments replaced."""
    kw = dict(backend="torch")
    shard, ids = over.pop("logits_shard", X["logits"]), over.pop("ids", X["ids"])
    kw.update(over)
    with one_process_group():
        return vp.token_logprobs(shard, ids, **kw)


def vp_loss(**over):
    """vocab_parallel.grpo_loss on valid inputs (as ``loss``) in a world of 1, some arguments replaced."""
    kw = dict(completion_mask=X["mask"], advantages=X["adv"], backend="torch")
    shard, ids = over.pop("logits_shard", X["logits"]), over.pop("completion_ids", X["ids"])
    kw.update(over)
    with one_process_group():
        return vp.grpo_loss(shard, ids, **kw)


FUSED_CPU = next((n for n in gk.available_backends("cpu") if n != "torch"), None)

# case id -> a call (given pytest's monkeypatch) that makes the rejected input of the table row with that id
CASES = {
    # ---- logits (grpo_loss, token_logprobs) ----
    "logits-not-a-tensor": lambda mp: loss(logits=X["logits"].tolist()),
    "logits-integer": lambda mp: loss(logits=X["logits"].long()),
    "logits-bool": lambda mp: logprobs(logits=X["logits"] > 0),
    "logits-empty-vocabulary": lambda mp: logprobs(logits=torch.zeros(B, T, 0), ids=X["ids"]),
    "logits-last-stride": lambda mp: loss(logits=torch.randn(B, T, 2 * V)[..., ::2]),
    "logits-vocab-major": lambda mp: logprobs(logits=torch.randn(V, B, T).permute(1, 2, 0)),
    "logits-not-3d": lambda mp: loss(logits=X["logits"][0]),
    "logits-float64-fused": lambda mp: loss(logits=X["logits"].double(), backend=FUSED_CPU or "cpu"),
    # ---- completion_ids / ids ----
    "completion_ids-float": lambda mp: loss(completion_ids=X["ids"].float()),
    "completion_ids-1d": lambda mp: loss(completion_ids=X["ids"][0]),
    "completion_ids-shape": lambda mp: loss(completion_ids=X["ids"][:2]),
    "logits-one-position-more": lambda mp: loss(logits=torch.randn(B, T + 1, V)),
    "completion_ids-device": lambda mp: loss(completion_ids=meta(X["ids"])),
    "completion_ids-out-of-range": lambda mp: loss(completion_ids=ids_at(V)),
    "completion_ids-negative": lambda mp: loss(completion_ids=ids_at(-100, (3, 2))),
    "ids-float": lambda mp: logprobs(ids=X["ids"].float()),
    "ids-shape": lambda mp: logprobs(ids=X["ids"][:, :2]),
    "ids-device": lambda mp: logprobs(ids=meta(X["ids"])),
    "ids-out-of-range": lambda mp: logprobs(ids=X["ids"] + V),
    # ---- completion_mask ----
    "completion_mask-1d": lambda mp: loss(completion_mask=X["mask"][0]),
    "completion_mask-shape": lambda mp: loss(completion_mask=X["mask"][:2]),
    "completion_mask-device": lambda mp: loss(completion_mask=meta(X["mask"])),
    "completion_mask-negative": lambda mp: loss(completion_mask=mask_at(-1.0)),
    "completion_mask-not-finite": lambda mp: loss(completion_mask=mask_at(float("nan"))),
    "completion_mask-complex": lambda mp: loss(completion_mask=X["mask"].to(torch.complex64)),
    # ---- advantages / rewards / group_size ----
    "advantages-and-rewards": lambda mp: loss(rewards=torch.zeros(B), group_size=G),
    "advantages-nor-rewards": lambda mp: loss(advantages=None),
    "advantages-not-a-tensor": lambda mp: loss(advantages=[0.1, 0.2, 0.3, 0.4]),
    "advantages-integer": lambda mp: loss(advantages=X["adv"].long()),
    "advantages-3d": lambda mp: loss(advantages=torch.zeros(B, T, 1)),
    "advantages-shape": lambda mp: loss(advantages=torch.zeros(B, T + 1)),
    "advantages-device": lambda mp: loss(advantages=meta(X["adv"])),
    "rewards-2d": lambda mp: loss(advantages=None, rewards=torch.zeros(B, 1), group_size=G),
    "rewards-integer": lambda mp: loss(advantages=None, rewards=torch.zeros(B, dtype=torch.long), group_size=G),
    "rewards-shape": lambda mp: loss(advantages=None, rewards=torch.zeros(B + 2), group_size=G),
    "rewards-device": lambda mp: loss(advantages=None, rewards=meta(torch.zeros(B)), group_size=G),
    "group_size-missing": lambda mp: loss(advantages=None, rewards=torch.zeros(B)),
    "group_size-not-int": lambda mp: loss(advantages=None, rewards=torch.zeros(B), group_size=2.0),
    "group_size-below-2": lambda mp: loss(advantages=None, rewards=torch.zeros(B), group_size=1),
    "group_size-not-dividing-B": lambda mp: loss(advantages=None, rewards=torch.zeros(B), group_size=3),
    # ---- old / ref log-probs ----
    "old_logps-integer": lambda mp: loss(old_logps=X["old"].long()),
    "old_logps-1d": lambda mp: loss(old_logps=X["old"][0]),
    "old_logps-shape": lambda mp: loss(old_logps=X["old"][:, :2]),
    "old_logps-device": lambda mp: loss(old_logps=meta(X["old"])),
    "ref_logps-shape": lambda mp: loss(ref_logps=X["ref"].T),
    "ref_logps-device": lambda mp: loss(ref_logps=meta(X["ref"])),
    "ref_logps-missing-with-beta": lambda mp: loss(ref_logps=None),
    # ---- sampler importance ratio, sampling log-probs, process group ----
    "importance_sampling_ratio-shape": lambda mp: loss(importance_sampling_ratio=torch.ones(B, 2)),
    "importance_sampling_ratio-integer": lambda mp: loss(importance_sampling_ratio=torch.ones(B, T, dtype=torch.long)),
    "importance_sampling_ratio-device": lambda mp: loss(importance_sampling_ratio=meta(torch.ones(B, 1))),
    "importance_sampling_ratio-negative": lambda mp: loss(importance_sampling_ratio=-torch.ones(B, 1)),
    "sampling_logps-shape": lambda mp: loss(sampling_logps=X["old"][:, :2]),
    "sampling_logps-device": lambda mp: loss(sampling_logps=meta(X["old"])),
    "process_group-without-distributed": lambda mp: loss(process_group=object()),
    "sampler_importance_ratio-mode": lambda mp: gk.sampler_importance_ratio(X["old"], X["ref"], mode="token"),
    "sampler_importance_ratio-shape": lambda mp: gk.sampler_importance_ratio(X["old"], X["ref"][:, :2]),
    "sampler_importance_ratio-clip": lambda mp: gk.sampler_importance_ratio(X["old"], X["ref"], clip_max="3"),
    # ---- reduction arguments ----
    "max_completion_length-not-positive": lambda mp: loss(max_completion_length=0),
    "max_completion_length-float": lambda mp: loss(max_completion_length=3.0),
    "num_items_in_batch-not-positive": lambda mp: loss(num_items_in_batch=0),
    "num_items_in_batch-tensor-size": lambda mp: loss(num_items_in_batch=torch.ones(2)),
    "num_items_in_batch-meta": lambda mp: loss(num_items_in_batch=torch.tensor(4.0, device="meta")),
    # ---- loss options (grpo_loss, GRPOConfig, GRPOLoss) ----
    "loss_type-unknown": lambda mp: loss(loss_type="ppo"),
    "level-unknown": lambda mp: loss(importance_sampling_level="tokens"),
    "option-not-a-number": lambda mp: loss(beta="0.04"),
    "option-bool-as-number": lambda mp: GRPOConfig(temperature=True),
    "option-not-finite": lambda mp: loss(temperature=float("nan")),
    "option-not-positive": lambda mp: loss(temperature=0.0),
    "option-negative": lambda mp: loss(epsilon_low=-0.1),
    "epsilon_high-negative": lambda mp: loss(epsilon_high=-0.1),
    "delta-not-positive": lambda mp: loss(delta=0.0),
    "sapo-temperature-not-positive": lambda mp: loss(sapo_temperature_neg=0.0),
    "use_bias_correction_kl-not-bool": lambda mp: loss(use_bias_correction_kl=1),
    "top_entropy_quantile-out-of-range": lambda mp: loss(top_entropy_quantile=1.5),
    "off_policy_mask_threshold-not-finite": lambda mp: loss(off_policy_mask_threshold=float("inf")),
    "inplace-not-bool": lambda mp: loss(inplace=1),
    "inplace-on-the-reference": lambda mp: loss(inplace=True),
    "inplace-leaf-requires-grad": lambda mp: loss(logits=X["logits"].clone().requires_grad_(), inplace=True,
                                                  backend=FUSED_CPU or "cpu"),
    "inplace-view-of-leaf": lambda mp: loss(logits=X["logits"].clone().requires_grad_()[:, :, :], inplace=True,
                                            backend=FUSED_CPU or "cpu"),
    "inplace-overlapping-logits": lambda mp: loss(logits=X["logits"][:1].expand(B, T, V), inplace=True,
                                                  backend=FUSED_CPU or "cpu"),
    "inplace-logits-shared-with-input": lambda mp: inplace_sharing("old_logps"),
    "epsilon-and-epsilon_low": lambda mp: loss(epsilon=0.3, epsilon_low=0.25),
    # ---- token_logprobs options ----
    "temperature-not-a-number": lambda mp: logprobs(temperature="1"),
    "temperature-not-finite-or-positive": lambda mp: logprobs(temperature=float("-inf")),
    "return_entropy-not-bool": lambda mp: logprobs(return_entropy=1),
    # ---- group_advantages ----
    "group_advantages-rewards-2d": lambda mp: advantages(torch.zeros(B, 1)),
    "group_advantages-group_size": lambda mp: advantages(group_size=3),
    "group_advantages-scale": lambda mp: advantages(scale="std"),
    "group_advantages-eps": lambda mp: advantages(eps=-1e-4),
    # ---- GRPOLoss ----
    "GRPOLoss-config-and-options": lambda mp: gk.GRPOLoss(GRPOConfig(), beta=0.1),
    "GRPOLoss-unknown-option": lambda mp: gk.GRPOLoss(epsilon_lo=0.2),
    "GRPOLoss-epsilon-and-epsilon_low": lambda mp: gk.GRPOLoss(epsilon=0.2, epsilon_low=0.2),
    "GRPOLoss-backend": lambda mp: gk.GRPOLoss(backend="gpu"),
    # ---- fused_linear_grpo_loss / FusedLinearGRPOLoss (the loss inputs as grpo_loss's rows) ----
    "hidden-not-3d": lambda mp: linear(hidden=HIDDEN[0]),
    "hidden-int": lambda mp: linear(hidden=HIDDEN.long()),
    "hidden-float64-fused": lambda mp: linear(hidden=HIDDEN.double(), lm_head_weight=WEIGHT.double(),
                                              backend=FUSED_CPU or "cpu"),
    "lm_head_weight-shape": lambda mp: linear(lm_head_weight=torch.randn(V, H + 1)),
    "lm_head_weight-dtype": lambda mp: linear(lm_head_weight=WEIGHT.half()),
    "lm_head_bias-shape": lambda mp: linear(lm_head_bias=torch.zeros(V + 1)),
    "lm_head_bias-dtype": lambda mp: linear(lm_head_bias=torch.zeros(V).half()),
    "fused_linear-completion_ids-shape": lambda mp: linear(completion_ids=X["ids"][:, :-1]),
    "chunk_size-invalid": lambda mp: linear(chunk_size=0),
    "logit_scale-invalid": lambda mp: linear(logit_scale=float("inf")),
    "final_logit_softcapping-invalid": lambda mp: linear(final_logit_softcapping=0.0),
    "FusedLinearGRPOLoss-head-and-weight": lambda mp: gk.FusedLinearGRPOLoss(torch.nn.Linear(H, V), weight=WEIGHT),
    "FusedLinearGRPOLoss-no-head": lambda mp: gk.FusedLinearGRPOLoss(),
    "FusedLinearGRPOLoss-head-without-weight": lambda mp: gk.FusedLinearGRPOLoss(torch.nn.ReLU()),
    # ---- vocab_parallel.token_logprobs / vocab_parallel.grpo_loss (the loss inputs as grpo_loss's rows) ----
    "vocab_parallel-no-process-group": lambda mp: vp.token_logprobs(X["logits"], X["ids"]),
    "logits_shard-integer": lambda mp: vp_logprobs(logits_shard=X["logits"].long()),
    "logits_shard-empty-vocabulary": lambda mp: vp_logprobs(logits_shard=torch.zeros(B, T, 0)),
    "logits_shard-last-stride": lambda mp: vp_loss(logits_shard=torch.randn(B, T, 2 * V)[..., ::2]),
    "logits_shard-not-3d": lambda mp: vp_loss(logits_shard=X["logits"][0]),
    "logits_shard-float64-fused": lambda mp: vp_logprobs(logits_shard=X["logits"].double(),
                                                         backend=FUSED_CPU or "cpu"),
    "vocab_parallel-ids-shape": lambda mp: vp_logprobs(ids=X["ids"][:, :2]),
    "vocab_parallel-ids-device": lambda mp: vp_logprobs(ids=meta(X["ids"])),
    "vocab_start-invalid": lambda mp: vp_logprobs(vocab_start=-1),
    "vocab_parallel-id-in-no-shard": lambda mp: vp_loss(completion_ids=ids_at(V)),
    "config-not-a-GRPOConfig": lambda mp: gk.grpo_loss_with_config(X["logits"], X["ids"], {"beta": 0.04},
                                                                   advantages=X["adv"]),
    "config-trl-option-without-counterpart": lambda mp: gk.GRPOLoss(config=trl_config(use_adaptive_entropy=True)),
    # ---- backend selection ----
    "backend-unknown": lambda mp: loss(backend="gpu"),
    "backend-env-unknown": lambda mp: env_backend(mp, "bogus", lambda: loss(backend="auto")),
    "backend-unavailable": lambda mp: loss(backend="cuda"),  # cpu tensors: unavailable with or without a GPU
    "backend-env-unavailable": lambda mp: env_backend(mp, "cuda", lambda: backends.resolve_backend(
        "auto", torch.device("cpu"))),
    "backend-cpu-on-other-device": lambda mp: backends.resolve_backend("cpu", torch.device("meta")),
    "backend-triton-without-interpreter": lambda mp: (mp.setenv("TRITON_INTERPRET", "0"),
                                                      backends.resolve_backend("triton", torch.device("cpu"))),
    "backend-extension-missing": lambda mp: no_module(mp, lambda: backends.resolve_backend("cpu", torch.device("cpu"))),
    "cpu-isa-env-unknown": lambda mp: cpu_isa_env(mp, "avx9"),
}


# --------------------------------------------------------------------------------------------------
# the table of docs/bad-inputs.md
# --------------------------------------------------------------------------------------------------
def readme_rows() -> list[dict]:
    text = TABLE_PAGE.read_text()
    start, end = text.index("<!-- bad-input-table -->"), text.index("<!-- /bad-input-table -->")
    rows = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 6 or not cells[0].startswith("`"):
            continue
        rows.append(dict(id=cells[0].strip("`"), function=cells[1], input=cells[2], error=cells[3].strip("`"),
                         message=cells[4].strip("`"), test=cells[5].strip("`")))
    return rows


def message_regex(message: str) -> str:
    """The table's message with ``…`` for the parts that vary -> a regex."""
    return ".*".join(re.escape(part) for part in message.split("…"))


ROWS = readme_rows()
# rows that one process cannot make, checked by the test named in their row with ``readme_message_regex``
OTHER_TESTS = {"vocab_parallel-overlapping-shards": "test_vocab_parallel.py::test_vocab_parallel_on_two_gloo_processes"}


def readme_message_regex(case_id: str) -> str:
    (row,) = [r for r in ROWS if r["id"] == case_id]
    return message_regex(row["message"])


def test_table_and_cases_agree():
    ids = [r["id"] for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate case ids in the table"
    assert set(ids) == set(CASES) | set(OTHER_TESTS), (
        f"table rows without a case: {sorted(set(ids) - set(CASES) - set(OTHER_TESTS))}; "
        f"cases missing from the table: {sorted((set(CASES) | set(OTHER_TESTS)) - set(ids))}")
    for r in ROWS:
        assert r["test"] == OTHER_TESTS.get(r["id"], f"test_bad_inputs.py::test_readme_row[{r['id']}]"), r
        assert r["error"] in ERRORS, r


@pytest.mark.parametrize("row", [r for r in ROWS if r["id"] in CASES], ids=lambda r: r["id"])
def test_readme_row(row, monkeypatch):
    if row["id"] == "logits-float64-fused" and FUSED_CPU is None:
        pytest.skip("no fused CPU backend is built")
    if row["id"].startswith(("vocab_parallel", "logits_shard", "vocab_start")) and not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if row["id"] in ("vocab_parallel-no-process-group", "process_group-without-distributed") and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    if row["id"] == "backend-triton-without-interpreter" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the reason given is then that one)")
    with pytest.raises(Exception) as e:
        CASES[row["id"]](monkeypatch)
    want = ERRORS[row["error"]]
    assert type(e.value) is want, f"{row['id']}: {type(e.value).__name__}: {e.value} (want {want.__name__})"
    assert re.search(message_regex(row["message"]), str(e.value)), (
        f"{row['id']}: the message\n    {e.value}\ndoes not match the table's\n    {row['message']}")
