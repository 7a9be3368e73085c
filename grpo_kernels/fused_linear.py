"""Fused LM head + GRPO loss: the loss and its gradients from hidden states, never all N x V logits.

``fused_linear_grpo_loss(hidden [B, T, H], lm_head_weight [V, H], completion_ids [B, T], ...)`` equals
``grpo_loss(F.linear(hidden, lm_head_weight, lm_head_bias), completion_ids, ...)`` (same options, same
outputs) but processes the N = B*T rows in chunks of ``chunk_size`` rows. Per chunk c (rows r):

    logits_c  = hidden[r] @ W^T (+ b)                      [n, V], in the input dtype
    dlogits_c = dL/dlogits_c from the backend              [n, V], written over logits_c on fused backends
    dL/dhidden[r] = dlogits_c @ W                          [n, H]
    dL/dW        += dlogits_c^T @ hidden[r]                [V, H], accumulated in fp32
    dL/db        += dlogits_c.sum(0)                       [V],    accumulated in fp32

so at most one chunk of logits (and its gradient) exists at a time. Like the fused losses of Liger or
Cut Cross-Entropy, the gradients are computed in the forward pass; the backward only scales them by the
upstream gradient (in place). Two schedules:

- token-level importance weights: the per-token gradient weight g_t = coef_t * dloss_tok/dlogp_t depends
  on the token alone once the reduction weights ``coef`` (mask + global normaliser, incl.
  ``num_items_in_batch`` / ``max_completion_length``) are known, so ONE pass: 3 matmuls per chunk.
- sequence-level weights (GSPO): g_t depends on every log-prob of its sequence, so the forward is pass 1
  (log-probs of all chunks, no gradient), autograd of ``loss_from_logps`` gives g = dL/dlogp [B, T] in
  torch, and the backward is pass 2: recompute each chunk's logits and apply the log-prob backward with
  g (4 matmuls per chunk; the gradients then exist only during backward).

The loss value and the metrics always come from :func:`logp_loss.loss_from_logps` on the gathered [B, T]
log-probs and entropies, the one copy of the loss math, so they equal ``grpo_loss`` on the full logits.

Precision. The chunk's logits are ``F.linear`` in the input dtype, exactly what the model's lm_head
computes in the unfused path; we rely on torch's matmul accumulating bf16/fp16 products in fp32 (cuBLAS
with CUBLAS_COMPUTE_32F, oneDNN / the ATen CPU GEMM), then rounding the output once to the input dtype.
(``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` and TF32 affect this matmul as they
affect the model's own lm_head.) The backends read that chunk and compute in fp32. dL/dW and dL/db sum
over all chunks, so they are accumulated in fp32 buffers and cast once at the end.

torch.compile: each chunk loop is a custom op with a fake kernel (dynamo does not look inside):
``grpo_kernels::fused_linear_grpo`` (single pass, gradients as outputs; ``fused_linear_attach`` carries them
through autograd), ``fused_linear_logprobs`` (pass 1, with ``register_autograd`` whose backward is the op
``fused_linear_logprobs_bwd``, pass 2). The loss value is plain torch. No autograd runs inside an op (an
op's implementation runs below the Autograd dispatch keys), so the "torch" backend writes the softmax
backward out: dlogits = g * (onehot(id) - softmax(z)) / tau, with g from ``logp_loss.token_loss_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import custom_op

from . import _validate, eager, logp_loss
from ._docs import fill
from ._ops import _scalar_is_one, inputs_need_grad
from .api import GRPOLossOutput
from .backends import check_backend_name, launchers, resolve_backend
from .backends.base import LossParams
from .config import GRPOConfig, takes_config_options

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# --------------------------------------------------------------------------------------------------
# chunk size
# --------------------------------------------------------------------------------------------------
# Why these numbers. The chunk is the only O(n x V) memory of the op, so its budget is what the caller
# pays. (1) At most 1/16 of the full N x V logits: the op is then always >= 16x smaller than the unfused
# logits it replaces. (2) At most 256 MiB: beyond a few hundred rows a larger chunk buys nothing (below).
# (3) At least 128 rows (unless N is smaller): the three matmuls per chunk have M = n rows; GEMM
# throughput on CPU (AVX-512 blocking) and on tensor cores (128-row tiles) is near its peak from ~128
# rows, while smaller n wastes the weight read (each chunk reads all V x H of W: the W traffic is
# ceil(N/n) * V*H, and at n >= 128 it stays below the n x V logits traffic for H <= 128 * 4).
# On a GPU the budget is also capped at 1/8 of the free device memory.
CHUNK_BUDGET_BYTES = 256 * 2**20
CHUNK_FRACTION_OF_LOGITS = 16
CHUNK_MIN_ROWS = 128


def _bytes_per_logit(backend: str, dtype: torch.dtype, transform: bool = False) -> int:
    """Bytes a chunk needs per logit: fused backends write the gradient over the chunk's logits (one
    buffer in the input dtype); the reference also holds an fp32 copy, the log-softmax, its exp and the
    fp32 gradient (about 4 fp32 buffers) next to the logits and their gradient in the input dtype. A head
    transform (``logit_scale`` / ``final_logit_softcapping``) adds the transformed logits and their
    derivative in fp32 and the gradient cast back to the input dtype."""
    elem = torch.empty((), dtype=dtype).element_size()
    base = elem if backend != "torch" else 2 * elem + 4 * 4
    return base + (2 * 8 + elem if transform else 0)


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, backend: str,
                       transform: bool = False) -> int:
    """Rows per chunk from the memory budget explained above (always in [1, n_rows])."""
    per_row = vocab * _bytes_per_logit(backend, dtype, transform)
    elem = torch.empty((), dtype=dtype).element_size()
    budget = min(CHUNK_BUDGET_BYTES, n_rows * vocab * elem // CHUNK_FRACTION_OF_LOGITS)
    cap = CHUNK_BUDGET_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = min(cap, free // 8)
    rows = max(budget // per_row, CHUNK_MIN_ROWS)
    rows = min(rows, max(cap // per_row, 1))
    return int(max(1, min(rows, n_rows)))


# --------------------------------------------------------------------------------------------------
# the chunk loop (runs inside the custom op: real tensors only)
# --------------------------------------------------------------------------------------------------
class _Rows:
    """Row chunks of hidden [B, T, H] as [n, H], masked rows zeroed (garbage there must not reach dW)."""

    def __init__(self, hidden: Tensor, mask_flat: Tensor):
        B, T, H = hidden.shape
        self.T, self.H, self.hidden, self.mask = T, H, hidden, mask_flat
        try:
            self.flat = hidden.view(B * T, H)  # no copy for contiguous rows
        except RuntimeError:
            self.flat = None  # e.g. hidden_states[:, P-1:-1]: gather each chunk's rows instead

    def __call__(self, n0: int, n1: int) -> Tensor:
        if self.flat is not None:
            h = self.flat[n0:n1]
        else:
            idx = torch.arange(n0, n1, device=self.hidden.device)
            h = self.hidden[idx // self.T, idx % self.T]
        m = self.mask[n0:n1].unsqueeze(-1)
        return torch.where(m, h, torch.zeros((), dtype=h.dtype, device=h.device))


class _Accumulator:
    """dL/dhidden [N, H] (input dtype), dL/dW [V, H] and dL/db [V] (fp32 sums over chunks)."""

    def __init__(self, hidden, weight, bias, want: list[bool]):
        N, H = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # (separate empty tensors: a custom op's outputs must not alias each other)
        self.gh = hidden.new_empty(N, H) if want[0] else hidden.new_empty(0)
        self.gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else hidden.new_empty(0)
        want_b = want[2] and bias is not None
        self.gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else hidden.new_empty(0)
        self.weight, self.want = weight, want

    def add(self, n0: int, n1: int, h_c: Tensor, dlogits: Tensor) -> None:
        # dlogits [n, V] and h_c [n, H] in the input dtype; each matmul accumulates in fp32 internally.
        if self.want[0]:
            torch.mm(dlogits, self.weight, out=self.gh[n0:n1])
        if self.want[1]:
            if self.gw.dtype == dlogits.dtype:
                self.gw.addmm_(dlogits.t(), h_c)
            else:  # bf16/fp16: one rounded [V, H] product per chunk, summed in fp32
                self.gw.add_(torch.mm(dlogits.t(), h_c))
        if self.gb.numel():
            self.gb.add_(dlogits.sum(0, dtype=self.gb.dtype))

    def add_lora(self, n0: int, n1: int, h_c: Tensor, u: Tensor, dlogits: Tensor, lora: "_LoRA") -> None:
        """The adapter's terms of a chunk with logits = h W^T + s u B^T, u = h A^T: dh += s (D B) A,
        dB += s D^T u, dA += s (D B)^T h (D = dlogits [n, V])."""
        db = torch.mm(dlogits, lora.B)  # [n, r]
        if self.want[0]:
            self.gh[n0:n1].add_(torch.mm(db, lora.A), alpha=lora.scale)
        if lora.want[0]:
            lora.gA.add_(torch.mm(db.t(), h_c).to(lora.gA.dtype), alpha=lora.scale)
        if lora.want[1]:
            lora.gB.add_(torch.mm(dlogits.t(), u).to(lora.gB.dtype), alpha=lora.scale)

    def result(self, hidden, weight, bias):
        gh = self.gh.view(hidden.shape) if self.want[0] else self.gh
        gw = self.gw.to(weight.dtype) if self.want[1] else self.gw
        gb = self.gb.to(bias.dtype) if self.gb.numel() else self.gb
        return gh, gw, gb


def _ref_logprob_grad(logits: Tensor, ids: Tensor, tau: float, g: Tensor, g_ent: Tensor | None = None) -> Tensor:
    """backend "torch": dL/dlogits [n, V] of a chunk for dL/dlogp = g [n] (and dL/dentropy = g_ent [n]), in
    the logits' dtype.

    With z = x / tau, logp = z[id] - logsumexp(z):  dlogp/dx_v = (onehot(id)_v - softmax(z)_v) / tau;
    H = lse - sum_v p_v z_v:  dH/dx_v = -p_v (log p_v + H) / tau (0 where p_v = 0).
    Written out rather than by autograd: a custom op's implementation runs below the Autograd dispatch
    keys, where autograd records nothing (the float64 tests compare with autograd of the unfused path)."""
    z = logits.to(logp_loss.compute_dtype(logits)) / tau
    p = torch.softmax(z, dim=-1)  # [n, V]
    d_ent = None
    if g_ent is not None:
        logp_all = torch.log_softmax(z, dim=-1)
        ent = -(torch.where(p > 0, p * logp_all, 0.0)).sum(-1, keepdim=True)
        d_ent = torch.where(p > 0, p * (logp_all + ent), 0.0).mul_(-g_ent.to(p.dtype).unsqueeze(-1))
        del logp_all
    d = p.mul_(-g.to(p.dtype).unsqueeze(-1))
    d.scatter_add_(-1, ids.unsqueeze(-1), g.to(d.dtype).unsqueeze(-1))
    if d_ent is not None:
        d.add_(d_ent)
    return d.div_(tau).to(logits.dtype)


def _chunks(N: int, chunk: int):
    for n0 in range(0, N, chunk):
        yield n0, min(n0 + chunk, N)


def _logits_of(rows: _Rows, weight, bias, n0, n1):
    h_c = rows(n0, n1)
    return h_c, F.linear(h_c, weight, bias)  # [n, V] in the input dtype (fp32 accumulation in the GEMM)


class _LoRA:
    """A low-rank adapter on the head: logits = h W^T (+ b) + scale * (h A^T) B^T with A [r, H], B [V, r] (PEFT's
    ``lora_A`` / ``lora_B`` weights and ``scaling``), never forming W + scale * B A. ``want``: gradients for
    (A, B), accumulated in fp32 over the chunks."""

    def __init__(self, A: Tensor, B: Tensor, scale: float, want=(False, False)):
        self.A, self.B, self.scale, self.want = A, B, float(scale), list(want)
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        self.gA = torch.zeros(A.shape, dtype=acc, device=A.device) if self.want[0] else None
        self.gB = torch.zeros(B.shape, dtype=acc, device=B.device) if self.want[1] else None


def _head_logits(rows: _Rows, weight, bias, n0, n1, lora: _LoRA | None):
    """-> (h_c, x, u): the chunk's rows, the head's output and, with an adapter, u = h_c A^T [n, r] (else None)."""
    h_c, x = _logits_of(rows, weight, bias, n0, n1)
    if lora is None:
        return h_c, x, None
    u = torch.mm(h_c, lora.A.t())
    x.addmm_(u, lora.B.t(), alpha=lora.scale)
    return h_c, x, u


def _transform(x: Tensor, head: list[float]) -> tuple[Tensor, Tensor | float | None]:
    """The logits the loss sees from the head's output x [n, V]: y = cap * tanh(s * x / cap) (or s * x
    without a cap), computed in fp32 (float64 for the oracle) as TRL's chunked head does. Returns y and
    dy/dx = s * (1 - tanh^2) (the float s without a cap), or (x, None) when the head is plain (s = 1, no cap)."""
    scale, cap = head
    if scale == 1.0 and cap == 0.0:
        return x, None
    y = x.to(logp_loss.compute_dtype(x)) * scale  # a new buffer: x stays untouched
    if cap == 0.0:
        return y, scale
    t = y.div_(cap).tanh_()
    dydx = torch.mul(t, t).neg_().add_(1.0).mul_(scale)
    return t.mul_(cap), dydx


def _untransform_grad(dy: Tensor, dydx, x: Tensor) -> Tensor:
    """dL/dx [n, V] in x's dtype from dL/dy (written over y)."""
    if dydx is None:
        return dy
    return dy.mul_(dydx).to(x.dtype)


