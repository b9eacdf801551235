"""What a run reports: `summary.json` and `best_recipe.yaml` (and the best model), the fitness plot, and the
held-out report (`test:`): the best recipe against Chat Vector and two controls on a test split.
"""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import DEFAULT_BOUNDS, EvolveConfig, GenomeConfig, held_out_fitness
from vlm_merge.evolve.fitness import Evaluator, fitness_questions, generation_text
from vlm_merge.evolve.genome import Genome
from vlm_merge.evolve.rundir import BEST_RECIPE_FILE, MODEL_DIR, PLOT_FILE, SUMMARY_FILE, write_atomic
from vlm_merge.recipe import VLM_REF, Recipe, SlicesRecipe


def progress_text(gen: int, evals: int, total: int, best: dict | None, per_cand: float | None) -> str:
    """The progress bar's postfix: generation, evaluations, best fitness, seconds per candidate."""
    b = f"{best['fitness']:.4g}" if best else "-"
    s = f"{per_cand:.2f}s/cand" if per_cand is not None else "-"
    return f"gen {gen} | evals {evals}/{total} | best {b} | {s}"


def protocol_text(config: EvolveConfig) -> str:
    """How candidates are scored under `config` (what is summed, on which questions, the penalty), in words."""
    f, sub = config.fitness, config.fitness.subset
    what = "mean answer log-likelihood (teacher forcing)" if f.kind == "loglik" else " + ".join(f"{w:g}*{c}" for c, w in f.metrics.items())
    if sub.mode == "random":
        how = f"each generation scored on {sub.size} questions drawn by numpy default_rng([seed, generation])"
    elif sub.mode == "halving":
        how = (f"successive halving: all on {sub.size} questions, the best 1/{sub.eta} on x{sub.eta} more, ... up to every "
               f"question (nested draws of default_rng([seed, generation])); CMA-ES ranks by (rung, score)")
    else:
        how = "every candidate scored on every question"
    return f"{what}; {how}; failures score {f.penalty:g}"


def write_summary(cfg: EvolveConfig, genome: Genome, out: Path, records: list[dict], best: dict | None, gen: int, evals: int,
            write_model: bool, stop: str | None, held: Mapping[str, str]) -> Path | None:
    """Write `summary.json`, the fitness plot and `best_recipe.yaml`, and (`write_model`) merge the best model into
    `model/`; returns that directory (None without a best candidate or model)."""
    import vlm_merge

    summary = {
        "generations": gen, "evaluations": evals, "genes": len(genome), "gene_names": [g.name for g in genome.genes],
        "held_genes": {g.name: {"value": g.decode(v), "why": held.get(g.name, "")} for g, v in genome.held},
        "protocol": protocol_text(cfg), "stopped_by": stop, "failed": sum(1 for r in records if r["error"]),
        "merge_s_mean": float(np.mean([r["merge_s"] for r in records])) if records else None,
        "eval_s_mean": float(np.mean([r["eval_s"] for r in records])) if records else None,
        "best": best, "version": vlm_merge.__version__,
    }
    plot_fitness(records, out / PLOT_FILE)
    model_dir = None
    if best is not None:
        recipe = genome.decode(best["x"])
        write_atomic(out / BEST_RECIPE_FILE, f"# vlm-merge evolve: best of {evals} candidates, fitness {best['fitness']:.6g}\n" + recipe.to_yaml())
        if write_model:
            from vlm_merge.engine import merge

            model_dir = merge(out / BEST_RECIPE_FILE, out / MODEL_DIR, force=True, progress=False)
    write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return model_dir


TEST_REPORT_MD, TEST_REPORT_JSON, TEST_PREDICTIONS_DIR = "test_report.md", "test_report.json", "test_predictions"


def chat_vector_recipe(cfg: EvolveConfig, scale: float) -> Recipe:
    """`chat_vector.chat_vector_recipe` at `scale` on this run's sources (scale 0: the target in the VLM shell),
    with the run's tokenizer source and recipe seed so the resident merger accepts it."""
    from vlm_merge.recipe.presets import chat_vector_recipe as cv_recipe
    from vlm_merge.recipe.presets import make_scales

    s = cfg.sources
    return replace(cv_recipe(s.vlm, s.base_model, s.target, make_scales(scale), dtype=cfg.dtype),
                   tokenizer_source=s.tokenizer_source, seed=cfg.recipe_seed)


