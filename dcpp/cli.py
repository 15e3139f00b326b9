"""`dcpp` command line: ``plan``, ``profile`` and ``timeline``. Each subcommand is an
``add_<name>`` that declares its arguments and sets ``func`` to its ``cmd_<name>``, registered
in `build_parser`; a new one is added the same way. (The demo is ``python -m dcpp.demo``,
``make demo``, not a subcommand.)"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# dcpp plan
def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="compare chunk plans for one prompt under a latency model",
        description="Plans for one prompt: static, equal-time (vllm-ascend), DP-optimal and "
                    "dcpp's default, with simulated TTFT and bubble fraction.")
    add_plan_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The prompt, pipeline, limits and latency model (shared by plan and timeline)."""
    p.add_argument("--seq-len", type=int, required=True, help="prompt tokens")
    p.add_argument("--pp", type=int, required=True, help="pipeline stages")
    p.add_argument("--max-num-batched-tokens", type=int, required=True,
                   help="step budget (static chunk size, equal-time base)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cost", metavar="a,b,c",
                     help="whole-model latency t(C,H) = a*((H+C)^2 - H^2) + b*C + c seconds; "
                          "each of the P identical stages takes t/P")
    src.add_argument("--profile", metavar="FILE", help="profile JSON written by dcpp's profiler")
    p.add_argument("--smooth-factor", type=float, default=1.0, help="sigma in [0, 1] (default 1)")
    p.add_argument("--min-chunk", type=int, default=4096, help="chunk floor (default 4096)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size (default 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: --seq-len")


def _parse_cost(text: str):
    from dcpp.chunker.latency_model import HistoryLatencyModel

    parts = text.split(",")
    try:
        a, b, c = (float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--cost {text!r} must be three numbers a,b,c (e.g. 1e-10,2e-5,0.003)")
    try:
        return HistoryLatencyModel.from_cost(a, b, c)
    except ValueError:
        raise ValueError(f"--cost {text!r}: a, b, c must be finite and >= 0") from None


def _rle(chunks: list[int]) -> str:
    out, i = [], 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j] == chunks[i]:
            j += 1
        out.append(f"{chunks[i]}x{j - i}" if j - i > 1 else str(chunks[i]))
        i = j
    return " ".join(out)


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def _plan_inputs(args: argparse.Namespace):
    """(per-stage latency model, PlanSpec, description of the model) from the shared
    plan/timeline arguments."""
    from dcpp.chunker.planner import PlanSpec
    from dcpp.chunker.profiler import Profile
    from dcpp.config import ProfilingChunkConfig

    _require_positive(args, "seq_len", "pp", "max_num_batched_tokens", "page_size")
    if args.pp < 2:
        raise ValueError(f"--pp={args.pp} must be >= 2: dcpp plans chunks for pipeline parallelism")
    cfg = ProfilingChunkConfig(enabled=True, smooth_factor=args.smooth_factor,
                               min_chunk=args.min_chunk)
    cfg = cfg.check_engine(pipeline_parallel_size=args.pp, enable_chunked_prefill=True,
                           max_num_batched_tokens=args.max_num_batched_tokens)
    if args.cost is not None:
        model, desc = _parse_cost(args.cost).scaled(1.0 / args.pp), f"--cost {args.cost} / P"
    else:
        prof = _load_profile(Profile, args.profile)
        per_stage = 1.0 / args.pp if prof.scope == "model" else 1.0
        model, desc = prof.model.scaled(per_stage), f"profile {args.profile} ({prof.scope})"
    max_len = args.max_model_len if args.max_model_len is not None else args.seq_len
    spec = PlanSpec(max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                    num_stages=args.pp, min_chunk=cfg.min_chunk, page_size=args.page_size,
                    smooth_factor=cfg.smooth_factor)
    return model, spec, desc


def _load_profile(profile_cls, path: str):
    """The profile at `path`, or one ValueError naming the file and what is wrong with it
    (an OSError, which main() reports with the file's name, when it cannot be read)."""
    try:
        return profile_cls.load(path)
    except ValueError as e:  # missing, not JSON, not a dcpp profile (`Profile.from_json`)
        raise ValueError(f"--profile {path}: not a readable dcpp profile "
                         f"({type(e).__name__}: {e}); fix: write one with `dcpp profile`") from e


def _plan_builders():
    from dcpp.chunker.planner import default_plan, equal_time_plan, optimal_plan, static_plan

    return {
        "static": lambda model, n, spec: static_plan(n, spec),
        "equal_time": equal_time_plan,
        "optimal": optimal_plan,
        "default": default_plan,
    }


