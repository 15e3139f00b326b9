"""`CalibrationSaver`: when what calibration learnt is written beside the profile, and read
back at start (the file itself: `store`).

Written after a refit on a busy engine (at most every `SAVE_EVERY_S`), when the engine goes idle
with something unsaved (at most every `SAVE_IDLE_S`) and at shutdown. A file that cannot be
written costs one warning; serving goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from dcpp.online.calibration import store as calibration_store

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


class CalibrationSaver:
    def __init__(self, cache_key: dict) -> None:
        self.cache_key = cache_key
        self.path: str | None = None
        """The calibration file (None: the profile is not on disk, nothing is saved)."""
        self._digest: str | None = None
        self._saved_at = float("-inf")
        self._unsaved = False
        self._warned = False

    def bind(self, profile_path: str | None, cal: Any,
             fresh: bool) -> calibration_store.CalibrationState | None:
        """Save beside the profile file `profile_path` from now on (None: save nothing); what
        the last engine on that profile learnt, if any. A `fresh` profile (just measured)
        removes the file instead: it was learnt on an earlier profile."""
        self.path = calibration_store.path_for(profile_path) if profile_path else None
        self._digest = calibration_store.profile_digest(cal.profile_samples)
        if self.path is None:
            return None
        if fresh:
            if os.path.exists(self.path):
                logger.info("dcpp: removing %s (learnt on an earlier profile)", self.path)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            return None
        try:
            state = calibration_store.load(self.path, cache_key=self.cache_key,
                                           digest=self._digest)
        except (OSError, ValueError) as exc:
            logger.warning("dcpp: ignoring calibration file %s (%s); calibrating afresh",
                           self.path, exc)
            return None
        return state or None

    def learnt(self, cal: Any, refitted: bool) -> None:
        """Calibration took a measurement (`refitted`: and fitted a new model)."""
        self._unsaved = True
        if refitted and time.monotonic() - self._saved_at >= calibration_store.SAVE_EVERY_S:
            self.save(cal)

    def idle(self, cal: Any) -> None:
        """The engine has nothing to run: the moment to write (vLLM's API server kills the
        engine core at shutdown unless --shutdown-timeout is set)."""
        if self._unsaved and time.monotonic() - self._saved_at >= calibration_store.SAVE_IDLE_S:
            self.save(cal)

    def close(self, cal: Any) -> None:
        if self._unsaved:
            self.save(cal)

    def save(self, cal: Any) -> None:
        if self.path is None or cal is None:
            return
        state = calibration_store.CalibrationState(
            list(cal.samples), list(cal.overhead.request_gaps), list(cal.overhead.intervals))
        if not state:
            return
        self._saved_at, self._unsaved = time.monotonic(), False
        try:
            calibration_store.save(self.path, state, cache_key=self.cache_key,
                                   digest=self._digest)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("dcpp: could not save calibration to %s (%s); a restart will "
                               "calibrate afresh", self.path, exc)


def save_profile(path: str | None, cache_key: dict, model: Any,
                 points: list[tuple[int, int, float]], steps: int) -> bool:
    """Cache a live-calibration fit as the engine's profile at `path` (its profile cache
    file), so a restart loads it (0 profiling passes) and plans at once; `points` are the
    single-request steps (chunk, history, seconds), `steps` the steps fitted on. Returns
    whether it was written (a warning if not)."""
    import dataclasses

    from dcpp.chunker.profiler import Profile

    if not path:
        return False
    model = dataclasses.replace(model, fit_info={**model.fit_info, "source": "live calibration",
                                                 "steps": int(steps)})
    prof = Profile(model=model, samples=tuple((int(c), int(h), float(s)) for c, h, s in points),
                   cache_key=cache_key, num_passes=int(steps), num_warmup=0, scope="stage")
    try:
        prof.save(path)
    except OSError as exc:
        logger.warning("dcpp: could not save the live-calibration profile to %s (%s); the next "
                       "start calibrates from live traffic again", path, exc)
        return False
    return True
