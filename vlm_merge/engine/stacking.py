"""Layer stacking: output decoder layers taken (or merged) from chosen layers of the sources.

Two planners share one writer. `plan_slices` runs a `slices:` recipe (`vlm_merge.recipe.slices`),
mergekit's frankenmerge format; `plan_dfs` runs a data-flow-space route (arXiv 2403.13187, sec. 3.2):
a sequence of (source, layer) positions with a scale on the hidden state entering each, folded into
the weights so the output is an ordinary checkpoint.

Folding DFS scales (pre-norm decoders: Llama, Mistral, Qwen2). Write the residual stream entering
position k as x_k = c_k * y_k with c_k = w_1 * ... * w_k (w_k: the scale applied before position k).
Layer k computes x + f_k(RMSNorm(x)); RMSNorm(c * y) = RMSNorm(y) exactly when eps = 0, so
y_{k+1} = y_k + f_k(RMSNorm(y_k)) / c_k: dividing what position k adds to the stream (o_proj and
down_proj, weights and biases) by c_k gives the unscaled stream y, and the final norm removes the
remaining c_T. With eps > 0 the two differ by RMSNorm seeing eps / c_k^2 instead of eps: negligible
when the stream's mean square is far above eps, as it is after the first layers of a trained model.

Both planners build on `backbone.plan_backbone` (vision tower and projector copied, embeddings / norm /
lm_head from the edge source with the output's vocabulary rows aligned) and replace its decoder-layer
tensors by the stacked ones; the config's `num_hidden_layers` and per-layer lists follow the stack.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlm_merge.architecture.anatomy import layer_index
from vlm_merge.engine.backbone import VLM, BackbonePlan, Sources, open_sources, plan_backbone, write_backbone
from vlm_merge.engine.streaming import Copy, Merge, OutputTensor, TensorFn
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.card import model_card
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, dtype_from_name
from vlm_merge.io.outputs import prepare_output_dir
from vlm_merge.methods import METHODS, Method, tensor_seed
from vlm_merge.recipe import PASSTHROUGH, RESOLVED_RECIPE, Slice, SliceSource, SlicesRecipe, resolved_recipe_files
from vlm_merge.recipe.slices import first_setting

# What a decoder layer adds to the residual stream: the tensors a DFS scale is folded into.
RESIDUAL_WRITERS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StackedTensor:
    """How one output decoder-layer tensor is made: source canonical keys by role, and a function over
    them (None: the single input as is)."""

    inputs: dict[str, str]
    fn: TensorFn | None = None
    elementwise: bool = True


# (output layer, suffix such as "mlp.down_proj.weight") -> how that tensor is made
LayerRule = Callable[[int, str], StackedTensor]


def _suffix(canon: str) -> str:
    return canon.split(".", 3)[3]


def _keep(role: str) -> TensorFn:
    def keep(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return t[role]

    return keep


def _scaled(role: str, scale: float) -> TensorFn:
    def scaled(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return t[role].float() * scale

    return scaled


def check_layers(sources: Sources, role: str, layers: Sequence[int], where: str) -> None:
    """Every layer index in `layers` exists in `role`'s language model; else one line naming `where`."""
    n = sources.source(role).anatomy.num_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise VlmMergeError(f"{where}: layer {bad[0]} of {role!r}, which has {n} decoder layers (0..{n - 1})")


def restack_config(config: dict, picks: Sequence[int], n_in: int) -> dict:
    """`config` with `num_hidden_layers` = len(picks) and every per-layer list (length `n_in`, e.g.
    `layer_types`) re-read as [list[i] for i in picks], in `text_config` for a VLM."""
    out = dict(config)
    sub = "text_config" if isinstance(out.get("text_config"), dict) else None
    text = dict(out[sub]) if sub else out
    for k, v in list(text.items()):
        if isinstance(v, list) and len(v) == n_in and n_in > 0:
            text[k] = [v[i] for i in picks]
    text["num_hidden_layers"] = len(picks)
    if sub:
        out[sub] = text
    return out


