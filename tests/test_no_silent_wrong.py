"""No silent wrong answer: aliasing, the gradients of every tensor input, and empty batches, on every backend
(the eager reference "torch", the C++ "cpu" kernels, Triton under the interpreter, the CUDA kernels through
their CPU emulation) and every entry point (grpo_loss, grpo_loss_with_config, GRPOLoss, token_logprobs, the
fused LM head functions, the vocabulary-parallel functions).

- Aliasing: ``inplace=True`` writes the gradient over the logits. Logits whose elements share memory (an
  ``expand``ed batch, an overlapping ``as_strided`` view) or that share memory with another input would be
  read after being overwritten: a ValueError naming the argument, before anything is written. Read-only
  (``inplace=False``) such inputs are legal and must give the reference's answer.
- Gradients: every tensor input that requires grad gets autograd's gradient of the reference's loss
  (TRL's formulas) on every backend and path (single pass, two passes, no logits gradient); compared with
  backend "torch" in float64 by the tolerance rule of tests/kernel_checks.py, plus what the kernel's own
  log-prob errors imply (``assert_via_logps``: the float64 loss math evaluated at the kernel's log-probs).
- Empty batches (B = 0, T = 0, N = 0, every position dropped): loss 0, a zero gradient of the right shape,
  the reference's metrics (TRL's: the clip-rate min / max over no sequence are NaN), TRL's empty
  top-entropy mask, for every loss option.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import LossResult, assert_rule, assert_via_logps, backend_for_test, check_loss, one_process_group

import grpo_kernels as gk
from grpo_kernels import _validate, logp_loss, reference
from grpo_kernels import vocab_parallel as vp
from grpo_kernels.config import GRPOConfig
from grpo_kernels.fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_token_logprobs

F64 = torch.float64
FUSED = ["cpu", "triton", "cuda_emu"]
ALL = ["torch", *FUSED]


@pytest.fixture(params=ALL)
def backend(request):
    """(backend name, device, dtype): the reference in float64, the fused backends in fp32."""
    if request.param == "torch":
        return "torch", "cpu", F64
    name, device = backend_for_test(request.param, request)
    return name, device, torch.float32


@pytest.fixture(params=FUSED)
def fused_backend(request):
    name, device = backend_for_test(request.param, request)
    return name, device


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group: the vocabulary-parallel functions are collectives."""
    with one_process_group():
        yield


# --------------------------------------------------------------------------------------------------
# 1. aliasing
# --------------------------------------------------------------------------------------------------
def _brute_overlap(shape, strides) -> bool:
    offsets = torch.zeros((), dtype=torch.long)
    for d, s in zip(shape, strides, strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(d) * s
    offsets = offsets.reshape(-1)
    return offsets.unique().numel() != offsets.numel()


def test_internal_overlap_matches_enumeration():
    """has_internal_overlap against the enumeration of every element's offset, on layouts torch calls too hard
    to decide (non-dense views: sliced, interleaved, partly overlapping rows) and on dense / expanded ones."""
    g = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0}
    for _ in range(400):
        shape = [int(torch.randint(1, 4, (1,), generator=g)) for _ in range(3)]
        strides = [int(torch.randint(0, 9, (1,), generator=g)) for _ in range(2)] + [1]
        storage = torch.zeros(1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)))
        t = storage.as_strided(shape, strides)
        want = _brute_overlap(shape, strides)
        assert _validate.has_internal_overlap(t) == want, (shape, strides)
        seen[want] += 1
    assert min(seen.values()) > 50
    # the cases the sorted-stride test cannot settle: the rows are enumerated
    base = torch.zeros(64)
    assert not _validate.has_internal_overlap(base.as_strided((2, 3, 2), (6, 4, 1)))  # rows 0 4 6 8 10 14
    assert _validate.has_internal_overlap(base.as_strided((2, 3, 2), (5, 4, 1)))  # rows 4 and 5 overlap
    assert not _validate.has_internal_overlap(torch.zeros(4, 6, 9)[::2, 1:-1, 2:-3])


def _overlapping(layout, B, T, V, dtype):
    """(leaf, logits): logits [B, T, V] computed from the leaf (a non-leaf, so inplace is allowed), whose
    elements share memory as ``layout`` says."""
    if layout == "expand_batch":
        leaf = torch.randn(1, T, V, dtype=dtype, requires_grad=True)
        return leaf, (leaf * 1.0).expand(B, T, V)
    if layout == "expand_time":
        leaf = torch.randn(B, 1, V, dtype=dtype, requires_grad=True)
        return leaf, (leaf * 1.0).expand(B, T, V)
    leaf = torch.randn(B * T * V, dtype=dtype, requires_grad=True)
    flat = leaf * 1.0
    if layout == "rows_overlap":  # each row starts 3 elements after the previous one: rows share V - 3
        return leaf, flat.as_strided((B, T, V), (T * 3, 3, 1))
    assert layout == "interleaved_overlap"  # torch cannot tell; rows b * (V + 3) + t * (V + 2) collide
    return leaf, flat.as_strided((B, T, V), (V + 3, V + 2, 1))


