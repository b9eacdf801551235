"""Run tracking (#34): `--report-to tensorboard | wandb` for evolve and eval, read back offline
(TensorBoard's own event reader; W&B in offline mode)."""

from __future__ import annotations

import json
import math
import random
import time

import pytest
import yaml

from tests.conftest import error_line
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.tracking import EvolveTracking, Tracker, check_report_to, log_eval_scores


def _records() -> list[list[dict]]:
    """Two generations of three candidates as evolve logs them; the second candidate of generation 2 failed."""
    gens = []
    for g, fits in ((1, [0.2, 0.5, 0.1]), (2, [0.4, None, 0.9])):
        gens.append([{"generation": g, "index": i, "evaluation": 3 * (g - 1) + i + 1,
                      "fitness": -1e9 if f is None else f, "error": "nan weights" if f is None else None,
                      "scores": {} if f is None else {"loglik": f - 1}, "merge_s": 0.5 + i, "eval_s": 1.5 + i,
                      "genes": {"weight@layers0": 0.1 * (i + g), "weight@embeddings": 1.0 - 0.1 * i}}
                     for i, f in enumerate(fits)])
    return gens


def _scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_evolve_tracking_to_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = EvolveTracking(Tracker(["tensorboard"], tmp_path / "run", "evolve run"))
    assert not (tmp_path / "run").exists()  # nothing is created before the first value
    for batch in _records():
        tracking(batch)
    tracking.finish({"generations": 2})
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert _scalars(acc, "candidate/fitness") == [(1, 0.2), (2, 0.5), (3, 0.1), (4, 0.4), (6, 0.9)]  # no point for the failure
    assert _scalars(acc, "search/best_fitness") == [(1, 0.2), (2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5), (6, 0.9)]
    assert _scalars(acc, "candidate/failed") == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1.0), (6, 0)]
    assert _scalars(acc, "candidate/merge_s")[:3] == [(1, 0.5), (2, 1.5), (3, 2.5)]
    assert _scalars(acc, "candidate/eval_s")[-1] == (6, 3.5)
    assert _scalars(acc, "candidate/score/loglik")[0] == (1, -0.8)
    hist = acc.Histograms("genome/weight@layers0")
    assert [h.step for h in hist] == [3, 6] and [h.histogram_value.num for h in hist] == [3, 3]  # per generation
    assert hist[1].histogram_value.min == pytest.approx(0.2) and hist[1].histogram_value.max == pytest.approx(0.4)


