"""Run tracking: `--report-to tensorboard | wandb` for `vlm-merge evolve` and `vlm-merge eval`.

A `Tracker` sends scalars, histograms and a final summary to the chosen backends (`BACKENDS`: the pip
extra each needs, `tensorboard` or `wandb`, both in `track`, and its writer). TensorBoard writes event files under
`LOG_DIR/tensorboard/` (torch's `SummaryWriter`); W&B logs a run (project `WANDB_PROJECT`, default
`vlm-merge`; `WANDB_MODE=offline` keeps it on disk under `LOG_DIR/wandb/`). A backend opens on the first
value it is sent, so a tracker made before a run directory exists creates nothing until the run logs.

`EvolveTracking` turns an evolutionary search's candidate records (`log.jsonl` lines) into that:
per candidate (step = its evaluation number) its fitness, the best fitness so far, merge and eval seconds
and its scores; per generation (at its last candidate's step) a histogram of every gene's values.
`log_eval_scores` sends an eval run's scores (mean and interval per metric).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_merge.errors import VlmMergeError
from vlm_merge.extras import missing_requirements

WANDB_PROJECT = "vlm-merge"


class _TensorBoard:
    """Event files in `log_dir/tensorboard/` through torch's SummaryWriter (needs the tensorboard package)."""

    def __init__(self, log_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        if config:
            import yaml

            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```", 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def histograms(self, values: Mapping[str, Sequence[float]], step: int) -> None:
        import numpy as np

        for tag, v in values.items():
            self.writer.add_histogram(tag, np.asarray(v, dtype=np.float64), step)

    def summary(self, values: Mapping[str, Any]) -> None:
        self.writer.add_text("summary", "\n".join(f"- {k}: {v}" for k, v in values.items()), 0)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run (`WANDB_MODE=offline`: written under `log_dir/wandb/` only)."""

    def __init__(self, log_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=name, dir=str(log_dir),
                              config=dict(config), reinit="create_new")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def histograms(self, values: Mapping[str, Sequence[float]], step: int) -> None:
        self.run.log({tag: self.wandb.Histogram(list(v)) for tag, v in values.items()}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def close(self) -> None:
        self.run.finish()


@dataclass(frozen=True)
class Backend:
    """A tracking backend: the pip extra that installs it (both are in `track`) and its writer class."""

    extra: str
    writer: type


BACKENDS = {"tensorboard": Backend("tensorboard", _TensorBoard), "wandb": Backend("wandb", _WandB)}


def check_report_to(names: Sequence[str] | None) -> list[str]:
    """The backends asked for (`--report-to`, repeatable or comma-separated), known and installed, or the
    one-line error (checked before the run starts)."""
    out: list[str] = []
    for name in (n.strip() for item in names or () for n in item.split(",")):
        if not name or name == "none":
            continue
        if name not in BACKENDS:
            raise VlmMergeError(f"--report-to {name!r}: not a tracking backend; use {' or '.join(BACKENDS)}")
        if missing := missing_requirements(BACKENDS[name].extra):
            raise VlmMergeError(f"--report-to {name} needs the {BACKENDS[name].extra} extra: pip install "
                                f"'vlm-merge[{BACKENDS[name].extra}]' (not installed: {', '.join(missing)})")
        out.append(name)
    return list(dict.fromkeys(out))


@dataclass
class Tracker:
    """Scalars, histograms and a summary sent to `backends`, each opened on first use in `log_dir`."""

    backends: Sequence[str]
    log_dir: Path
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    _open: list = field(default_factory=list)

    def _writers(self) -> list:
        if not self._open and self.backends:
            self._open = [BACKENDS[b].writer(self.log_dir, self.name, self.config) for b in self.backends]
        return self._open

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for w in self._writers():
            w.scalars(finite, step)

    def histograms(self, values: Mapping[str, Sequence[float]], step: int) -> None:
        for w in self._writers():
            w.histograms({k: v for k, v in values.items() if len(v)}, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for w in self._writers():
            w.summary(values)

    def close(self) -> None:
        for w in self._open:
            w.close()
        self._open = []


@dataclass
class EvolveTracking:
    """An evolve run's candidate records -> a `Tracker` (see the module docstring). Call it with each batch
    of records as they are logged; `finish` sends the summary and closes the tracker."""

    tracker: Tracker
    best: float = -math.inf
    _generation: int | None = None
    _step: int = 0
    _genes: dict[str, list[float]] = field(default_factory=dict)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> None:
        for r in sorted(records, key=lambda r: r.get("evaluation", 0)):
            gen = r.get("generation")
            if gen != self._generation:
                self._flush_genes()
                self._generation = gen
            fitness = r.get("fitness")
            ok = r.get("error") is None and isinstance(fitness, (int, float)) and math.isfinite(fitness)
            if ok:
                self.best = max(self.best, float(fitness))
            scores = {f"candidate/score/{k}": v for k, v in (r.get("scores") or {}).items()}
            self._step = int(r.get("evaluation", 0))
            self.tracker.scalars({"candidate/fitness": fitness if ok else math.nan, "search/best_fitness": self.best,
                                  "candidate/merge_s": r.get("merge_s", math.nan), "candidate/eval_s": r.get("eval_s", math.nan),
                                  "candidate/failed": 0.0 if ok else 1.0, "search/generation": gen or 0, **scores},
                                 self._step)
            for name, value in (r.get("genes") or {}).items():
                self._genes.setdefault(name, []).append(float(value))

    def _flush_genes(self) -> None:
        if self._genes:  # at the generation's last step (W&B's steps only go up)
            self.tracker.histograms({f"genome/{k}": v for k, v in self._genes.items()}, self._step)
        self._genes = {}

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._flush_genes()
        self.tracker.summary({"best_fitness": self.best if math.isfinite(self.best) else None, **summary})
        self.tracker.close()


def log_eval_scores(tracker: Tracker, scores: Mapping[str, Mapping[str, float]], summary: Mapping[str, Any]) -> None:
    """An eval run's scores (metric -> mean / low / high) as scalars at step 0, a summary, and the tracker closed."""
    try:
        tracker.scalars({f"eval/{m}/{k}": a[k] for m, a in scores.items() for k in ("mean", "low", "high") if k in a}, 0)
        tracker.summary({**{f"{m}": a.get("mean") for m, a in scores.items()}, **summary})
    finally:
        tracker.close()
