"""The public API and its bad-input rules (docs/contract.md): validation, backend selection, layout,
GRPOLoss, metric names.

Numerical agreement of the fused backends with the reference is tested in their own files; here every
available backend is only checked for what the API promises whatever the backend: inputs untouched, a
strided view equal to its contiguous copy, the same metric names.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import backends
from grpo_kernels.backends import BackendUnavailableError, resolve_backend
from grpo_kernels.config import CLIP_LOSS_TYPES, LOSS_TYPES, GRPOConfig

B, T, V, G = 4, 3, 7, 2
CPU_BACKENDS = gk.available_backends("cpu")


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.1, 0.5, -0.6])
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    old = logp - torch.tensor([[0.4, 0.0, -0.5], [-0.7, 0.6, 0.0], [0.0, 0.0, 0.0], [-0.3, 0.0, 0.35]])
    ref = logp + torch.rand(B, T, generator=g) - 0.5
    return dict(logits=logits, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def call(x=None, **overrides):
    """grpo_loss on valid inputs (beta on, off-policy) with some arguments replaced."""
    x = x or inputs()
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"], beta=0.04,
              backend="torch")
    logits, ids = overrides.pop("logits", x["logits"]), overrides.pop("completion_ids", x["ids"])
    kw.update(overrides)
    return gk.grpo_loss(logits, ids, **kw)


def test_valid_call_shapes():
    out = call()
    assert isinstance(out, gk.GRPOLossOutput) and out._fields == ("loss", "logps", "metrics")
    assert out.loss.dim() == 0 and out.loss.requires_grad is False  # logits do not require grad here
    assert out.logps.shape == (B, T) and out.logps.dtype == torch.float32
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics.values())


# --------------------------------------------------------------------------------------------------
# bad input: the error type and a message that names the argument
# --------------------------------------------------------------------------------------------------
X = inputs()
NAN, INF = float("nan"), float("inf")
BAD_LOSS_CALLS = [
    # shapes
    ("logits 2-D", dict(logits=X["logits"][0]), ValueError, "logits"),
    ("completion_ids shape", dict(completion_ids=X["ids"][:, :2]), ValueError, "completion_ids"),
    ("completion_ids 1-D", dict(completion_ids=X["ids"][0]), ValueError, "completion_ids"),
    ("completion_mask shape", dict(completion_mask=X["mask"][:2]), ValueError, "completion_mask"),
    ("advantages shape", dict(advantages=X["adv"][:3]), ValueError, "advantages"),
    ("advantages [B, T+1]", dict(advantages=torch.zeros(B, T + 1)), ValueError, "advantages"),
    ("advantages 3-D", dict(advantages=torch.zeros(B, T, 1)), ValueError, "advantages"),
    ("old_logps shape", dict(old_logps=X["old"][:, :2]), ValueError, "old_logps"),
    ("old_logps 1-D", dict(old_logps=X["old"][0]), ValueError, "old_logps"),
    ("ref_logps shape", dict(ref_logps=X["ref"].T), ValueError, "ref_logps"),
    ("rewards shape", dict(advantages=None, rewards=torch.zeros(B + 2), group_size=2), ValueError, "rewards"),
    ("rewards 2-D", dict(advantages=None, rewards=torch.zeros(B, 1), group_size=2), ValueError, "rewards"),
    # groups
    ("B % G", dict(advantages=None, rewards=torch.zeros(B), group_size=3), ValueError, "group_size"),
    ("G < 2", dict(advantages=None, rewards=torch.zeros(B), group_size=1), ValueError, "group_size"),
    ("G missing", dict(advantages=None, rewards=torch.zeros(B)), TypeError, "group_size"),
    ("G float", dict(advantages=None, rewards=torch.zeros(B), group_size=2.0), TypeError, "group_size"),
    ("both advantages and rewards", dict(rewards=torch.zeros(B), group_size=2), ValueError, "rewards"),
    ("neither advantages nor rewards", dict(advantages=None), ValueError, "advantages"),
    # options
    ("loss_type", dict(loss_type="ppo"), ValueError, "loss_type"),
    ("level", dict(importance_sampling_level="tokens"), ValueError, "importance_sampling_level"),
    ("backend", dict(backend="gpu"), ValueError, "backend"),
    ("backend None", dict(backend=None), ValueError, "backend"),
    ("beta without ref_logps", dict(ref_logps=None), ValueError, "ref_logps"),
    ("temperature nan", dict(temperature=NAN), ValueError, "temperature"),
    ("temperature inf", dict(temperature=INF), ValueError, "temperature"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature str", dict(temperature="1"), TypeError, "temperature"),
    ("beta nan", dict(beta=NAN), ValueError, "beta"),
    ("epsilon_low < 0", dict(epsilon_low=-0.1), ValueError, "epsilon_low"),
    ("epsilon_high < 0", dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
    ("delta 0", dict(delta=0.0), ValueError, "delta"),
    ("sapo_temperature_neg 0", dict(sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg"),
    ("use_bias_correction_kl int", dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl"),
    ("max_completion_length 0", dict(max_completion_length=0), ValueError, "max_completion_length"),
    ("max_completion_length float", dict(max_completion_length=3.0), ValueError, "max_completion_length"),
    ("num_items_in_batch 0", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num_items_in_batch 2 elements", dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    ("inplace int", dict(inplace=1), TypeError, "inplace"),
    ("inplace on the reference", dict(inplace=True), ValueError, "inplace"),
    # dtypes and layout
    ("integer logits", dict(logits=X["logits"].long()), TypeError, "logits"),
    ("bool logits", dict(logits=X["logits"] > 0), TypeError, "logits"),
    ("float completion_ids", dict(completion_ids=X["ids"].float()), TypeError, "completion_ids"),
    ("integer advantages", dict(advantages=X["adv"].long()), TypeError, "advantages"),
    ("integer old_logps", dict(old_logps=X["old"].long()), TypeError, "old_logps"),
    ("list advantages", dict(advantages=[0.1, 0.2, 0.3, 0.4]), TypeError, "advantages"),
    ("logits not a tensor", dict(logits=X["logits"].tolist()), TypeError, "logits"),
    ("last-dim stride 2", dict(logits=torch.randn(B, T, 2 * V)[..., ::2]), ValueError, "stride"),
    ("vocab-major logits", dict(logits=torch.randn(V, B, T).permute(1, 2, 0)), ValueError, "stride"),
    # devices ("meta" stands in for a second device on a one-device machine)
    ("completion_ids on meta", dict(completion_ids=X["ids"].to("meta")), ValueError, "completion_ids"),
    ("completion_mask on meta", dict(completion_mask=X["mask"].to("meta")), ValueError, "completion_mask"),
    ("advantages on meta", dict(advantages=X["adv"].to("meta")), ValueError, "advantages"),
    ("old_logps on meta", dict(old_logps=X["old"].to("meta")), ValueError, "old_logps"),
    ("ref_logps on meta", dict(ref_logps=X["ref"].to("meta")), ValueError, "ref_logps"),
    ("rewards on meta", dict(advantages=None, rewards=torch.zeros(B, device="meta"), group_size=2), ValueError,
     "rewards"),
    # ids outside [0, V) at kept positions
    ("id = V", dict(completion_ids=X["ids"].index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(V))),
     ValueError, "completion_ids"),
    ("id < 0", dict(completion_ids=X["ids"].index_put((torch.tensor(3), torch.tensor(2)), torch.tensor(-1))),
     ValueError, "completion_ids"),
    ("id = -100 at a kept position", dict(completion_ids=torch.full((B, T), -100)), ValueError, "completion_ids"),
]


@pytest.mark.parametrize("what,overrides,error,name", BAD_LOSS_CALLS, ids=[c[0] for c in BAD_LOSS_CALLS])
def test_bad_input_raises_naming_the_argument(what, overrides, error, name):
    with pytest.raises(error, match=re.escape(name)):
        call(**overrides)


def test_out_of_range_id_message_gives_the_value_and_position():
    ids = X["ids"].clone()
    ids[3, 2] = V + 5
    with pytest.raises(ValueError, match=rf"completion_ids holds {V + 5} at index \(3, 2\).*\[0, {V}\)"):
        call(completion_ids=ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_garbage_ids_at_masked_positions_are_fine(backend):
    x = inputs()
    ids = x["ids"].masked_fill(~x["mask"], V + 1000)
    ids[2, 1] = -100
    ids[1, 2] = -(2**40)
    a = call(x, completion_ids=ids, backend=backend)
    b = call(x, backend=backend)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.logps, b.logps, rtol=0, atol=0)


BAD_TOKEN_LOGPROBS = [
    (dict(ids=X["ids"][:, :2]), ValueError, "ids"),
    (dict(ids=X["ids"].float()), TypeError, "ids"),
    (dict(ids=X["ids"].to("meta")), ValueError, "ids"),
    (dict(ids=X["ids"] + V), ValueError, "ids"),
    (dict(logits=X["logits"].int()), TypeError, "logits"),
    (dict(logits=torch.randn(B, T, 2 * V)[..., ::2]), ValueError, "stride"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(temperature=NAN), ValueError, "temperature"),
    (dict(temperature=-INF), ValueError, "temperature"),
    (dict(return_entropy=1), TypeError, "return_entropy"),
    (dict(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,error,name", BAD_TOKEN_LOGPROBS,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_TOKEN_LOGPROBS)])
def test_token_logprobs_bad_input(overrides, error, name):
    kw = dict(logits=X["logits"], ids=X["ids"], backend="torch")
    kw.update(overrides)
    with pytest.raises(error, match=re.escape(name)):
        gk.token_logprobs(kw.pop("logits"), kw.pop("ids"), **kw)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(rewards=torch.zeros(4, 1), group_size=2), ValueError, "rewards"),
        (dict(rewards=torch.zeros(4, dtype=torch.long), group_size=2), TypeError, "rewards"),
        (dict(rewards=torch.zeros(6), group_size=4), ValueError, "group_size"),
        (dict(rewards=torch.zeros(4), group_size=1), ValueError, "group_size"),
        (dict(rewards=torch.zeros(4), group_size=True), TypeError, "group_size"),
        (dict(rewards=torch.zeros(4), group_size=2, scale="std"), ValueError, "scale"),
        (dict(rewards=torch.zeros(4), group_size=2, eps=-1e-4), ValueError, "eps"),
        (dict(rewards=torch.zeros(4), group_size=2, eps=NAN), ValueError, "eps"),
    ],
)
def test_group_advantages_bad_input(kwargs, error, name):
    with pytest.raises(error, match=re.escape(name)):
        gk.group_advantages(kwargs.pop("rewards"), kwargs.pop("group_size"), **kwargs)


def test_float64_logits_only_on_the_reference():
    for name in CPU_BACKENDS:
        if name == "torch":
            continue
        with pytest.raises(TypeError, match="float64"):
            call(inputs(torch.float64), backend=name)


# --------------------------------------------------------------------------------------------------
# backends: registry, "auto", the environment variable, unavailable backends
# --------------------------------------------------------------------------------------------------
def test_available_backends():
    names = gk.available_backends()
    assert "torch" in names and set(names) <= set(backends.BACKENDS) - {"auto"}
    assert len(names) == len(set(names))
    assert "torch" in gk.available_backends("cpu") and "cuda" not in gk.available_backends("cpu")
    if not torch.cuda.is_available():
        assert "cuda" not in names
    for name in names:  # every listed backend resolves on some device of this machine
        devs = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        assert any(backends.unavailable_reason(name, d) is None for d in devs), name


def test_auto_picks_the_first_available_of_the_device_order(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    want = next(n for n in backends.AUTO_ORDER["cpu"] if backends.unavailable_reason(n, "cpu") is None)
    assert resolve_backend("auto", cpu) == want
    assert want == CPU_BACKENDS[0]


def test_env_var_overrides_auto_only(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert resolve_backend("torch", cpu) == "torch"  # an explicit backend= wins over the variable
    with pytest.raises(BackendUnavailableError, match=backends.ENV_VAR):
        resolve_backend("auto", cpu)
    with pytest.raises(BackendUnavailableError, match=backends.ENV_VAR):
        call(backend="auto")
    assert call(backend="torch").loss.isfinite()


@pytest.mark.parametrize("bad", ["bogus", "Torch", "auto "])
def test_env_var_bad_value(monkeypatch, bad):
    monkeypatch.setenv(backends.ENV_VAR, bad)
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        call(backend="auto")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        gk.token_logprobs(X["logits"], X["ids"])


def test_env_var_empty_means_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "")
    assert resolve_backend("auto", torch.device("cpu")) == CPU_BACKENDS[0]


def test_unavailable_backend_says_why(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run on cpu tensors: .*cuda"):
        call(backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cpu tensors"):
        resolve_backend("cpu", torch.device("meta"))
    # the Triton interpreter is the only way Triton runs on CPU tensors; without it the reason says so
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    # a missing extension module is named
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match=r"grpo_kernels\._cpu"):
        resolve_backend("cpu", cpu)
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_auto_never_fails_on_cpu(monkeypatch):
    """With every fused backend missing, "auto" falls back to the reference (the documented last resort)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert gk.available_backends("cpu") == ["torch"]


