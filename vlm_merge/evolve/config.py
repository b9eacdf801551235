"""The evolve config (`vlm-merge evolve CONFIG.yaml`): one pydantic model per section, checked as a whole.

Each field is checked by its model: no coercion (a quoted "8" is not an integer, 1 is not true), numbers
finite, bounds and choices from the tables below, unknown keys refused. The rules across fields (a
searched parameter must be one of the method's, a metric a score column, ...) are the model's last check
(`EvolveConfig._consistent`). Whatever fails becomes one `VlmMergeError` line naming the config file, the
field path (`fitness.metric`), the value and what to do (`config_from_dict`). Paths in the config are
taken relative to the config file's directory (a relative one that does not exist there is a model id).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vlm_merge.errors import VlmMergeError
from vlm_merge.recipe import VLM_REF, read_yaml

SEPARATE_GROUPS = ("embeddings", "norms", "lm_head")
SUBSET_MODES = ("none", "random", "halving")
MAX_POPSIZE = 10_000  # candidates per generation; each is a merged model evaluated on the fitness set
FITNESS_KINDS = ("generate", "loglik")
# `genome.split_modules`: the module genes of a layer group and the `filter_regex` each one's tensors match
MODULE_SPLITS: dict[str, dict[str, str]] = {
    "none": {},
    "attention_mlp": {"attention": r"self_attn|input_layernorm", "mlp": r"mlp|post_attention_layernorm"},
    "projections": {"q": r"q_proj", "k": r"k_proj", "v": r"v_proj", "o": r"o_proj", "gate": r"gate_proj", "up": r"up_proj",
                    "down": r"down_proj", "attention_norm": r"input_layernorm", "mlp_norm": r"post_attention_layernorm"},
}
SEPARATE_FILTERS = {"embeddings": {"filter": "embed_tokens"}, "norms": {"filter_regex": r"norm\.weight$"}, "lm_head": {"filter": "lm_head"}}
SPACES = ("ps", "dfs", "ps+dfs")  # `space`: parameter space, or a layer route (`vlm_merge.evolve.dfs`)
DFS_POOL = ("target", "vlm", "ps")  # `dfs.pool` names
DFS_SCALES = ("transition", "position")  # `dfs.scales`
RECIPE_SUFFIXES = (".yaml", ".yml")  # a `dfs.ps_model` with one of these is a recipe, merged once into the run directory
DEFAULT_BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 0.1), "epsilon": (0.0, 0.1), "lambda": (0.5, 1.5)}


def config_error(where: str, msg: str) -> VlmMergeError:
    """The one-line error about field `where` of an evolve config."""
    return VlmMergeError(f"evolve config {where}: {msg}")


def _invalid(message: str, where: str = "") -> PydanticCustomError:
    """A rule that failed inside validation: `message` says what is wrong and what to do; `where` is the path
    below the field being checked (`.weight`), or from the top for a rule across fields."""
    return PydanticCustomError("evolve_config", "{message}", {"message": message, "where": where})


# ------------------------------------------------------------------------------------------------
# Field types


def _rebased(ref: str | None, info: ValidationInfo) -> str | None:
    """A path relative to the config's directory (validation context `base_dir`) made absolute if it exists
    there; otherwise as written (a Hugging Face id). `vlm` (the VLM's language model) stays."""
    base = (info.context or {}).get("base_dir")
    if ref is None or ref == VLM_REF or base is None:
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = Path(base) / p
    return str(local.resolve()) if local.exists() else ref


def _one_of(choices: tuple[str, ...]):
    """A check that a string is one of `choices`."""
    def check(v: str) -> str:
        if v not in choices:
            raise _invalid(f"{v!r} is not one of {', '.join(choices)}")
        return v
    return check


def _models_list(v: Any) -> Any:
    """`sources.models` is a non-empty YAML list."""
    if not isinstance(v, (list, tuple)) or not v:
        raise _invalid(f"expected a non-empty list of models, e.g. [vlm], got {_shown(v)}")
    return v


def _a_list(v: Any) -> Any:
    """A YAML list (not a string, a mapping or a set); left out (None): empty."""
    if v is not None and not isinstance(v, (list, tuple)):
        raise _invalid(f"expected a list, got {_shown(v)}")
    return () if v is None else v


def _a_method(v: str) -> str:
    """A registered merge method (`vlm_merge.methods.METHODS`)."""
    from vlm_merge.methods import METHODS

    return _one_of(tuple(METHODS))(v)


Integer = Annotated[int, Strict()]
Number = Annotated[float, Strict()]  # an int is taken as a float; NaN and inf are refused (`allow_inf_nan`)
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
PathRef = Annotated[str, Strict(), AfterValidator(_rebased)]
# cmaes.x0: one gene value for every gene, or real parameter values by parameter name (tags dropped from paths)
X0_TAGS = ("gene value", "by name")
GeneStart = Annotated[Annotated[Number, Tag(X0_TAGS[0])] | Annotated[dict[str, Number], Tag(X0_TAGS[1])],
                      Discriminator(lambda v: X0_TAGS[1] if isinstance(v, dict) else X0_TAGS[0])]


class _Section(BaseModel):
    """A config section: frozen, unknown keys refused, numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=())


def _mapping_or_empty(v: Any) -> Any:
    """A section left empty in YAML (`genome:`) is its defaults."""
    return {} if v is None else v


# ------------------------------------------------------------------------------------------------
# Sections


class SourcesConfig(_Section):
    """`sources:` the models whose parameters are searched ("vlm" = the VLM's language model) and the recipe's
    vlm / base_model / target / tokenizer_source."""

    models: Annotated[tuple[PathRef, ...], BeforeValidator(_models_list)]
    vlm: PathRef | None = None
    base_model: PathRef | None = None
    target: PathRef | None = None
    tokenizer_source: Text | None = None


class GenomeConfig(_Section):
    """`genome:` which parameters are searched within which bounds, at which granularity."""

    params: dict[str, tuple[Number, Number]] = Field(default_factory=lambda: {"weight": DEFAULT_BOUNDS["weight"]})
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_granularity: Integer = Field(1, ge=1)
    split_modules: Annotated[Text, AfterValidator(_one_of(tuple(MODULE_SPLITS)))] = "none"  # YAML true: attention_mlp
    separate: Annotated[tuple[Annotated[Text, AfterValidator(_one_of(SEPARATE_GROUPS))], ...], BeforeValidator(_a_list)] = ()
    drop_inert: Flag = True  # leave genes that cannot change the merge out of the search (`inert_genes`)

    @property
    def modules(self) -> tuple[str | None, ...]:
        """The module genes of each layer group (`MODULE_SPLITS`), or (None,): one gene for the whole group."""
        return tuple(MODULE_SPLITS[self.split_modules]) or (None,)

    @field_validator("params", mode="before")
    @classmethod
    def _bounds(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise _invalid(f"expected a mapping parameter -> [low, high], e.g. {{weight: [0, 1.5]}}, got {_shown(v)}")
        out = {}
        for k, b in v.items():
            if b is None and (b := DEFAULT_BOUNDS.get(k)) is None:
                raise _invalid("no default bounds; give [low, high]", f".{k}")
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise _invalid(f"expected [low, high], got {_shown(b)}", f".{k}")
            out[k] = b
        return out

    @field_validator("params")
    @classmethod
    def _low_below_high(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for k, (lo, hi) in v.items():
            if not lo < hi:
                raise _invalid(f"low {lo:g} must be below high {hi:g}", f".{k}")
        return v

    @field_validator("split_modules", mode="before")
    @classmethod
    def _split_flag(cls, v: Any) -> Any:
        return {True: "attention_mlp", False: "none"}[v] if isinstance(v, bool) else v


class SubsetConfig(_Section):
    """`fitness.subset:` score a generation on some of the questions (a random draw, or successive halving)."""

    mode: Annotated[Text, AfterValidator(_one_of(SUBSET_MODES))] = "none"
    size: Integer = Field(0, ge=0)
    eta: Integer = Field(2, ge=2)


class FitnessConfig(_Section):
    """`fitness:` the questions a candidate is scored on and how (generated answers or log-likelihood)."""

    benchmark: PathRef
    data: PathRef | None = None
    split: Text | None = None
    kind: Annotated[Text, AfterValidator(_one_of(FITNESS_KINDS))] = "generate"
    protocol: Text = "llm-jp"
    template: Text | None = None
    max_new_tokens: Integer | None = Field(None, ge=1)
    num_beams: Integer | None = Field(None, ge=1)
    repetition_penalty: Number | None = None
    metrics: dict[str, Number] = Field(default_factory=lambda: {"rougeL": 1.0})
    limit: Integer | None = Field(None, ge=1)
    subset: Annotated[SubsetConfig, BeforeValidator(_mapping_or_empty)] = Field(default_factory=SubsetConfig)
    penalty: Number = -1e6
    batch_size: Integer = Field(8, ge=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise _invalid(f"expected a mapping score column -> weight, e.g. {{rougeL: 1.0}}, got {_shown(v)}")
        return v


class TestConfig(_Section):
    """`test:` the held-out report written after the search (see `vlm_merge.evolve.report.held_out_report`)."""

    benchmark: PathRef
    data: PathRef | None = None
    split: Text | None = None
    limit: Integer | None = Field(None, ge=1)
    metric: Text = "rougeL"  # the score column compared, per question, with a paired bootstrap
    chat_vector_scale: Number = 1.0  # the Chat Vector model reported beside the best one


class CmaConfig(_Section):
    """`cmaes:` the search: population, step size, start, budget, seed."""

    popsize: Integer | None = Field(None, ge=2, le=MAX_POPSIZE)
    sigma0: Number = Field(0.2, ge=1e-6)
    x0: GeneStart = 0.5
    max_evaluations: Integer = Field(32, ge=1)
    seed: Integer = 0

    @field_validator("x0")
    @classmethod
    def _gene_value(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        if not isinstance(v, dict) and not 0 <= v <= 1:
            raise _invalid(f"{v!r}: a gene value must lie in [0, 1] (or give real values by parameter name)")
        return v


class DfsConfig(_Section):
    """`dfs:` a layer-route search (`space: dfs | ps+dfs`; `vlm_merge.evolve.dfs` says what each key does)."""

    pool: Annotated[tuple[Annotated[Text, AfterValidator(_one_of(DFS_POOL))], ...], Field(min_length=1)] = ("target", "vlm")
    ps_model: PathRef | None = None
    repeats: Integer = Field(2, ge=1, le=16)
    scales: Annotated[Text, AfterValidator(_one_of(DFS_SCALES))] = "transition"
    scale_bounds: tuple[Number, Number] = (0.5, 1.5)
    max_depth: Integer | None = Field(None, ge=1)
    init: Text | None = None  # None: the pool's first model

    @model_validator(mode="after")
    def _consistent(self) -> DfsConfig:
        if len(set(self.pool)) != len(self.pool):
            raise _invalid(f"{list(self.pool)!r}: name each model once", ".pool")
        lo, hi = self.scale_bounds
        if not 0 < lo < hi:
            raise _invalid(f"{[lo, hi]!r}: give [low, high] with 0 < low < high", ".scale_bounds")
        if self.init is not None and self.init not in self.pool:
            raise _invalid(f"{self.init!r} is not in the pool {list(self.pool)}", ".init")
        if ("ps" in self.pool) != (self.ps_model is not None):
            raise _invalid("the pool names 'ps' exactly when ps_model (the PS model's directory or recipe) is set", ".ps_model")
        if self.ps_model is not None and Path(self.ps_model).suffix in RECIPE_SUFFIXES:  # read now, merged by the run
            from vlm_merge.recipe import load_recipe

            try:
                load_recipe(self.ps_model)
            except VlmMergeError as e:
                raise _invalid(f"not a readable recipe ({e}); give a recipe YAML (e.g. a PS run's best_recipe.yaml) or a "
                               "merged model's directory", ".ps_model") from None
        return self


class EvolveConfig(_Section):
    """A whole evolve config (the run's `config.yaml`); see the `vlm_merge.evolve` docstring for what each part does."""

    sources: Annotated[SourcesConfig, BeforeValidator(_mapping_or_empty)]
    fitness: Annotated[FitnessConfig, BeforeValidator(_mapping_or_empty)]
    method: Annotated[Text, AfterValidator(_a_method)] = "task_arithmetic"
    genome: Annotated[GenomeConfig, BeforeValidator(_mapping_or_empty)] = Field(default_factory=GenomeConfig)
    cmaes: Annotated[CmaConfig, BeforeValidator(_mapping_or_empty)] = Field(default_factory=CmaConfig)
    test: TestConfig | None = None
    dtype: Text | None = None  # output dtype of the merged language model (recipe `dtype`)
    device: Text = "auto"
    model_dtype: Text = "auto"  # dtype the live model is loaded in (auto: float32 on CPU, protocol's on GPU)
    threads: Integer | None = Field(None, ge=1)  # torch threads in each evaluating process (None: torch's default)
    workers: Integer = Field(0, ge=0)  # Ray actors; 0 = evaluate in this process
    recipe_seed: Integer = 0  # `seed` of every decoded recipe (DARE / DELLA masks)
    space: Annotated[Text, AfterValidator(_one_of(SPACES))] = "ps"  # ps: parameter space; dfs / ps+dfs: a layer route
    dfs: DfsConfig | None = None  # space dfs / ps+dfs: the route's genome (defaults when left out)

    @model_validator(mode="before")
    @classmethod
    def _dfs_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("space", "ps") != "ps" and data.get("dfs") is None:
            return {**data, "dfs": {}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EvolveConfig:
        _check_rules(self)
        return self

    def to_dict(self) -> dict:
        """The config as plain YAML/JSON data (lists, not tuples), in field order."""
        def clean(v):
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        d = clean(self.model_dump())
        if self.space == "ps" and self.dfs is None:  # a parameter-space run's config (and hash) as before DFS
            del d["space"], d["dfs"]
        return d

    def to_yaml(self) -> str:
        """The config as the run's `config.yaml`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        """Hash of everything results depend on (`workers` only changes where candidates run)."""
        d = self.to_dict()
        d.pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check_rules(cfg: EvolveConfig) -> None:
    """The rules across fields: searched and fixed parameters belong to the method and fit its ranges, metrics are
    score columns of the fitness kind, the sources the report and `vlm` need are set."""
    from vlm_merge.methods import METHODS

    method = METHODS[cfg.method]
    for name, (lo, hi) in cfg.genome.params.items():
        try:
            p = method.param(name)
        except KeyError:
            floats = [q.name for q in method.params if q.kind == "float"]
            raise _invalid(f"is not a parameter of {cfg.method} (searchable: {', '.join(floats)})", f"genome.params.{name}") from None
        if p.kind != "float":
            raise _invalid(f"is a {p.kind} parameter; only numbers can be searched (use genome.fixed)", f"genome.params.{name}")
        for v in (lo, hi):
            try:
                p.check(v)
            except ValueError as e:
                raise _invalid(f"bound {e}", f"genome.params.{name}") from None
        if name in cfg.genome.fixed:
            raise _invalid("is also searched in genome.params; keep one", f"genome.fixed.{name}")
    for name, value in cfg.genome.fixed.items():
        try:
            method.param(name).check(value)
        except KeyError:
            raise _invalid(f"is not a parameter of {cfg.method} (known: {', '.join(q.name for q in method.params)})",
                           f"genome.fixed.{name}") from None
        except ValueError as e:
            raise _invalid(str(e), f"genome.fixed.{name}") from None
    if cfg.fitness.kind == "generate":
        unknown = [c for c in cfg.fitness.metrics if c not in score_columns()]
        if unknown:
            raise _invalid(f"not a score column (known: {', '.join(score_columns())})", f"fitness.metrics.{unknown[0]}")
    elif set(cfg.fitness.metrics) != {"loglik"}:
        raise _invalid("kind loglik has the one column 'loglik'; use metrics: {loglik: 1.0}", "fitness.metrics")
    if VLM_REF in cfg.sources.models and cfg.sources.vlm is None:
        raise _invalid("names 'vlm' but sources.vlm is not set", "sources.models")
    if cfg.space == "ps" and cfg.dfs is not None:
        raise _invalid("is set but space is ps; set space: dfs or ps+dfs, or remove dfs", "dfs")
    if cfg.fitness.subset.mode != "none" and cfg.fitness.subset.size < 1:
        raise _invalid(f"mode {cfg.fitness.subset.mode} needs a size of at least 1", "fitness.subset.size")
    if cfg.test is not None:
        missing = [k for k in ("vlm", "base_model", "target") if getattr(cfg.sources, k) is None]
        if missing:
            raise _invalid(f"the report compares with Chat Vector and the controls: set sources.{missing[0]}", "test")
        if cfg.test.metric not in score_columns():
            raise _invalid(f"{cfg.test.metric!r} is not a score column (known: {', '.join(score_columns())})", "test.metric")
    if isinstance(cfg.cmaes.x0, dict):
        for k in cfg.cmaes.x0:
            if k not in cfg.genome.params:
                raise _invalid(f"is not searched (genome.params: {', '.join(cfg.genome.params)})", f"cmaes.x0.{k}")


# ------------------------------------------------------------------------------------------------
# Reading a config; a validation error as one line

# the section model at each path (an unknown key's message lists that section's keys)
SECTIONS: dict[tuple[str, ...], type[_Section]] = {
    (): EvolveConfig, ("sources",): SourcesConfig, ("genome",): GenomeConfig, ("fitness",): FitnessConfig,
    ("fitness", "subset"): SubsetConfig, ("cmaes",): CmaConfig, ("test",): TestConfig, ("dfs",): DfsConfig,
}
# pydantic's error type -> what the line says ({value}: the value shown; other names: the error's context)
MESSAGES = {
    "missing": "a required key is missing; add it",
    "extra_forbidden": "unknown key; remove it or correct its spelling (known: {known})",
    "int_type": "expected an integer, got {value}",
    "float_type": "expected a number, got {value}",
    "finite_number": "expected a finite number, got {value}",
    "string_type": "expected a string, got {value}",
    "bool_type": "expected true or false, got {value}",
    "model_type": "expected a mapping, got {value}",
    "dict_type": "expected a mapping, got {value}",
    "tuple_type": "expected a list, got {value}",
    "too_short": "expected at least {min_length} item(s), got {value}",
    "too_long": "expected at most {max_length} item(s), got {value}",
    "greater_than_equal": "{value} is below {ge:g}; give at least {ge:g}",
    "less_than_equal": "{value} is above {le:g}; give at most {le:g}",
    "union_tag_invalid": "expected a number or a mapping, got {value}",
}


def _shown(value: Any, width: int = 80) -> str:
    """`value` as the error line shows it: its repr, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _path(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location as a field path: `genome.params.weight[0]`."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in X0_TAGS and loc[:i] == ("cmaes", "x0"):
            continue  # the union member pydantic tried, not a key
        elif part != "[key]":
            out += f".{part}"
    return out.lstrip(".")


def _error_line(err: dict, source: str) -> str:
    """One pydantic error (of `ValidationError.errors()`) as the one-line message about `source`."""
    loc, ctx = tuple(err["loc"]), err.get("ctx") or {}
    path = _path(loc)
    if err["type"] == "evolve_config":
        path, message = (path + ctx["where"] if ctx["where"].startswith(".") else ctx["where"] or path), ctx["message"]
    elif err["type"] in MESSAGES:
        known = ", ".join(SECTIONS.get(tuple(p for p in loc[:-1] if isinstance(p, str)), EvolveConfig).model_fields)
        message = MESSAGES[err["type"]].format(value=_shown(err.get("input")), known=known, **ctx)
    else:  # a check without a message of ours: pydantic's own words
        message = f"{err['msg']}, got {_shown(err.get('input'))}"
    return f"{source} {path or 'top level'}: {message}"


def config_from_dict(data: Any, base_dir: str | Path | None = None, *, source: str | Path | None = None) -> EvolveConfig:
    """Validate an evolve config mapping; relative paths are taken relative to `base_dir`. `source`: the file it
    was read from, named in the error line."""
    where = "evolve config" + (f" {source}:" if source is not None else "")
    if not isinstance(data, dict):
        raise VlmMergeError(f"{where} top level: expected a mapping with sources, method, genome, fitness, cmaes")
    try:
        return EvolveConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        errors = e.errors(include_url=False)  # the line names one: an unknown key first (a typo explains a missing one)
        first = next((err for err in errors if err["type"] == "extra_forbidden"), errors[0])
        raise VlmMergeError(_error_line(first, where)) from None


def load_config(path: str | Path) -> EvolveConfig:
    """The evolve config in YAML file `path`."""
    path = Path(path)
    return config_from_dict(read_yaml(path, "evolve config"), path.parent, source=path)


def as_config(config: EvolveConfig | dict | str | Path) -> EvolveConfig:
    """`config` as an `EvolveConfig`: itself, a mapping validated, or a YAML file read."""
    if isinstance(config, EvolveConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def score_columns() -> dict[str, str]:
    """Each score column a generated-answer fitness or test metric may name -> the scorer that writes it."""
    from eval.metrics import all_scorers

    return {c: name for name, cls in all_scorers().items() for c in cls.fields}


def held_out_fitness(cfg: EvolveConfig) -> FitnessConfig:
    """The `test:` split as a fitness config: generated answers under the fitness protocol, one metric."""
    t = cfg.test
    assert t is not None
    return cfg.fitness.model_copy(update={"benchmark": t.benchmark, "data": t.data, "split": t.split, "limit": t.limit,
                                          "kind": "generate", "metrics": {t.metric: 1.0}, "subset": SubsetConfig()})


def config_inputs(cfg: EvolveConfig, config: object = None) -> list[str]:
    """The paths an evolve run reads (its config file, sources, data): its run dir may not overlap them."""
    src = cfg.sources
    test = [cfg.test.benchmark, cfg.test.data] if cfg.test is not None else []
    ps = [cfg.dfs.ps_model] if cfg.dfs is not None else []
    paths = [*src.models, src.vlm, src.base_model, src.target, src.tokenizer_source, cfg.fitness.benchmark,
             cfg.fitness.data, *test, *ps, config if isinstance(config, (str, Path)) else None]
    return [str(p) for p in paths if p]
