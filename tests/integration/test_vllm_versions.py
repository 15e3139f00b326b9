"""Which vLLM dcpp's scheduler runs on: the per-request hook is looked up on vLLM's class.

vLLM 0.32 and 0.33 have `Scheduler._reserve_prefill_lookahead(request, num_computed_tokens,
num_new_tokens)`; vLLM 0.27.1 (vllm-ascend's main-branch pin) has no per-request hook. On a dcpp
subclass `getattr` always finds dcpp's own override, so the check must look below dcpp's classes,
and a scheduler without the hook must fail at start-up (before any profiling), naming the
versions that work and the fix. No engine is started: these run in a second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dcpp.integration.vllm import vllm_compat
from dcpp.integration.vllm import scheduler as dcpp_scheduler
from dcpp.integration.vllm.scheduler import DcppAsyncScheduler, DcppScheduler, _DcppMixin
from dcpp.integration.vllm.vllm_compat import PER_REQUEST_CAP_HOOK, check_scheduler_hook

ROOT = Path(__file__).resolve().parents[2]


class Vllm027Scheduler:
    """vLLM 0.27.1's scheduler as far as dcpp is concerned: schedule() and friends, and no
    per-request hook (vllm/v1/core/sched/scheduler.py of the 0.27.1 wheel)."""

    def __init__(self, vllm_config, *args, **kwargs):
        self.vllm_config = vllm_config

    def schedule(self):
        return None


class OldHookScheduler(Vllm027Scheduler):
    """A hook under dcpp's name with another signature."""

    def _reserve_prefill_lookahead(self, request, num_new_tokens):
        return num_new_tokens


class Dcpp027(_DcppMixin, Vllm027Scheduler):
    """dcpp's mixin over a hook-less vLLM, the way DcppScheduler is built."""


class DcppOldHook(_DcppMixin, OldHookScheduler):
    pass


class UserScheduler(Dcpp027):
    """A user's subclass of a dcpp scheduler: still vLLM's class decides."""


def test_real_vllm_schedulers_pass():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    assert vllm_compat.vllm_scheduler_base(DcppScheduler) is Scheduler
    assert vllm_compat.vllm_scheduler_base(DcppAsyncScheduler) is AsyncScheduler
    check_scheduler_hook(DcppScheduler)
    check_scheduler_hook(DcppAsyncScheduler)
    check_scheduler_hook(Scheduler)  # no dcpp class in it: the whole MRO is vLLM's

    class VendorScheduler(Scheduler):  # e.g. a platform's subclass between dcpp and vLLM
        pass

    class DcppOverVendor(_DcppMixin, VendorScheduler):
        pass

    assert vllm_compat.vllm_scheduler_base(DcppOverVendor) is VendorScheduler
    check_scheduler_hook(DcppOverVendor)


@pytest.mark.parametrize("cls", [Dcpp027, UserScheduler])
def test_scheduler_without_the_hook_fails_naming_versions_and_fix(cls):
    # What the old check saw: dcpp's own override, on the subclass.
    assert getattr(cls, PER_REQUEST_CAP_HOOK) is _DcppMixin._reserve_prefill_lookahead
    with pytest.raises(RuntimeError) as e:
        check_scheduler_hook(cls)
    msg = str(e.value)
    for part in (f"{__name__}.Vllm027Scheduler", "has no such method",
                 f"{PER_REQUEST_CAP_HOOK}(request, num_computed_tokens, num_new_tokens)",
                 "vLLM 0.32 and 0.33", "0.27", "pip install 'vllm>=0.32,<0.34'",
                 "profiling_chunk_config.enabled to false", f"--scheduler-cls {__name__}."):
        assert part in msg, (part, msg)


def test_hook_with_another_signature_fails_showing_it():
    with pytest.raises(RuntimeError, match=re.escape(
            f"has {PER_REQUEST_CAP_HOOK}(self, request, num_new_tokens)")):
        check_scheduler_hook(DcppOldHook)


def test_start_up_fails_before_dcpp_profiles(monkeypatch):
    built = []
    monkeypatch.setattr(dcpp_scheduler, "build_runtime", lambda cfg: built.append(cfg))
    with pytest.raises(RuntimeError, match="vLLM 0.32 and 0.33"):
        Dcpp027(object())
    assert built == []  # no runtime, no profiling, no "dynamic chunked prefill on"


def _installed_vllm_schedulers():
    """vllm/v1/core/sched/scheduler.py of every vLLM in this checkout's venvs, with its version."""
    out = []
    for path in sorted(ROOT.glob(".venv*/lib/python*/site-packages/vllm/v1/core/sched/scheduler.py")):
        site = path.parents[4]
        infos = sorted(site.glob("vllm*.dist-info/METADATA"))
        version = next((line.split(":", 1)[1].strip() for f in infos
                        for line in f.read_text(errors="replace").splitlines()
                        if line.startswith("Version:")), "unknown")
        out.append(pytest.param(path, version, id=f"{site.parents[2].name}-vllm-{version}"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip(reason="no vLLM venv"))]


@pytest.mark.parametrize("path, version", _installed_vllm_schedulers())
def test_every_supported_vllm_here_has_the_hook(path, version):
    """The range in VLLM_SUPPORTED against the sources (0.32 in .venv; 0.33 where its venv
    exists), read without importing them."""
    if not re.match(r"0\.3[23]\.", version):
        pytest.skip(f"vLLM {version} is outside {vllm_compat.VLLM_SUPPORTED}")
    tree = ast.parse(path.read_text())
    (sched,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler"]
    (fn,) = [n for n in sched.body
             if isinstance(n, ast.FunctionDef) and n.name == PER_REQUEST_CAP_HOOK]
    assert [a.arg for a in fn.args.args] == ["self", "request", "num_computed_tokens",
                                            "num_new_tokens"]
    assert not fn.decorator_list