def _single_pass(hidden, weight, bias, ids, mask, adv, old, ref, num_items, max_len, params, loss_type, tau, chunk,
                 backend, want, head):
    """Token-level weights: logits -> (logp, entropy, dL/dlogits) -> dL/dhidden, dL/dW, dL/db per chunk.

    ``mask``: bool, or the completion mask's token weights (the reduction's coef carries them)."""
    B, T, _ = hidden.shape
    N = B * T
    cfg = params.to_config(loss_type=loss_type, temperature=tau)  # the loss math's view of the same scalars
    kernels = None if backend == "torch" else launchers(backend)
    mflat, iflat = logp_loss.kept(mask).reshape(-1), ids.reshape(-1)
    rows = _Rows(hidden, mflat)
    cdt = logp_loss.compute_dtype(hidden)  # float64 only for the oracle (backend "torch")
    logp_out = torch.zeros(N, dtype=cdt, device=hidden.device)
    ent_out = torch.zeros(N, dtype=cdt, device=hidden.device)
    acc = _Accumulator(hidden, weight, bias, want)
    # coef [N]: the reduction's weight of each token (mask and global normaliser); known before any logit
    coef = logp_loss.reduction_weights(mask, cfg.loss_type, max_len, num_items, dtype=cdt).reshape(-1)
    flat_dtype = cdt if kernels is None else torch.float32  # the kernels take fp32 inputs
    flat = lambda t: None if t is None else t.reshape(-1).to(flat_dtype).contiguous()  # noqa: E731
    adv_f = flat((adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand(B, T))
    old_f, ref_f = flat(old), flat(ref) if cfg.beta != 0.0 else None
    coef_f = flat(coef)
    sl = lambda t, n0, n1: None if t is None else t[n0:n1]  # noqa: E731
    for n0, n1 in _chunks(N, chunk):
        h_c, x = _logits_of(rows, weight, bias, n0, n1)
        logits, dydx = _transform(x, head)
        ids_c, lg3 = iflat[n0:n1], None
        if kernels is None:
            # the eager log-probs, and g = coef * dloss_tok/dlogp as specified by token_loss_grad
            lp, ent = eager.token_logprobs(logits, ids_c, tau, True)
            g = coef_f[n0:n1] * logp_loss.token_loss_grad(lp, cfg, adv_f[n0:n1], sl(old_f, n0, n1),
                                                          sl(ref_f, n0, n1))
            dlogits = _ref_logprob_grad(logits, ids_c, tau, torch.where(mflat[n0:n1], g, 0.0))
        else:
            lg3 = logits.unsqueeze(0)  # [1, n, V]; the kernel writes dL/dlogits over the logits
            lp, ent = kernels.fused_fwd_bwd(lg3, ids_c, tau, sl(old_f, n0, n1), sl(ref_f, n0, n1), adv_f[n0:n1],
                                            coef_f[n0:n1], params, lg3)
            dlogits = logits
        logp_out[n0:n1], ent_out[n0:n1] = lp, ent
        acc.add(n0, n1, h_c, _untransform_grad(dlogits, dydx, x))
        del x, logits, dlogits, dydx, lg3  # the next chunk's logits must not coexist with this one's
    return logp_out.view(B, T), ent_out.view(B, T), *acc.result(hidden, weight, bias)


def _logprobs_pass(hidden, weight, bias, ids, mask, tau, chunk, backend, head, want_entropy=True, lora=None):
    """Pass 1: logp, entropy [B, T] (compute dtype) and the row statistics [N, 2] fp32 (m, log s; see
    docs/contract.md#row-statistics), one chunk of logits at a time."""
    B, T, _ = hidden.shape
    N = B * T
    kernels = None if backend == "torch" else launchers(backend)
    mflat, iflat = mask.reshape(-1), ids.reshape(-1)
    rows = _Rows(hidden, mflat)
    cdt = logp_loss.compute_dtype(hidden)
    logp, ent = (torch.zeros(N, dtype=cdt, device=hidden.device) for _ in range(2))
    stats = torch.empty(N, 2, dtype=torch.float32, device=hidden.device)
    for n0, n1 in _chunks(N, chunk):
        _, x, _ = _head_logits(rows, weight, bias, n0, n1, lora)
        logits, _ = _transform(x, head)
        del x
        if kernels is None:
            logp[n0:n1], ent[n0:n1] = eager.token_logprobs(logits, iflat[n0:n1], tau, True)
            m = logits.to(cdt).amax(-1, keepdim=True)
            stats[n0:n1, 0] = m.squeeze(-1)
            stats[n0:n1, 1] = torch.logsumexp((logits.to(cdt) - m) / tau, -1)
        else:
            lp, st, e = kernels.logprobs_fwd(logits.unsqueeze(0), iflat[n0:n1], tau, want_entropy)
            logp[n0:n1], stats[n0:n1] = lp, st
            if want_entropy:
                ent[n0:n1] = e
        del logits
    return logp.view(B, T), ent.view(B, T), stats


def _logprobs_grad_pass(hidden, weight, bias, ids, mask, stats, g, tau, chunk, backend, want, head, ent=None,
                        g_ent=None, lora=None):
    """Pass 2: given g = dL/dlogp [B, T] (and g_ent = dL/dentropy with the pass-1 entropy ``ent``, or None),
    recompute each chunk's logits and accumulate the gradients."""
    N = ids.numel()
    kernels = None if backend == "torch" else launchers(backend)
    mflat, iflat = mask.reshape(-1), ids.reshape(-1)
    rows = _Rows(hidden, mflat)
    acc = _Accumulator(hidden, weight, bias, want)
    g = torch.where(mask, g, 0.0).reshape(-1)  # masked positions: exactly zero rows
    g_f = g.to(torch.float32).contiguous()
    if g_ent is not None:
        g_ent = torch.where(mask, g_ent, 0.0).reshape(-1)
        ge_f, ent_f = g_ent.to(torch.float32).contiguous(), ent.reshape(-1).to(torch.float32).contiguous()
    for n0, n1 in _chunks(N, chunk):
        h_c, x, u = _head_logits(rows, weight, bias, n0, n1, lora)
        logits, dydx = _transform(x, head)
        lg3 = None
        if kernels is None:
            dlogits = _ref_logprob_grad(logits, iflat[n0:n1], tau, g[n0:n1], None if g_ent is None else g_ent[n0:n1])
        else:
            lg3 = logits.unsqueeze(0)
            has_ent = g_ent is not None
            kernels.logprobs_bwd(lg3, iflat[n0:n1], stats[n0:n1], ent_f[n0:n1] if has_ent else None, g_f[n0:n1],
                                 ge_f[n0:n1] if has_ent else None, tau, lg3)
            dlogits = logits
        dx = _untransform_grad(dlogits, dydx, x)
        acc.add(n0, n1, h_c, dx)
        if lora is not None:
            acc.add_lora(n0, n1, h_c, u, dx, lora)
        del x, logits, dlogits, dydx, lg3, dx, u
    return acc.result(hidden, weight, bias)


# --------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------
def _grad_fakes(hidden, weight, bias, want):
    gh = hidden.new_empty(hidden.shape) if want[0] else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if want[1] else hidden.new_empty(0)
    gb = bias.new_empty(bias.shape) if (want[2] and bias is not None) else hidden.new_empty(0)
    return gh, gw, gb


def _cdt(hidden) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@custom_op("grpo_kernels::fused_linear_grpo", mutates_args=())
def _fused_linear_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor, advantages: Tensor,
    old_logps: Tensor | None, ref_logps: Tensor | None, num_items_in_batch: Tensor | None,
    max_completion_length: int | None, params: list[float], loss_type: str, tau: float, chunk_size: int,
    backend: str, want_grads: list[bool], head: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Token-level single pass. -> logp [B, T], entropy [B, T] (fp32; float64 for float64 hidden) and the
    loss's gradients w.r.t. hidden [B, T, H], weight [V, H], bias [V] (an empty tensor where
    ``want_grads`` is False). ``ids`` are 0 and old / ref / [B, T] advantages finite at masked positions.
    ``head`` = [logit_scale, final_logit_softcapping or 0] (see :func:`_transform`)."""
    return _single_pass(hidden, weight, bias, ids, mask, advantages, old_logps, ref_logps, num_items_in_batch,
                        max_completion_length, LossParams.unpack(params), loss_type, tau, chunk_size, backend,
                        want_grads, head)


@_fused_linear_op.register_fake
def _(hidden, weight, bias, ids, mask, advantages, old_logps, ref_logps, num_items_in_batch,
      max_completion_length, params, loss_type, tau, chunk_size, backend, want_grads, head):
    B, T = ids.shape
    return (hidden.new_empty((B, T), dtype=_cdt(hidden)), hidden.new_empty((B, T), dtype=_cdt(hidden)),
            *_grad_fakes(hidden, weight, bias, want_grads))


@custom_op("grpo_kernels::fused_linear_logprobs", mutates_args=())
def _logprobs_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor, tau: float,
                 chunk_size: int, backend: str, head: list[float], want_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 -> logp [B, T], entropy [B, T] (compute dtype), row statistics [N, 2] fp32. Differentiable in logp: its
    backward is pass 2 (:func:`_logprobs_bwd_op`) with the upstream g = dL/dlogp."""
    return _logprobs_pass(hidden, weight, bias, ids, mask, tau, chunk_size, backend, head, want_entropy)


