"""The fixture zoo: deterministic, real key layouts, loadable by transformers 5, resolvable from the hub cache."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
)

from vlm_merge.testing import CLIP_REPO_ID, IMAGE_TOKEN, PAD_TOKEN, VLMS, FixtureZoo, build_fixture_zoo

HF_VLMS = ["llava-hf-llama", "llava-v5-llama", "llava-next-hf-mistral"]
TOWER_FC1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
# per VLM: key prefixes that must occur, key prefixes that must not
LAYOUT_PREFIXES = {
    "llava-hf-llama": (
        [
            "language_model.model.layers.",
            "language_model.lm_head.weight",
            "multi_modal_projector.linear_1.",
            "multi_modal_projector.linear_2.",
            "vision_tower.vision_model.encoder.layers.",
            "vision_tower.vision_model.pre_layrnorm.",
        ],
        ["model.", "lm_head.", "image_newline"],
    ),
    "llava-v5-llama": (
        [
            "model.language_model.layers.",
            "model.language_model.embed_tokens.",
            "lm_head.weight",
            "model.multi_modal_projector.linear_1.",
            "model.vision_tower.vision_model.embeddings.patch_embedding.",
        ],
        ["language_model.", "vision_tower.", "multi_modal_projector.", "model.image_newline"],
    ),
    "llava-next-hf-mistral": (
        [
            "language_model.model.layers.",
            "language_model.lm_head.weight",
            "multi_modal_projector.linear_2.",
            "vision_tower.vision_model.post_layernorm.",
            "image_newline",
        ],
        ["model.", "lm_head."],
    ),
    "llava-original-llama": (
        [
            "model.embed_tokens.weight",
            "model.layers.",
            "model.norm.weight",
            "lm_head.weight",
            "model.mm_projector.0.weight",
            "model.mm_projector.0.bias",
            "model.mm_projector.2.weight",
            "model.mm_projector.2.bias",
        ],
        ["model.vision_tower", "vision_tower", "language_model.", "multi_modal_projector", "model.image_newline"],
    ),
    "llava-original-mistral": (
        [
            "model.embed_tokens.weight",
            "model.layers.",
            "lm_head.weight",
            "model.mm_projector.0.",
            "model.mm_projector.2.",
            "model.image_newline",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.",
        ],
        ["language_model.", "multi_modal_projector", "model.vision_tower.vision_model."],
    ),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> FixtureZoo:
    return build_fixture_zoo(tmp_path_factory.mktemp("zoo"), seed=0)


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of the content (symlinks: their target, so the link structure counts too)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            digests[str(path.relative_to(root))] = "link:" + os.readlink(path)
        elif path.is_file():
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _index(directory: Path) -> tuple[str, dict] | None:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / name).exists():
            return name, json.loads((directory / name).read_text())
    return None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        return torch.load(path, weights_only=True)
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _load_state(directory: Path) -> dict[str, torch.Tensor]:
    index = _index(directory)
    files = sorted(set(index[1]["weight_map"].values())) if index else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state |= _load_file(directory / name)
    return state


def _image() -> Image.Image:
    pixels = bytes((x * 7 + y * 3 + c * 50) % 256 for y in range(30) for x in range(48) for c in range(3))
    return Image.frombytes("RGB", (48, 30), pixels)


def test_build_is_deterministic_and_fast(zoo: FixtureZoo, tmp_path: Path) -> None:
    reference = _tree_digest(zoo.root)
    start = time.perf_counter()
    again = build_fixture_zoo(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 10
    assert _tree_digest(again.root) == reference
    build_fixture_zoo(again.root, seed=0)  # rebuilding in place is fine too
    assert _tree_digest(again.root) == reference
    # another seed: the same files (in the hub cache, blob and commit names hash the content), other weights
    other = _tree_digest(build_fixture_zoo(tmp_path / "other", seed=1).root)
    assert len(other) == len(reference)
    assert {k for k in other if not k.startswith("hf-cache")} == {k for k in reference if not k.startswith("hf-cache")}
    for name in ["en-llama/model.safetensors", "llava-original-llama/pytorch_model-00001-of-00002.bin"]:
        assert other[name] != reference[name]
    assert other["en-llama/tokenizer.json"] == reference["en-llama/tokenizer.json"]


@pytest.mark.parametrize("name", sorted(VLMS))
def test_vlm_key_layout(zoo: FixtureZoo, name: str) -> None:
    keys = set(_load_state(zoo.vlms[name]))
    present, absent = LAYOUT_PREFIXES[name]
    for prefix in present:
        assert any(key.startswith(prefix) for key in keys), f"{name}: no key starts with {prefix!r}"
    for prefix in absent:
        assert not any(key.startswith(prefix) for key in keys), f"{name}: unexpected keys under {prefix!r}"


@pytest.mark.parametrize("name", [name for name, spec in VLMS.items() if spec.shards > 1])
def test_shard_index_matches_shards(zoo: FixtureZoo, name: str) -> None:
    directory = zoo.vlms[name]
    index_name, index = _index(directory)
    assert index_name == ("pytorch_model.bin.index.json" if VLMS[name].fmt == "bin" else "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == VLMS[name].shards
    assert sorted(path.name for path in directory.glob(f"*-of-{len(shards):05d}.*")) == shards
    total = 0
    for shard in shards:
        tensors = _load_file(directory / shard)
        assert {key for key, file in index["weight_map"].items() if file == shard} == set(tensors)
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    assert index["metadata"]["total_size"] == total


def test_original_configs(zoo: FixtureZoo) -> None:
    llama = json.loads((zoo.vlms["llava-original-llama"] / "config.json").read_text())
    mistral = json.loads((zoo.vlms["llava-original-mistral"] / "config.json").read_text())
    en_vocab = len(AutoTokenizer.from_pretrained(zoo.llms["en-llama"]))
    assert llama["architectures"] == ["LlavaLlamaForCausalLM"] and llama["model_type"] == "llava_llama"
    assert mistral["architectures"] == ["LlavaMistralForCausalLM"] and mistral["model_type"] == "llava_mistral"
    for config in (llama, mistral):
        assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
        assert config["mm_vision_tower"] == CLIP_REPO_ID and config["mm_vision_select_feature"] == "patch"
        assert config["mm_hidden_size"] == 32 and config["vocab_size"] == en_vocab
        assert config["mm_use_im_start_end"] is False and config["mm_use_im_patch_token"] is False
    assert llama["image_aspect_ratio"] == "pad" and llama["num_key_value_heads"] == 4
    assert mistral["image_aspect_ratio"] == "anyres" and mistral["mm_patch_merge_type"] == "spatial_unpad"
    assert mistral["image_grid_pinpoints"] and mistral["sliding_window"] and mistral["num_key_value_heads"] == 2
    assert len(_load_state(zoo.vlms["llava-original-llama"])["model.embed_tokens.weight"]) == en_vocab


def test_vlm_weights_share_parents(zoo: FixtureZoo) -> None:
    clip = _load_state(zoo.clip)
    en = _load_state(zoo.llms["en-llama"])
    hf = _load_state(zoo.vlms["llava-hf-llama"])
    v5 = _load_state(zoo.vlms["llava-v5-llama"])
    original = _load_state(zoo.vlms["llava-original-llama"])
    # one model in three layouts; the HF ones have extra rows for <image>/<pad>/padding
    rows = len(en["model.embed_tokens.weight"])
    assert torch.equal(hf["language_model.model.embed_tokens.weight"][:rows], original["model.embed_tokens.weight"])
    assert torch.equal(hf["language_model.lm_head.weight"], v5["lm_head.weight"])
    assert torch.equal(hf["multi_modal_projector.linear_2.weight"], original["model.mm_projector.2.weight"])
    # LLaVA-1.5 kept CLIP frozen; its language model is the en LLM + small noise
    assert torch.equal(hf[f"vision_tower.{TOWER_FC1}"], clip[TOWER_FC1])
    delta = original["model.layers.0.self_attn.q_proj.weight"] - en["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < delta.abs().max() < 0.02
    # LLaVA-1.6 fine-tuned the tower
    tower = _load_state(zoo.vlms["llava-original-mistral"])[f"model.vision_tower.vision_tower.{TOWER_FC1}"]
    assert not torch.equal(tower, clip[TOWER_FC1])
    assert torch.equal(tower, _load_state(zoo.vlms["llava-next-hf-mistral"])[f"vision_tower.{TOWER_FC1}"])


@pytest.mark.parametrize("name", HF_VLMS)
def test_hf_vlm_loads_and_generates(zoo: FixtureZoo, name: str) -> None:
    directory = zoo.vlms[name]
    model, info = AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True)
    assert {key: list(value) for key, value in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    processor = AutoProcessor.from_pretrained(directory)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == model.config.image_token_index == image_id == len(tokenizer) - 2
    assert tokenizer.convert_tokens_to_ids(PAD_TOKEN) == tokenizer.pad_token_id == len(tokenizer) - 1
    vocab_size = model.config.text_config.vocab_size
    assert vocab_size > len(tokenizer) and vocab_size % 16 == 0
    assert model.get_input_embeddings().weight.shape[0] == vocab_size
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = {
        "llama": "USER: <image>\nWhat is this image? ASSISTANT:",
        "mistral": "[INST] <image>\nWhat is this image? [/INST]",
    }
    assert prompt == expected[zoo.vlm_family[name]]
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == image_id).sum() >= 16
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tokenizers(zoo: FixtureZoo) -> None:
    en = AutoTokenizer.from_pretrained(zoo.llms["en-llama"])
    ja = AutoTokenizer.from_pretrained(zoo.llms["ja-llama"])
    assert en.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert 150 <= len(en) <= 350 and 80 <= len(ja) - len(en) <= 120
    en_vocab, ja_vocab = en.get_vocab(), ja.get_vocab()
    assert all(ja_vocab[token] == index for token, index in en_vocab.items())
    assert min(ja_vocab[token] for token in ja_vocab.keys() - en_vocab.keys()) == len(en)
    # transformers loads llava/mistral dirs as TokenizersBackend and llama ones as LlamaTokenizer: same ids
    others = [AutoTokenizer.from_pretrained(path) for path in (zoo.llms["en-mistral"], zoo.vlms["llava-hf-llama"])]
    for text in ["What is this image? Describe the picture.", "これは猫の画像です。", "Mixed 日本語 text!"]:
        for tokenizer in (en, ja):
            ids = tokenizer(text).input_ids
            assert ids[0] == 1 and 0 not in ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert all(other(text).input_ids == en(text).input_ids for other in others)
    assert len(ja("これは猫の画像です。").input_ids) < len(en("これは猫の画像です。").input_ids)


@pytest.mark.parametrize("name", ["en-llama", "ja-llama", "en-mistral", "ja-mistral"])
def test_llm_loads_and_generates(zoo: FixtureZoo, name: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(zoo.llms[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(zoo.llms[name])
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == len(tokenizer)
    if "mistral" in name:
        assert model.config.num_key_value_heads == 2 and model.config.sliding_window
    inputs = tokenizer("これは the image", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_ja_llm_is_tuned_en_llm(zoo: FixtureZoo) -> None:
    en = _load_state(zoo.llms["en-mistral"])
    ja = _load_state(zoo.llms["ja-mistral"])
    assert en.keys() == ja.keys()
    rows = len(en["model.embed_tokens.weight"])
    for key in en:
        shared = ja[key][:rows] if key.endswith(("embed_tokens.weight", "lm_head.weight")) else ja[key]
        assert shared.shape == en[key].shape and 0 < (shared - en[key]).abs().max() < 0.02


def test_hf_cache_resolves_clip(zoo: FixtureZoo) -> None:
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(CLIP_REPO_ID, cache_dir=zoo.hf_cache, local_files_only=True))
    assert (snapshot / "model.safetensors").read_bytes() == (zoo.clip / "model.safetensors").read_bytes()
    tower, info = CLIPVisionModel.from_pretrained(
        CLIP_REPO_ID, cache_dir=zoo.hf_cache, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"]  # (the CLIP text model is reported unexpected, as for the real repo)
    image_processor = AutoImageProcessor.from_pretrained(CLIP_REPO_ID, cache_dir=zoo.hf_cache, local_files_only=True)
    assert image_processor(_image(), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    patch_embedding = _load_state(zoo.clip)["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(tower.state_dict()["embeddings.patch_embedding.weight"], patch_embedding)
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when imported, so check them in a fresh interpreter
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download({CLIP_REPO_ID!r}))"
    env = {**os.environ, "HF_HUB_CACHE": str(zoo.hf_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(result.stdout.strip()) == snapshot
