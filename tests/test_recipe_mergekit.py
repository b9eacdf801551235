"""mergekit users' recipes: mergekit's own example YAMLs (tests/data/mergekit_examples, verbatim) validate and
merge on local fixture models; `tokenizer_source: union`, the `tokenizer:` block, `chat_template`, `out_dtype`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vlm_merge.cli import main
from vlm_merge.engine.merge import merge, validate
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.methods import METHODS
from vlm_merge.recipe import load_recipe
from vlm_merge.testing import write_llama_family

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"
# mergekit's Hugging Face ids -> local fixture models (one architecture, one vocabulary)
LOCAL = {
    "mistralai/Mistral-7B-v0.1": "base", "TheBloke/Llama-2-13B-fp16": "base",
    "mistralai/Mistral-7B-Instruct-v0.2": "a", "psmathur/orca_mini_v3_13b": "a", "model_a": "a",
    "BioMistral/BioMistral-7B": "b", "garage-bAInd/Platypus2-13B": "b", "model_b": "b",
    "WizardLM/WizardLM-13B-V1.2": "c", "WizardLM/WizardMath-13B-V1.0": "c",
}  # fmt: skip
LAYERS = 2  # the fixtures' decoder layers; mergekit's examples slice [0, 40] of 13B models
DOWN = "model.layers.1.mlp.down_proj.weight"  # layer 1 of 2: t = 1 along every gradient
Q = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.norm.weight"  # outside the layers: t = 0


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A base Llama and three fine-tunes of it, all with the English fixture tokenizer."""
    return write_llama_family(tmp_path_factory.mktemp("llamas"))


def _local(example: str, llamas: dict[str, Path], tmp_path: Path) -> Path:
    """The example with its model ids pointed at the fixtures and its layer ranges at their layer count."""
    text = (EXAMPLES / f"{example}.yml").read_text()
    for hf_id, name in LOCAL.items():
        text = text.replace(hf_id, str(llamas[name]))
    text = text.replace("[0, 40]", f"[0, {LAYERS}]")
    path = tmp_path / f"{example}.yml"
    path.write_text(text)
    return path


def _get(out: Path, key: str) -> torch.Tensor:
    return CheckpointReader(out).get(key)


def _inputs(llamas, key: str, *names: str) -> list[torch.Tensor]:
    return [CheckpointReader(llamas[n]).get(key) for n in names]


def test_example_files_are_the_six_of_mergekit():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yml")) == [
        "arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties"]  # fmt: skip


def test_linear_example(llamas, tmp_path):
    out = merge(_local("linear", llamas, tmp_path), tmp_path / "out", progress=False)
    a, c, b = _inputs(llamas, DOWN, "a", "c", "b")  # in the recipe's order: orca, WizardLM, Platypus
    want = METHODS["linear"].merge(None, [a, c, b], [{"weight": 1.0}, {"weight": 0.3}, {"weight": 0.5}], {})
    assert torch.equal(_get(out, DOWN), want.to(torch.float16))  # dtype: float16


def test_ties_example_interpolates_gradients_longer_than_the_layer_count(llamas, tmp_path):
    """density [1, 0.7, 0.1] and weight [0, 0.3, 0.7, 1] over 2 layers: layer 1 sits at t = 1 (the last
    values), the final norm at t = 0 (the first); the third model's weight is 0.5 on mlp tensors, else 0."""
    out = merge(_local("ties", llamas, tmp_path), tmp_path / "out", progress=False)
    shared = {"normalize": True, "int8_mask": True}
    base, a, b, c = _inputs(llamas, DOWN, "base", "a", "b", "c")
    per_model = [{"density": 0.1, "weight": 1.0}, {"density": 0.5, "weight": 1.0}, {"density": 0.33, "weight": 0.5}]
    assert torch.equal(_get(out, DOWN), METHODS["ties"].merge(base, [a, b, c], per_model, shared).to(torch.float16))
    base, a, b, c = _inputs(llamas, NORM, "base", "a", "b", "c")
    per_model = [{"density": 1.0, "weight": 1.0}, {"density": 0.5, "weight": 0.0}, {"density": 0.33, "weight": 0.0}]
    assert torch.equal(_get(out, NORM), METHODS["ties"].merge(base, [a, b, c], per_model, shared).to(torch.float16))


