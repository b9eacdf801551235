"""Chat Vector for VLMs: `ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`.

Three ways in, one engine (`vlm_merge.engine.backbone` over `vlm_merge.engine.streaming`):
- `chat_vector(vlm, en_base, ja_base, out)`: the recipe `chat_vector_recipe(…)` (task arithmetic over
  the English base, starting from the Japanese base) run by `vlm_merge.engine.merge.merge` in one streaming
  pass; the output's `merge_recipe.yaml` replays it with `vlm-merge merge`.
- `extract_delta(vlm, en_base, file)`: save `vlm_llm - en_base` once as a safetensors file with its
  sources, key map, dtype and the English vocabulary in the metadata; `load_delta(file)` reads it back.
- `apply_delta(delta, ja_base, out, vlm=…)`: add a saved delta to a Japanese base
  (`vlm_merge.methods.add_task_vectors`), bit-identical to `chat_vector` when the delta is float32.
The vision tower and projector are copied byte for byte from the VLM.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import vlm_merge
from chat_vector.rules import Scales, resolve_skip
from vlm_merge.architecture.anatomy import align, inspect_llm, inspect_vlm, layer_index
from vlm_merge.engine.backbone import TARGET, VLM, Source, open_sources, plan_backbone, write_backbone
from vlm_merge.io.card import model_card
from vlm_merge.io.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    dtype_from_name,
    read_safetensors_header,
)
from vlm_merge.engine.streaming import Merge, MergePlan, OutputTensor, execute
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.merge import merge
from vlm_merge.methods import add_task_vectors, difference
from vlm_merge.io.outputs import check_output, prepare_output_dir, scratch_dir
from vlm_merge.io.safe_load import parse_json
from vlm_merge.recipe import VLM_REF, ModelEntry, Recipe, resolve_setting
from vlm_merge.architecture.vocab import RowMap, VocabPlan, VocabSide, load_tokenizer, match_rows

EN_BASE, DELTA = "en_base", "delta"
METADATA_KEY = "chat_vector"


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return dtype_from_name(dtype) if isinstance(dtype, str) else dtype


_FLAGS = {"scale": "--scale", "layer_scales": "--layer-scales", "module_scales": "--module-scale"}  # argument -> CLI flag


def _number(value: object, name: str) -> float:
    """`value` as a finite float, or a one-line error naming the argument (`name`, e.g. layer_scales[2]) and its flag."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        arg = name.split("[")[0]
        raise VlmMergeError(f"{name} {value!r}: must be a finite number ({_FLAGS[arg]} / {arg}=)")
    return float(value)


def make_scales(
    scale: float = 1.0,
    layer_scales: list[float] | None = None,
    module_scales: Mapping[str, float] | None = None,
    skip: str | list[str] | None = None,
) -> Scales:
    """The Chat Vector's scales from user arguments, each checked (a finite number; lists and maps of them)."""
    if layer_scales is not None and (isinstance(layer_scales, (str, bytes)) or not isinstance(layer_scales, (list, tuple))):
        raise VlmMergeError(f"layer_scales {layer_scales!r}: must be a list of numbers, one per decoder layer (--layer-scales)")
    if module_scales is not None and not isinstance(module_scales, Mapping):
        raise VlmMergeError(f"module_scales {module_scales!r}: must be a mapping of module name to number (--module-scale)")
    if skip is not None and not isinstance(skip, (str, list, tuple)):
        raise VlmMergeError(f"skip {skip!r}: must be a string or a list of presets/regexes (--skip)")
    return Scales(
        scale=_number(scale, "scale"),
        layer_scales=tuple(_number(x, f"layer_scales[{i}]") for i, x in enumerate(layer_scales)) if layer_scales is not None else None,
        module_scales={str(k): _number(v, f"module_scales[{k!r}]") for k, v in (module_scales or {}).items()},
        skip=resolve_skip(skip),
    )


def check_output_args(dtype: object, max_shard_bytes: object) -> None:
    """One-line errors for a bad `dtype` or `max_shard_bytes` argument, before any model is opened."""
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise VlmMergeError(f"dtype {dtype!r}: must be a name such as bfloat16, float16, float32 (--dtype)")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise VlmMergeError(f"max_shard_bytes {max_shard_bytes!r}: must be a positive whole number of bytes (--max-shard-size)")


def chat_vector_recipe(
    vlm: str | Path, en_base: str | Path, ja_base: str | Path, scales: Scales, dtype: str | None = None
) -> Recipe:
    """Chat Vector as a recipe: task arithmetic over the English base, starting from the Japanese base.

    `ja_base + w * (vlm_llm - en_base)`, w per tensor from `scales` (see `Scales.weight_setting`).
    """
    return Recipe(
        merge_method="task_arithmetic",
        vlm=str(vlm),
        base_model=str(en_base),
        target=str(ja_base),
        models=(ModelEntry(VLM_REF, {"weight": scales.weight_setting()}),),
        dtype=dtype,
    )


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
    window, norm eps, context length, … the output has (see `vlm_merge.engine.backbone.FUNCTION_FIELDS`).
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
    out_file = Path(out_file).expanduser()
    check_output(out_file, [vlm, en_base])
    if out_file.exists() and not force:
        raise VlmMergeError(f"{out_file}: already exists; pass --force (force=True) to replace it")
    if out_file.is_dir():
        raise VlmMergeError(f"{out_file}: is a directory; give a file name for the chat vector")
    out_dtype = _dtype(dtype)
    vlm_reader, en_reader = CheckpointReader(vlm, cache_dir), CheckpointReader(en_base, cache_dir)
    try:
        vlm_anat = inspect_vlm(vlm_reader, base=en_reader)
        en_anat = inspect_llm(en_reader, "--en-base")
        alignment = align(vlm_anat, en_anat)
        vlm_tok, en_tok = load_tokenizer(vlm_reader.path), load_tokenizer(en_reader.path)
        vocab = None
        en_rows = en_anat.vocab_rows or 0
        if alignment.vocab_keys:
            en_side, vlm_side = VocabSide.of(en_rows, en_tok), VocabSide.of(vlm_anat.vocab_rows or 0, vlm_tok)
            if en_side.vocab is None or vlm_side.vocab is None:
                if en_rows != vlm_side.rows:
                    raise VlmMergeError(
                        f"vocabulary sizes differ (VLM {vlm_side.rows}, English base {en_rows}) and a tokenizer is "
                        "missing; add tokenizer files so rows can be matched by token string"
                    )
                lookup = {i: i for i in range(en_rows)}
            else:
                lookup = match_rows(en_side.vocab, en_rows, vlm_side)
            rows = sorted(lookup)
            vocab = VocabPlan(
                out_rows=en_rows,
                target_rows=en_rows,
                pairs={VLM: RowMap(torch.tensor(rows, dtype=torch.long), torch.tensor([lookup[r] for r in rows], dtype=torch.long))},
            )
        tensors = []
        for canon, vkey in alignment.pairs.items():
            info = en_anat.infos[en_anat.lm_keys[canon]]
            op = Merge({VLM: vkey, EN_BASE: en_anat.lm_keys[canon]}, _delta_tensor, vocab=canon in alignment.vocab_keys, target_role=EN_BASE)
            tensors.append(OutputTensor(canon, info.shape, out_dtype, op))
        meta = {
            "format": "vlm-merge chat vector",
            "formula": "vlm_llm - en_base",
            "sources": {"vlm": str(vlm_reader.path), "en_base": str(en_reader.path)},
            "vlm_layout": vlm_anat.layout.name,
            "key_map": alignment.pairs,
            "dtype": str(out_dtype).removeprefix("torch."),
            "en_vocab": dict(en_tok.get_vocab()) if en_tok is not None else None,
            "en_vocab_size": len(en_tok) if en_tok is not None else None,
            "en_pad_token": getattr(en_tok, "pad_token", None) if en_tok is not None else None,
            "vlm_merge_version": vlm_merge.__version__,
        }
        plan = MergePlan(tensors, {VLM: vlm_reader, EN_BASE: en_reader}, vocab, {METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
        check_output(out_file, [p for r in (vlm_reader, en_reader) for p in r.inputs])
        with scratch_dir(out_file) as tmp:
            execute(plan, tmp, max_shard_bytes=1 << 62, progress=progress)
            os.replace(tmp / "model.safetensors", out_file)
        return out_file
    finally:
        vlm_reader.close()
        en_reader.close()


def _delta_tensor(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return difference(t[VLM], t[EN_BASE])


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


def _apply_tensor(t: Mapping[str, torch.Tensor], w: float) -> torch.Tensor:
    return add_task_vectors(t[TARGET], [t[DELTA]], [w])


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
    sources = open_sources(vlm_path, {TARGET: ja_base}, vision_tower=vision_tower, cache_dir=cache_dir)
    try:
        delta_anat = inspect_llm(d.reader, "the chat vector")
        sources.models[DELTA] = Source(DELTA, d.reader, delta_anat, vocab_side=d.vocab_side)
        sources.alignments[DELTA] = align(sources.vlm.anatomy, delta_anat)
        num_layers = sources.vlm.anatomy.num_layers
        scales.check_layers(num_layers)
        setting = scales.weight_setting()

        def rule(canon: str):
            w = resolve_setting(setting, canon, layer_index(canon), num_layers)
            return partial(_apply_tensor, w=float(w))

        bp = plan_backbone(sources, rule, [TARGET, DELTA], _dtype(dtype), vector_roles=(DELTA,), text_config_from=text_config_from)
        names = {"chat_vector": str(d.path), **{f"delta {k}": v for k, v in d.metadata["sources"].items()}, "ja_base": str(sources.target.reader.path), "vlm (vision side)": str(sources.vlm.reader.path)}
        recipe = {"method": "chat_vector (saved delta)", "formula": "ja_base + weight * delta", "weight": setting}
        details = [f"delta stored as {d.metadata.get('dtype')}", "vocabulary: " + (bp.vocab.summary() if bp.vocab else "unchanged"),
                   *bp.card_details()]
        card = model_card("Japanese VLM by Chat Vector", "chat_vector", recipe, names, details)
        return write_backbone(bp, out, force=force, max_shard_bytes=max_shard_bytes, card=card, progress=progress)
    finally:
        sources.close()
        if not isinstance(delta, ChatVectorDelta):
            d.close()
