"""The project as users install it (#30): a wheel built from this tree, installed into a fresh virtual
environment (torch from the local CPU wheel, the rest from PyPI or pip's cache) and run from a directory
outside the source tree. The core install alone merges, and names the extra a missing command needs; with
the `demo` extra, `vlm-merge demo --quick` runs on the zoo shipped inside the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_WHEELS = Path("/opt/wheels")  # the CPU torch wheel (constraints.txt pins it)
SOURCES = ("pyproject.toml", "README.md", "vlm_merge", "chat_vector", "eval", "assets/miniature-zoo")
EVAL_EXTRA = ("datasets", "evaluate", "rouge-score", "fugashi", "matplotlib", "pillow", "cma", "ray", "pytest")
ZOO_IN_WHEEL = "vlm_merge/_zoo/"

pytestmark = pytest.mark.slow


def _run(cmd: list[str | Path], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` in `cwd` with nothing of this checkout on the path (no PYTHONPATH, no active venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _pip_install(python: Path, *specs: str | Path, cwd: Path) -> None:
    links = ["--find-links", LOCAL_WHEELS] if LOCAL_WHEELS.is_dir() else []
    _run([python, "-m", "pip", "install", "-q", *links, "-c", ROOT / "constraints.txt", *specs], cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this tree (the build writes build/ and *.egg-info beside its sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src], dist)
    (built,) = dist.glob("vlm_merge-*.whl")
    return built


@pytest.fixture(scope="module")
def env(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh virtual environment with the wheel's core install: (its bin directory, a work directory)."""
    venv = tmp_path_factory.mktemp("venv")
    work = tmp_path_factory.mktemp("work")
    _run([sys.executable, "-m", "venv", venv], work)
    _pip_install(venv / "bin" / "python", "torch", wheel, cwd=work)
    return venv / "bin", work


def test_wheel_ships_every_module_the_zoo_and_no_research(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = {p.relative_to(ROOT).as_posix() for name in ("vlm_merge", "chat_vector", "eval")
               for p in (ROOT / name).rglob("*.py")}
    assert modules - set(names) == set()  # pyproject.toml lists the packages (the zoo's mapping needs the list)
    zoo = {n[len(ZOO_IN_WHEEL):] for n in names if n.startswith(ZOO_IN_WHEEL)}
    tracked = {p.relative_to(ROOT / SOURCES[-1]).as_posix() for p in (ROOT / SOURCES[-1]).rglob("*")
               if p.is_file() and p.suffix in (".json", ".jsonl", ".safetensors", ".jinja", ".png")}
    assert zoo == tracked and "zoo.json" in zoo and "en-vlm/model.safetensors" in zoo
    assert not [n for n in zoo if n.endswith((".py", ".md"))]
    assert wheel.stat().st_size < 25_000_000, wheel.stat().st_size
    assert "[vlm_merge.scorers]\ncontent-accuracy = vlm_merge.world.scoring:ContentAccuracy" in entry_points


def test_core_install_merges_and_names_missing_extras(env, tmp_path):
    bin_dir, work = env
    installed = _run([bin_dir / "python", "-m", "pip", "list", "--format=freeze"], work).stdout.lower()
    assert not [d for d in EVAL_EXTRA if f"\n{d}==" in f"\n{installed}"], installed
    zoo = Path(_run([bin_dir / "python", "-c", "from vlm_merge.world import shipped_zoo; print(shipped_zoo())"],
                    work).stdout.strip())
    assert zoo.resolve().is_relative_to(bin_dir.parent.resolve()) and (zoo / "zoo.json").is_file(), zoo  # package data, not the checkout
    assert "language_model" in _run([bin_dir / "vlm-merge", "inspect", zoo / "en-vlm"], work).stdout
    out = tmp_path / "ja-vlm"
    _run([bin_dir / "vlm-merge", "chat-vector", "--vlm", zoo / "en-vlm", "--en-base", zoo / "en-base",
          "--ja-base", zoo / "ja-base", "--out", out, "--scale", "0.5", "--quiet"], work)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    listing = _run([bin_dir / "vlm-merge", "--help"], work).stdout
    assert "needs the eval extra" in listing and "needs the demo extra" in listing
    for command, extra in ((["eval", "--help"], "eval"), (["score", "x.jsonl"], "eval"),
                           (["evolve", "c.yaml"], "evolve"), (["demo", "--quick"], "demo"), (["zoo", "build"], "demo")):
        done = _run([bin_dir / "vlm-merge", *command], work, ok=False)
        assert done.returncode == 2 and not done.stdout, (command, done)
        assert done.stderr.startswith(f"vlm-merge: error: 'vlm-merge {command[0]}' needs the {extra} extra: "
                                      f"pip install 'vlm-merge[{extra}]' (not installed: "), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    api = _run([bin_dir / "python", "-c", "import eval; eval.evaluate"], work, ok=False)
    assert api.returncode == 1 and "VlmMergeError: eval.evaluate needs the eval extra" in api.stderr, api.stderr


def test_demo_runs_from_the_wheel(env, wheel, tmp_path):
    """Runs after the core test (file order): it adds the demo extra to the same environment."""
    bin_dir, work = env
    _pip_install(bin_dir / "python", f"{wheel}[demo]", cwd=work)
    out = tmp_path / "demo"
    done = _run([bin_dir / "vlm-merge", "demo", "--quick", "--quiet", "--out", out], work)
    assert f"report: {out / 'report.md'}" in done.stdout and (out / "report.md").is_file()
    zoo = Path(json.loads((out / "report.json").read_text(encoding="utf-8"))["zoo"]["path"])
    assert zoo.is_relative_to(bin_dir.parent.resolve()) and zoo.name == "_zoo", zoo  # the wheel's zoo
    found = _run([bin_dir / "python", "-c", "from eval.metrics import get_scorer; "
                  "print(get_scorer('content-accuracy').__module__)"], work).stdout.strip()
    assert found == "vlm_merge.world.scoring"  # eval finds the world's scorer through the wheel's entry point
