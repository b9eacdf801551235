"""A run: `run_evolve` searches (or resumes) in a run directory, generation by generation, then reports.

Each generation: CMA-ES asks for genomes, they are decoded to recipes and scored (`run_generation`,
successive halving included), CMA-ES is told, and the checkpoint is written; see the `vlm_merge.evolve`
docstring for the run directory and for what a resume guarantees.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import EvolveConfig, as_config, config_inputs, load_config
from vlm_merge.evolve.fitness import Scored, check_data
from vlm_merge.evolve.genome import Genome, num_layers_of, recipe_sha256
from vlm_merge.evolve.report import held_out_report, progress_text, write_summary
from vlm_merge.evolve.rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    SCAFFOLD_DIR,
    RunLog,
    best_record,
    interrupted_text,
    load_checkpoint,
    ordered,
    read_log,
    write_atomic,
    write_checkpoint,
)
from vlm_merge.evolve.search import Search, sigint_deferred, subsets
from vlm_merge.evolve.workers import LocalPool, RayPool
from vlm_merge.io.outputs import clean_stale, output_error, prepare_output_dir, remove, side_path


@dataclass
class EvolveResult:
    """What `run_evolve` did: the run directory, the best record, the counters, the model and report it wrote."""

    out: Path
    best: dict | None  # the best log record
    generations: int
    evaluations: int
    finished: bool
    model: Path | None = None
    test: dict | None = None  # the held-out report (`test:` in the config)
    held_genes: dict[str, str] = field(default_factory=dict)  # genes left out of the search: why (`inert_genes`)


class EvolveInterrupted(VlmMergeError):
    """Ctrl-C during a run: the last generation's checkpoint is on disk."""


def run_evolve(
    config: EvolveConfig | dict | str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    write_model: bool = True,
    on_candidates: Callable[[Sequence[dict]], None] | None = None,
) -> EvolveResult:
    """Run (or with `resume=True` continue) an evolutionary merge into `out`; see the package docstring.

    `config` is an `EvolveConfig`, a mapping, or a YAML path; with `resume=True` it may be None-like
    (`out/config.yaml` is used) and if given must equal the saved one. `workers` overrides the config.
    The run's evaluators set torch's thread count to `threads:`; the caller's count is restored afterwards.
    `on_candidates` is called with each generation's candidate records once they are logged (run tracking).
    Without the `evolve` extra installed: the one-line error naming it, before anything else (Ray, which only
    `workers > 0` needs, is asked for by the Ray pool, so an in-process run, e.g. the demo's, goes without it).
    """
    from vlm_merge.engine import torch_threads
    from vlm_merge.extras import require_extra

    require_extra("evolve", "vlm_merge.evolve.run_evolve", unneeded=("ray",))

    with torch_threads(None):
        try:
            return _run_evolve(config, out, resume, force, progress, workers, write_model, on_candidates)
        except KeyboardInterrupt:
            raise EvolveInterrupted(interrupted_text(Path(out))) from None


