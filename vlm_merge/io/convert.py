"""Original LLaVA (haotian-liu) -> transformers' llava-hf format, as data.

Original LLaVA checkpoints (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`) cannot be loaded by
transformers' own classes, so a merged model built from one is written in the llava-hf layout that
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` load. The config fields and processor
files are tables here; the key renames are rows of the layout table (`vlm_merge.architecture.layouts`, applied
by the engine: `llava-original` -> llava-hf, and `clip` for the tower). The vision tower comes from the
checkpoint when it embeds one (`model.vision_tower.vision_tower.vision_model.*`, LLaVA-1.6) or else from the
CLIP checkpoint named by `mm_vision_tower` (LLaVA-1.5).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import load_json

# Original architecture -> (llava-hf architecture, model_type, processor class, image processor class).
ARCHITECTURES: dict[str, tuple[str, str, str, str]] = {
    "pad": ("LlavaForConditionalGeneration", "llava", "LlavaProcessor", "CLIPImageProcessor"),
    "square": ("LlavaForConditionalGeneration", "llava", "LlavaProcessor", "CLIPImageProcessor"),
    "anyres": ("LlavaNextForConditionalGeneration", "llava_next", "LlavaNextProcessor", "LlavaNextImageProcessor"),
}

# llava-hf chat templates per language-model family, written as transformers 5 saves them (chat_template.jinja):
# what a converted checkpoint, the test fixtures and the miniature world ship.
CHAT_TEMPLATES: dict[str, str] = {
    "llama": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}"
    ),
}
TEXT_MODEL_TYPES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
# Top-level fields of an original config that are LLaVA's, not the language model's.
_LLAVA_FIELDS = re.compile(r"^(mm_|image_|tune_|freeze_|unfreeze_|use_mm_|tokenizer_model_max_length|tokenizer_padding_side)")


def text_model_type(config: dict) -> str:
    arch = (config.get("architectures") or [""])[0]
    if arch in TEXT_MODEL_TYPES:
        return TEXT_MODEL_TYPES[arch]
    mt = str(config.get("model_type", ""))
    return "mistral" if "mistral" in mt else "llama"


def text_config_of_original(config: dict) -> dict:
    """The language-model part of an original LLaVA config."""
    text = {k: v for k, v in config.items() if not _LLAVA_FIELDS.match(k)}
    for k in ("architectures", "model_type", "_name_or_path", "transformers_version", "use_cache"):
        text.pop(k, None)
    text["model_type"] = text_model_type(config)
    return text


def vision_tower_name(config: dict) -> str:
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if not name:
        raise VlmMergeError("original LLaVA config has no mm_vision_tower; pass --vision-tower PATH (a CLIP checkpoint)")
    return str(name)


# The fields of a CLIPVisionConfig that the vision model reads. Legacy CLIP configs (openai/clip-vit-large-
# patch14-336, saved by transformers 4.x) also carry every generation / label field of PretrainedConfig
# (max_length, temperature, id2label, …) in their vision_config; those do not go into an output.
CLIP_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    "initializer_range", "initializer_factor",
)  # fmt: skip


def vision_config_of_clip(clip_config: dict) -> dict:
    """The CLIP vision config (from a CLIPModel or CLIPVisionModel config.json): `CLIP_VISION_FIELDS` only."""
    vc = clip_config.get("vision_config") or clip_config
    return {**{k: vc[k] for k in CLIP_VISION_FIELDS if k in vc}, "model_type": "clip_vision_model"}


def hf_config_from_original(config: dict, vision_config: dict, text_config: dict) -> dict:
    """A LlavaConfig / LlavaNextConfig dict equivalent to an original LLaVA config."""
    aspect = str(config.get("image_aspect_ratio", "pad"))
    if aspect not in ARCHITECTURES:
        raise VlmMergeError(f"original LLaVA config: image_aspect_ratio {aspect!r} is not supported (pad, square, anyres)")
    if str(config.get("mm_projector_type", "mlp2x_gelu")) != "mlp2x_gelu":
        raise VlmMergeError(f"original LLaVA config: mm_projector_type {config.get('mm_projector_type')!r} is not supported (mlp2x_gelu)")
    arch, model_type, _, _ = ARCHITECTURES[aspect]
    feature = str(config.get("mm_vision_select_feature", "patch"))
    image_size, patch = int(vision_config.get("image_size", 336)), int(vision_config.get("patch_size", 14))
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "text_config": text_config,
        "vision_config": vision_config,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default" if feature == "patch" else "full",
        "image_seq_length": (image_size // patch) ** 2,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    if model_type == "llava_next":
        out["image_grid_pinpoints"] = config.get("image_grid_pinpoints") or [[image_size, image_size]]
        out.pop("image_seq_length")
    return out


def processor_files_from_original(config: dict, vision_config: dict, clip_dir: Path | None) -> dict[str, dict]:
    """preprocessor_config.json and processor_config.json (flat, as transformers 4.x reads it) for a
    converted model; its chat template is `CHAT_TEMPLATES[text_model_type(config)]`."""
    aspect = str(config.get("image_aspect_ratio", "pad"))
    _, _, processor_class, image_processor_class = ARCHITECTURES[aspect]
    size = int(vision_config.get("image_size", 336))
    pre: dict = {}
    if clip_dir is not None and os.path.lexists(clip_dir / "preprocessor_config.json"):
        pre = load_json(clip_dir / "preprocessor_config.json", "preprocessor config")
    if not pre:
        pre = {
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
        }
    pre["image_processor_type"] = image_processor_class
    pre["processor_class"] = processor_class
    if aspect == "anyres":
        pre["image_grid_pinpoints"] = config.get("image_grid_pinpoints") or [[size, size]]
    proc = {
        "processor_class": processor_class,
        "patch_size": int(vision_config.get("patch_size", 14)),
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "image_token": "<image>",
    }
    return {"preprocessor_config.json": pre, "processor_config.json": proc}
