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

from grpo_kernels import reference
from grpo_kernels.backends.base import native
from grpo_kernels.backends.cuda_backend import CudaLaunchers
from grpo_kernels.config import GRPOConfig

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is needed to build the CUDA emulation module")


@pytest.fixture(scope="session")
def b64(emu):
    return emu_backend(emu, 64)


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
    L = CudaLaunchers(emu, "cpu", block=64)
    logp, stats, ent = L.logprobs_fwd(x, ids.view(-1), 1.0, True)
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
    L.logprobs_bwd(x, ids.view(-1), stats, None, g, None, 1.0, out)
    assert_rule(out, xr.grad, xs.grad, "gradient, other alignment")
    xi = base.clone()[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]
    L.logprobs_bwd(xi, ids.view(-1), stats, None, g, None, 1.0, xi)  # inplace: same alignment, 16-byte stores
    assert torch.equal(xi, out), "inplace (16-byte stores) and per-element stores must agree exactly"


def test_large_magnitude_entropy(b64):
    check_large_magnitude_entropy(b64)


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(b64, loss_type, level, beta, bias, delta):
    """token level: the single-pass (fused) kernel; sequence level: forward + backward kernels."""
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    b = loss_inputs(3, 4, 301, torch.float32)
    check_loss(b.x, b.ids, cfg, b64, b.inputs(cfg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(b64, dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     delta=1.5 if loss_type == "grpo" else None)
    b = loss_inputs(3, 4, 1007, dtype, strided)
    assert check_loss(b.x, b.ids, cfg, b64, b.inputs(cfg)).grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_matches_out_of_place(b64, dtype, level):
    """inplace=True writes the gradient into the logits' storage: the same values as out of place. Contiguous
    inputs: bit-equality needs the same row alignments (the split of a row into scalar head / vectors / tail,
    hence the order of the fp32 sums, follows the alignment), and ``leaf * 1`` is contiguous."""
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    check_inplace(loss_inputs(3, 4, 1007, dtype), cfg, b64)


def test_on_policy_and_entropy_temperature(b64):
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, temperature != 1."""
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.7)
    b = loss_inputs(3, 4, 513, torch.float32)
    check_loss(b.x, b.ids, cfg, b64, b.inputs(cfg, on_policy=True))


def test_fused_launcher_matches_token_loss_grad(emu):
    check_fused_launcher(CudaLaunchers(emu, "cpu", block=64))


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
    """Shuffles, fresh shared memory per block, divergent-barrier reports; kernels of every dtype against
    double precision (a second, independent check of the launch code in C++)."""
    res = _run(_selftest(False))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr[-4000:]


def test_thread_sanitizer_clean():
    """The kernels of every dtype under -fsanitize=thread: no data race between the emulated threads (every
    shared-memory and in-place global access is ordered by a barrier); and the sanitizer build does report
    the race of a kernel with a missing __syncthreads() (so a clean run means something)."""
    exe = _selftest(True)
    res = _run(exe)
    if "FATAL: ThreadSanitizer" in res.stderr and "unexpected memory mapping" in res.stderr:
        pytest.skip("ThreadSanitizer cannot run here (kernel ASLR setting): " + res.stderr[:200])
    assert res.returncode == 0 and "WARNING: ThreadSanitizer" not in res.stderr, res.stderr[-6000:]
    assert res.stdout.strip().endswith("ok"), res.stdout
    race = _run(exe, "race")
    assert race.returncode == 66 and "data race" in race.stderr, race.stdout + race.stderr[-2000:]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fractional_mask_weights(b64, level, dtype):
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
        check_loss(x, ids, cfg, b64, inputs)


def test_boundary_binding(emu):
    check_boundary_binding(emu)
