"""The C++ CPU kernels (csrc/cpu/grpo_cpu.cpp, grpo_cpu.h, csrc/include/grpo_math.h) under AddressSanitizer and
UndefinedBehaviorSanitizer.

``csrc/tests/asan_cpu_driver.cpp`` calls the kernels directly (no Python, no torch) on exact-size heap buffers
(every row of a batch borders a redzone): fp32 / bf16 / fp16, V = 1, odd and prime V, sum-chunk and vector-width
boundaries, strided rows with a storage offset, masked NaN rows (zeros without a read), out-of-range ids at the
last row, -inf entries, in place and out of place, 1-3 OpenMP threads, entropy on / off, every loss code, on both
instruction sets (baseline, and AVX2 / AVX-512 where the CPU has them), and checks every result against double precision. It is
built with the flags of the real module (-O3, -ffp-contract=fast, ...) plus
``-fsanitize=address,undefined -fno-sanitize-recover=all``, once per source hash, into build/sanitizers/.

Three runs: the cases (no report allowed), and two negative controls proving a clean run means something: an
out-of-bounds read inside the kernel (a row one element longer than its buffer) must be reported as a
heap-buffer-overflow, and a signed overflow must be reported by UBSan. (The CUDA kernels' ThreadSanitizer run
is tests/test_cuda_emu.py::test_thread_sanitizer_clean.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++"))
SOURCES = [ROOT / "csrc/cpu/grpo_cpu.cpp", ROOT / "csrc/tests/asan_cpu_driver.cpp"]
HEADERS = [ROOT / "csrc/cpu/grpo_cpu.h", ROOT / "csrc/include/grpo_math.h", ROOT / "csrc/include/grpo_boundary.h"]
# setup.py's CPU_FLAGS (minus -fvisibility), so the sanitized code is the vectorised code that ships
FLAGS = ["-std=c++17", "-O3", "-g", "-fno-omit-frame-pointer", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
         "-fno-trapping-math", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wextra",
         f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cpu'}"]
ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:"
                    "check_initialization_order=1:exitcode=23",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is needed to build the sanitizer driver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    probe = tmp_path_factory.mktemp("probe")
    (probe / "p.cpp").write_text("int main() { return 0; }\n")
    res = subprocess.run([CXX, "-fsanitize=address,undefined", str(probe / "p.cpp"), "-o", str(probe / "p")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"{CXX} cannot link ASan / UBSan programs here: {res.stderr[-300:]}")
    h = hashlib.sha256(" ".join([CXX, *FLAGS]).encode())
    for p in SOURCES + HEADERS:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    target = ROOT / "build" / "sanitizers" / h.hexdigest()[:16] / "asan_cpu_driver"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        res = subprocess.run(["nice", CXX, *FLAGS, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True)
        assert res.returncode == 0, f"the sanitizer build failed:\n{res.stderr[-4000:]}"
        os.replace(tmp, target)  # atomic: a concurrent session never runs a half-written file
    return target


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRPO_KERNELS_CPU_ISA"}
    env.update(ENV)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer")


def test_cpu_kernels_clean_under_asan_and_ubsan(driver):
    res = run(driver)
    reports = [r for r in REPORTS if r in res.stderr]
    assert not reports, f"sanitizer reports {reports}:\n{res.stderr[-6000:]}"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "ok" and " cases " in lines[-2], res.stdout[-3000:]
    assert int(lines[-2].split()[0]) >= 120, "every dtype x shape x layout x inplace on at least one ISA"


def test_asan_build_reports_an_out_of_bounds_read_in_a_kernel(driver):
    """Negative control: the kernel reads one element past a heap buffer -> reported, with the kernel's frame."""
    res = run(driver, "oob")
    assert res.returncode != 0 and "no report" not in res.stdout, res.stdout + res.stderr[-3000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-3000:]
    assert "READ of size" in res.stderr and "grpo_cpu.cpp" in res.stderr, res.stderr[-3000:]


def test_ubsan_build_reports_undefined_behaviour(driver):
    """Negative control: a signed integer overflow is reported and, with -fno-sanitize-recover, fatal."""
    res = run(driver, "ubsan")
    assert res.returncode != 0 and "no report" not in res.stdout, res.stdout + res.stderr[-3000:]
    assert "runtime error: signed integer overflow" in res.stderr, res.stderr[-3000:]
