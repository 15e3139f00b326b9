"""The four request streams of `serve_load.py`: a single long prompt, variable lengths at
concurrency 4, multi-turn conversations over a shared prefix, long prefills among chat at 16."""

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


QUICK = Scale(long_len=4096, var_lo=512, var_hi=4096, var_requests=4, prefix_len=2048,
              prefix_turns=2, turn_hi=512, turn_out=(8, 16), mixed_long=2, mixed_lo=1024,
              mixed_hi=4096, mixed_chat=6, chat_hi=512, chat_out=(16, 32), long_out=4)


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
    """The metric that picks the best fixed chunk: TTFT alone, throughput under load."""
    describe: str


WORKLOADS = {
    "single-long": Workload("single-long", 1, "ttft_p50", "1 client, one long prompt"),
    "varlen-c4": Workload("varlen-c4", 4, "input_tput", "4 clients, log-uniform lengths"),
    "prefix-c4": Workload("prefix-c4", 4, "input_tput",
                          "4 clients, multi-turn over a shared prefix"),
    "mixed-c16": Workload("mixed-c16", 16, "input_tput", "16 clients, long prefills + chat"),
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
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def max_prompt_len(scale: Scale) -> int:
    conv = scale.prefix_len + scale.prefix_turns * (scale.turn_hi + scale.turn_out[1])
    return max(scale.long_len, scale.var_hi, scale.mixed_hi, scale.chat_hi, conv)
