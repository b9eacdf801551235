"""Recipe presets: Chat Vector as a recipe, its scales and the skip presets.

Chat Vector (Huang et al., 2023) for a VLM is `ja_vlm_llm = ja_base + w * (vlm_llm - en_base)`: the recipe
`task_arithmetic` with `base_model: en_base`, `target: ja_base`, `models: [vlm]` and weight w per tensor
(`Scales.weight_setting`: a global scale x per-layer scales x per-module scales, skipped tensors 0).

Skip presets name groups of canonical LLM keys (`model.embed_tokens.weight`, `lm_head.weight`,
`model.norm.weight`, `model.layers.N.input_layernorm.weight`, …). Custom skip patterns are regular
expressions searched (`re.search`) in the canonical key. A skipped tensor keeps the Japanese base's
value.

Default: `none` — every tensor gets the vector, as in the Chat Vector paper. Embedding and lm_head rows are
matched by token string (`vlm_merge.architecture.vocab`), so a Japanese base with an extended vocabulary gets
the vector on the tokens it shares with the English base and keeps its own values on the new ones; the reason
the paper's follow-ups skipped embeddings (mismatched rows) does not apply. The LLaVA-to-Japanese recipe that
skipped layernorms is the `norms` preset.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_merge.errors import VlmMergeError
from vlm_merge.recipe import VLM_REF, ModelEntry, Recipe

SKIP_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "embeddings": (r"^model\.embed_tokens\.", r"^lm_head\."),
    "norms": (r"(^|\.)[a-z_]*norm[a-z_]*\.(weight|bias)$",),
    "embeddings+norms": (r"^model\.embed_tokens\.", r"^lm_head\.", r"(^|\.)[a-z_]*norm[a-z_]*\.(weight|bias)$"),
}
DEFAULT_SKIP = "none"

# Module groups for per-module scales: name -> regex on the canonical key.
FINAL_NORM = r"^model\.norm\."
MODULES: dict[str, str] = {
    "attention": r"\.self_attn\.",
    "mlp": r"\.mlp\.",
    "norms": r"(^|\.)[a-z_]*norm[a-z_]*\.(weight|bias)$",
    "embeddings": r"^model\.embed_tokens\.",
    "lm_head": r"^lm_head\.",
}
FLAGS = {"scale": "--scale", "layer_scales": "--layer-scales", "module_scales": "--module-scale"}  # argument -> CLI flag


def resolve_skip(skip: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Turn presets and/or regexes into a tuple of compiled-checked regexes.

    `skip` may be a preset name, a comma-separated list of presets and regexes, or a list of them.
    """
    if skip is None:
        skip = DEFAULT_SKIP
    items = [s.strip() for s in (skip.split(",") if isinstance(skip, str) else skip) if s.strip()]
    patterns: list[str] = []
    for item in items:
        if item in SKIP_PRESETS:
            patterns.extend(SKIP_PRESETS[item])
            continue
        try:
            re.compile(item)
        except re.error as e:
            raise VlmMergeError(
                f"skip pattern {item!r} is neither a preset ({', '.join(SKIP_PRESETS)}) nor a valid regex ({e})"
            ) from None
        patterns.append(item)
    return tuple(patterns)


@dataclass(frozen=True)
class Scales:
    """A Chat Vector's scales: global, per decoder layer, per module group, and skipped tensors."""

    scale: float = 1.0
    layer_scales: tuple[float, ...] | None = None
    module_scales: dict[str, float] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.module_scales) - set(MODULES))
        if unknown:
            raise VlmMergeError(f"module_scales: unknown module {unknown[0]!r}; use {', '.join(MODULES)}")

    def check_layers(self, num_layers: int) -> None:
        """One-line error when `layer_scales` does not have one value per decoder layer."""
        if self.layer_scales is not None and len(self.layer_scales) != num_layers:
            raise VlmMergeError(
                f"layer_scales has {len(self.layer_scales)} values but the language model has {num_layers} layers"
            )

    def weight_setting(self) -> Any:
        """The Chat Vector's weight as a recipe parameter setting (see `vlm_merge.recipe`).

        Effective weight = scale x layer_scales[layer] x module_scales[module]; skipped tensors get 0
        (the Japanese base's value). Embeddings, lm_head and the final norm sit outside the layers.
        """
        if not self.skip and not self.module_scales and self.layer_scales is None:
            return self.scale
        ms = self.module_scales

        def per_layer(m: float | None = None) -> float | list[float]:
            if self.layer_scales is None:
                return self.scale if m is None else self.scale * m
            return [self.scale * ls if m is None else self.scale * ls * m for ls in self.layer_scales]

        entries: list[dict[str, Any]] = [{"filter_regex": p, "value": 0.0} for p in self.skip]
        for group, pattern in (("embeddings", MODULES["embeddings"]), ("lm_head", MODULES["lm_head"]), ("norms", FINAL_NORM)):
            entries.append({"filter_regex": pattern, "value": self.scale * ms[group] if group in ms else self.scale})
        entries += [{"filter_regex": MODULES[g], "value": per_layer(ms[g])} for g in ("attention", "mlp", "norms") if g in ms]
        entries.append({"value": per_layer()})
        return entries

    def describe(self) -> dict:
        """The scales as plain data (for reports)."""
        return {
            "scale": self.scale,
            "layer_scales": list(self.layer_scales) if self.layer_scales is not None else None,
            "module_scales": dict(self.module_scales),
            "skip": list(self.skip),
        }


def _number(value: object, name: str) -> float:
    """`value` as a finite float, or a one-line error naming the argument (`name`, e.g. layer_scales[2]) and its flag."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        arg = name.split("[")[0]
        raise VlmMergeError(f"{name} {value!r}: must be a finite number ({FLAGS[arg]} / {arg}=)")
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
        models=(ModelEntry(model=VLM_REF, parameters={"weight": scales.weight_setting()}),),
        dtype=dtype,
    )
