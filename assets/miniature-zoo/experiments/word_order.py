"""Session-9 experiment (EXPERIMENTS.md, "Session 9"): Japanese that puts its content words in English order.

Session 4 aligned the two languages' *words* (code-switching put each Japanese word next to its translation in
embedding space) and still found no transfer; it named the other difference: word order. Every Japanese
question of the world puts the object first and the question word last ("赤いものはいくつありますか？" against
"how many red things are there?"), so nothing the English base or the VLM stage learnt on English question forms
runs on the Japanese ones. Studies of small multilingual transformers (Dufter & Schuetze 2020, K et al. 2020)
find cross-lingual sharing with disjoint vocabularies when word order matches, and little when it does not.

`"ja_order": "aligned"` (the default of this script) rewrites the Japanese phrasings and descriptions so the
content words come in the English order, in forms a Japanese speaker uses (a postposed topic, 何色ですか、丸は？;
いくつの赤いものがありますか？; 赤い丸が左上に、青い四角が真ん中にあります。). `"natural"` keeps the shipped ones.
`"count_digits": true` answers counts with digits in both languages, as VQAv2 normalises them and Japanese VQA
answers write them ("2" / "2個"; zero "0" / "0個"), so the first answer token of a count is the same in both
languages and only the counter 個 is Japanese; Japanese content accuracy still needs the counter.
`"cs_p"` > 0 adds `shared_words.py`'s code-switched kinds ("cs-qa-en", "cs-text-en") for `en_mix`, so words and
word order can be aligned together. Other settings go to `question_types.py` (drop_qtypes, then ja_questions.py's
options and short answers).

    python assets/miniature-zoo/experiments/word_order.py OUT '{"drop_qtypes": ["what_at", "where"], ...}' SEED
"""

import dataclasses
import json
import sys

import question_types
import shared_words
import short_answers

from vlm_merge.world import scenes, text

ALIGNED = {  # index i translates the English phrasing i of scenes.PHRASINGS
    "count_color": ["いくつの{cj}ものがありますか？", "いくつの{cj}ものが見えますか？", "数えてください、{cj}ものを。",
                    "何個の{cj}ものがありますか？"],
    "count_shape": ["いくつの{sj}がありますか？", "いくつの{sj}が見えますか？", "数えてください、{sj}を。", "何個の{sj}がありますか？"],
    "count_both": ["いくつの{cj}{sj}がありますか？", "いくつの{cj}{sj}が見えますか？", "数えてください、{cj}{sj}を。"],
    "color_of": ["何色ですか、{sj}は？", "どんな色ですか、{sj}は？", "教えてください、{sj}の色を。"],
    "shape_of": ["どんな形ですか、{cj}ものは？", "何の形ですか、{cj}ものは？", "何ですか、{cj}ものは？"],
    "what_at": ["何がありますか、{pj}には？", "何が見えますか、{pj}に？", "教えてください、何があるか、{pj}に。"],
    "where": ["どこにありますか、{cj}{sj}は？", "どこに見えますか、{cj}{sj}は？", "どこですか、{cj}{sj}の場所は？"],
    "more": ["多いのはどちらですか、{aj}と{bj}？", "どちらが多いですか、{aj}と{bj}？", "多く見えるのはどちらですか、{aj}と{bj}？"],
}


def aligned_describe(scene: scenes.Scene, lang: str, _describe=scenes.describe) -> str:
    """Japanese descriptions in the English order: object, then place (赤い丸が左上に、…あります。)."""
    if lang != "ja":
        return _describe(scene, lang)
    parts = [f"{scenes.ja_obj(o.color, o.shape)}が{scenes.POSITIONS[o.cell][1]}に" for o in scene.objects]
    return "、".join(parts) + "あります。"


def align() -> None:
    for qtype, forms in ALIGNED.items():
        assert len(forms) == len(scenes.PHRASINGS[qtype]["en"]), qtype
        scenes.PHRASINGS[qtype]["ja"] = forms
    scenes.describe = aligned_describe


def digit_counts() -> None:
    """Count answers as digits ("2" / "2個") in short answers and in the content lexicon; 個 cut as a word."""
    short, lexicon = short_answers.short, short_answers.lexicon

    def digit_short(qa: scenes.QA) -> scenes.QA:
        if qa.attribute != "count":
            return short(qa)
        return dataclasses.replace(qa, answer=f"{qa.value}個" if qa.lang == "ja" else qa.value)

    def digit_lexicon(attribute: str, lang: str) -> dict[str, list[str]]:
        if attribute != "count":
            return lexicon(attribute, lang)
        return {str(n): [f"{n}個" if lang == "ja" else str(n)] for n in range(scenes.MAX_OBJECTS + 1)}

    short_answers.short, short_answers.lexicon = digit_short, digit_lexicon
    text.JA_FUNCTION_WORDS = (*text.JA_FUNCTION_WORDS, "個")


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = json.loads(settings)
    order = cfg.pop("ja_order", "aligned")
    if order not in ("aligned", "natural"):
        raise SystemExit(f"ja_order: expected 'aligned' or 'natural', got {order!r}")
    if order == "aligned":
        align()
    if cfg.pop("count_digits", False):
        digit_counts()
    p = cfg.pop("cs_p", 0.0)
    if p:
        shared_words.add_code_switched_kinds(p)
    return question_types.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
