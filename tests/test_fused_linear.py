"""fused_linear_grpo_loss / FusedLinearGRPOLoss: the LM head + GRPO loss in row chunks, never all N x V logits.

The oracle is the UNFUSED path in float64: ``logits = F.linear(hidden, W, b)``, ``grpo_loss(logits, ...,
backend="torch")``, autograd back to hidden, W and b. On float64 inputs the fused path (backend "torch")
must agree to float64 rounding (1e-10 relative): same math, only the order of the sums over chunks differs.

For fp32 / bf16 inputs and every backend available on the CPU the rule of tests/test_cpu_backend.py
(FlashAttention's rule) applies, with ``ref64`` the float64 oracle on the dtype-rounded inputs and ``same``
the unfused path run in the inputs' dtype with backend "torch":

    max |fused - ref64|  <=  2 * max |same - ref64|  +  8 * eps_fp32 * max(1, max |ref64|).

The memory test runs each path in a fresh subprocess and compares peak RSS (see ``_MEASURE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grpo_kernels as gk
from grpo_kernels.config import GRPOConfig
from grpo_kernels.fused_linear import (
    CHUNK_BUDGET_BYTES,
    CHUNK_MIN_ROWS,
    FusedLinearGRPOLoss,
    _attach,
    _fused_linear_op,
    _logprobs_op,
    default_chunk_size,
    fused_linear_grpo_loss,
)

CPU_BACKENDS = gk.available_backends("cpu")  # "torch" today; "cpu" (and "triton" interpreted) when built
EPS32 = torch.finfo(torch.float32).eps
B, T, H, V, G = 6, 5, 12, 37, 2  # N = 30 rows; V odd


def make(dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # a fully masked sequence
    mask[0] = True
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(F.linear(hidden.double(), W.double(), None if b is None else b.double()), -1)
        lp = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()  # ratios on both clip sides
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), W=cast(W), b=cast(b), ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def leaves(x, dtype=None):
    """Fresh leaf copies (optionally upcast) of hidden, W, b with requires_grad."""
    out = []
    for k in ("hidden", "W", "b"):
        t = x[k]
        out.append(None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True))
    return out


def unfused(h, W, b, x, backend="torch", **kw):
    out = gk.grpo_loss(F.linear(h, W, b), x["ids"], backend=backend, **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in (h, W, b)]


def fused(h, W, b, x, **kw):
    out = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in (h, W, b)]


def loss_kwargs(x, **opts):
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"])
    kw.update(opts)
    return kw


def assert_same_outputs(a, b, **tol):
    torch.testing.assert_close(a.loss, b.loss, **tol)
    torch.testing.assert_close(a.logps, b.logps, **tol)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], **tol, msg=lambda m, k=k: f"metric {k}: {m}")


def assert_rule(got, ref64, same, what):
    got, ref64, same = got.double(), ref64.double(), same.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref64).abs().max().item()
    err_same = (same - ref64).abs().max().item()
    bound = 2 * err_same + 8 * EPS32 * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (unfused same-dtype error {err_same:.3g})"


# --------------------------------------------------------------------------------------------------
# float64: the fused schedule equals the unfused oracle
# --------------------------------------------------------------------------------------------------
CASES = [
    # (loss_type, level, beta, delta, extra options)
    ("dapo", "token", 0.0, None, {}),
    ("dapo", "token", 0.04, None, {"num_items_in_batch": 41}),
    ("dapo", "sequence", 0.04, 1.6, {"num_items_in_batch": torch.tensor(41.0)}),
    ("grpo", "token", 0.04, 1.6, {"temperature": 0.7}),
    ("grpo", "sequence", 0.0, None, {}),
    ("grpo", "sequence", 0.04, None, {"use_bias_correction_kl": False, "epsilon_high": 0.28}),
    ("bnpo", "token", 0.0, 1.6, {}),
    ("bnpo", "sequence", 0.04, None, {}),
    ("dr_grpo", "token", 0.04, None, {"max_completion_length": 8}),
    ("dr_grpo", "sequence", 0.0, None, {}),
    ("cispo", "token", 0.04, None, {"epsilon_high": 1.1}),
    ("cispo", "sequence", 0.0, None, {"epsilon_high": 1.1}),
    ("sapo", "token", 0.04, None, {}),
    ("sapo", "sequence", 0.0, None, {}),
]


@pytest.mark.parametrize("loss_type, level, beta, delta, extra", CASES)
@pytest.mark.parametrize("chunk_size", [7, 64])  # 7 does not divide N = 30; 64 > N is one chunk
def test_float64_equals_unfused_reference(loss_type, level, beta, delta, extra, chunk_size):
    x = make(torch.float64)
    kw = loss_kwargs(x, loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta, **extra)
    ref_out, ref_g = unfused(*leaves(x), x, **kw)
    out, g = fused(*leaves(x), x, chunk_size=chunk_size, backend="torch", **kw)
    tol = dict(rtol=1e-10, atol=1e-12)
    assert_same_outputs(out, ref_out, **tol)
    for name, a, r in zip(("hidden", "weight", "bias"), g, ref_g, strict=False):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, **tol, msg=lambda m, name=name: f"d loss / d {name}: {m}")
    # the gradient is not trivially zero and masked rows of hidden get exactly zero
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    assert torch.all(g[0][~x["mask"]] == 0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_float64_on_policy_rewards_and_token_advantages(level):
    x = make(torch.float64, seed=3, bias=False)
    rewards = torch.arange(B, dtype=torch.float32) % 3
    adv_bt = torch.randn(B, T, dtype=torch.float64)
    for kw in (dict(rewards=rewards, group_size=G, advantages=None), dict(advantages=adv_bt)):
        kw = loss_kwargs(x, old_logps=None, importance_sampling_level=level, loss_type="grpo", beta=0.04, **kw)
        ref_out, ref_g = unfused(*leaves(x), x, **kw)
        out, g = fused(*leaves(x), x, chunk_size=4, backend="torch", **kw)
        assert_same_outputs(out, ref_out, rtol=1e-10, atol=1e-12)
        assert g[2] is None
        for a, r in zip(g[:2], ref_g[:2], strict=False):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# fp32 and bf16 on every backend of this machine, by the tolerance rule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, level, beta, delta, extra",
                         [CASES[1], CASES[2], CASES[3], CASES[10], CASES[13]])
def test_backend_and_dtype_by_the_rule(backend, dtype, loss_type, level, beta, delta, extra):
    x = make(dtype, seed=1)
    kw = loss_kwargs(x, loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta, **extra)
    ref_out, ref_g = unfused(*leaves(x, torch.float64), x, **kw)  # float64 on the dtype-rounded inputs
    same_out, same_g = unfused(*leaves(x), x, **kw)
    out, g = fused(*leaves(x), x, chunk_size=7, backend=backend, **kw)
    assert out.logps.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert_rule(out.loss, ref_out.loss, same_out.loss, "loss")
    assert_rule(out.logps, ref_out.logps, same_out.logps, "logps")
    for k in ref_out.metrics:
        if k.startswith("clip_ratio") or k == "cispo_clip_ratio":  # counts: a flip at a boundary is legal
            assert abs(out.metrics[k] - ref_out.metrics[k]) <= 1.0 / x["mask"].sum() + 1e-6, k
        else:
            assert_rule(out.metrics[k], ref_out.metrics[k], same_out.metrics[k], f"metric {k}")
    for name, a, r, s in zip(("hidden", "weight", "bias"), g, ref_g, same_g, strict=False):
        assert a.dtype == dtype, name
        assert_rule(a, r, s, f"d loss / d {name} ({backend}, {dtype})")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_chunk_size_does_not_change_the_result(backend, level):
    x = make(torch.float32, seed=2)
    kw = loss_kwargs(x, loss_type="grpo", importance_sampling_level=level, beta=0.04, backend=backend)
    base, gbase = fused(*leaves(x), x, chunk_size=B * T, **kw)
    for chunk in (1, 4, 7, 29, 1000, None):
        out, g = fused(*leaves(x), x, chunk_size=chunk, **kw)
        assert_same_outputs(out, base, rtol=2e-6, atol=2e-7)
        for a, r in zip(g, gbase, strict=False):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# garbage at masked positions, strided hidden, frozen head, no grad, upstream scaling, inputs untouched
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_at_masked_positions_does_not_leak(backend, level):
    x = make(torch.float32, seed=4)
    kw = dict(loss_type="dapo", importance_sampling_level=level, beta=0.04, backend=backend, chunk_size=5)
    clean, gclean = fused(*leaves(x), x, **loss_kwargs(x, **kw))
    dirty = dict(x)
    m = ~x["mask"]
    dirty["hidden"] = x["hidden"].masked_fill(m.unsqueeze(-1), float("nan"))
    dirty["ids"] = x["ids"].masked_fill(m, V + 100)
    dirty["old"] = x["old"].masked_fill(m, float("nan"))
    dirty["ref"] = x["ref"].masked_fill(m, float("inf"))
    out, g = fused(*leaves(dirty), dirty, **loss_kwargs(dirty, **kw))
    assert_same_outputs(out, clean, rtol=0, atol=0)
    for a, r in zip(g, gclean, strict=False):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_hidden_view_equals_contiguous(backend):
    P = 3
    x = make(torch.float32, seed=5)
    states = torch.randn(B, P + T, H + 4)[..., :H].clone().requires_grad_(True)  # [B, P+T, H]
    view = states[:, P - 1 : -1]
    assert not view.is_contiguous()
    copy = view.detach().clone().requires_grad_(True)
    W, b = x["W"].clone().requires_grad_(True), x["b"].clone().requires_grad_(True)
    kw = loss_kwargs(x, backend=backend, chunk_size=4, beta=0.04)
    a = fused_linear_grpo_loss(view, W, x["ids"], lm_head_bias=b, **kw)
    a.loss.backward()
    gw = W.grad.clone()
    W.grad = None
    c = fused_linear_grpo_loss(copy, W, x["ids"], lm_head_bias=b, **kw)
    c.loss.backward()
    assert_same_outputs(a, c, rtol=0, atol=0)
    torch.testing.assert_close(states.grad[:, P - 1 : -1], copy.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, W.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_head_no_grad_and_upstream_scaling(backend):
    x = make(torch.float32, seed=6)
    kw = loss_kwargs(x, backend=backend, chunk_size=8, beta=0.04)
    h, W, b = leaves(x)
    W.requires_grad_(False)
    out = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, **kw)
    (3.0 * out.loss).backward()
    assert W.grad is None and h.grad is not None and b.grad is not None
    h2, W2, b2 = leaves(x)
    W2.requires_grad_(False)
    ref_kw = {k: v for k, v in kw.items() if k not in ("backend", "chunk_size")}
    unfused(h2, W2, b2, x, backend=backend, **ref_kw)
    torch.testing.assert_close(h.grad, 3.0 * h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, 3.0 * b2.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="one backward"):
        out2 = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, **kw)
        out2.loss.backward(retain_graph=True)
        out2.loss.backward()
    with torch.no_grad():
        out3 = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, **kw)
    assert not out3.loss.requires_grad
    torch.testing.assert_close(out3.loss, out.loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_are_not_modified(backend):
    x = make(torch.float32, seed=7)
    h, W, b = leaves(x)
    before = [t.detach().clone() for t in (h, W, b, x["old"], x["ref"], x["adv"], x["ids"], x["mask"])]
    for level in ("token", "sequence"):
        out = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, backend=backend, chunk_size=3, beta=0.04,
                                     importance_sampling_level=level, **loss_kwargs(x))
        out.loss.backward()
    after = (h, W, b, x["old"], x["ref"], x["adv"], x["ids"], x["mask"])
    for i, (u, v) in enumerate(zip(before, after, strict=False)):
        assert torch.equal(u, v.detach()), f"input {i} modified"


# --------------------------------------------------------------------------------------------------
# the module form
# --------------------------------------------------------------------------------------------------
def test_module_reads_the_lm_head_and_owns_nothing():
    x = make(torch.float32, seed=8)
    head = nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(x["W"])
        head.bias.copy_(x["b"])
    loss_fn = FusedLinearGRPOLoss(head, loss_type="grpo", beta=0.04, chunk_size=5, backend="torch")
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    h = x["hidden"].clone().requires_grad_(True)
    out = loss_fn(h, x["ids"], **loss_kwargs(x))
    out.loss.backward()
    h2, W2, b2 = leaves(x)
    ref = fused_linear_grpo_loss(h2, W2, x["ids"], lm_head_bias=b2, loss_type="grpo", beta=0.04, chunk_size=5,
                                 backend="torch", **loss_kwargs(x))
    ref.loss.backward()
    assert_same_outputs(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(head.weight.grad, W2.grad, rtol=0, atol=0)
    torch.testing.assert_close(head.bias.grad, b2.grad, rtol=0, atol=0)
    # weight= / bias= form, and a config object
    by_w = FusedLinearGRPOLoss(weight=W2.detach(), bias=b2.detach(), config=GRPOConfig(loss_type="grpo", beta=0.04),
                               backend="torch", chunk_size=5)
    torch.testing.assert_close(by_w(x["hidden"], x["ids"], **loss_kwargs(x)).loss, ref.loss, rtol=0, atol=0)
    assert "vocab=37" in repr(loss_fn)


def test_module_bad_arguments():
    head = nn.Linear(H, V)
    with pytest.raises(ValueError, match="lm_head"):
        FusedLinearGRPOLoss()
    with pytest.raises(ValueError, match="lm_head"):
        FusedLinearGRPOLoss(head, weight=head.weight)
    with pytest.raises(TypeError, match="lm_head"):
        FusedLinearGRPOLoss(nn.ReLU())
    with pytest.raises(TypeError, match="unknown"):
        FusedLinearGRPOLoss(head, eps_low=0.2)
    with pytest.raises(ValueError, match="config"):
        FusedLinearGRPOLoss(head, config=GRPOConfig(), beta=0.1)
    with pytest.raises(ValueError, match="backend"):
        FusedLinearGRPOLoss(head, backend="gpu")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearGRPOLoss(head, chunk_size=0)


# --------------------------------------------------------------------------------------------------
# bad input: the error names the argument
# --------------------------------------------------------------------------------------------------
X = make(torch.float32)
BAD = [
    (dict(hidden=X["hidden"][0]), ValueError, "hidden"),
    (dict(hidden=X["hidden"].long()), TypeError, "hidden"),
    (dict(W=X["W"][:, :5]), ValueError, "lm_head_weight"),
    (dict(W=X["W"][0]), ValueError, "lm_head_weight"),
    (dict(W=X["W"].double()), TypeError, "lm_head_weight"),
    (dict(b=X["b"][:5]), ValueError, "lm_head_bias"),
    (dict(b=X["b"].half()), TypeError, "lm_head_bias"),
    (dict(ids=X["ids"][:, :2]), ValueError, "completion_ids"),
    (dict(ids=X["ids"].float()), TypeError, "completion_ids"),
    (dict(ids=X["ids"].clone().fill_(V)), ValueError, "completion_ids"),
    (dict(mask=X["mask"][:2]), ValueError, "completion_mask"),
    (dict(adv=X["adv"][:3]), ValueError, "advantages"),
    (dict(old=X["old"][:, :2]), ValueError, "old_logps"),
    (dict(ref=None, beta=0.04), ValueError, "ref_logps"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), ValueError, "chunk_size"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
]


@pytest.mark.parametrize("overrides, error, name", BAD, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(overrides, error, name):
    x = dict(X)
    opts = {}
    for k, v in overrides.items():
        (x if k in x else opts)[k] = v
    with pytest.raises(error, match=name):
        fused_linear_grpo_loss(x["hidden"], x["W"], x["ids"], lm_head_bias=x["b"], completion_mask=x["mask"],
                               advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"], **opts)


def test_float64_only_on_the_reference():
    x = make(torch.float64)
    for backend in [b for b in CPU_BACKENDS if b != "torch"]:
        with pytest.raises(TypeError, match="float64"):
            fused_linear_grpo_loss(x["hidden"], x["W"], x["ids"], advantages=x["adv"], backend=backend)


# --------------------------------------------------------------------------------------------------
# chunk size from the memory budget
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("n, vocab, dtype", [(4096, 32000, torch.float32), (30, 37, torch.float32),
                                             (65536, 151936, torch.bfloat16), (100, 151936, torch.float32)])
def test_default_chunk_size_follows_the_budget(backend, n, vocab, dtype):
    rows = default_chunk_size(n, vocab, dtype, torch.device("cpu"), backend)
    assert 1 <= rows <= n
    elem = torch.empty((), dtype=dtype).element_size()
    per_logit = elem if backend != "torch" else 2 * elem + 16
    assert rows * vocab * per_logit <= max(CHUNK_BUDGET_BYTES, vocab * per_logit)  # the absolute cap
    if rows < n:  # chunked: either the 1/16 share or the floor / cap decides
        assert rows >= min(CHUNK_MIN_ROWS, CHUNK_BUDGET_BYTES // (vocab * per_logit))
    assert default_chunk_size(4096, 32000, torch.float32, torch.device("cpu"), "cpu") == 256  # 1/16 of 4096


# --------------------------------------------------------------------------------------------------
# torch.compile and the custom ops
# --------------------------------------------------------------------------------------------------
class TinyPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.body = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V)
        self.loss_fn = FusedLinearGRPOLoss(self.lm_head, loss_type="grpo", beta=0.04, chunk_size=7, backend="torch")

    def forward(self, input_ids, completion_ids, **loss_inputs):
        hidden = torch.tanh(self.body(self.embed(input_ids)))
        return self.loss_fn(hidden, completion_ids, **loss_inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_torch_compile_of_the_surrounding_model(level):
    x = make(torch.float32, seed=9)
    torch.manual_seed(0)
    model = TinyPolicy()
    model.loss_fn.config = model.loss_fn.config.replace(importance_sampling_level=level)
    kw = loss_kwargs(x)
    out = model(x["ids"], x["ids"], **kw)
    out.loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out_c = compiled(x["ids"], x["ids"], **kw)
    out_c.loss.backward()
    assert_same_outputs(out_c, out, rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_the_chunk_op_traces_fullgraph():
    """The chunk loop is opaque to dynamo: a fullgraph compile of the op + attach + loss math has no break."""
    x = make(torch.float32, seed=10)
    cfg = GRPOConfig(loss_type="dapo", beta=0.04)
    from grpo_kernels import logp_loss
    from grpo_kernels.backends.base import LossParams

    def step(h, W, b, ids, mask, adv, old, ref):
        logp, ent, gh, gw, gb = _fused_linear_op(h.detach(), W.detach(), b.detach(), ids, mask, adv, old, ref, None,
                                                 None, LossParams.from_config(cfg).pack(), "dapo", 1.0, 7, "torch",
                                                 [True, True, True], [1.0, 0.0])
        loss, _ = logp_loss.loss_from_logps(logp, cfg, adv, mask, old, ref, ent)
        return _attach(loss.detach(), h, W, b, gh, gw, gb)

    args = (x["ids"], x["mask"], x["adv"], x["old"], x["ref"])
    h, W, b = leaves(x)
    step(h, W, b, *args).backward()
    torch._dynamo.reset()
    h2, W2, b2 = leaves(x)
    torch.compile(step, fullgraph=True, backend="aot_eager")(h2, W2, b2, *args).backward()
    for a, r in zip((h2.grad, W2.grad, b2.grad), (h.grad, W.grad, b.grad), strict=False):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-8)


def test_opcheck_of_the_custom_ops():
    x = make(torch.float32, seed=11)
    from grpo_kernels.backends.base import LossParams

    params = LossParams.from_config(GRPOConfig(beta=0.04)).pack()
    h, W, b = (t.detach() for t in leaves(x))
    args = (h, W, b, x["ids"], x["mask"], x["adv"], x["old"], x["ref"], torch.tensor(17.0), None, params, "dapo",
            1.0, 7, "torch", [True, True, True], [1.5, 3.0])
    torch.library.opcheck(_fused_linear_op, args, test_utils=("test_schema", "test_faketensor"))
    logp, ent, gh, gw, gb = _fused_linear_op(*args)
    hh, WW, bb = leaves(x)
    torch.library.opcheck(_attach, (logp.sum(), hh, WW, bb, gh.clone(), gw.clone(), gb.clone()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(_logprobs_op, (hh, WW, bb, x["ids"], x["mask"], 0.9, 7, "torch", [1.5, 3.0], True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------------------------------
# memory: at N=4096, H=1024, V=32000 fp32 on the CPU, against the unfused path, fresh process each
# --------------------------------------------------------------------------------------------------
# Peak RSS minus the RSS right before the measured run. The run is done twice at full size: the first one
# touches every code page of the matmul and kernel paths (file-backed pages count in RSS; a small warm-up
# does not reach the large-GEMM kernels, which made the measure swing by ~150 MiB), then the kernel's
# high-water mark is reset (writing 5 to /proc/self/clear_refs sets VmHWM to the current VmRSS) and the
# second run is measured. glibc would keep freed heap memory mapped and adapt its mmap threshold upwards
# after frees; a fixed MALLOC_MMAP_THRESHOLD_ makes every block above 128 KiB its own mmap, returned to the
# OS on free, so RSS follows the live tensors.
_MEASURE = r"""
import json, os, re, sys, time
import torch, torch.nn.functional as F
import grpo_kernels as gk
from grpo_kernels.fused_linear import fused_linear_grpo_loss
path, backend, train_head, level = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
B, T, H, V = 8, 512, 1024, 32000
torch.set_num_threads(2)