# --------------------------------------------------------------------------------------------------
# inputs are never modified; strided views are accepted without a copy and give the same result
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inputs_are_not_modified(backend, loss_type, level):
    x = inputs()
    logits = x["logits"].clone().requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    kw = dict(completion_mask=x["mask"].int(), old_logps=x["old"], ref_logps=x["ref"], beta=0.04, delta=1.5,
              loss_type=loss_type, importance_sampling_level=level, temperature=0.9, num_items_in_batch=torch.tensor(9),
              backend=backend)
    every = dict(logits=logits, ids=x["ids"], rewards=rewards, **{k: v for k, v in kw.items() if torch.is_tensor(v)})
    before = {k: v.detach().clone() for k, v in every.items()}
    out = gk.grpo_loss(logits, x["ids"], rewards=rewards, group_size=G, **kw)
    out.loss.backward()
    out2 = gk.grpo_loss(logits, x["ids"], advantages=x["adv"].unsqueeze(-1).expand(B, T).contiguous(), **kw)
    out2.loss.backward()
    gk.token_logprobs(logits, x["ids"], return_entropy=True, backend=backend)[1].sum().backward()
    for k, v in every.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified by backend={backend!r}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_strided_view_equals_contiguous_copy(backend, loss_type, level):
    P = 4
    g = torch.Generator().manual_seed(5)
    model_logits = torch.randn(B, P + T, V + 3, generator=g)[..., :V].requires_grad_(False)  # row stride V+3
    model_logits = model_logits.clone().requires_grad_(True)
    x = inputs()
    view = model_logits[:, P - 1 : -1]
    assert not view.is_contiguous() and view.stride(-1) == 1
    copy = view.detach().clone().requires_grad_(True)
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"], beta=0.04,
              loss_type=loss_type, importance_sampling_level=level, temperature=0.8, backend=backend)
    a = gk.grpo_loss(view, x["ids"], **kw)
    a.loss.backward()
    b = gk.grpo_loss(copy, x["ids"], **kw)
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.logps, b.logps)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k])
    torch.testing.assert_close(model_logits.grad[:, P - 1 : -1], copy.grad)
    assert torch.all(model_logits.grad[:, : P - 1] == 0) and torch.all(model_logits.grad[:, -1] == 0)
    lp_view = gk.token_logprobs(view, x["ids"], backend=backend)
    torch.testing.assert_close(lp_view, gk.token_logprobs(copy, x["ids"], backend=backend))


