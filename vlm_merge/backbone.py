"""Merging a VLM's language backbone: sources, the output plan, and writing the complete VLM.

`open_sources` reads the VLM, the target LLM (the model the output starts from, e.g. the Japanese
base) and any other LLMs (e.g. the English base the task vectors are taken against), names their
parts and aligns every language-model tensor. `plan_backbone` turns a per-tensor rule (canonical
key -> a merge function over roles, or None to keep the target's tensor) into a `MergePlan` in which
the vision tower, projector and other VLM-only tensors are byte copies. `write_backbone` runs the
engine into a temporary directory, adds config, tokenizer, processor and model card, and renames
the directory into place.

Output layout: a VLM in a transformers layout keeps its own key names; an original-LLaVA VLM is
written in the llava-hf layout (see `vlm_merge.convert`) so transformers' classes load it.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_merge import convert
from vlm_merge.anatomy import (
    LANGUAGE,
    OTHER,
    PROJECTOR,
    VISION,
    Alignment,
    Anatomy,
    align,
    inspect_llm,
    inspect_vlm,
    lm_role,
)
from vlm_merge.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, resolve_model_dir
from vlm_merge.engine import Copy, Merge, MergePlan, OutputTensor, TensorFn, execute
from vlm_merge.errors import VlmMergeError
from vlm_merge.outputs import AtomicDir
from vlm_merge.vocab import VocabPlan, VocabSide, load_tokenizer, pad_multiple, plan_vocab

log = logging.getLogger(__name__)

VLM, TARGET, CLIP = "vlm", "target", "clip"
TensorRule = Callable[[str], TensorFn | None]
_CONFIG_DROP = ("architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype")


@dataclass
class Source:
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
    srcs = {role: Source(role, r, inspect_llm(r, role)) for role, r in readers.items()}
    vlm_src = None
    clip = None
    if vlm is not None:
        vlm_reader = CheckpointReader(vlm, cache_dir)
        vlm_src = Source(VLM, vlm_reader, inspect_vlm(vlm_reader, base=readers[target_role]))
        check_vlm_config(vlm_src.anatomy)
        clip = _resolve_vision_tower(vlm_src.anatomy, vision_tower, cache_dir)
    reference = vlm_src.anatomy if vlm_src is not None else srcs[target_role].anatomy
    alignments = {role: align(reference, src.anatomy) for role, src in srcs.items()}
    for src in (*([vlm_src] if vlm_src else []), *srcs.values()):
        src.tokenizer = load_tokenizer(src.reader.path, trust_remote_code)
    return Sources(vlm_src, srcs, target_role, alignments, clip, cache_dir)


def _image_token_id(config: dict) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def plan_vocabulary(sources: Sources, delta_roles: list[str]) -> VocabPlan | None:
    """Row alignment of embeddings / lm_head between the target and the roles that enter task vectors.

    With a VLM the output also gets its image token (and a pad token) when the target lacks them.
    """
    if not sources.alignments[sources.target_role].vocab_keys:
        return None
    vlm_side = sources.vlm.vocab if sources.vlm is not None else None
    return plan_vocab(
        target=sources.target.vocab,
        vlm=vlm_side,
        image_token_id=_image_token_id(sources.vlm.anatomy.config) if sources.vlm is not None else None,
        delta_roles={r: sources.source(r).vocab for r in delta_roles},
        multiple=pad_multiple(vlm_side.rows, vlm_side.size if vlm_side.size is not None else vlm_side.rows) if vlm_side else 1,
    )


def _keep(role: str) -> TensorFn:
    def keep(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return t[role]

    return keep


@dataclass
class BackbonePlan:
    plan: MergePlan
    sources: Sources
    config: dict
    vocab: VocabPlan | None
    output_layout: str
    summary: dict[str, int] = field(default_factory=dict)  # tensors merged / kept / copied


def plan_backbone(
    sources: Sources,
    rule: TensorRule,
    roles: list[str],
    dtype: torch.dtype | None = None,
    vector_roles: tuple[str, ...] = (),
    elementwise: bool = True,
) -> BackbonePlan:
    """The output tensors of a backbone merge: vision parts copied, language model merged by `rule`.

    `roles` are the sources every merge function reads (always including the target); all of them
    except the target enter task vectors, so their vocabulary rows are aligned to the output's.
    `vector_roles` are sources that hold task vectors themselves (a saved Chat Vector).
    `elementwise` says whether the rule's functions may be evaluated slice by slice.
    """
    ref = sources.reference
    original = ref.anatomy.layout.name == "llava-original"
    target_role = sources.target_role
    vocab = plan_vocabulary(sources, [r for r in roles if r != target_role])
    target_keys = sources.target.anatomy.lm_keys
    canon_of = {v: c for c, v in ref.anatomy.lm_keys.items()}
    pairs = sources.alignments[target_role]
    tensors: list[OutputTensor] = []
    counts = {"merged": 0, "kept": 0, "copied": 0}

    def out_key(key: str) -> str:
        if not original:
            return key
        new = convert.rename(key, convert.ORIGINAL_TO_HF)
        assert new is not None, key
        return new

    if sources.clip is not None:
        for key in sources.clip.keys():
            new = convert.rename(key, convert.CLIP_TO_HF)
            if new is not None:
                info = sources.clip.info(key)
                tensors.append(OutputTensor(new, info.shape, info.dtype, Copy(CLIP, key)))
                counts["copied"] += 1
    for key in ref.reader.keys():
        info = ref.anatomy.infos[key]
        if convert.DROP_KEYS.search(key):
            continue
        canon = canon_of.get(key)
        if canon is None:  # vision tower, projector, image_newline, …
            tensors.append(OutputTensor(out_key(key), info.shape, info.dtype, Copy(ref.role, key)))
            counts["copied"] += 1
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
        op = Merge(inputs, fn, elementwise=elementwise, vocab=is_vocab, target_role=target_role,
                   vlm_rows_role=vlm_rows[0], vlm_rows_key=vlm_rows[1], vector_roles=vector_roles)
        tensors.append(OutputTensor(out_key(key), shape, out_dtype, op, canon))
    plan = MergePlan(tensors, sources.readers, vocab)
    config = output_config(sources, vocab, dtype)
    layout = "llava-hf" if original else ref.anatomy.layout.name
    return BackbonePlan(plan, sources, config, vocab, layout, counts)


def _text_config(sources: Sources, vocab: VocabPlan | None) -> dict:
    ref = sources.reference.anatomy
    base = convert.text_config_of_original(ref.config) if ref.layout.name == "llava-original" else dict(ref.text_config)
    target = {k: v for k, v in sources.target.anatomy.config.items() if k not in _CONFIG_DROP}
    text = {**base, **target}
    if vocab is not None:
        text["vocab_size"] = vocab.out_rows
        if vocab.pad_token_id is not None:
            text["pad_token_id"] = vocab.pad_token_id
    return text


def _clip_vision_config(sources: Sources) -> dict:
    if sources.clip is not None:
        return convert.vision_config_of_clip(sources.clip.config())
    try:
        clip_dir = resolve_model_dir(convert.vision_tower_name(sources.vlm.anatomy.config), sources.cache_dir)
        return convert.vision_config_of_clip(json.loads((clip_dir / "config.json").read_text()))
    except (VlmMergeError, OSError, json.JSONDecodeError):
        pass
    # Infer from the embedded tower's shapes (head size 64, as every CLIP ViT in use).
    infos = sources.vlm.anatomy.infos
    pre = "model.vision_tower.vision_tower.vision_model."
    patch = infos[pre + "embeddings.patch_embedding.weight"].shape
    positions = infos[pre + "embeddings.position_embedding.weight"].shape[0]
    layers = {k.split(".")[6] for k in infos if k.startswith(pre + "encoder.layers.")}
    hidden = patch[0]
    log.warning("vision tower config not found; inferring it from tensor shapes (head size 64)")
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": infos[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),
        "patch_size": patch[2],
        "image_size": int(round((positions - 1) ** 0.5)) * patch[2],
        "hidden_act": "quick_gelu",
    }


def output_config(sources: Sources, vocab: VocabPlan | None, dtype: torch.dtype | None) -> dict:
    """config.json of the output: the VLM's multimodal settings (if any) with the target's language model."""
    text = _text_config(sources, vocab)
    if sources.vlm is None:
        config = {**copy.deepcopy(sources.target.anatomy.config), **text}
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
            config.pop("torch_dtype", None)
        return config
    vlm = sources.vlm.anatomy
    if vlm.layout.name == "llava-original":
        config = convert.hf_config_from_original(vlm.config, _clip_vision_config(sources), text)
    else:
        config = copy.deepcopy(vlm.config)
        key = vlm.layout.text_config_key
        if key and isinstance(config.get(key), dict):
            config[key] = {**config[key], **text}
        else:
            config.update(text)
    if vocab is not None and vocab.image_token_id is not None:
        key = "image_token_id" if "image_token_id" in config and "image_token_index" not in config else "image_token_index"
        config[key] = vocab.image_token_id
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return config


def _rebuild_processor(vlm_dir: Path, tokenizer, out_dir: Path) -> bool:
    """Save the VLM's processor with the new tokenizer; False when the VLM ships no processor."""
    if not (vlm_dir / "preprocessor_config.json").exists():
        return False
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(str(vlm_dir))
    except (OSError, ValueError, TypeError) as e:
        log.warning("could not load the VLM's processor (%s); copying its files instead", e)
        return False
    if not hasattr(proc, "image_processor"):
        return False
    params = inspect.signature(type(proc).__init__).parameters
    kwargs = {p: getattr(proc, p) for p in params if p not in ("self", "tokenizer", "kwargs", "args") and hasattr(proc, p)}
    kwargs["tokenizer"] = tokenizer
    type(proc)(**kwargs).save_pretrained(str(out_dir))
    return True


