"""The fitness of a candidate: its recipe merged into a live model and scored on the fitness questions.

`Evaluator` is one evaluating process (this one, or a Ray actor of `vlm_merge.evolve.workers`): the
sources resident in memory, one live model, image features cached for the whole run. `kind: generate`
scores generated answers with eval's scorers; `kind: loglik` is `LogLikelihood`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import EvolveConfig, FitnessConfig, config_error, held_out_fitness, score_columns
from vlm_merge.evolve.genome import Genome, inert_genes, num_layers_of
from vlm_merge.recipe import Recipe, SlicesRecipe


def fitness_questions(f: FitnessConfig, where: str = "fitness.metrics"):
    """The benchmark and question pool that `f` names, checked against its metrics: a metric the data cannot
    feed (e.g. content accuracy on a file without attribute/value columns) is a one-line error naming `where`."""
    from eval.benchmarks import load_benchmark
    from eval.metrics import check_meta
    from eval.protocols import get_protocol

    bench = load_benchmark(f.benchmark, f.data, split=f.split)
    pool = bench.select(get_protocol(f.protocol).questions, f.limit)
    if f.kind == "generate":
        try:
            check_meta(scorer_names(f), [q.meta for q in pool])
        except VlmMergeError as e:
            raise config_error(where, f"{f.benchmark}: {e}") from None
    return bench, pool


def scorer_names(f: FitnessConfig) -> list[str]:
    """The eval scorers that write the score columns `f.metrics` names, each once."""
    columns = score_columns()
    return list(dict.fromkeys(columns[c] for c in f.metrics))


def check_data(cfg: EvolveConfig):
    """Read the fitness questions and the `test:` split's and check them against their metrics, before any
    model is written or loaded (minutes for 7B sources), so a wrong path or metric fails at once and not after
    the search. Returns the fitness benchmark and question pool (`fitness_questions`) and the `test:` split's
    (None without one), so neither file is read again: the search and the held-out report use these."""
    questions = fitness_questions(cfg.fitness)
    return questions, fitness_questions(held_out_fitness(cfg), "test.metric") if cfg.test is not None else None


@dataclass(frozen=True)
class Scored:
    """A candidate's result: its fitness (the penalty if it failed, with `error`), score columns and timings."""

    fitness: float
    scores: dict[str, float]
    merge_s: float
    eval_s: float
    questions: int
    error: str | None = None


class LogLikelihood:
    """Mean per-token log-likelihood of the reference answers under teacher forcing (no generation).

    Input per question: the protocol's prompt (image placeholder expanded to the image's feature
    tokens) followed by the answer's tokens and EOS; the score of a question is the mean log-probability
    of its answer tokens (EOS included), the column `loglik` their mean over questions.
    """

    name = "loglik"

    def __init__(self, model, processor, template: str) -> None:
        self.model, self.processor, self.template = model, processor, template
        tok = processor.tokenizer
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tok.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    def __call__(self, questions, encoded, batch_size: int) -> list[float]:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        from eval.generation import model_dtype
        from eval.prompts import build_prompt, image_token

        tok, model = self.processor.tokenizer, self.model
        token = image_token(self.processor)
        dtype, dev = model_dtype(model), model.device
        out: list[float] = []
        with torch.inference_mode():
            for s in range(0, len(questions), batch_size):
                batch = questions[s : s + batch_size]
                rows, starts, feats = [], [], []
                for q in batch:
                    img = encoded[q.image_key]
                    prompt = build_prompt(self.processor, q.question, self.template).replace(token, token * img.n_tokens, 1)
                    p_ids = tok(prompt).input_ids
                    a_ids = tok(q.answer, add_special_tokens=False).input_ids + ([self.eos] if self.eos is not None else [])
                    rows.append(p_ids + a_ids)
                    starts.append(len(p_ids))
                    feats.append(img.features.to(dev, dtype))
                width = max(map(len, rows))
                ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                               mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)}).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
                for i, r in enumerate(rows):
                    out.append(float(logp[i, starts[i] - 1 : len(r) - 1].mean()))
        return out


