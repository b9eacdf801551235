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
5. writes the report directory atomically: `report.md`, `report.html`, `report.json`,
   `predictions/<model>.jsonl`, `plots/*.png`, `gallery/gallery.html` (`vlm-merge caption`'s gallery
   of test images captioned by the best model), the merged models and the search run.

Every claim in the report is written from the numbers (a merge "helps" only when the paired 95% CI of
its difference to a control excludes 0).
"""

from __future__ import annotations

import html
import json
import os
import re
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

if TYPE_CHECKING:
    from vlm_merge.world.evaluate import Scores

REPORT_MD, REPORT_HTML, REPORT_JSON = "report.md", "report.html", "report.json"
PREDICTIONS_DIR, PLOTS_DIR, MODELS_DIR, SEARCH_DIR, GALLERY_DIR, IMAGES_DIR = (
    "predictions", "plots", "models", "search", "gallery", "images")
PLOTS = {"scores": "scores.png", "lengths": "answer_lengths.png", "fitness": "fitness.png"}
SANITY = "en-vlm@en"  # the English VLM on the English test set: what the vision side can do
CONTROLS = ("en-vlm", "ja-shell")
MERGES = ("chat-vector", "evolved")
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


def comparisons(results: dict[str, Evaluated]) -> dict[str, dict[str, dict]]:
    """Paired bootstrap of content accuracy: every merge minus every control (and evolved minus chat-vector)."""
    from vlm_merge.world.evaluate import paired_bootstrap

    pairs = [(m, c) for m in MERGES for c in CONTROLS] + [("evolved", "chat-vector")]
    out: dict[str, dict[str, dict]] = {}
    for m, c in pairs:
        if m in results and c in results:
            out.setdefault(m, {})[c] = paired_bootstrap(results[m].scores.content, results[c].scores.content)
    return out


def _pts(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def verdict(model: str, control: str, d: dict) -> str:
    ci = f"{_pts(d['diff'], True)} points of content accuracy, 95% CI [{_pts(d['low'], True)}, {_pts(d['high'], True)}]"
    if d["low"] > 0:
        return f"{model} is better than {control}: {ci}."
    if d["high"] < 0:
        return f"{model} is worse than {control}: {ci}."
    return f"{model} and {control} cannot be told apart: {ci} includes 0."


def headline(vs: dict[str, dict[str, dict]], summaries: dict[str, dict]) -> str:
    """One sentence on whether merging helps, from the paired CIs against both controls."""
    helps = [m for m in MERGES if m in vs and all(vs[m][c]["low"] > 0 for c in CONTROLS)]
    if helps:
        parts = []
        for m in helps:
            c = min(CONTROLS, key=lambda c: vs[m][c]["diff"])  # the control it beats by the least
            d = vs[m][c]
            parts.append(f"{m} by {_pts(d['diff'], True)} points over {c} (95% CI [{_pts(d['low'], True)}, "
                         f"{_pts(d['high'], True)}])")
        n = summaries[CONTROLS[0]]["n"]
        return (f"Merging helps on these {n} Japanese test questions: {' and '.join(helps)} "
                f"{'beats' if len(helps) == 1 else 'beat'} both controls (the English VLM asked in Japanese, and the "
                f"Japanese base in the VLM shell) with paired 95% CIs excluding 0; against the closer control, "
                + " and ".join(parts) + ".")
    strongest = max(CONTROLS, key=lambda c: summaries[c]["content_accuracy"])
    worse = [m for m in MERGES if m in vs and vs[m][strongest]["high"] < 0]
    tail = (f"; {' and '.join(worse)} {'is' if len(worse) == 1 else 'are'} significantly worse than {strongest}" if worse else "")
    return (f"Merging does not help on these {summaries[strongest]['n']} Japanese test questions: no merged model beats "
            f"both controls with a paired 95% CI excluding 0 (the strongest control is {strongest}, "
            f"{_pts(summaries[strongest]['content_accuracy'])}% content accuracy){tail}.")


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
# Files


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_scores(summaries: dict[str, dict], path: Path, title: str) -> None:
    """Content accuracy and exact match per model, with 95% bootstrap CIs as error bars."""
    from matplotlib.figure import Figure

    names = list(summaries)
    x = np.arange(len(names))
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    for off, key, ci, colour, label in ((-0.2, "content_accuracy", "content_ci", "tab:blue", "content accuracy"),
                                         (0.2, "exact_match", "exact_ci", "tab:orange", "exact match")):
        v = np.array([summaries[n][key] for n in names])
        lo = np.array([summaries[n][ci][0] for n in names])
        hi = np.array([summaries[n][ci][1] for n in names])
        ax.bar(x + off, v, 0.4, color=colour, label=label, yerr=[v - lo, hi - v], capsize=3)
        for xi, yi, top in zip(x + off, v, hi):
            ax.text(xi, top + 0.015, f"{100 * yi:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    if SANITY in names:
        ax.axvline(names.index(SANITY) + 0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of test questions (labels: %)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> None:
    """Answer length (characters) per model, as box plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    ax.boxplot(list(lengths.values()), tick_labels=list(lengths), showmeans=True)
    ax.set_ylabel("answer length (characters)")
    ax.set_title("Answer lengths on the Japanese test set (triangle: mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# A report is a list of blocks rendered twice: ("h", level, text), ("p", text, css class), ("ul", [text]),
# ("table", headers, rows), ("img", src, alt), ("link", before, label, href, after). Table cells are text,
# {"img": src} or {"text": t, "ok": bool}; prose may hold `code` and **bold**.


def summary_rows(rec: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "test set", "n", "content accuracy % [95% CI]", "exact match % [95% CI]", "ROUGE-L (ja)",
               *[f"vs {c} (points)" for c in CONTROLS]]
    rows = []
    for name, m in rec["models"].items():
        vs = rec["comparisons"].get(name, {})
        rows.append([
            name, m["test_set"], str(m["n"]),
            f"{_pts(m['content_accuracy'])} [{_pts(m['content_ci'][0])}, {_pts(m['content_ci'][1])}]",
            f"{_pts(m['exact_match'])} [{_pts(m['exact_ci'][0])}, {_pts(m['exact_ci'][1])}]",
            "-" if m.get("rouge_l") is None else f"{m['rouge_l']:.1f}",
            *[(f"{_pts(vs[c]['diff'], True)} [{_pts(vs[c]['low'], True)}, {_pts(vs[c]['high'], True)}]" if c in vs else "-")
              for c in CONTROLS],
        ])
    return headers, rows


def protocol_text(rec: dict) -> str:
    p = rec["protocol"]
    which = "the first" if rec["settings"]["test_questions"] is not None else "all"
    return (f"Protocol. Content accuracy: the answer names the asked attribute (count, colour, shape, position or object) "
            f"in Japanese, and no other value of it (`vlm_merge.world.scenes.content_correct`). Greedy decoding, at most "
            f"{p['max_new_tokens']} new tokens, the models' own chat template; {which} {p['test_questions']} questions of "
            f"ja-test.jsonl (en-vlm@en: the parallel en-test questions). Exact match after Sakana's Japanese "
            f"normalisation; ROUGE-L x100 on MeCab tokens. 95% CIs: percentile bootstrap over questions "
            f"({p['bootstrap_resamples']} resamples, seed {p['bootstrap_seed']}); differences are paired over the same "
            f"questions. Zoo seed {rec['zoo']['seed']}, search seed {rec['settings']['seed']}.")


def _by_reason(held: dict[str, str]) -> dict[str, list[str]]:
    """Held genes grouped by why they are held (`evolve.inert_genes`'s reasons, without their tensor counts)."""
    out: dict[str, list[str]] = {}
    for gene, why in held.items():
        out.setdefault(why.split(" (")[0], []).append(gene)
    return out


def report_blocks(rec: dict) -> list[tuple]:
    """The report's content, from report.json's record."""
    cv, s, g = rec["chat_vector"], rec["search"], rec["gallery"]
    ja = [n for n in rec["models"] if n != SANITY]
    qtypes = sorted({q for n in ja for q in rec["models"][n]["by_qtype"]})
    qtype_rows = [[q, str(max(rec["models"][n]["by_qtype"].get(q, {}).get("n", 0) for n in ja)),
                   *[_pts(rec["models"][n]["by_qtype"][q]["content_accuracy"]) if q in rec["models"][n]["by_qtype"] else "-"
                     for n in ja]] for q in qtypes]
    held = "".join(f"; {', '.join(genes)} held at x0 ({why})" for why, genes in _by_reason(s.get("held_genes", {})).items())
    versus = ("" if s["chat_vector_fitness"] is None
              else f" (the chosen Chat Vector scores {s['chat_vector_fitness']:.3f} on the same questions)")
    header = (f"Zoo `{rec['zoo']['path']}` (seed {rec['zoo']['seed']}); written in {rec['timings_s']['total']:.0f} s."
              + (" **Quick mode**: few questions and a tiny search, so the CIs are wide." if rec["quick"] else ""))
    return [
        ("h", 1, "vlm-merge demo: merging a Japanese VLM in the miniature world"),
        ("p", header, "note"),
        ("p", rec["headline"], "headline"),
        ("ul", rec["claims"]),
        ("h", 2, "Results on the Japanese test set"),
        ("table", *summary_rows(rec)),
        ("ul", [f"**{n}**: {m['description']}" for n, m in rec["models"].items()]),
        ("p", protocol_text(rec), "note"),
        ("img", rec["plots"]["scores"], "content accuracy and exact match per model"),
        ("img", rec["plots"]["lengths"], "answer lengths per model"),
        ("h", 3, "Content accuracy (%) by question type"),
        ("table", ["question type", "n", *ja], qtype_rows),
        ("h", 2, "1. The parts"),
        ("table", ["model", "part", "tensors", "parameters", "dtype", "key prefix"], rec["inspect"]["rows"]),
        ("p", ("The English VLM's language model pairs with "
               + " and ".join(f"{b} on {a['paired_tensors']} tensors" for b, a in rec["inspect"]["alignment"].items())
               + "; the merges change only the language model, the vision tower and projector are copied byte for byte."), ""),
        ("h", 2, "2. Chat Vector"),
        ("p", (f"`ja_base + scale * (vlm_llm - en_base)`: scale {cv['scale']}, skip `{cv['skip']}`, chosen on the first "
               f"{cv['dev_questions']} ja-dev questions by content accuracy (%):"), ""),
        ("table", ["scale / skip", "content accuracy", "exact match"],
         [[k, _pts(v["content_accuracy"]), _pts(v["exact_match"])] for k, v in cv["dev"].items()]),
        ("h", 2, "3. Evolutionary search"),
        ("p", (f"CMA-ES over {s['genes']} task-arithmetic weights in [0, 1.5] ({', '.join(s['gene_names'])}), starting "
               f"at the chosen Chat Vector scale{held}: {s['evaluations']} candidates in {s['generations']} generations, "
               f"{s['seconds']:.0f} s. Fitness: content accuracy on the first {s['fitness_questions']} ja-dev questions, the "
               f"same questions for every candidate ({s['protocol']}). Best fitness {s['best_fitness']:.3f}{versus}. The "
               "best of many candidates on the same questions is an optimistic estimate; the test set above is not. "
               "Run directory: `search/` (log, best recipe, model)."), ""),
        ("img", rec["plots"]["fitness"], "fitness over evaluations"),
        ("h", 2, "Test images"),
        ("link", "", "Caption gallery", g["file"],
         (f": {g['images']} test images captioned by the best model on the Japanese test set, **{g['model']}**, with "
          f"the prompt “{g['prompt']}” (what is in the centre: the world's models were trained on such questions, not "
          "on free captions).")),
        ("p", "Sample test questions (✓: content correct):", ""),
        ("table", ["image", "question", "reference", *ja],
         [[{"img": x["image"]}, x["question"], x["answer"], *[{"text": x["answers"][n], "ok": x["correct"][n]} for n in ja]]
          for x in rec["samples"]]),
        ("p", ("Files: `report.json` (every number), `predictions/<model>.jsonl` (answers and per-question scores), "
               "`models/` (the Chat Vector merges), `search/` (the evolve run), `gallery/`."), "note"),
    ]


def _md_cell(c) -> str:
    if isinstance(c, dict):
        c = f"![]({c['img']})" if "img" in c else f"{c['text']} {'✓' if c['ok'] else '✗'}"
    return str(c).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind == "h":
            out.append("#" * a[0] + " " + a[1])
        elif kind == "p":
            out.append(f"**{a[0]}**" if a[1] == "headline" else a[0])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in a[0]))
        elif kind == "table":
            headers, rows = a
            out.append("\n".join(["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers),
                                  *["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]]))
        elif kind == "img":
            out.append(f"![{a[1]}]({a[0]})")
        elif kind == "link":
            out.append(f"{a[0]}[{a[1]}]({a[2]}){a[3]}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped HTML of prose with `code` and **bold**."""
    t = html.escape(str(text), quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _html_cell(c) -> str:
    if isinstance(c, dict) and "img" in c:
        return f'<img class="scene" src="{html.escape(c["img"])}" alt="{html.escape(c["img"])}">'
    if isinstance(c, dict):
        return f'<span class="{"ok" if c["ok"] else "bad"}">{html.escape(c["text"])} {"✓" if c["ok"] else "✗"}</span>'
    return html.escape(str(c))


HTML_CSS = """
body{font-family:system-ui,"Hiragino Sans","Noto Sans CJK JP",sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}.headline{font-size:18px;font-weight:600}img.plot{max-width:100%;border:1px solid #ddd}
img.scene{width:96px;height:96px;image-rendering:pixelated}.ok{color:#080}.bad{color:#a00}.note{color:#555;font-size:14px}
code{background:#f4f4f4;padding:0 3px}
"""


def render_html(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind == "h":
            out.append(f"<h{a[0]}>{_inline(a[1])}</h{a[0]}>")
        elif kind == "p":
            out.append(f'<p class="{a[1]}">{_inline(a[0])}</p>' if a[1] else f"<p>{_inline(a[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in a[0]) + "</ul>")
        elif kind == "table":
            headers, rows = a
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f'<p><img class="plot" src="{html.escape(a[0])}" alt="{html.escape(a[1])}"></p>')
        elif kind == "link":
            out.append(f'<p>{_inline(a[0])}<a href="{html.escape(a[2])}">{html.escape(a[1])}</a>{_inline(a[3])}</p>')
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>vlm-merge demo</title>'
            f"<style>{HTML_CSS}</style></head>\n<body>\n" + "\n".join(out) + "\n</body></html>\n")


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
    from vlm_merge.tables import format_table
    from vlm_merge.evolve import (
        EvolveInterrupted,
        config_from_dict,
        plot_fitness,
        run_evolve,
    )
    from vlm_merge.evolve import protocol_text as fitness_text
    from vlm_merge.engine import torch_threads
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
        claims.append(f"Ceiling check: the English VLM names the asked attribute in {_pts(summaries[SANITY]['content_accuracy'])}% "
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
