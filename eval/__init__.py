"""Evaluation of image-text-to-text models on Japanese VLM benchmarks, and captioning.

Public API (imported on first use, so `import eval` stays light; without the `eval` extra installed, using
it is one line naming the extra: `pip install 'vlm-merge[eval]'`):

- `evaluate(model, bench, …) -> EvalResult`, `encode_benchmark_images` (eval.runner)
- `caption(images, model, …) -> CaptionResult` (eval.captioning)
- `load_benchmark`, `BENCHMARKS` (eval.benchmarks); `PROTOCOLS` (eval.protocols); `TEMPLATES` (eval.prompts)
- `generate`, `generate_answers`, `encode_images`, `GenerationSettings` (eval.generation, eval.decoding)
- `score_predictions`, `all_scorers` (built-in and registered scorers) (eval.metrics)
- `make_judge` (an LLM judge: OpenAI-compatible endpoint or local model, with its judgment cache) (eval.judge)
"""

from importlib import import_module

_EXPORTS = {
    "evaluate": "eval.runner",
    "EvalResult": "eval.runner",
    "encode_benchmark_images": "eval.runner",
    "caption": "eval.captioning",
    "CaptionResult": "eval.captioning",
    "load_benchmark": "eval.benchmarks",
    "Benchmark": "eval.benchmarks",
    "BENCHMARKS": "eval.benchmarks",
    "PROTOCOLS": "eval.protocols",
    "TEMPLATES": "eval.prompts",
    "generate": "eval.generation",
    "generate_answers": "eval.generation",
    "encode_images": "eval.generation",
    "GenerationSettings": "eval.decoding",
    "score_predictions": "eval.metrics",
    "all_scorers": "eval.metrics",
    "make_judge": "eval.judge",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from vlm_merge.extras import require_extra

        require_extra("eval", f"eval.{name}")
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
