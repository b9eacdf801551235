"""VLM anatomy: which tensors of a checkpoint are the vision encoder, the projector and the language model.

Key layouts are data, in one table (`vlm_merge.architecture.layouts`): each row says how to recognise a
checkpoint and how its keys map onto the parts. Language-model keys are related to a standalone LLM's keys
("canonical" keys: `model.layers.N.…`, `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`)
by a prefix substitution, so one table row describes a whole layout. Unknown VLMs fall back to finding the
prefix under which a given base LLM's keys appear with equal shapes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm_merge.architecture.layouts import HF_LM, Layout, detect_layout
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import CheckpointReader, TensorInfo

VISION, PROJECTOR, LANGUAGE, OTHER, BUFFERS = "vision_tower", "projector", "language_model", "other", "buffers"

# Non-parameter buffers that some checkpoints store beside the weights (written by transformers < 4.31
# or by original training code: Llama-2-7b-hf and liuhaotian/llava-v1.5-7b store
# `model.layers.N.self_attn.rotary_emb.inv_freq`, float32 [64]; openai/clip-vit-large-patch14-336 stores
# `vision_model.embeddings.position_ids`, int64 [1, 577]). transformers recomputes them, so on every side
# (VLM, bases, vision tower) they are listed apart, never aligned or merged, and never written out.
# One row per buffer: (regex on a checkpoint key, what it is).
BUFFER_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)rotary_emb\.inv_freq$", "RoPE inverse frequencies"),
    (r"(^|\.)rotary_emb\.(cos|sin)_cached$", "RoPE cos/sin caches"),
    (r"(^|\.)position_ids$", "position ids of CLIP / BERT-style embeddings (int64)"),
)
_BUFFER_RE = re.compile("|".join(f"(?:{pattern})" for pattern, _ in BUFFER_PATTERNS))


def is_buffer(key: str) -> bool:
    """Whether `key` names a non-parameter buffer (see `BUFFER_PATTERNS`), not a weight."""
    return _BUFFER_RE.search(key) is not None


# Canonical LLM key -> role within the language model.
_LM_ROLES: tuple[tuple[str, str], ...] = (
    (r"^model\.embed_tokens\.", "embeddings"),
    (r"^lm_head\.", "lm_head"),
    (r"^model\.norm\.", "final_norm"),
    (r"^model\.layers\.\d+\.", "layers"),
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def lm_role(canonical: str) -> str:
    for pattern, role in _LM_ROLES:
        if re.match(pattern, canonical):
            return role
    return "other"


def layer_index(canonical: str) -> int | None:
    m = _LAYER_RE.match(canonical)
    return int(m.group(1)) if m else None


@dataclass
class Anatomy:
    """The parts of one checkpoint and how its language-model keys map to canonical LLM keys."""

    path: Path
    layout: Layout
    parts: dict[str, list[str]]  # part -> keys, in checkpoint order (BUFFERS: non-parameter buffers)
    lm_keys: dict[str, str]  # canonical LLM key -> checkpoint key
    infos: dict[str, TensorInfo]
    config: dict
    text_config: dict = field(default_factory=dict)

    @property
    def is_vlm(self) -> bool:
        return bool(self.parts[VISION] or self.parts[PROJECTOR])

    @property
    def num_layers(self) -> int:
        idx = [layer_index(c) for c in self.lm_keys]
        return max((i for i in idx if i is not None), default=-1) + 1

    @property
    def hidden_size(self) -> int | None:
        emb = self.lm_keys.get("model.embed_tokens.weight")
        return self.infos[emb].shape[1] if emb else self.text_config.get("hidden_size")

    @property
    def vocab_rows(self) -> int | None:
        emb = self.lm_keys.get("model.embed_tokens.weight")
        return self.infos[emb].shape[0] if emb else None

    def part_params(self, part: str) -> int:
        return sum(self.infos[k].numel for k in self.parts[part])

    def dtypes(self, part: str) -> list[str]:
        return sorted({str(self.infos[k].dtype).removeprefix("torch.") for k in self.parts[part]})

    def summary_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(part, tensors, parameters, dtype, key prefix) for a table."""
        rows = []
        prefixes = {
            VISION: ", ".join(self.layout.vision) or "-",
            PROJECTOR: ", ".join(self.layout.projector) or "-",
            LANGUAGE: ", ".join(p for p, _ in self.layout.lm_prefixes),
            OTHER: ", ".join(self.layout.other) or "-",
            BUFFERS: "not weights: recomputed by transformers, never merged or written",
        }
        for part in (VISION, PROJECTOR, LANGUAGE, OTHER, BUFFERS):
            keys = self.parts[part]
            if not keys:
                continue
            rows.append((part, str(len(keys)), f"{self.part_params(part):,}", "/".join(self.dtypes(part)), prefixes[part]))
        return rows