OVERLAP_LAYOUTS = ["expand_batch", "expand_time", "rows_overlap", "interleaved_overlap"]


def _entry_points():
    """name -> f(logits, ids, inplace, backend, opts, **inputs): the logits entry points that take inplace."""
    return {
        "grpo_loss": lambda x, ids, inplace, backend, opts, **kw: gk.grpo_loss(
            x, ids, inplace=inplace, backend=backend, **opts, **kw),
        "grpo_loss_with_config": lambda x, ids, inplace, backend, opts, **kw: gk.grpo_loss_with_config(
            x, ids, GRPOConfig(**opts), inplace=inplace, backend=backend, **kw),
        "GRPOLoss": lambda x, ids, inplace, backend, opts, **kw: gk.GRPOLoss(
            inplace=inplace, backend=backend, **opts)(x, ids, **kw),
        "GRPOLoss.forward": lambda x, ids, inplace, backend, opts, **kw: gk.GRPOLoss(
            backend=backend, **opts)(x, ids, inplace=inplace, **kw),
    }


ENTRIES = list(_entry_points())


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_into_self_overlapping_logits_raises(backend, entry, layout, level):
    name, device, dtype = backend
    B, T, V = 4, 3, 7
    _, x = _overlapping(layout, B, T, V, dtype)
    x = x.to(device)
    assert _validate.has_internal_overlap(x)
    before = x.detach().clone()
    ids = torch.randint(0, V, (B, T), device=device)
    kw = dict(advantages=torch.randn(B, device=device), old_logps=torch.full((B, T), -2.0, device=device))
    with pytest.raises(ValueError, match=r"inplace=True writes the gradient into logits, but logits has elements "
                                         r"that share memory"):
        _entry_points()[entry](x, ids, True, name, dict(importance_sampling_level=level), **kw)
    assert torch.equal(x.detach(), before), "nothing may be written before the error"


@pytest.mark.parametrize("entry", ENTRIES)
def test_inplace_into_a_view_of_a_leaf_raises(backend, entry):
    """A slice of a leaf that requires grad: writing the gradient there would overwrite the leaf (torch
    refuses in-place writes into such views); a view of a non-leaf is fine."""
    name, device, dtype = backend
    leaf = torch.randn(2, 4, 5, dtype=dtype, device=device, requires_grad=True)
    before = leaf.detach().clone()
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    adv = torch.randn(2, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="but logits is a view of a leaf tensor that requires grad"):
        _entry_points()[entry](leaf[:, :3], ids, True, name, {}, advantages=adv)
    assert torch.equal(leaf.detach(), before)
    if name != "torch":
        out = _entry_points()[entry]((leaf * 1.0)[:, :3], ids, True, name, {}, advantages=adv)
        out.loss.backward()
        assert leaf.grad is not None and torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("other", ["old_logps", "ref_logps", "advantages", "completion_mask",
                                   "importance_sampling_ratio", "sampling_logps", "num_items_in_batch"])
def test_inplace_into_logits_shared_with_another_input_raises(fused_backend, other):
    """An input that is a view of the logits' memory would be read after the gradient overwrote it."""
    name, device = fused_backend
    B, T, V = 3, 4, 9
    leaf = (torch.rand(B, T, V, device=device) + 0.1).requires_grad_()  # > 0: a valid weight / ratio / count
    x = leaf * 1.0
    view = x.detach()[..., 0]  # [B, T], inside the logits' storage
    kw = dict(advantages=torch.randn(B, device=device), old_logps=torch.full((B, T), -2.0, device=device),
              beta=0.04, ref_logps=torch.full((B, T), -2.0, device=device), loss_type="dapo")
    if other == "sampling_logps":
        kw["off_policy_mask_threshold"] = 0.1
    kw[other] = x.detach()[0, 0, :1] if other == "num_items_in_batch" else view
    with pytest.raises(ValueError, match=f"inplace=True writes the gradient into logits, but {other} shares memory"):
        gk.grpo_loss(x, torch.randint(0, V, (B, T), device=device), inplace=True, backend=name, **kw)


