"""Peak memory of gathering an FSDP2-sharded LM head for the streamed GRPO loss, 2 CPU processes over gloo.

    torchrun --nproc_per_node 2 -m bench.fsdp_head_gather --out bench/results
    torchrun --nproc_per_node 2 -m bench.fsdp_head_gather --vocab 4096 --hidden 256 --rows 256 --out /tmp/smoke

The head is an ``nn.Linear(H, V)`` (fp32, no bias) sharded with torch's ``fully_shard`` over both ranks, as
accelerate's FSDP2 shards an untied ``lm_head`` that is its own unit: outside its own forward its weight is a
``DTensor`` of V / 2 rows per rank. ``GRPOKernelsTrainer`` never calls that forward: it gathers the weight as
``grpo_kernels.integrations.trl`` does (``redistribute`` to replicated, a backward that averages the gradient over
the ranks into each shard, as FSDP's reduce-scatter does). Measured per rank, each a peak above the memory in use
just before:

- ``gather``: the gather alone (the full [V, H] weight and gloo's buffers);
- ``loss_bwd sharded``: the loss of N rows and its backward with the gathered weight (gather + streamed head +
  fp32 dL/dW + the gradient's reduce-scatter);
- ``loss_bwd replicated``: the same with a plain [V, H] weight on each rank (what DDP holds), for comparison.

Each rank has its own batch; the sharded gradient is checked against the mean of the replicated ones.

Memory is the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) minus the RSS before the phase, with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers go back to the system (set it before launching, as in the
command above; the script re-executes itself with it otherwise). Results:
``bench/results/cpu-fsdp2_head_gather-v{V}-h{H}.json`` and ``.md`` (written by rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bench.runner import environment, proc_status_kib, reset_peak_rss

MIB = 2**20


def peak_extra_mib(fn) -> float:
    gc.collect()
    dist.barrier()
    before = proc_status_kib("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    out = fn()
    peak = proc_status_kib("VmHWM")
    del out
    gc.collect()
    return (peak - before) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fsdp_head_gather", description=__doc__)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--rows", type=int, default=1024, help="rows (tokens) of the loss")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        raise SystemExit("launch with MALLOC_MMAP_THRESHOLD_=65536 in the environment (see the module docstring)")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import grpo_kernels as gk

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    V, H, N = args.vocab, args.hidden, args.rows
    from grpo_kernels.integrations.trl import _replicate_averaging_grads

    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    plain = head.weight.detach().clone().requires_grad_(True)
    fully_shard(head, mesh=mesh)
    torch.manual_seed(1 + rank)  # each rank its own batch
    B, T = N // 64, 64
    hidden = torch.randn(B, T, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    old = torch.randn(B, T).mul_(0.1).sub_(8)
    gk_args = dict(advantages=adv, old_logps=old, loss_type="dapo", backend="cpu")

    def gathered():
        return _replicate_averaging_grads(head.weight, [True])

    def gather():
        return gathered()

    def loss_bwd(weight):
        def run():
            out = gk.fused_linear_grpo_loss(hidden, weight() if callable(weight) else weight, ids, **gk_args)
            out.loss.backward()
            return out

        return run

    results = {}
    for name, fn in (("gather", gather), ("loss_bwd sharded", loss_bwd(gathered)),
                     ("loss_bwd replicated", loss_bwd(plain))):
        fn()  # warm-up: first-call allocations (gloo buffers, the library's cached gradient buffer)
        head.weight.grad = plain.grad = hidden.grad = None
        results[name] = peak_extra_mib(fn)
        head.weight.grad = plain.grad = hidden.grad = None
    # the sharded gradient is the mean over the ranks of the replicated ones
    gk.fused_linear_grpo_loss(hidden, gathered(), ids, **gk_args).loss.backward()
    gk.fused_linear_grpo_loss(hidden, plain, ids, **gk_args).loss.backward()
    mean = plain.grad.clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(head.weight.grad.full_tensor(), mean / world, rtol=1e-5, atol=1e-6)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, results)
    if rank == 0:
        weight_mib = V * H * 4 / MIB
        rows = [{"phase": k, "rank": r, "peak_extra_mib": round(v[k], 1)} for r, v in enumerate(per_rank) for k in v]
        record = {
            "command": "MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m "
                       f"bench.fsdp_head_gather --vocab {V} --hidden {H} --rows {N}" + (
                           f" --out {args.out}" if args.out else ""),
            "environment": environment(torch.device("cpu")),
            "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "world": world, "vocab": V, "hidden": H, "n": N, "full_weight_mib": weight_mib,
            "shard_mib": weight_mib / world, "rows": rows,
        }
        text = [f"# FSDP2 LM head gather, 2 CPU processes (gloo): V = {V:,}, H = {H}, N = {N}, fp32", "",
                f"Command: `{record['command']}`; torch {torch.__version__}, {record['environment'].get('cpu')}, "
                f"{record['time']}.", "",
                f"Full weight {weight_mib:.1f} MiB; shard per rank {weight_mib / world:.1f} MiB. Peak RSS above the "
                "RSS before the phase, per rank:", "",
                "| phase | rank | peak extra MiB | / full weight |", "|---|---|---|---|"]
        text += [f"| {r['phase']} | {r['rank']} | {r['peak_extra_mib']} | {r['peak_extra_mib'] / weight_mib:.2f} |"
                 for r in rows]
        print("\n".join(text))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            stem = args.out / f"cpu-fsdp2_head_gather-v{V}-h{H}"
            stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
            stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
