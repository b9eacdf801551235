"""The #31 report on the miniature zoo: passthrough stacking, DFS, PS+DFS, evolved PS and Chat Vector beside
the controls (target shell, VLM), on ja-test, pooled over seeds with paired bootstrap CIs.

    python research/dfs/four_seeds.py configs OUT --seeds 0 1 2 3    # OUT/configs/{ps,dfs,psdfs}-s<seed>.yaml
    vlm-merge evolve OUT/configs/ps-s0.yaml --out OUT/runs/ps-s0 ...    # (RESULTS.md: the exact loop)
    python research/dfs/four_seeds.py controls OUT                     # Chat Vector 0.75, target shell, passthrough
    python research/dfs/four_seeds.py evaluate OUT --limit 500         # every model on ja-test -> OUT/scores/*.jsonl
    python research/dfs/four_seeds.py dev-fitness OUT                  # the search fitness of the fixed models
    python research/dfs/four_seeds.py report OUT --json research/dfs/four_seeds.json --png research/dfs/four_seeds.png

Search settings (`SEARCH`, the defaults of `configs`; OUT/search.json records those used): loglik
fitness (or `--fitness generate`: content accuracy of greedy answers) on the first `limit` ja-dev questions, CMA-ES popsize 8,
`max_evaluations` candidates, sigma0 0.15, 1 torch thread. PS is task arithmetic with one weight per layer
(+ embeddings, norms, lm_head), x0 = 0.75 (R3 of research/miniature-world); DFS is research/dfs/dfs-zoo.yaml's
genome (pool ja-base + VLM LM, r = 2, W per transition in [0.5, 1.5], depth <= 12); PS+DFS pools ja-base and
the evolved PS model of the same seed (`dfs.ps_model`: that run's best_recipe.yaml, merged once by the run).
Test: greedy generation under the llm-jp protocol, at most 24 new tokens, content accuracy per question.
Pooling: a method searched with several seeds scores each question by its mean over seeds; CIs are 95%
bootstrap intervals over questions (1000 resamples, seed 0), differences paired on the same questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "assets" / "miniature-zoo"
SOURCES = {"vlm": str(ZOO / "en-vlm"), "base_model": str(ZOO / "en-base"), "target": str(ZOO / "ja-base"), "models": ["vlm"]}
SEARCH = {"fitness": "loglik", "limit": 300, "popsize": 8, "max_evaluations": 64, "sigma0": 0.15}
FITNESS_METRICS = {"loglik": {"loglik": 1.0}, "generate": {"content_accuracy": 1.0}}  # `configs --fitness`: kind -> metrics
TEST = {"benchmark": str(ZOO / "data" / "ja-test.jsonl"), "max_new_tokens": 24}
CHAT_VECTOR_SCALE = 0.75
SEARCHED = ("ps", "dfs", "psdfs")  # run names: <name>-s<seed>
CONTROLS = ("passthrough", "chat-vector", "target-shell", "vlm")
# hand-written routes (unit scales, edges from ja-base) that probe the DFS space: J = ja-base layer, V = VLM LM layer
PROBES = {"route-V0J1J2J3": (("vlm", 0), ("J", 1), ("J", 2), ("J", 3)), "route-J0V0V1J2J3": (("J", 0), ("vlm", 0), ("vlm", 1), ("J", 2), ("J", 3)),
          "route-V0V1J2J3": (("vlm", 0), ("vlm", 1), ("J", 2), ("J", 3))}
EXTRA_PAIRS = (("psdfs", "ps"), ("dfs", "passthrough"), ("psdfs", "dfs"), ("ps", "chat-vector"))  # also reported, paired
ROWS = {  # report order: name -> description
    "passthrough": "passthrough frankenmerge: ja-base layers 0-2 + VLM LM layers 1-3 (6 layers), edges from ja-base",
    "dfs": "DFS (evolved): pool ja-base + VLM LM, r = 2, W per transition, depth <= 12",
    "psdfs": "PS+DFS (evolved): pool ja-base + the same seed's evolved PS model",
    "ps": "evolved PS: task arithmetic, a weight per layer (+ embeddings, norms, lm_head)",
    "chat-vector": f"Chat Vector {CHAT_VECTOR_SCALE:g}",
    "target-shell": "control: ja-base in the VLM shell (Chat Vector 0)",
    **{name: f"probe: the fixed route {name.removeprefix('route-')} (unit scales), inside the DFS space" for name in PROBES},
    "vlm": "control: the English VLM as it is",
}


def _fitness(limit: int | None, kind: str = "loglik") -> dict:
    return {"benchmark": str(ZOO / "data" / "ja-dev.jsonl"), "kind": kind, "protocol": "llm-jp",
            "max_new_tokens": TEST["max_new_tokens"], "metrics": FITNESS_METRICS[kind], "limit": limit, "batch_size": 64}


def search_configs(seed: int, runs: Path, search: dict) -> dict[str, dict]:
    """The three searches of one seed (PS+DFS reads the PS run's best_recipe.yaml under `runs`)."""
    cma = {"popsize": search["popsize"], "max_evaluations": search["max_evaluations"], "seed": seed, "sigma0": search["sigma0"]}
    common = {"sources": SOURCES, "fitness": _fitness(search["limit"], search.get("fitness", "loglik")), "threads": 1}
    dfs = {"repeats": 2, "scales": "transition", "scale_bounds": [0.5, 1.5], "max_depth": 12}
    return {
        "ps": {**common, "method": "task_arithmetic",
               "genome": {"params": {"weight": [0.0, 1.5]}, "layer_granularity": 1, "separate": ["embeddings", "norms", "lm_head"]},
               "cmaes": {**cma, "x0": {"weight": CHAT_VECTOR_SCALE}}},
        "dfs": {**common, "space": "dfs", "dfs": {"pool": ["target", "vlm"], **dfs, "init": "target"}, "cmaes": cma},
        "psdfs": {**common, "space": "ps+dfs", "cmaes": cma,
                  "dfs": {"pool": ["target", "ps"], "ps_model": str(runs / f"ps-s{seed}" / "best_recipe.yaml"), **dfs, "init": "ps"}},
    }


def cmd_configs(out: Path, seeds: list[int], search: dict) -> None:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(search) + "\n")
    for seed in seeds:
        for name, cfg in search_configs(seed, (out / "runs").resolve(), search).items():
            (out / "configs" / f"{name}-s{seed}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def cmd_controls(out: Path) -> None:
    """Chat Vector 0.75, the target shell (scale 0), the passthrough frankenmerge and the `PROBES` routes, merged
    to OUT/models."""
    from vlm_merge.engine.merge import merge
    from vlm_merge.engine.stacking import DfsRoute, dfs_slices_recipe
    from vlm_merge.recipe.presets import chat_vector_recipe, make_scales

    s = SOURCES
    recipes = {
        "chat-vector": chat_vector_recipe(s["vlm"], s["base_model"], s["target"], make_scales(CHAT_VECTOR_SCALE)),
        "target-shell": chat_vector_recipe(s["vlm"], s["base_model"], s["target"], make_scales(0.0)),
        "passthrough": dfs_slices_recipe(DfsRoute(((s["target"], 0), (s["target"], 1), (s["target"], 2), ("vlm", 1), ("vlm", 2),
                                                   ("vlm", 3)), (1.0,) * 6), edges_from=s["target"], vlm=s["vlm"],
                                         tokenizer_source=s["target"]),
    }
    for name, route in PROBES.items():
        layers = tuple((s["target"] if role == "J" else role, i) for role, i in route)
        recipes[name] = dfs_slices_recipe(DfsRoute(layers, (1.0,) * len(layers)), edges_from=s["target"], vlm=s["vlm"],
                                          tokenizer_source=s["target"])
    for name, recipe in recipes.items():
        if not (out / "models" / name).exists():
            merge(recipe, out / "models" / name, progress=False)


def _models(out: Path) -> dict[str, Path]:
    """Every model to score: name (row or row-s<seed>) -> directory."""
    found = {name: out / "models" / name for name in (*CONTROLS, *PROBES) if (out / "models" / name).exists()}
    found["vlm"] = Path(SOURCES["vlm"])
    for run in sorted((out / "runs").glob("*-s*")):
        if (run / "model" / "config.json").exists():
            found[run.name] = run / "model"
    return found


def cmd_evaluate(out: Path, limit: int | None) -> None:
    """Score each model not yet scored: OUT/scores/<name>.jsonl, one line per question."""
    from vlm_merge.evolve import config_from_dict
    from vlm_merge.evolve.fitness import Evaluator, fitness_questions

    cfg = config_from_dict({"sources": SOURCES, "fitness": {**_fitness(limit), "benchmark": TEST["benchmark"], "kind": "generate",
                                                           "metrics": {"content_accuracy": 1.0}}, "threads": 1})
    questions = fitness_questions(cfg.fitness)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    for name, path in _models(out).items():
        dest = out / "scores" / f"{name}.jsonl"
        if dest.exists():
            continue
        ev = Evaluator(cfg, path, resident=False, questions=questions)
        rows = ev.generate(ev.pool).predictions
        tmp = dest.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"question_id": r["question_id"], "prediction": r["prediction"],
                                           "content_accuracy": r["content_accuracy"]}, ensure_ascii=False) + "\n" for r in rows))
        tmp.rename(dest)
        print(f"{name}: {np.mean([r['content_accuracy'] for r in rows]):.4f} on {len(rows)} questions", flush=True)