@_logprobs_op.register_fake
def _(hidden, weight, bias, ids, mask, tau, chunk_size, backend, head, want_entropy):
    B, T = ids.shape
    return (hidden.new_empty((B, T), dtype=_cdt(hidden)), hidden.new_empty((B, T), dtype=_cdt(hidden)),
            hidden.new_empty((B * T, 2), dtype=torch.float32))


@custom_op("grpo_kernels::fused_linear_logprobs_bwd", mutates_args=())
def _logprobs_bwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor, stats: Tensor,
                     g_logp: Tensor, tau: float, chunk_size: int, backend: str,
                     want_grads: list[bool], head: list[float], entropy: Tensor | None = None,
                     g_ent: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 2 -> dL/dhidden, dL/dW, dL/db for dL/dlogp = ``g_logp`` [B, T] and, when given, dL/dentropy =
    ``g_ent`` [B, T] with the pass-1 ``entropy`` (empty where not wanted)."""
    return _logprobs_grad_pass(hidden, weight, bias, ids, mask, stats, g_logp, tau, chunk_size, backend, want_grads,
                               head, entropy, g_ent)


@_logprobs_bwd_op.register_fake
def _(hidden, weight, bias, ids, mask, stats, g_logp, tau, chunk_size, backend, want_grads, head, entropy=None,
      g_ent=None):
    return _grad_fakes(hidden, weight, bias, want_grads)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, ids, mask, tau, chunk_size, backend, head, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, mask, output[2], output[1])
    ctx.args = (tau, chunk_size, backend)
    ctx.head = head
    ctx.mark_non_differentiable(output[2])  # the stats are internal


def _logprobs_backward(ctx, g_logp, g_ent, g_stats):
    hidden, weight, bias, ids, mask, stats, ent = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = [bool(need[0]), bool(need[1]), bias is not None and bool(need[2])]
    if (g_logp is None and g_ent is None) or not any(want):
        return (None,) * 10
    g_logp = torch.zeros_like(ent) if g_logp is None else g_logp.contiguous()
    ge = None if g_ent is None else g_ent.contiguous()
    gh, gw, gb = _logprobs_bwd_op(hidden, weight, bias, ids, mask, stats, g_logp, *ctx.args, want, ctx.head,
                                  None if ge is None else ent, ge)
    pick = lambda t, w: t if w else None  # noqa: E731
    return pick(gh, want[0]), pick(gw, want[1]), pick(gb, want[2]), *(None,) * 7


_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


@custom_op("grpo_kernels::fused_linear_attach", mutates_args=())
def _attach(value: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, g_hidden: Tensor,
            g_weight: Tensor, g_bias: Tensor) -> Tensor:
    """Returns ``value``; its gradients w.r.t. hidden / weight / bias are the precomputed ones (times the
    upstream gradient), and the upstream gradient passes on to ``value`` itself. An empty precomputed
    gradient means that input gets none."""
    return value.clone()


_attach.register_fake(lambda value, *rest: torch.empty_like(value))


def _attach_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[4:7])
    ctx.shapes = [None if t is None else t.shape for t in inputs[1:4]]
    ctx.used = False


def _attach_backward(ctx, g):
    if ctx.used:
        raise RuntimeError(
            "grpo_kernels: fused_linear_grpo_loss computes its gradients in the forward pass; they serve one "
            "backward only (retain_graph=True with a second backward is not supported)"
        )
    ctx.used = True
    grads = list(ctx.saved_tensors)
    if not _scalar_is_one(g):
        grads = [t.mul_(g.to(t.dtype)) for t in grads]  # in place: no second [V, H] buffer
    # a wanted gradient of an empty input (B = 0 or T = 0) is itself empty: given its shape, not taken for "none"
    gh, gw, gb = (None if not need or shape is None else t.view(shape) if t.numel() else t.new_zeros(shape)
                  for t, need, shape in zip(grads, ctx.needs_input_grad[1:4], ctx.shapes))
    # ``value``'s own graph (the loss math on detached log-probs) carries the gradients of the O(N) inputs
    return g, gh, gw, gb, None, None, None


_attach.register_autograd(_attach_backward, setup_context=_attach_setup)


class _LoRAHeadLogprobs(torch.autograd.Function):
    """Pass 1 / pass 2 of a head carrying a low-rank adapter (see :class:`_LoRA`): logp, entropy [B, T] and the
    row statistics; the backward recomputes each chunk and returns the gradients of hidden, weight, bias, A, B.
    Plain autograd rather than a custom op: the adapter path is not traced by torch.compile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, A, B, ids, mask, tau, chunk, backend, head, scale, want_entropy):
        logp, ent, stats = _logprobs_pass(hidden, weight, bias, ids, mask, tau, chunk, backend, head, want_entropy,
                                          _LoRA(A, B, scale))
        ctx.save_for_backward(hidden, weight, bias, A, B, ids, mask, stats, ent)
        ctx.args = (tau, chunk, backend, head, scale)
        ctx.mark_non_differentiable(stats)
        return logp, ent, stats

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_stats):
        hidden, weight, bias, A, B, ids, mask, stats, ent = ctx.saved_tensors
        tau, chunk, backend, head, scale = ctx.args
        need = ctx.needs_input_grad
        want = [bool(need[0]), bool(need[1]), bias is not None and bool(need[2])]
        lora = _LoRA(A, B, scale, (bool(need[3]), bool(need[4])))
        if (g_logp is None and g_ent is None) or not (any(want) or any(lora.want)):
            return (None,) * 13
        g_logp = torch.zeros_like(ent) if g_logp is None else g_logp.contiguous()
        ge = None if g_ent is None else g_ent.contiguous()
        gh, gw, gb = _logprobs_grad_pass(hidden, weight, bias, ids, mask, stats, g_logp, tau, chunk, backend, want,
                                         head, None if ge is None else ent, ge, lora)
        pick = lambda t, w: t if w else None  # noqa: E731
        gA = None if lora.gA is None else lora.gA.to(A.dtype)
        gB = None if lora.gB is None else lora.gB.to(B.dtype)
        return pick(gh, want[0]), pick(gw, want[1]), pick(gb, want[2]), gA, gB, *(None,) * 8


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (chosen from a memory budget) or a positive int, got {chunk_size!r}")


