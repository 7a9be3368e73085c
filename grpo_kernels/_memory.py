"""The N x V gradient buffer: allocated once per call, and on Linux CPUs backed by transparent huge pages.

A fresh [N, V] buffer is memory the process has never touched: on the CPU each 4 KiB page costs a page fault
and a zeroing by the kernel on its first write, which for N=2,048, V=32,000 fp32 (250 MiB, 64,000 faults)
took longer than the fused kernel itself (measured: ~85 ms against ~35 ms). Asking for transparent huge
pages (``madvise(MADV_HUGEPAGE)``) before the first touch makes that 125 faults of 2 MiB. It is only a hint:
where THP is disabled ("never") or the call fails, nothing changes. torch's own switch for this,
``THP_MEM_ALLOC_ENABLE=1``, applies to every allocation and is read once at start-up; this applies it to
the one buffer that matters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_HUGE = 2 * 2**20
_MIN_BYTES = 4 * _HUGE  # smaller buffers gain nothing worth a system call
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


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


def empty_grad(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised gradient buffer (contiguous), with the huge-page hint on the CPU."""
    out = torch.empty(shape, dtype=dtype, device=device)
    hint_huge_pages(out)
    return out
