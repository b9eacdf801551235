"""Layer-stacking recipes: mergekit's `slices:` format, on an LLM or on the language model of a VLM.

```yaml
merge_method: passthrough        # or any method of vlm_merge.methods, applied slice by slice
vlm: ./llava-1.5-7b-hf           # optional: vision tower and projector copied; "vlm" names its LM
slices:
  - sources:
      - model: ./ELYZA-japanese-Llama-2-7b
        layer_range: [0, 24]     # half-open, as in mergekit
  - sources:
      - model: vlm
        layer_range: [8, 32]
        parameters: {scale: [1.0, 0.5]}   # passthrough's per-source scale (mergekit's)
base_model: ...                  # optional; also per slice (mergekit's slice-level base_model)
parameters: {...}                # mergekit's precedence: source > slice > global
edges_from: vlm                  # ours: source of embeddings, final norm and lm_head
tokenizer_source: ...            # whose vocabulary the output uses (default: edges_from)
text_config_from: vlm
dtype: bfloat16
```

As in mergekit 0.1.5 (`mergekit/plan.py`): every source of a slice spans the same number of layers,
layer `idx` of an n-layer slice sits at `t = idx / (n - 1)` (1 when n == 1) along gradient lists,
embeddings are merged from the first slice's sources and final norm / lm_head from the last slice's,
both at t = 0. Per-model parameter filters match the *source* tensor's canonical name, shared
parameters the output's. `edges_from` (ours) takes embeddings, final norm and lm_head from one named
source instead, the one whose vocabulary and tokenizer the output has; with a `vlm` that is required
unless the first and last slices are that one source (the output's vocabulary rows are aligned to one
source, plus the VLM's image token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vlm_merge.errors import VlmMergeError
from vlm_merge.recipe import _check_setting, _interp, _rebase

PASSTHROUGH = "passthrough"
SLICES_KEYS = (
    "slices", "merge_method", "vlm", "base_model", "parameters", "edges_from", "tokenizer_source",
    "text_config_from", "dtype", "out_dtype", "seed",
)  # fmt: skip
Setting = Any


@dataclass(frozen=True)
class SliceSource:
    """Layers [start, stop) of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = field(default_factory=dict)

    @property
    def layers(self) -> range:
        return range(*self.layer_range)


@dataclass(frozen=True)
class OutputSlice:
    """Consecutive output layers merged from equally long source ranges."""

    sources: tuple[SliceSource, ...]
    parameters: dict[str, Setting] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.sources[0].layers)


@dataclass(frozen=True)
class SlicesRecipe:
    """A layer-stacking recipe (see the module docstring)."""

    slices: tuple[OutputSlice, ...]
    merge_method: str = PASSTHROUGH
    vlm: str | None = None
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    edges_from: str | None = None
    tokenizer_source: str | None = None
    text_config_from: str | None = None
    dtype: str | None = None
    seed: int = 0
    source_file: Path | None = None

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    @property
    def target(self) -> None:
        """A stack starts from no target model (the attribute `Recipe` has)."""
        return None

    def refs(self) -> list[str]:
        """Every model the recipe reads, in order of first mention."""
        refs = [self.base_model, *(s.base_model for s in self.slices), *(src.model for s in self.slices for src in s.sources),
                self.edges_from, self.tokenizer_source]
        return list(dict.fromkeys(r for r in refs if r is not None and r not in ("base", "target")))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.vlm is not None:
            out["vlm"] = self.vlm
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["slices"] = [
            {
                "sources": [
                    {"model": src.model, "layer_range": list(src.layer_range), **({"parameters": dict(src.parameters)} if src.parameters else {})}
                    for src in s.sources
                ],
                **({"parameters": dict(s.parameters)} if s.parameters else {}),
                **({"base_model": s.base_model} if s.base_model else {}),
            }
            for s in self.slices
        ]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("edges_from", "tokenizer_source", "text_config_from", "dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)

    def rebased(self, base: Path) -> SlicesRecipe:
        """Relative model paths made relative to `base` (the recipe file's directory)."""
        def rb(ref: str | None) -> str | None:
            return _rebase(ref, base)

        slices = tuple(
            replace(s, base_model=rb(s.base_model), sources=tuple(replace(src, model=rb(src.model) or src.model) for src in s.sources))
            for s in self.slices
        )
        return replace(self, slices=slices, vlm=rb(self.vlm), base_model=rb(self.base_model), edges_from=rb(self.edges_from),
                       tokenizer_source=rb(self.tokenizer_source))


def _err(where: str, msg: str) -> VlmMergeError:
    return VlmMergeError(f"recipe {where}: {msg}")


def _params(where: str, raw: Any) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _err(where, "expected a mapping")
    for k, v in raw.items():
        _check_setting(f"{where}.{k}", v)
    return dict(raw)


def _source(where: str, raw: Any) -> SliceSource:
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
        raise _err(where, "expected {model: PATH, layer_range: [START, STOP]}")
    extra = set(raw) - {"model", "layer_range", "parameters"}
    if extra:
        raise _err(where, f"unknown key {sorted(extra)[0]!r} (use model, layer_range, parameters)")
    lr = raw.get("layer_range")
    if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            and 0 <= lr[0] < lr[1]):  # fmt: skip
        raise _err(f"{where}.layer_range", f"{lr!r}: expected [START, STOP] with 0 <= START < STOP (STOP exclusive)")
    return SliceSource(raw["model"], (lr[0], lr[1]), _params(f"{where}.parameters", raw.get("parameters")))


