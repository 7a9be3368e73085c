"""Checks shared by the tests of every fused backend (C++ CPU, CUDA through its CPU emulation, Triton under the
interpreter): inputs, the tolerance rule, and the comparisons against the float64 eager reference.

Tolerance rule (the FlashAttention rule, per element set): with ``ref64`` the reference on the same
(dtype-rounded) inputs in float64 and ``same`` the eager reference run on the inputs in their own dtype
(fp32 arithmetic, outputs in the inputs' dtype),

    max |kernel - ref64|  <=  2 * max |same - ref64|  +  8 * eps_fp32 * max(1, max |ref64|).

The first term is what the dtype itself costs (a bf16 / fp16 gradient is rounded to its dtype once, as
torch's is, so the kernel may be off by the same half-ulp); the second is the slack of fp32 arithmetic at the
scale of the values: the kernels sum in another order (chunked online log-sum-exp) and use their own exp
(<= 2 ulp), and ``x * (1/tau)`` differs from ``x / tau`` by <= 1 ulp.
"""

from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
KL = [(0.0, True), (0.04, True), (0.04, False)]  # (beta, use_bias_correction_kl)
# delta is a parameter of the clip family only
LOSS_DELTA = [(lt, None) for lt in LOSS_TYPES] + [(lt, 1.3) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]


def assert_rule(kernel, ref64, same, what):
    """The tolerance rule of the module docstring; NaN/inf must sit where the reference has them."""
    kernel, ref64, same = kernel.double(), ref64.double(), same.double()
    assert kernel.shape == ref64.shape, what
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(kernel), fin), f"{what}: non-finite values where the reference has none"
    if not bool(fin.any()):
        return
    err = (kernel - ref64)[fin].abs().max().item()
    err_same = (same - ref64)[fin].abs().max().item()
    scale = max(1.0, ref64[fin].abs().max().item())
    bound = 2 * err_same + 8 * EPS32 * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (torch same-dtype error {err_same:.3g})"


def make_logits(B, T, V, dtype, strided=False, scale=3.0):
    """[B, T, V] logits; ``strided`` gives a view with row stride V + 5 (rows off the 16-byte grid), a sliced
    batch and a storage offset."""
    if strided:
        x = (torch.randn(2 * B, T + 3, V + 5) * scale).to(dtype)[::2, 1:-2, 2:-3]
        assert not x.is_contiguous()
        return x
    return (torch.randn(B, T, V) * scale).to(dtype)


def logprob_grads(x, ids, tau, backend, w_logp, w_ent):
    inp = x.detach().requires_grad_()
    logp, ent = gk.token_logprobs(inp, ids, temperature=tau, return_entropy=True, backend=backend)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    return logp.detach(), ent.detach(), inp.grad


def check_logprobs(x, ids, tau, backend):
    """log-probs, entropy and dL/dlogits of ``backend`` against the float64 reference (tolerance rule)."""
    B, T = ids.shape
    w_logp, w_ent = torch.randn(B, T), torch.randn(B, T)
    k = logprob_grads(x, ids, tau, backend, w_logp, w_ent)
    r = logprob_grads(x.double(), ids, tau, "torch", w_logp, w_ent)
    s = logprob_grads(x, ids, tau, "torch", w_logp, w_ent)
    assert k[2].dtype == x.dtype and k[2].shape == x.shape
    for name, kv, rv, sv in zip(("logp", "entropy", "dL/dlogits"), k, r, s, strict=True):
        assert_rule(kv, rv, sv, f"{name} {x.dtype}")
    return k


def check_logprobs_no_entropy(x, ids, tau, backend):
    """The other forward / backward instantiation (no entropy output, no entropy gradient)."""
    w = torch.randn(ids.shape)
    xi, xr, xs = (x.detach().clone().requires_grad_(), x.double().requires_grad_(), x.detach().clone().requires_grad_())
    logp = gk.token_logprobs(xi, ids, temperature=tau, backend=backend)
    (logp * w).sum().backward()
    r_logp = reference.token_logprobs(xr, ids, tau)
    (r_logp * w).sum().backward()
    s_logp = reference.token_logprobs(xs, ids, tau)
    (s_logp * w).sum().backward()
    assert_rule(logp.detach(), r_logp.detach(), s_logp.detach(), f"logp (no entropy) {x.dtype}")
    assert_rule(xi.grad, xr.grad, xs.grad, f"dL/dlogits (no entropy) {x.dtype}")


def loss_inputs(B, T, V, dtype, strided=False):
    """A batch with a fully masked row of NaN logits and out-of-range ids, ratios that cross both clip bounds
    and the delta, and reference log-probs for the KL."""
    x = make_logits(B, T, V, dtype, strided)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # a fully masked row ...
    mask[0, 0] = True
    with torch.no_grad():  # ... whose logits are garbage
        x[1] = float("nan")
    ids[1] = V + 5  # and whose ids are out of range (allowed where masked)
    lp = reference.token_logprobs(x.double(), torch.where(mask, ids, 0), mask=mask).float()
    old = lp + 0.25 * torch.randn(B, T)  # ratios over ~[0.6, 1.6]: both clip bounds and the delta are crossed
    ref = lp + 0.3 * torch.randn(B, T)
    adv = torch.randn(B)
    return x, ids, mask, old, ref, adv


