"""Triton kernels of the fused GRPO loss: one program per row of logits, online log-sum-exp over V.

Math (docs/contract.md; the same as ``csrc/include/grpo_math.h``), per row with ``z = x / tau``:
  ``lse = m / tau + log s``, ``s = sum_v e^{(x_v - m) / tau}``, ``t = sum_v e^{(x_v - m) / tau} (x_v - m) / tau``
  for the running max m of the raw logits; ``logp = (x[id] - m) / tau - log s``; entropy ``H = log s - t / s``
  (no cancellation when |z| ~ 1e4, unlike ``lse - sum p z``);
  ``dL/dx_v = ( g (onehot_v - p_v) - g_H p_v (d_v + H) ) / tau`` with ``p_v = e^{d_v}``,
  ``d_v = z_v - lse = (x_v - m) / tau - log s``. A row is summarised by the pair (m, log s) (the forward's
  ``stats`` output, the backward's input), never by one fp32 lse: see "Row statistics" in
  ``csrc/include/grpo_boundary.h``.

Three kernels share the helpers below; their variants are constexpr flags:
- ``logprobs_fwd_kernel``: logp, (m, log s) (and entropy) of each row; one read of the logits.
- ``logprobs_bwd_kernel``: dL/dlogits from saved (m, log s, H) and upstream (g, g_H); one read + one write.
- ``fused_fwd_bwd_kernel``: the forward, then the per-token weight ``g = coef * dloss_tok/dlogp`` computed
  in the kernel (token-level importance weights only), then the row's gradient: one launch.

Memory layout. A row starts at the element offset ``shift + b * stride_b + t * stride_t`` (int64) of a base
pointer that the launcher aligned to 16 bytes. Each row is walked as three pieces, so that the main loop
has no mask and provably 16-byte-aligned addresses (128-bit loads for ANY V and row stride):
  head: the < ALIGN elements up to the first 16-byte boundary (masked),
  body: full BLOCK chunks from that boundary (unmasked, ``tl.multiple_of`` on the start),
  tail: the rest (< BLOCK elements, masked).
Masked-out lanes read as -inf (e^-inf = 0 and they drop out of every sum).

The gradient stores use the OUTPUT's row offsets with the same pieces; they are 128-bit where the output
row has the same alignment as the input row (always for ``inplace``; for a fresh contiguous buffer when
V * elsize is a multiple of 16).

A row of the backward whose weights g and g_H are both exactly 0 (masked tokens) is written as zeros with
its loads predicated off: garbage (NaN) logits there are never read. An id outside [0, V) gives logp NaN
and no target term (the API rejects such ids before launching on the CPU; see docs/contract.md#bad-input).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOSS_CLIP = tl.constexpr(0)  # == config.LOSS_CODE_*
LOSS_CISPO = tl.constexpr(1)
LOSS_SAPO = tl.constexpr(2)


# ------------------------------------------------------------------------------------------------------
# helpers: row addressing, online log-sum-exp with the entropy moment, per-element gradient, loss derivative
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _row_offset(row, T, stride_b, stride_t, shift):
    """Element offset (int64) of row ``row = b * T + t``: no 32-bit product even when N * V > 2^31."""
    b = row // T
    t = row - b * T
    return shift + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _split(off, V, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """-> (head, n_body): elements before the first ALIGN-element (16-byte) boundary, full BLOCK chunks after."""
    head = ((ALIGN - off % ALIGN) % ALIGN).to(tl.int32)
    head = tl.minimum(head, V)
    return head, (V - head) // BLOCK


@triton.jit
def _load_x(base, start, cols, n_valid, live, MASKED: tl.constexpr):
    """The raw logits ``base[start + cols]`` in fp32. With MASKED, lanes with cols >= n_valid, and every lane
    of a row that is not ``live``, read as -inf (the load is predicated off); without, a plain load."""
    if MASKED:
        x = tl.load(base + start + cols, mask=tl.where(live, cols < n_valid, False), other=float("-inf"))
    else:
        x = tl.load(base + start + cols)
    return x.to(tl.float32)


@triton.jit
def _lse_update(x, m, s, t, inv_tau):
    """Adds a chunk of RAW logits x (fp32) to the state: m = running max of x, and, in units of z = x / tau,
    s = sum e^{(x - m) / tau}, t = sum e^{(x - m) / tau} (x - m) / tau. Rescaling to m' >= m, with
    dm = (m - m') / tau: s' = s e^{dm} + sum e^{d}, t' = e^{dm} (t + dm s) + sum e^{d} d. -inf entries add 0
    (never 0 * -inf); NaN propagates.

    d = (x - m) / tau, never x / tau - m / tau: see "Shifted logits" in ``csrc/include/grpo_boundary.h``."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: any finite reference
    d = (x - m_ref) * inv_tau
    e = tl.exp(d)
    dm = tl.where(s > 0, (m - m_ref) * inv_tau, 0.0)  # s == 0: m = -inf, nothing to rescale (no -inf * 0)
    a = tl.exp(dm)
    s_new = s * a + tl.sum(e, 0)
    t = a * (t + dm * s) + tl.sum(e * tl.where(e > 0, d, 0.0), 0)
    return m_new, s_new, t


@triton.jit
def _row_stats(base, off, V, inv_tau, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """-> (H, m = max of the raw logits, log s) of the row at element offset ``off``: one read of its V
    logits."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    head, n_body = _split(off, V, ALIGN, BLOCK)
    x = _load_x(base, off, tl.arange(0, ALIGN), head, True, True)
    m, s, t = _lse_update(x, m, s, t, inv_tau)
    cols = tl.arange(0, BLOCK)
    for i in range(n_body):
        start = tl.multiple_of(off + head + i * BLOCK, ALIGN)
        m, s, t = _lse_update(_load_x(base, start, cols, BLOCK, True, False), m, s, t, inv_tau)
    done = head + n_body * BLOCK
    m, s, t = _lse_update(_load_x(base, off + done, cols, V - done, True, True), m, s, t, inv_tau)
    log_s = tl.log(s)
    return log_s - t / s, m, log_s


@triton.jit
def _grad(x, col, tgt, m, log_s, H, g, g_ent, inv_tau, HAS_ENT: tl.constexpr):
    """(g (onehot - p) - g_H p (d + H)) / tau, p = e^d, d = (x - m) / tau - log s from the RAW logits x;
    p = 0 (x = -inf) adds no entropy term."""
    d = (x - m) * inv_tau - log_s
    p = tl.exp(d)
    gz = g * (tl.where(col == tgt, 1.0, 0.0) - p)
    if HAS_ENT:
        gz -= g_ent * p * (tl.where(p != 0.0, d, 0.0) + H)
    return gz * inv_tau


@triton.jit
def _cast_out(v, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even. bf16 is rounded with integer ops (the same code on
    the GPU and under the interpreter, whose own fp32 -> bf16 cast truncates): u + 0x7fff + lsb, then the
    top 16 bits (overflow carries into the exponent and up to inf); NaN stays a quiet NaN."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _write_row_grad(base, off, out, out_off, V, tgt, m, log_s, H, g, g_ent, live, inv_tau,
                    HAS_ENT: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = dL/dx of the row (in the output's dtype). ``live == False``: exact zeros, no logit read.
    Each element is read before it is written (so ``out`` may be the logits themselves)."""
    head, n_body = _split(off, V, ALIGN, BLOCK)
    hcols = tl.arange(0, ALIGN)
    xh = _load_x(base, off, hcols, head, live, True)
    gh = tl.where(live, _grad(xh, hcols, tgt, m, log_s, H, g, g_ent, inv_tau, HAS_ENT), 0.0)
    tl.store(out + out_off + hcols, _cast_out(gh, out.dtype.element_ty), mask=hcols < head)
    cols = tl.arange(0, BLOCK)
    for i in range(n_body):
        j = head + i * BLOCK
        start = tl.multiple_of(off + j, ALIGN)
        xb = _load_x(base, start, cols, BLOCK, live, True)  # predicated on live only
        gz = tl.where(live, _grad(xb, cols + j, tgt, m, log_s, H, g, g_ent, inv_tau, HAS_ENT), 0.0)
        tl.store(out + out_off + j + cols, _cast_out(gz, out.dtype.element_ty))
    j = head + n_body * BLOCK
    xt = _load_x(base, off + j, cols, V - j, live, True)
    gt = tl.where(live, _grad(xt, cols + j, tgt, m, log_s, H, g, g_ent, inv_tau, HAS_ENT), 0.0)
    tl.store(out + out_off + j + cols, _cast_out(gt, out.dtype.element_ty), mask=cols < V - j)


@triton.jit
def _target_logp(base, off, ids, row, V, m, log_s, inv_tau):
    """-> (logp = (x[id] - m) / tau - log s, target column as int32; -1 when the id is outside [0, V): logp
    NaN, no target term). Computed from the raw max m, not from a rounded lse (see ``_lse_update``)."""
    tgt = tl.load(ids + row)
    ok = (tgt >= 0) & (tgt < V)
    tgt = tl.where(ok, tgt, -1).to(tl.int32)
    x_t = tl.load(base + off + tl.maximum(tgt, 0), mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, (x_t - m) * inv_tau - log_s, float("nan")), tgt


@triton.jit
def _dloss_dlogp(logp, old, ref, adv, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg,
                 HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr,
                 BIAS_CORR: tl.constexpr):
    """d loss_tok / d logp at token level: mirrors grpo_kernels.logp_loss.token_loss_grad line by line.

    w = logp - old (0 on-policy), c1 = e^w, dc1/dlogp = c1. clip: c2 = clamp(c1, 1-el, 1+eh),
    dc2 = c1 [1-el <= c1 <= 1+eh]; c1' = min(c1, delta), dc1' = c1 [c1 <= delta]; loss = -min(c1' A, c2 A)
    with torch.min's tie rule (half to each side). cispo: -min(c1, eh) A. sapo: -4 A s (1-s) c1 with
    s = sigmoid(tau (c1 - 1)). KL: r = ref - logp, dkl = 1 - e^r; bias-corrected (kl c1)' = dkl c1 + kl c1.
    """
    if HAS_OLD:
        c1 = tl.exp(logp - old)
    else:
        c1 = tl.full(logp.shape, 1.0, tl.float32)
    if LOSS == LOSS_CISPO:
        d = -tl.where(c1 > eps_high, eps_high, c1) * adv
    elif LOSS == LOSS_SAPO:
        tau = tl.where(adv > 0.0, sapo_pos, sapo_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (c1 - 1.0)))
        d = -4.0 * adv * s * (1.0 - s) * c1
    else:
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        c2 = tl.where(c1 < lo, lo, c1)
        c2 = tl.where(c2 > hi, hi, c2)
        dc2 = tl.where((c1 >= lo) & (c1 <= hi), c1, 0.0)
        c1d = c1
        dc1d = c1
        if HAS_DELTA:
            c1d = tl.where(c1 > delta, delta, c1)
            dc1d = tl.where(c1 <= delta, c1, 0.0)
        a = c1d * adv
        b = c2 * adv
        wa = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
        d = -(wa * adv * dc1d + (1.0 - wa) * adv * dc2)
    if HAS_REF:
        r = ref - logp
        er = tl.exp(r)
        dkl = 1.0 - er
        if BIAS_CORR:
            dkl = dkl * c1 + (er - r - 1.0) * c1
        d = d + beta * dkl
    return d


# ------------------------------------------------------------------------------------------------------
# kernels (grid: one program per row). Row-count-dependent integers are not specialised, so a new N, T or
# row stride never recompiles; V is (it is fixed per model).
# ------------------------------------------------------------------------------------------------------
_ROW_DEPENDENT_INTS = ["T", "stride_b", "stride_t", "shift", "out_stride_b", "out_stride_t", "out_shift"]


@triton.jit(do_not_specialize=_ROW_DEPENDENT_INTS[:4])
def logprobs_fwd_kernel(x, ids, logp_out, stats_out, ent_out, T, V, stride_b, stride_t, shift, inv_tau,
                        WANT_ENT: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    off = _row_offset(row, T, stride_b, stride_t, shift)
    H, m, log_s = _row_stats(x, off, V, inv_tau, ALIGN, BLOCK)
    logp, _ = _target_logp(x, off, ids, row, V, m, log_s, inv_tau)
    tl.store(logp_out + row, logp)
    tl.store(stats_out + 2 * row, m)
    tl.store(stats_out + 2 * row + 1, log_s)
    if WANT_ENT:
        tl.store(ent_out + row, H)


@triton.jit(do_not_specialize=_ROW_DEPENDENT_INTS)
def logprobs_bwd_kernel(x, ids, stats_in, ent_in, g_in, g_ent_in, out, T, V, stride_b, stride_t, shift,
                        out_stride_b, out_stride_t, out_shift, inv_tau,
                        HAS_ENT: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    off = _row_offset(row, T, stride_b, stride_t, shift)
    out_off = _row_offset(row, T, out_stride_b, out_stride_t, out_shift)
    g = tl.load(g_in + row)
    m = tl.load(stats_in + 2 * row)
    log_s = tl.load(stats_in + 2 * row + 1)
    if HAS_ENT:
        g_ent = tl.load(g_ent_in + row)
        H = tl.load(ent_in + row)
        live = (g != 0.0) | (g_ent != 0.0)
    else:
        g_ent = 0.0
        H = 0.0
        live = g != 0.0
    tgt = tl.load(ids + row)
    tgt = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)
    _write_row_grad(x, off, out, out_off, V, tgt, m, log_s, H, g, g_ent, live, inv_tau, HAS_ENT, ALIGN, BLOCK)


@triton.jit(do_not_specialize=_ROW_DEPENDENT_INTS)
def fused_fwd_bwd_kernel(x, ids, old_in, ref_in, adv_in, coef_in, logp_out, ent_out, out, T, V, stride_b, stride_t,
                         shift, out_stride_b, out_stride_t, out_shift, inv_tau,
                         eps_low, eps_high, delta, beta, sapo_pos, sapo_neg,
                         HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, LOSS: tl.constexpr,
                         HAS_DELTA: tl.constexpr, BIAS_CORR: tl.constexpr,
                         ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    off = _row_offset(row, T, stride_b, stride_t, shift)
    out_off = _row_offset(row, T, out_stride_b, out_stride_t, out_shift)
    H, m, log_s = _row_stats(x, off, V, inv_tau, ALIGN, BLOCK)
    logp, tgt = _target_logp(x, off, ids, row, V, m, log_s, inv_tau)
    tl.store(logp_out + row, logp)
    tl.store(ent_out + row, H)
    old = 0.0
    ref = 0.0
    if HAS_OLD:
        old = tl.load(old_in + row)
    if HAS_REF:
        ref = tl.load(ref_in + row)
    coef = tl.load(coef_in + row)
    d = _dloss_dlogp(logp, old, ref, tl.load(adv_in + row), eps_low, eps_high, delta, beta, sapo_pos, sapo_neg,
                     HAS_OLD, HAS_REF, LOSS, HAS_DELTA, BIAS_CORR)
    g = tl.where(coef == 0.0, 0.0, coef * d)  # masked token: 0 even where its logits are garbage (d NaN)
    _write_row_grad(x, off, out, out_off, V, tgt, m, log_s, H, g, 0.0, g != 0.0, inv_tau, False, ALIGN, BLOCK)
