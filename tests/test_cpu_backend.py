"""The C++ CPU backend (``backend="cpu"``, grpo_kernels._C) against the float64 eager reference.

Tolerance rule (the FlashAttention rule, per element set): with ``ref64`` the reference on the same
(dtype-rounded) inputs in float64 and ``same`` the eager reference run on the inputs in their own dtype
(fp32 arithmetic, outputs in the inputs' dtype),

    max |kernel - ref64|  <=  2 * max |same - ref64|  +  8 * eps_fp32 * max(1, max |ref64|).

The first term carries what the dtype itself costs (a bf16 / fp16 gradient is rounded to its dtype, so
the kernel may be off by the same half-ulp as torch); the second is the slack of fp32 arithmetic (the
kernels sum in a different order and use their own exp, <= 2 ulp) at the scale of the values.

Every numerical test runs on both row-kernel instruction sets of the module (AVX2 and baseline), where
the CPU has AVX2.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import _C, reference
from grpo_kernels._ops import ops_for
from grpo_kernels.backends.base import TokenLossParams
from grpo_kernels.backends.cpu_backend import LAUNCHERS
from grpo_kernels.config import GRPOConfig

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["baseline"] + (["avx2"] if _C.set_isa("avx2") else [])
_DEFAULT_ISA = _C.isa()


@pytest.fixture(params=ISAS)
def isa(request):
    assert _C.set_isa(request.param)
    yield request.param
    _C.set_isa(_DEFAULT_ISA)


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
    """[B, T, V] logits; ``strided`` gives a view with row stride V + 5, a sliced batch and an offset."""
    if strided:
        x = (torch.randn(2 * B, T + 3, V + 5) * scale).to(dtype)[::2, 1:-2, 2:-3]  # row stride V + 5
        assert not x.is_contiguous()
        return x
    return (torch.randn(B, T, V) * scale).to(dtype)


# --------------------------------------------------------------------------------------------------
# log-probs, entropy and their gradients (two-pass path: forward kernel, backward kernel)
# --------------------------------------------------------------------------------------------------
CASES = [(2, 3, 1), (2, 3, 7), (2, 5, 1007), (1, 4, 4096), (1, 2, 32007)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,V", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("strided", [False, True])
def test_token_logprobs_values_and_grads(isa, dtype, B, T, V, tau, strided):
    x = make_logits(B, T, V, dtype, strided)
    if V > 7:
        x[0, 0, :3] = float("-inf")  # banned tokens
    ids = torch.randint(0, V, (B, T))
    w_logp, w_ent = torch.randn(B, T), torch.randn(B, T)

    def run(inp, backend):
        inp = inp.detach().requires_grad_()
        logp, ent = gk.token_logprobs(inp, ids, temperature=tau, return_entropy=True, backend=backend)
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
        return logp.detach(), ent.detach(), inp.grad

    k_logp, k_ent, k_grad = run(x, "cpu")
    r_logp, r_ent, r_grad = run(x.double(), "torch")
    s_logp, s_ent, s_grad = run(x, "torch")
    assert k_grad.dtype == x.dtype and k_grad.shape == x.shape
    assert_rule(k_logp, r_logp, s_logp, "logp")
    assert_rule(k_ent, r_ent, s_ent, "entropy")
    assert_rule(k_grad, r_grad, s_grad, "dL/dlogits")

    # without the entropy: the other forward/backward instantiation
    xi = x.detach().requires_grad_()
    logp = gk.token_logprobs(xi, ids, temperature=tau, backend="cpu")
    (logp * w_logp).sum().backward()
    xr = x.double().requires_grad_()
    (reference.token_logprobs(xr, ids, tau) * w_logp).sum().backward()
    xs = x.detach().requires_grad_()
    (reference.token_logprobs(xs, ids, tau) * w_logp).sum().backward()
    assert_rule(logp.detach(), r_logp, s_logp, "logp (no entropy)")
    assert_rule(xi.grad, xr.grad, xs.grad, "dL/dlogits (no entropy)")


def test_large_magnitude_entropy(isa):
    """|z| ~ 1e4: the entropy through (s, t) has no cancellation (lse - sum p z would lose ~1e-3)."""
    x = torch.randn(3, 4, 1007) * 2 + 1e4
    ids = torch.randint(0, 1007, (3, 4))
    logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend="cpu")
    r_logp, r_ent = reference.token_logprobs(x.double(), ids, return_entropy=True)
    assert (ent.double() - r_ent).abs().max() < 2e-5
    assert (logp.double() - r_logp).abs().max() < 1e-2  # logp = z - lse with |z| ~ 1e4: fp32 ulp 1e-3


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
KL = [(0.0, True), (0.04, True), (0.04, False)]  # (beta, use_bias_correction_kl)


def loss_inputs(B, T, V, dtype, strided=False):
    x = make_logits(B, T, V, dtype, strided)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # a fully masked row ...
    mask[0, 0] = True
    with torch.no_grad():  # ... whose logits are garbage
        x[1] = float("nan")
    ids[1] = V + 5  # and whose ids are out of range (allowed where masked)
    lp = reference.token_logprobs(x.double(), torch.where(mask, ids, 0), mask=mask).float()
    # ratios exp(logp - old) spread over [~0.6, ~1.6]: both clip bounds and the delta are crossed
    old = lp + 0.25 * torch.randn(B, T)
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


# delta is a parameter of the clip family only
LOSS_DELTA = [(lt, None) for lt in LOSS_TYPES] + [(lt, 1.3) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]


@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(isa, loss_type, level, beta, bias, delta):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    args = loss_inputs(4, 9, 301, torch.float32)
    k = run_loss(*args, cfg, "cpu")
    r = run_loss(args[0].double(), *args[1:], cfg, "torch")
    s = run_loss(*args, cfg, "torch")
    for name, kv, rv, sv in zip(("loss", "logps", "grad"), k, r, s):
        assert_rule(kv, rv, sv, name)
    assert torch.all(k[2][1] == 0), "a fully masked row must get an exact zero gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(isa, dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04, delta=1.5 if loss_type == "grpo" else None)
    args = loss_inputs(4, 6, 1007, dtype, strided)
    k = run_loss(*args, cfg, "cpu")
    r = run_loss(args[0].double(), *args[1:], cfg, "torch")
    s = run_loss(*args, cfg, "torch")
    for name, kv, rv, sv in zip(("loss", "logps", "grad"), k, r, s):
        assert_rule(kv, rv, sv, f"{name} {dtype}")
    assert k[2].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_matches_out_of_place(isa, dtype, level):
    """inplace=True writes the gradient into the logits' storage: same values as the out-of-place path."""
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    args = loss_inputs(3, 5, 1007, dtype)
    k = run_loss(*args, cfg, "cpu")
    leaf = args[0].detach().clone().requires_grad_()
    inp = leaf * 1
    storage = inp.data_ptr()
    out = gk.grpo_loss_with_config(inp, args[1], cfg, completion_mask=args[2], advantages=args[5],
                                   old_logps=args[3], ref_logps=args[4], inplace=True, backend="cpu")
    out.loss.backward()
    assert torch.equal(out.loss.detach(), k[0]) and torch.equal(out.logps, k[1])
    assert torch.equal(leaf.grad, k[2])
    assert torch.equal(inp.detach(), k[2]), "the gradient must be written into the logits' storage"
    assert inp.data_ptr() == storage


