"""Determinism: every fused backend gives bit-identical results run to run (loss, logps, metrics, dL/dlogits of
grpo_loss at both importance levels, i.e. the single-pass and the two-pass kernels; log-probs, entropy and
their gradient of token_logprobs), and the C++ CPU kernels also with any number of OpenMP threads (a row is
reduced by one thread in a fixed order, whatever the partition of the rows).

Backends: "cpu", "triton" (the interpreter here), "cuda_emu" (the CUDA kernels on the CPU emulator, whose
threads of a block really run concurrently: a reduction whose order depended on timing would show here), and
"cuda" where there is a GPU.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, backend_for_test, loss_outputs, make_logits

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels.config import GRPOConfig

BACKENDS = ["cpu", "triton", "cuda_emu"] + (["cuda"] if torch.cuda.is_available() else [])
RUNS = 3


def batch(B, T, V, dtype, seed=0):
    """A strided batch with banned tokens, a masked row of NaN garbage, off-policy ratios and a KL term."""
    torch.manual_seed(seed)
    x = make_logits(B, T, V, dtype, strided=True)
    x[0, 0, :7] = float("-inf")
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    mask[0, 0], mask[1] = True, False
    x[1] = float("nan")
    lp = reference.token_logprobs(x.double(), ids, mask=mask)
    inputs = dict(completion_mask=mask, advantages=torch.randn(B), old_logps=(lp + 0.3 * torch.randn(B, T)).float(),
                  ref_logps=(lp + 0.3 * torch.randn(B, T)).float())
    return x, ids, inputs


def outputs(x, ids, inputs, backend, device):
    """Everything a training step reads: the loss path at both levels (inplace too) and token_logprobs."""
    res = []
    for level, inplace in (("token", False), ("sequence", False), ("token", True)):
        cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04, temperature=0.9)
        loss, logps, grad, metrics = loss_outputs(x, ids, cfg, backend, inputs, inplace=inplace, device=device)
        res += [loss, logps, grad, *(metrics[k] for k in sorted(metrics))]
    xi = x.detach().to(device).requires_grad_()
    mask = inputs["completion_mask"]
    logp, ent = gk.token_logprobs(xi, torch.where(mask, ids, 0).to(device), temperature=0.9, return_entropy=True,
                                  backend=backend)
    (torch.where(mask.to(device), logp + 0.5 * ent, 0.0)).sum().backward()
    return res + [logp.detach().cpu(), ent.detach().cpu(), xi.grad.cpu()]


def assert_bitwise_equal(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{what}: output {i}"
        # NaN == NaN bit for bit: compare the raw bytes
        bits = [t.reshape(-1).contiguous().view(torch.uint8) for t in (u, v)]
        assert torch.equal(*bits), f"{what}: output {i} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_run_to_run_bitwise(name, dtype, request):
    backend, device = backend_for_test(name, request)
    slow = name == "cuda_emu" or (name == "triton" and device == "cpu")
    x, ids, inputs = batch(2, 3, 1009, dtype) if slow else batch(4, 16, 1009, dtype)
    first = outputs(x, ids, inputs, backend, device)
    for run in range(1, RUNS if not slow else 2):
        assert_bitwise_equal(first, outputs(x, ids, inputs, backend, device), f"{name} {dtype} run {run}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_thread_count_does_not_change_a_bit(dtype):
    """torch.set_num_threads (which the C++ CPU backend follows) 1, 2, 3 and 5: rows split differently over the
    threads (64 rows, so every thread count leaves some threads a different share), the same bits."""
    backend, _ = backend_for_test("cpu", None)
    x, ids, inputs = batch(4, 16, 1009, dtype, seed=1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = outputs(x, ids, inputs, backend, "cpu")
        for threads in (2, 3, 5):
            torch.set_num_threads(threads)
            assert_bitwise_equal(one, outputs(x, ids, inputs, backend, "cpu"), f"{threads} threads against 1")
    finally:
        torch.set_num_threads(n)
