"""`vlm-merge compare` shows every metric a run computed (content accuracy, a judge's) and plots only
computed metrics (#34)."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_merge.cli import main


def _run(root: Path, name: str, scores: dict, headline: list[str] | None) -> Path:
    run = root / name
    run.mkdir()
    meta = {"comparable_key": "k", "scores": {m: {"mean": v, "low": v - 0.05, "high": v + 0.05} for m, v in scores.items()},
            "model": {"name": name}, "headline": headline,
            "benchmark": {"name": "world-ja", "questions_evaluated": 2, "source": "s", "fingerprint": "f"},
            "protocol": {"name": "sakana", "questions": "all"}, "prompt": {"template": "chat"},
            "generation": {"max_new_tokens": 4, "num_beams": 1, "repetition_penalty": 1.0}}
    (run / "scores.json").write_text(json.dumps(meta))
    (run / "predictions.jsonl").write_text("".join(json.dumps({"answer": "赤い丸", "prediction": p}) + "\n"
                                                   for p in ("赤い丸です", "青")))
    return run


def test_compare_tables_content_accuracy_and_judge_metrics_and_plots_only_computed_ones(tmp_path, capsys):
    a = _run(tmp_path, "merged", {"rougeL": 40.0, "content_accuracy": 0.75, "judge_score": 7.5}, ["rougeL", "content_accuracy"])
    b = _run(tmp_path, "shell", {"content_accuracy": 0.25}, ["content_accuracy"])
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0, capsys.readouterr().err
    md = (out / "comparison.md").read_text()
    assert "| model | rougeL | content_accuracy | judge_score | answer chars (median) | run |" in md
    assert "| merged | 40.00 [39.95, 40.05] | 75.00 [70.00, 80.00] | 7.50 [7.45, 7.55] |" in md  # accuracy in %
    assert "| shell | – | 25.00 [20.00, 30.00] | – |" in md  # not computed: a dash, not a zero
    group = json.loads((out / "comparison.json").read_text())["groups"][0]
    assert group["headline"] == ["rougeL", "content_accuracy"] and (out / "scores.png").stat().st_size > 0

    # headline metrics nobody computed are not plotted; with none left, the first computed metric is
    c = _run(tmp_path, "judge-only", {"judge_score": 6.0}, None)
    assert main(["compare", str(c), "--out", str(tmp_path / "cmp2")]) == 0, capsys.readouterr().err
    group = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["groups"][0]
    assert group["headline"] == ["judge_score"]
    assert "| judge-only | 6.00 [5.95, 6.05] |" in (tmp_path / "cmp2" / "comparison.md").read_text()