@pytest.mark.parametrize("layout", ["sliced", "interleaved"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_into_non_overlapping_views_works(fused_backend, layout, level):
    """Views torch calls too hard to decide but whose elements are distinct are written in place: the
    same loss, log-probs and gradient as out of place, and the gradient lands in the view's memory."""
    name, device = fused_backend
    B, T, V = 2, 3, 5
    ids = torch.randint(0, V, (B, T), device=device)
    kw = dict(advantages=torch.randn(B, device=device), old_logps=torch.full((B, T), -1.5, device=device),
              importance_sampling_level=level, backend=name)
    if layout == "sliced":
        leaf = torch.randn(B + 1, T + 2, V + 3, device=device, requires_grad=True)
        make = lambda: (leaf * 1.0)[1:, 1:-1, 2:-1]  # noqa: E731
    else:  # rows at 3V b + 2V t: the sorted-stride test cannot settle it, the row enumeration can
        leaf = torch.randn(64, device=device, requires_grad=True)
        make = lambda: (leaf * 1.0).as_strided((B, T, V), (3 * V, 2 * V, 1))  # noqa: E731
    assert torch._debug_has_internal_overlap(make()) == 2 and not _validate.has_internal_overlap(make())
    out = gk.grpo_loss(make(), ids, **kw)
    out.loss.backward()
    want_grad, leaf.grad = leaf.grad.clone(), None
    x = make()
    got = gk.grpo_loss(x, ids, inplace=True, **kw)
    got.loss.backward()
    assert torch.equal(got.loss.detach(), out.loss.detach()) and torch.equal(got.logps, out.logps)
    assert torch.equal(leaf.grad, want_grad)


@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_read_only_overlapping_logits_are_legal(backend, layout, level):
    """inplace=False: expanded / overlapping logits are only read, and give the float64 reference's loss,
    log-probs, metrics and gradient (per element of the view; autograd then sums the shared elements), by
    the tolerance rule of kernel_checks.check_loss."""
    name, device, dtype = backend
    B, T, V = 4, 3, 7
    _, view = _overlapping(layout, B, T, V, dtype)
    ids = torch.randint(0, V, (B, T))
    inputs = dict(advantages=torch.randn(B), old_logps=torch.full((B, T), -2.0))
    cfg = GRPOConfig(importance_sampling_level=level)
    x = view.to(device)
    out = gk.grpo_loss_with_config(x, ids.to(device), cfg, backend=name,
                                   **{k: v.to(device) for k, v in inputs.items()})
    (grad,) = torch.autograd.grad(out.loss, x)
    k = LossResult(out.loss.detach().cpu(), out.logps.cpu(), grad.cpu(), {m: v.cpu() for m, v in out.metrics.items()})
    check_loss(view.detach().contiguous(), ids, cfg, name, inputs, kernel_outputs=k)


def test_read_only_overlapping_head_inputs_are_legal(backend):
    """fused_linear_grpo_loss only reads hidden and the head: an expanded hidden and a head whose rows
    overlap are legal (its gradients are fresh buffers), with the float64 unfused reference's loss and
    gradients by the tolerance rule (``same``: the unfused path in the inputs' dtype)."""
    name, device, dtype = backend
    B, T, H, V = 3, 4, 5, 9
    h_leaf = torch.randn(1, T, H, dtype=dtype, requires_grad=True)
    w_leaf = torch.randn(V + H, dtype=dtype, requires_grad=True)  # W[v, k] = w[v + k]: overlapping rows
    ids = torch.randint(0, V, (B, T))
    kw = dict(advantages=torch.randn(B), old_logps=torch.full((B, T), -2.0))

    def run(dt, fused_path, backend):
        h0, w0 = (t.detach().to(dt).requires_grad_() for t in (h_leaf, w_leaf))
        h = (h0 * 1.0).expand(B, T, H)
        W = (w0 * 1.0).as_strided((V, H), (1, 1))
        if fused_path:
            out = fused_linear_grpo_loss(h, W, ids, backend=backend, chunk_size=5, **kw)
        else:
            out = gk.grpo_loss(F.linear(h, W), ids, backend=backend, **kw)
        out.loss.backward()
        return out.loss.detach(), h0.grad, w0.grad

    got = run(dtype, True, name)
    ref = run(F64, False, "torch")
    same = run(dtype, False, "torch")
    for what, k, r, s_ in zip(("loss", "d/dhidden", "d/dweight"), got, ref, same, strict=True):
        assert_rule(k, r, s_, f"fused_linear {name} overlapping inputs {what}")


def test_read_only_expanded_shard_is_legal(backend, group):
    """vocab_parallel.grpo_loss on an expanded shard: the float64 reference by check_loss's rule."""
    name, device, dtype = backend
    B, T, V = 3, 2, 8
    leaf = torch.randn(1, T, V, dtype=dtype)
    view = leaf.expand(B, T, V)
    ids = torch.randint(0, V, (B, T))
    inputs = dict(advantages=torch.randn(B), old_logps=torch.full((B, T), -2.0))
    cfg = GRPOConfig()
    x = view.to(device).requires_grad_()
    out = vp.grpo_loss_with_config(x, ids.to(device), cfg, backend=name,
                                   **{k: v.to(device) for k, v in inputs.items()})
    (grad,) = torch.autograd.grad(out.loss, x)
    k = LossResult(out.loss.detach().cpu(), out.logps.cpu(), grad.cpu(), {m: v.cpu() for m, v in out.metrics.items()})
    check_loss(view.contiguous(), ids, cfg, name, inputs, kernel_outputs=k)


# --------------------------------------------------------------------------------------------------
# 2. one rule for the gradients of every tensor input
# --------------------------------------------------------------------------------------------------
B_, T_, V_, H_ = 4, 3, 11, 6


def small_inputs(variant: str, seed=0) -> dict:
    """The O(N) tensor inputs of a loss call (float64, no grad), near the log-probs of ``grad_case_logits``:
    ``variant`` picks advantages [B] / [B, T] or rewards, and a [B, T] or [B, 1] sampler ratio."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    mask = torch.rand(B_, T_, generator=g, dtype=F64) * 1.5 + 0.25  # weights; one dropped token, one row
    mask[0, 1] = 0.0
    mask[2] = 0.0
    out = dict(completion_mask=mask, old_logps=-2.4 + 0.4 * r(B_, T_), ref_logps=-2.4 + 0.4 * r(B_, T_),
               sampling_logps=-2.4 + 0.4 * r(B_, T_), num_items_in_batch=torch.tensor(7.5, dtype=F64))
    if variant == "rewards":
        out["rewards"] = r(B_)
    else:
        out["advantages"] = r(B_) if variant == "adv_b" else r(B_, T_)
    out["importance_sampling_ratio"] = (0.5 + torch.rand(B_, T_ if variant == "adv_bt" else 1, generator=g,
                                                         dtype=F64))
    return out


GRAD_CASES = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="bnpo", delta=1.3),
    dict(loss_type="dr_grpo"),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo", beta=0.04),
    dict(loss_type="luspo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dapo", off_policy_mask_threshold=0.1),
    dict(loss_type="vespo"),
]
GRAD_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in GRAD_CASES]


def _call_inputs(opts, small, dtype, device, grad: bool):
    """The keyword inputs of one call: clones of ``small`` in ``dtype`` on ``device``, leaves that require grad
    when ``grad`` (the O(N) inputs the loss reads under ``opts``)."""
    cfg = GRPOConfig(**opts)
    kw = {}
    for k, v in small.items():
        if k == "ref_logps" and cfg.beta == 0.0:
            continue
        if k == "num_items_in_batch" and cfg.loss_type not in ("dapo", "cispo", "vespo"):
            continue
        if k == "sampling_logps" and cfg.off_policy_mask_threshold is None:
            continue
        kw[k] = v.detach().to(dtype).to(device).clone().requires_grad_(grad)
    if "rewards" in kw:
        kw["group_size"] = 2
    return kw


def _grads(kw):
    return {k: None if v.grad is None else v.grad.detach().cpu() for k, v in kw.items() if torch.is_tensor(v)}


def _at_kernel_logps(logps, opts, small):
    """The float64 reference's gradients of the O(N) inputs with the log-probs fixed at ``logps``."""
    kw = _call_inputs(opts, small, F64, "cpu", True)
    cfg = GRPOConfig(**opts)
    stand_in = torch.zeros(B_, T_, 1, dtype=F64)
    x = _validate.validate_loss_inputs(stand_in, torch.zeros(B_, T_, dtype=torch.long), cfg, **kw)
    loss, _ = logp_loss.loss_from_logps(logps.detach().double(), cfg, **x.loss_kwargs())
    if loss.requires_grad:
        loss.backward()
    return _grads(kw)


def _check_small_grads(got, logps, opts, small, run_same, run_ref, what):
    """``got``: the backend's gradients of the O(N) inputs; ``run_same`` / ``run_ref``: the eager reference's
    in fp32 / float64 (each -> (grads, logps)). None exactly where the reference has None (an input that
    enters TRL's formulas only through a comparison or a detached weight), else the tolerance rule plus what
    the log-prob errors imply."""
    ref, _ = run_ref()
    assert set(got) == set(ref)
    assert {k for k, v in got.items() if v is None} == {k for k, v in ref.items() if v is None}, (
        f"{what}: gradients None for {sorted(k for k, v in got.items() if v is None)}, the reference for "
        f"{sorted(k for k, v in ref.items() if v is None)}")
    assert any(v is not None for v in ref.values())
    same, _ = run_same() if run_same is not None else (ref, None)
    at = _at_kernel_logps(logps, opts, small)
    for k, v in got.items():
        if v is not None:
            assert_via_logps(v, ref[k], same[k], at[k], f"d loss / d {k} {what}")


def _logits_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B_, T_, V_, generator=g, dtype=F64) * 1.5
    x[2] = float("nan")  # the dropped row holds garbage
    ids = torch.randint(0, V_, (B_, T_), generator=g)
    return x, ids


@pytest.mark.parametrize("opts", GRAD_CASES, ids=GRAD_IDS)
@pytest.mark.parametrize("variant", ["adv_b", "adv_bt", "rewards"])
@pytest.mark.parametrize("logits_grad", [True, False], ids=["logits_grad", "no_logits_grad"])
def test_every_input_gets_the_reference_gradient(backend, opts, variant, logits_grad):
    """grpo_loss: single pass (token level), two passes (sequence level, vespo, off-policy mask) and the
    forward-only path (logits without grad) give every O(N) input the float64 reference's gradient."""
    name, device, dtype = backend
    x, ids = _logits_case()
    small = small_inputs(variant)

    def run(backend_name, dt):
        kw = _call_inputs(opts, small, dt, device if backend_name == name else "cpu", True)
        logits = x.to(dt).to(device if backend_name == name else "cpu").clone().requires_grad_(logits_grad)
        out = gk.grpo_loss(logits, ids.to(logits.device), backend=backend_name, **opts, **kw)
        out.loss.backward()
        return _grads(kw), out.logps.cpu()

    got, logps = run(name, dtype)
    same = None if dtype == F64 else (lambda: run("torch", dtype))
    _check_small_grads(got, logps, opts, small, same, lambda: run("torch", F64), f"{name} {opts} {variant}")


@pytest.mark.parametrize("opts", GRAD_CASES[:2] + GRAD_CASES[4:6] + GRAD_CASES[7:8], ids=GRAD_IDS[:2] + GRAD_IDS[4:6]
                         + GRAD_IDS[7:8])
@pytest.mark.parametrize("variant", ["adv_bt", "rewards"])
def test_every_input_gets_the_reference_gradient_fused_linear(backend, opts, variant):
    """fused_linear_grpo_loss (single pass at token level, two passes at sequence level) and the module: the
    O(N) inputs get the float64 unfused reference's gradient."""
    name, device, dtype = backend
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B_, T_, H_, generator=g, dtype=F64)
    W = torch.randn(V_, H_, generator=g, dtype=F64) * 0.5
    _, ids = _logits_case()
    small = small_inputs(variant)

    def run(fn, dt, dev):
        kw = _call_inputs(opts, small, dt, dev, True)
        h, w = (t.to(dt).to(dev).clone().requires_grad_() for t in (hidden, W))
        out = fn(h, w, ids.to(dev), kw)
        out.loss.backward()
        return _grads(kw), out.logps.cpu()

    def fl(h, w, i, kw):
        return fused_linear_grpo_loss(h, w, i, backend=name, chunk_size=5, **opts, **kw)

    def mod(h, w, i, kw):
        return FusedLinearGRPOLoss(weight=w, backend=name, chunk_size=7, **opts)(h, i, **kw)

    def unfused(h, w, i, kw):
        return gk.grpo_loss(F.linear(h, w), i, backend="torch", **opts, **kw)

    for fn in (fl, mod):
        got, logps = run(fn, dtype, device)
        same = None if dtype == F64 else (lambda: run(unfused, dtype, "cpu"))
        _check_small_grads(got, logps, opts, small, same, lambda: run(unfused, F64, "cpu"),
                           f"fused_linear {name} {opts} {variant}")


