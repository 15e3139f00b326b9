"""Engine-agnostic dynamic chunker (numpy/scipy only; no vLLM or torch import).

Data flow: profile (`profiler`) -> fit (`latency_model`) -> the planning model's one owner
(`planning_model`) -> plan (`planner`, with the rule in `rule`, lower bounds in `bounds` and
the DP reference in `optimal`; `predictor`) -> run -> step timings refit the model (online,
in `dcpp.online.calibration`: `calibrator`; `noise` measures their noise floor). `simulate`
scores plans.
"""

from dcpp.chunker.latency_model import FitError, HistoryLatencyModel, QuadraticModel
from dcpp.chunker.planner import (
    PlanSpec,
    default_plan,
    equal_time_plan,
    lower_bound,
    optimal_plan,
    pipeline_plan,
    plan_cost,
    static_plan,
)
from dcpp.chunker.predictor import ChunkPredictor
from dcpp.chunker.profiler import Profile, cache_key, cache_path, load_or_profile, profile
from dcpp.chunker.simulate import SimResult, simulate

__all__ = [
    "ChunkPredictor", "FitError", "HistoryLatencyModel", "PlanSpec",
    "Profile", "QuadraticModel", "SimResult", "cache_key", "cache_path", "default_plan",
    "equal_time_plan", "load_or_profile", "lower_bound", "optimal_plan", "pipeline_plan",
    "plan_cost", "profile", "simulate", "static_plan",
]