def plan_stack(
    sources: Sources,
    num_out_layers: int,
    layer_rule: LayerRule,
    edge_rule: Callable[[str], TensorFn | None],
    roles: list[str],
    picks: Sequence[int],
    dtype: torch.dtype | None = None,
    text_config_from: str = VLM,
) -> BackbonePlan:
    """The plan of a stacked model: `plan_backbone`'s (vision parts copied, `edge_rule` for embeddings,
    final norm and lm_head, the target's vocabulary) with its decoder layers replaced by `num_out_layers`
    layers made by `layer_rule`. `picks[j]` is the source layer index output layer j stands for (for
    per-layer config lists)."""

    def rule(canon: str) -> TensorFn | None:
        return None if layer_index(canon) is not None else edge_rule(canon)

    bp = plan_backbone(sources, rule, roles, dtype, text_config_from=text_config_from)
    tensors = bp.plan.tensors
    layer_pos = [i for i, t in enumerate(tensors) if t.canonical is not None and layer_index(t.canonical) is not None]
    if not layer_pos:
        raise VlmMergeError(f"{sources.reference.reader.path}: has no decoder layers to stack")
    template = [t for t in tensors if t.canonical is not None and layer_index(t.canonical) == 0]
    stacked: list[OutputTensor] = []
    for j in range(num_out_layers):
        for t0 in template:
            suffix = _suffix(t0.canonical)
            spec = layer_rule(j, suffix)
            inputs = {role: sources.source(role).anatomy.lm_keys[canon] for role, canon in spec.inputs.items()}
            key = _LAYER_KEY.sub(f".layers.{j}.", t0.key, count=1)
            canon = f"model.layers.{j}.{suffix}"
            (role, src_key), = list(inputs.items())[:1]
            src_dtype = sources.source(role).anatomy.infos[src_key].dtype
            out_dtype = dtype or src_dtype
            if spec.fn is None and len(inputs) == 1 and src_dtype == out_dtype:
                op: Copy | Merge = Copy(role, src_key)
            else:
                op = Merge(inputs, spec.fn or _keep(role), elementwise=spec.elementwise)
            stacked.append(OutputTensor(key, t0.shape, out_dtype, op, canon))
    kept = [t for i, t in enumerate(tensors) if i not in set(layer_pos)]
    first = layer_pos[0]
    bp.plan.tensors = kept[:first] + stacked + kept[first:]
    n_in = sources.reference.anatomy.num_layers
    bp.config = restack_config(bp.config, picks, n_in)
    merged = sum(isinstance(t.op, Merge) and len(t.op.inputs) > 1 for t in stacked)
    bp.summary = {**bp.summary, "stacked layers": num_out_layers, "merged": merged, "kept": len(stacked) - merged}
    return bp


# ------------------------------------------------------------------------------------------
# slices: recipes
# ------------------------------------------------------------------------------------------


def _method(name: str) -> Method | None:
    if name == PASSTHROUGH:
        return None
    try:
        return METHODS[name]
    except KeyError:
        raise VlmMergeError(f"recipe merge_method: {name!r} is not a method (known: passthrough, {', '.join(METHODS)})") from None


