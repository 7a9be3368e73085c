"""The CUDA module without a GPU: it compiles, the compiler made the fast kind of code, the installed
extension has the right architectures and links, and asking for it without a GPU fails cleanly.

- nvcc compiles csrc/cuda/grpo_cuda.cu to cubins for sm_80, sm_90 and sm_100; ptxas (-Xptxas -v) must report
  every kernel instantiation (forward x {fp32, bf16, fp16} x {entropy, none}, backward likewise, fused and
  fused cluster x dtype) with 0 bytes of spill stores / loads and no stack frame;
- the SASS (cuobjdump --dump-sass, PyPI nvidia-cuda-cuobjdump; nvdisasm from PyPI or Triton's copy) of every
  kernel but the cluster one (below): no local-memory access (LDL / STL), and the vocabulary loops found in the SASS (backward branches
  of the kernel body, the out-of-line divergent-shuffle / call stubs excluded) load 128 bits (LDG.E.128):
  one main loop with 4 LDG.E.128 per iteration per pass over the row (forward 1, backward 1, fused 2), only
  128-bit loads in it, and it is the loop that moves the most bytes per iteration (the scalar head / tail
  loops see at most 2 x 7 elements of a row); the masked-row zero loop stores STG.E.128;
- the gradient main loops store 128 bits (4 STG.E.128 per iteration): GradOp::vec writes through an explicit
  ``__stwb`` vector store (a plain assignment was merged by the compiler with the per-element branch into
  32-bit stores);
- negative controls: a deliberately scalar-load row loop and a kernel with a run-time indexed local array,
  compiled with nvcc here, are flagged by the same checkers (so the checks can fail);
- the 2-pass cluster kernel (fused_cluster_kernel, sm_90 and sm_100; an empty stub on sm_80): the cluster
  barrier (UCGABAR_ARV / UCGABAR_WAIT, twice: the sync after the block reduction and the arrive / wait that
  keeps a block's shared memory alive until its peers have read it), distributed-shared-memory loads of the
  peers' statistics (generic LD.E through the shared::cluster window, the address built from SR_CgaCtaId /
  SR_SWINHI by a PRMT: nvcc 13 emits no MAPA instruction for mapa; the 3-pass kernels have no LD.E at all),
  between the first cluster wait and the next arrive, ONE loop reading the row from global memory (4 LDG.E.128 + 4 STS.128 per
  iteration: HBM once, into shared memory), a gradient loop reading shared memory (4 LDS.128) and storing
  4 STG.E.128 with no global load, the masked-row zero loop of STG.E.128, no LDL / STL, no spills; negative
  controls: a cluster kernel without the cluster barrier and one reading only its own shared memory are
  flagged;
- the installed grpo_kernels._cuda: cuobjdump --list-elf shows sm_80 and sm_90 code (and PTX for newer
  GPUs), ldd shows no libtorch / libc10 / shared libcudart (cudart is static);
- without a GPU, backend="cuda" raises BackendUnavailableError saying "no CUDA device" (no crash).

What these checks cannot see: run time, occupancy actually reached, bank conflicts, L2 behaviour; the
kernels' results are checked on the CPU emulator (tests/test_cuda_emu.py) and, where a GPU exists, by
``test_gpu_matches_reference`` here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")
CLUSTER_ARCHS = ("90", "100")  # the cluster kernel's targets (an empty stub on sm_80)
# 3 dtypes x (forward with/without entropy, backward with/without entropy, fused 3-pass, fused cluster)
KERNELS = {f"{k}<{dt}{flag}>" for dt in (0, 1, 2) for k, flag in
           (("fwd_kernel", ", true"), ("fwd_kernel", ", false"), ("bwd_kernel", ", true"), ("bwd_kernel", ", false"),
            ("fused_kernel", ""), ("fused_cluster_kernel", ""))}


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvidia_tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, else from the PyPI nvidia-* wheels (site-packages/nvidia/*/bin), else
    Triton's bundled copy."""
    found = shutil.which(name)
    if found:
        return found
    roots = []
    for mod in ("nvidia", "triton"):
        spec = importlib.util.find_spec(mod)
        if spec and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        for cand in sorted(root.glob(f"**/bin/{name}")):
            if os.access(cand, os.X_OK):
                return str(cand)
    return None


