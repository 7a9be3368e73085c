"""The CPU gradient buffer cache (grpo_kernels/_memory.py): a buffer is handed out again only when nothing
else refers to it, and what the op writes into a reused buffer is the same gradient as into a fresh one."""

import pytest
import torch

import grpo_kernels
from grpo_kernels import _memory

pytestmark = pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"),
                                reason="the C++ CPU module is not built")

B, T, V = 1, 64, 80000  # N x V fp32 = 20 MB (half of it 10 MB): above the size the cache starts at (8 MiB)


def _batch(seed, t=T):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, t, V, generator=g)
    return logits, torch.randint(0, V, (B, t), generator=g), torch.randn(B, generator=g)


def _grad(logits, ids, adv, backend):
    x = logits.clone().requires_grad_(True)
    grpo_kernels.grpo_loss(x, ids, advantages=adv, beta=0.0, backend=backend).loss.backward()
    return x.grad


@pytest.fixture(autouse=True)
def empty_cache():
    _memory.release_cached()
    yield
    _memory.release_cached()


def test_a_held_gradient_is_never_reused_and_a_dropped_one_is():
    a, b = _batch(0), _batch(1)
    want_a = _grad(*a, "torch")
    g1 = _grad(*a, "cpu")
    snapshot = g1.clone()
    g2 = _grad(*b, "cpu")  # g1 is still held: the second call must get another buffer
    assert g2.untyped_storage().data_ptr() != g1.untyped_storage().data_ptr()
    assert torch.equal(g1, snapshot)
    ptr2 = g2.untyped_storage().data_ptr()
    view = g2[0, :3]  # a view keeps the buffer in use as well
    del g2
    g3 = _grad(*a, "cpu")
    assert ptr2 not in (g3.untyped_storage().data_ptr(),)
    del view, g3
    g4 = _grad(*a, "cpu")  # every other owner is gone: a cached buffer is handed out again
    assert g4.untyped_storage().data_ptr() in {s.data_ptr() for s in _memory._cache}
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(g4, want_a, rtol=0, atol=64 * eps * want_a.abs().max().item())


def test_a_smaller_request_uses_a_larger_free_buffer_and_cache_is_bounded():
    big = _grad(*_batch(0), "cpu")
    ptr = big.untyped_storage().data_ptr()
    del big
    small = _batch(1, t=T // 2)
    g = _grad(*small, "cpu")
    assert g.untyped_storage().data_ptr() == ptr and g.shape == (B, T // 2, V)
    want = _grad(*small, "torch")
    torch.testing.assert_close(g, want, rtol=0, atol=64 * torch.finfo(torch.float32).eps * want.abs().max().item())
    held = [_grad(*_batch(s), "cpu") for s in range(4)]  # all in use: each call allocates
    assert len({h.untyped_storage().data_ptr() for h in held}) == 4
    assert len(_memory._cache) <= _memory._SLOTS
    assert _memory.release_cached() > 0 and _memory.cached_bytes() == 0


def test_small_buffers_are_not_cached():
    x = torch.randn(2, 8, 50, requires_grad=True)
    grpo_kernels.grpo_loss(x, torch.randint(0, 50, (2, 8)), advantages=torch.randn(2), backend="cpu").loss.backward()
    assert _memory.cached_bytes() == 0