@pytest.mark.parametrize("opts", GRAD_CASES[:2] + GRAD_CASES[7:9], ids=GRAD_IDS[:2] + GRAD_IDS[7:9])
def test_every_input_gets_the_reference_gradient_vocab_parallel(backend, group, opts):
    name, device, dtype = backend
    x, ids = _logits_case()
    small = small_inputs("adv_bt")

    def run(fn, dt):
        kw = _call_inputs(opts, small, dt, device, True)
        out = fn(x.to(dt).to(device).clone().requires_grad_(), ids.to(device), kw)
        out.loss.backward()
        return _grads(kw), out.logps.cpu()

    got, logps = run(lambda lg, i, kw: vp.grpo_loss(lg, i, backend=name, **opts, **kw), dtype)
    unsharded = lambda lg, i, kw: gk.grpo_loss(lg, i, backend="torch", **opts, **kw)  # noqa: E731
    same = None if dtype == F64 else (lambda: run(unsharded, dtype))
    _check_small_grads(got, logps, opts, small, same, lambda: run(unsharded, F64), f"vocab_parallel {name} {opts}")


def test_the_single_pass_stays_one_pass_with_input_gradients(fused_backend, monkeypatch):
    """Gradients of the O(N) inputs come from the loss math on the log-probs, not from a second pass over
    the logits: the single pass launches the fused kernel once and no log-prob kernel."""
    from grpo_kernels import _ops

    name, device = fused_backend
    calls = []
    for op in ("fused", "logprobs_fwd", "logprobs_bwd"):
        real = getattr(_ops, op)
        monkeypatch.setattr(_ops, op, lambda *a, _real=real, _op=op: calls.append(_op) or _real(*a))
    x, ids = _logits_case()
    kw = _call_inputs(dict(beta=0.04), small_inputs("adv_b"), torch.float32, device, True)
    out = gk.grpo_loss(x.float().to(device).requires_grad_(), ids.to(device), beta=0.04, backend=name, **kw)
    out.loss.backward()
    assert calls == ["fused"]
    assert kw["advantages"].grad is not None and kw["old_logps"].grad is not None


