"""Evaluation protocols: which questions, which prompt, which decoding, which metrics, as published.

- `sakana`: SakanaAI/evolutionary-model-merge (EvoVLM-JP-v1-7B, configs/vlm/evovlm-v1-jp-7b.yaml):
  the first QA of each JA-VG-VQA-500 image (500 questions; every row of In-the-Wild), the
  `ja-shisa-vqa` prompt (pinned: every model is prompted in it, as Sakana prompted EvoVLM-JP; when a
  model's own chat template differs, e.g. llava-1.5's `USER: … ASSISTANT:`, `eval` says so in one line and
  `scores.json` records both; `--template chat` prompts each model in its own), beam search with 5 beams, repetition penalty 1.5, at most 512 new tokens,
  float16 on GPU; ROUGE-L with MeCab tokens, also under the strict-Japanese rule.
- `llm-jp`: llm-jp-eval-mm (tasks ja_vg_vqa_500 / ja_vlm_bench_in_the_wild, examples/sample.py
  defaults): every QA, the model's own chat template, greedy, at most 256 new tokens; `rougel` is
  the mean per-sample ROUGE-L. (llm-jp-eval-mm now normalises with NFKC instead of neologdn; scores
  here use Sakana's normalisation for both protocols, so they are comparable with each other.)

- `heron`: Japanese-Heron-Bench: every question, the model's own chat template, greedy, at most 256 new tokens
  (llm-jp-eval-mm's defaults), scored by `heron-bench` (Heron's judge protocol, `eval.judge_metrics`; a judge is
  required: `--judge-model`).

Overriding any setting (template, decoding) is recorded in the score file as an override, and such
a run is only compared with runs that have the same overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from eval.benchmarks import QUESTION_SELECTIONS
from eval.decoding import GenerationSettings
from eval.metrics import DEFAULT_SCORERS, all_scorers
from eval.prompts import get_template
from vlm_merge.errors import VlmMergeError


@dataclass(frozen=True)
class Protocol:
    name: str
    questions: str  # one of QUESTION_SELECTIONS
    template: str  # key of eval.prompts.TEMPLATES
    generation: GenerationSettings
    gpu_dtype: str  # dtype on CUDA unless the user picks one (CPU always defaults to float32)
    headline: tuple[str, ...]  # score columns shown first in tables and plots
    reference: str
    metrics: tuple[str, ...] = DEFAULT_SCORERS
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.questions not in QUESTION_SELECTIONS:
            raise VlmMergeError(f"protocol {self.name}: unknown question selection {self.questions!r}")
        get_template(self.template)

    def with_overrides(self, template: str | None = None, metrics: Sequence[str] | None = None, **generation) -> Protocol:
        """This protocol with another template, metrics (scorer names) and/or decoding settings; the changes
        are recorded."""
        changes = {k: v for k, v in generation.items() if v is not None and getattr(self.generation, k) != v}
        overrides = dict(self.overrides)
        proto = self
        if metrics is not None and tuple(metrics) != self.metrics:
            known = all_scorers()
            unknown = [m for m in metrics if m not in known]
            if unknown or not metrics:
                raise VlmMergeError(f"unknown metric {(unknown or [''])[0]!r}: choose from {', '.join(known)}")
            overrides["metrics"] = list(metrics)
            proto = replace(proto, metrics=tuple(metrics))
        if template is not None and template != self.template:
            get_template(template)
            overrides["template"] = template
            proto = replace(proto, template=template)
        if changes:
            overrides.update(changes)
            proto = replace(proto, generation=replace(self.generation, **changes))
        return replace(proto, overrides=overrides)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["generation"] = self.generation.as_dict()
        d["headline"] = list(self.headline)
        d["metrics"] = list(self.metrics)
        return d


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="sakana",
            questions="first-per-image",
            template="ja-shisa-vqa",
            generation=GenerationSettings(max_new_tokens=512, num_beams=5, repetition_penalty=1.5),
            gpu_dtype="float16",
            headline=("rougeL", "rougeL_ja"),
            reference="SakanaAI/evolutionary-model-merge configs/vlm/evovlm-v1-jp-7b.yaml + evomerge/eval",
        ),
        Protocol(
            name="llm-jp",
            questions="all",
            template="chat",
            generation=GenerationSettings(max_new_tokens=256, num_beams=1, repetition_penalty=1.0),
            gpu_dtype="float16",
            headline=("rougeL", "rougeL_ja"),
            reference="llm-jp/llm-jp-eval-mm tasks ja_vg_vqa_500, ja_vlm_bench_in_the_wild; examples/sample.py",
        ),
        Protocol(
            name="heron",
            questions="all",
            template="chat",
            generation=GenerationSettings(max_new_tokens=256, num_beams=1, repetition_penalty=1.0),
            gpu_dtype="float16",
            headline=("heron", "heron_conv", "heron_detail", "heron_complex"),
            reference="turingmotors/heron heron/eval/eval_heron_bench.py (judge) + llm-jp-eval-mm examples/sample.py "
                      "(generation); needs --judge-model",
            metrics=("heron-bench",),
        ),
    )
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise VlmMergeError(f"unknown protocol {name!r}: choose from {', '.join(PROTOCOLS)}") from None