def test_bio_merge_example(llamas, tmp_path):
    out = merge(_local("bio-merge", llamas, tmp_path), tmp_path / "out", progress=False)
    base, a, b = _inputs(llamas, Q, "base", "a", "b")
    per_model = [{"density": 0.5, "weight": 0.5}] * 2
    want = METHODS["ties"].merge(base, [a, b], per_model, {"normalize": False, "int8_mask": True})
    assert torch.equal(_get(out, Q), want.to(torch.float16))


def test_gradient_slerp_example_from_one_slice(llamas, tmp_path):
    """The one-slice form is the models: form; t on layer 1 is the last value of each filter's list."""
    recipe = load_recipe(_local("gradient-slerp", llamas, tmp_path))
    assert [m.model for m in recipe.models] == [str(llamas["a"]), str(llamas["b"])] and recipe.layer_range == (0, LAYERS)
    out = merge(recipe, tmp_path / "out", progress=False)
    slerp = METHODS["slerp"]
    for key, t in ((Q, 1.0), (DOWN, 0.0), (NORM, 0.5)):  # self_attn: [0 .. 1], mlp: [1 .. 0], the rest: 0.5
        a, b = _inputs(llamas, key, "a", "b")
        assert torch.equal(_get(out, key), slerp.merge(None, [a, b], [{}, {}], {"t": t}).to(torch.float16)), key
    resolved = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert "slices" not in resolved and len(resolved["models"]) == 2


def test_arcee_fusion_example(llamas, tmp_path):
    path = _local("arcee_fusion", llamas, tmp_path)
    assert load_recipe(path).merge_method == "arcee_fusion"
    if "arcee_fusion" in METHODS:
        assert (merge(path, tmp_path / "out", progress=False) / "config.json").is_file()
    else:  # the method itself comes with the methods of issue 32
        with pytest.raises(VlmMergeError, match="merge_method: 'arcee_fusion' is not a method"):
            merge(path, tmp_path / "out", progress=False)


