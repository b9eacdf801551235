"""Key layouts of checkpoints, as data: the one table the rest of vlm-merge derives its key names from.

A row (`Layout`) says how to recognise a checkpoint of that layout (`detect`), which key prefixes hold the
vision tower, the projector and the other vision-side tensors, and how each of its key prefixes renames to
llava-hf's as transformers 4.x saves them (`hf_prefixes`; llava-hf 4.x is the common tongue of the rows).
Derived from the table, and nowhere else:

- `vlm_merge.architecture.anatomy` names the parts of a checkpoint (`detect_layout`, the part prefixes and
  `Layout.lm_prefixes`: language-model keys are llava-hf's `language_model.` + a standalone LLM's key, the
  "canonical" key `model.layers.N.…`, `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`);
- `vlm_merge.engine.backbone` writes an original-LLaVA VLM (and the CLIP tower it names) in llava-hf names
  (`to_hf`);
- `vlm_merge.testing` renders its fixture weights in every layout (`from_hf`);
- `bench.common` reads a contender's output in whatever layout it wrote (`hf_key`).

Sources of the rows: transformers' `convert_llava_weights_to_hf.py` (original -> llava-hf 4.x renames:
`model.mm_projector.0/2` -> `multi_modal_projector.linear_1/2`, `model.vision_tower.vision_tower.` ->
`vision_tower.`, `model.` -> `language_model.model.`), transformers 4.52's `_checkpoint_conversion_mapping`
of `LlavaForConditionalGeneration` (llava-hf 4.x -> `model.language_model.`, `model.vision_tower.`,
`model.multi_modal_projector.`, `lm_head.`), the module names transformers 5 builds (held to it on the meta
device by tests/test_real_layouts_corpus.py) and the key lists of real checkpoints in tests/real_layouts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

HF_LM = "language_model."  # llava-hf 4.x: language-model key = this + the canonical (standalone LLM) key


@dataclass(frozen=True)
class Layout:
    """One key layout.

    `hf_prefixes`: (llava-hf 4.x key prefix, this layout's key prefix) pairs; a key renames by the longest
    prefix that matches it. `vision` / `projector` / `other`: this layout's key prefixes of those parts
    (anatomy checks them before the language-model prefixes). `detect`: a regex; a checkpoint with a key
    matching it has this layout (rows are tried in table order), None for a layout never detected by itself.
    `text_config_key`: where the config keeps the language model's fields (None: at its top level).
    """

    name: str
    description: str
    detect: str | None
    hf_prefixes: tuple[tuple[str, str], ...]
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    other: tuple[str, ...] = ()
    text_config_key: str | None = "text_config"

    @property
    def lm_prefixes(self) -> tuple[tuple[str, str], ...]:
        """(this layout's key prefix, canonical LLM key prefix) for the language model's keys."""
        return tuple((mine, hf.removeprefix(HF_LM)) for hf, mine in self.hf_prefixes if hf.startswith(HF_LM))


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="llava-original",
        description="original LLaVA (haotian-liu: LlavaLlamaForCausalLM / LlavaMistralForCausalLM)",
        detect=r"^model\.mm_projector\.",
        hf_prefixes=(
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower.vision_tower."),  # LLaVA-1.6 embeds its fine-tuned tower
            ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
            ("image_newline", "model.image_newline"),
        ),
        vision=("model.vision_tower.",),
        projector=("model.mm_projector.",),
        other=("model.image_newline",),
        text_config_key=None,
    ),
    Layout(
        name="llava-hf",
        description="llava-hf as saved by transformers 4.x / 5.x (language_model.model.*)",
        detect=r"^language_model\.model\.",
        hf_prefixes=(
            ("language_model.model.", "language_model.model."),
            ("language_model.lm_head.", "language_model.lm_head."),
            ("vision_tower.", "vision_tower."),
            ("multi_modal_projector.", "multi_modal_projector."),
            ("image_newline", "image_newline"),
        ),
        vision=("vision_tower.",),
        projector=("multi_modal_projector.",),
        other=("image_newline",),
    ),
    Layout(
        name="llava-hf-v5",
        description="transformers >= 4.52 layout (model.language_model.*)",
        detect=r"^model\.language_model\.",
        hf_prefixes=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("image_newline", "model.image_newline"),
        ),
        vision=("model.vision_tower.",),
        projector=("model.multi_modal_projector.",),
        other=("model.image_newline",),
    ),
    Layout(
        name="llava-hf-v5-modules",
        description="transformers 5's module names of a llava-hf model (its state_dict(): the tower without vision_model.)",
        detect=None,  # llava-hf-v5's detect and part prefixes cover these keys
        hf_prefixes=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("image_newline", "model.image_newline"),
        ),
        vision=("model.vision_tower.",),
        projector=("model.multi_modal_projector.",),
        other=("model.image_newline",),
    ),
    Layout(
        name="llm",
        description="standalone causal LM (LlamaForCausalLM, MistralForCausalLM, …)",
        detect=r"^model\.layers\.",
        hf_prefixes=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        text_config_key=None,
    ),
    Layout(
        name="clip",
        description="standalone CLIP (CLIPModel / CLIPVisionModel): the vision tower LLaVA-1.5 names in mm_vision_tower",
        detect=None,
        hf_prefixes=(("vision_tower.vision_model.", "vision_model."),),
        vision=("vision_model.",),
        text_config_key=None,  # no language model
    ),
)


def layout_named(name: str) -> Layout:
    """The table's row called `name`."""
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise KeyError(f"no key layout {name!r}; the table has {', '.join(layout.name for layout in LAYOUTS)}")


def detect_layout(keys: Iterable[str]) -> Layout | None:
    """The first row (in table order) whose `detect` matches one of `keys`, or None."""
    keys = list(keys)
    for layout in LAYOUTS:
        if layout.detect is not None:
            rx = re.compile(layout.detect)
            if any(rx.match(k) for k in keys):
                return layout
    return None


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """`key` with its longest matching `old` prefix replaced by `new`; None when no prefix matches."""
    best = max((pair for pair in pairs if key.startswith(pair[0])), key=lambda pair: len(pair[0]), default=None)
    return None if best is None else best[1] + key[len(best[0]) :]


def to_hf(key: str, layout: Layout) -> str | None:
    """The llava-hf (transformers 4.x) name of `layout`'s `key`; None for a key outside the layout's prefixes."""
    return _rename(key, ((mine, hf) for hf, mine in layout.hf_prefixes))


def from_hf(key: str, layout: Layout) -> str | None:
    """`layout`'s name for the llava-hf (transformers 4.x) `key`; None for a key the layout does not name."""
    return _rename(key, layout.hf_prefixes)


def hf_key(key: str) -> str:
    """The llava-hf (transformers 4.x) name of a VLM or LLM key whatever layout it comes from.

    The row with the longest matching prefix decides (`model.language_model.` is llava-hf-v5's, `model.` an
    LLM's or original LLaVA's, `model.vision_tower.vision_model.` llava-hf-v5's and `model.vision_tower.`
    transformers 5's module name); rows name each prefix once, so no two rows disagree. A key no row names
    (a standalone CLIP's are not VLM keys) comes back unchanged.
    """
    pairs = [(mine, hf) for layout in LAYOUTS if layout.name != "clip" for hf, mine in layout.hf_prefixes]
    renamed = _rename(key, pairs)
    return key if renamed is None else renamed
