"""LLM-as-a-judge metrics, each with its prompt, parsing and aggregation exactly as published.

- `heron-bench`: Japanese-Heron-Bench as Heron defines it (turingmotors/heron, `heron/eval/eval_heron_bench.py` and
  `playground/data/llava-bench-ja/rule.json`, commit 883cd7c): the LLaVA-Bench-style pairwise review. The judge sees
  the image's context, the question, the reference answer (GPT-4's, "Assistant 1") and the model's ("Assistant 2")
  and writes the two 1-10 scores on its first line; `parse_score` takes the first line, commas as spaces, and
  needs exactly two numbers (else both are -1, and Heron keeps those -1 in the means). Per category,
  100 x mean(model) / mean(reference); the score is the mean over the categories (Heron's table:
  (conv + detail + complex) / 3). Judge model gpt-4-0125-preview, temperature 0, max_tokens 1024.
- `heron-bench-evalmm`: llm-jp-eval-mm 0.4.1's `HeronBenchScorer` (`src/eval_mm/metrics/heron_bench_scorer.py`):
  a JSON answer {"score_gpt", "score"} (1-10), -1 for both when no JSON object with both keys parses; per category
  (conv, detail, complex) `_rel` = 100 x mean(score) / max(0.01, mean(score_gpt)), skipped when the category is
  empty or its mean score is -1; `overall_rel` = the sum of the three `_rel` (0 for a skipped one) / 3.
- `llm-as-a-judge`: llm-jp-eval-mm 0.4.1's `LlmAsaJudgeScorer` (`llm_as_a_judge_scorer.py`), its metric for
  JA-VLM-Bench-In-the-Wild and JA-VG-VQA-500: (question, answer, prediction) rated 1-5; the score is the first digit
  of the reply, 0 when there is none; the aggregate is the mean. temperature 0, seed 0, max_tokens 1024.

A judge never scores silently: every metric has a per-sample `*_parsed` column (1 where the reply parsed), and
the scorer's settings (recorded in `scores.json`) name the judge, the prompt's hash, the token counts, how many
judgments came from the cache and how many failed to parse. The published fallback values (-1, 0) are kept in
the published columns so the numbers equal the published tools'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from eval.judge import Judge, JudgeRequest, Judgment, prompt_hash
from eval.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Aggregate, Meta, Scorer, bootstrap_aggregate
from vlm_merge.errors import VlmMergeError

REVIEW_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."  # Heron and eval-mm
HERON_CATEGORIES = ("conv", "detail", "complex")
HERON_JUDGE_MODEL = "gpt-4-0125-preview"  # what Heron's script and the reference answers used

# rule.json's prompt for conv, detail and complex (the three are the same text)
HERON_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with five descriptive sentences describing the same image and the bounding box coordinates of "
    "each object in the scene. These coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) with "
    "floating numbers ranging from 0 to 1. These values correspond to the top left x, top left y, bottom right x, and "
    "bottom right y. \nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\nPlease first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
    "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the "
    "responses were presented does not affect your judgment. Sentences are given in Japanese, and language is not "
    "relevant to score."
)
HERON_ROLE = "Assistant"


def heron_content(context: str, question: str, reference: str, answer: str) -> str:
    """The user message of Heron's review (eval_heron_bench.py: Assistant 1 = GPT-4's answer, 2 = the model's)."""
    role = HERON_ROLE
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{HERON_RULE}\n\n"
        f"If it is not relevant to the context, does not answer directly, or says the wrong thing, give it a low score.\n\n"
    )


def heron_parse(review: str) -> tuple[float, float] | None:
    """Heron's `parse_score`: (reference, model) from the first line, or None where Heron records [-1, -1]."""
    try:
        sp = review.split("\n")[0].replace(",", " ").split(" ")
        return (float(sp[0]), float(sp[1])) if len(sp) == 2 else None
    except (ValueError, AttributeError):
        return None


