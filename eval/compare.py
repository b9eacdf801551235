"""`vlm-merge compare`: evaluation runs side by side, as markdown tables, PNG plots and JSON.

Runs are grouped by `comparable_key` (benchmark data and question selection, protocol, prompt text,
decoding settings, metrics): numbers are only put in one table when they are comparable; runs of
the same benchmark under other settings land in their own group, with the difference spelled out.

Files written (atomically, as one directory):
- `comparison.md`: per group, every model's scores (mean and 95% bootstrap interval: ROUGE, strict-Japanese,
  match rates, content accuracy, and any other metric a run has, such as a judge's) and answer lengths;
- `scores.png`: headline scores per model and group, with bootstrap intervals (only metrics that were computed:
  a run without one gets no bar);
- `answer_lengths.png`: violins of prediction lengths (characters) per model next to the references'
  (degenerate empty/short answers and runaway answers stand out);
- `comparison.json`: the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.outputs import dumps, read_jsonl
from eval.runner import PREDICTIONS_FILE, SCORES_FILE
from vlm_merge.io.outputs import AtomicDir
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import Want, check_fields, load_json

TABLE_COLUMNS = ("rougeL", "rougeL_ja", "rouge1", "rouge2", "exact_match", "substring_match", "non_japanese",
                 "content_accuracy")  # first, in this order; any other metric a run has (a judge's) follows
RATE_COLUMNS = {"exact_match", "substring_match", "non_japanese", "content_accuracy"}  # per-sample 0/1: shown in %
_AGGREGATE = Want((dict,), fields={k: Want((int, float), required=True) for k in ("mean", "low", "high")})
SCORES_FIELDS = {  # what compare reads of a scores.json written by `vlm-merge eval`
    "comparable_key": Want((str,), required=True),
    "scores": Want((dict,), required=True),  # metric -> _AGGREGATE, checked per metric
    "model": Want((dict,), required=True, fields={"name": Want((str,), required=True)}),
    "benchmark": Want((dict,), required=True, fields={
        "name": Want((str,), required=True), "questions_evaluated": Want((int,), required=True, minimum=0),
        "source": Want((str,), required=True), "fingerprint": Want((str,), required=True)}),
    "protocol": Want((dict,), required=True, fields={
        "name": Want((str,), required=True), "questions": Want((str,), required=True), "overrides": Want((dict,))}),
    "prompt": Want((dict,), required=True, fields={"template": Want((str,), required=True)}),
    "generation": Want((dict,), required=True, fields={
        k: Want((int, float), required=True) for k in ("max_new_tokens", "num_beams", "repetition_penalty")}),
    "headline": Want((list, type(None))),
}


@dataclass
class Run:
    dir: Path
    metadata: dict
    predictions: list[dict]
    label: str = ""

    @property
    def group(self) -> str:
        return self.metadata["comparable_key"]


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Each path is a run directory (with scores.json) or a directory whose subdirectories are runs."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        if (p / SCORES_FILE).is_file():
            dirs.append(p)
        elif p.is_dir() and (subs := sorted(d for d in p.iterdir() if (d / SCORES_FILE).is_file())):
            dirs += subs
        else:
            raise VlmMergeError(f"{p}: no {SCORES_FILE} here or in its subdirectories; pass `vlm-merge eval --out` directories")
    runs = []
    for d in dict.fromkeys(dirs):
        meta = read_scores(d / SCORES_FILE)
        preds = read_jsonl(d / PREDICTIONS_FILE, ("answer", "prediction"))
        runs.append(Run(d, meta, preds))
    _label(runs)
    return runs


def read_scores(path: Path) -> dict:
    """A run's scores.json, checked for every field compare reads (`SCORES_FIELDS`)."""
    meta = load_json(path, "scores file")
    try:
        check_fields(meta, SCORES_FIELDS, str(path))
        for metric, agg in meta["scores"].items():
            check_fields({metric: agg}, {metric: _AGGREGATE}, str(path), "scores.")
        if not all(isinstance(h, str) for h in meta.get("headline") or []):
            raise VlmMergeError(f"{path}: 'headline' must be a list of metric names")
    except VlmMergeError as e:
        raise VlmMergeError(f"{e}; not a `vlm-merge eval` scores file (rerun that eval)") from None
    return meta


