"""Interoperability with llm-jp-eval-mm 0.4.1 (`eval-mm` on PyPI): its metrics and its prediction files.

Metrics as eval-mm 0.4.1 computes them (`src/eval_mm/metrics/*.py`), so a number here equals eval-mm's for the same
predictions (`bench/evalmm_equal.py` shows it with eval-mm itself, installed in `bench/.venv-evalmm`):

- `evalmm-rougel`: ROUGE-L F x 100 of MeCab tokens (`fugashi.Tagger("-Owakati")`, unidic-lite) after eval-mm's
  normalisation (emoji removed, NFKC, whitespace collapsed; Sakana's uses neologdn instead of NFKC), per sample;
  the aggregate is the mean (eval-mm's `rougel`).
- `evalmm-exact-match` / `evalmm-substring-match`: `ref == pred` / `ref in pred` on the raw strings (no
  normalisation), mean.
- the judge metrics `llm-as-a-judge` and `heron-bench-evalmm` live in `eval.judge_metrics`.

Prediction files (eval-mm's `examples/sample.py`): `<result_dir>/<task_id>/<model_id>/prediction.jsonl`, one JSON
object per question, `{"question_id", "text"}` after inference and `{"question_id", "text", "answer",
"input_text", <metric>: <per-sample score>, ...}` after scoring; `evaluation.jsonl` holds one line
`{<metric>: {"overall_score", "details"}}`. `read_evalmm_predictions` turns either form into our records
(`answer`, `prediction`, `question`); `evalmm_records` / `evalmm_evaluation` turn our run's predictions into eval-mm's
scored `prediction.jsonl` lines and its `evaluation.jsonl` line.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from eval.japanese_text import MecabTokenizer, remove_emoji
from eval.metrics import Meta, Scorer
from vlm_merge.errors import VlmMergeError

EVALMM_VERSION = "0.4.1"
PREDICTION_FILE = "prediction.jsonl"  # eval-mm's names
EVALUATION_FILE = "evaluation.jsonl"
# our metric name -> eval-mm's metric name (its ScorerRegistry) and the per-sample column that carries it here
EVALMM_METRICS = {
    "evalmm-rougel": ("rougel", "evalmm_rougel"),
    "evalmm-exact-match": ("exact-match", "evalmm_exact_match"),
    "evalmm-substring-match": ("substring-match", "evalmm_substring_match"),
    "llm-as-a-judge": ("llm-as-a-judge", "llm_as_a_judge"),
    "heron-bench-evalmm": ("heron-bench", "heron_evalmm_score"),
}


def normalize_evalmm(text: str) -> str:
    """eval-mm 0.4.1's `MecabTokenizer.normalize_answer`: emoji removed, NFKC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", remove_emoji(text)).split())


@dataclass
class NfkcMecabTokenizer(MecabTokenizer):
    """MeCab tokens of eval-mm's normalisation."""

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize_evalmm(text)).split()


@dataclass
class EvalmmRougeL(Scorer):
    name: ClassVar[str] = "evalmm-rougel"
    fields: ClassVar[tuple[str, ...]] = ("evalmm_rougel",)
    description: ClassVar[str] = "llm-jp-eval-mm 0.4.1's rougel: ROUGE-L F x100, MeCab tokens after emoji removal + NFKC"

    tokenizer: NfkcMecabTokenizer = field(default_factory=NfkcMecabTokenizer)

    def __post_init__(self) -> None:
        from rouge_score.rouge_scorer import RougeScorer

        self._scorer = RougeScorer(["rougeL"], tokenizer=self.tokenizer)

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        return {"evalmm_rougel": [float(self._scorer.score(r, p)["rougeL"].fmeasure) * 100
                                  for r, p in zip(refs, preds, strict=True)]}

    def settings(self) -> dict[str, str]:
        return {"tokenizer": "fugashi Tagger -Owakati", "dictionary": self.tokenizer.dictionary(),
                "normalisation": "emoji removed, NFKC, whitespace collapsed (eval-mm 0.4.1)"}


