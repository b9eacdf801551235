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
dtype: bfloat16                  # (out_dtype, as in mergekit, wins when given)
```

A `slices:` recipe that is one slice taking the same layers [0, N) of every source with a merge method is
the `models:` form (`vlm_merge.recipe.load`); any other is a `SlicesRecipe`, run by
`vlm_merge.engine.merge_slices`. The slices are format's `Slice` / `SliceSource` (layer ranges checked there).

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

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from vlm_merge.recipe.format import CHECKED, VLM_REF, DtypeName, Parameters, Setting, Slice
from vlm_merge.recipe.resolve import interpolate, matches

PASSTHROUGH = "passthrough"


@dataclass(frozen=True, config=CHECKED)
class SlicesRecipe:
    """A layer-stacking recipe (see the module docstring)."""

    slices: Annotated[tuple[Slice, ...], Field(min_length=1)]
    merge_method: str = PASSTHROUGH
    vlm: str | None = None
    base_model: str | None = None
    parameters: Parameters = field(default_factory=dict)
    edges_from: str | None = None
    tokenizer_source: str | None = None
    text_config_from: Literal["vlm", "target"] | None = None
    dtype: DtypeName = None
    seed: Annotated[int, Field(strict=True)] = 0
    source_file: Path | None = None  # not a recipe key: where the recipe was read from

    @model_validator(mode="after")
    def _consistent(self) -> SlicesRecipe:
        if VLM_REF in self.refs() and not self.vlm:
            raise PydanticCustomError("no_vlm", "a slice source is 'vlm' but the recipe names no vlm; add vlm: PATH")
        return self

    @property
    def num_layers(self) -> int:
        """The output's decoder layers."""
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
        """The recipe as a recipe file's mapping (keys that are unset are left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        for key in ("vlm", "base_model"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["slices"] = [s.model_dump(mode="json", exclude_defaults=True) for s in self.slices]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("edges_from", "tokenizer_source", "text_config_from", "dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        """`to_dict` as YAML (the resolved `merge_recipe.yaml` of a stack; evolve's `best_recipe.yaml`)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)


# The keys of a slices recipe file.
SLICES_KEYS = (*(k for k in SlicesRecipe.__dataclass_fields__ if k != "source_file"), "out_dtype")


def slice_setting(setting: Setting, name: str, t: float) -> Any:
    """mergekit 0.1.5's `evaluate_setting`: a scalar; a gradient list at position t (numbers interpolated,
    other values picked); or the first `{filter, value}` whose filter is a substring of `name` (None if none)."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting[0], dict):
        return interpolate(list(setting), t)
    for cond in setting:
        if matches(cond, name):
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