def _classify(keys: list[str], layout: Layout) -> tuple[dict[str, list[str]], dict[str, str]]:
    parts: dict[str, list[str]] = {VISION: [], PROJECTOR: [], LANGUAGE: [], OTHER: [], BUFFERS: []}
    lm_keys: dict[str, str] = {}
    table = (
        [(p, VISION) for p in layout.vision]
        + [(p, PROJECTOR) for p in layout.projector]
        + [(p, OTHER) for p in layout.other]
    )
    for key in keys:
        if is_buffer(key):
            parts[BUFFERS].append(key)
            continue
        part = next((pt for prefix, pt in table if key.startswith(prefix)), None)
        if part is None:
            for vlm_prefix, canon_prefix in layout.lm_prefixes:
                if key.startswith(vlm_prefix):
                    lm_keys[canon_prefix + key[len(vlm_prefix) :]] = key
                    part = LANGUAGE
                    break
        parts[part or OTHER].append(key)
    return parts, lm_keys


def _text_config(config: dict, layout: Layout) -> dict:
    if layout.text_config_key and isinstance(config.get(layout.text_config_key), dict):
        return config[layout.text_config_key]
    return config


def inspect_checkpoint(reader: CheckpointReader) -> Anatomy:
    """Name the parts of a checkpoint using the layout table (generic VLMs need `align_generic`)."""
    keys = reader.keys()
    config = reader.config()
    layout = detect_layout(keys) or Layout(
        name="unknown", description="no known layout; pass --base to locate the language model by shape", detect=None,
        hf_prefixes=(),
    )
    parts, lm_keys = _classify(keys, layout)
    return Anatomy(reader.path, layout, parts, lm_keys, reader.infos(), config, _text_config(config, layout))


def locate_language_model(vlm: CheckpointReader, base: CheckpointReader) -> Anatomy:
    """Generic fallback: find the prefix under which `base`'s decoder keys appear in `vlm` with equal shapes."""
    base_infos = base.infos()
    vlm_infos = vlm.infos()
    probe = next((k for k in base_infos if layer_index(k) is not None and not is_buffer(k)), None)
    if probe is None:
        raise VlmMergeError(f"{base.path}: no decoder layers (model.layers.N.*) found; is it a causal LM?")
    suffix = probe.removeprefix("model.")
    candidates = [k[: -len(suffix)] for k in vlm_infos if k.endswith(suffix)]
    best: tuple[int, str] | None = None
    for prefix in candidates:
        hits = sum(
            1
            for k, info in base_infos.items()
            if k.startswith("model.") and not is_buffer(k) and vlm_infos.get(prefix + k[6:], None) is not None
            and vlm_infos[prefix + k[6:]].shape == info.shape
        )
        if best is None or hits > best[0]:
            best = (hits, prefix)
    if best is None or best[0] == 0:
        raise VlmMergeError(
            f"{vlm.path}: cannot find the language model of {base.path} inside it (no key ends with {suffix!r})"
        )
    prefix = best[1]
    heads = [k[: -len("lm_head.weight")] for k in vlm_infos if k.endswith("lm_head.weight")]
    lm_prefixes = [(HF_LM + "model.", prefix)] + [(HF_LM + "lm_head.", h + "lm_head.") for h in heads[:1]]
    lm_set = {p for _, p in lm_prefixes}
    # Everything else is the vision side; keep the top-level module names as its prefixes.
    rest = Counter(k.split(".")[0] + "." for k in vlm_infos if not is_buffer(k) and not any(k.startswith(p) for p in lm_set))
    layout = Layout(
        name="generic",
        description=f"generic: language model found under {prefix!r} by matching {base.path.name}",
        detect=None,
        hf_prefixes=tuple(lm_prefixes),
        vision=tuple(sorted(rest)),
    )
    parts, lm_keys = _classify(vlm.keys(), layout)
    config = vlm.config()
    return Anatomy(vlm.path, layout, parts, lm_keys, vlm_infos, config, _text_config(config, layout))


