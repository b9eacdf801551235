"""Merge-method benchmark: vlm-merge vs mergekit 0.1.5 on ~1.1B-parameter LLMs and a base.

What is measured
    Wall time and peak RSS of `vlm-merge merge CONFIG` and `mergekit-yaml CONFIG` on the *same*
    mergekit YAML, method by method, side by side in one run, plus the machine's plain read+write
    rate (`floor`: read the three inputs once, write the output's bytes once). Throughput = GB of
    input read / wall second. Inputs are the Chat Vector benchmark's generated checkpoints
    (`bench/_work/`, TinyLlama shape, random weights). Each method's YAML is a row of `CASES`:
    `ties` / `dare_ties` merge ja_base and vlm_llm (weight 1.0, density 0.5) against en_base;
    the methods taken from mergekit 0.1.5 later (`--methods new`: nuslerp, multislerp, karcher,
    sce, arcee_fusion, nearswap, ram, ramplus_tl) merge the same two models with en_base as base
    where the method takes one (karcher: no base; arcee_fusion and nearswap: ja_base alone); bf16.

How
    As `bench.chat_vector`: each contender in a child process through `bench.measure` (wall =
    spawn..reap, peak RSS = `ru_maxrss`), the page cache warmed identically before each run, the
    share of CPU used by anything else recorded. TIES outputs are compared with a float32 reference
    computed here with `vlm_merge.methods` on sampled tensors (ours: bit-exact expected; mergekit:
    equal up to elements whose magnitudes tie at the density cut), and so are the other
    deterministic methods' (mergekit: equal up to bf16 rounding of float32 round-off). DARE masks
    are random in both (mergekit draws from torch's global RNG, we seed per tensor; our default
    rescale is the DARE paper's 1/p, mergekit's is L1-norm matching), so its outputs are checked
    for the changed fraction; so are arcee_fusion's (its quantiles are estimated from 1e6 random
    elements of tensors larger than that, drawn from different generators).

Usage: ``.venv/bin/python -m bench.merge_methods [--skip mergekit] [--methods ties,dare_ties|new|all] [--layers N]``
Results: ``bench/results/merge_methods.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import GiB, MachineFacts, dir_bytes, remove_dir, run_measured, warm_page_cache
from bench.inputs import MODELS, Inputs, InputSpec, ensure_inputs
from bench.presets import TINYLLAMA
from bench.mergekit_env import ensure_mergekit

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK = BENCH / "_work"
RESULTS = BENCH / "results"
DENSITY = 0.5
TARGETS = {"ties": 0.25}  # wall-time bound vs mergekit (issue 32: 0.5 for the others); RSS bound 0.5 for all
WALL_BOUND = 0.5
RSS_BOUND = 0.5


@dataclass(frozen=True)
class Case:
    """One method's merge: `base` (en_base as base_model), the merged `models` (input names), each
    model's `per_model` parameters, the shared `params`; `exact`: deterministic, so outputs are
    compared with the float32 reference."""

    base: bool
    models: tuple[str, ...]
    per_model: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    exact: bool = True


TWO = ("ja_base", "vlm_llm")
CASES = {
    "ties": Case(True, TWO, {"weight": 1.0, "density": DENSITY}),
    "dare_ties": Case(True, TWO, {"weight": 1.0, "density": DENSITY}, exact=False),
    "nuslerp": Case(True, TWO, {"weight": 0.5}),
    "multislerp": Case(True, TWO, {"weight": 0.5}),
    "karcher": Case(False, TWO),
    "sce": Case(True, TWO, params={"select_topk": 0.5}),
    "arcee_fusion": Case(True, ("ja_base",), exact=False),
    "nearswap": Case(True, ("ja_base",), params={"t": 0.001}),
    "ram": Case(True, TWO, params={"epsilon": 0.001}),
    "ramplus_tl": Case(True, TWO, params={"epsilon": 0.001}),
}
NEW = ("nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")


def sampled(layers: int) -> tuple[str, ...]:
    return ("model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight", "model.norm.weight")


@dataclass
class Result:
    name: str
    command: list[str]
    wall_s: float | None = None
    peak_rss: int | None = None
    others: float | None = None
    check: str = ""
    error: str = ""


@dataclass
class Report:
    command: str
    facts: dict
    input_bytes: int
    results: dict[str, Result] = field(default_factory=dict)

    def ratio(self, a: str, b: str, what: str) -> float | None:
        ra, rb = self.results.get(a), self.results.get(b)
        if not ra or not rb or getattr(ra, what) is None or not getattr(rb, what):
            return None
        return getattr(ra, what) / getattr(rb, what)


def config(inputs: Inputs, method: str, path: Path) -> Path:
    """The mergekit YAML of CASES[method] (flow mappings written as JSON, which YAML reads)."""
    case = CASES[method]
    lines = [f"merge_method: {method}"]
    if case.base:
        lines.append(f"base_model: {inputs.en_base}")
    lines.append("models:")
    for m in case.models:
        lines.append(f"  - model: {getattr(inputs, m)}")
        if case.per_model:
            lines.append(f"    parameters: {json.dumps(case.per_model)}")
    if case.params:
        lines.append(f"parameters: {json.dumps(case.params)}")
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(model_dir: Path, key: str) -> torch.Tensor:
    from vlm_merge.io.checkpoint import CheckpointReader

    with CheckpointReader(model_dir) as r:
        return r.get(key).clone()


def check(method: str, out_dir: Path, inputs: Inputs, layers: int) -> str:
    """Deterministic methods: the share of sampled elements equal to the float32 reference rounded
    to bf16. Random ones: the share of elements changed from the base (en_base)."""
    from vlm_merge.architecture.anatomy import inspect_checkpoint
    from vlm_merge.io.checkpoint import CheckpointReader
    from vlm_merge.methods import METHODS

    case, m = CASES[method], METHODS[method]
    notes = []
    with CheckpointReader(out_dir) as r:
        keys = inspect_checkpoint(r).lm_keys
        for canon in sampled(layers):
            got = r.get(keys[canon]).float()
            base = _load(inputs.en_base, canon)
            if case.exact:
                models = [_load(getattr(inputs, name), canon) for name in case.models]
                mp = [dict(case.per_model) for _ in models]
                want = m.merge(base if case.base else None, models, mp, case.params).to(torch.bfloat16).float()
                notes.append(f"{(got == want).float().mean().item():.4%} equal")
            else:
                changed = (got != base.float()).float().mean().item()
                notes.append(f"{changed:.2f} changed")
    return f"{method}: " + ", ".join(notes)


def run(name: str, cmd: list[str], out: Path, inputs: Inputs, nproc: int) -> Result:
    res = Result(name, cmd)
    remove_dir(out)
    warm_page_cache(inputs.all_dirs())
    child = run_measured(cmd, WORK / "logs" / f"{name}.log", cwd=REPO)
    if not child.ok:
        res.error = child.log_tail(400).strip()
        print(f"{name}: UNAVAILABLE (exit {child.returncode})", flush=True)
        return res
    res.wall_s, res.peak_rss, res.others = child.wall_s, child.peak_rss_bytes, child.others_load(nproc)
    print(f"{name}: {res.wall_s:.1f} s, peak RSS {res.peak_rss / GiB:.2f} GiB, others' CPU {100 * res.others:.0f}%", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench.merge_methods")
    p.add_argument("--methods", default="ties,dare_ties",
                   help=f"comma-separated, of {', '.join(CASES)}; 'new' = {','.join(NEW)}; 'all'")
    p.add_argument("--skip", default="", help="comma-separated: mergekit")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 22; 2 for a smoke run)")
    args = p.parse_args(argv)
    methods = {"new": list(NEW), "all": list(CASES)}.get(args.methods, args.methods.split(","))
    unknown = [m for m in methods if m not in CASES]
    if unknown:
        p.error(f"--methods: {', '.join(unknown)} not among {', '.join(CASES)}")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    preset = TINYLLAMA.with_layers(args.layers)
    command = shlex.join([".venv/bin/python", "-m", "bench.merge_methods", *argv])
    facts = MachineFacts.collect()
    print(f"$ {command}", flush=True)
    inputs = Inputs(WORK)
    ensure_inputs(inputs, InputSpec(preset), MODELS)
    llms = [inputs.en_base, inputs.ja_base, inputs.vlm_llm]
    report = Report(command, facts.as_dict(), sum(dir_bytes(d) for d in llms))
    py = sys.executable
    out = WORK / "out_methods"
    report.results["floor"] = run("floor", [py, "-m", "bench.workers", "floor", "--inputs", *map(str, llms),
                                            "--like", str(inputs.en_base), "--out", str(out)], out, inputs, facts.nproc)
    mergekit = None if "mergekit" in args.skip else ensure_mergekit(BENCH / ".venv-mergekit")
    for method in methods:
        cfg = config(inputs, method, WORK / f"{method}.yml")
        ours = run(f"vlm-merge {method}", [str(REPO / ".venv/bin/vlm-merge"), "merge", str(cfg), str(out), "--force", "--quiet"], out, inputs, facts.nproc)
        if ours.wall_s is not None:
            ours.check = check(method, out, inputs, preset.llama.layers)
        report.results[ours.name] = ours
        if mergekit is not None:
            mk = run(f"mergekit {method}", [str(mergekit.mergekit_yaml), str(cfg), str(out), "--no-copy-tokenizer"], out, inputs, facts.nproc)
            if mk.wall_s is not None:
                mk.check = check(method, out, inputs, preset.llama.layers)
            report.results[mk.name] = mk
        remove_dir(out)
    lines = render(report)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_methods.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "merge_methods.json").write_text(json.dumps({
        "command": command, "machine": report.facts, "input_bytes": report.input_bytes,
        "results": {k: vars(v) for k, v in report.results.items()},
    }, indent=2, default=str) + "\n")
    return 0


def render(report: Report) -> list[str]:
    floor = report.results["floor"]
    gb = report.input_bytes / 1e9
    rows = ["| contender | wall s | peak RSS GiB | input GB/s | wall / mergekit | RSS / mergekit | others' CPU | check |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in report.results.items():
        method = name.split()[-1]
        mk = f"mergekit {method}"
        wr, rr = report.ratio(name, mk, "wall_s"), report.ratio(name, mk, "peak_rss")
        rows.append(
            f"| {name} | {_f(r.wall_s, '.1f')} | {_f(r.peak_rss and r.peak_rss / GiB, '.2f')} | "
            f"{_f(r.wall_s and gb / r.wall_s, '.2f')} | {_f(wr, '.2f', 'x')} | {_f(rr, '.2f', 'x')} | "
            f"{_f(r.others and 100 * r.others, '.0f', '%')} | {r.check or r.error[:80]} |"
        )
    lines = [
        "# Merge-method benchmark",
        "",
        f"~1.1B-parameter bf16 Llama LLMs (ja_base, vlm_llm; en_base the base) merged per `bench.merge_methods.CASES` "
        f"(ties / dare_ties: density {DENSITY}, weight 1.0); {gb:.1f} GB of input (en_base, ja_base, vlm_llm). "
        f"Command: `{report.command}`",
        f"Machine: {report.facts.get('nproc')} CPUs, {report.facts.get('ram_total_gib')} GiB; floor = the machine's plain "
        f"read of the inputs + write of one output: {_f(floor.wall_s and gb / floor.wall_s, '.2f')} GB/s of input.",
        "",
        *rows,
        "",
    ]
    methods = sorted({name.split()[-1] for name in report.results if name != "floor"}, key=list(CASES).index)
    for method in methods:
        bound = TARGETS.get(method, WALL_BOUND)
        wr = report.ratio(f"vlm-merge {method}", f"mergekit {method}", "wall_s")
        rr = report.ratio(f"vlm-merge {method}", f"mergekit {method}", "peak_rss")
        for what, ratio, b in (("wall", wr, bound), ("peak RSS", rr, RSS_BOUND)):
            verdict = "n/a " if ratio is None else ("PASS" if ratio <= b else "FAIL")
            lines.append(f"- {verdict} {method} {what} <= {b}x mergekit: {_f(ratio, '.2f', 'x')}")
    return lines


def _f(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


if __name__ == "__main__":
    raise SystemExit(main())
