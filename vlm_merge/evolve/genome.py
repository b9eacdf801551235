"""The genome of an evolutionary merge: genes (numbers in [0, 1]) and the recipe they decode to.

One gene per (method parameter, source model, layer group [, module]) plus optional genes for
embeddings / norms / lm_head, decoded linearly to the parameter's bounds; see the package docstring
(`vlm_merge.evolve`) for the rules, and `inert_genes` for the genes held out of the search.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import MODULE_SPLITS, SEPARATE_FILTERS, EvolveConfig
from vlm_merge.recipe import VLM_REF, ModelEntry, Recipe


@dataclass(frozen=True)
class Gene:
    """One coordinate of the search: the value x in [0, 1] of parameter `param` (of `model`) on `group` [/ `module`],
    decoded linearly to [low, high]."""

    name: str  # e.g. "weight[vlm]@layers0-3/mlp"
    param: str
    model: int | None  # index into the recipe's models (per-model parameters); None: shared
    group: str  # "layers:<g>" or one of SEPARATE_GROUPS
    module: str | None  # "attention" | "mlp" | None
    low: float
    high: float

    def decode(self, x: float) -> float:
        """The parameter value of gene value `x`."""
        return self.low + float(x) * (self.high - self.low)

    def encode(self, value: float) -> float:
        """The gene value of parameter value `value`, clipped to [0, 1]."""
        return min(1.0, max(0.0, (float(value) - self.low) / (self.high - self.low)))


@dataclass(frozen=True)
class Genome:
    """The genes of a config for a model with `num_layers` decoder layers, and their recipe."""

    config: EvolveConfig
    num_layers: int
    genes: tuple[Gene, ...]  # the searched genes: one CMA-ES coordinate each
    held: tuple[tuple[Gene, float], ...] = ()  # genes left out of the search (`without`), at their x0 values

    def without(self, names: Sequence[str]) -> Genome:
        """This genome with the genes `names` held at their x0 values instead of searched."""
        drop = set(names)
        x0 = dict(zip(self.genes, self.x0()))
        return replace(self, genes=tuple(g for g in self.genes if g.name not in drop),
                       held=self.held + tuple((g, x0[g]) for g in self.genes if g.name in drop))

    @classmethod
    def of(cls, config: EvolveConfig, num_layers: int) -> Genome:
        """Every gene of `config` for a model of `num_layers` decoder layers (none held)."""
        from vlm_merge.engine import model_entries
        from vlm_merge.methods import METHODS

        method = METHODS[config.method]
        g = config.genome
        n_groups = math.ceil(num_layers / g.layer_granularity)
        entries = model_entries(_recipe_skeleton(config), method)
        labels = [_label(config.sources.models[i]) for i in entries]
        genes = []
        for name, (lo, hi) in g.params.items():
            owners: list[tuple[int | None, str]] = [(i, f"[{lab}]") for i, lab in zip(entries, labels)] if method.param(name).per_model else [(None, "")]
            for model, tag in owners:
                for grp in range(n_groups):
                    first, last = grp * g.layer_granularity, min(num_layers, (grp + 1) * g.layer_granularity) - 1
                    span = f"layers{first}" if first == last else f"layers{first}-{last}"
                    for mod in g.modules:
                        genes.append(Gene(f"{name}{tag}@{span}" + (f"/{mod}" if mod else ""), name, model, f"layers:{grp}", mod, lo, hi))
                for sep in g.separate:
                    genes.append(Gene(f"{name}{tag}@{sep}", name, model, sep, None, lo, hi))
        return cls(config, num_layers, tuple(genes))

    def __len__(self) -> int:
        return len(self.genes)

    def x0(self) -> list[float]:
        """The searched genes' start values (`cmaes.x0`: one gene value, or real values by parameter name; others 0.5)."""
        x0 = self.config.cmaes.x0
        if isinstance(x0, dict):
            return [g.encode(x0[g.param]) if g.param in x0 else 0.5 for g in self.genes]
        return [float(x0)] * len(self.genes)

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """Every gene's parameter value under `x` (the searched genes' values), held genes included."""
        return {g.name: g.decode(v) for g, v in self._pairs(x)}

    def _pairs(self, x: Sequence[float]) -> list[tuple[Gene, float]]:
        self._check(x)
        return [*zip(self.genes, (float(v) for v in x)), *self.held]

    def _check(self, x: Sequence[float]) -> None:
        if len(x) != len(self.genes):
            raise VlmMergeError(f"genome: {len(x)} values for {len(self.genes)} genes")

    def _setting(self, genes: list[tuple[Gene, float]]) -> Any:
        """One parameter's recipe setting from its genes: a number, a per-layer list, or filter conditions."""
        gran = self.config.genome.layer_granularity
        by = {(g.group, g.module): g.decode(v) for g, v in genes}
        filters = MODULE_SPLITS[self.config.genome.split_modules]
        mods = self.config.genome.modules
        per_layer = {m: [by[(f"layers:{i // gran}", m)] for i in range(self.num_layers)] for m in mods}
        conds = [{**SEPARATE_FILTERS[s], "value": by[(s, None)]} for s in self.config.genome.separate]
        if filters:
            conds += [{"filter_regex": filters[m], "value": per_layer[m]} for m in mods]
            conds.append({"value": per_layer[mods[0]]})
        else:
            lst = per_layer[None]
            conds.append({"value": lst[0] if len(set(lst)) == 1 and math.ceil(self.num_layers / gran) == 1 else lst})
        return conds[0]["value"] if len(conds) == 1 else conds

    def decode(self, x: Sequence[float]) -> Recipe:
        """The recipe of genome `x` (gene values in [0, 1])."""
        cfg = self.config
        skel = _recipe_skeleton(cfg)
        pairs = self._pairs(x)
        models = []
        for i, m in enumerate(skel.models):
            params = dict(m.parameters)
            for name in cfg.genome.params:
                mine = [(g, v) for g, v in pairs if g.param == name and g.model == i]
                if mine:
                    params[name] = self._setting(mine)
            models.append(ModelEntry(m.model, params))
        shared = dict(skel.parameters)
        for name in cfg.genome.params:
            mine = [(g, v) for g, v in pairs if g.param == name and g.model is None]
            if mine:
                shared[name] = self._setting(mine)
        return replace(skel, models=tuple(models), parameters=shared)


