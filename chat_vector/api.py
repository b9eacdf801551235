"""Chat Vector for VLMs: `ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`.

Three ways in, one engine (the public API of `vlm_merge.engine`):
- `chat_vector(vlm, en_base, ja_base, out)`: the recipe `chat_vector_recipe(…)` (the core's preset,
  `vlm_merge.recipe.presets`: task arithmetic over the English base, starting from the Japanese base) run by
  `vlm_merge.engine.merge` in one streaming pass; the output's `merge_recipe.yaml` replays it with `vlm-merge merge`.
- `extract_delta(vlm, en_base, file)`: save `vlm_llm - en_base` once (`vlm_merge.engine.extract_task_vector`)
  as a safetensors file with its sources, key map, dtype and the English vocabulary in the metadata;
  `load_delta(file)` reads it back.
- `apply_delta(delta, ja_base, out, vlm=…)`: add a saved delta to a Japanese base
  (`vlm_merge.engine.apply_task_vector`), bit-identical to `chat_vector` when the delta is float32.
The vision tower and projector are copied byte for byte from the VLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import vlm_merge
from vlm_merge.architecture.anatomy import inspect_vlm
from vlm_merge.architecture.vocab import VocabSide
from vlm_merge.engine import TARGET, BackbonePlan, TaskVectorInfo, apply_task_vector, extract_task_vector, merge
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.card import model_card
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, dtype_from_name, read_safetensors_header
from vlm_merge.io.outputs import prepare_output_dir
from vlm_merge.io.safe_load import parse_json
from vlm_merge.recipe.presets import chat_vector_recipe, make_scales

__all__ = [
    "ChatVectorDelta", "apply_delta", "chat_vector", "chat_vector_recipe", "check_output_args", "extract_delta",
    "load_delta", "make_scales",
]  # fmt: skip

METADATA_KEY = "chat_vector"


def check_output_args(dtype: object, max_shard_bytes: object) -> None:
    """One-line errors for a bad `dtype` or `max_shard_bytes` argument, before any model is opened."""
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise VlmMergeError(f"dtype {dtype!r}: must be a name such as bfloat16, float16, float32 (--dtype)")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise VlmMergeError(f"max_shard_bytes {max_shard_bytes!r}: must be a positive whole number of bytes (--max-shard-size)")


def chat_vector(
    vlm: str | Path,
    en_base: str | Path,
    ja_base: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    layer_scales: list[float] | None = None,
    module_scales: Mapping[str, float] | None = None,
    skip: str | list[str] | None = None,
    dtype: str | torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    trust_remote_code: bool = False,
    text_config_from: str = "vlm",
    allow_nonfinite: bool = False,
) -> Path:
    """Write a Japanese VLM: the VLM's vision side + `ja_base + scale * (vlm_llm - en_base)`.

    `layer_scales` multiplies the scale per decoder layer, `module_scales` per module group
    (attention, mlp, norms, embeddings, lm_head); `skip` names presets or regexes of tensors that keep
    the Japanese base's value (see `chat_vector.rules`). `dtype` is the output dtype of the language
    model (default: the VLM's). `text_config_from` ("vlm" or "ja_base"/"target") says whose RoPE, sliding
    window, norm eps, context length, … the output has (see `vlm_merge.engine.model_files.FUNCTION_FIELDS`).
    The output holds `merge_recipe.yaml`: `vlm-merge merge` replays it.
    Merged values that are NaN/inf in the output dtype are an error unless `allow_nonfinite`.
    """
    text_config_from = TARGET if text_config_from == "ja_base" else text_config_from
    check_output_args(dtype, max_shard_bytes)
    scales = make_scales(scale, layer_scales, module_scales, skip)
    prepare_output_dir(out, force, [vlm, en_base, ja_base, vision_tower])
    if scales.layer_scales is not None:
        with CheckpointReader(vlm, cache_dir) as reader:
            scales.check_layers(inspect_vlm(reader).num_layers)
    dtype_name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    recipe = chat_vector_recipe(vlm, en_base, ja_base, scales, dtype_name)
    return merge(
        recipe, out, force=force, max_shard_bytes=max_shard_bytes, vision_tower=vision_tower, cache_dir=cache_dir,
        progress=progress, trust_remote_code=trust_remote_code, card_title="Japanese VLM by Chat Vector",
        text_config_from=text_config_from,
        allow_nonfinite=allow_nonfinite,
    )


# ------------------------------------------------------------------------------------------
# Saved deltas
# ------------------------------------------------------------------------------------------


@dataclass
class ChatVectorDelta:
    """A saved `vlm_llm - en_base`: tensors under canonical LLM keys, plus what made them."""

    path: Path
    reader: CheckpointReader
    metadata: dict

    @property
    def vocab_side(self) -> VocabSide:
        v = self.metadata.get("en_vocab")
        rows = self.reader.info("model.embed_tokens.weight").shape[0] if "model.embed_tokens.weight" in self.reader else 0
        return VocabSide(rows, v, self.metadata.get("en_vocab_size"), self.metadata.get("en_pad_token"))

    def close(self) -> None:
        self.reader.close()


def extract_delta(
    vlm: str | Path,
    en_base: str | Path,
    out_file: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Save `vlm_llm - en_base` (language model only) as one safetensors file, streaming.

    Embedding / lm_head rows follow the English base's vocabulary; a row whose token the VLM lacks
    is zero. float32 (default) keeps `apply_delta` bit-identical to `chat_vector`.
    """
    return extract_task_vector(
        vlm, en_base, out_file, metadata=_delta_metadata, dtype=dtype, cache_dir=cache_dir, force=force,
        progress=progress, base_role="--en-base", what="chat vector", sides=("VLM", "English base"),
    )


def _delta_metadata(info: TaskVectorInfo) -> dict[str, str]:
    """The saved delta's safetensors metadata: one JSON record under `METADATA_KEY`."""
    tok = info.base_tokenizer
    meta = {
        "format": "vlm-merge chat vector",
        "formula": "vlm_llm - en_base",
        "sources": {"vlm": str(info.model), "en_base": str(info.base)},
        "vlm_layout": info.layout,
        "key_map": info.key_map,
        "dtype": str(info.dtype).removeprefix("torch."),
        "en_vocab": dict(tok.get_vocab()) if tok is not None else None,
        "en_vocab_size": len(tok) if tok is not None else None,
        "en_pad_token": getattr(tok, "pad_token", None) if tok is not None else None,
        "vlm_merge_version": vlm_merge.__version__,
    }
    return {METADATA_KEY: json.dumps(meta, ensure_ascii=False)}


def load_delta(path: str | Path) -> ChatVectorDelta:
    """Open a saved Chat Vector (lazily); errors if the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise VlmMergeError(f"{path}: no such chat vector file")
    _, raw = read_safetensors_header(path)
    if METADATA_KEY not in raw:
        raise VlmMergeError(f"{path}: not a chat vector saved by vlm-merge (no '{METADATA_KEY}' metadata)")
    reader = CheckpointReader(path.parent, files=[path])
    metadata = parse_json(raw[METADATA_KEY], f"{path} (metadata {METADATA_KEY!r})")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("sources"), dict):
        reader.close()
        raise VlmMergeError(f"{path}: its {METADATA_KEY!r} metadata is not a vlm-merge chat vector record; re-extract it")
    return ChatVectorDelta(path, reader, metadata)


def apply_delta(
    delta: str | Path | ChatVectorDelta,
    ja_base: str | Path,
    out: str | Path,
    *,
    vlm: str | Path | None = None,
    scale: float = 1.0,
    layer_scales: list[float] | None = None,
    module_scales: Mapping[str, float] | None = None,
    skip: str | list[str] | None = None,
    dtype: str | torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    text_config_from: str = "vlm",
) -> Path:
    """Write a Japanese VLM from a saved delta: `ja_base + scale * delta`, vision side from the VLM.

    `vlm` defaults to the VLM path recorded in the delta; `text_config_from` as in `chat_vector`.
    """
    text_config_from = TARGET if text_config_from == "ja_base" else text_config_from
    check_output_args(dtype, max_shard_bytes)
    prepare_output_dir(out, force, [delta if not isinstance(delta, ChatVectorDelta) else delta.path, ja_base, vlm, vision_tower])
    d = delta if isinstance(delta, ChatVectorDelta) else load_delta(delta)
    vlm_path = vlm or d.metadata["sources"]["vlm"]
    scales = make_scales(scale, layer_scales, module_scales, skip)

    def weight(num_layers: int) -> object:
        scales.check_layers(num_layers)
        return scales.weight_setting()

    def card(bp: BackbonePlan) -> str:
        sources = bp.sources
        names = {"chat_vector": str(d.path), **{f"delta {k}": v for k, v in d.metadata["sources"].items()},
                 "ja_base": str(sources.target.reader.path), "vlm (vision side)": str(sources.vlm.reader.path)}
        recipe = {"method": "chat_vector (saved delta)", "formula": "ja_base + weight * delta", "weight": scales.weight_setting()}
        details = [f"delta stored as {d.metadata.get('dtype')}", "vocabulary: " + (bp.vocab.summary() if bp.vocab else "unchanged"),
                   *bp.card_details()]
        return model_card("Japanese VLM by Chat Vector", "chat_vector", recipe, names, details)

    try:
        return apply_task_vector(
            d.reader, d.vocab_side, ja_base, out, vlm=vlm_path, weight=weight, card=card, name="the chat vector",
            dtype=_dtype(dtype), vision_tower=vision_tower, cache_dir=cache_dir, force=force,
            max_shard_bytes=max_shard_bytes, progress=progress, text_config_from=text_config_from,
        )
    finally:
        if not isinstance(delta, ChatVectorDelta):
            d.close()


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return dtype_from_name(dtype) if isinstance(dtype, str) else dtype
