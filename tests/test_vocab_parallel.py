"""grpo_kernels.vocab_parallel on 2 gloo processes on the CPU against the unsharded float64 reference.

Each worker builds the same full inputs, keeps its rank's vocabulary columns (the uneven shards as a strided
view whose (B, T) dims do not merge, which the fused kernels take with its strides), runs the vocab-parallel
functions and compares values and the gradient of ITS shard with the columns of the full-logits gradient
of the eager reference (``backend="torch"``). fp32 runs on every backend available for CPU tensors (the eager
per-shard path ``torch``, the C++ kernels ``cpu`` and, under the interpreter, ``triton``); float64 only on
``torch``. Float64 inputs must agree to float64 rounding (1e-10
relative: only the order of the sums over V differs); fp32 inputs within 5e-6 relative of the float64 truth
(fp32 sums over V = 39 terms of O(1) values, a few ulp). One spawn runs every case, to pay the process
start-up once; a failing check raises in the worker and mp.spawn re-raises it here with its traceback.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_bad_inputs import readme_message_regex  # the message of a row of docs/bad-inputs.md

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels import vocab_parallel as vp

WORLD = 2
B, T, V = 4, 3, 39  # V odd: with the default equal shards V must divide; the uneven cases pass vocab_start
SPLIT = (22, 17)  # uneven shards for the explicit-vocab_start cases
BACKENDS = gk.available_backends("cpu")
F64_TOL, F32_TOL = dict(rtol=1e-10, atol=1e-12), dict(rtol=5e-6, atol=5e-6)
RUNS = [(torch.float64, F64_TOL, "torch")] + [(torch.float32, F32_TOL, b) for b in BACKENDS]


def full_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    logits[1, 2, :10] = float("-inf")  # banned tokens, a whole prefix: part of rank 0's shard
    ids = torch.randint(10, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.9, -1.2, 0.4, -0.3])
    lp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return dict(logits=logits, ids=ids, mask=mask, adv=adv, old=old, ref=ref)


def shard_of(full, rank, uneven):
    if uneven:
        start = sum(SPLIT[:rank])
        return full[..., start : start + SPLIT[rank]], start
    v = full.shape[-1] // WORLD
    return full[..., rank * v : (rank + 1) * v], None


LOSS_CASES = [
    dict(loss_type="grpo", beta=0.04, delta=1.6, temperature=0.8),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04, num_items_in_batch=11),
    dict(loss_type="dapo", num_items_in_batch=torch.tensor(11.0)),
    dict(loss_type="bnpo", importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", max_completion_length=5, beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="cispo", epsilon_high=1.2, beta=0.04),
    dict(loss_type="sapo", importance_sampling_level="sequence"),
]


def strided_copy(x):
    """A copy of [B, T, V_r] ``x`` laid out as the view ``buf[:, 1:T+1, 2:V_r+2]`` of a padded buffer: its (B, T)
    dims do not merge (what ``model_logits[:, P-1:-1]`` looks like), so a reshape to [N, V_r] would copy."""
    b, t, v = x.shape
    out = torch.empty(b, t + 2, v + 3, dtype=x.dtype)[:, 1 : t + 1, 2 : v + 2]
    return out.copy_(x.detach())


def _close(a, b, tol, what):
    torch.testing.assert_close(a, b, **tol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def _check_all(rank):
    for dtype, tol, backend in RUNS:
        for uneven in (False, True):
            x = full_inputs(dtype)
            if not uneven:  # default equal shards need V % world == 0: drop the last column
                x["logits"] = x["logits"][..., : V - 1].contiguous()
                x["ids"] = x["ids"].clamp(max=V - 2)
            full64 = x["logits"].detach().double().clone().requires_grad_(True)
            shard, start = shard_of(x["logits"], rank, uneven)
            shard = (strided_copy(shard) if uneven else shard.detach().clone()).requires_grad_(True)
            tag = f"{dtype} {backend} uneven={uneven} rank={rank}"

            # token_logprobs: values and the gradient of a combination of logp and entropy
            w1, w2 = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
            lp, ent = vp.token_logprobs(shard, x["ids"], vocab_start=start, temperature=0.7, return_entropy=True,
                                        backend=backend)
            rlp, rent = reference.token_logprobs(full64, x["ids"], 0.7, True)
            _close(lp.double(), rlp.detach(), tol, f"logp {tag}")
            _close(ent.double(), rent.detach(), tol, f"entropy {tag}")
            ((lp.double() * w1).sum() + (ent.double() * w2).sum()).backward()
            ((rlp * w1).sum() + (rent * w2).sum()).backward()
            ref_shard_grad, _ = shard_of(full64.grad, rank, uneven)
            assert torch.isfinite(shard.grad).all()
            _close(shard.grad.double(), ref_shard_grad, tol, f"token_logprobs grad {tag}")

            # grpo_loss for several loss types / levels
            for case in LOSS_CASES:
                shard.grad, full64.grad = None, None
                kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"],
                          **case)
                out = vp.grpo_loss(shard, x["ids"], vocab_start=start, backend=backend, **kw)
                out.loss.backward()
                r = gk.grpo_loss(full64, x["ids"], backend="torch", **kw)
                r.loss.backward()
                what = f"{case} {tag}"
                _close(out.loss.double(), r.loss.detach(), tol, f"loss {what}")
                _close(out.logps.double(), r.logps.double(), dict(rtol=1e-6, atol=1e-6), f"logps {what}")
                assert out.metrics.keys() == r.metrics.keys(), what
                for k in r.metrics:
                    _close(out.metrics[k].double(), r.metrics[k].double(), dict(rtol=1e-5, atol=1e-6), f"{k} {what}")
                ref_shard_grad, _ = shard_of(full64.grad, rank, uneven)
                _close(shard.grad.double(), ref_shard_grad, tol, f"grpo_loss grad {what}")
                assert shard.grad.abs().sum() > 0, what

    # garbage at masked positions: NaN logits and out-of-vocabulary ids there change nothing
    x = full_inputs(torch.float32, seed=1)
    logits = x["logits"][..., : V - 1].contiguous()
    ids = x["ids"].clamp(max=V - 2)
    shard, start = shard_of(logits, rank, False)
    bad_ids = ids.masked_fill(~x["mask"], 10_000)
    kw = dict(completion_mask=x["mask"], advantages=x["adv"], old_logps=x["old"], ref_logps=x["ref"], beta=0.04,
              importance_sampling_level="sequence")
    for backend in BACKENDS:
        dirty = shard.clone().masked_fill(~x["mask"].unsqueeze(-1), float("nan")).requires_grad_(True)
        clean = shard.clone().requires_grad_(True)
        a = vp.grpo_loss(dirty, bad_ids, backend=backend, **kw)
        a.loss.backward()
        c = vp.grpo_loss(clean, ids, backend=backend, **kw)
        c.loss.backward()
        _close(a.loss, c.loss, dict(rtol=0, atol=0), f"masked garbage loss {backend}")
        _close(dirty.grad, clean.grad, dict(rtol=0, atol=0), f"masked garbage grad {backend}")
    # float64 shards run only on the reference
    with pytest.raises(TypeError, match="float64"):
        vp.token_logprobs(clean.detach().double(), ids, backend="cpu")

    # an id outside the global vocabulary at a kept position: every rank raises (no hang)
    with pytest.raises(ValueError, match="outside the global vocabulary"):
        vp.token_logprobs(clean, ids.masked_fill(torch.ones_like(x["mask"]), V + 5))
    # overlapping shards are detected
    with pytest.raises(ValueError, match=readme_message_regex("vocab_parallel-overlapping-shards")):
        vp.token_logprobs(clean, torch.zeros_like(ids), vocab_start=0)
    # bad arguments name themselves
    with pytest.raises(ValueError, match="vocab_start"):
        vp.token_logprobs(clean, ids, vocab_start=-1)
    with pytest.raises(ValueError, match="ids"):
        vp.token_logprobs(clean, ids[:, :2])
    with pytest.raises(ValueError, match="logits_shard"):
        vp.grpo_loss(clean[0], ids, advantages=x["adv"])
    with pytest.raises(ValueError, match="ref_logps"):
        vp.grpo_loss(clean, ids, advantages=x["adv"], beta=0.1)


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same random weights w1, w2 on every rank
        _check_all(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_vocab_parallel_on_two_gloo_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)


def test_needs_an_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vp.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
