"""The files of a merged model besides its weights: config, tokenizer, processor and chat template.

`output_config` builds the output's config.json from the VLM's multimodal settings and one source's
language-model config (`text_config_from`; the fields that change the function, `FUNCTION_FIELDS`, are
compared across sources by `config_conflicts`); `processor_files` and `vlm_chat_template` carry the VLM's
processor and template (an original LLaVA gets transformers' processor files); `write_model_files` writes them
with the target's tokenizer (plus image / pad tokens) beside the weights `vlm_merge.engine.backbone` wrote.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlm_merge.architecture.anatomy import Anatomy
from vlm_merge.architecture.vocab import VocabPlan
from vlm_merge.errors import VlmMergeError
from vlm_merge.io import convert
from vlm_merge.io.checkpoint import CheckpointReader, resolve_model_dir
from vlm_merge.io.safe_load import load_json, read_text

if TYPE_CHECKING:
    from vlm_merge.engine.backbone import BackbonePlan, Source, Sources

log = logging.getLogger(__name__)

VLM, TARGET, CLIP = "vlm", "target", "clip"
_CONFIG_DROP = ("architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype")

# Language-model config fields that change the function a set of weights computes. Sources that disagree
# on one are reported (one line per field), and the output takes all of them from one source, chosen by
# `text_config_from`: "vlm" (default with a VLM: the merged model is used as that VLM, and the VLM's
# language model was tuned with them) or "target" (the model the output starts from, e.g. the Japanese base).
FUNCTION_FIELDS: tuple[str, ...] = (
    "rope_theta", "rope_scaling", "sliding_window", "use_sliding_window", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "partial_rotary_factor",
)  # fmt: skip
# The config keys that hold them as written (transformers 5 writes RoPE as `rope_parameters`).
_FUNCTION_KEYS = (*FUNCTION_FIELDS, "rope_parameters")
TEXT_CONFIG_FROM = (VLM, TARGET)
# Top-level LLaVA config fields that mirror the language model's (llava-hf's 4.x configs carry them; the output
# always writes them).
_TOP_LEVEL_MIRRORS = ("vocab_size", "pad_token_id")
# transformers' processor class of each LLaVA architecture
TRANSFORMERS_PROCESSORS = {
    "LlavaForConditionalGeneration": "LlavaProcessor",
    "LlavaNextForConditionalGeneration": "LlavaNextProcessor",
}


def _model_defaults(model_type: str) -> dict:
    """transformers' default config of a text `model_type` as a dict ({} when transformers does not know it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).to_dict()
    except (ValueError, KeyError, TypeError):
        return {}