# --------------------------------------------------------------------------------------------------
# GRPOLoss and metric names
# --------------------------------------------------------------------------------------------------
def test_grpo_loss_module_equals_function():
    x = inputs(torch.float64)
    opts = dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, delta=1.5, temperature=0.9,
                importance_sampling_level="sequence", use_bias_correction_kl=False)
    mod = gk.GRPOLoss(backend="torch", **opts)
    assert isinstance(mod, torch.nn.Module) and mod.config == GRPOConfig(**opts)
    assert "loss_type='grpo'" in repr(mod) and "backend='torch'" in repr(mod)
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"])
    a = mod(x["logits"], x["ids"], **kw)
    b = gk.grpo_loss(x["logits"], x["ids"], backend="torch", **opts, **kw)
    assert a.loss.item() == b.loss.item()
    assert {k: v.item() for k, v in a.metrics.items()} == {k: v.item() for k, v in b.metrics.items()}
    c = gk.GRPOLoss(GRPOConfig(**opts), backend="torch")(x["logits"], x["ids"], **kw)
    assert c.loss.item() == b.loss.item()
    # per-call arguments reach the function: a different normaliser changes the loss
    d = gk.GRPOLoss(backend="torch", loss_type="dr_grpo")(x["logits"], x["ids"], max_completion_length=6, **kw)
    e = gk.GRPOLoss(backend="torch", loss_type="dr_grpo")(x["logits"], x["ids"], **kw)
    assert d.loss.item() == pytest.approx(e.loss.item() * T / 6, rel=1e-12)


