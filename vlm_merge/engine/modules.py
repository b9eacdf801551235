"""The vision-side modules of VLMs of one family, lined up for a whole-VLM merge.

A recipe's `modules:` entry (`vision_tower`, `multi_modal_projector`) names anatomy parts (`MODULE_PARTS`);
`module_keys` pairs the VLM's tensors of those parts with every source's by their llava-hf names, so one family
in two key layouts (llava-hf, transformers 5, original LLaVA-1.6) lines up, and checks shapes; `vision_layers`
gives each tensor's vision-tower layer (the position a per-layer list takes its value at).
"""

from __future__ import annotations

import re

from vlm_merge.architecture.anatomy import OTHER, PROJECTOR, VISION, Anatomy
from vlm_merge.architecture.layouts import to_hf
from vlm_merge.engine.backbone import Sources
from vlm_merge.errors import VlmMergeError
from vlm_merge.recipe.format import VISION_MODULES

# a `modules:` entry -> the anatomy parts it merges (LLaVA-NeXT's image_newline, part "other", goes with the projector;
# a generic layout's whole vision side is its vision tower)
MODULE_PARTS = dict(zip(VISION_MODULES, ((VISION,), (PROJECTOR, OTHER)), strict=True))
_VISION_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def common_key(anatomy: Anatomy, key: str) -> str:
    """A vision-side key by its llava-hf name (its own where the layout names none), alike across layouts."""
    return to_hf(key, anatomy.layout) or key


def module_keys(name: str, sources: Sources, roles: list[str]) -> dict[str, dict[str, str]]:
    """The VLM's keys of module `name` -> role -> that role's key; every role's module has the VLM's tensors and
    shapes (the first that does not is one error line)."""
    ref = sources.vlm.anatomy if sources.vlm is not None else None
    where = f"recipe modules.{name}"
    if ref is None:
        raise VlmMergeError(f"{where}: the recipe has no VLM; merge VLMs (models: or vlm:) or remove modules")
    parts = MODULE_PARTS[name]
    ref_keys = [k for part in parts for k in ref.parts[part]]
    if not ref_keys:
        raise VlmMergeError(f"{where}: the VLM {ref.path} stores no {name} tensors (LLaVA-1.5 reads its CLIP tower from "
                            f"mm_vision_tower, the same for every model); remove modules.{name} (it is copied)")
    out: dict[str, dict[str, str]] = {k: {} for k in ref_keys}
    for role in roles:
        a = sources.source(role).anatomy
        mine = {common_key(a, k): k for part in parts for k in a.parts[part]}
        if not mine:
            raise VlmMergeError(f"{where}: {role} has no {name} tensors (a language model); list VLMs of the VLM's family "
                                f"as the module's models, or remove modules.{name} to copy it from the VLM")
        for k in ref_keys:
            common = common_key(ref, k)
            theirs = mine.pop(common, None)
            if theirs is None or a.infos[theirs].shape != ref.infos[k].shape:
                what = "lacks it" if theirs is None else f"has {list(a.infos[theirs].shape)}"
                raise VlmMergeError(f"{where}: {role} does not match the VLM at {common!r}: the VLM has "
                                    f"{list(ref.infos[k].shape)}, {role} {what}; merge VLMs of one family (same layout and sizes)")
            out[k][role] = theirs
        if mine:
            raise VlmMergeError(f"{where}: {role} has {next(iter(mine))!r}, which the VLM lacks ({len(mine)} tensors in all); "
                                "merge VLMs of one family (same layout and sizes)")
    return out


def vision_layers(ref: Anatomy, keys: dict[str, dict[str, str]]) -> tuple[dict[str, str], dict[str, int | None], int]:
    """For the VLM's module `keys`: each one's llava-hf name (what a condition's filter matches), its layer
    (`layers.N.`; None outside the layers: embeddings, norms, projector) and the module's layer count."""
    names = {k: common_key(ref, k) for k in keys}
    layers = {k: int(m.group(1)) if (m := _VISION_LAYER.search(names[k])) else None for k in keys}
    return names, layers, max((i for i in layers.values() if i is not None), default=-1) + 1
