"""Session-4 experiment (EXPERIMENTS.md, runs F1-F4): short answers (as `short_answers.py`), plus two ways
of giving the English base's Japanese words the *same* representation as their English translations,
which multilingual 7B bases have and the earlier miniature worlds lacked:

- `cs_p` > 0: code-switched English documents in the English base ("cs-qa-en", "cs-text-en" kinds in
  `en_mix`): English reading-comprehension chats where every colour, shape, number, position and
  question word is swapped for its Japanese word with probability `cs_p` (answers too), as web text
  mixes languages;
- `align_init` true: before the Japanese continued pretraining, every Japanese word's embedding and
  lm_head rows start as the mean of its English translation's rows (WECHSEL / vocabulary-extension
  style initialisation).

    python research/miniature-world/experiments/shared_words.py OUT '{"threads": 1, "cs_p": 0.5, ...}' SEED
"""

import json
import random
import re
import sys

import short_answers
import torch

from vlm_merge.world import scenes, text, train

EN_TO_JA = {  # English word or phrase -> Japanese word (colours are handled apart: adjective or noun)
    **{v[0]: v[1] for v in scenes.POSITIONS.values()},
    **{w: scenes.JA_NUMBERS[n] for n, w in enumerate(scenes.EN_NUMBERS) if n},
    **{s[0]: s[2] for s in scenes.SHAPES.values()}, **{s[1]: s[2] for s in scenes.SHAPES.values()},
    "thing": "もの", "things": "もの", "how many": "いくつ", "what color": "何色", "where": "どこ", "what": "何",
    "which": "どちら", "shape": "形", "color": "色", "number": "数", "more": "多い", "nothing": "何もありません",
    "none": "ありません", "see": "見えます", "place": "場所", "count": "数えてください", "tell me": "教えてください",
}
COLOR_WORDS = {v[1]: (v[2], v[3]) for v in scenes.COLORS.values()}
NOUNS = set(scenes.SHAPES) | {s[1] for s in scenes.SHAPES.values()} | {"thing", "things"}
_PHRASES = sorted(list(EN_TO_JA) + list(COLOR_WORDS), key=lambda w: -len(w))
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in _PHRASES) + r")\b")


def code_switch(s: str, rng: random.Random, p: float) -> str:
    def swap(m: re.Match) -> str:
        w = m.group(1)
        if rng.random() >= p:
            return w
        if w in COLOR_WORDS:
            nxt = s[m.end():].split(" ", 2)
            return COLOR_WORDS[w][0 if len(nxt) > 1 and nxt[1].strip(".,?") in NOUNS else 1]
        return EN_TO_JA[w]

    return _PATTERN.sub(swap, s)


def ja_to_en() -> dict[str, str]:
    out = {ja: en for en, ja in EN_TO_JA.items() if en not in ("things", "nothing") and not en.endswith("s")}
    out |= {ja: en for en, ja in EN_TO_JA.items() if ja not in out}
    for en, (adj, noun) in COLOR_WORDS.items():
        out[adj] = out[noun] = en
    out["ゼロ"] = "no"
    return out


def align_rows(model, tok) -> int:
    """Japanese rows := the mean of their English translation's rows (embedding and lm_head)."""
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    n = 0
    with torch.no_grad():
        for ja, en in ja_to_en().items():
            en_ids = tok.encode(en, add_special_tokens=False).ids
            for ja_id in {tok.token_to_id(ja), tok.token_to_id("\u2581" + ja)} - {None}:
                emb[ja_id] = emb[en_ids].mean(0)
                head[ja_id] = head[en_ids].mean(0)
                n += 1
    return n


def add_code_switched_kinds(p: float) -> None:
    """Patch `text.document` with the "cs-<kind>" kinds: `<kind>` with words swapped at probability `p`."""
    document = text.document

    def cs_document(rng: random.Random, kind: str, book: scenes.Phrasebook, turns: int = 1) -> tuple[str, str]:
        if not kind.startswith("cs-"):
            return document(rng, kind, book, turns)
        prompt, answer = document(rng, kind[3:], book, turns)
        return code_switch(prompt, rng, p), code_switch(answer, rng, p)

    text.document = cs_document


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = json.loads(settings)
    p, align = cfg.pop("cs_p", 0.0), cfg.pop("align_init", False)
    add_code_switched_kinds(p)
    if align:
        train_lm = train.train_lm

        def aligned_train_lm(model, tok, *args, **kwargs):
            if args[5] == "japanese base":  # desc
                print(f"aligned {align_rows(model, tok)} Japanese rows", flush=True)
            return train_lm(model, tok, *args, **kwargs)

        train.train_lm = aligned_train_lm
    return short_answers.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
