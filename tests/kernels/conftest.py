"""Kernel tests: the Triton kernels under the interpreter (CPU tensors), in the upstream-Triton
venv and in the triton-ascend venv (`make test-ascend`). Imports: torch, pytest, triton only."""

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:  # pragma: no cover
    collect_ignore_glob = ["test_*.py"]
    INTERPRETED = False
else:
    # Triton fixes interpreted-vs-compiled at its first import (dcpp.kernels._loader): import it
    # interpreted here (compiled on a CUDA machine, for the gpu tests), without leaving
    # TRITON_INTERPRET set for other test folders.
    import torch

    from dcpp.kernels._loader import import_triton

    INTERPRETED = import_triton(not torch.cuda.is_available())

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="triton was imported in compiled mode earlier in this pytest process; run "
    "tests/kernels in its own process (TRITON_INTERPRET=1 pytest tests/kernels)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernels/" in str(item.fspath).replace("\\", "/") and (
                "test_kernel_attention.py" in str(item.fspath)
                or "test_kernel_kv_cache.py" in str(item.fspath)):
            item.add_marker(needs_interpreter)


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    """TRITON_INTERPRET=1 for each kernel test only (never process-wide: other test folders in
    the same pytest run must keep impl="auto" on the reference). CPU tensors run interpreted
    either way: dcpp.kernels picks the mode per call."""
    if not os.environ.get("TRITON_INTERPRET"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")

IS_ASCEND = importlib.util.find_spec("triton.backends.ascend") is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")


def pytest_configure(config):
    # triton-ascend's interpreter converts 1-element arrays to int (numpy >= 1.25 warns): noise.
    config.addinivalue_line(
        "filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
