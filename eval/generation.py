"""Batched image-text generation with any transformers image-text-to-text model and its processor.

- Prompts come from a template (`eval.prompts`; the model's chat template by default).
- Questions are ordered by prompt length (text tokens plus the image's placeholder tokens) and cut into
  batches of similar length, left-padded, and decoded by one `generate` call each with the KV cache.
  Greedy (the default), beam search and repetition penalty are settings; generation stops at EOS or
  `max_new_tokens`. Greedy batched output equals one-at-a-time output token for token.
- On a CUDA out-of-memory error the batch is split in half and retried, and later batches use the
  smaller size; at batch size 1 the error is reported.
- `encode_images` runs the vision tower and projector once; pass its `EncodedImage`s in place of the
  images to generate with any language model that shares them (evolutionary candidates differ only in
  the language model), through transformers' `mm_encoder_outputs`. Same tokens as from raw images.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from eval.decoding import GenerationSettings
from eval.prompts import PromptTemplate, build_prompt, image_token
from vlm_merge.errors import VlmMergeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedImage:
    """An image as the language model sees it: the projector's output, one row per image placeholder token."""

    features: torch.Tensor  # (tokens, hidden), kept on the CPU

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class Generation:
    text: str  # decoded new tokens, special tokens skipped, stripped
    token_ids: list[int]  # new tokens up to and including the first EOS; no padding
    prompt_tokens: int  # prompt length in tokens, image placeholders included


