"""Recipes: parsing, per-layer / per-module parameters, mergekit YAML, bit-for-bit replay, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from chat_vector import chat_vector
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.cli import main
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.merge import merge, validate
from vlm_merge.methods import METHODS, tensor_seed
from vlm_merge.recipe import load_recipe, resolve_setting


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _tensors_equal(a, b) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys())
    for k in ra.keys():
        assert ra.read_bytes(k) == rb.read_bytes(k), k


def test_resolve_setting_gradients_filters_and_exact_layer_lists():
    assert resolve_setting([0.0, 1.0], "model.layers.0.mlp.up_proj.weight", 0, 5) == 0.0
    assert resolve_setting([0.0, 1.0], "model.layers.2.mlp.up_proj.weight", 2, 5) == pytest.approx(0.5)
    assert resolve_setting([0.0, 1.0], "lm_head.weight", None, 5) == 0.0  # outside layers: position 0
    vals = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert [resolve_setting(vals, f"model.layers.{i}.x", i, 8) for i in range(8)] == vals  # exact
    cond = [{"filter": "self_attn", "value": 2.0}, {"filter_regex": r"^lm_head\.", "value": 3.0}, {"value": [1.0, 0.0]}]
    assert resolve_setting(cond, "model.layers.1.self_attn.q_proj.weight", 1, 2) == 2.0
    assert resolve_setting(cond, "lm_head.weight", None, 2) == 3.0
    assert resolve_setting(cond, "model.layers.1.mlp.up_proj.weight", 1, 2) == 0.0
    assert resolve_setting([{"filter": "mlp", "value": 1.0}], "model.layers.0.self_attn.q_proj.weight", 0, 2) is None


def _evaluate_setting(setting, t: float):
    """mergekit 0.1.5's `evaluate_setting` for a list of numbers (mergekit/config.py), for comparison."""
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 11, 40])
@pytest.mark.parametrize("num_layers", [1, 2, 4, 5])
def test_gradient_lists_of_any_length_interpolate_as_mergekit(length, num_layers):
    """A gradient longer (or shorter) than the layer count is interpolated exactly as mergekit does it; a list
    of exactly one value per layer gives each layer its value."""
    values = [round(0.1 + 0.37 * i % 1.3, 3) for i in range(length)]
    for layer in range(num_layers):
        t = layer / (num_layers - 1) if num_layers > 1 else 1.0
        want = values[layer] if length == num_layers else _evaluate_setting(values, t)
        assert resolve_setting(values, f"model.layers.{layer}.mlp.up_proj.weight", layer, num_layers) == want
    assert resolve_setting(values, "model.embed_tokens.weight", None, num_layers) == _evaluate_setting(values, 0.0)


def test_llm_merge_from_mergekit_yaml_matches_method(zoo, tmp_path):
    """A mergekit config (LLM-to-LLM) merges every tensor exactly as the method function does."""
    en, ja = zoo.llms["en-llama"], zoo.llms["ja-llama"]
    cfg = _write(tmp_path / "mk.yml", {
        "models": [{"model": str(ja), "parameters": {"weight": 0.7, "density": 0.6}},
                   {"model": str(en), "parameters": {"weight": 0.3, "density": 0.4}}],
        "base_model": str(en),
        "merge_method": "ties",
        "parameters": {"normalize": True},
        "tokenizer_source": "base",
        "dtype": "float32",
    })
    out = merge(cfg, tmp_path / "out", progress=False)
    r_en, r_ja, r_out = CheckpointReader(en), CheckpointReader(ja), CheckpointReader(out)
    assert sorted(r_out.keys()) == sorted(r_en.keys())  # a plain LLM, laid out like the base
    ties = METHODS["ties"]
    for key in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        ref = ties.merge(r_en.get(key), [r_ja.get(key)], [{"weight": 0.7, "density": 0.6}], {"normalize": True})
        assert torch.equal(r_out.get(key), ref), key
    # embeddings follow the base's vocabulary; Japanese rows are matched by token string
    assert r_out.info("model.embed_tokens.weight").shape == r_en.info("model.embed_tokens.weight").shape
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs_ties", "slerp", "model_stock", "linear"])
def test_vlm_recipe_replays_bit_for_bit(zoo, tmp_path, method):
    vlm, en, ja = zoo.vlms["llava-v5-llama"], zoo.llms["en-llama"], zoo.llms["ja-llama"]
    params = {"dare_ties": {"weight": 0.8, "density": 0.5}, "breadcrumbs_ties": {"weight": 0.8, "density": 0.6, "gamma": 0.05},
              "slerp": {}, "model_stock": {}, "linear": {"weight": [1.0, 0.25]}}[method]
    models = [{"model": "vlm", "parameters": params}, {"model": str(ja), "parameters": params}]
    data = {"merge_method": method, "vlm": str(vlm), "models": models, "tokenizer_source": str(ja), "seed": 7}
    if method != "linear":
        data["base_model"] = str(en) if method != "slerp" else str(ja)
    if method == "slerp":
        data["parameters"] = {"t": [0.2, 0.9]}
    out = merge(_write(tmp_path / "r.yaml", data), tmp_path / "a", progress=False)
    resolved = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert resolved["seed"] == 7 and resolved["vlm"] == str(vlm)
    assert all(m["parameters"] for m in resolved["models"]) or method in ("slerp", "model_stock")
    again = merge(out / "merge_recipe.yaml", tmp_path / "b", progress=False)
    _tensors_equal(out, again)


