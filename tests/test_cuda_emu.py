"""The CUDA kernels (csrc/cuda) EXECUTED on the CPU, through the emulation of the CUDA execution model.

``csrc/emu/emu_module.cpp`` compiles the same ``.cu`` / ``.cuh`` sources and the same binding code as
``grpo_kernels._cuda``, with g++ against ``csrc/emu/cuda_emu.h`` (a block's threads as std::threads, a
barrier per ``__syncthreads``, per-block shared memory, 32-lane shuffles; what it cannot emulate is listed
at the top of that header). The module is built once per session into ``build/cuda_emu/<hash>/``, and
registered here as a test backend ``cuda_emuNNN`` (NNN = threads per block, 0 = the kernels' default), so
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

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import grpo_kernels as gk
import grpo_kernels.backends as backends
from grpo_kernels import reference
from grpo_kernels.backends.base import BackendInfo, TokenLossParams
from grpo_kernels.backends.cuda_backend import CudaLaunchers
from grpo_kernels.config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CXX = shutil.which(os.environ.get("CXX", "g++"))

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is needed to build the CUDA emulation module")

COMMON_FLAGS = ["-std=c++20", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
                f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cuda'}"]


def _source_files() -> list[Path]:
    files = [p for d in ("cuda", "emu", "include", "bindings") for p in sorted((ROOT / "csrc" / d).iterdir())
             if p.suffix in (".h", ".cuh", ".cu", ".cpp")]
    return files


def _cache_dir(kind: str, flags: list[str]) -> Path:
    h = hashlib.sha256(" ".join([CXX or "", *flags]).encode())
    for p in _source_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    d = ROOT / "build" / "cuda_emu" / f"{kind}-{h.hexdigest()[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(cmd: list[str], target: Path) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    res = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"compile failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")
    os.replace(tmp, target)  # atomic: a concurrent session never imports a half-written file


@pytest.fixture(scope="session")
def emu():
    """The emulation module (built once per source hash, imported from its cache directory)."""
    import pybind11

    flags = [*COMMON_FLAGS, "-O2", "-fPIC", "-shared", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    name = "grpo_kernels_cuda_emu"
    target = _cache_dir("module", flags) / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.exists():
        _compile(["nice", CXX, *flags, str(ROOT / "csrc/emu/emu_module.cpp")], target)
    spec = importlib.util.spec_from_file_location(name, target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.EMULATED
    return mod


def emu_backend(emu, block: int) -> str:
    """Registers (once) the test backend running the emulated CUDA kernels with ``block`` threads per block."""
    name = f"cuda_emu{block}"
    if name not in backends.REGISTRY:
        backends.REGISTRY[name] = BackendInfo(
            name, ("cpu",), lambda d: None if d == "cpu" else "emulated kernels take cpu tensors",
            lambda: CudaLaunchers(emu, device_type="cpu", block=block), "test only: CUDA kernels on the CPU emulator",
        )
    if name not in backends.BACKENDS:
        backends.BACKENDS = backends.BACKENDS + (name,)
    return name


@pytest.fixture(scope="session")
def b64(emu):
    return emu_backend(emu, 64)


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
    B, T = ids.shape
    w_logp, w_ent = torch.randn(B, T), torch.randn(B, T)
    k = logprob_grads(x, ids, tau, backend, w_logp, w_ent)
    r = logprob_grads(x.double(), ids, tau, "torch", w_logp, w_ent)
    s = logprob_grads(x, ids, tau, "torch", w_logp, w_ent)
    assert k[2].dtype == x.dtype and k[2].shape == x.shape
    for name, kv, rv, sv in zip(("logp", "entropy", "dL/dlogits"), k, r, s, strict=True):
        assert_rule(kv, rv, sv, f"{name} {x.dtype}")
    return k


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
    # without the entropy: the other forward / backward instantiation
    w = torch.randn(B, T)
    xi, xr, xs = (x.detach().clone().requires_grad_(), x.double().requires_grad_(), x.detach().clone().requires_grad_())
    (gk.token_logprobs(xi, ids, temperature=0.7, backend=b64) * w).sum().backward()
    (reference.token_logprobs(xr, ids, 0.7) * w).sum().backward()
    (reference.token_logprobs(xs, ids, 0.7) * w).sum().backward()
    assert_rule(xi.grad, xr.grad, xs.grad, f"dL/dlogits (no entropy) {dtype}")


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
    logp, lse, ent = L.logprobs_fwd(x, ids.view(-1), 1.0, True)
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
    L.logprobs_bwd(x, ids.view(-1), lse, None, g, None, 1.0, out)
    assert_rule(out, xr.grad, xs.grad, "gradient, other alignment")
    xi = base.clone()[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]
    L.logprobs_bwd(xi, ids.view(-1), lse, None, g, None, 1.0, xi)  # inplace: same alignment, 16-byte stores
    assert torch.equal(xi, out), "inplace (16-byte stores) and per-element stores must agree exactly"


def test_large_magnitude_entropy(b64):
    """|z| ~ 1e4: the entropy through (s, t) has no cancellation (lse - sum p z would lose ~1e-3)."""
    x = torch.randn(2, 3, 1007) * 2 + 1e4
    ids = torch.randint(0, 1007, (2, 3))
    logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend=b64)
    r_logp, r_ent = reference.token_logprobs(x.double(), ids, return_entropy=True)
    assert (ent.double() - r_ent).abs().max() < 2e-5
    assert (logp.double() - r_logp).abs().max() < 1e-2  # logp = z - lse with |z| ~ 1e4: fp32 ulp 1e-3


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
KL = [(0.0, True), (0.04, True), (0.04, False)]  # (beta, use_bias_correction_kl)
LOSS_DELTA = [(lt, None) for lt in LOSS_TYPES] + [(lt, 1.3) for lt in ("grpo", "bnpo", "dr_grpo", "dapo")]


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
    k = run_loss(*args, cfg, backend, **kw)
    r = run_loss(args[0].double(), *args[1:], cfg, "torch", **kw)
    s = run_loss(*args, cfg, "torch", **kw)
    for name, kv, rv, sv in zip(("loss", "logps", "grad"), k, r, s, strict=True):
        assert_rule(kv, rv, sv, f"{name} {args[0].dtype}")
    assert torch.all(k[2][1] == 0), "a fully masked row must get an exact zero gradient"
    return k


@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(b64, loss_type, level, beta, bias, delta):
    """token level: the single-pass (fused) kernel; sequence level: forward + backward kernels."""
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    check_loss(loss_inputs(3, 4, 301, torch.float32), cfg, b64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(b64, dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     delta=1.5 if loss_type == "grpo" else None)
    k = check_loss(loss_inputs(3, 4, 1007, dtype, strided), cfg, b64)
    assert k[2].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_matches_out_of_place(b64, dtype, level):
    """inplace=True writes the gradient into the logits' storage: the same values as out of place."""
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    # contiguous: `leaf * 1` below is contiguous, and bit-equality needs the same row alignments (the split of
    # a row into scalar head / vectors / tail, hence the order of the fp32 sums, follows the alignment)
    args = loss_inputs(3, 4, 1007, dtype)
    k = run_loss(*args, cfg, b64)
    leaf = args[0].detach().clone().requires_grad_()
    inp = leaf * 1
    storage = inp.data_ptr()
    out = gk.grpo_loss_with_config(inp, args[1], cfg, completion_mask=args[2], advantages=args[5],
                                   old_logps=args[3], ref_logps=args[4], inplace=True, backend=b64)
    out.loss.backward()
    assert torch.equal(out.loss.detach(), k[0]) and torch.equal(out.logps, k[1])
    assert torch.equal(leaf.grad, k[2])
    assert torch.equal(inp.detach(), k[2]), "the gradient must be written into the logits' storage"
    assert inp.data_ptr() == storage


