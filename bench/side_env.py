"""What the benchmarks' side environments (bench/.venv-mergekit, bench/.venv-evalmm) share: running an install
step with its output appended to a log, and failing with the log's tail."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run_logged(cmd: list[str], log: Path) -> None:
    """Run `cmd`, its output appended to `log`; RuntimeError with the log's tail when it fails."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(cmd)}\n{tail}")
