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
Both were patches of this script in session 9 and are world settings since session 10 (`scenes.Phrasebook`:
`ja_order`, `count_digits`); the builds are bit-identical (W7's data and tokenizer were checked).
`"cs_p"` > 0 adds `shared_words.py`'s code-switched kinds ("cs-qa-en", "cs-text-en") for `en_mix`, so words and
word order can be aligned together. Other settings go to `question_types.py` (drop_qtypes, then ja_questions.py's
options and short answers).

    python research/miniature-world/experiments/word_order.py OUT '{"drop_qtypes": ["what_at", "where"], ...}' SEED
"""

import json
import sys

import question_types
import shared_words


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = {"ja_order": "aligned"} | json.loads(settings)
    p = cfg.pop("cs_p", 0.0)
    if p:
        shared_words.add_code_switched_kinds(p)
    return question_types.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
