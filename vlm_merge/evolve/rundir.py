"""An evolve run directory: its file names, the candidate log, the checkpoint, atomic writes.

`log.jsonl` gets one line per candidate as it finishes (`RunLog.record`, the one place a candidate's
record is written); `checkpoint.json` (format `CHECKPOINT_VERSION`) is plain data written atomically
after every generation and checked field by field when read back (a run directory may come from
someone else): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import EvolveConfig
from vlm_merge.io.safe_load import load_json

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.json"
BEST_RECIPE_FILE = "best_recipe.yaml"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "fitness.png"
MODEL_DIR = "model"
SCAFFOLD_DIR = ".scaffold"
CHECKPOINT_VERSION = 2  # 1: CMA-ES as cma's pickle (refused); 2: `Search.state()` data
# the order of a log record's keys (the rest follow)
RECORD_ORDER = ("generation", "index", "evaluation", "fitness", "scores", "error", "rung", "final", "questions", "merge_s", "eval_s",
                "recipe_sha256", "genes", "x")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` through a temporary file renamed into place (`eval.outputs.write_atomic`)."""
    from eval.outputs import write_atomic as write

    write(path, data)


def read_log(path: Path) -> list[dict]:
    """The records of a run's `log.jsonl` (none if it is absent; a torn last line, from a kill, is dropped)."""
    from eval.outputs import read_jsonl

    return read_jsonl(path, tolerate_torn_tail=True) if path.exists() else []


def ordered(record: dict) -> dict:
    """`record` with its keys in `RECORD_ORDER`, without the search's private keys (`reused`, `_cma`)."""
    head = {k: record[k] for k in RECORD_ORDER if k in record}
    return {**head, **{k: v for k, v in record.items() if k not in head and k not in ("reused", "_cma")}}


class RunLog:
    """`log.jsonl`, appended to as candidates finish."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rewrite(self, records: Sequence[dict]) -> None:
        """Replace the log by `records` (on resume: the lines the checkpoint covers)."""
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def record(self, records: Sequence[dict]) -> None:
        """Append finished candidates' records (each `ordered`) and sync them to disk: the one place a candidate's
        record is written."""
        with open(self.path, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(ordered(r), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def best_record(records: Sequence[dict]) -> dict | None:
    """Best record by fitness among final scores (not an early halving rung; ties: the first)."""
    best = None
    for r in records:
        if r["error"] is None and r["final"] and (best is None or r["fitness"] > best["fitness"]):
            best = r
    return best


def write_checkpoint(path: Path, search_state: dict, gen: int, evals: int, records: list[dict], finished: bool, cfg: EvolveConfig,
                held: Mapping[str, str], stop: str | None = None) -> None:
    """Write `checkpoint.json` atomically: the counters, the best record, the log length and the search's state."""
    state = {
        "version": CHECKPOINT_VERSION, "config_sha256": cfg.sha256(), "generation": gen, "evaluations": evals,
        "log_lines": len(records), "finished": finished, "stop": stop, "best": best_record(records), "held_genes": dict(held),
        "cma": search_state,
        "rng": {"cma_randn": "numpy PCG64 seeded with cmaes.seed (cma.randn_state)",
                "subsets": f"numpy default_rng([{cfg.cmaes.seed}, generation])"},
    }
    write_atomic(path, json.dumps(state) + "\n")


# what a checkpoint's counters must be (it may come from someone else's run directory)
_CHECKPOINT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "generation": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "evaluations": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "log_lines": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "finished": lambda v: isinstance(v, bool),
    "held_genes": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(w, str) for k, w in v.items()),
    "cma": lambda v: isinstance(v, dict),
}


def load_checkpoint(path: Path, cfg: EvolveConfig) -> dict:
    """The checkpoint's fields, checked; never unpickles (a checkpoint holding a pickle is refused)."""
    try:
        state = load_json(path, "checkpoint")
    except VlmMergeError as e:
        raise VlmMergeError(f"{e}; or start a new run") from None
    if any("pickle" in k for k in state):
        raise VlmMergeError(f"{path}: holds CMA-ES as a pickle (an older checkpoint format); a pickle can run code and is "
                            "never read back: start a new run")
    if state.get("version") != CHECKPOINT_VERSION:
        raise VlmMergeError(f"{path}: checkpoint format {state.get('version')!r:.20}, not {CHECKPOINT_VERSION} (another "
                            "vlm-merge version); start a new run")
    if state.get("config_sha256") != cfg.sha256():
        raise VlmMergeError(f"{path}: written for another config; start a new run")
    for key, ok in _CHECKPOINT_FIELDS.items():
        if not ok(state.get(key)):
            raise VlmMergeError(f"{path}: {key!r} is {state.get(key)!r:.60}, not what a checkpoint holds; start a new run")
    told = state["cma"].get("told")
    if not isinstance(told, list) or len(told) != state["generation"]:
        raise VlmMergeError(f"{path}: 'cma' holds no list of {state['generation']} told generations ('generation'); "
                            "start a new run")
    return state


def interrupted_text(out: Path) -> str:
    """What a Ctrl-C left in run directory `out` and how to go on, read from its checkpoint (one line)."""
    resume = f"`vlm-merge evolve --resume {out}`"
    if not (out / CONFIG_FILE).exists():
        return f"interrupted before the run started in {out}; run the command again"
    try:
        state = json.loads((out / CHECKPOINT_FILE).read_text(encoding="utf-8"))
        gen, finished = int(state["generation"]), bool(state["finished"])
    except (OSError, ValueError, TypeError, KeyError):
        return f"interrupted before the first generation finished in {out}; start over with {resume}"
    if finished:
        return f"interrupted after the search finished (checkpoint in {out}); write its outputs with {resume}"
    return f"interrupted in generation {gen + 1}; checkpoint after generation {gen} in {out}; continue with {resume}"
