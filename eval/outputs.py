"""Output files of evaluation and captioning runs: atomic writes, append-only checkpoints, run configs.

A long run appends one JSON line per finished item to its checkpoint file (flushed and fsynced per
batch) and records its configuration in `run.json`; rerunning the same command reads the lines back
(a torn last line from a kill is dropped) and continues where it stopped. Final files are written to
a temporary file beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.outputs import side_path
from vlm_merge.io.safe_load import load_json, parse_json, read_text

MAX_JSONL_BYTES = 1024**3  # predictions / captions files

RUN_FILE = "run.json"


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` to a temporary file beside `path`, fsync, and rename it into place."""
    tmp = side_path(path, "tmp")  # removed by the next run if this process dies (vlm_merge.io.outputs.clean_stale)
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


def jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path: Path, required: tuple[str, ...] = (), tolerate_torn_tail: bool = False) -> list[dict]:
    """JSON objects, one per line; a bad line is an error naming file and line (a torn last line may be dropped)."""
    text = read_text(path, "JSONL file", MAX_JSONL_BYTES)
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path}:{n}")
        except VlmMergeError as e:
            if tolerate_torn_tail and n == len(lines) and not text.endswith("\n"):
                break  # interrupted mid-write; the item is generated again
            raise VlmMergeError(f"{e}; fix or delete that line") from None
        if not isinstance(record, dict):
            raise VlmMergeError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        for key in required:
            if key not in record:
                raise VlmMergeError(f"{path}:{n}: no {key!r} field; each line needs {', '.join(required)}")
        records.append(record)
    return records


def has_items(filename: str):
    """`keep` for `vlm_merge.io.outputs.RunDir.open`: whether a run dir's checkpoint file holds a finished item."""

    def keep(run_dir: Path) -> bool:
        path = run_dir / filename
        return path.is_file() and any(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())

    return keep


class Checkpoint:
    """A run directory (made by `vlm_merge.io.outputs.RunDir`) holding `run.json` and an append-only JSONL of
    finished items keyed by `key`. A directory whose `run.json` has no finished items beside it (a run that
    failed or was killed before its first item) is taken over by the new run's configuration."""

    def __init__(self, out_dir: Path, filename: str, key: str, config: dict):
        self.dir = Path(out_dir).expanduser()
        self.path = self.dir / filename
        self.key = key
        run_file = self.dir / RUN_FILE
        if run_file.exists() and not has_items(filename)(self.dir):
            run_file.unlink()  # nothing finished: nothing to resume or lose
        if run_file.exists():
            _check_same_run(self.dir, _read_run_file(run_file), config)
        elif self.path.exists():
            raise VlmMergeError(f"{self.path}: exists without {RUN_FILE}; use another --out, or --force to start over")
        else:
            write_atomic(run_file, dumps(config))
        self.done: dict[str, dict] = {}
        if self.path.exists():
            records = read_jsonl(self.path, (key,), tolerate_torn_tail=True)
            self.done = {str(r[key]): r for r in records}
            self._rewrite(records)  # drop a torn tail so appends start on a fresh line

    def _rewrite(self, records: list[dict]) -> None:
        write_atomic(self.path, jsonl(records))

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(jsonl(records))
            fh.flush()
            os.fsync(fh.fileno())
        for r in records:
            self.done[str(r[self.key])] = r

    def finish(self, records: list[dict]) -> None:
        """Replace the checkpoint with the final records (same file name, atomically)."""
        self._rewrite(records)


def check_resumable(run_dir: Path, filename: str, known: dict) -> None:
    """Before any costly work (loading a model): when `run_dir` holds a run with finished items in `filename`,
    the settings in `known` (part of the run configuration, nested the same way) must equal its `run.json`'s.
    `Checkpoint` checks the whole configuration once it is known; the error is the same."""
    run_file = Path(run_dir) / RUN_FILE
    if run_file.is_file() and has_items(filename)(Path(run_dir)):
        _check_same_run(Path(run_dir), _only(_read_run_file(run_file), known), known)


def _read_run_file(run_file: Path) -> object:
    try:
        return load_json(run_file, "run file")
    except VlmMergeError as e:
        raise VlmMergeError(f"{e}; or delete it or pass --force to start over") from None


def _check_same_run(run_dir: Path, old: object, config: dict) -> None:
    difference = _first_difference(old, config)
    if difference is not None:
        name, was, now = difference
        raise VlmMergeError(
            f"{run_dir} holds a run with a different {name} ({_short(was)} instead of {_short(now)}); "
            "use another --out, or --force to start over"
        )


def _only(old: object, shape: object) -> object:
    """The part of JSON value `old` at the keys `shape` has (recursively)."""
    if isinstance(old, dict) and isinstance(shape, dict):
        return {k: _only(old.get(k), v) for k, v in shape.items()}
    return old


def _first_difference(old: object, new: object, path: str = "") -> tuple[str, object, object] | None:
    """The first (dotted key, old value, new value) where two JSON values differ, in `new`'s key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if old == new else (path, old, new)


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
