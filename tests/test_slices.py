"""`slices:` layer-stacking recipes (vlm_merge.recipe.slices, vlm_merge.engine.stacking).

Equality with mergekit 0.1.5 itself is measured by `bench/slices_vs_mergekit.py` (mergekit lives in its
own venv); these tests check the same rules against the source tensors directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlm_merge.engine.merge import merge
from vlm_merge.errors import VlmMergeError
from vlm_merge.recipe import load_recipe
from vlm_merge.recipe.slices import slice_setting
from vlm_merge.testing import TEXT_CLASSES, model_shapes, random_state_dict, text_config, tune_state_dict, vocab_sizes, write_llm


def _load(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two same-vocabulary 2-layer llama LLMs: `a` and `a` + noise."""
    root = tmp_path_factory.mktemp("pair")
    shapes = model_shapes(TEXT_CLASSES["llama"][1], text_config("llama", vocab_sizes()["en"]))
    a = random_state_dict(shapes, 0, "a")
    b = tune_state_dict(a, 1, "b")
    write_llm(root / "a", "llama", a, "en")
    write_llm(root / "b", "llama", b, "en")
    return root / "a", root / "b"


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_passthrough_stack_restacks_and_renumbers(pair, tmp_path):
    a, b = pair
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 2]}], "parameters": {"scale": [{"filter": "down_proj", "value": 0.5}]}},
        {"sources": [{"model": str(a), "layer_range": [1, 2]}]},
    ]}  # fmt: skip
    out = merge(_write(tmp_path, recipe), tmp_path / "out", progress=False)
    got, ta, tb = _load(out), _load(a), _load(b)
    picks = [(ta, 0), (ta, 1), (tb, 1), (ta, 1)]
    for j, (src, i) in enumerate(picks):
        for name in [k for k in ta if k.startswith("model.layers.0.")]:
            suffix = name.removeprefix("model.layers.0.")
            want = src[f"model.layers.{i}.{suffix}"] * (0.5 if j == 2 and "down_proj" in suffix else 1.0)
            assert torch.equal(got[f"model.layers.{j}.{suffix}"], want), (j, suffix)
    assert not any(k.startswith("model.layers.4.") for k in got)
    # mergekit's edges: embeddings from the first slice's source, final norm and lm_head from the last's
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], ta["model.norm.weight"])
    config = yaml.safe_load((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)
    # the resolved recipe replays to the same tensors
    again = merge(out / "merge_recipe.yaml", tmp_path / "again", progress=False)
    assert all(torch.equal(v, _load(again)[k]) for k, v in got.items())


def test_linear_slices_follow_mergekit_gradients(pair, tmp_path):
    a, b = pair
    recipe = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.2]}},
        {"model": str(b), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
    ]}]}  # fmt: skip
    got, ta, tb = _load(merge(_write(tmp_path, recipe), tmp_path / "out", progress=False)), _load(a), _load(b)
    for j, wa in enumerate([1.0, 0.2]):  # t = j / (n - 1)
        k = f"model.layers.{j}.mlp.up_proj.weight"
        torch.testing.assert_close(got[k], (wa * ta[k] + 0.5 * tb[k]) / (wa + 0.5), rtol=0, atol=2e-6)
    # edges merged at t = 0 (weight 1.0 for a)
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(got[k], (ta[k] + 0.5 * tb[k]) / 1.5, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("name", "ja"), [("llava-v5-llama", "ja-llama"), ("llava-hf-llama", "ja-llama"), ("llava-next-hf-mistral", "ja-mistral")])
def test_vlm_stack_copies_vision_and_sets_text_config(zoo, tmp_path, name, ja):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vlm, ja = zoo.vlms[name], zoo.llms[ja]
    recipe = {"merge_method": "passthrough", "vlm": str(vlm), "edges_from": str(ja), "slices": [
        {"sources": [{"model": str(ja), "layer_range": [0, 2]}]},
        {"sources": [{"model": "vlm", "layer_range": [0, 2]}]},
        {"sources": [{"model": "vlm", "layer_range": [1, 2]}]},
    ]}  # fmt: skip
    out = merge(_write(tmp_path, recipe), tmp_path / "out", progress=False)
    config = yaml.safe_load((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 5
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    src_vlm = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    src_ja = AutoModelForCausalLM.from_pretrained(ja).eval()
    assert model.config.text_config.num_hidden_layers == 5
    got, lm_v = model.model.language_model, src_vlm.model.language_model
    for j, layer in enumerate([src_ja.model.layers[0], src_ja.model.layers[1], lm_v.layers[0], lm_v.layers[1], lm_v.layers[1]]):
        for (k, p), (_, q) in zip(got.layers[j].named_parameters(), layer.named_parameters()):
            assert torch.equal(p, q), (j, k)
    assert torch.equal(got.norm.weight, src_ja.model.norm.weight)
    for (k, p), (_, q) in zip(model.model.vision_tower.named_parameters(), src_vlm.model.vision_tower.named_parameters()):
        assert torch.equal(p, q), k
    ids = model.generate(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False)
    assert ids.shape == (1, 5)


def test_original_llava_stack_is_written_in_the_llava_hf_layout(zoo, tmp_path):
    from transformers import AutoModelForImageTextToText

    ja = str(zoo.llms["ja-llama"])
    recipe = {"merge_method": "passthrough", "vlm": str(zoo.vlms["llava-original-llama"]), "edges_from": ja, "slices": [
        {"sources": [{"model": "vlm", "layer_range": [0, 2]}]}, {"sources": [{"model": ja, "layer_range": [1, 2]}]}]}  # fmt: skip
    out = merge(_write(tmp_path, recipe), tmp_path / "out", progress=False, vision_tower=zoo.clip)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 3
    assert model.generate(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slices": [{"sources": [{"model": "A", "layer_range": [2, 1]}]}]}, "layer_range"),
        ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}, {"model": "B", "layer_range": [0, 2]}]}]}, "different lengths"),
        ({"slices": []}, "slices: missing or empty"),
        ({"models": [{"model": "A"}]}, "give either models: or slices:, not both"),
        ({"tokenizer": {"source": "union"}}, "tokenizer: unknown key in a slices recipe"),
        ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 1], "weight": 1}]}]}, r"slices\[0\]\.sources\[0\]\.weight: unknown key"),
        ({"slices": [{"sources": [{"model": "vlm", "layer_range": [0, 1]}]}]}, "names no vlm"),
    ],
)
def test_bad_slices_recipes_are_one_line(tmp_path, change, message):
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}]}], **change}
    with pytest.raises(VlmMergeError, match=message) as e:
        load_recipe(_write(tmp_path, recipe))
    assert "\n" not in str(e.value)


def test_layer_out_of_range_names_the_slice(pair, tmp_path):
    a, _ = pair
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [1, 3]}]}]}
    with pytest.raises(VlmMergeError, match=r"slices\[0\]\.sources\[0\]\.layer_range \[1, 3\]: layer 2"):
        merge(_write(tmp_path, recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_slice_setting_is_mergekit_evaluate_setting():
    assert slice_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert slice_setting([{"filter": "o_proj", "value": [1.0, 3.0]}, {"value": 7}], "a.o_proj.weight", 0.5) == 2.0
    assert slice_setting([{"filter": "o_proj", "value": 1.0}], "a.down_proj.weight", 0.5) is None


def test_cli_validate_and_merge_a_slices_recipe(pair, tmp_path, capsys):
    from vlm_merge.cli import main

    a, b = pair
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                                                         {"sources": [{"model": str(b), "layer_range": [0, 1]}]}]}  # fmt: skip
    cfg = str(_write(tmp_path, recipe))
    assert main(["validate", cfg]) == 0
    out = capsys.readouterr().out
    assert "passthrough — OK" in out and "language_model: stacked layers" in out
    assert main(["merge", cfg, str(tmp_path / "out"), "--quiet"]) == 0
    assert yaml.safe_load((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