def test_passthrough_example_stacks_layers(llamas, tmp_path, capsys):
    """mergekit's frankenmerge example (passthrough, two slices) stacks layers: its ranges [0, 24] + [20, 40]
    of 40-layer models become [0, 2] + [1, 2] of the 2-layer fixtures (an overlap of one layer); embeddings
    come from the first slice's model, the final norm and lm_head from the last's (mergekit 0.1.5)."""
    path = _local("orcamini-platy-44layer", llamas, tmp_path)
    text = path.read_text()
    assert "[0, 24]" in text and "[20, 40]" in text
    path.write_text(text.replace("[0, 24]", "[0, 2]").replace("[20, 40]", "[1, 2]"))
    assert main(["validate", str(path)]) == 0
    assert "passthrough — OK" in capsys.readouterr().out
    out = merge(path, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    ta, tb = CheckpointReader(llamas["a"]), CheckpointReader(llamas["b"])
    for j, (src, i) in enumerate([(ta, 0), (ta, 1), (tb, 1)]):
        got = _get(out, f"model.layers.{j}.mlp.down_proj.weight")
        assert got.dtype == torch.float16 and torch.equal(got, src.get(f"model.layers.{i}.mlp.down_proj.weight").half())
    assert torch.equal(_get(out, "model.embed_tokens.weight"), ta.get("model.embed_tokens.weight").half())
    assert torch.equal(_get(out, NORM), tb.get(NORM).half())


def test_passthrough_example_beyond_the_models_layers_is_one_line(llamas, tmp_path, capsys):
    """The example's own ranges on 2-layer models: one line naming the file's slice, its range and the layer count."""
    path = _local("orcamini-platy-44layer", llamas, tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slices[0].sources[0].layer_range [0, 24]: layer 23" in err[0] and "has 2 decoder layers" in err[0], err


def test_union_vocabulary_takes_rows_from_the_models_that_have_the_token(zoo, tmp_path):
    """tokenizer_source: union on an English base and a Japanese model: the output has every Japanese token,
    each new token's row is the Japanese model's row, shared tokens are merged; replay is bit for bit."""
    from transformers import AutoTokenizer

    en, ja = zoo.llms["en-llama"], zoo.llms["ja-llama"]
    data = {"merge_method": "task_arithmetic", "base_model": str(en),
            "models": [{"model": str(ja), "parameters": {"weight": 0.5}}], "tokenizer_source": "union"}
    out = merge(data, tmp_path / "out", progress=False)
    tok_en, tok_ja, tok_out = (AutoTokenizer.from_pretrained(str(p)) for p in (en, ja, out))
    v_en, v_ja, v_out = tok_en.get_vocab(), tok_ja.get_vocab(), tok_out.get_vocab()
    new = [t for t in v_ja if t not in v_en]
    assert new and set(v_out) == set(v_en) | set(v_ja) and len(tok_out) == len(v_out)
    assert all(v_out[t] == v_en[t] for t in v_en)  # the base's ids stay
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        e, j, o = (CheckpointReader(p).get(key) for p in (en, ja, out))
        assert o.shape[0] == len(v_out)
        for t in new:
            assert torch.equal(o[v_out[t]], j[v_ja[t]]), (key, t)
        shared = [t for t in v_en if v_en[t] < e.shape[0]]
        rows_out = torch.tensor([v_out[t] for t in shared])
        want = METHODS["task_arithmetic"].merge(e[[v_en[t] for t in shared]], [j[[v_ja[t] for t in shared]]], [{"weight": 0.5}], {})
        assert torch.equal(o[rows_out], want), key
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(v_out)
    resolved = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert resolved["tokenizer_source"] == "union"
    again = merge(out / "merge_recipe.yaml", tmp_path / "again", progress=False)
    ra, rb = CheckpointReader(out), CheckpointReader(again)
    assert all(ra.read_bytes(k) == rb.read_bytes(k) for k in ra.keys())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_tokenizer_block_chat_template_out_dtype(zoo, tmp_path):
    """mergekit's `tokenizer:` block (source union, pad_to_multiple_of), `chat_template` and `out_dtype`."""
    en, ja = zoo.llms["en-llama"], zoo.llms["ja-llama"]
    data = {"merge_method": "linear", "models": [{"model": str(en), "parameters": {"weight": 1.0}},
                                                 {"model": str(ja), "parameters": {"weight": 1.0}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64}, "chat_template": "chatml",
            "dtype": "float32", "out_dtype": "bfloat16", "parameters": {"normalize": True}}
    out = merge(data, tmp_path / "out", progress=False)
    r = CheckpointReader(out)
    rows = r.info("model.embed_tokens.weight").shape[0]
    assert rows % 64 == 0 and r.info("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    resolved = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert resolved["tokenizer"] == {"source": "union", "pad_to_multiple_of": 64} and resolved["dtype"] == "bfloat16"
    assert "tokenizer_source" not in resolved and resolved["chat_template"] == "chatml"


@pytest.mark.parametrize("changes,phrase", [
    ({"chat_template": "llama9"}, "chat_template: 'llama9' is not a Jinja template"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}}}}}, "tokenizer.tokens: '<x>' is not in the output's vocabulary"),
    ({"tokenizer": {"source": "union", "tokens": {"<s>": {"source": "/nowhere"}}}}, "tokenizer.tokens.<s>.source: '/nowhere' is not a model of the recipe"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of: 0: Input should be greater than 0"),
    ({"out_dtype": "int4"}, "out_dtype: 'int4': not a dtype"),
])  # fmt: skip
def test_bad_mergekit_keys_are_one_line(zoo, tmp_path, capsys, changes, phrase):
    cfg = tmp_path / "r.yaml"
    models = [{"model": str(zoo.llms[m]), "parameters": {"weight": 1.0}} for m in ("en-llama", "ja-llama")]
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, **changes}))
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm-merge: error: ") and phrase in err[0], err


