"""A request's own dcpp settings, from the values the engine read out of it (in vLLM: its
sampling params' extra_args, `vllm_compat.request_options`).

``dcpp_plan``: the plan mode for this request (one of `PLAN_MODES`, or ``"off"`` for vLLM's
chunks). ``dcpp_chunk_size``: fixed chunks of that many tokens. A bad value is ignored with a
warning that names it (once per request, remembered on the request's record).
"""

from __future__ import annotations

import logging
from typing import Any

from dcpp.online.chunk_sizer import PLAN_MODES, PLAN_OFF
from dcpp.online.requests import RequestState

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


def plan_mode(state: RequestState, plan_arg: Any, default: str) -> str:
    """The plan mode of the request of `state` whose `dcpp_plan` is `plan_arg` (None: not
    given; then `default`)."""
    if plan_arg is None:
        return default
    override = str(plan_arg)
    if override != PLAN_OFF and override not in PLAN_MODES:
        _warn_once(state, "dcpp: unknown dcpp_plan %r on request %s; using %s (fix: one of %s)",
                   override, state.request_id, default, ", ".join((*PLAN_MODES, PLAN_OFF)))
        return default
    return override


def fixed_chunk(state: RequestState, chunk_arg: Any) -> int | None:
    """The fixed chunk size of the request of `state` whose `dcpp_chunk_size` is `chunk_arg`,
    or None (not given, or not a positive int: warned about)."""
    if chunk_arg is None:
        return None
    if isinstance(chunk_arg, bool) or not isinstance(chunk_arg, int) or chunk_arg < 1:
        _warn_once(state, "dcpp: dcpp_chunk_size=%r on request %s is not an int >= 1; ignored "
                   "(fix: pass a positive token count, e.g. 2048)", chunk_arg, state.request_id)
        return None
    return chunk_arg


def _warn_once(state: RequestState, msg: str, *args: Any) -> None:
    if msg in state.warned:
        return
    state.warned.add(msg)
    logger.warning(msg, *args)
