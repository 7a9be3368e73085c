"""Backend registry: which implementation runs for ``backend=`` and ``GRPO_KERNELS_BACKEND``.

``REGISTRY`` is the one list of backends: the valid ``backend=`` values are ``"auto"`` and its keys
(:func:`backend_names`; ``BACKENDS`` is the same tuple, computed when read). :func:`register_backend` adds
one (the tests register the CUDA kernels running on a CPU emulation this way); the custom ops of
``grpo_kernels._ops`` take the backend's name and look it up here when they run.

``"torch"`` is the eager reference (any device). The fused backends are loaded lazily, so importing
grpo_kernels never compiles or imports Triton or an extension module that is not used.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from .base import BackendInfo, Launchers

ENV_VAR = "GRPO_KERNELS_BACKEND"
# "auto" tries these in order for a tensor's device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name (``backend=`` or ``GRPO_KERNELS_BACKEND``) but cannot run on the
    tensors' device here; the message says why (no GPU, extension not built, Triton without its interpreter
    on CPU tensors). A ``RuntimeError``."""


def _module_missing(module: str) -> Optional[str]:
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    return None if found else f"the module {module} is not present"


def _triton_unavailable(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
        return _module_missing("grpo_kernels.backends.triton_backend")
    if device_type != "cuda":
        return f"Triton kernels run on cuda tensors, got {device_type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _module_missing("grpo_kernels.backends.triton_backend")


def _cpu_unavailable(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"the C++ CPU backend runs on cpu tensors, got {device_type} (use backend='cuda' or 'triton')"
    if importlib.util.find_spec("grpo_kernels._cpu") is None:
        return "the extension grpo_kernels._cpu is not built (pip install . builds it; see the README)"
    return _module_missing("grpo_kernels.backends.cpu_backend")


def _cuda_unavailable(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"the CUDA backend runs on cuda tensors, got {device_type} tensors (no CUDA device here?)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if importlib.util.find_spec("grpo_kernels._cuda") is None:
        return "the extension grpo_kernels._cuda is not built (it needs nvcc at install time; see the README)"
    return _module_missing("grpo_kernels.backends.cuda_backend")


def _loader(module: str):
    return lambda: importlib.import_module(module).LAUNCHERS


REGISTRY: dict[str, BackendInfo] = {}
_LOADED: dict[str, Launchers] = {}


def register_backend(info: BackendInfo) -> str:
    """Adds ``info`` to the registry under ``info.name`` (a new name) and returns the name."""
    if not isinstance(info, BackendInfo):
        raise TypeError(f"info must be a BackendInfo, got {type(info).__name__}")
    if not isinstance(info.name, str) or not info.name.isidentifier() or info.name == "auto":
        raise ValueError(f"a backend name must be an identifier other than 'auto', got {info.name!r}")
    if info.name in REGISTRY:
        raise ValueError(f"a backend named {info.name!r} is already registered")
    REGISTRY[info.name] = info
    _LOADED.pop(info.name, None)
    return info.name


def backend_names() -> tuple[str, ...]:
    """The valid values of ``backend=``: "auto", then every registered backend."""
    return ("auto", *REGISTRY)


def __getattr__(name: str):
    if name == "BACKENDS":  # computed from the registry at every read, never a stale copy
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_backend_name(backend, what: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in REGISTRY and backend != "auto":
        raise ValueError(f"{what} must be one of {backend_names()}, got {backend!r}")
    return backend


register_backend(BackendInfo(
    "cuda", ("cuda",), _cuda_unavailable, _loader("grpo_kernels.backends.cuda_backend"),
    "fused CUDA C++ kernels (pybind11, no libtorch link); sm_80 / sm_90 / sm_100 + PTX",
))
register_backend(BackendInfo(
    "triton", ("cuda", "cpu"), _triton_unavailable, _loader("grpo_kernels.backends.triton_backend"),
    "fused Triton kernels; CUDA GPUs (CPU tensors only under TRITON_INTERPRET=1, for tests)",
))
register_backend(BackendInfo(
    "cpu", ("cpu",), _cpu_unavailable, _loader("grpo_kernels.backends.cpu_backend"),
    "fused C++ kernels (OpenMP over rows, vectorised inner loop); CPU tensors",
))
register_backend(BackendInfo(
    "torch", ("cpu", "cuda"), lambda d: None, lambda: None,
    "eager float64-capable reference (full log-softmax, TRL-style); any device; the oracle of every test",
))


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    return REGISTRY[name].unavailable(device_type)


def available_backends(device: "str | torch.device | None" = None) -> list[str]:
    """The backends that can run here, fastest first.

    Parameters
    ----------
    device : str, torch.device or None, default None
        The device the tensors will be on; None means any device of this machine.

    Returns
    -------
    list of str
        Names to pass as ``backend=``: "cuda", "triton", "cpu", "torch" (always last; "triton" appears for
        CPU tensors only under ``TRITON_INTERPRET=1``).
    """
    if device is None:
        types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        types = [torch.device(device).type]
    names = []
    for dt in types:
        for name in AUTO_ORDER.get(dt, ("torch",)) + ("triton", "cpu", "cuda"):
            if name not in names and unavailable_reason(name, dt) is None:
                names.append(name)
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on tensors of ``device``; raises if it cannot run."""
    source = "backend"
    check_backend_name(backend)
    if backend == "auto" and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR], f"the environment variable {ENV_VAR}"
        check_backend_name(backend, ENV_VAR)
    dt = device.type
    if backend == "auto":
        for name in AUTO_ORDER.get(dt, ("torch",)):
            if unavailable_reason(name, dt) is None:
                return name
        return "torch"
    reason = unavailable_reason(backend, dt)
    if reason is not None:
        raise BackendUnavailableError(f"{source}={backend!r} cannot run on {dt} tensors: {reason}")
    return backend


def launchers(name: str) -> Launchers:
    if name not in _LOADED:
        _LOADED[name] = REGISTRY[name].load()
    return _LOADED[name]
