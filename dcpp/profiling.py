"""`dcpp profile`: write a start-up profile offline, for the reference model or a vLLM engine.

The reference path times real prefill passes of the reference Llama (pipeline stages, slowest
stage wins) with ``dcpp.reference.timing``; the vLLM path starts an engine with dcpp enabled and a
private profile cache directory, so the plugin's own start-up profiling (every PP stage, real
forward passes) writes the profile, and copies it out. Either result feeds `dcpp plan --profile`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dcpp.chunker.profiler import Profile, cache_key, profile


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
    return profile(timed, max_num_batched_tokens=max_num_batched_tokens,
                   max_model_len=max_model_len, num_samples=num_samples, repeats=repeats,
                   cache_key=key, scope="stage")


def profile_vllm(*, model: str, num_stages: int, max_num_batched_tokens: int,
                 max_model_len: int, num_samples: int) -> Profile:
    """Start vLLM with dcpp enabled (PP=num_stages) and return the profile it wrote."""
    from dcpp.integration.vllm import harness

    cache_dir = tempfile.mkdtemp(prefix="dcpp_profile_")
    llm = None
    try:
        llm = harness.start_engine(
            model, budget=max_num_batched_tokens, max_model_len=max_model_len,
            pipeline_parallel_size=num_stages, dtype="auto", prefix_caching=True,
            dcpp={"enabled": True, "profile_cache_dir": cache_dir,
                  "num_profile_samples": num_samples,
                  "min_chunk": max(64, max_num_batched_tokens // 8)})
        files = sorted(Path(cache_dir).glob("profile-*.json"))
        if not files:
            raise ValueError(
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
