"""Tiny random-weight checkpoints in every on-disk layout that users feed to vlm-merge.

`build_fixture_zoo(out_dir, seed)` writes, in well under ten seconds on a CPU, one directory per fixture.
All weights are random but deterministic (same seed -> byte-identical files), and every model of a family has
the same shapes, so they can be merged with each other the way the real checkpoints can.

LLMs (what a Chat Vector / evolutionary merge takes as its text models):

- ``en-llama``: mirrors ``meta-llama/Llama-2-7b-hf``. ``LlamaForCausalLM`` written by ``save_pretrained``
  (single ``model.safetensors``, ``config.json``, ``generation_config.json``) with a Llama-style tokenizer:
  ``<unk> <s> </s>`` at ids 0-2, the 256 byte-fallback tokens ``<0x00>``-``<0xFF>`` at ids 3-258, then
  English characters and words.
- ``ja-llama``: mirrors ``tokyotech-llm/Swallow-7b-hf`` (continued Japanese pretraining of Llama-2 with a
  vocabulary extended at the end): en-llama + small noise, with extra ``embed_tokens``/``lm_head`` rows for
  the appended Japanese tokens; the tokenizer keeps every English id unchanged.
- ``en-mistral``/``ja-mistral``: the same with ``MistralForCausalLM`` (GQA with 2 KV heads, ``sliding_window``).

VLMs (language model = the family's en LLM + small noise, i.e. "visual instruction tuning"; a CLIP vision
tower; a 2-layer GELU MLP projector). Each is one of two weight sets rendered in several key layouts, so
``llava-hf-llama``, ``llava-v5-llama`` and ``llava-original-llama`` hold the same tensors (the HF ones with
extra embedding rows for ``<image>``/``<pad>`` and padding to a multiple of 16), as the real conversions do:

- ``llava-hf-llama``: ``llava-hf/llava-1.5-7b-hf`` as saved by transformers 4.x: keys ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``;
  two safetensors shards with ``model.safetensors.index.json``; processor files (CLIP image processor).
- ``llava-v5-llama``: the same model in the transformers >= 4.52 layout (``model.language_model.*``,
  ``lm_head.weight``, ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``); one file.
- ``llava-next-hf-mistral``: ``llava-hf/llava-v1.6-mistral-7b-hf`` (``LlavaNextForConditionalGeneration``,
  4.x keys plus ``image_newline``, ``image_grid_pinpoints`` scaled to the tiny image size); two shards.
- ``llava-original-llama``: ``liuhaotian/llava-v1.5-7b`` (``LlavaLlamaForCausalLM``): Llama keys at the top
  (``model.*``, ``lm_head.weight``), projector ``model.mm_projector.{0,2}.*``, no vision tower (it is loaded
  from ``mm_vision_tower``), plain ``torch.save`` ``.bin`` shards with ``pytorch_model.bin.index.json``.
- ``llava-original-mistral``: ``liuhaotian/llava-v1.6-mistral-7b`` (``LlavaMistralForCausalLM``, anyres):
  as above plus ``model.image_newline`` and the fine-tuned tower under ``model.vision_tower.vision_tower.*``;
  safetensors shards.

``clip`` mirrors ``openai/clip-vit-large-patch14-336`` (a full ``CLIPModel``; its ``vision_model`` is the
vision tower of the llama-family VLMs, which LLaVA-1.5 kept frozen; LLaVA-1.6 fine-tuned it, so the mistral
family's tower is CLIP + noise). ``hf_cache`` holds the same files in the Hugging Face hub cache layout
(blobs + snapshot symlinks + ``refs/main``) under that repo id, so ``mm_vision_tower`` resolves offline.

Key layouts are not kept here: a fixture's weights are built under llava-hf (transformers 4.x) names and
rendered in its layout by the layout table (``vlm_merge.architecture.layouts``; ``VlmSpec.layout`` names a row).
The module is one public file (as transformers' ``testing_utils``) of about 580 lines: tokenizers, configs,
weights, writers and the zoo, each section short; splitting it would only spread the fixtures' shared constants.
"""

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaNextConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)

