"""Merge recipes: a YAML file naming the sources, the method and its parameters.

The format is mergekit's (`models:` / `base_model` / `merge_method` / `parameters` / `dtype` /
`tokenizer_source`) plus four keys of ours:

```yaml
merge_method: ties
vlm: ./llava-1.5-7b-hf          # optional: the output is this VLM with a merged language model;
                                # vision tower and projector are copied from it. "vlm" names its LM.
base_model: ./Llama-2-7b-hf     # task vectors are taken against this model
target: ./ELYZA-japanese-Llama-2-7b   # optional: the output starts from here instead of base_model
models:                         # (anchored task arithmetic: target + sum w_i (m_i - base))
  - model: vlm
    parameters: {weight: 1.0, density: 0.5}
  - model: ./ELYZA-japanese-Llama-2-7b
    parameters: {weight: [1.0, 0.5], density: 0.7}
parameters: {normalize: true}
tokenizer_source: target        # whose vocabulary the output uses (default: target, else base_model)
text_config_from: vlm           # whose RoPE / sliding window / norm eps / context length the output has:
                                # vlm (default with a vlm) or target
dtype: bfloat16
seed: 0                         # random methods (DARE, DELLA) derive a seed per tensor from this
```

Parameter values, as in mergekit: a number or boolean; a list of numbers, interpolated across the
decoder layers (layer i of N takes position i/(N-1) along the list; embeddings, final norm and lm_head
take position 0; a list of exactly N values gives layer i its i-th value; a list longer than the number
of layers is an error); or a list of
`{filter: …, value: …}` conditions, the first that matches the tensor wins. `filter` is a
**substring** of the canonical tensor name (`model.layers.3.mlp.down_proj.weight`, `lm_head.weight`),
as in mergekit; `filter_regex` (ours) is a **regular expression** searched in it; an entry with
neither (or `filter: "*"`) always matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import load_yaml

if TYPE_CHECKING:
    from vlm_merge.recipe.slices import SlicesRecipe

VLM_REF = "vlm"
KNOWN_KEYS = (
    "merge_method", "vlm", "base_model", "target", "models", "parameters", "tokenizer_source", "text_config_from",
    "dtype", "seed", "out_dtype",
)  # fmt: skip
TEXT_CONFIG_SOURCES = ("vlm", "target")
MERGEKIT_UNSUPPORTED = ("modules", "tokenizer", "chat_template", "out_dtype")

Setting = Any  # number | bool | str | list[number] | list[Condition-dict]


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    vlm: str | None = None
    target: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    tokenizer_source: str | None = None
    text_config_from: str | None = None  # "vlm" | "target"; None: "vlm" when there is a VLM
    dtype: str | None = None
    seed: int = 0
    source_file: Path | None = None

    # -- references --------------------------------------------------------------------------
    def refs(self) -> list[str]:
        """The merge's inputs: LLM sources and "vlm" (the VLM's language model) if used, in order."""
        return list(dict.fromkeys(r for r in [self.base_model, self.target, *(m.model for m in self.models)] if r is not None))

    @property
    def vocab_source(self) -> str:
        """The reference whose tokenizer and vocabulary the output uses."""
        ts = self.tokenizer_source
        if ts in (None, "target"):
            return self.target or self.base_model or self.models[0].model
        if ts == "base":
            if self.base_model is None:
                raise VlmMergeError("recipe tokenizer_source: 'base' but the recipe has no base_model")
            return self.base_model
        return ts

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        for key in ("vlm", "base_model", "target"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["models"] = [{"model": m.model, "parameters": dict(m.parameters)} for m in self.models]
        out["parameters"] = dict(self.parameters)
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.text_config_from is not None:
            out["text_config_from"] = self.text_config_from
        if self.dtype is not None:
            out["dtype"] = self.dtype
        out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)


def _field_error(where: str, msg: str) -> VlmMergeError:
    return VlmMergeError(f"recipe {where}: {msg}")


def _check_setting(where: str, value: Setting) -> None:
    if isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        if not value:
            raise _field_error(where, "empty list")
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            return
        for i, cond in enumerate(value):
            if not isinstance(cond, dict) or "value" not in cond:
                raise _field_error(f"{where}[{i}]", "expected a number, a list of numbers, or a list of {filter: …, value: …}")
            extra = set(cond) - {"value", "filter", "filter_regex"}
            if extra:
                raise _field_error(f"{where}[{i}]", f"unknown key {sorted(extra)[0]!r} (use value, filter, filter_regex)")
            if "filter_regex" in cond:
                try:
                    re.compile(str(cond["filter_regex"]))
                except re.error as e:
                    raise _field_error(f"{where}[{i}].filter_regex", f"invalid regex {cond['filter_regex']!r} ({e})") from None
            _check_setting(f"{where}[{i}].value", cond["value"])
        return
    raise _field_error(where, f"unsupported value {value!r}")


def recipe_from_dict(data: dict, source_file: Path | None = None) -> Recipe | SlicesRecipe:
    """Validate the structure of a recipe mapping (methods and parameter ranges are checked later);
    one with `slices:` is a layer-stacking recipe (`vlm_merge.recipe.slices`)."""
    if not isinstance(data, dict):
        raise VlmMergeError("recipe: expected a mapping with merge_method and models")
    if "slices" in data:
        from vlm_merge.recipe.slices import slices_recipe_from_dict

        return slices_recipe_from_dict(data, source_file)
    for key in MERGEKIT_UNSUPPORTED:
        if key in data:
            raise _field_error(key, "is a mergekit feature vlm-merge does not support; use models:/base_model:/parameters:")
    unknown = [k for k in data if k not in KNOWN_KEYS]
    if unknown:
        raise _field_error(unknown[0], f"unknown key (known: {', '.join(KNOWN_KEYS)})")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise _field_error("merge_method", "missing; e.g. task_arithmetic, ties, dare_ties, slerp")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _field_error("models", "missing or empty; list the models to merge")
    models = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise _field_error(f"models[{i}]", "expected {model: PATH, parameters: {...}}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise _field_error(f"models[{i}]", f"unknown key {sorted(extra)[0]!r}")
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise _field_error(f"models[{i}].parameters", "expected a mapping")
        for k, v in params.items():
            _check_setting(f"models[{i}].parameters.{k}", v)
        models.append(ModelEntry(m["model"], dict(params)))
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise _field_error("parameters", "expected a mapping")
    for k, v in params.items():
        _check_setting(f"parameters.{k}", v)
    for key in ("vlm", "base_model", "target", "tokenizer_source", "text_config_from", "dtype"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise _field_error(key, f"expected a string, got {data[key]!r}")
    if data.get("text_config_from") not in (None, *TEXT_CONFIG_SOURCES):
        raise _field_error("text_config_from", f"{data['text_config_from']!r}: choose {' or '.join(TEXT_CONFIG_SOURCES)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _field_error("seed", f"expected an integer, got {seed!r}")
    refs_vlm = [m.model for m in models] + [data.get("base_model"), data.get("target")]
    if VLM_REF in refs_vlm and not data.get("vlm"):
        raise _field_error("models", "refers to 'vlm' but the recipe names no vlm")
    return Recipe(
        merge_method=method,
        models=tuple(models),
        base_model=data.get("base_model"),
        vlm=data.get("vlm"),
        target=data.get("target"),
        parameters=dict(params),
        tokenizer_source=data.get("tokenizer_source"),
        text_config_from=data.get("text_config_from"),
        dtype=data.get("dtype"),
        seed=seed,
        source_file=source_file,
    )


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file with `safe_load.load_yaml`'s checks; any problem is a one-line error naming `what`."""
    return load_yaml(path, what)