def _write_processor(bp: BackbonePlan, tokenizer, tmp: Path) -> None:
    """The VLM's processor with the output's tokenizer (converted for original LLaVA)."""
    vlm = bp.sources.vlm
    assert vlm is not None
    if vlm.anatomy.layout.name == "llava-original":
        clip_dir = bp.sources.clip.path if bp.sources.clip else None
        for name, text in convert.processor_files_from_original(vlm.anatomy.config, bp.config["vision_config"], clip_dir).items():
            (tmp / name).write_text(text)
    elif tokenizer is not None and not _rebuild_processor(vlm.reader.path, tokenizer, tmp):
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (vlm.reader.path / name).exists():
                (tmp / name).write_bytes((vlm.reader.path / name).read_bytes())


def write_model_files(bp: BackbonePlan, tmp: Path) -> None:
    """config.json, generation_config.json, tokenizer (+ image/pad tokens), processor, chat template."""
    sources, vocab = bp.sources, bp.vocab
    target_dir = sources.target.reader.path
    (tmp / "config.json").write_text(json.dumps(bp.config, indent=2, ensure_ascii=False) + "\n")
    tok = sources.target.tokenizer
    if tok is not None:
        tok = copy.deepcopy(tok)
        if vocab is not None and vocab.tokens_added_to_tokenizer:
            from tokenizers import AddedToken as HFAddedToken

            tok.add_tokens([HFAddedToken(t, special=True, normalized=False) for t in vocab.tokens_added_to_tokenizer], special_tokens=True)
        if vocab is not None and vocab.pad_token and getattr(tok, "pad_token", None) is None:
            tok.pad_token = vocab.pad_token
        if sources.vlm is not None:  # the VLM's conversation format is the one its vision skills know
            vlm_tok = sources.vlm.tokenizer
            tok.chat_template = getattr(vlm_tok, "chat_template", None) if vlm_tok is not None else None
        tok.save_pretrained(str(tmp))
    if sources.vlm is not None:
        _write_processor(bp, tok, tmp)
    gen_src = target_dir / "generation_config.json"
    gen = json.loads(gen_src.read_text()) if gen_src.exists() else {}
    gen.pop("transformers_version", None)
    if vocab is not None and vocab.pad_token_id is not None:
        gen["pad_token_id"] = vocab.pad_token_id
    if gen:
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


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
        "parts": {p: {"tensors": len(a.parts[p]), "params": a.part_params(p), "dtypes": a.dtypes(p)} for p in (VISION, PROJECTOR, LANGUAGE, OTHER) if a.parts[p]},
        "lm_roles": sorted({lm_role(c) for c in a.lm_keys}),
    }
