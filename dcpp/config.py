"""`ProfilingChunkConfig`: parse and validate dcpp's block of vLLM's ``additional_config``.

The block is accepted at top level (``{"profiling_chunk_config": {...}}``) and under
``scheduler_config`` (vllm-ascend's newer nesting); given at both, the nested block wins and the
top-level one is ignored with a warning, as in vllm-ascend. Keys and defaults of vllm-ascend's
feature are kept (``enabled``, ``smooth_factor``, ``min_chunk``, ``need_timing``); its
``max_fit_chunk`` is accepted and ignored (`FOREIGN_KEYS`); dcpp adds its own keys below. Every
bad input raises ``ValueError`` naming the key, the value and the fix.

No vLLM or torch import here: this module is engine-agnostic.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BLOCK_KEY = "profiling_chunk_config"
"""Name of dcpp's block inside ``additional_config``."""

PLAN_MODES = ("pipeline", "equal_time", "static")
"""Accepted values of ``plan_mode``."""

NESTING_KEY = "scheduler_config"
"""vllm-ascend's nesting: ``additional_config["scheduler_config"]["profiling_chunk_config"]``."""

FOREIGN_KEYS: dict[str, str] = {
    "max_fit_chunk": (
        "vllm-ascend ends its online calibration after that many chunk timings; dcpp never "
        "ends it: it keeps the last calibration_window step timings, refits on them plus the "
        "start-up profile every 32 steps (at once on drift), and times every step until 64 "
        "were seen and while the error exceeds drift_threshold, else 1 step in 8. Tune "
        "calibration_window instead, or set need_timing=false to plan from the start-up "
        "profile alone"
    ),
}
"""vllm-ascend keys that dcpp accepts (type- and range-checked as vllm-ascend does) and ignores,
each with what dcpp does instead (logged once per parse)."""

CACHE_ENV = "DCPP_CACHE_DIR"
"""Environment variable that overrides the profile cache root (parsed by `dcpp.envs.cache_dir`)."""


