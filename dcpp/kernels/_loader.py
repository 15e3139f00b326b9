"""Load the Triton kernel sources in compiled or interpreted mode.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted, from
``TRITON_INTERPRET``. So that the mode follows the tensors' device at call time (CPU tensors can
only run under the interpreter) and not the import order, each mode gets its own copy of
``_triton_src.py``, loaded with ``TRITON_INTERPRET`` set accordingly.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("_triton_src.py")
_lock = threading.Lock()
_modules: dict[bool, types.ModuleType] = {}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_interpreter(device: torch.device) -> bool:
    """Interpret when asked to (``TRITON_INTERPRET=1``) or when the tensors live on the CPU."""
    return interpret_requested() or device.type == "cpu"


@contextmanager
def triton_mode(interpret: bool):
    """Set ``TRITON_INTERPRET`` for the duration of a kernel load or launch.

    Triton reads it at decoration time and, in places, lazily at launch time too (e.g. upstream
    3.9 imports gluon on the first interpreted launch and asserts interpreter mode there).
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def import_triton(interpret: bool):
    """Import triton (first time: in the given mode) and return whether its standard library
    (``tl.max``, ``tl.sum``, ... are themselves ``@triton.jit`` functions) is interpreted.

    Triton fixes that mode at its first import: an interpreted kernel cannot call a compiled
    ``tl.max``, and code generation fails on an interpreted one. So a process runs kernels in
    one mode only: the interpreter needs ``TRITON_INTERPRET=1`` before triton is first imported.
    """
    if "triton.language" not in sys.modules:
        with triton_mode(interpret):
            import triton.language  # noqa: F401
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.max, JITFunction)


def load_kernels(interpret: bool) -> types.ModuleType:
    """Return the kernel module for one mode (cached). Launch inside ``triton_mode(interpret)``."""
    if interpret and not import_triton(True):
        raise RuntimeError(
            "Triton kernels on CPU tensors run under the Triton interpreter, but triton was "
            "imported in compiled mode earlier in this process; set TRITON_INTERPRET=1 before "
            "triton is first imported (or use impl='reference')")
    with _lock:
        mod = _modules.get(interpret)
        if mod is not None:
            return mod
        name = f"dcpp.kernels._triton_src_{'interpreted' if interpret else 'compiled'}"
        with triton_mode(interpret):
            spec = importlib.util.spec_from_file_location(name, _SRC)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        _modules[interpret] = mod
        return mod


def num_compute_units(device: torch.device) -> int:
    """SMs on CUDA, AI cores on Ascend NPUs; 1 elsewhere (the interpreter runs serially)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "npu":
        try:
            from triton.runtime import driver

            return int(driver.active.utils.get_device_properties(device.index or 0)["num_aicore"])
        except Exception:  # pragma: no cover - depends on the NPU runtime
            return 20
    return 1
