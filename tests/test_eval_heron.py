"""Japanese-Heron-Bench (#33): both on-disk forms read alike, and the published judge parsing and aggregation
(Heron's eval_heron_bench.py, llm-jp-eval-mm 0.4.1's heron-bench and llm-as-a-judge scorers)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS, load_benchmark
from eval.judge_metrics import (
    HERON_CATEGORIES,
    evalmm_heron_details,
    evalmm_heron_parse,
    heron_content,
    heron_overall,
    heron_parse,
    llm_judge_parse,
)
from vlm_merge.errors import VlmMergeError

COLOURS = ("red", "green", "blue")
# (image index, category) of each question: 3 images, every category, 7 questions
LAYOUT = [(0, "conv"), (0, "detail"), (0, "complex"), (1, "conv"), (1, "complex"), (2, "conv"), (2, "detail")]


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def heron_rows() -> list[dict]:
    return [{"question_id": i, "image": f"{img + 1:03d}.png", "category": cat, "image_category": "food",
             "context": f"{COLOURS[img]}の正方形の画像です。", "text": f"質問{i}: 何色ですか？",
             "reference": f"{COLOURS[img]}色です。({i})"} for i, (img, cat) in enumerate(LAYOUT)]


def write_heron_dir(root: Path) -> Path:
    """turing-motors' form: questions_ja.jsonl, answers_gpt4.jsonl, images/."""
    (root / "images").mkdir(parents=True)
    rows = heron_rows()
    for img, colour in enumerate(COLOURS):
        (root / "images" / f"{img + 1:03d}.png").write_bytes(_png(colour))
    (root / "questions_ja.jsonl").write_text("".join(json.dumps(
        {k: r[k] for k in ("question_id", "image", "category", "image_category", "context", "text")},
        ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (root / "answers_gpt4.jsonl").write_text("".join(json.dumps(
        {"question_id": r["question_id"], "images": r["image"], "image_category": "food", "prompt": r["text"],
         "answer_id": "", "model_id": "gpt-4-0125-preview", "text": r["reference"]}, ensure_ascii=False) + "\n"
        for r in reversed(rows)), encoding="utf-8")  # another order: joined by question_id
    return root


def write_heron_parquet(path: Path) -> Path:
    """llm-jp's copy: one parquet, images embedded, `answer` a dict keyed by model name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = heron_rows()
    table = pa.table({
        "question_id": [r["question_id"] for r in rows],
        "image": [{"bytes": _png(COLOURS[int(r["image"][:3]) - 1]), "path": r["image"]} for r in rows],
        "category": [r["category"] for r in rows],
        "image_category": [r["image_category"] for r in rows],
        "context": [r["context"] for r in rows],
        "text": [r["text"] for r in rows],
        "answer": [{"gpt-4-0125-preview": r["reference"], "claude-3-opus-20240229": "別の答え"} for r in rows],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_heron_is_registered():
    spec = BENCHMARKS["japanese-heron-bench"]
    assert (spec.hf_id, spec.split, spec.schema) == ("Silviase/Japanese-Heron-Bench", "train", "heron")


def test_both_forms_give_the_same_questions(tmp_path):
    from_dir = load_benchmark("japanese-heron-bench", write_heron_dir(tmp_path / "heron"))
    from_parquet = load_benchmark("japanese-heron-bench", write_heron_parquet(tmp_path / "llmjp" / "train.parquet"))
    for bench in (from_dir, from_parquet):
        assert bench.schema == "heron"
        d = bench.describe()
        assert (d["questions_in_split"], d["images_in_split"]) == (7, 3)
        assert [q.meta["category"] for q in bench.questions] == [c for _, c in LAYOUT]
        assert bench.questions[4].answer == "green色です。(4)"  # GPT-4's answer, not claude's
        assert bench.questions[4].question == "質問4: 何色ですか？"
        assert bench.questions[4].meta["context"] == "greenの正方形の画像です。"
        assert bench.image(bench.questions[5].image_key).getpixel((0, 0)) == (0, 0, 255)
        bench.check_images()
    key = [(q.question_id, q.image_key, q.question, q.answer, dict(q.meta)) for q in from_dir.questions]
    assert key == [(q.question_id, q.image_key, q.question, q.answer, dict(q.meta)) for q in from_parquet.questions]
    # a Heron parquet given as a custom set is recognised by its columns
    assert load_benchmark(tmp_path / "llmjp" / "train.parquet").schema == "heron"


def test_heron_dir_errors(tmp_path):
    root = write_heron_dir(tmp_path / "heron")
    (root / "answers_gpt4.jsonl").unlink()
    with pytest.raises(VlmMergeError, match="no answers_gpt4.jsonl beside questions_ja.jsonl"):
        load_benchmark("japanese-heron-bench", root)
    root = write_heron_dir(tmp_path / "heron2")
    lines = (root / "answers_gpt4.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "answers_gpt4.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")  # drops question 6
    with pytest.raises(VlmMergeError, match="no answer text for question_id 6"):
        load_benchmark("japanese-heron-bench", root)
    root = write_heron_dir(tmp_path / "heron3")
    (root / "images" / "002.png").unlink()
    with pytest.raises(VlmMergeError, match="002.png"):
        load_benchmark("japanese-heron-bench", root).check_images()


def test_parquet_answer_without_gpt4_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question_id": [0], "image": [{"bytes": _png("red"), "path": "a.png"}],
                             "category": ["conv"], "context": ["c"], "text": ["q"],
                             "answer": [{"claude-3-opus-20240229": "a"}]}), path)
    with pytest.raises(VlmMergeError, match="answer has no 'gpt-4-0125-preview' entry .models: claude-3-opus-20240229"):
        load_benchmark("japanese-heron-bench", path)


# ---------------------------------------------------------------- published parsing and aggregation
def test_heron_prompt_is_heron_s():
    content = heron_content("文脈", "質問", "参照", "回答")
    assert content.startswith("[Context]\n文脈\n\n[Question]\n質問\n\n[Assistant 1]\n参照\n\n[End of Assistant 1]\n\n"
                              "[Assistant 2]\n回答\n\n[End of Assistant 2]\n\n[System]\nWe would like to request")
    assert content.endswith("language is not relevant to score.\n\nIf it is not relevant to the context, does not "
                            "answer directly, or says the wrong thing, give it a low score.\n\n")


@pytest.mark.parametrize("review, pair", [
    ("8 6\nAssistant 1 is better", (8.0, 6.0)),
    ("7,5\n", (7.0, 5.0)),
    ("9.5 3", (9.5, 3.0)),
    ("8  6", None),  # two spaces: three fields, as Heron's split(" ") sees it
    ("Scores: 8 6", None),
    ("8", None),
    ("", None),
])
def test_heron_parse(review, pair):
    assert heron_parse(review) == pair


def test_heron_aggregation_keeps_published_minus_ones():
    categories = ["conv", "conv", "detail", "complex"]
    model, ref = [4.0, -1.0, 5.0, 9.0], [8.0, -1.0, 10.0, 9.0]
    out = heron_overall(model, ref, categories)
    assert out["conv"] == pytest.approx(100 * 1.5 / 3.5)
    assert out["detail"] == pytest.approx(50.0) and out["complex"] == pytest.approx(100.0)
    assert out["overall"] == pytest.approx((100 * 1.5 / 3.5 + 50 + 100) / 3)


@pytest.mark.parametrize("reply, parsed", [
    ('```json\n{"score_gpt": 9, "score": 6}\n```', {"score": 6, "score_gpt": 9}),
    ('note {"a": 1} then {"score": 3, "score_gpt": 8}', {"score": 3, "score_gpt": 8}),
    ('{"score": 3}', {"score": -1, "score_gpt": -1}),
    ("no json", {"score": -1, "score_gpt": -1}),
])
def test_evalmm_heron_parse(reply, parsed):
    assert evalmm_heron_parse(reply) == parsed


def test_evalmm_heron_details():
    scores = [{"score": 5, "score_gpt": 10}, {"score": -1, "score_gpt": -1}, {"score": 8, "score_gpt": 8}]
    details = evalmm_heron_details(scores, ["conv", "detail", "conv"])
    assert set(details) == {"conv", "conv_rel", "parse_error_count", "overall", "overall_rel"}  # detail: mean -1, skipped
    assert details["conv_rel"] == pytest.approx(100 * 6.5 / 9)
    assert details["parse_error_count"] == 1 and details["overall"] == pytest.approx(12 / 3)
    assert details["overall_rel"] == pytest.approx(100 * 6.5 / 9 / len(HERON_CATEGORIES))
    assert not np.isnan(details["overall_rel"])


@pytest.mark.parametrize("reply, score", [("5", 5), ("Score: 4/5", 4), ("スコアは3です", 3), ("excellent", None)])
def test_llm_judge_parse(reply, score):
    assert llm_judge_parse(reply) == score