@dataclass(frozen=True)
class ProfilingChunkConfig:
    """dcpp's configuration (one frozen value; build it with `from_additional_config`)."""

    enabled: bool = False
    """Turn dynamic chunking on. Off: vLLM's static chunking is untouched."""

    smooth_factor: float = 1.0
    """sigma in [0, 1]: chunk = base + sigma * (predicted - base); 0 means fixed (static) chunks,
    1 means the plan's chunk unchanged (vllm-ascend's key)."""

    min_chunk: int = 4096
    """Floor on every chunk but a request's last, in tokens (vllm-ascend's key). Clamped to
    ``max_num_batched_tokens`` by `check_engine`."""

    need_timing: bool = True
    """Measure step timings for online calibration (vllm-ascend's key). Forced to False when
    ``enabled`` is False."""

    plan_mode: str = "pipeline"
    """"pipeline": dcpp's pipeline-aware plan (picks the chunk count, then equalises chunk
    times; never worse than "equal_time" under the model). "equal_time": vllm-ascend's rule
    (every chunk takes the time of a ``max_num_batched_tokens`` chunk at history 0).
    "static": fixed ``max_num_batched_tokens`` chunks (for A/B comparisons)."""

    profile_cache_dir: str | None = None
    """Directory of cached start-up profiles. None: ``$DCPP_CACHE_DIR`` if set, else
    ``~/.cache/dcpp/profiles``."""

    num_profile_samples: int = 16
    """Timed forward passes of the start-up profile (vllm-ascend uses 64 at history 0 only)."""

    calibration_window: int = 256
    """Most recent step timings kept for the online refit (bounded memory)."""

    drift_threshold: float = 0.10
    """Relative prediction error (median of the last 8 measured steps) above which calibration
    declares drift: the model is refitted at once and workers time every step until it fits."""

    metrics_port: int = 0
    """Serve dcpp's Prometheus metrics on this TCP port from the engine-core process (each
    data-parallel engine adds its rank); 0: no endpoint (everything still goes to the log).
    vLLM's own /metrics cannot carry them: its stat-logger plugins run in the front-end
    process and only see vLLM's own scheduler stats."""

    live_calibration: bool = False
    """Skip start-up profiling: serve vLLM's static chunks, time every step on every stage,
    and switch to dynamic chunking once those timings cover enough (chunk, history) points to
    fit the latency model (`dcpp.online.calibration.live_fit`). Also what dcpp does by itself
    where the model runner cannot time a prefill after a history. Needs ``need_timing``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.enabled and self.live_calibration and not self.need_timing:
            raise ValueError(
                f"{BLOCK_KEY}.live_calibration=True needs step timings, but need_timing=False; "
                "fix: set need_timing to true (the default), or live_calibration to false "
                "(start-up profiling)"
            )
        if not self.enabled and self.need_timing:
            # Timing only feeds calibration, which is off with dcpp; not a user error.
            object.__setattr__(self, "need_timing", False)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def valid_keys(cls) -> tuple[str, ...]:
        """dcpp's own keys (the fields)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def accepted_keys(cls) -> tuple[str, ...]:
        """Every key a block may carry: dcpp's own, then vllm-ascend's that dcpp ignores."""
        return cls.valid_keys() + tuple(FOREIGN_KEYS)

    @classmethod
    def from_dict(cls, block: dict[str, Any] | None) -> "ProfilingChunkConfig":
        """Build from the ``profiling_chunk_config`` block itself (None or {} -> defaults)."""
        if block is None:
            return cls()
        if not isinstance(block, dict):
            raise ValueError(
                f"{BLOCK_KEY} must be a dict of keys {list(cls.accepted_keys())}, got "
                f"{type(block).__name__} {block!r}; fix: pass e.g. "
                f'{{"{BLOCK_KEY}": {{"enabled": true}}}}'
            )
        valid = cls.valid_keys()
        accepted = cls.accepted_keys()
        for key in block:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"unknown key {key!r} in {BLOCK_KEY}; {hint}valid keys: {', '.join(accepted)}"
                )
        for key in FOREIGN_KEYS:
            if key in block:
                _check_field(key, block[key])
                logger.warning("%s.%s=%r is vllm-ascend's key and has no effect in dcpp: %s.",
                               BLOCK_KEY, key, block[key], FOREIGN_KEYS[key])
        if block.get("enabled") is False and block.get("need_timing") is True:
            logger.warning(
                "%s.need_timing=True has no effect while enabled=False; forcing need_timing=False",
                BLOCK_KEY,
            )
        return cls(**{k: v for k, v in block.items() if k in valid})

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "ProfilingChunkConfig":
        """Parse the block `find_block` picks from vLLM's ``additional_config`` (nested under
        ``scheduler_config`` wins over top level); absent -> defaults (disabled)."""
        if additional_config is None:
            return cls()
        if not isinstance(additional_config, dict):
            raise ValueError(
                f"additional_config must be a dict, got {type(additional_config).__name__}; "
                f'fix: --additional-config \'{{"{BLOCK_KEY}": {{"enabled": true}}}}\''
            )
        return cls.from_dict(find_block(additional_config))

    # ----------------------------------------------------------------------------------------
    def check_engine(
        self,
        *,
        pipeline_parallel_size: int,
        enable_chunked_prefill: bool,
        max_num_batched_tokens: int,
    ) -> "ProfilingChunkConfig":
        """Check the engine can run dcpp; return a copy with ``min_chunk`` clamped to the
        step budget. A disabled config is returned unchanged (no requirement)."""
        if not self.enabled:
            return self
        if isinstance(pipeline_parallel_size, bool) or not isinstance(pipeline_parallel_size, int):
            raise ValueError(f"pipeline_parallel_size must be an int, got {pipeline_parallel_size!r}")
        if pipeline_parallel_size <= 1:
            raise ValueError(
                f"{BLOCK_KEY}.enabled=True needs pipeline parallelism, got "
                f"pipeline_parallel_size={pipeline_parallel_size}; fix: run with "
                f"--pipeline-parallel-size 2 (or more), or set enabled=False"
            )
        if not enable_chunked_prefill:
            raise ValueError(
                f"{BLOCK_KEY}.enabled=True needs chunked prefill, got "
                f"enable_chunked_prefill={enable_chunked_prefill!r}; fix: pass "
                f"--enable-chunked-prefill, or set enabled=False"
            )
        if (
            isinstance(max_num_batched_tokens, bool)
            or not isinstance(max_num_batched_tokens, int)
            or max_num_batched_tokens < 1
        ):
            raise ValueError(
                f"max_num_batched_tokens must be a positive int, got {max_num_batched_tokens!r}"
            )
        if self.min_chunk > max_num_batched_tokens:
            logger.warning(
                "%s.min_chunk=%d exceeds max_num_batched_tokens=%d; clamping min_chunk to %d. "
                "With min_chunk equal to the step budget every chunk is full size, so dynamic "
                "chunking has no room: set min_chunk to about max_num_batched_tokens/8 (e.g. %d).",
                BLOCK_KEY, self.min_chunk, max_num_batched_tokens, max_num_batched_tokens,
                max(64, max_num_batched_tokens // 8),
            )
            return dataclasses.replace(self, min_chunk=max_num_batched_tokens)
        return self

    def resolved_cache_dir(self) -> Path:
        """Profile cache directory: the key, else ``$DCPP_CACHE_DIR``, else the user cache."""
        from dcpp import envs

        if self.profile_cache_dir is not None:
            return Path(self.profile_cache_dir).expanduser()
        return envs.cache_dir()  # ValueError naming DCPP_CACHE_DIR when it cannot be one


def find_block(additional_config: dict) -> Any:
    """The ``profiling_chunk_config`` block in effect, unparsed (None: absent).

    As in vllm-ascend: a block under ``scheduler_config`` wins, even when the top level also has
    one (that one is then ignored, unchecked, with a warning naming both places); a key given but
    null counts as given (defaults)."""
    sched = additional_config.get(NESTING_KEY)
    if sched is not None and not isinstance(sched, dict):
        raise ValueError(
            f"additional_config['{NESTING_KEY}'] must be a dict, got "
            f"{type(sched).__name__} {sched!r}; fix: nest as "
            f'{{"{NESTING_KEY}": {{"{BLOCK_KEY}": {{...}}}}}}'
        )
    if sched is not None and BLOCK_KEY in sched:
        if BLOCK_KEY in additional_config:
            same = additional_config[BLOCK_KEY] == sched[BLOCK_KEY]
            logger.warning(
                "additional_config.%s (top level) is ignored%s because "
                "additional_config.%s.%s is also set: the nested block wins, and vllm-ascend "
                "deprecates the top-level one; fix: remove the top-level additional_config.%s",
                BLOCK_KEY, "" if same else ", though its values differ,", NESTING_KEY, BLOCK_KEY,
                BLOCK_KEY,
            )
        return sched[BLOCK_KEY]
    return additional_config.get(BLOCK_KEY)


# ---------------------------------------------------------------------------------------------
# Field validation: (kind, check, rule text, fix text)
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES: dict[str, tuple[str, Any, str]] = {
    "enabled": ("bool", lambda v: True, "true or false"),
    "need_timing": ("bool", lambda v: True, "true or false"),
    "smooth_factor": ("float", lambda v: 0.0 <= v <= 1.0, "a number with 0 <= x <= 1"),
    "min_chunk": ("int", lambda v: v >= 1, "an int >= 1 (tokens)"),
    "plan_mode": ("str", lambda v: v in PLAN_MODES, f"one of {', '.join(PLAN_MODES)}"),
    "profile_cache_dir": ("optstr", lambda v: v is None or len(v) > 0,
                          "a directory path or null"),
    "num_profile_samples": ("int", lambda v: 6 <= v <= 4096, "an int in [6, 4096]"),
    "calibration_window": ("int", lambda v: 8 <= v <= 1_000_000, "an int in [8, 1000000]"),
    "drift_threshold": ("float", lambda v: 0.0 < v <= 10.0, "a number with 0 < x <= 10"),
    "live_calibration": ("bool", lambda v: True, "true or false"),
    "metrics_port": ("int", lambda v: 0 <= v <= 65535,
                     "an int in [0, 65535] (0 turns the metrics endpoint off)"),
    # vllm-ascend's, ignored by dcpp (FOREIGN_KEYS); the range vllm-ascend accepts
    "max_fit_chunk": ("int", lambda v: v >= 6,
                      "an int >= 6 (vllm-ascend's range; dcpp ignores the key), or remove it"),
}


def _check_field(name: str, value: Any) -> None:
    kind, ok, rule = _RULES[name]
    type_ok = {
        "bool": isinstance(value, bool),
        "int": _is_int(value),
        "float": _is_real(value),
        "str": isinstance(value, str),
        "optstr": value is None or isinstance(value, str),
    }[kind]
    if not type_ok:
        extra = ""
        if isinstance(value, str) and kind in ("bool", "int", "float"):
            extra = " (a string; write the JSON value without quotes)"
        raise ValueError(
            f"{BLOCK_KEY}.{name}={value!r} has the wrong type {type(value).__name__}{extra}; "
            f"fix: set {name} to {rule}"
        )
    if not ok(value):
        raise ValueError(f"{BLOCK_KEY}.{name}={value!r} is out of range; fix: set {name} to {rule}")
