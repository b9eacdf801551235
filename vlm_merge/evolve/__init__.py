"""Evolutionary merging: CMA-ES over per-layer merge parameters with a VQA fitness (`vlm-merge evolve`).

A run (`run_evolve(config, out)`, or `vlm-merge evolve CONFIG.yaml --out DIR`) searches the parameters
of a merge recipe for the language backbone of a VLM so that a benchmark score is maximised, then
writes the best model. The pieces:

Genome (`Genome`). One gene per (method parameter, source model, layer group [, module]) plus optional
genes for embeddings / norms / lm_head. Every gene is a number x in [0, 1] (CMA-ES runs with
`bounds=[0, 1]`, cma's BoundTransform: the solutions it asks for are always inside), decoded linearly
to the parameter's bounds: value = low + x * (high - low). Bounds come from `genome.params`
(`{weight: [0, 1.5], density: [0.1, 1.0]}`) and must lie in the method's own range. A genome decodes
to an ordinary `Recipe`:
  - layers are cut into groups of `layer_granularity` consecutive layers; a parameter becomes a list of
    one value per layer (the recipe's exact per-layer form), all layers of a group sharing the gene;
  - `split_modules` (`MODULE_SPLITS`): `attention_mlp` (or `true`) gives separate genes for attention
    (`self_attn`, `input_layernorm`) and MLP (`mlp`, `post_attention_layernorm`) of each group;
    `projections` one gene per projection (q, k, v, o, gate, up, down) and per layer norm (attention_norm,
    mlp_norm) of each group; they become `filter_regex` conditions (a `separate: [norms]` gene, listed
    first, takes the layer norms over);
  - `separate: [embeddings, norms, lm_head]`: own genes for `embed_tokens`, every RMSNorm weight
    (`norm.weight$`), `lm_head`; tensors without their own gene follow the recipe rule for tensors
    outside the layers (position 0 of a per-layer list: the first group's gene);
  - per-model parameters (weight, density, ...) get genes per model entering the method; shared
    ones (slerp's `t`, `lambda`) one set; `genome.fixed` values are written as recipe parameters;
  - `drop_inert: true` (the default) leaves out of the search the genes that cannot change the merge
    (`inert_genes`): those that set no tensor (e.g. a projection split's layer-norm genes under a
    `separate: [norms]` gene), and, for a `delta_only` method, those that set only tensors where every
    model equals the base (layers no fine-tune touched). They stay in the recipe at their x0 values;
    `summary.json` lists them under `held_genes` and the checkpoint keeps their names for `--resume`.

Search. CMA-ES (`cma`) in ask/tell form: `popsize`, `sigma0` (in gene units, i.e. fractions of the
bounds), `x0` (a gene value in [0, 1] for all genes, or real parameter values by name), budget
`max_evaluations` (whole generations only) and `seed`. cma's normal draws come from our own
`numpy.random.Generator` seeded with `seed` (the `randn` option; numpy's global RNG is never used),
so a run is deterministic for a seed.

Fitness (`fitness:`). A benchmark (a registered one with `data:`, or a custom JSONL/CSV of image,
question, answer) disjoint from the test split; `kind: generate` scores generated answers with
`eval.evaluate` (protocol, template and decoding settings as in `vlm-merge eval`) and combines score
columns by weights (`metrics: {rougeL: 1.0}`); `kind: loglik` is the mean per-token log-likelihood of
the reference answers under teacher forcing (one forward pass per batch, no generation). Cheap
fitness: `subset: {mode: random, size: K}` scores a generation on K questions drawn for that
generation; `subset: {mode: halving, size: K, eta: 2}` scores everyone on K questions, the best
1/eta on eta*K, ... up to every question; CMA-ES ranks by (rung reached, score). The draws come from
`numpy.random.default_rng([seed, generation])`; each record says which protocol and rung it was
scored under. A candidate that fails (invalid parameter combination, NaN/inf weights, a generation
error) scores `penalty`, is logged with its error, and the run goes on.

Speed. The sources are loaded once (`vlm_merge.engine.resident.ResidentMerger`) into one live model; each
candidate's language model is written into it in place and evaluated in-process, and image features
are computed once per image for the whole run. `workers: N` evaluates a generation's candidates on N
Ray actors, each holding its own resident sources (one GPU each on CUDA, else one CPU slot).

Reliability. After every generation `checkpoint.json` (the counters, the best record, the log length
and the CMA-ES search as data: the values told each generation and the state of the generator of its
normal draws) is written atomically; `log.jsonl` gets one line per candidate as it finishes. `--resume`
rebuilds CMA-ES from its seed by replaying ask/tell with the told values (no merge, no evaluation),
checks that the replay asks for the logged candidates and ends at the stored generator state, drops
log lines past the checkpoint (reusing finished candidates of the interrupted generation whose genome
matches) and continues: a resumed run ends with the same best genome and score as an uninterrupted
one. Nothing is unpickled (a run directory may come from someone else; a pickle can run code): a
checkpoint holding a pickle (older versions wrote cma's) is refused. Ctrl-C anywhere stops with one
line and exit 130; a Ctrl-C during CMA-ES's update or the checkpoint write takes effect once that
generation's checkpoint is on disk (cma's bare `except:` clauses would otherwise swallow it).

Outputs in OUT/: `config.yaml`, `log.jsonl`, `checkpoint.json`, `best_recipe.yaml` (replay with
`vlm-merge merge best_recipe.yaml DIR`), `model/` (the best model), `fitness.png`, `summary.json`.
With `test: {benchmark, data, split, limit, metric, chat_vector_scale}` (a split disjoint from the
fitness questions) the run ends with a held-out report, `test_report.{md,json}`: the best recipe, Chat
Vector at `chat_vector_scale`, the target in the VLM shell (scale 0) and the VLM itself, scored per
question with the fitness protocol's generation, the best compared with each by a paired bootstrap
(`eval.metrics.paired_bootstrap`); `test_predictions/<model>.jsonl` keep every answer and its scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.dfs import SPACES, DfsConfig, DfsGenome, DfsMerger, dfs_config, dfs_vlm
from vlm_merge.io.outputs import clean_stale, output_error, prepare_output_dir, remove, side_path
from vlm_merge.recipe import VLM_REF, ModelEntry, Recipe, read_yaml
from vlm_merge.io.safe_load import load_json

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.json"
BEST_RECIPE_FILE = "best_recipe.yaml"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "fitness.png"
MODEL_DIR = "model"
SCAFFOLD_DIR = ".scaffold"
SEPARATE_GROUPS = ("embeddings", "norms", "lm_head")
SUBSET_MODES = ("none", "random", "halving")
MAX_POPSIZE = 10_000  # candidates per generation; each is a merged model evaluated on the fitness set
FITNESS_KINDS = ("generate", "loglik")
# `genome.split_modules`: the module genes of a layer group and the `filter_regex` each one's tensors match
MODULE_SPLITS: dict[str, dict[str, str]] = {
    "none": {},
    "attention_mlp": {"attention": r"self_attn|input_layernorm", "mlp": r"mlp|post_attention_layernorm"},
    "projections": {"q": r"q_proj", "k": r"k_proj", "v": r"v_proj", "o": r"o_proj", "gate": r"gate_proj", "up": r"up_proj",
                    "down": r"down_proj", "attention_norm": r"input_layernorm", "mlp_norm": r"post_attention_layernorm"},
}
SEPARATE_FILTERS = {"embeddings": {"filter": "embed_tokens"}, "norms": {"filter_regex": r"norm\.weight$"}, "lm_head": {"filter": "lm_head"}}
DEFAULT_BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 0.1), "epsilon": (0.0, 0.1), "lambda": (0.5, 1.5)}


def _err(where: str, msg: str) -> VlmMergeError:
    return VlmMergeError(f"evolve config {where}: {msg}")


# ================================================================================================
# Config


@dataclass(frozen=True)
class SourcesConfig:
    models: tuple[str, ...]  # the models whose parameters are searched ("vlm" = the VLM's language model)
    vlm: str | None = None
    base_model: str | None = None
    target: str | None = None
    tokenizer_source: str | None = None


@dataclass(frozen=True)
class GenomeConfig:
    params: dict[str, tuple[float, float]] = field(default_factory=lambda: {"weight": DEFAULT_BOUNDS["weight"]})
    fixed: dict[str, Any] = field(default_factory=dict)
    layer_granularity: int = 1
    split_modules: str = "none"  # a key of MODULE_SPLITS (the YAML also takes true: attention_mlp, false: none)
    separate: tuple[str, ...] = ()
    drop_inert: bool = True  # leave genes that cannot change the merge out of the search (`inert_genes`)

    @property
    def modules(self) -> tuple[str | None, ...]:
        """The module genes of each layer group (`MODULE_SPLITS`), or (None,): one gene for the whole group."""
        return tuple(MODULE_SPLITS[self.split_modules]) or (None,)


@dataclass(frozen=True)
class SubsetConfig:
    mode: str = "none"
    size: int = 0
    eta: int = 2


@dataclass(frozen=True)
class FitnessConfig:
    benchmark: str
    data: str | None = None
    split: str | None = None
    kind: str = "generate"
    protocol: str = "llm-jp"
    template: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    repetition_penalty: float | None = None
    metrics: dict[str, float] = field(default_factory=lambda: {"rougeL": 1.0})
    limit: int | None = None
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    penalty: float = -1e6
    batch_size: int = 8


@dataclass(frozen=True)
class TestConfig:
    """`test:` the held-out report written after the search (see `held_out_report`)."""

    benchmark: str
    data: str | None = None
    split: str | None = None
    limit: int | None = None
    metric: str = "rougeL"  # the score column compared, per question, with a paired bootstrap
    chat_vector_scale: float = 1.0  # the Chat Vector model reported beside the best one


@dataclass(frozen=True)
class CmaConfig:
    popsize: int | None = None
    sigma0: float = 0.2
    x0: float | dict[str, float] = 0.5
    max_evaluations: int = 32
    seed: int = 0


@dataclass(frozen=True)
class EvolveConfig:
    sources: SourcesConfig
    fitness: FitnessConfig
    method: str = "task_arithmetic"
    genome: GenomeConfig = field(default_factory=GenomeConfig)
    cmaes: CmaConfig = field(default_factory=CmaConfig)
    test: TestConfig | None = None
    dtype: str | None = None  # output dtype of the merged language model (recipe `dtype`)
    device: str = "auto"
    model_dtype: str = "auto"  # dtype the live model is loaded in (auto: float32 on CPU, protocol's on GPU)
    threads: int | None = None  # torch threads in each evaluating process (None: torch's default)
    workers: int = 0  # Ray actors; 0 = evaluate in this process
    recipe_seed: int = 0  # `seed` of every decoded recipe (DARE / DELLA masks)
    space: str = "ps"  # ps: parameter space; dfs / ps+dfs: a layer route (vlm_merge.evolve.dfs)
    dfs: DfsConfig | None = None

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        """Hash of everything results depend on (`workers` only changes where candidates run)."""
        d = self.to_dict()
        d.pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _build(cls, data: Any, where: str, conv: Mapping[str, Callable[[Any, str], Any]] | None = None):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _err(where, f"expected a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in known:
            raise _err(f"{where}.{k}".lstrip("."), f"unknown key (known: {', '.join(known)})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = (conv or {}).get(k, lambda x, w: x)(v, f"{where}.{k}".lstrip("."))
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = str(e).split("argument")[-1].strip(": '")
        raise _err(where or "top level", f"missing required key {missing}") from None


def _num(v: Any, where: str, *, integer: bool = False, low: float | None = None, high: float | None = None,
         allow_none: bool = False):
    if v is None and allow_none:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
        raise _err(where, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
    if low is not None and v < low:
        raise _err(where, f"{v!r} is below {low:g}")
    if high is not None and v > high:
        raise _err(where, f"{v!r} is above {high:g}")
    return int(v) if integer else float(v)


def _str(v: Any, where: str, choices: Sequence[str] | None = None, allow_none: bool = True):
    if v is None and allow_none:
        return None
    if not isinstance(v, str):
        raise _err(where, f"expected a string, got {v!r}")
    if choices is not None and v not in choices:
        raise _err(where, f"{v!r} is not one of {', '.join(choices)}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _err(where, f"expected true or false, got {v!r}")
    return v


def _rebase(ref: str | None, base: Path | None) -> str | None:
    if ref is None or ref == VLM_REF or base is None:
        return ref
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = base / p
    return str(local.resolve()) if local.exists() else ref  # else a Hugging Face id


def config_from_dict(data: Any, base_dir: str | Path | None = None) -> EvolveConfig:
    """Validate an evolve config mapping; relative paths are taken relative to `base_dir`."""
    from vlm_merge.methods import METHODS

    base = Path(base_dir) if base_dir is not None else None
    if not isinstance(data, dict):
        raise _err("top level", "expected a mapping with sources, method, genome, fitness, cmaes")

    def sources(v, w):
        s = _build(SourcesConfig, v, w, {
            "models": lambda x, ww: tuple(_rebase(_str(m, f"{ww}[{i}]", allow_none=False), base) for i, m in enumerate(x))
            if isinstance(x, list) and x else (_ for _ in ()).throw(_err(ww, "expected a non-empty list of models")),
            **{k: (lambda x, ww: _rebase(_str(x, ww), base)) for k in ("vlm", "base_model", "target")},
            "tokenizer_source": lambda x, ww: _str(x, ww),
        })
        return s

    def bounds(v, w):
        if not isinstance(v, dict) or not v:
            raise _err(w, "expected a mapping parameter -> [low, high], e.g. {weight: [0, 1.5]}")
        out = {}
        for k, b in v.items():
            if b is None:
                b = DEFAULT_BOUNDS.get(k)
                if b is None:
                    raise _err(f"{w}.{k}", "no default bounds; give [low, high]")
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise _err(f"{w}.{k}", f"expected [low, high], got {b!r}")
            lo, hi = _num(b[0], f"{w}.{k}[0]"), _num(b[1], f"{w}.{k}[1]")
            if not lo < hi:
                raise _err(f"{w}.{k}", f"low {lo:g} must be below high {hi:g}")
            out[str(k)] = (lo, hi)
        return out

    def split_modules(x, w):
        if isinstance(x, bool):
            return "attention_mlp" if x else "none"
        return _str(x, w, tuple(MODULE_SPLITS), False)

    def genome(v, w):
        return _build(GenomeConfig, v, w, {
            "params": bounds,
            "fixed": lambda x, ww: dict(x) if isinstance(x, dict) else (_ for _ in ()).throw(_err(ww, "expected a mapping")),
            "layer_granularity": lambda x, ww: _num(x, ww, integer=True, low=1),
            "split_modules": split_modules,
            "separate": lambda x, ww: tuple(_str(s, ww, SEPARATE_GROUPS, False) for s in (x or []))
            if isinstance(x, (list, type(None))) else (_ for _ in ()).throw(_err(ww, f"expected a list, got {x!r}")),
            "drop_inert": _bool,
        })

    def subset(v, w):
        return _build(SubsetConfig, v, w, {
            "mode": lambda x, ww: _str(x, ww, SUBSET_MODES, False),
            "size": lambda x, ww: _num(x, ww, integer=True, low=0),
            "eta": lambda x, ww: _num(x, ww, integer=True, low=2),
        })

    def metrics(v, w):
        if not isinstance(v, dict) or not v:
            raise _err(w, "expected a mapping score column -> weight, e.g. {rougeL: 1.0}")
        return {str(k): _num(x, f"{w}.{k}") for k, x in v.items()}

    def fitness(v, w):
        return _build(FitnessConfig, v, w, {
            "benchmark": lambda x, ww: _rebase(_str(x, ww, allow_none=False), base),
            "data": lambda x, ww: _rebase(_str(x, ww), base),
            "split": _str, "protocol": _str, "template": _str,
            "kind": lambda x, ww: _str(x, ww, FITNESS_KINDS, False),
            "max_new_tokens": lambda x, ww: _num(x, ww, integer=True, low=1, allow_none=True),
            "num_beams": lambda x, ww: _num(x, ww, integer=True, low=1, allow_none=True),
            "repetition_penalty": lambda x, ww: _num(x, ww, allow_none=True),
            "metrics": metrics,
            "limit": lambda x, ww: _num(x, ww, integer=True, low=1, allow_none=True),
            "subset": subset,
            "penalty": _num,
            "batch_size": lambda x, ww: _num(x, ww, integer=True, low=1),
        })

    def x0(v, w):
        if isinstance(v, dict):
            return {str(k): _num(x, f"{w}.{k}") for k, x in v.items()}
        x = _num(v, w)
        if not 0 <= x <= 1:
            raise _err(w, f"{x!r}: a gene value must lie in [0, 1] (or give real values by parameter name)")
        return x

    def cmaes(v, w):
        return _build(CmaConfig, v, w, {
            "popsize": lambda x, ww: _num(x, ww, integer=True, low=2, high=MAX_POPSIZE, allow_none=True),
            "sigma0": lambda x, ww: _num(x, ww, low=1e-6),
            "x0": x0,
            "max_evaluations": lambda x, ww: _num(x, ww, integer=True, low=1),
            "seed": lambda x, ww: _num(x, ww, integer=True),
        })

    def test(v, w):
        if v is None:
            return None
        return _build(TestConfig, v, w, {
            "benchmark": lambda x, ww: _rebase(_str(x, ww, allow_none=False), base),
            "data": lambda x, ww: _rebase(_str(x, ww), base),
            "split": _str,
            "limit": lambda x, ww: _num(x, ww, integer=True, low=1, allow_none=True),
            "metric": lambda x, ww: _str(x, ww, allow_none=False),
            "chat_vector_scale": _num,
        })

    cfg = _build(EvolveConfig, data, "", {
        "sources": sources, "fitness": fitness, "genome": genome, "cmaes": cmaes, "test": test,
        "method": lambda x, w: _str(x, w, tuple(METHODS), False),
        "dtype": _str, "device": lambda x, w: _str(x, w, allow_none=False), "model_dtype": lambda x, w: _str(x, w, allow_none=False),
        "threads": lambda x, w: _num(x, w, integer=True, low=1, allow_none=True),
        "workers": lambda x, w: _num(x, w, integer=True, low=0),
        "recipe_seed": lambda x, w: _num(x, w, integer=True),
        "space": lambda x, w: _str(x, w, SPACES, False), "dfs": lambda x, w: dfs_config(x, base),
    })
    if cfg.space != "ps" and cfg.dfs is None:
        cfg = replace(cfg, dfs=dfs_config({}, base))
    elif cfg.space == "ps" and cfg.dfs is not None:
        raise _err("dfs", "is set but space is ps; set space: dfs or ps+dfs")
    _check_config(cfg)
    return cfg


def _check_config(cfg: EvolveConfig) -> None:
    from vlm_merge.methods import METHODS

    method = METHODS[cfg.method]
    for name, (lo, hi) in cfg.genome.params.items():
        try:
            p = method.param(name)
        except KeyError:
            floats = [q.name for q in method.params if q.kind == "float"]
            raise _err(f"genome.params.{name}", f"is not a parameter of {cfg.method} (searchable: {', '.join(floats)})") from None
        if p.kind != "float":
            raise _err(f"genome.params.{name}", f"is a {p.kind} parameter; only numbers can be searched (use genome.fixed)")
        for v in (lo, hi):
            try:
                p.check(v)
            except ValueError as e:
                raise _err(f"genome.params.{name}", f"bound {e}") from None
        if name in cfg.genome.fixed:
            raise _err(f"genome.fixed.{name}", "is also searched in genome.params; keep one")
    for name, value in cfg.genome.fixed.items():
        try:
            method.param(str(name)).check(value)
        except KeyError:
            raise _err(f"genome.fixed.{name}", f"is not a parameter of {cfg.method} "
                                               f"(known: {', '.join(q.name for q in method.params)})") from None
        except ValueError as e:
            raise _err(f"genome.fixed.{name}", str(e)) from None
    if cfg.fitness.kind == "generate":
        unknown = [c for c in cfg.fitness.metrics if c not in score_columns()]
        if unknown:
            raise _err(f"fitness.metrics.{unknown[0]}", f"not a score column (known: {', '.join(score_columns())})")
    elif set(cfg.fitness.metrics) != {"loglik"}:
        raise _err("fitness.metrics", "kind loglik has the one column 'loglik'; use metrics: {loglik: 1.0}")
    if VLM_REF in cfg.sources.models and cfg.sources.vlm is None:
        raise _err("sources.models", "names 'vlm' but sources.vlm is not set")
    if cfg.fitness.subset.mode != "none" and cfg.fitness.subset.size < 1:
        raise _err("fitness.subset.size", f"mode {cfg.fitness.subset.mode} needs a size of at least 1")
    if cfg.test is not None:
        missing = [k for k in ("vlm", "base_model", "target") if getattr(cfg.sources, k) is None]
        if missing:
            raise _err("test", f"the report compares with Chat Vector and the controls: set sources.{missing[0]}")
        if cfg.test.metric not in score_columns():
            raise _err("test.metric", f"{cfg.test.metric!r} is not a score column (known: {', '.join(score_columns())})")
    if isinstance(cfg.cmaes.x0, dict):
        for k in cfg.cmaes.x0:
            if k not in cfg.genome.params:
                raise _err(f"cmaes.x0.{k}", f"is not searched (genome.params: {', '.join(cfg.genome.params)})")


def score_columns() -> dict[str, str]:
    """Each score column a generated-answer fitness or test metric may name -> the scorer that writes it."""
    from eval.metrics import all_scorers

    return {c: name for name, cls in all_scorers().items() for c in cls.fields}


def held_out_fitness(cfg: EvolveConfig) -> FitnessConfig:
    """The `test:` split as a fitness config: generated answers under the fitness protocol, one metric."""
    t = cfg.test
    assert t is not None
    return replace(cfg.fitness, benchmark=t.benchmark, data=t.data, split=t.split, limit=t.limit, kind="generate",
                   metrics={t.metric: 1.0}, subset=SubsetConfig())


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
            raise _err(where, f"{f.benchmark}: {e}") from None
    return bench, pool


def scorer_names(f: FitnessConfig) -> list[str]:
    columns = score_columns()
    return list(dict.fromkeys(columns[c] for c in f.metrics))


def check_data(cfg: EvolveConfig):
    """Read the fitness questions and the `test:` split's and check them against their metrics, before any
    model is written or loaded (minutes for 7B sources), so a wrong path or metric fails at once and not after
    the search. Returns the fitness benchmark and question pool (`fitness_questions`) and the `test:` split's
    (None without one), so neither file is read again: the search and the held-out report use these."""
    questions = fitness_questions(cfg.fitness)
    return questions, fitness_questions(held_out_fitness(cfg), "test.metric") if cfg.test is not None else None


def load_config(path: str | Path) -> EvolveConfig:
    path = Path(path)
    return config_from_dict(read_yaml(path, "evolve config"), path.parent)


# ================================================================================================
# Genome


@dataclass(frozen=True)
class Gene:
    name: str  # e.g. "weight[vlm]@layers0-3/mlp"
    param: str
    model: int | None  # index into the recipe's models (per-model parameters); None: shared
    group: str  # "layers:<g>" or one of SEPARATE_GROUPS
    module: str | None  # "attention" | "mlp" | None
    low: float
    high: float

    def decode(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def encode(self, value: float) -> float:
        return min(1.0, max(0.0, (float(value) - self.low) / (self.high - self.low)))


@dataclass(frozen=True)
class Genome:
    """The genes of a config for a model with `num_layers` decoder layers, and their recipe."""

    config: EvolveConfig
    num_layers: int
    genes: tuple[Gene, ...]  # the searched genes: one CMA-ES coordinate each
    held: tuple[tuple[Gene, float], ...] = ()  # genes left out of the search (`without`), at their x0 values

    def without(self, names: Sequence[str]) -> Genome:
        """This genome with the genes `names` held at their x0 values instead of searched."""
        drop = set(names)
        x0 = dict(zip(self.genes, self.x0()))
        return replace(self, genes=tuple(g for g in self.genes if g.name not in drop),
                       held=self.held + tuple((g, x0[g]) for g in self.genes if g.name in drop))

    @classmethod
    def of(cls, config: EvolveConfig, num_layers: int) -> Genome:
        from vlm_merge.engine.merge import model_entries
        from vlm_merge.methods import METHODS

        method = METHODS[config.method]
        g = config.genome
        n_groups = math.ceil(num_layers / g.layer_granularity)
        entries = model_entries(_recipe_skeleton(config), method)
        labels = [_label(config.sources.models[i]) for i in entries]
        genes = []
        for name, (lo, hi) in g.params.items():
            owners: list[tuple[int | None, str]] = [(i, f"[{lab}]") for i, lab in zip(entries, labels)] if method.param(name).per_model else [(None, "")]
            for model, tag in owners:
                for grp in range(n_groups):
                    first, last = grp * g.layer_granularity, min(num_layers, (grp + 1) * g.layer_granularity) - 1
                    span = f"layers{first}" if first == last else f"layers{first}-{last}"
                    for mod in g.modules:
                        genes.append(Gene(f"{name}{tag}@{span}" + (f"/{mod}" if mod else ""), name, model, f"layers:{grp}", mod, lo, hi))
                for sep in g.separate:
                    genes.append(Gene(f"{name}{tag}@{sep}", name, model, sep, None, lo, hi))
        return cls(config, num_layers, tuple(genes))

    def __len__(self) -> int:
        return len(self.genes)

    def x0(self) -> list[float]:
        x0 = self.config.cmaes.x0
        if isinstance(x0, dict):
            return [g.encode(x0[g.param]) if g.param in x0 else 0.5 for g in self.genes]
        return [float(x0)] * len(self.genes)

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """Every gene's parameter value under `x` (the searched genes' values), held genes included."""
        return {g.name: g.decode(v) for g, v in self._pairs(x)}

    def _pairs(self, x: Sequence[float]) -> list[tuple[Gene, float]]:
        self._check(x)
        return [*zip(self.genes, (float(v) for v in x)), *self.held]

    def _check(self, x: Sequence[float]) -> None:
        if len(x) != len(self.genes):
            raise VlmMergeError(f"genome: {len(x)} values for {len(self.genes)} genes")

    def _setting(self, genes: list[tuple[Gene, float]]) -> Any:
        gran = self.config.genome.layer_granularity
        by = {(g.group, g.module): g.decode(v) for g, v in genes}
        filters = MODULE_SPLITS[self.config.genome.split_modules]
        mods = self.config.genome.modules
        per_layer = {m: [by[(f"layers:{i // gran}", m)] for i in range(self.num_layers)] for m in mods}
        conds = [{**SEPARATE_FILTERS[s], "value": by[(s, None)]} for s in self.config.genome.separate]
        if filters:
            conds += [{"filter_regex": filters[m], "value": per_layer[m]} for m in mods]
            conds.append({"value": per_layer[mods[0]]})
        else:
            lst = per_layer[None]
            conds.append({"value": lst[0] if len(set(lst)) == 1 and math.ceil(self.num_layers / gran) == 1 else lst})
        return conds[0]["value"] if len(conds) == 1 else conds

    def decode(self, x: Sequence[float]) -> Recipe:
        """The recipe of genome `x` (gene values in [0, 1])."""
        cfg = self.config
        skel = _recipe_skeleton(cfg)
        pairs = self._pairs(x)
        models = []
        for i, m in enumerate(skel.models):
            params = dict(m.parameters)
            for name in cfg.genome.params:
                mine = [(g, v) for g, v in pairs if g.param == name and g.model == i]
                if mine:
                    params[name] = self._setting(mine)
            models.append(ModelEntry(m.model, params))
        shared = dict(skel.parameters)
        for name in cfg.genome.params:
            mine = [(g, v) for g, v in pairs if g.param == name and g.model is None]
            if mine:
                shared[name] = self._setting(mine)
        return replace(skel, models=tuple(models), parameters=shared)


def inert_genes(genome: Genome, merger) -> dict[str, str]:
    """The searched genes of `genome` that cannot change the merge of `merger` (a `ResidentMerger` opened on its
    recipe), each with why. A gene sets the tensors whose resolved parameters change when it alone moves from
    its x0 value to the far bound; it is inert if it sets none, or only tensors no parameter can change
    (`ResidentMerger.inert`). A gene whose move makes the recipe invalid is kept."""
    from vlm_merge.engine.resident import CandidateError

    x0 = genome.x0()
    fixed = merger.inert()
    try:
        ref = merger.resolve(genome.decode(x0))
    except CandidateError:
        return {}
    out = {}
    for i, g in enumerate(genome.genes):
        x = list(x0)
        x[i] = 1.0 if x0[i] < 0.5 else 0.0
        try:
            moved = merger.resolve(genome.decode(x))
        except CandidateError:
            continue
        sets = {k for k, v in moved.items() if v != ref[k]}
        if not sets:
            out[g.name] = "sets no tensor"
        elif sets <= fixed:
            out[g.name] = f"sets only tensors where every model equals the base ({len(sets)} tensor{'s' * (len(sets) > 1)})"
    return out


def _label(ref: str) -> str:
    return ref if ref == VLM_REF else Path(ref).name or ref


def _recipe_skeleton(cfg: EvolveConfig) -> Recipe:
    """The recipe without searched values: sources, method, fixed parameters, dtype, seed."""
    s = cfg.sources
    return Recipe(
        merge_method=cfg.method, models=tuple(ModelEntry(m, {}) for m in s.models), base_model=s.base_model,
        vlm=s.vlm, target=s.target, parameters=dict(cfg.genome.fixed), tokenizer_source=s.tokenizer_source,
        dtype=cfg.dtype, seed=cfg.recipe_seed,
    )


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


def num_layers_of(config: EvolveConfig) -> int:
    """Decoder layers of the merge's reference model (headers only)."""
    from vlm_merge.architecture.anatomy import inspect_llm, inspect_vlm
    from vlm_merge.io.checkpoint import CheckpointReader

    s = config.sources
    ref_path = s.vlm or s.target or s.base_model or s.models[0]
    reader = CheckpointReader(ref_path)
    try:
        anatomy = inspect_vlm(reader) if s.vlm else inspect_llm(reader, "reference")
        return anatomy.num_layers
    finally:
        reader.close()