def test_on_policy_and_grad_in_forward_path(isa):
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, against the reference."""
    cfg = GRPOConfig(loss_type="dapo", beta=0.04)
    args = loss_inputs(4, 7, 513, torch.float32)
    k = run_loss(*args, cfg, "cpu", on_policy=True)
    r = run_loss(args[0].double(), *args[1:], cfg, "torch", on_policy=True)
    s = run_loss(*args, cfg, "torch", on_policy=True)
    for name, kv, rv, sv in zip(("loss", "logps", "grad"), k, r, s):
        assert_rule(kv, rv, sv, name)


def test_fused_launcher_matches_token_loss_grad(isa):
    """The single-pass launcher's per-row weight is coef * token_loss_grad (checked at the launcher level,
    including ties of torch.min: on-policy ratio 1 = 1 +- 0 sits exactly on both clip bounds)."""
    B, T, V = 3, 5, 211
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
            logp, ent = LAUNCHERS.fused_fwd_bwd(x, ids, 1.0, old, ref, adv, coef, TokenLossParams.from_config(cfg), out)
            g = coef.double() * reference.token_loss_grad(lp64, cfg, adv.double(), None if old is None else old.double(),
                                                          ref.double())
            xr = x.double().requires_grad_()
            (reference.token_logprobs(xr, ids.view(B, T)).view(-1) * g).sum().backward()
            err = (out.double() - xr.grad).abs().max().item()
            assert err <= 16 * EPS32 * max(1.0, g.abs().max().item()), f"{loss_type} old={old_given}: {err}"
            assert torch.all(out.view(-1, V)[3] == 0)


# --------------------------------------------------------------------------------------------------
# launcher-level edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_rows_are_zero_without_reading_and_bad_id_is_nan(isa, dtype):
    B, T, V = 2, 3, 1007
    x = torch.randn(B, T, V).to(dtype)
    x[0, 1] = float("nan")  # garbage row, g = 0 there
    ids = torch.randint(0, V, (B * T,))
    ids[4] = V + 100  # unmasked out-of-range id: logp NaN, no out-of-bounds read
    ids[5] = -3
    logp, lse, ent = LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)
    assert torch.isnan(logp[4]) and torch.isnan(logp[5]) and torch.isfinite(lse[4]) and torch.isfinite(ent[5])
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
    g, ge = torch.randn(B * T), torch.randn(B * T)
    g[1] = ge[1] = 0.0
    out = torch.full_like(x, 7.0)
    LAUNCHERS.logprobs_bwd(x, ids, lse, ent, g, ge, 1.0, out)
    assert torch.all(out[0, 1] == 0) and not torch.signbit(out[0, 1].float()).any(), "masked row: +0 exactly"
    assert torch.isfinite(out).all()


def test_all_banned_but_one_and_v1(isa):
    """A row with every logit -inf but the target: logp = 0, entropy = 0, gradient finite (zero)."""
    x = torch.full((1, 2, 9), float("-inf"))
    x[0, 0, 4] = 2.0
    x[0, 1, 0] = -1.0
    ids = torch.tensor([4, 0])
    xi = x.clone().requires_grad_()
    logp, ent = gk.token_logprobs(xi, ids.view(1, 2), return_entropy=True, backend="cpu")
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logp, torch.zeros(1, 2)) and torch.equal(ent, torch.zeros(1, 2))
    assert torch.equal(xi.grad, torch.zeros_like(x))


def test_isas_agree_on_fp32_forward():
    """Both instruction sets compute the same function (same polynomial; FMA contraction may differ by ulps)."""
    if len(ISAS) < 2:
        pytest.skip("this CPU has no AVX2: only the baseline kernels exist")
    x = torch.randn(4, 16, 4099) * 4
    ids = torch.randint(0, 4099, (64,))
    res = {}
    for name in ISAS:
        _C.set_isa(name)
        res[name] = LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)
    _C.set_isa(_DEFAULT_ISA)
    for a, b in zip(res["baseline"], res["avx2"]):
        assert (a - b).abs().max().item() <= 8 * EPS32 * max(1.0, a.abs().max().item())


def test_thread_count_does_not_change_results():
    x = torch.randn(5, 7, 1001)
    ids = torch.randint(0, 1001, (35,))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)
    finally:
        torch.set_num_threads(n)
    many = LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # rows are independent: the partition of rows cannot change a row's result


# --------------------------------------------------------------------------------------------------
# custom ops, saved memory, module properties
# --------------------------------------------------------------------------------------------------
def test_opcheck_cpu_ops():
    ops = ops_for("cpu")
    B, T, V = 2, 3, 37
    x = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B * T,))
    torch.library.opcheck(ops["fwd"], (x, ids, 0.8, True, False))
    torch.library.opcheck(ops["fwd"], (x, ids, 1.0, False, False))
    params = [float(v) for v in (0, 0.2, 0.28, 1, 1.5, 0.04, 1, 1.0, 1.05)]
    vec = lambda: torch.randn(B * T)  # noqa: E731
    torch.library.opcheck(ops["fused"], (x.detach(), ids, 1.0, vec(), vec(), vec(), torch.rand(B * T), params,
                                         torch.empty(B, T, V)))
    on_policy = [float(v) for v in (2, 0.2, 0.28, 0, 0.0, 0.0, 1, 1.0, 1.05)]  # sapo, no KL: old, ref = None
    torch.library.opcheck(ops["fused_inplace"], (x.detach().clone(), ids, 1.0, None, None, vec(), torch.rand(B * T),
                                                 on_policy))


def test_saved_for_backward_bytes_per_token():
    """The log-prob op keeps per token only lse (4 B), entropy (4 B) and the id (8 B) for its backward; the
    logits are saved by reference (no copy), so they are not counted. (The loss math on [B, T] that runs in
    torch on top of it saves its own O(N) tensors, e.g. the bool mask; those are not the kernel's.)"""
    B, T, V = 2, 8, 1000
    x = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend="cpu")
    x_storage = x.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == x_storage for t in saved), "the logits are saved by reference"
    extra = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() != x_storage)
    assert 0 < extra / (B * T) <= 16, f"{extra / (B * T)} bytes per token saved"