def _check_head_transform(logit_scale, final_logit_softcapping) -> list[float]:
    """-> [logit_scale, final_logit_softcapping or 0.0], the ``head`` argument of the ops."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite real number, got {logit_scale!r}")
    cap = final_logit_softcapping
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
                            or cap <= 0):
        raise ValueError(f"final_logit_softcapping must be None or a finite number > 0, got {cap!r}")
    return [float(logit_scale), 0.0 if cap is None else float(cap)]


def _full_tensor(t: Tensor | None) -> Tensor | None:
    """An FSDP2 / tensor-parallel DTensor head gathered into one plain tensor (differentiable: its backward
    hands each rank its shard's gradient), as TRL does before its chunked head; plain tensors pass through."""
    if t is None or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives an ``F.linear`` on ``device`` now (None when autocast is off)."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _cast_for_autocast(dtype: torch.dtype | None, *tensors):
    """Casts, as autocast casts the inputs of F.linear: floating tensors other than float64 to ``dtype``
    (differentiable: the gradients reach the original tensors in their dtype)."""
    if dtype is None:
        return tensors
    return tuple(t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype) for t in tensors)


def _check_head(hidden, weight, bias, completion_ids):
    _validate.check_tensor("hidden", hidden, ndim=3, floating=True)
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16 (float64 for the reference), got {hidden.dtype}")
    B, T, H = hidden.shape
    _validate.check_tensor("lm_head_weight", weight, ndim=2, floating=True)
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"lm_head_weight must have shape [V, H] with H = hidden.shape[-1] = {H} and V >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"lm_head_weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _validate.check_tensor("lm_head_bias", bias, ndim=1, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"lm_head_bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"lm_head_bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"lm_head_bias is on {bias.device} but hidden is on {hidden.device}")
    _validate.check_tensor("completion_ids", completion_ids, ndim=2, integer=True)
    if tuple(completion_ids.shape) != (B, T):
        hint = _validate.slice_hint("hidden", T, completion_ids.shape[1]) if completion_ids.shape[0] == B else ""
        raise ValueError(f"completion_ids must have shape [B, T] = {(B, T)} to match hidden, got "
                         f"{tuple(completion_ids.shape)}{hint}")
    if completion_ids.device != hidden.device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but hidden is on {hidden.device}")


