"""Chat Vector benchmark: ``ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)``.

What is measured
    Wall time and peak RSS of four contenders producing the merge of three
    ~1.1B-parameter bf16 Llama checkpoints (TinyLlama shape, random weights
    generated here into ``bench/_work/``), side by side in one run:

    1. ``floor``     read every input byte once, write the output's bytes once (I/O bound)
    2. ``vlm-merge`` our CLI, ``vlm-merge chat-vector`` on the llava-hf VLM
    3. ``in-ram``    naive: load_file all three state dicts, f32 math, save
    4. ``mergekit``  mergekit 0.1.5 ``task_arithmetic`` on the three LLMs (from its
                     own venv ``bench/.venv-mergekit``; it cannot keep a vision tower)

How
    Each contender is a child process; wall = perf_counter around spawn..reap,
    peak RSS = the child's ``ru_maxrss`` from ``os.wait4``. Before every run the
    previous output is deleted, dirty pages are synced and all inputs are read
    once, so every contender starts with the same warm page cache. Contenders run
    in the fixed order above; with ``--repeat R`` the order is repeated R times
    and medians are reported. Each output is checked against a float32 reference
    on sampled tensors (max distance in bf16 ulps). Results go to
    ``bench/results/chat_vector.{json,md}``.

Usage: ``.venv/bin/python -m bench.chat_vector [--layers N] [--skip a,b] [--keep] [--repeat R]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.check import Correctness, Reference, check_output
from bench.common import (
    GiB,
    LlamaShape,
    MachineFacts,
    dir_bytes,
    remove_dir,
    run_measured,
    warm_page_cache,
)
from bench.inputs import Inputs, InputSpec, ensure_inputs
from bench.mergekit_env import ensure_mergekit

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK = BENCH / "_work"
RESULTS = BENCH / "results"
CONTENDERS = ("floor", "vlm-merge", "in-ram", "mergekit")
BUSY_WARNING = 0.10  # others using more than this share of the CPUs during a run: flag it
SCALE = 1.0  # mergekit task_arithmetic with weights 1.0 computes exactly scale 1
MERGEKIT_FLAGS = ("--no-copy-tokenizer",)


@dataclass(frozen=True)
class Target:
    """A goal for vlm-merge expressed as a ratio bound."""

    label: str
    ratio: float | None
    bound: float

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        return "PASS" if self.ratio <= self.bound else "FAIL"

    def line(self) -> str:
        got = f"{self.ratio:.2f}x" if self.ratio is not None else "unmeasured"
        return f"{self.verdict:4}  {self.label}: {got} (target <= {self.bound}x)"


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    others_load: float  # share of all CPUs used by anything else meanwhile (incl. kernel writeback)
    correctness: dict[str, object]


@dataclass
class Contender:
    """One competitor: how to run it and what it produced."""

    name: str
    kind: str  # "io" (no merge), "vlm" (full VLM output) or "llm" (LLM only)
    out_dir: Path
    command: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | ok | unavailable | skipped
    error: str = ""
    runs: list[Run] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.status == "ok" and bool(self.runs)

    @property
    def wall_s(self) -> float | None:
        return statistics.median(r.wall_s for r in self.runs) if self.measured else None

    @property
    def peak_rss_bytes(self) -> int | None:
        return int(statistics.median(r.peak_rss_bytes for r in self.runs)) if self.measured else None

    @property
    def others_load(self) -> float | None:
        return max(r.others_load for r in self.runs) if self.measured else None

    def correctness(self) -> str:
        if not self.measured:
            return "-"
        summaries = {str(r.correctness["summary"]) for r in self.runs}
        return " / ".join(sorted(summaries))

    def correct(self) -> bool:
        return self.measured and all(r.correctness["passed"] for r in self.runs)


# --------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.chat_vector", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (default 22; 2 for a smoke run)")
    ap.add_argument("--skip", default="", help=f"comma-separated contenders to skip, from {','.join(CONTENDERS)}")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/out_* after the run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; medians are reported")
    args = ap.parse_args(argv)
    args.skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - set(CONTENDERS):
        ap.error(f"unknown contender(s) in --skip: {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.layers < 1:
        ap.error("--repeat and --layers must be >= 1")
    return args


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def mergekit_config(inputs: Inputs, path: Path) -> Path:
    """task_arithmetic: en + 1.0*(ja - en) + 1.0*(vlm_llm - en) = ja + (vlm_llm - en)."""
    text = f"""merge_method: task_arithmetic
