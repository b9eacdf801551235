"""Evolutionary merging: CMA-ES over per-layer merge parameters with a VQA fitness (`vlm-merge evolve`).

The package's modules, in the order a run uses them: `config` (the config models), `genome` (genes <->
recipe), `fitness` (scoring a candidate), `workers` (local or Ray pools), `search` (CMA-ES, rebuilt on
resume), `rundir` (the run directory: log, checkpoint), `run` (the loop: `run_evolve`), `report`
(summary, plot, held-out report), `dfs` (`space: dfs | ps+dfs`: a search over layer routes, data-flow-space
merging, arXiv 2403.13187; its genome decodes to a `slices:` recipe). The command is `vlm_merge.cli.evolve`.

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

from vlm_merge.evolve.config import (
    DEFAULT_BOUNDS,
    MODULE_SPLITS,
    CmaConfig,
    EvolveConfig,
    FitnessConfig,
    GenomeConfig,
    SourcesConfig,
    SubsetConfig,
    TestConfig,
    config_from_dict,
    load_config,
    score_columns,
)
from vlm_merge.evolve.fitness import Evaluator, LogLikelihood, Scored, check_data
from vlm_merge.evolve.genome import Gene, Genome, inert_genes, num_layers_of
from vlm_merge.evolve.report import held_out_report, plot_fitness, protocol_text
from vlm_merge.evolve.run import EvolveInterrupted, EvolveResult, run_evolve
from vlm_merge.evolve.rundir import (
    BEST_RECIPE_FILE,
    CHECKPOINT_FILE,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_DIR,
    PLOT_FILE,
    SUMMARY_FILE,
)
from vlm_merge.evolve.search import Search

__all__ = [
    "BEST_RECIPE_FILE",
    "CHECKPOINT_FILE",
    "CHECKPOINT_VERSION",
    "CONFIG_FILE",
    "DEFAULT_BOUNDS",
    "LOG_FILE",
    "MODEL_DIR",
    "MODULE_SPLITS",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "CmaConfig",
    "Evaluator",
    "EvolveConfig",
    "EvolveInterrupted",
    "EvolveResult",
    "FitnessConfig",
    "Gene",
    "Genome",
    "GenomeConfig",
    "LogLikelihood",
    "Scored",
    "Search",
    "SourcesConfig",
    "SubsetConfig",
    "TestConfig",
    "check_data",
    "config_from_dict",
    "held_out_report",
    "inert_genes",
    "load_config",
    "num_layers_of",
    "plot_fitness",
    "protocol_text",
    "run_evolve",
    "score_columns",
]
