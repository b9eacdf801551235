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

import vlm_merge.evolve.rundir as rundir
from tests.conftest import error_line
from tests.test_evolve import config, dev  # noqa: F401 - `dev` is a fixture
from vlm_merge.cli.evolve import main
from vlm_merge.evolve import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    config_from_dict,
    run_evolve,
)


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
    real_write = rundir.write_atomic  # the checkpoint's writer

    def write(path, data):
        is_ckpt = Path(path).name == CHECKPOINT_FILE
        if is_ckpt and where == "checkpoint write starts":
            fire()
        real_write(path, data)
        if is_ckpt and where == "checkpoint written":
            fire()
    monkeypatch.setattr(rundir, "write_atomic", write)


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


# ================================================================================================
# eval / caption: every cheap check before the model loads, each error one line


def _bomb_png(path: Path, side: int = 60000) -> None:
    """A PNG whose header declares side x side pixels (3.6 GP by default) over a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def inputs(tmp_path) -> Path:
    """An input folder: a good image, a text file, a 0-byte file and a decompression bomb, all named .png."""
    import random

    from eval.fixture_datasets import draw_scene

    root = tmp_path / "inputs"
    (root / "img").mkdir(parents=True)
    draw_scene(random.Random(0))[0].save(root / "img" / "good.png")
    (root / "img" / "text.png").write_text("not an image\n")
    (root / "img" / "empty.png").write_bytes(b"")
    _bomb_png(root / "img" / "bomb.png")
    (root / "a-file").write_text("an existing file, not a run directory\n")
    for name in ("good", "missing", "text", "empty", "bomb"):
        row = {"image": f"img/{name}.png", "question": "何色ですか？", "answer": "赤です。"}
        (root / f"{name}.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    return root


IMAGE_CASES = {  # image -> what the one line says about it
    "missing": "missing.png: no such",
    "text": "text.png: not a readable image",
    "empty": "empty.png: empty file (0 bytes)",
    "bomb": "bomb.png: refused by the decompression-bomb guard",
}


def _no_model_load(monkeypatch) -> None:
    """Fail the test if eval or caption loads a model (every case here must be refused before that)."""
    import eval.captioning
    import eval.runner

    def refuse(*a, **k):
        pytest.fail("the model was loaded before the input was checked")

    monkeypatch.setattr(eval.runner, "load_model", refuse)
    monkeypatch.setattr(eval.captioning, "load_model", refuse)


def _one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    err = [x for x in captured.err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("vlm-merge: error: ") and "Traceback" not in captured.err, err
    assert captured.out == "", captured.out
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def _command(kind: str, zoo, inputs: Path, out: Path, image: str = "good", *extra: str) -> list[str]:
    model = ["--model", str(zoo.vlms["llava-hf-llama"]), "--device", "cpu", "--max-new-tokens", "3", "--out", str(out)]
    if kind == "eval":
        return ["eval", "--bench", str(inputs / f"{image}.jsonl"), "--protocol", "llm-jp", *model, *extra]
    return ["caption", str(inputs / "img" / f"{image}.png"), *model, *extra]


@pytest.mark.parametrize("image", IMAGE_CASES)
@pytest.mark.parametrize("kind", ["eval", "caption"])
def test_a_bad_image_is_one_line_before_the_model_loads_and_leaves_no_run_dir(zoo, inputs, tmp_path, capsys, monkeypatch,
                                                                                kind, image):
    from vlm_merge.cli import main as cli_main

    _no_model_load(monkeypatch)
    before = _tree(inputs)
    out = tmp_path / "run"
    assert cli_main(_command(kind, zoo, inputs, out, image)) == 2
    _one_error_line(capsys, IMAGE_CASES[image])
    assert not out.exists() and _tree(inputs) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run")]  # no temp dir beside it either


@pytest.mark.parametrize("kind", ["eval", "caption"])
def test_an_existing_file_as_out_is_one_line_before_the_model_loads(zoo, inputs, capsys, monkeypatch, kind):
    from vlm_merge.cli import main as cli_main

    _no_model_load(monkeypatch)
    before = _tree(inputs)
    assert cli_main(_command(kind, zoo, inputs, inputs / "a-file")) == 2
    _one_error_line(capsys, str(inputs / "a-file"), "not a directory")
    assert _tree(inputs) == before


@pytest.mark.parametrize("kind", ["eval", "caption"])
def test_resuming_with_other_settings_is_one_line_before_the_model_loads(zoo, inputs, tmp_path, capsys, monkeypatch, kind):
    from vlm_merge.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(_command(kind, zoo, inputs, out, "good", "--quiet")) == 0
    capsys.readouterr()
    run_before, inputs_before = _tree(out), _tree(inputs)
    _no_model_load(monkeypatch)
    changed = _command(kind, zoo, inputs, out, "good", "--quiet")
    changed[changed.index("--max-new-tokens") + 1] = "5"
    assert cli_main(changed) == 2
    _one_error_line(capsys, str(out), "max_new_tokens", "--force")
    assert _tree(out) == run_before and _tree(inputs) == inputs_before


@pytest.mark.parametrize("kind", ["eval", "caption"])
def test_quiet_prints_no_model_loading_bar(zoo, inputs, tmp_path, capfd, kind):
    from vlm_merge.cli import main as cli_main

    assert cli_main(_command(kind, zoo, inputs, tmp_path / "run", "good", "--quiet")) == 0
    assert capfd.readouterr().err == ""


def test_caption_of_a_folder_skips_its_unreadable_images_and_of_one_with_none_readable_is_one_line(zoo, inputs, tmp_path,
                                                                                                  capsys, monkeypatch):
    from vlm_merge.cli import main as cli_main

    assert cli_main(["caption", str(inputs / "img"), "--model", str(zoo.vlms["llava-hf-llama"]), "--device", "cpu",
                     "--max-new-tokens", "3", "--out", str(tmp_path / "mixed"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 images captioned, 3 skipped") and all(f"{n}.png" in out for n in ("text", "empty", "bomb")), out
    (inputs / "img" / "good.png").unlink()
    before = _tree(inputs)
    _no_model_load(monkeypatch)
    assert cli_main(["caption", str(inputs / "img"), "--model", str(zoo.vlms["llava-hf-llama"]),
                     "--out", str(tmp_path / "none")]) == 2
    _one_error_line(capsys, "none of the 3 images can be read (first: ", "bomb.png")
    assert not (tmp_path / "none").exists() and _tree(inputs) == before


def test_an_image_that_fails_to_decode_after_its_header_passed_is_one_line_and_leaves_no_run_dir(zoo, inputs, tmp_path, capsys):
    """A truncated PNG passes the header check: the model loads, decoding fails, the new run dir goes again."""
    from vlm_merge.cli import main as cli_main

    good = (inputs / "img" / "good.png").read_bytes()
    (inputs / "img" / "cut.png").write_bytes(good[: len(good) // 2])
    before = _tree(inputs)
    assert cli_main(["caption", str(inputs / "img" / "cut.png"), "--model", str(zoo.vlms["llava-hf-llama"]), "--device", "cpu",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 2
    _one_error_line(capsys, "none of the 1 images could be decoded (first: ", "cut.png")
    assert not (tmp_path / "run").exists() and _tree(inputs) == before


EMBEDDED_CASES = {  # the first test row's embedded image bytes -> what the one line says
    "text": (lambda tmp: b"not an image at all", "row 0: embedded image: not a readable image"),
    "bomb": (lambda tmp: (_bomb_png(tmp / "b.png"), (tmp / "b.png").read_bytes())[1],
             "row 0: embedded image: refused by the decompression-bomb guard"),
}


@pytest.mark.parametrize("case", EMBEDDED_CASES)
def test_a_bad_image_embedded_in_a_parquet_benchmark_is_one_line_before_the_model_loads(zoo, tmp_path, capsys,
                                                                                       monkeypatch, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.fixture_datasets import write_ja_vg_vqa
    from vlm_merge.cli import main as cli_main

    make, phrase = EMBEDDED_CASES[case]
    data = write_ja_vg_vqa(tmp_path / "vg", n_images=2)
    shard = next((data / "data").glob("test-*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[0] = {**images[0], "bytes": make(tmp_path)}
    at = table.schema.get_field_index("image")
    pq.write_table(table.set_column(at, table.schema.field(at), pa.array(images, type=table.schema.field(at).type)), shard)
    before = _tree(data)
    _no_model_load(monkeypatch)
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli_main(["eval", "--bench", "ja-vg-vqa-500", "--data", str(data), "--protocol", "llm-jp", "--model",
                     str(zoo.vlms["llava-hf-llama"]), "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, phrase)
    assert not out.exists() and _tree(data) == before
