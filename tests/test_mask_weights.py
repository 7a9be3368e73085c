"""A non-boolean completion_mask is a weight per token, on every path.

The float64 reference's weighted formulas are checked against TRL's own ``_compute_loss`` in
``test_trl_parity.py::test_parity_fractional_completion_mask``; here every fused path (the C++ CPU kernels,
Triton under the interpreter, the fused LM head, the vocab-parallel loss) is checked against that reference
with fractional weights, weights above 1 and garbage (NaN logits, out-of-range ids) at weight-0 positions,
and the weights' invariants: an integer 0/1 mask equals the bool mask, scaling every weight leaves the
normalised losses unchanged, and negative or non-finite weights are rejected. (The CUDA kernels through
their CPU emulation: ``test_cuda_emu.py::test_fractional_mask_weights``.)
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from kernel_checks import check_loss, one_process_group

import grpo_kernels as gk
from grpo_kernels import vocab_parallel as vp
from grpo_kernels.config import LOSS_TYPES, GRPOConfig

B, T, V = 4, 5, 33
FUSED = [n for n in gk.available_backends("cpu") if n != "torch"]
WEIGHTS = torch.tensor([[1, 1, 0.5, 0.5, 0], [2, 0.25, 1, 0, 0], [0, 0, 0, 0, 0], [0.75, 1, 1, 1, 1.5]])


def batch(dtype=torch.float32, seed=0, garbage=True):
    """Logits, ids and the loss inputs; NaN logits and an out-of-range id where the weight is 0."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(x.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    inputs = dict(completion_mask=WEIGHTS.clone(), advantages=torch.tensor([0.9, -1.2, 0.4, -0.3]),
                  old_logps=logp + 0.4 * torch.randn(B, T, generator=g),
                  ref_logps=logp + 0.3 * torch.randn(B, T, generator=g))
    if garbage:
        x[0, 4] = float("nan")
        ids[1, 3] = V + 7
        ids[2, 0] = -100
    return x, ids, inputs


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_backends_match_the_reference_with_weights(backend, loss_type, level):
    x, ids, inputs = batch()
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28)
    check_loss(x, ids, cfg, backend, inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_with_weights_bf16_and_inplace(backend):
    x, ids, inputs = batch(torch.bfloat16)
    check_loss(x, ids, GRPOConfig(loss_type="grpo", beta=0.04), backend, inputs, inplace=True)


def _loss(x, ids, inputs, **opts):
    return gk.grpo_loss(x.double(), ids, backend="torch", **inputs, **opts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_integer_mask_equals_bool_mask(loss_type):
    x, ids, inputs = batch(garbage=False)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
    a = _loss(x, ids, {**inputs, "completion_mask": m}, loss_type=loss_type, beta=0.04)
    b = _loss(x, ids, {**inputs, "completion_mask": m.bool()}, loss_type=loss_type, beta=0.04)
    assert a.loss.item() == b.loss.item()
    assert {k: v.item() for k, v in a.metrics.items()} == {k: v.item() for k, v in b.metrics.items()}


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "vespo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_scaled_weights(loss_type, level):
    """Every normaliser but dr_grpo's constant is the weights' sum, so 3 * w gives the same loss (dr_grpo, and
    luspo, whose per-sequence term is a sum over tokens: 3 times the loss); a row of weights summing to less
    than 1 is kept out of this by its clamp(min=1). vespo is left out: its sequence weight exp(sum_t m r) is
    not invariant under scaling the weights."""
    x, ids, inputs = batch(garbage=False)
    w = torch.tensor([[1, 1, 0.5, 0.5, 0], [2, 0.25, 1, 0, 0], [0, 1, 0, 0, 0], [0.75, 1, 1, 1, 1.5]])
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    a = _loss(x, ids, {**inputs, "completion_mask": w}, **opts)
    b = _loss(x, ids, {**inputs, "completion_mask": 3 * w}, **opts)
    factor = 3.0 if loss_type in ("dr_grpo", "luspo") else 1.0
    assert b.loss.item() == pytest.approx(factor * a.loss.item(), rel=1e-12, abs=1e-15)
    for k in a.metrics:
        assert b.metrics[k].item() == pytest.approx(a.metrics[k].item(), rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_negative_or_non_finite_weights_are_rejected(bad):
    x, ids, inputs = batch(garbage=False)
    w = WEIGHTS.clone()
    w[3, 1] = bad
    with pytest.raises(ValueError, match=r"completion_mask holds .* at index \(3, 1\): its values are token weights"):
        _loss(x, ids, {**inputs, "completion_mask": w})
    with pytest.raises(ValueError, match="completion_mask holds"):
        gk.fused_linear_grpo_loss(torch.randn(B, T, 8), torch.randn(V, 8), ids, completion_mask=w,
                                  advantages=inputs["advantages"], backend="torch")


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_with_weights(backend, level):
    """The fused LM head equals grpo_loss on its logits, weights included (float64 on the reference: exact up to
    summation order; fp32 on a fused backend: against the float64 loss at fp32 accuracy)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    hidden[0, 4] = 1e4  # weight 0 there: must not reach the gradients (finite: the unfused matmul multiplies it)
    weight = torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5
    _, ids, inputs = batch(garbage=True)
    cfg = GRPOConfig(loss_type="bnpo", importance_sampling_level=level, beta=0.04)
    h, w = hidden.to(dtype).detach().clone().requires_grad_(), weight.to(dtype).detach().clone().requires_grad_()
    out = gk.fused_linear_grpo_loss_with_config(h, w, ids, cfg, backend=backend, **inputs)
    out.loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = gk.grpo_loss_with_config(torch.nn.functional.linear(h64, w64), ids, cfg, backend="torch", **inputs)
    ref.loss.backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), ref.loss, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    assert torch.all(h.grad[0, 4] == 0)
    for k, v in ref.metrics.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
@pytest.mark.parametrize("backend", ["torch", *[b for b in FUSED if b == "cpu"]])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vocab_parallel_with_weights(backend, level):
    """One shard (a world of 1) through the vocab-parallel path equals grpo_loss, weights included."""
    x, ids, inputs = batch(torch.float64 if backend == "torch" else torch.float32)
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    with one_process_group():
        out = vp.grpo_loss_with_config(x, ids, cfg, backend=backend, **inputs)
    ref = gk.grpo_loss_with_config(x.double(), ids, cfg, backend="torch", **inputs)
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref.loss, **tol)
    for k, v in ref.metrics.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
