"""`vlm-merge demo`: Chat Vector and an evolutionary merge on the miniature world, measured honestly.

The miniature zoo (`assets/miniature-zoo/`, see `vlm_merge.world`) holds tiny trained models: an
English base LLM, its Japanese continued pretraining, an English LLaVA VLM, and English / Japanese VQA
sets of drawn scenes. `run_demo(out)`:

1. inspects the parts (vision tower / projector / language model, alignment with each base);
2. builds Chat Vector `ja_base + scale * (vlm_llm - en_base)`, scale and skip preset chosen on ja-dev
   (content accuracy; the grid of `vlm_merge.world.experiment`);
3. runs a short CMA-ES search over per-layer task-arithmetic weights (`vlm_merge.evolve`), fitness =
   content accuracy on the first ja-dev questions, starting from the dev-chosen Chat Vector scale;
4. evaluates every model and the controls on the Japanese test set (the English VLM also on the
   parallel English test set): content accuracy, exact match, Japanese ROUGE-L, paired bootstrap;
5. writes the report directory atomically (worded and drawn by `vlm_merge.world.report`): `report.md`, `report.html`, `report.json`,
   `predictions/<model>.jsonl`, `plots/*.png`, `gallery/gallery.html` (`vlm-merge caption`'s gallery
   of test images captioned by the best model), the merged models and the search run.

Every claim in the report is written from the numbers (a merge "helps" only when the paired 95% CI of
its difference to a control excludes 0).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm_merge.errors import VlmMergeError
from vlm_merge.extras import require_extra
from vlm_merge.io.outputs import AtomicDir
from vlm_merge.world.report import (
    MERGES,
    PLOTS,
    SANITY,
    comparisons,
    headline,
    plot_lengths,
    plot_scores,
    points,
    render_html,
    render_markdown,
    report_blocks,
    summary_rows,
    verdict,
)

if TYPE_CHECKING:
    from vlm_merge.world.evaluate import Scores

REPORT_MD, REPORT_HTML, REPORT_JSON = "report.md", "report.html", "report.json"
PREDICTIONS_DIR, PLOTS_DIR, MODELS_DIR, SEARCH_DIR, GALLERY_DIR, IMAGES_DIR = (
    "predictions", "plots", "models", "search", "gallery", "images")
ZOO_PARTS = ("en-base", "ja-base", "en-vlm")
ZOO_SPLITS = ("ja-dev", "ja-test", "en-test")


def gallery_prompt(rows: list[dict]) -> str:
    """The gallery's one prompt: the Japanese test question asked most often, a count if the zoo asks counts. The
    world's models learned questions, not free captions, so it is one of the zoo's own question forms, in whatever
    wording (`scenes.Phrasebook`) the zoo was built with."""
    asked = Counter(r["question"] for r in rows if r.get("qtype", "").startswith("count_")) or Counter(
        r["question"] for r in rows)
    return min(asked, key=lambda q: (-asked[q], q))


@dataclass(frozen=True)
class DemoSettings:
    """How much of the zoo's data the demo uses and how long the search runs (None: every question)."""

    test_questions: int | None = None  # first N of ja-test (and en-test)
    dev_questions: int | None = None  # first N of ja-dev for choosing the Chat Vector scale / skip
    fitness_questions: int = 200  # first N of ja-dev the search scores every candidate on
    popsize: int = 10
    generations: int = 10
    gallery_images: int = 12
    seed: int = 0  # CMA-ES seed
    # torch threads while the demo runs (restored afterwards). The zoo's ~1M-parameter models gain nothing from
    # more threads, and two threads on a busy 2-core machine run 20-40x slower (spinning OpenMP workers).
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("test_questions", "dev_questions", "fitness_questions", "popsize", "generations", "gallery_images",
                     "threads"):
            v = getattr(self, name)
            if v is not None and v < (2 if name == "popsize" else 1):
                raise VlmMergeError(f"demo setting {name}={v!r} is too small")


QUICK = DemoSettings(test_questions=120, dev_questions=60, fitness_questions=24, popsize=4, generations=2, gallery_images=4)


