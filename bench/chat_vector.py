"""Chat Vector benchmark: ``ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)``.

What is measured
    Wall time and peak RSS of four contenders producing the merge of three
    Llama checkpoints with random weights generated here into ``bench/_work/``,
    side by side in one run. ``--shape`` picks the checkpoints (bench/presets.py):
    ``tinyllama`` (default; ~1.1B-parameter bf16) or ``llava-1.5-7b`` (fp16
    replicas of llava-hf/llava-1.5-7b-hf, Llama-2-7b-hf and
    ELYZA-japanese-Llama-2-7b, with their real shapes, shards and buffers):

    1. ``floor``     read every input byte once, write the output's bytes once (I/O bound)
    2. ``vlm-merge`` our CLI, ``vlm-merge chat-vector`` on the llava-hf VLM
    3. ``in-ram``    naive: load_file all three state dicts, f32 math, save
    4. ``mergekit``  mergekit 0.1.5 ``task_arithmetic`` on the three LLMs (from its
                     own venv ``bench/.venv-mergekit``; it cannot keep a vision tower)

How
    Each contender is a child process; wall = perf_counter around spawn..reap,
    peak RSS = the child's ``ru_maxrss`` from ``os.wait4``. Before every run the
    previous output is deleted, dirty pages are synced and all inputs are read
    once, so every contender starts with the same warm page cache (7B: the inputs
    cannot stay in RAM, so they are evicted from the page cache instead and every
    contender starts cold). The disk space of bench/_work is polled throughout and
    its peak reported (7B: the VLM and its standalone LLM are never on disk
    together; each is regenerated, identically, when needed). Contenders run
    in the fixed order above; with ``--repeat R`` the order is repeated R times
    and medians are reported. Each output is checked against a float32 reference
    on sampled tensors (max distance in ulps). Results go to
    ``bench/results/chat_vector.{json,md}`` (7B: ``chat_vector-llava-1.5-7b.{json,md}``).

Usage: ``.venv/bin/python -m bench.chat_vector [--shape S] [--layers N] [--skip a,b] [--keep] [--repeat R]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.check import Correctness, Reference, check_output
from bench.common import (
    GiB,
    MachineFacts,
    dir_bytes,
    remove_dir,
    run_measured,
    warm_page_cache,
)
from bench.inputs import BASES, MODELS, Inputs, InputSpec, discard_stale, drop_input, ensure_inputs, is_valid
from bench.mergekit_env import ensure_mergekit
from bench.presets import PRESET_NAMES, TINYLLAMA, Preset, load_preset

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
    """A goal for vlm-merge: a measured value (a ratio, or GB) and its upper bound."""

    label: str
    ratio: float | None
    bound: float
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        return "PASS" if self.ratio <= self.bound else "FAIL"

    def line(self) -> str:
        got = f"{self.ratio:.2f}{self.unit}" if self.ratio is not None else "unmeasured"
        return f"{self.verdict:4}  {self.label}: {got} (target <= {self.bound}{self.unit})"


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    others_load: float  # share of all CPUs used by anything else meanwhile (incl. kernel writeback)
    correctness: dict[str, object]
    peak_disk_bytes: int = 0  # bench/_work's peak disk use during the run (inputs included)


@dataclass
class Contender:
    """One competitor: how to run it and what it produced."""

    name: str
    kind: str  # "io" (no merge), "vlm" (full VLM output) or "llm" (LLM only)
    out_dir: Path
    vlm_input: str  # the input holding the VLM's language model: "vlm" or "vlm_llm"
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

    @property
    def peak_disk_bytes(self) -> int | None:
        return max(r.peak_disk_bytes for r in self.runs) if self.measured else None

    def needs(self) -> tuple[str, ...]:
        return (*BASES, self.vlm_input)

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
    ap.add_argument("--shape", choices=PRESET_NAMES, default=TINYLLAMA.name,
                    help="checkpoints to replicate (default tinyllama; llava-1.5-7b: the real 7B trio, fp16)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the shape's, 22 / 32; 2 for a smoke run)")
    ap.add_argument("--skip", default="", help=f"comma-separated contenders to skip, from {','.join(CONTENDERS)}")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/out_* after the run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; medians are reported")
    args = ap.parse_args(argv)
    args.skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - set(CONTENDERS):
        ap.error(f"unknown contender(s) in --skip: {', '.join(sorted(unknown))}")
    if args.repeat < 1 or (args.layers is not None and args.layers < 1):
        ap.error("--repeat and --layers must be >= 1")
    try:
        args.preset = load_preset(args.shape).with_layers(args.layers)
    except FileNotFoundError as exc:
        ap.error(f"--shape {args.shape}: {exc}")
    return args


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def mergekit_config(inputs: Inputs, preset: Preset, path: Path) -> Path:
    """task_arithmetic: en + 1.0*(ja - en) + 1.0*(vlm_llm - en) = ja + (vlm_llm - en).

    When the VLM has more vocabulary rows than the bases (llava-hf's <image>, <pad>, padded to 64),
    mergekit refuses unequal shapes unless told how to align vocabularies: the union of the tokenizers,
    padded as llava-hf pads, gives the added tokens the VLM's rows (only the VLM has them) and the
    padding rows the mean, as vlm-merge does."""
    tokenizer = ""
    if preset.vlm_vocab_rows != preset.llama.vocab:
        tokenizer = "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n"
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
dtype: {preset.dtype}
{tokenizer}"""
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no bench/_work yet
    path.write_text(text)
    return path


def build_contenders(inputs: Inputs, preset: Preset, skip: set[str]) -> list[Contender]:
    python = rel(Path(sys.executable))
    out = {name: WORK / f"out_{name.replace('-', '_')}" for name in CONTENDERS}
    out["vlm-merge"] = WORK / "out_ours"
    contenders = [
        Contender("floor", "io", out["floor"], "vlm", [
            python, "-m", "bench.workers", "floor",
            "--inputs", rel(inputs.vlm), rel(inputs.en_base), rel(inputs.ja_base),
            "--like", rel(inputs.vlm), "--out", rel(out["floor"]),
        ]),
        Contender("vlm-merge", "vlm", out["vlm-merge"], "vlm", [
            ".venv/bin/vlm-merge", "chat-vector", "--vlm", rel(inputs.vlm),
            "--en-base", rel(inputs.en_base), "--ja-base", rel(inputs.ja_base),
            "--out", rel(out["vlm-merge"]), "--scale", str(SCALE), "--force",
        ]),
        Contender("in-ram", "vlm", out["in-ram"], "vlm", [
            python, "-m", "bench.workers", "in-ram", "--vlm", rel(inputs.vlm),
            "--en-base", rel(inputs.en_base), "--ja-base", rel(inputs.ja_base),
            "--out", rel(out["in-ram"]), "--scale", str(SCALE),
        ]),
        Contender("mergekit", "llm", out["mergekit"], "vlm_llm"),
    ]
    for c in contenders:
        if c.name in skip:
            c.status, c.error = "skipped", "--skip"
        elif c.name in preset.skip:
            c.status, c.error = "skipped", f"at this size: {preset.skip[c.name]}"
    return contenders


def prepare_mergekit(c: Contender, inputs: Inputs, preset: Preset) -> None:
    if c.status == "skipped":
        return
    try:
        env = ensure_mergekit(BENCH / ".venv-mergekit")
    except (RuntimeError, OSError) as exc:
        c.status, c.error = "unavailable", f"mergekit install failed: {exc}"
        return
    config = mergekit_config(inputs, preset, WORK / "mergekit.yml")
    c.command = [rel(env.mergekit_yaml), rel(config), rel(c.out_dir), *MERGEKIT_FLAGS]


# --------------------------------------------------------------------------- disk


def allocated_bytes(root: Path) -> int:
    """Disk blocks allocated under ``root`` (files vanishing meanwhile are skipped)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


class DiskMonitor:
    """Polls the disk use of bench/_work (inputs, outputs, temp dirs) in a thread: the overall peak and a
    resettable peak per contender run. Also the filesystem's lowest free space (others write to it too)."""

    def __init__(self, root: Path, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak = self.window_peak = 0
        self.min_free = shutil.disk_usage(root).free if root.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        used = allocated_bytes(self.root)
        self.peak, self.window_peak = max(self.peak, used), max(self.window_peak, used)
        self.min_free = min(self.min_free, shutil.disk_usage(self.root).free)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> DiskMonitor:
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free = shutil.disk_usage(self.root).free
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def start_window(self) -> None:
        self.window_peak = 0
        self._sample()

    def end_window(self) -> int:
        self._sample()
        return self.window_peak


# --------------------------------------------------------------------------- running


def child_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def evict_page_cache(dirs: list[Path]) -> int:
    """Drop the (clean, after sync) cached pages of every file under ``dirs``; only these files are
    touched, so others' caches stay. Returns the bytes covered."""
    total = 0
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                total += f.stat().st_size
    return total


def prepare_cache(inputs: Inputs, c: Contender, preset: Preset) -> str:
    dirs = [inputs.dir(m) for m in c.needs()]
    t = time.perf_counter()
    if preset.cold_cache:
        n = evict_page_cache(dirs)
        return f"inputs evicted from the page cache ({n / 1e9:.1f} GB in {time.perf_counter() - t:.1f} s)"
    n = warm_page_cache(dirs)
    return f"page cache warmed ({n / 1e9:.1f} GB in {time.perf_counter() - t:.1f} s)"


def run_once(c: Contender, inputs: Inputs, preset: Preset, label: str, nproc: int, disk: DiskMonitor) -> None:
    remove_dir(c.out_dir)
    os.sync()
    print(f"{label} {c.name}: {prepare_cache(inputs, c, preset)}; running", flush=True)
    disk.start_window()
    result = run_measured(c.command, WORK / "logs" / f"{c.out_dir.name}.log", cwd=REPO, env=child_env())
    peak_disk = disk.end_window()
    if not result.ok:
        c.status = "unavailable"
        c.error = f"exit code {result.returncode}: {result.log_tail().strip()}"
        last = c.error.splitlines()[-1] if c.error.splitlines() else c.error
        print(f"{label} {c.name}: UNAVAILABLE (exit {result.returncode}): {last[:300]}; log {rel(result.log)}", flush=True)
        return
    if c.kind == "io":
        verdict = Correctness("n/a")
    elif not c.out_dir.exists() or dir_bytes(c.out_dir) == 0:
        c.status = "unavailable"
        c.error = f"exited 0 but wrote nothing to {rel(c.out_dir)}: {result.log_tail().strip()}"
        print(f"{label} {c.name}: UNAVAILABLE (no output)", flush=True)
        return
    else:
        ref = Reference(inputs.en_base, inputs.ja_base, inputs.dir(c.vlm_input), preset, SCALE)
        verdict = check_output(c.out_dir, ref, with_vision=c.kind == "vlm")
    c.status = "ok"
    others = result.others_load(nproc)
    c.runs.append(Run(result.wall_s, result.peak_rss_bytes, result.cpu_s, others, asdict(verdict) | {
        "summary": verdict.summary(), "passed": verdict.passed,
    }, peak_disk))
    print(
        f"{label} {c.name}: {result.wall_s:.2f} s, peak RSS {result.peak_rss_bytes / GiB:.2f} GiB, "
        f"CPU {result.cpu_s:.1f} s, others' CPU {100 * others:.0f}%, "
        f"output {dir_bytes(c.out_dir) / 1e9:.2f} GB, peak disk {peak_disk / 1e9:.1f} GB, "
        f"correctness: {verdict.summary()}",
        flush=True,
    )


def phases(contenders: list[Contender], inputs: Inputs, spec: InputSpec) -> list[tuple[str, list[Contender]]]:
    """Contenders grouped by the VLM input they read ("vlm" or "vlm_llm"), in the fixed order, except
    that the group whose input is already on disk goes first (one regeneration fewer)."""
    groups: dict[str, list[Contender]] = {}
    for c in contenders:
        groups.setdefault(c.vlm_input, []).append(c)
    return sorted(groups.items(), key=lambda g: not is_valid(inputs, spec, g[0]))


def disk_needed(contenders: list[Contender], spec: InputSpec) -> int:
    """Peak bytes the run will need under bench/_work: per VLM input, the inputs a contender reads plus the
    largest output (the VLM for vlm-merge and floor, the LLM for mergekit); all inputs at once without the
    swap plan."""
    runnable = [c for c in contenders if c.status == "pending"]
    out = {c.vlm_input: spec.model_bytes("vlm" if c.kind != "llm" else "vlm_llm") for c in runnable}
    if not spec.preset.swap_vlm_llm:
        inputs = {m for c in runnable for m in c.needs()}
        return sum(spec.model_bytes(m) for m in inputs) + max(out.values(), default=0)
    return max((sum(spec.model_bytes(m) for m in (*BASES, v)) + o for v, o in out.items()), default=0)


def check_disk(contenders: list[Contender], spec: InputSpec) -> str | None:
    """A one-line refusal when bench/_work's filesystem cannot hold the run's peak (plus 2 GB), else None."""
    WORK.mkdir(parents=True, exist_ok=True)
    need = disk_needed(contenders, spec) + 2 * 10**9
    have = shutil.disk_usage(WORK).free + allocated_bytes(WORK)
    if need <= have:
        return None
    return (f"{rel(WORK)}: the run needs about {need / 1e9:.1f} GB of disk (inputs + one output + 2 GB), "
            f"{have / 1e9:.1f} GB are available there (free + bench/_work itself); free some space or use --layers")


def ensure_phase_inputs(inputs: Inputs, spec: InputSpec, needed: tuple[str, ...], timings: dict[str, float]) -> None:
    """Make ``needed`` present; with the swap plan, first delete the VLM input not needed now."""
    if spec.preset.swap_vlm_llm:
        for other in ("vlm", "vlm_llm"):
            if other not in needed:
                drop_input(inputs, other)
    t = time.perf_counter()
    if ensure_inputs(inputs, spec, needed):
        took = time.perf_counter() - t
        timings["+".join(needed)] = timings.get("+".join(needed), 0.0) + took
        print(f"inputs generated in {took:.1f} s", flush=True)


def run_all(contenders: list[Contender], inputs: Inputs, spec: InputSpec, args: argparse.Namespace, nproc: int,
            disk: DiskMonitor, timings: dict[str, float]) -> None:
    """Every runnable contender ``repeat`` times. Without the swap plan all inputs exist from the start
    and rounds repeat the fixed order; with it, each group of contenders sharing a VLM input runs its
    rounds while that input is on disk."""
    total = len(contenders)
    index = {c.name: i for i, c in enumerate(contenders, start=1)}
    for c in contenders:
        if c.status in ("skipped", "unavailable"):
            print(f"[{index[c.name]}/{total}] {c.name}: {c.status} {c.error[:300]}".rstrip(), flush=True)
    runnable = [c for c in contenders if c.status == "pending"]
    if not spec.preset.swap_vlm_llm:
        ensure_phase_inputs(inputs, spec, tuple(dict.fromkeys(m for c in contenders for m in c.needs())), timings)
        groups = [("all", runnable)]
    else:
        groups = phases(runnable, inputs, spec)
    for _, group in groups:
        if spec.preset.swap_vlm_llm and group:
            ensure_phase_inputs(inputs, spec, group[0].needs(), timings)
        for r in range(args.repeat):
            for c in group:
                if c.status == "unavailable":
                    continue
                run_once(c, inputs, spec.preset, f"[{index[c.name]}/{total}] run {r + 1}/{args.repeat}", nproc, disk)
                if not args.keep:
                    remove_dir(c.out_dir)


# --------------------------------------------------------------------------- reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if x is not None else "-"


def table_rows(contenders: list[Contender]) -> list[list[str]]:
    by = {c.name: c for c in contenders}
    mk, fl = by["mergekit"], by["floor"]
    header = ["contender", "wall s", "wall / floor", "peak RSS GiB", "wall / mergekit", "RSS / mergekit",
              "peak disk GB", "others' CPU", "correctness"]
    rows = [header]
    for c in contenders:
        if not c.measured:
            rows.append([c.name, c.status, *["-"] * (len(header) - 2)])
            continue
        rss = c.peak_rss_bytes / GiB
        rows.append([
            c.name,
            _fmt(c.wall_s, ".2f"),
            _fmt(_ratio(c.wall_s, fl.wall_s), ".2f", "x"),
            _fmt(rss, ".2f"),
            _fmt(_ratio(c.wall_s, mk.wall_s), ".2f", "x"),
            _fmt(_ratio(c.peak_rss_bytes, mk.peak_rss_bytes), ".2f", "x"),
            _fmt(c.peak_disk_bytes / 1e9, ".1f"),
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


def targets(contenders: list[Contender], preset: Preset) -> list[Target]:
    """The issue's goals for vlm-merge at each size: against mergekit on TinyLlama; absolute RSS and
    the I/O floor at 7B (issue 28)."""
    by = {c.name: c for c in contenders}
    ours, mk, fl = by["vlm-merge"], by["mergekit"], by["floor"]
    if preset.name == TINYLLAMA.name:
        return [
            Target("vlm-merge wall <= 0.4x mergekit", _ratio(ours.wall_s, mk.wall_s), 0.4),
            Target("vlm-merge peak RSS <= 0.5x mergekit", _ratio(ours.peak_rss_bytes, mk.peak_rss_bytes), 0.5),
            Target("vlm-merge wall <= 2.5x floor", _ratio(ours.wall_s, fl.wall_s), 2.5),
        ]
    rss_gb = ours.peak_rss_bytes / 1e9 if ours.peak_rss_bytes is not None else None
    return [
        Target("vlm-merge peak RSS <= 1.5 GB", rss_gb, 1.5, " GB"),
        Target("vlm-merge wall <= 1.5x floor", _ratio(ours.wall_s, fl.wall_s), 1.5),
    ]


def correctness_line(contenders: list[Contender]) -> str:
    ours = next(c for c in contenders if c.name == "vlm-merge")
    if not ours.measured:
        return "n/a   vlm-merge output matches the float32 reference: not measured"
    verdict = "PASS" if ours.correct() else "FAIL"
    return f"{verdict}  vlm-merge output matches the float32 reference (<= 1 ulp on sampled tensors, vision tower intact): {ours.correctness()}"


def unavailable_notes(contenders: list[Contender]) -> list[str]:
    return [f"{c.name}: {c.status}: {c.error}" for c in contenders if c.status == "unavailable"]


def skipped_notes(contenders: list[Contender]) -> list[str]:
    return [f"{c.name}: skipped {c.error}" for c in contenders if c.status == "skipped"]


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
    generate_s: dict[str, float]
    peak_disk_bytes: int
    min_free_bytes: int

    @property
    def preset(self) -> Preset:
        return self.spec.preset

    def as_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "machine": self.facts.as_dict() | {"mergekit": _mergekit_version()},
            "inputs": {"spec": self.spec.key(), "gb": self.input_gb, "params_per_model": self.preset.llama.n_params(),
                       "generate_s": self.generate_s, "cache": self.cache_note()},
            "disk": {"peak_work_bytes": self.peak_disk_bytes, "min_free_bytes": self.min_free_bytes},
            "mergekit_config": {"flags": list(MERGEKIT_FLAGS), "yaml": _read(WORK / "mergekit.yml")},
            "contenders": [
                {
                    "name": c.name, "kind": c.kind, "status": c.status, "error": c.error,
                    "command": shlex.join(c.command) if c.command else None,
                    "wall_s": c.wall_s, "peak_rss_bytes": c.peak_rss_bytes, "others_load_max": c.others_load,
                    "peak_disk_bytes": c.peak_disk_bytes,
                    "runs": [asdict(r) for r in c.runs],
                }
                for c in self.contenders
            ],
            "targets": [asdict(t) | {"verdict": t.verdict} for t in targets(self.contenders, self.preset)],
            "vlm_merge_correct": next(c for c in self.contenders if c.name == "vlm-merge").correct(),
        }

    def cache_note(self) -> str:
        if self.preset.cold_cache:
            return ("cold: before each run the inputs are evicted from the page cache (posix_fadvise DONTNEED "
                    "after sync); they are larger than RAM, so no contender could keep them cached anyway")
        return "warm: every input file is read once before each run"

    def describe(self) -> str:
        p, s = self.preset, self.preset.llama
        if p.name == TINYLLAMA.name:
            return (f"three {s.n_params() / 1e9:.2f}B-parameter bf16 Llama checkpoints "
                    f"({s.layers} layers, random weights, 1 GB shards)")
        return (f"random-weight {p.dtype} replicas of llava-hf/llava-1.5-7b-hf (VLM), meta-llama/Llama-2-7b-hf "
                f"(English base) and elyza/ELYZA-japanese-Llama-2-7b (Japanese base) with their real shapes "
                f"({s.layers} of 32 layers, {s.n_params() / 1e9:.2f}B LLM parameters, VLM vocabulary "
                f"{p.vlm_vocab_rows} rows vs {s.vocab}, "
                f"inv_freq buffers in the bases, the real shard files; from tests/real_layouts via bench/presets.py)")

    def as_markdown(self) -> str:
        f = self.facts
        mkv = _mergekit_version()
        lines = [
            f"# Chat Vector benchmark ({self.preset.name})",
            "",
            f"`ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`, scale 1.0, on {self.describe()}.",
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
            f"Inputs (tensor bytes): {', '.join(f'{k} {v:.2f} GB' for k, v in self.input_gb.items())}; "
            f"page cache {self.cache_note()}.",
            f"Disk: peak {self.peak_disk_bytes / 1e9:.1f} GB under bench/_work (inputs, outputs, temp files; "
            f"polled every 0.5 s); the filesystem's free space went down to {self.min_free_bytes / 1e9:.1f} GB.",
            "Input generation (not part of any contender's time): "
            + (", ".join(f"{k} {v:.0f} s" for k, v in self.generate_s.items()) or "reused"),
            "",
            markdown_table(table_rows(self.contenders)),
            "",
            "Targets:",
            "",
            *[f"- {t.line()}" for t in targets(self.contenders, self.preset)],
            f"- {correctness_line(self.contenders)}",
            "",
            "Contender commands (run from the repository root; wall = spawn..reap, peak RSS = `ru_maxrss` via "
            "`os.wait4`; peak disk = bench/_work during the run, inputs included; others' CPU = share of all "
            "CPUs busy with anything but the contender during its run):",
            "",
            *[f"- `{c.name}`: `{shlex.join(c.command)}`" for c in self.contenders if c.command],
        ]
        if notes := skipped_notes(self.contenders):
            lines += ["", "Skipped:", "", *[f"- {n}" for n in notes]]
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


def result_name(preset: Preset) -> str:
    return "chat_vector" if preset.name == TINYLLAMA.name else f"chat_vector-{preset.name}"


def write_report(report: Report) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = result_name(report.preset)
    (RESULTS / f"{name}.json").write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(report.as_markdown())


def print_report(report: Report) -> None:
    print()
    print(text_table(table_rows(report.contenders)))
    print()
    for t in targets(report.contenders, report.preset):
        print(t.line())
    print(correctness_line(report.contenders))
    print(f"peak disk under bench/_work: {report.peak_disk_bytes / 1e9:.1f} GB; "
          f"lowest free space on the filesystem: {report.min_free_bytes / 1e9:.1f} GB")
    print(f"page cache: {report.cache_note()}")
    for note in skipped_notes(report.contenders) + unavailable_notes(report.contenders) + contention_notes(report.contenders):
        print(f"note: {note[:600]}")
    name = result_name(report.preset)
    print(f"\nresults: {rel(RESULTS / f'{name}.json')}, {rel(RESULTS / f'{name}.md')}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([rel(Path(sys.executable)), "-m", "bench.chat_vector", *argv])
    facts = MachineFacts.collect()
    print(f"$ {command}\nmachine: {facts.as_dict()}", flush=True)
    spec = InputSpec(args.preset)
    inputs = Inputs(WORK)
    contenders = build_contenders(inputs, spec.preset, args.skip)
    prepare_mergekit(next(c for c in contenders if c.name == "mergekit"), inputs, spec.preset)
    discard_stale(inputs, spec)  # before measuring disk: another shape's inputs are not this run's
    if refusal := check_disk(contenders, spec):
        print(f"python -m bench.chat_vector: error: {refusal}", file=sys.stderr)
        return 2
    print(f"disk: the run needs about {disk_needed(contenders, spec) / 1e9:.1f} GB under {rel(WORK)} at its peak", flush=True)
    timings: dict[str, float] = {}
    with DiskMonitor(WORK) as disk:
        run_all(contenders, inputs, spec, args, facts.nproc, disk, timings)
    input_gb = {m: round(spec.model_bytes(m) / 1e9, 3) for m in MODELS}  # tensor bytes of each checkpoint
    report = Report(command, facts, spec, input_gb, contenders, timings, disk.peak, disk.min_free)
    write_report(report)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
