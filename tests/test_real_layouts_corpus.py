"""The corpus of real checkpoint layouts (tests/real_layouts) against transformers, and its replicas.

Each layout.json must list exactly the keys and shapes transformers' own class builds from the entry's config
(on the meta device), after the entry's key renames (transformers 4.x -> 5 names) and apart from the buffers old
transformers versions saved (inv_freq, position_ids) and keys transformers has no module for (original LLaVA's
mm_projector). Each replica must load with transformers' classes and keep the real vocabulary sizes, special ids,
file names, dtypes and buffers.
"""

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from tests.real_layouts.replica import (
    DTYPES,
    LAYER_INDEX,
    base_vocab_size,
    build_replica,
    entry_names,
    install_in_hf_cache,
    load_entry,
    real_size_bytes,
)
from vlm_merge.architecture.layouts import from_hf, layout_named

ENTRIES = entry_names()
HF5_MODULES = layout_named("llava-hf-v5-modules")  # the layout table's names of what transformers 5 builds
SAVED_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|embeddings\.position_ids)$")  # persistent in old transformers
NOT_IN_TRANSFORMERS = re.compile(r"^model\.mm_projector\.")  # original LLaVA's projector
TEXT_ONLY_FIELDS = ("mm_", "image_aspect_ratio", "tune_mm", "freeze_mm", "use_mm_proj")


def _check_class(entry) -> tuple[type, object]:
    """The transformers model class and config the entry's layout must match."""
    config = dict(entry.config)
    architecture = config["architectures"][0]
    if architecture == "LlavaLlamaForCausalLM":  # original LLaVA: a Llama LM + projector transformers lacks
        config = {k: v for k, v in config.items() if not k.startswith(TEXT_ONLY_FIELDS) and k != "model_type"}
        return transformers.LlamaForCausalLM, transformers.LlamaConfig.from_dict(config)
    model_class = getattr(transformers, architecture)
    return model_class, model_class.config_class.from_dict(config)


def _to_hf5(key: str) -> str:
    return from_hf(key, HF5_MODULES) or key


def _is_hf4_vlm(entry) -> bool:
    return any(key.startswith("language_model.") for key in entry.layout["tensors"])


@pytest.mark.parametrize("name", ENTRIES)
def test_layout_matches_transformers_on_meta_device(name):
    entry = load_entry(name)
    model_class, config = _check_class(entry)
    with torch.device("meta"):
        model = model_class(config)
    built = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    rename = _to_hf5 if _is_hf4_vlm(entry) else (lambda key: key)
    listed = {
        rename(key): shape
        for key, (shape, _) in entry.layout["tensors"].items()
        if not SAVED_BUFFERS.search(key) and not NOT_IN_TRANSFORMERS.search(key)
    }
    assert sorted(set(listed) ^ set(built)) == []
    assert {key: shape for key, shape in listed.items() if built[key] != shape} == {}


@pytest.mark.parametrize("name", ENTRIES)
def test_layout_is_consistent_with_its_files(name):
    entry = load_entry(name)
    tensors = entry.layout["tensors"]
    assert {dtype for _, dtype in tensors.values()} <= set(DTYPES)
    weights = entry.layout["weights"]
    index_name = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}[weights["format"]]
    index_path = entry.files_dir / index_name
    if len(weights["files"]) > 1:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        assert set(index["weight_map"]) == set(tensors)
        assert sorted(set(index["weight_map"].values())) == sorted(weights["files"])
        assert index["metadata"]["total_size"] == real_size_bytes(entry)
    for key, (shape, _) in tensors.items():
        if key.endswith("inv_freq"):
            assert len(shape) == 1 and tensors[key][1] == "F32"
        if key.endswith("position_ids"):
            assert shape[0] == 1 and tensors[key][1] == "I64"


def test_quoted_real_totals():
    """The two total_size values quoted from the real indexes follow from the listed shapes and dtypes."""
    assert real_size_bytes(load_entry("meta-llama/Llama-2-7b-hf")) == 13_476_839_424
    assert real_size_bytes(load_entry("liuhaotian/llava-v1.5-7b")) == 13_518_798_848


def _replica_state(path, layout):
    """Key -> tensor of the replica's primary weight files."""
    state = {}
    for name in sorted(p.name for p in path.iterdir()):
        if name.endswith(".safetensors") and layout["weights"]["format"] == "safetensors":
            with safe_open(path / name, "pt") as handle:
                state |= {key: handle.get_tensor(key) for key in handle.keys()}
        elif name.endswith(".bin") and layout["weights"]["format"] == "bin":
            state |= torch.load(path / name, weights_only=True)
    return state


