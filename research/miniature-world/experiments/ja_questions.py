"""Session-5 and session-7 experiments (EXPERIMENTS.md, runs L1-R2 and U1-U6): an English base that *understands* Japanese questions but
answers them in English, as Llama-2 / Mistral often answer a Japanese prompt in English.

New document kind "jq-en" for `en_mix` / `vlm_replay_mix`: an English scene description, questions in
Japanese, answers in English (short answers, as `short_answers.py`). The English base then has to map a
Japanese question onto the same answer as its English twin, so both question forms share its circuits; the
Japanese continued pretraining only has to switch the answer language (its `ja_train_layers`), and the VLM
stage's image skill (`vlm_train_layers`) sits on circuits that Japanese questions already use.
Kind "jj-en" (session 7) is the same about a scene described in Japanese: the English base then reads
Japanese entirely and only answers in English, and the Japanese pretraining has only the answer language
left to learn.

`"factored_vision": true` pretrains the vision tower with one head per attribute (`factored_vision`);
`"en_base_from": ZOO/en-base` loads an English base trained with the same settings instead of retraining it;
`"ja_freeze_embeddings": true` keeps the input embeddings frozen in the Japanese continued pretraining.

    python research/miniature-world/experiments/ja_questions.py OUT '{"threads": 1, "en_mix": {"qa-en": 0.6, "jq-en": 0.3, ...}, ...}' SEED
"""

import dataclasses
import json
import random
import sys

import short_answers
import torch

from vlm_merge.world import scenes, text, train

# Japanese questions answered in English, about a scene described in English ("jq-en", session 5) or in
# Japanese ("jj-en", session 7: an English base that reads Japanese and only answers in English)
SCENE_LANGUAGE = {"jq-en": "en", "jj-en": "ja"}


def patch() -> None:
    """The "jq-en" and "jj-en" document kinds, for this process."""
    document = text.document

    def paired_qa(scene: scenes.Scene, rng: random.Random, book: scenes.Phrasebook) -> scenes.QA:
        while True:
            qtype = rng.choice(book.qtypes)
            cands = scenes._question_candidates(scene, qtype)
            if cands:
                args = scenes.choose_args(scene, qtype, cands, rng)
                en = book.make_qa(scene, qtype, "en", args, rng.randrange(len(book.phrasings(qtype, "en"))))
                ja = book.make_qa(scene, qtype, "ja", args, rng.randrange(len(book.phrasings(qtype, "ja"))))
                return dataclasses.replace(en, question=ja.question)

    def jq_document(rng: random.Random, kind: str, book: scenes.Phrasebook, turns: int = 1) -> tuple[str, str]:
        if kind not in SCENE_LANGUAGE:
            return document(rng, kind, book, turns)
        scene = scenes.sample_scene(rng)
        qas = [paired_qa(scene, rng, book) for _ in range(turns)]
        context = book.describe(scene, SCENE_LANGUAGE[kind])
        return text.prompt(context, qas[0].question) + text.turns_text(qas), qas[-1].answer

    text.document = jq_document


def factored_vision(s, seed: int, progress: bool, losses: list):
    """`train.train_vision` with one head per attribute (colour, shape: 4 + empty each) instead of one joint
    colour x shape head, plus the cell head: each attribute linearly readable on its own."""
    torch.manual_seed(seed)
    tower = train.CLIPVisionModel(train.vision_config(s))
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    heads = [torch.nn.Linear(s.vision_hidden, n) for n in (1 + len(colors), 1 + len(shapes), scenes.GRID**2)]
    rng = random.Random(seed)

    def labels(sc: scenes.Scene) -> list[list[int]]:
        color, shape = [0] * scenes.GRID**2, [0] * scenes.GRID**2
        for o in sc.objects:
            color[o.cell], shape[o.cell] = 1 + colors.index(o.color), 1 + shapes.index(o.shape)
        return [color, shape, list(range(scenes.GRID**2))]

    def batch_fn(step: int) -> torch.Tensor:
        sc = [scenes.sample_scene(rng) for _ in range(64)]
        h = tower(pixel_values=train.pixels([scenes.draw_scene(x) for x in sc])).last_hidden_state[:, 1:]
        ys = torch.tensor([labels(x) for x in sc])  # (batch, 3, cells)
        return sum(torch.nn.functional.cross_entropy(head(h).reshape(-1, head.out_features), ys[:, i].reshape(-1))
                   for i, head in enumerate(heads))

    tower.train()
    train._loop(list(tower.parameters()) + [p for h in heads for p in h.parameters()], s.vision_steps, 3e-3, batch_fn,
                "vision tower", progress, losses)
    tower.eval()
    return tower


def reuse_and_freeze(en_base_from: str | None, freeze_ja_embeddings: bool, freeze_ja_head: bool = False) -> None:
    """Patch `train.train_lm`: the English base is loaded from `en_base_from` (a zoo's en-base trained with the
    same settings and seed: the same weights, without the wait) and/or the Japanese continued pretraining keeps
    the input embeddings frozen (Japanese questions reach the blocks exactly as in the English base) and/or the
    output embeddings (lm_head: the English base's readout of the residual stream, session 11's C3/C4)."""
    train_lm = train.train_lm

    def patched(model, tok, mix, seed, steps, lr, batch, desc, *args, **kwargs):
        if desc == "english base" and en_base_from:
            from transformers import LlamaForCausalLM

            model.load_state_dict(LlamaForCausalLM.from_pretrained(en_base_from).state_dict())
            model.eval()
            return None
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        if desc == "japanese base" and freeze_ja_embeddings:
            embed.requires_grad_(False)
        if desc == "japanese base" and freeze_ja_head:
            head.requires_grad_(False)
        try:
            return train_lm(model, tok, mix, seed, steps, lr, batch, desc, *args, **kwargs)
        finally:
            embed.requires_grad_(True)
            head.requires_grad_(True)

    train.train_lm = patched


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = json.loads(settings)
    if cfg.pop("factored_vision", False):
        train.train_vision = factored_vision
    reuse_and_freeze(cfg.pop("en_base_from", None), cfg.pop("ja_freeze_embeddings", False), cfg.pop("ja_freeze_head", False))
    patch()
    return short_answers.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
