"""The CUDA kernels (csrc/cuda) EXECUTED on the CPU, through the emulation of the CUDA execution model.

``csrc/emu/emu_module.cpp`` compiles the same ``.cu`` / ``.cuh`` sources and the same binding code as
``grpo_kernels._cuda``, with g++ against ``csrc/emu/cuda_emu.h`` (a block's threads as std::threads, a
barrier per ``__syncthreads``, per-block shared memory, 32-lane shuffles; what it cannot emulate is listed
at the top of that header). The module is built once per session into ``build/cuda_emu/<hash>/``, and
registered as a test backend ``cuda_emuNNN`` (NNN = threads per block, 0 = the kernels' default;
``kernel_checks.emu_backend``), so
the public API runs the CUDA kernels end to end: custom ops, autograd, single-pass and two-pass paths.

Tolerance rule (the FlashAttention rule, as in tests/test_cpu_backend.py): with ``ref64`` the float64
reference on the same (dtype-rounded) inputs and ``same`` the eager reference in the inputs' own dtype,

    max |kernel - ref64|  <=  2 * max |same - ref64|  +  8 * eps_fp32 * max(1, max |ref64|).

The first term is what the dtype itself costs (a bf16 / fp16 gradient is rounded to its dtype once, as
torch's is); the second is fp32 arithmetic slack at the scale of the values: the kernels sum in another
order, and compute p = e^d as exp2f(d log2 e), whose argument rounding adds |d| 2^-24 relative error on
p, <= 2^-24 / e absolute for |d| e^d <= 1/e.

Most tests use 64 threads per block (2 warps: a single warp would hide block-level races) to keep the
emulation fast; ``test_real_block_sizes`` runs the launch configuration of the GPU (128 / 256 / 512 threads).
A ThreadSanitizer build of the kernels runs in ``test_thread_sanitizer_clean``.

Two fused (token-level, single-launch) kernels exist: the 3-pass ``fused_kernel`` and, on sm_90+, the 2-pass
``fused_cluster_kernel`` (a row held in the shared memory of a cluster of 2 / 4 / 8 blocks). The emulated
device is sm_90, so the backends here run the cluster kernel unless told otherwise; every test of the fused
path is parametrized over ``VARIANTS``: "3pass" (cluster=1), "cluster" (the choice of ``fused_cluster_size``,
2 blocks per row at these V) and "cluster8" (8 blocks per row, most of them with a few vectors or none).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from cuda_emu_build import COMMON_FLAGS, CXX, ROOT, cache_dir, compile_to
from kernel_checks import (
    DTYPES,
    KL,
    LOSS_DELTA,
    assert_rule,
    check_all_banned_but_one,
    check_boundary_binding,
    check_fused_launcher,
    check_inplace,
    check_large_magnitude_entropy,
    check_logprobs,
    check_loss,
    check_masked_rows_and_bad_ids,
    emu_backend,
    loss_inputs,
    make_logits,
)

from grpo_kernels import logp_loss, reference
from grpo_kernels.backends.base import LossParams, native
from grpo_kernels.backends.cuda_backend import _DTYPE_CODE, CudaLaunchers
from grpo_kernels.config import GRPOConfig

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is needed to build the CUDA emulation module")


# fused kernel variants: the ``cluster`` argument of CudaLaunchers
VARIANTS = {"3pass": 1, "cluster": 0, "cluster8": 8}


@pytest.fixture(scope="session")
def b64(emu):
    return emu_backend(emu, 64)


@pytest.fixture(scope="session", params=list(VARIANTS))
def fused64(emu, request):
    """The 64-thread backend with each fused kernel variant (token-level losses run it)."""
    return emu_backend(emu, 64, VARIANTS[request.param])


def expect_variant(emu, variant: str, V: int, dtype) -> None:
    """The last launch was the asked fused kernel (a cluster of the chosen size, or none)."""
    want = VARIANTS[variant] or emu.fused_cluster_size(V, _DTYPE_CODE[dtype], emu.device_cc()[0])
    assert emu.last_launch()["cluster"] == want, (variant, emu.last_launch())


# --------------------------------------------------------------------------------------------------
# log-probs, entropy and their gradients (forward kernel, backward kernel)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,V", [(2, 2, 1), (2, 3, 7), (1, 3, 1007), (1, 2, 4099)])
@pytest.mark.parametrize("strided", [False, True])
def test_logprobs_values_and_grads(b64, dtype, B, T, V, strided):
    x = make_logits(B, T, V, dtype, strided)
    if V > 7:
        x[0, 0, :3] = float("-inf")  # banned tokens
    ids = torch.randint(0, V, (B, T))
    check_logprobs(x, ids, 0.7 if V != 7 else 1.0, b64)
    check_logprobs(x, ids, 0.7, b64, entropy=False)  # the other forward / backward instantiation


@pytest.mark.parametrize("block", [32, 96, 512])
def test_warp_counts(emu, block):
    """One warp, an odd number of warps (3: the second-level reduction has idle lanes) and 16 warps."""
    x = make_logits(2, 2, 1007, torch.float32, strided=True)
    check_logprobs(x, torch.randint(0, 1007, (2, 2)), 0.9, emu_backend(emu, block))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [4099, 20011])
def test_real_block_sizes(emu, dtype, V):
    """block=0: the configuration the GPU launch uses (256 threads for V = 4099, 512 for V = 20011)."""
    assert emu.default_block(V) == (256 if V == 4099 else 512)
    x = make_logits(1, 2, V, dtype, strided=True)
    check_logprobs(x, torch.randint(0, V, (1, 2)), 1.0, emu_backend(emu, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_row_alignment(emu, dtype):
    """Row starts at every element offset mod 16 bytes (head of 0..7 scalar elements), an output with a
    different alignment (per-element stores) and the same alignment (inplace: 16-byte stores)."""
    V, rows = 203, 8
    base = (torch.randn(rows * (V + 1) + 8) * 2).to(dtype)
    x = base[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]  # row stride V + 1: offsets cycle mod 8
    ids = torch.randint(0, V, (1, rows))
    kernels = CudaLaunchers(emu, "cpu", block=64)
    logp, stats, ent = kernels.logprobs_fwd(x, ids.view(-1), 1.0, True)
    r_logp, r_ent = reference.token_logprobs(x.double(), ids, return_entropy=True)
    s_logp, s_ent = reference.token_logprobs(x, ids, return_entropy=True)
    assert_rule(logp, r_logp.view(-1), s_logp.view(-1), "logp")
    assert_rule(ent, r_ent.view(-1), s_ent.view(-1), "entropy")
    g = torch.randn(rows)
    xr = x.double().requires_grad_()
    (reference.token_logprobs(xr, ids).view(-1) * g).sum().backward()
    xs = x.detach().clone().requires_grad_()
    (reference.token_logprobs(xs, ids).view(-1) * g).sum().backward()
    out = torch.empty(x.shape, dtype=dtype)  # contiguous: alignment differs from x's rows
    kernels.logprobs_bwd(x, ids.view(-1), stats, None, g, None, 1.0, out)
    assert_rule(out, xr.grad, xs.grad, "gradient, other alignment")
    xi = base.clone()[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]
    kernels.logprobs_bwd(xi, ids.view(-1), stats, None, g, None, 1.0, xi)  # inplace: same alignment, 16-byte stores
    assert torch.equal(xi, out), "inplace (16-byte stores) and per-element stores must agree exactly"


def test_large_magnitude_entropy(b64):
    check_large_magnitude_entropy(b64)


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
# token level: the single-pass (fused) kernel, each variant; sequence level: forward + backward kernels
LEVEL_VARIANT = [*(("token", v) for v in VARIANTS), ("sequence", "3pass")]


@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level,variant", LEVEL_VARIANT)
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(emu, loss_type, level, variant, beta, bias, delta):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    b = loss_inputs(3, 4, 301, torch.float32)
    check_loss(b.x, b.ids, cfg, emu_backend(emu, 64, VARIANTS[variant]), b.inputs(cfg))
    if level == "token":
        expect_variant(emu, variant, 301, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(emu, fused64, dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     delta=1.5 if loss_type == "grpo" else None)
    b = loss_inputs(3, 4, 1007, dtype, strided)
    assert check_loss(b.x, b.ids, cfg, fused64, b.inputs(cfg)).grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level,variant", LEVEL_VARIANT)
def test_inplace_matches_out_of_place(emu, dtype, level, variant):
    """inplace=True writes the gradient into the logits' storage: the same values as out of place. Contiguous
    inputs: bit-equality needs the same row alignments (the split of a row into scalar head / vectors / tail,
    hence the order of the fp32 sums, follows the alignment), and ``leaf * 1`` is contiguous."""
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    check_inplace(loss_inputs(3, 4, 1007, dtype), cfg, emu_backend(emu, 64, VARIANTS[variant]))


def test_on_policy_and_entropy_temperature(fused64):
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, temperature != 1."""
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.7)
    b = loss_inputs(3, 4, 513, torch.float32)
    check_loss(b.x, b.ids, cfg, fused64, b.inputs(cfg, on_policy=True))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_launcher_matches_token_loss_grad(emu, variant):
    check_fused_launcher(CudaLaunchers(emu, "cpu", block=64, cluster=VARIANTS[variant]))
    expect_variant(emu, variant, 211, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_extremes(fused64, dtype):
    """Through the single pass: a row with every logit -inf but the target (logp = 0, entropy = 0: its
    gradient is the loss weight times 0), a V = 1 batch, and logits ~1e4 at temperature 0.5."""
    cfg = GRPOConfig(loss_type="grpo", beta=0.04, temperature=0.5)
    b = loss_inputs(3, 4, 203, dtype)
    x, ids = b.x, b.ids
    with torch.no_grad():
        x[0, 1] = float("-inf")
        x[0, 1, ids[0, 1]] = 3.0
        x[2] = x[2] * 2 + 1e4
    k = check_loss(b.x, b.ids, cfg, fused64, b.inputs(cfg))
    assert torch.isfinite(k.grad[0, 1]).all() and torch.equal(k.grad[0, 1].abs(), torch.zeros_like(k.grad[0, 1]).abs())
    v1 = loss_inputs(3, 4, 1, dtype)
    ids1 = torch.zeros_like(v1.ids)  # V = 1: id 0 everywhere (the masked row keeps its NaN logits)
    ids1[1] = 6
    v1 = v1._replace(ids=ids1)
    check_loss(v1.x, v1.ids, cfg, fused64, v1.inputs(cfg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_every_row_alignment(emu, dtype, variant):
    """The fused launcher on rows starting at every element offset mod 16 bytes (scalar head of 0..7), into an
    output of another alignment (per-element stores) and inplace (16-byte stores): the same values, and the
    reference's."""
    V, rows = 203, 8
    base = (torch.randn(rows * (V + 1) + 8) * 2).to(dtype)
    x = base[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]
    ids = torch.randint(0, V, (rows,))
    adv, coef = torch.randn(rows), torch.rand(rows) + 0.1
    params = LossParams.from_config(GRPOConfig(loss_type="dapo"))
    kernels = CudaLaunchers(emu, "cpu", block=64, cluster=VARIANTS[variant])
    out = torch.empty(x.shape, dtype=dtype)
    logp, ent = kernels.fused_fwd_bwd(x, ids, 1.0, None, None, adv, coef, params, out)
    expect_variant(emu, variant, V, dtype)
    r_logp, r_ent = reference.token_logprobs(x.double(), ids.view(1, rows), return_entropy=True)
    s_logp, s_ent = reference.token_logprobs(x, ids.view(1, rows), return_entropy=True)
    assert_rule(logp, r_logp.view(-1), s_logp.view(-1), "logp")
    assert_rule(ent, r_ent.view(-1), s_ent.view(-1), "entropy")
    cfg = GRPOConfig(loss_type="dapo")
    g = coef.double() * logp_loss.token_loss_grad(r_logp.view(-1), cfg, adv.double(), None, None)
    xr = x.double().requires_grad_()
    (reference.token_logprobs(xr, ids.view(1, rows)).view(-1) * g).sum().backward()
    xs = x.detach().clone().requires_grad_()
    (reference.token_logprobs(xs, ids.view(1, rows)).view(-1) * g.to(xs.dtype)).sum().backward()
    assert_rule(out, xr.grad, xs.grad, "gradient, other alignment")
    xi = base.clone()[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]
    kernels.fused_fwd_bwd(xi, ids, 1.0, None, None, adv, coef, params, xi)  # inplace: same alignment, 16-byte stores
    assert torch.equal(xi, out), "inplace (16-byte stores) and per-element stores must agree exactly"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_masked_rows_bad_ids_and_guard(emu, dtype, variant):
    """The fused launcher: a row with coef = 0 is +0 exactly even with NaN logits; an out-of-range id gives
    logp NaN and no target term; guard elements around the output are untouched (no out-of-bounds store)."""
    B, T, V = 2, 3, 1007
    x = torch.randn(B, T, V).to(dtype)
    x[0, 1] = float("nan")
    ids = torch.randint(0, V, (B * T,))
    ids[4], ids[5] = V + 100, -3
    adv, coef = torch.randn(B * T), torch.rand(B * T) + 0.1
    coef[1] = 0.0
    guard = torch.full((B * T * V + 2 * 4096,), 7.0).to(dtype)
    out = guard[4096 : 4096 + B * T * V].view(B, T, V)
    out.fill_(5.0)
    kernels = CudaLaunchers(emu, "cpu", block=64, cluster=VARIANTS[variant])
    params = LossParams.from_config(GRPOConfig(loss_type="dapo"))
    logp, ent = kernels.fused_fwd_bwd(x, ids, 1.0, None, None, adv, coef, params, out)
    expect_variant(emu, variant, V, dtype)
    assert torch.isnan(logp[[1, 4, 5]]).all() and torch.isfinite(logp[[0, 2, 3]]).all()
    assert torch.isfinite(ent[[0, 2, 3, 4, 5]]).all()
    assert torch.all(out[0, 1] == 0) and not torch.signbit(out[0, 1].float()).any(), "masked row: +0 exactly"
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, [0, 2]]).all()
    assert torch.all(guard[:4096] == 7.0) and torch.all(guard[-4096:] == 7.0), "write outside the output"
    # a bad id has no target term: on policy (ratio 1, inside the clip range) dloss/dlogp = -adv whatever logp,
    # so the row is -g p with g = -coef adv and sums to coef adv (sum_v p_v = 1), not 0
    for n in (4, 5):
        want = (coef[n] * adv[n]).item()
        assert abs(out.view(-1, V)[n].double().sum().item() - want) < 1e-2 * max(1.0, abs(want))


def test_kernel_choice(emu):
    """fused_cluster_size, the one function choosing the fused kernel: the 2-pass cluster kernel on sm_90 /
    sm_100 with the smallest cluster whose share of the row fits the preferred shared memory (a 151,936 bf16
    row of 297 KiB: 4 blocks of 74 KiB; fp32: 8), 8 blocks up to the maximum, none beyond it, none on sm_80,
    none for a pointer that is not element-aligned."""
    bf16, f32 = _DTYPE_CODE[torch.bfloat16], _DTYPE_CODE[torch.float32]
    pref, mx = emu.CLUSTER_SMEM_PREFERRED, emu.CLUSTER_SMEM_MAX
    assert (pref, mx) == (96 * 1024, 200 * 1024)
    for cc in (9, 10, 12):
        assert emu.fused_cluster_size(151936, bf16, cc) == 4
        assert emu.fused_cluster_size(151936, f32, cc) == 8
        assert emu.fused_cluster_size(151936, _DTYPE_CODE[torch.float16], cc) == 4
        assert emu.fused_cluster_size(32000, bf16, cc) == 2
        assert emu.fused_cluster_size(128256, bf16, cc) == 4
        assert emu.fused_cluster_size(1, f32, cc) == 2
    assert emu.cluster_smem_bytes(151936, bf16, 4) == 18992 // 4 * 16 == 75968
    for cc in (7, 8):
        assert emu.fused_cluster_size(151936, bf16, cc) == 0 and emu.fused_cluster_size(1000, f32, cc) == 0
    assert emu.fused_cluster_size(1000, bf16, 9, x=17) == 0  # not element-aligned: the 3-pass kernel
    # the largest rows: 8 blocks up to kClusterSmemMax, then the 3-pass kernel
    vmax = mx * 8 // 16 * 4  # fp32: 4 elements per 16 bytes
    assert emu.fused_cluster_size(vmax, f32, 9) == 8 and emu.cluster_smem_bytes(vmax, f32, 8) <= mx
    assert emu.fused_cluster_size(vmax + 32, f32, 9) == 0
    for V in (1, 7, 1000, 24575, 24576, 24577, 49152, 98304, 196608, 393216, 600000):
        for dt in (bf16, f32):
            c = emu.fused_cluster_size(V, dt, 9)
            if c:
                assert emu.cluster_smem_bytes(V, dt, c) <= (pref if c < 8 else mx)
                assert c == 2 or emu.cluster_smem_bytes(V, dt, c // 2) > pref  # the smallest that fits
            else:
                assert emu.cluster_smem_bytes(V, dt, 8) > mx
    # the Python mirror of the static roofline note
    from bench import roofline as rl

    assert (rl.CLUSTER_SMEM_PREFERRED, rl.CLUSTER_SMEM_MAX) == (pref, mx)
    for V in (1, 7, 1000, 24575, 24576, 24577, 32000, 49152, 128256, 151936, 196608, 393216, 409600, 600000):
        for dt, es in ((bf16, 2), (f32, 4)):
            assert emu.fused_cluster_size(V, dt, 9) == rl.cluster_size(V, es), (V, es)
            assert emu.cluster_smem_bytes(V, dt, 4) == rl.cluster_smem_bytes(V, es, 4)


def test_dispatch_sm80_keeps_the_3pass_kernel_and_real_configuration(emu):
    """On the emulated sm_80 the choice (cluster=0) runs fused_kernel; on sm_90 the GPU's launch configuration
    for a 151,936 bf16 row: clusters of 4 blocks of 512 threads with 75,968 bytes of dynamic shared memory
    each (above the 48 KiB default: the launcher raises the kernel's limit), against the float64 reference."""
    V = 151936
    x = (torch.randn(1, 2, V) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (2,))
    adv, coef = torch.randn(2), torch.rand(2) + 0.1
    params = LossParams.from_config(GRPOConfig(loss_type="dapo"))
    kernels = CudaLaunchers(emu, "cpu")
    try:
        emu.set_device_cc(8, 0)
        out80 = torch.empty_like(x)
        kernels.fused_fwd_bwd(x, ids, 1.0, None, None, adv, coef, params, out80)
        assert emu.last_launch()["cluster"] == 1 and emu.last_launch()["dyn_smem"] == 0
    finally:
        emu.set_device_cc(9, 0)
    out = torch.empty_like(x)
    logp, _ = kernels.fused_fwd_bwd(x, ids, 1.0, None, None, adv, coef, params, out)
    assert emu.last_launch() | {"count": 0} == {"grid": 8, "block": 512, "cluster": 4, "dyn_smem": 75968, "count": 0}
    r_logp = reference.token_logprobs(x.double(), ids.view(1, 2)).view(-1)
    g = coef.double() * logp_loss.token_loss_grad(r_logp, GRPOConfig(loss_type="dapo"), adv.double(), None, None)
    xr = x.double().requires_grad_()
    (reference.token_logprobs(xr, ids.view(1, 2)).view(-1) * g).sum().backward()
    xs = x.detach().clone().requires_grad_()
    (reference.token_logprobs(xs, ids.view(1, 2)).view(-1) * g.to(xs.dtype)).sum().backward()
    assert_rule(out, xr.grad, xs.grad, "cluster kernel, V = 151,936")
    assert_rule(out80, xr.grad, xs.grad, "3-pass kernel, V = 151,936")


def test_binding_rejects_bad_cluster(emu):
    x = torch.randn(1, 2, 11)
    with pytest.raises(ValueError, match="cluster"):
        CudaLaunchers(emu, "cpu", cluster=3)
    ids, v = torch.zeros(2, dtype=torch.int64), torch.zeros(2)
    out = torch.empty_like(x)
    params = LossParams.from_config(GRPOConfig())
    with pytest.raises(ValueError, match="does not fit"):
        CudaLaunchers(emu, "cpu", cluster=2).fused_fwd_bwd(torch.randn(1, 1, 1_000_000), ids[:1], 1.0, None, None,
                                                           v[:1], v[:1], params, torch.empty(1, 1, 1_000_000))
    kernels = CudaLaunchers(emu, "cpu")
    kernels.cluster = 3  # past the launcher's own check: the binding checks it too
    with pytest.raises(ValueError, match="cluster must be"):
        kernels.fused_fwd_bwd(x, ids, 1.0, None, None, v, v, params, out)


# --------------------------------------------------------------------------------------------------
# launcher-level edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_rows_zero_and_bad_id_nan_without_oob(emu, dtype):
    check_masked_rows_and_bad_ids(CudaLaunchers(emu, "cpu", block=64), dtype)


def test_all_banned_but_one_and_v1(b64):
    check_all_banned_but_one(b64)


def test_binding_rejects_bad_arguments(emu):
    x = torch.randn(2, 3, 11)
    ids = torch.zeros(6, dtype=torch.int64)
    o = torch.empty(6)
    def rows(**change):
        fields = dict(logits=x.data_ptr(), dtype=0, B=2, T=3, V=11, stride_b=33, stride_t=11, ids=ids.data_ptr(),
                      tau=1.0)
        return native(emu.Rows, **{**fields, **change})

    out = native(emu.Outputs, logp=o.data_ptr(), stats=o.data_ptr())
    with pytest.raises(ValueError, match="block"):
        emu.logprobs_fwd(rows(), out, 0, 48)
    with pytest.raises(ValueError, match="dtype"):
        emu.logprobs_fwd(rows(dtype=5), out, 0)
    with pytest.raises(ValueError, match="tau"):
        emu.logprobs_fwd(rows(tau=0.0), out, 0)
    with pytest.raises(ValueError, match="non-null"):
        emu.logprobs_fwd(rows(ids=0), out, 0)
    with pytest.raises(AttributeError):
        native(emu.Rows, stride_v=1)  # a field the struct does not have
    with pytest.raises(ValueError, match="ids"):
        CudaLaunchers(emu, "cpu").logprobs_fwd(x, ids[:5], 1.0, False)
    with pytest.raises(ValueError, match="logits"):
        CudaLaunchers(emu, "cuda").logprobs_fwd(x, ids, 1.0, False)


# --------------------------------------------------------------------------------------------------
# the standalone driver: emulator self-checks, and the ThreadSanitizer build
# --------------------------------------------------------------------------------------------------
def _selftest(sanitize: bool) -> Path:
    flags = [*COMMON_FLAGS, "-O1", "-g", "-fsanitize=thread"] if sanitize else [*COMMON_FLAGS, "-O2"]
    target = cache_dir("tsan" if sanitize else "selftest", flags) / "emu_selftest"
    if not target.exists():
        compile_to(["nice", CXX, *flags, str(ROOT / "csrc/emu/emu_selftest.cpp")], target)
    return target


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66", GK_EMU_TIMEOUT_S="60")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)


def test_emulator_selftest():
    """Shuffles, fresh shared memory per block, divergent-barrier reports, clusters (ranks, map_shared_rank of
    static and dynamic shared memory, a cluster barrier not reached by every block reported, the dynamic
    shared memory limit); kernels of every dtype against double precision, the fused one with clusters of 1,
    2, 4 and 8 blocks (a second, independent check of the launch code in C++)."""
    res = _run(_selftest(False))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr[-4000:]


def test_thread_sanitizer_clean():
    """The kernels of every dtype under -fsanitize=thread (the fused one with clusters of 1, 2, 4 and 8
    blocks): no data race between the emulated threads (every shared-memory, distributed-shared-memory and
    in-place global access is ordered by a barrier); and the sanitizer build does report the race of a
    kernel with a missing __syncthreads() (so a clean run means something)."""
    exe = _selftest(True)
    res = _run(exe)
    if "FATAL: ThreadSanitizer" in res.stderr and "unexpected memory mapping" in res.stderr:
        pytest.skip("ThreadSanitizer cannot run here (kernel ASLR setting): " + res.stderr[:200])
    assert res.returncode == 0 and "WARNING: ThreadSanitizer" not in res.stderr, res.stderr[-6000:]
    assert res.stdout.strip().endswith("ok"), res.stdout
    race = _run(exe, "race")
    assert race.returncode == 66 and "data race" in race.stderr, race.stdout + race.stderr[-2000:]


@pytest.mark.parametrize("mode", ["cluster_race", "cluster_exit_race"])
def test_thread_sanitizer_sees_a_missing_cluster_barrier(mode):
    """Negative controls of the clean run above for the cluster kernel: reading a peer block's shared memory
    with no cluster barrier after the peer's write, and while the peer may have exited (no cluster barrier
    before exit; the emulator refills an exited block's shared memory), are reported as data races.

    TSan reports the accesses it sees conflict in one execution; which of the two threads' accesses comes first
    (and whether the emulator's own bookkeeping orders them) depends on scheduling, so a loaded machine may
    hide the race in one run: up to 5 runs, and one report is required."""
    exe = _selftest(True)
    for _ in range(5):
        res = _run(exe, mode)
        if "FATAL: ThreadSanitizer" in res.stderr and "unexpected memory mapping" in res.stderr:
            pytest.skip("ThreadSanitizer cannot run here (kernel ASLR setting): " + res.stderr[:200])
        if res.returncode == 66 and "data race" in res.stderr:
            return
    pytest.fail("no data race reported in 5 runs: " + res.stdout + res.stderr[-2000:])


@pytest.mark.parametrize("level,variant", LEVEL_VARIANT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fractional_mask_weights(emu, level, variant, dtype):
    """A non-boolean completion_mask weights each token (coef carries it into the kernel), weights above 1
    included; weight-0 positions hold NaN logits and out-of-range ids."""
    B, T, V = 3, 4, 1007
    x = make_logits(B, T, V, dtype)
    ids = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 0.5, 0.25, 0], [2, 1, 0, 0], [0.75, 1, 1, 1.5]])
    x[0, 3] = float("nan")
    ids[1, 2] = V + 3
    logp = torch.log_softmax(x.double(), -1).gather(-1, ids.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1).float()
    inputs = dict(completion_mask=mask, advantages=torch.tensor([0.7, -1.1, 0.4]),
                  old_logps=logp + 0.3 * torch.randn(B, T), ref_logps=logp + 0.2 * torch.randn(B, T))
    for loss_type in ("grpo", "dapo", "sapo"):
        cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
        check_loss(x, ids, cfg, emu_backend(emu, 64, VARIANTS[variant]), inputs)


def test_boundary_binding(emu):
    check_boundary_binding(emu)
