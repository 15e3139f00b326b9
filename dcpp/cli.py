"""`dcpp` command line. One function per subcommand (``cmd_<name>``), registered in
`build_parser`; add ``demo``, ``profile``, ``timeline`` the same way (an ``add_<name>`` that
declares the arguments and sets ``func``)."""

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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


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


def cmd_plan(args: argparse.Namespace) -> int:
    from dcpp.chunker.planner import (PlanSpec, default_plan, equal_time_plan, lower_bound,
                                      optimal_plan, static_plan)
    from dcpp.chunker.profiler import Profile
    from dcpp.chunker.simulate import simulate
    from dcpp.config import ProfilingChunkConfig

    for name in ("seq_len", "pp", "max_num_batched_tokens", "page_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.pp < 2:
        raise ValueError(f"--pp={args.pp} must be >= 2: dcpp plans chunks for pipeline parallelism")
    cfg = ProfilingChunkConfig(enabled=True, smooth_factor=args.smooth_factor,
                               min_chunk=args.min_chunk)
    cfg = cfg.check_engine(pipeline_parallel_size=args.pp, enable_chunked_prefill=True,
                           max_num_batched_tokens=args.max_num_batched_tokens)
    if args.cost is not None:
        model, desc = _parse_cost(args.cost).scaled(1.0 / args.pp), f"--cost {args.cost} / P"
    else:
        prof = Profile.load(args.profile)
        per_stage = 1.0 / args.pp if prof.scope == "model" else 1.0
        model, desc = prof.model.scaled(per_stage), f"profile {args.profile} ({prof.scope})"
    max_len = args.max_model_len if args.max_model_len is not None else args.seq_len
    spec = PlanSpec(max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                    num_stages=args.pp, min_chunk=cfg.min_chunk, page_size=args.page_size,
                    smooth_factor=cfg.smooth_factor)
    n = args.seq_len
    plans = {
        "static": static_plan(n, spec),
        "equal_time": equal_time_plan(model, n, spec),
        "optimal": optimal_plan(model, n, spec),
        "default": default_plan(model, n, spec),
    }
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
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dcpp", description="dynamic chunked pipeline-parallel prefill")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="dcpp: warning: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"dcpp {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
