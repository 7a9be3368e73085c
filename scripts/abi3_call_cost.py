"""Per-call cost of the binding layer: pybind11 (what the modules use, one wheel per CPython version) against
a plain C-API function built for the stable ABI (Py_LIMITED_API = 3.10, one abi3 wheel for every version).

Both modules expose the signature of ``_cpu.logprobs_fwd`` (12 integers / pointers and one double), release
the GIL like the real binding and call an out-of-line function that does nothing, so the time measured is
argument conversion + dispatch + GIL release. Built with g++ in a temporary directory; nothing of it ships.

    python scripts/abi3_call_cost.py [--calls 1000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import timeit
from pathlib import Path

import pybind11

SINK = r"""
#include <cstdint>
extern "C" __attribute__((noinline, visibility("hidden"))) void gk_sink(const int64_t* v, double d) {
  asm volatile("" : : "r"(v), "x"(d) : "memory");
}
"""

PYBIND = r"""
#include <pybind11/pybind11.h>
#include <cstdint>
namespace py = pybind11;
extern "C" void gk_sink(const int64_t* v, double d);
PYBIND11_MODULE(cost_pybind11, m) {
  m.def("f", [](uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st, uintptr_t ids,
                double tau, uintptr_t logp, uintptr_t stats, uintptr_t ent, int num_threads) {
    const int64_t v[12] = {(int64_t)x, dtype, B, T, V, sb, st, (int64_t)ids, (int64_t)logp, (int64_t)stats,
                           (int64_t)ent, num_threads};
    py::gil_scoped_release nogil;
    gk_sink(v, tau);
  });
}
"""

LIMITED = r"""
#define Py_LIMITED_API 0x030A0000
#include <Python.h>
#include <cstdint>
extern "C" void gk_sink(const int64_t* v, double d);
static PyObject* f(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n != 13) { PyErr_SetString(PyExc_TypeError, "f() takes 13 arguments"); return nullptr; }
  int64_t v[12];
  int k = 0;
  for (Py_ssize_t i = 0; i < 13; ++i) {
    if (i == 8) continue;
    v[k++] = PyLong_AsLongLong(args[i]);
  }
  double tau = PyFloat_AsDouble(args[8]);
  if (PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  gk_sink(v, tau);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyMethodDef methods[] = {{"f", (PyCFunction)(void (*)(void))f, METH_FASTCALL, nullptr}, {nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, "cost_limited", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_cost_limited(void) { return PyModule_Create(&def); }
"""


def _build(d: Path, name: str, src: str) -> object:
    (d / f"{name}.cpp").write_text(src)
    so = d / f"{name}{'.abi3.so' if name == 'cost_limited' else sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
                    f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
                    str(d / f"{name}.cpp"), str(d / "sink.cpp"), "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "sink.cpp").write_text(SINK)
        mods = {"pybind11": _build(d, "cost_pybind11", PYBIND),
                "limited API (abi3)": _build(d, "cost_limited", LIMITED)}
        call = (140000000, 0, 8, 512, 32000, 512 * 32000, 32000, 140000001, 1.0, 140000002, 140000003, 0, 0)
        res = {}
        for _ in range(args.repeats):  # interleaved, best of the repeats: the machine may be shared
            for label, m in mods.items():
                t = timeit.timeit(lambda f=m.f: f(*call), number=args.calls) / args.calls
                res[label] = min(res.get(label, t), t)
    print(f"Python {sys.version.split()[0]}, {args.calls} calls x {args.repeats} (best):")
    for label, t in res.items():
        print(f"  {label:20} {t * 1e9:7.1f} ns per call")


if __name__ == "__main__":
    main()