@dataclass(frozen=True)
class Zoo:
    root: Path
    seed: int | None
    data: dict[str, Path]  # split name -> JSONL file

    def part(self, name: str) -> Path:
        return self.root / name


def open_zoo(path: str | Path | None = None) -> Zoo:
    """The miniature zoo at `path` (default: the shipped one), checked for the parts and splits the demo reads."""
    from vlm_merge.world import read_zoo_meta, shipped_zoo

    root = (Path(path).expanduser() if path is not None else shipped_zoo()).resolve()
    meta_file = root / "zoo.json"
    if not os.path.lexists(meta_file):
        raise VlmMergeError(f"{root}: no zoo.json; not a miniature zoo (build one with `vlm-merge zoo build --out DIR`)")
    meta = read_zoo_meta(meta_file)
    data = {k: root / v for k, v in meta["data"].items()}
    for part in ZOO_PARTS:
        if not (root / part / "config.json").exists():
            raise VlmMergeError(f"{root}: missing the model {part}/ (a zoo has {', '.join(ZOO_PARTS)})")
    for split in ZOO_SPLITS:
        if split not in data or not data[split].exists():
            raise VlmMergeError(f"{meta_file}: no {split} data file (data: {', '.join(meta['data']) or 'none'})")
    return Zoo(root, meta.get("seed"), data)


# ================================================================================================
# Steps


def inspect_zoo(zoo: Zoo) -> dict:
    """The parts of every model (`vlm-merge inspect`'s anatomy) and the VLM's alignment with each base."""
    from vlm_merge.architecture.anatomy import align, inspect_llm, inspect_vlm
    from vlm_merge.engine import describe_parts
    from vlm_merge.io.checkpoint import CheckpointReader

    rows, parts, alignment = [], {}, {}
    with CheckpointReader(zoo.part("en-vlm")) as vr, CheckpointReader(zoo.part("en-base")) as er, \
            CheckpointReader(zoo.part("ja-base")) as jr:
        anatomies = {"en-vlm": inspect_vlm(vr), "en-base": inspect_llm(er, "en-base"), "ja-base": inspect_llm(jr, "ja-base")}
        for name, a in anatomies.items():
            rows += [[name, *r] for r in a.summary_rows()]
            parts[name] = describe_parts(a)
        for base in ("en-base", "ja-base"):
            al = align(anatomies["en-vlm"], anatomies[base])
            alignment[base] = {"paired_tensors": len(al.pairs), "base_vocab_rows": al.base_vocab_rows,
                               "vlm_vocab_rows": al.vlm_vocab_rows}
    return {"rows": rows, "parts": parts, "alignment": alignment}


@dataclass
class Evaluated:
    """One model's answers on one test set, with the per-question scores."""

    name: str
    test_set: str
    description: str
    scores: Scores
    path: Path

    @property
    def rows(self) -> list[dict]:
        return self.scores.rows

    def summary(self) -> dict:
        from vlm_merge.world.evaluate import bootstrap_ci

        s = self.scores.summary()
        s["exact_ci"] = list(bootstrap_ci(self.scores.exact))
        s["rouge_l"] = s.get("rouge_l")
        return s


def evaluate_on(name: str, data_file: Path, limit: int | None, description: str, path: Path, *, loaded=None,
                rouge: bool = True) -> Evaluated:
    """Score the model at `path` (or the already `loaded` (model, processor) of it) on the first `limit` rows."""
    from vlm_merge.world import evaluate

    scores = evaluate.evaluate_model(path, data_file, limit=limit, rouge=rouge, model_and_processor=loaded)
    return Evaluated(name, data_file.stem, description, scores, path)


@dataclass(frozen=True)
class ChatVectorChoice:
    scale: float
    skip: str
    dev: dict[str, dict]  # "scale/skip" -> {"content_accuracy", "exact_match"}
    dev_content: list[float]  # the chosen merge's per-question content accuracy on the dev questions


def choose_chat_vector(zoo: Zoo, scratch: Path, questions: int | None, progress: bool = True) -> ChatVectorChoice:
    """The experiment's grid (`SCALES` x `SKIPS`) scored on ja-dev content accuracy; the first best wins."""
    from vlm_merge.world.experiment import choose_on_dev

    scale, skip, dev = choose_on_dev(zoo.root, zoo.data["ja-dev"], scratch, questions, progress=progress)
    summary = {k: {"content_accuracy": float(sc.content.mean()), "exact_match": float(sc.exact.mean())}
               for k, sc in dev.items()}
    return ChatVectorChoice(scale, skip, summary, [float(x) for x in dev[f"{scale}/{skip}"].content])


