"""A private virtualenv holding llm-jp-eval-mm 0.4.1 (`eval-mm` on PyPI), the reference for eval's interop.

eval-mm is never a dependency of vlm-merge. `ensure_evalmm` creates ``bench/.venv-evalmm`` (git-ignored) on first
use. eval-mm 0.4.1 declares ``requires-python >= 3.12.1`` while the project's venv is 3.11 and the local CPU torch
wheel (/opt/wheels) is cp311 only, so the side environment is a Python 3.12 venv (pyenv's, or ``EVALMM_PYTHON``)
with eval-mm installed ``--no-deps`` plus the packages its metrics and package ``__init__`` import
(`EVALMM_DEPS`, the ``[project] dependencies`` of eval-mm 0.4.1's pyproject.toml minus torch / webdataset / av, which
no module ``import eval_mm.metrics`` loads imports, and sacrebleu without its ``[ja]`` extra): that way no resolver
can pull a CUDA build of torch.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.side_env import run_logged

EVALMM_VERSION = "0.4.1"
# eval-mm 0.4.1's pyproject.toml pins datasets==2.18.0; the rest are its lower bounds
EVALMM_DEPS = ("datasets==2.18.0", "requests>=2.32.3", "python-dotenv>=1.0.1", "openai>=1.42.0", "rouge-score>=0.1.2",
               "emoji>=2.12.1", "fugashi>=1.3.2", "unidic-lite>=1.0.8", "backoff>=2.2.1", "loguru>=0.7.3", "pillow",
               "sacrebleu>=2.4.3", "scipy>=1.15.1")
ROOT = Path(__file__).resolve().parent / ".venv-evalmm"


@dataclass(frozen=True)
class EvalmmEnv:
    """Where the eval-mm virtualenv lives and how to call it."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.root / f".installed-eval-mm-{EVALMM_VERSION}"

    def is_ready(self) -> bool:
        return self.marker.exists() and self.python.exists()


def _python312() -> str:
    """A Python >= 3.12.1 interpreter: EVALMM_PYTHON, python3.12 on PATH, or pyenv's 3.12."""
    for candidate in (os.environ.get("EVALMM_PYTHON"), *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")),
                      shutil.which("python3.12")):  # pyenv's shim on PATH fails when 3.12 is not the active version
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("eval-mm 0.4.1 needs Python >= 3.12.1: install one (pyenv install 3.12) or set EVALMM_PYTHON")


def ensure_evalmm(root: Path = ROOT) -> EvalmmEnv:
    """Create the venv and install eval-mm into it unless already done (RuntimeError with the log's tail if not)."""
    env = EvalmmEnv(root)
    if env.is_ready():
        return env
    print(f"installing eval-mm {EVALMM_VERSION} into {root} (first use; takes a few minutes)", flush=True)
    log = root.parent / "_work" / "evalmm-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if not env.python.exists():
        run_logged([_python312(), "-m", "venv", str(root)], log)
    pip = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check"]
    run_logged([*pip, *EVALMM_DEPS], log)
    run_logged([*pip, "--no-deps", f"eval-mm=={EVALMM_VERSION}"], log)
    run_logged([str(env.python), "-c", "import eval_mm.metrics"], log)
    env.marker.write_text(f"eval-mm=={EVALMM_VERSION}\n")
    return env


if __name__ == "__main__":
    try:
        print(ensure_evalmm().python)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc
