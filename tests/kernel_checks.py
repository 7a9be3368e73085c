"""Checks shared by the tests of every fused backend (C++ CPU, CUDA through its CPU emulation, Triton under the
interpreter, CUDA on a GPU): inputs, the tolerance rule, and the comparisons against the float64 eager reference.

Tolerance rule (the FlashAttention rule, per element set): with ``ref64`` the reference on the same
(dtype-rounded) inputs in float64 and ``same`` the eager reference run on the inputs in their own dtype
(fp32 arithmetic, outputs in the inputs' dtype),

    max |kernel - ref64|  <=  2 * max |same - ref64|  +  8 * eps_fp32 * max(1, max |ref64|).

The first term is what the dtype itself costs (a bf16 / fp16 gradient is rounded to its dtype once, as
torch's is, so the kernel may be off by the same half-ulp); the second is the slack of fp32 arithmetic at the
scale of the values: the kernels sum in another order (chunked online log-sum-exp) and use their own exp
(<= 2 ulp), and ``x * (1/tau)`` differs from ``x / tau`` by <= 1 ulp.

Values computed FROM the log-probs (the loss, the kl metric, the loss's gradient w.r.t. the logits) follow
the one gradient policy, :func:`assert_via_logps`: the rule, plus what the kernel's own log-prob errors
(themselves checked by the rule) imply through the float64 loss math. The log-probs, the entropy and the
gradient of ``token_logprobs`` (whose weights do not depend on the log-probs) follow the rule alone.

Results are named tuples: :class:`LogprobResult` (logp, entropy, grad) and :class:`LossResult` (loss, logps,
grad, metrics); a loss batch is a :class:`LossBatch`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

import grpo_kernels as gk
from grpo_kernels import logp_loss, reference

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


class LossBatch(NamedTuple):
    x: torch.Tensor  # logits [B, T, V]
    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    adv: torch.Tensor  # [B]

    def inputs(self, cfg, on_policy: bool = False) -> dict:
        """The keyword tensors of grpo_loss (reference log-probs only where the config has a KL term)."""
        return dict(completion_mask=self.mask, advantages=self.adv, old_logps=None if on_policy else self.old,
                    ref_logps=self.ref if cfg.beta != 0 else None)


def loss_inputs(B, T, V, dtype, strided=False) -> LossBatch:
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
    return LossBatch(x, ids, mask, old, ref, adv)


def check_inplace(batch: LossBatch, cfg, backend):
    """inplace=True writes the gradient into the logits' storage: the same values as out of place."""
    k = loss_outputs(batch.x, batch.ids, cfg, backend, batch.inputs(cfg))
    leaf = batch.x.detach().clone().requires_grad_()
    inp = leaf * 1
    storage = inp.data_ptr()
    out = gk.grpo_loss_with_config(inp, batch.ids, cfg, inplace=True, backend=backend, **batch.inputs(cfg))
    out.loss.backward()
    assert torch.equal(out.loss.detach(), k.loss) and torch.equal(out.logps, k.logps)
    assert torch.equal(leaf.grad, k.grad)
    assert torch.equal(inp.detach(), k.grad), "the gradient must be written into the logits' storage"
    assert inp.data_ptr() == storage


def check_fused_launcher(launchers, B=2, T=3, V=211):
    """The single-pass launcher's per-row weight is coef * token_loss_grad (at the launcher level, including
    ties of torch.min: the on-policy ratio 1 sits exactly on both clip bounds +- 0)."""
    from grpo_kernels.backends.base import LossParams
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
            launchers.fused_fwd_bwd(x, ids, 1.0, old, ref, adv, coef, LossParams.from_config(cfg), out)
            g = coef.double() * logp_loss.token_loss_grad(lp64, cfg, adv.double(),
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


# --------------------------------------------------------------------------------------------------
# helpers of the reliability tests (test_properties, test_extreme_inputs, test_determinism): any backend,
# any device, every input of grpo_loss, the metrics too
# --------------------------------------------------------------------------------------------------
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio",
                "clip_ratio/low_min", "clip_ratio/high_max")


