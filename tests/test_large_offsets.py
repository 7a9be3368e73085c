"""64-bit offsets wherever an index can pass 2^31 (docs/contract.md#performance).

- ``test_cpu_backend_more_than_2_31_elements`` (slow): the C++ CPU kernels on a real bf16 batch of N = 16,640
  rows x V = 131,079 (2.18e9 elements, 4.4 GB; rows past n = 16,384 start beyond element 2^31), through the
  public API: the forward kernel (token_logprobs), the single-pass kernel (token-level loss, inplace) and the
  forward + backward kernels (sequence-level loss, inplace). Inplace keeps the gradient in the logits' buffer,
  so the test needs one N x V buffer (peak ~4.5 GB). Sampled rows (both sides of the 2^31 boundary, the last
  row, random ones) are checked against the float64 reference computed on those rows only.
- ``test_row_offsets_past_2_32_without_the_memory``: the C++ CPU kernels and the CUDA kernels (csrc/cuda, run by
  the CPU emulation, with the 2-pass cluster and the 3-pass fused kernel) on 6 bf16 rows laid out with a batch stride of 2^31 + 5 and a time stride of 2^30 + 3
  elements (row starts up to 2^32 + 2^30 + 13: each stride alone overflows int32, their products with a row
  index even uint32), and 6 fp32 rows past 2^31. The buffer is one real allocation (10.7 GB, 8.6 GB) that is
  never touched but at those rows:
  the kernel memory of an untouched anonymous mapping is not committed, so it costs a few pages, and no kernel
  reads outside an allocation (a 32-bit offset would read far outside it and crash or give wrong rows). The
  test checks the resident memory stayed small (nothing walked the buffer).

CUDA sources: csrc/cuda keeps every offset in int64 (``Rows`` / ``KArgs`` strides, ``row_offset(n, T, sb, st)``
with n = blockIdx.x widened before ``n / T``, ``b * sb + t * st`` in int64; in-row indices int64), and the
emulated run above executes exactly that code. The Triton kernel's offsets: tests/test_triton_backend.py::
test_64bit_row_offsets (a probe kernel; the interpreter copies tensor arguments, so a sparse buffer would be
touched in full there).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_rule, backend_for_test, check_logprobs, check_loss, one_thread

import grpo_kernels as gk
from grpo_kernels import logp_loss, reference
from grpo_kernels.config import GRPOConfig

GiB = 2**30



class _Over(torch.autograd.Function):
    """An output that requires grad over memory made by ``make`` (no copy), as a model's logits are: not a
    leaf and not a view of one (inplace=True refuses both, since it would overwrite their values)."""

    @staticmethod
    def forward(ctx, anchor, make):
        v = make()  # a view; returned from a Function it could not be written in place, so an alias that is not one
        return torch.empty(0, dtype=v.dtype).set_(v.untyped_storage(), v.storage_offset(), v.shape, v.stride())

    @staticmethod
    def backward(ctx, g):
        return None, None


def non_leaf_over(make):
    return _Over.apply(torch.zeros((), requires_grad=True), make)

def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# --------------------------------------------------------------------------------------------------
# a real batch of more than 2^31 elements
# --------------------------------------------------------------------------------------------------
def fill_distinct_rows(x2d: torch.Tensor, seed: int, chunk: int = 256) -> None:
    """Rows of N(0, 2^2) logits, every row different: 256 random base rows, rotated along V by a different
    shift for each chunk of 256 rows (a row read from the wrong place would hold other values at its id)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(chunk, x2d.shape[1], generator=g) * 2).to(x2d.dtype)
    V = x2d.shape[1]
    with torch.no_grad():
        for c0 in range(0, x2d.shape[0], chunk):
            blk = x2d[c0 : c0 + chunk]
            k = blk.shape[0]
            s = (c0 // chunk * 7919) % V
            blk[:, : V - s].copy_(base[:k, s:])
            blk[:, V - s :].copy_(base[:k, :s])


def weights_at(logps, cfg, inputs):
    """dL/dlogp of the float64 loss math at the given (kernel) log-probs: the weight each row's gradient must
    carry (O(N), no logits needed)."""
    with one_thread():
        lp = logps.double().clone().requires_grad_()
        loss, _ = logp_loss.loss_from_logps(lp, cfg, inputs["advantages"].double(), inputs["completion_mask"],
                                            inputs["old_logps"].double())
        (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g


def check_rows_grad(kernel_rows, rows, ids_rows, g_rows, tau, what):
    """kernel gradient rows against g * d logp / d x of the float64 reference and of torch in bf16."""
    with one_thread():
        r = rows.double().requires_grad_()
        (reference.token_logprobs(r, ids_rows, tau) * g_rows).sum().backward()
        s = rows.clone().requires_grad_()
        (reference.token_logprobs(s, ids_rows, tau) * g_rows.float()).sum().backward()
    assert_rule(kernel_rows, r.grad, s.grad, what)


@pytest.mark.slow
def test_cpu_backend_more_than_2_31_elements():
    B, T, V = 4, 4160, 131_079
    N = B * T
    first_past = -(-(2**31) // V)  # the first row that starts at or beyond element 2^31
    assert N * V > 2**31 and first_past < N - 200
    need = N * V * 2 / GiB + 1.0
    if mem_available_gib() < need + 1.0:
        pytest.skip(f"needs ~{need:.1f} GiB of free memory, {mem_available_gib():.1f} GiB available")
    try:  # VmHWM := VmRSS, to measure this test's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss0 = status_mib("VmRSS")
    tau = 0.9
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    rows = sorted({0, 1, T - 1, T, first_past - 1, first_past, first_past + 1, N - T, N - 2, N - 1,
                   *torch.randint(0, N, (6,), generator=g).tolist()})
    rows_t = torch.tensor(rows)
    mask.view(-1)[rows_t] = True
    inputs = dict(completion_mask=mask, advantages=torch.randn(B, generator=g),
                  old_logps=-12.3 + 0.3 * torch.randn(B, T, generator=g))
    ids_rows = ids.view(-1)[rows_t]

    x = torch.empty(B, T, V, dtype=torch.bfloat16)
    x2d = x.view(N, V)
    fill_distinct_rows(x2d, seed=1)
    saved = x2d[rows_t].clone()

    # forward kernel: log-probs and entropy of every row, no gradient
    with torch.no_grad():
        logp, ent = gk.token_logprobs(x, ids, temperature=tau, return_entropy=True, backend="cpu")
    with one_thread():
        r_logp, r_ent = reference.token_logprobs(saved.double(), ids_rows, tau, True)
        s_logp, s_ent = reference.token_logprobs(saved, ids_rows, tau, True)
    assert_rule(logp.view(-1)[rows_t], r_logp, s_logp, "logp, rows past 2^31")
    assert_rule(ent.view(-1)[rows_t], r_ent, s_ent, "entropy, rows past 2^31")

    # single-pass kernel (token level), the gradient written into the logits (inplace)
    for level in ("token", "sequence"):
        if level == "sequence":  # fresh logits for the forward + backward kernels
            fill_distinct_rows(x2d, seed=2)
            saved = x2d[rows_t].clone()
        cfg = GRPOConfig(loss_type="grpo" if level == "sequence" else "dapo", importance_sampling_level=level,
                         temperature=tau)
        inp = non_leaf_over(lambda: x.detach()[:])  # inplace may overwrite the buffer
        out = gk.grpo_loss_with_config(inp, ids, cfg, inplace=True, backend="cpu", **inputs)
        (grad,) = torch.autograd.grad(out.loss, inp)
        assert grad.data_ptr() == x.data_ptr(), "inplace: the gradient lives in the logits' buffer"
        with one_thread():
            r_lp = reference.token_logprobs(saved.double(), ids_rows, tau)
            s_lp = reference.token_logprobs(saved, ids_rows, tau)
        assert_rule(out.logps.view(-1)[rows_t], r_lp, s_lp, f"logps ({level} level), rows past 2^31")
        loss64, w = weights_at(out.logps, cfg, inputs)
        assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item())), (out.loss, loss64)
        check_rows_grad(grad.view(N, V)[rows_t], saved, ids_rows, w.view(-1)[rows_t], tau,
                        f"dL/dlogits ({level} level), rows past 2^31")
    if hwm_reset:
        peak = status_mib("VmHWM") - rss0
        print(f"\n64-bit CPU test: peak extra memory {peak / 1024:.2f} GiB for {N * V * 2 / GiB:.2f} GiB of logits")
        assert peak < 6 * 1024, f"peak extra memory {peak / 1024:.2f} GiB"


# --------------------------------------------------------------------------------------------------
# offsets past 2^32 on a sparse buffer (every backend whose launcher takes CPU pointers)
# --------------------------------------------------------------------------------------------------
# (dtype, B, T, strides): bf16 rows start up to 2^32 + 2^30 + 13 (10.7 GB reserved); fp32 past 2^31 (8.6 GB)
SPARSE = [(torch.bfloat16, 3, 2, (2**31 + 5, 2**30 + 3)), (torch.float32, 2, 3, (2**31 + 5, 67))]


@pytest.mark.parametrize("name", ["cpu", "cuda_emu", "cuda_emu_3pass"])  # cuda_emu: the 2-pass cluster kernel
@pytest.mark.parametrize("dtype,B,T,strides", SPARSE, ids=["bf16 past 2^32", "fp32 past 2^31"])
def test_row_offsets_past_2_32_without_the_memory(name, dtype, B, T, strides, request):
    backend, device = backend_for_test(name, request)
    V = 64
    sb, st = strides
    size = (B - 1) * sb + (T - 1) * st + V
    rss0 = status_mib("VmRSS")
    try:
        big = torch.empty(size, dtype=dtype)  # reserved, not committed: only the pages written below are
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {size * (2 if dtype == torch.bfloat16 else 4) / GiB:.1f} GiB of address "
                    f"space here: {e}")
    x = big.as_strided((B, T, V), (sb, st, 1))
    assert max(b * sb + t * st for b in range(B) for t in range(T)) > (2**32 if dtype == torch.bfloat16 else 2**31)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x.copy_(torch.randn(B, T, V, generator=g) * 2)
    ids = torch.randint(0, V, (B, T), generator=g)
    small = x.clone()  # the same rows, contiguous (what the reference sees)

    # forward + backward kernels (the gradient goes to a fresh small buffer)
    check_logprobs(x, ids, 0.8, backend, device, entropy=True)
    # single-pass kernel, inplace (the output rows are at the same far offsets) and forward + backward, inplace
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1] = False
    lp = reference.token_logprobs(small.double(), ids, 0.8)
    inputs = dict(completion_mask=mask, advantages=torch.randn(B, generator=g),
                  old_logps=(lp + 0.3 * torch.randn(B, T, generator=g)).float(),
                  ref_logps=(lp + 0.3 * torch.randn(B, T, generator=g)).float())
    for level in ("token", "sequence"):
        cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04, temperature=0.8)
        with torch.no_grad():
            x.copy_(small)
        inp = non_leaf_over(lambda: big.detach().as_strided((B, T, V), (sb, st, 1)))
        out = gk.grpo_loss_with_config(inp, ids, cfg, inplace=True, backend=backend, **inputs)
        (grad,) = torch.autograd.grad(out.loss, inp)
        assert grad.data_ptr() == big.data_ptr() and grad.stride() == (sb, st, 1), "written in place, far rows"
        k = (out.loss.detach(), out.logps, grad.detach().clone(), out.metrics)
        check_loss(small, ids, cfg, backend, inputs, kernel_outputs=k)
    assert status_mib("VmRSS") - rss0 < 512, "something walked the reserved buffer"

