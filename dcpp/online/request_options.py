"""`RequestOptions`: a request's own dcpp settings, from the values the engine read out of it
(in vLLM: its sampling params' extra_args, `vllm_compat.request_options`).

``dcpp_plan``: the plan mode for this request (one of `PLAN_MODES`, or ``"off"`` for vLLM's
chunks). ``dcpp_chunk_size``: fixed chunks of that many tokens. A bad value is ignored with a
warning that names it (once per request, remembered on the request's record).
"""

from __future__ import annotations

import logging
from typing import Any

from dcpp.online.chunk_sizer import PLAN_MODES, PLAN_OFF
from dcpp.online.requests import RequestTable

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


class RequestOptions:
    def __init__(self, default_mode: str, requests: RequestTable) -> None:
        self.default_mode = default_mode
        self.requests = requests

    def mode(self, request_id: str, plan_arg: Any) -> str:
        """The plan mode of a request whose `dcpp_plan` is `plan_arg` (None: not given)."""
        if plan_arg is None:
            return self.default_mode
        override = str(plan_arg)
        if override != PLAN_OFF and override not in PLAN_MODES:
            self._warn_once(request_id, "dcpp: unknown dcpp_plan %r on request %s; "
                            "using %s (fix: one of %s)", override, request_id,
                            self.default_mode, ", ".join((*PLAN_MODES, PLAN_OFF)))
            return self.default_mode
        return override

    def fixed_chunk(self, request_id: str, chunk_arg: Any) -> int | None:
        """The fixed chunk size of a request whose `dcpp_chunk_size` is `chunk_arg`, or None."""
        if chunk_arg is None:
            return None
        if isinstance(chunk_arg, bool) or not isinstance(chunk_arg, int) or chunk_arg < 1:
            self._warn_once(request_id, "dcpp: dcpp_chunk_size=%r on request %s is not "
                            "an int >= 1; ignored (fix: pass a positive token count, e.g. 2048)",
                            chunk_arg, request_id)
            return None
        return chunk_arg

    def _warn_once(self, request_id: str, msg: str, *args: Any) -> None:
        state = self.requests.record(request_id)
        if msg in state.warned:
            return
        state.warned.add(msg)
        logger.warning(msg, *args)