def _rope(config: dict) -> dict:
    """RoPE settings of a config as {rope_theta, rope_scaling}, from 4.x keys or 5.x `rope_parameters`."""
    out = {}
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in params:
            out["rope_theta"] = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        out["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
        return out
    if "rope_theta" in config:
        out["rope_theta"] = config["rope_theta"]
    if "rope_scaling" in config:
        scaling = config["rope_scaling"]
        if isinstance(scaling, dict):
            scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
        out["rope_scaling"] = scaling
    return out


def function_settings(text_config: dict) -> dict[str, object]:
    """The `FUNCTION_FIELDS` a language-model config means: its own values, else transformers' defaults
    for its model_type (RoPE read from either rope_theta/rope_scaling or rope_parameters)."""

    def present(config: dict) -> dict:
        return {**{k: config[k] for k in FUNCTION_FIELDS if k in config}, **_rope(config)}

    defaults = present(_model_defaults(str(text_config.get("model_type", ""))))
    return {k: v for k, v in {**defaults, **present(text_config)}.items() if k in FUNCTION_FIELDS}


def config_conflicts(configs: Mapping[str, dict], chosen: str | None = None) -> list[str]:
    """One line per `FUNCTION_FIELDS` entry on which the language-model configs (label -> config) disagree."""
    settings = {label: function_settings(c) for label, c in configs.items()}
    lines = []
    for name in FUNCTION_FIELDS:
        values = {label: s.get(name) for label, s in settings.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            said = ", ".join(f"{v!r} in {label}" for label, v in values.items())
            lines.append(f"text config {name} differs: {said}" + (f"; the output takes {chosen}'s" if chosen else ""))
    return lines


def text_configs(sources: Sources) -> dict[str, dict]:
    """Each source's language-model config by a label naming its role and checkpoint."""
    out = {}
    if sources.vlm is not None:
        out[f"{sources.vlm.reader.path.name} (the VLM)"] = vlm_text_config(sources.vlm.anatomy)
    for role, src in sources.models.items():
        if src.vocab_side is None:  # a saved delta carries no config
            out[src.reader.path.name + (" (the target)" if role == sources.target_role else "")] = vlm_text_config(src.anatomy)
    return out


def vlm_text_config(a: Anatomy) -> dict:
    """The language-model config of a VLM (or of an LLM: its config)."""
    return convert.text_config_of_original(a.config) if a.layout.name == "llava-original" else dict(a.text_config)


def _text_config(sources: Sources, vocab: VocabPlan | None, text_config_from: str) -> dict:
    """The output's language-model config: the VLM's, the target's on top (vocabulary, special tokens,
    sizes), and every function-changing field (`FUNCTION_FIELDS`) from `text_config_from`'s config."""
    base = vlm_text_config(sources.reference.anatomy)
    target = {k: v for k, v in vlm_text_config(sources.target.anatomy).items() if k not in _CONFIG_DROP}
    chosen = base if text_config_from == VLM else target
    text = {k: v for k, v in {**base, **target}.items() if k not in _FUNCTION_KEYS and k != "_name_or_path"}
    text.update({k: chosen[k] for k in _FUNCTION_KEYS if k in chosen})
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
    except VlmMergeError:
        clip_dir = None
    if clip_dir is not None and os.path.lexists(clip_dir / "config.json"):
        return convert.vision_config_of_clip(CheckpointReader.read_config(clip_dir / "config.json"))
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


def output_config(sources: Sources, vocab: VocabPlan | None, dtype: torch.dtype | None, text_config_from: str = VLM) -> dict:
    """config.json of the output: the VLM's multimodal settings (if any) with the target's language model,
    its function-changing fields from `text_config_from`; top-level copies of text fields agree with it.
    `dtype` is the output language model's dtype."""
    text = _text_config(sources, vocab, text_config_from if sources.vlm is not None else TARGET)
    if sources.vlm is None:
        return _stamp_dtype({**copy.deepcopy(sources.target.anatomy.config), **text}, dtype)
    vlm = sources.vlm.anatomy
    if vlm.layout.name == "llava-original":
        config = convert.hf_config_from_original(vlm.config, _clip_vision_config(sources), text)
    else:
        config = {k: v for k, v in copy.deepcopy(vlm.config).items() if k != "_name_or_path"}
        key = vlm.layout.text_config_key
        if key and isinstance(config.get(key), dict):
            config[key] = text
        else:
            config.update(text)
    # written even where the VLM's config lacks them (llava-v1.6-vicuna-7b-hf, original LLaVA): transformers 4.x's
    # Llava / LlavaNext take the pad id for padding detection from the top level
    config.update({k: text[k] for k in _TOP_LEVEL_MIRRORS if k in text})
    if vocab is not None and vocab.image_token_id is not None:
        keys = [k for k in ("image_token_index", "image_token_id") if k in config] or ["image_token_index"]
        config.update(dict.fromkeys(keys, vocab.image_token_id))
    return _stamp_dtype(config, dtype)


def _stamp_dtype(config: dict, dtype: torch.dtype | None) -> dict:
    """`config` saying the language model's dtype at the top level (`torch_dtype` for 4.x, `dtype` for 5.x)
    and nowhere else (the sources' sub-config dtypes are stale)."""
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            config[sub] = {k: v for k, v in config[sub].items() if k not in ("torch_dtype", "dtype")}
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config.update(torch_dtype=name, dtype=name)
    return config


def _read_json(path: Path) -> dict:
    """A JSON object file of a source checkpoint ({} when absent), read with safe_load's checks."""
    return load_json(path, path.name) if os.path.lexists(path) else {}


def processor_files(vlm: Source, vision_config: dict, clip_dir: Path | None) -> dict[str, dict]:
    """preprocessor_config.json and processor_config.json of the output, in the layout transformers 4.x
    and 5.x both read: the image processor in its own file, processor_config.json flat (4.x passes every
    key of it to the processor's constructor, so a nested `image_processor` breaks it)."""
    if vlm.anatomy.layout.name == "llava-original":
        return convert.processor_files_from_original(vlm.anatomy.config, vision_config, clip_dir)
    pre = _read_json(vlm.reader.path / "preprocessor_config.json")
    proc = _read_json(vlm.reader.path / "processor_config.json")
    if not pre and isinstance(proc.get("image_processor"), dict):  # a VLM saved by transformers 5
        pre = {**proc["image_processor"], **({"processor_class": proc["processor_class"]} if "processor_class" in proc else {})}
    proc = {k: v for k, v in proc.items() if k not in ("image_processor", "chat_template")}
    own = TRANSFORMERS_PROCESSORS.get(vlm.anatomy.config.get("architectures", [""])[0])
    if own and not proc and pre.get("processor_class") not in TRANSFORMERS_PROCESSORS.values():
        # a processor transformers lacks (Mantis: MLlavaProcessor): transformers' own, so AutoProcessor loads it
        pre["processor_class"] = own
        proc = {
            "processor_class": own,
            "patch_size": vision_config.get("patch_size"),
            "vision_feature_select_strategy": vlm.anatomy.config.get("vision_feature_select_strategy", "default"),
            "image_token": "<image>",
            "num_additional_image_tokens": 1 if vision_config.get("model_type") == "clip_vision_model" else 0,
        }
    return {name: d for name, d in (("preprocessor_config.json", pre), ("processor_config.json", proc)) if d}


def vlm_chat_template(vlm: Source) -> str | None:
    """The VLM's conversation format (the one its vision skills know): its processor's chat template
    (chat_template.jinja / chat_template.json), else its tokenizer's; original LLaVA: llava-hf's for its family."""
    if vlm.anatomy.layout.name == "llava-original":
        return convert.CHAT_TEMPLATES[convert.text_model_type(vlm.anatomy.config)]
    jinja = vlm.reader.path / "chat_template.jinja"
    if os.path.lexists(jinja):
        return read_text(jinja, "chat template")
    legacy = _read_json(vlm.reader.path / "chat_template.json").get("chat_template")
    if isinstance(legacy, str):
        return legacy
    return getattr(vlm.tokenizer, "chat_template", None)


def output_padding_side(vlm: Source) -> str:
    """The output tokenizer's padding side: the VLM's (llava-hf ships `left`, which batched generation with
    the processor needs), never the target's; `left` when the VLM's tokenizer config says nothing and for
    original LLaVA (its `right` is for training; the output is a llava-hf model)."""
    if vlm.anatomy.layout.name == "llava-original":
        return "left"
    side = _read_json(vlm.reader.path / "tokenizer_config.json").get("padding_side")
    return side if side in ("left", "right") else "left"


def _sentencepiece_fits(model_file: Path, tok) -> bool:
    """Whether `model_file` (the target's tokenizer.model) spells the output tokenizer's vocabulary: every
    piece at its id, every other token an added token (which tokenizer_config.json lists)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError):
        return False
    vocab, n = tok.get_vocab(), sp.get_piece_size()
    added = set(tok.added_tokens_decoder)
    return all(vocab.get(sp.id_to_piece(i)) == i for i in range(n)) and all(i < n or i in added for i in vocab.values())


def _write_tokenizer(tok, target_dir: Path, tmp: Path, padding_side: str | None, chat_template: str | None) -> None:
    """The output tokenizer, saved by transformers 5 and completed for 4.x: tokenizer_config.json with its
    added tokens, padding side and chat template, special_tokens_map.json, and the target's tokenizer.model
    when it spells the same vocabulary."""
    if padding_side is not None:
        tok.padding_side = padding_side
    tok.save_pretrained(str(tmp))
    # The target's own settings (saved for 4.x: legacy, add_bos_token, …) under what transformers 5 wrote.
    target_cfg = _read_json(target_dir / "tokenizer_config.json")
    saved = _read_json(tmp / "tokenizer_config.json")
    if saved.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's generic class; 4.x knows the target's
        saved.pop("tokenizer_class")
    cfg = {k: v for k, v in {**target_cfg, **saved}.items() if k not in ("is_local", "local_files_only", "chat_template")}
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())
    }
    cfg["padding_side"] = tok.padding_side
    if chat_template:
        cfg["chat_template"] = chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special = {k: str(getattr(tok, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, k, None)}
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    spm = target_dir / "tokenizer.model"
    if spm.is_file() and _sentencepiece_fits(spm, tok):
        (tmp / "tokenizer.model").write_bytes(spm.read_bytes())


def write_model_files(bp: BackbonePlan, tmp: Path) -> None:
    """config.json, generation_config.json, tokenizer (+ image/pad tokens), processor, chat template.

    Written for transformers 4.x and 5.x alike: preprocessor_config.json beside a flat
    processor_config.json, the chat template as chat_template.jinja, chat_template.json and in
    tokenizer_config.json, special_tokens_map.json, tokenizer.model when the target's fits, and
    `transformers_version` = the version that wrote the files.
    """
    import transformers

    sources, vocab = bp.sources, bp.vocab
    target_dir = sources.target.reader.path
    config = {**bp.config, "transformers_version": transformers.__version__}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    vlm = sources.vlm
    chat_template = bp.chat_template or (vlm_chat_template(vlm) if vlm is not None else None)
    tok = sources.target.tokenizer
    if tok is not None:
        tok = copy.deepcopy(tok)
        if vocab is not None and vocab.union_tokens:  # tokenizer_source: union, in their rows' order
            tok.add_tokens(list(vocab.union_tokens))
        if vocab is not None and vocab.tokens_added_to_tokenizer:
            from tokenizers import AddedToken as HFAddedToken

            tok.add_tokens([HFAddedToken(t, special=True, normalized=False) for t in vocab.tokens_added_to_tokenizer], special_tokens=True)
        if vocab is not None and vocab.pad_token and getattr(tok, "pad_token", None) is None:
            tok.pad_token = vocab.pad_token
        if vlm is not None or bp.chat_template is not None:
            tok.chat_template = chat_template
        _write_tokenizer(tok, target_dir, tmp, output_padding_side(vlm) if vlm is not None else None, chat_template)
    if vlm is not None:
        clip_dir = sources.clip.path if sources.clip is not None else None
        for name, data in processor_files(vlm, bp.config["vision_config"], clip_dir).items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if chat_template:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            (tmp / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    gen = _read_json(target_dir / "generation_config.json")
    if vocab is not None and vocab.pad_token_id is not None:
        gen["pad_token_id"] = vocab.pad_token_id
    if gen:
        gen["transformers_version"] = transformers.__version__
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
