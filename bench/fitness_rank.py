"""How well the cheap log-likelihood fitness ranks merge candidates, against generated-answer accuracy.

``python -m bench.fitness_rank [--zoo assets/miniature-zoo] [--candidates 24] [--questions 300]``

On the miniature world: `--candidates` random genomes of the search `vlm-merge evolve` runs there
(task_arithmetic of the English VLM's delta onto the Japanese base, one weight per layer plus one for
embeddings/lm_head, each uniform in [0, 1.5]) are each scored on the Japanese dev set twice, in the
same process with resident merging and cached image features:

- ``loglik``: mean per-token log-likelihood of the reference answers under teacher forcing
  (`fitness.kind: loglik`, one forward pass per batch);
- ``generate``: greedy answers (llm-jp protocol, chat template, 24 new tokens) scored by content
  accuracy (the asked attribute named in Japanese: `vlm_merge.world.scenes.content_correct`) and by
  exact match.

Reported: Spearman and Kendall rank correlations of loglik with each accuracy over the candidates,
whether both pick the same best candidate, and the mean evaluation seconds per candidate of each
(merge time excluded). Results: ``bench/results/fitness_rank.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import MachineFacts
from vlm_merge.evolve import Evaluator, Genome, config_from_dict, num_layers_of
from vlm_merge.engine.resident import write_scaffold
from vlm_merge.world import datasets, scenes

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    return float((da * db).sum() / np.sqrt((da != 0).sum() * (db != 0).sum()))


def world_config(zoo: Path, data: Path, kind: str, questions: int) -> dict:
    metrics = {"loglik": 1.0} if kind == "loglik" else {"exact_match": 1.0}
    return {
        "sources": {"vlm": str(zoo / "en-vlm"), "base_model": str(zoo / "en-base"), "target": str(zoo / "ja-base"),
                    "models": ["vlm"]},
        "method": "task_arithmetic",
        "genome": {"params": {"weight": [0.0, 1.5]}, "separate": ["embeddings"]},
        "fitness": {"benchmark": str(data), "kind": kind, "metrics": metrics, "limit": questions, "max_new_tokens": 24,
                    "batch_size": 64},
        "cmaes": {"popsize": 4, "max_evaluations": 4, "seed": 0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "assets" / "miniature-zoo"))
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    meta = json.loads((zoo / "zoo.json").read_text())
    data = zoo / meta["data"]["ja-dev"]
    rows = {str(r["question_id"]): r for r in datasets.read_rows(data)}
    gen_cfg = config_from_dict(world_config(zoo, data, "generate", args.questions))
    ll_cfg = config_from_dict(world_config(zoo, data, "loglik", args.questions))
    genome = Genome.of(gen_cfg, num_layers_of(gen_cfg))
    rng = random.Random(args.seed)
    xs = [[rng.random() for _ in range(len(genome))] for _ in range(args.candidates)]
    with tempfile.TemporaryDirectory(prefix="bench-fitness-") as work:
        write_scaffold(genome.decode(genome.x0()), Path(work) / "scaffold")
        gen_ev = Evaluator(gen_cfg, Path(work) / "scaffold")
        ll_ev = Evaluator(ll_cfg, Path(work) / "scaffold")
        records = []
        for i, x in enumerate(xs):
            recipe = genome.decode(x)
            ll = ll_ev.score(recipe)
            t = time.perf_counter()
            gen_ev.merger.apply(recipe)
            merge_s = time.perf_counter() - t
            t = time.perf_counter()
            preds = gen_ev.predict()
            gen_s = time.perf_counter() - t
            content = [scenes.content_correct(p, rows[q]["attribute"], rows[q]["value"], rows[q]["lang"]) for q, p in preds.items()]
            exact = [p.strip() == rows[q]["answer"].strip() for q, p in preds.items()]
            rec = {"candidate": i, "genes": genome.values(x), "loglik": ll.fitness, "loglik_eval_s": ll.eval_s,
                   "content_accuracy": float(np.mean(content)), "exact_match": float(np.mean(exact)),
                   "generate_eval_s": gen_s, "merge_s": merge_s}
            records.append(rec)
            print(f"candidate {i:2d}: loglik {rec['loglik']:.4f} ({ll.eval_s:.2f} s)  content {rec['content_accuracy']:.3f}"
                  f"  exact {rec['exact_match']:.3f} ({gen_s:.2f} s)", flush=True)
    ll = np.array([r["loglik"] for r in records])
    out: dict = {"zoo": str(zoo), "zoo_seed": meta["seed"], "questions": args.questions, "candidates": args.candidates,
                 "threads": args.threads, "records": records}
    for metric in ("content_accuracy", "exact_match"):
        acc = np.array([r[metric] for r in records])
        out[metric] = {"spearman": spearman(ll, acc), "kendall": kendall_tau_b(ll, acc),
                       "same_best": int(ll.argmax()) == int(acc.argmax()),
                       "accuracy_of_loglik_best": float(acc[ll.argmax()]), "best_accuracy": float(acc.max())}
    ll_s = float(np.mean([r["loglik_eval_s"] for r in records]))
    gen_s = float(np.mean([r["generate_eval_s"] for r in records]))
    out["seconds_per_candidate"] = {"loglik": ll_s, "generate": gen_s, "speedup": gen_s / ll_s}
    out["machine"] = MachineFacts.collect().as_dict()
    out["command"] = " ".join(["python -m bench.fitness_rank", *argv])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fitness_rank.json").write_text(json.dumps(out, indent=2, ensure_ascii=False, default=str) + "\n")
    md = ["# Log-likelihood fitness vs generated-answer accuracy\n",
          f"`{out['command'].strip()}`: {args.candidates} random task_arithmetic genomes (per-layer weight + embeddings, "
          f"[0, 1.5]) on the miniature world seed {meta['seed']}, Japanese dev, {args.questions} questions, "
          f"{args.threads} CPU threads.\n",
          "| accuracy | Spearman | Kendall | same best | accuracy of loglik's best / best |", "|---|---|---|---|---|"]
    for metric in ("content_accuracy", "exact_match"):
        m = out[metric]
        md.append(f"| {metric} | {m['spearman']:+.3f} | {m['kendall']:+.3f} | {m['same_best']} | "
                  f"{m['accuracy_of_loglik_best']:.3f} / {m['best_accuracy']:.3f} |")
    md.append(f"\nEvaluation seconds per candidate: loglik {ll_s:.2f}, generate {gen_s:.2f} "
              f"(**{gen_s / ll_s:.1f}x cheaper**); merge time excluded.\n")
    (RESULTS / "fitness_rank.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
