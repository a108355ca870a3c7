"""Test-session set-up shared by tests/ and benchmarks/.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
kernel module is imported: on a machine without CUDA every Triton kernel then runs in
the interpreter, on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The one GPU marker: tests marked `gpu` need a CUDA device, and are skipped (with the
    reason) without one."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device (real shapes, native Triton, CUDA graphs)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