def _supports_encoded_images(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def _image_encoder(model):
    encoder = getattr(model.base_model, "get_image_features", None) or getattr(model, "get_image_features", None)
    if encoder is None or not _supports_encoded_images(model):
        import transformers

        raise VlmMergeError(
            f"{type(model).__name__} cannot take pre-encoded images (no get_image_features / mm_encoder_outputs in "
            f"transformers {transformers.__version__}; image-text models have it from transformers 5.18): upgrade "
            "transformers or pass PIL images instead"
        )
    return encoder


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_dtype(model) -> torch.dtype:
    """The dtype of `model`'s first floating-point parameter (float32 if it has none): what its inputs are cast to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.inference_mode()
def encode_images(
    model, processor, images: Sequence[Image.Image], *, batch_size: int = 8, progress: bool = False
) -> list[EncodedImage]:
    """Vision tower + projector features of each image, computed once, in order (CPU tensors)."""
    encoder = _image_encoder(model)
    accepted = set(inspect.signature(encoder).parameters)
    dtype, out = model_dtype(model), []
    batch = max(1, batch_size)
    pending = deque(range(0, len(images), batch))
    with tqdm(total=len(images), desc="encoding images", unit="img", disable=not progress) as bar:
        while pending:
            start = pending.popleft()
            chunk = [im.convert("RGB") for im in images[start : start + batch]]
            pixels = processor.image_processor(images=chunk, return_tensors="pt")
            kwargs = {k: v for k, v in pixels.items() if k in accepted}
            kwargs = {k: v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device) for k, v in kwargs.items()}
            try:
                pooled = encoder(**kwargs, return_dict=True).pooler_output
            except Exception as e:  # noqa: BLE001 - only OOM is retried
                if not _is_oom(e) or batch == 1:
                    raise
                _release_memory()
                batch = max(1, batch // 2)
                pending = deque(range(start, len(images), batch))  # everything from `start` on is still to do
                log.warning("out of memory encoding images; batch size halved to %d", batch)
                continue
            feats = list(pooled)
            if len(feats) != len(chunk):
                raise VlmMergeError(f"{type(model).__name__}: image features do not come one per image; pass PIL images instead")
            out += [EncodedImage(f.detach().to("cpu")) for f in feats]
            bar.update(len(chunk))
    return out


@dataclass
class _Sample:
    index: int
    prompt: str
    image: Image.Image | EncodedImage
    length: int = 0


def _prompt_lengths(processor, samples: list[_Sample]) -> None:
    """Set each sample's prompt length: text tokens + the image's placeholder tokens - the one in the text."""
    tokenizer = processor.tokenizer
    raw = [s for s in samples if not isinstance(s.image, EncodedImage)]
    counts: list[int] | None = None
    if raw and hasattr(processor, "_get_num_multimodal_tokens"):
        try:
            data = processor._get_num_multimodal_tokens(image_sizes=[(s.image.height, s.image.width) for s in raw])
            counts = list(data.num_image_tokens)
        except Exception:  # noqa: BLE001 - the count is only an ordering hint; measured below instead
            counts = None
    by_index = dict(zip((s.index for s in raw), counts)) if counts else {}
    for s in samples:
        text_tokens = len(tokenizer(s.prompt).input_ids)
        if isinstance(s.image, EncodedImage):
            s.length = text_tokens - 1 + s.image.n_tokens
        elif s.index in by_index:
            s.length = text_tokens - 1 + by_index[s.index]
        else:
            s.length = len(processor(images=[s.image], text=[s.prompt], return_tensors="pt").input_ids[0])


class _Generator:
    def __init__(self, model, processor, settings: GenerationSettings):
        self.model, self.processor, self.settings = model, processor, settings
        self.tokenizer = processor.tokenizer
        self.dtype = model_dtype(model)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos), None)

    def inputs(self, batch: list[_Sample]) -> dict:
        if isinstance(batch[0].image, EncodedImage):
            token = image_token(self.processor)
            texts = [s.prompt.replace(token, token * s.image.n_tokens, 1) for s in batch]
            enc = dict(self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))
            features = [s.image.features.to(self.model.device, self.dtype) for s in batch]
            enc["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            enc["input_ids"] = enc["input_ids"].to(self.model.device)
            enc["attention_mask"] = enc["attention_mask"].to(self.model.device)
            return enc
        enc = self.processor(
            images=[s.image for s in batch], text=[s.prompt for s in batch],
            return_tensors="pt", padding=True, padding_side="left",
        )
        return dict(enc.to(self.model.device, dtype=self.dtype))

    def run(self, batch: list[_Sample]) -> list[Generation]:
        if len(batch) > 1 and self.tokenizer.pad_token_id is None:
            raise VlmMergeError("the tokenizer has no pad token, so prompts cannot be batched; use batch size 1")
        inputs = self.inputs(batch)
        out = self.model.generate(**inputs, **self.settings.generate_kwargs(), pad_token_id=self.pad)
        width = inputs["input_ids"].shape[1]
        results = []
        for row, mask in zip(out[:, width:].tolist(), inputs["attention_mask"]):
            ids = row
            for i, t in enumerate(row):
                if t in self.eos:
                    ids = row[: i + 1]
                    break
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            results.append(Generation(text=text, token_ids=ids, prompt_tokens=int(mask.sum())))
        return results


@torch.inference_mode()
def generate(
    model,
    processor,
    images: Sequence[Image.Image] | Sequence[EncodedImage],
    questions: Sequence[str],
    *,
    template: str | PromptTemplate = "chat",
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: bool = False,
    on_batch=None,
) -> list[Generation]:
    """Answer `questions[i]` about `images[i]` (PIL images, or `encode_images` output); results in input order.

    `on_batch(indices, generations)` is called after every finished batch (checkpointing).
    """
    if len(images) != len(questions):
        raise VlmMergeError(f"{len(images)} images but {len(questions)} questions")
    settings = settings or GenerationSettings()
    encoded = [isinstance(im, EncodedImage) for im in images]
    if any(encoded) and not all(encoded):
        raise VlmMergeError("pass either PIL images or encoded images, not a mix")
    if any(encoded):
        _image_encoder(model)
    samples = [
        _Sample(i, build_prompt(processor, q, template), im if isinstance(im, EncodedImage) else im.convert("RGB"))
        for i, (im, q) in enumerate(zip(images, questions))
    ]
    _prompt_lengths(processor, samples)
    ordered = sorted(samples, key=lambda s: (s.length, s.index))
    size = max(1, batch_size)
    pending = deque(ordered[i : i + size] for i in range(0, len(ordered), size))
    generator = _Generator(model, processor, settings)
    results: list[Generation | None] = [None] * len(samples)
    with tqdm(total=len(samples), desc="generating", unit="q", disable=not progress) as bar:
        while pending:
            batch = pending.popleft()
            if len(batch) > size:  # the batch size was halved after an out-of-memory error
                pending.extendleft(reversed([batch[i : i + size] for i in range(0, len(batch), size)]))
                continue
            try:
                done = generator.run(batch)
            except Exception as e:  # noqa: BLE001 - only OOM is retried
                if not _is_oom(e):
                    raise
                _release_memory()
                if len(batch) == 1:
                    raise VlmMergeError(
                        f"out of memory generating one answer (prompt of {batch[0].length} tokens, "
                        f"max_new_tokens={settings.max_new_tokens}); use a smaller dtype, fewer beams or another device"
                    ) from None
                size = len(batch) // 2
                log.warning("out of memory at batch size %d; retrying at %d", len(batch), size)
                pending.appendleft(batch)
                continue
            for s, g in zip(batch, done):
                results[s.index] = g
            if on_batch is not None:
                on_batch([s.index for s in batch], done)
            bar.update(len(batch))
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # every batch either finished or raised; this would be a bug here
        raise RuntimeError(f"no generation for prompts {missing[:5]}")
    return results  # type: ignore[return-value]


def generate_answers(
    model,
    processor,
    images: Sequence[Image.Image] | Sequence[EncodedImage],
    questions: Sequence[str],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    template: str | PromptTemplate = "chat",
    settings: GenerationSettings | None = None,
) -> list[str]:
    """Answer `questions[i]` about `images[i]`; returns the decoded new text for each, in order.

    `max_new_tokens` overrides the one in `settings` (default settings: greedy, 32 new tokens).
    """
    settings = settings or GenerationSettings()
    if max_new_tokens is not None:
        settings = GenerationSettings(**{**settings.as_dict(), "max_new_tokens": max_new_tokens})
    gens = generate(model, processor, images, questions, template=template, settings=settings,
                    batch_size=batch_size, progress=progress)
    return [g.text for g in gens]