def heron_relative(model: Sequence[float], reference: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """Heron's `load_model_results`: per category (in order of appearance) 100 x mean(model) / mean(reference)."""
    out: dict[str, float] = {}
    for c in dict.fromkeys(categories):
        m = [s for s, k in zip(model, categories) if k == c]
        r = [s for s, k in zip(reference, categories) if k == c]
        out[c] = float(100 * np.mean(m) / np.mean(r))
    return out


# llm-jp-eval-mm 0.4.1, heron_bench_scorer.py (verbatim, `{{`/`}}` are str.format escapes)
EVALMM_HERON_INSTRUCTION = """
You are an expert evaluator. You are given the following information:
- Context: A description of the image.
- Question: A question about the image.
- GPT-4o Answer: GPT-4o's answer to the question.
- Model Answer: The target model's answer to the question.

Your task is to evaluate each answer independently based on how well it answers the question given the context.

Please assign a score from 1 to 10 for each answer according to the following guideline:
- 10: Perfect — Completely correct, relevant, and fully addresses the question based on the context.
- 8-9: Very Good — Mostly correct with only minor inaccuracies or slight omissions.
- 6-7: Good — Generally correct but contains noticeable errors or lacks important details.
- 4-5: Poor — Significant errors or missing key points, but some relevance remains.
- 1-3: Very Poor — Mostly or completely incorrect, irrelevant, or nonsensical.

Output Format (JSON):
Return the result in the following JSON format:
```json
{{
    "score_gpt": int,
    "score": int
}}
```
Do not output anything other than the JSON.

Input:
{{
    "context": {context},
    "question": {question},
    "gpt4o_answer": {gpt4o_answer},
    "model_answer": {model_answer}
}}

Output:
"""


def evalmm_heron_parse(llm_output: str) -> dict[str, int]:
    """eval-mm 0.4.1's `parse_score`: the first ```json block (or {...}) with both keys, else both -1 (also where
    a value is not a number, on which eval-mm raises)."""
    matches = re.findall(r"```json(.*?)```", llm_output, re.DOTALL) or re.findall(r"\{.*?\}", llm_output, re.DOTALL)
    for json_string in matches:
        json_string = json_string.strip()
        for text in (json_string, re.sub(r"[\x00-\x1F\x7F]", "", json_string)):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict) and "score" in parsed and "score_gpt" in parsed:
                try:
                    return {"score": int(parsed["score"]), "score_gpt": int(parsed["score_gpt"])}
                except (TypeError, ValueError):  # eval-mm raises here (e.g. "score": null); a parse failure here
                    break
            break  # parsed but without both keys: eval-mm moves on to the next match
    return {"score": -1, "score_gpt": -1}


def evalmm_heron_details(scores: Sequence[Mapping[str, int]], categories: Sequence[str]) -> dict[str, float]:
    """eval-mm 0.4.1's `HeronBenchScorer.aggregate(...).details`, same keys, same arithmetic."""
    details: dict[str, float] = {}
    for c in HERON_CATEGORIES:
        own = [s["score"] for s, k in zip(scores, categories) if k == c]
        gpt = [s["score_gpt"] for s, k in zip(scores, categories) if k == c]
        if len(own) == 0 or np.mean(own) == -1:
            continue
        details[c] = np.mean(own)
        details[c + "_rel"] = 100 * np.mean(own) / max(0.01, np.mean(gpt))
    details["parse_error_count"] = sum(s["score"] == -1 for s in scores)
    details["overall"] = sum(s["score"] for s in scores) / len(scores)
    details["overall_rel"] = sum(details.get(c + "_rel", 0.0) for c in HERON_CATEGORIES) / len(HERON_CATEGORIES)
    return details


# llm-jp-eval-mm 0.4.1, llm_as_a_judge_scorer.py (verbatim)
LLM_JUDGE_SYSTEM = "You are an expert evaluator."
LLM_JUDGE_INSTRUCTION = """
You are an expert evaluator. You are given a (Question, Answer, Prediction) triplet. Your task is to evaluate how well the Prediction aligns with the Answer in the context of the Question.

Please assign a score from 1 to 5 based on the following criteria:

5: Excellent — The Prediction fully matches the Answer with complete correctness and relevance.
4: Good — The Prediction is mostly correct with only minor inaccuracies or missing details.
3: Fair — The Prediction is partially correct but contains noticeable errors or missing key points.
2: Poor — The Prediction is mostly incorrect or irrelevant, but there are small fragments of correctness.
1: Very Poor — The Prediction is completely incorrect or irrelevant.
Output only the score (an integer from 1 to 5). Do not add any explanation.

Triplet:
Question: {Question}
Answer: {Answer}
Prediction: {Prediction}

Your Score:
"""


def llm_judge_parse(reply: str) -> int | None:
    """eval-mm 0.4.1: the first digit of the reply (`re.search(r"\\d", c)`); None where eval-mm scores 0."""
    found = re.search(r"\d", reply)
    return int(found.group()) if found else None