def search_config(zoo: Zoo, settings: DemoSettings, x0_weight: float) -> dict:
    """The evolve config: per-layer task-arithmetic weights on `vlm - en_base`, added to the Japanese base.

    One gene per decoder layer plus embeddings, norms and lm_head, weights in [0, 1.5], starting at
    `x0_weight` everywhere (the genes of tensors the English VLM did not tune stay there: `drop_inert`);
    fitness = content accuracy (the bar's metric, `vlm_merge.world.scoring.ContentAccuracy`) of greedy answers on the
    first ja-dev questions.
    """
    from vlm_merge.world.evaluate import MAX_NEW_TOKENS

    return {
        "sources": {"vlm": str(zoo.part("en-vlm")), "base_model": str(zoo.part("en-base")),
                    "target": str(zoo.part("ja-base")), "models": ["vlm"]},
        "method": "task_arithmetic",
        "genome": {"params": {"weight": [0.0, 1.5]}, "layer_granularity": 1, "separate": ["embeddings", "norms", "lm_head"]},
        "fitness": {"benchmark": str(zoo.data["ja-dev"]), "kind": "generate", "protocol": "llm-jp",
                    "max_new_tokens": MAX_NEW_TOKENS, "metrics": {"content_accuracy": 1.0},
                    "limit": settings.fitness_questions, "batch_size": 64},
        "cmaes": {"popsize": settings.popsize, "max_evaluations": settings.popsize * settings.generations,
                  "seed": settings.seed, "x0": {"weight": x0_weight}, "sigma0": 0.15},
    }


def sample_questions(results: dict[str, Evaluated], images: int) -> list[dict]:
    """The first question about each of the first `images` test images, with every model's answer."""
    first = next(iter(results.values()))
    seen: dict[str, int] = {}
    for i, r in enumerate(first.rows):
        if r["image"] not in seen and len(seen) < images:
            seen[r["image"]] = i
    out = []
    for source, i in seen.items():
        r = first.rows[i]
        out.append({"image": f"{IMAGES_DIR}/{Path(source).name}", "source": source, "question_id": r["question_id"],
                    "question": r["question"], "answer": r["answer"],
                    "answers": {x: e.scores.predictions[i] for x, e in results.items()},
                    "correct": {x: bool(e.scores.content[i]) for x, e in results.items()}})
    return out


# ================================================================================================
# The run


