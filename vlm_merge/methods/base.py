"""The method registry's types: `Param` (one parameter, its range and default) and `Method` (a merge
method's pure function, parameters and input contract).

A mergekit YAML's `merge_method` and `parameters` map onto a `Method` and its `Param`s; the
registry of all methods is `vlm_merge.methods.registry.METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Param:
    """One method parameter, named as in mergekit YAML.

    kind "float": a finite real number within [low, high] (bounds None = unbounded; inclusivity
    per flag). kind "int": an integer (an integral float is accepted) within [low, high].
    kind "bool": True/False. kind "choice": one of `choices`, or a spelling listed in
    `aliases` (booleans for `rescale`, as mergekit YAML writes it). `per_model` parameters take one
    value per model (mergekit's per-model `parameters`); the others are shared. `arg` is the keyword
    of `Method.fn` receiving it (a list for per-model parameters); None: accepted, no effect.
    """

    name: str
    default: object = REQUIRED
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    per_model: bool = False
    doc: str = ""
    kind: Literal["float", "int", "bool", "choice"] = "float"
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[object, str], ...] = ()
    arg: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def range_text(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + ("]" if self.high_inclusive else ")")
        return ("an integer in " if self.kind == "int" else "") + f"{lo}, {hi}"

    def check(self, value: object, where: str = "") -> object:
        """The canonical value, or ValueError("<name>: <value> out of range <range>")."""
        bad = ValueError(f"{self.name}: {value!r} out of range {self.range_text}{where}")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "choice":
            for alias, canonical in self.aliases:
                if type(value) is type(alias) and value == alias:
                    return canonical
            if isinstance(value, str) and value in self.choices:
                return value
            raise bad
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        if self.kind == "int":
            if value != int(value):
                raise bad
            value = int(value)
        v = float(value) if self.kind == "float" else value
        if self.low is not None and (v < self.low or (v == self.low and not self.low_inclusive)):
            raise bad
        if self.high is not None and (v > self.high or (v == self.high and not self.high_inclusive)):
            raise bad
        return v


ModelCheck = Callable[[Mapping[str, object], str], None]


@dataclass(frozen=True)
class Method:
    """A merge method: its pure function, parameters and input contract.

    `needs_base`: the base tensor is a required input (methods without it ignore `base` unless
    `optional_base`: then `fn` gets the base tensor, or None when the recipe names no base model). `min_models` /
    `max_models` count the non-base models. `random`: `merge` needs a seed. `elementwise`: `fn` may
    be applied to any slice of its inputs independently (the engine may chunk it).
    `supports_anchor`: `merge(anchor=...)` starts the output from the anchor instead of the base.
    `delta_only`: the output is the anchor (or the base) plus a function of the task vectors m_i - b that is
    zero when they all are, so a tensor where every model equals the base comes out as the anchor whatever
    the parameters (an evolutionary search leaves genes that set only such tensors out).
    `model_checks`: cross-parameter checks run on each model's resolved parameters.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    random: bool
    elementwise: bool
    supports_anchor: bool
    unpack_models: bool = False  # fn(*models, ...) instead of fn(models, ...)
    model_checks: tuple[ModelCheck, ...] = ()
    doc: str = ""
    delta_only: bool = False
    optional_base: bool = False

    @property
    def uses_base(self) -> bool:
        """Whether `fn` takes the base tensor (required or optional) before the models."""
        return self.needs_base or self.optional_base

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(
        self, model_params: Sequence[Mapping[str, object]], params: Mapping[str, object]
    ) -> tuple[list[dict[str, object]], dict[str, object]]:
        """Validate and fill defaults: (one dict per model, shared dict), canonical values.

        A per-model parameter in `params` is the default for models that do not set it (as in
        mergekit YAML's top-level `parameters`); a shared parameter given per model is an error.
        """
        names = {p.name: p for p in self.params}
        known = ", ".join(names)
        for k, v in params.items():
            if k not in names:
                raise ValueError(f"{k}: {v!r} is not a parameter of {self.name} (known: {known})")
        for i, mp in enumerate(model_params):
            for k, v in mp.items():
                if k not in names:
                    raise ValueError(f"{k}: {v!r} is not a parameter of {self.name} (model {i}; known: {known})")
                if not names[k].per_model:
                    raise ValueError(f"{k}: {v!r} is a shared parameter of {self.name}, not per model (model {i})")
        n = len(model_params)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise ValueError(f"models: {self.name} needs {want} models, got {n}")
        shared: dict[str, object] = {}
        for p in self.params:
            if p.per_model:
                continue
            v = params.get(p.name, p.default)
            if v is REQUIRED:
                raise ValueError(f"{p.name}: missing; required by {self.name}")
            shared[p.name] = p.check(v)
        per_model: list[dict[str, object]] = []
        for i, mp in enumerate(model_params):
            where = f" (model {i})"
            resolved: dict[str, object] = {}
            for p in self.params:
                if not p.per_model:
                    continue
                v = mp.get(p.name, params.get(p.name, p.default))
                if v is REQUIRED:
                    raise ValueError(f"{p.name}: missing; required by {self.name}{where}")
                resolved[p.name] = p.check(v, where)
            for check in self.model_checks:
                check(resolved, where)
            per_model.append(resolved)
        return per_model, shared

    def merge(
        self,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        model_params: Sequence[Mapping[str, object]],
        params: Mapping[str, object],
        *,
        anchor: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Merge one tensor: validate, fill defaults, call `fn`. Returns float32.

        `seed` (random methods: required) is the per-tensor seed, e.g. `tensor_seed(seed, name)`.
        """
        if len(model_params) != len(models):
            raise ValueError(f"models: {len(models)} models but {len(model_params)} parameter sets")
        if self.needs_base and base is None:
            raise ValueError(f"base: None; {self.name} needs a base tensor")
        shape = models[0].shape
        for what, t in [("base", base if self.uses_base else None), ("anchor", anchor)] + [
            (f"models[{i}]", m) for i, m in enumerate(models)
        ]:
            if t is not None and t.shape != shape:
                raise ValueError(f"{what}: shape {tuple(t.shape)} differs from models[0] {tuple(shape)}")
        return self.bind(model_params, params, seed=seed, anchored=anchor is not None)(base, models, anchor)

    def bind(
        self,
        model_params: Sequence[Mapping[str, object]],
        params: Mapping[str, object],
        *,
        seed: int | None = None,
        anchored: bool = False,
    ) -> Callable[[torch.Tensor | None, Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]:
        """Validate once and return `f(base, models, anchor)` calling `fn` directly.

        The engine evaluates elementwise methods slice by slice; binding keeps the parameter checks
        out of that loop.
        """
        per_model, shared = self.resolve(model_params, params)
        if anchored and not self.supports_anchor:
            raise ValueError(f"anchor: {self.name} does not take an anchor")
        if self.random and seed is None:
            raise ValueError(f"seed: None; {self.name} is random and needs a seed (see tensor_seed)")
        kwargs: dict[str, object] = {}
        for p in self.params:
            if p.arg is not None:
                kwargs[p.arg] = [pm[p.name] for pm in per_model] if p.per_model else shared[p.name]
        if self.random:
            kwargs["generator"] = seed
        fn, uses_base, unpack, supports_anchor = self.fn, self.uses_base, self.unpack_models, self.supports_anchor

        def call(base: torch.Tensor | None, models: Sequence[torch.Tensor], anchor: torch.Tensor | None = None) -> torch.Tensor:
            args = ((base,) if uses_base else ()) + (tuple(models) if unpack else (list(models),))
            return fn(*args, **kwargs, **({"anchor": anchor} if supports_anchor else {}))

        return call