from vlm_merge.architecture.layouts import HF_LM, from_hf, layout_named, to_hf
from vlm_merge.io.convert import CHAT_TEMPLATES

CLIP_REPO_ID = "openai/clip-vit-large-patch14-336"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
FAMILIES = ("llama", "mistral")

INIT_STD = 0.02  # random init, as `initializer_range`
TUNE_STD = 0.002  # "fine-tuning" noise added to a parent's weights
VOCAB_PAD_MULTIPLE = 16  # VLM embedding rows are padded past the tokenizer length to a multiple of this
MAX_LENGTH = 2048

# ---------------------------------------------------------------- tokenizers
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # Llama's byte-fallback pieces, ids 3-258
EN_CHARS = tuple("▁abcdefghijklmnopqrstuvwxyz.,?!")
EN_WORDS = (
    "▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "▁image", "▁what",
    "▁this", "▁cat", "▁dog", "▁picture", "▁describe",
)  # fmt: skip
JA_CHARS = tuple(
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめも"
    "やゆよらりるれろわをんがでだじっアイカクストルンー。、"
    "猫犬画像写真何日本語人色赤青白黒上下中大小車花山川水木女男子"
)
JA_WORDS = ("これは", "です", "ます", "この", "画像", "写真", "日本語")
TOKENIZER_KINDS = ("en", "ja", "vlm")  # vlm: en + the added tokens <image>, <pad> (as llava-hf)


def _extend_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], chars: tuple[str, ...], words: tuple[str, ...]
) -> None:
    """Append `chars` and then `words` to a BPE vocab in place; each word is built by left-to-right merges."""
    for char in chars:
        vocab.setdefault(char, len(vocab))
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))


