"""Merging a VLM's language backbone: sources, the output plan, and writing the complete VLM.

`open_sources` reads the VLM, the target LLM (the model the output starts from, e.g. the Japanese
base) and any other LLMs (e.g. the English base the task vectors are taken against), names their
parts and aligns every language-model tensor. `plan_backbone` turns a per-tensor rule (canonical
key -> a merge function over roles, or None to keep the target's tensor) into a `MergePlan` in which
the vision tower, projector and other VLM-only tensors are byte copies unless a module rule merges them
(two VLMs of one family merged whole). A VLM may stand among the LLM sources: its language model joins the
merge; without a `vlm`, a VLM target is the VLM too. `write_backbone` runs the
engine into a temporary directory, adds config, tokenizer, processor and model card, and renames
the directory into place.

Output layout: a VLM in a transformers layout keeps its own key names; an original-LLaVA VLM is
written in the llava-hf layout (see `vlm_merge.io.convert`) so transformers' classes load it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_merge.io import convert
from vlm_merge.architecture.layouts import layout_named, to_hf
from vlm_merge.architecture.anatomy import (
    BUFFERS,
    LANGUAGE,
    OTHER,
    PROJECTOR,
    VISION,
    Alignment,
    Anatomy,
    align,
    inspect_checkpoint,
    inspect_llm,
    is_buffer,
    inspect_vlm,
    lm_role,
)
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, resolve_model_dir
from vlm_merge.engine.model_files import (
    CLIP,
    TARGET,
    TEXT_CONFIG_FROM,
    VLM,
    config_conflicts,
    output_config,
    text_configs,
    write_model_files,
)
from vlm_merge.engine.streaming import Copy, Merge, MergePlan, OutputTensor, TensorFn, execute
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.outputs import AtomicDir
from vlm_merge.architecture.vocab import ZERO, TokenSource, VocabPlan, VocabSide, load_tokenizer, pad_multiple, plan_vocab

log = logging.getLogger(__name__)

TensorRule = Callable[[str], TensorFn | None]
# reference VLM key of a vision-side tensor -> (role -> that role's key, merge function, elementwise), or None: copied
ModuleRule = Callable[[str], tuple[dict[str, str], TensorFn, bool] | None]


@dataclass
class Source:
    """One opened checkpoint of a merge under its role: reader, anatomy and tokenizer (or known vocabulary)."""

    role: str
    reader: CheckpointReader
    anatomy: Anatomy
    tokenizer: object | None = None
    vocab_side: VocabSide | None = None  # set when the vocabulary is known without a tokenizer object

    @property
    def vocab(self) -> VocabSide:
        if self.vocab_side is not None:
            return self.vocab_side
        return VocabSide.of(self.anatomy.vocab_rows or 0, self.tokenizer)


@dataclass
class Sources:
    """The checkpoints of one merge: an optional VLM and named LLM sources (roles).

    `target_role` names the source whose vocabulary, tokenizer and text config the output takes
    (and whose tensors a skipped tensor keeps). Without a VLM the output is a plain LLM laid out
    like the target.
    """

    vlm: Source | None
    models: dict[str, Source]
    target_role: str
    alignments: dict[str, Alignment]  # role -> alignment with the reference (the VLM, else the target)
    clip: CheckpointReader | None = None  # separate vision tower (original LLaVA-1.5)
    cache_dir: str | Path | None = None

    @property
    def target(self) -> Source:
        return self.models[self.target_role]

    @property
    def reference(self) -> Source:
        """The model whose key layout the output follows."""
        return self.vlm if self.vlm is not None else self.target

    def source(self, role: str) -> Source:
        if role == VLM and self.vlm is not None:
            return self.vlm
        return self.models[role]

    @property
    def readers(self) -> dict[str, CheckpointReader]:
        out = {r: s.reader for r, s in self.models.items()}
        if self.vlm is not None:
            out[VLM] = self.vlm.reader
        if self.clip is not None:
            out[CLIP] = self.clip
        return out

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _resolve_vision_tower(vlm: Anatomy, vision_tower: str | Path | None, cache_dir: str | Path | None) -> CheckpointReader | None:
    if vlm.layout.name != "llava-original" or vlm.parts[VISION]:
        return None
    name = str(vision_tower) if vision_tower else convert.vision_tower_name(vlm.config)
    try:
        return CheckpointReader(name, cache_dir=cache_dir)
    except VlmMergeError as e:
        raise VlmMergeError(
            f"{vlm.path}: has no vision tower weights and its vision tower {name!r} could not be read ({e}); "
            "pass --vision-tower PATH to its CLIP checkpoint"
        ) from None


def vision_tower_status(vlm: Anatomy, vision_tower: str | Path | None, cache_dir: str | Path | None) -> dict | None:
    """Where the vision tower of an original LLaVA that does not embed one would come from (None otherwise):
    {"needs": mm_vision_tower, "given": --vision-tower, "found": its local directory or None, "line": a sentence}."""
    if vlm.layout.name != "llava-original" or vlm.parts[VISION]:
        return None
    needs = vlm.config.get("mm_vision_tower") or vlm.config.get("vision_tower")
    name = str(vision_tower) if vision_tower else str(needs) if needs else None
    found = None
    if name is not None:
        try:
            found = resolve_model_dir(name, cache_dir)
        except VlmMergeError:
            found = None
    where = "--vision-tower" if vision_tower else "the Hugging Face cache"
    if needs is None and vision_tower is None:
        line = "vision tower: not in the checkpoint and the config names none (mm_vision_tower); pass --vision-tower PATH"
    elif found is not None:
        line = f"vision tower: not in the checkpoint; the config names mm_vision_tower {needs!r}, found via {where} at {found}"
    else:
        line = (f"vision tower: not in the checkpoint; the config names mm_vision_tower {needs!r}, NOT found via {where}; "
                "download it or pass --vision-tower PATH to its CLIP checkpoint")
    return {"needs": needs, "given": str(vision_tower) if vision_tower else None,
            "found": str(found) if found is not None else None, "line": line}


def check_vlm_config(vlm: Anatomy) -> None:
    """The VLM's config.json must name a `model_type` transformers knows, since the output keeps that
    config (an original-LLaVA config is converted to llava-hf's instead); checked before merging."""
    if vlm.layout.name == "llava-original":
        return
    from transformers import CONFIG_MAPPING

    model_type = vlm.config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        what = "has no 'model_type'" if model_type is None else f"has model_type {model_type!r}, which transformers does not know"
        raise VlmMergeError(
            f"{vlm.path / 'config.json'}: {what}, so transformers could not load the merged model; set it "
            "(e.g. 'llava', 'llava_next') or re-download the model"
        )


def open_sources(
    vlm: str | Path | None,
    models: Mapping[str, str | Path],
    target_role: str = TARGET,
    *,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Sources:
    """Open and align the checkpoints of a merge (no tensor data is read).

    `models` maps role names to LLM checkpoints; `target_role` must be one of them. Every LLM is
    aligned with the VLM's language model (or, without a VLM, with the target).
    """
    if target_role not in models:
        raise ValueError(f"target role {target_role!r} is not among the models {sorted(models)}")
    readers = {role: CheckpointReader(path, cache_dir) for role, path in models.items()}
    found = {role: inspect_checkpoint(r) for role, r in readers.items()}
    llm = next((readers[role] for role, a in found.items() if a.layout.name == "llm"), None)
    srcs = {role: Source(role, r, _source_anatomy(found[role], r, role, llm)) for role, r in readers.items()}
    vlm_src = None
    clip = None
    if vlm is not None:
        vlm_reader = CheckpointReader(vlm, cache_dir)
        vlm_src = Source(VLM, vlm_reader, inspect_vlm(vlm_reader, base=readers[target_role]))
    elif srcs[target_role].anatomy.is_vlm:  # VLMs merged whole: the target is the VLM too
        vlm_src = Source(VLM, CheckpointReader(readers[target_role].path, cache_dir), srcs[target_role].anatomy)
    if vlm_src is not None:
        check_vlm_config(vlm_src.anatomy)
        clip = _resolve_vision_tower(vlm_src.anatomy, vision_tower, cache_dir)
    reference = vlm_src.anatomy if vlm_src is not None else srcs[target_role].anatomy
    alignments = {role: align(reference, src.anatomy) for role, src in srcs.items()}
    for src in (*([vlm_src] if vlm_src else []), *srcs.values()):
        src.tokenizer = load_tokenizer(src.reader.path, trust_remote_code)
    return Sources(vlm_src, srcs, target_role, alignments, clip, cache_dir)


def _source_anatomy(anatomy: Anatomy, reader: CheckpointReader, role: str, llm: CheckpointReader | None) -> Anatomy:
    """Anatomy of an LLM source, or of a VLM standing among them (its language model joins the merge; one of
    unknown layout is found by `llm`'s keys, the generic fallback)."""
    if anatomy.layout.name == "unknown" and llm is not None:
        anatomy = inspect_vlm(reader, base=llm)
    return anatomy if anatomy.is_vlm and anatomy.lm_keys else inspect_llm(reader, role)


def _image_token_id(config: dict) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def plan_vocabulary(
    sources: Sources, delta_roles: list[str], union: bool = False, pad_to_multiple_of: int | None = None,
    token_sources: dict[str, TokenSource] | None = None,
) -> VocabPlan | None:
    """Row alignment of embeddings / lm_head between the target and the roles that enter task vectors.

    With a VLM the output also gets its image token (and a pad token) when the target lacks them; with
    `union` the language models' tokens the target lacks (tokenizer_source: union). `pad_to_multiple_of`
    overrides the VLM's row multiple; `token_sources` are the recipe's rows of given tokens.
    """
    if not sources.alignments[sources.target_role].vocab_keys:
        return None
    vlm_side = sources.vlm.vocab if sources.vlm is not None else None
    multiple = pad_multiple(vlm_side.rows, vlm_side.size if vlm_side.size is not None else vlm_side.rows) if vlm_side else 1
    return plan_vocab(
        target=sources.target.vocab,
        vlm=vlm_side,
        image_token_id=_image_token_id(sources.vlm.anatomy.config) if sources.vlm is not None else None,
        delta_roles={r: sources.source(r).vocab for r in delta_roles},
        multiple=pad_to_multiple_of or multiple,
        union={r: sources.source(r).vocab for r in delta_roles if r != VLM} if union else None,  # image / pad: as always
        token_sources=token_sources,
    )


def _keep(role: str) -> TensorFn:
    def keep(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return t[role]

    return keep


@dataclass
class BackbonePlan:
    """A planned backbone merge: the engine's tensor plan, its sources, the output config and vocabulary."""

    plan: MergePlan
    sources: Sources
    config: dict
    vocab: VocabPlan | None
    output_layout: str
    summary: dict[str, int] = field(default_factory=dict)  # tensors merged / kept / copied
    text_config_from: str = VLM  # whose function-changing text config fields the output has
    notes: list[str] = field(default_factory=list)  # the sources' text config disagreements
    chat_template: str | None = None  # the recipe's chat template (None: the VLM's, or the target tokenizer's)

    def card_details(self) -> list[str]:
        """Model-card lines on the output's text config: where it comes from and what the sources disagreed on."""
        who = "the VLM's" if self.text_config_from == VLM else "the target's"
        lines = [f"text config: RoPE, sliding window, norm eps, context length, tying and activation are {who} "
                 f"(text_config_from: {self.text_config_from})"]
        return lines + self.notes


def plan_backbone(
    sources: Sources,
    rule: TensorRule,
    roles: list[str],
    dtype: torch.dtype | None = None,
    vector_roles: tuple[str, ...] = (),
    elementwise: bool = True,
    text_config_from: str = VLM,
    union: bool = False,
    pad_to_multiple_of: int | None = None,
    token_sources: dict[str, TokenSource] | None = None,
    module_rule: ModuleRule | None = None,
) -> BackbonePlan:
    """The output tensors of a backbone merge: vision parts copied (or merged by `module_rule`), language
    model merged by `rule`.

    `roles` are the sources every merge function reads (always including the target); all of them
    except the target enter task vectors, so their vocabulary rows are aligned to the output's.
    `vector_roles` are sources that hold task vectors themselves (a saved Chat Vector).
    `elementwise` says whether the rule's functions may be evaluated slice by slice. `text_config_from`
    ("vlm" or "target") names the source of the output's function-changing text config fields
    (`FUNCTION_FIELDS`); sources that disagree on one are logged as warnings and kept in `notes`.
    `union`, `pad_to_multiple_of` and `token_sources`: the output vocabulary (`plan_vocabulary`).
    """
    if text_config_from not in TEXT_CONFIG_FROM:
        raise VlmMergeError(f"text_config_from {text_config_from!r}: choose {' or '.join(TEXT_CONFIG_FROM)}")
    from_role = text_config_from if sources.vlm is not None else TARGET
    notes = config_conflicts(text_configs(sources), "the VLM" if from_role == VLM else "the target")
    for line in notes:
        log.warning("%s", line)
    ref = sources.reference
    original = ref.anatomy.layout.name == "llava-original"
    target_role = sources.target_role
    vocab = plan_vocabulary(sources, [r for r in roles if r != target_role], union, pad_to_multiple_of, token_sources)
    target_keys = sources.target.anatomy.lm_keys
    canon_of = {v: c for c, v in ref.anatomy.lm_keys.items()}
    pairs = sources.alignments[target_role]
    tensors: list[OutputTensor] = []
    counts = {"merged": 0, "kept": 0, "copied": 0, "modules": 0}

    def out_key(key: str) -> str:
        if not original:
            return key
        new = to_hf(key, ref.anatomy.layout)
        assert new is not None, key
        return new

    if sources.clip is not None:
        # LLaVA runs its separate CLIP tower in the model's dtype and llava-hf's conversions store it so: the
        # tower takes the projector's dtype (one dtype throughout; transformers 4.x half-casts mixed checkpoints).
        tower_dtype = next((ref.anatomy.infos[k].dtype for k in ref.anatomy.parts[PROJECTOR]), None)
        for key in sources.clip.keys():
            new = to_hf(key, layout_named("clip"))
            if new is not None and not is_buffer(key):
                info = sources.clip.info(key)
                out_dtype = tower_dtype if tower_dtype is not None and info.dtype.is_floating_point else info.dtype
                op = Copy(CLIP, key) if out_dtype == info.dtype else Merge({CLIP: key}, _keep(CLIP))
                tensors.append(OutputTensor(new, info.shape, out_dtype, op))
                counts["copied"] += 1
    for key in ref.reader.keys():
        info = ref.anatomy.infos[key]
        if is_buffer(key):
            continue
        canon = canon_of.get(key)
        if canon is None:  # vision tower, projector, image_newline, …
            merged = module_rule(key) if module_rule is not None else None
            if merged is None:
                tensors.append(OutputTensor(out_key(key), info.shape, info.dtype, Copy(ref.role, key)))
                counts["copied"] += 1
            else:
                inputs, fn, by_slice = merged
                tensors.append(OutputTensor(out_key(key), info.shape, info.dtype, Merge(inputs, fn, elementwise=by_slice)))
                counts["modules"] += 1
            continue
        if canon not in pairs.pairs:
            continue
        inputs = {r: sources.source(r).anatomy.lm_keys[canon] for r in roles}
        fn = rule(canon)
        out_dtype = dtype or info.dtype
        is_vocab = vocab is not None and canon in pairs.vocab_keys
        shape = (vocab.out_rows, info.shape[1]) if is_vocab and vocab is not None else sources.target.anatomy.infos[target_keys[canon]].shape
        target_info = sources.target.anatomy.infos[target_keys[canon]]
        if fn is None:
            counts["kept"] += 1
            if not is_vocab or (vocab is not None and vocab.is_identity and target_info.shape == shape):
                op = Copy(target_role, target_keys[canon]) if target_info.dtype == out_dtype else Merge({target_role: target_keys[canon]}, _keep(target_role))
                tensors.append(OutputTensor(out_key(key), shape, out_dtype, op, canon))
                continue
            inputs = {target_role: target_keys[canon]}
            fn = _keep(target_role)
        else:
            counts["merged"] += 1
        vlm_rows = (VLM, sources.vlm.anatomy.lm_keys[canon]) if sources.vlm is not None else (None, None)
        union_keys = {r: sources.source(r).anatomy.lm_keys[canon] for r in dict.fromkeys(a.role for a in vocab.added)
                      if r not in (VLM, ZERO)} if is_vocab and vocab is not None else {}
        op = Merge(inputs, fn, elementwise=elementwise, vocab=is_vocab, target_role=target_role,
                   vlm_rows_role=vlm_rows[0], vlm_rows_key=vlm_rows[1], vector_roles=vector_roles, union_keys=union_keys)
        tensors.append(OutputTensor(out_key(key), shape, out_dtype, op, canon))
    plan = MergePlan(tensors, sources.readers, vocab)
    lm_dtype = next((t.dtype for t in tensors if t.canonical is not None), dtype)
    config = output_config(sources, vocab, lm_dtype, from_role)
    layout = "llava-hf" if original else ref.anatomy.layout.name
    return BackbonePlan(plan, sources, config, vocab, layout, counts, from_role, notes)


def write_backbone(
    bp: BackbonePlan,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    card: str = "",
    extra_files: Mapping[str, str] | None = None,
    progress: bool = True,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """Run the merge and write the complete VLM at `out` atomically.

    `out` may not be, contain or lie inside any source checkpoint or any of `inputs` (e.g. the recipe file).
    """
    read = [p for r in bp.plan.sources.values() for p in r.inputs]
    atomic = AtomicDir(out, force, [*inputs, *read])
    with atomic as tmp:
        execute(bp.plan, tmp, max_shard_bytes, progress)
        write_model_files(bp, tmp)
        if card:
            (tmp / "README.md").write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return atomic.target


def describe_parts(a: Anatomy) -> dict[str, object]:
    """Machine-readable summary of an anatomy (for JSON output and model cards)."""
    return {
        "path": str(a.path),
        "layout": a.layout.name,
        "layout_description": a.layout.description,
        "architectures": a.config.get("architectures"),
        "num_layers": a.num_layers,
        "hidden_size": a.hidden_size,
        "vocab_rows": a.vocab_rows,
        "parts": {p: {"tensors": len(a.parts[p]), "params": a.part_params(p), "dtypes": a.dtypes(p)} for p in (VISION, PROJECTOR, LANGUAGE, OTHER, BUFFERS) if a.parts[p]},
        "lm_roles": sorted({lm_role(c) for c in a.lm_keys}),
    }