# ================================================================================================
# Fitness (one evaluating process: this one, or a Ray actor)


@dataclass(frozen=True)
class Scored:
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

        from eval.generation import _model_dtype
        from eval.prompts import build_prompt, image_token

        tok, model = self.processor.tokenizer, self.model
        token = image_token(self.processor)
        dtype, dev = _model_dtype(model), model.device
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
        from vlm_merge.engine.resident import ResidentMerger

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
        if resident and config.space != "ps":
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

    def score(self, recipe: Recipe | dict, question_ids: Sequence[str] | None = None) -> Scored:
        """Merge `recipe` into the live model and score it; failures score the penalty with the error."""
        from vlm_merge.engine.resident import CandidateError

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
        res = self._generate(qs)
        return {c: float(res.scores[c].mean) for c in f.metrics}

    def _generate(self, qs):
        from eval.runner import evaluate

        bench = replace(self.bench, questions=list(qs))
        return evaluate(self.model, bench, processor=self.processor, protocol=self.protocol, batch_size=self.config.fitness.batch_size,
                        encoded_images=self.encoded, scorers=self.scorers, progress=False)

    def predict(self, question_ids: Sequence[str] | None = None) -> dict[str, str]:
        """The live model's generated answers (question id -> text) under the fitness protocol
        (`fitness.kind: generate`), e.g. to score them with a metric outside the registry."""
        qs = self.pool if question_ids is None else [self.by_id[q] for q in question_ids]
        return {r["question_id"]: r["prediction"] for r in self._generate(qs).predictions}