def run_loss(x, ids, mask, old, ref, adv, cfg, backend, inplace=False, on_policy=False):
    leaf = x.detach().clone().requires_grad_() if inplace else x.detach().requires_grad_()
    inp = leaf * 1 if inplace else leaf  # inplace needs a non-leaf whose storage may be overwritten
    out = gk.grpo_loss_with_config(
        inp, ids, cfg, completion_mask=mask, advantages=adv, old_logps=None if on_policy else old,
        ref_logps=ref if cfg.beta != 0 else None, inplace=inplace, backend=backend,
    )
    out.loss.backward()
    return out.loss.detach(), out.logps, leaf.grad


def check_loss(args, cfg, backend, **kw):
    """loss, logps and dL/dlogits of ``backend`` against the float64 reference; the masked row's gradient is 0."""
    k = run_loss(*args, cfg, backend, **kw)
    r = run_loss(args[0].double(), *args[1:], cfg, "torch", **kw)
    s = run_loss(*args, cfg, "torch", **kw)
    for name, kv, rv, sv in zip(("loss", "logps", "grad"), k, r, s, strict=True):
        assert_rule(kv, rv, sv, f"{name} {args[0].dtype}")
    assert torch.all(k[2][1] == 0), "a fully masked row must get an exact zero gradient"
    return k


def check_inplace(args, cfg, backend):
    """inplace=True writes the gradient into the logits' storage: the same values as out of place."""
    k = run_loss(*args, cfg, backend)
    leaf = args[0].detach().clone().requires_grad_()
    inp = leaf * 1
    storage = inp.data_ptr()
    out = gk.grpo_loss_with_config(inp, args[1], cfg, completion_mask=args[2], advantages=args[5],
                                   old_logps=args[3], ref_logps=args[4], inplace=True, backend=backend)
    out.loss.backward()
    assert torch.equal(out.loss.detach(), k[0]) and torch.equal(out.logps, k[1])
    assert torch.equal(leaf.grad, k[2])
    assert torch.equal(inp.detach(), k[2]), "the gradient must be written into the logits' storage"
    assert inp.data_ptr() == storage


def check_fused_launcher(launchers, params_from_config, B=2, T=3, V=211):
    """The single-pass launcher's per-row weight is coef * token_loss_grad (at the launcher level, including
    ties of torch.min: the on-policy ratio 1 sits exactly on both clip bounds +- 0)."""
    from grpo_kernels.config import GRPOConfig

    x = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B * T,))
    for loss_type in LOSS_TYPES:
        for old_given in (False, True):
            cfg = GRPOConfig(loss_type=loss_type, beta=0.1, epsilon_high=3.0 if loss_type == "cispo" else None)
            lp64 = reference.token_logprobs(x.double(), ids.view(B, T)).view(-1)
            old = (lp64 + 0.3 * torch.randn(B * T)).float() if old_given else None
            ref = (lp64 + 0.2 * torch.randn(B * T)).float()
            adv, coef = torch.randn(B * T), torch.rand(B * T)
            coef[3] = 0.0
            out = torch.empty_like(x)
            launchers.fused_fwd_bwd(x, ids, 1.0, old, ref, adv, coef, params_from_config(cfg), out)
            g = coef.double() * reference.token_loss_grad(lp64, cfg, adv.double(),
                                                          None if old is None else old.double(), ref.double())
            xr = x.double().requires_grad_()
            (reference.token_logprobs(xr, ids.view(B, T)).view(-1) * g).sum().backward()
            err = (out.double() - xr.grad).abs().max().item()
            assert err <= 16 * EPS32 * max(1.0, g.abs().max().item()), f"{loss_type} old={old_given}: {err}"
            assert torch.all(out.view(-1, V)[3] == 0)


def check_all_banned_but_one(backend):
    """A row with every logit -inf but the target: logp = 0, entropy = 0, gradient zero (no NaN)."""
    x = torch.full((1, 2, 9), float("-inf"))
    x[0, 0, 4] = 2.0
    x[0, 1, 0] = -1.0
    ids = torch.tensor([[4, 0]])
    xi = x.clone().requires_grad_()
    logp, ent = gk.token_logprobs(xi, ids, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logp, torch.zeros(1, 2)) and torch.equal(ent, torch.zeros(1, 2))
    assert torch.equal(xi.grad.abs(), torch.zeros_like(x))


def check_large_magnitude_entropy(backend):
    """|z| ~ 1e4: the entropy through (s, t) has no cancellation (lse - sum p z would lose ~1e-3)."""
    x = torch.randn(2, 3, 1007) * 2 + 1e4
    ids = torch.randint(0, 1007, (2, 3))
    logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend=backend)
    r_logp, r_ent = reference.token_logprobs(x.double(), ids, return_entropy=True)
    assert (ent.double() - r_ent).abs().max() < 2e-5
    assert (logp.double() - r_logp).abs().max() < 1e-2  # logp = z - lse with |z| ~ 1e4: fp32 ulp 1e-3
