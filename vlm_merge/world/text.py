"""Text of the miniature world: the chat format, the pretraining corpora and the shared BPE tokenizer.

Every text model speaks one chat format, the llava-1.5 one its VLM is prompted with:
``USER: {context}\\n{question} ASSISTANT: {answer}</s>``; for the VLM the context is ``<image>``, for the
text models it is a written description of a scene (reading comprehension), so the language models know
the questions and answer forms before they ever see an image.

Corpora (documents drawn from a seed):
- English base: English scene QA and descriptions, plus some Japanese and EN<->JA translation pairs;
- Japanese continued pretraining: Japanese scene QA and descriptions, English replay, translation pairs.
One byte-level-free BPE tokenizer, trained on both languages, serves all three models (the VLM's adds
``<image>`` and ``<pad>``), as Llama-2 serves Llava-1.5 and a Japanese continued pretraining of it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)

from vlm_merge.world import scenes

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
TOKENIZER_VOCAB = 1000
MAX_LENGTH = 256


def prompt(context: str, question: str) -> str:
    """The chat prompt up to the assistant's turn (no BOS: the tokenizer adds it)."""
    return f"USER: {context}\n{question} ASSISTANT:"


TRANSLATE = {"en": "translate into japanese.", "ja": "英語に翻訳してください。"}  # asked after the text


def _parallel(scene: scenes.Scene, rng: random.Random, book: scenes.Phrasebook) -> tuple[str, str]:
    """An (English, Japanese) pair about `scene`: its description or one QA answer."""
    if rng.random() < 0.4:
        return book.describe(scene, "en"), book.describe(scene, "ja")
    qtype = rng.choice(book.qtypes)
    cands = scenes._question_candidates(scene, qtype)
    while not cands:
        qtype = rng.choice(book.qtypes)
        cands = scenes._question_candidates(scene, qtype)
    args = rng.choice(cands)
    p = rng.randrange(3)
    en, ja = book.make_qa(scene, qtype, "en", args, p), book.make_qa(scene, qtype, "ja", args, p)
    return (en.answer, ja.answer) if rng.random() < 0.5 else (en.question, ja.question)


def turns_text(qas: list[scenes.QA]) -> str:
    """Earlier chat turns about the same context, as they precede a follow-up question (LLaVA's multi-turn
    format): ``{answer}</s> USER: {question} ASSISTANT:`` repeated, starting after the first prompt."""
    return "".join(f" {qa.answer}{EOS} USER: {nxt.question} ASSISTANT:" for qa, nxt in zip(qas, qas[1:]))


def document(rng: random.Random, kind: str, book: scenes.Phrasebook, turns: int = 1) -> tuple[str, str]:
    """One training document as (prompt, answer), worded by `book`; a plain text has an empty prompt.

    kind: "qa-en" / "qa-ja" (scene reading comprehension, `turns` questions about one scene in a multi-turn
    chat), "xqa-en" / "xqa-ja" (the same with the scene described in the other language: the answer
    follows the question's language), "text-en" / "text-ja" (descriptions), "para" (translation either
    way, the instruction after the text).
    """
    scene = scenes.sample_scene(rng)
    if kind.startswith(("qa-", "xqa-")):
        lang = kind.split("-")[1]
        context = lang if kind.startswith("qa-") else ("ja" if lang == "en" else "en")
        qas = [book.sample_qa(scene, rng, lang) for _ in range(turns)]
        return prompt(book.describe(scene, context), qas[0].question) + turns_text(qas), qas[-1].answer
    if kind.startswith("text-"):
        return "", book.describe(scene, kind[5:])
    en, ja = _parallel(scene, rng, book)
    if rng.random() < 0.5:
        return prompt(en, TRANSLATE["en"]), ja
    return prompt(ja, TRANSLATE["ja"]), en


def mixture_sampler(mix: dict[str, float], seed: int, book: scenes.Phrasebook, turns: int = 1):
    """An endless iterator of documents drawn from `mix` (kind -> weight), QA chats of `turns` turns. The kinds are
    drawn in `mix`'s key order: the same weights in another order draw other documents."""
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    while True:
        yield document(rng, rng.choices(kinds, weights)[0], book, turns)


def tokenizer_corpus(seed: int, book: scenes.Phrasebook, n: int = 6000) -> list[str]:
    rng = random.Random(seed)
    kinds = ["qa-en", "qa-ja", "text-en", "text-ja", "para"]
    texts = []
    for i in range(n):
        p, a = document(rng, kinds[i % len(kinds)], book)
        texts.append(f"{p} {a}".strip())
    return texts + phrasing_texts(book)


def phrasing_texts(book: scenes.Phrasebook) -> list[str]:
    """Every phrasing of every question type in both languages, three times: added to a tokenizer corpus so
    that no question form is split oddly."""
    return [t for qtype in scenes.PHRASINGS for lang in scenes.LANGS for t in book.phrasings(qtype, lang) * 3]


JA_FUNCTION_WORDS = (
    "ありません", "あります", "ある", "もの", "いくつ", "何個", "何色", "何", "どこ", "どちら", "どんな", "形", "色",
    "数えてください", "教えてください", "翻訳してください", "数", "見えます", "ほう", "多い", "場所", "英語", "には",
    "です", "ます", "は", "が", "に", "の", "を", "と", "か", "も",
)


def japanese_words(book: scenes.Phrasebook) -> list[str]:
    """The Japanese lexicon the pre-tokenizer isolates (longest first), so Japanese is cut into words as
    English is by spaces: colours, shapes, positions, numbers and function words."""
    words = set(JA_FUNCTION_WORDS) | set(scenes.JA_NUMBERS) | book.japanese_words()
    words |= {w for v in scenes.COLORS.values() for w in v[2:]}
    words |= {v[2] for v in scenes.SHAPES.values()} | {v[1] for v in scenes.POSITIONS.values()}
    return sorted(words, key=lambda w: (-len(w), w))


def build_tokenizer(seed: int, book: scenes.Phrasebook, vocab_size: int = TOKENIZER_VOCAB) -> Tokenizer:
    """A BPE tokenizer over both languages (Metaspace words; Japanese has no spaces, so BPE splits it)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Punctuation("isolated"),
        pre_tokenizers.Split(Regex("|".join(re.escape(w) for w in japanese_words(book))), "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], show_progress=False, min_frequency=2
    )
    tok.train_from_iterator(tokenizer_corpus(seed, book), trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def vlm_tokenizer(base: Tokenizer) -> Tokenizer:
    """The base tokenizer plus llava-hf's added `<image>` and `<pad>` tokens (appended ids)."""
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                            AddedToken(PAD_TOKEN, special=True, normalized=False)])
    return tok


def write_tokenizer(tok: Tokenizer, out_dir: str | Path, vlm: bool = False, chat_template: str | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    if vlm:
        special["pad_token"] = PAD_TOKEN
    config = {**special, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": MAX_LENGTH, "tokenizer_class": "PreTrainedTokenizerFast"}
    if vlm:
        config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