NVCC = _nvcc()
CUOBJDUMP = _nvidia_tool("cuobjdump")
NVDISASM = _nvidia_tool("nvdisasm")
needs_nvcc = pytest.mark.skipif(NVCC is None,
                                reason="nvcc not found (CUDA_HOME or PATH): the CUDA sources cannot be compiled here")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("c++filt is needed to read kernel names")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = {}
    for mangled, full in zip(names, out.splitlines(), strict=False):
        m = re.search(r"gkcuda::(\w+<[^>]*>)", full)
        short[mangled] = m.group(1) if m else full
    return short


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: (cubin path, {kernel: {"registers", "spill_stores", "spill_loads", "stack", "smem"}})}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("cubin")
    res = {}
    for arch in dict.fromkeys(ARCHS + CLUSTER_ARCHS):
        cubin = d / f"grpo_cuda.sm_{arch}.cubin"
        cmd = [NVCC, "-O3", "-std=c++17", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cuda'}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v",
               str(ROOT / "csrc/cuda/grpo_cuda.cu"), "-o", str(cubin)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, f"nvcc failed for sm_{arch}:\n{p.stderr[-6000:]}"
        res[arch] = (cubin, _parse_ptxas(p.stderr))
    return res


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            stats[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stats[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[cur]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            stats[cur]["smem"] = int(s.group(1)) if s else 0
    names = _demangle(list(stats))
    return {names[k]: v for k, v in stats.items()}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS + ("100",))
def test_every_kernel_compiles_without_spills(compiled, arch):
    _, stats = compiled[arch]
    assert set(stats) == KERNELS, f"sm_{arch}: kernels {sorted(stats)}"
    for name, s in stats.items():
        assert {"registers", "spill_stores", "spill_loads", "stack"} <= set(s), f"{name}: ptxas said {s}"
        assert s["spill_stores"] == 0 and s["spill_loads"] == 0, f"sm_{arch} {name}: spills {s}"
        assert s["stack"] == 0, f"sm_{arch} {name}: stack frame {s['stack']} bytes"
        # __launch_bounds__(512): 64K registers / 512 threads = 128 per thread at most; 2 blocks of 512 per SM
        # need <= 64
        assert s["registers"] <= 64, f"sm_{arch} {name}: {s['registers']} registers (occupancy)"
        # shared memory: only the reduction scratch of block_reduce (33 states); registers, not smem, must
        # bound the resident blocks (228 KB per SM)
        assert s["smem"] <= 1024, f"sm_{arch} {name}: {s['smem']} bytes of shared memory"
    print(f"\nsm_{arch} ptxas -v:", ", ".join(f"{k} {v['registers']} regs / {v['smem']} B smem"
                                      for k, v in sorted(stats.items())))


def _sass_by_kernel(cubin: Path) -> dict[str, str]:
    env = dict(os.environ)
    if NVDISASM:
        env["PATH"] = str(Path(NVDISASM).parent) + os.pathsep + env.get("PATH", "")
    p = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    parts = re.split(r"\n\s*Function : (\w+)\n", "\n" + p.stdout)
    mangled = parts[1::2]
    names = _demangle(mangled)
    return {names[m]: body for m, body in zip(mangled, parts[2::2], strict=False)}


# ---- reading the SASS ------------------------------------------------------------------------------
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(\.\w+)*\s+(?:~?\w+,\s*)?0x([0-9a-f]+)")  # BRA 0x600, BRA.DIV UR4, 0x67a0
_MEM = re.compile(r"\b(LDG|STG)\.E((?:\.\w+)*)\s")
_SMEM = re.compile(r"\b(LDS|STS)((?:\.\w+)*)\s")


def _insns(body: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSN.search, body.splitlines()) if m]


def _width(mods: str) -> int:
    """Bits of one LDG / STG from its modifiers: .128, .64, .U16/.S16, .U8/.S8, else 32."""
    parts = mods.split(".")
    for tok, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if tok in parts:
            return bits
    return 32


def sass_loops(body: str) -> list[dict]:
    """The loops of a kernel's SASS: [target, branch] of every backward branch in the kernel body, with the
    bit widths of the global loads / stores inside ({width: count}; "sloads" / "sstores": shared memory). The body ends at the last EXIT: the
    out-of-line stubs after it (the divergent paths of the warp shuffles, BRA.DIV targets, which branch back
    into the body, and the CALL.REL subroutines) are not loops and are left out."""
    ins = _insns(body)
    exits = [a for a, t in ins if re.search(r"\bEXIT\b", t)]
    body_end = max(exits) if exits else (ins[-1][0] + 1 if ins else 0)
    out = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if not m or m.group(1) == ".DIV" or addr >= body_end:
            continue
        target = int(m.group(2), 16)
        if target >= addr:  # forward branch, or the `BRA .` trap after EXIT
            continue
        loads: dict[int, int] = {}
        stores: dict[int, int] = {}
        sloads: dict[int, int] = {}
        sstores: dict[int, int] = {}
        for a, t in ins:
            if target <= a <= addr:
                for rx, ld, (dl, ds) in ((_MEM, "LDG", (loads, stores)), (_SMEM, "LDS", (sloads, sstores))):
                    mm = rx.search(t + " ")
                    if mm:
                        d = dl if mm.group(1) == ld else ds
                        w = _width(mm.group(2))
                        d[w] = d.get(w, 0) + 1
        out.append({"start": target, "end": addr, "loads": loads, "stores": stores, "sloads": sloads,
                    "sstores": sstores})
    return out


def _bytes(widths: dict[int, int]) -> int:
    return sum(w * n for w, n in widths.items()) // 8


def sass_problems(body: str, passes: int) -> list[str]:
    """What is wrong with the SASS of a kernel that makes `passes` passes over a row ([] = nothing)."""
    problems = []
    if re.search(r"\b(LDL|STL)(\.\w+)*\b", body):
        problems.append("local memory traffic (LDL / STL)")
    loops = [lp for lp in sass_loops(body) if lp["loads"]]
    if not loops:
        return [*problems, "no loop loads global memory"]
    main = [lp for lp in loops if lp["loads"].get(128, 0) >= 4]
    if len(main) != passes:
        problems.append(f"{len(main)} loop(s) with >= 4 LDG.E.128 per iteration, expected {passes} "
                        f"(loops: {[lp['loads'] for lp in loops]})")
    for lp in main:
        if set(lp["loads"]) != {128}:
            problems.append(f"main loop at {lp['start']:#x} also loads {sorted(set(lp['loads']) - {128})}-bit")
    widest = max(loops, key=lambda lp: _bytes(lp["loads"]))
    if set(widest["loads"]) != {128}:
        problems.append(f"the loop moving the most bytes per iteration ({widest['start']:#x}) loads "
                        f"{widest['loads']} (bits: count), not only 128-bit")
    return problems


def _passes(name: str) -> int:
    return 2 if name.startswith("fused_kernel") else 1


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None,
                    reason="cuobjdump / nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
@pytest.mark.parametrize("arch", ARCHS)
def test_sass_has_128bit_loads_in_vocab_loops_and_no_local_memory(compiled, arch):
    sass = {k: v for k, v in _sass_by_kernel(compiled[arch][0]).items() if not k.startswith("fused_cluster")}
    assert set(sass) == {k for k in KERNELS if not k.startswith("fused_cluster")}
    bad = {name: p for name, body in sorted(sass.items()) if (p := sass_problems(body, _passes(name)))}
    assert not bad, f"sm_{arch}: {bad}"
    for name, body in sass.items():
        if not name.startswith("fwd_kernel"):  # masked rows: the zero loop (stores only) is 128-bit
            zero = [lp for lp in sass_loops(body) if not lp["loads"] and lp["stores"].get(128)]
            assert zero, f"sm_{arch} {name}: no 128-bit store loop for masked rows"


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None, reason="cuobjdump / nvdisasm not found")
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_loops_store_128bit(compiled, arch):
    sass = _sass_by_kernel(compiled[arch][0])
    bad = []
    for name, body in sorted(sass.items()):
        if name.startswith(("fwd_kernel", "fused_cluster")):  # the cluster kernel: test_cluster_kernel_sass
            continue
        main = [lp for lp in sass_loops(body) if lp["loads"].get(128, 0) >= 4]
        if not main or not main[-1]["stores"].get(128, 0) >= 4:  # the last pass writes the gradient
            bad.append((name, main[-1]["stores"] if main else None))
    assert not bad, f"sm_{arch}: gradient loops without 4 STG.E.128 per iteration: {bad}"


