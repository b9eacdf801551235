"""Benchmarks load real schemas from every local source (repo clone, hub cache, datasets cache,
save_to_disk, custom JSONL/CSV/parquet), protocols select the documented questions, errors are one line."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS, load_benchmark
from eval.fixture_datasets import (
    write_hub_dataset_cache,
    write_in_the_wild,
    write_ja_vg_vqa,
)
from eval.protocols import PROTOCOLS
from vlm_merge.errors import VlmMergeError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    vg = write_ja_vg_vqa(root / "JA-VG-VQA-500", n_images=6)
    wild = write_in_the_wild(root / "JA-VLM-Bench-In-the-Wild", n_images=4)
    return {"root": root, "vg": vg, "wild": wild}


def test_vg_vqa_protocols_select_documented_questions(data):
    import pyarrow.parquet as pq

    table = pq.read_table(data["vg"] / "data" / "test-00000-of-00001.parquet").to_pylist()
    bench = load_benchmark("ja-vg-vqa-500", data["vg"])
    sakana = bench.select(PROTOCOLS["sakana"].questions)
    llm_jp = bench.select(PROTOCOLS["llm-jp"].questions)
    # sakana: exactly the first QA of every image, in row order; llm-jp: every QA
    assert [q.question_id for q in sakana] == [str(row["qas"][0]["qa_id"]) for row in table]
    assert [q.question_id for q in llm_jp] == [str(qa["qa_id"]) for row in table for qa in row["qas"]]
    assert len(llm_jp) > len(sakana) == 6
    assert [(q.question, q.answer) for q in sakana] == [(row["qas"][0]["question"], row["qas"][0]["answer"]) for row in table]
    assert bench.select("all", limit=4) == llm_jp[:4]
    # the image of a question is its row's image
    q = llm_jp[-1]
    row = len(table) - 1
    expected = Image.open(__import__("io").BytesIO(table[row]["image"]["bytes"])).convert("RGB")
    assert q.image_key == str(row) and bench.image(q.image_key).tobytes() == expected.tobytes()
    assert bench.describe()["images_in_split"] == 6 and bench.split == "test" and bench.schema == "vg-vqa"


def test_in_the_wild_one_question_per_row_and_shared_images(data):
    bench = load_benchmark("ja-vlm-bench-in-the-wild", data["wild"])
    assert [q.question_id for q in bench.questions] == [str(i) for i in range(len(bench.questions))]  # llm-jp ids
    assert bench.select("first-per-image") == bench.select("all") == bench.questions
    assert len(bench.questions) == 6 and bench.describe()["images_in_split"] == 4  # rows share image_url
    assert bench.questions[1].image_key == bench.questions[2].image_key


def test_hub_cache_and_datasets_cache_and_save_to_disk_read_the_same_data(data, tmp_path):
    import datasets

    direct = load_benchmark("ja-vg-vqa-500", data["vg"])
    commit = write_hub_dataset_cache(tmp_path / "hub", "SakanaAI/JA-VG-VQA-500", data["vg"])
    cached = load_benchmark("ja-vg-vqa-500", cache_dir=tmp_path / "hub")
    assert cached.revision == commit and cached.source == "hf-cache:SakanaAI/JA-VG-VQA-500"
    assert cached.questions == direct.questions and cached.fingerprint == direct.fingerprint

    # arrow files as an earlier `load_dataset("SakanaAI/JA-VG-VQA-500")` leaves them in the datasets cache
    ds = datasets.load_dataset(str(data["vg"]), split="test", cache_dir=str(tmp_path / "prep"))
    version = tmp_path / "ds-cache" / "SakanaAI___ja-vg-vqa-500" / "default" / "0.0.0" / "abc123"
    version.mkdir(parents=True)
    shutil.copy(ds.cache_files[0]["filename"], version / "ja-vg-vqa-500-test.arrow")
    from_arrow = load_benchmark("ja-vg-vqa-500", cache_dir=tmp_path / "empty-hub", datasets_cache=tmp_path / "ds-cache")
    assert from_arrow.questions == direct.questions and from_arrow.source.startswith("datasets-cache:")
    assert from_arrow.image("3").tobytes() == direct.image("3").tobytes()

    ds.save_to_disk(str(tmp_path / "saved"))
    saved = load_benchmark("ja-vg-vqa-500", tmp_path / "saved")
    assert saved.questions == direct.questions

    with pytest.raises(VlmMergeError, match="not in the Hugging Face hub cache nor the datasets cache"):
        load_benchmark("ja-vg-vqa-500", cache_dir=tmp_path / "empty-hub", datasets_cache=tmp_path / "nothing")


def test_split_files_chosen_by_name(data):
    bench = load_benchmark("ja-vg-vqa-500", data["vg"], split="train")
    assert len(bench.select("first-per-image")) == 2
    single = load_benchmark("ja-vg-vqa-500", data["vg"] / "data" / "test-00000-of-00001.parquet")
    assert single.questions == load_benchmark("ja-vg-vqa-500", data["vg"]).questions
    with pytest.raises(VlmMergeError, match="no .* files for split 'validation'"):
        load_benchmark("ja-vg-vqa-500", data["vg"], split="validation")


def _write_images(d, n=3):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 16), (40 * i, 100, 200)).save(d / f"img{i}.png")


def test_custom_jsonl_csv_parquet_and_vg_schema(tmp_path):
    _write_images(tmp_path / "images")
    rows = [{"image": f"images/img{i}.png", "question": f"質問{i}", "answer": f"答え{i}"} for i in range(3)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "set.csv").write_text("image_path,question,answer,question_id\n"
                                      + "".join(f"{r['image']},{r['question']},{r['answer']},q{i}\n" for i, r in enumerate(rows)),
                                      encoding="utf-8")
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "set.parquet")
    a, b, c = (load_benchmark(tmp_path / f"set.{ext}") for ext in ("jsonl", "csv", "parquet"))
    assert [q.question for q in a.questions] == [q.question for q in b.questions] == [q.question for q in c.questions]
    assert [q.question_id for q in a.questions] == ["0", "1", "2"] and [q.question_id for q in b.questions] == ["q0", "q1", "q2"]
    assert a.image("1").size == (21, 16) and b.image("2").size == (22, 16) and c.image("0").size == (20, 16)
    # the fingerprint covers the images, not only the table
    before = a.fingerprint
    Image.new("RGB", (21, 16), (0, 0, 0)).save(tmp_path / "images" / "img1.png")
    assert load_benchmark(tmp_path / "set.jsonl").fingerprint != before

    vg_rows = [{"image": "images/img0.png", "qas": [{"qa_id": 7, "question": "色は？", "answer": "青"},
                                                      {"qa_id": 8, "question": "形は？", "answer": "四角"}]}]
    (tmp_path / "vg.jsonl").write_text(json.dumps(vg_rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    vg = load_benchmark(tmp_path / "vg.jsonl")
    assert vg.schema == "vg-vqa" and [q.question_id for q in vg.select("first-per-image")] == ["7"]
    assert [q.qa_index for q in vg.select("all")] == [0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "x.png", "question": "q"}\n', "no column 'answer'"),
        ('{"image": "x.png", "question": "q", "answer": "a"}\n{oops\n', r"bad\.jsonl:2: invalid JSON \("),
        ('[1, 2]\n', "expected a JSON object per line"),
        ('{"image": "a.png", "question": "q", "answer": "a", "question_id": 1}\n'
         '{"image": "a.png", "question": "q", "answer": "a", "question_id": 1}\n', "question id '1' appears more than once"),
    ],
)
def test_bad_custom_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(VlmMergeError, match=message) as err:
        load_benchmark(tmp_path / "bad.jsonl")
    assert "\n" not in str(err.value)


def test_unknown_benchmark_and_missing_image(tmp_path):
    with pytest.raises(VlmMergeError, match="not a registered benchmark"):
        load_benchmark("no-such-bench")
    (tmp_path / "s.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n', encoding="utf-8")
    bench = load_benchmark(tmp_path / "s.jsonl")
    with pytest.raises(VlmMergeError, match="missing.png: no such file"):
        bench.image("0")
    assert set(BENCHMARKS) == {"ja-vg-vqa-500", "ja-vlm-bench-in-the-wild", "japanese-heron-bench"}
