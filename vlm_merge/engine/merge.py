"""Running a recipe: resolve every parameter for every tensor, then merge through the engine.

`plan_recipe` opens and aligns the sources, checks the method, parameters and layer lists before any
tensor is read, and yields a `RecipePlan`; `merge` writes the model with its resolved recipe
(`merge_recipe.yaml`, every default written out) and a model card; `validate` is the dry run behind
`vlm-merge validate`. A layer-stacking `slices:` recipe (`SlicesRecipe`) is handed to
`vlm_merge.engine.stacking` by `merge` and `validate`.

Two or more VLMs of one family merge whole: their language models as any source's, and each vision-side module
the recipe lists under `modules:` (`vision_tower`, `multi_modal_projector` with LLaVA-NeXT's `image_newline`)
per tensor by its own method and parameters (`plan_modules`), a per-layer list spread over the vision tower's
own layers; a module not listed is copied from the VLM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import ValidationError

from vlm_merge.architecture.anatomy import PROJECTOR, VISION, layer_index, lm_role
from vlm_merge.engine.backbone import VLM, BackbonePlan, Sources, open_sources, plan_backbone, write_backbone
from vlm_merge.io.card import model_card
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, dtype_from_name
from vlm_merge.engine.streaming import Copy, Merge
from vlm_merge.errors import VlmMergeError
from vlm_merge.methods import METHODS, Method, tensor_seed
from vlm_merge.io.outputs import prepare_output_dir
from vlm_merge.architecture.vocab import ZERO, TokenSource
from vlm_merge.recipe import (
    RESOLVED_RECIPE,
    Recipe,
    SlicesRecipe,
    load_recipe,
    recipe_from_dict,
    resolve_setting,
    resolved_recipe_files,
)
from vlm_merge.engine.stacking import StackValidation, merge_slices, validate_slices
from vlm_merge.engine.modules import module_keys, vision_layers
from vlm_merge.recipe.format import ModelToken, ModuleSpec, ZeroToken
from vlm_merge.recipe.load import validation_line

UNION = "union"
# Chat templates a recipe may name (mergekit names a few; others are pasted as Jinja).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


@dataclass(frozen=True)
class TensorParams:
    """The parameters one tensor is merged with."""

    per_model: tuple[dict, ...]
    shared: dict


@dataclass
class RecipePlan:
    """A recipe planned against its sources: the resolved recipe, the method, every tensor's parameters and the backbone plan."""

    recipe: Recipe  # resolved: absolute sources, defaults written out
    method: Method
    sources: Sources
    backbone: BackbonePlan
    params: dict[str, TensorParams]  # canonical key -> parameters
    base_role: str | None
    model_roles: tuple[str, ...]
    anchor_role: str | None
    modules: dict[str, ModulePlan] | None = None  # merged vision-side modules by name


@dataclass(frozen=True)
class ModulePlan:
    """One vision-side module merged: its method, sources and every tensor's parameters, by the VLM's key."""

    name: str
    method: Method
    keys: dict[str, dict[str, str]]  # the VLM's key -> role -> that role's key
    params: dict[str, TensorParams]  # the VLM's key -> parameters
    base_role: str | None
    model_roles: tuple[str, ...]
    anchor_role: None = None  # `target` is the language model's


def _method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise VlmMergeError(f"recipe merge_method: {name!r} is not a method (known: {', '.join(METHODS)})") from None


def model_entries(recipe: Recipe, method: Method) -> list[int]:
    """Indices of `recipe.models` that enter the method, in order (base first for base-less methods)."""
    idx = list(range(len(recipe.models)))
    if recipe.base_model is None:
        return idx
    base_pos = [i for i in idx if recipe.models[i].model == recipe.base_model]
    if method.uses_base:  # the base is not a task vector (mergekit skips it too)
        return [i for i in idx if i not in base_pos]
    return base_pos[:1] + [i for i in idx if i not in base_pos[:1]]


def resolve_tensor_params(
    recipe: Recipe, method: Method, entries: list[int], canon: str, num_layers: int, memo: dict | None = None,
) -> TensorParams:  # fmt: skip
    """The parameters `canon` is merged with. `memo` (a dict kept for one recipe) reuses the validated
    result for tensors whose raw values repeat (every tensor of a layer, in a per-layer recipe)."""
    return _resolve_params(recipe, method, entries, canon, layer_index(canon), num_layers, memo)