base_model: {inputs.en_base}
models:
  - model: {inputs.ja_base}
    parameters:
      weight: 1.0
  - model: {inputs.vlm_llm}
    parameters:
      weight: 1.0
parameters:
  normalize: false
dtype: bfloat16
"""
    path.write_text(text)
    return path


def build_contenders(inputs: Inputs, skip: set[str]) -> list[Contender]:
    python = rel(Path(sys.executable))
    out = {name: WORK / f"out_{name.replace('-', '_')}" for name in CONTENDERS}
    out["vlm-merge"] = WORK / "out_ours"
    contenders = [
        Contender("floor", "io", out["floor"], [
            python, "-m", "bench.workers", "floor",
            "--inputs", rel(inputs.vlm), rel(inputs.en_base), rel(inputs.ja_base),
            "--like", rel(inputs.vlm), "--out", rel(out["floor"]),
        ]),
        Contender("vlm-merge", "vlm", out["vlm-merge"], [
            ".venv/bin/vlm-merge", "chat-vector", "--vlm", rel(inputs.vlm),
            "--en-base", rel(inputs.en_base), "--ja-base", rel(inputs.ja_base),
            "--out", rel(out["vlm-merge"]), "--scale", str(SCALE), "--force",
        ]),
        Contender("in-ram", "vlm", out["in-ram"], [
            python, "-m", "bench.workers", "in-ram", "--vlm", rel(inputs.vlm),
            "--en-base", rel(inputs.en_base), "--ja-base", rel(inputs.ja_base),
            "--out", rel(out["in-ram"]), "--scale", str(SCALE),
        ]),
        Contender("mergekit", "llm", out["mergekit"]),
    ]
    for c in contenders:
        if c.name in skip:
            c.status = "skipped"
    return contenders


def prepare_mergekit(c: Contender, inputs: Inputs) -> None:
    if c.status == "skipped":
        return
    try:
        env = ensure_mergekit(BENCH / ".venv-mergekit")
    except (RuntimeError, OSError) as exc:
        c.status, c.error = "unavailable", f"mergekit install failed: {exc}"
        return
    config = mergekit_config(inputs, WORK / "mergekit.yml")
    c.command = [rel(env.mergekit_yaml), rel(config), rel(c.out_dir), *MERGEKIT_FLAGS]


# --------------------------------------------------------------------------- running


def child_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_once(c: Contender, inputs: Inputs, ref: Reference, label: str, nproc: int) -> None:
    remove_dir(c.out_dir)
    os.sync()
    t = time.perf_counter()
    warmed = warm_page_cache(inputs.all_dirs())
    print(f"{label} {c.name}: page cache warmed ({warmed / 1e9:.1f} GB in {time.perf_counter() - t:.1f} s); running", flush=True)
    result = run_measured(c.command, WORK / "logs" / f"{c.out_dir.name}.log", cwd=REPO, env=child_env())
    if not result.ok:
        c.status = "unavailable"
        c.error = f"exit code {result.returncode}: {result.log_tail().strip()}"
        print(f"{label} {c.name}: UNAVAILABLE (exit {result.returncode}); log {rel(result.log)}", flush=True)
        return
    if c.kind == "io":
        verdict = Correctness("n/a")
    elif not c.out_dir.exists() or dir_bytes(c.out_dir) == 0:
        c.status = "unavailable"
        c.error = f"exited 0 but wrote nothing to {rel(c.out_dir)}: {result.log_tail().strip()}"
        print(f"{label} {c.name}: UNAVAILABLE (no output)", flush=True)
        return
    else:
        verdict = check_output(c.out_dir, ref, with_vision=c.kind == "vlm")
    c.status = "ok"
    others = result.others_load(nproc)
    c.runs.append(Run(result.wall_s, result.peak_rss_bytes, result.cpu_s, others, asdict(verdict) | {
        "summary": verdict.summary(), "passed": verdict.passed,
    }))
    print(
        f"{label} {c.name}: {result.wall_s:.2f} s, peak RSS {result.peak_rss_bytes / GiB:.2f} GiB, "
        f"CPU {result.cpu_s:.1f} s, others' CPU {100 * others:.0f}%, "
        f"output {dir_bytes(c.out_dir) / 1e9:.2f} GB, correctness: {verdict.summary()}",
        flush=True,
    )


def run_all(contenders: list[Contender], inputs: Inputs, ref: Reference, repeat: int, keep: bool, nproc: int) -> None:
    for r in range(repeat):
        for i, c in enumerate(contenders, start=1):
            if c.status in ("skipped", "unavailable"):
                if r == 0:
                    print(f"[{i}/{len(contenders)}] {c.name}: {c.status} {c.error[:200]}".rstrip(), flush=True)
                continue
            run_once(c, inputs, ref, f"[{i}/{len(contenders)}] run {r + 1}/{repeat}", nproc)
            if not keep:
                remove_dir(c.out_dir)


# --------------------------------------------------------------------------- reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if x is not None else "-"


def table_rows(contenders: list[Contender]) -> list[list[str]]:
    by = {c.name: c for c in contenders}
    mk, fl = by["mergekit"], by["floor"]
    header = ["contender", "wall s", "peak RSS GiB", "wall / mergekit", "RSS / mergekit", "wall / floor",
              "others' CPU", "correctness"]
    rows = [header]
    for c in contenders:
        if not c.measured:
            rows.append([c.name, c.status, *["-"] * (len(header) - 2)])
            continue
        rss = c.peak_rss_bytes / GiB
        rows.append([
            c.name,
            _fmt(c.wall_s, ".2f"),
            _fmt(rss, ".2f"),
            _fmt(_ratio(c.wall_s, mk.wall_s), ".2f", "x"),
            _fmt(_ratio(c.peak_rss_bytes, mk.peak_rss_bytes), ".2f", "x"),
            _fmt(_ratio(c.wall_s, fl.wall_s), ".2f", "x"),
            _fmt(100 * c.others_load, ".0f", "%"),
            c.correctness(),
        ])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def targets(contenders: list[Contender]) -> list[Target]:
    by = {c.name: c for c in contenders}
    ours, mk, fl = by["vlm-merge"], by["mergekit"], by["floor"]
    return [
        Target("vlm-merge wall <= 0.4x mergekit", _ratio(ours.wall_s, mk.wall_s), 0.4),
        Target("vlm-merge peak RSS <= 0.5x mergekit", _ratio(ours.peak_rss_bytes, mk.peak_rss_bytes), 0.5),
        Target("vlm-merge wall <= 2.5x floor", _ratio(ours.wall_s, fl.wall_s), 2.5),
    ]


def correctness_line(contenders: list[Contender]) -> str:
    ours = next(c for c in contenders if c.name == "vlm-merge")
    if not ours.measured:
        return "n/a   vlm-merge output matches the float32 reference: not measured"
    verdict = "PASS" if ours.correct() else "FAIL"
    return f"{verdict}  vlm-merge output matches the float32 reference (<= 1 bf16 ulp on sampled tensors, vision tower intact): {ours.correctness()}"


def unavailable_notes(contenders: list[Contender]) -> list[str]:
    return [f"{c.name}: {c.status}: {c.error}" for c in contenders if c.status == "unavailable"]


def contention_notes(contenders: list[Contender]) -> list[str]:
    return [
        f"{c.name}: other processes (or kernel writeback) used {100 * c.others_load:.0f}% of the CPUs "
        "during a run; its time may be inflated (see bench/_work/logs, rerun with --repeat)"
        for c in contenders
        if c.measured and c.others_load > BUSY_WARNING
    ]


@dataclass(frozen=True)
class Report:
    command: str
    facts: MachineFacts
    spec: InputSpec
    input_gb: dict[str, float]
    contenders: list[Contender]

    def as_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "machine": self.facts.as_dict() | {"mergekit": _mergekit_version()},
            "inputs": {"spec": self.spec.key(), "gb": self.input_gb, "params_per_model": self.spec.llama.n_params()},
            "mergekit_config": {"flags": list(MERGEKIT_FLAGS), "yaml": _read(WORK / "mergekit.yml")},
            "contenders": [
                {
                    "name": c.name, "kind": c.kind, "status": c.status, "error": c.error,
                    "command": shlex.join(c.command) if c.command else None,
                    "wall_s": c.wall_s, "peak_rss_bytes": c.peak_rss_bytes, "others_load_max": c.others_load,
                    "runs": [asdict(r) for r in c.runs],
                }
                for c in self.contenders
            ],
            "targets": [asdict(t) | {"verdict": t.verdict} for t in targets(self.contenders)],
            "vlm_merge_correct": next(c for c in self.contenders if c.name == "vlm-merge").correct(),
        }

    def as_markdown(self) -> str:
        f = self.facts
        mkv = _mergekit_version()
        lines = [
            "# Chat Vector benchmark",
            "",
            "`ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`, scale 1.0, on three "
            f"{self.spec.llama.n_params() / 1e9:.2f}B-parameter bf16 Llama checkpoints "
            f"({self.spec.llama.layers} layers, random weights, 1 GB shards).",
            "",
            "Command:",
            "",
            "```sh",
            self.command,
            "```",
            "",
            f"Machine: {f.nproc} CPUs ({f.cpu}), {f.ram_total_gib} GiB RAM, Linux {f.kernel}; "
            f"Python {f.python}, torch {f.torch} ({f.torch_threads} threads), transformers {f.transformers}, "
            f"safetensors {f.safetensors}, mergekit {mkv}.",
            "",
            markdown_table(table_rows(self.contenders)),
            "",
            "Targets:",
            "",
            *[f"- {t.line()}" for t in targets(self.contenders)],
            f"- {correctness_line(self.contenders)}",
            "",
            "Contender commands (run from the repository root; wall = spawn..reap, peak RSS = `ru_maxrss` via "
            "`os.wait4`; others' CPU = share of all CPUs busy with anything but the contender during its run):",
            "",
            *[f"- `{c.name}`: `{shlex.join(c.command)}`" for c in self.contenders if c.command],
        ]
        if notes := unavailable_notes(self.contenders):
            lines += ["", "Unavailable:", "", *[f"- {n[:600]}" for n in notes]]
        if notes := contention_notes(self.contenders):
            lines += ["", "Contention:", "", *[f"- {n}" for n in notes]]
        return "\n".join(lines) + "\n"


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _mergekit_version() -> str:
    marker = next((BENCH / ".venv-mergekit").glob(".installed-mergekit-*"), None)
    return marker.name.removeprefix(".installed-mergekit-") if marker else "not installed"


def write_report(report: Report) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chat_vector.json").write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    (RESULTS / "chat_vector.md").write_text(report.as_markdown())


def print_report(report: Report) -> None:
    print()
    print(text_table(table_rows(report.contenders)))
    print()
    for t in targets(report.contenders):
        print(t.line())
    print(correctness_line(report.contenders))
    for note in unavailable_notes(report.contenders) + contention_notes(report.contenders):
        print(f"note: {note[:600]}")
    print(f"\nresults: {rel(RESULTS / 'chat_vector.json')}, {rel(RESULTS / 'chat_vector.md')}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([rel(Path(sys.executable)), "-m", "bench.chat_vector", *argv])
    facts = MachineFacts.collect()
    print(f"$ {command}\nmachine: {facts.as_dict()}", flush=True)
    spec = InputSpec(LlamaShape(layers=args.layers))
    inputs = Inputs(WORK)
    t = time.perf_counter()
    if ensure_inputs(inputs, spec):
        print(f"inputs generated in {time.perf_counter() - t:.1f} s", flush=True)
    ref = Reference(inputs.en_base, inputs.ja_base, inputs.vlm, spec.llama, spec.clip, SCALE)
    contenders = build_contenders(inputs, args.skip)
    prepare_mergekit(next(c for c in contenders if c.name == "mergekit"), inputs)
    run_all(contenders, inputs, ref, args.repeat, args.keep, facts.nproc)
    input_gb = {d.name: round(dir_bytes(d) / 1e9, 3) for d in inputs.all_dirs()}
    report = Report(command, facts, spec, input_gb, contenders)
    write_report(report)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