def test_random_method_uses_per_tensor_seeds(zoo, tmp_path):
    vlm, en, ja = zoo.vlms["llava-hf-llama"], zoo.llms["en-llama"], zoo.llms["ja-llama"]
    base = {"merge_method": "dare_linear", "vlm": str(vlm), "base_model": str(en), "target": str(ja),
            "models": [{"model": "vlm", "parameters": {"weight": 1.0, "density": 0.5}}]}
    a = merge({**base, "seed": 1}, tmp_path / "a", progress=False)
    b = merge({**base, "seed": 2}, tmp_path / "b", progress=False)
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    canon = "model.layers.0.mlp.up_proj.weight"
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert not torch.equal(ra.get(key), rb.get(key))
    r_v, r_e, r_j = CheckpointReader(vlm), CheckpointReader(en), CheckpointReader(ja)
    ref = METHODS["dare_linear"].merge(r_e.get(canon), [r_v.get(key)], [{"weight": 1.0, "density": 0.5}], {},
                                       anchor=r_j.get(canon), seed=tensor_seed(1, canon))
    assert torch.equal(ra.get(key), ref)


def test_chat_vector_is_a_recipe(zoo, tmp_path):
    vlm, en, ja = zoo.vlms["llava-next-hf-mistral"], zoo.llms["en-mistral"], zoo.llms["ja-mistral"]
    out = chat_vector(vlm, en, ja, tmp_path / "cv", scale=0.8, layer_scales=[1.0, 0.5], module_scales={"mlp": 0.5},
                      skip="embeddings", progress=False)
    recipe = {"merge_method": "task_arithmetic", "vlm": str(vlm), "base_model": str(en), "target": str(ja),
              "models": [{"model": "vlm", "parameters": {"weight": [
                  {"filter": "embed_tokens", "value": 0.0}, {"filter": "lm_head", "value": 0.0},
                  {"filter_regex": r"\.mlp\.", "value": [0.8 * 0.5, 0.8 * 0.5 * 0.5]},
                  {"filter": "model.norm.", "value": 0.8},
                  {"value": [0.8, 0.8 * 0.5]}]}}]}
    _tensors_equal(out, merge(recipe, tmp_path / "recipe", progress=False))