def _slice_fn(
    recipe: SlicesRecipe, method: Method | None, s: Slice, where: str, names: dict[str, str], out_name: str, t: float,
) -> tuple[TensorFn | None, bool]:  # fmt: skip
    """The merge function of one output tensor of slice `s` over role-named inputs (`names`: role ->
    source canonical key), and whether it is elementwise. mergekit's parameter precedence."""
    models = [src.model for src in s.sources]
    if method is None:
        if len(models) != 1:
            raise VlmMergeError(f"recipe {where}: passthrough takes exactly one source per slice, got {len(models)}")
        role = models[0]
        scale = first_setting([s.sources[0].parameters, s.parameters, recipe.parameters], "scale", names[role], t)
        if scale is None:
            return None, True
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise VlmMergeError(f"recipe {where}: passthrough scale {scale!r} is not a number")
        return _scaled(role, float(scale)), True
    base = s.base_model or recipe.base_model
    if method.needs_base and base not in models:
        raise VlmMergeError(f"recipe {where}: {method.name} takes task vectors against base_model {base!r}, "
                            "which must be one of the slice's sources (with the same layer_range length)")
    base_role = base if method.uses_base and base in models else None  # as `merge.model_entries`
    order = [m for m in models if m == base] + [m for m in models if m != base]
    entries = [m for m in order if m != base_role]
    per_model_names = [p.name for p in method.params if p.per_model]
    shared_names = [p.name for p in method.params if not p.per_model]
    per_model = []
    for m in entries:
        src = next(x for x in s.sources if x.model == m)
        scopes = [src.parameters, s.parameters, recipe.parameters]
        vals = {k: first_setting(scopes, k, names[m], t) for k in per_model_names}
        per_model.append({k: v for k, v in vals.items() if v is not None})
    shared = {k: first_setting([s.parameters, recipe.parameters], k, out_name, t) for k in shared_names}
    shared = {k: v for k, v in shared.items() if v is not None}
    try:
        bound = method.bind(per_model, shared, seed=tensor_seed(recipe.seed, out_name) if method.random else None)
    except ValueError as e:
        raise VlmMergeError(f"recipe {where} parameters for {out_name}: {e}") from None

    def fn(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return bound(tensors[base_role] if base_role is not None else None, [tensors[m] for m in entries], None)

    return fn, method.elementwise


def _vocab_role(recipe: SlicesRecipe) -> str:
    ref = recipe.tokenizer_source or recipe.edges_from or recipe.slices[0].sources[0].model
    if ref == "base":
        if recipe.base_model is None:
            raise VlmMergeError("recipe tokenizer_source: 'base' but the recipe has no base_model")
        ref = recipe.base_model
    if ref == VLM:
        raise VlmMergeError("recipe tokenizer_source / edges_from: the output's vocabulary must come from a language model "
                            "(e.g. the Japanese base), not the VLM; name one with tokenizer_source")
    return ref


def plan_slices(recipe: SlicesRecipe, *, dtype: str | torch.dtype | None = None, cache_dir: str | Path | None = None,
                trust_remote_code: bool = False, vision_tower: str | Path | None = None) -> BackbonePlan:
    """Open the sources of a `slices:` recipe and plan its output (no tensor data read)."""
    method = _method(recipe.merge_method)
    vocab_ref = _vocab_role(recipe)
    out_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    if out_dtype is None and recipe.dtype is not None:
        out_dtype = dtype_from_name(recipe.dtype)
    llm_refs = {r: r for r in [vocab_ref, *recipe.refs()] if r != VLM}
    sources = open_sources(recipe.vlm, llm_refs, vocab_ref, vision_tower=vision_tower, cache_dir=cache_dir,
                           trust_remote_code=trust_remote_code)
    try:
        picks: list[int] = []
        layer_specs: list[tuple[Slice, str, int, float]] = []  # slice, where, offset, t
        for i, s in enumerate(recipe.slices):
            models = [src.model for src in s.sources]
            if len(set(models)) != len(models):
                raise VlmMergeError(f"recipe slices[{i}].sources: names {models[0]!r} twice; a slice merges distinct models")
            for j, src in enumerate(s.sources):
                check_layers(sources, src.model, [src.layer_range[1] - 1], f"recipe slices[{i}].sources[{j}].layer_range {list(src.layer_range)}")
            n = s.num_layers
            for off in range(n):
                layer_specs.append((s, f"slices[{i}]", off, off / (n - 1) if n > 1 else 1.0))
                picks.append(s.sources[0].layer_range[0] + off)

        def layer_rule(j: int, suffix: str) -> StackedTensor:
            s, where, off, t = layer_specs[j]
            names = {src.model: f"model.layers.{src.layer_range[0] + off}.{suffix}" for src in s.sources}
            fn, elementwise = _slice_fn(recipe, method, s, where, names, f"model.layers.{j}.{suffix}", t)
            return StackedTensor(names, fn, elementwise)

        def edge_rule(canon: str) -> TensorFn | None:
            if recipe.edges_from is not None:
                return None if recipe.edges_from == vocab_ref else _keep(recipe.edges_from)
            post = canon in ("model.norm.weight", "lm_head.weight") or canon.startswith("model.norm.")
            s, where = (recipe.slices[-1], f"slices[{len(recipe.slices) - 1}]") if post else (recipe.slices[0], "slices[0]")
            names = {src.model: canon for src in s.sources}
            fn, _ = _slice_fn(recipe, method, s, where, names, canon, 0.0)
            if fn is None and names == {vocab_ref: canon}:
                return None
            return fn or _keep(next(iter(names)))

        edge_models = [recipe.edges_from] if recipe.edges_from else [src.model for src in (*recipe.slices[0].sources, *recipe.slices[-1].sources)]
        roles = list(dict.fromkeys([vocab_ref, *edge_models]))
        text_from = recipe.text_config_from or (VLM if recipe.vlm is not None else "target")
        return plan_stack(sources, len(layer_specs), layer_rule, edge_rule, roles, picks, out_dtype, text_from)
    except BaseException:
        sources.close()
        raise


def merge_slices(
    recipe: SlicesRecipe,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    allow_nonfinite: bool = False,
    recipe_file: str | Path | None = None,
    vision_tower: str | Path | None = None,
) -> Path:
    """Write the stacked model of a `slices:` recipe (and its `merge_recipe.yaml`) to `out`; returns `out`.
    `device`: where merged tensors are computed (`merge`'s)."""
    prepare_output_dir(out, force, [recipe_file])
    bp = plan_slices(recipe, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code, vision_tower=vision_tower)
    try:
        bp.plan.allow_nonfinite = allow_nonfinite
        bp.plan.device = device
        return _write(bp, out, recipe.to_yaml(), recipe.merge_method, recipe.to_dict(), force, max_shard_bytes, progress, [recipe_file])
    finally:
        bp.sources.close()


def _write(bp: BackbonePlan, out, recipe_yaml: str, title: str, recipe_dict: dict, force: bool, max_shard_bytes: int,
           progress: bool, inputs: list) -> Path:
    details = [f"output layout: {bp.output_layout}; decoder layers stacked: {bp.summary.get('stacked layers')}",
               f"replay: `vlm-merge merge {RESOLVED_RECIPE} OUT`"]
    if bp.vocab is not None:
        details.append("vocabulary: " + bp.vocab.summary())
    card = model_card(f"{title} layer stack", title, recipe_dict, {}, details + bp.card_details())
    return write_backbone(
        bp, out, force=force, max_shard_bytes=max_shard_bytes, card=card,
        extra_files=resolved_recipe_files(recipe_yaml),
        progress=progress, inputs=inputs,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# data-flow-space routes (arXiv 2403.13187, sec. 3.2)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DfsRoute:
    """A path through a layer pool: the decoder layers a token's hidden state passes, in order, as
    (source role, source layer), and `scales[k]`, the factor on the hidden state entering position k.
    The same source layer may appear at several positions."""

    positions: tuple[tuple[str, int], ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.positions:
            raise VlmMergeError("DFS route: no layer is used; the indicator must select at least one slot")
        if len(self.scales) != len(self.positions):
            raise VlmMergeError(f"DFS route: {len(self.scales)} scales for {len(self.positions)} positions")
        bad = [w for w in self.scales if not (w > 0 and w < float("inf"))]
        if bad:
            raise VlmMergeError(f"DFS route: scale {bad[0]!r} is not a positive finite number")

    def cumulative(self) -> list[float]:
        """c_k = w_0 * ... * w_k: the residual stream's scale after position k's input scaling."""
        out, c = [], 1.0
        for w in self.scales:
            c *= w
            out.append(c)
        return out


def pool_layers(pool: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The paper's M layers: every decoder layer of each pool model (role, number of layers), in order."""
    return [(role, i) for role, n in pool for i in range(n)]


def route_from_indicator(
    pool: Sequence[tuple[str, int]], repeats: int, indicator: Sequence[bool], transition_scales: Sequence[Sequence[float]] | None = None,
) -> DfsRoute:  # fmt: skip
    """The paper's DFS path: T = M * repeats slots, slot s holding pool layer s mod M; `indicator` (length T)
    says which slots are used, in order. `transition_scales[i][j]` (M x M; None: all 1) scales the hidden
    state passing from pool layer i to pool layer j; the first used layer takes its input unscaled."""
    layers = pool_layers(pool)
    m = len(layers)
    if len(indicator) != m * repeats:
        raise VlmMergeError(f"DFS indicator: length {len(indicator)}, expected M * r = {m} * {repeats} = {m * repeats}")
    used = [s % m for s, on in enumerate(indicator) if on]
    scales = [1.0] + [float(transition_scales[i][j]) if transition_scales is not None else 1.0 for i, j in zip(used, used[1:])]
    return DfsRoute(tuple(layers[i] for i in used), tuple(scales[: len(used)]))


def dfs_slices_recipe(
    route: DfsRoute,
    *,
    edges_from: str | None = None,
    vlm: str | None = None,
    tokenizer_source: str | None = None,
    dtype: str | None = None,
    text_config_from: str | None = None,
) -> SlicesRecipe:
    """The route as a replayable `slices:` recipe with the scales folded in: one passthrough slice per
    position, `scale` = 1 / c_k on what the layer adds to the residual stream (o_proj, down_proj;
    weights and biases) and 1 elsewhere (see the module docstring). Without `edges_from` (embeddings from
    the first position's source, norm and lm_head from the last's) it is a mergekit recipe as well."""
    slices = []
    for (role, layer), c in zip(route.positions, route.cumulative()):
        params = {} if c == 1.0 else {"scale": [{"filter": "o_proj", "value": 1.0 / c}, {"filter": "down_proj", "value": 1.0 / c}]}
        slices.append(Slice(sources=[SliceSource(model=role, layer_range=(layer, layer + 1))], parameters=params))
    return SlicesRecipe(slices=tuple(slices), merge_method=PASSTHROUGH, vlm=vlm, edges_from=edges_from, tokenizer_source=tokenizer_source,
                        text_config_from=text_config_from, dtype=dtype)


@dataclass
class StackValidation:
    """What `vlm-merge validate` reports on a `slices:` recipe."""

    recipe: SlicesRecipe
    backbone: BackbonePlan


def validate_slices(recipe: SlicesRecipe, *, cache_dir: str | Path | None = None, vision_tower: str | Path | None = None,
                    ) -> tuple[StackValidation, list[tuple[str, str, str, str]]]:  # fmt: skip
    """Check a `slices:` recipe against its sources without merging; rows (part, tensors, how, sources)."""
    bp = plan_slices(recipe, cache_dir=cache_dir, vision_tower=vision_tower)
    bp.sources.close()
    groups: dict[tuple[str, str, str], int] = {}
    for t in bp.plan.tensors:
        op = t.op
        roles = [op.role] if isinstance(op, Copy) else list(op.inputs)
        if t.canonical is None:
            part, how = "vision tower / projector / other", "copy"
        elif layer_index(t.canonical) is not None:
            part, how = "language_model: stacked layers", "copy" if isinstance(op, Copy) else recipe.merge_method
        else:
            part, how = "language_model: embeddings / norm / lm_head", "copy" if isinstance(op, Copy) else "aligned / merged"
        key = (part, how, ", ".join(Path(r).name or r for r in roles))
        groups[key] = groups.get(key, 0) + 1
    tok = recipe.tokenizer_source or recipe.edges_from or recipe.slices[0].sources[0].model
    resolved = replace(recipe, tokenizer_source=tok)
    return StackValidation(resolved, bp), [(part, str(n), how, src) for (part, how, src), n in groups.items()]
