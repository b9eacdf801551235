"""The recipe format: pydantic models of a recipe's keys, mergekit 0.1.5's and ours.

A recipe is a `Recipe`: the method, the sources (`models`, `base_model`, and ours: `vlm`, `target`),
parameter settings (per model and shared), the output's tokenizer (`tokenizer_source` or mergekit's
`tokenizer:` block), `chat_template`, `dtype` / `out_dtype`, ours: `text_config_from`, `seed`.
`modules` (mergekit's form, and ours with the models left out): the vision tower and projector of two or more
VLMs of one family merged per module, each with its own method and parameters (`ModuleSpec`).
`Recipe` and `ModelEntry` are frozen pydantic dataclasses: built from Python or from a file, every field is
checked the same way, and `dataclasses.replace` gives a checked copy. mergekit's `slices:` (`Slice`,
`SliceSource`) is read by `vlm_merge.recipe.load` into the `models:` form when it is one, else into a
layer-stacking `vlm_merge.recipe.slices.SlicesRecipe`.

A parameter setting (`Setting`) is, as in mergekit: a scalar (number, boolean, string); a non-empty list of
scalars, a gradient across the decoder layers; or a non-empty list of conditions `{filter: …, value: …}`
(`Condition`), the first that matches a tensor wins. Settings stay plain Python data (lists, dicts), so
code that builds them (Chat Vector's rules, the evolutionary genome) writes them as a recipe file would.
"""

from __future__ import annotations

import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    field_validator,
    model_validator,
    with_config,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, Required, TypedDict

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import dtype_from_name

VLM_REF = "vlm"
TEXT_CONFIG_SOURCES = ("vlm", "target")
STRICT = ConfigDict(extra="forbid", frozen=True)  # the models
CHECKED = ConfigDict(extra="forbid")  # the frozen dataclasses
# the union-member tags `Setting` puts into an error's location (dropped when the location is printed)
SETTING_TAGS = ("scalar", "gradient", "conditions")

SETTING_SHAPES = "a number, a list of numbers (per layer) or a list of {filter: …, value: …}"


# A number YAML 1.1 reads as a string (PyYAML: `1e-3`, `5E+2`), which mergekit 0.1.5 reads as the number.
NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _scalar(value: Any) -> bool | int | float | str:
    if isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, (bool, int, float, str)):
        return value
    raise PydanticCustomError("scalar", "expected a number, boolean or string")


Scalar = Annotated[bool | int | float | str, PlainValidator(_scalar)]


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise PydanticCustomError("regex", "invalid regular expression ({error})", {"error": str(e)}) from None
    return pattern


@with_config(ConfigDict(extra="forbid"))
class Condition(TypedDict, total=False):
    """A conditional setting: `value` applies to tensors whose canonical name contains `filter` (mergekit;
    absent or "*": every tensor) or in which the regular expression `filter_regex` (ours) is found."""

    filter: NotRequired[str]
    filter_regex: NotRequired[Annotated[str, AfterValidator(_regex)]]
    value: Required[Setting]


def _setting_shape(value: Any) -> str | None:
    if isinstance(value, (bool, int, float, str)):
        return "scalar"
    if isinstance(value, list):
        return "conditions" if any(isinstance(v, dict) for v in value) else "gradient"
    return None


Setting = Annotated[
    Union[
        Annotated[Scalar, Tag("scalar")],
        Annotated[list[Scalar], Field(min_length=1), Tag("gradient")],
        Annotated[list[Condition], Field(min_length=1), Tag("conditions")],
    ],
    Discriminator(_setting_shape, custom_error_type="setting", custom_error_message=f"expected {SETTING_SHAPES}"),
]


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value  # mergekit writes `parameters:` with nothing under it


Parameters = Annotated[dict[str, Setting], BeforeValidator(_none_is_empty)]


def _dtype(name: str | None) -> str | None:
    if name is not None:
        try:
            dtype_from_name(name)
        except VlmMergeError:
            raise PydanticCustomError("dtype", "not a dtype; use bfloat16, float16 or float32") from None
    return name