@contextmanager
def _no_loading_bars():
    """transformers' per-load "Loading weights" bar off while the demo runs (its own bars stay), then restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _versions() -> dict[str, str]:
    import transformers

    import vlm_merge

    return {"vlm_merge": vlm_merge.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_demo(out: str | Path, *, force: bool = False, zoo: str | Path | None = None,
             settings: DemoSettings = DemoSettings(), quick: bool = False, progress: bool = True) -> Path:
    """Run the demo on `zoo` (default: the shipped one) and write the report directory `out`; returns it.
    Without the `demo` extra installed: the one-line error naming it, before anything else."""
    require_extra("demo", "vlm_merge.world.demo.run_demo")
    from tqdm.auto import tqdm

    from eval.captioning import caption
    from eval.decoding import GenerationSettings
    from vlm_merge.engine import torch_threads
    from vlm_merge.evolve import (
        EvolveInterrupted,
        config_from_dict,
        plot_fitness,
        run_evolve,
    )
    from vlm_merge.evolve import protocol_text as fitness_text
    from vlm_merge.tables import format_table
    from vlm_merge.world import evaluate
    from vlm_merge.world.experiment import chat_vector_model

    z = open_zoo(zoo)
    atomic = AtomicDir(out, force, [z.root])
    t_start, timings = time.perf_counter(), {}
    with atomic as tmp, _no_loading_bars(), torch_threads(settings.threads):
        for d in (PREDICTIONS_DIR, PLOTS_DIR, MODELS_DIR, IMAGES_DIR):
            (tmp / d).mkdir()

        print(f"1/5 inspecting the parts of {z.root}")
        t = time.perf_counter()
        parts = inspect_zoo(z)
        print(format_table(["model", "part", "tensors", "parameters", "dtype", "key prefix"], parts["rows"]))
        timings["inspect"] = time.perf_counter() - t

        print("2/5 Chat Vector: choosing scale and skip on ja-dev")
        t = time.perf_counter()
        choice = choose_chat_vector(z, tmp / ".dev-grid", settings.dev_questions, progress)
        cv_dir = chat_vector_model(z.root, tmp / MODELS_DIR / "chat-vector", choice.scale, choice.skip)
        shell_dir = chat_vector_model(z.root, tmp / MODELS_DIR / "ja-shell", 0.0)
        print(f"    chosen: scale {choice.scale}, skip {choice.skip} "
              f"(ja-dev content accuracy {choice.dev[f'{choice.scale}/{choice.skip}']['content_accuracy']:.3f})")
        timings["chat_vector"] = time.perf_counter() - t

        print(f"3/5 evolutionary search: {settings.popsize * settings.generations} candidates")
        t = time.perf_counter()
        cfg = config_from_dict(search_config(z, settings, choice.scale))
        try:
            res = run_evolve(cfg, tmp / SEARCH_DIR, force=True, progress=progress)
        except EvolveInterrupted:
            raise KeyboardInterrupt from None  # the whole report directory is dropped, not resumable
        if res.best is None or res.model is None:
            raise VlmMergeError(f"{tmp / SEARCH_DIR}: no search candidate could be scored (see log.jsonl)")
        records = [json.loads(line) for line in (tmp / SEARCH_DIR / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
        k = res.best["questions"]  # the fitness questions (fewer than asked if ja-dev is shorter)
        cv_fit = float(np.mean(choice.dev_content[:k])) if len(choice.dev_content) >= k else None
        plot_fitness(records, tmp / PLOTS_DIR / PLOTS["fitness"],
                     references={"chat-vector (dev-chosen), same questions": cv_fit} if cv_fit is not None else None)
        timings["search"] = time.perf_counter() - t

        print("4/5 evaluating on the test sets")
        t = time.perf_counter()
        n = settings.test_questions
        ja, en = z.data["ja-test"], z.data["en-test"]
        results: dict[str, Evaluated] = {}
        jobs = [
            (SANITY, "en", "English VLM on the parallel English test questions: what its vision side can do"),
            ("en-vlm", "ja", "English VLM asked in Japanese (control)"),
            ("ja-shell", "ja", "Japanese base in the VLM shell, i.e. Chat Vector at scale 0 (control)"),
            ("chat-vector", "ja", f"ja_base + {choice.scale} x (vlm_llm - en_base), skip {choice.skip}; chosen on ja-dev"),
            ("evolved", "ja", f"task arithmetic with the per-layer weights of the best of {res.evaluations} CMA-ES candidates"),
        ]
        paths = {SANITY: z.part("en-vlm"), "en-vlm": z.part("en-vlm"), "ja-shell": shell_dir, "chat-vector": cv_dir,
                 "evolved": res.model}
        en_vlm = evaluate.load_vlm(z.part("en-vlm"))  # loaded once for both test sets
        for name, lang, desc in tqdm(jobs, desc="test sets", unit="model", disable=not progress, dynamic_ncols=True):
            results[name] = evaluate_on(name, ja if lang == "ja" else en, n, desc, paths[name],
                                        loaded=en_vlm if paths[name] == z.part("en-vlm") else None, rouge=lang == "ja")
        del en_vlm
        timings["evaluate"] = time.perf_counter() - t

        print("5/5 writing the report")
        t = time.perf_counter()
        summaries = {name: {**e.summary(), "test_set": e.test_set, "description": e.description,
                            "path": str(atomic.target / e.path.relative_to(tmp) if e.path.is_relative_to(tmp) else e.path),
                            "predictions": f"{PREDICTIONS_DIR}/{name}.jsonl",
                            "by_qtype": evaluate.by_qtype(e.rows, e.scores.content)}
                     for name, e in results.items()}
        for name, e in results.items():
            (tmp / PREDICTIONS_DIR / f"{name}.jsonl").write_text(evaluate.prediction_lines(e.scores), encoding="utf-8")
        vs = comparisons(results)
        claims = [verdict(m, c, d) for m, ds in vs.items() for c, d in ds.items()]
        claims.append(f"Ceiling check: the English VLM names the asked attribute in {points(summaries[SANITY]['content_accuracy'])}% "
                      "of the parallel English test questions.")
        ja_names = [x for x in results if x != SANITY]
        best = max(ja_names, key=lambda x: (summaries[x]["content_accuracy"], x in MERGES))  # ties: a merge
        n_q = summaries["ja-shell"]["n"]
        plot_scores(summaries, tmp / PLOTS_DIR / PLOTS["scores"],
                    f"Japanese test, {n_q} questions (en-vlm@en: parallel English questions); 95% bootstrap CIs")
        lengths = {x: [len(p) for p in results[x].scores.predictions] for x in ja_names}
        lengths["reference"] = [len(r["answer"]) for r in results["ja-shell"].rows]
        plot_lengths(lengths, tmp / PLOTS_DIR / PLOTS["lengths"])

        samples = sample_questions({x: results[x] for x in ja_names}, settings.gallery_images)
        for x in samples:
            shutil.copyfile(ja.parent / x["source"], tmp / x["image"])
        prompt = gallery_prompt(results["ja-shell"].rows)
        caption([ja.parent / x["source"] for x in samples], paths[best], prompt=prompt,
                settings=GenerationSettings(max_new_tokens=evaluate.MAX_NEW_TOKENS), out_dir=tmp / GALLERY_DIR,
                model_name=best, progress=progress)

        summary = json.loads((tmp / SEARCH_DIR / "summary.json").read_text(encoding="utf-8"))
        timings["report"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        rec = {
            "title": "vlm-merge demo on the miniature world",
            "zoo": {"path": str(z.root), "seed": z.seed, "parts": list(ZOO_PARTS)},
            "quick": quick,
            "settings": asdict(settings),
            "protocol": {"metric": "content accuracy: the asked attribute is named in Japanese (and no other value of it)",
                         "decoding": "greedy", "max_new_tokens": evaluate.MAX_NEW_TOKENS, "template": "chat",
                         "test_questions": n_q, "bootstrap_resamples": evaluate.BOOTSTRAP, "bootstrap_seed": 0},
            "headline": headline(vs, summaries),
            "claims": claims,
            "inspect": parts,
            "chat_vector": {"scale": choice.scale, "skip": choice.skip, "dev": choice.dev,
                            "dev_questions": len(choice.dev_content), "path": str(atomic.target / MODELS_DIR / "chat-vector")},
            "search": {"generations": res.generations, "evaluations": res.evaluations, "genes": summary["genes"],
                       "gene_names": summary["gene_names"], "protocol": fitness_text(cfg),
                       "held_genes": {g: h["why"] for g, h in sorted(summary["held_genes"].items())},
                       "fitness_questions": k, "best_fitness": res.best["fitness"], "best_genes": res.best["genes"],
                       "chat_vector_fitness": cv_fit, "seconds": timings["search"], "dir": SEARCH_DIR},
            "models": summaries,
            "comparisons": vs,
            "best_model": best,
            "gallery": {"file": f"{GALLERY_DIR}/gallery.html", "model": best, "prompt": prompt,
                        "images": len(samples)},
            "samples": samples,
            "plots": {k2: f"{PLOTS_DIR}/{v}" for k2, v in PLOTS.items()},
            "timings_s": {k2: round(v, 2) for k2, v in timings.items()},
            "versions": _versions(),
        }
        (tmp / REPORT_JSON).write_text(json.dumps(rec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        blocks = report_blocks(rec)
        (tmp / REPORT_MD).write_text(render_markdown(blocks), encoding="utf-8")
        (tmp / REPORT_HTML).write_text(render_html(blocks), encoding="utf-8")
        h, rows = summary_rows(rec)
        print("\n" + format_table(h, rows) + "\n\n" + rec["headline"])
    return atomic.target
