"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs, without a GPU.

A launch plan of ``grpo_kernels.backends.triton_backend`` (kernel, arguments, constexprs, warps) is bound with
Triton's own JIT binder for a ``GPUTarget("cuda", arch, 32)``: that gives the specialisation a real launch
with those arguments gets (the key of the JIT's kernel cache: dtypes, 16-byte alignment of pointers,
divisibility of the specialised integers) and, through ``triton.compile(ASTSource(...))``, the PTX and
cubin that the GPU would run. Nothing here launches anything.

Used in two ways:
- in-process, :func:`specialization_key` (works under ``TRITON_INTERPRET=1`` too: only the binder runs);
- as a script (``python -m bench.triton_aot [ARCH...]``), which must run WITHOUT the interpreter (the compiler
  needs the kernels' helpers as JIT functions): it compiles every kernel variant the dispatcher can launch,
  for aligned and ragged V, and prints one JSON line per compiled variant (load widths in the vocabulary
  loops, local-memory instructions, and ``ptxas -v`` registers / spills / shared memory).

What this cannot see: real timing, occupancy under a real workload mix, bank conflicts, L2 behaviour, or
what the driver's JIT makes of the PTX on a newer GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the compiler needs real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def masked_every_chunk(x, out, V, BLOCK: tl.constexpr):
    """Negative control: the usual row loop with ``mask=cols < V`` on every chunk. For V not a multiple of
    16 the mask has no constancy, so the loads cannot be vectorised: the checks must see scalar loads here."""
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x + row.to(tl.int64) * V + cols, mask=cols < V, other=0.0).to(tl.float32)
    tl.store(out + row, tl.sum(acc, 0))


def _jit_of(kernel):
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    kw = getattr(kernel, "kwargs", {})  # an InterpretedFunction keeps the arguments of @triton.jit
    return JITFunction(kernel.fn, do_not_specialize=kw.get("do_not_specialize"),
                       do_not_specialize_on_alignment=kw.get("do_not_specialize_on_alignment"))


