"""The checkpoint shapes the Chat Vector benchmark can replicate (``--shape``), in one place.

A preset says everything the generated inputs depend on apart from the weights themselves: the
Llama shape of the three language models, the CLIP tower of the VLM, the dtype, the vocabulary rows
of the VLM, whether the bases store ``rotary_emb.inv_freq`` buffers, how each checkpoint is sharded,
and how the benchmark treats disk and page cache at that size.

``tinyllama`` (the default) is the historical benchmark: TinyLlama-1.1B shapes, bf16, equal
vocabularies, a 2-layer CLIP stand-in, 1 GB shards.

``llava-1.5-7b`` replicates the real trio of a Chat Vector Japanese LLaVA:

* English base ``meta-llama/Llama-2-7b-hf``: LlamaForCausalLM, 32 layers, hidden 4096, intermediate
  11008, 32 heads (no GQA), vocab 32000, fp16, ``model-0000{1,2}-of-00002.safetensors`` with
  ``model.safetensors.index.json`` (total_size 13,476,839,424 = 6,738,415,616 fp16 parameters plus
  32 x 64 float32 ``model.layers.N.self_attn.rotary_emb.inv_freq`` buffers; the index and the
  inv_freq entries are quoted in public code: Chinese write-ups of the Llama-2-7b-hf file layout and
  a converter listing its weight_map, found with ``find_string``). Shards are cut greedily at 10 GB in
  state-dict order, as transformers 4.31 (``transformers_version`` of the checkpoint) did; this puts
  layers 0-23 into the first shard (9.98 GB, as the hub lists it).
* Japanese base ``elyza/ELYZA-japanese-Llama-2-7b``: continued pre-training of Llama-2-7b with the
  same tokenizer (vocab 32000; the ``-fast`` variant is the one with 45043 tokens), saved by the same
  transformers generation, so the same shapes, shards and inv_freq buffers. Not verified from a
  public index file (none found with the search tools): reconstructed from Llama-2-7b-hf.
* VLM ``llava-hf/llava-1.5-7b-hf``: LlavaForConditionalGeneration, fp16, transformers-4.x keys
  (``language_model.model.*``, ``language_model.lm_head.weight``, ``multi_modal_projector.*``,
  ``vision_tower.vision_model.*``), no inv_freq, 3 shards ``model-0000N-of-00003.safetensors`` cut at
  5 GB (the default ``max_shard_size`` of the transformers that converted it). Embedding and lm_head
  have 32064 rows: transformers' ``convert_llava_weights_to_hf.py`` adds ``<image>`` (32000) and
  ``<pad>`` (32001) to the Llama-2 tokenizer and resizes the embeddings with ``pad_to_multiple_of=64``
  (``image_token_index`` 32000, ``pad_token_id`` 32001). Projector ``linear_1`` [4096, 1024] and
  ``linear_2`` [4096, 4096] with biases. Vision tower: CLIP ViT-L/14-336 (24 layers, hidden 1024,
  intermediate 4096, 16 heads, 336 px / patch 14 = 577 positions, ``pre_layrnorm`` (sic) and
  ``post_layernorm``); llava uses layer -2 but stores all 24.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import ClipShape, LlamaShape

GB = 10**9


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
    base_shard_bytes: int  # greedy shard cut of the bases, in state-dict order
    vlm_shard_bytes: int  # greedy shard cut of the VLM (and of the standalone vlm_llm)
    tokenizers: bool  # write tokenizers (needed when the VLM has more rows than the bases)
    max_positions: int
    rope_theta: float
    # Disk/cache plan at this size: the VLM and its standalone LLM never on disk together, inputs
    # evicted from the page cache before each run (they cannot stay in RAM) instead of read once.
    swap_vlm_llm: bool
    cold_cache: bool
    skip: dict[str, str]  # contender -> why it cannot run at this size

    def with_layers(self, layers: int | None) -> Preset:
        if layers is None or layers == self.llama.layers:
            return self
        from dataclasses import replace

        return replace(self, llama=replace(self.llama, layers=layers))


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
    tokenizers=False,
    max_positions=2048,
    rope_theta=10000.0,
    swap_vlm_llm=False,
    cold_cache=False,
    skip={},
)

LLAVA_1_5_7B = Preset(
    name="llava-1.5-7b",
    llama=LlamaShape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
    clip=ClipShape(layers=24, hidden=1024, intermediate=4096, heads=16, image=336, patch=14),
    dtype="float16",
    vlm_vocab_rows=32064,
    image_token_index=32000,
    pad_token_index=32001,
    base_inv_freq=True,
    base_shard_bytes=10 * GB,
    vlm_shard_bytes=5 * GB,
    tokenizers=True,
    max_positions=4096,
    rope_theta=10000.0,
    swap_vlm_llm=True,
    cold_cache=True,
    skip={"in-ram": "needs all three state dicts in RAM at once (~41 GB of fp16 inputs; this machine has 24 GB)"},
)

PRESETS = {p.name: p for p in (TINYLLAMA, LLAVA_1_5_7B)}
