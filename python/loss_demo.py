"""The fused GRPO loss on one realistic batch, with every backend available here.

Builds a batch like one GRPO step's (B sequences x T completion tokens x V vocabulary, logits taken as the
strided view ``model_logits[:, P-1:-1]`` a causal LM gives), then for each backend in
``grpo_kernels.available_backends()`` computes the loss and its gradient and prints the loss, the metrics,
the forward+backward time and the largest difference from the eager reference (``backend="torch"``).

Timing: the first call of each backend is reported on its own (it pays one-off costs), then the median (and
min-max) of ``--repeats`` further calls, the number a training loop sees every step. The first loss call of a
process also makes torch import ``torch._dynamo`` (torch does that on the first call of any
``torch.library`` custom op, which the fused backends are); the demo imports it up front and prints that
time separately, so that the first-call numbers are the backends' own.

    python python/loss_demo.py                       # B=16, T=256, V=32,000, fp32
    python python/loss_demo.py --dtype bf16 --vocab 151936 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import grpo_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batch(B: int, T: int, V: int, G: int, P: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Logits of prompt + completion positions; the loss sees the completion part only, as a view.
    model_logits = (torch.randn(B, P + T, V, generator=g) * 2.0).to(dtype)
    logits = model_logits[:, P - 1 : -1]
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.rand(B, generator=g)
    # Log-probs of the sampling policy: near the current ones, so some ratios leave the clip range.
    with torch.no_grad():
        logp = grpo_kernels.token_logprobs(logits, ids, backend="torch")
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    return model_logits, logits, ids, mask, rewards, old, ref


def run(backend: str, logits, **batch):
    leaf = logits.detach().clone().requires_grad_(True)  # keep the caller's storage and strides apart
    start = time.perf_counter()
    out = grpo_kernels.grpo_loss(leaf, backend=backend, **batch)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    return out, leaf.grad, elapsed


def timed(backend: str, logits, repeats: int, **batch):
    """-> (out, grad, first-call s, [s of each further call])."""
    out, grad, first = run(backend, logits, **batch)
    later = [run(backend, logits, **batch)[2] for _ in range(repeats)]
    return out, grad, first, later


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="B sequences (groups of --group)")
    p.add_argument("--group", type=int, default=8, help="G completions per prompt")
    p.add_argument("--tokens", type=int, default=256, help="T completion tokens per sequence")
    p.add_argument("--vocab", type=int, default=32000, help="V vocabulary entries")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 disables the KL term)")
    p.add_argument("--loss-type", default="dapo", choices=grpo_kernels.config.LOSS_TYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the first (median reported)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")

    t0 = time.perf_counter()
    already = "torch._dynamo" in sys.modules
    import torch._dynamo  # noqa: F401  (see the module docstring: torch's one-off cost, timed on its own)

    dynamo_s = time.perf_counter() - t0

    model_logits, logits, ids, mask, rewards, old, ref = make_batch(
        args.batch, args.tokens, args.vocab, args.group, 4, DTYPES[args.dtype], args.seed
    )
    batch = dict(
        completion_ids=ids, completion_mask=mask, rewards=rewards, group_size=args.group, old_logps=old,
        ref_logps=ref, beta=args.beta, loss_type=args.loss_type,
    )
    N = args.batch * args.tokens
    print(f"batch: B={args.batch} T={args.tokens} V={args.vocab} ({N} tokens, {mask.sum().item()} unmasked), "
          f"{args.dtype} logits {tuple(logits.shape)} strides {logits.stride()}, loss_type={args.loss_type}, "
          f"beta={args.beta}")
    backends = grpo_kernels.available_backends("cpu")
    print(f"available backends on cpu: {backends}")
    print(f"torch's one-off import of torch._dynamo (done by torch on the first call of any torch.library custom "
          f"op): {'already imported' if already else f'{dynamo_s * 1e3:.0f} ms'}\n")
    print(f"fwd+bwd: the first call of each backend (one-off costs: first page faults, thread start), then the "
          f"median (min-max) of {args.repeats} more calls")

    ref_out, ref_grad, *ref_times = timed("torch", logits, args.repeats, **batch)
    for name in backends:
        out, grad, first, later = (ref_out, ref_grad, *ref_times) if name == "torch" else \
            timed(name, logits, args.repeats, **batch)
        dloss = abs(out.loss.item() - ref_out.loss.item())
        dgrad = (grad.float() - ref_grad.float()).abs().max().item()
        dlogp = (out.logps - ref_out.logps).abs().max().item()
        print(f"[{name:>6}] loss {out.loss.item(): .6f}  fwd+bwd first {first * 1e3:8.1f} ms, then median "
              f"{statistics.median(later) * 1e3:8.1f} ms ({min(later) * 1e3:.1f}-{max(later) * 1e3:.1f})   "
              f"|dloss| {dloss:.1e}  max|dlogp| {dlogp:.1e}  max|dgrad| {dgrad:.1e} (vs torch)")
        print("         " + "  ".join(f"{k}={v.item():.4f}" for k, v in out.metrics.items()))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