def _label(runs: list[Run]) -> None:
    """Model names, made unique within a group by the run directory's name."""
    for run in runs:
        run.label = run.metadata["model"]["name"]
    for run in runs:
        clash = [r for r in runs if r.group == run.group and r.label == run.metadata["model"]["name"]]
        if len(clash) > 1:
            for r in clash:
                r.label = f"{r.metadata['model']['name']} ({r.dir.name})"


def _group_title(meta: dict, variants: dict[str, int]) -> str:
    b, p = meta["benchmark"], meta["protocol"]
    base = f"{b['name']} · {p['name']}"
    n = variants.get(base, 1)
    return base if n == 1 else f"{base} · variant {meta['comparable_key'][:6]}"


def _group_description(meta: dict) -> str:
    b, p, g = meta["benchmark"], meta["protocol"], meta["generation"]
    overrides = ", ".join(f"{k}={v}" for k, v in p.get("overrides", {}).items()) or "none"
    return (
        f"{b['questions_evaluated']} questions ({p['questions']}), data {b['source']} split {b.get('split')} "
        f"sha256 {str(b['fingerprint'])[:12]}{' rev ' + str(b['revision'])[:12] if b.get('revision') else ''}; "
        f"prompt `{meta['prompt']['template']}`; decoding: max_new_tokens {g['max_new_tokens']}, beams {g['num_beams']}, "
        f"repetition_penalty {g['repetition_penalty']}; overrides: {overrides}; key `{meta['comparable_key']}`"
    )


def _fmt(agg: dict | None, column: str) -> str:
    if agg is None:
        return "–"
    scale = 100 if column in RATE_COLUMNS else 1
    return f"{agg['mean'] * scale:.2f} [{agg['low'] * scale:.2f}, {agg['high'] * scale:.2f}]"


def computed_columns(members: list[Run]) -> list[str]:
    """The metrics any run of a group has, `TABLE_COLUMNS` first in their order, then the others by name."""
    have = {m for run in members for m in run.metadata["scores"]}
    return [c for c in TABLE_COLUMNS if c in have] + sorted(have - set(TABLE_COLUMNS))


def plotted_metrics(members: list[Run]) -> list[str]:
    """The metrics a group's plot draws: its headline metrics that were computed, else its first computed one."""
    cols = computed_columns(members)
    headline = [m for m in members[0].metadata.get("headline") or ["rougeL"] if m in cols]
    return headline or cols[:1]


def _lengths(preds: list[dict], field: str) -> np.ndarray:
    return np.array([len(str(p[field])) for p in preds], dtype=float)


