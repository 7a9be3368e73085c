"""The streamed LM head as real models use it: logit scale, final-logit softcapping, bias, autocast, DTensor
heads, and ``fused_linear_token_logprobs`` (forward and gradient).

The oracle is the unfused path in float64: ``y = cap * tanh(s * F.linear(h, W, b) / cap)`` (or ``s * x``),
then ``grpo_loss(y, ...)`` / ``token_logprobs(y, ...)`` on backend "torch", autograd back to h, W and b. On
float64 inputs the fused path agrees to float64 rounding; on fp32 / bf16 and every CPU backend the rule of
tests/test_fused_linear.py applies (error <= 2x the unfused same-dtype error + 8 eps_fp32).
The head transform is also checked against TRL's own chunked head (``trl.kernels.chunked_logprob``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

import grpo_kernels as gk
from grpo_kernels.fused_linear import fused_linear_grpo_loss, fused_linear_token_logprobs

from test_fused_linear import B, CPU_BACKENDS, T, assert_rule, assert_same_outputs, leaves, loss_kwargs, make

HEADS = [  # (logit_scale, final_logit_softcapping)
    (0.0625, None),  # Cohere-style scale
    (1.0, 2.5),  # Gemma-style cap, low enough that tanh saturates on part of the vocabulary
    (1.7, 1.5),
]


def head_logits(h, W, b, scale, cap):
    y = F.linear(h, W, b) * scale
    return y if cap is None else cap * torch.tanh(y / cap)


def unfused(h, W, b, x, scale, cap, **kw):
    out = gk.grpo_loss(head_logits(h, W, b, scale, cap), x["ids"], backend="torch", **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in (h, W, b)]


def fused(h, W, b, x, scale, cap, **kw):
    out = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, logit_scale=scale, final_logit_softcapping=cap,
                                 **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in (h, W, b)]


@pytest.mark.parametrize("scale, cap", HEADS)
@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])  # one pass / two passes
def test_float64_head_transform_equals_unfused(scale, cap, loss_type, level):
    x = make(torch.float64, seed=4)
    kw = loss_kwargs(x, loss_type=loss_type, importance_sampling_level=level, beta=0.04, temperature=0.8)
    ref_out, ref_g = unfused(*leaves(x), x, scale, cap, **kw)
    out, g = fused(*leaves(x), x, scale, cap, chunk_size=7, backend="torch", **kw)
    assert_same_outputs(out, ref_out, rtol=1e-10, atol=1e-12)
    for name, a, r in zip(("hidden", "weight", "bias"), g, ref_g, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d {name}: {m}")
    # the transform changes the result (else the test could not tell it was applied)
    plain, _ = fused(*leaves(x), x, 1.0, None, chunk_size=7, backend="torch", **kw)
    assert (plain.loss - out.loss).abs() > 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_head_transform_on_every_backend_by_the_rule(backend, dtype, level):
    scale, cap = 1.7, 1.5
    x = make(dtype, seed=5)
    kw = loss_kwargs(x, loss_type="dapo", importance_sampling_level=level, beta=0.04)
    ref_out, ref_g = unfused(*leaves(x, torch.float64), x, scale, cap, **kw)
    same_out, same_g = unfused(*leaves(x), x, scale, cap, **kw)
    out, g = fused(*leaves(x), x, scale, cap, chunk_size=7, backend=backend, **kw)
    assert_rule(out.loss, ref_out.loss, same_out.loss, "loss")
    assert_rule(out.logps, ref_out.logps, same_out.logps, "logps")
    for name, a, r, s in zip(("hidden", "weight", "bias"), g, ref_g, same_g, strict=True):
        assert a.dtype == dtype
        assert_rule(a, r, s, f"d loss / d {name} ({backend}, {dtype})")


def test_head_transform_matches_trl_chunked_head():
    """TRL's chunked head (scale, then softcap, then temperature) gives the same log-probs and entropy."""
    trl_kernel = pytest.importorskip("trl.kernels.chunked_logprob")
    x = make(torch.float32, seed=6)
    h, W, b = (t.detach() for t in leaves(x))
    scale, cap, tau = 1.7, 1.5, 0.8
    fn = getattr(trl_kernel, "ChunkedLogProbFunction")
    trl_out = fn.apply(h.reshape(-1, h.shape[-1]), W, b, x["ids"].reshape(-1), tau, 7, cap, scale,
                       ("log_probs", "entropy"))
    logp, ent = fused_linear_token_logprobs(h, W, x["ids"], bias=b, temperature=tau, return_entropy=True,
                                            logit_scale=scale, final_logit_softcapping=cap, chunk_size=7,
                                            backend="torch")
    torch.testing.assert_close(logp, trl_out[0].view(B, T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, trl_out[1].view(B, T), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# fused_linear_token_logprobs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale, cap", [(1.0, None), *HEADS])
def test_token_logprobs_float64_equals_unfused(scale, cap):
    x = make(torch.float64, seed=7)
    h, W, b = (t.detach() for t in leaves(x))
    ref_lp, ref_ent = gk.token_logprobs(head_logits(h, W, b, scale, cap), x["ids"], temperature=0.7,
                                        return_entropy=True, backend="torch")
    lp, ent = fused_linear_token_logprobs(h[:, :, :], W, x["ids"], bias=b, temperature=0.7, return_entropy=True,
                                          logit_scale=scale, final_logit_softcapping=cap, chunk_size=4,
                                          backend="torch")
    torch.testing.assert_close(lp, ref_lp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-12)
    only = fused_linear_token_logprobs(h, W, x["ids"], bias=b, temperature=0.7, logit_scale=scale,
                                       final_logit_softcapping=cap, backend="torch")
    torch.testing.assert_close(only, ref_lp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_every_backend_by_the_rule(backend, dtype):
    x = make(dtype, seed=8)
    # a strided view of the hidden states, as model hidden states [:, P-1:-1] are
    wide = torch.cat([x["hidden"], x["hidden"][:, :1]], 1)
    h = wide[:, :-1]
    W, b = x["W"], x["b"]
    hd, Wd, bd = h.double(), W.double(), b.double()
    ref_lp, ref_ent = gk.token_logprobs(head_logits(hd, Wd, bd, 1.7, 1.5), x["ids"], return_entropy=True,
                                        backend="torch")
    same_lp, same_ent = gk.token_logprobs(head_logits(h, W, b, 1.7, 1.5), x["ids"], return_entropy=True,
                                          backend="torch")
    lp, ent = fused_linear_token_logprobs(h, W, x["ids"], bias=b, return_entropy=True, logit_scale=1.7,
                                          final_logit_softcapping=1.5, chunk_size=7, backend=backend)
    assert lp.dtype == torch.float32 and not lp.requires_grad  # x's tensors are not leaves that require grad
    assert_rule(lp, ref_lp, same_lp, f"logps ({backend}, {dtype})")
    assert_rule(ent, ref_ent, same_ent, f"entropy ({backend}, {dtype})")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale, cap", [(1.0, None), (1.7, 1.5)])
def test_token_logprobs_gradient(backend, scale, cap):
    """With grad enabled the log-probs and entropies are differentiable w.r.t. hidden, weight and bias: the
    gradient of sum(u * logp + v * entropy) equals autograd of the unfused float64 head (fp32 inputs: the rule
    of the forward, on each gradient); under no_grad nothing requires grad."""
    x = make(torch.float32, seed=9)
    g = torch.Generator().manual_seed(10)
    u, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def grads(fn, dtype):
        h, W, b = leaves(x, dtype)
        lp, ent = fn(h, W, b)
        ((lp * u.to(lp.dtype)).sum() + (ent * v.to(ent.dtype)).sum()).backward()
        return [t.grad.double() for t in (h, W, b)]

    ref = grads(lambda h, W, b: gk.token_logprobs(head_logits(h, W, b, scale, cap), x["ids"], temperature=0.8,
                                                  return_entropy=True, backend="torch"), torch.float64)
    same = grads(lambda h, W, b: gk.token_logprobs(head_logits(h, W, b, scale, cap), x["ids"], temperature=0.8,
                                                   return_entropy=True, backend="torch"), torch.float32)
    got = grads(lambda h, W, b: fused_linear_token_logprobs(
        h, W, x["ids"], bias=b, temperature=0.8, return_entropy=True, logit_scale=scale,
        final_logit_softcapping=cap, chunk_size=7, backend=backend), torch.float32)
    for name, a, r, s in zip(("hidden", "weight", "bias"), got, ref, same, strict=True):
        assert r.abs().max() > 1e-3, name
        assert_rule(a, r, s, f"d/d {name} ({backend})")
    h, W, b = leaves(x)
    with torch.no_grad():
        lp, ent = fused_linear_token_logprobs(h, W, x["ids"], bias=b, return_entropy=True, backend=backend)
    assert not lp.requires_grad and not ent.requires_grad


def test_token_logprobs_never_holds_n_by_v():
    """The chunk is the only [n, V] buffer: the torch allocator's peak stays far below N x V."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    N1, Hd, Vd = 512, 16, 4096
    h = torch.randn(1, N1, Hd, generator=g)
    W = torch.randn(Vd, Hd, generator=g)
    ids = torch.randint(0, Vd, (1, N1), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fused_linear_token_logprobs(h, W, ids, chunk_size=32, backend="cpu" if "cpu" in CPU_BACKENDS else "torch")
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    full = N1 * Vd * 4
    assert 0 < biggest <= full // 8, f"largest single allocation {biggest} B vs full logits {full} B"


# --------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_autocast_runs_the_head_in_the_autocast_dtype(backend, level):
    """fp32 hidden + head under autocast("cpu", bfloat16) = the same call on bf16 copies (what autocast does to
    an F.linear), gradients arriving at the fp32 leaves; and within the bf16 rule of the unfused autocast path."""
    x = make(torch.float32, seed=9)
    kw = loss_kwargs(x, loss_type="dapo", importance_sampling_level=level, beta=0.04)
    h, W, b = leaves(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, chunk_size=7, backend=backend, **kw)
        lp = fused_linear_token_logprobs(h, W, x["ids"], bias=b, chunk_size=7, backend=backend)
    out.loss.backward()
    assert h.grad.dtype == W.grad.dtype == b.grad.dtype == torch.float32
    hb, Wb, bb = leaves(x, torch.bfloat16)
    ref = fused_linear_grpo_loss(hb, Wb, x["ids"], lm_head_bias=bb, chunk_size=7, backend=backend, **kw)
    ref.loss.backward()
    assert_same_outputs(out, ref, rtol=0, atol=0)
    for a, r in zip((h.grad, W.grad, b.grad), (hb.grad, Wb.grad, bb.grad), strict=True):
        torch.testing.assert_close(a, r.float(), rtol=0, atol=0)
    torch.testing.assert_close(lp, fused_linear_token_logprobs(hb, Wb, x["ids"], bias=bb, chunk_size=7,
                                                               backend=backend), rtol=0, atol=0)
    # the unfused model path under the same autocast, against the float64 truth
    h2, W2, b2 = leaves(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h2, W2, b2)
    assert logits.dtype == torch.bfloat16
    same = gk.grpo_loss(logits, x["ids"], backend="torch", **kw)
    h64, W64, b64 = leaves(x, torch.float64)
    truth = gk.grpo_loss(F.linear(h64, W64, b64), x["ids"], backend="torch", **kw)
    assert_rule(out.loss, truth.loss, same.loss, "loss under autocast")


# --------------------------------------------------------------------------------------------------
# DTensor heads (FSDP2 / tensor parallel) on two gloo processes
# --------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtensor_worker(rank, world, port, backend, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        x = make(torch.float32, seed=12)
        kw = loss_kwargs(x, loss_type="grpo", beta=0.04)
        h, W, b = leaves(x)
        Wd = torch.nn.Parameter(distribute_tensor(x["W"].clone(), mesh, [Shard(0)]))  # rows split as FSDP2 does
        bd = torch.nn.Parameter(distribute_tensor(x["b"].clone(), mesh, [Shard(0)]))
        out = fused_linear_grpo_loss(h, Wd, x["ids"], lm_head_bias=bd, logit_scale=1.7, final_logit_softcapping=1.5,
                                     chunk_size=7, backend=backend, **kw)
        out.loss.backward()
        lp = fused_linear_token_logprobs(h, Wd, x["ids"], bias=bd, chunk_size=7, backend=backend)
        torch.save((rank, out.loss.item(), h.grad, Wd.grad.full_tensor(), bd.grad.full_tensor(),
                    type(Wd.grad).__name__, lp), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu" if "cpu" in CPU_BACKENDS else "torch"])
def test_dtensor_head_on_two_gloo_ranks(backend, tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dtensor_worker, args=(r, 2, port, backend, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x = make(torch.float32, seed=12)
    kw = loss_kwargs(x, loss_type="grpo", beta=0.04)
    h, W, b = leaves(x)
    ref = fused_linear_grpo_loss(h, W, x["ids"], lm_head_bias=b, logit_scale=1.7, final_logit_softcapping=1.5,
                                 chunk_size=7, backend=backend, **kw)
    ref.loss.backward()
    ref_lp = fused_linear_token_logprobs(h, W, x["ids"], bias=b, chunk_size=7, backend=backend)
    for rank, loss, gh, gw, gb, kind, lp in got:
        assert kind == "DTensor", "the weight's gradient must stay sharded like the weight"
        assert loss == pytest.approx(ref.loss.item(), rel=1e-6)
        torch.testing.assert_close(gh, h.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw, W.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, b.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be a finite real number"),
    (dict(final_logit_softcapping=0.0), ValueError, "final_logit_softcapping must be None or a finite number > 0"),
    (dict(final_logit_softcapping=-30.0), ValueError, "final_logit_softcapping must be None"),
])
def test_head_transform_rejects(kwargs, error, match):
    x = make(torch.float32)
    with pytest.raises(error, match=match):
        fused_linear_grpo_loss(x["hidden"], x["W"], x["ids"], advantages=x["adv"], **kwargs)
    with pytest.raises(error, match=match):
        fused_linear_token_logprobs(x["hidden"], x["W"], x["ids"], **kwargs)