def build_tokenizer(kind: str) -> Tokenizer:
    """A Llama-style byte-fallback BPE tokenizer of `kind` (one of TOKENIZER_KINDS).

    The pipeline is exactly the one transformers' LlamaTokenizer rebuilds from vocab + merges, so the
    tokenizer encodes the same whether transformers loads it as LlamaTokenizer or as TokenizersBackend.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    merges: list[tuple[str, str]] = []
    _extend_bpe(vocab, merges, EN_CHARS, EN_WORDS)
    if kind == "ja":
        _extend_bpe(vocab, merges, JA_CHARS, JA_WORDS)
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    added = SPECIAL_TOKENS + ((IMAGE_TOKEN, PAD_TOKEN) if kind == "vlm" else ())
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    return tokenizer


def write_tokenizer(out_dir: str | Path, kind: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json of `kind` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(kind).save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if kind == "vlm":
        special["pad_token"] = PAD_TOKEN
    config = {
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "LlamaTokenizer",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def vocab_sizes() -> dict[str, int]:
    """Tokenizer lengths by kind, plus "vlm-rows": the VLM embedding rows (vlm length padded to VOCAB_PAD_MULTIPLE)."""
    sizes = {kind: build_tokenizer(kind).get_vocab_size(with_added_tokens=True) for kind in TOKENIZER_KINDS}
    sizes["vlm-rows"] = (sizes["vlm"] // VOCAB_PAD_MULTIPLE + 1) * VOCAB_PAD_MULTIPLE
    return sizes


# ---------------------------------------------------------------- configs
TEXT_FIELDS = {  # the tiny text models; also the top-level text fields of original-LLaVA configs
    family: {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "initializer_range": INIT_STD,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        **extra,
    }
    for family, extra in {
        "llama": {"num_key_value_heads": 4, "max_position_embeddings": 4096},
        "mistral": {"num_key_value_heads": 2, "max_position_embeddings": 32768, "sliding_window": 32},
    }.items()
}
TEXT_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
VISION_FIELDS = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 16,
    "hidden_act": "quick_gelu",
}
CLIP_TEXT_FIELDS = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 16,
    "pad_token_id": 1,
    "bos_token_id": 62,
    "eos_token_id": 63,
}
CLIP_IMAGE_STATS = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# llava-v1.6 pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] scaled from 336 to 32 px
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
IMAGE_SEQ_LENGTH = (VISION_FIELDS["image_size"] // VISION_FIELDS["patch_size"]) ** 2  # "default" drops CLS
# HF VLM config flavours: config class, extra config kwargs, image processor settings (llava-hf's)
HF_VLM_FLAVOURS: dict[str, tuple[type[PreTrainedConfig], dict, dict]] = {
    "llava": (LlavaConfig, {}, {"image_processor_type": "CLIPImageProcessor"}),
    "llava_next": (
        LlavaNextConfig,
        {"image_grid_pinpoints": GRID_PINPOINTS},
        {"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": GRID_PINPOINTS, "do_pad": True},
    ),
}
ORIGINAL_LLAVA_FIELDS = {  # haotian-liu LLaVA config.json fields beyond the text model's
    "freeze_mm_mlp_adapter": False,
    "tune_mm_mlp_adapter": False,
    "use_mm_proj": True,
    "mm_hidden_size": VISION_FIELDS["hidden_size"],
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_vision_tower": CLIP_REPO_ID,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "tokenizer_model_max_length": MAX_LENGTH,
    "tokenizer_padding_side": "right",
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "use_cache": True,
}
ORIGINAL_LLAVA_VERSION_FIELDS = {
    "llama": {"image_aspect_ratio": "pad", "transformers_version": "4.31.0"},  # LLaVA-1.5
    "mistral": {  # LLaVA-1.6 (NeXT)
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": GRID_PINPOINTS,
        "mm_patch_merge_type": "spatial_unpad",
        "unfreeze_mm_vision_tower": True,
        "mm_vision_tower_lr": 2e-6,
        "transformers_version": "4.36.2",
    },
}


def text_config(family: str, vocab_size: int, **overrides: object) -> PreTrainedConfig:
    """The tiny LlamaConfig / MistralConfig of `family` with `vocab_size` embedding rows."""
    config_class, _ = TEXT_CLASSES[family]
    return config_class(**TEXT_FIELDS[family], vocab_size=vocab_size, **overrides)


def clip_config() -> CLIPConfig:
    """The tiny CLIPConfig standing in for openai/clip-vit-large-patch14-336."""
    return CLIPConfig(
        text_config=CLIP_TEXT_FIELDS, vision_config=VISION_FIELDS, projection_dim=VISION_FIELDS["projection_dim"]
    )


# ---------------------------------------------------------------- weights
def _generator(seed: int, tag: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{tag}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name == "logit_scale":
        return torch.tensor(2.6592)  # log(1 / 0.07), CLIP's init
    noise = torch.randn(shape, generator=generator) * INIT_STD
    is_norm_weight = name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
    return noise + 1.0 if is_norm_weight else noise


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int, tag: str) -> dict[str, torch.Tensor]:
    """Random float32 tensors (norm weights near 1), each from a generator seeded by (seed, tag, name)."""
    return {name: _init(name, shape, _generator(seed, tag, name)) for name, shape in sorted(shapes.items())}


def tune_state_dict(
    parent: Mapping[str, torch.Tensor], seed: int, tag: str, vocab_rows: int | None = None
) -> dict[str, torch.Tensor]:
    """`parent` + small noise ("fine-tuning"); with `vocab_rows`, embed_tokens/lm_head get new rows up to that many."""
    out = {}
    for name, tensor in sorted(parent.items()):
        generator = _generator(seed, tag, name)
        if vocab_rows is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = torch.cat([tensor, _init(name, (vocab_rows - len(tensor), *tensor.shape[1:]), generator)])
        out[name] = tensor + torch.randn(tensor.shape, generator=generator) * TUNE_STD
    return out


def model_shapes(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of `model_class(config)`, built on the meta device (no memory, no RNG)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def write_state_dict(
    state: Mapping[str, torch.Tensor], out_dir: str | Path, fmt: str = "safetensors", shards: int = 1
) -> None:
    """Write `state` the way HF checkpoints are stored.

    fmt "safetensors" (model.safetensors / model-0000i-of-0000n.safetensors) or "bin" (torch.save of plain
    tensor dicts, pytorch_model*.bin). With shards > 1 the sorted keys are split evenly and the index
    (weight_map, metadata.total_size = sum of tensor bytes) is written next to the shards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem, ext = {"safetensors": ("model", "safetensors"), "bin": ("pytorch_model", "bin")}[fmt]
    names = sorted(state)
    weight_map = {}
    for shard in range(shards):
        filename = f"{stem}-{shard + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        part_names = names[shard * len(names) // shards : (shard + 1) * len(names) // shards]
        part = {name: state[name].contiguous() for name in part_names}
        if fmt == "safetensors":
            save_file(part, out / filename, metadata={"format": "pt"})
        else:
            torch.save(part, out / filename)
        weight_map.update(dict.fromkeys(part_names, filename))
    if shards > 1:
        total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        _write_json(out / f"{stem}.{ext}.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_pretrained(
    model_class: type[PreTrainedModel], config: PreTrainedConfig, state: Mapping[str, torch.Tensor], out_dir: Path
) -> None:
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(dict(state), assign=True, strict=True)
    model.save_pretrained(out_dir)


