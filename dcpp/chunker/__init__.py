"""Engine-agnostic dynamic chunker (numpy/scipy only; no vLLM or torch import).

Data flow: profile (`profiler`) -> fit (`latency_model`) -> plan (`planner`, `predictor`)
-> run -> step timings refit the model (`dcpp.online.calibration.calibrator`; `calibration`
measures their noise floor). `simulate` scores plans.
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