@pytest.mark.parametrize("return_entropy", [False, True])
def test_fused_linear_token_logprobs_gradients(backend, return_entropy):
    """fused_linear_token_logprobs with autograd on: hidden, weight and bias get the unfused reference's
    gradients (by the tolerance rule, ``same``: the unfused path in the inputs' dtype), not None."""
    name, device, dtype = backend
    g = torch.Generator().manual_seed(2)
    h0, w0, b0 = (torch.randn(*s, generator=g, dtype=F64) for s in ((B_, T_, H_), (V_, H_), (V_,)))
    ids = torch.randint(0, V_, (B_, T_), generator=g)
    w_logp, w_ent = torch.randn(B_, T_, generator=g, dtype=F64), torch.randn(B_, T_, generator=g, dtype=F64)

    def run(dt, fused_path, backend):
        h, w, b = (t.to(dt).clone().requires_grad_() for t in (h0, w0, b0))
        if fused_path:
            res = fused_linear_token_logprobs(h, w, ids, bias=b, return_entropy=return_entropy, chunk_size=5,
                                              backend=backend)
        else:
            res = gk.token_logprobs(F.linear(h, w, b), ids, return_entropy=return_entropy, backend=backend)
        lp, ent = res if return_entropy else (res, None)
        obj = (lp * w_logp.to(lp.dtype)).sum() + (0 if ent is None else (ent * w_ent.to(ent.dtype)).sum())
        obj.backward()
        return h.grad, w.grad, b.grad

    got = run(dtype, True, name)
    ref = run(F64, False, "torch")
    same = run(dtype, False, "torch")
    for what, k, r, s_ in zip(("hidden", "weight", "bias"), got, ref, same, strict=True):
        assert k is not None, what
        assert_rule(k, r, s_, f"fused_linear_token_logprobs {name} d/d{what}")


