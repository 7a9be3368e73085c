"""``backend="cuda"``: the launchers of the CUDA kernels (``csrc/cuda`` via ``grpo_kernels._cuda``).

The extension takes the boundary structs of ``csrc/include/grpo_boundary.h`` (raw device pointers, shapes,
element strides, dtype codes) and the caller's stream (``torch.cuda.current_stream().cuda_stream``); it links
no libtorch and its cudart is static. This module builds the structs from tensors and allocates the outputs
(layout contract: ``base.py``). Kernels are
enqueued on the current stream of the logits' device and not waited for.

:class:`CudaLaunchers` is also what the tests use with the CPU emulation of the same kernels (a module built
from the same sources against ``csrc/emu/cuda_emu.h``, taking host pointers): ``device_type="cpu"`` there.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from .base import LossParams, native

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CudaLaunchers:
    """The :class:`~grpo_kernels.backends.base.Launchers` of the CUDA kernels.

    ``module``: the extension module, or a callable returning it (imported on first use); ``device_type``:
    where the tensors live ("cuda"; "cpu" for the emulated module); ``block``: threads per block, 0 = the
    kernels' default for V (tests set it to exercise several warp counts); ``cluster``: the fused kernel,
    0 = the extension's choice (the 2-pass cluster kernel on sm_90+ where a row fits the shared memory of a
    cluster, else the 3-pass kernel), 1 = always the 3-pass kernel, 2 / 4 / 8 = the cluster kernel with that
    many blocks per row (tests and bench.gpu use these to run both kernels).
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

    def _rows(self, logits: torch.Tensor, ids: torch.Tensor, tau):
        """The module's ``Rows`` of a [B, T, V] tensor with stride 1 along V."""
        if logits.dim() != 3:
            raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
        if logits.dtype not in _DTYPE_CODE:
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        self._check_device(logits, "logits")
        B, T, V = logits.shape
        if V > 1 and logits.stride(2) != 1:
            raise ValueError(f"logits must have stride 1 along V, got strides {logits.stride()}")
        return native(self.module.Rows, logits=logits.data_ptr(), dtype=_DTYPE_CODE[logits.dtype], B=B, T=T, V=V,
                      stride_b=logits.stride(0), stride_t=logits.stride(1),
                      ids=self._vec(ids, B * T, "ids", logits, torch.int64), tau=float(tau))

    def _vec(self, t: torch.Tensor | None, n: int, name: str, like: torch.Tensor, dtype=torch.float32) -> int:
        """Pointer of an [n] contiguous vector on the logits' device (0 for None)."""
        if t is None:
            return 0
        if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != like.device:
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of {n} elements on {like.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
        return t.data_ptr()

    @staticmethod
    def _grad(out: torch.Tensor, logits: torch.Tensor) -> dict:
        if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
                or (out.shape[2] > 1 and out.stride(2) != 1)):
            raise ValueError(f"out must be {logits.dtype} of shape {tuple(logits.shape)} on {logits.device} with "
                             f"stride 1 along V, got {out.dtype} {tuple(out.shape)} on {out.device} "
                             f"strides {out.stride()}")
        return dict(grad=out.data_ptr(), grad_stride_b=out.stride(0), grad_stride_t=out.stride(1))

    def _launch_ctx(self, logits: torch.Tensor):
        """(context manager, stream handle): the logits' device made current, its current stream."""
        if self.device_type != "cuda":
            return contextlib.nullcontext(), 0
        return torch.cuda.device(logits.device), torch.cuda.current_stream(logits.device).cuda_stream

    def _f32(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=like.device)

    # ---- the three launchers -------------------------------------------------------------------
    def logprobs_fwd(self, logits, ids, tau, want_entropy):
        rows = self._rows(logits, ids, tau)
        n = rows.B * rows.T
        logp = self._f32(n, logits)
        stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)  # (m, log s) per row
        ent = self._f32(n if want_entropy else 0, logits)
        out = native(self.module.Outputs, logp=logp.data_ptr(), stats=stats.data_ptr(),
                     entropy=ent.data_ptr() if want_entropy else 0)
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.logprobs_fwd(rows, out, stream, self.block)
        return logp, stats, ent

    def logprobs_bwd(self, logits, ids, stats, entropy, g_logp, g_ent, tau, out):
        rows = self._rows(logits, ids, tau)
        n = rows.B * rows.T
        if (entropy is None) != (g_ent is None):
            raise ValueError("entropy and g_ent must both be given or both be None")
        v = lambda t, name: self._vec(t, n, name, logits)  # noqa: E731
        inputs = native(self.module.TokenInputs, stats=self._vec(stats, 2 * n, "stats", logits),
                        entropy=v(entropy, "entropy"), g_logp=v(g_logp, "g_logp"), g_entropy=v(g_ent, "g_ent"))
        outputs = native(self.module.Outputs, **self._grad(out, logits))
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.logprobs_bwd(rows, inputs, outputs, stream, self.block)

    def fused_fwd_bwd(self, logits, ids, tau, old, ref, adv, coef, params: LossParams, out):
        rows = self._rows(logits, ids, tau)
        n = rows.B * rows.T
        if params.beta != 0.0 and ref is None:
            raise ValueError("ref (reference log-probs) is required when beta != 0")
        logp, ent = self._f32(n, logits), self._f32(n, logits)
        v = lambda t, name: self._vec(t, n, name, logits)  # noqa: E731
        inputs = native(self.module.TokenInputs, old_logps=v(old, "old"),
                        ref_logps=v(ref if params.beta != 0.0 else None, "ref"), advantages=v(adv, "adv"),
                        coef=v(coef, "coef"))
        outputs = native(self.module.Outputs, logp=logp.data_ptr(), entropy=ent.data_ptr(),
                         **self._grad(out, logits))
        ctx, stream = self._launch_ctx(logits)
        with ctx:
            self.module.fused_fwd_bwd(rows, inputs, params.to_native(self.module), outputs, stream, self.block,
                                      self.cluster)
        return logp, ent


def _import_cuda_module():
    return importlib.import_module("grpo_kernels._cuda")


LAUNCHERS = CudaLaunchers(_import_cuda_module)