def test_grpo_loss_module_defaults_are_trl_defaults():
    cfg = gk.GRPOLoss().config
    assert cfg == GRPOConfig()
    assert (cfg.beta, cfg.epsilon_low, cfg.resolved_epsilon_high, cfg.delta, cfg.temperature, cfg.loss_type,
            cfg.importance_sampling_level, cfg.use_bias_correction_kl, cfg.sapo_temperature_pos,
            cfg.sapo_temperature_neg) == (0.0, 0.2, 0.2, None, 1.0, "dapo", "token", True, 1.0, 1.05)


def test_grpo_loss_module_bad_arguments():
    with pytest.raises(TypeError, match="losstype"):
        gk.GRPOLoss(losstype="grpo")
    with pytest.raises(ValueError, match="config"):
        gk.GRPOLoss(GRPOConfig(), beta=0.1)
    with pytest.raises(ValueError, match="backend"):
        gk.GRPOLoss(backend="gpu")
    with pytest.raises(ValueError, match="loss_type"):
        gk.GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        gk.GRPOLoss(beta=0.1, backend="torch")(X["logits"], X["ids"], advantages=X["adv"])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metric_names(loss_type, beta, level):
    out = call(loss_type=loss_type, beta=beta, importance_sampling_level=level,
               epsilon_high=5.0 if loss_type == "cispo" else None)
    want = {"entropy"} | ({"kl"} if beta else set())
    if loss_type in CLIP_LOSS_TYPES:
        want |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                 "clip_ratio/high_max"}
    elif loss_type == "cispo":
        want |= {"cispo_clip_ratio"}
    elif loss_type == "vespo":
        want |= {"vespo/phi_seq_mean"}
    assert set(out.metrics) == want
    for k, v in out.metrics.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad and math.isfinite(v.item()), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_outputs_are_fp32_for_every_logits_dtype(backend, dtype):
    x = inputs(dtype)
    logits = x["logits"].requires_grad_(True)
    out = call(x, logits=logits, backend=backend)
    assert out.loss.dtype == torch.float32 and out.logps.dtype == torch.float32
    out.loss.backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    lp, ent = gk.token_logprobs(logits, x["ids"], return_entropy=True, backend=backend)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (B, T)