class EvalmmExactMatch(Scorer):
    name: ClassVar[str] = "evalmm-exact-match"
    fields: ClassVar[tuple[str, ...]] = ("evalmm_exact_match",)
    description: ClassVar[str] = "llm-jp-eval-mm 0.4.1's exact-match: 1 if ref == pred (raw strings)"

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        return {"evalmm_exact_match": [float(r == p) for r, p in zip(refs, preds, strict=True)]}


class EvalmmSubstringMatch(Scorer):
    name: ClassVar[str] = "evalmm-substring-match"
    fields: ClassVar[tuple[str, ...]] = ("evalmm_substring_match",)
    description: ClassVar[str] = "llm-jp-eval-mm 0.4.1's substring-match: 1 if ref in pred (raw strings)"

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        return {"evalmm_substring_match": [float(r in p) for r, p in zip(refs, preds, strict=True)]}


EVALMM_SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (EvalmmRougeL, EvalmmExactMatch, EvalmmSubstringMatch)}


def is_evalmm_record(record: dict) -> bool:
    """An eval-mm prediction line has `text` (the prediction) and no `prediction`."""
    return "text" in record and "prediction" not in record


def read_evalmm_predictions(records: Sequence[dict], source: str) -> list[dict]:
    """eval-mm prediction lines as our records: `question_id`, `prediction` (its `text`), and, where the file has
    them (the scored form), `answer` and `question` (its `input_text`)."""
    out = []
    for n, r in enumerate(records, 1):
        if "question_id" not in r or not isinstance(r.get("text"), str):
            raise VlmMergeError(f"{source}: record {n}: an llm-jp-eval-mm prediction line needs question_id and a "
                                f"string text (has {', '.join(sorted(r)) or 'nothing'})")
        row = {"question_id": str(r["question_id"]), "prediction": r["text"]}
        if isinstance(r.get("answer"), str):
            row["answer"] = r["answer"]
        if isinstance(r.get("input_text"), str):
            row["question"] = r["input_text"]
        out.append(row)
    return out


def evalmm_records(predictions: Sequence[dict]) -> list[dict]:
    """Our run's prediction records as eval-mm's scored `prediction.jsonl` lines (its metric names for the scores
    that have an eval-mm counterpart)."""
    lines = []
    for p in predictions:
        line = {"question_id": p["question_id"], "text": p["prediction"], "answer": p["answer"],
                "input_text": p.get("question", "")}
        for theirs, column in EVALMM_METRICS.values():
            if column in p:  # eval-mm's per-sample types: ints, ROUGE-L a float, Heron a {score, score_gpt} dict
                line[theirs] = (p[column] if theirs == "rougel" else
                                {"score": int(p[column]), "score_gpt": int(p["heron_evalmm_score_gpt"])}
                                if theirs == "heron-bench" else int(p[column]))
        lines.append(line)
    return lines


def evalmm_evaluation(predictions: Sequence[dict]) -> dict[str, dict]:
    """eval-mm's `evaluation.jsonl` line ({metric: {overall_score, details}}, as its scorers' `aggregate` make them)
    for the metrics with an eval-mm counterpart that the predictions were scored with."""
    from eval.judge_metrics import evalmm_heron_details

    if not predictions:
        return {}
    out: dict[str, dict] = {}
    detail_names = {"rougel": "rougel", "exact-match": "exact_match", "substring-match": "substring_match",
                    "llm-as-a-judge": "llm_as_a_judge"}
    for theirs, column in EVALMM_METRICS.values():
        if column not in predictions[0]:
            continue
        if theirs == "heron-bench":
            scores = [{"score": int(p[column]), "score_gpt": int(p["heron_evalmm_score_gpt"])} for p in predictions]
            details = evalmm_heron_details(scores, [str((p.get("meta") or {}).get("category")) for p in predictions])
            details = {k: float(v) for k, v in details.items()}
            out[theirs] = {"overall_score": details["overall_rel"], "details": details}
        else:
            mean = sum(p[column] for p in predictions) / len(predictions)
            out[theirs] = {"overall_score": mean, "details": {detail_names[theirs]: mean}}
    return out