# ---------------------------------------------------------------- LLMs and CLIP
def write_llm(out_dir: str | Path, family: str, state: Mapping[str, torch.Tensor], tokenizer_kind: str) -> None:
    """Save a causal LM of `family` holding `state` with `save_pretrained`, plus the `tokenizer_kind` tokenizer."""
    vocab_rows = len(state["model.embed_tokens.weight"])
    _save_pretrained(TEXT_CLASSES[family][1], text_config(family, vocab_rows), state, Path(out_dir))
    write_tokenizer(out_dir, tokenizer_kind)


def write_llama_family(root: str | Path, names: tuple[str, ...] = ("base", "a", "b", "c"), tag: str = "mk") -> dict[str, Path]:
    """A base Llama (`names[0]`) and fine-tunes of it (the rest), English tokenizer, one directory each under `root`:
    the local stand-ins for mergekit examples' model ids. Deterministic: the same `tag` gives the same weights."""
    shapes = model_shapes(TEXT_CLASSES["llama"][1], text_config("llama", vocab_sizes()["en"]))
    base = random_state_dict(shapes, 0, f"{tag}-{names[0]}")
    out = {}
    for i, name in enumerate(names):
        out[name] = Path(root) / name
        write_llm(out[name], "llama", base if i == 0 else tune_state_dict(base, 0, f"{tag}-{name}"), "en")
    return out


def write_clip(out_dir: str | Path, state: Mapping[str, torch.Tensor]) -> None:
    """Save a CLIPModel holding `state` plus the openai repo's legacy-style preprocessor_config.json."""
    out = Path(out_dir)
    _save_pretrained(CLIPModel, clip_config(), state, out)
    size = VISION_FIELDS["image_size"]
    preprocessor = {
        **CLIP_IMAGE_STATS,
        "crop_size": size,
        "size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "resample": 3,
    }
    _write_json(out / "preprocessor_config.json", preprocessor)


def write_hf_cache(cache_dir: str | Path, repo_id: str, files_dir: str | Path) -> str:
    """Store the files of `files_dir` in a hub cache (HF_HUB_CACHE layout) as `repo_id`; return the commit hash.

    Layout: models--{org}--{name}/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
    refs/main = <commit>; the commit is derived from the contents, so the cache is deterministic too.
    """
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(path for path in Path(files_dir).iterdir() if path.is_file())
    blobs = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    commit = hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for directory in (repo / "blobs", repo / "refs", snapshot):
        directory.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, repo / "blobs" / blobs[path.name])
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "blobs", blobs[path.name]))
    (repo / "refs" / "main").write_text(commit)
    return commit


