"""A parameter setting's value for one tensor, as mergekit 0.1.5's `evaluate_setting` computes it.

A scalar is itself. A list of numbers is a gradient across the decoder layers: layer i of N sits at
t = i / (N - 1) (t = 1 when N = 1; embeddings, final norm and lm_head at t = 0, mergekit's pre / post
weights), and takes the linear interpolation of the list's neighbouring values at t * (len - 1), for a list
of any length. One exception keeps earlier outputs bit for bit: a list of exactly N values gives layer i its
i-th value (mergekit's float arithmetic can land an ulp away from it, e.g. at 1/49 * 49). A list of other
scalars takes the value at int(t * (len - 1)). A list of conditions takes the first whose `filter` is a
substring of the canonical tensor name (absent or "*": always) or whose `filter_regex` is found in it; none:
None (the setting is unset for that tensor, as in mergekit).
"""

from __future__ import annotations

import re
from typing import Any

from vlm_merge.recipe.format import Setting


def interpolate(values: list, t: float) -> Any:
    """mergekit's gradient: linear interpolation between neighbouring values at position t in [0, 1]."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_position(layer: int | None, num_layers: int) -> float:
    """Where a tensor sits along a per-layer list (mergekit's `t`): 0 outside the decoder layers."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def matches(cond: dict, name: str) -> bool:
    """Whether the condition `cond` applies to the tensor `name`."""
    f, rx = cond.get("filter"), cond.get("filter_regex")
    return (f is None and rx is None) or f == "*" or (f is not None and str(f) in name) or (rx is not None and re.search(str(rx), name) is not None)


def resolve_setting(setting: Setting, name: str, layer: int | None, num_layers: int) -> Any:
    """The value of a parameter setting for the tensor `name` (canonical key) in `layer` (None: outside the
    decoder layers) of a model with `num_layers` layers; None when no condition applies."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting[0], dict):  # validated lists are all scalars or all conditions
        if len(setting) == num_layers and layer is not None:
            return setting[layer]  # one value per layer: exact
        return interpolate(list(setting), layer_position(layer, num_layers))
    for cond in setting:
        if matches(cond, name):
            return resolve_setting(cond["value"], name, layer, num_layers)
    return None
