"""Batched image-text generation with any transformers VLM and its processor.

Prompts are built with the processor's chat template, left-padded so a batch decodes in one
`generate` call with the KV cache; greedy by default. Batches are formed from prompts of similar
length to waste little padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm


def chat_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Answer `questions[i]` about `images[i]`; returns the decoded new text for each, in order."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i]).input_ids))
    answers: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress):
        inputs = processor(
            images=[images[i].convert("RGB") for i in batch],
            text=[prompts[i] for i in batch],
            return_tensors="pt",
            padding=True,
        )
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]
        for i, seq in zip(batch, new):
            answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    return answers
