"""What was built and what runs here: ``grpo_kernels.show_config()`` and ``python -m grpo_kernels``.

Everything is read from this process and the installed files: each backend on each device type it serves
(available, or the registry's reason why not), the CPU ISA build the C++ module chose, the CUDA architectures
in ``grpo_kernels._cuda`` (read from the fatbin inside the module file, not from a build setting), the OpenMP
runtimes mapped into the process, the versions of the package, Python, torch, triton, numpy and the TRL stack
(trl, transformers, accelerate: a TRL user's bug report needs them), and the toolchain that setup.py recorded
at build time (``grpo_kernels/_build_info.py``). Versions come from the installed distributions' metadata, so
nothing heavy is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any, Optional

FATBIN_MAGIC = 0xBA55ED50
_KINDS = {1: "ptx", 2: "sass"}
# distributions whose versions the report prints beside torch's ("not installed" when absent)
PACKAGES = ("triton", "numpy", "trl", "transformers", "accelerate")


def _elf_section(path: str, name: str) -> Optional[bytes]:
    """The bytes of the section ``name`` of a little-endian ELF64 file, or None (no such section / not ELF64)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        base = shoff + i * shentsize
        sh_name, = struct.unpack_from("<I", data, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        sh_name, off, size = header(i)
        end = data.index(b"\0", str_off + sh_name)
        if data[str_off + sh_name:end].decode() == name:
            return data[off:off + size]
    return None


def fatbin_architectures(path: str) -> dict[str, list[str]]:
    """{"sass": ["sm_80", ...], "ptx": ["compute_100", ...]} of the CUDA fatbins embedded in a shared library.

    The ``.nv_fatbin`` section holds one fatbin per compiled .cu file: a 16-byte header (magic 0xBA55ED50,
    version, header size, payload size) followed by entries, each with a header giving its kind (1 PTX,
    2 ELF/SASS), header size, payload size and, at byte 28, the architecture number.
    """
    section = _elf_section(path, ".nv_fatbin")
    found: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    if section:
        pos = 0
        while pos + 16 <= len(section):
            magic, _version, hsize, size = struct.unpack_from("<IHHQ", section, pos)
            if magic != FATBIN_MAGIC:
                pos += 8  # fatbins are 8-byte aligned; padding between them
                continue
            entry, end = pos + hsize, pos + hsize + size
            while entry + 32 <= end:
                kind, _unk, ehsize, esize = struct.unpack_from("<HHIQ", section, entry)
                arch, = struct.unpack_from("<I", section, entry + 28)
                if kind in _KINDS and ehsize:
                    found[_KINDS[kind]].add(arch)
                if not ehsize:
                    break
                entry += ehsize + esize
            pos = end
    return {"sass": [f"sm_{a}" for a in sorted(found["sass"])], "ptx": [f"compute_{a}" for a in sorted(found["ptx"])]}


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime files mapped into this process (libgomp, LLVM libomp, Intel libiomp5)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp")))


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_file(name: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    return spec.origin if spec else None


def config() -> dict[str, Any]:
    """The facts ``show_config`` prints, as a dict (for tests and scripts)."""
    import torch

    import grpo_kernels
    from grpo_kernels.backends import REGISTRY, unavailable_reason

    device_types = ["cpu", "cuda"]
    backends = {dt: {name: unavailable_reason(name, dt) for name, info in REGISTRY.items() if dt in info.device_types}
                for dt in device_types}

    cpu: dict[str, Any] = {"module": _module_file("grpo_kernels._cpu")}
    if cpu["module"]:
        try:
            C = importlib.import_module("grpo_kernels._cpu")
            cpu.update(isas=list(C.ISAS), isa=C.isa())
        except ImportError as e:  # a module that does not load here (glibc, missing libgomp): say so
            cpu["error"] = f"{type(e).__name__}: {e}"
    cpu["GRPO_KERNELS_CPU_ISA"] = os.environ.get("GRPO_KERNELS_CPU_ISA")
    cpu["torch_threads"] = torch.get_num_threads()

    cuda: dict[str, Any] = {"module": _module_file("grpo_kernels._cuda")}
    if cuda["module"]:
        cuda.update(fatbin_architectures(cuda["module"]))
        try:
            cuda["emulated"] = bool(importlib.import_module("grpo_kernels._cuda").EMULATED)
        except ImportError as e:
            cuda["error"] = f"{type(e).__name__}: {e}"
    if torch.cuda.is_available():
        cuda["devices"] = []
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            cuda["devices"].append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    try:
        build = importlib.import_module("grpo_kernels._build_info").BUILD_INFO
    except ImportError:
        build = None

    return {
        "grpo_kernels": {"version": grpo_kernels.__version__, "path": str(Path(grpo_kernels.__file__).parent)},
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.machine()}, {' '.join(platform.libc_ver())}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
        **{name: _version(name) for name in PACKAGES},
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "GRPO_KERNELS_BACKEND": os.environ.get("GRPO_KERNELS_BACKEND"),
        "backends": backends,
        "cpu": cpu,
        "cuda": cuda,
        "openmp_runtimes": openmp_runtimes(),
        "build": build,
    }


def show_config(file=None) -> None:
    """Print what was built and what runs here (paste it into a bug report).

    The backends available for each device type (and why the others are not), the C++ CPU module's ISA
    builds and the one in use, the OpenMP runtimes mapped into the process, the CUDA architectures compiled
    into ``grpo_kernels._cuda``, and the versions of the package, Python, torch, triton, numpy, trl,
    transformers, accelerate and the build's compilers. ``python -m grpo_kernels`` prints the same.

    Parameters
    ----------
    file : text stream or None, default None
        Where to print; None prints to ``sys.stdout``.
    """
    c = config()
    out = []
    g = c["grpo_kernels"]
    out.append(f"grpo_kernels {g['version']}  ({g['path']})")
    for key in ("python", "platform", "torch", *PACKAGES, "TRITON_INTERPRET", "GRPO_KERNELS_BACKEND"):
        value = c[key] if c[key] is not None else "not set" if key.isupper() else "not installed"
        out.append(f"  {key + ':':22}{value}")
    out.append("backends (device type: name: available, or why not)")
    for dt, table in c["backends"].items():
        for name, reason in table.items():
            out.append(f"  {dt:5} {name:7} {'available' if reason is None else 'unavailable: ' + reason}")
    cpu = c["cpu"]
    out.append("C++ CPU module (grpo_kernels._cpu)")
    if not cpu["module"]:
        out.append("  not built")
    elif "error" in cpu:
        out.append(f"  {cpu['module']}\n  does not load: {cpu['error']}")
    else:
        out.append(f"  {cpu['module']}")
        out.append(f"  ISA builds: {', '.join(cpu['isas'])}; in use: {cpu['isa']}"
                   f" (GRPO_KERNELS_CPU_ISA={cpu['GRPO_KERNELS_CPU_ISA'] or 'not set'})")
    omp = c["openmp_runtimes"]
    note = "" if len(omp) <= 1 else "  <- more than one OpenMP runtime: two thread pools compete for the cores"
    out.append(f"  OpenMP runtimes mapped: {', '.join(omp) or 'none'}{note}")
    out.append(f"  torch threads: {cpu['torch_threads']}")
    cuda = c["cuda"]
    out.append("CUDA module (grpo_kernels._cuda)")
    if not cuda["module"]:
        out.append("  not built (no nvcc at build time, or GRPO_KERNELS_SKIP_CUDA)")
    else:
        out.append(f"  {cuda['module']}")
        out.append(f"  SASS: {', '.join(cuda['sass']) or 'none'}; PTX: {', '.join(cuda['ptx']) or 'none'}")
        if "error" in cuda:
            out.append(f"  does not load: {cuda['error']}")
        elif cuda.get("emulated"):
            out.append("  EMULATED: the CPU emulation build (tests only)")
    for d in cuda.get("devices", []):
        out.append(f"  device: {d}")
    out.append("build (recorded by setup.py)")
    if c["build"] is None:
        out.append("  not recorded (grpo_kernels/_build_info.py is missing)")
    else:
        for key, value in c["build"].items():
            shown = " ".join(value) if isinstance(value, list) else "not used" if value is None else value
            out.append(f"  {key + ':':22}{shown}")
    print("\n".join(out), file=file if file is not None else sys.stdout)
