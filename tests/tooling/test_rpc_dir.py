"""vLLM's IPC socket files go to a directory of the process, removed when it exits
(`harness.private_rpc_dir`); a directory the user chose is kept."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os, sys
from dcpp.tooling.harness import private_rpc_dir
path = private_rpc_dir()
assert private_rpc_dir() == path == os.environ["VLLM_RPC_BASE_PATH"]
open(os.path.join(path, "a-socket-file"), "w").close()
print(path)
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_the_directory_goes_with_the_process():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_RPC_BASE_PATH"}
    path = _run(env)
    assert os.path.basename(path).startswith("dcpp-vllm-rpc-") and not os.path.exists(path)


def test_a_directory_the_user_set_is_kept(tmp_path):
    env = dict(os.environ, VLLM_RPC_BASE_PATH=str(tmp_path))
    assert _run(env) == str(tmp_path)
    assert (tmp_path / "a-socket-file").exists()
