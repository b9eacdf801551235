"""Hostile input to `evolve --resume`, Ctrl-C at a generation boundary, and `eval` / `caption` errors.

A run directory someone sent can hold a crafted checkpoint: resuming it must never unpickle anything. A
Ctrl-C at any point of a search ends with the last whole generation's checkpoint on disk, one line saying
how to resume, exit 130, and a resume equal to an uninterrupted run. Bad `eval` / `caption` input is one
line, exit 2, found before the model is loaded and before any run directory is made."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
import signal
from pathlib import Path

import pytest

import vlm_merge.evolve as evolve
from tests.conftest import error_line
from tests.test_evolve import config, dev  # noqa: F401 - `dev` is a fixture
from vlm_merge.evolve import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, config_from_dict, main, run_evolve


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes (inputs-unchanged checks)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ================================================================================================
# evolve --resume reads no pickle


class _Payload:
    """A pickle that creates `marker` when unpickled (what a crafted checkpoint could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("finished", [False, True])
def test_a_checkpoint_holding_a_pickle_is_refused_and_never_unpickled(zoo, dev, tmp_path, capsys, finished):
    cfg = config_from_dict(config(zoo, dev))
    run = tmp_path / "shared-run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(cfg.to_yaml())
    (run / LOG_FILE).write_text("")
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker))
    (run / CHECKPOINT_FILE).write_text(json.dumps({  # the old format, its checksum right: the sender writes it too
        "version": 1, "config_sha256": cfg.sha256(), "generation": 0, "evaluations": 0, "log_lines": 0,
        "finished": finished, "stop": None, "best": None, "held_genes": {},
        "cma_sha256": hashlib.sha256(blob).hexdigest(), "cma_pickle_base64": base64.b64encode(blob).decode("ascii"),
    }))
    before = _tree(run)
    assert main(["--resume", str(run), "--quiet"]) == 2
    line = error_line(capsys)
    assert "pickle" in line and "start a new run" in line and str(run / CHECKPOINT_FILE) in line, line
    assert not marker.exists()
    assert _tree(run) == before


def _edit_told(state: dict) -> None:
    state["cma"]["told"][0][0] += 1.0


def _edit_randn(state: dict) -> None:
    state["cma"]["randn_state"]["state"]["state"] += 1


# a checkpoint's search state edited (or written for other cma/numpy versions): refused before any source is read
TAMPERED = {
    "told values": (_edit_told, "does not replay to the candidates log.jsonl holds for generation 2"),
    "generator state": (_edit_randn, "its random generator does not replay to the stored state"),
    "told not numbers": (lambda s: s["cma"].update(told=[["x"] * 4, [0.0] * 4, [0.0] * 4]), "is not a list of told fitness lists"),
    "told too short": (lambda s: s["cma"]["told"].pop(), "holds no list of 3 told generations"),
    "generation a string": (lambda s: s.update(generation="3"), "'generation' is '3', not what a checkpoint holds"),
    "held genes a list": (lambda s: s.update(held_genes=[]), "'held_genes' is [], not what a checkpoint holds"),
    "another format": (lambda s: s.update(version=3), "checkpoint format 3, not 2 (another vlm-merge version)"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_checkpoint_whose_search_state_does_not_replay_is_refused(zoo, dev, tmp_path, capsys, case):
    edit, message = TAMPERED[case]
    run = tmp_path / "run"
    run_evolve(config_from_dict(config(zoo, dev)), run, progress=False, write_model=False)
    state = json.loads((run / CHECKPOINT_FILE).read_text())
    edit(state)
    (run / CHECKPOINT_FILE).write_text(json.dumps(state))
    before = _tree(run)
    assert main(["--resume", str(run), "--quiet"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"vlm-merge: error: {run / CHECKPOINT_FILE}: ") and message in line and line.endswith("start a new run"), line
    assert _tree(run) == before


def test_the_search_never_pickles_and_a_ctrl_c_inside_cma_serialisation_cannot_crash_it(zoo, dev, tmp_path, capsys, monkeypatch):
    """cma's `pickle_dumps` catches everything (a bare `except:`): a Ctrl-C landing in it became an AttributeError."""
    calls = []

    def interrupting(name, real):
        def wrapper(*a, **k):
            calls.append(name)
            os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        return wrapper

    for name in ("dumps", "loads", "load", "dump"):
        monkeypatch.setattr(pickle, name, interrupting(name, getattr(pickle, name)))
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config(zoo, dev)))
    assert main([str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0, capsys.readouterr().err
    assert calls == []
    state = json.loads((tmp_path / "run" / CHECKPOINT_FILE).read_text())
    assert state["finished"] and not any("pickle" in k for k in state)


def _checkpoint_generation(run: Path) -> int | None:
    return json.loads((run / CHECKPOINT_FILE).read_text())["generation"] if (run / CHECKPOINT_FILE).exists() else None


def _sigint_hook(monkeypatch, where: str) -> None:
    """Send this process SIGINT once, at `where` in generation 1's boundary (after its candidates are scored)."""
    import cma

    sent = []

    def fire():
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    if where in ("cma tell", "cma ask"):
        meth = where.split()[1]
        real = getattr(cma.CMAEvolutionStrategy, meth)

        def wrapped(self, *a, **k):
            if meth == "tell" or self.countiter == 1:  # ask: the second one (the first boundary)
                fire()
            return real(self, *a, **k)
        monkeypatch.setattr(cma.CMAEvolutionStrategy, meth, wrapped)
        return
    real_write = evolve._write_atomic

    def write(path, data):
        is_ckpt = Path(path).name == CHECKPOINT_FILE
        if is_ckpt and where == "checkpoint write starts":
            fire()
        real_write(path, data)
        if is_ckpt and where == "checkpoint written":
            fire()
    monkeypatch.setattr(evolve, "_write_atomic", write)


@pytest.mark.parametrize("where", ["cma tell", "checkpoint write starts", "checkpoint written", "cma ask"])
def test_ctrl_c_at_a_generation_boundary_keeps_the_last_checkpoint_and_resumes_like_an_uninterrupted_run(
        zoo, dev, tmp_path, capsys, monkeypatch, where):
    cfg = config(zoo, dev)
    ref = run_evolve(config_from_dict(cfg), tmp_path / "ref", progress=False, write_model=False)
    path, run = tmp_path / "config.yaml", tmp_path / "run"
    path.write_text(json.dumps(cfg))
    with monkeypatch.context() as m:
        _sigint_hook(m, where)
        code = main([str(path), "--out", str(run), "--quiet"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 130 and len(err) == 1 and "Traceback" not in err[0], err
    said = re.fullmatch(rf"vlm-merge: interrupted in generation (\d+); checkpoint after generation (\d+) in {re.escape(str(run))}; "
                        rf"continue with `vlm-merge evolve --resume {re.escape(str(run))}`", err[0])
    assert said, err[0]
    assert int(said[1]) == int(said[2]) + 1 and _checkpoint_generation(run) == int(said[2]) >= 1
    assert main(["--resume", str(run), "--quiet"]) == 0
    resumed, reflog = ([json.loads(x) for x in (d / LOG_FILE).read_text().splitlines()] for d in (run, tmp_path / "ref"))
    assert [(r["x"], r["fitness"]) for r in resumed] == [(r["x"], r["fitness"]) for r in reflog]
    assert json.loads((run / "summary.json").read_text())["best"]["x"] == ref.best["x"]