def compare(paths: list[str | Path], out: str | Path, force: bool = False) -> Path:
    """Write comparison.md, scores.png, answer_lengths.png and comparison.json for the runs under `paths`."""
    runs = find_runs(paths)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    bases: dict[str, int] = {}
    for members in groups.values():
        m = members[0].metadata
        base = f"{m['benchmark']['name']} · {m['protocol']['name']}"
        bases[base] = bases.get(base, 0) + 1
    titles = {key: _group_title(members[0].metadata, bases) for key, members in groups.items()}

    md = ["# Evaluation comparison", "",
          "Scores are means over questions with 95% bootstrap intervals (1000 resamples); ROUGE is F x 100 with "
          "MeCab tokens, `_ja` = strict Japanese, exact/substring match, non-Japanese rate and content accuracy in %, "
          "other metrics (a judge's) as their scorer gives them, `–` where a run did not compute one. Only runs with "
          "the same benchmark data, question selection, protocol, prompt and decoding share a table.", ""]
    summary: dict = {"groups": []}
    for key, members in groups.items():
        meta = members[0].metadata
        headline = plotted_metrics(members)
        md += [f"## {titles[key]}", "", _group_description(meta), ""]
        cols = computed_columns(members)
        md.append("| model | " + " | ".join(cols) + " | answer chars (median) | run |")
        md.append("|---|" + "---|" * len(cols) + "---|---|")
        entries = []
        by = headline[0] if headline else None
        for run in sorted(members, key=lambda r: -r.metadata["scores"].get(by, {}).get("mean", -np.inf)):
            scores = run.metadata["scores"]
            median = float(np.median(_lengths(run.predictions, "prediction")))
            md.append(f"| {run.label} | " + " | ".join(_fmt(scores.get(c), c) for c in cols)
                      + f" | {median:.0f} | `{run.dir}` |")
            entries.append({"model": run.label, "run": str(run.dir), "scores": scores, "median_answer_chars": median})
        ref_median = float(np.median(_lengths(members[0].predictions, "answer")))
        md += ["", f"Reference answers: median {ref_median:.0f} characters.", ""]
        summary["groups"].append({"title": titles[key], "comparable_key": key, "description": _group_description(meta),
                                  "headline": headline, "runs": entries})
    md += ["![scores](scores.png)", "", "![answer lengths](answer_lengths.png)", ""]

    with AtomicDir(out, force, [*paths, *(run.dir for run in runs)]) as tmp:
        (tmp / "comparison.md").write_text("\n".join(md), encoding="utf-8")
        (tmp / "comparison.json").write_text(dumps(summary), encoding="utf-8")
        _plot_scores(groups, titles, tmp / "scores.png")
        _plot_lengths(groups, titles, tmp / "answer_lengths.png")
    return Path(out) / "comparison.md"


def _figure(n: int, width_per: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, width_per * n), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, axes


def _plot_scores(groups: dict[str, list[Run]], titles: dict[str, str], path: Path) -> None:
    fig, axes = _figure(len(groups), 5.5, 4.2)
    for ax, (key, members) in zip(axes, groups.items()):
        headline = plotted_metrics(members)
        x = np.arange(len(members))
        width = 0.8 / max(1, len(headline))
        for j, metric in enumerate(headline):  # a run without the metric gets no bar (not a zero)
            have = [i for i, m in enumerate(members) if metric in m.metadata["scores"]]
            aggs = [members[i].metadata["scores"][metric] for i in have]
            means = np.array([a["mean"] for a in aggs])
            err = np.array([[a["mean"] - a["low"] for a in aggs], [a["high"] - a["mean"] for a in aggs]]).reshape(2, -1)
            ax.bar(x[have] + (j - (len(headline) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=metric)
        top = max((m.metadata["scores"].get(metric, {}).get("high", 0.0) for m in members for metric in headline),
                  default=0.0)
        ax.set_ylim(0, max(1.0, top * 1.15))
        ax.set_xticks(x, [m.label for m in members], rotation=30, ha="right", fontsize=8)
        ax.set_title(titles[key], fontsize=9)
        ax.set_ylabel("score (mean, 95% bootstrap CI)")
        if headline:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def _plot_lengths(groups: dict[str, list[Run]], titles: dict[str, str], path: Path) -> None:
    fig, axes = _figure(len(groups), 5.5, 4.2)
    for ax, (key, members) in zip(axes, groups.items()):
        series = [_lengths(members[0].predictions, "answer")] + [_lengths(m.predictions, "prediction") for m in members]
        labels = ["reference"] + [m.label for m in members]
        series = [s if s.size and np.ptp(s) > 0 else np.concatenate([s, s + 1e-3]) if s.size else np.zeros(2)
                  for s in series]  # a violin needs some spread
        parts = ax.violinplot(series, showmedians=True)
        parts["bodies"][0].set_facecolor("grey")
        ax.set_xticks(np.arange(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(titles[key], fontsize=9)
        ax.set_ylabel("answer length (characters)")
    fig.savefig(path, dpi=120)
