"""Chat Vector end to end on every layout: formula per tensor, byte-identical vision side, vocab
alignment by token string, load + generate with transformers' own classes, saved deltas."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from chat_vector import apply_delta, chat_vector, extract_delta, load_delta
from tests.conftest import family_of
from vlm_merge.architecture.layouts import layout_named, to_hf
from vlm_merge.architecture.anatomy import PROJECTOR, VISION, inspect_checkpoint, inspect_vlm
from vlm_merge.io.checkpoint import CheckpointReader

VLMS = ["llava-hf-llama", "llava-v5-llama", "llava-next-hf-mistral", "llava-original-llama", "llava-original-mistral"]


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """Each VLM merged once at scale 0.7 (float32 fixtures, so the output is float32 too)."""
    root = tmp_path_factory.mktemp("cv")
    outs = {}
    for name in VLMS:
        en, ja = family_of(zoo, name)
        outs[name] = chat_vector(zoo.vlms[name], en, ja, root / name, scale=0.7, cache_dir=zoo.hf_cache, progress=False)
    return outs


def _vocab(path):
    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


@pytest.mark.parametrize("name", VLMS)
def test_formula_per_tensor_against_float32_reference(zoo, merged, name):
    en_dir, ja_dir = family_of(zoo, name)
    vlm_r, en_r, ja_r = CheckpointReader(zoo.vlms[name]), CheckpointReader(en_dir), CheckpointReader(ja_dir)
    out_r = CheckpointReader(merged[name])
    vlm = inspect_vlm(vlm_r)
    out = inspect_checkpoint(out_r)
    assert out.layout.name in ("llava-hf", "llava-hf-v5")
    vocab_en, vocab_ja, vocab_vlm, vocab_out = _vocab(en_dir), _vocab(ja_dir), _vocab(zoo.vlms[name]), _vocab(merged[name])
    for canon, vkey in vlm.lm_keys.items():
        if canon.endswith("rotary_emb.inv_freq"):
            continue
        v, e, j, o = vlm_r.get(vkey).float(), en_r.get(canon).float(), ja_r.get(canon).float(), out_r.get(out.lm_keys[canon])
        if canon in ("model.embed_tokens.weight", "lm_head.weight"):
            shared = [t for t in vocab_ja if t in vocab_en and t in vocab_vlm]
            assert len(shared) >= len(vocab_en) - 2
            rows_ja = torch.tensor([vocab_ja[t] for t in shared])
            ref = j[rows_ja] + 0.7 * (v[torch.tensor([vocab_vlm[t] for t in shared])] - e[torch.tensor([vocab_en[t] for t in shared])])
            assert torch.equal(o[rows_ja], ref), canon
            ja_only = torch.tensor([i for t, i in vocab_ja.items() if t not in vocab_en])
            assert len(ja_only) > 50 and torch.equal(o[ja_only], j[ja_only])  # extended Japanese rows kept
            image = vocab_out["<image>"]
            if "<image>" in vocab_vlm:
                assert torch.equal(o[image], v[vocab_vlm["<image>"]])
        else:
            assert torch.equal(o, (j + 0.7 * (v - e)).to(o.dtype)), canon


@pytest.mark.parametrize("name", VLMS)
def test_vision_tower_and_projector_byte_identical(zoo, merged, name):
    vlm_r, out_r = CheckpointReader(zoo.vlms[name]), CheckpointReader(merged[name])
    vlm = inspect_vlm(vlm_r)
    out = inspect_checkpoint(out_r)
    pairs = []
    for part in (VISION, PROJECTOR):
        for key in vlm.parts[part]:
            new = to_hf(key, vlm.layout) if vlm.layout.name == "llava-original" else key
            pairs.append((vlm_r, key, new))
    if not vlm.parts[VISION]:  # LLaVA-1.5 original: the tower comes from its CLIP checkpoint
        clip = CheckpointReader(zoo.clip)
        pairs += [(clip, k, to_hf(k, layout_named("clip"))) for k in clip.keys() if k.startswith("vision_model.")]
    assert len(pairs) > 30
    for reader, key, new in pairs:
        assert reader.read_bytes(key) == out_r.read_bytes(new), key
    assert len(out.parts[VISION]) + len(out.parts[PROJECTOR]) == len(pairs)


@pytest.mark.parametrize("name", VLMS)
def test_output_loads_and_generates_with_transformers(zoo, merged, name):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    out = merged[name]
    model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    cfg = json.loads((out / "config.json").read_text())
    proc = AutoProcessor.from_pretrained(str(out))
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    assert cfg["text_config"]["vocab_size"] == model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert len(tok) > len(AutoTokenizer.from_pretrained(str(family_of(zoo, name)[0])))  # the Japanese vocabulary
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "これは何ですか"}]}]
    prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
    inputs = proc(images=Image.new("RGB", (40, 30), (200, 10, 10)), text=prompt, return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4
    card = (out / "README.md").read_text()
    assert "Chat Vector" in card and "0.7" in card and str(zoo.vlms[name]) in card


def test_scale_zero_is_ja_base_and_skip_presets(zoo, tmp_path):
    en, ja = family_of(zoo, "llava-hf-llama")
    vlm = zoo.vlms["llava-hf-llama"]
    out0 = chat_vector(vlm, en, ja, tmp_path / "s0", scale=0.0, progress=False)
    outn = chat_vector(vlm, en, ja, tmp_path / "norms", skip="norms", layer_scales=[1.0, 0.0], module_scales={"mlp": 0.5}, progress=False)
    ja_r, r0, rn = CheckpointReader(ja), CheckpointReader(out0), CheckpointReader(outn)
    a0, an = inspect_checkpoint(r0), inspect_checkpoint(rn)
    vlm_r, en_r = CheckpointReader(vlm), CheckpointReader(en)
    vlm_a = inspect_vlm(vlm_r)
    for canon in ja_r.keys():
        j = ja_r.get(canon)
        if canon not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(r0.get(a0.lm_keys[canon]), j)
        o = rn.get(an.lm_keys[canon])
        if "norm" in canon or canon.startswith("model.layers.1."):
            assert torch.equal(o, j), canon  # skipped norms; layer 1 has scale 0
        elif canon.startswith("model.layers.0.mlp."):
            v, e = vlm_r.get(vlm_a.lm_keys[canon]).float(), en_r.get(canon).float()
            assert torch.equal(o, j + 0.5 * (v - e))
        elif canon.startswith("model.layers.0.self_attn."):
            assert not torch.equal(o, j)


def test_saved_delta_roundtrip_is_bit_identical(zoo, merged, tmp_path):
    name = "llava-hf-llama"
    en, ja = family_of(zoo, name)
    f = extract_delta(zoo.vlms[name], en, tmp_path / "cv.safetensors", progress=False)
    d = load_delta(f)
    assert d.metadata["sources"]["vlm"] == str(zoo.vlms[name]) and d.metadata["dtype"] == "float32"
    assert "model.layers.0.self_attn.q_proj.weight" in d.reader.keys()
    assert d.metadata["key_map"]["model.norm.weight"] == "language_model.model.norm.weight"
    out = apply_delta(d, ja, tmp_path / "applied", scale=0.7, progress=False)
    a, b = CheckpointReader(out), CheckpointReader(merged[name])
    assert a.keys() == b.keys()
    for k in a.keys():
        assert a.read_bytes(k) == b.read_bytes(k), k


def test_bfloat16_output_rounds_once(zoo, tmp_path):
    en, ja = family_of(zoo, "llava-v5-llama")
    vlm = zoo.vlms["llava-v5-llama"]
    out = chat_vector(vlm, en, ja, tmp_path / "bf16", scale=1.3, dtype="bfloat16", progress=False)
    r, vr, er, jr = CheckpointReader(out), CheckpointReader(vlm), CheckpointReader(en), CheckpointReader(ja)
    key = "model.layers.1.mlp.down_proj.weight"
    o = r.get("model.language_model.layers.1.mlp.down_proj.weight")
    ref = jr.get(key).float() + 1.3 * (vr.get("model.language_model.layers.1.mlp.down_proj.weight").float() - er.get(key).float())
    assert o.dtype == torch.bfloat16 and torch.equal(o, ref.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # vision tower stays in its own dtype, byte for byte
    k = "model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert r.read_bytes(k) == vr.read_bytes(k)


def test_batched_generation_equals_one_at_a_time(zoo, merged):
    from transformers import AutoModelForImageTextToText

    from eval.fixture_datasets import draw_scene
    from eval.generation import generate_answers

    out = merged["llava-hf-llama"]
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    proc = AutoProcessor.from_pretrained(str(out))
    rng = random.Random(3)
    images = [draw_scene(rng)[0] for _ in range(5)]
    questions = ["これは何ですか", "色は？", "何個ありますか、数えてください", "形", "この画像を説明してください"]
    batched = generate_answers(model, proc, images, questions, max_new_tokens=6, batch_size=5)
    single = [generate_answers(model, proc, [im], [q], max_new_tokens=6, batch_size=1)[0] for im, q in zip(images, questions)]
    assert batched == single
    assert len(set(batched)) > 1


def test_checkpoint_saved_by_transformers_5_is_understood(zoo, tmp_path):
    """transformers 5's save_pretrained writes language_model.model.* and vision_tower.* (no vision_model.)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(zoo.vlms["llava-hf-llama"]))
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        if (zoo.vlms["llava-hf-llama"] / name).exists():
            (saved / name).write_bytes((zoo.vlms["llava-hf-llama"] / name).read_bytes())
    keys = CheckpointReader(saved).keys()
    assert any(k.startswith("vision_tower.") for k in keys) and any(k.startswith("language_model.model.") for k in keys)
    vlm = inspect_vlm(CheckpointReader(saved))
    assert vlm.layout.name == "llava-hf" and len(vlm.parts[VISION]) == len(inspect_vlm(CheckpointReader(zoo.vlms["llava-hf-llama"])).parts[VISION])
    en, ja = family_of(zoo, "llava-hf-llama")
    out = chat_vector(saved, en, ja, tmp_path / "out", progress=False)
    loaded, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info


def test_the_preset_is_the_cores_and_chat_vector_reexports_it():
    import chat_vector
    import chat_vector.api
    import chat_vector.rules
    from vlm_merge.recipe import presets

    for name in ("chat_vector_recipe", "make_scales", "Scales", "SKIP_PRESETS", "MODULES", "DEFAULT_SKIP"):
        assert getattr(chat_vector, name) is getattr(presets, name), name
    assert chat_vector.api.chat_vector_recipe is presets.chat_vector_recipe and chat_vector.api.make_scales is presets.make_scales
    assert chat_vector.rules.resolve_skip is presets.resolve_skip
    recipe = presets.chat_vector_recipe("v", "en", "ja", presets.make_scales(0.5, skip="norms"))
    assert (recipe.merge_method, recipe.vlm, recipe.base_model, recipe.target) == ("task_arithmetic", "v", "en", "ja")
    assert [m.model for m in recipe.models] == ["vlm"]
    weight = recipe.models[0].parameters["weight"]
    assert weight[0] == {"filter_regex": presets.SKIP_PRESETS["norms"][0], "value": 0.0} and weight[-1] == {"value": 0.5}