class Evaluator:
    """Resident sources + one live model + cached image features: scores recipes in-process."""

    def __init__(self, config: EvolveConfig, scaffold: str | Path, *, resident: bool = True, questions=None) -> None:
        """`scaffold`: a model directory of the merge's architecture, loaded as the live model; with
        `resident=False` no sources are loaded and the model at `scaffold` itself is scored. `questions`:
        the fitness benchmark and pool if already read (`check_data`), else they are read here."""
        import torch

        from eval.metrics import make_scorers
        from eval.model_loading import load_model
        from eval.protocols import get_protocol
        from eval.runner import encode_benchmark_images
        from vlm_merge.engine import ResidentMerger

        if config.threads is not None:  # for the whole process (a Ray actor's is its own); `run_evolve` restores it
            torch.set_num_threads(config.threads)
        self.config = config
        f = config.fitness
        self.protocol = get_protocol(f.protocol).with_overrides(
            template=f.template, max_new_tokens=f.max_new_tokens, num_beams=f.num_beams, repetition_penalty=f.repetition_penalty
        )
        self.model, self.processor = load_model(scaffold, device=config.device, dtype=config.model_dtype, gpu_dtype=self.protocol.gpu_dtype,
                                               progress=False)
        self.merger = None
        if resident and config.space != "ps":  # a layer route: the pool's layers, switched per candidate
            from vlm_merge.evolve.dfs import DfsGenome, DfsMerger, dfs_vlm

            self.merger = DfsMerger.open(self.model, [role for role, _ in DfsGenome.of(config).pool], dfs_vlm(config))
        elif resident:
            genome = Genome.of(config, num_layers_of(config))
            self.merger = ResidentMerger.open(genome.decode(genome.x0()), self.model)
        self.bench, self.pool = questions or fitness_questions(f)
        self.by_id = {q.question_id: q for q in self.pool}
        if f.kind == "generate":
            self.scorers = make_scorers(scorer_names(f))
        else:
            self.loglik = LogLikelihood(self.model, self.processor, self.protocol.template)
        self.encoded = encode_benchmark_images(self.model, self.processor, self.bench, self.pool, batch_size=f.batch_size)

    def score(self, recipe: Recipe | SlicesRecipe | dict, question_ids: Sequence[str] | None = None) -> Scored:
        """Merge `recipe` into the live model and score it; failures score the penalty with the error."""
        from vlm_merge.engine import CandidateError

        f = self.config.fitness
        qs = self.pool if question_ids is None else [self.by_id[q] for q in question_ids]
        t0 = time.perf_counter()
        try:
            self.merger.apply(recipe)
        except CandidateError as e:
            return Scored(f.penalty, {}, time.perf_counter() - t0, 0.0, len(qs), f"merge: {e}")
        t1 = time.perf_counter()
        try:
            scores = self._scores(qs)
            value = sum(w * scores[c] for c, w in f.metrics.items())
            if not math.isfinite(value):
                raise ValueError(f"fitness is {value}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a candidate is logged and penalised
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return Scored(f.penalty, {}, t1 - t0, time.perf_counter() - t1, len(qs), f"evaluation: {type(e).__name__}: {first}")
        return Scored(float(value), scores, t1 - t0, time.perf_counter() - t1, len(qs))

    def inert_genes(self) -> dict[str, str]:
        """`inert_genes` of this run's full genome on the resident sources (none in a DFS search)."""
        if self.config.space != "ps":
            return {}
        return inert_genes(Genome.of(self.config, self.merger.num_layers), self.merger)

    def _scores(self, qs) -> dict[str, float]:
        f = self.config.fitness
        if f.kind == "loglik":
            vals = self.loglik(qs, self.encoded, f.batch_size)
            return {"loglik": float(np.mean(vals))}
        res = self.generate(qs)
        return {c: float(res.scores[c].mean) for c in f.metrics}

    def generate(self, qs):
        """eval's `evaluate` of the live model on questions `qs` under the fitness protocol (its scorers)."""
        from eval.runner import evaluate

        bench = replace(self.bench, questions=list(qs))
        return evaluate(self.model, bench, processor=self.processor, protocol=self.protocol, batch_size=self.config.fitness.batch_size,
                        encoded_images=self.encoded, scorers=self.scorers, progress=False)

    def predict(self, question_ids: Sequence[str] | None = None) -> dict[str, str]:
        """The live model's generated answers (question id -> text) under the fitness protocol
        (`fitness.kind: generate`), e.g. to score them with a metric outside the registry."""
        qs = self.pool if question_ids is None else [self.by_id[q] for q in question_ids]
        return {r["question_id"]: r["prediction"] for r in self.generate(qs).predictions}


def generation_text(f: FitnessConfig) -> str:
    """How answers are generated under `f` (protocol and its overrides), for reports."""
    from eval.protocols import get_protocol

    p = get_protocol(f.protocol).with_overrides(template=f.template, max_new_tokens=f.max_new_tokens, num_beams=f.num_beams,
                                                repetition_penalty=f.repetition_penalty)
    g = p.generation
    return (f"{p.name} protocol ({p.questions} questions), template {p.template}, max_new_tokens {g.max_new_tokens}, "
            f"num_beams {g.num_beams}, repetition_penalty {g.repetition_penalty:g}")
