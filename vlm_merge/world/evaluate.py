"""Scoring models on the world's VQA sets: content accuracy, exact match, Japanese ROUGE-L, paired bootstrap.

Generation goes through `eval.generation.generate_answers` (the same batched, greedy path as any real
benchmark run); content accuracy is `scoring.ContentAccuracy`, the scorer `eval` finds as `content-accuracy`
(one scoring path: `scenes.content_correct` decides whether the asked attribute is right).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlm_merge.world import datasets, scenes
from vlm_merge.world.scoring import ContentAccuracy

BOOTSTRAP = 2000
MAX_NEW_TOKENS = 24


def load_vlm(path: str | Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(str(path))


def answer(model, processor, images, questions, batch_size: int = 64, progress: bool = False) -> list[str]:
    from eval.generation import generate_answers

    return generate_answers(model, processor, images, questions, max_new_tokens=MAX_NEW_TOKENS,
                            batch_size=batch_size, progress=progress)


def _normalize(s: str) -> str:
    try:
        from eval.japanese_text import normalize_japanese

        return normalize_japanese(s)
    except Exception:  # noqa: BLE001 - eval is optional here
        return " ".join(s.split())


@dataclass
class Scores:
    content: np.ndarray
    exact: np.ndarray
    rouge_l: np.ndarray | None
    predictions: list[str]
    rows: list[dict]  # the questions scored, in order

    def summary(self) -> dict:
        out = {"content_accuracy": float(self.content.mean()), "exact_match": float(self.exact.mean()),
               "n": int(self.content.size)}
        lo, hi = bootstrap_ci(self.content)
        out["content_ci"] = [lo, hi]
        if self.rouge_l is not None:
            out["rouge_l"] = float(self.rouge_l.mean())
        return out


def score(rows: list[dict], preds: list[str], rouge: bool = True) -> Scores:
    content = np.array(ContentAccuracy().score([r["answer"] for r in rows], preds, rows)["content_accuracy"], float)
    exact = np.array([_normalize(p) == _normalize(r["answer"]) for r, p in zip(rows, preds)], float)
    rl = None
    if rouge:
        try:
            from eval.metrics import RougeJa

            scorer = RougeJa()
            rl = np.array([scorer.score_one(r["answer"], p)["rougeL"] for r, p in zip(rows, preds)])
        except Exception:  # noqa: BLE001 - MeCab missing: report without ROUGE
            rl = None
    return Scores(content, exact, rl, preds, rows)


def _by_type(rows: list[dict], items: list) -> dict[str, list]:
    """{question type: the items of its rows, in row order}."""
    groups: dict[str, list] = {}
    for r, x in zip(rows, items):
        groups.setdefault(r["qtype"], []).append(x)
    return groups


def by_qtype(rows: list[dict], values: np.ndarray) -> dict[str, dict]:
    """{question type: {"content_accuracy": mean of `values`, "n": questions}} in `scenes.QTYPES` order."""
    groups = _by_type(rows, [float(v) for v in values])
    order = {q: i for i, q in enumerate(scenes.QTYPES)}
    return {q: {"content_accuracy": float(np.mean(groups[q])), "n": len(groups[q])}
            for q in sorted(groups, key=lambda q: (order.get(q, len(order)), q))}


def top_values(rows: list[dict], predictions: list[str]) -> dict[str, dict]:
    """{question type: {"value": the value answers name most often, "share": its share of the type's
    questions}}. The value named is read as content accuracy reads it (`scenes.mentions`, in the question's
    language; "(none)" or "(several)" when an answer names no value or more than one). A share near 1 on a type
    whose true values vary means the model gives one answer (e.g. the answer prior 一つ to every count question)
    rather than reading the image; ties go to the value seen first."""
    named = [scenes.mentions(p, r["attribute"], r["lang"]) for r, p in zip(rows, predictions)]
    single = [next(iter(n)) if len(n) == 1 else "(several)" if n else "(none)" for n in named]
    out = {}
    for q, values in _by_type(rows, single).items():
        top = max(dict.fromkeys(values), key=values.count)
        out[q] = {"value": top, "share": values.count(top) / len(values)}
    return out


PREDICTION_FIELDS = ("question_id", "image", "question", "answer", "attribute", "value", "qtype", "lang")


def prediction_lines(sc: Scores) -> str:
    """JSONL, one line per question: what was asked, the reference, the prediction and its scores (so the
    predictions can be re-scored without generating again)."""
    lines = []
    for i, r in enumerate(sc.rows):
        rec = {k: r[k] for k in PREDICTION_FIELDS if k in r}
        rec.update(prediction=sc.predictions[i], content=float(sc.content[i]), exact=float(sc.exact[i]))
        if sc.rouge_l is not None:
            rec["rouge_l"] = float(sc.rouge_l[i])
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return "".join(lines)


def right_in_english(sc: Scores) -> np.ndarray:
    """Per question: the answer names the asked value in English (a Japanese question answered in English;
    content accuracy on Japanese questions counts only Japanese answers)."""
    return np.array([scenes.content_correct(p, r["attribute"], r["value"], "en") for r, p in zip(sc.rows, sc.predictions)],
                    float)


def bootstrap_ci(x: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    from eval.metrics import bootstrap_aggregate

    agg = bootstrap_aggregate(x, resamples, seed)
    return agg.low, agg.high


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Mean of a - b over the same questions and its 95% paired bootstrap CI (questions resampled)."""
    from eval.metrics import paired_bootstrap as paired

    return paired(a, b, resamples, seed)


def evaluate_model(model_dir: str | Path, data_file: str | Path, limit: int | None = None, rouge: bool = True,
                   progress: bool = False, model_and_processor=None) -> Scores:
    rows = datasets.read_rows(data_file)[:limit]
    images = datasets.load_images(data_file, rows)
    model, processor = model_and_processor or load_vlm(model_dir)
    preds = answer(model, processor, images, [r["question"] for r in rows], progress=progress)
    return score(rows, preds, rouge=rouge)
