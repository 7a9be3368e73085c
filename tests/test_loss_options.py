"""The rest of TRL's loss on every fused backend against the float64 reference: luspo, vespo, the sampler
importance ratio (each mode of ``sampler_importance_ratio``), the off-policy sequence mask, the top-entropy
token mask (also across 2 gloo processes), the entropy bonus and the new metrics.

The reference itself is tested against TRL's real ``_compute_loss`` in tests/test_trl_parity.py; here every
fused path must compute the reference's function of its own log-probs and entropies:

- log-probs by the tolerance rule of tests/kernel_checks.py (FlashAttention's rule);
- loss and dL/dlogits: the rule, plus what the kernel's log-prob and entropy errors imply, i.e. the distance
  between the reference at the kernel's (logp, entropy) and at its own (``assert_via_logps``). This also
  covers a token whose entropy sits at the quantile threshold: the reference at the kernel's entropies makes
  the same keep / drop decision as the kernel;
- metrics: the reference's metrics at the kernel's (logp, entropy), to fp32 rounding of the metric.

Inputs hold a fully masked row of NaN logits and out-of-range ids, sampling log-probs with a NaN at a kept
position (vLLM returns NaN for a token it cannot score) and garbage at masked positions, and ratios that
cross both clip bounds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import EPS32, assert_rule, assert_via_logps, backend_for_test, loss_inputs, one_thread

import grpo_kernels as gk
from grpo_kernels import _validate, logp_loss, reference
from grpo_kernels.config import LOSS_TYPES, GRPOConfig

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
B, T, V = 6, 7, 131

# option set -> (config options, uses the sampler ratio)
OPTION_SETS = {
    "is-ratio": ({}, True),
    "off-policy": ({"off_policy_mask_threshold": 0.02}, False),
    "top-entropy": ({"top_entropy_quantile": 0.4}, False),
    "entropy-bonus": ({"entropy_coef": 0.05}, False),
    "all": ({"off_policy_mask_threshold": 0.02, "top_entropy_quantile": 0.4, "entropy_coef": 0.05}, True),
}


def batch(dtype=torch.float32, seed=0, mode="token_truncate", garbage_ratio=False):
    torch.manual_seed(seed)
    x, ids, mask, old, ref, adv = loss_inputs(B, T, V, dtype)
    sampling = old + 0.2 * torch.randn(B, T) + 0.05  # the sampler drifts: some sequences are off-policy
    kept = mask.nonzero()
    sampling[tuple(kept[1])] = float("nan")  # a token the sampler could not score
    sampling = torch.where(mask, sampling, torch.full_like(sampling, float("-inf")))  # garbage where masked
    rho = gk.sampler_importance_ratio(old, sampling, mask, mode=mode, clip_min=0.6, clip_max=1.6)
    if garbage_ratio and rho.shape == mask.shape:
        rho = torch.where(mask, rho, torch.full_like(rho, float("nan")))
    return x, ids, dict(completion_mask=mask, advantages=adv, old_logps=old, ref_logps=ref, sampling_logps=sampling,
                        importance_sampling_ratio=rho)


def run(x, ids, cfg, backend, inputs, device="cpu"):
    """-> (loss, logps, dL/dlogits, metrics, entropy) of grpo_loss_with_config; the entropy from the same
    backend's forward (token_logprobs), as the loss saw it."""
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    leaf = on(x.detach()).clone().requires_grad_()
    out = gk.grpo_loss_with_config(leaf, on(ids), cfg, backend=backend, **{k: on(v) for k, v in inputs.items()})
    if out.loss.requires_grad:
        out.loss.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        _, ent = gk.token_logprobs(on(x.detach()), on(torch.where(mask, ids, 0)), temperature=cfg.temperature,
                                   return_entropy=True, backend=backend)
    ent = torch.where(on(mask), ent, 0.0)
    return (out.loss.detach().cpu(), out.logps.cpu(), grad.cpu(), {k: v.cpu() for k, v in out.metrics.items()},
            ent.cpu())


def reference_at(x, ids, cfg, inputs, logps, entropy):
    """The float64 reference as a function of (logps, entropy): -> (loss, metrics, dL/dlogits) with the loss
    math applied to the given values and the exact float64 softmax Jacobian of the logits."""
    with one_thread():
        li = _validate.validate_loss_inputs(x.double(), ids, cfg, **inputs)
        lp = logps.double().clone().requires_grad_()
        h = entropy.double().clone().requires_grad_()
        loss, mets = logp_loss.loss_from_logps(lp, cfg, entropy=h, **li.loss_kwargs())
        x64 = x.detach().double().requires_grad_()
        if not loss.requires_grad:
            return loss.detach(), mets, torch.zeros_like(x64)
        g_lp, g_h = torch.autograd.grad(loss, (lp, h), allow_unused=True)
        lp_x, h_x = reference.token_logprobs(x64, torch.where(li.mask, ids, 0), cfg.temperature, True, li.mask)
        total = (lp_x * g_lp).sum() if g_lp is not None else 0.0
        if g_h is not None:
            total = total + (h_x * g_h).sum()
        total.backward()
        return loss.detach(), mets, x64.grad


