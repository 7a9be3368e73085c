"""Differential fuzz test (hypothesis): every backend and every entry point against the float64 reference.

Each example draws one entry point and one call of it, then runs it on the backend under test and on the
oracle, ``backend="torch"`` on the same (dtype-rounded) inputs upcast to float64, and asserts that the backend
gives the oracle's answer within the tolerance of tests/kernel_checks.py or raises the oracle's error class.

Entry points: ``grpo_loss`` / ``grpo_loss_with_config`` / ``GRPOLoss``; ``token_logprobs``;
``fused_linear_grpo_loss`` / ``_with_config`` / ``FusedLinearGRPOLoss`` and ``fused_linear_token_logprobs``
(oracle: the unfused ``F.linear`` head (with its scale and soft cap) in float64, then the eager reference);
``vocab_parallel.grpo_loss`` / ``_with_config`` and ``vocab_parallel.token_logprobs`` in a one-process gloo
group (the shard is the whole vocabulary; oracle: the ordinary functions on the same logits).

What is drawn:
- shapes: B = P x G sequences with P = 0 (an empty batch) allowed, T from 0, V from 1; hidden size H;
- layouts of every tensor input: contiguous, a strided view (sliced batch, storage offset, padded rows; the
  padding holds NaN, which a read outside the view would show), transposed, expanded (stride 0), overlapping
  rows (``as_strided``), stride 2 along the last dim (an error for logits, accepted elsewhere);
- ``requires_grad`` on every floating input (logits or hidden / weight / bias, advantages or rewards,
  old / ref / sampling log-probs, a weighted completion mask, the sampler importance ratio);
- masks: none, bool, integer or real token weights (zeros, fractions, above 1), a fully masked row, garbage
  (NaN logits, NaN old / ref / [B, T] advantages, out-of-range ids) at dropped positions;
- every option: each loss type, both importance-sampling levels, beta with ref_logps, the KL bias correction,
  delta, temperature, epsilon_low / epsilon_high, the SAPO / VESPO parameters, the sampler importance ratio
  [B, T] or [B, 1] (given, or from ``sampler_importance_ratio`` in each mode), sampling_logps with
  off_policy_mask_threshold, top_entropy_quantile, entropy_coef, num_items_in_batch (int, float, tensor),
  max_completion_length, inplace, advantages [B] / [B, 1] / [B, T] or rewards + group_size (tied groups);
  the head's logit_scale / final_logit_softcapping / chunk_size of the fused-linear entry points;
- about one example in eight is a bad call (a wrong shape, dtype, stride, id, weight, ratio, group size or
  temperature, a missing ref_logps): the oracle raises ValueError / TypeError and so must the backend.

What is asserted, per example:
- errors: where the oracle raises ValueError / TypeError the backend raises the same class; where it does not,
  the backend raises nothing (forward or backward). Two exceptions, both by contract: ``inplace=True`` is a
  ValueError on backend "torch" (it cannot write into the logits) and on logits whose elements alias each
  other (expanded, overlapping rows: the gradient of one element would overwrite another's logit);
- values: log-probs and entropies by the tolerance rule of kernel_checks.py (``assert_rule``); the loss, every
  metric and the gradient of every input that requires grad by ``assert_via_logps``: the rule plus what the
  backend's own log-prob / entropy errors imply through the float64 loss math (the "at" evaluation below);
- gradients: a gradient that is None on the backend but not on the oracle is a failure, and so is one that the
  oracle does not have but the backend gives non-zero.

Discontinuities. Off-policy log-ratios keep at least 1e-3 from every clip bound (1 - epsilon_low,
1 + epsilon_high, delta, the cispo bound) and the off-policy threshold keeps 1e-3 from every sequence's mean
``sampling - logp``: the gradient jumps there, and which side an fp32 backend lands on is not specified. The
top-entropy mask is evaluated on the backend's own entropies by the "at" evaluation, so a token that crosses
the quantile through an fp32 rounding is not a failure.

Examples. CI runs ``CI_EXAMPLES`` per backend (derandomized: the same examples every run). The long mode is
opt-in: ``GRPO_KERNELS_FUZZ_EXAMPLES=2000 OMP_NUM_THREADS=1 pytest -s tests/test_fuzz.py`` runs that many per
backend and prints the count, the time and what was compared for each (``-k cpu`` etc. picks one backend);
``GRPO_KERNELS_FUZZ_SEED=<int>`` draws another fixed series, to split a long run into shorter ones.
"""

from __future__ import annotations

import collections
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from kernel_checks import assert_rule, assert_via_logps, backend_for_test, one_process_group, one_thread, rule_bound

import grpo_kernels as gk
from grpo_kernels import _validate, fused_linear, logp_loss, reference, vocab_parallel
from grpo_kernels.config import CLIP_LOSS_TYPES, LEVELS, LOSS_TYPES, GRPOConfig

