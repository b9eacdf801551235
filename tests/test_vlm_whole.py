"""Two VLMs of one family merged whole: the language model as any recipe's, the vision tower and projector per
tensor by their `modules:` entries (mergekit's form and ours), on tiny LLaVA-1.5 / LLaVA-NeXT fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from vlm_merge.cli import main
from vlm_merge.engine.merge import RESOLVED_RECIPE, merge, validate
from vlm_merge.engine.streaming import execute
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.recipe import load_recipe
from vlm_merge.testing import (
    TEXT_CLASSES,
    VLMS,
    clip_config,
    model_shapes,
    random_state_dict,
    text_config,
    vlm_state_dict,
    vocab_sizes,
    write_vlm,
)

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "image_newline")


def _other_vlm(zoo, out: Path, name: str, seed: int = 1, change=None) -> Path:
    """The zoo's VLM `name` written again from weights drawn with another seed (`change` edits its state first)."""
    spec = VLMS[name]
    clip = random_state_dict(model_shapes(CLIPModel, clip_config()), seed, "clip")
    llm = random_state_dict(model_shapes(TEXT_CLASSES[spec.family][1], text_config(spec.family, vocab_sizes()["en"])),
                            seed, f"en-{spec.family}")
    state = vlm_state_dict(spec.family, llm, clip, seed)
    if change is not None:
        state = change(state)
    write_vlm(out, spec, state)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(path)
    try:
        return {k: r.get(k) for k in r.keys()}
    finally:
        r.close()


def _generates(cls, out: Path, prompt: str) -> None:
    model = cls.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    inputs = proc(images=Image.new("RGB", (40, 40), (120, 30, 200)), text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 3


def test_two_llava_merged_whole_loads_generates_and_replays(zoo, tmp_path):
    a, b = zoo.vlms["llava-hf-llama"], _other_vlm(zoo, tmp_path / "b", "llava-hf-llama")
    recipe = tmp_path / "whole.yaml"
    recipe.write_text(yaml.safe_dump({  # our short form: the modules take the recipe's method and models
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
        "modules": {"vision_tower": None, "multi_modal_projector": {}},  # `vision_tower:` with nothing under it
    }))
    out = merge(recipe, tmp_path / "out", progress=False)
    ta, tb, to = _tensors(a), _tensors(b), _tensors(out)
    vision = [k for k in to if k.startswith(VISION_PREFIXES)]
    assert len(vision) == 43 and len(to) == len(ta)
    tokens = vocab_sizes()["vlm"]  # embedding rows past the tokenizer's (padding) are the VLM's, as always
    for k in to:  # linear 0.5 / 0.5, language model and vision side alike
        assert not torch.equal(ta[k], tb[k]), k
        expected = (0.5 * ta[k].float() + 0.5 * tb[k].float()).to(to[k].dtype)
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(to[k][tokens:], ta[k][tokens:]), k
            expected = expected[:tokens]
        assert torch.equal(to[k][: len(expected)], expected), k
    _generates(LlavaForConditionalGeneration, out, "USER: <image>\nWhat is this? ASSISTANT:")
    resolved = load_recipe(out / RESOLVED_RECIPE)
    assert resolved.module("vision_tower").merge_method == "linear"
    assert [m.model for m in resolved.module("multi_modal_projector").models] == [str(a), str(b)]
    again = merge(out / RESOLVED_RECIPE, tmp_path / "again", progress=False)
    replay = _tensors(again)
    assert replay.keys() == to.keys() and all(torch.equal(replay[k], to[k]) for k in to)
    assert "multi_modal_projector and vision_tower were merged" in (out / "README.md").read_text()


def test_llava_next_mergekit_modules_form_per_module_methods(zoo, tmp_path):
    """mergekit's `modules:` YAML, each module with its own models / parameters; ours adds a module's own method.
    A per-layer list spreads over the vision tower's own 2 layers; LLaVA-NeXT's image_newline goes with the projector."""
    a, b = zoo.vlms["llava-next-hf-mistral"], _other_vlm(zoo, tmp_path / "b", "llava-next-hf-mistral")
    models = [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]
    recipe = tmp_path / "modules.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "modules": {
            "text_decoder": {"models": models},
            "vision_tower": {"merge_method": "slerp", "models": [{"model": str(a)}, {"model": str(b)}],
                             "parameters": {"t": [0.0, 1.0]}},
            "multi_modal_projector": {"models": [{"model": str(a), "parameters": {"weight": 3.0}},
                                                 {"model": str(b), "parameters": {"weight": 1.0}}]},
        },
        "dtype": "float32",
    }))
    out = merge(recipe, tmp_path / "out", progress=False)
    ta, tb, to = _tensors(a), _tensors(b), _tensors(out)
    layer0, layer1 = "vision_tower.vision_model.encoder.layers.{}.mlp.fc1.weight".format(0), \
        "vision_tower.vision_model.encoder.layers.{}.mlp.fc1.weight".format(1)
    assert torch.equal(to[layer0], ta[layer0]) and torch.equal(to[layer1], tb[layer1])  # slerp t=0 / t=1
    for k in ("multi_modal_projector.linear_1.weight", "image_newline"):
        assert torch.allclose(to[k], (3 * ta[k].float() + tb[k].float()) / 4, atol=1e-6, rtol=0), k
    lm = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(to[lm].float(), (ta[lm].float() + tb[lm].float()) / 2, atol=1e-6, rtol=0)
    _generates(LlavaNextForConditionalGeneration, out, "[INST] <image>\nWhat is this? [/INST]")
    rp, rows = validate(recipe)
    how = {r[0]: (r[1], r[2]) for r in rows}
    assert how["vision_tower"] == ("39", "slerp") and how["multi_modal_projector"] == ("5", "linear")


