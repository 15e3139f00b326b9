"""Kernel tests: the Triton kernels under the interpreter (CPU tensors), in the upstream-Triton
venv and in the triton-ascend venv (`make test-ascend`). Imports: torch, pytest, triton only."""

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:  # pragma: no cover
    collect_ignore_glob = ["test_*.py"]

# CPU tensors always run interpreted (dcpp.kernels picks the mode per call); setting the variable
# also makes impl="auto" choose Triton on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

IS_ASCEND = importlib.util.find_spec("triton.backends.ascend") is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")


def pytest_configure(config):
    # triton-ascend's interpreter converts 1-element arrays to int (numpy >= 1.25 warns): noise.
    config.addinivalue_line(
        "filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
