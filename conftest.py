"""Test-session set-up shared by tests/ and benchmarks/.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
kernel module is imported: on a machine without CUDA every Triton kernel then runs in
the interpreter, on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
