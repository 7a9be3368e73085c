"""``backend="cuda"``: the launchers of the CUDA kernels (``csrc/cuda`` via ``grpo_kernels._cuda``).

The extension takes raw device pointers, shapes, element strides, dtype codes and the caller's stream
(``torch.cuda.current_stream().cuda_stream``); it links no libtorch and its cudart is static. This module
turns tensors into those arguments and allocates the outputs (layout contract: ``base.py``). Kernels are
enqueued on the current stream of the logits' device and not waited for.

:class:`CudaLaunchers` is also what the tests use with the CPU emulation of the same kernels (a module built
from the same sources against ``csrc/emu/cuda_emu.h``, taking host pointers): ``device_type="cpu"`` there.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from .base import TokenLossParams

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CudaLaunchers:
    """The :class:`~grpo_kernels.backends.base.Launchers` of the CUDA kernels.

    ``module``: the extension module, or a callable returning it (imported on first use); ``device_type``:
    where the tensors live ("cuda"; "cpu" for the emulated module); ``block``: threads per block, 0 = the
    kernels' default for V (tests set it to exercise several warp counts); ``cluster``: the fused kernel,
    0 = the extension's choice (the 2-pass cluster kernel on sm_90+ where a row fits the shared memory of a
    cluster, else the 3-pass kernel), 1 = always the 3-pass kernel, 2 / 4 / 8 = the cluster kernel with that
    many blocks per row (tests use these to run both kernels).
    """

    def __init__(self, module, device_type: str = "cuda", block: int = 0, cluster: int = 0):
        if cluster not in (0, 1, 2, 4, 8):
            raise ValueError(f"cluster must be 0 (choose), 1 (3-pass kernel), 2, 4 or 8, got {cluster!r}")
        self._module, self.device_type, self.block, self.cluster = module, device_type, int(block), int(cluster)

    @property
    def module(self):
        if callable(self._module) and not hasattr(self._module, "logprobs_fwd"):
            self._module = self._module()
        return self._module

    # ---- argument helpers ----------------------------------------------------------------------
    def _check_device(self, t: torch.Tensor, name: str) -> None:
        if t.device.type != self.device_type:
            raise ValueError(f"{name} must be on a {self.device_type} device, got {t.device}")

    def _rows(self, logits: torch.Tensor) -> tuple:
        """-> (ptr, dtype code, B, T, V, stride_b, stride_t) of a [B, T, V] tensor with stride 1 along V."""
        if logits.dim() != 3:
            raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
        if logits.dtype not in _DTYPE_CODE:
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        self._check_device(logits, "logits")
        B, T, V = logits.shape
        if V > 1 and logits.stride(2) != 1:
            raise ValueError(f"logits must have stride 1 along V, got strides {logits.stride()}")
        return (logits.data_ptr(), _DTYPE_CODE[logits.dtype], B, T, V, logits.stride(0), logits.stride(1))

    def _vec(self, t: torch.Tensor | None, n: int, name: str, like: torch.Tensor, dtype=torch.float32) -> int:
        """Pointer of an [n] contiguous vector on the logits' device (0 for None)."""
        if t is None:
            return 0
        if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != like.device:
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of {n} elements on {like.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
        return t.data_ptr()

    @staticmethod
    def _out(out: torch.Tensor, logits: torch.Tensor) -> tuple:
        if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
                or (out.shape[2] > 1 and out.stride(2) != 1)):
            raise ValueError(f"out must be {logits.dtype} of shape {tuple(logits.shape)} on {logits.device} with "
                             f"stride 1 along V, got {out.dtype} {tuple(out.shape)} on {out.device} "
                             f"strides {out.stride()}")
        return (out.data_ptr(), out.stride(0), out.stride(1))

    def _launch_ctx(self, logits: torch.Tensor):
        """(context manager, stream handle): the logits' device made current, its current stream."""
        if self.device_type != "cuda":
            return contextlib.nullcontext(), 0
        return torch.cuda.device(logits.device), torch.cuda.current_stream(logits.device).cuda_stream

    def _f32(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=like.device)

    # ---- the three launchers -------------------------------------------------------------------
    def logprobs_fwd(self, logits, ids, tau, want_entropy):
        rows = self._rows(logits)
        n = rows[2] * rows[3]
        logp = self._f32(n, logits)
        stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)  # (m, log s) per row
        ent = self._f32(n if want_entropy else 0, logits)
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.logprobs_fwd(*rows, self._vec(ids, n, "ids", logits, torch.int64), float(tau), logp.data_ptr(),
                                     stats.data_ptr(), ent.data_ptr() if want_entropy else 0, stream, self.block)
        return logp, stats, ent

    def logprobs_bwd(self, logits, ids, stats, entropy, g_logp, g_ent, tau, out):
        rows = self._rows(logits)
        n = rows[2] * rows[3]
        if (entropy is None) != (g_ent is None):
            raise ValueError("entropy and g_ent must both be given or both be None")
        v = lambda t, name, dt=torch.float32: self._vec(t, n, name, logits, dt)  # noqa: E731
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.logprobs_bwd(*rows, v(ids, "ids", torch.int64), self._vec(stats, 2 * n, "stats", logits),
                                     v(entropy, "entropy"), v(g_logp, "g_logp"), v(g_ent, "g_ent"), float(tau), *self._out(out, logits),
                                     stream, self.block)

    def fused_fwd_bwd(self, logits, ids, tau, old, ref, adv, coef, params: TokenLossParams, out):
        rows = self._rows(logits)
        n = rows[2] * rows[3]
        if params.beta != 0.0 and ref is None:
            raise ValueError("ref (reference log-probs) is required when beta != 0")
        logp, ent = self._f32(n, logits), self._f32(n, logits)
        v = lambda t, name, dt=torch.float32: self._vec(t, n, name, logits, dt)  # noqa: E731
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.fused_fwd_bwd(
                *rows, v(ids, "ids", torch.int64), float(tau), v(old, "old"),
                v(ref if params.beta != 0.0 else None, "ref"), v(adv, "adv"), v(coef, "coef"),
                int(params.loss_code), params.epsilon_low, params.epsilon_high, bool(params.has_delta), params.delta,
                params.beta, bool(params.bias_correction_kl), params.sapo_temperature_pos,
                params.sapo_temperature_neg, logp.data_ptr(), ent.data_ptr(), *self._out(out, logits), stream,
                self.block, self.cluster,
            )
        return logp, ent


def _import_cuda_module():
    return importlib.import_module("grpo_kernels._cuda")


LAUNCHERS = CudaLaunchers(_import_cuda_module)
