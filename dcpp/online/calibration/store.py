"""What online calibration learnt while serving, kept on disk beside the start-up profile.

The profile file holds what start-up measured and never changes. This file holds what the
running engine learnt since: recent per-step compute timings (the online refit's window) and the
per-step cost the pipeline adds (whole-prefill gaps and steady-step overheads). A restart with
the same cache key loads both, so its first requests are planned like the engine it replaces
instead of from the bare profile (whose shape a short profile on a noisy machine can get wrong,
and whose fixed cost per step leaves out the engine's turnaround).

File: ``<profile>.calibration.json`` ::

    {"format": 1, "cache_key": {...}, "profile_digest": "<16 hex>",
     "step_samples": [[[[chunk, history], ...], seconds], ...],
     "request_gaps": [seconds, ...], "overheads": [seconds, ...]}

It counts only with the profile it was learnt on (``profile_digest`` of that profile's points),
so re-profiling starts calibration afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

FORMAT = 1

SAVE_IDLE_S = 5.0
"""The state is written when the engine goes idle with something new, at most this often."""

SAVE_EVERY_S = 60.0
"""A busy engine writes it after a refit at most this often (and at shutdown, where vLLM lets
the engine core shut down: its API server kills it unless --shutdown-timeout is set)."""


@dataclasses.dataclass
class CalibrationState:
    step_samples: list
    """[(batch of (chunk, history), slowest-stage compute s), ...], oldest first."""
    request_gaps: list[float]
    """Per-step cost (s) learnt from whole prefills of planned requests that ran alone."""
    overheads: list[float]
    """Step interval minus slowest-stage compute (s) of steady steps."""

    def __bool__(self) -> bool:
        return bool(self.step_samples or self.request_gaps or self.overheads)


def path_for(profile_path: str) -> str:
    """The calibration file that belongs to ``profile_path``."""
    p = Path(profile_path)
    return str(p.with_name(p.stem + ".calibration.json"))


def profile_digest(samples: list) -> str:
    """16 hex digits identifying a profile by its points [([(chunk, history)], seconds), ...]."""
    text = json.dumps([[[list(map(int, ch)) for ch in b], float(t)] for b, t in samples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(path: str, state: CalibrationState, *, cache_key: dict, digest: str) -> None:
    """Write ``state`` atomically (a reader never sees half a file); raises OSError."""
    doc = {
        "format": FORMAT, "cache_key": cache_key, "profile_digest": digest,
        "step_samples": [[[[int(c), int(h)] for c, h in b], float(t)]
                         for b, t in state.step_samples],
        "request_gaps": [float(g) for g in state.request_gaps],
        "overheads": [float(o) for o in state.overheads],
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(doc))  # one C-encoded string: ~6x faster than json.dump's chunks
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str, *, cache_key: dict, digest: str) -> CalibrationState | None:
    """The state saved for this cache key and profile; None when there is no file. Raises
    ValueError (saying what is wrong) for a file that is corrupt or belongs elsewhere."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                         f"expected {FORMAT}")
    if doc.get("cache_key") != cache_key:
        raise ValueError("saved for another cache key")
    if doc.get("profile_digest") != digest:
        raise ValueError("learnt on another profile of this engine")
    return CalibrationState(
        step_samples=[_sample(s) for s in _list(doc, "step_samples")],
        request_gaps=[_seconds(g, "request_gaps", signed=True) for g in _list(doc, "request_gaps")],
        overheads=[_seconds(o, "overheads", signed=True) for o in _list(doc, "overheads")],
    )


def _list(doc: dict, key: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key} is {type(value).__name__}, expected a list")
    return value


def _seconds(v: Any, what: str, signed: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (not signed and v <= 0):
        raise ValueError(f"{what}: {v!r} is not a {'finite' if signed else 'positive'} time")
    return float(v)


def _sample(s: Any) -> tuple[list[tuple[int, int]], float]:
    try:
        batch, secs = s
        pairs = [(int(c), int(h)) for c, h in batch]
    except (TypeError, ValueError):
        raise ValueError(f"step_samples: {s!r} is not [[[chunk, history], ...], seconds]") from None
    if not pairs or any(c <= 0 or h < 0 for c, h in pairs):
        raise ValueError(f"step_samples: batch {batch!r} needs chunks > 0 and histories >= 0")
    return pairs, _seconds(secs, "step_samples")