def _ray_actor_class():
    import ray

    @ray.remote
    class EvaluatorActor:
        def __init__(self, config: dict, base_dir: str | None, scaffold: str) -> None:
            self.ev = Evaluator(config_from_dict(config, base_dir), scaffold)

        def score(self, recipe: dict, question_ids):
            return self.ev.score(recipe, question_ids)

        def inert_genes(self):
            return self.ev.inert_genes()

    return EvaluatorActor


class RayPool:
    """`n` Ray actors, each an `Evaluator` with its own resident sources; candidates run round-robin."""

    def __init__(self, config: EvolveConfig, scaffold: Path, n: int) -> None:
        try:
            import ray
        except ImportError:
            raise VlmMergeError("workers > 0 needs Ray: pip install 'vlm-merge[evolve]'") from None
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(num_cpus=max(n, 1), include_dashboard=False, log_to_driver=False, configure_logging=False)
        gpu = config.device.startswith("cuda") or (config.device == "auto" and _cuda())
        actor = _ray_actor_class().options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)
        self.actors = [actor.remote(config.to_dict(), None, str(scaffold)) for _ in range(n)]

    def inert_genes(self) -> dict[str, str]:
        return self.ray.get(self.actors[0].inert_genes.remote())

    def map(self, jobs: list[tuple[dict, list[str] | None]]) -> list[Scored]:
        futures = [self.actors[i % len(self.actors)].score.remote(r, q) for i, (r, q) in enumerate(jobs)]
        try:
            return self.ray.get(futures)
        except self.ray.exceptions.RayError as e:
            raise VlmMergeError(f"a Ray worker failed: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


class LocalPool:
    def __init__(self, config: EvolveConfig, scaffold: Path, questions=None) -> None:
        self.ev = Evaluator(config, scaffold, questions=questions)

    def inert_genes(self) -> dict[str, str]:
        return self.ev.inert_genes()

    def map(self, jobs: list[tuple[dict, list[str] | None]]) -> list[Scored]:
        return [self.ev.score(r, q) for r, q in jobs]

    def close(self) -> None:
        pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ================================================================================================
# The search


class _Randn:
    """cma's `randn` option: normal draws from our own numpy Generator (its state is checkpointed as data)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """A block a Ctrl-C does not cut short: SIGINT is held back and raised as KeyboardInterrupt once it ends.

    Around CMA-ES's ask/tell (cma has bare `except:` clauses that would swallow a KeyboardInterrupt and fail
    later) and the checkpoint write (so the checkpoint on disk is the generation the message names).
    Outside the main thread, where no handler can be set, the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


