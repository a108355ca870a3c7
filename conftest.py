"""Test-session set-up shared by tests/ and benchmarks/.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
kernel module is imported: on a machine without CUDA every Triton kernel then runs in
the interpreter, on CPU tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def private_engine_cache(tmp_path_factory):
    """Exported ONNX graphs cached by the tests go to a folder of the test session, not ~/.cache."""
    old = os.environ.get("DDPM_ENGINE_CACHE")
    os.environ["DDPM_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    yield
    if old is None:
        os.environ.pop("DDPM_ENGINE_CACHE", None)
    else:
        os.environ["DDPM_ENGINE_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    """The one GPU marker: tests marked `gpu` need a CUDA device, and are skipped (with the
    reason) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device (real shapes, native Triton, CUDA graphs)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