def held_out_report(cfg: EvolveConfig, out: Path, best_recipe: Recipe | SlicesRecipe, scaffold: Path, questions=None) -> dict:
    """Score the best recipe, Chat Vector (`test.chat_vector_scale`), the target in the VLM shell (scale 0)
    and the VLM itself on the `test:` split with the fitness protocol (generated answers), and compare the
    best with each by a paired bootstrap over questions. Writes `test_report.{md,json}` and per-model
    predictions with per-question scores (`test_predictions/<model>.jsonl`, re-scorable). `questions`: the
    `test:` benchmark and pool if already read (`check_data`), else they are read here."""
    import gc

    from eval.metrics import bootstrap_aggregate, paired_bootstrap
    from eval.outputs import jsonl

    t = cfg.test
    assert t is not None
    test_fit = held_out_fitness(cfg)
    runs: list[tuple[str, str, EvolveConfig, Recipe | SlicesRecipe | None]] = [
        ("evolved", "the best recipe of the search", cfg.model_copy(update={"fitness": test_fit}), best_recipe),
        ("chat-vector", f"Chat Vector, scale {t.chat_vector_scale:g}: target + scale * (vlm - base_model)",
         cfg.model_copy(update={"fitness": test_fit, "method": "task_arithmetic",
                               "sources": cfg.sources.model_copy(update={"models": (VLM_REF,)}), "space": "ps", "dfs": None,
                               "genome": GenomeConfig(params={"weight": DEFAULT_BOUNDS["weight"]})}), chat_vector_recipe(cfg, t.chat_vector_scale)),
        ("target-shell", "control: the target language model in the VLM shell (Chat Vector scale 0)", None, chat_vector_recipe(cfg, 0.0)),
        ("vlm", "control: the VLM as it is", None, None),
    ]
    questions = questions or fitness_questions(test_fit, "test.metric")  # read once, shared by the Evaluators
    per_question: dict[str, list[dict]] = {}
    ev = None
    for name, _, run_cfg, recipe in runs:
        if run_cfg is not None or recipe is None:  # a new method / source structure, or the VLM itself
            ev = None  # free the previous live model first
            gc.collect()
            ev = (Evaluator(run_cfg, scaffold, questions=questions) if recipe is not None
                  else Evaluator(cfg.model_copy(update={"fitness": test_fit}), cfg.sources.vlm, resident=False, questions=questions))
        if recipe is not None:
            ev.merger.apply(recipe)
        per_question[name] = ev.generate(ev.pool).predictions
    ev = None
    gc.collect()
    scores = {n: np.array([r[t.metric] for r in rows], dtype=np.float64) for n, rows in per_question.items()}
    ids = [r["question_id"] for r in per_question["evolved"]]
    if any([r["question_id"] for r in rows] != ids for rows in per_question.values()):
        raise VlmMergeError("held-out report: the models were scored on different questions")
    rec = {
        "metric": t.metric, "questions": len(ids), "benchmark": t.benchmark, "data": t.data, "split": t.split,
        "protocol": generation_text(test_fit),
        "models": {n: {"description": d, **bootstrap_aggregate(scores[n]).as_dict()} for n, d, _, _ in runs},
        "evolved_vs": {n: paired_bootstrap(scores["evolved"], scores[n]) for n, *_ in runs if n != "evolved"},
    }
    (out / TEST_PREDICTIONS_DIR).mkdir(exist_ok=True)
    for n, rows in per_question.items():
        write_atomic(out / TEST_PREDICTIONS_DIR / f"{n}.jsonl", jsonl(rows))
    write_atomic(out / TEST_REPORT_JSON, json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Held-out report: {t.benchmark}" + (f" ({t.split})" if t.split else ""), "",
             f"{len(ids)} questions, score `{t.metric}` per question, 95% bootstrap intervals (1000 resamples, seed 0). "
             f"Protocol: {rec['protocol']}.", "",
             "| model | what | mean | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {n} | {m['description']} | {m['mean']:.4f} | [{m['low']:.4f}, {m['high']:.4f}] |" for n, m in rec["models"].items()]
    lines += ["", "| evolved minus | difference | 95% paired CI | CI excludes 0 |", "|---|---|---|---|"]
    lines += [f"| {n} | {d['diff']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {'yes' if d['excludes_zero'] else 'no'} |"
              for n, d in rec["evolved_vs"].items()]
    write_atomic(out / TEST_REPORT_MD, "\n".join(lines) + "\n")
    return rec


def plot_fitness(records: Sequence[dict], path: Path, references: Mapping[str, float] | None = None) -> None:
    """Population fitness (dots; failures as x at the bottom) and best so far over evaluations.

    `references` (label -> fitness) are drawn as dashed horizontal lines, e.g. a hand-tuned merge's
    score on the same fitness questions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [r for r in records if r["error"] is None]
    ax.scatter([r["evaluation"] for r in ok], [r["fitness"] for r in ok], s=12, alpha=0.6,
               c=[r.get("rung", 0) for r in ok], cmap="viridis", label="candidates")
    bad = [r for r in records if r["error"] is not None]
    if ok and bad:
        low = min(r["fitness"] for r in ok)
        ax.scatter([r["evaluation"] for r in bad], [low] * len(bad), marker="x", color="red", label="failed (penalised)")
    xs, ys, best = [], [], None
    for r in records:
        if r["error"] is None and r["final"] and (best is None or r["fitness"] > best):
            best = r["fitness"]
        if best is not None:
            xs.append(r["evaluation"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best so far")
    for (label, value), colour in zip((references or {}).items(), ("tab:orange", "tab:green", "tab:purple", "tab:brown")):
        ax.axhline(value, ls="--", lw=1, color=colour, label=label)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
