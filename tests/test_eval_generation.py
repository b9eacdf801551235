"""Batched generation: token-identical to one-at-a-time greedy, length buckets, pre-encoded images reused
across language models, OOM halving, EOS, beams and repetition penalty, prompt templates."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from eval.decoding import GenerationSettings
from eval.fixture_datasets import draw_scene
from eval.generation import EncodedImage, encode_images, generate, generate_answers
from eval.prompts import JA_SHISA_SYSTEM, TEMPLATES, build_prompt
from vlm_merge.errors import VlmMergeError

QUESTIONS = ["これは何ですか", "色は？", "何個ありますか、数えてください", "形", "この画像を日本語で詳しく説明してください",
             "猫", "左にあるものは何色ですか？"]
SIZES = [(64, 48), (32, 96), (96, 32), (40, 40), (80, 60), (33, 70), (64, 64)]


@pytest.fixture(scope="module")
def images():
    rng = random.Random(5)
    return [draw_scene(rng, size)[0] for size in SIZES]


@pytest.fixture(scope="module")
def vlms(zoo):
    out = {}
    for name in ("llava-hf-llama", "llava-next-hf-mistral"):
        path = str(zoo.vlms[name])
        out[name] = (AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path))
    return out


GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.mark.parametrize("name", ["llava-hf-llama", "llava-next-hf-mistral"])
def test_batched_greedy_equals_one_at_a_time(vlms, images, name):
    model, proc = vlms[name]
    batches = []
    batched = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=3,
                       on_batch=lambda idx, gens: batches.append(idx))
    single = [generate(model, proc, [im], [q], settings=GREEDY, batch_size=1)[0] for im, q in zip(images, QUESTIONS)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({tuple(g.token_ids) for g in batched}) >= 4  # different prompts really give different answers
    assert all(len(g.token_ids) == 12 or g.token_ids[-1] in (model.generation_config.eos_token_id,) for g in batched)
    # buckets: batches of 3, 3, 1 cut from the prompts sorted by length (image tokens included)
    lengths = [g.prompt_tokens for g in batched]
    assert [len(b) for b in batches] == [3, 3, 1] and sorted(i for b in batches for i in b) == list(range(7))
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(batches, batches[1:]))
    if name == "llava-next-hf-mistral":  # anyres: the image's aspect ratio changes its token count
        assert len(set(lengths)) > 3
    assert generate_answers(model, proc, images, QUESTIONS, max_new_tokens=12, batch_size=3) == [g.text for g in batched]


def test_answers_depend_on_their_own_image(vlms, images):
    """So the comparisons above would catch images and prompts paired up wrongly inside a batch."""
    model, proc = vlms["llava-hf-llama"]
    straight = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)
    swapped = generate(model, proc, images[::-1], QUESTIONS, settings=GREEDY, batch_size=4)
    assert any(a.token_ids != b.token_ids for a, b in zip(straight, swapped))


@pytest.mark.parametrize("name", ["llava-hf-llama", "llava-next-hf-mistral"])
def test_encoded_images_serve_other_language_models(vlms, images, name):
    model, proc = vlms[name]
    encoded = encode_images(model, proc, images, batch_size=4)
    assert all(isinstance(e, EncodedImage) and e.features.device.type == "cpu" for e in encoded)
    # a "candidate": same vision tower and projector, another language model
    variant = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in variant.named_parameters():
            if "language_model" in pname:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    raw = generate(variant, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)

    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran although the images were encoded")

    variant.model.vision_tower.forward = no_vision
    reused = generate(variant, proc, encoded, QUESTIONS, settings=GREEDY, batch_size=4)
    assert [r.token_ids for r in reused] == [r.token_ids for r in raw]
    assert [r.prompt_tokens for r in reused] == [r.prompt_tokens for r in raw]
    original = generate(model, proc, encoded, QUESTIONS, settings=GREEDY, batch_size=4)
    assert [r.token_ids for r in original] != [r.token_ids for r in raw]  # the language model did change
    with pytest.raises(VlmMergeError, match="not a mix"):
        generate(model, proc, [encoded[0], images[1]], QUESTIONS[:2])


def test_out_of_memory_halves_the_batch_and_retries(vlms, images, monkeypatch):
    model, proc = vlms["llava-hf-llama"]
    reference = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)
    real, sizes = model.generate, []

    def small_memory(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", small_memory)
    got = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)
    assert [g.token_ids for g in got] == [g.token_ids for g in reference]
    assert sizes[0] == 4 and max(sizes[1:]) == 2 and sum(s for s in sizes if s <= 2) == len(QUESTIONS)

    def no_memory(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(model, "generate", no_memory)
    with pytest.raises(VlmMergeError, match="out of memory generating one answer"):
        generate(model, proc, images[:2], QUESTIONS[:2], settings=GREEDY, batch_size=2)


def test_generation_stops_at_eos(zoo, images):
    path = str(zoo.vlms["llava-hf-llama"])
    model, proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    free = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)
    stop = free[0].token_ids[2]
    model.generation_config.eos_token_id = stop  # pretend this token is EOS
    cut = generate(model, proc, images, QUESTIONS, settings=GREEDY, batch_size=4)
    assert cut[0].token_ids == free[0].token_ids[:3]
    for f, c in zip(free, cut):
        expected = f.token_ids[: f.token_ids.index(stop) + 1] if stop in f.token_ids else f.token_ids
        assert c.token_ids == expected
    forced = generate(model, proc, images[:2], QUESTIONS[:2], settings=GenerationSettings(12, min_new_tokens=12))
    assert all(len(g.token_ids) == 12 for g in forced)


def test_beam_search_and_repetition_penalty_change_the_output(vlms, images):
    model, proc = vlms["llava-next-hf-mistral"]
    greedy = generate(model, proc, images, QUESTIONS, settings=GenerationSettings(16), batch_size=4)
    beams = generate(model, proc, images, QUESTIONS, settings=GenerationSettings(16, num_beams=3), batch_size=4)
    penalised = generate(model, proc, images, QUESTIONS, settings=GenerationSettings(16, repetition_penalty=1.5),
                         batch_size=4)
    assert [g.token_ids for g in beams] != [g.token_ids for g in greedy]

    def repeats(gens):
        return sum(len(g.token_ids) - len(set(g.token_ids)) for g in gens)

    assert repeats(penalised) < repeats(greedy)
    with pytest.raises(VlmMergeError, match="num_beams=0"):
        GenerationSettings(16, num_beams=0)


def test_prompt_templates(vlms):
    _, proc = vlms["llava-hf-llama"]
    assert build_prompt(proc, "何ですか", "ja-shisa-vqa") == (
        f"[INST] <<SYS>>\n{JA_SHISA_SYSTEM}\n<</SYS>>\n\n<image>\n何ですか [/INST]"
    )
    assert JA_SHISA_SYSTEM == "あなたは役立つ、偏見がなく、検閲されていないアシスタントです。与えられた画像を下に、質問に答えてください。"
    assert build_prompt(proc, "何ですか", "llava-mistral") == "[INST] <image>\n何ですか [/INST]"
    assert build_prompt(proc, "何ですか", "llava-1.5") == "USER: <image>\n何ですか ASSISTANT:"
    assert build_prompt(proc, "何ですか", "chat") == "USER: <image>\n何ですか ASSISTANT:"  # the fixture's template
    assert build_prompt(proc, "<image>何ですか", "llava-1.5") == "USER: <image>\n何ですか ASSISTANT:"  # one image only
    assert set(TEMPLATES) == {"chat", "ja-shisa-vqa", "llava-mistral", "llava-1.5"}
    no_template = copy.copy(proc)
    no_template.chat_template = None
    assert build_prompt(no_template, "何ですか") == "USER: <image>\n何ですか ASSISTANT:"  # the tokenizer's template
    no_template.tokenizer = copy.copy(proc.tokenizer)
    no_template.tokenizer.chat_template = None
    with pytest.raises(VlmMergeError, match="no chat template"):
        build_prompt(no_template, "何ですか")
    with pytest.raises(VlmMergeError, match="unknown prompt template"):
        build_prompt(proc, "何ですか", "alpaca")
