"""The miniature world's metric as an `eval` scorer: `content-accuracy`.

Registered under eval's `vlm_merge.scorers` entry-point group (pyproject.toml), so `eval` finds it by name
without importing the world. It is the one scoring path of content accuracy: `vlm-merge eval` / `score
--metrics content-accuracy`, an `evolve` fitness or test metric `content_accuracy`, and the world's own
`evaluate.score` (demo, zoo bar, notebook) all call `ContentAccuracy.score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from eval.metrics import Meta, Scorer, check_meta
from vlm_merge.errors import VlmMergeError
from vlm_merge.world.scenes import content_correct


class ContentAccuracy(Scorer):
    """1 per answer that names the asked attribute's value, and no other value of it, in the question's
    language (`scenes.content_correct`), read from each question's `attribute`, `value`, `lang` columns."""

    name: ClassVar[str] = "content-accuracy"
    fields: ClassVar[tuple[str, ...]] = ("content_accuracy",)
    description: ClassVar[str] = (
        "1 if the answer names the asked value and no other (miniature-world rows: attribute, value, lang columns)"
    )
    needs: ClassVar[tuple[str, ...]] = ("attribute", "value", "lang")
    needs_hint: ClassVar[str] = " (the miniature world's files)"

    def score(self, refs: Sequence[str], preds: Sequence[str], meta: Sequence[Meta] | None = None) -> dict[str, list[float]]:
        rows = list(meta) if meta is not None else [{} for _ in preds]
        if len(rows) != len(preds):
            raise VlmMergeError(f"content-accuracy: {len(rows)} question rows for {len(preds)} predictions")
        check_meta([self], rows)
        out = []
        for i, (pred, m) in enumerate(zip(preds, rows, strict=True)):
            try:
                out.append(float(content_correct(pred, str(m["attribute"]), str(m["value"]), str(m["lang"]))))
            except ValueError as e:  # an attribute the world's lexicon does not know
                raise VlmMergeError(f"content-accuracy: question {i}: cannot score attribute {m['attribute']!r} "
                                    f"in language {m['lang']!r} ({e})") from None
        return {"content_accuracy": out}

    def settings(self) -> dict[str, str]:
        return {"rule": "vlm_merge.world.scenes.content_correct"}
