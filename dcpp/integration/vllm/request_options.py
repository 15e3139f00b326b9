"""`RequestOptions`: a request's own dcpp settings, read from its sampling params' extra_args.

``dcpp_plan``: the plan mode for this request (one of `PLAN_MODES`, or ``"off"`` for vLLM's
chunks). ``dcpp_chunk_size``: fixed chunks of that many tokens. A bad value is ignored with a
warning that names it (once per request).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from dcpp.integration.vllm import vllm_compat
from dcpp.integration.vllm.chunk_sizer import PLAN_MODES, PLAN_OFF, trim_log

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


class RequestOptions:
    def __init__(self, default_mode: str) -> None:
        self.default_mode = default_mode
        self._warned: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def mode(self, request: Any) -> str:
        override = vllm_compat.request_plan_override(request)
        if override is None:
            return self.default_mode
        if override != PLAN_OFF and override not in PLAN_MODES:
            self._warn_once(request.request_id, "dcpp: unknown dcpp_plan %r on request %s; "
                            "using %s (fix: one of %s)", override, request.request_id,
                            self.default_mode, ", ".join((*PLAN_MODES, PLAN_OFF)))
            return self.default_mode
        return override

    def fixed_chunk(self, request: Any) -> int | None:
        """The request's `dcpp_chunk_size` (fixed chunks of that many tokens), or None."""
        value = vllm_compat.request_chunk_size_override(request)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._warn_once(request.request_id, "dcpp: dcpp_chunk_size=%r on request %s is not "
                            "an int >= 1; ignored (fix: pass a positive token count, e.g. 2048)",
                            value, request.request_id)
            return None
        return value

    def _warn_once(self, request_id: str, msg: str, *args: Any) -> None:
        if (request_id, msg) in self._warned:
            return
        self._warned[(request_id, msg)] = None
        trim_log(self._warned)
        logger.warning(msg, *args)
