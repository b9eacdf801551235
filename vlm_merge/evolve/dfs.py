"""Evolved data-flow-space merging (arXiv 2403.13187, sec. 3.2): the genome of a layer route and a live
model whose route a candidate switches without copying weights.

Config (`space: dfs` or `space: ps+dfs` beside `sources:`, `fitness:`, `cmaes:`; the model is
`vlm_merge.evolve.config.DfsConfig`):

```yaml
space: dfs
dfs:
  pool: [target, vlm]     # the models whose decoder layers form the pool, in order: target (the Japanese
                          # base, sources.target), vlm (the VLM's language model), ps (space ps+dfs: the
                          # PS-merged model at ps_model)
  ps_model: ./ps-run/best_recipe.yaml  # a merged model's directory, or a recipe (.yaml / .yml: a merge recipe, an
                          # evolve run's best_recipe.yaml) that the run merges once into RUN/ps_model-<sha256[:12]>
                          # (atomically; a resumed run reuses it, and refuses a recipe changed since)
  repeats: 2              # r: the pool's M layers repeated, T = M * r slots
  scales: transition      # transition: one gene per (from pool layer i, to pool layer j), the paper's W (M x M);
                          # position: one gene per slot (T)
  scale_bounds: [0.5, 1.5]
  max_depth: 8            # at most this many used slots (the first ones in order); null: T
  init: target            # x0: this pool model's layers in order, once (the other slots off); default: pool[0]
```

Genes, all in [0, 1] as CMA-ES searches them: T indicator genes (slot s is used when its gene > 0.5,
the paper's thresholding), then the scale genes, decoded linearly into `scale_bounds`. A genome that
uses no slot takes the slot with the largest gene (every candidate is a model). The first used layer
takes its input unscaled (the transition from the embeddings has no W entry).

A candidate decodes to a `slices:` recipe with the scales folded into o_proj / down_proj
(`vlm_merge.engine.stacking.dfs_slices_recipe`): `best_recipe.yaml` replays with `vlm-merge merge` to an
ordinary checkpoint. Evaluating one, `DfsMerger` points the live model's decoder at a list of
`_Position` wrappers around the pool's layer modules (loaded once; a layer used twice is one module),
each with its own KV-cache index, setting the 1 / c_k that forward hooks on the layer's o_proj and
down_proj multiply their outputs by: what the folded checkpoint computes (to float32 round-off).
Switching a candidate builds that list: no tensor is copied.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_merge.engine import DfsRoute, dfs_slices_recipe, pool_layers
from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import RECIPE_SUFFIXES, EvolveConfig
from vlm_merge.recipe import VLM_REF, SlicesRecipe, recipe_from_dict


PS_MODEL_PREFIX = "ps_model-"  # RUN/ps_model-<first 12 hex of the recipe file's sha256>: dfs.ps_model's recipe merged


def with_ps_model(cfg: EvolveConfig, run_dir: Path, progress: bool = False) -> EvolveConfig:
    """`cfg` itself, or, when `dfs.ps_model` is a recipe file, `cfg` with ps_model the directory in `run_dir`
    that the recipe is merged into once (`vlm_merge.engine.merge` writes it atomically): a resumed run reuses
    it, and a recipe edited since it was merged is refused (the run's candidates were scored on the old one)."""
    d = cfg.dfs
    if d is None or d.ps_model is None or Path(d.ps_model).suffix not in RECIPE_SUFFIXES:
        return cfg
    from vlm_merge.engine import merge

    recipe = Path(d.ps_model)
    try:
        digest = hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise VlmMergeError(f"evolve config dfs.ps_model: cannot read {recipe} ({e.strerror}); give a readable recipe") from None
    target = Path(run_dir).resolve() / f"{PS_MODEL_PREFIX}{digest}"
    stale = [p.name for p in Path(run_dir).glob(f"{PS_MODEL_PREFIX}*") if p.is_dir() and p != target]
    if stale and not target.exists():
        raise VlmMergeError(f"evolve config dfs.ps_model: {recipe} changed since this run merged it into {stale[0]}; "
                            "restore the recipe or start a new run")
    if not target.exists():
        try:
            merge(recipe, target, progress=progress, card_title="PS model of a PS+DFS run")
        except VlmMergeError as e:
            raise VlmMergeError(f"evolve config dfs.ps_model: merging {recipe}: {e}") from None
    return cfg.model_copy(update={"dfs": d.model_copy(update={"ps_model": str(target)})})


def _is_vlm(path: str) -> bool:
    from vlm_merge.architecture.anatomy import inspect_checkpoint
    from vlm_merge.io.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    try:
        return inspect_checkpoint(reader).is_vlm
    finally:
        reader.close()


def dfs_vlm(cfg: EvolveConfig) -> str | None:
    """The VLM of a DFS search's recipes: the PS-merged model when it is a VLM (space ps+dfs; its
    language model is the pool's "ps", its vision side the output's), else sources.vlm."""
    d = cfg.dfs
    if d.ps_model is not None and _is_vlm(d.ps_model):
        if "vlm" in d.pool:
            raise VlmMergeError("evolve config dfs.pool: names both 'vlm' and 'ps', but ps_model is a VLM; "
                                "the pool takes one VLM's language model (drop 'vlm')")
        return d.ps_model
    return cfg.sources.vlm


def pool_roles(cfg: EvolveConfig) -> list[str]:
    """The pool's model references (recipe roles): the target's path, "vlm", the PS model's ("vlm" when
    it is a VLM: see `dfs_vlm`)."""
    s, d = cfg.sources, cfg.dfs
    if "target" in d.pool and s.target is None:
        raise VlmMergeError("evolve config dfs.pool: names 'target' but sources.target is not set")
    if "vlm" in d.pool and s.vlm is None:
        raise VlmMergeError("evolve config dfs.pool: names 'vlm' but sources.vlm is not set")
    ps = VLM_REF if d.ps_model is not None and dfs_vlm(cfg) == d.ps_model else d.ps_model
    return [{"target": s.target, "vlm": VLM_REF, "ps": ps}[p] for p in d.pool]


def _num_layers(cfg: EvolveConfig, role: str) -> int:
    from vlm_merge.architecture.anatomy import inspect_llm, inspect_vlm
    from vlm_merge.io.checkpoint import CheckpointReader

    reader = CheckpointReader(dfs_vlm(cfg) if role == VLM_REF else role)
    try:
        return (inspect_vlm(reader) if role == VLM_REF else inspect_llm(reader, role)).num_layers
    finally:
        reader.close()


@dataclass(frozen=True)
class DfsGene:
    """One gene of a DFS genome: searched in [0, 1], decoded linearly into [low, high]."""

    name: str
    low: float = 0.0
    high: float = 1.0

    def decode(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def encode(self, value: float) -> float:
        return min(1.0, max(0.0, (float(value) - self.low) / (self.high - self.low)))


@dataclass(frozen=True)
class DfsGenome:
    """The genes of a DFS search: T indicator genes, then the scale genes (see the module docstring).
    The same interface as `vlm_merge.evolve.Genome` where the search loop uses it."""

    config: EvolveConfig
    pool: tuple[tuple[str, int], ...]  # (role, decoder layers)
    genes: tuple[DfsGene, ...]

    @classmethod
    def of(cls, config: EvolveConfig) -> DfsGenome:
        """The genome of `config`'s `dfs:` section (the pool models' layer counts read from their headers)."""
        roles = pool_roles(config)
        pool = tuple((r, _num_layers(config, r)) for r in roles)
        d = config.dfs
        layers = pool_layers(pool)
        names = [f"{Path(r).name or r}:{i}" for r, i in layers]
        m, t = len(layers), len(layers) * d.repeats
        genes = [DfsGene(f"I[{s}]={names[s % m]}") for s in range(t)]
        lo, hi = d.scale_bounds
        if d.scales == "transition":
            genes += [DfsGene(f"W[{names[i]}->{names[j]}]", lo, hi) for i in range(m) for j in range(m)]
        else:
            genes += [DfsGene(f"W[{s}]", lo, hi) for s in range(t)]
        return cls(config, pool, tuple(genes))

    @property
    def held(self) -> tuple:
        """No gene is held out of a DFS search."""
        return ()

    @property
    def slots(self) -> int:
        """T = M * r indicator slots."""
        return len(pool_layers(self.pool)) * self.config.dfs.repeats

    def __len__(self) -> int:
        return len(self.genes)

    def without(self, names: Sequence[str]) -> DfsGenome:
        """Itself: a DFS genome holds no gene (`Genome.without`'s interface)."""
        if names:
            raise VlmMergeError(f"DFS genome: genes cannot be held ({names[0]})")
        return self

    def x0(self) -> list[float]:
        """The start: the `init` pool model's layers in order, once, every scale 1."""
        d = self.config.dfs
        init = pool_roles(self.config)[list(d.pool).index(d.init or d.pool[0])]
        layers = pool_layers(self.pool)
        on = [0.75 if s < len(layers) and layers[s][0] == init else 0.25 for s in range(self.slots)]
        return on + [g.encode(1.0) for g in self.genes[self.slots:]]

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """Each gene's decoded value, by name (logged with each candidate)."""
        self._check(x)
        return {g.name: g.decode(v) for g, v in zip(self.genes, x)}

    def _check(self, x: Sequence[float]) -> None:
        if len(x) != len(self.genes):
            raise VlmMergeError(f"genome: {len(x)} values for {len(self.genes)} genes")

    def route(self, x: Sequence[float]) -> DfsRoute:
        """The route of genome `x`: used slots in order (at most max_depth), scales per transition or slot."""
        self._check(x)
        layers = pool_layers(self.pool)
        m, t = len(layers), self.slots
        used = [s for s in range(t) if x[s] > 0.5] or [max(range(t), key=lambda s: x[s])]
        if self.config.dfs.max_depth is not None:
            used = used[: self.config.dfs.max_depth]
        scale = self.genes[t:]
        if self.config.dfs.scales == "transition":
            ws = [scale[(a % m) * m + (b % m)].decode(x[t + (a % m) * m + (b % m)]) for a, b in zip(used, used[1:])]
        else:
            ws = [scale[s].decode(x[t + s]) for s in used[1:]]
        return DfsRoute(tuple(layers[s % m] for s in used), (1.0, *ws))

    def decode(self, x: Sequence[float]) -> SlicesRecipe:
        """The folded `slices:` recipe of genome `x`."""
        s = self.config.sources
        return dfs_slices_recipe(self.route(x), edges_from=s.target, vlm=dfs_vlm(self.config), tokenizer_source=s.target,
                                 dtype=self.config.dtype)


# ------------------------------------------------------------------------------------------
# the live route
# ------------------------------------------------------------------------------------------


_WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # what a layer adds to the residual stream


def _scale_output(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a pool layer's o_proj / down_proj: its output times the current position's 1 / c."""
    scale = module.dfs_scale
    return output if scale == 1.0 else output * scale


def prepare_pool_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """Hook o_proj and down_proj of `layer` once so that a `_Position` can scale what they add (no copy)."""
    for path in _WRITERS:
        mod = layer.get_submodule(path)
        if not hasattr(mod, "dfs_scale"):
            mod.dfs_scale = 1.0
            mod.register_forward_hook(_scale_output)
    return layer


class _Position(torch.nn.Module):
    """One position of a route: a pool layer (shared, not copied) whose o_proj and down_proj outputs are
    multiplied by 1 / c_k, as the folded checkpoint's weights are, with the KV-cache index of its position."""

    def __init__(self, layer: torch.nn.Module, inv_c: float, index: int) -> None:
        super().__init__()
        self.layer, self.inv_c, self.index = layer, inv_c, index

    def forward(self, *args, **kwargs):
        self.layer.self_attn.layer_idx = self.index
        for path in _WRITERS:
            self.layer.get_submodule(path).dfs_scale = self.inv_c
        return self.layer(*args, **kwargs)


def route_of(recipe: SlicesRecipe) -> list[tuple[str, int, float]]:
    """(role, source layer, 1 / c) of each position of a folded DFS recipe (`dfs_slices_recipe`'s form)."""
    out = []
    for i, s in enumerate(recipe.slices):
        if len(s.sources) != 1 or len(s.sources[0].layers) != 1:
            raise VlmMergeError(f"DFS recipe slices[{i}]: not one source layer")
        scale = s.parameters.get("scale")
        inv = float(scale[0]["value"]) if isinstance(scale, list) else 1.0
        out.append((s.sources[0].model, s.sources[0].layer_range[0], inv))
    return out


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the decoder layers (`.layers`) of a causal LM or a LLaVA model."""
    inner = model.model
    return getattr(inner, "language_model", inner)


class DfsMerger:
    """Pool layers loaded once; `apply(recipe)` points the live model's decoder at the recipe's route."""

    def __init__(self, live: torch.nn.Module, layers: dict[tuple[str, int], torch.nn.Module]) -> None:
        self.live, self.layers = live, layers
        self.decoder = _decoder(live)
        self.num_layers = len(self.decoder.layers)
        self.layer_types = list(getattr(self.decoder.config, "layer_types", None) or [])  # the source layers' kinds
        self.switch_s: list[float] = []

    @classmethod
    def open(cls, live: torch.nn.Module, roles: Sequence[str], vlm_path: str | None = None) -> DfsMerger:
        """Load the decoder layers of the pool models `roles` (paths, or "vlm": the VLM at `vlm_path`'s
        language model) next to `live` (its device and dtype)."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        param = next(live.parameters())
        layers: dict[tuple[str, int], torch.nn.Module] = {}
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            sources = {role: (AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=param.dtype) if role == VLM_REF
                              else AutoModelForCausalLM.from_pretrained(role, dtype=param.dtype)) for role in dict.fromkeys(roles)}
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        for role, src in sources.items():
            for i, layer in enumerate(_decoder(src).layers):
                layers[(role, i)] = prepare_pool_layer(layer.to(param.device).eval())
        return cls(live, layers)

    def apply(self, recipe: SlicesRecipe | dict) -> None:
        """Switch the live model to `recipe`'s route (no weight is copied)."""
        from vlm_merge.engine import CandidateError

        t0 = time.perf_counter()
        if isinstance(recipe, dict):  # as sent to a worker
            recipe = recipe_from_dict(recipe)
        route = route_of(recipe)
        missing = [(r, i) for r, i, _ in route if (r, i) not in self.layers]
        if missing:
            raise CandidateError(f"layer {missing[0][1]} of {missing[0][0]!r} is not in the loaded pool")
        self.decoder.layers = torch.nn.ModuleList(_Position(self.layers[(r, i)], inv, k) for k, (r, i, inv) in enumerate(route))
        cfg = self.decoder.config
        if self.layer_types:
            cfg.layer_types = [self.layer_types[min(i, len(self.layer_types) - 1)] for _, i, _ in route]
        cfg.num_hidden_layers = len(route)
        self.num_layers = len(route)
        self.switch_s.append(time.perf_counter() - t0)

    def inert(self) -> set[str]:
        """No tensor is inert: a route has no parameter genes."""
        return set()