class one_thread:
    """Runs the eager reference on one thread: torch parallelises even a [2, 3, 131] float64 log_softmax, and on
    a busy 2-core machine each such call then waits ~5 ms for its OpenMP team (measured: 8 ms against 2 us).
    The kernels keep the default thread count (the C++ CPU backend uses torch.get_num_threads() threads)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def backend_for_test(name: str, request):
    """(backend name, device) of a fused backend for a test, or a skip saying why it cannot run here.

    ``name``: "cpu", "triton" (the interpreter on CPU tensors, the GPU where there is one), "cuda" (a GPU),
    or "cuda_emu" (the CUDA kernels on the CPU emulator, 64 threads per block, the emulated sm_90's choice of
    fused kernel: the 2-pass cluster kernel) / "cuda_emu_3pass" (the same with the 3-pass fused kernel): the
    ``emu`` fixture of conftest.py."""
    import pytest

    from grpo_kernels.backends import unavailable_reason

    if name in ("cuda_emu", "cuda_emu_3pass"):
        return emu_backend(request.getfixturevalue("emu"), 64, 1 if name == "cuda_emu_3pass" else 0), "cpu"
    device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
    reason = unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")
    return name, device


def emu_backend(emu, block: int, cluster: int = 0) -> str:
    """Registers (once) the test backend running the emulated CUDA kernels (the ``emu`` fixture) with ``block``
    threads per block (0: the kernels' default); ``cluster``: the fused kernel (``CudaLaunchers``: 0 = the
    extension's choice, 1 = 3-pass, 2 / 4 / 8); returns its name."""
    from grpo_kernels import backends
    from grpo_kernels.backends.base import BackendInfo
    from grpo_kernels.backends.cuda_backend import CudaLaunchers

    name = f"cuda_emu{block}" + (f"_c{cluster}" if cluster else "")
    if name not in backends.REGISTRY:
        backends.register_backend(BackendInfo(
            name, ("cpu",), lambda d: None if d == "cpu" else "emulated kernels take cpu tensors",
            lambda: CudaLaunchers(emu, device_type="cpu", block=block, cluster=cluster),
            "test only: CUDA kernels on the CPU emulator",
        ))
    return name


def _on(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


class LossResult(NamedTuple):
    loss: torch.Tensor
    logps: torch.Tensor
    grad: torch.Tensor  # dL/dlogits
    metrics: dict


class LogprobResult(NamedTuple):
    logp: torch.Tensor
    entropy: Optional[torch.Tensor]  # None when the entropy was not asked for
    grad: torch.Tensor  # dL/dlogits


def loss_outputs(x, ids, cfg, backend, inputs, inplace=False, device="cpu") -> LossResult:
    """The outputs of ``grpo_loss_with_config`` on CPU, computed on ``device``.

    ``inputs``: the keyword tensors of grpo_loss (completion_mask, advantages or rewards + group_size,
    old_logps, ref_logps, max_completion_length, num_items_in_batch). A loss that does not depend on the
    logits (nothing kept) has a zero gradient."""
    if backend == "torch":
        with one_thread():
            return _loss_outputs(x, ids, cfg, backend, inputs, inplace, device)
    return _loss_outputs(x, ids, cfg, backend, inputs, inplace, device)


def _loss_outputs(x, ids, cfg, backend, inputs, inplace, device):
    leaf = _on(x.detach(), device).clone() if inplace or device != "cpu" else x.detach()
    leaf.requires_grad_()
    inp = leaf * 1 if inplace else leaf  # inplace needs a non-leaf whose storage may be overwritten
    out = gk.grpo_loss_with_config(inp, _on(ids, device), cfg, inplace=inplace, backend=backend,
                                   **{k: _on(v, device) for k, v in inputs.items()})
    if out.loss.requires_grad:
        out.loss.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    metrics = {k: v.cpu() for k, v in out.metrics.items()}
    return LossResult(out.loss.detach().cpu(), out.logps.cpu(), grad.cpu(), metrics)


def clip_metric_bounds(x, ids, cfg, inputs, ref_logps64, delta):
    """[lo, hi] of each clip-ratio metric when every kept log-prob may be off by up to ``delta``.

    Each flag is monotone in the token's log-prob (low: c1 < 1-eps_low falls with logp; high / cispo:
    c1 > bound rises; sequence level: c1 of the mean moves the same way), so the metric of any logps within
    +-delta of the float64 ones lies between the metrics of logps64 - delta and logps64 + delta."""
    with one_thread():
        return _clip_metric_bounds(x, ids, cfg, inputs, ref_logps64, delta)


def _clip_metric_bounds(x, ids, cfg, inputs, ref_logps64, delta):
    from grpo_kernels import _validate

    li = _validate.validate_loss_inputs(x.double(), ids, cfg, **inputs)
    at = {}
    for sign in (-1.0, 1.0):
        _, mets = logp_loss.loss_from_logps(ref_logps64.double() + sign * delta, cfg, li.advantages, li.weights,
                                            li.old_logps, li.ref_logps, None, li.max_completion_length,
                                            li.num_items_in_batch)
        at[sign] = {k: v.item() for k, v in mets.items()}
    bounds = {}
    # (low_min / high_max: a min / max over sequences of means of monotone flags, monotone as well)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "cispo_clip_ratio", "clip_ratio/low_min",
                 "clip_ratio/high_max"):
        if name in at[1.0]:
            bounds[name] = (min(at[-1.0][name], at[1.0][name]), max(at[-1.0][name], at[1.0][name]))
    if "clip_ratio/region_mean" in at[1.0]:  # low + high (disjoint: A < 0 vs A > 0)
        lo_l, hi_l = bounds["clip_ratio/low_mean"]
        lo_h, hi_h = bounds["clip_ratio/high_mean"]
        bounds["clip_ratio/region_mean"] = (lo_l + lo_h, hi_l + hi_h)
    return bounds


def loss_of_logps(x, ids, cfg, inputs, logps):
    """The float64 reference as a function of the log-probs: -> (loss, kl metric or None, dL/dlogits), the
    loss math (and the exact float64 softmax Jacobian of the logits) applied to the given ``logps``."""
    with one_thread():
        return _loss_of_logps(x, ids, cfg, inputs, logps)


def _loss_of_logps(x, ids, cfg, inputs, logps):
    from grpo_kernels import _validate

    li = _validate.validate_loss_inputs(x.double(), ids, cfg, **inputs)
    lp = logps.double().clone().requires_grad_()
    terms = logp_loss.token_terms(lp, cfg, li.advantages, li.old_logps, li.ref_logps, li.weights)
    loss = logp_loss.reduce_loss(terms.loss_tok, li.weights, cfg.loss_type, li.max_completion_length,
                                 li.num_items_in_batch)
    kl = None if terms.kl is None else logp_loss._mean_metric(terms.kl.detach(), li.weights)
    g = torch.autograd.grad(loss, lp, allow_unused=True)[0] if loss.requires_grad else None
    x64 = x.detach().double().requires_grad_()
    logp_x = reference.token_logprobs(x64, torch.where(li.mask, ids, 0), cfg.temperature, mask=li.mask)
    if g is None:
        return loss.detach(), kl, torch.zeros_like(x64)
    (logp_x * g).sum().backward()
    return loss.detach(), kl, x64.grad


def assert_via_logps(kernel, ref64, same, ref_at_kernel_logps, what):
    """The tolerance rule for a value computed from the log-probs (the loss, the kl metric, dL/dlogits):
    the kernel may in addition be off by what its own log-prob errors (checked by the rule) imply, i.e. by
    |f64(kernel logps) - f64(reference logps)| element by element.

    (Without that term the rule is a coin toss here: a row's loss weight is one function of its log-prob, so the
    max error over a row's V gradient entries is one sample, not a max over many; torch's log-prob error in
    that row may happen to be 0 while the kernel's, no larger over the batch, is not.)"""
    kernel, ref64, same, at = (torch.as_tensor(t).double() for t in (kernel, ref64, same, ref_at_kernel_logps))
    assert kernel.shape == ref64.shape, what
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(kernel), fin), f"{what}: non-finite values where the reference has none"
    if not bool(fin.any()):
        return
    err = (kernel - ref64).abs()
    via = torch.where(fin, (at - ref64).abs(), 0.0)
    via = torch.where(torch.isfinite(via), via, 0.0)
    bound = rule_bound(ref64, same)
    excess = (err - via)[fin].max().item()
    assert excess <= bound, (f"{what}: error beyond what the log-prob errors imply {excess:.3g} > bound {bound:.3g} "
                             f"(max error {err[fin].max().item():.3g}, torch same-dtype error "
                             f"{(same - ref64)[fin].abs().max().item():.3g})")