def test_vision_sides_of_other_layouts_align(zoo, tmp_path):
    """One family in two layouts (llava-hf 4.x and original LLaVA-1.6) merges by llava-hf names."""
    r = {"merge_method": "linear", "models": [{"model": str(zoo.vlms["llava-next-hf-mistral"]), "parameters": {"weight": 1.0}},
                                              {"model": str(zoo.vlms["llava-original-mistral"]), "parameters": {"weight": 1.0}}],
         "modules": {"vision_tower": {}, "multi_modal_projector": {}}}
    _, rows = validate(r)
    how = {r[0]: r[1:3] for r in rows}
    assert how["vision_tower"] == ("39", "linear") and how["multi_modal_projector"] == ("5", "linear")


def test_generic_vlms_merge_their_vision_side(zoo, tmp_path):
    """VLMs of a layout no table row names: the language model found by an LLM source's keys, the rest is the
    vision tower."""
    src = CheckpointReader(zoo.llms["en-llama"])
    paths = []
    for seed in (0, 1):
        out = tmp_path / f"generic{seed}"
        out.mkdir()
        ts = {k.replace("model.", "model.text.", 1) if k.startswith("model.") else k: src.get(k).clone() for k in src.keys()}
        ts["visual.patch_embed.proj.weight"] = torch.full((8, 3, 2, 2), float(seed))
        ts["visual.merger.mlp.0.weight"] = torch.full((32, 8), float(seed + 2))
        save_file(ts, out / "model.safetensors")
        (out / "config.json").write_text((zoo.llms["en-llama"] / "config.json").read_text())
        paths.append(str(out))
    r = {"merge_method": "task_arithmetic", "base_model": str(zoo.llms["en-llama"]),
         "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths],
         "modules": {"vision_tower": {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}},
         "vlm": paths[0], "tokenizer_source": str(zoo.llms["en-llama"])}
    rp, rows = validate(r)
    assert {r[0]: r[1:3] for r in rows}["vision_tower"] == ("2", "linear")
    (tmp_path / "out").mkdir()
    execute(rp.backbone.plan, tmp_path / "out", progress=False)  # the tensors (no processor to write for it)
    to = _tensors(tmp_path / "out")
    assert torch.equal(to["visual.patch_embed.proj.weight"], torch.full((8, 3, 2, 2), 0.5))
    assert torch.equal(to["visual.merger.mlp.0.weight"], torch.full((32, 8), 2.5))


