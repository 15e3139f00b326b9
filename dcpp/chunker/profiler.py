"""Start-up profiling: time a few prefill passes, fit `HistoryLatencyModel`, cache the result.

``timed_forward(num_tokens, history) -> seconds`` is any callable: a vLLM worker's dummy run,
the reference model, or a synthetic model in tests.

Sampling design (why far fewer passes than vllm-ascend's 64): vllm-ascend times 64 prompt
lengths at history 0 and fits ``f(l)`` in one variable, then *assumes* the cost of a chunk
after H cached tokens is ``f(H+C) - f(H)``. dcpp times chunks at histories > 0 directly, so the
prefix term is measured, not assumed. The points form a space-filling grid over
(log chunk size) x (history share of the room left), about sqrt(n) levels each; when the grid
has more points than the budget, a greedy D-optimal pick keeps those that best determine the
5 coefficients. Passes run in a shuffled order (slow drift does not masquerade as a trend),
after warm-up passes that are discarded; the fit trims outliers (see latency_model).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import dcpp
from dcpp.chunker.latency_model import HistoryLatencyModel, batch_features

TimedForward = Callable[[int, int], float]  # (num_tokens, history) -> seconds

FORMAT_VERSION = 1
"""Version of the profile JSON layout."""


def sampling_design(num_samples: int, *, max_num_batched_tokens: int, max_model_len: int,
                    page_size: int = 16, smallest_chunk: int | None = None) -> list[tuple[int, int]]:
    """``num_samples`` (chunk, history) points to time, chunk + history <= max_model_len.

    Chunk sizes span [smallest_chunk, budget] (default: budget/8, the range plans use; far
    smaller chunks run in another regime, e.g. score matrices that fit in cache, and would
    bend the fit where it matters)."""
    if num_samples < 6:
        raise ValueError(f"num_samples={num_samples} must be >= 6 (5 coefficients + 1)")
    b, align = max_num_batched_tokens, max(page_size, 64)
    if b < 1 or max_model_len < 1:
        raise ValueError(f"max_num_batched_tokens={b} and max_model_len={max_model_len} must be >= 1")
    c_max = min(b, max_model_len)
    if smallest_chunk is None:
        smallest_chunk = c_max // 8
    c_min = min(max(align, smallest_chunk), c_max)
    n_c = max(3, math.ceil(math.sqrt(num_samples)))
    n_h = max(2, math.ceil(num_samples / n_c))
    chunks = sorted({max(1, int(round(x / align)) * align) if x >= align else int(round(x))
                     for x in np.geomspace(c_min, c_max, n_c)})
    chunks = [min(c, c_max) for c in chunks]
    cand: list[tuple[int, int]] = []
    for c in chunks:
        room = max_model_len - c
        for f in np.linspace(0.0, 1.0, n_h):
            h = int(f * room) // align * align if room >= align else 0
            cand.append((c, h))
    cand = list(dict.fromkeys(cand))
    if len(cand) <= num_samples:
        # Fill up by repeating the grid (replicates average noise out).
        return [cand[i % len(cand)] for i in range(num_samples)]
    # Greedy D-optimal choice among the grid points (scaled features).
    x = np.array([batch_features([p]) for p in cand])  # [m, 5]
    x = x / np.abs(x).max(axis=0).clip(min=1e-30)
    chosen: list[int] = []
    info = 1e-9 * np.eye(5)
    for _ in range(num_samples):
        inv = np.linalg.inv(info)
        gain = np.einsum("ij,jk,ik->i", x, inv, x)  # leverage of each candidate
        gain[chosen] = -1.0
        i = int(np.argmax(gain))
        chosen.append(i)
        info += np.outer(x[i], x[i])
    return [cand[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """A fitted start-up profile and how it was obtained (JSON-serialisable)."""

    model: HistoryLatencyModel
    """The fitted latency model."""
    samples: tuple[tuple[int, int, float], ...]
    """(chunk, history, seconds) of every timed pass used for the fit."""
    cache_key: dict = field(default_factory=dict)
    """Identity of what was profiled (model, dtype, parallel config, device, dcpp version)."""
    num_passes: int = 0
    """Timed passes used for the fit (warm-up passes not counted)."""
    num_warmup: int = 0
    """Discarded warm-up passes."""
    scope: str = "model"
    """"model": times cover the whole forward; "stage": one pipeline stage's forward."""
    wall_s: float = 0.0
    """Seconds spent profiling (warm-up included)."""

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_VERSION, "model": self.model.to_dict(),
            "samples": [list(s) for s in self.samples], "cache_key": self.cache_key,
            "num_passes": self.num_passes, "num_warmup": self.num_warmup, "scope": self.scope,
            "wall_s": self.wall_s,
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"profile is not valid JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported profile format {d.get('format') if isinstance(d, dict) else d!r}; "
                f"expected {FORMAT_VERSION}; fix: re-run `dcpp profile`"
            )
        if d.get("scope", "model") not in ("model", "stage"):
            raise ValueError(f"profile scope={d.get('scope')!r} must be 'model' or 'stage'")
        if "model" not in d:
            raise ValueError("profile has no 'model' (the fitted latency model); "
                             "fix: re-run `dcpp profile`")
        samples = d.get("samples", [])
        if not isinstance(samples, list) or not all(
                isinstance(s, list) and len(s) == 3 and all(_is_number(x) for x in s)
                for s in samples):
            raise ValueError("profile 'samples' must be a list of [chunk, history, seconds] "
                             "numbers; fix: re-run `dcpp profile`")
        cache_key = d.get("cache_key", {})
        if not isinstance(cache_key, dict):
            raise ValueError(f"profile 'cache_key' must be an object, got {cache_key!r}")
        for name in ("num_passes", "num_warmup", "wall_s"):
            if not _is_number(d.get(name, 0)):
                raise ValueError(f"profile {name!r} must be a number, got {d[name]!r}")
        return cls(
            model=HistoryLatencyModel.from_dict(d["model"]),
            samples=tuple((int(c), int(h), float(s)) for c, h, s in samples),
            cache_key=dict(cache_key),
            num_passes=int(d.get("num_passes", 0)), num_warmup=int(d.get("num_warmup", 0)),
            scope=d.get("scope", "model"), wall_s=float(d.get("wall_s", 0.0)),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: concurrent readers never see half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile file {str(path)!r} does not exist; fix: run `dcpp profile`")
        return cls.from_json(path.read_text())


def _is_number(x) -> bool:
    """A finite JSON number (bool excluded)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def profile(timed_forward: TimedForward, *, max_num_batched_tokens: int, max_model_len: int,
            num_samples: int = 16, page_size: int = 16, cache_key: dict | None = None,
            warmup: int = 1, scope: str = "model", seed: int = 0, repeats: int = 1,
            smallest_chunk: int | None = None, form: str = "auto") -> Profile:
    """Time ``num_samples`` passes of ``timed_forward`` and fit `HistoryLatencyModel`.

    repeats > 1 spends the passes on ``num_samples // repeats`` design points timed
    ``repeats`` times each, keeping the fastest: on a shared machine interference only ever
    adds time, so the minimum estimates the model's own latency (the outlier-trimming fit
    handles the rest). form: see `HistoryLatencyModel.fit` ("auto" picks the parameterisation
    by leave-one-out error)."""
    if not callable(timed_forward):
        raise ValueError("timed_forward must be callable (num_tokens, history) -> seconds")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if scope not in ("model", "stage"):
        raise ValueError(f"scope={scope!r} must be 'model' or 'stage'")
    if repeats < 1 or num_samples // repeats < 6:
        raise ValueError(
            f"repeats={repeats} with num_samples={num_samples} leaves "
            f"{num_samples // max(repeats, 1)} design points; need >= 6 (5 coefficients + 1)"
        )
    design = sampling_design(num_samples // repeats, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, page_size=page_size,
                             smallest_chunk=smallest_chunk)
    # Shuffled order, replicates spread out: slow drift or a noisy neighbour does not hit all
    # replicates of one point or masquerade as a trend.
    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(design)), repeats))
    t0 = time.perf_counter()
    for _ in range(warmup):
        timed_forward(design[-1][0], 0)
    best: dict[int, float] = {}
    for i in order.tolist():
        c, h = design[i]
        secs = float(timed_forward(int(c), int(h)))
        best[i] = min(best.get(i, math.inf), secs)
    samples = [(int(design[i][0]), int(design[i][1]), best[i]) for i in sorted(best)]
    model = HistoryLatencyModel.fit([([(c, h)], s) for c, h, s in samples], form=form)
    return Profile(model=model, samples=tuple(samples), cache_key=dict(cache_key or {}),
                   num_passes=len(order), num_warmup=warmup, scope=scope,
                   wall_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
def cache_key(*, model: str, dtype: str, pipeline_parallel_size: int, tensor_parallel_size: int,
              device: str, max_num_batched_tokens: int, **extra) -> dict:
    """Identity of a profile: reuse a cached one only if every field matches."""
    key = {"model": str(model), "dtype": str(dtype),
           "pipeline_parallel_size": int(pipeline_parallel_size),
           "tensor_parallel_size": int(tensor_parallel_size), "device": str(device),
           "max_num_batched_tokens": int(max_num_batched_tokens),
           "dcpp_version": dcpp.__version__}
    for k, v in extra.items():
        try:
            json.dumps(v)
        except TypeError as e:
            raise ValueError(f"cache_key extra {k}={v!r} is not JSON-serialisable") from e
        key[k] = v
    return key


def cache_path(key: dict, cache_dir: str | Path) -> Path:
    """File of the profile for ``key`` under ``cache_dir`` (a hash of the key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"profile-{digest}.json"


def load_cached(path: str | Path, key: dict | None = None, log=None) -> Profile | None:
    """The profile cached at ``path`` for ``key`` (None: whatever its key), else None: no file
    there (quietly), or a file that cannot be used, with a warning on ``log`` (default: this
    module's logger) naming the file and the cause, and the caller profiles again. A file
    cannot be used when reading it raises OSError (no permission, a directory) or ValueError
    (not UTF-8 or not JSON, json's JSONDecodeError and UnicodeDecodeError being ValueErrors;
    not a dcpp profile, which `Profile.from_json` reports as ValueError), or when it was made
    for another key. Anything else is a bug in dcpp and propagates. The one rule for every
    profile cache (`load_or_profile` here, the vLLM scheduler's start-up profile)."""
    import logging

    path = Path(path)
    if not path.exists():
        return None
    log = log or logging.getLogger(__name__)
    try:
        cached = Profile.load(path)
    except (OSError, ValueError) as exc:
        log.warning("dcpp: ignoring unreadable profile %s (%s: %s); profiling again", path,
                    type(exc).__name__, exc)
        return None
    if key is not None and cached.cache_key != key:
        log.warning("dcpp: ignoring profile %s, made for another cache key (%s, not %s); "
                    "profiling again", path, cached.cache_key, key)
        return None
    return cached


def load_or_profile(timed_forward: TimedForward, key: dict, cache_dir: str | Path,
                    **profile_kwargs) -> Profile:
    """The cached profile for ``key`` if there is a usable one (`load_cached`), else profile
    and cache it."""
    path = cache_path(key, cache_dir)
    cached = load_cached(path, key)
    if cached is not None:
        return cached
    prof = profile(timed_forward, cache_key=key, **profile_kwargs)
    prof.save(path)
    return prof