def assert_mean_of_checked(kernel, ref64, same, per_token_bound, what):
    """A (masked) mean of per-token values each allowed ``per_token_bound`` by the rule: the mean may be off
    by that bound, plus the rule on its own evaluation."""
    k, r, s = (float(t) for t in (kernel, ref64, same))
    bound = per_token_bound + 2 * abs(s - r) + 8 * EPS32 * max(1.0, abs(r))
    assert abs(k - r) <= bound, f"{what}: error {abs(k - r):.3g} > bound {bound:.3g}"


def rule_bound(ref64, same):
    """The per-element bound of the tolerance rule (over the finite entries of ``ref64``)."""
    ref64, same = ref64.double(), same.double()
    fin = torch.isfinite(ref64) & torch.isfinite(same)
    if not bool(fin.any()):
        return 8 * EPS32
    return 2 * (same - ref64)[fin].abs().max().item() + 8 * EPS32 * max(1.0, ref64[fin].abs().max().item())


def check_loss(x, ids, cfg, backend, inputs, inplace=False, device="cpu", kernel_outputs=None) -> LossResult:
    """``backend`` against the float64 reference: the logps by the tolerance rule; the loss, the kl metric and
    the gradient by the rule plus what the logps' errors imply (:func:`assert_via_logps`); the entropy metric
    as a mean of per-token values under the rule; clip ratios, which jump at the clip bounds, within
    :func:`clip_metric_bounds`; every masked position gets an exact zero gradient.
    Returns the backend's :class:`LossResult`; ``kernel_outputs``: that result, computed by the caller (on
    logits laid out in a way loss_outputs does not reproduce), instead of running it here."""
    k = loss_outputs(x, ids, cfg, backend, inputs, inplace, device) if kernel_outputs is None else kernel_outputs
    r = loss_outputs(x.double(), ids, cfg, "torch", inputs)
    s = loss_outputs(x, ids, cfg, "torch", inputs)
    what = f"{backend} {x.dtype} {tuple(x.shape)} {cfg}"
    assert k[2].dtype == x.dtype and k[2].shape == x.shape
    assert_rule(k[1], r[1], s[1], f"logps {what}")
    mask = inputs.get("completion_mask")
    mask = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.all(k[2][~mask] == 0), f"masked positions must get an exact zero gradient ({what})"
    at_loss, at_kl, at_grad = loss_of_logps(x, ids, cfg, inputs, k[1])
    assert_via_logps(k[0], r[0], s[0], at_loss, f"loss {what}")
    assert_via_logps(k[2], r[2], s[2], at_grad, f"grad {what}")

    assert set(k[3]) == set(r[3]), f"metric names {sorted(k[3])} != {sorted(r[3])}"
    kept = mask & torch.isfinite(r[1])
    lp_err = (k[1].double() - r[1])[kept].abs().max().item() if kept.any() else 0.0
    old = inputs.get("old_logps")
    w_scale = r[1][kept].abs().max().item() if kept.any() else 0.0
    if old is not None and kept.any():
        w_scale += old.double()[kept].abs().max().item()
    delta = lp_err + 1e-6 + 4 * EPS32 * w_scale
    bounds = clip_metric_bounds(x, ids, cfg, inputs, r[1], delta) if any(n in r[3] for n in CLIP_METRICS) else {}
    for name, kv in k[3].items():
        assert kv.dim() == 0 and kv.dtype == torch.float32, name
        if name in bounds:
            lo, hi = bounds[name]
            if math.isnan(lo) and math.isnan(hi):  # no sequence with a kept token: TRL's nanmin / nanmax give NaN
                assert math.isnan(kv.item()), f"metric {name} = {kv.item()}, want NaN ({what})"
            else:
                assert lo - 1e-6 <= kv.item() <= hi + 1e-6, f"metric {name} = {kv.item()} outside [{lo}, {hi}] ({what})"
        elif name == "kl":
            assert_via_logps(kv, r[3][name], s[3][name], at_kl, f"metric kl {what}")
        elif name == "entropy":  # a masked mean of per-token entropies, each allowed the rule's bound
            ids0 = torch.where(mask, ids, 0)
            with one_thread():
                _, h64 = reference.token_logprobs(x.double(), ids0, cfg.temperature, True, mask)
                _, hs = reference.token_logprobs(x, ids0, cfg.temperature, True, mask)
            per_token = rule_bound(h64[mask], hs[mask]) if mask.any() else 0.0
            assert_mean_of_checked(kv, r[3][name], s[3][name], per_token, f"metric entropy {what}")
        else:
            assert_rule(kv, r[3][name], s[3][name], f"metric {name} {what}")
    return k


