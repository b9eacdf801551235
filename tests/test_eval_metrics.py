"""Metrics: Sakana's Japanese ROUGE (golden values), strict Japanese both ways, exact/substring match,
the reproducible bootstrap, and the `evaluate` module loaded by path without the network."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from eval.japanese_text import JapaneseDetector, MecabTokenizer, normalize_japanese
from eval.metrics import (
    BUILTIN_SCORERS,
    DEFAULT_SCORERS,
    ROUGE_JA_EVALUATE_MODULE,
    SCORER_ENTRY_POINTS,
    ExactMatch,
    RougeJa,
    StrictJapaneseRouge,
    all_scorers,
    extra_scorers,
    bootstrap_aggregate,
    check_meta,
    get_scorer,
    make_scorers,
    registered_scorers,
    score_predictions,
)
from vlm_merge.errors import VlmMergeError

GOLDEN = [  # reference, prediction, rouge1, rouge2, rougeL
    ("たかしが公園で遊んでいた。", "たかしが公園にいたようだ。", 66.67, 37.50, 66.67),
    ("池のほとりです。", "ここは湖の岸です。", 50.00, 20.00, 50.00),
    ("東京タワーです。", "この写真に写っている有名な建物の名前は「東京タワー」です。", 36.36, 20.00, 36.36),
    ("すごーーーい猫です😺", "すごーい猫です", 100.0, 100.0, 100.0),
    ("２匹の猿がいます。", "2匹の猿がいます。", 100.0, 100.0, 100.0),
]


@pytest.fixture(scope="module")
def rouge() -> RougeJa:
    return RougeJa()


@pytest.mark.parametrize(("ref", "pred", "r1", "r2", "rl"), GOLDEN)
def test_rouge_ja_golden_values(rouge, ref, pred, r1, r2, rl):
    got = rouge.score_one(ref, pred)
    assert got["rouge1"] == pytest.approx(r1, abs=0.005)
    assert got["rouge2"] == pytest.approx(r2, abs=0.005)
    assert got["rougeL"] == pytest.approx(rl, abs=0.005)


def test_normalisation_and_tokens():
    assert normalize_japanese("すごーーーい猫です😺 ✨") == "すごーい猫です"  # emoji gone, long vowel collapsed
    assert normalize_japanese("２匹の　猿") == "2匹の猿"  # full width digit, space between Japanese removed
    assert normalize_japanese("a  b\n c") == "a b c"
    tok = MecabTokenizer()
    assert tok.tokenize("たかしが公園で遊んでいた。") == ["たかし", "が", "公園", "で", "遊ん", "で", "い", "た", "。"]
    assert "unidic_lite" in tok.dictionary()


def test_rouge_is_not_whitespace_or_character_based(rouge):
    # MeCab: 公園/で/遊ん/だ vs 公園/で/遊ぶ -> P 2/3, R 2/4; characters would give 72.7, whitespace 0
    assert rouge.score_one("公園で遊んだ", "公園で遊ぶ")["rouge1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4) * 100)
    assert rouge.score_one("猫です", "")["rougeL"] == 0.0


def test_strict_japanese_blanks_only_non_japanese_predictions_to_japanese_references(rouge):
    detector = JapaneseDetector()
    assert detector.p_japanese("これは公園の池のほとりです。") > 0.9
    assert detector.p_japanese("This is the shore of a pond in the park.") < 0.1
    strict = StrictJapaneseRouge(rouge=rouge, detector=detector)
    refs = ["池のほとりです。", "東京タワーです。", "It is a pond.", "It is a pond.", "東京タワーです。"]
    preds = ["ここは池のほとりです。", "It is 東京タワー, a famous tower in Tokyo.", "It is a pond.", "これは池です。",
             "This photo shows 東京タワー."]
    out = strict.score(refs, preds)
    plain = rouge.score(refs, preds)
    # Japanese ref + Japanese pred: unchanged
    assert out["rougeL_ja"][0] == plain["rougeL"][0] > 0 and out["non_japanese"][0] == 0
    # Japanese ref + English pred: scored as the empty string, although plain ROUGE would give it credit
    assert plain["rougeL"][1] > 0 and out["rougeL_ja"][1] == 0 and out["non_japanese"][1] == 1
    # English ref: never blanked, whatever the prediction's language
    assert out["rougeL_ja"][2] == plain["rougeL"][2] == 100 and out["non_japanese"][2:4] == [0, 0]
    assert out["rougeL_ja"][3] == plain["rougeL"][3]
    # mixed text that fastText still calls Japanese (P >= 0.5) keeps its score
    assert detector.p_japanese(preds[4]) >= 0.5 > detector.p_japanese(preds[1])
    assert out["rougeL_ja"][4] == plain["rougeL"][4] > 0 and out["non_japanese"][4] == 0


def test_exact_and_substring_match():
    report = score_predictions(["赤", "赤い丸です。", "２つ"], ["赤", "それは赤い丸です。", "3つ"], ["exact-match", "substring-match"])
    assert [r["exact_match"] for r in report.per_sample] == [1.0, 0.0, 0.0]
    assert [r["substring_match"] for r in report.per_sample] == [1.0, 1.0, 0.0]
    assert report.aggregate["substring_match"].mean == pytest.approx(2 / 3)
    assert score_predictions(["２つ"], ["2つ"], ["exact-match"]).per_sample[0]["exact_match"] == 1.0  # normalised


def test_content_accuracy_reads_each_questions_attribute_and_value():
    meta = [
        {"attribute": "count", "value": "2", "lang": "ja"},
        {"attribute": "count", "value": "2", "lang": "ja"},  # answered in English: not a Japanese answer
        {"attribute": "color", "value": "red", "lang": "ja"},
        {"attribute": "color", "value": "red", "lang": "ja"},  # names a second colour too
        {"attribute": "object", "value": "blue square", "lang": "en"},
        {"attribute": "position", "value": "0", "lang": "ja"},
    ]
    preds = ["二つです。", "two", "赤", "赤と青", "there is a blue square at the top left.", "左上"]
    report = score_predictions([""] * len(preds), preds, ["content-accuracy"], meta=meta)
    assert [r["content_accuracy"] for r in report.per_sample] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert report.aggregate["content_accuracy"].mean == pytest.approx(4 / 6)
    assert "content-accuracy" not in DEFAULT_SCORERS  # only the miniature world's files carry these columns
    with pytest.raises(VlmMergeError, match="question 0 has no 'attribute' column"):
        score_predictions(["赤"], ["赤"], ["content-accuracy"])
    with pytest.raises(VlmMergeError, match="question 0 has no 'lang' column"):
        score_predictions(["赤"], ["赤"], ["content-accuracy"], meta=[{"attribute": "color", "value": "red"}])
    with pytest.raises(VlmMergeError, match="question 1 has no 'value' column"):
        check_meta(["exact-match", "content-accuracy"], [meta[0], {"attribute": "count", "lang": "ja"}])
    check_meta(["rouge-ja", "exact-match"], [{}])  # the text metrics read no columns
    with pytest.raises(VlmMergeError, match="cannot score attribute 'size'"):
        score_predictions(["x"], ["x"], ["content-accuracy"], meta=[{"attribute": "size", "value": "1", "lang": "ja"}])


def test_content_accuracy_is_the_worlds_scorer_registered_by_entry_point():
    """One scoring path: eval finds the world's scorer through the `vlm_merge.scorers` entry point, and reads
    that group only for a metric it does not have built in (eval never imports the world itself)."""
    from vlm_merge.world.scoring import ContentAccuracy

    assert "content-accuracy" not in BUILTIN_SCORERS
    assert dict(registered_scorers()) == {"content-accuracy": ContentAccuracy}
    assert get_scorer("content-accuracy") is ContentAccuracy
    assert list(all_scorers()) == [*BUILTIN_SCORERS, *extra_scorers(), "content-accuracy"]
    assert set(extra_scorers()) == {"evalmm-rougel", "evalmm-exact-match", "evalmm-substring-match", "heron-bench",
                                    "heron-bench-evalmm", "llm-as-a-judge"}
    code = ("import sys; from eval.metrics import score_predictions as s; s(['a'], ['a'], ['exact-match']); "
            "assert 'vlm_merge.world' not in sys.modules, 'a built-in metric imported the world'; "
            "r = s([''], ['red'], ['content-accuracy'], meta=[{'attribute': 'color', 'value': 'red', 'lang': 'en'}]); "
            "assert r.per_sample == [{'content_accuracy': 1.0}] and 'vlm_merge.world.scoring' in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(("name", "value", "error"), [
    ("bleu", "eval.metrics:ExactMatch", "must name a Scorer subclass whose name is 'bleu'"),
    ("bleu", "eval.metrics:Aggregate", "must name a Scorer subclass"),
    ("bleu", "eval.no_such_module:Bleu", "cannot be loaded: No module named 'eval.no_such_module'"),
    ("bleu", "eval.metrics:NoSuchScorer", "cannot be loaded"),
    ("exact-match", "eval.metrics:ExactMatch", "the name is already taken"),
])
def test_a_bad_registered_scorer_is_one_line(monkeypatch, name, value, error):
    entry_points = [metadata.EntryPoint(name, value, SCORER_ENTRY_POINTS)]
    monkeypatch.setattr(metadata, "entry_points", lambda group: entry_points if group == SCORER_ENTRY_POINTS else [])
    registered_scorers.cache_clear()
    try:
        assert get_scorer("exact-match") is ExactMatch  # a built-in name never reads the group
        with pytest.raises(VlmMergeError, match=error):
            get_scorer("bleu")
    finally:
        registered_scorers.cache_clear()


def test_bootstrap_is_reproducible_and_brackets_the_mean():
    values = [0.0, 10.0, 20.0, 90.0, 100.0, 35.0, 50.0, 65.0]
    a, b = bootstrap_aggregate(values, seed=0), bootstrap_aggregate(values, seed=0)
    assert a == b
    assert a.mean == pytest.approx(46.25) and a.n == 8
    assert a.low < a.mid < a.high and a.low < a.mean < a.high
    assert bootstrap_aggregate(values, seed=1) != a  # the seed matters
    assert bootstrap_aggregate([42.0] * 5).low == 42.0
    with pytest.raises(VlmMergeError):
        bootstrap_aggregate([])


def test_score_predictions_per_sample_rows_and_aggregates():
    refs = [r for r, *_ in GOLDEN]
    preds = [p for _, p, *_ in GOLDEN]
    report = score_predictions(refs, preds)
    assert len(report.per_sample) == len(GOLDEN)
    assert set(report.per_sample[0]) == {"rouge1", "rouge2", "rougeL", "rouge1_ja", "rouge2_ja", "rougeL_ja",
                                          "non_japanese", "exact_match", "substring_match"}
    assert report.aggregate["rougeL"].mean == pytest.approx(sum(g[4] for g in GOLDEN) / len(GOLDEN), abs=0.01)
    assert report.aggregate["rougeL_ja"].mean == report.aggregate["rougeL"].mean  # all Japanese
    assert set(report.scorers) == set(DEFAULT_SCORERS)
    assert "unidic_lite" in report.scorers["rouge-ja"]["dictionary"]
    with pytest.raises(VlmMergeError, match="unknown metric 'bleu'"):
        make_scorers(["bleu"])
    with pytest.raises(VlmMergeError, match="2 references but 1 predictions"):
        score_predictions(["a", "b"], ["a"])


def test_evaluate_module_loads_by_path_offline(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    metric = evaluate.load(str(ROUGE_JA_EVALUATE_MODULE), keep_in_memory=True)
    refs = [r for r, *_ in GOLDEN[:3]]
    preds = [p for _, p, *_ in GOLDEN[:3]]
    out = metric.compute(predictions=preds, references=refs)
    assert out["rouge1"] == pytest.approx((66.67 + 50.0 + 36.36) / 3, abs=0.01)
    assert out["rougeL"] == pytest.approx((66.67 + 50.0 + 36.36) / 3, abs=0.01)
    strict = metric.compute(predictions=["It is a pond."], references=["池のほとりです。"], strict_japanese=True,
                            per_sample=True)
    assert strict["rougeL_ja"] == 0.0 and strict["non_japanese"] == 1.0 and len(strict["per_sample"]) == 1