DtypeName = Annotated[str | None, AfterValidator(_dtype)]


def _model_shorthand(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value  # `- ./model` for `- model: ./model`


@dataclass(frozen=True, config=CHECKED)
class ModelEntry:
    """One entry of `models:`: a source (a path, a Hugging Face id, or "vlm": the VLM's language model)
    and its own parameter settings."""

    model: str
    parameters: Parameters = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _model_shorthand(data)


# mergekit 0.1.5's module names (its Gemma 3 / Mistral 3 / Qwen-VL architectures): the language model, read into
# the recipe's own `models:` / `parameters`, and the two vision-side modules a recipe may merge
TEXT_DECODER = "text_decoder"
VISION_MODULES = ("vision_tower", "multi_modal_projector")


@dataclass(frozen=True, config=CHECKED)
class ModuleSpec:
    """One vision-side entry of `modules:` (`vision_tower` or `multi_modal_projector`, which includes
    LLaVA-NeXT's `image_newline`): its tensors merged per tensor. Left out, `merge_method` and `models` are
    the recipe's (our short form). A module that names its `models` (mergekit's form) is complete: its
    `parameters` are all its shared parameters (reading a file lays them over the file's top-level
    `parameters:`, as mergekit does)."""

    merge_method: str | None = None
    models: Annotated[tuple[ModelEntry, ...], Field(min_length=1)] | None = None
    parameters: Parameters = field(default_factory=dict)


class ModelToken(BaseModel):
    """mergekit's token embedding taken from one model's row (`token_id` or `token`, exactly one)."""

    model_config = STRICT
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroToken(BaseModel):
    """mergekit's all-zero token embedding."""

    model_config = STRICT
    kind: Literal["zero"]


class TokenSpec(BaseModel):
    """mergekit's `tokenizer.tokens.<token>`: where the token's embedding comes from; `force`: even for
    models that have the token."""

    model_config = STRICT
    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary (`source`: "union", "base" or a model), token
    embeddings set by hand (`tokens`), and the row count rounded up to `pad_to_multiple_of`."""

    model_config = STRICT
    source: str = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: Annotated[int, Field(gt=0)] | None = None


class SliceSource(BaseModel):
    """mergekit's `slices[].sources[]`: layers [start, stop) of a model, with its own settings."""

    model_config = STRICT
    model: str
    layer_range: tuple[Annotated[int, Field(strict=True)], Annotated[int, Field(strict=True)]]
    parameters: Parameters = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _half_open(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise PydanticCustomError("layer_range", "expected [START, STOP] with 0 <= START < STOP (STOP exclusive, as in mergekit)")
        return v

    @property
    def layers(self) -> range:
        """The source layers, in order."""
        return range(*self.layer_range)


class Slice(BaseModel):
    """mergekit's `slices[]`: output layers made from aligned layer ranges of its sources (every source spans
    as many layers)."""

    model_config = STRICT
    sources: Annotated[list[SliceSource], Field(min_length=1)]
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _aligned(cls, v: list[SliceSource]) -> list[SliceSource]:
        lengths = sorted({len(s.layers) for s in v})
        if len(lengths) > 1:
            raise PydanticCustomError("lengths", "layer ranges of different lengths {lengths}; every source of a slice spans as many layers",
                                      {"lengths": str(lengths)})
        return v

    @property
    def num_layers(self) -> int:
        """The output layers this slice makes."""
        return len(self.sources[0].layers)


@dataclass(frozen=True, config=CHECKED)
class Recipe:
    """A merge recipe: method, sources, parameter settings and output options (see the module docstring of
    `vlm_merge.recipe`)."""

    merge_method: str
    models: Annotated[tuple[ModelEntry, ...], Field(min_length=1)]
    base_model: str | None = None
    vlm: str | None = None
    target: str | None = None
    parameters: Parameters = field(default_factory=dict)
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    text_config_from: Literal["vlm", "target"] | None = None  # None: "vlm" when there is a VLM
    dtype: DtypeName = None
    out_dtype: DtypeName = None
    seed: Annotated[int, Field(strict=True)] = 0
    modules: dict[Literal["vision_tower", "multi_modal_projector"], ModuleSpec] = field(default_factory=dict)
    # not recipe keys: where the recipe was read from, and the layer range of mergekit's one-slice form
    source_file: Path | None = None
    layer_range: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise PydanticCustomError("both", "give tokenizer_source or tokenizer:, not both (as in mergekit)")
        refs = [m.model for m in self.models] + [self.base_model, self.target]
        refs += [m.model for spec in self.modules.values() for m in spec.models or ()]
        if VLM_REF in refs and not self.vlm:
            raise PydanticCustomError("no_vlm", "a source is 'vlm' but the recipe names no vlm; add vlm: PATH")
        return self

    # -- references --------------------------------------------------------------------------
    def refs(self) -> list[str]:
        """The merge's inputs: LLM sources and "vlm" (the VLM's language model) if used, in order."""
        modules = [m.model for spec in self.modules.values() for m in spec.models or ()]
        return list(dict.fromkeys(r for r in [self.base_model, self.target, *(m.model for m in self.models), *modules]
                                  if r is not None))

    def module(self, name: str) -> ModuleSpec | None:
        """The `modules:` entry `name` in full (None: not merged, copied from the VLM). One that names its models
        is complete; else it takes the recipe's models: with the recipe's method (none given, or the same) with their
        parameters, its parameters laid over the recipe's shared ones; with a method of its own their paths only,
        and its own parameters only (the recipe's belong to another method)."""
        spec = self.modules.get(name)  # type: ignore[call-overload]
        if spec is None:
            return None
        own = spec.merge_method not in (None, self.merge_method)
        models = spec.models or (tuple(ModelEntry(m.model) for m in self.models) if own else self.models)
        shared = dict(spec.parameters) if own or spec.models else {**self.parameters, **spec.parameters}
        return ModuleSpec(spec.merge_method or self.merge_method, models, shared)

    @property
    def tokenizer_choice(self) -> str | None:
        """`tokenizer_source`, or the `tokenizer:` block's source."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def vocab_source(self) -> str:
        """The reference whose tokenizer and vocabulary the output starts from ("union" starts from the
        base model's, as mergekit does, and adds the other models' tokens)."""
        ts = self.tokenizer_choice
        if ts in (None, "target"):
            return self.target or self.base_model or self.models[0].model
        if ts == "base":
            if self.base_model is None:
                raise VlmMergeError("recipe tokenizer_source: 'base' but the recipe has no base_model")
            return self.base_model
        if ts == "union":
            return self.target or self.base_model or self.models[0].model
        return ts

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a recipe file's mapping (keys that are unset are left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        for key in ("vlm", "base_model", "target"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["models"] = [{"model": m.model, "parameters": dict(m.parameters)} for m in self.models]
        out["parameters"] = dict(self.parameters)
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.model_dump(mode="json", exclude_none=True)
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.text_config_from is not None:
            out["text_config_from"] = self.text_config_from
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        out["seed"] = self.seed
        if self.modules:
            out["modules"] = {name: {**({"merge_method": spec.merge_method} if spec.merge_method else {}),
                                     **({"models": [{"model": m.model, "parameters": dict(m.parameters)} for m in spec.models]}
                                        if spec.models else {}),
                                     "parameters": dict(spec.parameters)}
                              for name, spec in self.modules.items()}
        return out

    def to_yaml(self) -> str:
        """`to_dict` as YAML (the resolved `merge_recipe.yaml` a merge writes; evolve hashes it)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)


# The keys of a recipe file: Recipe's fields but the two that are not keys, and mergekit's `slices`.
NOT_KEYS = ("source_file", "layer_range")
RECIPE_KEYS = (*(k for k in Recipe.__dataclass_fields__ if k not in NOT_KEYS), "slices")
