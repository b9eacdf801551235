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
from collections.abc import Callable, Mapping
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
from vlm_merge.checkpoint import DEFAULT_MAX_SHARD_BYTES, AtomicDir, CheckpointReader, resolve_model_dir
from vlm_merge.engine import Copy, Merge, MergePlan, OutputTensor, TensorFn, execute
from vlm_merge.errors import VlmMergeError
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
    vlm: Source
    target: Source
    others: dict[str, Source]
    alignments: dict[str, Alignment]  # role -> alignment of that LLM with the VLM
    clip: CheckpointReader | None = None  # separate vision tower (original LLaVA-1.5)
    cache_dir: str | Path | None = None

    @property
    def readers(self) -> dict[str, CheckpointReader]:
        out = {VLM: self.vlm.reader, TARGET: self.target.reader}
        out.update({r: s.reader for r, s in self.others.items()})
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


def open_sources(
    vlm: str | Path,
    target: str | Path,
    others: Mapping[str, str | Path] | None = None,
    *,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Sources:
    """Open and align the checkpoints of a backbone merge (no tensor data is read)."""
    others = dict(others or {})
    base_for_generic = CheckpointReader(target, cache_dir)
    vlm_reader = CheckpointReader(vlm, cache_dir)
    vlm_anat = inspect_vlm(vlm_reader, base=base_for_generic)
    target_src = Source(TARGET, base_for_generic, inspect_llm(base_for_generic, "the target (Japanese base)"))
    other_srcs = {}
    for role, path in others.items():
        reader = CheckpointReader(path, cache_dir)
        other_srcs[role] = Source(role, reader, inspect_llm(reader, role))
    alignments = {TARGET: align(vlm_anat, target_src.anatomy)}
    for role, src in other_srcs.items():
        alignments[role] = align(vlm_anat, src.anatomy)
    vlm_src = Source(VLM, vlm_reader, vlm_anat)
    for src in (vlm_src, target_src, *other_srcs.values()):
        src.tokenizer = load_tokenizer(src.reader.path, trust_remote_code)
    clip = _resolve_vision_tower(vlm_anat, vision_tower, cache_dir)
    return Sources(vlm_src, target_src, other_srcs, alignments, clip, cache_dir)


def _image_token_id(config: dict) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def plan_vocabulary(sources: Sources, delta_roles: list[str]) -> VocabPlan | None:
    """Row alignment of embeddings / lm_head between the target and the roles that enter task vectors."""
    if not sources.alignments[TARGET].vocab_keys:
        return None
    by_role = {VLM: sources.vlm, **sources.others}
    vlm_side = sources.vlm.vocab
    return plan_vocab(
        target=sources.target.vocab,
        vlm=vlm_side,
        image_token_id=_image_token_id(sources.vlm.anatomy.config),
        delta_roles={r: by_role[r].vocab for r in delta_roles},
        multiple=pad_multiple(vlm_side.rows, vlm_side.size if vlm_side.size is not None else vlm_side.rows),
    )


def _keep_target(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return t[TARGET]


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
) -> BackbonePlan:
    """The output tensors of a backbone merge: vision parts copied, language model merged by `rule`.

    `roles` are the sources every merge function reads (always including the target); all of them
    except the target enter task vectors, so their vocabulary rows are aligned to the output's.
    `vector_roles` are sources that hold task vectors themselves (a saved Chat Vector).
    """
    vlm = sources.vlm.anatomy
    original = vlm.layout.name == "llava-original"
    vocab = plan_vocabulary(sources, [r for r in roles if r != TARGET])
    target_keys = sources.target.anatomy.lm_keys
    canon_of = {v: c for c, v in vlm.lm_keys.items()}
    by_role = {VLM: sources.vlm, **sources.others, TARGET: sources.target}
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
    for key in sources.vlm.reader.keys():
        info = vlm.infos[key]
        if convert.DROP_KEYS.search(key):
            continue
        canon = canon_of.get(key)
        if canon is None:  # vision tower, projector, image_newline, …
            tensors.append(OutputTensor(out_key(key), info.shape, info.dtype, Copy(VLM, key)))
            counts["copied"] += 1
            continue
        if canon not in sources.alignments[TARGET].pairs:
            continue
        inputs = {r: by_role[r].anatomy.lm_keys[canon] for r in roles}
        fn = rule(canon)
        out_dtype = dtype or info.dtype
        is_vocab = vocab is not None and canon in sources.alignments[TARGET].vocab_keys
        shape = (vocab.out_rows, info.shape[1]) if is_vocab and vocab is not None else info.shape
        target_info = sources.target.anatomy.infos[target_keys[canon]]
        if fn is None:
            counts["kept"] += 1
            if not is_vocab or (vocab is not None and vocab.is_identity):
                if target_info.dtype == out_dtype:
                    tensors.append(OutputTensor(out_key(key), shape, out_dtype, Copy(TARGET, target_keys[canon])))
                else:
                    tensors.append(OutputTensor(out_key(key), shape, out_dtype, Merge({TARGET: target_keys[canon]}, _keep_target)))
                continue
            inputs = {TARGET: target_keys[canon]}
            fn = _keep_target
        else:
            counts["merged"] += 1
        op = Merge(inputs, fn, vocab=is_vocab, target_role=TARGET, vlm_rows_role=VLM, vlm_rows_key=key, vector_roles=vector_roles)
        tensors.append(OutputTensor(out_key(key), shape, out_dtype, op))
    plan = MergePlan(tensors, sources.readers, vocab)
    config = output_config(sources, vocab, dtype)
    return BackbonePlan(plan, sources, config, vocab, "llava-hf" if original else vlm.layout.name, counts)


def _text_config(sources: Sources, vocab: VocabPlan | None) -> dict:
    vlm = sources.vlm.anatomy
    base = convert.text_config_of_original(vlm.config) if vlm.layout.name == "llava-original" else dict(vlm.text_config)
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
    """config.json of the merged VLM: the VLM's multimodal settings with the target's language model."""
    vlm = sources.vlm.anatomy
    text = _text_config(sources, vocab)
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


def write_model_files(bp: BackbonePlan, tmp: Path) -> None:
    """config.json, generation_config.json, tokenizer (+ image/pad tokens), processor, chat template."""
    sources, vocab = bp.sources, bp.vocab
    vlm_dir, target_dir = sources.vlm.reader.path, sources.target.reader.path
    (tmp / "config.json").write_text(json.dumps(bp.config, indent=2, ensure_ascii=False) + "\n")
    tok = sources.target.tokenizer
    chat_template = None
    if tok is not None:
        tok = copy.deepcopy(tok)
        if vocab is not None and vocab.tokens_added_to_tokenizer:
            from tokenizers import AddedToken as HFAddedToken

            tok.add_tokens([HFAddedToken(t, special=True, normalized=False) for t in vocab.tokens_added_to_tokenizer], special_tokens=True)
        if vocab is not None and vocab.pad_token and getattr(tok, "pad_token", None) is None:
            tok.pad_token = vocab.pad_token
        vlm_tok = sources.vlm.tokenizer
        chat_template = getattr(vlm_tok, "chat_template", None) if vlm_tok is not None else None
        tok.chat_template = chat_template
        tok.save_pretrained(str(tmp))
    if bp.output_layout == "llava-hf" and sources.vlm.anatomy.layout.name == "llava-original":
        files = convert.processor_files_from_original(sources.vlm.anatomy.config, bp.config["vision_config"], sources.clip.path if sources.clip else None)
        for name, text in files.items():
            (tmp / name).write_text(text)
    elif tok is not None and not _rebuild_processor(vlm_dir, tok, tmp):
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (vlm_dir / name).exists():
                (tmp / name).write_bytes((vlm_dir / name).read_bytes())
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
) -> Path:
    """Run the merge and write the complete VLM at `out` atomically."""
    atomic = AtomicDir(out, force)
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
