"""`dcpp profile`: write a start-up profile offline, for the reference model or a vLLM engine.

The reference path times real prefill passes of the reference Llama (pipeline stages, slowest
stage wins) with ``dcpp.reference.timing``; the vLLM path starts an engine with dcpp enabled and a
private profile cache directory, so the plugin's own start-up profiling (every PP stage, real
forward passes) writes the profile, and copies it out. Either result feeds `dcpp plan --profile`.

What the user can fix is raised as `dcpp.errors.UserError` (or ValueError for a bad argument or
input file), which the command line reports in one line: vLLM missing, an engine that does not
start, a fit that is rejected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dcpp.chunker.latency_model import FitError
from dcpp.chunker.profiler import Profile, cache_key, profile
from dcpp.errors import UserError


def profile_reference(*, checkpoint: str | None, num_stages: int, max_num_batched_tokens: int,
                      max_model_len: int, num_samples: int, repeats: int) -> Profile:
    """Profile the reference model (a checkpoint folder, or the demo's tiny config)."""
    from dcpp.reference.checkpoint import load_checkpoint
    from dcpp.reference.model import init_params
    from dcpp.reference.timing import make_timed_forward

    if checkpoint:
        config, params = load_checkpoint(checkpoint)
    else:
        from dcpp.demo_reference import DEMO_CONFIG

        config, params = DEMO_CONFIG, init_params(DEMO_CONFIG, seed=0)
    timed = make_timed_forward(params, config, num_stages=num_stages,
                               max_model_len=max_model_len)
    key = cache_key(model=checkpoint or "dcpp-reference-demo", dtype="float32",
                    pipeline_parallel_size=num_stages, tensor_parallel_size=1,
                    device="cpu-reference", max_num_batched_tokens=max_num_batched_tokens)
    try:
        return profile(timed, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_model_len, num_samples=num_samples, repeats=repeats,
                       cache_key=key, scope="stage")
    except FitError as e:
        raise UserError(f"the timed passes did not fit a latency model ({e}); fix: rerun on "
                        "an idle machine, or raise --repeats or --num-samples") from e


def _require_vllm() -> None:
    """vLLM importable, else a UserError naming the fix."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # the import of vLLM itself: nothing of dcpp runs in it
        if e.name == "vllm":
            raise UserError("--vllm needs vLLM, which is not installed; fix: pip install "
                            "'dcpp[vllm]' (vLLM's CPU build) or a vLLM 0.32 or 0.33 for your "
                            "accelerator, or profile the reference model with --reference") from e
        raise UserError(f"vLLM is installed but does not import ({type(e).__name__}: {e}); "
                        "fix: reinstall vLLM (0.32 or 0.33) and its torch") from e


def _check_model_arg(model: str) -> None:
    """A local model folder that is not there (vLLM would look it up on the Hugging Face hub,
    with a confusing error) or has a config.json that is not JSON: a bad argument."""
    local = os.path.expanduser(model)
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(local):
        raise UserError(f"--vllm {model}: no such model folder", exit_code=2)
    cfg = os.path.join(local, "config.json")
    if os.path.isdir(local) and os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--vllm {model}: {cfg} is not valid JSON ({e})", exit_code=2) from e
        if not isinstance(raw, dict):
            raise UserError(f"--vllm {model}: {cfg} is not a JSON object", exit_code=2)


def profile_vllm(*, model: str, num_stages: int, max_num_batched_tokens: int,
                 max_model_len: int, num_samples: int) -> Profile:
    """Start vLLM with dcpp enabled (PP=num_stages) and return the profile it wrote."""
    from dcpp import envs

    envs.check_all()  # ValueError naming a bad DCPP_* variable, before vLLM is even imported
    _check_model_arg(model)
    _require_vllm()
    from dcpp.tooling import harness

    cache_dir = tempfile.mkdtemp(prefix="dcpp_profile_")
    llm = None
    try:
        try:
            llm = harness.start_engine(
                model, budget=max_num_batched_tokens, max_model_len=max_model_len,
                pipeline_parallel_size=num_stages, dtype="auto", prefix_caching=True,
                dcpp={"enabled": True, "profile_cache_dir": cache_dir,
                      "num_profile_samples": num_samples,
                      "min_chunk": max(64, max_num_batched_tokens // 8)})
        except (RuntimeError, ValueError, OSError) as e:
            # What vLLM raises when an engine cannot start: RuntimeError (its "Engine core
            # initialization failed", a worker's error, dcpp's check_scheduler_hook on an
            # unsupported vLLM), ValueError (a config vLLM or dcpp's plugin rejects), OSError
            # (a model that is not found or not readable).
            raise UserError(f"vLLM did not start on {model} ({type(e).__name__}: {e})") from e
        files = sorted(Path(cache_dir).glob("profile-*.json"))
        if not files:
            raise UserError(
                "vLLM started but dcpp wrote no profile (profiling failed and fell back to "
                "static chunking; see the warning above); fix: rerun on an idle machine or "
                "raise DCPP_PROFILE_REPEATS"
            )
        return Profile.load(files[0])
    finally:
        if llm is not None:
            harness.shutdown(llm)  # engine and its PP worker processes
        shutil.rmtree(cache_dir, ignore_errors=True)


def describe(prof: Profile) -> str:
    """Human summary: the fit and its quality."""
    m, info = prof.model, prof.model.fit_info
    lines = [
        f"profile: {prof.num_passes} timed passes (+{prof.num_warmup} warm-up) in "
        f"{prof.wall_s:.1f} s, scope={prof.scope}",
        f"fit ({info.get('form', '?')} form): t(C,H) = {m.alpha:.3e}*C^2 + {m.beta:.3e}*C*H + "
        f"{m.gamma:.3e}*C + {m.delta:.3e}*H + {m.c:.3e}  [s]",
    ]
    if "median_rel_error" in info:
        lines.append(f"quality: median relative error {100 * info['median_rel_error']:.2f}% on "
                     f"{info.get('points')} points, R^2 {info.get('r2', float('nan')):.4f}, "
                     f"{info.get('outliers', 0)} outliers dropped")
    return "\n".join(lines)
