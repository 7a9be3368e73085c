"""A LoRA adapter on the streamed LM head: per chunk, logits = h W^T (+ b) + s (h A^T) B^T, never W + s B A.

The oracle is the unfused path in float64: ``grpo_loss(F.linear(h, W, b) + s * (h @ A.T) @ B.T, ...)`` on backend
"torch" and autograd back to h, A, B (and W where it requires a gradient). float64 on "torch" agrees to float64
rounding; fp32 on every CPU backend follows the rule of tests/test_fused_linear.py (error <= 2x the unfused fp32
error + 8 eps_fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grpo_kernels as gk
from grpo_kernels.fused_linear import fused_linear_grpo_loss_with_config, fused_linear_token_logprobs

from test_fused_linear import CPU_BACKENDS, H, V, assert_rule, assert_same_outputs, leaves, loss_kwargs, make

R, SCALE = 3, 1.75


def adapter(dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(R, H, generator=g) * 0.3).to(dtype).requires_grad_(True)
    B = (torch.randn(V, R, generator=g) * 0.3).to(dtype).requires_grad_(True)
    return A, B


def logits_of(h, W, b, A, B):
    return F.linear(h, W, b) + SCALE * (h @ A.t()) @ B.t()


def unfused(h, W, b, A, B, x, **kw):
    out = gk.grpo_loss(logits_of(h, W, b, A, B), x["ids"], backend="torch", **kw)
    out.loss.backward()
    return out, [t.grad for t in (h, A, B, W)]


def fused(h, W, b, A, B, x, config, **kw):
    out = fused_linear_grpo_loss_with_config(h, W, x["ids"], config, lm_head_bias=b, lora=(A, B, SCALE), **kw)
    out.loss.backward()
    return out, [t.grad for t in (h, A, B, W)]


OPTIONS = [
    dict(loss_type="dapo", importance_sampling_level="token", beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, temperature=0.8),
    dict(loss_type="dapo", entropy_coef=0.05),
]


@pytest.mark.parametrize("frozen_w", [True, False])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_float64_lora_head_equals_unfused(opts, frozen_w):
    x = make(torch.float64, seed=3)
    h, W, b = leaves(x)
    if frozen_w:
        W.requires_grad_(False)
        b.requires_grad_(False)
    A, B = adapter(torch.float64)
    kw = loss_kwargs(x)
    ref_out, ref_g = unfused(h, W, b, A, B, x, **kw, **opts)
    h2, W2, b2 = leaves(x)
    W2.requires_grad_(not frozen_w)
    b2.requires_grad_(not frozen_w)
    A2, B2 = (t.detach().clone().requires_grad_(True) for t in (A, B))
    out, g = fused(h2, W2, b2, A2, B2, x, gk.GRPOConfig(**opts), chunk_size=7, backend="torch", **kw)
    assert_same_outputs(out, ref_out, rtol=1e-10, atol=1e-12)
    for name, a, r in zip(("hidden", "A", "B", "W"), g, ref_g, strict=True):
        if frozen_w and name == "W":
            assert a is None and r is None
            continue
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d {name}: {m}")
    assert A2.grad.abs().max() > 1e-4 and B2.grad.abs().max() > 1e-4
    # the adapter changes the result (else the test could not tell it was applied)
    plain = gk.grpo_loss(F.linear(h.detach(), W.detach(), b.detach()), x["ids"], backend="torch", **kw, **opts)
    assert (plain.loss - out.loss).abs() > 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_lora_head_every_backend(backend):
    x = make(torch.float32, seed=5)
    opts = dict(loss_type="dapo", beta=0.04)
    kw = loss_kwargs(x)
    A, B = adapter(torch.float64)
    h64, W64, b64 = leaves(x, torch.float64)
    W64.requires_grad_(False)
    ref_out, ref_g = unfused(h64, W64, b64, A, B, x, **kw, **opts)
    A32, B32 = (t.detach().float().requires_grad_(True) for t in (A, B))
    h32, W32, b32 = leaves(x)
    W32.requires_grad_(False)
    same_out, same_g = unfused(h32, W32, b32, A32, B32, x, **kw, **opts)
    A3, B3 = (t.detach().float().requires_grad_(True) for t in (A, B))
    h3, W3, b3 = leaves(x)
    W3.requires_grad_(False)
    out, g = fused(h3, W3, b3, A3, B3, x, gk.GRPOConfig(**opts), chunk_size=11, backend=backend, **kw)
    assert_rule(out.loss, ref_out.loss, same_out.loss, "loss")
    assert_rule(out.logps, ref_out.logps, same_out.logps, "logps")
    for name, a, r, s in zip(("hidden", "A", "B"), g[:3], ref_g[:3], same_g[:3], strict=True):
        assert_rule(a, r, s, f"d/d {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_with_lora(backend):
    x = make(torch.float64 if backend == "torch" else torch.float32, seed=6)
    A, B = adapter(x["hidden"].dtype)
    with torch.no_grad():
        z = logits_of(x["hidden"].double(), x["W"].double(), x["b"].double(), A.double(), B.double()) / 0.7
        lp = torch.log_softmax(z, -1)
        ref = lp.gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
        ref_ent = -(lp.exp() * lp).sum(-1)
    logp, ent = fused_linear_token_logprobs(x["hidden"], x["W"], x["ids"], bias=x["b"], temperature=0.7,
                                            return_entropy=True, chunk_size=9, backend=backend, lora=(A, B, SCALE))
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp.double(), ref, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)


def test_lora_argument_errors():
    x = make(torch.float64)
    h, W, b = x["hidden"], x["W"], x["b"]
    A, B = adapter(torch.float64)
    config = gk.GRPOConfig()
    call = lambda lora: fused_linear_grpo_loss_with_config(h, W, x["ids"], config, advantages=x["adv"],  # noqa: E731
                                                           backend="torch", lora=lora)
    with pytest.raises(TypeError, match="lora must be None or a tuple"):
        call(A)
    with pytest.raises(ValueError, match=r"lora A must have shape \[r, H\]"):
        call((A[:, :-1], B, 1.0))
    with pytest.raises(ValueError, match=r"lora B must have shape \[V, r\]"):
        call((A, B[:-1], 1.0))
    with pytest.raises(TypeError, match="lora B must have the dtype of hidden"):
        call((A, B.float(), 1.0))
    with pytest.raises(ValueError, match="lora scale must be a finite real number"):
        call((A, B, float("nan")))
