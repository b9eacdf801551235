"""A short `vlm-merge zoo build` runs end to end and writes checkpoints transformers and vlm-merge read."""

from __future__ import annotations

import argparse
import json

import pytest
import torch


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    from vlm_merge.cli.world import add_world_commands

    parser = argparse.ArgumentParser()
    add_world_commands(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("world") / "zoo"
    args = parser.parse_args(["zoo", "build", "--seed", "3", "--out", str(out), "--smoke", "--quiet"])
    assert args.func(args) == 0
    return out


def test_smoke_build_writes_every_part(smoke_zoo):
    meta = json.loads((smoke_zoo / "zoo.json").read_text())
    assert meta["seed"] == 3 and set(meta["timings_s"]) >= {"en-base", "ja-base", "vision", "en-vlm", "total"}
    log = json.loads((smoke_zoo / "train_log.json").read_text())
    assert all(log[k] for k in ("en-base", "ja-base", "vision", "en-vlm"))
    for part in ("en-base", "ja-base", "en-vlm"):
        assert (smoke_zoo / part / "model.safetensors").exists() and (smoke_zoo / part / "tokenizer.json").exists()
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        assert (smoke_zoo / "en-vlm" / name).exists()
    for k in ("ja-dev", "ja-test", "en-dev", "en-test"):
        assert (smoke_zoo / meta["data"][k]).exists()


def test_the_settings_zoo_json_records_rebuild_the_same_zoo(smoke_zoo, tmp_path):
    """zoo.json keeps each mix in its own key order, the order `text.mixture_sampler` draws in: the recorded settings
    rebuild the zoo byte for byte, and the same mixes with their keys sorted (as zoo.json stored them before session
    17) train another English base."""
    from vlm_merge.world.build import PARTS, build_zoo
    from vlm_merge.world.train import WorldSettings

    recorded = json.loads((smoke_zoo / "zoo.json").read_text())["settings"]
    assert list(recorded["en_mix"]) == list(WorldSettings().en_mix) != sorted(WorldSettings().en_mix)
    again = build_zoo(tmp_path / "again", 3, WorldSettings(**recorded), progress=False)
    for part in PARTS:
        assert (again / part / "model.safetensors").read_bytes() == (smoke_zoo / part / "model.safetensors").read_bytes(), part
    mixes = {k: dict(sorted(v.items())) for k, v in recorded.items() if k.endswith("_mix") and v}
    other = build_zoo(tmp_path / "sorted", 3, WorldSettings(**recorded | mixes), progress=False, dev_check=0)
    assert (other / "en-base" / "model.safetensors").read_bytes() != (smoke_zoo / "en-base" / "model.safetensors").read_bytes()


def test_smoke_zoo_loads_and_merges(smoke_zoo, tmp_path):
    from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

    from chat_vector import chat_vector
    from vlm_merge.world import datasets, evaluate

    LlamaForCausalLM.from_pretrained(smoke_zoo / "ja-base")
    out = chat_vector(smoke_zoo / "en-vlm", smoke_zoo / "en-base", smoke_zoo / "ja-base", tmp_path / "cv", progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    rows = datasets.read_rows(smoke_zoo / "data" / "ja-test.jsonl")[:4]
    scores = evaluate.evaluate_model(None, smoke_zoo / "data" / "ja-test.jsonl", limit=4, rouge=False,
                                     model_and_processor=(model, processor))
    assert len(scores.predictions) == len(rows) == 4


def test_same_seed_same_weights(smoke_zoo, tmp_path):
    """Determinism: the language model of a rebuilt smoke zoo is bit-identical."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    again = build_zoo(tmp_path / "again", 3, WorldSettings(**SMOKE), progress=False, dev_check=20)
    a, b = load_file(smoke_zoo / "ja-base" / "model.safetensors"), load_file(again / "ja-base" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_blocks_and_frozen_vocab_stay_put(tmp_path):
    """`ja_block_lr_scale=0` trains only the Japanese base's embeddings and lm_head; `vlm_train_vocab=False`
    leaves the English VLM's embeddings and lm_head as the English base's."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    zoo = build_zoo(tmp_path / "zoo", 4, WorldSettings(**SMOKE | {"ja_block_lr_scale": 0.0, "vlm_train_vocab": False}),
                    progress=False, dev_check=0)
    en, ja = (load_file(zoo / p / "model.safetensors") for p in ("en-base", "ja-base"))
    vlm = load_file(zoo / "en-vlm" / "model.safetensors")
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    assert all(torch.equal(en[k], ja[k]) for k in en if k not in vocab)
    assert not any(torch.equal(en[k], ja[k]) for k in vocab)
    rows = en["lm_head.weight"].shape[0]
    for key in vocab:  # llava-hf's saved layout: language_model.{model.embed_tokens, lm_head}
        assert torch.equal(vlm[f"language_model.{key}"][:rows], en[key])
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(vlm[f"language_model.{up}"], en[up])


def test_layer_split_fine_tunes_touch_disjoint_layers(tmp_path):
    """`ja_train_layers=[0]` and `vlm_train_layers=[1]` (+ `vlm_train_vocab=False`): the Japanese base differs
    from the English base only in embeddings, lm_head and layer 0; the English VLM's language model only in
    layer 1 and the final norm (which goes with the last layer), so the two deltas touch disjoint tensors. The build
    restores the caller's torch thread count."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    settings = SMOKE | {"ja_train_layers": [0], "vlm_train_layers": [1], "vlm_train_vocab": False}
    before = torch.get_num_threads()
    settings["threads"] = before + 1
    zoo = build_zoo(tmp_path / "zoo", 5, WorldSettings(**settings), progress=False, dev_check=0)
    assert torch.get_num_threads() == before  # the build's thread count is restored
    en, ja = (load_file(zoo / p / "model.safetensors") for p in ("en-base", "ja-base"))
    vlm = load_file(zoo / "en-vlm" / "model.safetensors")
    vocab = {"model.embed_tokens.weight", "lm_head.weight"}
    rows = en["lm_head.weight"].shape[0]  # the VLM appends <image> and <pad> rows
    ja_changed = {k for k in en if not torch.equal(en[k], ja[k])}
    vlm_changed = {k for k in en if not torch.equal(en[k], vlm[f"language_model.{k}"][:rows] if k in vocab
                                                    else vlm[f"language_model.{k}"])}
    assert vocab <= ja_changed and ja_changed - vocab and all(".layers.0." in k for k in ja_changed - vocab)
    assert "model.norm.weight" in vlm_changed and all(".layers.1." in k for k in vlm_changed - {"model.norm.weight"})
    assert not ja_changed & vlm_changed


def test_vlm_train_modules_restricts_the_vlm_delta_to_the_named_parameters(tmp_path):
    """`vlm_train_modules=["self_attn"]` with `vlm_train_layers=[0]`: the English VLM's language model differs from
    the English base only in layer 0's attention projections (not its MLP, norms or the vocabulary)."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    settings = SMOKE | {"vlm_train_layers": [0], "vlm_train_modules": ["self_attn"], "vlm_train_vocab": False}
    zoo = build_zoo(tmp_path / "zoo", 6, WorldSettings(**settings), progress=False, dev_check=0)
    en = load_file(zoo / "en-base" / "model.safetensors")
    vlm = load_file(zoo / "en-vlm" / "model.safetensors")
    rows = en["lm_head.weight"].shape[0]
    changed = {k for k in en if not torch.equal(en[k], vlm[f"language_model.{k}"][:rows])}
    assert changed and all(k.startswith("model.layers.0.self_attn.") for k in changed), sorted(changed)


def test_length_grouped_batches_serve_every_sequence_once_with_less_padding():
    """`group_by_length`: each pool of drawn sequences is served whole, every batch spans a narrow band of
    lengths, and the batches pad fewer tokens than consecutive ones; pool 1 keeps the drawn order."""
    import random

    from vlm_merge.world.train import length_grouped

    rng = random.Random(0)
    seqs = [[i] * rng.randint(5, 120) for i in range(8 * 16)]
    it = length_grouped(iter(seqs), 16, seed=1)
    grouped = [next(it) for _ in range(8)]
    assert sorted(s[0] for b in grouped for s in b) == list(range(len(seqs)))
    it = length_grouped(iter(seqs), 16, seed=1, pool=1)
    plain = [next(it) for _ in range(8)]
    assert [s for b in plain for s in b] == seqs
    assert _padded(grouped) < 0.7 * _padded(plain)
    assert all(max(map(len, b)) - min(map(len, b)) < 40 for b in grouped)


def _padded(batches: list[list[list[int]]]) -> int:
    return sum(max(map(len, b)) * len(b) for b in batches)


def test_an_ungrouped_build_trains_every_part_on_other_batches(smoke_zoo, tmp_path):
    """A smoke build without `group_by_length` (the default: the VLM's text-only replay in a batch of its own)
    writes every part; its English base differs from the grouped build of the same seed, so the batching takes
    effect."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    assert WorldSettings().group_by_length  # the smoke zoo's batches are grouped; this build's are not
    settings = WorldSettings(**SMOKE | {"group_by_length": False, "vlm_replay": 0.25})
    zoo = build_zoo(tmp_path / "zoo", 3, settings, progress=False, dev_check=0)
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(load_file(zoo / "en-base" / "model.safetensors")[key],
                           load_file(smoke_zoo / "en-base" / "model.safetensors")[key])
    vlm = load_file(zoo / "en-vlm" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in vlm.values())


def test_a_phrasebook_words_every_stream_of_the_build(tmp_path):
    """Short answers, digit counts, the aligned Japanese order and a question-type list reach the VQA files, the
    tokenizer and zoo.json (the text corpora and the VLM stage draw from the same `Phrasebook`)."""
    from tokenizers import Tokenizer

    from vlm_merge.world import datasets, scenes
    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    defaults = WorldSettings()
    for book in ({"qtypes": ["count_color", "where"], "answers": "sentence", "count_digits": True, "ja_order": "natural"},
                 {"qtypes": ["count_color", "color_of"], "answers": "short", "count_digits": False, "ja_order": "aligned"}):
        assert any(getattr(defaults, k) != v for k, v in book.items())
        zoo = build_zoo(tmp_path / book["answers"], 4, WorldSettings.with_overrides(book, SMOKE), progress=False,
                        dev_check=0)
        meta = json.loads((zoo / "zoo.json").read_text())
        assert {k: meta["settings"][k] for k in book} == book
        rows = datasets.read_rows(zoo / "data" / "ja-test.jsonl")
        assert {r["qtype"] for r in rows} == set(book["qtypes"])
        counts = [r for r in rows if r["qtype"] == "count_color"]
        if book["answers"] == "sentence":  # 赤いものは2個あります。 / 赤いものはありません。
            assert all(r["answer"].endswith(f"は{r['value']}個あります。" if r["value"] != "0" else "はありません。")
                       and not r["question"].startswith("いくつの") for r in counts)
        else:  # 二つ, asked いくつの赤いものがありますか？
            assert all(r["answer"] in scenes.JA_NUMBERS + ["ありません"] and r["question"].startswith(
                ("いくつの", "数えてください", "何個の")) for r in counts)
        tok = Tokenizer.from_file(str(zoo / "en-base" / "tokenizer.json"))  # trained on this wording: no <unk>
        assert not any("<unk>" in tok.encode(f"{r['question']} {r['answer']}").tokens for r in rows)


@pytest.mark.parametrize("in_a_row", [1, 2])
def test_the_vlm_stage_stops_after_the_target_in_enough_checks_in_a_row(tmp_path, in_a_row):
    """Early stopping on English dev: with a target every check reaches, the stage stops at the first check
    (`vlm_target_checks` 1) or the second (2, the default: one noisy 150-question check is not enough)."""
    from vlm_merge.world.build import build_zoo
    from vlm_merge.cli.world import SMOKE
    from vlm_merge.world.train import WorldSettings

    settings = WorldSettings(**SMOKE | {"vlm_steps": 40, "vlm_target": 0.0, "vlm_target_checks": in_a_row})
    zoo = build_zoo(tmp_path / "zoo", 2, settings, progress=False, dev_check=10)
    meta = json.loads((zoo / "zoo.json").read_text())
    assert [c["step"] for c in meta["vlm_checks"]] == [4, 8][:in_a_row]
    assert meta["vlm_steps"] == 4 * in_a_row


def test_vision_tower_is_the_same_on_one_and_two_threads():
    """A zoo does not depend on the thread count: the vision tower's training, whose
    sums do depend on it, always runs on one thread, and the caller's thread count is restored."""
    from dataclasses import replace

    from vlm_merge.engine.threads import torch_threads
    from vlm_merge.world import train

    s = replace(train.WorldSettings(), vision_steps=20)
    towers = []
    for n in (1, 2):
        with torch_threads(n):
            towers.append(train.train_vision(s, 3, False, []).state_dict())
            assert torch.get_num_threads() == n
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


def test_the_vlm_stage_loss_is_llavas_own_loss_on_right_padded_batches(smoke_zoo):
    """`train.answer_loss` on a right-padded batch of image chats of different lengths and a batch of text-only
    chats equals transformers' LLaVA forward with the attention mask and labels (the mean over every answer token of
    both batches): the VLM stage trains LLaVA's own objective."""
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration

    from vlm_merge.world import scenes, text, train

    vlm = LlavaForConditionalGeneration.from_pretrained(smoke_zoo / "en-vlm").eval()
    tok = Tokenizer.from_file(str(smoke_zoo / "en-vlm" / "tokenizer.json"))
    book = train.WorldSettings(**json.loads((smoke_zoo / "zoo.json").read_text())["settings"]).phrasebook()
    image_id, eos, pad = (tok.token_to_id(t) for t in (text.IMAGE_TOKEN, text.EOS, text.PAD_TOKEN))
    stream = train.vqa_stream(5, book, turns=3)
    items = [next(stream) for _ in range(3)]
    items[1] = (items[1][0], items[1][1][:1])  # one turn: a shorter chat, padded on the right
    chats = train.collate_chats([train.encode_chat(tok, qas, image_id, scenes.GRID**2, eos) for _, qas in items], pad)
    assert (chats["attention_mask"] == 0).any()
    docs = text.mixture_sampler({"qa-en": 1.0}, 1, book, 2)
    texts = train.collate_chats([train.encode_text_chat(tok, next(docs), eos) for _ in range(2)], pad)
    px = train.pixels([scenes.draw_scene(sc) for sc, _ in items])
    with torch.no_grad():
        feats = vlm.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[-1][:, 1:]
        image = vlm.model.multi_modal_projector(feats).reshape(-1, vlm.config.text_config.hidden_size)
        ours = train.answer_loss(vlm, [chats, texts], image, image_id)
        theirs = [vlm(**chats, pixel_values=px).loss, vlm(**texts).loss]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in (chats, texts)]
    expected = (theirs[0] * counts[0] + theirs[1] * counts[1]) / sum(counts)
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(theirs[0]) - float(theirs[1])) > 1e-3  # the two batches' losses differ: the weighting is tested
