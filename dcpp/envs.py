"""dcpp's environment variables, read and checked in one place: a bad value fails with a
message naming the variable, the value and the range that works."""

from __future__ import annotations

import math
import os
from typing import Any, Callable


def _bad(name: str, raw: str, rule: str) -> ValueError:
    return ValueError(f"{name}={raw!r} must be {rule}; fix: set {name} to such a value or "
                      f"unset it for the default")


def _env_number(name: str, default: Any, parse: Callable[[str], Any],
                ok: Callable[[Any], bool], rule: str) -> Any:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
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