def test_on_policy_and_entropy_temperature(b64):
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, temperature != 1."""
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.7)
    check_loss(loss_inputs(3, 4, 513, torch.float32), cfg, b64, on_policy=True)


def test_fused_launcher_matches_token_loss_grad(emu):
    """The single-pass launcher's per-row weight is coef * token_loss_grad (at the launcher level, including
    ties of torch.min: on-policy ratio 1 sits on both clip bounds +- 0)."""
    B, T, V = 2, 3, 211
    L = CudaLaunchers(emu, "cpu", block=64)
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
            logp, ent = L.fused_fwd_bwd(x, ids, 1.0, old, ref, adv, coef, TokenLossParams.from_config(cfg), out)
            g = coef.double() * reference.token_loss_grad(lp64, cfg, adv.double(),
                                                          None if old is None else old.double(), ref.double())
            xr = x.double().requires_grad_()
            (reference.token_logprobs(xr, ids.view(B, T)).view(-1) * g).sum().backward()
            err = (out.double() - xr.grad).abs().max().item()
            assert err <= 16 * EPS32 * max(1.0, g.abs().max().item()), f"{loss_type} old={old_given}: {err}"
            assert torch.all(out.view(-1, V)[3] == 0)


# --------------------------------------------------------------------------------------------------
# launcher-level edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_rows_zero_and_bad_id_nan_without_oob(emu, dtype):
    """A masked row (g = 0) is +0 exactly even with NaN logits; an out-of-range id gives logp NaN, and the
    target write of the backward is skipped: the guard elements around the output are untouched."""
    B, T, V = 2, 3, 1007
    L = CudaLaunchers(emu, "cpu", block=64)
    x = torch.randn(B, T, V).to(dtype)
    x[0, 1] = float("nan")
    ids = torch.randint(0, V, (B * T,))
    ids[4], ids[5] = V + 100, -3
    logp, lse, ent = L.logprobs_fwd(x, ids, 1.0, True)
    assert torch.isnan(logp[4]) and torch.isnan(logp[5]) and torch.isfinite(lse[4]) and torch.isfinite(ent[5])
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
    g, ge = torch.randn(B * T), torch.randn(B * T)
    g[1] = ge[1] = 0.0
    guard = torch.full((B * T * V + 2 * 4096,), 7.0).to(dtype)
    out = guard[4096 : 4096 + B * T * V].view(B, T, V)
    out.fill_(5.0)
    L.logprobs_bwd(x, ids, lse, ent, g, ge, 1.0, out)
    assert torch.all(out[0, 1] == 0) and not torch.signbit(out[0, 1].float()).any(), "masked row: +0 exactly"
    assert torch.isfinite(out).all()
    assert torch.all(guard[:4096] == 7.0) and torch.all(guard[-4096:] == 7.0), "write outside the output"
    # rows with a bad id have no target term: the row sums to -g (sum_v p_v = 1), not 0
    assert abs(out[1, 1].double().sum().item() + g[4].item()) < 1e-2 * max(1.0, abs(g[4].item()))


def test_all_banned_but_one_and_v1(b64):
    """A row with every logit -inf but the target: logp = 0, entropy = 0, gradient zero (no NaN)."""
    x = torch.full((1, 2, 9), float("-inf"))
    x[0, 0, 4] = 2.0
    x[0, 1, 0] = -1.0
    ids = torch.tensor([[4, 0]])
    xi = x.clone().requires_grad_()
    logp, ent = gk.token_logprobs(xi, ids, return_entropy=True, backend=b64)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logp, torch.zeros(1, 2)) and torch.equal(ent, torch.zeros(1, 2))
    assert torch.equal(xi.grad.abs(), torch.zeros_like(x))


def test_binding_rejects_bad_arguments(emu):
    x = torch.randn(2, 3, 11)
    ids = torch.zeros(6, dtype=torch.int64)
    o = torch.empty(6)
    args = (x.data_ptr(), 0, 2, 3, 11, 33, 11, ids.data_ptr())
    with pytest.raises(ValueError, match="block"):
        emu.logprobs_fwd(*args, 1.0, o.data_ptr(), o.data_ptr(), 0, 0, 48)
    with pytest.raises(ValueError, match="dtype"):
        emu.logprobs_fwd(x.data_ptr(), 5, *args[2:], 1.0, o.data_ptr(), o.data_ptr(), 0, 0)
    with pytest.raises(ValueError, match="tau"):
        emu.logprobs_fwd(*args, 0.0, o.data_ptr(), o.data_ptr(), 0, 0)
    with pytest.raises(ValueError, match="ids"):
        CudaLaunchers(emu, "cpu").logprobs_fwd(x, ids[:5], 1.0, False)
    with pytest.raises(ValueError, match="logits"):
        CudaLaunchers(emu, "cuda").logprobs_fwd(x, ids, 1.0, False)


# --------------------------------------------------------------------------------------------------
# the standalone driver: emulator self-checks, and the ThreadSanitizer build
# --------------------------------------------------------------------------------------------------
def _selftest(sanitize: bool) -> Path:
    flags = [*COMMON_FLAGS, "-O1", "-g", "-fsanitize=thread"] if sanitize else [*COMMON_FLAGS, "-O2"]
    target = _cache_dir("tsan" if sanitize else "selftest", flags) / "emu_selftest"
    if not target.exists():
        _compile(["nice", CXX, *flags, str(ROOT / "csrc/emu/emu_selftest.cpp")], target)
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