# ---------------------------------------------------------------- scorers
@dataclass
class JudgeScorer(Scorer):
    """A scorer that asks a judge; `stats` holds the last `score` call's counts (recorded by `settings`)."""

    needs_judge: ClassVar[bool] = True
    judge_model_hint: ClassVar[str] = ""
    prompt_parts: ClassVar[tuple[str, ...]] = ()

    judge: Judge | None = None
    stats: dict[str, int] = field(default_factory=dict)
    _categories: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.judge is None:
            hint = f" (published: {self.judge_model_hint})" if self.judge_model_hint else ""
            raise VlmMergeError(f"metric {self.name} needs an LLM judge: pass --judge-model MODEL{hint} "
                                "[--judge-base-url URL] or a local model directory")

    def _ask(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        assert self.judge is not None
        judgments = self.judge.judge(requests)
        self.stats = {"judgments": len(judgments), "from_cache": sum(j.cached for j in judgments),
                      "prompt_tokens": sum(j.prompt_tokens for j in judgments),
                      "completion_tokens": sum(j.completion_tokens for j in judgments)}
        return judgments

    def _meta(self, meta: Sequence[Meta] | None, n: int, key: str) -> list[str]:
        if meta is None or len(meta) != n:
            raise VlmMergeError(f"metric {self.name} needs each question's {key!r}")
        values = []
        for i, m in enumerate(meta):
            if key not in m:
                raise VlmMergeError(f"metric {self.name}: question {i} has no {key!r} column")
            values.append(str(m[key]))
        return values

    def settings(self) -> dict[str, object]:  # type: ignore[override]
        assert self.judge is not None
        return {"judge": self.judge.describe(), "prompt_sha256": prompt_hash(*self.prompt_parts), **self.stats}


@dataclass
class HeronBench(JudgeScorer):
    name: ClassVar[str] = "heron-bench"
    fields: ClassVar[tuple[str, ...]] = ("heron_model", "heron_reference", "heron_parsed")
    description: ClassVar[str] = ("Japanese-Heron-Bench as Heron scores it: pairwise 1-10 review against GPT-4's answer, "
                                  "per category 100 x mean(model) / mean(reference), mean over categories")
    needs: ClassVar[tuple[str, ...]] = ("question", "context", "category")
    judge_model_hint: ClassVar[str] = HERON_JUDGE_MODEL
    prompt_parts: ClassVar[tuple[str, ...]] = (REVIEW_SYSTEM, heron_content("{context}", "{question}", "{ref}", "{ans}"))

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        questions, contexts = self._meta(meta, len(refs), "question"), self._meta(meta, len(refs), "context")
        self._categories = self._meta(meta, len(refs), "category")
        requests = [JudgeRequest.chat(REVIEW_SYSTEM, heron_content(c, q, r, p), max_tokens=1024, temperature=0.0, seed=None)
                    for c, q, r, p in zip(contexts, questions, refs, preds, strict=True)]
        parsed = [heron_parse(j.text) for j in self._ask(requests)]
        self.stats["parse_failures"] = sum(p is None for p in parsed)
        pairs = [p if p is not None else (-1.0, -1.0) for p in parsed]
        return {"heron_model": [m for _, m in pairs], "heron_reference": [r for r, _ in pairs],
                "heron_parsed": [float(p is not None) for p in parsed]}

    def aggregate(self, scores: dict[str, list[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Aggregate]:
        return _relative_aggregates("heron", scores["heron_model"], scores["heron_reference"], self._categories,
                                    heron_overall, resamples, seed) | {"heron_parsed": bootstrap_aggregate(scores["heron_parsed"], resamples, seed)}


def heron_overall(model: Sequence[float], reference: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """Heron's per-category relative scores plus `overall`, their mean."""
    per = heron_relative(model, reference, categories)
    return {**per, "overall": float(np.mean(list(per.values())))}


def evalmm_overall(model: Sequence[float], reference: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    details = evalmm_heron_details([{"score": int(m), "score_gpt": int(r)} for m, r in zip(model, reference)], categories)
    return {**{c: float(details[c + "_rel"]) for c in HERON_CATEGORIES if c + "_rel" in details},
            "overall": float(details["overall_rel"])}


def _relative_aggregates(prefix, model, reference, categories, statistic, resamples, seed) -> dict[str, Aggregate]:
    """The published statistic (its `overall` and per-category values) as `mean`, with a bootstrap over questions
    resampled within each category (the categories keep their sizes)."""
    exact = statistic(model, reference, categories)
    m, r, cats = np.asarray(model, float), np.asarray(reference, float), np.asarray(categories)
    groups = [np.flatnonzero(cats == c) for c in dict.fromkeys(categories)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in exact}
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(resamples):
            idx = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
            value = statistic(m[idx], r[idx], cats[idx].tolist())
            for k in exact:
                draws[k].append(value.get(k, np.nan))
    out = {}
    for k, v in exact.items():
        low, mid, high = np.nanpercentile(np.asarray(draws[k]), [2.5, 50, 97.5]) if resamples else (v, v, v)
        name = prefix if k == "overall" else f"{prefix}_{k}"
        out[name] = Aggregate(mean=float(v), low=float(low), mid=float(mid), high=float(high),
                              n=int(sum(1 for c in categories if k == "overall" or c == k)))
    return out


@dataclass
class HeronBenchEvalmm(JudgeScorer):
    name: ClassVar[str] = "heron-bench-evalmm"
    fields: ClassVar[tuple[str, ...]] = ("heron_evalmm_score", "heron_evalmm_score_gpt", "heron_evalmm_parsed")
    description: ClassVar[str] = ("Japanese-Heron-Bench as llm-jp-eval-mm 0.4.1 scores it: JSON 1-10 scores, "
                                  "per category 100 x mean(score) / max(0.01, mean(score_gpt)), overall_rel")
    needs: ClassVar[tuple[str, ...]] = ("question", "context", "category")
    judge_model_hint: ClassVar[str] = "gpt-4o-2024-11-20 (eval-mm's examples/sample.py default)"
    prompt_parts: ClassVar[tuple[str, ...]] = (REVIEW_SYSTEM, EVALMM_HERON_INSTRUCTION)

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        questions, contexts = self._meta(meta, len(refs), "question"), self._meta(meta, len(refs), "context")
        self._categories = self._meta(meta, len(refs), "category")
        requests = [JudgeRequest.chat(REVIEW_SYSTEM, EVALMM_HERON_INSTRUCTION.format(
            context=c, question=q, gpt4o_answer=r, model_answer=p), max_tokens=1024, temperature=0.0, seed=0)
            for c, q, r, p in zip(contexts, questions, refs, preds, strict=True)]
        parsed = [evalmm_heron_parse(j.text) for j in self._ask(requests)]
        self.stats["parse_failures"] = sum(p["score"] == -1 for p in parsed)
        return {"heron_evalmm_score": [float(p["score"]) for p in parsed],
                "heron_evalmm_score_gpt": [float(p["score_gpt"]) for p in parsed],
                "heron_evalmm_parsed": [float(p["score"] != -1) for p in parsed]}

    def aggregate(self, scores: dict[str, list[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Aggregate]:
        return _relative_aggregates("heron_evalmm", scores["heron_evalmm_score"], scores["heron_evalmm_score_gpt"],
                                    self._categories, evalmm_overall, resamples, seed) | {
            "heron_evalmm_parsed": bootstrap_aggregate(scores["heron_evalmm_parsed"], resamples, seed)}


@dataclass
class LlmAsAJudge(JudgeScorer):
    name: ClassVar[str] = "llm-as-a-judge"
    fields: ClassVar[tuple[str, ...]] = ("llm_as_a_judge", "llm_as_a_judge_parsed")
    description: ClassVar[str] = ("llm-jp-eval-mm 0.4.1's LLM-as-a-judge: (question, answer, prediction) rated 1-5, "
                                  "first digit of the reply (0 when none), mean")
    needs: ClassVar[tuple[str, ...]] = ("question",)
    judge_model_hint: ClassVar[str] = "gpt-4o-2024-11-20 (eval-mm's examples/sample.py default)"
    prompt_parts: ClassVar[tuple[str, ...]] = (LLM_JUDGE_SYSTEM, LLM_JUDGE_INSTRUCTION)

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        questions = self._meta(meta, len(refs), "question")
        requests = [JudgeRequest.chat(LLM_JUDGE_SYSTEM, LLM_JUDGE_INSTRUCTION.format(Question=q, Answer=r, Prediction=p),
                                      max_tokens=1024, temperature=0.0, seed=0)
                    for q, r, p in zip(questions, refs, preds, strict=True)]
        parsed = [llm_judge_parse(j.text) for j in self._ask(requests)]
        self.stats["parse_failures"] = sum(p is None for p in parsed)
        return {"llm_as_a_judge": [float(p if p is not None else 0) for p in parsed],
                "llm_as_a_judge_parsed": [float(p is not None) for p in parsed]}


JUDGE_SCORERS: dict[str, type[JudgeScorer]] = {cls.name: cls for cls in (HeronBench, HeronBenchEvalmm, LlmAsAJudge)}