@dataclass
class EvolveResult:
    out: Path
    best: dict | None  # the best log record
    generations: int
    evaluations: int
    finished: bool
    model: Path | None = None
    test: dict | None = None  # the held-out report (`test:` in the config)
    held_genes: dict[str, str] = field(default_factory=dict)  # genes left out of the search: why (`inert_genes`)


def _write_atomic(path: Path, data: str | bytes) -> None:
    from eval.outputs import write_atomic

    write_atomic(path, data)


def _read_log(path: Path) -> list[dict]:
    from eval.outputs import read_jsonl

    return read_jsonl(path, tolerate_torn_tail=True) if path.exists() else []


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: Sequence[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class Search:
    """CMA-ES over genomes in [0, 1]^n and what rebuilds it without pickling: its seed, the fitness values
    told each generation (`told`, cma minimises) and its normal draws' generator (`randn`).

    `state()` is plain data for the checkpoint; `Search.replay` re-runs ask/tell from the seed with the
    told values and gets the same object back (the candidates are not merged or evaluated again)."""

    def __init__(self, config: EvolveConfig, x0: list[float]) -> None:
        import cma

        self.randn = _Randn(config.cmaes.seed)
        opts = {"bounds": [0.0, 1.0], "seed": float("nan"), "randn": self.randn, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if config.cmaes.popsize is not None:
            opts["popsize"] = config.cmaes.popsize
        self.es = cma.CMAEvolutionStrategy(x0, config.cmaes.sigma0, opts)
        self.told: list[list[float]] = []

    @property
    def popsize(self) -> int:
        return self.es.popsize

    def stop(self) -> dict:
        """cma's termination conditions met (empty: go on)."""
        return self.es.stop()

    def ask(self) -> list[list[float]]:
        """The next generation's genomes (floats, as logged)."""
        return [[float(v) for v in x] for x in self.es.ask()]

    def tell(self, xs: Sequence[Sequence[float]], values: Sequence[float]) -> None:
        """Update CMA-ES with the values (lower is better) of the genomes `ask` gave."""
        values = [float(v) for v in values]
        self.es.tell([np.asarray(x) for x in xs], values)
        self.told.append(values)

    def state(self) -> dict:
        return {"told": self.told, "randn_state": self.randn.rng.bit_generator.state}

    @classmethod
    def replay(cls, config: EvolveConfig, x0: list[float], state: Any, logged: Mapping[int, list[list[float]]], where: str) -> Search:
        """The search after the generations in `state` (from `state()`): ask/tell re-run with the told values.

        Each replayed generation must ask for the genomes `logged` holds for it (by generation number) and
        the replay must end at the stored generator state; otherwise `VlmMergeError` (`where`: the file)."""
        bad = f"{where}: the CMA-ES state"
        told = state.get("told") if isinstance(state, dict) else None
        if not isinstance(told, list) or not all(isinstance(v, list) and all(_is_number(f) for f in v) for v in told):
            raise VlmMergeError(f"{bad} is not a list of told fitness lists; start a new run")
        search = cls(config, x0)
        for gen_no, values in enumerate(told, 1):
            search.stop()  # as the search loop does before each ask (it may update cma's bookkeeping)
            xs = search.ask()
            want = logged.get(gen_no)
            if want is None or len(values) != len(xs) or not _same_genomes(want, xs):
                raise VlmMergeError(f"{bad} does not replay to the candidates {LOG_FILE} holds for generation {gen_no} "
                                    "(another cma/numpy version, or an edited file); start a new run")
            search.tell(xs, values)
        if search.randn.rng.bit_generator.state != state.get("randn_state"):
            raise VlmMergeError(f"{bad}: its random generator does not replay to the stored state "
                                "(another cma/numpy version, or an edited file); start a new run")
        return search


REPLAY_ATOL = 1e-9  # a replayed genome may differ from the logged one by this much (another machine's LAPACK)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same_genomes(logged: Sequence[Any], asked: list[list[float]]) -> bool:
    """Whether `logged` (read from a file: anything) are the genomes `asked`, to within `REPLAY_ATOL`."""
    return (len(logged) == len(asked)
            and all(isinstance(x, list) and len(x) == len(y) and all(map(_is_number, x)) for x, y in zip(logged, asked))
            and all(abs(a - b) <= REPLAY_ATOL for x, y in zip(logged, asked) for a, b in zip(x, y)))


def _best(records: Sequence[dict]) -> dict | None:
    """Best record by fitness among final scores (not an early halving rung; ties: the first)."""
    best = None
    for r in records:
        if r["error"] is None and r["final"] and (best is None or r["fitness"] > best["fitness"]):
            best = r
    return best


def _progress_text(gen: int, evals: int, total: int, best: dict | None, per_cand: float | None) -> str:
    b = f"{best['fitness']:.4g}" if best else "-"
    s = f"{per_cand:.2f}s/cand" if per_cand is not None else "-"
    return f"gen {gen} | evals {evals}/{total} | best {b} | {s}"


def _subsets(config: EvolveConfig, pool: list[str], generation: int) -> list[list[str]] | None:
    """Question ids per rung (one rung for `random`), or None for the whole pool."""
    sub = config.fitness.subset
    if sub.mode == "none" or sub.size >= len(pool):
        return None
    rng = np.random.default_rng([config.cmaes.seed, generation])
    order = [pool[i] for i in rng.permutation(len(pool))]
    if sub.mode == "random":
        chosen = set(order[: sub.size])
        return [[q for q in pool if q in chosen]]
    sizes, s = [], sub.size
    while s < len(pool):
        sizes.append(s)
        s *= sub.eta
    sizes.append(len(pool))
    return [[q for q in pool if q in set(order[:n])] for n in sizes]


def generation_text(f: FitnessConfig) -> str:
    """How answers are generated under `f` (protocol and its overrides), for reports."""
    from eval.protocols import get_protocol

    p = get_protocol(f.protocol).with_overrides(template=f.template, max_new_tokens=f.max_new_tokens, num_beams=f.num_beams,
                                                repetition_penalty=f.repetition_penalty)
    g = p.generation
    return (f"{p.name} protocol ({p.questions} questions), template {p.template}, max_new_tokens {g.max_new_tokens}, "
            f"num_beams {g.num_beams}, repetition_penalty {g.repetition_penalty:g}")


def protocol_text(config: EvolveConfig) -> str:
    f, sub = config.fitness, config.fitness.subset
    what = "mean answer log-likelihood (teacher forcing)" if f.kind == "loglik" else " + ".join(f"{w:g}*{c}" for c, w in f.metrics.items())
    if sub.mode == "random":
        how = f"each generation scored on {sub.size} questions drawn by numpy default_rng([seed, generation])"
    elif sub.mode == "halving":
        how = (f"successive halving: all on {sub.size} questions, the best 1/{sub.eta} on x{sub.eta} more, ... up to every "
               f"question (nested draws of default_rng([seed, generation])); CMA-ES ranks by (rung, score)")
    else:
        how = "every candidate scored on every question"
    return f"{what}; {how}; failures score {f.penalty:g}"


def config_inputs(cfg: EvolveConfig, config: object = None) -> list[str]:
    """The paths an evolve run reads (its config file, sources, data): its run dir may not overlap them."""
    src = cfg.sources
    test = [cfg.test.benchmark, cfg.test.data] if cfg.test is not None else []
    paths = [*src.models, src.vlm, src.base_model, src.target, src.tokenizer_source, cfg.fitness.benchmark,
             cfg.fitness.data, *test, config if isinstance(config, (str, Path)) else None]
    return [str(p) for p in paths if p]


def run_evolve(
    config: EvolveConfig | dict | str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    write_model: bool = True,
) -> EvolveResult:
    """Run (or with `resume=True` continue) an evolutionary merge into `out`; see the module docstring.

    `config` is an `EvolveConfig`, a mapping, or a YAML path; with `resume=True` it may be None-like
    (`out/config.yaml` is used) and if given must equal the saved one. `workers` overrides the config.
    The run's evaluators set torch's thread count to `threads:`; the caller's count is restored afterwards.
    """
    from vlm_merge.engine.threads import torch_threads

    with torch_threads(None):
        try:
            return _run_evolve(config, out, resume, force, progress, workers, write_model)
        except KeyboardInterrupt:
            raise EvolveInterrupted(interrupted_text(Path(out))) from None


def interrupted_text(out: Path) -> str:
    """What a Ctrl-C left in run directory `out` and how to go on, read from its checkpoint (one line)."""
    resume = f"`vlm-merge evolve --resume {out}`"
    if not (out / CONFIG_FILE).exists():
        return f"interrupted before the run started in {out}; run the command again"
    try:
        state = json.loads((out / CHECKPOINT_FILE).read_text(encoding="utf-8"))
        gen, finished = int(state["generation"]), bool(state["finished"])
    except (OSError, ValueError, TypeError, KeyError):
        return f"interrupted before the first generation finished in {out}; start over with {resume}"
    if finished:
        return f"interrupted after the search finished (checkpoint in {out}); write its outputs with {resume}"
    return f"interrupted in generation {gen + 1}; checkpoint after generation {gen} in {out}; continue with {resume}"


def _run_evolve(config, out, resume: bool, force: bool, progress: bool, workers: int | None, write_model: bool) -> EvolveResult:
    from tqdm.auto import tqdm

    out = Path(out)
    saved = out / CONFIG_FILE
    made = False  # whether this call created `out`
    aside = None  # with --force: the previous run, renamed beside `out` until this run is complete
    if resume:
        if not saved.exists():
            raise VlmMergeError(f"{out}: no {CONFIG_FILE}; not an evolve run directory to resume")
        prior = load_config(saved)
        if config is not None:
            cfg = _as_config(config)
            if cfg.sha256() != prior.sha256():
                raise VlmMergeError(f"{out}: the config differs from the run's {CONFIG_FILE}; resume without a config or start a new run")
        cfg = prior
    else:
        cfg = _as_config(config)
        prepare_output_dir(out, True, config_inputs(cfg, config))  # not an input, not the cwd, parent writable
        clean_stale(out.parent)
        if out.exists() and any(out.iterdir()):
            if not force:
                raise VlmMergeError(f"{out}: exists and is not empty; use --resume to continue it or --force to replace it")
            aside = side_path(out, "old")
            out.rename(aside)
        made = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomic(saved, cfg.to_yaml())
        except OSError as e:
            if made:
                remove(out)
            if aside is not None:
                aside.rename(out)
            raise output_error(out, e) or e from None
    if workers is not None:
        cfg = replace(cfg, workers=workers)

    genome = DfsGenome.of(cfg) if cfg.space != "ps" else Genome.of(cfg, num_layers_of(cfg))
    log_path, ckpt_path = out / LOG_FILE, out / CHECKPOINT_FILE
    state = _load_checkpoint(ckpt_path, cfg) if resume and ckpt_path.exists() else None
    records = _read_log(log_path)
    if state is not None:
        held = state["held_genes"]
        genome = genome.without(held)
        kept, leftover = records[: state["log_lines"]], records[state["log_lines"] :]
        gen, evals = state["generation"], state["evaluations"]
        finished = state["finished"]
        logged: dict[int, list] = {}
        for r in sorted(kept, key=lambda r: (r.get("generation"), r.get("index"))):  # log lines come as candidates finish
            logged.setdefault(r.get("generation"), []).append(r.get("x"))
        with _sigint_deferred():
            es = Search.replay(cfg, genome.x0(), state["cma"], logged, str(ckpt_path))
    else:
        es, held = None, {}  # CMA-ES starts once the sources show which genes are inert
        kept, leftover, gen, evals, finished = [], records, 0, 0, False
    _write_atomic(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    reuse = {(r["generation"], r["index"]): r for r in leftover if r.get("generation") == gen + 1}
    records = kept
    log = _Log(log_path)

    scaffold = out / SCAFFOLD_DIR
    pool = test_questions = bar = None
    try:
        if not finished:
            try:
                questions, test_questions = check_data(cfg)
                qpool = [q.question_id for q in questions[1]]
                if not scaffold.exists():
                    from vlm_merge.engine.resident import write_scaffold

                    write_scaffold(genome.decode(genome.x0()), scaffold)
                pool = (RayPool(cfg, scaffold, cfg.workers) if cfg.workers > 0  # each actor reads its own
                        else LocalPool(cfg, scaffold, questions))
                if es is None:
                    held = pool.inert_genes() if cfg.genome.drop_inert else {}
                    genome = genome.without(held)
                    if not genome.genes:
                        raise VlmMergeError(f"evolve config genome: all {len(held)} genes are inert (every model equals the base "
                                            "in every tensor they set); nothing to search: check sources.models and base_model")
                    es = Search(cfg, genome.x0())
            except VlmMergeError:
                if not resume:  # nothing was scored: leave no half-made run behind, so the fixed command reruns
                    for p in (saved, log_path):
                        p.unlink(missing_ok=True)
                    shutil.rmtree(scaffold, ignore_errors=True)
                    if made and not any(out.iterdir()):
                        out.rmdir()
                    if aside is not None:  # --force: the previous run comes back as it was
                        remove(out)
                        aside.rename(out)
                raise
        popsize = es.popsize
        total = max(popsize, (cfg.cmaes.max_evaluations // popsize) * popsize)
        bar = tqdm(total=total, initial=evals, unit="cand", desc="evolve", disable=not progress, dynamic_ncols=True)
        if held and progress and not gen:
            bar.write(f"evolve: {len(genome)} genes searched, {len(held)} held at x0 (they cannot change the merge; "
                      "summary.json lists them)")
        started = time.perf_counter()
        n_this_run = 0
        while not finished:
            with _sigint_deferred():
                if evals + popsize > total or es.stop():
                    finished = True
                    stop = "budget" if evals + popsize > total else "cma: " + ", ".join(f"{k}={v}" for k, v in es.stop().items())
                    _checkpoint(ckpt_path, es, gen, evals, records, True, cfg, held, stop)
                    break
                xs = es.ask()
            gen_no = gen + 1
            recs = _run_generation(cfg, genome, pool, xs, gen_no, evals, qpool, reuse, log)  # Ctrl-C stops it at once
            with _sigint_deferred():  # the update and its checkpoint happen together or not at all
                es.tell(xs, [r.pop("_cma") for r in recs])
                records += recs
                gen, evals = gen_no, evals + len(recs)
                _checkpoint(ckpt_path, es, gen, evals, records, False, cfg, held)
            n_this_run += sum(1 for r in recs if not r.get("reused"))
            bar.update(len(recs))
            per = (time.perf_counter() - started) / n_this_run if n_this_run else None
            bar.set_postfix_str(_progress_text(gen, evals, total, _best(records), per))
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    best = _best(records)
    stop = json.loads(ckpt_path.read_text()).get("stop") if ckpt_path.exists() else None
    model_dir = _finish(cfg, genome, out, records, best, gen, evals, write_model, stop, held)
    test = None
    if cfg.test is not None and best is not None:
        if not scaffold.exists():
            from vlm_merge.engine.resident import write_scaffold

            write_scaffold(genome.decode(genome.x0()), scaffold)
        test = held_out_report(cfg, out, genome.decode(best["x"]), scaffold, test_questions)
    shutil.rmtree(scaffold, ignore_errors=True)
    if aside is not None:
        remove(aside)  # the new run is complete
    return EvolveResult(out, best, gen, evals, True, model_dir, test, held)


class EvolveInterrupted(VlmMergeError):
    """Ctrl-C during a run: the last generation's checkpoint is on disk."""


def _as_config(config) -> EvolveConfig:
    if isinstance(config, EvolveConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def _run_generation(cfg, genome: Genome, pool, xs, gen_no: int, evals: int, qpool: list[str], reuse: dict, log: _Log) -> list[dict]:
    recipes = [genome.decode(x) for x in xs]
    base = [{"generation": gen_no, "index": i, "evaluation": evals + i + 1, "x": x, "genes": genome.values(x),
             "recipe_sha256": recipe_sha256(r)} for i, (x, r) in enumerate(zip(xs, recipes))]
    rungs = _subsets(cfg, qpool, gen_no)
    out: list[dict] = [None] * len(xs)  # type: ignore[list-item]
    todo = []
    for i, b in enumerate(base):
        old = reuse.get((gen_no, i))
        if old is not None and old["x"] == b["x"] and rungs_single(cfg):
            out[i] = {**old, "reused": True}
            log.append([_ordered(out[i])])
        else:
            todo.append(i)
    if rungs is None or len(rungs) == 1:
        qids = None if rungs is None else rungs[0]
        # evaluated one at a time locally (each logged as it finishes), in one batch on Ray actors
        step = 1 if isinstance(pool, LocalPool) else max(1, len(todo))
        for s in range(0, len(todo), step):
            idx = todo[s : s + step]
            for i, sc in zip(idx, pool.map([(recipes[i].to_dict(), qids) for i in idx])):
                out[i] = {**base[i], **_scored(sc), "questions": sc.questions, "rung": 0, "final": True}
                log.append([_ordered(out[i])])
        for i, r in enumerate(out):
            r["_cma"] = -r["fitness"]
        return [_ordered(r) for r in out]
    # successive halving over nested subsets
    alive = list(range(len(xs)))
    reached = {i: (0, cfg.fitness.penalty) for i in alive}
    last: dict[int, dict] = {}
    for rung, qids in enumerate(rungs):
        scored = pool.map([(recipes[i].to_dict(), qids) for i in alive])
        for i, sc in zip(alive, scored):
            last[i] = {**_scored(sc), "questions": sc.questions, "rung": rung, "final": rung == len(rungs) - 1}
            reached[i] = (rung if sc.error is None else -1, sc.fitness)
        if rung + 1 < len(rungs):
            ok = sorted((i for i in alive if last[i]["error"] is None), key=lambda i: (-last[i]["fitness"], i))
            alive = ok[: max(1, math.ceil(len(alive) / cfg.fitness.subset.eta))]
            if not alive:
                break
    order = sorted(range(len(xs)), key=lambda i: (reached[i][0], reached[i][1], -i))  # worst first
    rank = {i: pos for pos, i in enumerate(order)}
    for i in range(len(xs)):
        out[i] = {**base[i], **last[i], "_cma": -float(rank[i])}
    log.append([{k: v for k, v in _ordered(r).items() if k != "_cma"} for r in out])
    return [_ordered(r) for r in out]


def rungs_single(cfg: EvolveConfig) -> bool:
    return cfg.fitness.subset.mode != "halving"


def _scored(sc: Scored) -> dict:
    return {"fitness": sc.fitness, "scores": sc.scores, "merge_s": round(sc.merge_s, 6), "eval_s": round(sc.eval_s, 6), "error": sc.error}


_ORDER = ("generation", "index", "evaluation", "fitness", "scores", "error", "rung", "final", "questions", "merge_s", "eval_s", "recipe_sha256", "genes", "x")


def _ordered(r: dict) -> dict:
    head = {k: r[k] for k in _ORDER if k in r}
    return {**head, **{k: v for k, v in r.items() if k not in head and k != "reused"}}


CHECKPOINT_VERSION = 2  # 1: CMA-ES as cma's pickle (refused); 2: `Search.state()` data


def _checkpoint(path: Path, es: Search, gen: int, evals: int, records: list[dict], finished: bool, cfg: EvolveConfig,
                held: Mapping[str, str], stop: str | None = None) -> None:
    state = {
        "version": CHECKPOINT_VERSION, "config_sha256": cfg.sha256(), "generation": gen, "evaluations": evals,
        "log_lines": len(records), "finished": finished, "stop": stop, "best": _best(records), "held_genes": dict(held),
        "cma": es.state(),
        "rng": {"cma_randn": "numpy PCG64 seeded with cmaes.seed (cma.randn_state)",
                "subsets": f"numpy default_rng([{cfg.cmaes.seed}, generation])"},
    }
    _write_atomic(path, json.dumps(state) + "\n")


# what a checkpoint's counters must be (it may come from someone else's run directory)
_CHECKPOINT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "generation": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "evaluations": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "log_lines": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "finished": lambda v: isinstance(v, bool),
    "held_genes": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(w, str) for k, w in v.items()),
    "cma": lambda v: isinstance(v, dict),
}


def _load_checkpoint(path: Path, cfg: EvolveConfig) -> dict:
    """The checkpoint's fields, checked; never unpickles (a checkpoint holding a pickle is refused)."""
    try:
        state = load_json(path, "checkpoint")
    except VlmMergeError as e:
        raise VlmMergeError(f"{e}; or start a new run") from None
    if any("pickle" in k for k in state):
        raise VlmMergeError(f"{path}: holds CMA-ES as a pickle (an older checkpoint format); a pickle can run code and is "
                            "never read back: start a new run")
    if state.get("version") != CHECKPOINT_VERSION:
        raise VlmMergeError(f"{path}: checkpoint format {state.get('version')!r:.20}, not {CHECKPOINT_VERSION} (another "
                            "vlm-merge version); start a new run")
    if state.get("config_sha256") != cfg.sha256():
        raise VlmMergeError(f"{path}: written for another config; start a new run")
    for key, ok in _CHECKPOINT_FIELDS.items():
        if not ok(state.get(key)):
            raise VlmMergeError(f"{path}: {key!r} is {state.get(key)!r:.60}, not what a checkpoint holds; start a new run")
    told = state["cma"].get("told")
    if not isinstance(told, list) or len(told) != state["generation"]:
        raise VlmMergeError(f"{path}: 'cma' holds no list of {state['generation']} told generations ('generation'); "
                            "start a new run")
    return state


def _finish(cfg: EvolveConfig, genome: Genome, out: Path, records: list[dict], best: dict | None, gen: int, evals: int,
            write_model: bool, stop: str | None, held: Mapping[str, str]) -> Path | None:
    import vlm_merge

    summary = {
        "generations": gen, "evaluations": evals, "genes": len(genome), "gene_names": [g.name for g in genome.genes],
        "held_genes": {g.name: {"value": g.decode(v), "why": held.get(g.name, "")} for g, v in genome.held},
        "protocol": protocol_text(cfg), "stopped_by": stop, "failed": sum(1 for r in records if r["error"]),
        "merge_s_mean": float(np.mean([r["merge_s"] for r in records])) if records else None,
        "eval_s_mean": float(np.mean([r["eval_s"] for r in records])) if records else None,
        "best": best, "version": vlm_merge.__version__,
    }
    plot_fitness(records, out / PLOT_FILE)
    model_dir = None
    if best is not None:
        recipe = genome.decode(best["x"])
        _write_atomic(out / BEST_RECIPE_FILE, f"# vlm-merge evolve: best of {evals} candidates, fitness {best['fitness']:.6g}\n" + recipe.to_yaml())
        if write_model:
            from vlm_merge.engine.merge import merge

            model_dir = merge(out / BEST_RECIPE_FILE, out / MODEL_DIR, force=True, progress=False)
    _write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return model_dir


TEST_REPORT_MD, TEST_REPORT_JSON, TEST_PREDICTIONS_DIR = "test_report.md", "test_report.json", "test_predictions"


def chat_vector_recipe(cfg: EvolveConfig, scale: float) -> Recipe:
    """`chat_vector.chat_vector_recipe` at `scale` on this run's sources (scale 0: the target in the VLM shell),
    with the run's tokenizer source and recipe seed so the resident merger accepts it."""
    from chat_vector.api import chat_vector_recipe as cv_recipe
    from chat_vector.api import make_scales

    s = cfg.sources
    return replace(cv_recipe(s.vlm, s.base_model, s.target, make_scales(scale), dtype=cfg.dtype),
                   tokenizer_source=s.tokenizer_source, seed=cfg.recipe_seed)


def held_out_report(cfg: EvolveConfig, out: Path, best_recipe: Recipe, scaffold: Path, questions=None) -> dict:
    """Score the best recipe, Chat Vector (`test.chat_vector_scale`), the target in the VLM shell (scale 0)
    and the VLM itself on the `test:` split with the fitness protocol (generated answers), and compare the
    best with each by a paired bootstrap over questions. Writes `test_report.{md,json}` and per-model
    predictions with per-question scores (`test_predictions/<model>.jsonl`, re-scorable). `questions`: the
    `test:` benchmark and pool if already read (`check_data`), else they are read here."""
    import gc

    from eval.metrics import bootstrap_aggregate, paired_bootstrap
    from eval.outputs import jsonl

    t = cfg.test
    assert t is not None
    test_fit = held_out_fitness(cfg)
    runs: list[tuple[str, str, EvolveConfig, Recipe | None]] = [
        ("evolved", "the best recipe of the search", replace(cfg, fitness=test_fit), best_recipe),
        ("chat-vector", f"Chat Vector, scale {t.chat_vector_scale:g}: target + scale * (vlm - base_model)",
         replace(cfg, fitness=test_fit, method="task_arithmetic", sources=replace(cfg.sources, models=(VLM_REF,)), space="ps", dfs=None,
                 genome=GenomeConfig(params={"weight": DEFAULT_BOUNDS["weight"]})), chat_vector_recipe(cfg, t.chat_vector_scale)),
        ("target-shell", "control: the target language model in the VLM shell (Chat Vector scale 0)", None, chat_vector_recipe(cfg, 0.0)),
        ("vlm", "control: the VLM as it is", None, None),
    ]
    questions = questions or fitness_questions(test_fit, "test.metric")  # read once, shared by the Evaluators
    per_question: dict[str, list[dict]] = {}
    ev = None
    for name, _, run_cfg, recipe in runs:
        if run_cfg is not None or recipe is None:  # a new method / source structure, or the VLM itself
            ev = None  # free the previous live model first
            gc.collect()
            ev = (Evaluator(run_cfg, scaffold, questions=questions) if recipe is not None
                  else Evaluator(replace(cfg, fitness=test_fit), cfg.sources.vlm, resident=False, questions=questions))
        if recipe is not None:
            ev.merger.apply(recipe)
        per_question[name] = ev._generate(ev.pool).predictions
    ev = None
    gc.collect()
    scores = {n: np.array([r[t.metric] for r in rows], dtype=np.float64) for n, rows in per_question.items()}
    ids = [r["question_id"] for r in per_question["evolved"]]
    if any([r["question_id"] for r in rows] != ids for rows in per_question.values()):
        raise VlmMergeError("held-out report: the models were scored on different questions")
    rec = {
        "metric": t.metric, "questions": len(ids), "benchmark": t.benchmark, "data": t.data, "split": t.split,
        "protocol": generation_text(test_fit),
        "models": {n: {"description": d, **bootstrap_aggregate(scores[n]).as_dict()} for n, d, _, _ in runs},
        "evolved_vs": {n: paired_bootstrap(scores["evolved"], scores[n]) for n, *_ in runs if n != "evolved"},
    }
    (out / TEST_PREDICTIONS_DIR).mkdir(exist_ok=True)
    for n, rows in per_question.items():
        _write_atomic(out / TEST_PREDICTIONS_DIR / f"{n}.jsonl", jsonl(rows))
    _write_atomic(out / TEST_REPORT_JSON, json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Held-out report: {t.benchmark}" + (f" ({t.split})" if t.split else ""), "",
             f"{len(ids)} questions, score `{t.metric}` per question, 95% bootstrap intervals (1000 resamples, seed 0). "
             f"Protocol: {rec['protocol']}.", "",
             "| model | what | mean | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {n} | {m['description']} | {m['mean']:.4f} | [{m['low']:.4f}, {m['high']:.4f}] |" for n, m in rec["models"].items()]
    lines += ["", "| evolved minus | difference | 95% paired CI | CI excludes 0 |", "|---|---|---|---|"]
    lines += [f"| {n} | {d['diff']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {'yes' if d['excludes_zero'] else 'no'} |"
              for n, d in rec["evolved_vs"].items()]
    _write_atomic(out / TEST_REPORT_MD, "\n".join(lines) + "\n")
    return rec


def plot_fitness(records: Sequence[dict], path: Path, references: Mapping[str, float] | None = None) -> None:
    """Population fitness (dots; failures as x at the bottom) and best so far over evaluations.

    `references` (label -> fitness) are drawn as dashed horizontal lines, e.g. a hand-tuned merge's
    score on the same fitness questions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [r for r in records if r["error"] is None]
    ax.scatter([r["evaluation"] for r in ok], [r["fitness"] for r in ok], s=12, alpha=0.6,
               c=[r.get("rung", 0) for r in ok], cmap="viridis", label="candidates")
    bad = [r for r in records if r["error"] is not None]
    if ok and bad:
        low = min(r["fitness"] for r in ok)
        ax.scatter([r["evaluation"] for r in bad], [low] * len(bad), marker="x", color="red", label="failed (penalised)")
    xs, ys, best = [], [], None
    for r in records:
        if r["error"] is None and r["final"] and (best is None or r["fitness"] > best):
            best = r["fitness"]
        if best is not None:
            xs.append(r["evaluation"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best so far")
    for (label, value), colour in zip((references or {}).items(), ("tab:orange", "tab:green", "tab:purple", "tab:brown")):
        ax.axhline(value, ls="--", lw=1, color=colour, label=label)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _write_atomic(path, buf.getvalue())
