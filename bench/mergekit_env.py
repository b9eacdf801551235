"""A private virtualenv holding mergekit, the reference contender.

mergekit is never a dependency of vlm-merge: the benchmark creates
``bench/.venv-mergekit`` (git-ignored) on first use, installing torch from the
local CPU wheel first and then mergekit with torch pinned by a constraints file,
so that the resolver can never pull a CUDA build of torch.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.side_env import run_logged

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
WHEELS = Path("/opt/wheels")


@dataclass(frozen=True)
class MergekitEnv:
    """Where the mergekit virtualenv lives and how to call it."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def mergekit_yaml(self) -> Path:
        return self.root / "bin" / "mergekit-yaml"

    @property
    def marker(self) -> Path:
        return self.root / f".installed-mergekit-{MERGEKIT_VERSION}"

    def is_ready(self) -> bool:
        return self.marker.exists() and self.mergekit_yaml.exists()

    def version(self) -> str:
        """The installed mergekit version, as its own metadata reports it."""
        out = subprocess.run(
            [str(self.python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()


def _find_links() -> list[str]:
    return ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []


def ensure_mergekit(root: Path) -> MergekitEnv:
    """Create the venv and install mergekit into it unless already done.

    Raises RuntimeError (with the tail of the install log) when it cannot.
    """
    env = MergekitEnv(root)
    if env.is_ready():
        return env
    print(f"installing mergekit {MERGEKIT_VERSION} into {root} (first use; takes a few minutes)", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / "_work" / "mergekit-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if not env.python.exists():
        run_logged(["python3", "-m", "venv", str(root)], log)
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    pip = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", *_find_links()]
    run_logged([*pip, f"torch=={TORCH_VERSION}"], log)
    run_logged([*pip, "-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}"], log)
    env.marker.write_text(f"mergekit=={MERGEKIT_VERSION} torch=={TORCH_VERSION}\n")
    return env


if __name__ == "__main__":
    where = Path(__file__).resolve().parent / ".venv-mergekit"
    try:
        print(ensure_mergekit(where).version())
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from exc