def test_header_conversions_exhaustive_against_torch():
    """grpo_math.h's bf16/fp16 <-> fp32 conversions: all 65536 patterns to fp32, and fp32 -> 16 bit on every
    16-bit value, every midpoint between neighbours (the ties), and 2^20 random fp32 bit patterns."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for code, dt in ((1, torch.bfloat16), (2, torch.float16)):
        mine = torch.empty(65536, dtype=torch.float32)
        _C.convert(bits.data_ptr(), mine.data_ptr(), 65536, code, True)
        ref = bits.view(dt).float()
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(mine), nan)
        assert torch.equal(mine[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # -0.0 included

        vals = ref[~nan & torch.isfinite(ref)].double().sort().values.unique()
        mids = ((vals[1:] + vals[:-1]) / 2).float()  # exact ties in fp32 (a 16-bit format has <= 11 bits)
        rnd = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int64).to(torch.int32).view(torch.float32)
        f = torch.cat([ref, mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)),
                       rnd, torch.tensor([math.inf, -math.inf, math.nan, 1e30, -1e30, 65520.0, 65519.99])])
        out = torch.empty(f.numel(), dtype=torch.int16)
        _C.convert(f.data_ptr(), out.data_ptr(), f.numel(), code, False)
        expect = f.to(dt)
        fnan = torch.isnan(f)
        assert torch.isnan(out.view(dt)[fnan].float()).all(), "NaN must stay NaN"
        bad = (out != expect.view(torch.int16)) & ~fnan
        assert not bad.any(), f"{dt}: {int(bad.sum())} mismatches, e.g. {f[bad][:4].tolist()}"


def test_module_links_no_libtorch():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available on this system")
    libs = subprocess.run([ldd, _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in libs and "libc10" not in libs, libs


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 11)
    ids = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids"):
        LAUNCHERS.logprobs_fwd(x, ids[:5], 1.0, False)
    with pytest.raises(TypeError, match="logits"):
        LAUNCHERS.logprobs_fwd(x.double(), ids, 1.0, False)
    with pytest.raises(ValueError, match="tau"):
        LAUNCHERS.logprobs_fwd(x, ids, 0.0, False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gk.token_logprobs(x, torch.full((2, 3), 11), backend="cpu")


def test_standalone_header_test(tmp_path):
    """csrc/tests/test_grpo_math.cpp (grpo_math.h alone under plain g++: fp16 conversions against _Float16
    on all 65536 patterns, bf16 rounding against a double-precision oracle, online lse push/merge)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not available")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "test_grpo_math"
    subprocess.run([gxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{root / 'csrc/include'}",
                    str(root / "csrc/tests/test_grpo_math.cpp"), "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
