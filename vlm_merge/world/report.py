"""The demo's report: verdicts from paired CIs, plots, and one list of blocks rendered as markdown and HTML.

`run_demo` (`vlm_merge.world.demo`) measures; this module only words and draws what it measured.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlm_merge.world.demo import Evaluated

PLOTS = {"scores": "scores.png", "lengths": "answer_lengths.png", "fitness": "fitness.png"}
SANITY = "en-vlm@en"  # the English VLM on the English test set: what the vision side can do
CONTROLS = ("en-vlm", "ja-shell")
MERGES = ("chat-vector", "evolved")


def comparisons(results: dict[str, Evaluated]) -> dict[str, dict[str, dict]]:
    """Paired bootstrap of content accuracy: every merge minus every control (and evolved minus chat-vector)."""
    from vlm_merge.world.evaluate import paired_bootstrap

    pairs = [(m, c) for m in MERGES for c in CONTROLS] + [("evolved", "chat-vector")]
    out: dict[str, dict[str, dict]] = {}
    for m, c in pairs:
        if m in results and c in results:
            out.setdefault(m, {})[c] = paired_bootstrap(results[m].scores.content, results[c].scores.content)
    return out


def points(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def verdict(model: str, control: str, d: dict) -> str:
    ci = f"{points(d['diff'], True)} points of content accuracy, 95% CI [{points(d['low'], True)}, {points(d['high'], True)}]"
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
            parts.append(f"{m} by {points(d['diff'], True)} points over {c} (95% CI [{points(d['low'], True)}, "
                         f"{points(d['high'], True)}])")
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
            f"{points(summaries[strongest]['content_accuracy'])}% content accuracy){tail}.")



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
            f"{points(m['content_accuracy'])} [{points(m['content_ci'][0])}, {points(m['content_ci'][1])}]",
            f"{points(m['exact_match'])} [{points(m['exact_ci'][0])}, {points(m['exact_ci'][1])}]",
            "-" if m.get("rouge_l") is None else f"{m['rouge_l']:.1f}",
            *[(f"{points(vs[c]['diff'], True)} [{points(vs[c]['low'], True)}, {points(vs[c]['high'], True)}]" if c in vs else "-")
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
                   *[points(rec["models"][n]["by_qtype"][q]["content_accuracy"]) if q in rec["models"][n]["by_qtype"] else "-"
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
         [[k, points(v["content_accuracy"]), points(v["exact_match"])] for k, v in cv["dev"].items()]),
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