# ---------------------------------------------------------------- VLMs
@dataclass(frozen=True)
class VlmSpec:
    """How one VLM fixture is stored."""

    family: str  # "llama" (LLaVA-1.5 recipe) | "mistral" (LLaVA-1.6 recipe)
    flavour: str  # key of HF_VLM_FLAVOURS, or "original" (haotian-liu config, no added tokens)
    layout: str  # a row of the layout table (vlm_merge.architecture.layouts)
    fmt: str  # "safetensors" | "bin"
    shards: int
    vision_tower: bool = True  # False: no tower stored (LLaVA-1.5 loads it from mm_vision_tower)


VLMS = {
    "llava-hf-llama": VlmSpec("llama", "llava", "llava-hf", "safetensors", 2),
    "llava-v5-llama": VlmSpec("llama", "llava", "llava-hf-v5", "safetensors", 1),
    "llava-next-hf-mistral": VlmSpec("mistral", "llava_next", "llava-hf", "safetensors", 2),
    "llava-original-llama": VlmSpec("llama", "original", "llava-original", "bin", 2, vision_tower=False),
    "llava-original-mistral": VlmSpec("mistral", "original", "llava-original", "safetensors", 2),
}


def rename_keys(state: Mapping[str, torch.Tensor], layout: str, vision_tower: bool = True) -> dict[str, torch.Tensor]:
    """Render llava-hf 4.x VLM keys in `layout` (a row of the layout table); without `vision_tower`, drop the tower."""
    row, hf_tower = layout_named(layout), layout_named("llava-hf").vision
    return {
        from_hf(name, row) or name: tensor
        for name, tensor in state.items()
        if vision_tower or not name.startswith(hf_tower)
    }