def cmd_dev_fitness(out: Path) -> None:
    """The search fitness (on the first `limit` ja-dev questions: mean answer log-likelihood, or content accuracy
    of greedy answers) of the fixed models: what a search compares its candidates with. OUT/dev_fitness.json."""
    from vlm_merge.evolve import config_from_dict
    from vlm_merge.evolve.fitness import Evaluator, fitness_questions

    search = json.loads((out / "search.json").read_text())
    kind = search.get("fitness", "loglik")
    cfg = config_from_dict({"sources": SOURCES, "fitness": _fitness(search["limit"], kind), "threads": 1})
    questions = fitness_questions(cfg.fitness)
    res = {}
    for name in (*CONTROLS, *PROBES):
        path = Path(SOURCES["vlm"]) if name == "vlm" else out / "models" / name
        ev = Evaluator(cfg, path, resident=False, questions=questions)
        res[name] = float(np.mean(ev.loglik(ev.pool, ev.encoded, cfg.fitness.batch_size)) if kind == "loglik"
                          else ev.generate(ev.pool).scores["content_accuracy"].mean)
    (out / "dev_fitness.json").write_text(json.dumps(res, indent=2) + "\n")
    print(res)


def _scores(out: Path) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """Question ids and, per row, per seed ("" for a control), the per-question scores."""
    ids, table = None, {}
    for f in sorted((out / "scores").glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        qid = [r["question_id"] for r in rows]
        if ids is not None and qid != ids:
            raise SystemExit(f"{f}: scored on other questions than the rest")
        ids = qid
        row, _, seed = f.stem.partition("-s") if f.stem.split("-s")[0] in SEARCHED else (f.stem, "", "")
        table.setdefault(row, {})[seed] = np.array([r["content_accuracy"] for r in rows], dtype=np.float64)
    return ids or [], table


def route_text(run: Path) -> str:
    """A DFS run's best route: J = a ja-base layer, V = a VLM LM layer (P: the PS model's, in PS+DFS), with the
    scale c the hidden state entering it is multiplied by (the recipe folds 1 / c into o_proj / down_proj)."""
    recipe = yaml.safe_load((run / "best_recipe.yaml").read_text())
    vlm = "P" if run.name.startswith("psdfs") else "V"
    parts = []
    for sl in recipe["slices"]:
        src = sl["sources"][0]
        scale = (sl.get("parameters") or {}).get("scale")
        c = 1.0 / scale[0]["value"] if scale else 1.0
        parts.append(f"{vlm if src['model'] == 'vlm' else 'J'}{src['layer_range'][0]}" + (f"({c:.2f})" if abs(c - 1) > 0.005 else ""))
    return " ".join(parts)


def runs_summary(out: Path) -> list[dict]:
    """Per search run: best dev fitness, evaluations, wall time of its search (logs/wall.txt), mean per-candidate
    switch (merge_s) and evaluation seconds, the best route (DFS) or gene values (PS)."""
    walls = {}
    if (out / "logs" / "wall.txt").exists():
        walls = {k: v for k, v, _ in (line.split() for line in (out / "logs" / "wall.txt").read_text().splitlines())}
    rows = []
    for run in sorted(r for r in (out / "runs").glob("*-s*") if (r / "summary.json").exists()):
        summ = json.loads((run / "summary.json").read_text())
        best = summ["best"]
        what = route_text(run) if run.name.startswith(("dfs", "psdfs")) else \
            ", ".join(f"{k.split('@')[-1]}={v:.2f}" for k, v in best["genes"].items())
        rows.append({"run": run.name, "dev_fitness": best["fitness"], "evaluations": summ["evaluations"],
                     "wall_s": walls.get(run.name), "merge_s_mean": summ["merge_s_mean"], "eval_s_mean": summ["eval_s_mean"],
                     "best": what})
    return rows


def cmd_report(out: Path, json_path: Path | None, png: Path | None) -> None:
    from eval.metrics import bootstrap_aggregate, paired_bootstrap

    ids, table = _scores(out)
    pooled = {row: np.mean(list(by_seed.values()), axis=0) for row, by_seed in table.items()}
    rec = {"questions": len(ids), "search": json.loads((out / "search.json").read_text()), "test": TEST, "rows": {}}
    lines = ["| model | seeds | mean (pooled) | 95% CI | per seed | vs Chat Vector (paired) | vs target shell (paired) |",
             "|---|---|---|---|---|---|---|"]
    for row, desc in ROWS.items():
        if row not in pooled:
            continue
        agg = bootstrap_aggregate(pooled[row]).as_dict()
        vs = {ref: paired_bootstrap(pooled[row], pooled[ref]) for ref in ("chat-vector", "target-shell") if ref in pooled and ref != row}
        seeds = {s: float(v.mean()) for s, v in sorted(table[row].items())}
        rec["rows"][row] = {"description": desc, **agg, "per_seed": seeds, "vs": vs}
        fmt = lambda d: f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"  # noqa: E731
        lines.append(f"| {desc} | {','.join(seeds) if seeds.keys() != {''} else '-'} | {agg['mean']:.3f} | "
                     f"[{agg['low']:.3f}, {agg['high']:.3f}] | {' / '.join(f'{v:.3f}' for v in seeds.values()) if len(seeds) > 1 else ''} | "
                     f"{fmt(vs['chat-vector']) if 'chat-vector' in vs else ''} | {fmt(vs['target-shell']) if 'target-shell' in vs else ''} |")
    pairs = [(a, b) for a, b in EXTRA_PAIRS if a in pooled and b in pooled]
    rec["pairs"] = {f"{a} - {b}": paired_bootstrap(pooled[a], pooled[b]) for a, b in pairs}
    lines += ["", "| paired difference (pooled) | diff | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] |" for k, d in rec["pairs"].items()]
    if (out / "dev_fitness.json").exists():
        rec["dev_fitness"] = json.loads((out / "dev_fitness.json").read_text())
        lines += ["", f"dev fitness ({rec['search'].get('fitness', 'loglik')}) of the fixed models: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in rec["dev_fitness"].items())]
    rec["runs"] = runs_summary(out)
    lines += ["", "| run | dev fitness (best) | evaluations | search wall s | switch ms | eval s / cand | best |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['dev_fitness']:.4f} | {r['evaluations']} | {r['wall_s'] or ''} | {1000 * r['merge_s_mean']:.2f} | "
              f"{r['eval_s_mean']:.2f} | {r['best']} |" for r in rec["runs"]]
    print("\n".join(lines))
    if json_path is not None:
        json_path.write_text(json.dumps(rec, indent=2) + "\n")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(rec["rows"])
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for i, row in enumerate(rows):
            r = rec["rows"][row]
            ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], fmt="o", color="C0", capsize=3)
            for v in r["per_seed"].values():
                ax.plot(v, i, "x", color="C1", ms=5) if len(r["per_seed"]) > 1 else None
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlabel(f"ja-test content accuracy ({len(ids)} questions; dot: pooled mean, 95% CI; x: one seed)")
        fig.tight_layout()
        fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("configs")
    c.add_argument("out", type=Path)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    c.add_argument("--evaluations", type=int, default=SEARCH["max_evaluations"])
    c.add_argument("--limit", type=int, default=SEARCH["limit"], help="ja-dev questions of the fitness")
    c.add_argument("--fitness", choices=list(FITNESS_METRICS), default=SEARCH["fitness"],
                   help="loglik: answer log-likelihood; generate: content accuracy of greedy answers")
    sub.add_parser("controls").add_argument("out", type=Path)
    sub.add_parser("dev-fitness").add_argument("out", type=Path)
    e = sub.add_parser("evaluate")
    e.add_argument("out", type=Path)
    e.add_argument("--limit", type=int, default=None)
    r = sub.add_parser("report")
    r.add_argument("out", type=Path)
    r.add_argument("--json", type=Path)
    r.add_argument("--png", type=Path)
    a = ap.parse_args()
    if a.cmd == "configs":
        cmd_configs(a.out, a.seeds, {**SEARCH, "max_evaluations": a.evaluations, "limit": a.limit, "fitness": a.fitness})
    elif a.cmd == "controls":
        cmd_controls(a.out)
    elif a.cmd == "dev-fitness":
        cmd_dev_fitness(a.out)
    elif a.cmd == "evaluate":
        cmd_evaluate(a.out, a.limit)
    else:
        cmd_report(a.out, a.json, a.png)


if __name__ == "__main__":
    main()