# ---- the cluster kernel -----------------------------------------------------------------------------
# a generic load (not LDG / LDS / LDC): in these kernels only the loads through the shared::cluster window
_DSMEM_LD = re.compile(r"\bLD\.E\b")


def cluster_sass_problems(body: str) -> list[str]:
    """What is wrong with the SASS of a 2-pass cluster kernel ([] = nothing); see the module docstring."""
    problems = []
    ins = _insns(body)
    if re.search(r"\b(LDL|STL)(\.\w+)*\b", body):
        problems.append("local memory traffic (LDL / STL)")
    arv = [a for a, t in ins if re.search(r"\bUCGABAR_ARV\b", t)]
    wait = [a for a, t in ins if re.search(r"\bUCGABAR_WAIT\b", t)]
    if len(arv) < 2 or len(wait) < 2:
        problems.append(f"cluster barrier: {len(arv)} UCGABAR_ARV / {len(wait)} UCGABAR_WAIT, expected >= 2 each")
    remote = [a for a, t in ins if _DSMEM_LD.search(t + ";")]
    if not re.search(r"\bSR_(CgaCtaId|SWINHI)\b", body) or not remote:
        problems.append("no distributed-shared-memory load (LD.E through the shared::cluster window)")
    elif wait and arv:
        w0 = min(wait)
        later = [a for a in arv if a > w0]
        if not later or not any(w0 < a < min(later) for a in remote):
            problems.append("the distributed-shared-memory loads are not between the first cluster wait and the "
                            "next arrive")
    loops = sass_loops(body)
    reads = [lp for lp in loops if lp["loads"].get(128, 0) >= 4]
    if len(reads) != 1:
        problems.append(f"{len(reads)} loop(s) with >= 4 LDG.E.128 per iteration, expected 1 (the row read "
                        f"once; loops: {[lp['loads'] for lp in loops if lp['loads']]})")
    for lp in reads:
        if set(lp["loads"]) != {128} or lp["sstores"].get(128, 0) < 4:
            problems.append(f"the read loop at {lp['start']:#x} loads {lp['loads']} and stores {lp['sstores']} "
                            "to shared memory, expected only LDG.E.128 and >= 4 STS.128")
    grads = [lp for lp in loops if lp["sloads"].get(128, 0) >= 4 and not lp["loads"]]
    if not any(lp["stores"].get(128, 0) >= 4 for lp in grads):
        problems.append("no gradient loop with >= 4 LDS.128 and >= 4 STG.E.128 and no global load "
                        f"(loops: {[(lp['sloads'], lp['stores']) for lp in loops]})")
    if not [lp for lp in loops if not lp["loads"] and not lp["sloads"] and lp["stores"].get(128)]:
        problems.append("no 128-bit store loop for masked rows")
    return problems


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None, reason="cuobjdump / nvdisasm not found")
@pytest.mark.parametrize("arch", CLUSTER_ARCHS)
def test_cluster_kernel_sass(compiled, arch):
    cubin, stats = compiled[arch]
    sass = {k: v for k, v in _sass_by_kernel(cubin).items() if k.startswith("fused_cluster_kernel")}
    assert set(sass) == {f"fused_cluster_kernel<{dt}>" for dt in (0, 1, 2)}
    bad = {name: p for name, body in sorted(sass.items()) if (p := cluster_sass_problems(body))}
    assert not bad, f"sm_{arch}: {bad}"
    for name in sass:
        s = stats[name]
        assert s["spill_stores"] == s["spill_loads"] == s["stack"] == 0, f"sm_{arch} {name}: {s}"
        assert s["smem"] <= 1024, f"sm_{arch} {name}: {s['smem']} bytes of static shared memory (the row is dynamic)"


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None, reason="cuobjdump / nvdisasm not found")
def test_cluster_kernel_is_a_stub_on_sm80(compiled):
    """sm_80 has no clusters: the kernel compiles to an empty body there (fused_cluster_size never picks it)."""
    body = _sass_by_kernel(compiled["80"][0])["fused_cluster_kernel<1>"]
    assert not re.search(r"\b(LDG|STG|UCGABAR_\w+)\b", body), "sm_80: the cluster kernel must be empty"


