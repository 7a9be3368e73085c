"""Build script. The compiled modules (grpo_kernels._C for the CPU, grpo_kernels._cuda for CUDA) are added
by csrc/ (see the CUDA/C++ backend); until then this builds a pure-Python package."""

from setuptools import setup

setup()