def _wandb_records(path) -> list:
    """The records of a W&B transaction log (`run-ID.wandb`, LevelDB-log framing: 32 KiB blocks, 7-byte record
    headers, FULL / FIRST / MIDDLE / LAST chunks) as W&B's own protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a record still being written
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.slow  # W&B starts its service process (~10 s here)
def test_evolve_tracking_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "vlm-merge-test")
    tracking = EvolveTracking(Tracker(["wandb"], tmp_path, "evolve run", {"popsize": 3}))
    for batch in _records():
        tracking(batch)
    tracking.finish({"generations": 2})
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    deadline = time.monotonic() + 60  # W&B's service may still be writing the log when finish() returns
    while (records := _wandb_records(logs[0]))[-1:] == [] or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, [r.WhichOneof("record_type") for r in records]
        time.sleep(0.2)
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    fitness = [(h["_step"], h["candidate/fitness"]) for h in history if "candidate/fitness" in h]
    assert fitness == [(1, 0.2), (2, 0.5), (3, 0.1), (4, 0.4), (6, 0.9)]
    assert [h["search/best_fitness"] for h in history if "search/best_fitness" in h] == [0.2, 0.5, 0.5, 0.5, 0.5, 0.9]
    genes = [(h["_step"], h["genome/weight@layers0/_type"], sum(h["genome/weight@layers0/values"]))
             for h in history if "genome/weight@layers0/_type" in h]  # nested keys: a W&B Histogram's fields
    assert genes == [(3, "histogram", 3), (6, "histogram", 3)]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update}
    assert summary["best_fitness"] == 0.9 and summary["generations"] == 2
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {i.key: json.loads(i.value_json) for i in run.config.update}["popsize"] == 3


def test_eval_scores_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scores = {"rougeL": {"mean": 41.5, "low": 40.0, "high": 43.0, "mid": 41.4}, "content_accuracy": {"mean": 0.8, "low": 0.7, "high": 0.9}}
    log_eval_scores(Tracker(["tensorboard"], tmp_path, "eval"), scores, {"benchmark": "b"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert _scalars(acc, "eval/rougeL/mean") == [(0, 41.5)] and _scalars(acc, "eval/content_accuracy/high") == [(0, 0.9)]
    assert "eval/rougeL/mid" not in acc.Tags()["scalars"]


def test_report_to_names_are_checked():
    assert check_report_to(["tensorboard,wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    assert check_report_to(None) == [] and check_report_to(["none"]) == []
    with pytest.raises(VlmMergeError, match=r"^--report-to 'mlflow': not a tracking backend; use tensorboard or wandb$"):
        check_report_to(["mlflow"])


def test_missing_backend_names_its_extra(monkeypatch):
    from vlm_merge import extras

    monkeypatch.setattr(extras, "_installed", lambda name: name != "wandb")
    with pytest.raises(VlmMergeError, match=r"--report-to wandb needs the wandb extra: pip install 'vlm-merge\[wandb\]'"):
        check_report_to(["wandb"])


def test_eval_report_to_is_checked_before_the_model_loads(tmp_path, capsys):
    from vlm_merge.cli import main

    assert main(["eval", "--model", str(tmp_path / "nothing"), "--bench", "custom", "--out", str(tmp_path / "o"),
                 "--report-to", "mlflow"]) == 2
    assert "--report-to 'mlflow': not a tracking backend" in error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def dev(tmp_path):
    """A custom JSONL VQA set of 8 drawn scenes with Japanese questions and answers."""
    from eval.fixture_datasets import draw_scene

    (tmp_path / "img").mkdir()
    rng, rows = random.Random(0), []
    for i in range(8):
        img, objs = draw_scene(rng)
        img.save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "何色の図形がありますか？", "answer": f"{objs[0][0]}の{objs[0][1]}です。"})
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return tmp_path / "dev.jsonl"


def test_evolve_cli_reports_to_tensorboard_and_pushes_the_best_model(zoo, dev, tmp_path, monkeypatch, capsys):
    """`vlm-merge evolve --report-to tensorboard --push-to-hub`: every logged candidate reaches the event file,
    and the best model is published with a card that shows no local path."""
    import huggingface_hub
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_hub import RecordingApi
    from vlm_merge.cli import main

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg = {"sources": {"vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]),
                       "target": str(zoo.llms["ja-llama"]), "models": ["vlm"]},
           "method": "task_arithmetic", "genome": {"params": {"weight": [0.0, 1.5]}, "separate": []},
           "fitness": {"benchmark": str(dev), "kind": "loglik", "metrics": {"loglik": 1.0}, "limit": 4},
           "cmaes": {"popsize": 3, "max_evaluations": 6, "seed": 3}, "threads": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["evolve", str(tmp_path / "cfg.yaml"), "--out", str(out), "--quiet", "--report-to", "tensorboard",
                 "--push-to-hub", "me/evolved"]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("search/best_fitness")] == [r["evaluation"] for r in log]
    assert [e.value for e in acc.Scalars("candidate/fitness")] == pytest.approx([r["fitness"] for r in log])
    best = max(r["fitness"] for r in log)
    assert math.isclose(acc.Scalars("search/best_fitness")[-1].value, best, rel_tol=1e-6)
    assert [h.step for h in acc.Histograms(f"genome/{next(iter(log[0]['genes']))}")] == [3, 6]
    assert [c for c, _ in api.calls] == ["create_repo", "upload_folder"] and api.calls[0][1]["repo_id"] == "me/evolved"
    card = api.uploaded["README.md"].decode()
    assert str(tmp_path) not in card and str(zoo.root) not in card
    assert "merge_recipe.yaml" in api.uploaded and "config.json" in api.uploaded


@pytest.mark.slow  # ~10 s on a loaded 2-core machine: one small eval run
def test_eval_cli_reports_its_scores_to_tensorboard(zoo, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.fixture_datasets import write_ja_vg_vqa
    from vlm_merge.cli import main

    data = write_ja_vg_vqa(tmp_path / "vg", n_images=2)
    out = tmp_path / "run"
    assert main(["eval", "--model", str(zoo.vlms["llava-hf-llama"]), "--bench", "ja-vg-vqa-500", "--data", str(data),
                 "--max-new-tokens", "4", "--limit", "2", "--out", str(out), "--quiet", "--device", "cpu",
                 "--report-to", "tensorboard"]) == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())["scores"]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {t.split("/")[1] for t in acc.Tags()["scalars"]} == set(scores)
    for metric, agg in scores.items():
        assert acc.Scalars(f"eval/{metric}/mean")[0].value == pytest.approx(agg["mean"])
        assert acc.Scalars(f"eval/{metric}/low")[0].value == pytest.approx(agg["low"])