def logprob_outputs(x, ids, tau, backend, w_logp, w_ent, device="cpu", entropy=True) -> LogprobResult:
    """token_logprobs and its gradient for L = w_logp . logp (+ w_ent . entropy), on CPU."""
    if backend == "torch":
        with one_thread():
            return _logprob_outputs(x, ids, tau, backend, w_logp, w_ent, device, entropy)
    return _logprob_outputs(x, ids, tau, backend, w_logp, w_ent, device, entropy)


def _logprob_outputs(x, ids, tau, backend, w_logp, w_ent, device, entropy):
    inp = _on(x.detach(), device).clone() if device != "cpu" else x.detach()
    inp.requires_grad_()
    idd = _on(ids, device)
    if entropy:
        logp, ent = gk.token_logprobs(inp, idd, temperature=tau, return_entropy=True, backend=backend)
        ((logp * _on(w_logp, device)).sum() + (ent * _on(w_ent, device)).sum()).backward()
        return LogprobResult(logp.detach().cpu(), ent.detach().cpu(), inp.grad.cpu())
    logp = gk.token_logprobs(inp, idd, temperature=tau, backend=backend)
    (logp * _on(w_logp, device)).sum().backward()
    return LogprobResult(logp.detach().cpu(), None, inp.grad.cpu())


