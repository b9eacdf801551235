"""Load a vlm-merge output with transformers 4.x and generate a few tokens (a compatibility check).

Run with the side environment (git-ignored, not the project's .venv):

    python3 -m venv bench/.venv-tf4
    bench/.venv-tf4/bin/pip install -q --find-links /opt/wheels -c constraints.txt torch==2.13.0 \
        'transformers==4.46.*' safetensors sentencepiece protobuf pillow
    bench/.venv-tf4/bin/python bench/tf4_load.py OUTDIR

It loads OUTDIR with 4.x's own Llava / LlavaNext class (no missing or unexpected weights allowed), its
processor (image processor from preprocessor_config.json) and tokenizer (fast, and slow when a
tokenizer.model is shipped), checks that config, tokenizer and processor agree on the image and pad
tokens and left padding, generates 4 tokens for an image + question in the model's chat template, and
prints one JSON object. Exit status 1 and the problems on stderr when a check fails. Imports nothing
from vlm-merge, so it runs in an environment that only has transformers 4.x.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def check(out_dir: Path) -> tuple[dict, list[str]]:
    """Load `out_dir` with transformers 4.x, generate, and return (facts, problems)."""
    problems: list[str] = []
    config = AutoConfig.from_pretrained(out_dir)
    model_class = getattr(transformers, CLASSES[config.model_type])
    model, info = model_class.from_pretrained(out_dir, torch_dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            problems.append(f"{kind}: {sorted(info[kind])[:3]}")
    processor = AutoProcessor.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    slow = AutoTokenizer.from_pretrained(out_dir, use_fast=False) if (out_dir / "tokenizer.model").exists() else None
    rows = model.get_input_embeddings().weight.shape[0]
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    facts = {
        "transformers": transformers.__version__,
        "model_class": type(model).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "tokenizer": type(tokenizer).__name__,
        "slow_tokenizer": type(slow).__name__ if slow is not None else None,
        "embedding_rows": rows,
        "vocab_size": config.text_config.vocab_size,
        "image_token_index": config.image_token_index,
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": tokenizer.padding_side,
    }
    if config.text_config.vocab_size != rows:
        problems.append(f"text_config.vocab_size {config.text_config.vocab_size} != embedding rows {rows}")
    if image_id != config.image_token_index:
        problems.append(f"tokenizer's {processor.image_token} is id {image_id}, config image_token_index {config.image_token_index}")
    if getattr(config, "pad_token_id", None) not in (None, tokenizer.pad_token_id):
        problems.append(f"config pad_token_id {config.pad_token_id} != tokenizer pad id {tokenizer.pad_token_id}")
    if tokenizer.padding_side != "left":
        problems.append(f"tokenizer padding_side {tokenizer.padding_side!r} (batched generation needs left)")
    if slow is not None and slow.get_vocab() != tokenizer.get_vocab():
        problems.append("slow (tokenizer.model) and fast tokenizers have different vocabularies")
    question = "この画像は何ですか?"
    if processor.chat_template or tokenizer.chat_template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        problems.append("no chat template (processor or tokenizer)")
        prompt = f"USER: {processor.image_token}\n{question} ASSISTANT:"
    size = config.vision_config.image_size
    image = Image.new("RGB", (size * 2, size), (200, 30, 30))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    facts["prompt"] = prompt
    facts["generated_tokens"] = int(out.shape[1] - inputs["input_ids"].shape[1])
    if facts["generated_tokens"] < 1:
        problems.append("generated no tokens")
    return facts, problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tf4_load.py OUTDIR", file=sys.stderr)
        return 2
    facts, problems = check(Path(argv[0]))
    print(json.dumps(facts, ensure_ascii=False))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
