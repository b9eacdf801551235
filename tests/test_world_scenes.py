"""The miniature world's data: scenes, questions in both languages, content scoring, VQA files, tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlm_merge.world import datasets, evaluate, scenes, text


def test_scene_drawing_is_deterministic_and_sized():
    a = scenes.sample_scene(random.Random(3))
    b = scenes.sample_scene(random.Random(3))
    assert a == b
    im = scenes.draw_scene(a)
    assert im.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert im.tobytes() == scenes.draw_scene(b).tobytes()
    # every object paints its own cell
    for o in a.objects:
        row, col = divmod(o.cell, scenes.GRID)
        cell = np.asarray(im)[row * scenes.CELL:(row + 1) * scenes.CELL, col * scenes.CELL:(col + 1) * scenes.CELL]
        assert (np.abs(cell.astype(int) - scenes.BACKGROUND).sum(-1) > 60).sum() > 20


BOOKS = {
    "original": scenes.Phrasebook(),
    "short-digits-aligned": scenes.Phrasebook(answers="short", count_digits=True, ja_order="aligned"),
    "sentence-digits": scenes.Phrasebook(count_digits=True),
    "short": scenes.Phrasebook(answers="short"),
}


@pytest.mark.parametrize("book", BOOKS.values(), ids=BOOKS)
@pytest.mark.parametrize("qtype", scenes.QTYPES)
def test_every_answer_is_content_correct_in_both_languages(qtype, book):
    rng = random.Random(qtype)
    n = 0
    while n < 30:
        sc = scenes.sample_scene(rng)
        cands = scenes._question_candidates(sc, qtype)
        if not cands:
            continue
        args = rng.choice(cands)
        for p in range(3):
            for lang in scenes.LANGS:
                qa = book.make_qa(sc, qtype, lang, args, p)
                assert scenes.content_correct(qa.answer, qa.attribute, qa.value, lang), qa
                other = "ja" if lang == "en" else "en"
                if qa.attribute in ("count", "color"):  # the other language's words do not count
                    assert not scenes.content_correct(qa.answer, qa.attribute, qa.value, other), qa
        n += 1


def test_content_scoring_rejects_wrong_missing_and_hedged_answers():
    assert scenes.content_correct("赤いものは二つあります。", "count", "2", "ja")
    assert not scenes.content_correct("赤いものは三つあります。", "count", "2", "ja")
    assert not scenes.content_correct("there are two red things.", "count", "2", "ja")  # English to a JA question
    assert scenes.content_correct("赤いものはありません。", "count", "0", "ja")
    assert not scenes.content_correct("the circle is red or blue.", "color", "red", "en")
    assert scenes.content_correct("左上には赤い丸があります。", "object", "red circle", "ja")
    assert not scenes.content_correct("左上には赤い四角があります。", "object", "red circle", "ja")
    assert scenes.content_correct("the blue star is at the top left.", "position", "0", "en")
    assert not scenes.content_correct("the blue star is at the top.", "position", "0", "en")
    assert scenes.content_correct("青い星は上にあります。", "position", "1", "ja")
    assert not scenes.content_correct("", "shape", "star", "ja")


def test_phrasings_differ_per_language():
    for qtype, langs in scenes.PHRASINGS.items():
        for lang, forms in langs.items():
            assert len(set(forms)) >= 3, (qtype, lang)
        aligned = scenes.PHRASINGS_JA_ALIGNED[qtype]  # phrasing i translates English phrasing i
        assert len(aligned) == len(langs["en"]) and not set(aligned) & set(langs["ja"]), qtype


def test_phrasebooks_word_the_same_question_differently():
    sc = scenes.Scene([scenes.Obj("red", "circle", 0), scenes.Obj("red", "star", 4), scenes.Obj("blue", "star", 8)])
    ask = {"color": "red"}
    answers = {name: (b.make_qa(sc, "count_color", "en", ask, 0), b.make_qa(sc, "count_color", "ja", ask, 0))
               for name, b in BOOKS.items()}
    assert [a.answer for a in answers["original"]] == ["there are two red things.", "赤いものは二つあります。"]
    assert [a.answer for a in answers["short"]] == ["two", "二つ"]
    assert [a.answer for a in answers["sentence-digits"]] == ["there are 2 red things.", "赤いものは2個あります。"]
    en, ja = answers["short-digits-aligned"]
    assert (en.answer, ja.answer, ja.question) == ("2", "2個", "いくつの赤いものがありますか？")
    assert answers["original"][1].question == "赤いものはいくつありますか？"
    assert BOOKS["original"].describe(sc, "ja") == "左上に赤い丸、真ん中に赤い星、右下に青い星があります。"
    assert BOOKS["short-digits-aligned"].describe(sc, "ja") == "赤い丸が左上に、赤い星が真ん中に、青い星が右下にあります。"
    zero = BOOKS["short-digits-aligned"].make_qa(sc, "count_color", "ja", {"color": "green"}, 0)
    assert zero.answer == "0個" and scenes.content_correct(zero.answer, "count", "0", "ja")
    # only the asked types are sampled, in QTYPES order whatever order they are given in
    book = scenes.Phrasebook(qtypes=("more", "color_of"))
    assert book.qtypes == ("color_of", "more")
    rng = random.Random(0)
    assert {book.sample_qa(sc, rng, "en").qtype for _ in range(50)} == {"color_of", "more"}


@pytest.mark.parametrize("bad", [{"qtypes": ("count", "more")}, {"qtypes": ()}, {"answers": "long"},
                                 {"ja_order": "sov"}])
def test_phrasebook_rejects_unknown_values(bad):
    from vlm_merge.errors import VlmMergeError

    with pytest.raises(VlmMergeError, match=next(iter(bad))):
        scenes.Phrasebook(**bad)


def test_vqa_files_schema_parallel_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SPLITS", {"dev": (30, 1), "test": (60, 2)})
    files = datasets.write_datasets(tmp_path, seed=5, book=scenes.Phrasebook())
    rows = {k: datasets.read_rows(v) for k, v in files.items()}
    assert len(rows["ja-test"]) == 60 and len(rows["ja-dev"]) == 30
    for r_en, r_ja in zip(rows["en-test"], rows["ja-test"]):
        assert r_en["image"] == r_ja["image"] and r_en["value"] == r_ja["value"] and r_en["qtype"] == r_ja["qtype"]
        assert r_ja["lang"] == "ja" and {"image", "question", "answer", "question_id", "attribute", "value"} <= set(r_ja)
    dev_images = {(tmp_path / r["image"]).read_bytes() for r in rows["ja-dev"]}
    assert not dev_images & {(tmp_path / r["image"]).read_bytes() for r in rows["ja-test"]}
    # eval reads it as a custom benchmark
    from eval.benchmarks import load_benchmark

    bench = load_benchmark(files["ja-test"])
    qs = bench.select("all")
    assert len(qs) == 60 and qs[0].question == rows["ja-test"][0]["question"]
    assert bench.image(qs[0].image_key).size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_tokenizer_cuts_japanese_into_words_and_round_trips():
    tok = text.build_tokenizer(0, scenes.Phrasebook())
    s = text.prompt("左上に赤い丸があります。", "赤いものはいくつありますか？") + " 赤いものは一つあります。"
    enc = tok.encode(s)
    assert "<unk>" not in enc.tokens and {"赤い", "もの", "いくつ", "一つ"} <= set(enc.tokens)
    assert tok.decode(enc.ids) == s
    vlm = text.vlm_tokenizer(tok)
    assert vlm.get_vocab_size() == tok.get_vocab_size() + 2
    assert vlm.encode(text.prompt(text.IMAGE_TOKEN, "how many circles are there?")).tokens.count(text.IMAGE_TOKEN) == 1


def test_paired_bootstrap():
    a = np.array([1.0] * 80 + [0.0] * 20)
    b = np.array([0.0] * 50 + [1.0] * 30 + [0.0] * 20)
    d = evaluate.paired_bootstrap(a, b)
    assert d["diff"] == pytest.approx(0.5) and d["low"] > 0.3 and d["excludes_zero"]
    assert not evaluate.paired_bootstrap(a, a)["excludes_zero"]
