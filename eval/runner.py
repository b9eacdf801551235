"""`evaluate(model, bench, …)`: generate answers for a benchmark under a protocol and score them.

Works in-process on a live model object (the evolutionary search's fitness function: load the
benchmark once, `encode_benchmark_images` once, then `evaluate` each candidate without any file I/O),
or from a path (loaded offline). With `out_dir`, predictions are checkpointed to
`predictions.jsonl` after every batch and an interrupted run resumes from them; at the end
`predictions.jsonl` is rewritten with per-sample scores and `scores.json` holds the aggregates and
everything needed to decide whether two numbers are comparable (`comparable_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from eval.benchmarks import Benchmark, Question, load_benchmark, scoring_meta
from eval.decoding import GenerationSettings
from eval.generation import EncodedImage, encode_images, generate
from eval.metrics import Aggregate, Scorer, check_meta, score_predictions
from eval.model_loading import describe_model, library_versions, load_model
from eval.outputs import Checkpoint, check_resumable, dumps, has_items, write_atomic
from eval.prompts import get_template, prompt_record
from eval.protocols import Protocol, get_protocol
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.outputs import RunDir

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
CHUNK_BATCHES = 16  # images of this many batches are decoded at a time


@dataclass
class EvalResult:
    scores: dict[str, Aggregate]  # column -> mean and bootstrap low/mid/high
    predictions: list[dict]  # one per question, with per-sample scores
    metadata: dict  # protocol, template, generation, model, dataset, libraries, …
    out_dir: Path | None = None
    headline: tuple[str, ...] = field(default=())

    def summary(self) -> dict[str, float]:
        """Headline columns -> mean (the numbers a search optimises)."""
        return {name: self.scores[name].mean for name in self.headline if name in self.scores}


def comparable_key(metadata: dict) -> str:
    """Hash of what makes two scores comparable: benchmark data and selection, protocol, prompt, decoding."""
    keep = {
        "benchmark": {k: metadata["benchmark"].get(k) for k in ("name", "split", "fingerprint", "question_ids_sha256")},
        "protocol": metadata["protocol"]["name"],
        "questions": metadata["protocol"]["questions"],
        # "chat" means each model's own template (as llm-jp-eval-mm compares models); others are fixed text
        "template": metadata["prompt"]["template"] if metadata["prompt"]["template"] == "chat" else metadata["prompt"]["text"],
        "generation": metadata["generation"],
        "metrics": sorted(metadata["scorers"]),
    }
    judges = {name: [s["judge"].get("identity", s["judge"].get("model")), s.get("prompt_sha256")]
              for name, s in sorted(metadata["scorers"].items()) if isinstance(s.get("judge"), dict)}
    if judges:  # a judge metric's number depends on the judge and its prompt (eval.judge_metrics)
        keep["judges"] = judges
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def encode_benchmark_images(
    model, processor, bench: Benchmark, questions: list[Question] | None = None, *, batch_size: int = 8,
    progress: bool = False,
) -> dict[str, EncodedImage]:
    """Vision-tower + projector features of every image the questions use, by image key (compute once)."""
    keys = list(dict.fromkeys(q.image_key for q in (questions if questions is not None else bench.questions)))
    encoded: dict[str, EncodedImage] = {}
    step = max(1, batch_size) * CHUNK_BATCHES
    for start in range(0, len(keys), step):
        chunk = keys[start : start + step]
        feats = encode_images(model, processor, [bench.image(k) for k in chunk], batch_size=batch_size, progress=progress)
        encoded.update(zip(chunk, feats))
    return encoded


def _question_ids_hash(questions: list[Question]) -> str:
    return hashlib.sha256("\n".join(q.question_id for q in questions).encode()).hexdigest()[:16]


def evaluate(
    model,
    bench: str | Path | Benchmark,
    *,
    processor=None,
    protocol: str | Protocol = "sakana",
    template: str | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    repetition_penalty: float | None = None,
    metrics: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    force: bool = False,
    encoded_images: Mapping[str, EncodedImage] | None = None,
    model_name: str | None = None,
    data: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    seed: int = 0,
    scorers: Sequence[Scorer] | None = None,
    judge=None,
    progress: bool = True,
    backend: str = "transformers",
    mmproj: str | Path | None = None,
    processor_dir: str | Path | None = None,
) -> EvalResult:
    """Score `model` (a live model with `processor`, or a path) on `bench` under `protocol`.

    `template`, `max_new_tokens`, `num_beams`, `repetition_penalty` and `metrics` (scorer names) override
    the protocol (recorded).
    `encoded_images` (from `encode_benchmark_images`) skips the vision tower. `seed` seeds the bootstrap.
    `scorers` (from `eval.metrics.make_scorers(protocol.metrics)`) saves re-creating the tokenizer and
    language ID model when a search calls `evaluate` many times. `judge` (`eval.make_judge(...)`) is the LLM judge
    of judge metrics named in `metrics` / the protocol (`heron-bench`, `llm-as-a-judge`, ...).
    `backend="llama.cpp"`: `model` is a GGUF file answered by llama.cpp with `mmproj` (`eval.llamacpp`).
    """
    if backend not in BACKENDS:
        raise VlmMergeError(f"backend {backend!r}; choose from {', '.join(BACKENDS)}")
    proto = get_protocol(protocol).with_overrides(
        template=template, metrics=metrics, max_new_tokens=max_new_tokens, num_beams=num_beams,
        repetition_penalty=repetition_penalty,
    )
    if not isinstance(model, (str, Path)) and processor is None:
        raise VlmMergeError("evaluate(model, …) with a model object needs processor=")
    paths = [x for x in (model, bench, data) if isinstance(x, (str, Path))]
    run = RunDir(out_dir, force, paths) if out_dir else None  # checked now, created after the other checks
    benchmark = bench if isinstance(bench, Benchmark) else load_benchmark(bench, data, cache_dir=cache_dir)
    questions = benchmark.select(proto.questions, limit)
    check_meta(scorers if scorers is not None else proto.metrics, [scoring_meta(q) for q in questions])  # before any work
    if encoded_images is None:
        benchmark.check_images(questions)  # every image file there and an image, before the model loads
    bench_meta = {**benchmark.describe(), "questions_evaluated": len(questions), "limit": limit,
                  "question_ids_sha256": _question_ids_hash(questions)}
    if run is not None and not force:  # a resume with other settings fails now, not after loading the model
        named = {"name_or_path": str(model)} if isinstance(model, (str, Path)) else None
        known_prompt = {"template": get_template(proto.template).name}
        check_resumable(run.target, PREDICTIONS_FILE, _run_config(proto, known_prompt, bench_meta, named))
    if backend == "llama.cpp":
        from eval.llamacpp import load_llamacpp

        model, processor = load_llamacpp(model, mmproj, processor_dir)
    elif isinstance(model, (str, Path)):
        model, processor = load_model(model, device=device, dtype=dtype, gpu_dtype=proto.gpu_dtype, cache_dir=cache_dir,
                                      progress=progress)
    source = ("--template (override)" if "template" in proto.overrides
              else f"protocol {proto.name}" if proto.template != "chat" else "the model's own chat template")
    prompt = prompt_record(processor, proto.template, source, questions[0].question if questions else None)
    if "note" in prompt:
        log.warning("%s", prompt["note"])
    metadata = {
        "protocol": proto.as_dict(),
        "prompt": prompt,
        "generation": proto.generation.as_dict(),
        "benchmark": bench_meta,
        "model": model.describe(model_name) if backend == "llama.cpp" else describe_model(model, model_name),
        "batch_size": batch_size,
        "bootstrap_seed": seed,
    }
    run_config = _run_config(proto, {k: prompt[k] for k in ("template", "text")}, bench_meta, metadata["model"])

    with run.open(has_items(PREDICTIONS_FILE)) if run else nullcontext() as run_path:
        checkpoint = Checkpoint(run_path, PREDICTIONS_FILE, "question_id", run_config) if run else None
        done: dict[str, dict] = dict(checkpoint.done) if checkpoint else {}
        todo = [q for q in questions if q.question_id not in done]
        started = time.perf_counter()
        _generate_missing(model, processor, benchmark, todo, proto, batch_size, encoded_images, done, checkpoint, progress,
                          backend)
        generation_s = time.perf_counter() - started

        records = [done[q.question_id] for q in questions]
        report = score_predictions([r["answer"] for r in records], [r["prediction"] for r in records],
                                   scorers if scorers is not None else proto.metrics, seed=seed,
                                   meta=[scoring_meta(q) for q in questions], judge=judge)
        predictions = [{**r, **{k: round(v, 6) for k, v in s.items()}} for r, s in zip(records, report.per_sample)]
        metadata.update({
            "scores": {name: agg.as_dict() for name, agg in report.aggregate.items()},
            "headline": list(proto.headline),
            "scorers": report.scorers,
            "bootstrap": report.bootstrap,
            "libraries": library_versions(),
            "generated_this_run": len(todo),
            "resumed_from_checkpoint": len(questions) - len(todo),
            "generation_seconds_this_run": round(generation_s, 3),
        })
        metadata["comparable_key"] = comparable_key(metadata)
        if checkpoint is not None:
            checkpoint.finish(predictions)
            write_atomic(checkpoint.dir / SCORES_FILE, dumps(metadata))
    return EvalResult(scores=report.aggregate, predictions=predictions, metadata=metadata,
                      out_dir=run.target if run else None, headline=proto.headline)


BACKENDS = ("transformers", "llama.cpp")
RUN_MODEL_KEYS = ("name_or_path", "class", "dtype", "config_sha256")  # what identifies the model for a resume


def _run_config(proto: Protocol, prompt: dict, bench_meta: dict, model: dict | None) -> dict:
    """What predictions depend on (a resumed run must match it): protocol without metrics (a run re-scored with
    others resumes from all of them), prompt, generation, benchmark data (the question selection may grow or
    shrink with --limit), and the model (the keys of `model` there are: before loading, only its path)."""
    protocol = {k: v for k, v in proto.as_dict().items() if k != "metrics"}
    protocol["overrides"] = {k: v for k, v in proto.overrides.items() if k != "metrics"}
    config = {"protocol": protocol, "prompt": prompt, "generation": proto.generation.as_dict(),
              "benchmark": {k: bench_meta[k] for k in ("name", "source", "split", "schema", "fingerprint")}}
    if model is not None:
        config["model"] = {k: model[k] for k in RUN_MODEL_KEYS if k in model}
    return config


def _generate_missing(
    model, processor, benchmark: Benchmark, todo: list[Question], proto: Protocol, batch_size: int,
    encoded_images: Mapping[str, EncodedImage] | None, done: dict[str, dict], checkpoint: Checkpoint | None,
    progress: bool, backend: str = "transformers",
) -> None:
    """Generate answers for `todo` chunk by chunk (images decoded per chunk), recording each finished batch."""
    if backend == "llama.cpp":
        from eval.llamacpp import generate_llamacpp as generate_fn
    else:
        generate_fn = generate
    settings: GenerationSettings = proto.generation
    step = max(1, batch_size) * CHUNK_BATCHES
    if encoded_images is not None:
        missing = [q.image_key for q in todo if q.image_key not in encoded_images]
        if missing:
            raise VlmMergeError(f"encoded_images lacks image {missing[0]!r}; encode the benchmark's images first")
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        if encoded_images is not None:
            images = [encoded_images[q.image_key] for q in chunk]
        else:
            cache: dict[str, object] = {}
            images = [cache.setdefault(q.image_key, benchmark.image(q.image_key)) for q in chunk]

        def record(indices: list[int], gens, chunk=chunk) -> None:
            rows = [
                {"question_id": chunk[i].question_id, "image_key": chunk[i].image_key, "question": chunk[i].question,
                 "answer": chunk[i].answer, "prediction": g.text, "prediction_tokens": len(g.token_ids)}
                | ({"meta": dict(chunk[i].meta)} if chunk[i].meta else {})
                for i, g in zip(indices, gens)
            ]
            if checkpoint is not None:
                checkpoint.append(rows)
            done.update((r["question_id"], r) for r in rows)

        generate_fn(model, processor, images, [q.question for q in chunk], template=proto.template, settings=settings,
                 batch_size=batch_size, progress=progress, on_batch=record)