@pytest.mark.parametrize("name", ENTRIES)
def test_replica_keeps_real_names_dtypes_buffers_and_vocabulary(name, tmp_path):
    entry = load_entry(name)
    path = build_replica(name, tmp_path / "replica", layers=2)
    layout = entry.layout
    state = _replica_state(path, layout)
    kept = {key for key in layout["tensors"] if (m := LAYER_INDEX.search(key)) is None or int(m.group(1)) < 2}
    assert set(state) == kept
    assert {key: str(t.dtype) for key, t in state.items() if t.dtype != DTYPES[layout["tensors"][key][1]]} == {}
    for key, tensor in state.items():
        if key.endswith("inv_freq"):
            head_dim = 2 * len(tensor)
            assert torch.equal(tensor, 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        if key.endswith("position_ids"):
            assert torch.equal(tensor[0], torch.arange(tensor.shape[1]))
    stem = "model" if layout["weights"]["format"] == "safetensors" else "pytorch_model"
    files = sorted(p.name for p in path.glob(f"{stem}*.{layout['weights']['format']}"))
    assert all(re.fullmatch(rf"{stem}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)", f) for f in files)
    assert (len(files) > 1) == (path / f"{stem}.{layout['weights']['format']}.index.json").is_file()
    vocab_rows = {t.shape[0] for key, t in state.items() if key.endswith(("embed_tokens.weight", "lm_head.weight"))}
    config = AutoConfig.from_pretrained(path) if "mm_vision_tower" not in entry.config else None
    if config is not None and vocab_rows:
        assert vocab_rows == {config.get_text_config().vocab_size}
    tokenizer_spec = layout["tokenizer"]
    if tokenizer_spec["kind"] == "none":
        return
    tokenizer = AutoTokenizer.from_pretrained(path)
    added = tokenizer_spec.get("added_tokens", [])
    assert len(tokenizer) == max([base_vocab_size(tokenizer_spec) - 1, *(t["id"] for t in added)]) + 1
    for token in [*tokenizer_spec["special_tokens"].values(), *added]:
        assert tokenizer.convert_tokens_to_ids(token["content"]) == token["id"]
    ids = tokenizer("What color is the cat? この画像は何色ですか").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) > 3


@pytest.mark.parametrize("name", [n for n in ENTRIES if "mm_vision_tower" not in load_entry(n).config])
def test_replica_loads_with_transformers_classes(name, tmp_path):
    entry = load_entry(name)
    path = build_replica(name, tmp_path / "replica", layers=2)
    model_class = getattr(transformers, entry.config["architectures"][0])
    model, info = model_class.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not [key for key in info["unexpected_keys"] if not SAVED_BUFFERS.search(key)]
    if (path / "processor_config.json").is_file() or (path / "chat_template.json").is_file():
        processor = transformers.AutoProcessor.from_pretrained(path)
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == entry.config["image_token_index"]


def test_original_llava_finds_its_tower_in_the_hub_cache(tmp_path):
    """llava-v1.5-7b's mm_vision_tower resolves offline to the CLIP replica installed in a hub cache."""
    llava = load_entry("liuhaotian/llava-v1.5-7b")
    tower_id = llava.config["mm_vision_tower"]
    clip = build_replica(tower_id, tmp_path / "clip", layers=2)
    commit = install_in_hf_cache(tmp_path / "hub", tower_id, clip)
    snapshot = tmp_path / "hub" / f"models--{tower_id.replace('/', '--')}" / "snapshots" / commit
    tower = transformers.CLIPVisionModel.from_pretrained(snapshot)
    assert tower.config.hidden_size * 32 == llava.config["mm_hidden_size"]
    assert (tmp_path / "hub" / "models--openai--clip-vit-large-patch14-336" / "refs" / "main").read_text() == commit


@pytest.mark.slow
def test_full_width_replica_has_the_real_shapes(tmp_path):
    """width_divisor=1 keeps every real shape (CLIP at one layer per stack: ~0.3 GB)."""
    entry = load_entry("openai/clip-vit-large-patch14-336")
    path = build_replica(entry.repo_id, tmp_path / "clip", layers=1, width_divisor=1)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    real = {key: shape for key, (shape, _) in entry.layout["tensors"].items() if ".layers." not in key or ".layers.0." in key}
    assert {key: list(t.shape) for key, t in state.items()} == real
    model = transformers.CLIPModel.from_pretrained(path)
    assert model.config.vision_config.hidden_size == 1024 and model.config.text_config.vocab_size == 49408


def test_lineages_name_compatible_bases():
    """Every VLM's en_base and ja_bases with a corpus entry have the VLM language model's architecture and widths."""
    lineages = json.loads((load_entry(ENTRIES[0]).path.parent / "lineages.json").read_text(encoding="utf-8"))
    checked = 0
    for vlm_id, lineage in (item for item in lineages.items() if not item[0].startswith("_")):
        vlm = load_entry(vlm_id).config
        text = vlm.get("text_config") or {**vlm, "model_type": "llama"}  # original LLaVA: top-level Llama fields
        text_config = AutoConfig.for_model(**text)
        for base_id in [lineage["en_base"], *lineage["ja_bases"]]:
            base = AutoConfig.for_model(**load_entry(base_id).config)
            assert (base.hidden_size, base.num_hidden_layers, base.num_key_value_heads) == (
                text_config.hidden_size, text_config.num_hidden_layers, text_config.num_key_value_heads), (vlm_id, base_id)
            checked += 1
    assert checked >= 10
