"""Fixtures for end-to-end tests on a real vLLM (CPU build, PP=2 on 2 cores).

Every engine or server a test starts is shut down at the end of its module, and every process
it spawned (recorded while it ran) is checked and, if still alive, killed by PID.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vllm_testlib as lib


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return lib.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def profile_cache_dir(tmp_path_factory) -> Path:
    """A fresh profile cache per test session (so the first engine profiles for real)."""
    path = tmp_path_factory.mktemp("dcpp_profiles")
    os.environ["DCPP_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """No process started by the tests survives the session (and the environment variables
    these tests set do not leak into other test directories)."""
    keys = ("DCPP_CACHE_DIR", "VLLM_ENABLE_V1_MULTIPROCESSING")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    left = lib.alive_descendants()
    lib.reap(lib.descendants(), timeout=5)
    if left:
        pytest.fail(f"processes started by the tests were still alive at session end: {left}")
