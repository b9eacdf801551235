"""The evaluation subcommands of `vlm-merge`: eval, score, compare, caption.

`add_eval_commands(sub)` registers them on the main parser's subparsers. Handlers raise
`VlmMergeError` for bad input, which `vlm-merge` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.benchmarks import BENCHMARKS
from eval.images import MAX_SIDE
from eval.metrics import DEFAULT_SCORERS, all_scorers
from eval.prompts import TEMPLATES
from eval.protocols import PROTOCOLS

DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N (default auto)"
DTYPE_HELP = "auto (the protocol's dtype on CUDA, float32 on CPU), float32, float16 or bfloat16 (default auto)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
        if value < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer") from None
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
        if not value > 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number") from None
    return value


def _format_scores(scores: dict, columns: list[str]) -> str:
    from vlm_merge.tables import format_table

    rows = [[c, f"{scores[c]['mean']:.2f}", f"{scores[c]['mid']:.2f}", f"[{scores[c]['low']:.2f}, {scores[c]['high']:.2f}]"]
            for c in columns if c in scores]
    return format_table(["metric", "mean", "bootstrap mid", "95% interval"], rows)


def _replacing(out: str, force: bool) -> bool:
    """Whether this run would replace an existing run in `out` (--force over a non-empty directory): then a
    Ctrl-C discards the new run and leaves the old one as it was."""
    path = Path(out).expanduser()
    try:
        return force and path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def _interrupted(checkpoint: Path, replacing: bool) -> int:
    """The one line for a Ctrl-C of eval / caption, saying what is really left (read after the run dir's cleanup)."""
    out = checkpoint.parent
    try:
        kept = sum(1 for line in checkpoint.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    except OSError:
        kept = 0
    if replacing:
        said = f"the new run was discarded (--force replaces a run only when it is complete); {out} is as it was"
    elif kept:
        said = f"{kept} finished {'items are' if kept != 1 else 'item is'} kept in {checkpoint}; run the same command to resume"
    elif out.exists():
        said = f"no item had finished, so none were kept in {out}"
    else:
        said = "no item had finished; nothing was written"
    print(f"vlm-merge: interrupted; {said}", file=sys.stderr)
    return 130


def _judge(args: argparse.Namespace):
    """The judge `--judge-model` names (None without one)."""
    if not args.judge_model:
        return None
    from eval.judge import DEFAULT_CACHE, make_judge

    cache = DEFAULT_CACHE if args.judge_cache is None else None if args.judge_cache == "none" else args.judge_cache
    return make_judge(args.judge_model, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env,
                      concurrency=args.judge_concurrency, max_retries=args.judge_retries, timeout=args.judge_timeout,
                      cache_dir=cache, device=args.judge_device, max_tokens=args.judge_max_tokens)


def _metric_list(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def cmd_eval(args: argparse.Namespace) -> int:
    from eval.metrics import make_scorers
    from eval.protocols import get_protocol
    from eval.runner import PREDICTIONS_FILE, SCORES_FILE, evaluate
    from vlm_merge.io.hub import with_revision
    from vlm_merge.io.tracking import Tracker, check_report_to, log_eval_scores

    metrics = _metric_list(args.metrics)
    judge = _judge(args)
    scorers = make_scorers(metrics or get_protocol(args.protocol).metrics, judge)  # a judge metric without a judge: now
    tracker = Tracker(check_report_to(args.report_to), Path(args.out).expanduser(), f"eval {Path(args.out).name}")
    replacing = _replacing(args.out, args.force)
    try:
        result = evaluate(
            with_revision(args.model, args.revision), args.bench, protocol=args.protocol, template=args.template, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, limit=args.limit,
            metrics=metrics, scorers=scorers,
            batch_size=args.batch_size, out_dir=args.out, force=args.force, data=args.data, cache_dir=args.cache_dir,
            device=args.device, dtype=args.dtype, seed=args.seed, progress=not args.quiet, model_name=args.name,
            backend=args.backend, mmproj=args.mmproj, processor_dir=args.processor,
        )
    except KeyboardInterrupt:
        return _interrupted(Path(args.out).expanduser() / PREDICTIONS_FILE, replacing)
    meta = result.metadata
    print(f"{meta['benchmark']['name']} · protocol {meta['protocol']['name']} · {meta['benchmark']['questions_evaluated']} "
          f"questions ({meta['resumed_from_checkpoint']} resumed) · model {meta['model']['name']}")
    print(_format_scores(meta["scores"], list(meta["scores"])))
    print(f"predictions: {result.out_dir / 'predictions.jsonl'}\nscores: {result.out_dir / SCORES_FILE}")
    if args.evalmm:
        from eval.evalmm import EVALUATION_FILE, PREDICTION_FILE, evalmm_evaluation, evalmm_records
        from eval.outputs import jsonl, write_atomic

        write_atomic(result.out_dir / PREDICTION_FILE, jsonl(evalmm_records(result.predictions)))
        write_atomic(result.out_dir / EVALUATION_FILE, jsonl([evalmm_evaluation(result.predictions)]))
        print(f"llm-jp-eval-mm files: {result.out_dir / PREDICTION_FILE}, {result.out_dir / EVALUATION_FILE}")
    log_eval_scores(tracker, meta["scores"], {"benchmark": meta["benchmark"]["name"], "model": meta["model"]["name"],
                                              "questions": meta["benchmark"]["questions_evaluated"]})
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from eval.metrics import score_predictions
    from eval.model_loading import library_versions
    from eval.outputs import read_jsonl
    from vlm_merge.errors import VlmMergeError

    from eval.evalmm import is_evalmm_record, read_evalmm_predictions

    path = Path(args.predictions)
    records = read_jsonl(path)
    if not records:
        raise VlmMergeError(f"{path}: no predictions")
    form = "llm-jp-eval-mm" if is_evalmm_record(records[0]) else "vlm-merge"
    if form == "llm-jp-eval-mm":
        records = read_evalmm_predictions(records, str(path))
    else:  # ours: answer and prediction on every line (the answer may come from --bench)
        records = read_jsonl(path, ("prediction",) if args.bench else ("answer", "prediction"))
    if args.bench:
        records = _join_benchmark(records, args.bench, args.data, path)
    for n, r in enumerate(records, 1):
        for key in ("answer", "prediction"):
            if not isinstance(r.get(key), str):
                hint = "; pass --bench (and --data) to take answers from the benchmark" if key == "answer" else ""
                raise VlmMergeError(f"{path}: record {n}: {key!r} is {type(r.get(key)).__name__}, not a string{hint}")
    metrics = _metric_list(args.metrics) or []
    meta = [{**({"question": r["question"]} if isinstance(r.get("question"), str) else {}), **(r.get("meta") or {})}
            for r in records]
    report = score_predictions([r["answer"] for r in records], [r["prediction"] for r in records], metrics,
                               seed=args.seed, meta=meta, judge=_judge(args))
    out = {"file": str(path), "format": form, "n": len(records), "scores": report.to_json()["aggregate"],
           "scorers": report.scorers, "bootstrap": report.bootstrap, "libraries": library_versions()}
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


def _join_benchmark(records: list[dict], bench: str, data: str | None, path: Path) -> list[dict]:
    """Predictions joined by question_id with the benchmark's questions: answer, question and the question's other
    columns (a Heron-Bench judge needs each question's context and category)."""
    from eval.benchmarks import load_benchmark
    from vlm_merge.errors import VlmMergeError

    questions = {q.question_id: q for q in load_benchmark(bench, data).questions}
    joined = []
    for n, r in enumerate(records, 1):
        q = questions.get(str(r.get("question_id")))
        if q is None:
            raise VlmMergeError(f"{path}: record {n}: question_id {r.get('question_id')!r} is not in benchmark {bench}")
        joined.append({**r, "answer": q.answer, "question": q.question, "meta": {**q.meta, **(r.get("meta") or {})}})
    return joined


def cmd_compare(args: argparse.Namespace) -> int:
    from eval.compare import compare

    report = compare(args.runs, args.out, force=args.force)
    print(f"comparison: {report}\nplots: {report.parent / 'scores.png'}, {report.parent / 'answer_lengths.png'}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from eval.captioning import CAPTIONS_FILE, DEFAULT_CAPTION_PROMPT, GALLERY_FILE, caption
    from eval.decoding import GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  repetition_penalty=args.repetition_penalty)
    replacing = _replacing(args.out, args.force)
    try:
        result = caption(
            args.images, args.model, prompt=args.prompt or DEFAULT_CAPTION_PROMPT, template=args.template,
            settings=settings, batch_size=args.batch_size, out_dir=args.out, force=args.force, max_side=args.max_side,
            device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, progress=not args.quiet,
            model_name=args.name,
        )
    except KeyboardInterrupt:
        return _interrupted(Path(args.out).expanduser() / CAPTIONS_FILE, replacing)
    print(f"{len(result.captions)} images captioned, {len(result.skipped)} skipped")
    for s in result.skipped:
        print(f"  skipped {s['reason']}")
    print(f"captions: {result.out_dir / 'captions.jsonl'}\ngallery: {result.out_dir / GALLERY_FILE}")
    return 0


def _model_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="model directory or Hugging Face id (ORG/NAME[@REVISION])")
    s.add_argument("--name", help="model name shown in tables (default: the directory name)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call (default 8)")
    s.add_argument("--cache-dir", help="Hugging Face hub cache to look ids up in and download to (default: HF_HUB_CACHE)")
    s.add_argument("--offline", action="store_true", help="never download: Hugging Face ids come from the cache only")
    s.add_argument("--force", action="store_true", help="start over instead of resuming a run in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _judge_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("LLM judge (metrics heron-bench, heron-bench-evalmm, llm-as-a-judge)")
    g.add_argument("--judge-model", help="judge model name at an OpenAI-compatible endpoint (e.g. gpt-4o-2024-11-20), "
                                         "or a local model directory (a transformers judge)")
    g.add_argument("--judge-base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM, "
                                            "llama.cpp, Ollama, transformers serve; default OpenAI's)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; a local server needs none)")
    g.add_argument("--judge-concurrency", type=_positive_int, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--judge-retries", type=_non_negative_int, default=5,
                   help="retries with exponential backoff on 429 / 5xx / timeouts / connection errors (default 5)")
    g.add_argument("--judge-timeout", type=_positive_float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--judge-cache", default=None,
                   help="judgment cache directory (default ~/.cache/vlm-merge/judge; 'none' to disable)")
    g.add_argument("--judge-max-tokens", type=_positive_int,
                   help="cap the judge's reply length (default: the metric's published max_tokens, 1024)")
    g.add_argument("--judge-device", default="cpu", help="device of a local transformers judge (default cpu)")


def add_eval_commands(sub) -> None:
    """Register eval, score, compare and caption on `vlm-merge`'s subparsers."""
    s = sub.add_parser("eval", help="score a model on a Japanese VLM benchmark (resumable)")
    _model_options(s)
    s.add_argument("--bench", required=True,
                   help=f"benchmark: {', '.join(BENCHMARKS)}, or a JSONL/CSV/parquet file or dataset directory "
                        "(image|image_path, question, answer; or image, qas)")
    s.add_argument("--data", help="where a registered benchmark's files are: dataset directory, parquet file, "
                                  "or another Hub id in the cache (default: its Hub id in the local caches)")
    s.add_argument("--protocol", default="sakana",
                   help=f"{', '.join(f'{n} ({p.questions}, {p.template})' for n, p in PROTOCOLS.items())}; default sakana")
    s.add_argument("--template", help=f"override the protocol's prompt template: {', '.join(TEMPLATES)}")
    s.add_argument("--max-new-tokens", type=_positive_int, help="override the protocol's max_new_tokens")
    s.add_argument("--num-beams", type=_positive_int, help="override the protocol's number of beams (1 = greedy)")
    s.add_argument("--repetition-penalty", type=_positive_float, help="override the protocol's repetition penalty")
    s.add_argument("--limit", type=_positive_int, help="only the first N selected questions")
    s.add_argument("--metrics", help=f"override the protocol's metrics, comma-separated: {', '.join(all_scorers())} "
                                     "(content-accuracy: the miniature world's files)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    s.add_argument("--out", required=True, help="run directory: predictions.jsonl, scores.json, run.json")
    s.add_argument("--evalmm", action="store_true",
                   help="also write llm-jp-eval-mm's prediction.jsonl (question_id, text, answer, input_text, scores) "
                        "and evaluation.jsonl")
    _judge_options(s)
    s.add_argument("--revision", help="branch, tag or commit of a Hugging Face id --model (same as ORG/NAME@REVISION)")
    s.add_argument("--report-to", action="append", metavar="BACKEND",
                   help="also send the scores to tensorboard (OUT/tensorboard/) and/or wandb (repeatable or comma-separated)")
    s.add_argument("--backend", choices=("transformers", "llama.cpp"), default="transformers",
                   help="who answers: transformers (default) or llama.cpp (--model a .gguf file, with --mmproj)")
    s.add_argument("--mmproj", help="llama.cpp backend: the vision tower + projector GGUF (export-gguf's mmproj-*.gguf)")
    s.add_argument("--processor", help="llama.cpp backend: the HF processor directory that builds prompts and token "
                                       "ids (default: the processor/ folder export-gguf writes beside the GGUF)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("score", help="re-score a predictions JSONL (ours, or llm-jp-eval-mm's prediction.jsonl) "
                                     "and print JSON")
    s.add_argument("predictions", help="JSONL with answer and prediction per line, or llm-jp-eval-mm's "
                                       "prediction.jsonl (question_id, text[, answer, input_text])")
    s.add_argument("--bench", help="take answers, questions and question columns from this benchmark by question_id "
                                   "(needed for llm-jp-eval-mm files without answers, and for heron-bench)")
    s.add_argument("--data", help="where --bench's files are (as for eval)")
    s.add_argument("--metrics", default=",".join(DEFAULT_SCORERS),
                   help=f"comma-separated: {', '.join(all_scorers())} (default: {', '.join(DEFAULT_SCORERS)})")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    _judge_options(s)
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("compare", help="tables and plots of several eval runs (scores, answer lengths)")
    s.add_argument("runs", nargs="+", help="eval run directories, or directories holding them")
    s.add_argument("--out", default="out/compare", help="output directory (default out/compare)")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("caption", help="caption your own images (Japanese by default) into an HTML gallery")
    _model_options(s)
    s.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    s.add_argument("--prompt", help="question asked about every image (default: a Japanese request to describe it)")
    s.add_argument("--template", default="chat", help=f"prompt template: {', '.join(TEMPLATES)} (default chat)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=256, help="default 256")
    s.add_argument("--num-beams", type=_positive_int, default=1, help="default 1 (greedy)")
    s.add_argument("--repetition-penalty", type=_positive_float, default=1.0, help="default 1.0")
    s.add_argument("--max-side", type=_positive_int, default=MAX_SIDE,
                   help=f"downscale larger images to this many pixels on a side (default {MAX_SIDE})")
    s.add_argument("--out", required=True, help="output directory: captions.jsonl, gallery.html")
    s.set_defaults(func=cmd_caption)
