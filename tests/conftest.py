"""Shared pytest setup and fixtures.

Triton kernels run on CPU tensors only under the Triton interpreter, and TRITON_INTERPRET must be set
before triton is first imported; so on a machine without a CUDA device it is switched on here, before
any test module imports grpo_kernels (which imports triton lazily). On a GPU machine the real compiler
is used unless the caller sets TRITON_INTERPRET themselves.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels compiled against the CPU emulation (tests/cuda_emu_build.py), built once per source hash;
    tests register it as a backend with kernel_checks.emu_backend."""
    from cuda_emu_build import CXX, build_emu_module

    if CXX is None:
        pytest.skip("g++ is needed to build the CUDA emulation module")
    try:
        return build_emu_module()
    except RuntimeError as e:
        pytest.fail(str(e))
