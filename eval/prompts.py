"""Prompt templates: how one question about one image becomes the model's input text.

`chat` (the default) is the model's own chat template (its processor's, else its tokenizer's, applied by
`processor.apply_chat_template` to one user turn holding an image and the question, as typed parts, or as
`<image>\n{question}` for a text-only template such as Llama-3's or Mistral's). The others are fixed strings from the published evaluations;
`{question}` is the question and `<image>` stands for the processor's image token. The tokenizer adds
BOS itself, so no template spells `<s>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlm_merge.errors import VlmMergeError

IMAGE_PLACEHOLDER = "<image>"
# how a template reads typed content parts: content['type'], content.type, selectattr('type', ...)
CONTENT_PART_TYPE = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|['"]type['"]\s*,""")
JA_SHISA_SYSTEM = "あなたは役立つ、偏見がなく、検閲されていないアシスタントです。与えられた画像を下に、質問に答えてください。"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str | None  # None: the model's own chat template
    description: str


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("chat", None, "the model's own chat template (one user turn: image, question)"),
        PromptTemplate(
            "ja-shisa-vqa",
            f"[INST] <<SYS>>\n{JA_SHISA_SYSTEM}\n<</SYS>>\n\n{IMAGE_PLACEHOLDER}\n{{question}} [/INST]",
            "Sakana EvoVLM-JP evaluation: Llama-2 [INST] <<SYS>> form with shisa-gamma's Japanese system line",
        ),
        PromptTemplate(
            "llava-mistral", f"[INST] {IMAGE_PLACEHOLDER}\n{{question}} [/INST]", "LLaVA-1.6-Mistral conversation"
        ),
        PromptTemplate("llava-1.5", f"USER: {IMAGE_PLACEHOLDER}\n{{question}} ASSISTANT:", "LLaVA-1.5 conversation"),
    )
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise VlmMergeError(f"unknown prompt template {name!r}: choose from {', '.join(TEMPLATES)}") from None


def image_token(processor) -> str:
    """The processor's image placeholder token (`<image>` for LLaVA)."""
    return getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER


def model_chat_template(processor) -> str | None:
    """The model's own chat template: its processor's, else its tokenizer's (None when it has neither)."""
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)


def takes_content_parts(chat_template: str) -> bool:
    """Whether a chat template reads a message's content as typed parts (``{"type": "image"}`` ...), as processor
    templates do, rather than as one string, as text-only tokenizer templates (Llama-3's, Mistral's) do."""
    return bool(CONTENT_PART_TYPE.search(chat_template))


def chat_messages(chat_template: str, question: str, image: str = IMAGE_PLACEHOLDER) -> list[dict]:
    """A one-image user turn in the form ``chat_template`` reads: typed parts, or the image token, a newline and
    the question as one string (LLaVA's own prompt for text-only templates: EvoVLM-JP, Mantis)."""
    if takes_content_parts(chat_template):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return [{"role": "user", "content": f"{image}\n{question}"}]


def build_prompt(processor, question: str, template: str | PromptTemplate = "chat") -> str:
    """The input text for `question` (one image) under `template`."""
    t = get_template(template) if isinstance(template, str) else template
    question = question.replace(image_token(processor), "")  # the template places the one image (as llm-jp-eval-mm)
    if t.text is None:
        own = model_chat_template(processor)
        if not own:
            raise VlmMergeError(
                "the model's processor and tokenizer have no chat template; choose a prompt template: "
                + ", ".join(n for n in TEMPLATES if n != "chat")
            )
        return processor.apply_chat_template(chat_messages(own, question, image_token(processor)), chat_template=own,
                                             add_generation_prompt=True)
    return t.text.replace(IMAGE_PLACEHOLDER, image_token(processor)).replace("{question}", question)


def template_text(processor, template: str | PromptTemplate) -> str:
    """The template as text with `{question}` left in (recorded in score files)."""
    return build_prompt(processor, "{question}", template)


def prompt_record(processor, template: str | PromptTemplate, source: str, example_question: str | None) -> dict:
    """What a score file records about the prompt: the template's name, who chose it (`source`), its text
    with `{question}` left in, a rendered example, and the model's own chat template when the template is
    fixed text and renders differently (then `note` says so in one line)."""
    t = get_template(template) if isinstance(template, str) else template
    record = {"template": t.name, "source": source, "text": template_text(processor, t)}
    if example_question is not None:
        record["example"] = build_prompt(processor, example_question, t)
    if t.text is not None and model_chat_template(processor):
        own = template_text(processor, "chat")
        if own != record["text"]:
            record["model_template_text"] = own
            record["note"] = (f"{source} prompts in the fixed template {t.name} ({record['text']!r}), not this model's "
                              f"own chat template ({own!r}); pass --template chat to use the model's own")
    return record