def load_recipe(path: str | Path) -> Recipe | SlicesRecipe:
    """Read a recipe (ours or mergekit's) from YAML. Relative model paths are relative to the file."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    recipe = recipe_from_dict(data, source_file=path)
    if not isinstance(recipe, Recipe):
        return recipe.rebased(path.parent)
    return _rebase_paths(recipe, path.parent)


def _rebase(ref: str | None, base: Path) -> str | None:
    if ref is None or ref in (VLM_REF, "base", "target"):
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = base / p
    return str(local.resolve()) if local.exists() else ref  # else: a Hugging Face id


def _rebase_paths(r: Recipe, base: Path) -> Recipe:
    return Recipe(
        merge_method=r.merge_method,
        models=tuple(ModelEntry(_rebase(m.model, base) or m.model, m.parameters) for m in r.models),
        base_model=_rebase(r.base_model, base),
        vlm=_rebase(r.vlm, base),
        target=_rebase(r.target, base),
        parameters=r.parameters,
        tokenizer_source=_rebase(r.tokenizer_source, base),
        dtype=r.dtype,
        seed=r.seed,
        source_file=r.source_file,
    )


# ------------------------------------------------------------------------------------------
# Resolving a setting for one tensor
# ------------------------------------------------------------------------------------------


def _interp(values: list, t: float) -> Any:
    """mergekit's gradient: linear interpolation between neighbouring values at position t in [0, 1]."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_position(layer: int | None, num_layers: int) -> float:
    """Where a tensor sits along a per-layer list (mergekit's `t`): 0 outside the decoder layers."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def resolve_setting(setting: Setting, name: str, layer: int | None, num_layers: int, where: str) -> Any:
    """The value of a parameter setting for the tensor `name` (canonical key) in `layer`."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting[0], dict):  # validated lists are all numbers or all conditions
        if len(setting) > num_layers:
            raise _field_error(where, f"has {len(setting)} per-layer values but the model has {num_layers} layers")
        if len(setting) == num_layers and layer is not None:
            return setting[layer]  # one value per layer: exact (interpolation would round)
        return _interp(list(setting), layer_position(layer, num_layers))
    for i, cond in enumerate(setting):
        f, rx = cond.get("filter"), cond.get("filter_regex")
        if (f is None and rx is None) or f == "*" or (f is not None and str(f) in name) or (rx is not None and re.search(str(rx), name)):
            return resolve_setting(cond["value"], name, layer, num_layers, f"{where}[{i}].value")
    return None


def check_layer_lists(setting: Setting, num_layers: int, where: str) -> None:
    """Fail early (before merging) on per-layer lists longer than the model's layer count."""
    if isinstance(setting, list):
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            if len(setting) > num_layers:
                raise _field_error(where, f"has {len(setting)} per-layer values but the model has {num_layers} layers")
        else:
            for i, cond in enumerate(setting):
                check_layer_lists(cond["value"], num_layers, f"{where}[{i}].value")
