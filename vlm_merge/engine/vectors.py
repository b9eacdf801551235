"""Saved task vectors: `model_llm - base` written once as one safetensors file, added to another base later.

- `extract_task_vector(model, base, file, metadata=…)`: the language model of `model` (a VLM, or an LLM) minus
  `base`, under canonical LLM keys, streamed by the engine (`streaming.execute` of a `MergePlan` of
  `methods.difference`) into a scratch directory beside `file` and moved into place. Embedding / lm_head rows
  follow the base's vocabulary, matched by token string (`architecture.vocab.match_rows`); a row whose token
  the model lacks is zero. The caller's `metadata` (the file's safetensors metadata) records what it is.
- `apply_task_vector(vector, target, out, vlm=…, weight=…)`: `target + w * vector` through the backbone
  (`backbone.plan_backbone`: rows aligned by token string, the VLM's vision side copied), w per tensor from a
  recipe parameter setting; bit-identical to merging with task arithmetic when the vector is float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vlm_merge.architecture.anatomy import align, inspect_llm, inspect_vlm, layer_index
from vlm_merge.architecture.vocab import RowMap, VocabPlan, VocabSide, load_tokenizer, match_rows
from vlm_merge.engine.backbone import TARGET, VLM, BackbonePlan, Source, open_sources, plan_backbone, write_backbone
from vlm_merge.engine.streaming import Merge, MergePlan, OutputTensor, execute
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, dtype_from_name
from vlm_merge.io.outputs import check_output, scratch_dir
from vlm_merge.methods import add_task_vectors, difference
from vlm_merge.recipe import resolve_setting

BASE, VECTOR = "base", "delta"  # roles: the base a vector is taken over, a saved vector


@dataclass(frozen=True)
class TaskVectorInfo:
    """What a task vector is being extracted from, for the caller's metadata."""

    model: Path  # the resolved checkpoint directories
    base: Path
    layout: str  # the model's key layout (a row of vlm_merge.architecture.layouts)
    key_map: dict[str, str]  # canonical LLM key -> the model's key
    dtype: torch.dtype
    base_tokenizer: object | None  # the base's tokenizer (its vocabulary is the vector's rows), if it has one


def _difference(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return difference(t[VLM], t[BASE])


def _row_plan(model_side: VocabSide, base_tok, base_rows: int, sides: tuple[str, str]) -> VocabPlan:
    """The vector's rows: the base's, each fed by the model's row of the same token string."""
    base_side = VocabSide.of(base_rows, base_tok)
    if base_side.vocab is None or model_side.vocab is None:
        if base_rows != model_side.rows:
            raise VlmMergeError(
                f"vocabulary sizes differ ({sides[0]} {model_side.rows}, {sides[1]} {base_rows}) and a tokenizer is "
                "missing; add tokenizer files so rows can be matched by token string"
            )
        lookup = {i: i for i in range(base_rows)}
    else:
        lookup = match_rows(base_side.vocab, base_rows, model_side)
    rows = sorted(lookup)
    pairs = RowMap(torch.tensor(rows, dtype=torch.long), torch.tensor([lookup[r] for r in rows], dtype=torch.long))
    return VocabPlan(out_rows=base_rows, target_rows=base_rows, pairs={VLM: pairs})


def extract_task_vector(
    model: str | Path,
    base: str | Path,
    out_file: str | Path,
    *,
    metadata: Callable[[TaskVectorInfo], dict[str, str]],
    dtype: str | torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    base_role: str = "--en-base",
    what: str = "task vector",
    sides: tuple[str, str] = ("model", "base"),
) -> Path:
    """Save `model_llm - base` (language model only) as one safetensors file at `out_file`, streaming.

    `metadata(info)` gives the file's safetensors metadata. `base_role` names the base in errors, `what` the
    file and `sides` the model and the base in the message on unmatched vocabularies.
    """
    out_file = Path(out_file).expanduser()
    check_output(out_file, [model, base])
    if out_file.exists() and not force:
        raise VlmMergeError(f"{out_file}: already exists; pass --force (force=True) to replace it")
    if out_file.is_dir():
        raise VlmMergeError(f"{out_file}: is a directory; give a file name for the {what}")
    dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    model_reader, base_reader = CheckpointReader(model, cache_dir), CheckpointReader(base, cache_dir)
    try:
        model_anat = inspect_vlm(model_reader, base=base_reader)
        base_anat = inspect_llm(base_reader, base_role)
        alignment = align(model_anat, base_anat)
        model_tok, base_tok = load_tokenizer(model_reader.path), load_tokenizer(base_reader.path)
        vocab = None
        if alignment.vocab_keys:
            model_side = VocabSide.of(model_anat.vocab_rows or 0, model_tok)
            vocab = _row_plan(model_side, base_tok, base_anat.vocab_rows or 0, sides)
        tensors = []
        for canon, model_key in alignment.pairs.items():
            info = base_anat.infos[base_anat.lm_keys[canon]]
            inputs = {VLM: model_key, BASE: base_anat.lm_keys[canon]}
            op = Merge(inputs, _difference, vocab=canon in alignment.vocab_keys, target_role=BASE)
            tensors.append(OutputTensor(canon, info.shape, dtype, op))
        info = TaskVectorInfo(model_reader.path, base_reader.path, model_anat.layout.name, alignment.pairs, dtype, base_tok)
        plan = MergePlan(tensors, {VLM: model_reader, BASE: base_reader}, vocab, metadata(info))
        check_output(out_file, [p for r in (model_reader, base_reader) for p in r.inputs])
        with scratch_dir(out_file) as tmp:
            execute(plan, tmp, max_shard_bytes=1 << 62, progress=progress)
            os.replace(tmp / "model.safetensors", out_file)
        return out_file
    finally:
        model_reader.close()
        base_reader.close()


def _add_vector(t: Mapping[str, torch.Tensor], w: float) -> torch.Tensor:
    return add_task_vectors(t[TARGET], [t[VECTOR]], [w])


def apply_task_vector(
    vector: CheckpointReader,
    vector_vocab: VocabSide,
    target: str | Path,
    out: str | Path,
    *,
    vlm: str | Path,
    weight: Callable[[int], object],
    card: Callable[[BackbonePlan], str],
    name: str = "the task vector",
    dtype: torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    text_config_from: str = VLM,
) -> Path:
    """Write `target + w * vector` as a VLM with `vlm`'s vision side at `out`; return its path.

    `vector` is a saved vector (canonical LLM keys) whose rows are `vector_vocab`; `weight(num_layers)` checks
    the language model's depth and gives w as a recipe parameter setting (resolved per tensor); `card(plan)` gives the model card. `name` names the vector in errors. The sources are closed
    afterwards, `vector` included.
    """
    sources = open_sources(vlm, {TARGET: target}, vision_tower=vision_tower, cache_dir=cache_dir)
    try:
        anatomy = inspect_llm(vector, name)
        sources.models[VECTOR] = Source(VECTOR, vector, anatomy, vocab_side=vector_vocab)
        sources.alignments[VECTOR] = align(sources.vlm.anatomy, anatomy)
        num_layers = sources.vlm.anatomy.num_layers
        setting = weight(num_layers)

        def rule(canon: str):
            w = resolve_setting(setting, canon, layer_index(canon), num_layers)
            return partial(_add_vector, w=float(w))

        bp = plan_backbone(sources, rule, [TARGET, VECTOR], dtype, vector_roles=(VECTOR,), text_config_from=text_config_from)
        return write_backbone(bp, out, force=force, max_shard_bytes=max_shard_bytes, card=card(bp), progress=progress)
    finally:
        sources.close()
