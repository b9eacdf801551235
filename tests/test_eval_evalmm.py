"""llm-jp-eval-mm 0.4.1 interop (#33): its metrics (anchored on the values eval-mm's own tests assert) and its
prediction files read by `vlm-merge score`. The equality with eval-mm itself, run in its own environment, is
`bench/evalmm_equal.py` (bench/results/evalmm_equal.md)."""

from __future__ import annotations

import json

import pytest

from eval.evalmm import evalmm_records, normalize_evalmm
from eval.metrics import score_predictions
from tests.conftest import error_line
from tests.test_eval_heron import write_heron_dir
from vlm_merge.cli import main


def test_rougel_matches_evalmm_s_own_test_values():
    """eval-mm 0.4.1 rougel_scorer.py test_rouge_ja / test_rougel_scorer: 100, 66.66, 50.0."""
    refs = ["私は猫です。", "たかしが公園で遊んでいた。", "池のほとりです。"]
    preds = ["私は猫です。", "たかしが公園にいたようだ。", "ここは湖の岸です。"]
    rows = score_predictions(refs, preds, ["evalmm-rougel"], resamples=10).per_sample
    assert rows[0]["evalmm_rougel"] == 100.0
    assert rows[1]["evalmm_rougel"] == pytest.approx(66.66, rel=0.01)
    assert rows[2]["evalmm_rougel"] == pytest.approx(50.0, rel=0.01)


def test_exact_and_substring_are_raw_string_tests():
    refs, preds = ["私は猫です。", "私は犬です。", "ＡＢＣ"], ["私は犬です。", "私は犬です。", "ABCです"]
    report = score_predictions(refs, preds, ["evalmm-exact-match", "evalmm-substring-match", "exact-match"], resamples=10)
    assert [r["evalmm_exact_match"] for r in report.per_sample] == [0.0, 1.0, 0.0]  # eval-mm's test: [0, 1]
    assert [r["evalmm_substring_match"] for r in report.per_sample] == [0.0, 1.0, 0.0]  # no NFKC: ＡＢＣ not in ABC
    assert report.per_sample[2]["exact_match"] == 0.0 and normalize_evalmm("ＡＢＣ 😀  x") == "ABC x"


def test_score_reads_evalmm_prediction_files(tmp_path, capsys):
    scored = tmp_path / "prediction.jsonl"  # eval-mm's form after scoring
    scored.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"question_id": "0", "text": "私は猫です。", "answer": "私は猫です。", "input_text": "何？", "rougel": 100.0},
        {"question_id": "1", "text": "私は犬です。", "answer": "私は猫です。", "input_text": "何？", "rougel": 60.0},
    ]), encoding="utf-8")
    assert main(["score", str(scored), "--metrics", "evalmm-exact-match,evalmm-rougel"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "llm-jp-eval-mm" and out["n"] == 2
    assert out["scores"]["evalmm_exact_match"]["mean"] == 0.5

    bare = tmp_path / "bare.jsonl"  # eval-mm's form after inference: no answers
    bare.write_text("".join(json.dumps({"question_id": i, "text": f"green色です。({i})"}) + "\n" for i in (3, 5)),
                    encoding="utf-8")
    assert main(["score", str(bare), "--metrics", "evalmm-exact-match"]) == 2
    assert "'answer' is NoneType, not a string; pass --bench" in error_line(capsys)
    heron = write_heron_dir(tmp_path / "heron")  # answers taken from the benchmark by question_id
    assert main(["score", str(bare), "--metrics", "evalmm-exact-match", "--bench", "japanese-heron-bench",
                 "--data", str(heron)]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]["evalmm_exact_match"]["mean"] == 0.5  # 3 is green, 5 is blue
    bare.write_text(json.dumps({"question_id": 99, "text": "x"}) + "\n", encoding="utf-8")
    assert main(["score", str(bare), "--bench", "japanese-heron-bench", "--data", str(heron)]) == 2
    assert "question_id '99' is not in benchmark japanese-heron-bench" in error_line(capsys)


def test_evalmm_records_use_evalmm_names_and_types():
    ours = [{"question_id": "7", "prediction": "p", "answer": "a", "question": "q", "evalmm_rougel": 12.5,
             "evalmm_exact_match": 1.0, "llm_as_a_judge": 4.0, "heron_evalmm_score": 6.0, "heron_evalmm_score_gpt": 9.0}]
    assert evalmm_records(ours) == [{"question_id": "7", "text": "p", "answer": "a", "input_text": "q", "rougel": 12.5,
                                     "exact-match": 1, "llm-as-a-judge": 4,
                                     "heron-bench": {"score": 6, "score_gpt": 9}}]


def test_evalmm_evaluation_line():
    from eval.evalmm import evalmm_evaluation
    from eval.judge_metrics import evalmm_heron_details

    preds = [{"evalmm_rougel": 50.0, "evalmm_exact_match": 1.0, "heron_evalmm_score": s, "heron_evalmm_score_gpt": g,
              "meta": {"category": c}} for s, g, c in ((6, 9, "conv"), (-1, -1, "detail"), (8, 8, "complex"))]
    line = evalmm_evaluation(preds)
    assert line["rougel"] == {"overall_score": 50.0, "details": {"rougel": 50.0}}
    assert line["exact-match"]["details"] == {"exact_match": 1.0}
    details = evalmm_heron_details([{"score": 6, "score_gpt": 9}, {"score": -1, "score_gpt": -1},
                                    {"score": 8, "score_gpt": 8}], ["conv", "detail", "complex"])
    assert line["heron-bench"]["overall_score"] == pytest.approx(details["overall_rel"])
    assert line["heron-bench"]["details"]["parse_error_count"] == 1.0 and "detail_rel" not in line["heron-bench"]["details"]