def _resolve_params(
    recipe: Recipe, method: Method, entries: list[int], canon: str, layer: int | None, num_layers: int, memo: dict | None,
) -> TensorParams:  # fmt: skip
    """`resolve_tensor_params` for a tensor at `layer` (None: outside the layers) of `num_layers`."""
    per_model = []
    for i in entries:
        m = recipe.models[i]
        per_model.append({k: resolve_setting(v, canon, layer, num_layers) for k, v in m.parameters.items()})
    shared = {k: resolve_setting(v, canon, layer, num_layers) for k, v in recipe.parameters.items()}
    per_model = [{k: v for k, v in pm.items() if v is not None} for pm in per_model]
    shared = {k: v for k, v in shared.items() if v is not None}
    key = None
    if memo is not None:
        key = (tuple(tuple(pm.items()) for pm in per_model), tuple(shared.items()))
        if key in memo:
            return memo[key]
    try:
        resolved_models, resolved_shared = method.resolve(per_model, shared)
    except ValueError as e:
        raise VlmMergeError(f"recipe parameters for {canon}: {e}") from None
    params = TensorParams(tuple(resolved_models), resolved_shared)
    if memo is not None:
        memo[key] = params
    return params


def tensor_fn(rp: RecipePlan | ModulePlan, canon: str, seed: int):
    """The merge function of one tensor (`canon`: its key in `rp.params`) over role-named inputs, its parameters
    bound once."""
    method, params = rp.method, rp.params[canon]
    base_role, model_roles, anchor_role = rp.base_role, rp.model_roles, rp.anchor_role
    bound = method.bind(
        list(params.per_model), params.shared,
        seed=tensor_seed(seed, canon) if method.random else None, anchored=anchor_role is not None,
    )

    def fn(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return bound(
            t[base_role] if base_role is not None else None,
            [t[r] for r in model_roles],
            t[anchor_role] if anchor_role is not None else None,
        )

    return fn


def check_layer_range(recipe: Recipe, num_layers: int) -> None:
    """mergekit's one-slice form must take every layer: [0, num_layers)."""
    if recipe.layer_range is not None and tuple(recipe.layer_range) != (0, num_layers):
        start, stop = recipe.layer_range
        raise VlmMergeError(
            f"recipe slices: layer_range [{start}, {stop}] but the models have {num_layers} layers; use [0, {num_layers}] "
            "(cutting or stacking layers, passthrough, is not supported)"
        )


def token_sources(recipe: Recipe, sources: Sources) -> dict[str, TokenSource] | None:
    """mergekit's `tokenizer.tokens` as rows of the sources: a model's row of the token itself (`source: MODEL`),
    of another token or id (`kind: model_token`), or zeros (`kind: zero`)."""
    tok = recipe.tokenizer
    if tok is None or not tok.tokens:
        return None
    roles = [*([VLM] if sources.vlm is not None else []), *sources.models]
    out = {}
    for token, spec in tok.tokens.items():
        where = f"recipe tokenizer.tokens.{token}.source"
        src = spec.source
        if src is None:
            raise VlmMergeError(f"{where}: missing; give a model, {{kind: model_token, model: …, token: …}} or {{kind: zero}}")
        if isinstance(src, ZeroToken):
            out[token] = TokenSource(ZERO, None, spec.force)
            continue
        model = src.model if isinstance(src, ModelToken) else src
        if model not in roles:
            raise VlmMergeError(f"{where}: {model!r} is not a model of the recipe (its models: {', '.join(roles)})")
        side = sources.source(model).vocab
        vocab = side.vocab or {}
        want = src.token if isinstance(src, ModelToken) and src.token is not None else token
        row = src.token_id if isinstance(src, ModelToken) and src.token_id is not None else vocab.get(want)
        if row is None or not 0 <= row < side.rows:
            raise VlmMergeError(f"{where}: {model} has no row for {want if row is None else row!r}; use a token it has")
        out[token] = TokenSource(model, row, spec.force)
    return out


def plan_modules(recipe: Recipe, sources: Sources) -> dict[str, ModulePlan]:
    """Every vision-side module the recipe merges, checked against its sources (no tensor data read)."""
    plans = {}
    for name in recipe.modules:
        spec: ModuleSpec = recipe.module(name)  # type: ignore[assignment]
        method = _method(spec.merge_method)  # type: ignore[arg-type]
        if method.needs_base and recipe.base_model is None:
            raise VlmMergeError(f"recipe modules.{name}.merge_method: {method.name} takes task vectors against a base "
                                "model; add base_model (a VLM of the family)")
        sub = replace(recipe, merge_method=method.name, models=spec.models, parameters=spec.parameters, modules={}, target=None)
        entries = model_entries(sub, method)
        base_role = recipe.base_model if method.uses_base else None
        model_roles = tuple(sub.models[i].model for i in entries)
        keys = module_keys(name, sources, [*([base_role] if base_role else []), *model_roles])
        names, layers, num_layers = vision_layers(sources.vlm.anatomy, keys)  # type: ignore[union-attr]
        memo: dict = {}
        try:
            params = {k: _resolve_params(sub, method, entries, names[k], layers[k], num_layers, memo) for k in keys}
        except VlmMergeError as e:
            raise VlmMergeError(str(e).replace("recipe parameters", f"recipe modules.{name}.parameters", 1)) from None
        plans[name] = ModulePlan(name, method, keys, params, base_role, model_roles)
    return plans


def chat_template_text(choice: str | None, sources: Sources) -> str | None:
    """The output's chat template for the recipe's `chat_template` (None: the default, the VLM's or the target
    tokenizer's): a Jinja template as given; "auto": the template most of the sources' tokenizers have (mergekit's
    rule); "chatml": ChatML."""
    if choice is None:
        return None
    if choice == "auto":
        found = [t.strip() for src in [*([sources.vlm] if sources.vlm else []), *sources.models.values()] if isinstance(t := getattr(src.tokenizer, "chat_template", None), str) and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    if choice in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[choice]
    if "{" not in choice:
        raise VlmMergeError(f"recipe chat_template: {choice!r} is not a Jinja template; use auto, "
                            f"{', '.join(CHAT_TEMPLATES)} or paste the template")
    return choice


def as_recipe(recipe: Recipe | SlicesRecipe | dict | str | Path) -> Recipe | SlicesRecipe:
    """`recipe` itself, a mapping validated, or a YAML file read."""
    if isinstance(recipe, (Recipe, SlicesRecipe)):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def plan_recipe(
    recipe: Recipe | dict | str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    text_config_from: str | None = None,
) -> RecipePlan:
    """Check a recipe against its sources and resolve every tensor's parameters (no tensor data read).

    `text_config_from` ("vlm" or "target") overrides the recipe's: whose function-changing text config
    fields (RoPE, sliding window, …; `vlm_merge.engine.model_files.FUNCTION_FIELDS`) the output has."""
    recipe = as_recipe(recipe)
    if isinstance(recipe, SlicesRecipe):
        raise VlmMergeError("recipe slices: a layer-stacking recipe is merged as a whole (merge / validate), "
                            "not planned tensor by tensor; give a models: recipe")
    if text_config_from is not None:
        try:
            recipe = replace(recipe, text_config_from=text_config_from)
        except ValidationError as e:
            raise validation_line(e, "text_config_from") from None
    method = _method(recipe.merge_method)
    if method.needs_base and recipe.base_model is None:
        raise VlmMergeError(f"recipe base_model: missing; {method.name} takes task vectors against a base model")
    if recipe.target is not None and not method.supports_anchor:
        raise VlmMergeError(f"recipe target: {method.name} cannot start from a target model; remove target or use a task-vector method")
    vocab_ref = recipe.vocab_source
    if vocab_ref == VLM:
        raise VlmMergeError("recipe tokenizer_source/target: must be a language model (e.g. the Japanese base), not the VLM")
    entries = model_entries(recipe, method)
    llm_refs = {r: r for r in recipe.refs() if r != VLM}
    out_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    if out_dtype is None and (recipe.out_dtype or recipe.dtype) is not None:
        out_dtype = dtype_from_name(recipe.out_dtype or recipe.dtype)  # mergekit: out_dtype, else dtype
    sources = open_sources(
        recipe.vlm, llm_refs, vocab_ref, vision_tower=vision_tower, cache_dir=cache_dir, trust_remote_code=trust_remote_code
    )
    try:
        num_layers = sources.reference.anatomy.num_layers
        check_layer_range(recipe, num_layers)
        canon_keys = list(sources.alignments[vocab_ref].pairs)
        params = {c: resolve_tensor_params(recipe, method, entries, c, num_layers) for c in canon_keys}
        base_role = recipe.base_model if method.uses_base else None
        anchor_role = recipe.target if recipe.target is not None else None
        model_roles = tuple(recipe.models[i].model for i in entries)
        used = [r for r in dict.fromkeys([vocab_ref, *([base_role] if base_role else []), *([anchor_role] if anchor_role else []), *model_roles])]
        if recipe.text_config_from == VLM and sources.vlm is None:
            raise VlmMergeError("recipe text_config_from: 'vlm' but the recipe names no vlm; use target")
        resolved = _resolved_recipe(recipe, method, sources, out_dtype)
        rp = RecipePlan(resolved, method, sources, None, params, base_role, model_roles, anchor_role)  # type: ignore[arg-type]

        def rule(canon: str):
            return tensor_fn(rp, canon, recipe.seed)

        rp.modules = plan_modules(recipe, sources)
        by_key = {k: mp for mp in rp.modules.values() for k in mp.keys}

        def module_rule(key: str):
            mp = by_key.get(key)
            return None if mp is None else (mp.keys[key], tensor_fn(mp, key, recipe.seed), mp.method.elementwise)

        tok = recipe.tokenizer
        rp.backbone = plan_backbone(sources, rule, used, out_dtype, elementwise=method.elementwise,
                                    text_config_from=resolved.text_config_from or VLM, union=recipe.tokenizer_choice == UNION,
                                    pad_to_multiple_of=tok.pad_to_multiple_of if tok is not None else None,
                                    token_sources=token_sources(recipe, sources), module_rule=module_rule)
        rp.backbone.chat_template = chat_template_text(recipe.chat_template, sources)
        return rp
    except BaseException:
        sources.close()
        raise


def _resolved_recipe(recipe: Recipe, method: Method, sources: Sources, out_dtype: torch.dtype | None) -> Recipe:
    """The recipe with absolute source paths and every parameter default written out."""

    def path_of(ref: str | None) -> str | None:
        if ref is None or ref == VLM:
            return ref
        return str(sources.source(ref).reader.path)

    def with_defaults(method: Method, entries: tuple, shared: dict) -> tuple[tuple, dict]:
        models = []
        for m in entries:
            params = dict(m.parameters)
            for p in method.params:
                if p.per_model and p.name not in params and p.name not in shared and not p.required:
                    params[p.name] = p.default
            models.append(replace(m, model=path_of(m.model) or m.model, parameters=params))
        shared = dict(shared)
        for p in method.params:
            if not p.per_model and p.name not in shared and not p.required:
                shared[p.name] = p.default
        return tuple(models), shared

    models, shared = with_defaults(method, recipe.models, recipe.parameters)
    modules = {}
    for name in recipe.modules:
        spec: ModuleSpec = recipe.module(name)  # type: ignore[assignment]
        mod_models, mod_shared = with_defaults(METHODS[spec.merge_method], spec.models, spec.parameters)  # type: ignore[index,arg-type]
        modules[name] = ModuleSpec(spec.merge_method, mod_models, mod_shared)
    dtype_name = str(out_dtype).removeprefix("torch.") if out_dtype is not None else None
    resolved_source = UNION if recipe.tokenizer_choice == UNION else path_of(recipe.vocab_source)
    return replace(
        recipe,
        models=models,
        modules=modules,
        vlm=str(sources.vlm.reader.path) if sources.vlm is not None else None,
        base_model=path_of(recipe.base_model),
        target=path_of(recipe.target),
        tokenizer_source=None if recipe.tokenizer is not None else UNION if recipe.tokenizer_choice == UNION else path_of(recipe.vocab_source),
        tokenizer=recipe.tokenizer.model_copy(update={"source": resolved_source}) if recipe.tokenizer is not None else None,
        text_config_from=recipe.text_config_from or (VLM if sources.vlm is not None else "target"),
        parameters=shared,
        dtype=dtype_name,
        out_dtype=None,  # dtype is the output's
        layer_range=None,  # checked: every layer
    )


def _with_text_config(recipe: SlicesRecipe, text_config_from: str | None) -> SlicesRecipe:
    try:
        return recipe if text_config_from is None else replace(recipe, text_config_from=text_config_from)
    except ValidationError as e:
        raise validation_line(e, "text_config_from") from None


def merge(
    recipe: Recipe | SlicesRecipe | dict | str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    vision_tower: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    card_title: str | None = None,
    text_config_from: str | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Merge by `recipe` and write the model (and `merge_recipe.yaml`) to `out`; returns `out`.

    `device="cuda"` runs each tensor's arithmetic on the GPU (inputs are still streamed from disk).
    A merged tensor with NaN/inf values in the output dtype is an error unless `allow_nonfinite`.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise VlmMergeError(f"--device {device!r}: use cpu or cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise VlmMergeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    recipe_file = recipe if isinstance(recipe, (str, Path)) else None
    recipe = as_recipe(recipe)
    if isinstance(recipe, SlicesRecipe):  # layer stacking
        return merge_slices(_with_text_config(recipe, text_config_from), out, dtype=dtype, device=device, force=force,
                            max_shard_bytes=max_shard_bytes, cache_dir=cache_dir, progress=progress,
                            trust_remote_code=trust_remote_code, allow_nonfinite=allow_nonfinite, recipe_file=recipe_file,
                            vision_tower=vision_tower)
    prepare_output_dir(out, force, [recipe_file])
    rp = plan_recipe(recipe, dtype=dtype, vision_tower=vision_tower, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                     text_config_from=text_config_from)
    try:
        bp = rp.backbone
        bp.plan.device = device
        bp.plan.allow_nonfinite = allow_nonfinite
        r = rp.recipe
        sources = {k: v for k, v in (("vlm", r.vlm), ("base_model", r.base_model), ("target", r.target)) if v}
        sources.update({f"models[{i}]": m.model for i, m in enumerate(r.models)})
        details = [
            f"output layout: {bp.output_layout}; language-model tensors merged {bp.summary['merged']}, "
            f"kept {bp.summary['kept']}, copied {bp.summary['copied']}",
            *([f"vision-side modules merged: {', '.join(f'{n} ({mp.method.name})' for n, mp in rp.modules.items())}, "
               f"{bp.summary['modules']} tensors"] if rp.modules else []),
            f"replay: `vlm-merge merge {RESOLVED_RECIPE} OUT`",
        ]
        if bp.vocab is not None:
            details.append("vocabulary: " + bp.vocab.summary())
        details += bp.card_details()
        title = card_title or f"{r.merge_method} merge"
        card = model_card(title, r.merge_method, r.to_dict(), sources, details)
        return write_backbone(
            bp, out, force=force, max_shard_bytes=max_shard_bytes, card=card,
            extra_files=resolved_recipe_files(r.to_yaml()),
            progress=progress, inputs=[recipe_file],
        )
    finally:
        rp.sources.close()


def validate(recipe: Recipe | SlicesRecipe | dict | str | Path, **kwargs) -> tuple[RecipePlan | StackValidation, list[tuple[str, str, str, str]]]:
    """Check a recipe without merging. Rows (part, tensors, how, sources) say what comes from where."""
    recipe = as_recipe(recipe)
    if isinstance(recipe, SlicesRecipe):  # layer stacking
        return validate_slices(_with_text_config(recipe, kwargs.get("text_config_from")), cache_dir=kwargs.get("cache_dir"),
                               vision_tower=kwargs.get("vision_tower"))
    rp = plan_recipe(recipe, **kwargs)
    rp.sources.close()
    ref = rp.sources.reference.anatomy
    groups: dict[tuple[str, str, str], int] = {}
    module_of = {tuple(ks.items()): mp for mp in (rp.modules or {}).values() for ks in mp.keys.values()}
    for t in rp.backbone.plan.tensors:
        op = t.op
        if t.canonical is not None:
            part = f"language_model: {lm_role(t.canonical)}"
            if isinstance(op, Copy) or len(op.inputs) == 1:
                how, src = "kept", next(iter(op.inputs)) if isinstance(op, Merge) else op.role
            else:
                how, src = rp.method.name, ", ".join(op.inputs)
        elif isinstance(op, Merge) and (mp := module_of.get(tuple(op.inputs.items()))) is not None:
            part, how, src = mp.name, mp.method.name, ", ".join(op.inputs)
        else:
            role, key = (op.role, op.key) if isinstance(op, Copy) else next(iter(op.inputs.items()))
            part = VISION if role == "clip" or key in ref.parts[VISION] else PROJECTOR if key in ref.parts[PROJECTOR] else "other"
            how = "copy" if isinstance(op, Copy) else f"copy as {str(t.dtype).removeprefix('torch.')}"
            src = "vlm" if role == "clip" else role
        key = (part, how, src)
        groups[key] = groups.get(key, 0) + 1
    return rp, [(part, str(n), how, src) for (part, how, src), n in groups.items()]
