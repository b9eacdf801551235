"""`vlm-merge eval | score | compare`: outputs, resume from the command line, re-scoring, comparison
tables and plots, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from eval.fixture_datasets import write_in_the_wild, write_ja_vg_vqa
from eval.metrics import score_predictions
from eval.outputs import dumps, jsonl, read_jsonl
from tests.conftest import error_line
from vlm_merge.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    return {"vg": write_ja_vg_vqa(root / "vg", n_images=5), "wild": write_in_the_wild(root / "wild")}


def _eval(zoo, data, out, *extra, model="llava-hf-llama", bench="ja-vg-vqa-500", source="vg"):
    return main(["eval", "--model", str(zoo.vlms[model]), "--bench", bench, "--data", str(data[source]),
                 "--max-new-tokens", "6", "--out", str(out), "--quiet", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def runs(zoo, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert _eval(zoo, data, root / "llama-sakana", "--protocol", "sakana", "--num-beams", "2") == 0
    assert _eval(zoo, data, root / "mistral-sakana", "--protocol", "sakana", "--num-beams", "2",
                 model="llava-next-hf-mistral") == 0
    assert _eval(zoo, data, root / "llama-sakana-greedy", "--protocol", "sakana", "--num-beams", "1") == 0
    assert _eval(zoo, data, root / "llama-llmjp", "--protocol", "llm-jp") == 0
    assert _eval(zoo, data, root / "llama-wild", "--protocol", "llm-jp", bench="ja-vlm-bench-in-the-wild",
                 source="wild") == 0
    return root


def test_eval_cli_writes_run_and_resumes(runs, zoo, data, capsys):
    capsys.readouterr()
    run = runs / "llama-llmjp"
    assert {p.name for p in run.iterdir()} == {"predictions.jsonl", "scores.json", "run.json"}
    scores = json.loads((run / "scores.json").read_text())
    assert scores["benchmark"]["questions_evaluated"] == len(read_jsonl(run / "predictions.jsonl"))
    assert scores["protocol"]["name"] == "llm-jp"
    # rerunning the same command resumes: nothing left to generate, same numbers
    assert _eval(zoo, data, run, "--protocol", "llm-jp") == 0
    printed = capsys.readouterr().out
    n = scores["benchmark"]["questions_evaluated"]
    assert f"{n} questions ({n} resumed)" in printed and "rougeL_ja" in printed
    assert json.loads((run / "scores.json").read_text())["scores"] == scores["scores"]


def test_score_cli_rescores_a_predictions_file(runs, tmp_path, capsys):
    preds = read_jsonl(runs / "llama-sakana" / "predictions.jsonl")
    perfect = [{"answer": p["answer"], "prediction": p["answer"]} for p in preds]
    perfect[0]["prediction"] = "The answer is something else entirely."
    (tmp_path / "p.jsonl").write_text(jsonl(perfect), encoding="utf-8")
    capsys.readouterr()
    assert main(["score", str(tmp_path / "p.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    n = len(perfect)
    assert out["n"] == n and out["scores"]["rougeL"]["mean"] == pytest.approx(100 * (n - 1) / n, abs=1e-6)
    assert out["scores"]["non_japanese"]["mean"] == pytest.approx(1 / n)
    assert out["scores"]["exact_match"]["mean"] == pytest.approx((n - 1) / n)
    assert out["bootstrap"] == {"resamples": 1000, "seed": 0} and "fugashi" in out["libraries"]
    # the eval run's own per-sample scores are what re-scoring gives
    assert main(["score", str(runs / "llama-sakana" / "predictions.jsonl"), "--metrics", "rouge-ja"]) == 0
    again = json.loads(capsys.readouterr().out)
    recorded = json.loads((runs / "llama-sakana" / "scores.json").read_text())["scores"]
    assert set(again["scores"]) == {"rouge1", "rouge2", "rougeL"}
    assert again["scores"]["rougeL"] == recorded["rougeL"]


def test_compare_cli_tables_and_plots(runs, tmp_path, capsys):
    # an "oracle" run: the llama run's predictions replaced by the references and re-scored for real
    oracle = tmp_path / "runs" / "oracle"
    shutil.copytree(runs / "llama-sakana", oracle)
    preds = read_jsonl(oracle / "predictions.jsonl")
    report = score_predictions([p["answer"] for p in preds], [p["answer"] for p in preds])
    (oracle / "predictions.jsonl").write_text(
        jsonl([{**p, "prediction": p["answer"], **s} for p, s in zip(preds, report.per_sample)]), encoding="utf-8")
    meta = json.loads((oracle / "scores.json").read_text())
    meta["scores"] = {k: a.as_dict() for k, a in report.aggregate.items()}
    meta["model"]["name"] = "oracle"
    (oracle / "scores.json").write_text(dumps(meta), encoding="utf-8")

    out = tmp_path / "cmp"
    chosen = [runs / n for n in ("llama-sakana", "mistral-sakana", "llama-llmjp", "llama-wild")]
    assert main(["compare", *map(str, chosen), str(oracle), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    sections = md.split("\n## ")[1:]
    titles = [s.splitlines()[0] for s in sections]
    assert titles == ["ja-vg-vqa-500 · sakana", "ja-vg-vqa-500 · llm-jp", "ja-vlm-bench-in-the-wild · llm-jp"]
    sakana = sections[0]
    rows = [line for line in sakana.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" | ")[0] for r in rows] == ["| oracle", "| llava-hf-llama", "| llava-next-hf-mistral"]
    assert rows[0].split(" | ")[1] == "100.00 [100.00, 100.00]"  # sorted by the headline score
    summary = json.loads((out / "comparison.json").read_text())
    assert len(summary["groups"]) == 3 and summary["groups"][0]["headline"] == ["rougeL", "rougeL_ja"]
    for png in ("scores.png", "answer_lengths.png"):
        with Image.open(out / png) as im:
            assert im.width > 500 and len(im.convert("RGB").getcolors(1 << 20)) > 10

    # the same benchmark and protocol under other decoding settings is another table, with the difference named
    assert main(["compare", str(runs), "--out", str(tmp_path / "cmp2")]) == 0  # a directory of run directories
    md2 = (tmp_path / "cmp2" / "comparison.md").read_text()
    variants = [s for s in md2.split("\n## ")[1:] if s.startswith("ja-vg-vqa-500 · sakana · variant")]
    assert len(variants) == 2
    assert {("beams 2" in v, "beams 1" in v) for v in variants} == {(True, False), (False, True)}
    capsys.readouterr()
    assert main(["compare", str(runs), "--out", str(out)]) == 2
    assert "already exists" in error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "{vlm}", "--bench", "no-such-bench", "--out", "{tmp}/o"], "not a registered benchmark"),
        (["eval", "--model", "{vlm}", "--bench", "ja-vg-vqa-500", "--data", "{tmp}/nowhere", "--out", "{tmp}/o"],
         "no such file or directory"),
        (["eval", "--model", "{vlm}", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--protocol", "helm",
          "--out", "{tmp}/o"], "unknown protocol 'helm'"),
        (["eval", "--model", "{vlm}", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--template", "alpaca",
          "--out", "{tmp}/o"], "unknown prompt template 'alpaca'"),
        (["eval", "--model", "{original}", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--out", "{tmp}/o"],
         "cannot be loaded as a transformers image-text-to-text model"),
        (["eval", "--model", "{tmp}/no-model", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--out", "{tmp}/o"],
         "no such model directory"),
        (["eval", "--model", "{vlm}", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--device", "cuda:0",
          "--out", "{tmp}/o"], "CUDA is not available"),
        (["eval", "--model", "{vlm}", "--bench", "ja-vg-vqa-500", "--data", "{vg}", "--dtype", "int3",
          "--out", "{tmp}/o"], "unknown dtype 'int3'"),
        (["score", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
        (["score", "{tmp}/bad.jsonl"], "bad.jsonl:2: invalid JSON ("),
        (["score", "{tmp}/nofield.jsonl"], "nofield.jsonl:1: no 'prediction' field"),
        (["score", "{tmp}/ok.jsonl", "--metrics", "bleu"], "unknown metric 'bleu'"),
        (["compare", "{tmp}", "--out", "{tmp}/cmp"], "no scores.json here or in its subdirectories"),
        (["caption", "--model", "{vlm}", "{tmp}/no-images", "--out", "{tmp}/c"], "no such file or directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(zoo, data, tmp_path, capsys, argv, message):
    if (torch.cuda.is_available() and "cuda:0" in argv):
        pytest.skip("this machine has CUDA")
    (tmp_path / "bad.jsonl").write_text('{"answer": "a", "prediction": "b"}\n{"answer": \n{"x": 1}\n', encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"answer": "a"}\n', encoding="utf-8")
    (tmp_path / "ok.jsonl").write_text('{"answer": "a", "prediction": "a"}\n', encoding="utf-8")
    values = {"vlm": zoo.vlms["llava-hf-llama"], "original": zoo.vlms["llava-original-llama"], "vg": data["vg"],
              "tmp": tmp_path}
    assert main([a.format(**values) for a in argv]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o" / "scores.json").exists()


def test_interrupted_eval_says_what_is_kept_and_resumes(zoo, data, tmp_path, capsys, monkeypatch):
    from transformers import GenerationMixin

    real, calls = GenerationMixin.generate, []

    def interrupt_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", interrupt_second_batch)
    out = tmp_path / "run"
    assert _eval(zoo, data, out, "--protocol", "llm-jp", "--batch-size", "2") == 130
    err = capsys.readouterr().err
    assert f"interrupted; 2 finished items are kept in {out / 'predictions.jsonl'}; run the same command to resume" in err
    monkeypatch.setattr(GenerationMixin, "generate", real)
    assert _eval(zoo, data, out, "--protocol", "llm-jp", "--batch-size", "2") == 0
    assert "(2 resumed)" in capsys.readouterr().out
