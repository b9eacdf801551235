"""The shipped miniature zoo (assets/miniature-zoo): real HF checkpoints that vlm-merge and transformers read,
an English VLM that answers English questions, and Chat Vector beating the Japanese base in the VLM shell on
Japanese ones (by a few points: the bar of the issue, +10, is not reached; see EXPERIMENTS.md)."""

from __future__ import annotations

import json

import pytest

from vlm_merge.world import SHIPPED_ZOO, evaluate

pytestmark = pytest.mark.skipif(not (SHIPPED_ZOO / "zoo.json").exists(), reason="no prebuilt zoo under assets/")
N = 120  # questions per check: a few seconds each


def test_parts_are_ordinary_checkpoints():
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(SHIPPED_ZOO / "en-base").architectures == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(SHIPPED_ZOO / "ja-base").architectures == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(SHIPPED_ZOO / "en-vlm").architectures == ["LlavaForConditionalGeneration"]
    total = sum(f.stat().st_size for f in SHIPPED_ZOO.rglob("*") if f.is_file())
    assert total < 40e6


def test_inspect_names_the_parts(capsys):
    from vlm_merge.cli import main

    assert main(["inspect", str(SHIPPED_ZOO / "en-vlm"), "--base", str(SHIPPED_ZOO / "en-base")]) == 0
    out = capsys.readouterr().out
    assert "vision" in out and "projector" in out and "paired" in out


def _bar() -> dict:
    return json.loads((SHIPPED_ZOO / "bar.json").read_text())


def test_english_vlm_answers_english_questions():
    scores = evaluate.evaluate_model(SHIPPED_ZOO / "en-vlm", SHIPPED_ZOO / "data" / "en-test.jsonl", limit=N, rouge=False)
    assert scores.content.mean() >= _bar()["models"]["en-vlm@en"]["content_accuracy"] - 0.12


@pytest.mark.parametrize("name", ["ja-shell", "chat-vector"])
def test_recorded_bar_reproduces(name, tmp_path):
    """The merges behind assets/miniature-zoo/bar.json give the recorded answers, token for token."""
    from vlm_merge.world.experiment import chat_vector_model

    bar = _bar()
    scale, skip = (0.0, "none") if name == "ja-shell" else (bar["chosen_scale"], bar.get("chosen_skip", "none"))
    model = chat_vector_model(SHIPPED_ZOO, tmp_path / name, scale, skip)
    expected = bar["models"][name]["examples"]
    scores = evaluate.evaluate_model(model, SHIPPED_ZOO / "data" / "ja-test.jsonl", limit=len(expected), rouge=False)
    assert scores.predictions == expected


def test_chat_vector_beats_the_japanese_shell_on_the_whole_test_set(tmp_path):
    """What the shipped world shows (and the demo reports): Chat Vector at the dev-chosen scale answers more
    Japanese test questions correctly than the Japanese base in the VLM shell, paired CI above 0."""
    from vlm_merge.world.experiment import chat_vector_model

    bar = _bar()
    test = SHIPPED_ZOO / "data" / "ja-test.jsonl"
    shell = evaluate.evaluate_model(chat_vector_model(SHIPPED_ZOO, tmp_path / "shell", 0.0), test, rouge=False)
    cv = evaluate.evaluate_model(chat_vector_model(SHIPPED_ZOO, tmp_path / "cv", bar["chosen_scale"], bar["chosen_skip"]),
                                 test, rouge=False)
    d = evaluate.paired_bootstrap(cv.content, shell.content)
    assert d["diff"] == pytest.approx(bar["vs"]["ja-shell"]["diff"], abs=6e-4) and d["low"] > 0
    assert cv.content.size >= 800
