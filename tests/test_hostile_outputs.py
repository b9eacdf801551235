"""The output rule ("nothing is lost") under hostile use, command by command: an output that is, contains or
lies inside an input (or is or contains the current directory) is refused with one line and exit status 2
whatever the flags; SIGKILL / Ctrl-C mid-write leave no partial output and only debris named with the dead
pid, which the next run cleans; disk full and read-only outputs are one line, with nothing left behind.
Every input file is hashed before and after each refused or failed command."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chat_vector import apply_delta, chat_vector, extract_delta
from eval.fixture_datasets import write_ja_vg_vqa
from tests.conftest import error_line
from vlm_merge.cli import main
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.merge import merge
from vlm_merge.io.outputs import STALE_PATTERN

REPO = Path(__file__).resolve().parents[1]

# A command run in a subprocess that pauses at a known moment (after it touched `marker`) to be signalled:
# `compute` = in the merge engine's main loop, at the first merged tensor (whole or streamed; the temp dir holds a shard);
# `generate` = at the first generation call of eval (its run dir exists, no prediction yet).
HARNESS = """
import sys, time
from pathlib import Path

marker, where, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]


def pausing(real):
    def wrapper(*args, **kwargs):
        marker.touch()
        time.sleep(300)
        return real(*args, **kwargs)
    return wrapper


if where == "compute":  # a merged tensor computed whole, or streamed in row pieces
    import vlm_merge.engine.streaming as module
    names = ("compute", "stream_merge")
else:
    from transformers import GenerationMixin as module
    names = ("generate",)
for name in names:
    setattr(module, name, pausing(getattr(module, name)))
from vlm_merge.cli import main
sys.exit(main(argv))
"""


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (symlinks followed), keyed by path."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out |= {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    return out


def debris(parent: Path) -> list[str]:
    """Our temporary / set-aside entries in `parent`."""
    return sorted(p.name for p in parent.iterdir() if STALE_PATTERN.match(p.name))


@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory) -> dict[str, Path]:
    """Private copies of one family's checkpoints (under one directory) plus a recipe over them."""
    root = tmp_path_factory.mktemp("inputs") / "all"
    root.mkdir()
    m = {"vlm": root / "vlm", "en": root / "en", "ja": root / "ja"}
    shutil.copytree(zoo.vlms["llava-hf-llama"], m["vlm"])
    shutil.copytree(zoo.llms["en-llama"], m["en"])
    shutil.copytree(zoo.llms["ja-llama"], m["ja"])
    recipe = {"merge_method": "task_arithmetic", "vlm": str(m["vlm"]), "base_model": str(m["en"]),
              "target": str(m["ja"]), "models": [{"model": "vlm", "parameters": {"weight": 1.0}}]}
    m["recipes"] = root / "recipes"
    m["recipes"].mkdir()
    m["recipe"] = m["recipes"] / "recipe.yaml"
    m["recipe"].write_text(yaml.safe_dump(recipe))
    m["root"] = root
    return m


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A miniature JA-VG-VQA-500 repository, plus two PNGs in its images/ (an input of `caption`)."""
    from PIL import Image

    root = write_ja_vg_vqa(tmp_path_factory.mktemp("vg") / "vg", n_images=2)
    (root / "images").mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (32, 24), color).save(root / "images" / f"{i}.png")
    return root


def cv_args(m, out) -> list[str]:
    return ["chat-vector", "--vlm", str(m["vlm"]), "--en-base", str(m["en"]), "--ja-base", str(m["ja"]),
            "--out", str(out), "--quiet"]


def merge_args(m, out) -> list[str]:
    return ["merge", str(m["recipe"]), str(out), "--quiet"]


def eval_args(m, data, out, *extra) -> list[str]:
    return ["eval", "--model", str(m["vlm"]), "--bench", "ja-vg-vqa-500", "--data", str(data), "--protocol", "llm-jp",
            "--max-new-tokens", "4", "--out", str(out), "--quiet", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(models, data, tmp_path_factory) -> Path:
    """One finished eval run (an input of `compare`)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(eval_args(models, data, out)) == 0
    return out