def _bad_case(zoo, tmp_path, case: str) -> tuple[dict, str]:
    a = str(zoo.vlms["llava-hf-llama"])
    two = [{"model": a, "parameters": {"weight": 0.5}}, {"model": "B", "parameters": {"weight": 0.5}}]
    if case == "shape":
        def wider(state):
            key = "vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"
            return {**state, key: torch.zeros(state[key].shape[0] + 1)}
        b = str(_other_vlm(zoo, tmp_path / "b", "llava-hf-llama", change=wider))
        return ({"merge_method": "linear", "models": [two[0], {**two[1], "model": b}], "modules": {"vision_tower": {}}},
                "recipe modules.vision_tower: " + b + " does not match the VLM at "
                "'vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias': the VLM has [32], " + b + " has [33]")
    if case == "llm":  # a VLM + LLM recipe has one vision side: nothing to merge it with
        ja = str(zoo.llms["ja-llama"])
        return ({"merge_method": "task_arithmetic", "vlm": a, "base_model": str(zoo.llms["en-llama"]),
                 "models": [{"model": "vlm", "parameters": {"weight": 1.0}}, {"model": ja, "parameters": {"weight": 1.0}}],
                 "modules": {"multi_modal_projector": {}}},
                "has no multi_modal_projector tensors (a language model)")
    if case == "no tower":  # LLaVA-1.5 original reads its CLIP tower from mm_vision_tower
        o = str(zoo.vlms["llava-original-llama"])
        return ({"merge_method": "linear", "models": [{"model": o, "parameters": {"weight": 1.0}}] * 2,
                 "modules": {"vision_tower": {}}}, "stores no vision_tower tensors")
    if case == "unknown module":
        return ({"merge_method": "linear", "models": two[:1], "modules": {"vision": {}}}, "modules.vision: 'vision':")
    assert case == "module slices"
    return ({"merge_method": "linear", "models": two[:1], "modules": {"vision_tower": {"slices": []}}},
            "modules.vision_tower.slices: cutting or stacking")


@pytest.mark.parametrize("case", ["shape", "llm", "no tower", "unknown module", "module slices"])
def test_bad_whole_vlm_recipe_is_one_line(zoo, tmp_path, capsys, case):
    data, expected = _bad_case(zoo, tmp_path, case)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    argv = ["validate", str(cfg)] + (["--cache-dir", str(zoo.hf_cache)] if case == "no tower" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm-merge: error: "), err
    assert expected in err[0], err[0]
    with pytest.raises(VlmMergeError):
        validate(data, cache_dir=zoo.hf_cache)


def test_mergekit_modules_yaml_reads_as_ours(tmp_path):
    """mergekit 0.1.5's `modules:` shape (MergeConfiguration.modules: name -> {models, parameters}), as written for
    Gemma 3 / Qwen-VL, reads into `models:` + vision-side `modules:`; a text_decoder method other than the
    recipe's is one line."""
    text = """
merge_method: ties
base_model: org/vlm-base
parameters: {normalize: true}
modules:
  text_decoder:
    models:
      - model: org/vlm-a
        parameters: {weight: 0.5, density: 0.5}
      - model: org/vlm-b
        parameters: {weight: 0.5, density: 0.5}
    parameters: {int8_mask: true}
  vision_tower:
    models:
      - model: org/vlm-a
        parameters: {weight: 1.0, density: 1.0}
      - model: org/vlm-b
        parameters: {weight: 1.0, density: 1.0}
  multi_modal_projector:
    models:
      - model: org/vlm-a
        parameters: {weight: 1.0, density: 1.0}
dtype: bfloat16
"""
    (tmp_path / "m.yaml").write_text(text)
    r = load_recipe(tmp_path / "m.yaml")
    assert [m.model for m in r.models] == ["org/vlm-a", "org/vlm-b"]
    assert r.parameters == {"normalize": True, "int8_mask": True}
    assert sorted(r.modules) == ["multi_modal_projector", "vision_tower"]
    tower = r.module("vision_tower")
    assert tower.merge_method == "ties" and tower.models[1].parameters == {"weight": 1.0, "density": 1.0}
    assert tower.parameters == {"normalize": True}
    assert r.refs() == ["org/vlm-base", "org/vlm-a", "org/vlm-b"]
    bad = yaml.safe_load(text)
    bad["modules"]["text_decoder"]["merge_method"] = "slerp"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(VlmMergeError, match="modules.text_decoder.merge_method: 'slerp' but the recipe's merge_method is 'ties'"):
        load_recipe(tmp_path / "bad.yaml")
