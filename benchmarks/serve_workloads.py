"""The request streams of `serve_load.py`: a single long prompt, variable lengths at
concurrency 4, multi-turn conversations over a shared prefix, long prefills among chat at 16,
short requests arriving behind a long prefill (head-of-line), and vLLM's own client
(`vllm bench serve`, random dataset)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scale:
    """Sizes of the four workloads (default set, or ``--quick``)."""

    long_len: int = 16384
    long_requests: int = 1
    var_lo: int = 1024
    var_hi: int = 16384
    var_requests: int = 8
    prefix_len: int = 8192
    prefix_convs: int = 4
    prefix_turns: int = 4
    turn_lo: int = 128
    turn_hi: int = 1024
    turn_out: tuple[int, int] = (16, 32)
    mixed_long: int = 4
    mixed_lo: int = 4096
    mixed_hi: int = 16384
    mixed_chat: int = 12
    chat_lo: int = 128
    chat_hi: int = 1024
    chat_out: tuple[int, int] = (64, 128)
    long_out: int = 8
    hol_long: int = 16384
    hol_short: int = 8
    hol_short_lo: int = 128
    hol_short_hi: int = 512
    hol_short_out: tuple[int, int] = (16, 32)
    hol_window: tuple[float, float] = (0.05, 0.8)
    """Short requests arrive evenly over this part of the long prompt's TTFT alone."""
    rand_input_len: int = 6000
    rand_range: float = 0.9
    rand_output: int = 8
    rand_prompts: int = 8


QUICK = Scale(long_len=4096, var_lo=512, var_hi=4096, var_requests=4, prefix_len=2048,
              prefix_turns=2, turn_hi=512, turn_out=(8, 16), mixed_long=2, mixed_lo=1024,
              mixed_hi=4096, mixed_chat=6, chat_hi=512, chat_out=(16, 32), long_out=4,
              hol_long=4096, hol_short=4, hol_short_out=(8, 16), rand_input_len=2000,
              rand_output=4, rand_prompts=4)


@dataclass
class Turn:
    user: list[int]
    """New tokens of this turn (appended to the conversation so far)."""
    max_tokens: int


@dataclass
class Session:
    """What one client sends in a row: one request, or the turns of a conversation (each
    turn's prompt = prefix + earlier turns and their answers + this turn's tokens)."""

    kind: str
    turns: list[Turn]
    prefix: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    primary: str
    """The metric that picks the best fixed chunk: TTFT alone, throughput under load, the
    short requests' TTFT p99 behind a long prefill."""
    describe: str
    kind: str = "sessions"
    """"sessions" (closed loop, `concurrency` clients), "hol" (timed arrivals and idle
    references, `serve_rounds.run_hol`) or "vllm-client" (`vllm bench serve`)."""
    dcpp_modes: tuple[str, ...] | None = None
    """The dcpp server's modes this workload runs (None: all of them)."""
    threshold_servers: bool = True
    """Whether the `--long-prefill-token-threshold` servers run it too."""


WORKLOADS = {
    "single-long": Workload("single-long", 1, "ttft_p50", "1 client, one long prompt"),
    "varlen-c4": Workload("varlen-c4", 4, "input_tput", "4 clients, log-uniform lengths"),
    "prefix-c4": Workload("prefix-c4", 4, "input_tput",
                          "4 clients, multi-turn over a shared prefix"),
    "mixed-c16": Workload("mixed-c16", 16, "input_tput", "16 clients, long prefills + chat"),
    "hol": Workload("hol", 0, "short_ttft_p99",
                    "short requests arriving while one long prompt prefills", kind="hol"),
    "vllm-random": Workload("vllm-random", 4, "input_tput",
                            "vLLM's own client: vllm bench serve --dataset-name random",
                            kind="vllm-client", dcpp_modes=("off", "pipeline"),
                            threshold_servers=False),
}


def build_sessions(name: str, scale: Scale, seed: int) -> list[Session]:
    """The round's requests for workload ``name``; ``seed`` fixes lengths and tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def tokens(n: int) -> list[int]:
        return rng.integers(1, 500, size=int(n)).tolist()

    def loguniform(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    def between(lo_hi: tuple[int, int]) -> int:
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    s = scale
    if name == "single-long":
        return [Session("long", [Turn(tokens(s.long_len), s.long_out)])
                for _ in range(s.long_requests)]
    if name == "varlen-c4":
        return [Session("long", [Turn(tokens(loguniform(s.var_lo, s.var_hi)), s.long_out)])
                for _ in range(s.var_requests)]
    if name == "prefix-c4":
        prefix = tokens(s.prefix_len)
        return [Session("conversation", [Turn(tokens(loguniform(s.turn_lo, s.turn_hi)),
                                              between(s.turn_out))
                                         for _ in range(s.prefix_turns)], prefix=prefix)
                for _ in range(s.prefix_convs)]
    if name == "mixed-c16":
        out = [Session("long", [Turn(tokens(loguniform(s.mixed_lo, s.mixed_hi)), s.long_out)])
               for _ in range(s.mixed_long)]
        out += [Session("chat", [Turn(tokens(loguniform(s.chat_lo, s.chat_hi)),
                                      between(s.chat_out))])
                for _ in range(s.mixed_chat)]
        order = rng.permutation(len(out))
        return [out[i] for i in order]
    if name == "hol":
        # The long prompt first, then the short ones in their order of arrival.
        return [Session("long", [Turn(tokens(s.hol_long), s.long_out)])] + [
            Session("short", [Turn(tokens(loguniform(s.hol_short_lo, s.hol_short_hi)),
                                   between(s.hol_short_out))])
            for _ in range(s.hol_short)]
    if name == "vllm-random":
        return []  # vLLM's client draws its own prompts (from the round's seed)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def hol_arrivals(scale: Scale, long_alone_ttft: float) -> list[float]:
    """Seconds after the long prompt's send at which the short requests are sent: evenly
    over `Scale.hol_window` of the long prompt's TTFT alone (measured in the same round and
    mode), so that every one arrives while the long prompt prefills."""
    lo, hi = scale.hol_window
    n = scale.hol_short
    if n == 1:
        return [lo * long_alone_ttft]
    return [(lo + (hi - lo) * k / (n - 1)) * long_alone_ttft for k in range(n)]


def max_prompt_len(scale: Scale) -> int:
    conv = scale.prefix_len + scale.prefix_turns * (scale.turn_hi + scale.turn_out[1])
    rand = math.ceil(scale.rand_input_len * (1 + scale.rand_range)) + scale.rand_output
    return max(scale.long_len, scale.var_hi, scale.mixed_hi, scale.chat_hi, conv,
               scale.hol_long, scale.hol_short_hi + scale.hol_short_out[1], rand)