def check_logprobs(x, ids, tau, backend, device="cpu", entropy=True) -> LogprobResult:
    """log-probs, entropy (``entropy=False``: the kernels' other instantiation, no entropy output or gradient)
    and dL/dlogits of ``backend`` on ``device`` against the float64 reference, by the tolerance rule."""
    w_logp, w_ent = torch.randn(ids.shape), torch.randn(ids.shape)
    k = logprob_outputs(x, ids, tau, backend, w_logp, w_ent, device, entropy)
    r = logprob_outputs(x.double(), ids, tau, "torch", w_logp, w_ent, entropy=entropy)
    s = logprob_outputs(x, ids, tau, "torch", w_logp, w_ent, entropy=entropy)
    assert k[2].dtype == x.dtype and k[2].shape == x.shape
    for name, kv, rv, sv in zip(("logp", "entropy", "dL/dlogits"), k, r, s, strict=True):
        if kv is not None:
            assert_rule(kv, rv, sv, f"{name} {backend} {x.dtype} {tuple(x.shape)} tau={tau}")
    return k


# ---- launcher / custom-op checks shared by every fused backend ------------------------------------------
def check_masked_rows_and_bad_ids(launchers, dtype):
    """A row with g = g_H = 0 is +0 exactly even with NaN logits; an out-of-range id gives logp NaN and no
    target term; guard elements around the output are untouched (no out-of-bounds store)."""
    B, T, V = 2, 3, 1007
    x = torch.randn(B, T, V).to(dtype)
    x[0, 1] = float("nan")  # garbage row, g = 0 there
    ids = torch.randint(0, V, (B * T,))
    ids[4], ids[5] = V + 100, -3  # unmasked out-of-range ids: logp NaN, no out-of-bounds read
    logp, stats, ent = launchers.logprobs_fwd(x, ids, 1.0, True)
    assert stats.shape == (B * T, 2) and stats.dtype == torch.float32
    assert torch.isnan(logp[4]) and torch.isnan(logp[5]) and torch.isfinite(stats[4]).all() and torch.isfinite(ent[5])
    assert torch.equal(stats[[0, 2, 3], 0], x.view(-1, V)[[0, 2, 3]].float().amax(-1)), "stats[:, 0]: the raw row max"
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
    g, ge = torch.randn(B * T), torch.randn(B * T)
    g[1] = ge[1] = 0.0
    guard = torch.full((B * T * V + 2 * 4096,), 7.0).to(dtype)
    out = guard[4096 : 4096 + B * T * V].view(B, T, V)
    out.fill_(5.0)
    launchers.logprobs_bwd(x, ids, stats, ent, g, ge, 1.0, out)
    assert torch.all(out[0, 1] == 0) and not torch.signbit(out[0, 1].float()).any(), "masked row: +0 exactly"
    assert torch.isfinite(out).all()
    assert torch.all(guard[:4096] == 7.0) and torch.all(guard[-4096:] == 7.0), "write outside the output"
    # rows with a bad id have no target term: the row sums to -g (sum_v p_v = 1), not 0
    assert abs(out[1, 1].double().sum().item() + g[4].item()) < 1e-2 * max(1.0, abs(g[4].item()))