def test_validate_accepts_every_runnable_example(llamas, tmp_path):
    for example in ("linear", "ties", "bio-merge", "gradient-slerp"):
        rp, rows = validate(_local(example, llamas, tmp_path))
        assert ("language_model: layers", str(9 * LAYERS)) == rows[[r[0] for r in rows].index("language_model: layers")][:2]


def test_union_in_a_vlm_recipe_keeps_the_image_token_special(zoo, tmp_path):
    """With a VLM, union adds the language models' tokens as plain tokens; the image / pad tokens stay special."""
    from transformers import AutoTokenizer

    vlm, en, ja = zoo.vlms["llava-hf-llama"], zoo.llms["en-llama"], zoo.llms["ja-llama"]
    data = {"merge_method": "task_arithmetic", "vlm": str(vlm), "base_model": str(en), "target": str(en),
            "models": [{"model": "vlm", "parameters": {"weight": 1.0}}, {"model": str(ja), "parameters": {"weight": 0.5}}],
            "tokenizer_source": "union"}
    out = merge(data, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {"<image>", "<pad>"} <= special and "あ" in tok.get_vocab() and "あ" not in special
    config = json.loads((out / "config.json").read_text())
    assert tok.convert_ids_to_tokens(config["image_token_index"]) == "<image>"
    assert CheckpointReader(out).info("language_model.model.embed_tokens.weight").shape[0] >= len(tok)


def test_tokenizer_tokens_set_rows_by_hand(zoo, tmp_path):
    """mergekit's `tokenizer.tokens`: a union token from zeros or from another model's token id, and a shared
    token forced to one model's row (no task vector there); every other row merges as before."""
    from transformers import AutoTokenizer

    en, ja = zoo.llms["en-llama"], zoo.llms["ja-llama"]
    v_en, v_ja = (AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in (en, ja))
    new = [t for t in sorted(v_ja, key=v_ja.get) if t not in v_en]
    shared = [t for t in sorted(v_en, key=v_en.get) if t in v_ja][-2:]  # two ordinary tokens, not specials
    zero, other, forced = new[0], new[1], shared[0]
    tokens = {zero: {"source": {"kind": "zero"}}, other: {"source": {"kind": "model_token", "model": str(en), "token_id": 7}},
              forced: {"source": str(ja), "force": True}}
    data = {"merge_method": "task_arithmetic", "base_model": str(en),
            "models": [{"model": str(ja), "parameters": {"weight": 0.5}}], "tokenizer": {"source": "union", "tokens": tokens}}
    out = merge(data, tmp_path / "out", progress=False)
    v_out = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    key = "model.embed_tokens.weight"
    e, j, o = (CheckpointReader(p).get(key) for p in (en, ja, out))
    assert torch.equal(o[v_out[zero]], torch.zeros(o.shape[1]))
    assert torch.equal(o[v_out[other]], e[7])
    assert torch.equal(o[v_out[forced]], j[v_ja[forced]])
    t = shared[1]  # not named: merged
    want = METHODS["task_arithmetic"].merge(e[v_en[t]], [j[v_ja[t]]], [{"weight": 0.5}], {})
    assert torch.equal(o[v_out[t]], want)
    again = merge(out / "merge_recipe.yaml", tmp_path / "again", progress=False)
    assert CheckpointReader(again).read_bytes(key) == CheckpointReader(out).read_bytes(key)
