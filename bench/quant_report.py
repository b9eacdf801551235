"""Quantisation study (#35): what each llama.cpp quantisation level costs a merged Japanese VLM.

What is measured
    The miniature world's Chat Vector model (scale 1.0, nothing skipped: `ja + (vlm - en)`) exported with
    `vlm-merge export-gguf --quant all`, every level (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) answering the
    world's Japanese test questions in llama.cpp (`eval.llamacpp`: the transformers backend's prompts and token
    ids, the image through llama.cpp's mmproj, greedy, 24 new tokens), and the same model in transformers (float32)
    as the reference of the F16 export. Per level: content accuracy and Japanese ROUGE-L with bootstrap CIs, their
    paired-bootstrap difference from F16 (same questions), the agreement of its answers with F16's, the answer
    length in characters (distribution: box plot), the language model's file size, the GGML types llama.cpp
    really used (the miniature hidden size, 128, is below the K-quants' 256-wide blocks) and generated tokens/s
    (one thread, generation only, prompt and image included in the time).

    python -m bench.quant_report [--limit N] [--out bench/results/quant]
    python -m bench.quant_report --model out/demo/models/evolved --name "evolved (demo)" --out bench/results/quant-evolved
    -> quant.md, quant.json, quant-lengths.png (atomic directory)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

LEVELS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
MAX_NEW_TOKENS = 24


def llamacpp_answers(export_dir: Path, level: str, images, questions) -> tuple[list[str], list[int], float]:
    from eval.decoding import GenerationSettings
    from eval.llamacpp import generate_llamacpp, load_llamacpp

    model, processor = load_llamacpp(export_dir / f"model-{level}.gguf", export_dir / "mmproj-f16.gguf")
    try:
        settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
        start = time.perf_counter()
        gens = generate_llamacpp(model, processor, images, questions, template="chat", settings=settings)
        seconds = time.perf_counter() - start
    finally:
        model.close()
    return [g.text for g in gens], [len(g.token_ids) for g in gens], seconds


def ci(values: np.ndarray, seed: int = 0) -> list[float]:
    from vlm_merge.world.evaluate import bootstrap_ci

    return [round(float(x), 4) for x in bootstrap_ci(values, seed=seed)]


def run(zoo: Path, out: Path, limit: int | None, force: bool, model: Path | None = None,
        name: str = "Chat Vector") -> Path:
    """The study of `model` (default: the world's Chat Vector model at scale 1.0, built here) into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlm_merge.cli.gguf import run_export
    from vlm_merge.io.outputs import AtomicDir
    from vlm_merge.world import datasets
    from vlm_merge.world.evaluate import evaluate_model, paired_bootstrap, score
    from vlm_merge.world.experiment import chat_vector_model

    data = zoo / "data" / "ja-test.jsonl"
    rows = datasets.read_rows(data)[:limit]
    images = datasets.load_images(data, rows)
    questions = [r["question"] for r in rows]
    inputs = [zoo] + ([model] if model is not None else [])
    with tempfile.TemporaryDirectory() as scratch, AtomicDir(out, force, inputs) as tmp:
        cv = model if model is not None else chat_vector_model(zoo, Path(scratch) / "chat-vector", 1.0)
        export = run_export(str(cv), Path(scratch) / "gguf", "f16", list(LEVELS))
        record = json.loads((export / "export.json").read_text())
        hf = evaluate_model(cv, data, limit=limit)
        results, scores = {}, {}
        for level in ("f16", *LEVELS):
            preds, n_tokens, seconds = llamacpp_answers(export, level, images, questions)
            scores[level] = score(rows, preds)
            results[level] = {"predictions": preds, "tokens": n_tokens, "seconds": seconds}
        f16 = scores["f16"]
        table = {}
        for level, sc in scores.items():
            m = record["models"][level]
            lengths = np.array([len(p) for p in sc.predictions])
            entry = {
                "file_bytes": m["bytes"], "tensor_types": m["tensor_types"],
                "content_accuracy": round(float(sc.content.mean()), 4), "content_ci": ci(sc.content),
                "rouge_l": round(float(sc.rouge_l.mean()), 4) if sc.rouge_l is not None else None,
                "rouge_l_ci": ci(sc.rouge_l) if sc.rouge_l is not None else None,
                "same_answer_as_f16": round(float(np.mean([a == b for a, b in zip(sc.predictions, f16.predictions)])), 4),
                "answer_chars_mean": round(float(lengths.mean()), 2), "answer_chars_median": float(np.median(lengths)),
                "tokens_per_s": round(sum(results[level]["tokens"]) / results[level]["seconds"], 1),
            }
            if level != "f16":
                entry["content_vs_f16"] = paired_bootstrap(sc.content, f16.content)
                if sc.rouge_l is not None:
                    entry["rouge_l_vs_f16"] = paired_bootstrap(sc.rouge_l, f16.rouge_l)
            table[level] = entry
        hf_entry = {"content_accuracy": round(float(hf.content.mean()), 4), "content_ci": ci(hf.content),
                    "rouge_l": round(float(hf.rouge_l.mean()), 4) if hf.rouge_l is not None else None,
                    "f16_llamacpp_minus_transformers": paired_bootstrap(f16.content, hf.content),
                    "same_answer_as_f16": round(float(np.mean([a == b for a, b in zip(hf.predictions,
                                                                                       f16.predictions)])), 4)}
        report = {"model": f"miniature world {name}" + (" (scale 1.0, skip none)" if model is None else ""), "questions": len(rows),
                  "llama_cpp_format": record["llama_cpp_format"], "llama_cpp_python": record["llama_cpp_python"],
                  "transformers_float32": hf_entry, "levels": table}
        (tmp / "quant.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

        fig, ax = plt.subplots(figsize=(8, 4))
        labels = ["hf f32", *scores]
        ax.boxplot([[len(p) for p in hf.predictions], *[[len(p) for p in s.predictions] for s in scores.values()]])
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel("answer length (characters)")
        ax.set_title(f"{name}, miniature world ja-test ({len(rows)} questions):\nanswer length by quantisation level", fontsize=10)
        fig.tight_layout()
        fig.savefig(tmp / "quant-lengths.png", dpi=100)
        plt.close(fig)

        def fmt_ci(v, c):
            return f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]"

        def fmt_diff(d):
            return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "-"

        lines = [f"# Quantisation study: {report['model']}", "",
                 f"{len(rows)} Japanese test questions; llama.cpp format {record['llama_cpp_format']}; greedy, "
                 f"{MAX_NEW_TOKENS} new tokens, 1 thread.", "",
                 f"transformers float32: content accuracy {fmt_ci(hf_entry['content_accuracy'], hf_entry['content_ci'])}"
                 f"; llama.cpp F16 minus transformers (paired): {fmt_diff(hf_entry['f16_llamacpp_minus_transformers'])}"
                 f"; same answer as llama.cpp F16: {hf_entry['same_answer_as_f16']:.1%}", "",
                 "| level | MB | GGML types (tensors) | content acc. [95% CI] | vs F16 (paired) | ROUGE-L [95% CI] | "
                 "vs F16 | same answer as F16 | mean chars | tok/s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for level, e in table.items():
            types = ", ".join(f"{t} {n}" for t, n in e["tensor_types"].items())
            rl = fmt_ci(e["rouge_l"], e["rouge_l_ci"]) if e["rouge_l"] is not None else "-"
            lines.append(f"| {level} | {e['file_bytes'] / 1e6:.2f} | {types} | "
                         f"{fmt_ci(e['content_accuracy'], e['content_ci'])} | {fmt_diff(e.get('content_vs_f16'))} | "
                         f"{rl} | {fmt_diff(e.get('rouge_l_vs_f16'))} | {e['same_answer_as_f16']:.1%} | "
                         f"{e['answer_chars_mean']:.1f} | {e['tokens_per_s']:.0f} |")
        lines += ["", "![answer lengths](quant-lengths.png)", ""]
        (tmp / "quant.md").write_text("\n".join(lines), encoding="utf-8")
    return out


def main() -> None:
    from vlm_merge.world import shipped_zoo

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", type=Path, default=None, help="miniature zoo (default: the shipped one)")
    p.add_argument("--limit", type=int, default=None, help="first N ja-test questions (default all)")
    p.add_argument("--model", type=Path, default=None,
                   help="a merged VLM of the world to study (default: its Chat Vector model, scale 1.0, built here)")
    p.add_argument("--name", default=None, help="the model's name in the report (default: Chat Vector, or the directory's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/quant"))
    args = p.parse_args()
    name = args.name or ("Chat Vector" if args.model is None else args.model.name)
    out = run(args.zoo or shipped_zoo(), args.out, args.limit, force=True, model=args.model, name=name)
    print((out / "quant.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
