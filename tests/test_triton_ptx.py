"""The Triton kernels compiled ahead of time for sm_80 and sm_90 on a machine without a GPU.

``python -m bench.triton_aot 80 90`` (run once here, in a subprocess without the interpreter) compiles every
kernel and constexpr variant that the dispatcher can launch, with the specialisations of real launches on the
model-output view ``logits[:, P-1:-1]``, for an aligned vocabulary (32,000) and a ragged one (50,257: rows
off the 16-byte grid), in fp32 / bf16 / fp16, and reads the PTX and ``ptxas -v``. Asserted here:

- every variant compiles (a compile error fails the run);
- every global load inside a loop of the kernels is 128 bits wide (``ld.global.v4.b32``), for aligned AND
  ragged V: the head / unmasked body / tail split of ``triton_kernels.py`` at work;
- no local-memory instruction (``ld.local`` / ``st.local``) and zero spill bytes;
- the negative control (the usual loop with ``mask=cols < V`` on every chunk) shows scalar 16-bit loads for
  the ragged V, so the check can fail.

What this cannot see: timing, bank conflicts, L2 behaviour, occupancy under load, or the driver's JIT of the
PTX on newer GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "bench.triton_aot", *map(str, ARCHS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"ahead-of-time compilation failed:\n{res.stderr[-6000:]}"
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert out, res.stderr[-3000:]
    return out


def kernels(rows):
    return [r for r in rows if not r["kernel"].startswith("control:")]


def test_every_variant_compiles_for_each_arch(rows):
    from bench.triton_aot import variants

    names = {n for n, _ in variants()}
    assert len(names) == 2 * 3 * (2 + 2 + 24)  # V x dtype x (fwd, bwd, fused variants)
    for arch in ARCHS:
        assert {r["kernel"] for r in kernels(rows) if r["arch"] == arch} == names


def test_vocabulary_loops_use_128bit_loads_for_aligned_and_ragged_V(rows):
    bad = [(r["arch"], r["kernel"], r["loop_load_widths"]) for r in kernels(rows) if r["loop_load_widths"] != [128]]
    assert not bad, f"loops with loads narrower than 128 bits: {bad[:5]}"
    assert all(r["n_loops"] >= 1 for r in kernels(rows))
    assert {"V=32000", "V=50257"} <= {r["kernel"].split()[1] for r in kernels(rows)}


def test_no_local_memory_and_no_spills(rows):
    bad = [(r["arch"], r["kernel"], r["local_memory_ops"], r["spill_bytes"]) for r in kernels(rows)
           if r["local_memory_ops"] or r["spill_bytes"]]
    assert not bad, bad[:5]
    worst = max(kernels(rows), key=lambda r: r["registers"])
    print(f"\nmost registers: {worst['registers']} ({worst['kernel']}, sm_{worst['arch']})")
    assert worst["registers"] <= 255


def test_negative_control_is_caught(rows):
    """The checker sees the scalar loads that a per-chunk mask causes for V % 16 != 0."""
    ctrl = {(r["arch"], r["kernel"].split()[1]): r["loop_load_widths"]
            for r in rows if r["kernel"].startswith("control:")}
    for arch in ARCHS:
        assert ctrl[(arch, "V=50257")] == [16], ctrl
        assert ctrl[(arch, "V=32000")] == [128], ctrl  # V % 16 == 0: the mask is constant over 16 lanes
