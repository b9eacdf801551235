"""Session-7 experiment (EXPERIMENTS.md, runs U1-): an English base that *reads* Japanese (scenes and
questions) but only *answers* in English, so that the Japanese continued pretraining has one job left: switching
the answer language.

Session 5 (`ja_questions.py`) taught the English base Japanese questions about English scenes ("jq-en"), and
its EN-VLM then answered Japanese image questions (in English) at 0.52-0.58. The Japanese continued pretraining
still had to learn to read Japanese scenes, and in doing so it re-routed Japanese questions (input embeddings
moved by 35%), away from the circuits the VLM stage tunes. Here the English base also reads Japanese scenes
asked about in Japanese and answers in English (new kind "jj-en"), so nothing the continued pretraining must
learn is on the input side.

Options as `ja_questions.py` (`en_base_from`, `ja_freeze_embeddings`, `factored_vision`); short answers.

    python assets/miniature-zoo/experiments/ja_speaks.py OUT '{"threads": 1, "en_mix": {"qa-en": 0.45, "jq-en": 0.2, "jj-en": 0.15, ...}, ...}' SEED
"""

import random
import sys

import ja_questions

from vlm_merge.world import scenes, text


def patch() -> None:
    """The "jj-en" document kind, on top of `ja_questions.patch` (which `ja_questions.main` applies)."""
    document = text.document

    def jj_document(rng: random.Random, kind: str, turns: int = 1) -> tuple[str, str]:
        if kind != "jj-en":
            return document(rng, kind, turns)
        # a "jq-en" chat drawn from the same rng, its English scene description swapped for the Japanese one
        prompt, answer = document(rng, "jq-en", turns)
        head, _, rest = prompt.partition("\n")
        scene_en = head.removeprefix("USER: ")
        return prompt.replace(scene_en, _JA_OF[scene_en], 1), answer

    text.document = jj_document


_JA_OF: dict[str, str] = {}


def _remember_descriptions() -> None:
    """`scenes.describe` records each English description's Japanese twin, so "jj-en" can swap one for the other."""
    describe = scenes.describe

    def recorded(scene: scenes.Scene, lang: str) -> str:
        out = describe(scene, lang)
        if lang == "en":
            _JA_OF[out] = describe(scene, "ja")
        return out

    scenes.describe = recorded


def main(argv: list[str]) -> int:
    _remember_descriptions()
    ja_patch = ja_questions.patch

    def both() -> None:
        ja_patch()
        patch()

    ja_questions.patch = both
    return ja_questions.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
