"""`ChunkPredictor`: whole chunk plans for one engine (one budget, pipeline depth and mode).

`plan(prompt_len, history)` is the plan of a prompt's tokens after `history` computed ones,
by the mode's rule (`planner.default_plan`: "pipeline" the cheapest of dcpp's pipeline-aware,
equal-time, static and, where the shape matters, coarse-DP plans; "equal_time" vllm-ascend's
rule; "static" vLLM's fixed chunks), or the static plan while no latency model is available.
`opens_with_budget` says, without planning, whether a "pipeline" plan provably starts with a
budget-sized chunk. These two are all the serving path asks: `dcpp.online.runtime.DcppRuntime`
keeps one predictor per mode on the engine's `PlanningModel`, and
`dcpp.online.chunk_sizer.ChunkSizer` keeps each request's plan (on its `RequestState`),
continues it after trims and keeps the step's budget.

`next_chunk(history, remaining)` answers one chunk at a time from the same plans: each plan's
boundaries are cached under (history, total), so a walk over a prompt costs one plan, and a
history off a cached boundary (a smaller chunk ran, a prefix-cache hit) re-plans from there;
"equal_time" answers with the rule's closed form per call. Only the chunker tests and
`benchmarks/plan_grid.py` call it.

The model is asked of the `PlanningModel` (its one owner; a predictor built from a bare model
owns one of its own), and what is derived from it (the equal-time target, the boundary cache)
is dropped when its version moves.

After a model update (online calibration) a prompt keeps its previous pipeline plan while that
plan stays within `PLAN_HYSTERESIS` of the new optimum under the new model: refits on noisy step
timings move the optimum among plans of nearly equal cost, and following every such move makes
the chunking erratic (12 chunks one request, 40 the next, on vLLM's CPU build) without making it
faster.
"""

from __future__ import annotations

from collections import OrderedDict

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planning_model import PlanningModel
from dcpp.chunker.planner import (
    PlanSpec,
    default_plan,
    equal_time_target,
    opens_with_budget,
    plan_cost,
    rule_chunk,
    static_plan,
)
from dcpp.config import ProfilingChunkConfig

MAX_CACHED_BOUNDARIES = 65536
"""Bound on cached (history, total) -> chunk entries (LRU)."""

PLAN_HYSTERESIS = 0.02
"""A new model replaces a prompt's previous pipeline plan only if that plan's predicted TTFT
exceeds the new optimum's by more than this fraction."""

MAX_REMEMBERED_PLANS = 1024
"""Bound on the (prompt length, history) -> last plan entries the hysteresis keeps (LRU)."""


class ChunkPredictor:
    """Chunk sizes for one engine (one model, one budget, one pipeline depth)."""

    def __init__(self, config: ProfilingChunkConfig, model: HistoryLatencyModel | PlanningModel | None, *,
                 max_num_batched_tokens: int, page_size: int = 16, max_model_len: int,
                 num_stages: int) -> None:
        if not isinstance(config, ProfilingChunkConfig):
            raise ValueError(f"config must be a ProfilingChunkConfig, got {type(config).__name__}")
        self.config = config
        self.spec = PlanSpec(
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            num_stages=num_stages,
            min_chunk=min(config.min_chunk, max_num_batched_tokens),
            page_size=page_size,
            smooth_factor=config.smooth_factor,
        )
        self._source = model if isinstance(model, PlanningModel) else PlanningModel()
        """The model's one owner (a predictor built from a bare model owns its own)."""
        self._version = -1
        self._target: float | None = None
        """`self._source.version` that `_target` and `_cache` were derived for."""
        self._cache: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._last_plans: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        """(prompt length, history) -> the pipeline plan last returned (kept across models)."""
        if not isinstance(model, PlanningModel):
            self.set_model(model)

    # ----------------------------------------------------------------------------------------
    @property
    def model(self) -> HistoryLatencyModel | None:
        return self._source.model

    @property
    def _model(self) -> HistoryLatencyModel | None:
        """The model, with what is derived from it brought up to date."""
        model = self._source.model
        if self._version != self._source.version:
            self._version = self._source.version
            self._cache.clear()
            self._target = equal_time_target(model, self.spec) if model is not None else None
        return model

    def set_model(self, model: HistoryLatencyModel | None) -> None:
        """Use ``model`` from now on (e.g. after an online refit); drops cached plans. With a
        shared `PlanningModel`, set it there instead (every predictor on it follows)."""
        if model is not None and not isinstance(model, HistoryLatencyModel):
            raise ValueError(f"model must be a HistoryLatencyModel or None, got {type(model).__name__}")
        self._source.set(model)

    @property
    def is_static(self) -> bool:
        """True while chunks are vLLM's fixed size (disabled, no model, static mode, sigma=0)."""
        return (not self.config.enabled or self._model is None
                or self.config.plan_mode == "static" or self.spec.smooth_factor == 0)

    # ----------------------------------------------------------------------------------------
    def next_chunk(self, history: int, remaining: int) -> int:
        """Tokens to schedule for a request with ``history`` computed and ``remaining`` to go."""
        if remaining < 0 or history < 0:
            raise ValueError(f"history={history} and remaining={remaining} must be >= 0")
        if remaining == 0:
            return 0
        room = self.spec.max_model_len - history
        if room <= 0:
            raise ValueError(
                f"history={history} leaves no room under max_model_len={self.spec.max_model_len}"
            )
        if self.is_static:
            return min(remaining, self.spec.max_num_batched_tokens, room)
        if self.config.plan_mode == "equal_time":
            return rule_chunk(self._model, history, remaining, self._target, self.spec)
        key = (history, history + remaining)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        total = min(remaining, room)
        plan = self.plan(total, history)
        h = history
        for c in plan:
            self._cache[(h, history + remaining)] = c
            h += c
        while len(self._cache) > MAX_CACHED_BOUNDARIES:
            self._cache.popitem(last=False)
        return plan[0]

    def opens_with_budget(self, prompt_len: int, history: int = 0) -> bool:
        """Whether this prompt's "pipeline" plan provably starts with a budget-sized chunk
        (`planner.opens_with_budget`); False in other modes and while static."""
        if self.is_static or self.config.plan_mode != "pipeline":
            return False
        return opens_with_budget(self._model, prompt_len, self.spec, history)

    def plan(self, prompt_len: int, history: int = 0) -> list[int]:
        """Whole chunk plan of ``prompt_len`` tokens after ``history`` cached ones."""
        if self.is_static:
            return static_plan(prompt_len, self.spec, history)
        plan = default_plan(self._model, prompt_len, self.spec, history, mode=self.config.plan_mode)
        if self.config.plan_mode != "pipeline":
            return plan
        key = (prompt_len, history)
        old = self._last_plans.get(key)
        if old is not None and old != plan:
            p = self.spec.num_stages
            if (plan_cost(self._model, old, p, history)
                    <= (1.0 + PLAN_HYSTERESIS) * plan_cost(self._model, plan, p, history)):
                plan = old
        self._last_plans[key] = plan
        self._last_plans.move_to_end(key)
        while len(self._last_plans) > MAX_REMEMBERED_PLANS:
            self._last_plans.popitem(last=False)
        return list(plan)
