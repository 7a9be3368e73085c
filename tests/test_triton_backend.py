"""The Triton kernels (``backend="triton"``) against the float64 eager reference.

On this machine (no GPU) they run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported): every kernel, every constexpr variant, the launch plans and the
autograd layer run here. On a CUDA machine the same tests run the compiled kernels on the GPU.

Tolerances: the rule of ``tests/kernel_checks.py`` (twice torch's own error in the same dtype, plus 8 fp32
ulps at the scale of the values). The interpreter evaluates the kernels with numpy in fp32, so it checks the
kernels' arithmetic (order of the chunked sums, the exp of the online rescaling), not the GPU's exp.approx;
``tests/test_triton_ptx.py`` checks what the GPU compiler makes of them.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_checks import (
    DTYPES,
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
from grpo_kernels.backends import unavailable_reason
from grpo_kernels.config import GRPOConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REASON = unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

if REASON is None:
    import triton
    import triton.language as tl

    from grpo_kernels.backends import triton_backend as tb
    from grpo_kernels.backends.base import LossParams
    from grpo_kernels.backends.triton_kernels import _row_offset

    @triton.jit
    def row_offset_probe(out, T, stride_b, stride_t, shift):
        row = tl.program_id(0)
        tl.store(out + row, _row_offset(row, T, stride_b, stride_t, shift))


def test_interpreter_is_what_runs_here():
    """Without a GPU these tests are only meaningful under the interpreter: make sure that is what ran."""
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert "triton" in gk.available_backends("cpu")


# --------------------------------------------------------------------------------------------------
# log-probs, entropy and their gradients (forward kernel, backward kernel)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,V", [(2, 3, 1), (2, 3, 7), (2, 3, 1007), (1, 3, 4096), (1, 2, 32007)])
@pytest.mark.parametrize("strided", [False, True])
def test_logprobs_values_and_grads(dtype, B, T, V, strided):
    x = make_logits(B, T, V, dtype, strided)
    if V > 7:
        x[0, 0, :3] = float("-inf")  # banned tokens
    ids = torch.randint(0, V, (B, T))
    tau = 0.7 if V != 7 else 1.0
    check_logprobs(x, ids, tau, "triton")
    check_logprobs(x, ids, tau, "triton", entropy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_row_alignment(dtype):
    """Rows starting at every element offset mod 16 bytes (head of 0..ALIGN-1 elements before the unmasked
    body), V large enough for several body chunks (fp32: BLOCK 2,048; bf16: 4,096), V not a multiple of 16."""
    V, rows = 9011, 8
    base = (torch.randn(rows * (V + 1) + 8) * 2).to(dtype)
    x = base[1 : 1 + rows * (V + 1)].view(1, rows, V + 1)[:, :, :V]  # row stride V + 1: offsets cycle mod 8
    ids = torch.randint(0, V, (1, rows))
    check_logprobs(x, ids, 1.0, "triton")


def test_large_magnitude_entropy():
    check_large_magnitude_entropy("triton")


def test_all_banned_but_one_and_v1():
    check_all_banned_but_one("triton")


# --------------------------------------------------------------------------------------------------
# the loss: every loss type x importance level x KL x delta, with masks and NaN garbage
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,delta", LOSS_DELTA)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", KL)
def test_loss_matrix_fp32(loss_type, level, beta, bias, delta):
    """token level: the single-pass kernel (gradient in the forward); sequence level: forward + backward."""
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias,
                     delta=delta, epsilon_high=4.0 if loss_type == "cispo" else 0.28, temperature=0.9)
    b = loss_inputs(3, 4, 301, torch.float32, strided=True)
    check_loss(b.x, b.ids, cfg, "triton", b.inputs(cfg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token"), ("bnpo", "sequence")])
@pytest.mark.parametrize("strided", [False, True])
def test_loss_half_dtypes(dtype, loss_type, level, strided):
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     delta=1.5 if loss_type == "grpo" else None)
    b = loss_inputs(3, 4, 1007, dtype, strided)
    assert check_loss(b.x, b.ids, cfg, "triton", b.inputs(cfg)).grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_matches_out_of_place(dtype, level):
    check_inplace(loss_inputs(3, 4, 1007, dtype), GRPOConfig(loss_type="grpo", importance_sampling_level=level,
                                                            beta=0.04), "triton")


def test_on_policy_and_temperature():
    """old_logps=None (ratio 1, d(logp-old)/dlogp = 1) through the single pass, temperature != 1."""
    b, cfg = loss_inputs(3, 4, 513, torch.float32), GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.7)
    check_loss(b.x, b.ids, cfg, "triton", b.inputs(cfg, on_policy=True))


def test_fused_launcher_matches_token_loss_grad():
    check_fused_launcher(tb.LAUNCHERS)


# --------------------------------------------------------------------------------------------------
# launcher-level edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_rows_zero_and_bad_id_nan_without_oob(dtype):
    check_masked_rows_and_bad_ids(tb.LAUNCHERS, dtype)


def test_launcher_rejects_bad_arguments():
    x = torch.randn(2, 3, 11)
    ids = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids"):
        tb.LAUNCHERS.logprobs_fwd(x, ids[:5], 1.0, False)
    with pytest.raises(TypeError, match="logits"):
        tb.LAUNCHERS.logprobs_fwd(x.double(), ids, 1.0, False)
    with pytest.raises(ValueError, match="tau"):
        tb.LAUNCHERS.logprobs_fwd(x, ids, 0.0, False)
    with pytest.raises(ValueError, match="stride 1 along V"):
        tb.LAUNCHERS.logprobs_fwd(x.transpose(1, 2).contiguous().transpose(1, 2), ids, 1.0, False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gk.token_logprobs(x, torch.full((2, 3), 11), backend="triton")


def test_64bit_row_offsets():
    """Row offsets past 2^31 elements (N * V > 2^31, e.g. N = 16,384 rows of V = 131,072): ``_row_offset``
    multiplies in int64. Run through a probe kernel that writes the offsets it computes, with 32-bit row
    strides whose products wrap in int32 (the interpreter wraps int32 arithmetic like the GPU); nothing of
    that size is allocated."""
    T, sb, st, shift = 2, 2**30 + 6, 131_072 * 3, 5
    n = 8
    got = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    row_offset_probe[(n,)](got, T, sb, st, shift)
    want = [shift + (r // T) * sb + (r % T) * st for r in range(n)]
    assert max(want) > 2**31
    assert got.tolist() == want


# --------------------------------------------------------------------------------------------------
# custom ops, saved memory, compilation
# --------------------------------------------------------------------------------------------------
def test_opcheck_triton_ops():
    check_opcheck("triton")


def test_saved_for_backward_bytes_per_token():
    check_saved_bytes_per_token("triton")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_torch_compile_fullgraph_training_step(level):
    """torch.compile(fullgraph=True) traces a step that calls the Triton custom ops (their fakes), and the
    compiled step computes what the eager one does."""
    torch._dynamo.reset()
    B, T, V, H = 4, 3, 64, 16
    head = torch.nn.Linear(H, V)
    h = torch.randn(B, T, H)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    rewards = torch.randn(B)
    old = torch.randn(B, T) - 4.0

    def step(h):
        out = gk.grpo_loss(head(h), ids, completion_mask=mask, rewards=rewards, group_size=2, old_logps=old,
                           importance_sampling_level=level, backend="triton")
        return out.loss

    eager = step(h)
    grads_eager = torch.autograd.grad(eager, head.weight)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h)
    grads_compiled = torch.autograd.grad(compiled, head.weight)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads_compiled, grads_eager, rtol=1e-6, atol=1e-6)


def test_no_recompilation_for_new_lengths():
    """The specialisation key that Triton's JIT derives from a launch's arguments (the key of its kernel
    cache) is the same for every N, T and row stride: one compilation per (V, dtype, flags). The key is
    computed with the JIT's own binder for an sm_90 target, from the arguments of real launch plans."""
    from bench.triton_aot import specialization_key

    keys = {}
    for V, dtype in ((32000, torch.bfloat16), (50257, torch.bfloat16), (1007, torch.float32)):
        for B, T, P in ((1, 1, 1), (2, 3, 5), (4, 17, 1), (8, 64, 3), (3, 100, 7)):
            big = torch.randn(B, T + P, V).to(dtype)
            x = big[:, P - 1 : -1]  # the model-output view: row stride (T + P) * V, storage offset (P - 1) * V
            n = B * T
            ids = torch.zeros(n, dtype=torch.int64)
            f, f2 = torch.empty(n), torch.empty(n, 2)
            out = torch.empty(x.shape, dtype=dtype)
            plans = {
                "fwd": tb.plan_logprobs_fwd(x, ids, 1.0, True, f, f2, f),
                "bwd": tb.plan_logprobs_bwd(x, ids, f2, f, f, f, 1.0, out),
                "fused": tb.plan_fused(x, ids, 1.0, f, None, f, f, LossParams.from_config(GRPOConfig()), out,
                                       f, f),
            }
            for name, plan in plans.items():
                keys.setdefault((V, dtype, name), set()).add(specialization_key(plan))
    grown = {k: len(v) for k, v in keys.items() if len(v) != 1}
    assert not grown, f"new lengths gave new specialisations: {grown}"
