"""Session-3 experiment (EXPERIMENTS.md, runs E1-E6): the miniature world with short answers.

Every answer becomes the asked value's word(s), as in VQAv2 / JA-VG-VQA ("two" / "二つ", "red" / "赤",
"top left" / "左上", "a red circle" / "赤い丸", "nothing" / "何もありません", zero "none" / "ありません"),
then `vlm-merge zoo bar` runs with the given settings. It patches two functions of
`vlm_merge.world.scenes` for this process only; the shipped world keeps sentence answers.

    python assets/miniature-zoo/experiments/short_answers.py OUT '{"threads": 1, ...}' SEED
"""

import dataclasses
import json
import sys

from vlm_merge.world import scenes

_make_qa, _lexicon = scenes.make_qa, scenes._lexicon


def short(qa: scenes.QA) -> scenes.QA:
    ja, v, attribute = qa.lang == "ja", qa.value, qa.attribute
    if attribute == "count":
        n = int(v)
        answer = ("ありません" if ja else "none") if n == 0 else (scenes.JA_NUMBERS[n] if ja else scenes.EN_NUMBERS[n])
    elif attribute == "color" and qa.qtype == "more":
        answer = scenes.ja_obj(v, None) if ja else scenes.en_obj(v, None, 2)
    elif attribute == "color":
        answer = scenes.COLORS[v][3] if ja else scenes.COLORS[v][1]
    elif attribute == "shape":
        answer = scenes.SHAPES[v][2] if ja else scenes.SHAPES[v][1 if qa.qtype == "more" else 0]
    elif attribute == "object" and v == "nothing":
        answer = "何もありません" if ja else "nothing"
    elif attribute == "object":
        color, shape = v.split()
        answer = scenes.ja_obj(color, shape) if ja else f"a {scenes.en_obj(color, shape)}"
    else:  # position
        answer = scenes.POSITIONS[int(v)][1 if ja else 0]
    return dataclasses.replace(qa, answer=answer)


def lexicon(attribute: str, lang: str) -> dict[str, list[str]]:
    forms = _lexicon(attribute, lang)
    if attribute == "count" and lang == "en":
        forms["0"] = ["no", "none"]
    return forms


def patch() -> None:
    """Short answers and their lexicon for this process."""
    scenes.make_qa = lambda *a, **k: short(_make_qa(*a, **k))
    scenes._lexicon = lexicon


def main(argv: list[str]) -> int:
    patch()
    from vlm_merge.cli import main as cli

    out, settings, seed = argv
    args = ["zoo", "bar", "--seeds", seed, "--out", out, "--quiet"]
    for k, v in json.loads(settings).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
