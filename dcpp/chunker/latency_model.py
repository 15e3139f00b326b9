"""Prefill latency models and their least-squares fits (DESIGN.md §2).

* `QuadraticModel`: vllm-ascend's ``f(l) = a*l^2 + b*l + c`` profiled at history 0.
* `HistoryLatencyModel`: latency of one step that runs chunks of ``C`` new tokens after ``H``
  cached tokens, summed over the batch's requests, plus one fixed cost per step::

      t(batch) = sum_r [alpha*C_r^2 + beta*C_r*H_r + gamma*C_r + delta*H_r] + c     (seconds)

  vllm-ascend's online model ``a*C*(C+H) + b*(C+H) + c`` is the special case alpha=beta=a,
  gamma=delta=b; the ``--cost a,b,c`` model ``a*((H+C)^2 - H^2) + b*C + c`` (causal attention:
  the in-chunk part counts half) is alpha=a, beta=2a, gamma=b, delta=0. Fitting beta and delta
  freely lets the profile decide (prefix work such as MLA's or KV reads shows up in delta).

Fits minimise *relative* error (timings span orders of magnitude), use non-negative least
squares (every term is physical work), trim outliers once, and reject degenerate results with a
`FitError` that says why. Tokens are ints, times are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls

Batch = Sequence[tuple[int, int]]  # [(chunk_tokens, history_tokens), ...]
Sample = tuple[Batch, float]  # (batch, seconds)

MAX_MEDIAN_REL_ERROR = 0.15
"""A fit whose median relative residual exceeds this is rejected as poor quality."""

MIN_QUAD_SHARE = 1e-4
"""The quadratic terms must carry at least this share of the largest sample's time; below it
latency does not grow with chunk x context and the fit counts as a <= 0."""

MIN_R2 = 0.90
"""A fit explaining less than this share of the timing variance is rejected."""

FORMS = ("full", "ascend", "causal")
"""Parameterisations `HistoryLatencyModel.fit` accepts (see module docstring)."""


class FitError(ValueError):
    """A latency fit was rejected; the message gives the reason and the fix."""


# ---------------------------------------------------------------------------------------------
def _robust_nnls(a: np.ndarray, y: np.ndarray, min_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative-error non-negative fit of ``a @ theta ~ y`` that survives outliers.

    a: [n, p] features; y: [n] seconds (> 0). Returns (theta [p], kept mask [n]).
    A Cauchy-loss fit (scipy least_squares, bounds >= 0) started from NNLS locates the bulk of
    the points; points beyond max(5 robust sigmas, 5 %) from it (a stalled pass, a GC pause, a
    cold cache), at most a quarter, are dropped and the rest refitted by plain NNLS."""
    aw = a / y[:, None]  # relative error: (a @ theta) / y - 1
    norms = np.linalg.norm(aw, axis=0)
    norms[norms == 0] = 1.0
    aw = aw / norms
    ones = np.ones(len(y))
    x0, _ = nnls(aw, ones)
    robust = least_squares(lambda x: aw @ x - 1.0, x0, bounds=(0.0, np.inf), loss="cauchy",
                           f_scale=0.02).x
    rel = aw @ robust - 1.0
    scale = 1.4826 * float(np.median(np.abs(rel - np.median(rel))))
    max_drop = max(0, min(len(y) // 4, len(y) - min_keep))
    order = np.argsort(-np.abs(rel))
    drop = [i for i in order[:max_drop] if abs(rel[i]) > max(5.0 * scale, 0.05)]
    keep = np.ones(len(y), dtype=bool)
    keep[drop] = False
    sol, _ = nnls(aw[keep], ones[keep])
    return sol / norms, keep


def _quality(a: np.ndarray, y: np.ndarray, theta: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(median relative error, R^2) of the fit on the kept points."""
    pred = a[keep] @ theta
    yk = y[keep]
    med = float(np.median(np.abs(pred / yk - 1.0)))
    ss_tot = float(np.sum((yk - yk.mean()) ** 2))
    r2 = 1.0 - float(np.sum((yk - pred) ** 2)) / ss_tot if ss_tot > 0 else 0.0
    return med, r2


def _check_quality(med: float, r2: float, what: str, max_med: float = MAX_MEDIAN_REL_ERROR,
                   min_r2: float = MIN_R2) -> None:
    if med > max_med:
        raise FitError(
            f"poor {what} fit: median relative error {med:.1%} > {max_med:.0%}; "
            "fix: profile with more samples, a warm-up, or check the timings are per step"
        )
    if r2 < min_r2:
        raise FitError(
            f"poor {what} fit: R^2={r2:.3f} < {min_r2}; the timings barely depend on the chunk "
            "size (noise or a constant overhead dominates); fix: profile longer chunks"
        )


def _check_times(seconds: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(seconds) | (seconds <= 0))
    if bad.size:
        i = int(bad[0])
        raise FitError(
            f"timing #{i} is {float(seconds[i])!r}: every timing must be a finite number of seconds > 0; "
            "fix: drop failed or zero measurements"
        )


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuadraticModel:
    """vllm-ascend's profile ``f(l) = a*l^2 + b*l + c`` at history 0 (l tokens -> seconds)."""

    a: float
    """Seconds per token^2 (attention)."""
    b: float
    """Seconds per token (linear layers)."""
    c: float
    """Seconds per step (fixed overhead)."""

    @classmethod
    def fit(cls, lengths: Iterable[int], seconds: Iterable[float]) -> "QuadraticModel":
        l = np.asarray(list(lengths), dtype=float)  # [n] tokens
        y = np.asarray(list(seconds), dtype=float)  # [n] seconds
        if l.shape != y.shape:
            raise FitError(f"lengths ({l.size}) and seconds ({y.size}) differ in length")
        if np.unique(l).size < 3:
            raise FitError(
                f"too few distinct lengths: got {np.unique(l).size}, need >= 3 for a quadratic; "
                "fix: profile at least 3 different prompt lengths"
            )
        if (l <= 0).any():
            raise FitError("every length must be > 0 tokens")
        _check_times(y)
        a_mat = np.stack([l * l, l, np.ones_like(l)], axis=1)  # [n, 3]
        theta, keep = _robust_nnls(a_mat, y, min_keep=4)
        if not np.isfinite(theta).all():
            raise FitError(f"non-finite coefficients {theta.tolist()}")
        share = float(np.max(theta[0] * l * l / (a_mat @ theta)))
        if theta[0] <= 0 or share < MIN_QUAD_SHARE:
            raise FitError(
                "degenerate fit: a <= 0 (latency does not grow quadratically with length), so "
                "equal-time chunks cannot be solved; fix: profile longer prompts"
            )
        _check_quality(*_quality(a_mat, y, theta, keep), "quadratic")
        return cls(float(theta[0]), float(theta[1]), float(theta[2]))

    def predict(self, length):
        """Seconds for a prompt of ``length`` tokens at history 0 (scalar or array)."""
        return self.a * length * length + self.b * length + self.c

    def to_history_model(self) -> "HistoryLatencyModel":
        """vllm-ascend's prediction t(C, H) = f(H+C) - f(H) + c (causal form)."""
        return HistoryLatencyModel(alpha=self.a, beta=2 * self.a, gamma=self.b, delta=0.0, c=self.c)


# ---------------------------------------------------------------------------------------------
NEGLIGIBLE_COEFF = 1e-30
"""Coefficients below this are read as 0: no real term is that small (1e-30 s/token^2 adds
1e-18 s to a million-token chunk), and subnormal ones overflow the planner's closed forms."""


@dataclass(frozen=True)
class HistoryLatencyModel:
    """t(batch) = sum_r [alpha*C^2 + beta*C*H + gamma*C + delta*H] + c   (seconds)."""

    alpha: float
    """Seconds per new-token^2 (in-chunk attention)."""
    beta: float
    """Seconds per new-token x cached-token (attention to the prefix)."""
    gamma: float
    """Seconds per new token (linear layers)."""
    delta: float
    """Seconds per cached token per request (prefix work, e.g. KV reads / MLA up-projection)."""
    c: float
    """Seconds per step (fixed overhead: launch, scheduling, hand-off)."""
    fit_info: dict = field(default_factory=dict, compare=False)
    """How the model was obtained: form, points, median relative error, R^2 (informational)."""

    def __post_init__(self) -> None:
        coeffs = (self.alpha, self.beta, self.gamma, self.delta, self.c)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in coeffs):
            raise ValueError(
                f"HistoryLatencyModel coefficients must be finite and >= 0, got "
                f"alpha={self.alpha!r} beta={self.beta!r} gamma={self.gamma!r} "
                f"delta={self.delta!r} c={self.c!r}"
            )
        for name in ("alpha", "beta", "gamma", "delta", "c"):  # read negligible terms as 0
            if getattr(self, name) < NEGLIGIBLE_COEFF:
                object.__setattr__(self, name, 0.0)

    # --- constructors ---------------------------------------------------------------------
    @classmethod
    def from_cost(cls, a: float, b: float, c: float) -> "HistoryLatencyModel":
        """The CLI's ``t(C, H) = a*((H+C)^2 - H^2) + b*C + c``."""
        return cls(alpha=a, beta=2 * a, gamma=b, delta=0.0, c=c, fit_info={"form": "causal"})

    def scaled(self, factor: float) -> "HistoryLatencyModel":
        """Every coefficient times ``factor`` (e.g. 1/P for one of P identical stages)."""
        return HistoryLatencyModel(self.alpha * factor, self.beta * factor, self.gamma * factor,
                                   self.delta * factor, self.c * factor, dict(self.fit_info))

    @classmethod
    def fit(cls, samples: Sequence[Sample], *, form: str = "full",
            max_median_rel_error: float = MAX_MEDIAN_REL_ERROR,
            min_r2: float = MIN_R2) -> "HistoryLatencyModel":
        """Fit from ``[(batch, seconds), ...]``, batch = ``[(chunk, history), ...]``.

        form: "full" (5 free coefficients), "ascend", "causal", or "auto": the form with the
        smallest leave-one-out median relative error (fewer coefficients win on few or noisy
        points; the choice and every form's error land in ``fit_info``).
        max_median_rel_error, min_r2: quality gates (defaults for clean profiling passes; online
        step timings on a shared machine carry more noise and pass looser ones)."""
        if form == "auto":
            if (max_median_rel_error, min_r2) != (MAX_MEDIAN_REL_ERROR, MIN_R2):
                raise ValueError("form='auto' uses the default quality gates")
            return cls._fit_auto(samples)
        if form not in FORMS:
            raise ValueError(f"form={form!r} is not one of {FORMS + ('auto',)}")
        n_params = {"full": 5, "ascend": 3, "causal": 3}[form]
        if len(samples) < n_params + 1:
            raise FitError(
                f"too few points: got {len(samples)}, need >= {n_params + 1} for the {form!r} "
                "form; fix: collect more timed steps"
            )
        feats = np.zeros((len(samples), 5))  # [n, (C^2, C*H, C, H, 1)]
        y = np.zeros(len(samples))  # [n] seconds
        for i, (batch, secs) in enumerate(samples):
            feats[i] = batch_features(batch)
            y[i] = secs
        _check_times(y)
        basis = {
            "full": np.eye(5),
            "ascend": np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], float).T,
            "causal": np.array([[1, 2, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]], float).T,
        }[form]  # [5, p]: theta_full = basis @ theta_form
        a_mat = feats @ basis  # [n, p]
        scale = np.abs(a_mat).max(axis=0)
        scale[scale == 0] = 1.0
        if np.linalg.matrix_rank(a_mat / scale, tol=1e-9) < n_params:
            raise FitError(
                f"the samples do not determine the {form!r} model (rank-deficient design); "
                "fix: time several chunk sizes, and histories > 0"
            )
        theta_f, keep = _robust_nnls(a_mat, y, min_keep=n_params + 1)
        theta = basis @ theta_f
        if not np.isfinite(theta).all():
            raise FitError(f"non-finite coefficients {theta.tolist()}")
        quad = feats[:, 0] * theta[0] + feats[:, 1] * theta[1]
        share = float(np.max(quad / np.maximum(feats @ theta, 1e-300)))
        if theta[0] + theta[1] <= 0 or share < MIN_QUAD_SHARE:
            raise FitError(
                "degenerate fit: no quadratic term (a <= 0): latency does not grow with chunk size "
                "x context, so equal-time chunks cannot be solved; fix: profile longer chunks "
                "and histories"
            )
        med, r2 = _quality(a_mat, y, theta_f, keep)
        _check_quality(med, r2, form, max_median_rel_error, min_r2)
        info = {"form": form, "points": len(samples), "outliers": int((~keep).sum()),
                "median_rel_error": med, "r2": r2}
        return cls(*(float(v) for v in theta), fit_info=info)

    @classmethod
    def _fit_auto(cls, samples: Sequence[Sample]) -> "HistoryLatencyModel":
        loo: dict[str, float] = {}
        fits: dict[str, HistoryLatencyModel] = {}
        reasons: list[str] = []
        for f in FORMS:
            try:
                fits[f] = cls.fit(samples, form=f)
            except FitError as e:
                reasons.append(f"{f}: {e}")
                continue
            errs = []
            for i in range(len(samples)):
                rest = list(samples[:i]) + list(samples[i + 1:])
                try:
                    m = cls.fit(rest, form=f)
                except FitError:
                    errs.append(math.inf)
                    continue
                batch, secs = samples[i]
                errs.append(abs(m.predict_batch(batch) / secs - 1.0))
            loo[f] = float(np.median(errs))
        if not fits:
            raise FitError("no model form fits: " + "; ".join(reasons))
        best = min(fits, key=lambda f: (loo[f], FORMS.index(f)))
        m = fits[best]
        info = {**m.fit_info, "selected_by": "leave-one-out", "loo_median_rel_error": loo}
        return cls(m.alpha, m.beta, m.gamma, m.delta, m.c, fit_info=info)

    # --- prediction ------------------------------------------------------------------------
    def predict_time(self, chunk, history):
        """Seconds for one request's chunk after ``history`` cached tokens (scalars or arrays)."""
        return (self.alpha * chunk * chunk + self.beta * chunk * history + self.gamma * chunk
                + self.delta * history + self.c)

    def predict_batch(self, batch: Batch) -> float:
        """Seconds for one step running every ``(chunk, history)`` of ``batch`` (c once)."""
        return float(np.dot(batch_features(batch), self.coefficients))

    @property
    def coefficients(self) -> np.ndarray:
        """[alpha, beta, gamma, delta, c] matching `batch_features`."""
        return np.array([self.alpha, self.beta, self.gamma, self.delta, self.c])

    def solve_chunk(self, target: float, history: float) -> float:
        """Largest real chunk C >= 0 with ``predict_time(C, history) <= target`` (may be inf)."""
        qa = self.alpha
        qb = self.beta * history + self.gamma
        qc = self.delta * history + self.c - target
        if qc >= 0:
            return 0.0
        if qa <= 0:
            return -qc / qb if qb > 0 else math.inf
        # Stable positive root of qa*C^2 + qb*C + qc = 0 with qc < 0.
        return (-2.0 * qc) / (qb + math.sqrt(qb * qb - 4.0 * qa * qc))

    @property
    def is_telescoping(self) -> bool:
        """True when the work of a prompt does not depend on how it is chunked
        (beta == 2*alpha, delta == 0), as in the ``--cost`` model."""
        return math.isclose(self.beta, 2 * self.alpha, rel_tol=1e-9) and self.delta == 0

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "history", "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "delta": self.delta, "c": self.c, "fit_info": dict(self.fit_info)}

    @classmethod
    def from_dict(cls, d: dict) -> "HistoryLatencyModel":
        if not isinstance(d, dict) or d.get("kind", "history") != "history":
            raise ValueError(f"not a history latency model: {d!r}; expected kind='history'")
        missing = [k for k in ("alpha", "beta", "gamma", "delta", "c") if k not in d]
        if missing:
            raise ValueError(f"latency model dict lacks keys {missing}; got keys {sorted(d)}")
        bad = {k: d[k] for k in ("alpha", "beta", "gamma", "delta", "c")
               if isinstance(d[k], bool) or not isinstance(d[k], (int, float))}
        if bad:
            raise ValueError(f"latency model coefficients must be numbers, got {bad}")
        fit_info = d.get("fit_info", {})
        if not isinstance(fit_info, dict):
            raise ValueError(f"latency model fit_info must be an object, got {fit_info!r}")
        return cls(float(d["alpha"]), float(d["beta"]), float(d["gamma"]), float(d["delta"]),
                   float(d["c"]), dict(fit_info))


def batch_features(batch: Batch) -> np.ndarray:
    """[C^2, C*H, C, H, 1] summed over the batch's requests (the fixed cost counted once)."""
    if len(batch) == 0:
        raise ValueError("a batch needs at least one (chunk, history) pair")
    arr = np.asarray(batch, dtype=float)  # [r, 2]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"batch must be a list of (chunk, history) pairs, got {batch!r}")
    c, h = arr[:, 0], arr[:, 1]
    if (c <= 0).any() or (h < 0).any():
        raise ValueError(f"chunk must be > 0 and history >= 0 in every pair, got {batch!r}")
    return np.array([np.sum(c * c), np.sum(c * h), np.sum(c), np.sum(h), 1.0])


MODELS = {"history": HistoryLatencyModel, "quadratic": QuadraticModel}
"""Registry of latency model kinds (DESIGN.md §5.10)."""