def _check_lora(lora, hidden, weight) -> tuple[Tensor, Tensor, float]:
    """``lora`` = (A [r, H], B [V, r], scale): an adapter on the head (PEFT's lora_A.weight, lora_B.weight,
    scaling), of the dtype and device of ``hidden``."""
    if not isinstance(lora, (tuple, list)) or len(lora) != 3:
        raise TypeError(f"lora must be None or a tuple (A [r, H], B [V, r], scale), got {type(lora).__name__}")
    A, B, scale = lora
    V, H = weight.shape
    for name, t in (("lora A", A), ("lora B", B)):
        _validate.check_tensor(name, t, ndim=2, floating=True)
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    r = A.shape[0]
    if A.shape[1] != H or r < 1:
        raise ValueError(f"lora A must have shape [r, H] with H = {H}, got {tuple(A.shape)}")
    if tuple(B.shape) != (V, r):
        raise ValueError(f"lora B must have shape [V, r] = [{V}, {r}], got {tuple(B.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"lora scale must be a finite real number, got {scale!r}")
    return A, B, float(scale)


def fused_linear_grpo_loss_with_config(
    hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    config: GRPOConfig,
    *,
    lm_head_bias: Tensor | None = None,
    completion_mask: Tensor | None = None,
    advantages: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    process_group=None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    lora: tuple | None = None,
) -> GRPOLossOutput:
    """:func:`fused_linear_grpo_loss` with the loss options given as one config object.

    Parameters
    ----------
    hidden, lm_head_weight, completion_ids
        As in :func:`fused_linear_grpo_loss`.
    config : GRPOConfig or trl.GRPOConfig
        The loss options; a ``trl.GRPOConfig`` is read with :meth:`GRPOConfig.from_trl`, and its
        ``max_completion_length`` is used when the call passes none.
    lm_head_bias, completion_mask, advantages, rewards, group_size, old_logps, ref_logps,
    max_completion_length, num_items_in_batch, importance_sampling_ratio, sampling_logps, process_group,
    logit_scale, final_logit_softcapping, chunk_size, backend
        As in :func:`fused_linear_grpo_loss`.
    lora : tuple (A [r, H], B [V, r], scale) or None, default None
        A low-rank adapter on the head (PEFT LoRA on ``lm_head``: ``lora_A.weight``, ``lora_B.weight``,
        ``scaling``): each chunk's logits are ``h W^T (+ b) + scale * (h A^T) B^T``, so ``W + scale * B A`` never
        exists; the loss is differentiable w.r.t. A and B (and hidden, and W where it requires a gradient). The
        adapter runs the two-pass schedule (gradients recomputed chunk by chunk in ``backward``) and is not
        traced by torch.compile.

    Returns
    -------
    GRPOLossOutput
        As in :func:`fused_linear_grpo_loss`.
    """
    head = _check_head_transform(logit_scale, final_logit_softcapping)
    lm_head_weight, lm_head_bias = _full_tensor(lm_head_weight), _full_tensor(lm_head_bias)
    amp = _autocast_dtype(hidden.device) if isinstance(hidden, Tensor) else None
    hidden, lm_head_weight, lm_head_bias = _cast_for_autocast(amp, hidden, lm_head_weight, lm_head_bias)
    if lora is not None and amp is not None and isinstance(lora, (tuple, list)) and len(lora) == 3:
        lora = (*_cast_for_autocast(amp, lora[0], lora[1]), lora[2])
    if amp is not None:
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_grpo_loss_with_config(
                hidden, lm_head_weight, completion_ids, config, lm_head_bias=lm_head_bias,
                completion_mask=completion_mask, advantages=advantages, rewards=rewards, group_size=group_size,
                old_logps=old_logps, ref_logps=ref_logps, max_completion_length=max_completion_length,
                num_items_in_batch=num_items_in_batch, importance_sampling_ratio=importance_sampling_ratio,
                sampling_logps=sampling_logps, process_group=process_group, logit_scale=logit_scale,
                final_logit_softcapping=final_logit_softcapping, chunk_size=chunk_size, backend=backend, lora=lora)
    config, max_completion_length = _validate.loss_config(config, max_completion_length)
    _check_head(hidden, lm_head_weight, lm_head_bias, completion_ids)
    B, T, _ = hidden.shape
    V = lm_head_weight.shape[0]
    _check_chunk_size(chunk_size)
    # The loss inputs are validated exactly as grpo_loss validates them, against a [B, T, V] stand-in for
    # the logits that never exist (a V-element buffer expanded with stride 0; its values are never read).
    stand_in = hidden.new_empty(V).expand(B, T, V)
    x = _validate.validate_loss_inputs(
        stand_in, completion_ids, config, completion_mask=completion_mask, advantages=advantages, rewards=rewards,
        group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group,
    )
    name = resolve_backend(backend, hidden.device)
    if name != "torch" and hidden.dtype == torch.float64:
        raise TypeError(f"hidden of dtype float64 runs only on backend='torch' (the reference), not {name!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(B * T, V, hidden.dtype, hidden.device, name, head != [1.0, 0.0])

    mask = x.mask
    zero = torch.zeros((), dtype=x.advantages.dtype, device=hidden.device)
    # masked positions may hold garbage ids / old / ref / advantages: make them harmless before the kernels
    ids = torch.where(mask, x.ids, 0).long()
    adv = x.advantages if x.advantages.dim() == 1 else torch.where(mask, x.advantages, zero)
    old = None if x.old_logps is None else torch.where(mask, x.old_logps, zero)
    ref = None if x.ref_logps is None else torch.where(mask, x.ref_logps, zero)
    num_items = x.num_items_in_batch
    if num_items is not None:
        num_items = torch.as_tensor(num_items, device=hidden.device).reshape(()).to(x.advantages.dtype)

    grad_on = torch.is_grad_enabled()
    want = [grad_on and t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)]
    loss_args = (adv, x.weights, old, ref)
    extra = dict(importance_sampling_ratio=x.importance_sampling_ratio, sampling_logps=x.sampling_logps,
                 process_group=x.process_group)
    if lora is not None:
        # the adapter's head: two passes, autograd of the loss below gives g = dL/dlogp
        A, B, scale = _check_lora(lora, hidden, lm_head_weight)
        logp, ent, _ = _LoRAHeadLogprobs.apply(hidden, lm_head_weight, lm_head_bias, A, B, ids, mask,
                                               config.temperature, int(chunk_size), name, head, scale, True)
        logp = torch.where(mask, logp, 0.0)
        ent = torch.where(mask, ent, 0.0) if config.entropy_coef != 0.0 else ent.detach()
        loss, metrics = logp_loss.loss_from_logps(logp, config, *loss_args, ent, x.max_completion_length, num_items,
                                                  **extra)
        return GRPOLossOutput(loss, logp.detach().float(), metrics)
    if any(want) and not config.needs_every_token:
        # single pass: the gradients are computed now; the loss carries them to backward. The loss math on the
        # detached log-probs runs with autograd when an O(N) input (advantages, old / ref log-probs, ratio,
        # token weights, ...) requires grad; _attach passes the upstream gradient on to it.
        small_grad = inputs_need_grad(x)
        adv_k = adv
        if x.importance_sampling_ratio is not None:
            adv_k = logp_loss.ratio_scaled_advantages(adv, x.importance_sampling_ratio, mask)
        bias_d = None if lm_head_bias is None else lm_head_bias.detach()
        det = lambda t: None if t is None else t.detach()  # noqa: E731
        logp, ent, gh, gw, gb = _fused_linear_op(
            hidden.detach(), lm_head_weight.detach(), bias_d, ids, x.weights.detach(), adv_k.detach(), det(old),
            det(ref), det(num_items), x.max_completion_length, LossParams.from_config(config).pack(),
            config.loss_type, config.temperature, int(chunk_size), name, want, head,
        )
        logp = torch.where(mask, logp, 0.0)
        ent = torch.where(mask, ent, 0.0)
        with torch.set_grad_enabled(small_grad):
            loss, metrics = logp_loss.loss_from_logps(logp, config, *loss_args, ent, x.max_completion_length, num_items,
                                                      **extra)
        loss = _attach(loss, hidden, lm_head_weight, lm_head_bias, gh, gw, gb)
    else:
        # two passes (or only the first, without gradients): log-probs now; autograd of the loss below
        # gives g = dL/dlogp [B, T] (and dL/dentropy for the entropy bonus), where a token's weight needs
        # every token first (sequence means, VESPO's weight, the off-policy and top-entropy masks); the
        # backward of _logprobs_op recomputes each chunk's logits to turn g into dL/dhidden, dL/dW, dL/db.
        logp, ent, _ = _logprobs_op(hidden, lm_head_weight, lm_head_bias, ids, mask, config.temperature,
                                    int(chunk_size), name, head, True)
        logp = torch.where(mask, logp, 0.0)
        ent = torch.where(mask, ent, 0.0) if config.entropy_coef != 0.0 else ent.detach()
        loss, metrics = logp_loss.loss_from_logps(logp, config, *loss_args, ent, x.max_completion_length, num_items,
                                                  **extra)
    return GRPOLossOutput(loss, logp.detach().float(), metrics)


@takes_config_options
@fill
def fused_linear_grpo_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    completion_mask: Tensor | None = None,
    advantages: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None,
    process_group=None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    **options,
) -> GRPOLossOutput:
    """``grpo_loss(F.linear(hidden, lm_head_weight, lm_head_bias), completion_ids, ...)`` without the logits.

    The N = B*T rows are processed ``chunk_size`` at a time, so only one chunk of logits (and its gradient)
    exists at a time; the gradients w.r.t. hidden, weight and bias are computed in the forward pass with
    token-level weights (with sequence level, vespo, the off-policy or top-entropy mask or an entropy bonus,
    a token's weight needs every token first: recomputed chunk by chunk in ``backward``).

    Parameters
    ----------
    hidden : Tensor [B, T, H]
        The last hidden states aligned with ``completion_ids`` (e.g. ``h[:, P-1:-1]`` of prompt +
        completion, P prompt tokens; any strides): float32, bfloat16 or float16 (float64 on "torch").
    lm_head_weight : Tensor [V, H]
        The LM head's weight, of the dtype of ``hidden``.
    completion_ids : Tensor [B, T], integer
        The sampled completion tokens, each in [0, V) where the mask keeps it.
    lm_head_bias : Tensor [V] or None, default None
        The LM head's bias, if it has one.
    {{loss_inputs}}
    {{loss_options}}
    {{reduction}}
    logit_scale : float, default 1.0
        Multiplies the head's output x before the loss (Cohere's ``logit_scale``, Granite's
        ``1 / logits_scaling``).
    final_logit_softcapping : float or None, default None
        Caps the scaled logits as Gemma 2/3 do: ``y = cap * tanh(logit_scale * x / cap)``; the temperature then
        divides y (TRL's order). Computed in fp32 per chunk and differentiated exactly.
    chunk_size : int or None, default None
        Rows per chunk; None chooses it from a memory budget (:func:`default_chunk_size`).
    {{backend}}

    Returns
    -------
    {{returns}}
        The loss is differentiable w.r.t. hidden, lm_head_weight and lm_head_bias.

    Notes
    -----
    Under ``torch.autocast`` for the device of ``hidden`` the head runs in the autocast dtype, exactly as the
    model's own ``lm_head`` (an ``F.linear``) would: floating inputs other than float64 are cast to it (the
    gradients reach the originals in their dtype). An FSDP2 or tensor-parallel ``DTensor`` weight (and bias)
    is gathered once with ``full_tensor()`` (its backward reduces the gradient back to the shards), as TRL does.
    """
    config = _validate.resolve_config(None, options, "fused_linear_grpo_loss")
    return fused_linear_grpo_loss_with_config(
        hidden, lm_head_weight, completion_ids, config, lm_head_bias=lm_head_bias, completion_mask=completion_mask,
        advantages=advantages, rewards=rewards, group_size=group_size, old_logps=old_logps, ref_logps=ref_logps,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
        process_group=process_group, logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
        chunk_size=chunk_size, backend=backend,
    )


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    lora: tuple | None = None,
):
    """``token_logprobs(F.linear(hidden, weight, bias), ids, ...)`` chunk by chunk, never all N x V logits.

    The forward pass of an old-policy / reference / sampler log-prob pass, and differentiable: with grad enabled
    and ``hidden`` / ``weight`` / ``bias`` requiring grad, the log-probs (and the entropy) carry a gradient
    whose backward recomputes each chunk's logits (as the two-pass loss does); under ``torch.no_grad()`` no
    graph is kept. Memory: one chunk of ``chunk_size`` rows of logits at a time, forward and backward.

    Parameters
    ----------
    hidden : Tensor [B, T, H]
        Hidden states before the LM head (any strides; fp32 / bf16 / fp16, float64 on backend "torch").
    weight : Tensor [V, H]
        The LM head's weight (a DTensor is gathered with ``full_tensor()``, as in
        :func:`fused_linear_grpo_loss`).
    ids : Tensor [B, T] integer
        The tokens whose log-probs are wanted, in [0, V).
    bias : Tensor [V] or None, default None
        The LM head's bias.
    temperature : float, default 1.0
        Log-probs and entropy are those of ``softmax(y / temperature)``, ``y`` the head's (transformed) output.
    return_entropy : bool, default False
        Also return the entropy of each position's distribution.
    logit_scale : float, default 1.0
        ``y = logit_scale * (hidden @ weight.T + bias)`` (Cohere-style heads), as in :func:`fused_linear_grpo_loss`.
    final_logit_softcapping : float or None, default None
        ``y = cap * tanh(y / cap)`` after the scale (Gemma 2/3); None applies no cap.
    chunk_size : int or None, default None
        Rows of logits per chunk; None picks it from the memory budget of :func:`default_chunk_size`.
    backend : str, default "auto"
        "auto" | "cuda" | "triton" | "cpu" | "torch", as in :func:`grpo_kernels.grpo_loss`. Under
        ``torch.autocast`` the head runs in the autocast dtype.
    lora : tuple (A [r, H], B [V, r], scale) or None, default None
        A low-rank adapter on the head, as in :func:`fused_linear_grpo_loss_with_config`.

    Returns
    -------
    logps : Tensor [B, T]
        fp32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    entropy : Tensor [B, T]
        Only with ``return_entropy=True``: the tuple ``(logps, entropy)``; differentiable as ``logps``.
    """
    head = _check_head_transform(logit_scale, final_logit_softcapping)
    weight, bias = _full_tensor(weight), _full_tensor(bias)
    amp = _autocast_dtype(hidden.device) if isinstance(hidden, Tensor) else None
    hidden, weight, bias = _cast_for_autocast(amp, hidden, weight, bias)
    _check_head(hidden, weight, bias, ids)
    if lora is not None:
        if isinstance(lora, (tuple, list)) and len(lora) == 3:
            lora = (*_cast_for_autocast(amp, lora[0], lora[1]), lora[2])
        lora = _check_lora(lora, hidden, weight)
    tau = _validate.check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    _check_chunk_size(chunk_size)
    B, T, _ = hidden.shape
    V = weight.shape[0]
    _validate.check_ids_in_range(ids, V, None, "ids")
    name = resolve_backend(backend, hidden.device)
    if name != "torch" and hidden.dtype == torch.float64:
        raise TypeError(f"hidden of dtype float64 runs only on backend='torch' (the reference), not {name!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(B * T, V, hidden.dtype, hidden.device, name, head != [1.0, 0.0])
    mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    ids = ids.long().contiguous()  # the kernels read ids as one contiguous int64 row per token
    with torch.autocast(hidden.device.type, enabled=False):
        if lora is not None:
            lora_a, lora_b, scale = lora
            logp, ent, _ = _LoRAHeadLogprobs.apply(hidden, weight, bias, lora_a, lora_b, ids, mask, tau,
                                                   int(chunk_size), name, head, scale, return_entropy)
        else:
            logp, ent, _ = _logprobs_op(hidden, weight, bias, ids, mask, tau, int(chunk_size), name, head,
                                        return_entropy)
    return (logp, ent) if return_entropy else logp


class FusedLinearGRPOLoss(nn.Module):
    """The fused LM head + GRPO loss configured once, reading the model's head at every call.

    ``FusedLinearGRPOLoss(model.lm_head, loss_type="grpo", beta=0.04)(hidden, completion_ids, advantages=A,
    ref_logps=R)``, or ``FusedLinearGRPOLoss(weight=W, bias=b, ...)``. The head is referenced, not
    registered: the loss module owns no parameters or state (the model does; tied embeddings, FSDP and
    optimizer state are unaffected), and the current ``weight``/``bias`` tensors are read at each call.

    Parameters
    ----------
    lm_head : nn.Module or None, default None
        A module with ``.weight`` [V, H] (and ``.bias`` [V] or None), e.g. ``model.lm_head``.
    weight : Tensor [V, H] or None, default None
        The head's weight, instead of ``lm_head`` (give exactly one of them).
    bias : Tensor [V] or None, default None
        The head's bias with ``weight=``.
    config : GRPOConfig, trl.GRPOConfig or None, default None
        The loss options as one object (a ``trl.GRPOConfig``'s ``max_completion_length`` included); give
        either ``config`` or keyword options.
    chunk_size : int or None, default None
        As in :func:`fused_linear_grpo_loss`.
    backend : str, default "auto"
        As in :func:`fused_linear_grpo_loss`.
    logit_scale, final_logit_softcapping : float, float or None
        The head's output transform, as in :func:`fused_linear_grpo_loss` (defaults 1.0 and None).
    **options
        The loss options of :func:`fused_linear_grpo_loss`: the fields of :class:`GRPOConfig`, defaults as there.

    Notes
    -----
    ``forward(hidden, completion_ids, **inputs)`` takes the inputs of :func:`fused_linear_grpo_loss`
    and returns its :class:`GRPOLossOutput`.
    """

    def __init__(self, lm_head: nn.Module | None = None, *, weight: Tensor | None = None,
                 bias: Tensor | None = None, config: GRPOConfig | None = None, chunk_size: int | None = None,
                 backend: str = "auto", logit_scale: float = 1.0, final_logit_softcapping: float | None = None,
                 **options):
        super().__init__()
        if (lm_head is None) == (weight is None):
            raise ValueError("pass exactly one of lm_head (a module with .weight [V, H] and .bias) or weight= [V, H]")
        if lm_head is not None:
            if bias is not None:
                raise ValueError("bias= is taken from lm_head.bias when lm_head is given; do not pass both")
            if not isinstance(getattr(lm_head, "weight", None), Tensor):
                raise TypeError(
                    f"lm_head must have a .weight tensor [V, H] (an nn.Linear), got {type(lm_head).__name__}"
                )
        elif not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor [V, H], got {type(weight).__name__}")
        check_backend_name(backend)
        _check_chunk_size(chunk_size)
        _check_head_transform(logit_scale, final_logit_softcapping)
        self.logit_scale, self.final_logit_softcapping = logit_scale, final_logit_softcapping
        self.config = _validate.resolve_config(config, options, "FusedLinearGRPOLoss")
        # a trl.GRPOConfig also supplies max_completion_length (dr_grpo), as TRL's trainer reads it
        self.max_completion_length = None if config is None else _validate.loss_config(config, None)[1]
        self.backend, self.chunk_size = backend, chunk_size
        # A tuple keeps nn.Module from registering the head (or its tensors) as this module's own.
        self._head = (lm_head, weight, bias)

    def head(self) -> tuple[Tensor, Tensor | None]:
        lm_head, weight, bias = self._head
        if lm_head is not None:
            return lm_head.weight, getattr(lm_head, "bias", None)
        return weight, bias

    def forward(self, hidden: Tensor, completion_ids: Tensor, **inputs) -> GRPOLossOutput:
        weight, bias = self.head()
        inputs.setdefault("chunk_size", self.chunk_size)
        inputs.setdefault("backend", self.backend)
        inputs.setdefault("logit_scale", self.logit_scale)
        inputs.setdefault("final_logit_softcapping", self.final_logit_softcapping)
        if inputs.get("max_completion_length") is None:
            inputs["max_completion_length"] = self.max_completion_length
        return fused_linear_grpo_loss_with_config(hidden, weight, completion_ids, self.config, lm_head_bias=bias,
                                                  **inputs)

    def extra_repr(self) -> str:
        w, _ = self.head()
        return (f"vocab={w.shape[0]}, hidden={w.shape[1]}, {self.config}, chunk_size={self.chunk_size}, "
                f"backend={self.backend!r}")