# (name, argv builder(m, data, run, tmp) -> argv, the inputs hashed, the message part)
OVERLAPS = [
    ("chat-vector out=ja-base --force", lambda m, d, r, t: [*cv_args(m, m["ja"]), "--force"], "output is the input"),
    ("chat-vector out=vlm --force", lambda m, d, r, t: [*cv_args(m, m["vlm"]), "--force"], "output is the input"),
    ("chat-vector out=en-base", lambda m, d, r, t: cv_args(m, m["en"]), "output is the input"),
    ("chat-vector out=dir of all inputs --force", lambda m, d, r, t: [*cv_args(m, m["root"]), "--force"],
     "output contains the input"),
    ("chat-vector out inside ja-base", lambda m, d, r, t: cv_args(m, m["ja"] / "merged"), "output lies inside the input"),
    ("chat-vector out=symlink to ja-base --force", lambda m, d, r, t: [*cv_args(m, t / "link-to-ja"), "--force"],
     "output is the input"),
    ("chat-vector out=. --force", lambda m, d, r, t: [*cv_args(m, "."), "--force"], "output is or contains the current"),
    ("chat-vector out=.. --force", lambda m, d, r, t: [*cv_args(m, ".."), "--force"], "output is or contains the current"),
    ("merge out=recipe dir --force", lambda m, d, r, t: [*merge_args(m, m["recipes"]), "--force"],
     "output contains the input"),
    ("merge out=recipe's target --force", lambda m, d, r, t: [*merge_args(m, m["ja"]), "--force"], "output is the input"),
    ("merge out inside vlm", lambda m, d, r, t: merge_args(m, m["vlm"] / "x"), "output lies inside the input"),
    ("compare out=its input run --force", lambda m, d, r, t: ["compare", str(r), "--out", str(r), "--force"],
     "output is the input"),
    ("compare out=.", lambda m, d, r, t: ["compare", str(r), "--out", "."], "output is or contains the current"),
    ("eval out=data dir --force", lambda m, d, r, t: eval_args(m, d, d, "--force"), "output is the input"),
    ("eval out inside the model", lambda m, d, r, t: eval_args(m, d, m["vlm"] / "run"), "output lies inside the input"),
    ("caption out=images dir --force", lambda m, d, r, t: ["caption", str(d / "images"), "--model", str(m["vlm"]),
                                                          "--out", str(d / "images"), "--quiet", "--force"],
     "output is the input"),
    ("zoo bar out=.", lambda m, d, r, t: ["zoo", "bar", "--out", "."],
     "output is or contains the current"),
]