# --------------------------------------------------------------------------------------------------
# 3. empty batches
# --------------------------------------------------------------------------------------------------
EMPTY_CASES = [
    dict(),
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="luspo"),
    dict(loss_type="sapo"),
    dict(loss_type="cispo"),
    dict(loss_type="vespo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.5),
    dict(loss_type="dapo", entropy_coef=0.01),
    dict(loss_type="dapo", off_policy_mask_threshold=0.1),
    dict(loss_type="dapo", beta=0.04, delta=1.5),
]
SHAPES = {"B0": (0, 3), "T0": (3, 0), "all_dropped": (2, 3)}


def _empty_inputs(shape_name, opts, dtype, device):
    """(B, T, the keyword tensors of a loss call under ``opts``) of an empty batch."""
    B, T = SHAPES[shape_name]
    cfg = GRPOConfig(**opts)
    kw = dict(advantages=torch.randn(B, dtype=dtype), old_logps=torch.full((B, T), -2.0, dtype=dtype),
              importance_sampling_ratio=torch.ones(B, T, dtype=dtype))
    if cfg.beta != 0.0:
        kw["ref_logps"] = torch.full((B, T), -2.5, dtype=dtype)
    if cfg.off_policy_mask_threshold is not None:
        kw["sampling_logps"] = torch.full((B, T), -1.0, dtype=dtype)
    if shape_name == "all_dropped":
        kw["completion_mask"] = torch.zeros(B, T, dtype=torch.bool)
    return B, T, {k: v.to(device) for k, v in kw.items()}


def _assert_empty_result(out, grads, ref_metrics, what):
    assert torch.equal(out.loss.detach().cpu(), torch.zeros((), dtype=out.loss.dtype)), f"{what}: loss {out.loss}"
    assert not out.logps.any(), what
    for gr, like in grads:
        assert gr is None or (gr.shape == like.shape and not gr.any()), what
    assert set(out.metrics) == set(ref_metrics), what
    for k, v in out.metrics.items():
        r = ref_metrics[k].double()
        both_nan = bool(torch.isnan(r)) and bool(torch.isnan(v))
        assert v.dtype == torch.float32 and (both_nan or v.double() == r), (what, k, v, r)


