"""`PlanningModel`: the one owner of the latency model an engine plans with.

Everything that plans (the predictors, the chunk sizer) asks it for `model` when it needs the
model, instead of keeping a copy; `version` moves with every change, so a part that derives
something from the model (a predictor's equal-time target, its cached boundaries) knows when
to derive it again.
"""

from __future__ import annotations

from typing import Any


class PlanningModel:
    def __init__(self, model: Any | None = None) -> None:
        self._model = model
        self.version = 0
        """Bumped by every `set` that changes the model."""

    @property
    def model(self) -> Any | None:
        """The latency model in use (None: static chunking)."""
        return self._model

    def set(self, model: Any | None) -> bool:
        """Plan with `model` from now on; whether it changed (an equal model is kept)."""
        if model is self._model or (model is not None and model == self._model):
            return False
        self._model = model
        self.version += 1
        return True