@pytest.mark.parametrize("name, argv, message", OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_output_overlapping_an_input_is_refused(name, argv, message, models, data, run, tmp_path, capsys, monkeypatch):
    (tmp_path / "link-to-ja").symlink_to(models["ja"])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    inputs = (models["root"], data, run)
    before = snapshot(*inputs)
    capsys.readouterr()
    assert main(argv(models, data, run, tmp_path)) == 2
    line = error_line(capsys)
    assert message in line and "choose another output path" in line, line
    assert snapshot(*inputs) == before
    assert sorted(p.name for p in work.iterdir()) == []
    for parent in (models["root"], models["root"].parent, data, data.parent, run.parent, tmp_path, models["ja"]):
        assert debris(parent) == []


API_OVERLAPS = [
    ("chat_vector(out=ja_base, force=True)", lambda m: chat_vector(m["vlm"], m["en"], m["ja"], m["ja"], force=True,
                                                                   progress=False)),
    ("merge(recipe, out=en_base, force=True)", lambda m: merge(m["recipe"], m["en"], force=True, progress=False)),
    ("extract_delta(out_file inside the vlm)", lambda m: extract_delta(m["vlm"], m["en"], m["vlm"] / "delta.safetensors",
                                                                       progress=False)),
    ("apply_delta(out=the delta's file, force=True)",
     lambda m: apply_delta(m["delta"], m["ja"], m["delta"], vlm=m["vlm"], force=True, progress=False)),
]


@pytest.mark.parametrize("name, call", API_OVERLAPS, ids=[c[0] for c in API_OVERLAPS])
def test_python_api_refuses_overlapping_outputs(name, call, models, tmp_path):
    models = {**models, "delta": tmp_path / "delta.safetensors"}
    models["delta"].write_bytes(b"not really a delta, but an input all the same")
    before = snapshot(models["root"], models["delta"])
    with pytest.raises(VlmMergeError, match="output (is|contains|lies inside) the input"):
        call(models)
    assert snapshot(models["root"], models["delta"]) == before


def _start(argv: list[str], where: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"paused-{where}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(marker), where, *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended before pausing: {proc.returncode}\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "the command never reached the pause"
        time.sleep(0.05)
    return proc, marker


@pytest.mark.slow
@pytest.mark.parametrize("command", ["chat-vector", "merge"])
def test_sigkill_mid_write_leaves_only_pid_named_debris_that_the_next_run_cleans(command, models, tmp_path):
    out = tmp_path / "out"
    argv = cv_args(models, out) if command == "chat-vector" else merge_args(models, out)
    before = snapshot(models["root"])
    proc, _ = _start(argv, "compute", tmp_path)
    proc.kill()
    proc.wait()
    assert not out.exists()  # no partial output at the target
    left = debris(tmp_path)
    assert left and all(re.fullmatch(rf"\.out\.tmp-{proc.pid}-[0-9a-f]{{8}}", n) for n in left), left
    assert any((tmp_path / n).iterdir() for n in left)  # it was killed while writing
    assert main(argv) == 0  # the same command, no --force
    assert (out / "config.json").is_file() and debris(tmp_path) == []
    assert snapshot(models["root"]) == before


@pytest.mark.slow
def test_ctrl_c_mid_merge_leaves_nothing(models, tmp_path):
    out = tmp_path / "out"
    proc, _ = _start(merge_args(models, out), "compute", tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["vlm-merge: interrupted; nothing was written"]
    assert not out.exists() and debris(tmp_path) == []


@pytest.mark.slow
def test_sigkill_before_the_first_eval_item_does_not_block_the_corrected_command(models, data, tmp_path, capsys):
    out = tmp_path / "run"
    proc, _ = _start(eval_args(models, data, out), "generate", tmp_path)
    proc.kill()
    proc.wait()
    assert not (out / "scores.json").exists()
    # a corrected command (other settings) is not refused: nothing was finished, so nothing is lost
    assert main(eval_args(models, data, out, "--max-new-tokens", "3")) == 0
    assert {p.name for p in out.iterdir()} == {"run.json", "predictions.jsonl", "scores.json"}
    assert debris(tmp_path) == [] and debris(out) == []


@pytest.fixture
def mount(tmp_path):
    """mount(path, size, read_only): a tmpfs there, unmounted afterwards; the test is skipped if mount is not permitted."""
    mounted = []

    def do(path: Path, size: str = "1m", read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)
        (path / "sub").mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield do
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill a file system up, then free `leave` bytes again (room for the first files of an output)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - leave))


CAPTION = lambda m, d, r, out: ["caption", str(d / "images"), "--model", str(m["vlm"]), "--out", str(out),  # noqa: E731
                                 "--quiet", "--device", "cpu", "--max-new-tokens", "3"]
# (name, argv(models, data, run, out), bytes left free on the disk, what the line says is left)
DISK_FULL = [
    ("chat-vector", lambda m, d, r, out: cv_args(m, out), 0, "nothing"),
    ("merge", lambda m, d, r, out: merge_args(m, out), 0, "nothing"),
    ("eval", lambda m, d, r, out: eval_args(m, d, out), 0, "nothing"),
    ("eval, room for some items", lambda m, d, r, out: eval_args(m, d, out), 8192, "kept"),
    ("compare", lambda m, d, r, out: ["compare", str(r), "--out", str(out)], 0, "nothing"),
    ("compare, room for some files", lambda m, d, r, out: ["compare", str(r), "--out", str(out)], 8192, "nothing"),
    ("caption", CAPTION, 0, "nothing"),
    ("caption, room for the captions", CAPTION, 8192, "kept"),
]


@pytest.mark.parametrize("name, argv, leave, left", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_disk_full_is_one_line_and_leaves_nothing_or_the_finished_items(name, argv, leave, left, models, data, run, mount,
                                                                          tmp_path, capsys):
    disk = mount(tmp_path / "disk")
    _fill(disk, leave)
    out = disk / "sub" / "out"
    before = snapshot(models["root"], data, run)
    capsys.readouterr()
    assert main(argv(models, data, run, out)) == 2
    said = {"nothing": "nothing was written", "kept": f"the finished items are kept in {out}: run the same command to resume"}
    assert error_line(capsys) == f"vlm-merge: error: {out}: No space left on device; free disk space or choose another --out; {said[left]}"
    assert snapshot(models["root"], data, run) == before
    if left == "nothing":
        assert sorted(p.name for p in (disk / "sub").iterdir()) == []
        return
    assert sorted(p.name for p in (disk / "sub").iterdir()) == ["out"]
    (disk / "filler").unlink()
    assert main(argv(models, data, run, out)) == 0  # the same command resumes once there is room
    assert sorted(p.name for p in (disk / "sub").iterdir()) == ["out"] and debris(out) == []


READ_ONLY = [
    ("chat-vector", lambda m, d, out: cv_args(m, out)),
    ("merge", lambda m, d, out: merge_args(m, out)),
    ("eval", lambda m, d, out: eval_args(m, d, out)),
    ("caption", lambda m, d, out: ["caption", str(d / "images"), "--model", str(m["vlm"]), "--out", str(out), "--quiet"]),
    ("compare", lambda m, d, out: ["compare", str(d), "--out", str(out)]),
]


@pytest.mark.parametrize("name, argv", READ_ONLY, ids=[c[0] for c in READ_ONLY])
def test_read_only_output_is_one_line(name, argv, models, data, run, mount, tmp_path, capsys):
    disk = mount(tmp_path / "ro", read_only=True)
    out = disk / "sub" / "out"
    capsys.readouterr()
    assert main(argv(models, run.parent if name == "compare" else data, out)) == 2
    assert error_line(capsys) == (f"vlm-merge: error: {out}: cannot write to {disk / 'sub'} (Read-only file system); "
                                  "choose another --out")


def test_force_replaces_only_after_the_new_output_is_complete(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("the previous output")
    # a failing run with --force (an unknown method) leaves the previous output as it was
    bad = tmp_path / "bad.yaml"
    bad.write_text(models["recipe"].read_text().replace("task_arithmetic", "no_such_method"))
    assert main(["merge", str(bad), str(out), "--quiet", "--force"]) == 2
    error_line(capsys)
    assert (out / "precious.txt").read_text() == "the previous output" and debris(tmp_path) == []
    # a debris dir of a dead process (a set-aside old output whose target exists) is cleaned, ours is replaced
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.old-{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    live = tmp_path / f".other.tmp-{os.getpid()}-0123abcd"  # a live owner's temp dir: kept
    live.mkdir()
    assert main([*merge_args(models, out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()
    assert debris(tmp_path) == [live.name]


def test_eval_failing_before_its_first_item_leaves_no_run_dir(models, data, tmp_path, capsys, monkeypatch):
    from transformers import GenerationMixin

    def broken(self, *args, **kwargs):
        raise VlmMergeError("generation failed (simulated)")

    monkeypatch.setattr(GenerationMixin, "generate", broken)
    out = tmp_path / "run"
    assert main(eval_args(models, data, out)) == 2
    error_line(capsys)
    assert not out.exists() and debris(tmp_path) == []
    monkeypatch.undo()
    assert main(eval_args(models, data, out, "--max-new-tokens", "3")) == 0  # the corrected command, no --force


def _evolve_config(m, tmp_path: Path, benchmark: Path) -> Path:
    cfg = {"sources": {"vlm": str(m["vlm"]), "base_model": str(m["en"]), "target": str(m["ja"]), "models": ["vlm"]},
           "method": "task_arithmetic", "genome": {"params": {"weight": [0.0, 1.5]}},
           "fitness": {"benchmark": str(benchmark), "kind": "loglik", "metrics": {"loglik": 1.0}, "limit": 4},
           "cmaes": {"popsize": 2, "max_evaluations": 2, "seed": 0}, "threads": 1}
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


EVOLVE = [
    ("out=ja-base --force", lambda m, t: [str(_evolve_config(m, t, t / "missing.jsonl")), "--out", str(m["ja"]), "--force"],
     "output is the input"),
    ("out=dir of the config --force", lambda m, t: [str(_evolve_config(m, t, t / "missing.jsonl")), "--out", str(t),
                                                     "--force"], "output contains the input"),
]


@pytest.mark.parametrize("name, argv, message", EVOLVE, ids=[c[0] for c in EVOLVE])
def test_evolve_output_overlapping_an_input_is_refused(name, argv, message, models, tmp_path, capsys):
    before = snapshot(models["root"])
    assert main(["evolve", *argv(models, tmp_path), "--quiet"]) == 2
    assert message in error_line(capsys)
    assert snapshot(models["root"]) == before and (tmp_path / "evolve.yaml").is_file()


def test_evolve_force_with_bad_input_keeps_the_previous_run(models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"previous": "run"}\n')
    config = _evolve_config(models, tmp_path, tmp_path / "missing.jsonl")
    assert main(["evolve", str(config), "--out", str(out), "--force", "--quiet"]) == 2
    error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]
    assert (out / "log.jsonl").read_text() == '{"previous": "run"}\n' and debris(tmp_path) == []


def test_evolve_read_only_output_is_one_line(models, mount, tmp_path, capsys):
    disk = mount(tmp_path / "ro", read_only=True)
    out = disk / "sub" / "run"
    config = _evolve_config(models, tmp_path, tmp_path / "missing.jsonl")
    assert main(["evolve", str(config), "--out", str(out), "--quiet"]) == 2
    assert error_line(capsys) == (f"vlm-merge: error: {out}: cannot write to {disk / 'sub'} (Read-only file system); "
                                  "choose another --out")


def _ctrl_c_at_generate(monkeypatch, after: int) -> None:
    """A Ctrl-C (KeyboardInterrupt) at eval's generation call number `after + 1`."""
    from transformers import GenerationMixin

    real, calls = GenerationMixin.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)


# (name, argv extra, whether a finished run is in --out first, generate calls before Ctrl-C, the line, out left)
INTERRUPTS = [
    ("new run, no item", (), False, 0, "vlm-merge: interrupted; no item had finished; nothing was written", "none"),
    ("new run, one item", ("--batch-size", "1"), False, 1,
     "vlm-merge: interrupted; 1 finished item is kept in {out}/predictions.jsonl; run the same command to resume", "partial"),
    ("--force over a run", ("--force", "--max-new-tokens", "3"), True, 0,
     "vlm-merge: interrupted; the new run was discarded (--force replaces a run only when it is complete); {out} is as it was",
     "as before"),
]


@pytest.mark.parametrize("name, extra, existing, after, said, left", INTERRUPTS, ids=[c[0] for c in INTERRUPTS])
def test_eval_ctrl_c_says_what_is_really_kept(name, extra, existing, after, said, left, models, data, tmp_path, capsys,
                                              monkeypatch):
    out = tmp_path / "run"
    if existing:
        assert main(eval_args(models, data, out)) == 0
    before = snapshot(out) if existing else {}
    capsys.readouterr()
    with monkeypatch.context() as m:
        _ctrl_c_at_generate(m, after)
        assert main(eval_args(models, data, out, *extra)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [said.format(out=out)], err
    assert debris(tmp_path) == []
    if left == "none":
        assert not out.exists()
    elif left == "partial":
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 1 and not (out / "scores.json").exists()
    else:
        assert snapshot(out) == before