def _ref_metrics(opts, shape_name):
    B, T, kw = _empty_inputs(shape_name, opts, F64, "cpu")
    out = gk.grpo_loss(torch.randn(B, T, 5, dtype=F64), torch.zeros(B, T, dtype=torch.long), backend="torch",
                       **opts, **kw)
    return out.metrics


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_empty_batches_grpo_loss(backend, shape_name):
    """Every loss option, every logits entry point (in place too on the fused backends): loss 0, a zero
    gradient, the reference's metrics."""
    name, device, dtype = backend
    # every option through grpo_loss; every entry point with the two paths (single pass, two passes)
    runs = [(opts, "grpo_loss", inplace) for opts in EMPTY_CASES for inplace in (False, True)]
    runs += [(opts, entry, inplace) for opts in (EMPTY_CASES[0], EMPTY_CASES[8]) for entry in ENTRIES[1:]
             for inplace in (False, True)]
    for opts, entry, inplace in runs:
        if inplace and name == "torch":
            continue
        B, T, kw = _empty_inputs(shape_name, opts, dtype, device)
        leaf = torch.randn(B, T, 5, dtype=dtype, device=device, requires_grad=True)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        out = _entry_points()[entry](leaf * 1.0 if inplace else leaf, ids, inplace, name, opts, **kw)
        out.loss.backward()
        _assert_empty_result(out, [(leaf.grad, leaf)], _ref_metrics(opts, shape_name),
                             f"{name} {entry} inplace={inplace} {opts} {shape_name}")


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_empty_batches_fused_linear_and_vocab_parallel(backend, shape_name, group):
    name, device, dtype = backend
    for opts in EMPTY_CASES:
        B, T, kw = _empty_inputs(shape_name, opts, dtype, device)
        h = torch.randn(B, T, 4, dtype=dtype, device=device, requires_grad=True)
        W = torch.randn(5, 4, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(5, dtype=dtype, device=device, requires_grad=True)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        ref = _ref_metrics(opts, shape_name)
        fns = [lambda: fused_linear_grpo_loss(h, W, ids, lm_head_bias=b, backend=name, **opts, **kw)]
        if opts in (EMPTY_CASES[0], EMPTY_CASES[8]):  # the module with the two paths
            fns.append(lambda: FusedLinearGRPOLoss(weight=W, bias=b, backend=name, chunk_size=2, **opts)(h, ids, **kw))
        for fn in fns:
            out = fn()
            out.loss.backward()
            _assert_empty_result(out, [(h.grad, h), (W.grad, W), (b.grad, b)], ref,
                                 f"fused_linear {name} {opts} {shape_name}")
            h.grad = W.grad = b.grad = None
        shard = torch.randn(B, T, 5, dtype=dtype, device=device, requires_grad=True)
        out = vp.grpo_loss(shard, ids, backend=name, **opts, **kw)
        out.loss.backward()
        _assert_empty_result(out, [(shard.grad, shard)], ref, f"vocab_parallel {name} {opts} {shape_name}")


@pytest.mark.parametrize("lead", [(0,), (0, 3), (3, 0), (2, 0, 4), (0, 0)])
def test_empty_token_logprobs(backend, lead, group):
    """token_logprobs, fused_linear_token_logprobs and vocab_parallel.token_logprobs with N = 0 rows."""
    name, device, dtype = backend
    V = 6
    x = torch.randn(*lead, V, dtype=dtype, device=device, requires_grad=True)
    ids = torch.zeros(lead, dtype=torch.long, device=device)
    for fn in (lambda: gk.token_logprobs(x, ids, return_entropy=True, backend=name),
               lambda: vp.token_logprobs(x, ids, return_entropy=True, backend=name)):
        logp, ent = fn()
        assert logp.shape == lead and ent.shape == lead
        (logp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape
        x.grad = None
    if len(lead) == 2:
        h = torch.randn(*lead, 3, dtype=dtype, device=device)
        logp, ent = fused_linear_token_logprobs(h, torch.randn(V, 3, dtype=dtype, device=device), ids,
                                                return_entropy=True, backend=name)
        assert logp.shape == lead and ent.shape == lead


def test_empty_top_entropy_mask_is_trls():
    """The top-entropy mask of no token (B = 0, T = 0, every token dropped) is TRL's get_high_entropy_mask's:
    all False, where it used to raise IndexError."""
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    from bench._trl import OneProcessAccelerator

    trainer = object.__new__(trl.GRPOTrainer)
    trainer.accelerator = OneProcessAccelerator()
    for B, T, keep in ((0, 3, True), (3, 0, True), (2, 3, False)):
        ent = torch.rand(B, T, dtype=F64)
        mask = torch.full((B, T), keep)
        logp = torch.full((B, T), -1.0, dtype=F64)
        for q in (0.2, 0.5, 0.9):
            want = trl.GRPOTrainer.get_high_entropy_mask(trainer, ent, mask, 1 - q)
            terms = logp_loss.token_terms(logp, GRPOConfig(top_entropy_quantile=q), torch.zeros(B, dtype=F64), None,
                                          None, mask, entropy=ent)
            assert torch.equal(terms.entropy_mask, want), (B, T, keep, q)


@pytest.mark.parametrize("shape_name", ["T0", "all_dropped"])
@pytest.mark.parametrize("opts", [dict(loss_type="grpo"), dict(loss_type="dapo", top_entropy_quantile=0.5),
                                  dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04)])
def test_empty_batches_match_trl(shape_name, opts):
    """TRL's own _compute_loss on a batch with no kept token: loss 0, zero gradient, the same metrics."""
    pytest.importorskip("trl.trainer.grpo_trainer")
    from test_trl_parity import run_trl, trl_trainer

    B, T = SHAPES[shape_name]
    cfg = GRPOConfig(**opts)
    g = torch.Generator().manual_seed(0)
    x = dict(logits=torch.randn(B, T, 5, generator=g, dtype=F64), ids=torch.zeros(B, T, dtype=torch.long),
             mask=torch.zeros(B, T, dtype=torch.long), adv=torch.randn(B, generator=g, dtype=F64))
    old = torch.full((B, T), -2.0, dtype=F64)
    ref = torch.full((B, T), -2.5, dtype=F64) if cfg.beta else None
    trainer = trl_trainer(cfg.loss_type, cfg.importance_sampling_level, cfg.beta, True, None, 0.2, 0.2, max(T, 1),
                          top_entropy_quantile=cfg.top_entropy_quantile)
    t_loss, t_grad, t_metrics = run_trl(x, trainer, 1.0, old, ref, 1)
    logits = x["logits"].clone().requires_grad_()
    out = gk.grpo_loss(logits, x["ids"], completion_mask=x["mask"], advantages=x["adv"], old_logps=old,
                       ref_logps=ref, max_completion_length=max(T, 1), backend="torch", **opts)
    out.loss.backward()
    assert out.loss.item() == t_loss.item() == 0.0
    assert torch.equal(logits.grad, t_grad) and not t_grad.any()
    for k, v in out.metrics.items():
        if k.startswith("top_entropy/"):  # the entropy controller's inputs: the loss returns them, TRL logs none
            continue
        assert v.item() == pytest.approx(t_metrics[k], nan_ok=True), k


# --------------------------------------------------------------------------------------------------
# 4. num_items_in_batch on the meta device
# --------------------------------------------------------------------------------------------------
def test_meta_num_items_in_batch_raises_value_error(backend, group):
    name, device, dtype = backend
    B, T, V = 2, 3, 5
    meta = torch.tensor(4.0, device="meta")
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    kw = dict(advantages=torch.randn(B, dtype=dtype, device=device), num_items_in_batch=meta, loss_type="dapo",
              backend=name)
    calls = [
        lambda: gk.grpo_loss(torch.randn(B, T, V, dtype=dtype, device=device), ids, **kw),
        lambda: fused_linear_grpo_loss(torch.randn(B, T, 4, dtype=dtype, device=device),
                                       torch.randn(V, 4, dtype=dtype, device=device), ids, **kw),
        lambda: vp.grpo_loss(torch.randn(B, T, V, dtype=dtype, device=device), ids, **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="num_items_in_batch is a tensor on the meta device"):
            call()


def test_inplace_checks_trace_under_compile():
    """The aliasing checks read only shapes and strides under torch.compile: a fullgraph training step with
    inplace=True traces and computes what the eager step does."""
    torch._dynamo.reset()
    B, T, V, H = 4, 3, 16, 8
    head = torch.nn.Linear(H, V)
    h, ids, old = torch.randn(B, T, H), torch.randint(0, V, (B, T)), torch.randn(B, T) - 3.0
    name = "cpu" if "cpu" in gk.available_backends("cpu") else pytest.skip("the C++ CPU backend is not built")

    def step(h):
        return gk.grpo_loss(head(h), ids, advantages=torch.ones(B), old_logps=old, inplace=True, backend=name).loss

    eager = step(h)
    g_eager = torch.autograd.grad(eager, head.weight)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h)
    g_compiled = torch.autograd.grad(compiled, head.weight)[0]
    assert torch.equal(compiled, eager) and torch.equal(g_compiled, g_eager)
