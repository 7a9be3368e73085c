"""The C++ CPU backend (``backend="cpu"``, grpo_kernels._cpu) against the float64 eager reference.

Tolerance rule: the one of ``tests/kernel_checks.py`` (twice torch's own error in the same dtype, plus 8
fp32 ulps at the scale of the values).

Every numerical test runs on each row-kernel instruction set of the module that the CPU runs (baseline, AVX2,
AVX-512).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch
from kernel_checks import (
    DTYPES,
    EPS32,
    KL,
    LOSS_DELTA,
    check_all_banned_but_one,
    check_fused_launcher,
    check_inplace,
    check_large_magnitude_entropy,
    check_logprobs,
    check_loss,
    check_masked_rows_and_bad_ids,
    check_opcheck,
    check_saved_bytes_per_token,
    loss_inputs,
    make_logits,
)

import grpo_kernels as gk
from grpo_kernels import _cpu
from grpo_kernels.backends.cpu_backend import LAUNCHERS
from grpo_kernels.config import GRPOConfig

_DEFAULT_ISA = _cpu.isa()
ISAS = [name for name in _cpu.ISAS if _cpu.set_isa(name)]  # the instruction sets this CPU runs
_cpu.set_isa(_DEFAULT_ISA)


@pytest.fixture(params=ISAS)
def isa(request):
    assert _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(_DEFAULT_ISA)


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
    check_logprobs(x, ids, tau, "cpu")
    check_logprobs(x, ids, tau, "cpu", entropy=False)  # the other forward / backward instantiation


def test_large_magnitude_entropy(isa):
    check_large_magnitude_entropy("cpu")


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(isa, loss_type, level, beta, bias, delta):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    b = loss_inputs(4, 9, 301, torch.float32)
    check_loss(b.x, b.ids, cfg, "cpu", b.inputs(cfg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(isa, dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     delta=1.5 if loss_type == "grpo" else None)
    b = loss_inputs(4, 6, 1007, dtype, strided)
    assert check_loss(b.x, b.ids, cfg, "cpu", b.inputs(cfg)).grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_matches_out_of_place(isa, dtype, level):
    """inplace=True writes the gradient into the logits' storage: same values as the out-of-place path."""
    check_inplace(loss_inputs(3, 5, 1007, dtype), GRPOConfig(loss_type="grpo", importance_sampling_level=level,
                                                            beta=0.04), "cpu")


def test_streaming_stores_above_the_cache(isa):
    """An fp32 gradient of at least 32 MiB is written with streaming stores (pass 3 of the fused kernel): against
    the reference, and bit-equal to the in-place path, which writes the same products with plain stores. V odd,
    so most rows start off a vector boundary (the plain-store head and tail); a fully masked row of NaN logits
    takes the streamed zeros."""
    b = loss_inputs(4, 64, 32771, torch.float32)
    assert b.x.numel() * 4 >= 32 * 2**20
    cfg = GRPOConfig(loss_type="dapo", beta=0.04)
    check_loss(b.x, b.ids, cfg, "cpu", b.inputs(cfg))
    check_inplace(b, cfg, "cpu")


