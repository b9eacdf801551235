"""Reading a recipe: a mapping or YAML file validated into a `Recipe`, every problem one `VlmMergeError` line.

A pydantic `ValidationError` becomes `recipe FILE: models[1].parameters.weight: VALUE: what is wrong; what to
do`. mergekit's one-slice form (`slices:` with one slice whose sources all take the same layer range
[0, N), merged by a method) is read as the `models:` form, the range kept in `Recipe.layer_range` and
checked against the model when it is merged; any other `slices:` recipe (several slices, cut or stacked
layers, passthrough) is a layer-stacking `SlicesRecipe` (`vlm_merge.recipe.slices`). Relative model paths
are relative to the recipe file. mergekit's `modules:` form is read into ours: `modules.text_decoder`'s models
and parameters become the recipe's `models:` and `parameters:`, the vision-side modules stay `modules:`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import load_yaml
from vlm_merge.recipe.format import (
    NOT_KEYS,
    RECIPE_KEYS,
    SETTING_SHAPES,
    SETTING_TAGS,
    TEXT_DECODER,
    VISION_MODULES,
    VLM_REF,
    ModelEntry,
    ModelToken,
    ModuleSpec,
    Recipe,
    Slice,
)
from vlm_merge.recipe.slices import PASSTHROUGH, SLICES_KEYS, SlicesRecipe

_RECIPE = TypeAdapter(Recipe)
_SLICES = TypeAdapter(dict[str, list[Slice]])  # {"slices": …}: error paths start at slices
_STACK = TypeAdapter(SlicesRecipe)

# What to do, by pydantic error type (the error's own message says what is wrong).
UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
FIXES = {
    "extra_forbidden": "remove it or fix its spelling",
    "unexpected_keyword_argument": "remove it or fix its spelling",
    "dict_type": "write each condition as {filter: …, value: …} (a list is all numbers or all conditions)",
    "missing": "add it",
    "setting": "",
    "scalar": f"use {SETTING_SHAPES}",
    "too_short": "give at least one",
    "layer_range": "",
    "lengths": "",
    "regex": "fix the pattern (filter_regex is a Python regular expression; filter is a plain substring)",
    "dtype": "",
    "literal_error": "",
}
# What a missing key is for.
MISSING = {
    "merge_method": "e.g. task_arithmetic, ties, dare_ties, slerp",
    "models": "list the models to merge",
    "model": "give the model's path or Hugging Face id",
    "value": "each condition needs a value",
    "slices": "list the slices, each {sources: [{model: PATH, layer_range: [START, STOP]}]}",
    "sources": "list the slice's sources, each {model: PATH, layer_range: [START, STOP]}",
}
# Where a whole-recipe check points, by its error type.
WHOLE_RECIPE = {"both": "tokenizer", "no_vlm": "vlm"}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in SETTING_TAGS or "[" in str(part):
            continue  # a union member's tag, not a key
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_known(loc: tuple, known: tuple[str, ...]) -> str:
    parent = [p for p in loc[:-1] if not isinstance(p, int) and p not in SETTING_TAGS and "[" not in str(p)]
    if not parent:
        return f" (known: {', '.join(known)})"
    return {"models": " (known: model, parameters)", "parameters": "", "slices": " (known: sources, base_model, parameters)",
            "sources": " (known: model, layer_range, parameters)",
            **dict.fromkeys(VISION_MODULES, " (known: merge_method, models, parameters)")}.get(parent[-1], "")


def validation_line(error: ValidationError, where: str, known: tuple[str, ...] = RECIPE_KEYS) -> VlmMergeError:
    """One line for a recipe's validation error (an unknown key first, else the first): where, field path, value,
    what is wrong, what to do."""
    errors = error.errors(include_url=False)
    e = next((x for x in errors if x["type"] in UNKNOWN), errors[0])  # a misspelt key explains a missing one
    kind, loc = e["type"], tuple(e["loc"])
    path = _path(loc) or WHOLE_RECIPE.get(kind, "")
    prefix = f"{where}: {path}:" if path else f"{where}:"
    if kind in UNKNOWN:
        return VlmMergeError(f"{prefix} unknown key{_key_known(loc, known)}; {FIXES[kind]}")
    if kind == "missing" or (kind == "too_short" and loc and loc[-1] in MISSING):
        hint = MISSING.get(str(loc[-1]), FIXES[kind]) if loc else FIXES[kind]
        return VlmMergeError(f"{prefix} missing or empty; {hint}")
    msg = e["msg"].removeprefix("Value error, ")
    fix = FIXES.get(kind)
    value = "" if kind in WHOLE_RECIPE else f" {_short(e['input'])}:"
    return VlmMergeError(f"{prefix}{value} {msg}" + (f"; {fix}" if fix else ""))


def _one_slice(data: dict, where: str) -> Slice | None:
    """mergekit's `slices:` when it is the `models:` form: one slice taking the same layers [0, N) of every
    source, merged by a method (N is checked against the models when the recipe is planned); else None."""
    try:
        slices = _SLICES.validate_python({"slices": data["slices"]})["slices"]
    except ValidationError as e:
        raise validation_line(e, where) from None
    ranges = {s.layer_range for sl in slices for s in sl.sources}
    if len(slices) != 1 or len(ranges) != 1 or next(iter(ranges))[0] != 0 or data.get("merge_method") == PASSTHROUGH:
        return None
    return slices[0]


def _models_form(data: dict, sl: Slice) -> dict:
    """The one-slice recipe `data` as the `models:` form."""
    out = {k: v for k, v in data.items() if k != "slices"}
    out["models"] = [{"model": s.model, "parameters": dict(s.parameters)} for s in sl.sources]
    if sl.parameters:
        out["parameters"] = {**(data.get("parameters") or {}), **sl.parameters}
    if sl.base_model is not None:
        out["base_model"] = sl.base_model
    out["layer_range"] = sl.sources[0].layer_range
    return out


def _modules_form(data: dict, where: str) -> dict:
    """mergekit's `modules:` recipe in our form: `text_decoder` read into `models:` / `parameters:` (its
    `merge_method`, if given, must be the recipe's), the vision-side modules left in `modules:`, those that name
    their models with the top-level `parameters:` under their own (mergekit's precedence)."""
    modules = data["modules"]
    if not isinstance(modules, dict):
        raise VlmMergeError(f"{where}: modules: {_short(modules)}: expected a mapping of module name to "
                            f"{{models: …, parameters: …}}; use {', '.join((TEXT_DECODER, *VISION_MODULES))}")
    modules = {name: {} if spec is None else spec for name, spec in modules.items()}  # `vision_tower:` with nothing under it
    for name, spec in modules.items():
        if isinstance(spec, dict) and spec.get("slices") is not None:
            raise VlmMergeError(f"{where}: modules.{name}.slices: cutting or stacking a module's layers is not supported; "
                                "give the module's models: (every layer merged)")
    top = data.get("parameters") or {}
    out = {**data, "modules": {k: {**v, "parameters": {**top, **(v.get("parameters") or {})}}
                               if isinstance(v, dict) and v.get("models") is not None else v
                               for k, v in modules.items() if k != TEXT_DECODER}}
    if TEXT_DECODER not in modules:
        return out
    decoder = modules[TEXT_DECODER] or {}
    if not isinstance(decoder, dict) or set(decoder) - {"models", "parameters", "merge_method"}:
        raise VlmMergeError(f"{where}: modules.{TEXT_DECODER}: {_short(decoder)}: expected {{models: […], parameters: {{…}}}}")
    if data.get("models") is not None and decoder.get("models") is not None:
        raise VlmMergeError(f"{where}: modules.{TEXT_DECODER}.models: the recipe has models: too; give the language "
                            "model's models in one place")
    method = decoder.get("merge_method")
    if method is not None and data.get("merge_method") not in (None, method):
        raise VlmMergeError(f"{where}: modules.{TEXT_DECODER}.merge_method: {method!r} but the recipe's merge_method is "
                            f"{data.get('merge_method')!r}; the language model is merged by the recipe's merge_method")
    if method is not None:
        out["merge_method"] = method
    if decoder.get("models") is not None:
        out["models"] = decoder["models"]
    if decoder.get("parameters"):
        out["parameters"] = {**(data.get("parameters") or {}), **decoder["parameters"]}
    return out


def _stack(data: dict, source_file: Path | None, where: str) -> SlicesRecipe:
    """A layer-stacking recipe (`out_dtype`, as in mergekit, wins over `dtype`)."""
    for key in data:
        if key not in SLICES_KEYS:
            hint = "use tokenizer_source (a stack takes one source's vocabulary)" if key == "tokenizer" else "remove it"
            raise VlmMergeError(f"{where}: {key}: unknown key in a slices recipe (known: {', '.join(SLICES_KEYS)}); {hint}")
    fields = {k: v for k, v in data.items() if k != "out_dtype"}
    if data.get("out_dtype") is not None:
        fields["dtype"] = data["out_dtype"]
    try:
        return _STACK.validate_python({**fields, "source_file": source_file})
    except ValidationError as e:
        raise validation_line(e, where, SLICES_KEYS) from None


def recipe_from_dict(data: Any, source_file: Path | None = None) -> Recipe | SlicesRecipe:
    """Validate a recipe mapping (methods and parameter ranges are checked when it is planned); a `slices:`
    recipe that is not the `models:` form is a layer-stacking `SlicesRecipe`."""
    where = f"recipe {source_file}" if source_file is not None else "recipe"
    if not isinstance(data, dict):
        raise VlmMergeError(f"{where}: expected a mapping with merge_method and models, got {_short(data)}")
    if data.get("modules") is not None:
        data = _modules_form(data, where)
    for key in NOT_KEYS:
        if key in data:
            raise VlmMergeError(f"{where}: {key}: unknown key (known: {', '.join(RECIPE_KEYS)}); remove it")
    if "slices" in data:
        if data.get("models") is not None:
            raise VlmMergeError(f"{where}: slices: give either models: or slices:, not both (as in mergekit)")
        sl = _one_slice(data, where)
        if sl is None:
            return _stack(data, source_file, where)
        data = _models_form(data, sl)
    try:
        return _RECIPE.validate_python({**data, "source_file": source_file})
    except ValidationError as e:
        raise validation_line(e, where) from None


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file with `safe_load.load_yaml`'s checks; any problem is a one-line error naming `what`."""
    return load_yaml(path, what)


def load_recipe(path: str | Path) -> Recipe | SlicesRecipe:
    """Read a recipe (ours or mergekit's) from YAML. Relative model paths are relative to the file."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    recipe = recipe_from_dict(data, source_file=path)
    return rebase_paths(recipe, path.parent)


def _rebase(ref: str | None, base: Path) -> str | None:
    if ref is None or ref in (VLM_REF, "base", "target", "union"):
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = base / p
    return str(local.resolve()) if local.exists() else ref  # else: a Hugging Face id


def _rebase_stack(r: SlicesRecipe, base: Path) -> SlicesRecipe:
    def src(s):
        return s.model_copy(update={"model": _rebase(s.model, base) or s.model})

    slices = tuple(s.model_copy(update={"base_model": _rebase(s.base_model, base), "sources": [src(x) for x in s.sources]})
                   for s in r.slices)
    return replace(r, slices=slices, vlm=_rebase(r.vlm, base), base_model=_rebase(r.base_model, base),
                   edges_from=_rebase(r.edges_from, base), tokenizer_source=_rebase(r.tokenizer_source, base))


def rebase_paths(r: Recipe | SlicesRecipe, base: Path) -> Recipe | SlicesRecipe:
    """`r` with its local model paths made absolute, relative to `base` (the recipe file's folder)."""
    if isinstance(r, SlicesRecipe):
        return _rebase_stack(r, base)
    tok = r.tokenizer
    if tok is not None:
        tokens = {
            t: spec.model_copy(update={"source": spec.source.model_copy(update={"model": _rebase(spec.source.model, base)})
                                       if isinstance(spec.source, ModelToken) else _rebase(spec.source, base)
                                       if isinstance(spec.source, str) else spec.source})
            for t, spec in (tok.tokens or {}).items()
        }
        tok = tok.model_copy(update={"source": _rebase(tok.source, base), "tokens": tokens or tok.tokens})
    return Recipe(
        merge_method=r.merge_method,
        models=_rebase_models(r.models, base),
        base_model=_rebase(r.base_model, base),
        vlm=_rebase(r.vlm, base),
        target=_rebase(r.target, base),
        parameters=r.parameters,
        tokenizer_source=_rebase(r.tokenizer_source, base),
        tokenizer=tok,
        chat_template=r.chat_template,
        text_config_from=r.text_config_from,
        dtype=r.dtype,
        out_dtype=r.out_dtype,
        seed=r.seed,
        source_file=r.source_file,
        layer_range=r.layer_range,
        modules={name: ModuleSpec(spec.merge_method, _rebase_models(spec.models, base) if spec.models else None, spec.parameters)
                 for name, spec in r.modules.items()},
    )


def _rebase_models(models: tuple[ModelEntry, ...], base: Path) -> tuple[ModelEntry, ...]:
    return tuple(ModelEntry(_rebase(m.model, base) or m.model, m.parameters) for m in models)


RESOLVED_RECIPE = "merge_recipe.yaml"  # a merged model's replayable recipe, written beside its weights


def resolved_recipe_files(recipe_yaml: str) -> dict[str, str]:
    """The `RESOLVED_RECIPE` file a merge writes into its output: `recipe_yaml` under a header naming the version."""
    import vlm_merge

    return {RESOLVED_RECIPE: f"# vlm-merge {vlm_merge.__version__}: resolved recipe\n" + recipe_yaml}
