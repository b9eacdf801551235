"""Japanese ROUGE as a Hugging Face `evaluate` metric module, loaded from the installed package by path.

    import evaluate
    from eval.metrics import ROUGE_JA_EVALUATE_MODULE
    rouge = evaluate.load(str(ROUGE_JA_EVALUATE_MODULE))
    rouge.compute(predictions=["たかしが公園にいたようだ。"], references=["たかしが公園で遊んでいた。"])
    # {'rouge1': 66.66…, 'rouge2': 37.5, 'rougeL': 66.66…}

The Hub's `rouge` script needs the network and tokenises on non-alphanumerics; this one never touches
the network and scores exactly as `eval.metrics.RougeJa` (Sakana's MeCab ROUGE, F-measure x 100).
`strict_japanese=True` adds rouge{1,2,L}_ja; `aggregate="mid"` returns the bootstrap median instead
of the mean; `per_sample=True` adds the per-sample lists.
"""

import datasets
import evaluate

from eval.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    RougeJa,
    StrictJapaneseRouge,
    score_predictions,
)

_DESCRIPTION = "ROUGE-1/2/L for Japanese: Sakana's normalisation (emoji, neologdn) and MeCab unidic-lite tokens."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted strings.
    references: list of reference strings.
    strict_japanese: also report rouge*_ja, where a non-Japanese prediction to a Japanese reference scores as "".
    aggregate: "mean" (default) or "mid" (bootstrap median of the mean, as Sakana's scripts report).
    per_sample: also return the per-sample score lists.
    seed: bootstrap seed.
Returns:
    dict with rouge1, rouge2, rougeL (F-measure x 100) [and rouge1_ja, rouge2_ja, rougeL_ja, non_japanese].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeJaMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        strict_japanese: bool = False,
        aggregate: str = "mean",
        per_sample: bool = False,
        seed: int = BOOTSTRAP_SEED,
    ) -> dict:
        if aggregate not in ("mean", "mid"):
            raise ValueError(f"aggregate={aggregate!r}: use 'mean' or 'mid'")
        rouge = RougeJa()
        scorers = [rouge, StrictJapaneseRouge(rouge=rouge)] if strict_japanese else [rouge]
        report = score_predictions(references, predictions, scorers, BOOTSTRAP_RESAMPLES, seed)
        out = {name: getattr(agg, aggregate) for name, agg in report.aggregate.items()}
        if per_sample:
            out["per_sample"] = report.per_sample
        return out
