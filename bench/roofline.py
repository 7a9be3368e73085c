"""Static roofline of the GRPO kernels: HBM bytes, bandwidth floor times and sm_90 occupancy.

    python -m bench.roofline                      # writes bench/results/roofline.md and prints it
    python -m bench.roofline --v 32000 --quick --json   # one V, one variant per kernel, JSON rows on stdout

For N = 8,192 rows and V in {32,000; 128,256; 151,936}, bf16 and fp32 logits, and every kernel (Triton:
``logprobs_fwd``, ``logprobs_bwd``, ``fused_fwd_bwd``; CUDA: ``fwd_kernel``, ``bwd_kernel``, ``fused_kernel``,
``fused_cluster_kernel``):

- the bytes the kernel moves between HBM and the SM: forward reads N*V*elsize of logits plus O(N) vectors;
  backward reads N*V*elsize and writes N*V*elsize; the fused kernels read each row in the forward loop and
  AGAIN in the gradient loop (both backends, see ``_row_stats`` / ``_write_row_grad`` and ``row_state`` /
  ``write_grad``), so their traffic is given twice: "as written, the second read missing L2" (2 reads +
  1 write) and "ideal" (the second read served by L2: 1 read + 1 write); the CUDA cluster kernel (sm_90+)
  holds each row in the distributed shared memory of a cluster of C blocks (C from :func:`cluster_size`, the
  mirror of ``fused_cluster_size`` in csrc/cuda/grpo_cuda.cu) and makes 2 passes by construction;
- the floor time = bytes / HBM bandwidth at H100 SXM (3.35 TB/s), H200 (4.8 TB/s) and B200 (8 TB/s), and the
  fused kernels' estimated time at 80-90 % of that bandwidth (what a streaming copy reaches), beside
  Liger-Kernel's published H200 time for the same shape class (:data:`LIGER_H200_MS`);
- the registers, spills and shared memory of each kernel compiled IN THIS RUN for sm_90 (Triton: through
  ``bench.triton_aot`` -- ``variants``, ``compile_plan``, ``ptxas_usage`` -- with the launch plans the dispatcher
  builds; CUDA: ``nvcc -cubin -Xptxas -v`` on csrc/cuda/grpo_cuda.cu, as tests/test_cuda_build.py does),
  and the resident blocks / warps per SM they allow (the rules of cuda_occupancy.h for sm_90).

The script must run WITHOUT the Triton interpreter (``__main__`` sets ``TRITON_INTERPRET=0`` before triton is
imported); importing the module for its arithmetic (``occupancy``, ``traffic``) imports neither triton nor
torch. What a static model cannot see is written at the end of the note (:data:`CANNOT_SEE`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the compiler needs real JIT functions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "roofline.md"

N_ROWS = 8192
V_LIST = (32000, 128256, 151936)
DTYPES = ("bfloat16", "float32")
ELSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# HBM bandwidth (TB/s, 1e12 B/s), SM count and boost clock of the GPUs (vendor data sheets)
GPUS = {"H100 SXM": {"tbps": 3.35, "sms": 132, "ghz": 1.98},
        "H200": {"tbps": 4.8, "sms": 132, "ghz": 1.98},
        "B200": {"tbps": 8.0, "sms": 148, "ghz": 1.98}}
# HBM efficiency of a streaming kernel: the range of the estimates (a device-to-device copy reaches about this)
EFFICIENCY = (0.8, 0.9)
# Liger-Kernel's published fused GRPO loss timing on H200, 8 x 1,024 tokens, V ~ 150K bf16: forward, backward (ms)
LIGER_H200_MS = (0.51, 1.15)

# The cluster kernel's choice (csrc/cuda/grpo_cuda.cuh: kClusterSmemPreferred, kClusterSmemMax; checked against
# the C++ function by tests/test_cuda_emu.py::test_kernel_choice)
CLUSTER_SMEM_PREFERRED = 96 * 1024
CLUSTER_SMEM_MAX = 200 * 1024

# sm_90 limits per SM (CUDA programming guide, compute capability 9.0; rules of cuda_occupancy.h)
SM90 = {
    "regs_per_sm": 65536,
    "sub_partitions": 4,  # registers are allocated per sub-partition (16,384 each)
    "reg_granularity": 256,  # registers per warp are rounded up to this
    "max_warps": 64,
    "max_blocks": 32,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_block": 1024,  # the driver's reserved shared memory per block (sm_80+)
    "smem_granularity": 128,
}

CANNOT_SEE = (
    "What these static checks cannot see: real timing (clock, memory-controller efficiency: HBM reaches some "
    "80-90 % of its nominal bandwidth in a streaming copy, so no kernel reaches these floors); whether the "
    "second read of the fused kernels really hits L2 (the in-flight working set in the tables is only a hint: "
    "the L2 is split in two partitions, other traffic competes, and the replacement policy is not documented); "
    "for the cluster kernel, whether clusters of 4 or 8 blocks with 75 KiB of shared memory each are scheduled "
    "as densely as the per-SM arithmetic says (clusters are placed within one GPC: "
    "cudaOccupancyMaxActiveClusters on the device answers it), the latency of the distributed-shared-memory "
    "reads and of the two cluster barriers per row, and whether one load pass with 4 x 16 bytes in flight per "
    "thread keeps enough bytes in flight at 2-3 blocks per SM; "
    "shared-memory bank conflicts; latency hiding (whether the resident warps keep enough loads in flight); "
    "tail effects (the last, partial wave of rows, rows that do less work: masked rows of the backward and "
    "fused kernels skip the read, and the scalar head / tail of each row); the occupancy the "
    "scheduler actually reaches; and what the driver's JIT makes of the PTX on newer GPUs."
)


# ---- arithmetic ------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def occupancy(registers: int, threads: int, smem_bytes: int, lim: dict = SM90) -> dict:
    """Resident blocks / warps per SM for a kernel using `registers` per thread, `threads` per block and
    `smem_bytes` of shared memory per block (static + dynamic), by the rules of cuda_occupancy.h."""
    warps = -(-threads // 32)
    regs_per_warp = _round_up(max(registers, 1) * 32, lim["reg_granularity"])
    warps_by_regs = (lim["regs_per_sm"] // lim["sub_partitions"] // regs_per_warp) * lim["sub_partitions"]
    smem_block = _round_up(smem_bytes + lim["smem_reserved_per_block"], lim["smem_granularity"])
    limits = {
        "registers": warps_by_regs // warps,
        "shared memory": lim["smem_per_sm"] // smem_block,
        "warps": lim["max_warps"] // warps,
        "blocks": lim["max_blocks"],
    }
    blocks = min(limits.values())
    limiter = "+".join(k for k, v in limits.items() if v == blocks)
    return {"warps_per_block": warps, "regs_per_warp": regs_per_warp, "smem_per_block": smem_block,
            "limits": limits, "blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / lim["max_warps"], "limiter": limiter}


def cluster_size(V: int, elsize: int) -> int:
    """Blocks per row of the CUDA cluster kernel on sm_90+ (0: the row does not fit, the 3-pass kernel runs):
    the smallest of 2, 4, 8 whose share of the row's 16-byte vectors fits CLUSTER_SMEM_PREFERRED, else 8 if
    it fits CLUSTER_SMEM_MAX."""
    for c in (2, 4, 8):
        if cluster_smem_bytes(V, elsize, c) <= CLUSTER_SMEM_PREFERRED:
            return c
    return 8 if cluster_smem_bytes(V, elsize, 8) <= CLUSTER_SMEM_MAX else 0


def cluster_smem_bytes(V: int, elsize: int, C: int) -> int:
    """Dynamic shared memory per block of the cluster kernel: ceil((V / (16 / elsize)) / C) 16-byte vectors."""
    return -(-(V // (16 // elsize)) // C) * 16


def traffic(kind: str, N: int, V: int, elsize: int) -> dict:
    """HBM bytes of one launch over N rows of V logits. kind: "fwd", "bwd", "fused" (3 passes as written, 2
    ideal) or "fused2" (the cluster kernel: 2 passes) (all optional inputs given: entropy in fwd / bwd, old
    and ref log-probs in fused). The target logit (one more element per row, read after the row pass,
    normally from L1 / L2) is not counted."""
    row = N * V * elsize
    if kind == "fwd":  # logits; ids (int64); logp, row statistics (m, log s), entropy (fp32)
        small = N * (8 + 4 * 4)
        stream, ideal = row + small, row + small
    elif kind == "bwd":  # logits in, gradient out; ids, (m, log s), entropy, g_logp, g_ent
        small = N * (8 + 5 * 4)
        stream, ideal = 2 * row + small, 2 * row + small
    elif kind == "fused":  # 2 reads (second misses L2) or 1 read; gradient out; ids, old, ref, adv, coef; logp, ent
        small = N * (8 + 4 * 4 + 2 * 4)
        stream, ideal = 3 * row + small, 2 * row + small
    elif kind == "fused2":  # the row read once into shared memory, the gradient written from there
        small = N * (8 + 4 * 4 + 2 * 4)
        stream, ideal = 2 * row + small, 2 * row + small
    else:
        raise ValueError(kind)
    return {"logit_bytes": row, "small_bytes": small, "bytes": stream, "bytes_ideal": ideal}


def floor_ms(nbytes: int, tbps: float) -> float:
    """The time to move `nbytes` at `tbps` TB/s (1e12 bytes per second), in milliseconds."""
    return nbytes / (tbps * 1e12) * 1e3


def issue_budget(bytes_per_element: float, gpu: dict) -> float:
    """SASS instructions per logit element (per thread) that the SMs can issue while HBM streams at full
    bandwidth: 4 warp-instructions per clock per SM (128 thread-instructions) / (elements per second)."""
    elems_per_s = gpu["tbps"] * 1e12 / bytes_per_element
    return 128 * gpu["sms"] * gpu["ghz"] * 1e9 / elems_per_s


# ---- compiling -------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _start_cuda(arch: int, d: str):
    """Starts nvcc -Xptxas -v on the CUDA sources (runs while the Triton kernels compile)."""
    nvcc = _nvcc()
    if nvcc is None:
        return None
    cmd = [nvcc, "-O3", "-std=c++17", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cuda'}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v",
           str(ROOT / "csrc/cuda/grpo_cuda.cu"), "-o", str(Path(d) / f"grpo_cuda.sm_{arch}.cubin")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel: {registers, spill_bytes, stack, smem_bytes}} from a ``ptxas -v`` log."""
    stats: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            stats[cur] = {"registers": 0, "spill_bytes": 0, "stack": 0, "smem_bytes": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stats[cur].update(stack=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[cur]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            stats[cur]["smem_bytes"] = int(s.group(1)) if s else 0
    return stats


_DT_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}  # gk::DT_F32 / DT_BF16 / DT_F16
_FLAG = {"ent=1": ", true", "ent=0": ", false"}


def _cuda_kernel(mangled: str) -> tuple[str, int, str] | None:
    """_ZN6gkcuda10fwd_kernelILi1ELb1EEEvNS_5KArgsE -> ("fwd_kernel", 1, "ent=1"), without c++filt."""
    m = re.match(r"_ZN6gkcuda\d+(fwd_kernel|bwd_kernel|fused_kernel|fused_cluster_kernel)ILi(\d)E(?:Lb([01])E)?E",
                 mangled)
    if not m:
        return None
    return m.group(1), int(m.group(2)), f"ent={m.group(3)}" if m.group(3) is not None else ""


def _cuda_block(V: int) -> tuple[int, str]:
    """Threads per block the CUDA launchers use for block=0: from the built module, else kMaxBlock."""
    try:
        from grpo_kernels import _cuda

        return int(_cuda.default_block(V)), "grpo_kernels._cuda.default_block"
    except Exception:  # noqa: BLE001  (module not built here)
        text = (ROOT / "csrc/cuda/grpo_cuda.cuh").read_text()
        return int(re.search(r"kMaxBlock = (\d+)", text).group(1)), "kMaxBlock (module not built)"


def _triton_variants(V_list, dtypes, quick: bool):
    import torch

    from bench import triton_aot as ta

    seen = set()
    for name, plan in ta.variants(V_list=tuple(V_list), dtypes=tuple(getattr(torch, d) for d in dtypes)):
        kind = name.split("[")[0]
        V = int(re.search(r"V=(\d+)", name).group(1))
        dtype = name.split()[-1]
        if quick and (kind, V, dtype) in seen:
            continue
        seen.add((kind, V, dtype))
        yield kind, V, dtype, name, plan


TRITON_KINDS = {"logprobs_fwd": "fwd", "logprobs_bwd": "bwd", "fused": "fused"}
TRITON_NAMES = {"logprobs_fwd": "logprobs_fwd", "logprobs_bwd": "logprobs_bwd", "fused": "fused_fwd_bwd"}
CUDA_KINDS = {"fwd_kernel": "fwd", "bwd_kernel": "bwd", "fused_kernel": "fused", "fused_cluster_kernel": "fused2"}


def compile_all(V_list=V_LIST, dtypes=DTYPES, quick: bool = False, arch: int = 90,
                triton: bool = True, cuda: bool = True) -> list[dict]:
    """Compiles the kernels for `arch` and returns one record per (backend, kernel, V, dtype, variant):
    {backend, kernel, kind, V, dtype, variant, registers, spill_bytes, smem_bytes, threads, source}."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and triton:
        raise RuntimeError("bench.roofline compiles the Triton kernels: run it with TRITON_INTERPRET unset or 0")
    out = []
    with tempfile.TemporaryDirectory() as d:
        proc = _start_cuda(arch, d) if cuda else None
        if triton:
            from bench import triton_aot as ta

            cache: dict = {}
            for kind, V, dtype, name, plan in _triton_variants(V_list, dtypes, quick):
                key = (name.split()[0], ta.specialization_key(plan, arch), plan.num_warps)  # same key: same code
                if key not in cache:
                    k = ta.compile_plan(plan, arch)
                    use = ta.ptxas_usage(k.asm["ptx"], arch)
                    cache[key] = {**use, "smem_bytes": use["smem_bytes"] + int(k.metadata.shared)}
                use = cache[key]
                out.append({"backend": "triton", "kernel": TRITON_NAMES[kind], "kind": TRITON_KINDS[kind], "V": V,
                            "dtype": dtype, "variant": name.split()[0], "threads": 32 * plan.num_warps,
                            "registers": use["registers"], "spill_bytes": use["spill_bytes"],
                            "smem_bytes": use["smem_bytes"], "source": "triton_aot.compile_plan + ptxas -v"})
        if proc is not None:
            _, log = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for sm_{arch}:\n{log[-4000:]}")
            for mangled, s in parse_ptxas(log).items():
                parsed = _cuda_kernel(mangled)
                if parsed is None:
                    continue
                kernel, code, flag = parsed
                dtype = next(k for k, v in _DT_CODE.items() if v == code)
                if dtype not in dtypes:
                    continue
                for V in V_list:
                    C = cluster_size(V, ELSIZE[dtype]) if kernel == "fused_cluster_kernel" else 1
                    if C == 0:  # the row does not fit a cluster: fused_kernel runs instead
                        continue
                    threads, src = _cuda_block(-(-V // C))
                    dyn = cluster_smem_bytes(V, ELSIZE[dtype], C) if C > 1 else 0
                    out.append({"backend": "cuda", "kernel": kernel, "kind": CUDA_KINDS[kernel], "V": V,
                                "dtype": dtype, "variant": f"{kernel}<{code}{_FLAG.get(flag, '')}>",
                                "threads": threads, "registers": s["registers"], "cluster": C,
                                "spill_bytes": s["spill_bytes"] + s["stack"], "smem_bytes": s["smem_bytes"] + dyn,
                                "source": f"nvcc -Xptxas -v; block {src}"
                                + (f"; {C} blocks per row, {dyn} B dynamic shared memory" if C > 1 else "")})
    return out


# ---- the table ---------------------------------------------------------------------------------------
def analyse(V_list=V_LIST, dtypes=DTYPES, N: int = N_ROWS, quick: bool = False, **kw) -> list[dict]:
    """One row per (dtype, V, backend, kernel): traffic, floor times, and the resources / occupancy of the
    worst variant (most registers) of that kernel."""
    compiled = compile_all(V_list, dtypes, quick, **kw)
    groups: dict = {}
    for r in compiled:
        groups.setdefault((r["dtype"], r["V"], r["backend"], r["kernel"]), []).append(r)
    rows = []
    dorder = {d: i for i, d in enumerate(dict.fromkeys([*DTYPES, *ELSIZE]))}
    border, korder = {"triton": 0, "cuda": 1}, {"fwd": 0, "bwd": 1, "fused": 2, "fused2": 3}

    def order(item):
        (dtype, V, backend, _), rs = item
        return dorder[dtype], V, border[backend], korder[rs[0]["kind"]]

    for (dtype, V, backend, kernel), rs in sorted(groups.items(), key=order):
        worst = max(rs, key=lambda r: (r["registers"], r["smem_bytes"]))
        C = worst.get("cluster", 1)
        t = traffic(rs[0]["kind"], N, V, ELSIZE[dtype])
        occ = occupancy(worst["registers"], worst["threads"], worst["smem_bytes"])
        row = {
            "dtype": dtype, "V": V, "N": N, "backend": backend, "kernel": kernel, "kind": rs[0]["kind"],
            "variants": len(rs), "registers": worst["registers"],
            "registers_min": min(r["registers"] for r in rs), "spill_bytes": max(r["spill_bytes"] for r in rs),
            "smem_bytes": worst["smem_bytes"], "threads": worst["threads"], "worst_variant": worst["variant"],
            "cluster": C, **t, "occupancy": occ,
        }
        for gpu, g in GPUS.items():
            row[f"estimate_ms[{gpu}]"] = [floor_ms(t["bytes"], g["tbps"] * e) for e in EFFICIENCY[::-1]]
            row[f"floor_ms[{gpu}]"] = floor_ms(t["bytes"], g["tbps"])
            row[f"floor_ms_ideal[{gpu}]"] = floor_ms(t["bytes_ideal"], g["tbps"])
            resident = occ["blocks_per_sm"] * g["sms"] // C  # one block (cluster kernel: C blocks) per row
            row[f"rows_in_flight[{gpu}]"] = resident
            row[f"inflight_mb[{gpu}]"] = resident * V * ELSIZE[dtype] / 1e6
            row[f"waves[{gpu}]"] = N / resident
        rows.append(row)
    return rows


def _versions() -> str:
    parts = []
    nvcc = _nvcc()
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", v)
        parts.append(f"nvcc {m.group(1) if m else '?'}")
    try:
        import triton

        parts.append(f"Triton {triton.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def render(rows: list[dict]) -> str:
    gpus = list(GPUS)
    g0 = gpus[0]
    N = rows[0]["N"] if rows else N_ROWS
    L = [
        f"# Static roofline of the GRPO kernels (N = {N:,} rows)",
        "",
        "Generated by `python -m bench.roofline` (do not edit by hand): registers, spills and shared memory come "
        f"from compiling the kernels for sm_90 in that run ({_versions()}). Nothing here ran on a GPU.",
        "",
        "**Traffic model** (MB = 10^6 bytes): forward = read N·V·elsize of logits + O(N) vectors (ids, logp, row "
        "max and log-sum, entropy); backward = read + write N·V·elsize + O(N) (ids, row max and log-sum, entropy, g_logp, g_ent); fused = the row "
        "is read in the forward loop and read AGAIN in the gradient loop (both backends), plus the gradient write "
        "and O(N) (ids, old, ref, adv, coef, logp, entropy). **HBM** counts the second read as missing L2 "
        "(3 passes over N·V·elsize, what the kernels do when nothing is cached); **1-read** is the ideal where it "
        "is served by L2 (2 passes); for forward / backward both are the same. **fused_cluster_kernel** (CUDA, "
        "sm_90+) reads each row once into the distributed shared memory of a cluster of blocks and writes the "
        "gradient from there: 2 passes by construction (HBM = 1-read). Floor = bytes / HBM bandwidth ("
        + ", ".join(f"{g} {GPUS[g]['tbps']} TB/s" for g in gpus) + "). The unfused forward + backward pair "
        "moves 3 passes too, in two launches.",
        "",
        "**Occupancy** (sm_90, the rules of cuda_occupancy.h): registers per warp rounded up to 256 and allocated "
        "per sub-partition (4 x 16,384 of the 65,536), at most 64 warps, 32 blocks and 228 KB of shared memory "
        "per SM (+1 KB reserved per block, 128-byte granularity). One block per row (the cluster kernel: C blocks "
        "per row, each holding 1/C of the row in dynamic shared memory, counted in smem B / block). For a "
        "kernel with several flag variants (the number in brackets) the variant with the most registers is "
        "used.",
        "",
    ]
    dtypes = [d for d in dict.fromkeys([*DTYPES, *ELSIZE]) if any(r["dtype"] == d for r in rows)]
    for dtype in dtypes:
        rs = [r for r in rows if r["dtype"] == dtype]
        L += [f"## {dtype} logits ({ELSIZE[dtype]} bytes / element)", "",
              "| V | backend | kernel | HBM MB | " + " | ".join(f"{g} ms" for g in gpus) + " | 1-read MB | "
              + " | ".join(f"{g} 1-read ms" for g in gpus) + f" | fused: rows in flight x row bytes, MB ({g0}) |",
              "|---:|---|---|" + "---:|" * (3 + 2 * len(gpus))]
        for r in rs:
            L.append(f"| {r['V']:,} | {r['backend']} | {r['kernel']} | {r['bytes'] / 1e6:,.1f} | "
                     + " | ".join(f"{r[f'floor_ms[{g}]']:.3f}" for g in gpus)
                     + f" | {r['bytes_ideal'] / 1e6:,.1f} | "
                     + " | ".join(f"{r[f'floor_ms_ideal[{g}]']:.3f}" for g in gpus)
                     + (f" | {r[f'inflight_mb[{g0}]']:,.1f} |" if r["kind"] == "fused"
                        else (" | on chip |" if r["kind"] == "fused2" else " | – |")))
        L += ["", f"Resources (sm_90) and occupancy, {dtype}:", "",
              "| backend | kernel | V | regs | spill B | smem B / block | threads | blocks/SM by regs / smem / warps "
              f"| blocks/SM | warps/SM | occupancy | limited by | rows in flight ({g0}) | waves at N = {N:,} |",
              "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
        groups: dict = {}
        for r in rs:
            key = (r["backend"], r["kernel"], r["variants"], r["registers_min"], r["registers"], r["spill_bytes"],
                   r["smem_bytes"], r["threads"])
            groups.setdefault(key, []).append(r)
        for (backend, kernel, nvar, rmin, rmax, spill, smem, threads), grp in groups.items():
            o, r = grp[0]["occupancy"], grp[0]
            lim = o["limits"]
            vs = "all" if len(grp) == len({x["V"] for x in rs}) else ", ".join(f"{x['V']:,}" for x in grp)
            blocks = f", {r['cluster']} blocks / row" if r.get("cluster", 1) > 1 else ""
            L.append(f"| {backend} | {kernel} ({nvar}){blocks} | {vs} | {rmax if rmin == rmax else f'{rmin}–{rmax}'} | "
                     f"{spill} | {smem} | {threads} | {lim['registers']} / {lim['shared memory']} / {lim['warps']} | "
                     f"{o['blocks_per_sm']} | {o['warps_per_sm']} | {o['occupancy']:.0%} | {o['limiter']} | "
                     f"{r[f'rows_in_flight[{g0}]']} | {r[f'waves[{g0}]']:.2f} |")
        L.append("")
    L += _two_pass_section(rows, gpus, N)
    h = GPUS[gpus[-1]]
    budget = ", ".join(f"{d} forward {issue_budget(ELSIZE[d], h):.0f}, backward / fused 1-read "
                       f"{issue_budget(2 * ELSIZE[d], h):.0f}" for d in dtypes)
    L += ["## Reading", "",
          "- The floors assume the kernels are memory bound. The SMs must also issue the kernels' instructions "
          f"while HBM streams: at {gpus[-1]} bandwidth ({h['sms']} SMs, {h['ghz']} GHz, 4 warp-instructions per "
          f"clock per SM) that leaves about {budget} SASS instructions per logit element. The vector loops "
          "spend one MUFU.EX2 per element and pass (two in the fused kernels) plus the unpacking, max, FMAs and "
          "address arithmetic, which is of that order for bf16: the floors may be issue-limited there, a point "
          "this static model does not settle (it does not count instructions).",
          "- As written, the fused kernels cost 1.5x their ideal when the second read of a row misses L2. The "
          "last column of the traffic tables (rows resident at once x row bytes) against the 50 MB L2 says where "
          "that is plausible: well under it, the second read has a chance to hit L2; near or above it (large V), "
          "it likely goes back to HBM. Only a profile (ncu: dram__bytes_read.sum, lts__t_sector_hit_rate) can "
          "say which.",
          "- Waves: one block (cluster kernel: one cluster) per row, so N rows run in N / (rows in flight) "
          "waves; the last one is partial.",
          "", CANNOT_SEE, ""]
    return "\n".join(L)


def _two_pass_section(rows: list[dict], gpus: list[str], N: int) -> list[str]:
    """The fused kernels side by side: passes, floor and estimated time per GPU, and Liger's published H200 time."""
    lo, hi = EFFICIENCY
    L = ["## The fused kernels: 3 passes against 2", "",
         f"Estimated time = bytes / ({lo:.0%}–{hi:.0%} of the nominal bandwidth), what a streaming kernel reaches "
         "when it is memory bound; floor = bytes / nominal bandwidth. The row 3-pass, L2 hit is the ideal of the 3-pass "
         "kernels when their second read of a row is served by L2 (unlikely at large V, see the reading below). "
         f"Liger-Kernel publishes {LIGER_H200_MS[0]} ms forward + {LIGER_H200_MS[1]} ms backward = "
         f"{sum(LIGER_H200_MS):.2f} ms on H200 for 8 x 1,024 tokens at V ~ 150K (bf16): a measurement, not an "
         "estimate, placed in the V = 151,936 bf16 rows.", ""]
    head = "| dtype | V | kernel | passes | HBM MB | " + " | ".join(
        f"{g} floor ms | {g} estimate ms" for g in gpus) + " |"
    L += [head, "|---|---:|---|---:|---:|" + "---:|---:|" * len(gpus)]
    fused = [r for r in rows if r["kind"] in ("fused", "fused2")]
    for r in fused:
        cases = [("2", r["bytes"])] if r["kind"] == "fused2" else [("3", r["bytes"]), ("3-pass, L2 hit: 2",
                                                                                      r["bytes_ideal"])]
        for passes, nbytes in cases:
            cells = " | ".join(f"{floor_ms(nbytes, GPUS[g]['tbps']):.3f} | "
                               f"{floor_ms(nbytes, GPUS[g]['tbps'] * hi):.2f}–{floor_ms(nbytes, GPUS[g]['tbps'] * lo):.2f}"
                               for g in gpus)
            L.append(f"| {r['dtype']} | {r['V']:,} | {r['backend']} {r['kernel']} | {passes} | {nbytes / 1e6:,.1f} | "
                     f"{cells} |")
        if r["kind"] == "fused2" and r["dtype"] == "bfloat16" and r["V"] == 151936:
            cells = " | ".join((f"– | {sum(LIGER_H200_MS):.2f} (measured)" if g == "H200" else "– | –") for g in gpus)
            L.append(f"| bfloat16 | ~150K | Liger-Kernel (published, N = 8,192) | – | – | {cells} |")
    two = [r for r in rows if r["kind"] == "fused2" and r["dtype"] == "bfloat16" and r["V"] == 151936]
    three = [r for r in rows if r["kind"] == "fused" and r["dtype"] == "bfloat16" and r["V"] == 151936]
    if two and three and "H200" in gpus:
        t2, t3 = two[0], three[0]
        L += ["", f"At N = {N:,}, V = 151,936 bf16 on H200: the 2-pass cluster kernel's floor is "
              f"{t2['floor_ms[H200]']:.3f} ms (estimated {floor_ms(t2['bytes'], 4.8 * hi):.2f}–"
              f"{floor_ms(t2['bytes'], 4.8 * lo):.2f} ms), the 3-pass kernels' {t3['floor_ms[H200]']:.3f} ms "
              f"({t3['floor_ms[H200]'] / t2['floor_ms[H200]']:.2f}x), Liger's measured {sum(LIGER_H200_MS):.2f} ms "
              f"({sum(LIGER_H200_MS) / t2['floor_ms[H200]']:.2f}x the 2-pass floor). Only a GPU can say how close "
              "the kernel comes to its floor."]
    return [*L, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v", type=int, nargs="*", default=list(V_LIST), help="vocabulary sizes")
    ap.add_argument("--dtype", nargs="*", default=list(DTYPES), choices=list(ELSIZE))
    ap.add_argument("--n", type=int, default=N_ROWS, help="rows (B*T)")
    ap.add_argument("--quick", action="store_true", help="one flag variant per kernel")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines, write nothing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    rows = analyse(tuple(a.v), tuple(a.dtype), a.n, a.quick, triton=not a.no_triton, cuda=not a.no_cuda)
    if a.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    md = render(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