pytestmark = [  # numpy warnings of the Triton interpreter on the NaN / inf garbage of dropped rows
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# Known-bug classes the draws steer around while they are being fixed (names: see _steer_known_bugs). Empty:
# the test asserts the right behaviour everywhere.
KNOWN_BUGS: frozenset[str] = frozenset()

CI_EXAMPLES = {"torch": 40, "cpu": 40, "triton": 25, "cuda_emu": 25, "cuda": 40}
# backend -> (max rows B*T, max V): the interpreter and the emulator run every row in Python / one thread
SIZES = {"torch": (12, 300), "cpu": (12, 300), "cuda": (12, 300), "triton": (6, 64), "cuda_emu": (6, 96)}
BACKENDS = ["torch", "cpu", "triton", "cuda_emu"] + (["cuda"] if torch.cuda.is_available() else [])
LOSS_ENTRIES = ("loss", "fused_linear", "vp_loss")
ENTRIES = LOSS_ENTRIES + ("logprobs", "fused_linear_logprobs", "vp_logprobs")
LAYOUTS = ("contiguous", "strided", "transposed", "expanded", "overlapping", "step")
ALIASING = ("expanded", "overlapping")  # layouts whose elements share storage
# the [B, T] / [B] inputs besides the ids and the mask, that may require grad
AUX = ("advantages", "rewards", "old_logps", "ref_logps", "sampling_logps", "importance_sampling_ratio")
MARGIN = 1e-3


def n_examples(backend: str) -> int:
    n = os.environ.get("GRPO_KERNELS_FUZZ_EXAMPLES")
    return int(n) if n else CI_EXAMPLES[backend]


def fuzz_seed() -> Optional[int]:
    """GRPO_KERNELS_FUZZ_SEED: another fixed series of examples (a long run split into shorter ones);
    unset: hypothesis's derandomized series, the same in every run."""
    s = os.environ.get("GRPO_KERNELS_FUZZ_SEED")
    return int(s) if s else None


# --------------------------------------------------------------------------------------------------
# layouts: a tensor of a logical shape as a view of a storage base
# --------------------------------------------------------------------------------------------------
def _expand_dim(ndim: int) -> int:
    return 1 if ndim == 2 else 0  # [B, 1] -> [B, T] for the per-token inputs; [1, T, V] -> [B, T, V]


def _overlap_geometry(shape):
    rows, last = math.prod(shape[:-1]), shape[-1]
    s = max(1, last // 2)  # consecutive rows share half their elements
    strides, acc = [1], s
    for d in reversed(shape[:-1]):
        strides.insert(0, acc)
        acc *= d
    n = (rows - 1) * s + last if rows > 0 else 0
    return tuple(strides), n


def view_of(base: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """The tensor of logical ``shape`` that ``layout`` makes of its storage ``base``."""
    nd = len(shape)
    if layout == "contiguous" or (layout == "transposed" and nd < 2):
        return base
    if layout == "strided":
        idx = [slice(None, None, 2)] + [slice(1, -2)] * (nd - 2) + [slice(2, -3)]
        return base[tuple(idx[-nd:])] if nd > 1 else base[2:-3]
    if layout == "transposed":
        return base.transpose(0, 1)
    if layout == "expanded":
        return base.expand(shape)
    if layout == "overlapping":
        strides, _ = _overlap_geometry(shape)
        return base.as_strided(shape, strides)
    if layout == "step":
        return base[..., ::2]
    raise AssertionError(layout)


def embed(logical: torch.Tensor, layout: str, junk: float = math.nan) -> torch.Tensor:
    """A base of ``layout`` whose view holds ``logical``. The aliasing layouts cannot hold arbitrary values:
    their base is taken from ``logical`` (its first slice along the expanded dim, its first elements when
    rows overlap) and the view's values differ from ``logical``; read them back with view_of."""
    shape, nd = tuple(logical.shape), logical.dim()
    if layout == "contiguous" or (layout == "transposed" and nd < 2):
        return logical.clone()
    if layout == "expanded":
        e = _expand_dim(nd)
        if shape[e] == 0:
            return torch.zeros(shape[:e] + (1,) + shape[e + 1:], dtype=logical.dtype)
        return logical.narrow(e, 0, 1).clone()
    if layout == "overlapping":
        _, n = _overlap_geometry(shape)
        return logical.reshape(-1)[:n].clone()
    if layout == "strided":
        bshape = (2 * shape[0],) + tuple(d + 3 for d in shape[1:-1]) + (shape[-1] + 5,) if nd > 1 else (shape[0] + 5,)
    elif layout == "transposed":
        bshape = (shape[1], shape[0]) + shape[2:]
    elif layout == "step":
        bshape = shape[:-1] + (2 * shape[-1],)
    else:
        raise AssertionError(layout)
    fill = junk if logical.is_floating_point() else -7
    base = torch.full(bshape, fill, dtype=logical.dtype)
    view_of(base, layout, shape).copy_(logical)
    return base


# --------------------------------------------------------------------------------------------------
# a drawn case
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    entry: str
    form: str  # "function", "config" (the *_with_config function) or "module"
    dtype: torch.dtype  # of the logits / hidden / head
    shape: tuple  # (B, T, V) (+ H for the fused-linear entries)
    base: dict  # input name -> storage base (CPU; floating bases in their own dtype)
    layout: dict  # input name -> layout
    shapes: dict  # input name -> logical shape
    grad: set  # names of the inputs that require grad
    opts: dict  # GRPOConfig fields
    kw: dict = field(default_factory=dict)  # other arguments (numbers, flags)
    inplace: bool = False
    bad: Optional[str] = None  # the deliberate error of a bad call, or None
    lead: int = 3  # token_logprobs: logits [T, V] (2), [B, T, V] (3) or [1, B, T, V] (4)
    w: tuple = ()  # token_logprobs: weights of logp and entropy in the scalar that is differentiated

    def __repr__(self):
        inputs = {k: f"{tuple(self.shapes[k])} {self.layout[k]}{' grad' if k in self.grad else ''}" for k in self.base}
        return (f"Case({self.entry}/{self.form} {self.dtype} shape={self.shape} inputs={inputs} opts={self.opts} "
                f"kw={self.kw} inplace={self.inplace} bad={self.bad} lead={self.lead})")


def _vocab(max_v: int):
    return st.sampled_from([v for v in (1, 2, 3, 5, 7, 31, 61, 127, 257) if v <= max_v]) | st.integers(1, max_v)


@st.composite
def cases(draw, backend: str, max_rows: int, max_v: int) -> dict:
    """The choices of one example, as plain values (hypothesis shrinks them); build_case makes the tensors."""
    entry = draw(st.sampled_from(ENTRIES))
    G = draw(st.integers(2, 3))
    P = draw(st.sampled_from([1, 1, 1, 2, 0]))  # 0: an empty batch
    T = draw(st.sampled_from([None, None, None, None, 0]))  # 0: empty sequences
    B = G * P
    if T is None:
        T = draw(st.integers(1, max(1, max_rows // max(B, 1))))
    # Half the examples take the fused backends' single pass (token-level weights): drawn freely, the options
    # that need every token first (sequence level, vespo, the off-policy or top-entropy mask, the entropy
    # bonus) would leave it about one loss example in thirty.
    single = draw(st.booleans())
    loss_type = draw(st.sampled_from([t for t in LOSS_TYPES if t != "vespo"] if single else LOSS_TYPES))
    clip = loss_type in CLIP_LOSS_TYPES
    opts = dict(
        loss_type=loss_type, importance_sampling_level="token" if single else draw(st.sampled_from(LEVELS)),
        temperature=draw(st.sampled_from([1.0, 0.7]) | st.floats(0.2, 5.0)),
        beta=draw(st.sampled_from([0.0, 0.0, 0.04, 0.5])), use_bias_correction_kl=draw(st.booleans()),
        epsilon_low=draw(st.sampled_from([0.2, 0.1, 0.0])),
        epsilon_high=(draw(st.sampled_from([1.0, 2.0, 5.0])) if loss_type == "cispo"
                      else draw(st.sampled_from([None, 0.28, 0.0]))),
        delta=draw(st.none() | st.floats(1.05, 3.0)) if clip else None,
        top_entropy_quantile=1.0 if single else draw(st.sampled_from([1.0, 0.5, 0.8, 0.0])),
        entropy_coef=0.0 if single else draw(st.sampled_from([0.0, 0.01, -0.3])),
    )
    if loss_type == "sapo" and draw(st.booleans()):
        opts.update(sapo_temperature_pos=draw(st.floats(0.5, 2.0)), sapo_temperature_neg=draw(st.floats(0.5, 2.0)))
    if loss_type == "vespo" and draw(st.booleans()):
        opts.update(vespo_k_pos=draw(st.floats(0.5, 3.0)), vespo_lambda_pos=draw(st.floats(0.5, 3.0)),
                    vespo_k_neg=draw(st.floats(0.5, 3.0)), vespo_lambda_neg=draw(st.floats(0.0, 3.0)))
    loss_entry = entry in LOSS_ENTRIES
    layouts = lambda: st.sampled_from(LAYOUTS[:5])  # noqa: E731 ("step" is drawn as a bad call for logits)
    c = dict(
        entry=entry, form=draw(st.sampled_from(["function", "config", "module"])), B=B, G=G, T=T,
        V=draw(_vocab(max_v)), H=draw(st.integers(1, 8)), dtype=draw(st.sampled_from(DTYPES)), opts=opts,
        zstd=draw(st.sampled_from([0.5, 1.0, 3.0])), banned=draw(st.booleans()),
        layout={name: draw(layouts() if name != "ids" else st.sampled_from(LAYOUTS[:3]))
                for name in ("logits", "hidden", "weight", "bias", "ids", "mask") + AUX},
        grad={name: draw(st.booleans()) for name in ("weight", "bias", "mask") + AUX},
        logits_grad=draw(st.sampled_from([True, True, True, False])),
        bias=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0])),
        cap=draw(st.sampled_from([None, None, 5.0, 30.0])), chunk=draw(st.none() | st.integers(1, max_rows + 1)),
        mask=draw(st.sampled_from(["none", "bool", "bool", "weights", "int", "nothing kept"])),
        garbage=draw(st.booleans()),
        adv=draw(st.sampled_from(["B", "B1", "BT", "rewards", "tied rewards"])),
        old_spread=draw(st.sampled_from([None, 0.05, 0.3, 1.0])),
        ref=draw(st.booleans()),
        rho=draw(st.sampled_from([None, None, "BT", "B1", "token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])),
        sampling=draw(st.booleans()),
        threshold=draw(st.none() | st.floats(-0.5, 0.5)) if loss_entry and not single else None,
        extra=draw(st.sampled_from([None, None, "max_completion_length", "num_items_in_batch",
                                    "num_items_in_batch float", "num_items_in_batch tensor"])),
        inplace=entry == "loss" and draw(st.sampled_from([False, False, True])),
        lead=draw(st.sampled_from([2, 3, 4])), return_entropy=draw(st.booleans()),
        bad=draw(st.sampled_from([None] * 7 + ["bad"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    if c["bad"] is not None:
        c["bad"] = draw(st.sampled_from(BAD_CALLS[entry]))
    _steer_known_bugs(c, backend)
    return c


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_LOSS_BAD = ["logits stride", "advantages shape", "id out of range", "beta without ref", "negative ratio",
             "negative weight", "group size", "integer advantages", "temperature", "advantages and rewards",
             "float ids", "loss type"]
_LP_BAD = ["logits stride", "id out of range", "temperature", "float ids", "ids shape"]
BAD_CALLS = {"loss": _LOSS_BAD, "vp_loss": _LOSS_BAD,
             "fused_linear": [b for b in _LOSS_BAD if b != "logits stride"] + ["weight shape"],
             "logprobs": _LP_BAD, "vp_logprobs": _LP_BAD,
             "fused_linear_logprobs": [b for b in _LP_BAD if b != "logits stride"] + ["weight shape"]}


def _steer_known_bugs(c: dict, backend: str) -> None:
    """While a known bug is being fixed, steer the draws around it (only for the names in KNOWN_BUGS):
    - "inplace_alias": inplace=True on logits whose elements alias (expanded, overlapping rows) must be a
      ValueError naming logits;
    - "aux_grad": the single-pass fused path (token-level weights) must give the gradients of advantages /
      rewards, old / ref log-probs, the mask's weights and the sampler ratio that require grad (as the
      reference does), or raise ValueError on every backend;
    - "empty": an empty batch (B, T or N = 0) must give TRL's value on every backend and option;
    - "fl_logprobs_ids_layout": fused_linear_token_logprobs must take ids of any strides on every backend."""
    if "inplace_alias" in KNOWN_BUGS and c["inplace"] and c["layout"]["logits"] in ALIASING:
        c["inplace"] = False
    if "aux_grad" in KNOWN_BUGS and c["entry"] in ("loss", "fused_linear"):
        if not GRPOConfig(**c["opts"]).needs_every_token:
            c["grad"] = {k: (v and k in ("weight", "bias")) for k, v in c["grad"].items()}
    if "fl_logprobs_ids_layout" in KNOWN_BUGS and c["entry"] == "fused_linear_logprobs":
        c["layout"]["ids"] = "contiguous"
    if "empty" in KNOWN_BUGS and (c["B"] == 0 or c["T"] == 0):
        c["B"], c["T"] = c["G"], max(c["T"], 1)


# --------------------------------------------------------------------------------------------------
# building the tensors of a case
# --------------------------------------------------------------------------------------------------
def _avoid_bounds(lp64, old, weights, cfg: GRPOConfig):
    """old log-probs moved so that no (token or sequence) log-ratio lies within MARGIN of a clip bound."""
    if cfg.loss_type == "cispo":
        bounds = [cfg.resolved_epsilon_high]
    elif cfg.loss_type in ("sapo", "vespo"):
        bounds = []
    else:
        bounds = [b for b in (1 - cfg.epsilon_low, 1 + cfg.resolved_epsilon_high, cfg.delta) if b is not None and b > 0]
    old = old.double()
    for _ in range(20):
        w = logp_loss.log_importance_weights(lp64, old, weights, cfg.importance_sampling_level)
        near = torch.zeros(w.shape, dtype=torch.bool)
        for b in bounds:
            near |= (w - math.log(b)).abs() < MARGIN
        if not near.any():
            break
        old = old - torch.where(near, 3 * MARGIN, 0.0)
    return old.float()


def _off_policy_threshold(thr, lp64, sampling, weights):
    """The threshold moved MARGIN away from every sequence's mean ``sampling - logp`` over its kept tokens."""
    d = torch.nan_to_num(sampling.double() - lp64, nan=0.0)
    mean = logp_loss._masked_sum(d, weights, -1) / weights.sum(-1).clamp(min=1)
    for _ in range(50):
        near = (mean - thr).abs() < MARGIN
        if not near.any():
            break
        thr += 3 * MARGIN
    return float(thr)


def _head(h, w, b, scale, cap):
    """The logits of the fused-linear entry points from the head: F.linear in the inputs' dtype, then the
    scale and soft cap in the compute dtype (fp32, float64 for float64 inputs), as fused_linear computes them."""
    x = F.linear(h, w, b)
    if scale == 1.0 and cap is None:
        return x
    y = x.to(logp_loss.compute_dtype(x)) * scale
    return y if cap is None else cap * torch.tanh(y / cap)


def _head_chunked(h, w, b, scale, cap, chunk, keep):
    """:func:`_head` as the fused-linear entry points compute it in the inputs' dtype: F.linear on chunks of
    ``chunk`` rows (None: all N rows, fused_linear's choice below CHUNK_MIN_ROWS rows), dropped rows zeroed.
    A bf16 / fp16 GEMM may round an output differently for another number of rows, so the same-dtype
    reference of these entry points sees the very logits the backends see."""
    B, T, H = h.shape
    N = B * T
    assert N <= fused_linear.CHUNK_MIN_ROWS or chunk is not None
    rows = torch.where(keep.reshape(N, 1), h.reshape(N, H), torch.zeros((), dtype=h.dtype))
    step = max(1, chunk or N)
    parts = [_head(rows[n0:n0 + step], w, b, scale, cap) for n0 in range(0, N, step)]
    x = torch.cat(parts) if parts else _head(rows, w, b, scale, cap)
    return x.view(B, T, w.shape[0])


def build_case(c: dict) -> Case:
    torch.manual_seed(c["seed"])
    entry, dtype, B, T, V, H = c["entry"], c["dtype"], c["B"], c["T"], c["V"], c["H"]
    fl = entry.startswith("fused_linear")
    bad = c["bad"]
    opts = dict(c["opts"])
    if bad == "temperature":
        opts["temperature"] = 0.0
    if bad == "loss type":
        opts["loss_type"] = "ppo"
    tau = opts["temperature"] if opts["temperature"] > 0 else 1.0
    cfg = GRPOConfig(**{**opts, "temperature": tau, "loss_type": c["opts"]["loss_type"]})
    base, layout, shapes, grad = {}, {}, {}, set()
    loss_entry = entry in LOSS_ENTRIES

    def put(name, logical, lay, requires_grad=False):
        b = embed(logical, lay)
        base[name], layout[name], shapes[name] = b, lay, tuple(logical.shape)
        if requires_grad:
            grad.add(name)
        return view_of(b, lay, tuple(logical.shape))

    # logits, or hidden states and head
    if fl:
        hidden = put("hidden", (torch.randn(B, T, H)).to(dtype), c["layout"]["hidden"], c["logits_grad"])
        lay_w = c["layout"]["weight"]
        wshape = (V, H + 1) if bad == "weight shape" else (V, H)
        weight = put("weight", (torch.randn(wshape) * c["zstd"] * tau / math.sqrt(H)).to(dtype), lay_w,
                     c["grad"]["weight"])
        bias = None
        if c["bias"]:
            bias = put("bias", (0.5 * torch.randn(V)).to(dtype), c["layout"]["bias"], c["grad"]["bias"])
        if bad == "weight shape":
            logits64 = torch.zeros(B, T, V, dtype=torch.float64)
        else:
            with torch.no_grad():
                logits64 = _head(hidden.double(), weight.double(), None if bias is None else bias.double(),
                                 c["scale"], c["cap"]).double()
    else:
        lay = "step" if bad == "logits stride" else c["layout"]["logits"]
        if bad == "logits stride" and V == 1:
            V = c["V"] = 2  # stride 2 along a vocabulary of one is still a valid layout
        x = (torch.randn(B, T, V) * c["zstd"] * tau).to(dtype)
        ids0 = torch.randint(0, V, (B, T))
        if c["banned"] and V > 1 and lay not in ALIASING:  # banned tokens, never the sampled one
            ban = torch.rand(B, T, V) < 0.3
            ban.scatter_(-1, ids0.unsqueeze(-1), False)
            x[ban] = float("-inf")
        logits = put("logits", x, lay, c["logits_grad"])
        logits64 = logits.detach().double()
    ids = torch.randint(0, V, (B, T)) if fl else ids0

    # the mask
    kind = c["mask"]
    if not loss_entry or kind == "none":
        keep, weights, mask = torch.ones(B, T, dtype=torch.bool), torch.ones(B, T), None
    else:
        keep = torch.rand(B, T) > 0.3 if kind != "nothing kept" else torch.zeros(B, T, dtype=torch.bool)
        if B > 1 and kind != "nothing kept":
            keep[int(torch.randint(0, B, ()))] = False  # a fully dropped sequence
        if kind == "weights":
            w = torch.tensor([0.5, 1.0, 2.0, 0.25])[torch.randint(0, 4, (B, T))]
            mask = torch.where(keep, w, 0.0)
        elif kind == "int":
            mask = torch.where(keep, torch.randint(1, 3, (B, T)), 0)
        else:
            mask = keep
        mask = put("completion_mask", mask, c["layout"]["mask"], kind == "weights" and c["grad"]["mask"])
        keep = mask != 0
        weights = mask.double() if kind in ("weights", "int") else keep
    # garbage where nothing counts
    if loss_entry and c["garbage"] and not keep.all():
        if not fl and layout["logits"] not in ALIASING:
            with torch.no_grad():
                view_of(base["logits"], layout["logits"], shapes["logits"])[~keep] = float("nan")
            logits64 = view_of(base["logits"], layout["logits"], shapes["logits"]).double()
        ids = ids.masked_fill(~keep & (torch.rand(B, T) < 0.5), V + 3)
        ids = ids.masked_fill(~keep & (torch.rand(B, T) < 0.3), -100)
    if bad == "id out of range" and B * T > 0:
        k = keep.nonzero()
        if len(k):
            ids[tuple(k[0])] = V
        else:
            bad = None
    if bad == "id out of range" and B * T == 0:
        bad = None
    put("ids", ids.float() if bad == "float ids" else ids, c["layout"]["ids"])
    if bad == "ids shape":
        put("ids", torch.randint(0, V, (B, T + 1)), "contiguous")

    if not loss_entry:
        return Case(entry, c["form"], dtype, (B, T, V, H), base, layout, shapes, grad, opts,
                    dict(return_entropy=c["return_entropy"], temperature=opts["temperature"], scale=c["scale"],
                         cap=c["cap"], chunk=c["chunk"]), bad=bad, lead=c["lead"] if not fl else 3,
                    w=(torch.randn(B, T), torch.randn(B, T)))

    # log-prob inputs, derived from the float64 log-probs of the (rounded) logits
    lp64 = reference.token_logprobs(logits64, torch.where(keep, ids, 0).clamp(0, V - 1), tau, mask=keep)
    lay_of = lambda name: c["layout"][name] if c["layout"][name] not in ALIASING else "strided"  # noqa: E731
    old = sampling = None
    if c["old_spread"] is not None:
        old = _avoid_bounds(lp64, lp64 + c["old_spread"] * torch.randn(B, T), weights, cfg)
    if c["sampling"] or c["rho"] in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        sampling = (lp64 + 0.2 * torch.randn(B, T)).float()
        sampling[torch.rand(B, T) < 0.1] = float("nan")  # a token the sampler did not score
    threshold = c["threshold"]
    if threshold is not None:
        s_eff = old if sampling is None else sampling
        threshold = _off_policy_threshold(threshold, lp64, lp64 if s_eff is None else s_eff, weights)
        opts["off_policy_mask_threshold"] = threshold
    ref = None
    if (cfg.beta != 0 or c["ref"]) and bad != "beta without ref":
        ref = (lp64 + 0.3 * torch.randn(B, T)).float()
    if bad == "beta without ref":
        opts["beta"] = 0.04
    rho = None
    if c["rho"] in ("BT", "B1"):
        rho = torch.exp(0.3 * torch.randn(B, T if c["rho"] == "BT" else 1))
        rho[torch.rand(rho.shape) < 0.15] = 0.0
    elif c["rho"] is not None:
        o = old if old is not None else lp64.float()
        rho = gk.sampler_importance_ratio(o, sampling, mask if mask is not None else None, mode=c["rho"],
                                          clip_min=0.5 if c["seed"] % 2 else None, clip_max=2.0)
    if bad == "negative ratio":
        rho = -torch.ones(B, 1)
        if not keep.any():
            bad = None
    garbage = c["garbage"] and not keep.all()
    for name, t in (("old_logps", old), ("ref_logps", ref), ("sampling_logps", sampling)):
        if t is not None:
            lay = lay_of(name) if name != "ref_logps" else c["layout"][name]
            if garbage and lay not in ALIASING:  # (an aliased element may be kept elsewhere)
                t = t.masked_fill(~keep, float("nan"))
            put(name, t, lay, c["grad"][name])
    if rho is not None:
        put("importance_sampling_ratio", rho, c["layout"]["importance_sampling_ratio"],
            c["grad"]["importance_sampling_ratio"])
    # advantages or rewards
    kw = {}
    adv_kind = c["adv"]
    if adv_kind in ("rewards", "tied rewards") and bad != "advantages and rewards":
        r = torch.randn(B) if adv_kind == "rewards" else torch.randint(0, 2, (B,)).float()
        if adv_kind == "tied rewards" and B:
            r[: c["G"]] = 0.5
        r = put("rewards", r, c["layout"]["rewards"], c["grad"]["rewards"])
        if B and bool((r.view(-1, c["G"]).std(-1) < 0.1).any()):
            # a (nearly) tied group: dA/dr = (I - 1/G) / (std + 1e-4) amplifies the fp32 rounding of dL/dA up to
            # 1e4 times, beyond any tolerance stated at the scale of the gradient; its value is checked without
            grad.discard("rewards")
        kw["group_size"] = c["G"] + 1 if bad == "group size" and B else c["G"]
        if bad == "group size" and not B:
            kw["group_size"] = 1
    else:
        shape = {"B": (B,), "B1": (B, 1), "BT": (B, T), "rewards": (B,), "tied rewards": (B,)}[adv_kind]
        if bad == "advantages shape":
            shape = (B + 1,)
        a = torch.randn(shape)
        if adv_kind == "BT" and garbage and bad != "advantages shape" and c["layout"]["advantages"] not in ALIASING:
            a = a.masked_fill(~keep, float("nan"))
        if bad == "integer advantages":
            a = torch.randint(-2, 3, shape)
        put("advantages", a, c["layout"]["advantages"], c["grad"]["advantages"] and a.is_floating_point())
        if bad == "advantages and rewards":
            put("rewards", torch.randn(B), "contiguous")
            kw["group_size"] = c["G"]
    if bad == "negative weight":
        m = torch.ones(B, T)
        if B * T:
            m[0, 0] = -1.0
        else:
            bad = None
        put("completion_mask", m, "contiguous")
    if bad == "group size" and "rewards" not in base:
        bad = None
    extra = c["extra"]
    if extra == "max_completion_length":
        kw["max_completion_length"] = int(torch.randint(1, 2 * T + 2, ()))
    elif extra is not None:
        n = float(torch.randint(1, 2 * B * T + 2, ()))
        kw["num_items_in_batch"] = (int(n) if extra == "num_items_in_batch" else n if extra.endswith("float")
                                    else torch.tensor(n))
    if entry == "fused_linear":
        kw.update(scale=c["scale"], cap=c["cap"], chunk=c["chunk"])
    # inplace needs logits that require grad; a bad call is not combined with it (which error comes first is
    # not specified)
    inplace = c["inplace"] and c["logits_grad"] and bad is None
    return Case(entry, c["form"], dtype, (B, T, V, H), base, layout, shapes, grad, opts, kw, inplace, bad)


# --------------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    error: Optional[BaseException] = None
    loss: Optional[torch.Tensor] = None
    logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    metrics: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)  # input name -> gradient (None: no gradient)
    requires_grad: bool = False  # whether an output of a forward-only entry carries a graph


def _leaves(case: Case, f64: bool, device="cpu") -> dict:
    """Fresh leaves of the case's bases (upcast to float64 for the oracle), requires_grad as drawn."""
    out = {}
    for name, b in case.base.items():
        t = b.to(device=device, dtype=torch.float64 if f64 and b.is_floating_point() else b.dtype).clone()
        out[name] = t.requires_grad_(name in case.grad)
    return out


def _inputs(case: Case, leaves: dict, inplace: bool = False) -> dict:
    """name -> the tensor the call receives (the layout's view of the leaf; through ``* 1`` for inplace, which
    needs logits that are not a leaf)."""
    out = {}
    for name, leaf in leaves.items():
        src = leaf * 1 if inplace and name == "logits" else leaf
        out[name] = view_of(src, case.layout[name], case.shapes[name])
    return out


LOSS_INPUT_NAMES = ("completion_mask", "advantages", "rewards", "old_logps", "ref_logps", "importance_sampling_ratio",
                    "sampling_logps")


def _loss_kwargs(case: Case, t: dict) -> dict:
    kw = {name: t[name] for name in LOSS_INPUT_NAMES if name in t}
    for name in ("group_size", "max_completion_length", "num_items_in_batch"):
        if name in case.kw:
            kw[name] = case.kw[name]
    return kw


def _lead(case: Case, x, ids):
    if case.lead == 2:  # [T, V] of the first sequence (B = 0 has none: [0, T, V] stays)
        return (x[0], ids[0]) if x.shape[0] else (x, ids)
    if case.lead == 4:
        return x.unsqueeze(0), ids.unsqueeze(0)
    return x, ids


def call(case: Case, backend: str, *, f64: bool, unfused: bool, device="cpu", inplace=False) -> Outcome:
    """Runs the case's entry point on ``backend`` (``unfused``: the value oracle's form of the entry: the
    ordinary functions on the full logits, F.linear in front for the fused-linear ones) and differentiates
    its result; any exception, forward or backward, is the outcome's error."""
    leaves = _leaves(case, f64, device)
    t = _inputs(case, leaves, inplace)
    out = Outcome()
    try:
        _run(case, backend, t, out, unfused, inplace)
    except Exception as e:  # noqa: BLE001 (the class is what the test compares)
        out.error = e
        return out
    out.grads = {name: leaf.grad for name, leaf in leaves.items() if name in case.grad}
    return out


def _config(case: Case) -> GRPOConfig:
    return GRPOConfig(**case.opts)


def _run(case: Case, backend: str, t: dict, out: Outcome, unfused: bool, inplace: bool) -> None:
    entry, kw = case.entry, case.kw
    fl = entry.startswith("fused_linear")
    if fl and unfused:
        if t["hidden"].dtype == torch.float64:  # the oracle: the order of the rows' sums is immaterial
            logits = _head(t["hidden"], t["weight"], t.get("bias"), kw["scale"], kw["cap"])
        else:
            mask = t.get("completion_mask")
            keep = torch.ones(t["ids"].shape, dtype=torch.bool) if mask is None else mask != 0
            logits = _head_chunked(t["hidden"], t["weight"], t.get("bias"), kw["scale"], kw["cap"], kw["chunk"], keep)
        entry = "loss" if entry == "fused_linear" else "logprobs"
    elif fl:
        head = dict(logit_scale=kw["scale"], final_logit_softcapping=kw["cap"], chunk_size=kw["chunk"],
                    backend=backend)
    else:
        logits = t["logits"]
    if unfused and entry.startswith("vp_"):
        entry = entry[3:]
    ids = t["ids"]

    if entry in ("logprobs", "vp_logprobs", "fused_linear_logprobs"):
        tau = kw["temperature"]
        if entry == "fused_linear_logprobs":
            res = gk.fused_linear_token_logprobs(t["hidden"], t["weight"], ids, bias=t.get("bias"), temperature=tau,
                                                 return_entropy=kw["return_entropy"], **head)
        else:
            x, i = _lead(case, logits, ids)
            fn = gk.token_logprobs if entry == "logprobs" else vocab_parallel.token_logprobs
            res = fn(x, i, temperature=tau, return_entropy=kw["return_entropy"], backend=backend)
        logp, ent = res if kw["return_entropy"] else (res, None)
        out.logps, out.entropy = logp.detach().cpu(), None if ent is None else ent.detach().cpu()
        out.requires_grad = logp.requires_grad or (ent is not None and ent.requires_grad)
        if not out.requires_grad:
            return
        w_lp, w_ent = (w.to(logp.device).reshape(logp.shape) if w.numel() == logp.numel() else
                       w[: 1].to(logp.device).reshape(logp.shape) for w in case.w)
        s = (logp * w_lp).sum() + (0 if ent is None else (ent * w_ent).sum())
        s.backward()
        return

    lkw = _loss_kwargs(case, t)
    if entry == "loss":
        lkw.update(inplace=inplace, backend=backend)
        if case.form == "function":
            res = gk.grpo_loss(logits, ids, **lkw, **case.opts)
        elif case.form == "config":
            res = gk.grpo_loss_with_config(logits, ids, _config(case), **lkw)
        else:
            res = gk.GRPOLoss(**case.opts)(logits, ids, **lkw)
    elif entry == "vp_loss":
        lkw.update(backend=backend)
        if case.form == "config":
            res = vocab_parallel.grpo_loss_with_config(logits, ids, _config(case), **lkw)
        else:
            res = vocab_parallel.grpo_loss(logits, ids, vocab_start=0 if case.form == "module" else None, **lkw,
                                           **case.opts)
    else:  # fused_linear
        if case.form == "function":
            res = gk.fused_linear_grpo_loss(t["hidden"], t["weight"], ids, lm_head_bias=t.get("bias"), **head,
                                            **lkw, **case.opts)
        elif case.form == "config":
            res = gk.fused_linear_grpo_loss_with_config(t["hidden"], t["weight"], ids, _config(case),
                                                        lm_head_bias=t.get("bias"), **head, **lkw)
        else:
            mod = gk.FusedLinearGRPOLoss(weight=t["weight"], bias=t.get("bias"), **head, **case.opts)
            res = mod(t["hidden"], ids, **lkw)
    out.loss, out.logps = res.loss.detach().cpu(), res.logps.detach().cpu()
    out.metrics = {k: v.detach().cpu() for k, v in res.metrics.items()}
    if res.loss.requires_grad:
        res.loss.backward()


def kernel_entropy(case: Case, backend: str, device="cpu") -> torch.Tensor:
    """The backend's entropies [B, T] of the loss case's logits (what its loss path computes them with)."""
    leaves = _leaves(case, False, device)
    t = _inputs(case, leaves)
    with torch.no_grad():
        mask = t.get("completion_mask")
        keep = torch.ones(t["ids"].shape, dtype=torch.bool, device=device) if mask is None else mask != 0
        ids = torch.where(keep, t["ids"], 0)
        if case.entry == "fused_linear":
            kw = case.kw
            _, ent = gk.fused_linear_token_logprobs(
                t["hidden"], t["weight"], ids, bias=t.get("bias"), temperature=case.opts["temperature"],
                return_entropy=True, logit_scale=kw["scale"], final_logit_softcapping=kw["cap"],
                chunk_size=kw["chunk"], backend=backend)
        else:
            fn = gk.token_logprobs if case.entry == "loss" else vocab_parallel.token_logprobs
            _, ent = fn(t["logits"], ids, temperature=case.opts["temperature"], return_entropy=True, backend=backend)
    return ent.cpu()


def at_kernel_logps(case: Case, logps: torch.Tensor, entropy: torch.Tensor) -> Outcome:
    """The float64 loss math evaluated at the backend's log-probs and entropies: the loss, the metrics and the
    gradient of every input that requires grad (through float64 log-softmax for the logits / head)."""
    cfg = _config(case)
    leaves = _leaves(case, True)
    t = _inputs(case, leaves)
    if case.entry == "fused_linear":
        logits = _head(t["hidden"], t["weight"], t.get("bias"), case.kw["scale"], case.kw["cap"])
    else:
        logits = t["logits"]
    li = _validate.validate_loss_inputs(logits.detach(), t["ids"], cfg, **_loss_kwargs(case, t))
    keep = li.mask
    lp = torch.where(keep, logps.double(), 0.0).requires_grad_()
    ent = torch.where(keep, entropy.double(), 0.0).requires_grad_(cfg.entropy_coef != 0.0)
    loss, metrics = logp_loss.loss_from_logps(lp, cfg, entropy=ent, **li.loss_kwargs())
    out = Outcome(loss=loss.detach(), metrics=metrics)
    aux = [name for name in case.grad if name in LOSS_INPUT_NAMES]
    wrt = [lp, ent] + [leaves[name] for name in aux]
    gs = [None] * len(wrt)
    if loss.requires_grad:
        idx = [i for i, t in enumerate(wrt) if t.requires_grad]
        for i, g in zip(idx, torch.autograd.grad(loss, [wrt[i] for i in idx], allow_unused=True), strict=True):
            gs[i] = g
    out.grads = dict(zip(aux, gs[2:], strict=True))
    head = [n for n in ("logits", "hidden", "weight", "bias") if n in case.grad]
    if head:
        ids0 = torch.where(keep, t["ids"], 0)
        lpx, entx = reference.token_logprobs(logits, ids0, cfg.temperature, True, mask=keep)
        s = 0.0
        if gs[0] is not None:
            s = s + (lpx * gs[0]).sum()
        if gs[1] is not None:
            s = s + (entx * gs[1]).sum()
        hg = [None] * len(head)
        if torch.is_tensor(s):
            hg = torch.autograd.grad(s, [leaves[n] for n in head], allow_unused=True)
        for n, g in zip(head, hg, strict=True):
            out.grads[n] = g if g is not None else torch.zeros_like(leaves[n])
    return out


# --------------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------------
def expected_error(case: Case, backend: str, oracle_error) -> Optional[type]:
    if oracle_error is not None:
        return type(oracle_error)
    if case.inplace and (backend == "torch" or aliases(case.layout["logits"], tuple(case.shapes["logits"]))):
        return ValueError  # by contract: torch cannot write into the logits; aliasing logits cannot hold a gradient
    return None


def aliases(layout: str, shape: tuple) -> bool:
    """Whether two elements of a view of ``layout`` and ``shape`` are one memory location: an aliasing layout
    of no element, an expanded dim of size 1, or overlapping rows of one element (each row then starts where
    the last one ends) alias nothing."""
    if layout not in ALIASING or math.prod(shape) == 0:
        return False
    if layout == "expanded":
        return shape[_expand_dim(len(shape))] > 1
    return math.prod(shape[:-1]) > 1 and shape[-1] > 1


def check_case(case: Case, backend: str, device: str) -> str:
    """Asserts the backend's outcome of ``case``; returns what was compared (for the printed tally)."""
    what = f"{backend}: {case!r}"
    entry = case.entry
    with one_thread():
        err_oracle = call(case, "torch", f64=True, unfused=False).error
    want = expected_error(case, backend, err_oracle)
    k = call(case, backend, f64=False, unfused=False, device=device, inplace=case.inplace)
    if want is not None or k.error is not None:
        if err_oracle is not None and not isinstance(err_oracle, (ValueError, TypeError)):
            raise AssertionError(f"the oracle raised {type(err_oracle).__name__}: {err_oracle}\n{what}") from err_oracle
        if want is None:
            raise AssertionError(f"raised {type(k.error).__name__} where the oracle raises nothing: {k.error}\n"
                                 f"{what}") from k.error
        if k.error is None:
            raise AssertionError(f"raised nothing where {want.__name__} is expected ({err_oracle})\n{what}")
        if type(k.error) is not want:
            raise AssertionError(f"raised {type(k.error).__name__} ({k.error}) where {want.__name__} is expected "
                                 f"({err_oracle})\n{what}") from k.error
        return f"error {want.__name__}"
    with one_thread():
        r = call(case, "torch", f64=True, unfused=True)
        s = call(case, "torch", f64=False, unfused=True)
    for o, name in ((r, "the float64 oracle"), (s, "the same-dtype reference")):
        if o.error is not None:
            raise AssertionError(f"{name} (unfused form) raised {type(o.error).__name__}: {o.error}\n"
                                 f"{what}") from o.error

    if entry not in LOSS_ENTRIES:
        assert_rule(k.logps, r.logps, s.logps, f"logps {what}")
        assert (k.entropy is None) == (r.entropy is None), what
        if k.entropy is not None:
            assert_rule(k.entropy, r.entropy, s.entropy, f"entropy {what}")
        _check_grads(k, r, s, None, what, case)
        return entry

    assert k.logps.shape == r.logps.shape, what
    assert_rule(k.logps, r.logps, s.logps, f"logps {what}")
    at = at_kernel_logps(case, k.logps, kernel_entropy(case, backend, device))
    assert_via_logps(k.loss, r.loss, s.loss, at.loss, f"loss {what}")
    assert set(k.metrics) == set(r.metrics), f"metric names {sorted(k.metrics)} != {sorted(r.metrics)}\n{what}"
    for name, kv in k.metrics.items():
        assert kv.dim() == 0 and kv.dtype == torch.float32, f"metric {name}: {kv}\n{what}"
        assert_via_logps(kv, r.metrics[name], s.metrics[name], at.metrics[name], f"metric {name} {what}")
    _check_grads(k, r, s, at, what, case)
    return entry


def _check_grads(k: Outcome, r: Outcome, s: Outcome, at: Optional[Outcome], what: str, case: Case) -> None:
    for name, rg in r.grads.items():
        kg = k.grads.get(name)
        if rg is None:
            assert kg is None or not kg.any(), (f"gradient of {name}: the oracle has none, the backend a non-zero "
                                                f"one\n{what}")
            continue
        assert kg is not None, f"gradient of {name}: None on the backend, a tensor on the oracle\n{what}"
        assert s.grads[name] is not None, f"gradient of {name}: None on the same-dtype reference\n{what}"
        kg, rg, sg = kg.cpu(), rg.cpu(), s.grads[name].cpu()
        assert kg.shape == rg.shape and kg.dtype == sg.dtype, f"gradient of {name}: {kg.shape} {kg.dtype}\n{what}"
        if kg.dtype in (torch.float16, torch.bfloat16) and bool((rg.abs() > torch.finfo(kg.dtype).max).any()):
            # the true gradient is beyond the dtype's range: rounded, it is inf, and the inf - inf of the chain
            # rule makes NaN of its neighbours (torch's own fp16 gradient as well); no value to compare
            continue
        summed = case.layout.get(name) in ALIASING or (case.entry.startswith("fused_linear")
                                                       and name in ("hidden", "weight", "bias"))
        if kg.dtype in (torch.float16, torch.bfloat16) and summed and kg.numel():
            # sums of values rounded to the 16-bit dtype: the head's gradients are matmuls of the per-logit
            # gradients, rounded to the dtype first (by the kernel as by torch), and autograd sums the gradients
            # of elements that share a location after rounding each. Which way each of a handful of summands
            # rounds differs between the two, so the sum may differ by an ulp of the result beyond the rule (one
            # sample of torch's error bounds nothing at these sizes).
            ag = torch.zeros_like(rg) if at is None or at.grads.get(name) is None else at.grads[name].cpu()
            err = (kg.double() - rg.double()).abs() - (ag.double() - rg.double()).abs()
            bound = rule_bound(rg, sg) + torch.finfo(kg.dtype).eps * rg.abs().max().item()
            assert err.max().item() <= bound, f"gradient of {name} {what}: {err.max().item():.3g} > {bound:.3g}"
            continue
        if at is None:  # token_logprobs: the gradient's weights do not depend on the log-probs
            assert_rule(kg, rg, sg, f"gradient of {name} {what}")
        else:
            ag = at.grads.get(name)
            ag = torch.zeros_like(rg) if ag is None else ag
            assert_via_logps(kg, rg, sg, ag, f"gradient of {name} {what}")


# --------------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_fuzz(name, request):
    backend, device = backend_for_test(name, request)
    max_rows, max_v = SIZES[name]
    n = n_examples(name)
    tally = collections.Counter()

    @settings(max_examples=n, deadline=None, derandomize=fuzz_seed() is None, database=None, print_blob=True,
              report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(c=cases(name, max_rows, max_v))
    @seed(fuzz_seed())
    def prop(c):
        with one_thread():
            case = build_case(c)
        tally[check_case(case, backend, device)] += 1

    t0 = time.perf_counter()
    with one_process_group():
        prop()
    print(f"\nfuzz {name}: {sum(tally.values())} examples in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