def _run_evolve(config, out, resume: bool, force: bool, progress: bool, workers: int | None, write_model: bool,
                on_candidates: Callable[[Sequence[dict]], None] | None = None) -> EvolveResult:
    """`run_evolve` inside its thread-count guard: set up or resume the run directory, search, then report."""
    from tqdm.auto import tqdm

    out = Path(out)
    saved = out / CONFIG_FILE
    made = False  # whether this call created `out`
    aside = None  # with --force: the previous run, renamed beside `out` until this run is complete
    if resume:
        if not saved.exists():
            raise VlmMergeError(f"{out}: no {CONFIG_FILE}; not an evolve run directory to resume")
        prior = load_config(saved)
        if config is not None:
            cfg = as_config(config)
            if cfg.sha256() != prior.sha256():
                raise VlmMergeError(f"{out}: the config differs from the run's {CONFIG_FILE}; resume without a config or start a new run")
        cfg = prior
    else:
        cfg = as_config(config)
        prepare_output_dir(out, True, config_inputs(cfg, config))  # not an input, not the cwd, parent writable
        clean_stale(out.parent)
        if out.exists() and any(out.iterdir()):
            if not force:
                raise VlmMergeError(f"{out}: exists and is not empty; use --resume to continue it or --force to replace it")
            aside = side_path(out, "old")
            out.rename(aside)
        made = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(saved, cfg.to_yaml())
        except OSError as e:
            if made:
                remove(out)
            if aside is not None:
                aside.rename(out)
            raise output_error(out, e) or e from None
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})

    if cfg.space != "ps":  # a layer route (data-flow space)
        from vlm_merge.evolve.dfs import DfsGenome, with_ps_model

        try:
            cfg = with_ps_model(cfg, out, progress)  # a PS recipe merged once into the run directory
        except VlmMergeError:
            if not resume:
                _discard_new_run(out, made, aside)
            raise
        genome = DfsGenome.of(cfg)
    else:
        genome = Genome.of(cfg, num_layers_of(cfg))
    log_path, ckpt_path = out / LOG_FILE, out / CHECKPOINT_FILE
    state = load_checkpoint(ckpt_path, cfg) if resume and ckpt_path.exists() else None
    records = read_log(log_path)
    if state is not None:
        held = state["held_genes"]
        genome = genome.without(held)
        kept, leftover = records[: state["log_lines"]], records[state["log_lines"] :]
        gen, evals = state["generation"], state["evaluations"]
        finished = state["finished"]
        logged: dict[int, list] = {}
        for r in sorted(kept, key=lambda r: (r.get("generation"), r.get("index"))):  # log lines come as candidates finish
            logged.setdefault(r.get("generation"), []).append(r.get("x"))
        with sigint_deferred():
            es = Search.replay(cfg, genome.x0(), state["cma"], logged, str(ckpt_path))
    else:
        es, held = None, {}  # CMA-ES starts once the sources show which genes are inert
        kept, leftover, gen, evals, finished = [], records, 0, 0, False
    log = RunLog(log_path)
    log.rewrite(kept)
    reuse = {(r["generation"], r["index"]): r for r in leftover if r.get("generation") == gen + 1}
    records = kept

    scaffold = out / SCAFFOLD_DIR
    pool = test_questions = bar = None
    try:
        if not finished:
            try:
                questions, test_questions = check_data(cfg)
                qpool = [q.question_id for q in questions[1]]
                if not scaffold.exists():
                    from vlm_merge.engine import write_scaffold

                    write_scaffold(genome.decode(genome.x0()), scaffold)
                pool = (RayPool(cfg, scaffold, cfg.workers) if cfg.workers > 0  # each actor reads its own
                        else LocalPool(cfg, scaffold, questions))
                if es is None:
                    held = pool.inert_genes() if cfg.genome.drop_inert else {}
                    genome = genome.without(held)
                    if not genome.genes:
                        raise VlmMergeError(f"evolve config genome: all {len(held)} genes are inert (every model equals the base "
                                            "in every tensor they set); nothing to search: check sources.models and base_model")
                    es = Search(cfg, genome.x0())
            except VlmMergeError:
                if not resume:  # nothing was scored: leave no half-made run behind, so the fixed command reruns
                    _discard_new_run(out, made, aside)
                raise
        popsize = es.popsize
        total = max(popsize, (cfg.cmaes.max_evaluations // popsize) * popsize)
        bar = tqdm(total=total, initial=evals, unit="cand", desc="evolve", disable=not progress, dynamic_ncols=True)
        if held and progress and not gen:
            bar.write(f"evolve: {len(genome)} genes searched, {len(held)} held at x0 (they cannot change the merge; "
                      "summary.json lists them)")
        started = time.perf_counter()
        n_this_run = 0
        while not finished:
            with sigint_deferred():
                if evals + popsize > total or es.stop():
                    finished = True
                    stop = "budget" if evals + popsize > total else "cma: " + ", ".join(f"{k}={v}" for k, v in es.stop().items())
                    write_checkpoint(ckpt_path, es.state(), gen, evals, records, True, cfg, held, stop)
                    break
                xs = es.ask()
            gen_no = gen + 1
            recs = run_generation(cfg, genome, pool, xs, gen_no, evals, qpool, reuse, log)  # Ctrl-C stops it at once
            fresh = sum(1 for r in recs if not r.pop("reused", False))
            with sigint_deferred():  # the update and its checkpoint happen together or not at all
                es.tell(xs, [r.pop("_cma") for r in recs])
                records += recs
                gen, evals = gen_no, evals + len(recs)
                write_checkpoint(ckpt_path, es.state(), gen, evals, records, False, cfg, held)
            if on_candidates is not None:
                on_candidates(recs)
            n_this_run += fresh
            bar.update(len(recs))
            per = (time.perf_counter() - started) / n_this_run if n_this_run else None
            bar.set_postfix_str(progress_text(gen, evals, total, best_record(records), per))
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    best = best_record(records)
    stop = json.loads(ckpt_path.read_text()).get("stop") if ckpt_path.exists() else None
    model_dir = write_summary(cfg, genome, out, records, best, gen, evals, write_model, stop, held)
    test = None
    if cfg.test is not None and best is not None:
        if not scaffold.exists():
            from vlm_merge.engine import write_scaffold

            write_scaffold(genome.decode(genome.x0()), scaffold)
        test = held_out_report(cfg, out, genome.decode(best["x"]), scaffold, test_questions)
    shutil.rmtree(scaffold, ignore_errors=True)
    if aside is not None:
        remove(aside)  # the new run is complete
    return EvolveResult(out, best, gen, evals, True, model_dir, test, held)


def _discard_new_run(out: Path, made: bool, aside: Path | None) -> None:
    """Undo a new run that failed before scoring anything: its files go (and `out` itself if this run made it);
    with --force the previous run, renamed `aside`, comes back as it was."""
    for p in (out / CONFIG_FILE, out / LOG_FILE):
        p.unlink(missing_ok=True)
    shutil.rmtree(out / SCAFFOLD_DIR, ignore_errors=True)
    if made and not any(out.iterdir()):
        out.rmdir()
    if aside is not None:
        remove(out)
        aside.rename(out)


def run_generation(cfg: EvolveConfig, genome: Genome, pool: LocalPool | RayPool, xs: list[list[float]], gen_no: int, evals: int,
                   qpool: list[str], reuse: dict, log: RunLog) -> list[dict]:
    """Score generation `gen_no`'s genomes `xs` on `pool` and log each record (`RunLog.record`) as it is final.

    Returns the records in order, each with what CMA-ES is told under `_cma` (lower is better: minus the
    fitness, or with successive halving minus the rank by (rung reached, score)) and `reused: True` where a
    finished candidate of an interrupted run was taken from `reuse` (same generation, index and genome)."""
    recipes = [genome.decode(x) for x in xs]
    base = [{"generation": gen_no, "index": i, "evaluation": evals + i + 1, "x": x, "genes": genome.values(x),
             "recipe_sha256": recipe_sha256(r)} for i, (x, r) in enumerate(zip(xs, recipes))]
    rungs = subsets(cfg, qpool, gen_no)
    out: list[dict] = [None] * len(xs)  # type: ignore[list-item]
    todo = []
    for i, b in enumerate(base):
        old = reuse.get((gen_no, i))
        if old is not None and old["x"] == b["x"] and rungs_single(cfg):
            out[i] = {**old, "reused": True}
            log.record([out[i]])
        else:
            todo.append(i)
    if rungs is None or len(rungs) == 1:
        qids = None if rungs is None else rungs[0]
        # evaluated one at a time locally (each logged as it finishes), in one batch on Ray actors
        step = 1 if isinstance(pool, LocalPool) else max(1, len(todo))
        for s in range(0, len(todo), step):
            idx = todo[s : s + step]
            for i, sc in zip(idx, pool.map([(recipes[i].to_dict(), qids) for i in idx])):
                out[i] = {**base[i], **_scored(sc), "questions": sc.questions, "rung": 0, "final": True}
                log.record([out[i]])
        for r in out:
            r["_cma"] = -r["fitness"]
        return [_to_tell(r) for r in out]
    # successive halving over nested subsets
    alive = list(range(len(xs)))
    reached = {i: (0, cfg.fitness.penalty) for i in alive}
    last: dict[int, dict] = {}
    for rung, qids in enumerate(rungs):
        scored = pool.map([(recipes[i].to_dict(), qids) for i in alive])
        for i, sc in zip(alive, scored):
            last[i] = {**_scored(sc), "questions": sc.questions, "rung": rung, "final": rung == len(rungs) - 1}
            reached[i] = (rung if sc.error is None else -1, sc.fitness)
        if rung + 1 < len(rungs):
            ok = sorted((i for i in alive if last[i]["error"] is None), key=lambda i: (-last[i]["fitness"], i))
            alive = ok[: max(1, math.ceil(len(alive) / cfg.fitness.subset.eta))]
            if not alive:
                break
    order = sorted(range(len(xs)), key=lambda i: (reached[i][0], reached[i][1], -i))  # worst first
    rank = {i: pos for pos, i in enumerate(order)}
    for i in range(len(xs)):
        out[i] = {**base[i], **last[i], "_cma": -float(rank[i])}
    log.record(out)
    return [_to_tell(r) for r in out]


def _to_tell(record: dict) -> dict:
    """`record` as logged, and what the search loop takes off it: `_cma` (told to CMA-ES), `reused`."""
    return {**ordered(record), "_cma": record["_cma"], **({"reused": True} if record.get("reused") else {})}


def rungs_single(cfg: EvolveConfig) -> bool:
    """Whether a candidate is scored once (no successive halving): only then can a logged score be reused."""
    return cfg.fitness.subset.mode != "halving"


def _scored(sc: Scored) -> dict:
    """A candidate's result as the fields of its log record."""
    return {"fitness": sc.fitness, "scores": sc.scores, "merge_s": round(sc.merge_s, 6), "eval_s": round(sc.eval_s, 6), "error": sc.error}