def check_opcheck(backend):
    """torch.library.opcheck of the custom ops on ``backend`` (fakes, autograd registration, schema)."""
    from grpo_kernels import _ops
    from grpo_kernels.backends.base import LossParams

    B, T, V = 2, 3, 37
    x = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B * T,))
    torch.library.opcheck(_ops.logprobs_fwd, (x, ids, 0.8, True, False, backend))
    torch.library.opcheck(_ops.logprobs_fwd, (x, ids, 1.0, False, False, backend))
    params = LossParams(loss_code=0, epsilon_low=0.2, epsilon_high=0.28, has_delta=True, delta=1.5, beta=0.04,
                        use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    vec = lambda: torch.randn(B * T)  # noqa: E731
    torch.library.opcheck(_ops.fused, (x.detach(), ids, 1.0, vec(), vec(), vec(), torch.rand(B * T), params.pack(),
                                       backend, torch.empty(B, T, V)))
    on_policy = LossParams(loss_code=2, epsilon_low=0.2, epsilon_high=0.28, has_delta=False, delta=0.0, beta=0.0,
                           use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    torch.library.opcheck(_ops.fused_inplace, (x.detach().clone(), ids, 1.0, None, None, vec(), torch.rand(B * T),
                                               on_policy.pack(), backend))  # sapo, no KL: old, ref = None


def check_saved_bytes_per_token(backend):
    """The log-prob op keeps per token only the row statistics (m, log s) (8 B), the entropy (4 B) and the id (8 B)
    for its backward; the logits are saved by reference (no copy), so they are not counted; nothing of size N x V.
    The loss math on [B, T] that runs in torch on top of it saves its own O(N) tensors; those are not the
    kernel's (why a pair and not one lse: "Row statistics" in csrc/include/grpo_boundary.h)."""
    B, T, V = 2, 8, 1000
    x = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gk.token_logprobs(x, ids, return_entropy=True, backend=backend)
    x_storage = x.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == x_storage for t in saved), "the logits are saved by reference"
    others = [t for t in saved if t.untyped_storage().data_ptr() != x_storage]
    assert all(t.numel() <= 2 * B * T for t in others), "nothing of size N x V may be saved"
    per_token = sum(t.numel() * t.element_size() for t in others) / (B * T)
    print(f"\n{backend}: {per_token:.1f} bytes saved for backward per token")
    assert 0 < per_token <= 20, f"{per_token} bytes per token saved"


def check_boundary_binding(module):
    """The Python mirror of the loss parameters against the C++ struct of ``module``: the same field names in
    the same order, and every field survives a trip through C++ (passed by value and returned) with a value
    of its own, so two fields bound to one slot would show. The other boundary structs start zeroed and
    reject unknown names."""
    from dataclasses import asdict, fields

    import numpy as np

    from grpo_kernels.backends.base import LossParams, native

    assert module.LossParams.FIELDS == tuple(f.name for f in fields(LossParams))
    p = LossParams(loss_code=2, epsilon_low=0.125, epsilon_high=0.375, has_delta=True, delta=1.5, beta=0.0625,
                   use_bias_correction_kl=False, sapo_temperature_pos=0.75, sapo_temperature_neg=1.25)
    assert len({v for v in asdict(p).values() if not isinstance(v, bool)}) == 7  # distinct: a crossed slot shows
    echoed = module.echo_loss_params(p.to_native(module))
    assert {name: getattr(echoed, name) for name in module.LossParams.FIELDS} == asdict(p)
    assert LossParams.unpack(p.pack()) == p
    # values that fp32 cannot hold arrive rounded to fp32, as the kernels compute
    q = LossParams.from_config(gk.GRPOConfig(epsilon_low=0.1, beta=0.3, delta=1.7))
    back = module.echo_loss_params(q.to_native(module))
    for name in ("epsilon_low", "epsilon_high", "beta", "delta"):
        assert getattr(back, name) == float(np.float32(getattr(q, name))), name
    for cls in (module.Rows, module.TokenInputs, module.Outputs):
        obj = cls()
        assert all(getattr(obj, name) == 0 for name in cls.FIELDS), cls.__name__
        with_all = native(cls, **{name: 8 * (i + 1) for i, name in enumerate(cls.FIELDS)})
        assert [getattr(with_all, name) for name in cls.FIELDS] == [8 * (i + 1) for i in range(len(cls.FIELDS))]
        try:
            native(cls, not_a_field=1)
        except AttributeError:
            pass
        else:
            raise AssertionError(f"{cls.__name__} accepted an unknown field")


@contextlib.contextmanager
def one_process_group():
    """A gloo process group of world size 1 in this process (the vocab-parallel functions are collectives)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
