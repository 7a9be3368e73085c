"""The N x V gradient buffer on the CPU: reused from call to call, and backed by transparent huge pages.

A fresh [N, V] buffer is memory the process has never touched: glibc serves a buffer this large with a new
``mmap`` and returns it to the OS on free, so every call would pay one page fault and one zeroing by the kernel
per page on its first write. For N=2,048, V=32,000 fp32 (250 MiB) that is 64,000 faults of 4 KiB, which cost
more than the fused kernel itself. Two things remove that cost:

- reuse: the buffer of the previous call is handed out again once nothing else holds it (its storage's only
  owner is this cache: the gradient was consumed by the backward, or the caller dropped ``.grad``). It is
  never handed out while any tensor, view or numpy array still refers to it. A larger cached buffer serves a
  smaller request (the completion length changes from step to step); a request larger than every cached buffer
  allocates a new one, which replaces the smallest. At most ``_SLOTS`` buffers are kept; this is the memory a
  step needs at its peak anyway, held between steps; :func:`release_cached` frees it.
- huge pages: a new buffer is advised ``MADV_HUGEPAGE`` before its first touch (125 faults of 2 MiB instead of
  64,000 of 4 KiB). Only a hint: where THP is disabled ("never") or the call fails, nothing changes. torch's
  own switch, ``THP_MEM_ALLOC_ENABLE=1``, applies to every allocation and is read once at start-up; this applies
  it to the one buffer that matters.

CUDA buffers go through torch's caching allocator, which already reuses memory: nothing here applies to them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

import torch

_HUGE = 2 * 2**20
_MIN_BYTES = 4 * _HUGE  # smaller buffers gain nothing worth a system call or a cache slot
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_SLOTS = 2
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


_lock = threading.Lock()
_cache: list[torch.UntypedStorage] = []


def hint_huge_pages(t: torch.Tensor) -> None:
    """Advise huge pages for the 2 MiB-aligned interior of a CPU tensor's (untouched) storage."""
    if _madvise is None or t.device.type != "cpu" or torch.compiler.is_compiling():
        return
    try:
        start, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    except RuntimeError:  # a fake / functional tensor while tracing (torch.compile, opcheck): no memory
        return
    if nbytes < _MIN_BYTES:
        return
    lo = (start + _HUGE - 1) // _HUGE * _HUGE
    hi = (start + nbytes) // _HUGE * _HUGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # a hint: the result is deliberately ignored


def _free(s: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(s._cdata) == 1  # only the cache's own reference is left


def empty_grad(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous gradient buffer; on the CPU a reused one where a cached buffer is free."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < _MIN_BYTES or torch.compiler.is_compiling():
        out = torch.empty(shape, dtype=dtype, device=device)
        hint_huge_pages(out)
        return out
    with _lock:
        fits = [s for s in _cache if s.nbytes() >= nbytes and _free(s)]
        if fits:
            s = min(fits, key=lambda s: s.nbytes())
            return torch.empty(0, dtype=dtype).set_(s, 0, tuple(shape))
    out = torch.empty(shape, dtype=dtype, device=device)
    hint_huge_pages(out)
    with _lock:
        _cache.append(out.untyped_storage())
        if len(_cache) > _SLOTS:  # drop a free buffer first, else the smallest
            _cache.sort(key=lambda s: (not _free(s), s.nbytes()))
            _cache.pop(0)
    return out


def release_cached() -> int:
    """Drop the cached gradient buffers (their memory returns to the OS once no tensor uses them); -> bytes."""
    with _lock:
        n = sum(s.nbytes() for s in _cache)
        _cache.clear()
    return n


def cached_bytes() -> int:
    with _lock:
        return sum(s.nbytes() for s in _cache)
