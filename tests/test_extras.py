"""The pip extras (#30) in this environment (where all are installed): what each needs comes from the
installed metadata, a missing one is one line naming the extra, and a core command imports no other
command's module. The real light install is tests/test_wheel.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import error_line
from vlm_merge import extras
from vlm_merge.cli import COMMAND_GROUPS, main
from vlm_merge.errors import VlmMergeError


def test_every_extra_is_installed_here():
    assert {g.extra for g in COMMAND_GROUPS} <= {"eval", "evolve", "demo", "gguf"}
    for extra in ("eval", "evolve", "demo", "gguf", "llamacpp", "all", "test"):
        assert extras.missing_requirements(extra) == [], extra


def test_extras_name_their_distributions_and_imply_eval(monkeypatch):
    """With `datasets` and `ray` reported absent: eval lacks datasets, evolve (which implies eval) both, the demo
    (no Ray) only datasets; the core needs neither."""
    monkeypatch.setattr(extras, "_installed", lambda name: name not in ("datasets", "ray"))
    assert extras.missing_requirements("eval") == ["datasets"]
    assert sorted(extras.missing_requirements("evolve")) == ["datasets", "ray"]
    assert extras.missing_requirements("demo") == ["datasets"]
    assert sorted(extras.missing_requirements("all")) == ["datasets", "ray"]


@pytest.mark.parametrize("argv, extra", [(["eval", "--help"], "eval"), (["-v", "compare", "a", "b"], "eval"),
                                         (["evolve", "c.yaml", "--workers", "2"], "evolve"),
                                         (["demo", "--quick"], "demo"), (["zoo", "bar", "--out", "x"], "demo")])
def test_missing_extra_is_one_line_exit_2(monkeypatch, capsys, argv, extra):
    monkeypatch.setattr(extras, "_installed", lambda name: name not in ("fugashi", "ray"))
    assert main(argv) == 2
    command = next(a for a in argv if not a.startswith("-"))
    missing = "ray, fugashi" if extra == "evolve" else "fugashi"  # the extra's own first, then eval's
    assert error_line(capsys) == (f"vlm-merge: error: 'vlm-merge {command}' needs the {extra} extra: "
                                  f"pip install 'vlm-merge[{extra}]' (not installed: {missing})")


def test_core_commands_run_without_the_extras(monkeypatch, capsys):
    monkeypatch.setattr(extras, "_installed", lambda name: name not in ("fugashi", "cma", "ray"))
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listing = capsys.readouterr().out
    assert "needs the eval extra: pip install 'vlm-merge[eval]'" in listing and "needs the demo extra" in listing
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--help"])
    assert exit_.value.code == 0 and "recipe" in capsys.readouterr().out


def test_a_core_command_imports_no_other_command_module():
    code = ("import sys\nfrom vlm_merge.cli import main\ntry:\n    main(['validate', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('eval', 'PIL', 'matplotlib', 'datasets', 'cma')"
            " or m in ('vlm_merge.evolve', 'vlm_merge.world.demo', 'vlm_merge.cli.world')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_run_evolve_without_its_extra_is_one_line_before_anything_is_written(monkeypatch, tmp_path):
    """The Python API says what the CLI says; Ray, which only `workers > 0` needs, is not asked for here (the
    demo extra runs in-process searches without it): without it the run goes on to read its config."""
    from vlm_merge.evolve import run_evolve

    monkeypatch.setattr(extras, "_installed", lambda name: name not in ("cma", "ray"))
    with pytest.raises(VlmMergeError) as e:
        run_evolve({}, tmp_path / "run")
    assert str(e.value) == ("vlm_merge.evolve.run_evolve needs the evolve extra: pip install 'vlm-merge[evolve]' "
                            "(not installed: cma)")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(extras, "_installed", lambda name: name != "ray")
    with pytest.raises(VlmMergeError, match=r"^evolve config sources: a required key is missing; add it$"):
        run_evolve({}, tmp_path / "run")


def test_run_demo_without_its_extra_is_one_line_before_anything_is_written(monkeypatch, tmp_path):
    from vlm_merge.world.demo import run_demo

    monkeypatch.setattr(extras, "_installed", lambda name: name != "fugashi")
    with pytest.raises(VlmMergeError) as e:
        run_demo(tmp_path / "demo", quick=True, progress=False)
    assert str(e.value) == ("vlm_merge.world.demo.run_demo needs the demo extra: pip install 'vlm-merge[demo]' "
                            "(not installed: fugashi)")
    assert not (tmp_path / "demo").exists()
