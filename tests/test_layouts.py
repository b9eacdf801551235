"""The key-layout table (vlm_merge.architecture.layouts): one table, and no other module keeps layout knowledge."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bench.common import canonical_key
from vlm_merge.architecture.layouts import HF_LM, LAYOUTS, detect_layout, from_hf, hf_key, layout_named, to_hf
from vlm_merge.testing import VLMS, rename_keys

ROOT = Path(__file__).resolve().parents[1]
# The places that held layout knowledge of their own before the table (issue 30); they derive from it now.
DERIVED = ("vlm_merge/architecture/anatomy.py", "vlm_merge/testing.py", "vlm_merge/io/convert.py", "bench/common.py")

# One key of each part in llava-hf (transformers 4.x) names, and its name in each layout (transformers'
# convert_llava_weights_to_hf.py, 4.52's _checkpoint_conversion_mapping, tests/real_layouts/).
HF_KEYS = (
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.lm_head.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.bias",
    "image_newline",
)
EXPECTED = {
    "llava-hf": HF_KEYS,
    "llava-hf-v5": (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.image_newline",
    ),
    "llava-hf-v5-modules": (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.image_newline",
    ),
    "llava-original": (
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.image_newline",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rows_rename_both_ways(name):
    layout = layout_named(name)
    assert tuple(from_hf(k, layout) for k in HF_KEYS) == EXPECTED[name]
    assert tuple(to_hf(k, layout) for k in EXPECTED[name]) == HF_KEYS
    assert tuple(hf_key(k) for k in EXPECTED[name]) == HF_KEYS  # whatever layout a key comes from
    assert [canonical_key(k) for k in EXPECTED[name][:2]] == [
        ("lm", "model.layers.0.self_attn.q_proj.weight"), ("lm", "lm_head.weight")
    ]
    assert {canonical_key(k)[0] for k in EXPECTED[name][2:]} == {"vision"}


def test_detection_and_language_model_prefixes():
    assert [detect_layout(keys).name for keys in EXPECTED.values()] == [
        "llava-hf", "llava-hf-v5", "llava-hf-v5", "llava-original"
    ]
    assert detect_layout(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]).name == "llm"
    assert detect_layout(["vision_model.embeddings.patch_embedding.weight"]) is None  # a CLIP is named, not detected
    assert layout_named("llava-original").lm_prefixes == (("model.", "model."), ("lm_head.", "lm_head."))
    assert layout_named("llava-hf").lm_prefixes == (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
    assert to_hf("vision_model.post_layernorm.weight", layout_named("clip")) == "vision_tower.vision_model.post_layernorm.weight"
    assert to_hf("text_model.final_layer_norm.weight", layout_named("clip")) is None
    assert to_hf("model.mm_projector.4.weight", layout_named("llava-original")) == HF_LM + "model.mm_projector.4.weight"
    with pytest.raises(KeyError, match="no key layout 'qwen2-vl'"):
        layout_named("qwen2-vl")


def test_every_fixture_layout_is_a_row_of_the_table():
    names = {layout.name for layout in LAYOUTS}
    assert len(names) == len(LAYOUTS)
    assert {spec.layout for spec in VLMS.values()} <= names
    state = dict.fromkeys(HF_KEYS)
    assert list(rename_keys(state, "llava-original")) == list(EXPECTED["llava-original"])
    assert list(rename_keys(state, "llava-original", vision_tower=False)) == [
        k for k in EXPECTED["llava-original"] if "vision_tower" not in k
    ]


def _layout_only_prefixes() -> set[str]:
    """Key prefixes that name a layout's tensors apart from llava-hf's names and a standalone LLM's."""
    hf = {h for layout in LAYOUTS for h, _ in layout.hf_prefixes}
    mine = {m for layout in LAYOUTS for _, m in layout.hf_prefixes}
    parts = {p for layout in LAYOUTS for p in (*layout.vision, *layout.projector, *layout.other)}
    return (mine | parts) - hf - {"model.", "lm_head."}


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize("module", DERIVED)
def test_no_layout_knowledge_outside_the_table(module):
    prefixes = _layout_only_prefixes()
    assert "model.mm_projector.0." in prefixes and "model.language_model." in prefixes  # the check can fail
    found = [
        s for s in _code_strings(ROOT / module)
        if any(re.sub(r"\\(.)", r"\1", s).lstrip("^").startswith(p) for p in prefixes)
    ]
    assert found == [], f"{module} names layout key prefixes itself; derive them from vlm_merge.architecture.layouts"