def run(h, W, ids, adv):
    if path == "fused":
        out = fused_linear_grpo_loss(h, W, ids, advantages=adv, importance_sampling_level=level, backend=backend)
    else:
        out = gk.grpo_loss(F.linear(h, W), ids, advantages=adv, importance_sampling_level=level, backend=backend)
    out.loss.backward()

def status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))

torch.manual_seed(0)
h = torch.empty(B, T, H).normal_().requires_grad_(True)
W = torch.empty(V, H).normal_().mul_(0.02).requires_grad_(train_head)
ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
run(h, W, ids, adv)
h.grad = W.grad = None
gk._memory.release_cached()  # the measured call allocates its gradient buffer, as a first call does
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_kib("VmRSS")
t0 = time.perf_counter()
run(h, W, ids, adv)
seconds = time.perf_counter() - t0
extra = status_kib("VmHWM") - base
print(json.dumps(dict(extra_mib=extra / 1024, seconds=seconds)))
"""


def _measure(path, backend, train_head, level):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _MEASURE, path, backend, "1" if train_head else "0", level], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS,
                    reason="needs the fused C++ CPU backend: the reference's unfused path would take ~4 GB here")
@pytest.mark.parametrize("train_head, level", [(False, "token"), (True, "token"), (True, "sequence")],
                         ids=["frozen-head", "trained-head", "trained-head-gspo"])
def test_peak_memory_is_an_eighth_of_the_unfused_path(train_head, level):
    """Unfused: [N, V] logits (500 MiB) + their gradient (500 MiB). Fused: one chunk of 256 rows (31 MiB)
    + dL/dhidden (16 MiB) + dL/dW (125 MiB, only with a trained head). GSPO (sequence level) runs the
    two-pass schedule (log-probs in forward, gradients in backward), with the same bound.

    dL/dW is [V, H] fp32 = 125 MiB, i.e. 12.4% of the unfused peak by itself: both paths must return it, so
    with a trained head the 1/8 bound is applied to the memory beyond that gradient (the working memory),
    and the raw ratio is reported. With a frozen head the raw peaks are compared."""
    f = _measure("fused", "cpu", train_head, level)
    u = _measure("unfused", "cpu", train_head, level)
    grad_w_mib = 32000 * 1024 * 4 / 2**20 if train_head else 0.0
    ratio = f["extra_mib"] / u["extra_mib"]
    work_ratio = (f["extra_mib"] - grad_w_mib) / (u["extra_mib"] - grad_w_mib)
    head = "trained" if train_head else "frozen"
    print(f"\nfused-linear memory ({head} head, {level} level): fused {f['extra_mib']:.0f} MiB, "
          f"unfused {u['extra_mib']:.0f} MiB, ratio {ratio:.3f} (beyond dL/dW: {work_ratio:.3f}); "
          f"time fused {f['seconds']:.2f} s, unfused {u['seconds']:.2f} s, ratio {f['seconds'] / u['seconds']:.2f}")
    assert u["extra_mib"] > 900, u  # the unfused path really holds the logits and their gradient
    assert work_ratio <= 1 / 8, (f, u)
