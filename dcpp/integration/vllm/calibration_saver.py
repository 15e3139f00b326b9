"""`CalibrationSaver`: when what calibration learnt is written beside the profile, and read
back at start (the file itself: `calibration_store`).

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

from dcpp.integration.vllm import calibration_store

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

    def load(self, prof: Any, cal: Any) -> calibration_store.CalibrationState | None:
        """Bind to `prof`'s calibration file; what the last engine on `prof` learnt, if any.

        A freshly measured profile removes the file (it was learnt on an earlier profile)."""
        self.path = (calibration_store.path_for(prof.path)
                     if prof.path and prof.source != "none" else None)
        self._digest = calibration_store.profile_digest(cal.profile_samples)
        if self.path is None:
            return None
        if prof.source == "profiled" and os.path.exists(self.path):
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