def vlm_state_dict(
    family: str, llm: Mapping[str, torch.Tensor], clip: Mapping[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Canonical-key weights of the family's LLaVA: tuned `llm` (rows for <image>/<pad>/padding), tower, projector."""
    tag = f"llava-{family}"
    text_hidden, vision_hidden = TEXT_FIELDS[family]["hidden_size"], VISION_FIELDS["hidden_size"]
    tower_keys = {name: to_hf(name, layout_named("clip")) for name in clip}  # CLIPModel's vision_model.* only
    tower = {new: clip[name] for name, new in tower_keys.items() if new is not None}
    new_shapes = {
        "multi_modal_projector.linear_1.weight": (text_hidden, vision_hidden),
        "multi_modal_projector.linear_1.bias": (text_hidden,),
        "multi_modal_projector.linear_2.weight": (text_hidden, text_hidden),
        "multi_modal_projector.linear_2.bias": (text_hidden,),
    }
    if family == "mistral":  # LLaVA-1.6: anyres newline embedding; the vision tower was fine-tuned too
        new_shapes["image_newline"] = (text_hidden,)
        tower = tune_state_dict(tower, seed, tag)
    text = tune_state_dict(llm, seed, tag, vocab_rows=vocab_sizes()["vlm-rows"])
    return {
        **{HF_LM + name: tensor for name, tensor in text.items()},
        **tower,
        **random_state_dict(new_shapes, seed, tag),
    }


def _write_hf_vlm_files(out: Path, spec: VlmSpec) -> None:
    """config, generation config, tokenizer and processor files of an HF-format VLM, as llava-hf ships them."""
    config_class, config_extra, image_processor = HF_VLM_FLAVOURS[spec.flavour]
    tokenizer = build_tokenizer("vlm")
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    config = config_class(
        text_config=text_config(spec.family, vocab_sizes()["vlm-rows"], pad_token_id=pad_id),
        vision_config=CLIPVisionConfig(**VISION_FIELDS),
        image_token_index=tokenizer.token_to_id(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_SEQ_LENGTH,
        **config_extra,
    )
    config.architectures = [config_class.__name__.replace("Config", "ForConditionalGeneration")]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=pad_id).save_pretrained(out)
    write_tokenizer(out, "vlm")
    processor_class = config_class.__name__.replace("Config", "Processor")
    size = VISION_FIELDS["image_size"]
    preprocessor = {
        **CLIP_IMAGE_STATS,
        **image_processor,
        "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "processor_class": processor_class,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    processor = {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,  # CLIP's CLS token
        "patch_size": VISION_FIELDS["patch_size"],
        "processor_class": processor_class,
        "vision_feature_select_strategy": "default",
    }
    _write_json(out / "preprocessor_config.json", preprocessor)
    _write_json(out / "processor_config.json", processor)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[spec.family], encoding="utf-8")


def _write_original_vlm_files(out: Path, spec: VlmSpec) -> None:
    """config (text fields at top level + mm_* fields), generation config and the LLM's tokenizer of original LLaVA."""
    config = {
        **TEXT_FIELDS[spec.family],
        **ORIGINAL_LLAVA_FIELDS,
        **ORIGINAL_LLAVA_VERSION_FIELDS[spec.family],
        "architectures": [f"Llava{spec.family.capitalize()}ForCausalLM"],
        "model_type": f"llava_{spec.family}",
        "vocab_size": vocab_sizes()["en"],
    }
    _write_json(out / "config.json", config)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    write_tokenizer(out, "en")


def write_vlm(out_dir: str | Path, spec: VlmSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Write one VLM fixture from canonical-key `state` as `spec` says.

    Weights in the spec's key layout, format and shards, then config, tokenizer and (HF formats) processor
    files. Original LLaVA added no tokens, so its embeddings keep only the LLM's rows.
    """
    out = Path(out_dir)
    if spec.flavour == "original":
        rows = vocab_sizes()["en"]
        state = {
            name: tensor[:rows] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else tensor
            for name, tensor in state.items()
        }
    write_state_dict(rename_keys(state, spec.layout, spec.vision_tower), out, spec.fmt, spec.shards)
    (_write_original_vlm_files if spec.flavour == "original" else _write_hf_vlm_files)(out, spec)


# ---------------------------------------------------------------- the zoo
@dataclass(frozen=True)
class FixtureZoo:
    """Paths of a built fixture zoo (see the module docstring for what each fixture mirrors)."""

    root: Path
    llms: dict[str, Path]  # "en-llama", "ja-llama", "en-mistral", "ja-mistral"
    vlms: dict[str, Path]  # the keys of VLMS
    vlm_family: dict[str, str]  # vlm name -> "llama" | "mistral"
    clip: Path  # standalone CLIP checkpoint dir
    hf_cache: Path  # HF_HUB_CACHE-layout dir holding the CLIP as CLIP_REPO_ID


def build_fixture_zoo(out_dir: str | Path, seed: int = 0) -> FixtureZoo:
    """Write every fixture under `out_dir` (created if missing, overwritten if built before); return their paths."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = vocab_sizes()
    clip_state = random_state_dict(model_shapes(CLIPModel, clip_config()), seed, "clip")
    write_clip(root / "clip", clip_state)
    write_hf_cache(root / "hf-cache", CLIP_REPO_ID, root / "clip")

    llms: dict[str, Path] = {}
    vlm_states: dict[str, dict[str, torch.Tensor]] = {}
    for family in FAMILIES:
        shapes = model_shapes(TEXT_CLASSES[family][1], text_config(family, sizes["en"]))
        en_state = random_state_dict(shapes, seed, f"en-{family}")
        ja_state = tune_state_dict(en_state, seed, f"ja-{family}", vocab_rows=sizes["ja"])
        for lang, state in (("en", en_state), ("ja", ja_state)):
            llms[f"{lang}-{family}"] = root / f"{lang}-{family}"
            write_llm(llms[f"{lang}-{family}"], family, state, lang)
        vlm_states[family] = vlm_state_dict(family, en_state, clip_state, seed)

    for name, spec in VLMS.items():
        write_vlm(root / name, spec, vlm_states[spec.family])
    return FixtureZoo(
        root=root,
        llms=llms,
        vlms={name: root / name for name in VLMS},
        vlm_family={name: spec.family for name, spec in VLMS.items()},
        clip=root / "clip",
        hf_cache=root / "hf-cache",
    )