_CLUSTER_CONTROL_SRC = r"""
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
// reads a peer's shared memory with no cluster barrier
extern "C" __global__ void __cluster_dims__(2, 1, 1) no_barrier(const float* x, float* out) {
  __shared__ float sh[256];
  cg::cluster_group cluster = cg::this_cluster();
  sh[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = *cluster.map_shared_rank(sh + threadIdx.x, cluster.block_rank() ^ 1);
}
// a cluster barrier, but every shared-memory read is local
extern "C" __global__ void __cluster_dims__(2, 1, 1) local_only(const float* x, float* out) {
  __shared__ float sh[256];
  cg::cluster_group cluster = cg::this_cluster();
  sh[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  cluster.sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
  cluster.sync();
}
"""


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None, reason="cuobjdump / nvdisasm not found")
def test_cluster_negative_controls_are_flagged(tmp_path):
    src = tmp_path / "cluster_control.cu"
    src.write_text(_CLUSTER_CONTROL_SRC)
    cubin = tmp_path / "cluster_control.sm_90.cubin"
    p = subprocess.run([NVCC, "-O3", "-gencode=arch=compute_90,code=sm_90", "-cubin", str(src), "-o", str(cubin)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    sass = _sass_by_kernel(cubin)
    nb = cluster_sass_problems(sass["no_barrier"])
    assert any("cluster barrier" in m for m in nb), nb
    assert not any("no distributed-shared-memory load" in m for m in nb), nb  # it does read a peer
    lo = cluster_sass_problems(sass["local_only"])
    assert any("no distributed-shared-memory load" in m for m in lo), lo
    assert not any("cluster barrier" in m for m in lo), lo
    assert any("LDG.E.128" in m for m in lo) and any("gradient loop" in m for m in lo), lo


# ---- negative controls: the checkers do fail -------------------------------------------------------
_CONTROL_SRC = r"""
#include <stdint.h>
// the usual row loop, one bf16 element per thread per iteration: scalar 16-bit loads
extern "C" __global__ void scalar_rows(const uint16_t* x, float* out, long long V) {
  const uint16_t* row = x + (long long)blockIdx.x * V;
  float acc = 0.f;
  for (long long i = threadIdx.x; i < V; i += blockDim.x) acc += __uint_as_float((unsigned)row[i] << 16);
  atomicAdd(out + blockIdx.x, acc);
}
// a per-thread histogram, indexed at run time: it lives in local memory (stack frame, STL / LDL)
extern "C" __global__ void local_array(const int* x, int* out, long long V) {
  int h[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) h[i] = 0;
  for (long long i = threadIdx.x; i < V; i += blockDim.x) h[x[i] & 63] += 1;
  int acc = 0;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc += h[i] * i;
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
"""


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None, reason="cuobjdump / nvdisasm not found")
@pytest.mark.parametrize("arch", ARCHS)
def test_negative_controls_are_flagged(tmp_path, arch):
    src = tmp_path / "control.cu"
    src.write_text(_CONTROL_SRC)
    cubin = tmp_path / f"control.sm_{arch}.cubin"
    p = subprocess.run([NVCC, "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v",
                        str(src), "-o", str(cubin)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = _parse_ptxas(p.stderr)
    sass = _sass_by_kernel(cubin)
    assert set(sass) == {"scalar_rows", "local_array"} == set(stats)
    scalar = sass_problems(sass["scalar_rows"], 1)
    assert any("LDG.E.128" in m or "not only 128-bit" in m for m in scalar), scalar
    assert [lp["loads"] for lp in sass_loops(sass["scalar_rows"]) if lp["loads"]], "the row loop was not found"
    assert all(set(lp["loads"]) <= {16} for lp in sass_loops(sass["scalar_rows"]) if lp["loads"])
    local = sass_problems(sass["local_array"], 1)
    assert any("local memory" in m for m in local), local
    assert stats["local_array"]["stack"] > 0, stats  # the resource check of the real kernels sees it too
    assert stats["scalar_rows"]["stack"] == 0


# --------------------------------------------------------------------------------------------------
# the installed extension
# --------------------------------------------------------------------------------------------------
def _installed_module() -> str:
    spec = importlib.util.find_spec("grpo_kernels._cuda")
    if spec is None or not spec.origin:
        pytest.skip("grpo_kernels._cuda is not built (no nvcc at install time, or GRPO_KERNELS_SKIP_CUDA=1)")
    return spec.origin


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
def test_installed_module_has_sm80_sm90_and_ptx():
    so = _installed_module()
    elf = subprocess.run([CUOBJDUMP, "--list-elf", so], capture_output=True, text=True)
    assert elf.returncode == 0, elf.stderr
    for arch in ARCHS:
        assert f"sm_{arch}" in elf.stdout, f"no sm_{arch} code in {so}:\n{elf.stdout}"
    ptx = subprocess.run([CUOBJDUMP, "--list-ptx", so], capture_output=True, text=True)
    has_ptx = ptx.returncode == 0 and re.search(r"PTX file .*\.ptx", ptx.stdout)
    assert has_ptx, f"no PTX for newer GPUs in {so}:\n{ptx.stdout}"


def test_installed_module_links_no_torch_and_static_cudart():
    so = _installed_module()
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    libs = subprocess.run([ldd, so], capture_output=True, text=True, check=True).stdout
    for bad in ("libtorch", "libc10", "libcudart.so"):
        assert bad not in libs, f"{so} links {bad}:\n{libs}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_backend_without_gpu_raises_cleanly():
    """In a fresh interpreter: importing grpo_kernels (and the extension, if built) works without a GPU, and
    backend="cuda" raises BackendUnavailableError naming the reason."""
    code = (
        "import importlib.util, torch, grpo_kernels as gk\n"
        "if importlib.util.find_spec('grpo_kernels._cuda'):\n"
        "    import grpo_kernels._cuda\n"
        "try:\n"
        "    gk.token_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), backend='cuda')\n"
        "except gk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RAISED" in p.stdout and "no CUDA device" in p.stdout, p.stdout + p.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# on a GPU: the real kernels against the float64 reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [7, 1007, 32007, 151936])
def test_gpu_matches_reference(dtype, V):
    _installed_module()
    from kernel_checks import assert_rule, check_loss, loss_inputs

    import grpo_kernels as gk
    from grpo_kernels.config import GRPOConfig

    x = (torch.randn(3, 5, V + 3, device="cuda") * 3).to(dtype)[:, :, 1:-2]  # unaligned rows
    ids = torch.randint(0, V, (3, 5), device="cuda")
    w1, w2 = torch.randn(3, 5, device="cuda"), torch.randn(3, 5, device="cuda")

    def run(inp, backend):
        inp = inp.detach().requires_grad_()
        logp, ent = gk.token_logprobs(inp, ids, temperature=0.8, return_entropy=True, backend=backend)
        ((logp * w1).sum() + (ent * w2).sum()).backward()
        return logp.detach(), ent.detach(), inp.grad

    k, r, s = run(x, "cuda"), run(x.double(), "torch"), run(x, "torch")
    for name, kv, rv, sv in zip(("logp", "entropy", "grad"), k, r, s, strict=False):
        assert_rule(kv.cpu(), rv.cpu(), sv.cpu(), f"{name} {dtype} V={V}")
    if V == 1007:
        for level in ("token", "sequence"):
            cfg = GRPOConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04, delta=1.5)
            b = loss_inputs(3, 4, V, dtype, strided=True)
            check_loss(b.x, b.ids, cfg, "cuda", b.inputs(cfg), device="cuda")