def test_validate_prints_what_comes_from_where(zoo, tmp_path, capsys):
    cfg = _write(tmp_path / "r.yaml", {
        "merge_method": "ties", "vlm": str(zoo.vlms["llava-original-llama"]), "base_model": str(zoo.llms["en-llama"]),
        "models": [{"model": "vlm", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(zoo.llms["ja-llama"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    })
    assert main(["validate", cfg, "--cache-dir", str(zoo.hf_cache)]) == 0
    text = capsys.readouterr().out
    assert "ties — OK" in text
    for part in ("vision_tower", "projector", "language_model: layers", "language_model: embeddings"):
        assert part in text
    rp, rows = validate(cfg, cache_dir=zoo.hf_cache)
    assert ("language_model: layers", "18", "ties") == rows[[r[0] for r in rows].index("language_model: layers")][:3]
    assert not list(tmp_path.glob("out*"))


def _bad(zoo, tmp_path, **changes):
    data = {"merge_method": "ties", "vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]),
            "models": [{"model": "vlm", "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": str(zoo.llms["ja-llama"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    data.update(changes)
    return _write(tmp_path / "bad.yaml", data)


BAD_RECIPES = {
    "unknown method": ({"merge_method": "frankenmerge"}, "merge_method: 'frankenmerge' is not a method"),
    "unknown parameter": ({"parameters": {"sharpness": 2}}, "sharpness"),
    "density out of range": (
        {"models": [{"model": "vlm", "parameters": {"weight": 1.0, "density": 1.5}}]}, "density: 1.5 out of range (0, 1]"),
    "slerp needs two": ({"merge_method": "slerp", "parameters": {"t": 0.5}, "models": [
        {"model": "vlm"}, {"model": "ja"}, {"model": "en"}]}, "slerp needs exactly 2 models"),
    "bad filter regex": (
        {"models": [{"model": "vlm", "parameters": {"weight": [{"filter_regex": "mlp(", "value": 1.0}], "density": 0.5}}]},
        "models[0].parameters.weight[0].filter_regex: 'mlp(': invalid regular expression"),
    "misspelt key": ({"paramters": {"normalize": True}}, "paramters: unknown key"),
    "slice that cuts layers": (
        {"models": None, "slices": [{"sources": [{"model": "vlm", "layer_range": [0, 1]}]}]},
        "recipe slices: layer_range [0, 1] but the models have 2 layers"),
    "unaligned sources": ({"base_model": "MISTRAL"}, "shape mismatch at 'model.layers.0.self_attn.k_proj.weight'"),
    "vision module of a VLM + LLM recipe": ({"modules": {"vision_tower": {}}},
                                            "modules.vision_tower: " + "EN has no vision_tower tensors (a language model)"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2(zoo, tmp_path, capsys, case):
    changes, expected = BAD_RECIPES[case]
    if changes.get("base_model") == "MISTRAL":
        changes = {"base_model": str(zoo.llms["en-mistral"])}
    if case.startswith("vision module"):
        expected = expected.replace("EN", str(zoo.llms["en-llama"]))
    if case == "slerp needs two":
        for m, p in zip(changes["models"], ("vlm", str(zoo.llms["ja-llama"]), str(zoo.llms["en-llama"]))):
            m["model"] = p
    cfg = _bad(zoo, tmp_path, **changes)
    for argv in (["validate", cfg], ["merge", cfg, str(tmp_path / "out"), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vlm-merge: error: "), err
        assert expected in err[0], err[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_relative_paths_are_relative_to_the_recipe(zoo, tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "en", "parameters": {"weight": 1.0}}, {"model": "ja", "parameters": {"weight": 1.0}}]}))
    shutil.copytree(zoo.llms["en-llama"], tmp_path / "en")
    r = load_recipe(cfg)
    assert r.models[0].model == str((tmp_path / "en").resolve())
    assert r.models[1].model == "ja"  # not a local path: left as a Hugging Face id


@pytest.mark.parametrize("models,where,phrase", [
    ([{"model": "a"}, {"model": "b", "parameters": {"weight": {"x": 1}}}], "models[1].parameters.weight: {'x': 1}:",
     "expected a number, a list of numbers (per layer) or a list of {filter: …, value: …}"),
    ([{"model": "a", "parameters": {"weight": [0.5, {"value": 1.0}]}}], "models[0].parameters.weight[0]: 0.5:",
     "write each condition as {filter: …, value: …}"),
    ([{"model": "a", "parameters": {"weight": [{"filter": "mlp", "valu": 1.0}]}}], "models[0].parameters.weight[0].valu:",
     "unknown key"),
    ([{"model": "a", "parameters": {"weight": []}}], "models[0].parameters.weight: []:", "at least 1 item"),
    ([{"model": "a", "weight": 1.0}], "models[0].weight:", "unknown key (known: model, parameters)"),
    ([], "models:", "missing or empty; list the models to merge"),
])  # fmt: skip
def test_validation_error_is_one_line_with_file_path_value_and_fix(tmp_path, models, where, phrase):
    """Every pydantic validation error of a recipe file is one VlmMergeError line: the file, the field path,
    the value, what is wrong and what to do."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    with pytest.raises(VlmMergeError) as e:
        load_recipe(cfg)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"recipe {cfg}: {where}") and phrase in line, line


def test_recipe_objects_are_checked_and_replayable():
    """`Recipe` is a frozen pydantic dataclass: `dataclasses.replace` checks the copy; to_dict -> from dict is
    the same recipe (the resolved merge_recipe.yaml round trip)."""
    import dataclasses

    from pydantic import ValidationError

    from vlm_merge.recipe import ModelEntry, Recipe, recipe_from_dict

    r = Recipe(merge_method="ties", models=(ModelEntry("a", {"weight": [1, 0.5]}),), tokenizer={"source": "union"},
               out_dtype="bfloat16", chat_template="auto")
    assert recipe_from_dict(r.to_dict()) == r
    assert isinstance(r.models[0].parameters["weight"][0], int)  # values keep their YAML types
    with pytest.raises(ValidationError):
        dataclasses.replace(r, seed="seven")


def test_scientific_notation_reads_as_a_number():
    """PyYAML reads `1e-3` as a string (YAML 1.1); mergekit 0.1.5 and vlm-merge read it as the number."""
    from vlm_merge.recipe import recipe_from_dict

    data = yaml.safe_load("merge_method: ties\nmodels:\n  - model: a\n    parameters: {density: 1e-3, weight: [5E-1, 1]}\n")
    assert data["models"][0]["parameters"]["density"] == "1e-3"
    params = recipe_from_dict(data).models[0].parameters
    assert params == {"density": 0.001, "weight": [0.5, 1]}
    assert resolve_setting(params["weight"], "model.layers.1.x", 1, 3) == pytest.approx(0.75)