def test_on_policy_and_grad_in_forward_path(isa):
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, against the reference."""
    b, cfg = loss_inputs(4, 7, 513, torch.float32), GRPOConfig(loss_type="dapo", beta=0.04)
    check_loss(b.x, b.ids, cfg, "cpu", b.inputs(cfg, on_policy=True))


def test_fused_launcher_matches_token_loss_grad(isa):
    check_fused_launcher(LAUNCHERS, B=3, T=5)


# --------------------------------------------------------------------------------------------------
# launcher-level edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_rows_are_zero_without_reading_and_bad_id_is_nan(isa, dtype):
    check_masked_rows_and_bad_ids(LAUNCHERS, dtype)


def test_all_banned_but_one_and_v1(isa):
    check_all_banned_but_one("cpu")


def test_default_isa_is_the_widest_the_cpu_runs():
    assert _DEFAULT_ISA == ISAS[-1] or os.environ.get("GRPO_KERNELS_CPU_ISA"), (_DEFAULT_ISA, ISAS)


def test_isas_agree_on_fp32_forward():
    """Every instruction set computes the same function (same polynomial; FMA contraction and the lane order of
    the sums may differ by ulps)."""
    if len(ISAS) < 2:
        pytest.skip("this CPU has no AVX2: only the baseline kernels exist")
    x = torch.randn(4, 16, 4099) * 4
    ids = torch.randint(0, 4099, (64,))
    res = {}
    for name in ISAS:
        _cpu.set_isa(name)
        res[name] = LAUNCHERS.logprobs_fwd(x, ids, 1.0, True)
    _cpu.set_isa(_DEFAULT_ISA)
    for name in ISAS[1:]:
        for a, b in zip(res["baseline"], res[name], strict=True):
            assert (a - b).abs().max().item() <= 8 * EPS32 * max(1.0, a.abs().max().item()), name


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
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)  # rows are independent: the partition of rows cannot change a row's result


# --------------------------------------------------------------------------------------------------
# custom ops, saved memory, module properties
# --------------------------------------------------------------------------------------------------
def test_opcheck_cpu_ops():
    check_opcheck("cpu")


def test_saved_for_backward_bytes_per_token():
    check_saved_bytes_per_token("cpu")


def test_header_conversions_exhaustive_against_torch():
    """grpo_math.h's bf16/fp16 <-> fp32 conversions: all 65536 patterns to fp32, and fp32 -> 16 bit on every
    16-bit value, every midpoint between neighbours (the ties), and 2^20 random fp32 bit patterns."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for code, dt in ((1, torch.bfloat16), (2, torch.float16)):
        mine = torch.empty(65536, dtype=torch.float32)
        _cpu.convert(bits.data_ptr(), mine.data_ptr(), 65536, code, True)
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
        _cpu.convert(f.data_ptr(), out.data_ptr(), f.numel(), code, False)
        expect = f.to(dt)
        fnan = torch.isnan(f)
        assert torch.isnan(out.view(dt)[fnan].float()).all(), "NaN must stay NaN"
        bad = (out != expect.view(torch.int16)) & ~fnan
        assert not bad.any(), f"{dt}: {int(bad.sum())} mismatches, e.g. {f[bad][:4].tolist()}"


def test_module_links_no_libtorch():
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available on this system")
    libs = subprocess.run([ldd, _cpu.__file__], capture_output=True, text=True, check=True).stdout
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


def _row_kernel_code() -> dict[str, str]:
    """objdump of the module -> {demangled row-kernel name: its disassembly}."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not available")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _cpu.__file__], capture_output=True, text=True,
                          check=True).stdout
    funcs, name = {}, None
    for line in text.splitlines():
        if line.endswith(">:"):
            name = line[line.index("<") + 1 : -2]
            funcs[name] = []
        elif name is not None and line.strip():
            funcs[name].append(line)
    return {k: "\n".join(v) for k, v in funcs.items() if "::isa_" in k and "_row<" in k}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the AVX2 / AVX-512 builds exist on x86-64 only")
def test_isa_builds_use_their_vector_width():
    """Each fp32 row kernel's exp loop runs on the vectors of its ISA: FMAs on zmm registers in the AVX-512
    build, on ymm (and no zmm) in the AVX2 build, no ymm / zmm at all in the baseline build (the negative
    control: the same source without the target attribute). Static, so it holds whatever CPU runs the tests."""
    code = _row_kernel_code()
    fp32 = {k: v for k, v in code.items() if "_row<0" in k}  # DT = 0 (fp32): fwd_row<0, E>, bwd_row<0, E>, fused_row<0>
    for isa, want, banned in (("avx512", "zmm", None), ("avx2", "ymm", "zmm"), ("base", None, "ymm")):
        kernels = {k: v for k, v in fp32.items() if f"::isa_{isa}::" in k}
        assert len(kernels) == 5, (isa, sorted(kernels))
        for name, asm in kernels.items():
            fmas = [ln for ln in asm.splitlines() if "vfmadd" in ln or "vfnmadd" in ln or "vfmsub" in ln]
            if want:
                assert any(want in ln for ln in fmas), f"{name}: no FMA on {want} registers"
            if banned:
                assert banned not in asm, f"{name} uses {banned} registers"
