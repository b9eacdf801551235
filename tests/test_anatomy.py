"""VLM anatomy: every real key layout is recognised, its parts named, its LM aligned with the base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import family_of
from vlm_merge.architecture.anatomy import LANGUAGE, PROJECTOR, VISION, align, inspect_llm, inspect_vlm
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.errors import VlmMergeError

EXPECTED = {
    "llava-hf-llama": ("llava-hf", True),
    "llava-v5-llama": ("llava-hf-v5", True),
    "llava-next-hf-mistral": ("llava-hf", True),
    "llava-original-llama": ("llava-original", False),  # vision tower lives in its own CLIP checkpoint
    "llava-original-mistral": ("llava-original", True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layouts_and_parts(zoo, name):
    layout, has_tower = EXPECTED[name]
    en, _ = family_of(zoo, name)
    vlm = inspect_vlm(CheckpointReader(zoo.vlms[name]))
    base = inspect_llm(CheckpointReader(en), "en")
    assert vlm.layout.name == layout
    assert bool(vlm.parts[VISION]) == has_tower
    assert len(vlm.parts[PROJECTOR]) == 4
    assert vlm.num_layers == base.num_layers == 2
    assert set(vlm.lm_keys) == set(base.lm_keys)
    a = align(vlm, base)
    assert set(a.pairs) == set(base.lm_keys)
    assert a.vocab_keys == ("model.embed_tokens.weight", "lm_head.weight")
    if name.startswith("llava-original"):
        assert a.vlm_vocab_rows == a.base_vocab_rows  # original LLaVA adds no image token
    else:
        assert a.vlm_vocab_rows > a.base_vocab_rows  # llava-hf adds <image>, <pad> and padding rows


def test_generic_fallback_finds_language_model(zoo, tmp_path):
    """A VLM of unknown layout (Qwen2-VL-like names): the LM is found under its prefix by shape."""
    src = CheckpointReader(zoo.llms["en-llama"])
    ts = {}
    for k in src.keys():
        new = k.replace("model.", "model.text.", 1) if k.startswith("model.") else k
        ts[new] = src.get(k).clone()
    ts["visual.patch_embed.proj.weight"] = torch.zeros(8, 3, 2, 2)
    ts["visual.merger.mlp.0.weight"] = torch.zeros(32, 8)
    save_file(ts, tmp_path / "model.safetensors")
    vlm = inspect_vlm(CheckpointReader(tmp_path), base=src)
    assert vlm.layout.name == "generic"
    assert vlm.lm_keys["model.layers.0.self_attn.q_proj.weight"] == "model.text.layers.0.self_attn.q_proj.weight"
    assert vlm.lm_keys["lm_head.weight"] == "lm_head.weight"
    assert sorted(vlm.parts[VISION]) == ["visual.merger.mlp.0.weight", "visual.patch_embed.proj.weight"]
    assert len(vlm.parts[LANGUAGE]) == len(src.keys())


def test_plain_llm_is_not_a_vlm(zoo):
    with pytest.raises(VlmMergeError, match="is not a vision-language model"):
        inspect_vlm(CheckpointReader(zoo.llms["en-llama"]))


def test_mismatched_base_names_first_key(zoo):
    vlm = inspect_vlm(CheckpointReader(zoo.vlms["llava-hf-llama"]))
    other = inspect_llm(CheckpointReader(zoo.llms["en-mistral"]), "en")  # GQA: k_proj has another shape
    with pytest.raises(VlmMergeError, match=r"shape mismatch at 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        align(vlm, other)