def target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def bind(plan, arch: int = 90):
    """-> (jit function, backend, kwargs, bound args, specialisation, options) as JITFunction.run computes them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jf = _jit_of(plan.kernel)
    backend = make_backend(target(arch))
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kwargs = dict(plan.constexprs, num_warps=plan.num_warps)
    bound, spec, options = binder(*plan.args, **kwargs)
    return jf, backend, kwargs, bound, spec, options


def specialization_key(plan, arch: int = 90) -> str:
    """The JIT kernel-cache key a launch of ``plan`` gets (equal keys: no new compilation)."""
    from triton.runtime.jit import compute_cache_key

    *_, spec, options = bind(plan, arch)
    return compute_cache_key({}, spec, options)


def compile_plan(plan, arch: int):
    import triton
    from triton.compiler import ASTSource

    jf, backend, kwargs, bound, spec, options = bind(plan, arch)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target(arch), options=options.__dict__)


# ---- reading the PTX -------------------------------------------------------------------------------------
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.\w+)*")


def loops(ptx: str) -> list[list[str]]:
    """The bodies of the loops of a PTX function: the lines from a label to a branch back to it."""
    lines = ptx.splitlines()
    where = {}
    bodies = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            where[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in where and where[b.group(1)] < i:
            bodies.append(lines[where[b.group(1)] : i + 1])
    return bodies


def load_widths(lines) -> list[int]:
    """Bit widths of the global loads among ``lines`` (ld.global.v4.b32 -> 128, ld.global.b16 -> 16, ...)."""
    widths = []
    for line in lines:
        m = _LD_GLOBAL.search(line)
        if not m:
            continue
        parts = m.group(0).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
        widths.append(vec * bits)
    return widths


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory that ptxas reports for the PTX (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(src), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True, check=True)
    out = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", out))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", out))
    smem = re.search(r"(\d+) bytes smem", out)
    return {"registers": regs, "spill_bytes": spill_st + spill_ld, "smem_bytes": int(smem.group(1)) if smem else 0}


# ---- the variants the dispatcher launches --------------------------------------------------------------
def variants(V_list=(32000, 50257), dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """(name, plan) for every kernel and flag combination ``grpo_kernels._ops`` can launch, on the model-output
    view ``logits[:, P-1:-1]`` of a [B, T + P, V] buffer (ragged V: rows off the 16-byte grid)."""
    from grpo_kernels.backends import triton_backend as tb
    from grpo_kernels.backends.base import LossParams
    from grpo_kernels.config import GRPOConfig

    B, T, P = 2, 3, 2
    for V, dtype in itertools.product(V_list, dtypes):
        x = torch.empty(B, T + P, V, dtype=dtype)[:, P - 1 : -1]
        n = B * T
        ids = torch.zeros(n, dtype=torch.int64)
        f, f2 = torch.empty(n), torch.empty(n, 2)  # per-token vectors; row statistics (m, log s)
        out = torch.empty(x.shape, dtype=dtype)
        tag = f"V={V} {str(dtype).removeprefix('torch.')}"
        for ent in (True, False):
            yield f"logprobs_fwd[ent={int(ent)}] {tag}", tb.plan_logprobs_fwd(x, ids, 1.0, ent, f, f2, f)
            yield (f"logprobs_bwd[ent={int(ent)}] {tag}",
                   tb.plan_logprobs_bwd(x, ids, f2, f if ent else None, f, f if ent else None, 1.0, out))
        for loss_type in ("dapo", "cispo", "sapo"):
            deltas = (None, 1.5) if loss_type == "dapo" else (None,)
            for old, (beta, bias), delta in itertools.product((None, f), ((0.0, True), (0.04, True), (0.04, False)),
                                                               deltas):
                cfg = GRPOConfig(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias, delta=delta)
                p = tb.plan_fused(x, ids, 1.0, old, f if beta else None, f, f, LossParams.from_config(cfg),
                                  out, f, f)
                flags = ",".join(f"{k}={int(v)}" for k, v in p.constexprs.items() if k not in ("ALIGN", "BLOCK"))
                yield f"fused[{flags}] {tag}", p


def controls():
    """(name, plan) of the negative control for an aligned and a ragged V (bf16, contiguous rows)."""
    from grpo_kernels.backends.triton_backend import Launch

    for V in (32000, 50257):
        x = torch.empty(6, V, dtype=torch.bfloat16)
        yield f"control:masked_every_chunk V={V} bfloat16", Launch(masked_every_chunk, (6,), (x, torch.empty(6), V),
                                                                  {"BLOCK": 4096}, 8)


def report(arch: int, name: str, plan) -> dict:
    k = compile_plan(plan, arch)
    ptx = k.asm["ptx"]
    body = [w for lp in loops(ptx) for w in load_widths(lp)]
    return {
        "arch": arch, "kernel": name, "BLOCK": plan.constexprs["BLOCK"], "ALIGN": plan.constexprs.get("ALIGN"),
        "num_warps": plan.num_warps,
        "loop_load_widths": sorted(set(body)), "all_load_widths": sorted(set(load_widths(ptx.splitlines()))),
        "n_loops": len(loops(ptx)), "local_memory_ops": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        **ptxas_usage(ptx, arch),
    }


def main(argv: list[str]) -> int:
    from concurrent.futures import ProcessPoolExecutor

    archs = [int(a) for a in argv] or [80, 90]
    jobs = [(a, n, p) for a in archs for n, p in [*variants(), *controls()]]
    with ProcessPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
        for row in pool.map(_report_job, [(a, n) for a, n, _ in jobs]):
            print(json.dumps(row), flush=True)
    return 0


def _report_job(job):
    arch, name = job
    plan = dict([*variants(), *controls()])[name]  # plans hold tensors: rebuilt in the worker, not pickled
    return report(arch, name, plan)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
