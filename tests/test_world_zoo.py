"""The shipped miniature zoo (assets/miniature-zoo): real HF checkpoints that vlm-merge and transformers read,
an English VLM that answers English questions, and Chat Vector helping on Japanese ones."""

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