def check(x, ids, cfg, backend, inputs, device="cpu"):
    k = run(x, ids, cfg, backend, inputs, device)
    with one_thread():
        r = run(x.double(), ids, cfg, "torch", inputs)
        s = run(x, ids, cfg, "torch", inputs)
    what = f"{backend} {x.dtype} {cfg}"
    mask = inputs["completion_mask"]
    assert_rule(k[1], r[1], s[1], f"logps {what}")
    assert_rule(k[4][mask], r[4][mask], s[4][mask], f"entropy {what}")
    assert torch.all(k[2][~mask] == 0), f"masked positions must get an exact zero gradient ({what})"
    at_loss, at_mets, at_grad = reference_at(x, ids, cfg, inputs, k[1], k[4])
    assert_via_logps(k[0], r[0], s[0], at_loss, f"loss {what}")
    assert_via_logps(k[2], r[2], s[2], at_grad, f"grad {what}")
    assert set(k[3]) == set(r[3]) == set(at_mets), (sorted(k[3]), sorted(r[3]))
    for name, v in k[3].items():
        assert v.dim() == 0 and v.dtype == torch.float32, name
        want = at_mets[name].item()
        assert v.item() == pytest.approx(want, rel=16 * EPS32, abs=16 * EPS32 * max(1.0, abs(r[0].item())),
                                         nan_ok=True), f"metric {name} {what}"
    return k, r


def config(loss_type, opts, beta=0.0, level="token"):
    return GRPOConfig(loss_type=loss_type, beta=beta, importance_sampling_level=level,
                      epsilon_high=4.0 if loss_type == "cispo" else 0.28, **opts)


def inputs_for(inputs, with_ratio):
    return inputs if with_ratio else {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}


# --------------------------------------------------------------------------------------------------
# the C++ CPU backend: every loss type x option set x beta; the IS modes; a bf16 sample
# --------------------------------------------------------------------------------------------------
CPU_CASES = [(lt, opt, beta) for lt in LOSS_TYPES for opt in OPTION_SETS for beta in (0.0, 0.04)]


@pytest.mark.parametrize("case", CPU_CASES, ids=["-".join(map(str, c)) for c in CPU_CASES])
def test_cpu_backend_options(case):
    loss_type, opt, beta = case
    backend, _ = backend_for_test("cpu", None)
    opts, with_ratio = OPTION_SETS[opt]
    x, ids, inputs = batch()
    check(x, ids, config(loss_type, opts, beta), backend, inputs_for(inputs, with_ratio))


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("loss_type", ["dapo", "sapo", "cispo", "vespo", "luspo"])
def test_cpu_backend_ratio_modes(mode, loss_type):
    """Each mode of the sampler ratio (a [B, T] one with NaN garbage at masked positions); token-level
    non-vespo types take the single pass (the ratio folded into the advantage), the others two passes."""
    backend, _ = backend_for_test("cpu", None)
    x, ids, inputs = batch(mode=mode, garbage_ratio=True)
    k, r = check(x, ids, config(loss_type, {}, 0.04), backend, inputs)
    assert torch.isfinite(k[0]) and torch.isfinite(k[2]).all()


@pytest.mark.parametrize("loss_type,level", [("luspo", "sequence"), ("vespo", "sequence"), ("grpo", "sequence")])
def test_cpu_backend_sequence_level(loss_type, level):
    backend, _ = backend_for_test("cpu", None)
    x, ids, inputs = batch()
    check(x, ids, config(loss_type, OPTION_SETS["all"][0], 0.04, level), backend, inputs)


@pytest.mark.parametrize("opt", ["is-ratio", "all"])
def test_cpu_backend_bf16(opt):
    backend, _ = backend_for_test("cpu", None)
    opts, with_ratio = OPTION_SETS[opt]
    x, ids, inputs = batch(torch.bfloat16, seed=1)
    check(x, ids, config("dapo", opts, 0.04), backend, inputs_for(inputs, with_ratio))
    check(x, ids, config("vespo", opts), backend, inputs_for(inputs, with_ratio))


def test_options_change_the_loss():
    """Each option acts (a test of the tests: none of them is a no-op on these inputs)."""
    x, ids, inputs = batch()
    base = run(x.double(), ids, config("dapo", {}), "torch", inputs_for(inputs, False))
    for opt, (opts, with_ratio) in OPTION_SETS.items():
        got = run(x.double(), ids, config("dapo", opts), "torch", inputs_for(inputs, with_ratio))
        assert not torch.allclose(got[2], base[2]), opt
    vespo = run(x.double(), ids, config("vespo", {}), "torch", inputs)
    phi = vespo[3]["vespo/phi_seq_mean"].item()
    assert 0 < phi and phi != 1.0  # phi(1) = 1: the ratios here are not all 1