def test_logps_output_is_reusable_as_old_logps():
    x = inputs(torch.float64)
    first = call(x, old_logps=None)
    assert not first.logps.requires_grad and torch.all(first.logps[~x["mask"]] == 0)
    again = call(x, old_logps=first.logps)  # ratio 1 up to fp32 rounding of the stored logps
    assert again.metrics["clip_ratio/region_mean"].item() == 0.0
    torch.testing.assert_close(again.loss, first.loss, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# what a TRL user passes: [B, 1] advantages, unsliced logits, epsilon=, trl.GRPOConfig
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_advantages_b1_equal_advantages_b(backend, level):
    """TRL keeps its advantages as [B, 1] internally; they mean one advantage per sequence, as [B]."""
    x = inputs()
    a = call(x, advantages=x["adv"].unsqueeze(-1), backend=backend, importance_sampling_level=level)
    b = call(x, backend=backend, importance_sampling_level=level)
    assert a.loss.item() == b.loss.item()
    assert {k: v.item() for k, v in a.metrics.items()} == {k: v.item() for k, v in b.metrics.items()}


def test_logits_one_position_longer_than_the_ids_show_the_slice():
    x = inputs()
    unsliced = torch.randn(B, T + 1, V)
    with pytest.raises(ValueError, match=re.escape("logits has one position more than completion_ids") + ".*"
                       + re.escape("pass logits[:, :-1] (or logits[:, P-1:-1]")):
        call(x, logits=unsliced)
    call(x, logits=unsliced[:, :-1])  # the slice the message gives is accepted
    with pytest.raises(ValueError, match=re.escape("if logits covers the prompt too, pass logits[:, P-1:-1]")
                       + ".*" + re.escape("logits[:, 3:-1]")):
        call(x, logits=torch.randn(B, T + 4, V))
    with pytest.raises(ValueError, match=re.escape("hidden has one position more than completion_ids") + ".*"
                       + re.escape("pass hidden[:, :-1]")):
        gk.fused_linear_grpo_loss(torch.randn(B, T + 1, 5), torch.randn(V, 5), x["ids"], advantages=x["adv"])


def test_out_of_range_id_without_a_mask_does_not_speak_of_the_mask():
    x = inputs()
    ids = x["ids"].clone()
    ids[0, 1] = V
    with pytest.raises(ValueError, match=r"holds 7 at index \(0, 1\), outside the vocabulary \[0, 7\) of logits$"):
        call(x, completion_ids=ids, completion_mask=None)
    with pytest.raises(ValueError, match="at a position the completion_mask keeps"):
        call(x, completion_ids=ids)


@pytest.mark.parametrize("entry", ["grpo_loss", "GRPOLoss", "GRPOConfig", "fused_linear"])
def test_epsilon_is_an_alias_of_epsilon_low(entry):
    x = inputs(torch.float64)
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"])

    def loss(**opts):
        if entry == "grpo_loss":
            return gk.grpo_loss(x["logits"], x["ids"], backend="torch", **opts, **kw).loss.item()
        if entry == "GRPOLoss":
            return gk.GRPOLoss(backend="torch", **opts)(x["logits"], x["ids"], **kw).loss.item()
        if entry == "GRPOConfig":
            return gk.grpo_loss_with_config(x["logits"], x["ids"], GRPOConfig(**opts), backend="torch", **kw).loss.item()
        head = torch.eye(V, dtype=torch.float64)  # hidden = logits through an identity head
        return gk.fused_linear_grpo_loss(x["logits"], head, x["ids"], backend="torch", **opts, **kw).loss.item()

    assert loss(epsilon=0.05) == loss(epsilon_low=0.05) != loss()
    with pytest.raises(ValueError, match="epsilon is TRL's name for epsilon_low: pass one of them, not both"):
        loss(epsilon=0.05, epsilon_low=0.1)


def test_epsilon_alias_both_given_by_name():
    """Where the options are a dict (the modules), giving both names is an error whatever the values."""
    with pytest.raises(ValueError, match="pass one of them, not both"):
        gk.GRPOLoss(epsilon=0.2, epsilon_low=0.2)
    with pytest.raises(ValueError, match="pass one of them, not both"):
        gk.FusedLinearGRPOLoss(weight=torch.randn(V, 5), epsilon=0.3, epsilon_low=0.3)
    assert GRPOConfig(epsilon=0.3) == GRPOConfig(epsilon_low=0.3) and GRPOConfig(epsilon=0.3).epsilon is None
    assert "epsilon=" not in repr(GRPOConfig(epsilon=0.3)).replace("epsilon_low=", "")


def test_every_keyword_wide_function_takes_epsilon():
    import inspect

    for fn in (gk.grpo_loss, gk.fused_linear_grpo_loss, gk.vocab_parallel.grpo_loss):
        assert inspect.signature(fn).parameters["epsilon"].default is None, fn.__name__


@pytest.fixture(scope="module")
def trl_config():
    trl = pytest.importorskip("trl")

    def make(**kw):
        return trl.GRPOConfig(output_dir="/tmp/grpo_kernels_test", report_to=[], bf16=False, **kw)

    return make


def test_trl_grpo_config_is_accepted_everywhere(trl_config):
    x = inputs(torch.float64)
    cfg = trl_config(epsilon=0.1, epsilon_high=0.28, beta=0.04, loss_type="dr_grpo", temperature=0.9,
                     importance_sampling_level="sequence", delta=1.5, max_completion_length=16)
    ours = GRPOConfig(epsilon_low=0.1, epsilon_high=0.28, beta=0.04, loss_type="dr_grpo", temperature=0.9,
                      importance_sampling_level="sequence", delta=1.5)
    assert GRPOConfig.from_trl(cfg) == ours
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"])
    want = gk.grpo_loss_with_config(x["logits"], x["ids"], ours, max_completion_length=16, backend="torch", **kw)
    got = [
        gk.grpo_loss_with_config(x["logits"], x["ids"], cfg, backend="torch", **kw),
        gk.GRPOLoss(config=cfg, backend="torch")(x["logits"], x["ids"], **kw),
        gk.fused_linear_grpo_loss_with_config(x["logits"], torch.eye(V, dtype=torch.float64), x["ids"], cfg,
                                              backend="torch", **kw),
        gk.FusedLinearGRPOLoss(weight=torch.eye(V, dtype=torch.float64), config=cfg, backend="torch")(
            x["logits"], x["ids"], **kw),
    ]
    for out in got:  # TRL's max_completion_length (16, not T = 3) is the dr_grpo normaliser
        assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-12)
    # a call's own max_completion_length wins over the config's
    short = gk.grpo_loss_with_config(x["logits"], x["ids"], cfg, max_completion_length=T, backend="torch", **kw)
    assert short.loss.item() == pytest.approx(want.loss.item() * 16 / T, rel=1e-12)