def inspect_vlm(reader: CheckpointReader, base: CheckpointReader | None = None) -> Anatomy:
    """Anatomy of a VLM; errors if the checkpoint is a plain LLM or cannot be understood."""
    anatomy = inspect_checkpoint(reader)
    if anatomy.layout.name in ("unknown", "llm") and base is not None and anatomy.layout.name == "unknown":
        anatomy = locate_language_model(reader, base)
    if not anatomy.is_vlm:
        arch = ", ".join(anatomy.config.get("architectures") or []) or anatomy.layout.name
        raise VlmMergeError(
            f"{reader.path}: is not a vision-language model ({arch}: no vision tower or projector keys); "
            "pass the VLM (e.g. LLaVA) as --vlm and the plain LLMs as --en-base/--ja-base"
        )
    return anatomy


def inspect_llm(reader: CheckpointReader, role: str) -> Anatomy:
    anatomy = inspect_checkpoint(reader)
    if anatomy.layout.name != "llm":
        raise VlmMergeError(
            f"{reader.path}: expected a plain causal LM for {role}, found layout {anatomy.layout.name!r}"
        )
    return anatomy


@dataclass(frozen=True)
class Alignment:
    """Base LLM key -> VLM key for every language-model tensor, shapes checked."""

    pairs: dict[str, str]
    vocab_keys: tuple[str, ...]  # canonical keys whose first dimension is the vocabulary
    base_vocab_rows: int | None
    vlm_vocab_rows: int | None


def align(vlm: Anatomy, base: Anatomy) -> Alignment:
    """Pair the base LLM's tensors with the VLM's language-model tensors.

    Shapes must be equal except the vocabulary dimension of embeddings / lm_head (llava-hf adds image
    and pad rows; Japanese bases may extend the vocabulary). The first mismatch is reported by name.
    Buffers (`BUFFER_PATTERNS`) are in neither side's `lm_keys`, so one side storing them never matters.
    """
    pairs: dict[str, str] = {}
    for canon, base_key in base.lm_keys.items():
        vlm_key = vlm.lm_keys.get(canon)
        if vlm_key is None:
            if canon == "lm_head.weight" and vlm.text_config.get("tie_word_embeddings", False):
                continue
            raise VlmMergeError(
                f"{vlm.path}: has no tensor for base key {base_key!r} of {base.path}; "
                "is the base the LLM this VLM was tuned from?"
            )
        b_shape, v_shape = base.infos[base_key].shape, vlm.infos[vlm_key].shape
        if canon in VOCAB_KEYS:
            ok = len(b_shape) == len(v_shape) == 2 and b_shape[1] == v_shape[1]
        else:
            ok = b_shape == v_shape
        if not ok:
            raise VlmMergeError(
                f"shape mismatch at {base_key!r}: {base.path.name} has {list(b_shape)}, the VLM's "
                f"{vlm_key!r} has {list(v_shape)}; use the LLM the VLM was tuned from (same architecture and size)"
            )
        pairs[canon] = vlm_key
    missing = [c for c in vlm.lm_keys if c not in base.lm_keys]
    if missing:
        raise VlmMergeError(
            f"{base.path}: lacks {missing[0]!r}, which the VLM's language model has "
            f"({len(missing)} keys in all); is it the same architecture?"
        )
    vocab = tuple(c for c in VOCAB_KEYS if c in pairs)
    return Alignment(pairs, vocab, base.vocab_rows, vlm.vocab_rows)