# --------------------------------------------------------------------------------------------------
# Triton (interpreted here) and the CUDA kernels through their CPU emulation: a sample
# --------------------------------------------------------------------------------------------------
SAMPLE = [("dapo", "is-ratio", 0.04), ("vespo", "all", 0.0), ("luspo", "top-entropy", 0.0),
          ("grpo", "entropy-bonus", 0.04), ("sapo", "off-policy", 0.0)]


@pytest.mark.parametrize("name", ["triton", "cuda_emu"])
@pytest.mark.parametrize("case", SAMPLE, ids=["-".join(map(str, c)) for c in SAMPLE])
def test_gpu_kernels_sample(name, case, request):
    backend, device = backend_for_test(name, request)
    loss_type, opt, beta = case
    opts, with_ratio = OPTION_SETS[opt]
    x, ids, inputs = batch(seed=2)
    check(x, ids, config(loss_type, opts, beta), backend, inputs_for(inputs, with_ratio), device)


# --------------------------------------------------------------------------------------------------
# GRPOLoss, fused_linear_grpo_loss: the same options reach the same math
# --------------------------------------------------------------------------------------------------
def test_grpo_loss_module_takes_the_options():
    x, ids, inputs = batch()
    cfg = config("vespo", OPTION_SETS["all"][0])
    module = gk.GRPOLoss(cfg, backend="torch")
    a = module(x.double(), ids, **inputs)
    b = gk.grpo_loss(x.double(), ids, backend="torch", **inputs, **{f: getattr(cfg, f) for f in cfg.field_names()})
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("opt", ["is-ratio", "all"])
def test_inplace_matches_out_of_place(opt):
    backend, _ = backend_for_test("cpu", None)
    opts, with_ratio = OPTION_SETS[opt]
    x, ids, inputs = batch()
    cfg = config("vespo" if opt == "all" else "dapo", opts, 0.04)
    outs = []
    for inplace in (False, True):
        leaf = x.detach().clone().requires_grad_()
        out = gk.grpo_loss_with_config(leaf * 1, ids, cfg, inplace=inplace, backend=backend,
                                       **inputs_for(inputs, with_ratio))
        out.loss.backward()
        outs.append((out.loss.detach(), leaf.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("loss_type,opt", [("dapo", "is-ratio"), ("vespo", "all"), ("luspo", "entropy-bonus"),
                                           ("grpo", "top-entropy")])
def test_fused_linear_options(loss_type, opt):
    """float64 through the chunked head equals the unfused reference to float64 rounding; each fused CPU
    backend follows the tolerance rule against it (``same``: the unfused eager path in fp32)."""
    g = torch.Generator().manual_seed(4)
    H = 12
    hidden, W = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.4
    _, ids, inputs = batch()
    opts, with_ratio = OPTION_SETS[opt]
    kw = dict(inputs_for(inputs, with_ratio), loss_type=loss_type, **opts)
    kw["ref_logps"] = None

    def unfused(h, w, backend):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = gk.grpo_loss(F.linear(h, w), ids, backend=backend, **kw)
        out.loss.backward()
        return out.loss.detach(), h.grad, w.grad

    def fused(h, w, backend):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = gk.fused_linear_grpo_loss(h, w, ids, backend=backend, chunk_size=11, **kw)
        out.loss.backward()
        return out.loss.detach(), h.grad, w.grad

    r = unfused(hidden.double(), W.double(), "torch")
    for a, b_ in zip(fused(hidden.double(), W.double(), "torch"), r):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    s = unfused(hidden, W, "torch")
    for backend in [b for b in gk.available_backends("cpu") if b != "torch"]:
        for name, a, b_, c in zip(("loss", "dhidden", "dW"), fused(hidden, W, backend), r, s):
            assert_rule(a, b_, c, f"fused_linear {backend} {name} {loss_type} {opt}")


# --------------------------------------------------------------------------------------------------
# the quantile: torch.quantile's arithmetic, and across ranks (2 gloo processes) TRL's own mask
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 12, 101])
@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0, 1 - 0.2])
def test_entropy_quantile_is_torch_quantile(n, q):
    g = torch.Generator().manual_seed(n)
    h = torch.rand(3, 40, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask.view(-1)[torch.randperm(120, generator=g)[:n]] = True
    h = torch.where(mask, h, float("nan"))  # garbage at masked positions
    got = logp_loss.entropy_quantile(h, mask, q)
    want = torch.quantile(h[mask].float(), q)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.isnan(logp_loss.entropy_quantile(h, torch.zeros_like(mask), q))


_DIST_SCRIPT = textwrap.dedent("""
    import sys, types, torch, torch.distributed as dist
    import grpo_kernels as gk
    from grpo_kernels import logp_loss
    from trl.trainer.grpo_trainer import GRPOTrainer
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(10 + rank)
    Tr = 5 + 3 * rank  # the ranks hold different numbers of tokens
    ent = torch.rand(4, Tr, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(4, Tr, generator=g) > 0.3

    class Acc:  # TRL's accelerator calls, over torch.distributed
        def pad_across_processes(self, t, dim=0, pad_index=0):
            n = torch.tensor([t.shape[0]]); dist.all_reduce(n, op=dist.ReduceOp.MAX)
            return torch.cat([t, t.new_full((int(n) - t.shape[0],), pad_index)])
        def gather(self, t):
            parts = [torch.empty_like(t) for _ in range(2)]; dist.all_gather(parts, t); return torch.cat(parts)

    trainer = object.__new__(GRPOTrainer); trainer.accelerator = Acc()
    for rho in (0.2, 0.5, 0.0):
        want = GRPOTrainer.get_high_entropy_mask(trainer, ent, mask, 1 - rho)
        q = logp_loss.entropy_quantile(ent, mask, 1 - rho, dist.group.WORLD)
        got = (ent * mask >= q) & mask
        assert torch.equal(got, want), (rank, rho)
        local = (ent * mask >= logp_loss.entropy_quantile(ent, mask, 1 - rho)) & mask
        assert rho == 0.0 or not torch.equal(local, want), "the cross-rank quantile must differ from the local one"
    # through the public API: the loss with process_group equals the loss with the gathered mask's effect
    logits = torch.randn(4, Tr, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (4, Tr), generator=g)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    for backend in gk.available_backends("cpu"):
        x = logits if backend == "torch" else logits.float()
        a = gk.grpo_loss(x, ids, completion_mask=mask, advantages=adv, top_entropy_quantile=0.3,
                         process_group=dist.group.WORLD, backend=backend)
        b = gk.grpo_loss(x, ids, completion_mask=mask, advantages=adv, top_entropy_quantile=0.3, backend=backend)
        assert torch.isfinite(a.loss) and not torch.equal(a.loss, b.loss), backend
    # vocabulary-parallel: the same batch on both ranks, the vocabulary split in two; every option, the entropy
    # bonus's gradient through each rank's shard; against grpo_loss on the full logits
    g = torch.Generator().manual_seed(7)
    Vf = 23
    full = torch.randn(3, 4, Vf, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, Vf, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.2
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    old = torch.log_softmax(full, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) + 0.2 * torch.randn(3, 4, generator=g)
    samp = old + 0.1
    rho = gk.sampler_importance_ratio(old, samp, mask, mode="token_truncate", clip_min=0.5, clip_max=1.5)
    opts = dict(completion_mask=mask, advantages=adv, old_logps=old, sampling_logps=samp, importance_sampling_ratio=rho,
                off_policy_mask_threshold=0.05, top_entropy_quantile=0.5, entropy_coef=0.1)
    lo, hi = (0, 12) if rank == 0 else (12, Vf)
    for loss_type in ("vespo", "luspo", "dapo"):
        for backend in gk.available_backends("cpu"):
            x = full if backend == "torch" else full.float()
            ref_in = x.clone().requires_grad_()
            want = gk.grpo_loss(ref_in, ids, loss_type=loss_type, backend="torch", **opts)
            want.loss.backward()
            shard = x[..., lo:hi].clone().requires_grad_()
            got = gk.vocab_parallel.grpo_loss(shard, ids, vocab_start=lo, loss_type=loss_type, backend=backend, **opts)
            got.loss.backward()
            tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.loss, want.loss, **tol)
            torch.testing.assert_close(shard.grad, ref_in.grad[..., lo:hi], **tol)
            for k in want.metrics:
                torch.testing.assert_close(got.metrics[k], want.metrics[k], **tol)
    dist.destroy_process_group()
    print("ok", rank)
""")


def test_top_entropy_quantile_across_two_ranks(tmp_path):
    """2 gloo processes with different token counts: the mask equals TRL's get_high_entropy_mask run over
    the same two ranks (its accelerator's pad / gather done with torch.distributed). Then
    vocab_parallel.grpo_loss with every option on a vocabulary split over the two ranks equals grpo_loss on
    the full logits (float64 reference: to float64 rounding; fused fp32: to fp32 rounding of the same
    fp32 logits)."""
    pytest.importorskip("trl")
    script = tmp_path / "quantile_two_ranks.py"
    script.write_text(_DIST_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out}"
        assert f"ok {r}" in out