def slices_recipe_from_dict(data: dict, source_file: Path | None = None) -> SlicesRecipe:
    """Validate the structure of a `slices:` recipe (layer counts are checked against the sources later)."""
    unknown = [k for k in data if k not in SLICES_KEYS]
    if unknown:
        hint = "; a slices recipe has no models: list" if unknown[0] == "models" else ""
        raise _err(unknown[0], f"unknown key in a slices recipe (known: {', '.join(SLICES_KEYS)}){hint}")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise _err("slices", "expected a non-empty list of {sources: [...]}")
    slices = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            raise _err(f"slices[{i}]", "expected {sources: [{model: PATH, layer_range: [START, STOP]}, ...]}")
        extra = set(s) - {"sources", "parameters", "base_model"}
        if extra:
            raise _err(f"slices[{i}]", f"unknown key {sorted(extra)[0]!r} (use sources, parameters, base_model)")
        sources = tuple(_source(f"slices[{i}].sources[{j}]", src) for j, src in enumerate(s["sources"]))
        lengths = {len(src.layers) for src in sources}
        if len(lengths) > 1:
            raise _err(f"slices[{i}].sources", f"layer ranges of different lengths {sorted(lengths)}; every source of a slice spans as many layers")
        if s.get("base_model") is not None and not isinstance(s["base_model"], str):
            raise _err(f"slices[{i}].base_model", f"expected a string, got {s['base_model']!r}")
        slices.append(OutputSlice(sources, _params(f"slices[{i}].parameters", s.get("parameters")), s.get("base_model")))
    method = data.get("merge_method", PASSTHROUGH)
    if not isinstance(method, str):
        raise _err("merge_method", f"expected a string, got {method!r}")
    for key in ("vlm", "base_model", "edges_from", "tokenizer_source", "text_config_from", "dtype", "out_dtype"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _err(key, f"expected a string, got {data[key]!r}")
    if data.get("text_config_from") not in (None, "vlm", "target"):
        raise _err("text_config_from", f"{data['text_config_from']!r}: choose vlm or target")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err("seed", f"expected an integer, got {seed!r}")
    recipe = SlicesRecipe(
        slices=tuple(slices), merge_method=method, vlm=data.get("vlm"), base_model=data.get("base_model"),
        parameters=_params("parameters", data.get("parameters")), edges_from=data.get("edges_from"),
        tokenizer_source=data.get("tokenizer_source"), text_config_from=data.get("text_config_from"),
        dtype=data.get("out_dtype") or data.get("dtype"), seed=seed, source_file=source_file,
    )  # fmt: skip
    if "vlm" in recipe.refs() and recipe.vlm is None:
        raise _err("slices", "refers to 'vlm' but the recipe names no vlm")
    return recipe


def slice_setting(setting: Setting, name: str, t: float) -> Any:
    """mergekit 0.1.5's `evaluate_setting`: a scalar; a gradient list at position t (numbers interpolated,
    other values picked); or the first `{filter, value}` whose filter is a substring of `name` (None if none)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting[0], dict):
        return _interp(list(setting), t)
    for cond in setting:
        f, rx = cond.get("filter"), cond.get("filter_regex")
        if (f is None and rx is None) or f == "*" or (f is not None and str(f) in name) or (rx is not None and re.search(str(rx), name)):
            return slice_setting(cond["value"], name, t)
    return None


def first_setting(scopes: list[dict[str, Setting]], key: str, name: str, t: float) -> Any:
    """The value of `key` from the first scope (highest precedence first) that gives one for `name`."""
    for scope in scopes:
        if key in scope:
            value = slice_setting(scope[key], name, t)
            if value is not None:
                return value
    return None
