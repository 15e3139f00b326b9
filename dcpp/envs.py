"""dcpp's environment variables, read and checked in one place (no other dcpp module reads a
``DCPP_*`` variable from ``os.environ``): one function per variable, each returning the parsed
value (the default when the variable is unset or blank) or raising a ValueError that names the
variable, the value and the fix. `check_all` parses them all; the vLLM plugin calls it in the
process that builds the engine's config (before any weights load), so a bad value fails there in
one line instead of later as an EngineCore traceback.

- ``DCPP_CACHE_DIR``: profile cache root (`cache_dir`).
- ``DCPP_PROFILE_TIMEOUT_S``: start-up profiling budget (`profile_timeout_s`; its default reads
  vLLM's ``VLLM_ENGINE_READY_TIMEOUT_S``, checked here too).
- ``DCPP_PROFILE_REPEATS``: timed runs per profiling pass (`profile_repeats`).
- ``DCPP_BUBBLE_SAMPLE_EVERY``: measure the bubbles of 1 prefill in N (`bubble_sample_every`).
- ``DCPP_METRICS_HOST``: address of dcpp's metrics endpoint (`metrics_host`).
- ``DCPP_NIXL_PROGRESS_THREAD``: 0 starts vLLM's NIXL agents without NIXL's progress thread
  (`nixl_progress_thread`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

CACHE_DIR_DEFAULT = "~/.cache/dcpp/profiles"
METRICS_HOST_DEFAULT = "127.0.0.1"
BUBBLE_SAMPLE_EVERY_DEFAULT = 0
"""0: no step timing beyond what calibration asks for (the "no per-step sync once calibrated"
rule of docs/architecture.md)."""


def _bad(name: str, raw: str, rule: str) -> ValueError:
    return ValueError(f"{name}={raw!r} must be {rule}; fix: set {name} to such a value or "
                      f"unset it for the default")


def _raw(name: str) -> str | None:
    """The variable's text, None when unset or blank (the default applies)."""
    raw = os.environ.get(name, "")
    return None if raw.strip() == "" else raw


def _env_number(name: str, default: Any, parse: Callable[[str], Any],
                ok: Callable[[Any], bool], rule: str) -> Any:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise _bad(name, raw, rule) from None
    if not ok(value):
        raise _bad(name, raw, rule)
    return value


def env_float(name: str, default: float, *, low: float, high: float = math.inf) -> float:
    """`name` as a number in (low, high] (`default` when unset or empty)."""
    return _env_number(name, default, float, lambda v: low < v <= high,
                       f"a number in ({low:g}, {high:g}]")


def env_int(name: str, default: int, *, low: int, high: int) -> int:
    """`name` as an integer in [low, high] (`default` when unset or empty)."""
    return _env_number(name, default, int, lambda v: low <= v <= high,
                       f"an integer in [{low}, {high}]")


def profile_timeout_s() -> float:
    """Wall-clock budget for start-up profiling: DCPP_PROFILE_TIMEOUT_S, else a third of vLLM's
    engine start-up timeout (VLLM_ENGINE_READY_TIMEOUT_S, 600 s by default), at least 30 s."""
    ready = env_float("VLLM_ENGINE_READY_TIMEOUT_S", 600.0, low=0.0)
    return env_float("DCPP_PROFILE_TIMEOUT_S", max(30.0, ready / 3.0), low=0.0)


def profile_repeats() -> int:
    """Timed runs per start-up profiling pass, the fastest kept (DCPP_PROFILE_REPEATS)."""
    return env_int("DCPP_PROFILE_REPEATS", 2, low=1, high=64)


def bubble_sample_every() -> int:
    """DCPP_BUBBLE_SAMPLE_EVERY: time every step around 1 prefill in this many, so that its
    bubbles are measured (1: every prefill; 0, the default: only prefills calibration times
    anyway)."""
    return env_int("DCPP_BUBBLE_SAMPLE_EVERY", BUBBLE_SAMPLE_EVERY_DEFAULT, low=0, high=1 << 30)


def metrics_host() -> str:
    """DCPP_METRICS_HOST: the address dcpp's metrics endpoint binds (default 127.0.0.1; 0.0.0.0
    for every interface). A host name or IP address: no spaces."""
    name = "DCPP_METRICS_HOST"
    raw = _raw(name)
    if raw is None:
        return METRICS_HOST_DEFAULT
    if any(ch.isspace() for ch in raw):
        raise _bad(name, raw, "a host name or IP address without spaces (e.g. 127.0.0.1)")
    return raw


def cache_dir() -> Path:
    """DCPP_CACHE_DIR: root of the start-up profile cache (default ~/.cache/dcpp/profiles).
    It must be a directory or a path where one can be created: neither it nor any folder above
    it may be a file. (Not required to be writable: a read-only cache still serves its
    profiles; a profile that cannot be saved is a warning.)"""
    name = "DCPP_CACHE_DIR"
    raw = _raw(name)
    if raw is None:
        return Path(CACHE_DIR_DEFAULT).expanduser()
    path = Path(raw).expanduser()
    probe = Path(os.path.abspath(path))
    while not os.path.exists(probe) and probe.parent != probe:
        probe = probe.parent  # the nearest folder that exists: the cache is created below it
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "it is a file" if probe == Path(os.path.abspath(path)) else f"{probe} is a file"
        raise _bad(name, raw, f"a directory or a path where one can be created ({where})")
    return path


def nixl_progress_thread() -> bool:
    """DCPP_NIXL_PROGRESS_THREAD: 1 (the default) leaves vLLM's NIXL agents as vLLM makes them,
    each with NIXL's progress thread, which polls its transport without pause (about half a core
    per agent, measured on a 2-core host); 0 makes them without it, so that the transport moves
    only when vLLM's connector asks for its transfers and notifications (for hosts where the
    model runs on the same few cores, e.g. the CPU build)."""
    name = "DCPP_NIXL_PROGRESS_THREAD"
    raw = _raw(name)
    if raw is None:
        return True
    if raw.strip() not in ("0", "1"):
        raise _bad(name, raw, "0 (no NIXL progress thread) or 1 (NIXL's default)")
    return raw.strip() == "1"


VARIABLES: dict[str, Callable[[], Any]] = {
    "DCPP_CACHE_DIR": cache_dir,
    "DCPP_PROFILE_TIMEOUT_S": profile_timeout_s,
    "DCPP_PROFILE_REPEATS": profile_repeats,
    "DCPP_BUBBLE_SAMPLE_EVERY": bubble_sample_every,
    "DCPP_METRICS_HOST": metrics_host,
    "DCPP_NIXL_PROGRESS_THREAD": nixl_progress_thread,
}
"""Every dcpp environment variable and the function that parses and checks it."""


def check_all() -> dict[str, Any]:
    """Parse every variable of `VARIABLES`: {name: value}, or one ValueError (one line) naming
    each bad variable, its value and the fix."""
    values, errors = {}, []
    for name, parse in VARIABLES.items():
        try:
            values[name] = parse()
        except ValueError as exc:  # the parsers' own "bad value" errors (see `_bad`)
            errors.append(str(exc))
    if errors:
        raise ValueError("dcpp: bad environment variable: " + "; ".join(errors))
    return values