def cmd_plan(args: argparse.Namespace) -> int:
    from dcpp.chunker.planner import lower_bound
    from dcpp.chunker.simulate import simulate

    model, spec, desc = _plan_inputs(args)
    n = args.seq_len
    plans = {name: build(model, n, spec) for name, build in _plan_builders().items()}
    out = {}
    for name, chunks in plans.items():
        sim = simulate(chunks, model, args.pp)
        out[name] = {"chunks": [int(c) for c in chunks], "ttft": sim.ttft,
                     "bubble_fraction": sim.bubble_fraction}
    lb = lower_bound(model, n, spec)
    if args.json:
        print(json.dumps({"plans": out, "lower_bound": lb}))
        return 0
    print(f"dcpp plan: {n} tokens, PP={args.pp}, budget {spec.max_num_batched_tokens}, "
          f"min_chunk {spec.min_chunk}, align {spec.align}, smooth {spec.smooth_factor}; "
          f"stage latency from {desc}")
    print(f"{'plan':<11}{'chunks':>7}{'TTFT s':>11}{'bubble':>8}  sizes")
    for name, r in out.items():
        print(f"{name:<11}{len(r['chunks']):>7}{r['ttft']:>11.4f}{r['bubble_fraction']:>8.1%}  "
              f"{_rle(r['chunks'])}")
    print(f"{'lower bound':<18}{lb:>11.4f}")
    return 0


# ---------------------------------------------------------------------------------------------
# dcpp profile
def add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="profile prefill latency and write the profile JSON",
        description="Time real prefill passes (reference model, or a vLLM engine's PP stages), "
                    "fit the latency model, print it and write the profile for `dcpp plan`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", action="store_true",
                     help="the reference model (--checkpoint DIR, or the demo's tiny model)")
    src.add_argument("--vllm", metavar="MODEL", help="start vLLM on MODEL and use its profile")
    p.add_argument("--checkpoint", help="Llama checkpoint folder for --reference")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (default 2)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--num-samples", type=int, default=16, help="timed passes (default 16)")
    p.add_argument("--repeats", type=int, default=1,
                   help="--reference: time each design point this many times, keep the fastest")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from dcpp.profiling import describe, profile_reference, profile_vllm

    _require_positive(args, "pp", "max_num_batched_tokens", "max_model_len", "num_samples",
                      "repeats")
    if args.checkpoint and not args.reference:
        raise ValueError("--checkpoint goes with --reference; with --vllm pass the model there")
    common = dict(num_stages=args.pp, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, num_samples=args.num_samples)
    if args.reference:
        prof = profile_reference(checkpoint=args.checkpoint, repeats=args.repeats, **common)
    else:
        prof = profile_vllm(model=args.vllm, **common)
    print(describe(prof))
    print(f"written to {prof.save(args.out)}; use it with: dcpp plan --profile {args.out} "
          f"--pp {args.pp} --max-num-batched-tokens {args.max_num_batched_tokens} --seq-len N")
    return 0


# ---------------------------------------------------------------------------------------------
# dcpp timeline
def add_timeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "timeline", help="draw the pipeline timeline of static vs dynamic plans (PNG + SVG)",
        description="Simulate the static and dcpp plans of one prompt and draw stage x time, one "
                    "bar per chunk, bubbles visible.")
    add_plan_arguments(p)
    p.add_argument("--plans", default="static,equal_time,default",
                   help="comma list of static, equal_time, optimal, default")
    p.add_argument("--out", default="dcpp_timeline", help="path without suffix (.png, .svg)")
    p.set_defaults(func=cmd_timeline)


def cmd_timeline(args: argparse.Namespace) -> int:
    from dcpp.chunker.simulate import simulate
    from dcpp.timeline import bars_from_sim, draw_timeline

    model, spec, _ = _plan_inputs(args)
    builders = _plan_builders()
    names = [n.strip() for n in args.plans.split(",") if n.strip()]
    for n in names:
        if n not in builders:
            raise ValueError(f"--plans entry {n!r} is not one of {', '.join(builders)}")
    timelines = {}
    for n in names:
        chunks = builders[n](model, args.seq_len, spec)
        timelines[f"{n} ({len(chunks)} chunks)"] = bars_from_sim(simulate(chunks, model, args.pp))
    paths = draw_timeline(timelines, args.out, unit="s",
                          title=f"simulated PP={args.pp}, {args.seq_len}-token prompt")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dcpp", description="dynamic chunked pipeline-parallel prefill")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_plan(sub)
    add_profile(sub)
    add_timeline(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. What the user can fix is one line on stderr, no traceback: exit
    status 2 for a bad argument or input file (argparse's errors, ValueError, OSError), 1 for a
    run that failed (`dcpp.errors.UserError`: vLLM missing, an engine that does not start, a
    rejected fit). Any other exception is a bug in dcpp and keeps its traceback."""
    from dcpp.errors import UserError

    logging.basicConfig(level=logging.WARNING, format="dcpp: warning: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"dcpp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        print(f"dcpp {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable --profile, an unwritable --out
        where = e.filename if e.filename is not None else "?"
        print(f"dcpp {args.command}: error: {where}: {_one_line(e.strerror or e)}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
