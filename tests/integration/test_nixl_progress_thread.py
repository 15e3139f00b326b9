"""``DCPP_NIXL_PROGRESS_THREAD=0``: vLLM's NIXL connector builds its agents without NIXL's
progress thread (the plugin's `register` wraps the config factory vLLM's NIXL worker calls).
Real vLLM and NIXL, no engine: the wrapped factory's config, and real agents built from it
(in a subprocess each) against vLLM's own factory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vllm_testlib as lib

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not lib.vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

nixl_api = pytest.importorskip("nixl._api", reason="needs nixl (pip install dcpp[pd])")


@pytest.fixture
def base_worker(monkeypatch):
    """vLLM's NIXL worker module, its ``nixl_agent_config`` restored after the test."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    monkeypatch.setattr(base_worker, "nixl_agent_config", base_worker.nixl_agent_config)
    return base_worker


def test_wrapped_factory_turns_only_the_progress_thread_off(base_worker):
    from dcpp.integration.vllm.vllm_compat_worker import nixl_agents_without_progress_thread

    original = base_worker.nixl_agent_config
    assert original(num_threads=4).enable_pthread is True  # NIXL's default, as vLLM gets it
    assert nixl_agents_without_progress_thread() is None
    wrapped = base_worker.nixl_agent_config
    assert wrapped is not original
    cfg = wrapped(num_threads=4, capture_telemetry=True)  # vLLM 0.32's call for UCX
    assert (cfg.enable_pthread, cfg.num_threads, cfg.capture_telemetry) == (False, 4, True)
    assert nixl_agents_without_progress_thread() is None
    assert base_worker.nixl_agent_config is wrapped  # idempotent: not wrapped twice


AGENT_SCRIPT = """
import json, os, sys, time
from dcpp.integration.vllm.vllm_compat_worker import nixl_agents_without_progress_thread
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
if sys.argv[1] == "off":
    assert nixl_agents_without_progress_thread() is None
before = len(os.listdir("/proc/self/task"))
from nixl._api import nixl_agent
agent = nixl_agent("t", base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True))
time.sleep(0.5)
print(json.dumps({"threads": len(os.listdir("/proc/self/task")) - before}))
"""


def agent_threads(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, mode], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["threads"]


def test_real_agent_starts_one_thread_fewer():
    """The same agent (vLLM 0.32's arguments) from vLLM's factory and from the wrapped one: the
    only thread missing is NIXL's progress thread."""
    assert agent_threads("on") - agent_threads("off") == 1


def test_register_applies_the_setting_and_rejects_bad_values(base_worker, monkeypatch):
    from dcpp.integration.vllm import plugin

    original = base_worker.nixl_agent_config
    monkeypatch.setenv("DCPP_NIXL_PROGRESS_THREAD", "1")
    plugin.register()
    assert base_worker.nixl_agent_config is original
    monkeypatch.setenv("DCPP_NIXL_PROGRESS_THREAD", "0")
    plugin.register()
    assert base_worker.nixl_agent_config(num_threads=4).enable_pthread is False
    monkeypatch.setenv("DCPP_NIXL_PROGRESS_THREAD", "no")
    with pytest.raises(ValueError, match="DCPP_NIXL_PROGRESS_THREAD='no'"):
        plugin.register()
