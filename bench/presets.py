"""The checkpoint shapes the Chat Vector benchmark can replicate (``--shape``), in one place.

A preset says everything the generated inputs depend on apart from the weights themselves: the
Llama shape of the three language models, the CLIP tower of the VLM, the dtype, the vocabulary rows
of the VLM, whether the bases store ``rotary_emb.inv_freq`` buffers, how each checkpoint is sharded,
and how the benchmark treats disk and page cache at that size.

``tinyllama`` (the default) is the historical benchmark: TinyLlama-1.1B shapes, bf16, equal
vocabularies, a 2-layer CLIP stand-in, 1 GB shards.

``llava-1.5-7b`` replicates the real trio of a Chat Vector Japanese LLaVA (``tests/real_layouts/lineages.json``):
VLM ``llava-hf/llava-1.5-7b-hf``, English base ``meta-llama/Llama-2-7b-hf``, Japanese base
``elyza/ELYZA-japanese-Llama-2-7b``. Everything about their structure is derived from the corpus of real
checkpoint layouts, ``tests/real_layouts/<org>--<name>/`` (every key with its full shape and dtype in state-dict
order, buffers included; the weight index, i.e. which key lives in which shard file; the repository's small text
files; the tokenizer kind and size; ``SOURCES.md`` says where each fact comes from and what is reconstructed),
with the corpus' own helpers (``tests/real_layouts/replica.py``: layer cut, shard spread, tokenizer). In short:
Llama-2-7b: 32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000, fp16, two shards
(``model-0000{1,2}-of-00002.safetensors``, index total_size 13,476,839,424) with 32 float32
``rotary_emb.inv_freq`` buffers; ELYZA: the same; llava-1.5-7b-hf: fp16, three shards, transformers-4.x keys
(``vision_tower.vision_model.*`` CLIP ViT-L/14-336, ``multi_modal_projector.linear_{1,2}``, ``language_model.*``),
embedding rows 32064 (<image> 32000, <pad> 32001, padded to 64), no buffers.

One deliberate difference: the corpus records ELYZA-japanese-Llama-2-7b as ``pytorch_model-0000N-of-00002.bin``
only; the benchmark writes it as safetensors with the same shard split (as a user converting it would), so that
every contender reads three safetensors checkpoints. A ``.bin`` Japanese base is not measured here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from bench.common import ClipShape, LlamaShape

GB = 10**9
CORPUS = Path(__file__).resolve().parent.parent / "tests" / "real_layouts"
ST_TO_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "I64": "int64"}


@dataclass(frozen=True)
class Preset:
    """One replicated trio of checkpoints (see the module docstring for the facts and sources)."""

    name: str
    llama: LlamaShape
    clip: ClipShape
    dtype: str  # torch dtype name of every tensor except inv_freq buffers (always float32)
    vlm_vocab_rows: int  # rows of the VLM's embed_tokens / lm_head (>= llama.vocab)
    image_token_index: int
    pad_token_index: int | None  # the VLM's pad token id (None: no pad token added)
    base_inv_freq: bool  # the bases store model.layers.N.self_attn.rotary_emb.inv_freq
    base_shard_bytes: int  # greedy shard cut of the bases, in state-dict order (without a corpus)
    vlm_shard_bytes: int  # greedy shard cut of the VLM (and of the standalone vlm_llm)
    max_positions: int
    rope_theta: float
    # Disk/cache plan at this size: the VLM and its standalone LLM never on disk together, inputs
    # evicted from the page cache before each run (they cannot stay in RAM) instead of read once.
    swap_vlm_llm: bool
    cold_cache: bool
    skip: dict[str, str]  # contender -> why it cannot run at this size
    # Checkpoint role ("en_base", "ja_base", "vlm") -> corpus repo id whose layout, index and files the inputs
    # replicate (empty: the generic layout above), and a digest of those entries (inputs regenerate when it changes).
    corpus: dict[str, str] | None = None
    corpus_digest: str = ""

    def with_layers(self, layers: int | None) -> Preset:
        """The preset cut to ``layers`` decoder layers; a corpus replica cuts every stack, the VLM's vision
        tower included (as ``tests/real_layouts/replica.py`` does)."""
        if layers is None or layers == self.llama.layers:
            return self
        clip = replace(self.clip, layers=min(layers, self.clip.layers)) if self.corpus else self.clip
        return replace(self, llama=replace(self.llama, layers=layers), clip=clip)


TINYLLAMA = Preset(
    name="tinyllama",
    llama=LlamaShape(layers=22, hidden=2048, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
    clip=ClipShape(),
    dtype="bfloat16",
    vlm_vocab_rows=32000,
    image_token_index=31999,
    pad_token_index=None,
    base_inv_freq=False,
    base_shard_bytes=GB,
    vlm_shard_bytes=GB,
    max_positions=2048,
    rope_theta=10000.0,
    swap_vlm_llm=False,
    cold_cache=False,
    skip={},
)

LLAVA_TRIO = {
    "vlm": "llava-hf/llava-1.5-7b-hf",
    "en_base": "meta-llama/Llama-2-7b-hf",
    "ja_base": "elyza/ELYZA-japanese-Llama-2-7b",
}


def corpus_dir(repo_id: str) -> Path:
    return CORPUS / repo_id.replace("/", "--")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def corpus_preset(name: str, trio: dict[str, str]) -> Preset:
    """A preset whose shapes, dtype, vocabulary rows and buffers come from the corpus entries of ``trio``."""
    from transformers import CLIPVisionConfig, LlamaConfig

    missing = [r for r in trio.values() if not (corpus_dir(r) / "layout.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no corpus entry for {', '.join(missing)} under {CORPUS}")
    digest = hashlib.sha256()
    for repo in trio.values():
        for f in [corpus_dir(repo) / "layout.json", *sorted((corpus_dir(repo) / "files").iterdir())]:
            if f.is_file():  # the facts, not SOURCES.md's wording
                digest.update(f.relative_to(CORPUS).as_posix().encode() + f.read_bytes())
    en_layout = _read(corpus_dir(trio["en_base"]) / "layout.json")["tensors"]
    vlm_layout = _read(corpus_dir(trio["vlm"]) / "layout.json")["tensors"]
    en = LlamaConfig(**_read(corpus_dir(trio["en_base"]) / "files" / "config.json"))
    vlm_cfg = _read(corpus_dir(trio["vlm"]) / "files" / "config.json")
    vision = CLIPVisionConfig(**vlm_cfg["vision_config"])
    rope = en.rope_parameters.get("rope_theta", 10000.0) if getattr(en, "rope_parameters", None) else 10000.0
    return Preset(
        name=name,
        llama=LlamaShape(layers=en.num_hidden_layers, hidden=en.hidden_size, intermediate=en.intermediate_size,
                         vocab=en.vocab_size, heads=en.num_attention_heads, kv_heads=en.num_key_value_heads),
        clip=ClipShape(layers=vision.num_hidden_layers, hidden=vision.hidden_size, intermediate=vision.intermediate_size,
                       heads=vision.num_attention_heads, image=vision.image_size, patch=vision.patch_size),
        dtype=ST_TO_TORCH[en_layout["model.embed_tokens.weight"][1]],
        vlm_vocab_rows=vlm_layout["language_model.model.embed_tokens.weight"][0][0],
        image_token_index=vlm_cfg["image_token_index"],
        pad_token_index=vlm_cfg.get("pad_token_id"),
        base_inv_freq=any(k.endswith("rotary_emb.inv_freq") for k in en_layout),
        base_shard_bytes=0,
        vlm_shard_bytes=0,
        max_positions=en.max_position_embeddings,
        rope_theta=float(rope),
        swap_vlm_llm=True,
        cold_cache=True,
        skip={"in-ram": "needs all three state dicts in RAM at once (~41 GB of fp16 inputs; this machine has 24 GB)"},
        corpus=dict(trio),
        corpus_digest=digest.hexdigest()[:16],
    )


PRESET_NAMES = (TINYLLAMA.name, "llava-1.5-7b")


def load_preset(name: str) -> Preset:
    """The preset called ``name`` (the 7B one is read from the corpus, which must be there)."""
    return TINYLLAMA if name == TINYLLAMA.name else corpus_preset(name, LLAVA_TRIO)
