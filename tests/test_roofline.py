"""bench/roofline.py: the arithmetic of the static roofline note and a quick run of its core.

- ``occupancy`` follows cuda_occupancy.h for sm_90 (registers per warp rounded to 256, allocated per
  sub-partition; 64 warps, 32 blocks, 228 KB shared memory per SM + 1 KB reserved per block), checked on
  cases worked by hand;
- ``traffic`` / ``floor_ms``: bytes per kernel and floor = bytes / bandwidth; the CUDA cluster kernel counts
  2 passes (one read, one write), the 3-pass kernels 3 (2 ideal); ``cluster_size`` mirrors the C++ choice
  (checked against it in tests/test_cuda_emu.py::test_kernel_choice);
- a quick run (``python -m bench.roofline --v 32000 --dtype bfloat16 --quick --json``, in a subprocess
  without the Triton interpreter: one V, one flag variant per kernel) compiles the Triton and CUDA kernels
  for sm_90 and its rows agree with that arithmetic; the registers come from the compiler (> 0, not all
  equal, no spills);
- the committed note bench/results/roofline.md covers every V, both dtypes and says what it cannot see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import roofline as rl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "regs, threads, smem, blocks, limiter",
    [
        (64, 512, 396, 2, "registers"),  # 2048 regs / warp: 8 warps per sub-partition -> 32 warps -> 2 x 16
        (40, 512, 396, 3, "registers"),  # 1280 / warp: 12 per sub-partition -> 48 warps -> 3 x 16
        (128, 256, 8192, 2, "registers"),  # 4096 / warp: 4 per sub-partition -> 16 warps -> 2 x 8
        (255, 32, 0, 8, "registers"),  # 8160 -> 8192 / warp: 2 per sub-partition -> 8 warps of 1
        (32, 512, 0, 4, "registers+warps"),  # 1024 / warp: 64 warps either way
        (32, 128, 100 * 1024, 2, "shared memory"),  # (100 KB + 1 KB reserved) x 2 <= 228 KB < x 3
        (16, 32, 0, 32, "blocks"),  # at most 32 blocks per SM
    ],
)
def test_occupancy_rules(regs, threads, smem, blocks, limiter):
    o = rl.occupancy(regs, threads, smem)
    assert o["blocks_per_sm"] == blocks, o
    assert o["limiter"] == limiter, o
    assert o["warps_per_sm"] == blocks * -(-threads // 32) <= 64
    assert o["occupancy"] == pytest.approx(o["warps_per_sm"] / 64)


def test_cluster_size_mirror():
    """A 151,936 bf16 row (297 KiB) in 4 blocks of 74 KiB, fp32 in 8; 32,000 bf16 in 2; too long: 0."""
    assert rl.cluster_size(151936, 2) == 4 and rl.cluster_smem_bytes(151936, 2, 4) == 75968
    assert rl.cluster_size(151936, 4) == 8 and rl.cluster_size(32000, 2) == 2
    assert rl.cluster_size(10**6, 4) == 0
    # 3 blocks of 75,968 B (+1 KB reserved each) fit the 228 KB of an SM: 3 x 512 threads, 48 warps
    assert rl.occupancy(32, 512, 75968 + 400)["limits"]["shared memory"] == 3


def test_traffic_and_floor_arithmetic():
    N, V = 8192, 151936
    f, b, u = (rl.traffic(k, N, V, 2) for k in ("fwd", "bwd", "fused"))
    row = N * V * 2
    # per row: ids 8 B; fwd writes logp, (m, log s), entropy; bwd reads (m, log s), entropy, g_logp, g_ent
    assert f["bytes"] == f["bytes_ideal"] == row + N * 24
    assert b["bytes"] == b["bytes_ideal"] == 2 * row + N * 28
    assert u["bytes"] == 3 * row + N * 32 and u["bytes_ideal"] == 2 * row + N * 32
    two = rl.traffic("fused2", N, V, 2)
    assert two["bytes"] == two["bytes_ideal"] == 2 * row + N * 32 == u["bytes_ideal"]
    # the numbers of the note: 7.47 GB / 1.556 ms (3 passes) and 4.98 GB / 1.037 ms (2 passes) on H200
    assert u["bytes"] / 1e9 == pytest.approx(7.468, abs=1e-3) and rl.floor_ms(u["bytes"], 4.8) == pytest.approx(1.556, abs=1e-3)
    assert rl.floor_ms(two["bytes"], 4.8) == pytest.approx(1.037, abs=1e-3)
    assert rl.floor_ms(two["bytes"], 3.35) == pytest.approx(1.486, abs=1e-3)
    assert rl.floor_ms(two["bytes"], 8.0) == pytest.approx(0.622, abs=1e-3)
    assert rl.floor_ms(3.35e12, 3.35) == pytest.approx(1000.0)
    assert rl.floor_ms(f["bytes"], 4.8) == pytest.approx(f["bytes"] / 4.8e12 * 1e3)


@pytest.fixture(scope="module")
def quick_rows():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-m", "bench.roofline", "--v", "32000", "--dtype", "bfloat16", "--quick",
                        "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows, p.stderr[-3000:]
    return rows


def test_quick_run_arithmetic_and_compiler_registers(quick_rows):
    kernels = {(r["backend"], r["kernel"]) for r in quick_rows}
    assert {("triton", "logprobs_fwd"), ("triton", "logprobs_bwd"), ("triton", "fused_fwd_bwd")} <= kernels
    if rl._nvcc() is not None:
        assert {("cuda", "fwd_kernel"), ("cuda", "bwd_kernel"), ("cuda", "fused_kernel"),
                ("cuda", "fused_cluster_kernel")} <= kernels
    for r in quick_rows:
        assert r["V"] == 32000 and r["dtype"] == "bfloat16" and r["N"] == rl.N_ROWS
        t = rl.traffic(r["kind"], r["N"], r["V"], 2)
        assert (r["bytes"], r["bytes_ideal"]) == (t["bytes"], t["bytes_ideal"])
        for gpu, g in rl.GPUS.items():
            assert r[f"floor_ms[{gpu}]"] == pytest.approx(r["bytes"] / (g["tbps"] * 1e12) * 1e3)
            assert r[f"floor_ms_ideal[{gpu}]"] == pytest.approx(r["bytes_ideal"] / (g["tbps"] * 1e12) * 1e3)
            assert r[f"rows_in_flight[{gpu}]"] == r["occupancy"]["blocks_per_sm"] * g["sms"] // r["cluster"]
        assert r["registers"] > 0 and r["spill_bytes"] == 0, r
        assert r["occupancy"] == rl.occupancy(r["registers"], r["threads"], r["smem_bytes"])
        assert r["occupancy"]["blocks_per_sm"] >= 1
    for backend in {r["backend"] for r in quick_rows}:  # measured, not one number typed in for all
        assert len({r["registers"] for r in quick_rows if r["backend"] == backend}) > 1
    fused = [r for r in quick_rows if r["kind"] == "fused"]
    assert all(r["bytes"] > r["bytes_ideal"] for r in fused)
    for r in (r for r in quick_rows if r["kind"] == "fused2"):  # 32,000 bf16: 2 blocks of 32,000 B of row each
        assert r["cluster"] == 2 and r["smem_bytes"] >= 32000 and r["bytes"] == r["bytes_ideal"]
    md = rl.render(quick_rows)
    assert "32,000" in md and "cannot see" in md and "bank conflicts" in md and "tail effects" in md


def test_committed_note_covers_every_V_and_dtype():
    md = (ROOT / "bench" / "results" / "roofline.md").read_text()
    for v in rl.V_LIST:
        assert f"| {v:,} |" in md
    for d in rl.DTYPES:
        assert f"## {d} logits" in md
    for k in ("logprobs_fwd", "logprobs_bwd", "fused_fwd_bwd", "fwd_kernel", "bwd_kernel", "fused_kernel",
              "fused_cluster_kernel"):
        assert k in md
    assert "cannot see" in md
    # the 2-pass kernel beside the 3-pass ones and Liger's figure, with estimated times on every GPU
    assert "## The fused kernels: 3 passes against 2" in md
    row = next(line for line in md.splitlines() if line.startswith("| bfloat16 | 151,936 | cuda fused_cluster_kernel | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "4,978.9" and cells[5:7] == ["1.486", "1.65–1.86"] and cells[7:9] == ["1.037", "1.15–1.30"]
    assert cells[9:11] == ["0.622", "0.69–0.78"]
    assert "| bfloat16 | 151,936 | cuda fused_kernel | 3 | 7,468.2 |" in md
    assert "1.66 (measured)" in md and "H200" in md and "B200" in md