def inert_genes(genome: Genome, merger) -> dict[str, str]:
    """The searched genes of `genome` that cannot change the merge of `merger` (a `ResidentMerger` opened on its
    recipe), each with why. A gene sets the tensors whose resolved parameters change when it alone moves from
    its x0 value to the far bound; it is inert if it sets none, or only tensors no parameter can change
    (`ResidentMerger.inert`). A gene whose move makes the recipe invalid is kept."""
    from vlm_merge.engine import CandidateError

    x0 = genome.x0()
    fixed = merger.inert()
    try:
        ref = merger.resolve(genome.decode(x0))
    except CandidateError:
        return {}
    out = {}
    for i, g in enumerate(genome.genes):
        x = list(x0)
        x[i] = 1.0 if x0[i] < 0.5 else 0.0
        try:
            moved = merger.resolve(genome.decode(x))
        except CandidateError:
            continue
        sets = {k for k, v in moved.items() if v != ref[k]}
        if not sets:
            out[g.name] = "sets no tensor"
        elif sets <= fixed:
            out[g.name] = f"sets only tensors where every model equals the base ({len(sets)} tensor{'s' * (len(sets) > 1)})"
    return out


def _label(ref: str) -> str:
    """A source's name in gene names: `vlm`, or the last part of its path."""
    return ref if ref == VLM_REF else Path(ref).name or ref


def _recipe_skeleton(cfg: EvolveConfig) -> Recipe:
    """The recipe without searched values: sources, method, fixed parameters, dtype, seed."""
    s = cfg.sources
    return Recipe(
        merge_method=cfg.method, models=tuple(ModelEntry(m, {}) for m in s.models), base_model=s.base_model,
        vlm=s.vlm, target=s.target, parameters=dict(cfg.genome.fixed), tokenizer_source=s.tokenizer_source,
        dtype=cfg.dtype, seed=cfg.recipe_seed,
    )


def recipe_sha256(recipe: Recipe) -> str:
    """A short hash of `recipe`'s YAML (logged with each candidate)."""
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


def num_layers_of(config: EvolveConfig) -> int:
    """Decoder layers of the merge's reference model (headers only)."""
    from vlm_merge.architecture.anatomy import inspect_llm, inspect_vlm
    from vlm_merge.io.checkpoint import CheckpointReader

    s = config.sources
    ref_path = s.vlm or s.target or s.base_model or s.models[0]
    reader = CheckpointReader(ref_path)
    try:
        anatomy = inspect_vlm(reader) if s.vlm else inspect_llm(reader, "reference")
        return anatomy.num_layers
    finally:
        reader.close()
