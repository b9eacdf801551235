"""Session-6 experiment (EXPERIMENTS.md, runs S1, S2): text bases that are *base* models, not chat models.

Llama-2, Mistral, Swallow and ELYZA's base models are pretrained on documents; the chat format that LLaVA-1.5
is prompted with (``USER: ... ASSISTANT: ...</s>``) comes from Vicuna's chat tuning and LLaVA's own stage 2.
Chat Vector was made for exactly that: giving a continued-pretrained base the chat ability of a tuned model.
Until session 5 every text model of the world was trained in the chat format, so the Japanese base already
answered chats and the delta had only its visual skill to add.

Here the English and Japanese bases read documents: a scene description followed by questions and answers
as a web page writes them (``Q: {question}\\nA: {answer}`` lines, the same markers in both languages, no
end-of-turn token), plain descriptions, and bilingual pages (a text and its translation on the next line).
The chat format appears only in the VLM stage: the image chats and the text-only replay (kind
``chat-qa-en``, English reading-comprehension chats, as LLaVA mixes in ShareGPT conversations). Short
answers as `short_answers.py`. The tokenizer is trained on both forms.

    python research/miniature-world/experiments/chat_format.py OUT '{"threads": 1, ...}' SEED
"""

import random
import sys

import short_answers

from vlm_merge.world import scenes, text

_chat_document = text.document


def page_document(rng: random.Random, kind: str, book: scenes.Phrasebook, turns: int = 1) -> tuple[str, str]:
    """One document in page form (see the module docstring); ``chat-{kind}`` is `kind` in the chat format."""
    if kind.startswith("chat-"):
        return _chat_document(rng, kind.removeprefix("chat-"), book, turns)
    scene = scenes.sample_scene(rng)
    if kind.startswith(("qa-", "xqa-")):
        lang = kind.split("-")[1]
        context = lang if kind.startswith("qa-") else ("ja" if lang == "en" else "en")
        qas = [book.sample_qa(scene, rng, lang) for _ in range(turns)]
        page = book.describe(scene, context)
        page += "".join(f"\nQ: {qa.question}\nA: {qa.answer}" for qa in qas[:-1])
        return f"{page}\nQ: {qas[-1].question}\nA:", qas[-1].answer
    if kind.startswith("text-"):
        return "", book.describe(scene, kind[5:])
    en, ja = text._parallel(scene, rng, book)
    return "", f"{en}\n{ja}" if rng.random() < 0.5 else f"{ja}\n{en}"


def tokenizer_corpus(seed: int, book: scenes.Phrasebook, n: int = 6000) -> list[str]:
    """The shipped corpus's kinds in both forms, plus every phrasing."""
    rng = random.Random(seed)
    kinds = ["qa-en", "qa-ja", "text-en", "text-ja", "para", "chat-qa-en", "chat-qa-ja"]
    texts = []
    for i in range(n):
        p, a = page_document(rng, kinds[i % len(kinds)], book)
        texts.append(f"{p} {a}".strip())
    return texts + text.phrasing_texts(book)


def patch() -> None:
    """Page-form documents and their tokenizer for this process (`short_answers.main` adds short answers)."""
    text.document = page_document
    text.tokenizer_corpus = tokenizer_corpus


def main(argv: list[str]) -> int:
    patch()
    return short_answers.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