def test_trl_grpo_config_defaults_are_ours(trl_config):
    assert GRPOConfig.from_trl(trl_config()) == GRPOConfig()


def test_trl_grpo_config_with_an_option_we_lack_is_rejected(trl_config):
    """use_adaptive_entropy changes the entropy coefficient between optimizer steps: training-loop state."""
    with pytest.raises(ValueError, match="trl.GRPOConfig option use_adaptive_entropy=True has no counterpart"):
        gk.GRPOLoss(config=trl_config(use_adaptive_entropy=True))


@pytest.mark.parametrize("option,value", [("top_entropy_quantile", 0.2), ("off_policy_mask_threshold", 0.5),
                                          ("entropy_coef", 0.01)])
def test_trl_grpo_config_loss_options_are_read(trl_config, option, value):
    assert getattr(GRPOConfig.from_trl(trl_config(**{option: value})), option) == value


def test_config_of_another_type_names_both_classes():
    class GRPOConfigLike:
        pass

    with pytest.raises(TypeError, match=r"config must be a grpo_kernels.GRPOConfig or a trl.GRPOConfig, got "
                                        r".*GRPOConfigLike"):
        gk.GRPOLoss(config=GRPOConfigLike())


# --------------------------------------------------------------------------------------------------
# inplace=True: what the version counter detects
# --------------------------------------------------------------------------------------------------
FUSED_CPU = [b for b in CPU_BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_with_logits_saved_by_an_earlier_node_raises_at_backward(backend, level):
    x = inputs()
    leaf = x["logits"].clone().requires_grad_()
    logits = leaf * 1
    other = (logits ** 2).mean()  # saves the logits for its backward
    out = call(x, logits=logits, ref_logps=None, beta=0.0, backend=backend, inplace=True,
               importance_sampling_level=level)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_inplace_logits_written_before_backward_raise(backend):
    """The gradient lives in the logits' storage between the call and backward: a write there is caught."""
    x = inputs()
    logits = x["logits"].clone().requires_grad_() * 1
    out = call(x, logits=logits, ref_logps=None, beta=0.0, backend=backend, inplace=True)
    with torch.no_grad():
        logits.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_inplace_overwrites_the_callers_logits_as_documented(backend):
    """Token level: after the call the logits hold dL/dlogits (what the docstring warns about)."""
    x = inputs()
    leaf = x["logits"].clone().requires_grad_()
    logits = leaf * 1
    out = call(x, logits=logits, ref_logps=None, beta=0.0, backend=backend, inplace=True)
    assert not torch.equal(logits.detach(), x["logits"])
    out.loss.backward()
    assert torch.equal(leaf.grad, logits.detach())
    assert "overwritten" in gk.grpo_loss.__doc__ and "inplace" in gk.GRPOLoss.__doc__


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_inplace_on_a_leaf_that_requires_grad_is_rejected(backend):
    x = inputs()
    leaf = x["logits"].clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace=True overwrites logits with their gradient, but logits is a leaf"):
        call(x, logits=leaf, backend=backend, inplace=True)
    assert torch.equal(leaf.detach(), x["logits"])
    with torch.no_grad():  # no gradient, nothing written: accepted
        call(x, logits=leaf, backend=backend, inplace=True)


# --------------------------------------------------------------------------------------------------
# GRPO_KERNELS_CPU_ISA
# --------------------------------------------------------------------------------------------------
ISA_SCRIPT = """
import torch, grpo_kernels as gk
from grpo_kernels import _cpu
print("isa", _cpu.isa())
try:
    gk.grpo_loss(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), advantages=torch.ones(2), backend="cpu")
    print("ok")
except ValueError as e:
    print("ValueError", e)
"""


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ CPU backend is not built")
@pytest.mark.parametrize("value", ["avx9", "AVX2", "Baseline"])
def test_cpu_isa_env(value):
    import os
    import subprocess
    import sys

    from grpo_kernels import _cpu

    env = {**os.environ, "GRPO_KERNELS_CPU_ISA": value}
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if value.lower() not in _cpu.ISAS:  # imports fine; the first use of the cpu backend names the valid values
        assert lines[1] == f"ValueError GRPO_KERNELS_CPU_ISA must be one of baseline, avx2, avx512 (any case), got '{value}'"
        return
    assert lines[1] == "ok"
    # the cap holds in any case: the widest build the CPU runs, no wider than the one named
    runs = [name for name in _cpu.ISAS if _cpu.set_isa(name)]
    _cpu.set_isa(runs[-1])
    cap = _cpu.ISAS.index(value.lower())
    assert lines[0] == f"isa {[n for n in runs if _cpu.ISAS.index(n) <= cap][-1]}"


# --------------------------------------------------------------------------------------------------
# docstrings: help() shows every parameter
# --------------------------------------------------------------------------------------------------
def _public_objects():
    objs = [(n, getattr(gk, n)) for n in gk.__all__ if not n.startswith("__") and n != "vocab_parallel"]
    objs += [(f"vocab_parallel.{n}", getattr(gk.vocab_parallel, n))
             for n in ("token_logprobs", "grpo_loss", "grpo_loss_with_config")]
    return objs


@pytest.mark.parametrize("name,obj", _public_objects(), ids=[n for n, _ in _public_objects()])
def test_docstrings_document_every_parameter(name, obj):
    import inspect
    import pydoc

    doc = inspect.getdoc(obj)
    assert doc and "{{" not in doc, name  # every placeholder filled
    text = pydoc.render_doc(obj)  # what help() prints
    assert doc.splitlines()[0] in text
    target = obj.__init__ if inspect.isclass(obj) and obj.__init__ is not object.__init__ else obj
    if inspect.isclass(obj) and issubclass(obj, (tuple, Exception)):
        return  # GRPOLossOutput documents its fields, BackendUnavailableError takes a message
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert re.search(rf"\b{p.name}\b", doc), f"{name}: parameter {p.name} is not documented"


def test_loss_docstrings_give_defaults_shapes_and_outputs():
    doc = gk.grpo_loss.__doc__
    for needle in ("epsilon_low : float, default 0.2", "loss_type : str, default \"dapo\"", "[B, T, V]",
                   "GRPOLossOutput", "clip_ratio/region_mean", "None means T", "512", "logits[:, P-1:-1]"):
        assert needle in doc, needle
    for field in gk.GRPOLossOutput._fields:
        assert f"{field} :" in gk.GRPOLossOutput.__doc__


def test_registering_a_backend_makes_it_valid_everywhere():
    """BACKENDS is derived from the registry: a backend registered after import is accepted by every entry point
    (and dispatched through the same statically named ops); a second registration of a name is refused."""
    from grpo_kernels.backends.base import BackendInfo
    from grpo_kernels.fused_linear import FusedLinearGRPOLoss

    name = "cpu_again_for_test"
    assert name not in backends.BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.GRPOLoss(backend=name)
    info = backends.REGISTRY["torch"]
    try:
        assert backends.register_backend(BackendInfo(name, ("cpu",), lambda d: None,
                                                     lambda: backends.launchers(CPU_BACKENDS[0]), "test only")) == name
        assert name in backends.BACKENDS and name in backends.backend_names()
        gk.GRPOLoss(backend=name)
        FusedLinearGRPOLoss(weight=torch.zeros(3, 2), backend=name)
        with pytest.raises(ValueError, match="already registered"):
            backends.register_backend(info)
        with pytest.raises(ValueError, match="identifier other than 'auto'"):
            backends.register_backend(BackendInfo("auto", ("cpu",), lambda d: None, lambda: None, ""))
        if CPU_BACKENDS[0] != "torch":  # the fused ops run the registered launchers under the new name
            x, ids = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
            torch.testing.assert_close(gk.token_logprobs(x, ids, backend=name),
                                       gk.token_logprobs(x, ids, backend=CPU_BACKENDS[0]), rtol=0, atol=0)
    finally:
        backends.REGISTRY.pop(name, None)


def test_the_custom_ops_have_static_names():
    import grpo_kernels._ops  # noqa: F401  (imported by grpo_kernels already)

    for op in ("logprobs_fwd", "logprobs_bwd", "logprobs_bwd_inplace", "fused", "fused_inplace", "attach_grad"):
        assert hasattr(torch.ops.grpo_kernels, op), op
        assert "str backend" in str(getattr(torch.ops.grpo_kernels, op).default._schema) or op == "attach_grad"
