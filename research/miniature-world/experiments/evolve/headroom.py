"""Session-15 experiment (EXPERIMENTS.md, "Session 15"): how much a merge family can gain over Chat Vector at all.

Two probes on a zoo built by `vlm-merge zoo build`, each scoring recipes in-process with `vlm_merge.evolve.Evaluator`
(resident sources, cached image features, the llm-jp protocol, content accuracy, batch 64, 1 thread):

    python headroom.py grid ZOO GRID.json OUT.json
        scores hand-set recipes on ja-dev (300) and ja-test (1000). GRID.json: {name: {"method": ..., "fixed": {...},
        "models": ["vlm", ...], "target": "ja-base" | null, "params": {param: {"default": v, "<model>": v,
        "<gene suffix>": v, "<model>@<gene suffix>": v}}}} over the genome `split_modules: attention_mlp` with
        `separate: [embeddings, norms, lm_head]` (gene suffixes such as "layers1/mlp" or "lm_head").

    python headroom.py search ZOO FITNESS.jsonl EVALS SEED [projections|modules]
        CMA-ES (popsize 8, sigma0 0.15 of the bounds, x0 = Chat Vector's 0.5) over Chat Vector's weight in [0, 1.5]
        per projection and layer norm (or per attention / MLP: `modules`) of the layers the English VLM tuned (0, 1); prints the best candidate's and
        CMA-ES's final mean's scores on the fitness file, ja-dev and ja-test. With FITNESS = ZOO/data/ja-test.jsonl
        the search selects on the test questions: an optimistic ceiling of the family, never a result.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import cma
import numpy as np

from vlm_merge.evolve import Evaluator, Genome, chat_vector_recipe, config_from_dict, num_layers_of
from vlm_merge.recipe import ModelEntry
from vlm_merge.engine.resident import write_scaffold

BOUNDS = {"weight": [0.0, 3.0], "density": [0.01, 1.0], "gamma": [0.0, 0.1], "epsilon": [0.0, 0.1], "t": [0.0, 1.0]}
PARTS = {"projections": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                         "post_attention_layernorm"],
         "modules": ["self_attn|input_layernorm", "mlp|post_attention_layernorm"]}
TUNED_LAYERS, HIGH = (0, 1), 1.5


def config(zoo: Path, fitness: Path, method: str = "task_arithmetic", models=("vlm",), target="ja-base", params=("weight",), fixed=None):
    return config_from_dict({
        "sources": {"vlm": "en-vlm", "base_model": "en-base", "target": target, "models": list(models)},
        "method": method,
        "genome": {"params": {p: BOUNDS[p] for p in params}, "fixed": fixed or {}, "split_modules": "attention_mlp",
                   "separate": ["embeddings", "norms", "lm_head"]},
        "fitness": {"benchmark": str(fitness), "protocol": "llm-jp", "max_new_tokens": 24,
                    "metrics": {"content_accuracy": 1.0}, "batch_size": 64},
        "threads": 1}, zoo)  # fmt: skip


def evaluators(zoo: Path, cfg, files: dict[str, Path]) -> dict[str, Evaluator]:
    scaffold = zoo / ".headroom-scaffold"
    if not scaffold.exists():
        write_scaffold(chat_vector_recipe(cfg, 0.5), scaffold)
    return {k: Evaluator(replace(cfg, fitness=replace(cfg.fitness, benchmark=str(f))), scaffold) for k, f in files.items()}


def lm_tensors(zoo: Path) -> tuple[dict, dict, dict]:
    """The English VLM's, English base's and Japanese base's language-model tensors, keyed as the decoder names them
    (`layers.0.mlp.up_proj.weight`)."""
    from safetensors import safe_open

    def load(path: Path, prefix: str) -> dict:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    return load(zoo / "en-vlm", "language_model.model."), load(zoo / "en-base", "model."), load(zoo / "ja-base", "model.")


def prompt_ids(ev: Evaluator, q) -> list[int]:
    """Token ids of question `q`'s prompt as `ev` scores it, its image token expanded to the image's tokens
    (`ev.encoded`); the probes' forward passes (`delta_split.py`, `fisher_merge.py`, `shift_projection.py`)."""
    from eval.prompts import build_prompt, image_token

    token = image_token(ev.processor)
    prompt = build_prompt(ev.processor, q.question, ev.protocol.template)
    return ev.processor.tokenizer(prompt.replace(token, token * ev.encoded[q.image_key].n_tokens, 1)).input_ids


def image_inputs(features: list) -> dict:
    """The keyword argument that hands cached image features (one tensor per image) to the live model's forward."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}


def probe(zoo: Path, scaffold: Path, files: dict[str, Path]):
    """The probes' start (`svd_split.py`, `head_weights.py`, `delta_split.py`): one thread, the config of `config`,
    an Evaluator per file with Chat Vector 0.5 merged into its live model (at `scaffold`), and `lm_tensors`."""
    import torch

    torch.set_num_threads(1)
    cfg = config(zoo, zoo / "data/ja-dev.jsonl")
    evs = {k: Evaluator(replace(cfg, fitness=replace(cfg.fitness, benchmark=str(f))), scaffold) for k, f in files.items()}
    for ev in evs.values():
        ev.merger.apply(chat_vector_recipe(cfg, 0.5))
    return cfg, evs, lm_tensors(zoo)


def grid(zoo: Path, spec_path: Path, out: Path) -> None:
    files = {"dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl"}
    rows, key, evs = [], None, {}
    for name, spec in json.loads(spec_path.read_text()).items():
        cfg = config(zoo, files["dev"], spec["method"], spec.get("models", ["vlm"]), spec.get("target", "ja-base"),
                     tuple(spec["params"]), spec.get("fixed"))
        if (cfg.method, cfg.sources, cfg.genome.fixed) != key:  # a new live model only when the merge's structure changes
            evs, key = evaluators(zoo, cfg, files), (cfg.method, cfg.sources, cfg.genome.fixed)
        genome = Genome.of(cfg, num_layers_of(cfg))
        x = []
        for gene in genome.genes:
            ps, suffix = spec["params"][gene.param], gene.name.split("@")[1]
            model = Path(cfg.sources.models[gene.model]).name if gene.model is not None else ""
            x.append(gene.encode(ps.get(f"{model}@{suffix}", ps.get(suffix, ps.get(model, ps["default"])))))
        recipe = genome.decode(x)
        row = {"name": name, **{k: ev.score(recipe).fitness for k, ev in evs.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


def search(zoo: Path, fitness: Path, evals: int, seed: int, split: str = "projections") -> None:
    parts = PARTS[split]
    files = {"fitness": fitness, "dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl"}
    cfg = config(zoo, fitness)
    evs = evaluators(zoo, cfg, files)
    cv = chat_vector_recipe(cfg, 0.5)

    def recipe(x):
        w = np.asarray(x) * HIGH
        conds = [{"filter_regex": p, "value": [float(w[j * len(TUNED_LAYERS) + i]) for i in range(len(TUNED_LAYERS))] + [0.5, 0.5]}
                 for j, p in enumerate(parts)]
        return replace(cv, models=(ModelEntry(cv.models[0].model, {"weight": conds + [{"value": 0.5}]}),))

    x0 = [0.5 / HIGH] * (len(parts) * len(TUNED_LAYERS))
    es = cma.CMAEvolutionStrategy(x0, 0.15, {"bounds": [0, 1], "popsize": 8, "seed": seed + 1, "verbose": -9})
    best, n = (-1.0, x0), 0
    while n + 8 <= evals:
        xs = es.ask()
        fs = [evs["fitness"].score(recipe(x)).fitness for x in xs]
        es.tell(xs, [-f for f in fs])
        n += len(xs)
        best = max([best] + [(f, list(map(float, x))) for f, x in zip(fs, xs)], key=lambda b: b[0])
        print(n, round(best[0], 4), flush=True)
    report = {name: {k: ev.score(recipe(x)).fitness for k, ev in evs.items()} for name, x in (("best", best[1]), ("mean", es.mean), ("chat_vector_0.5", x0))}
    report["weights"] = {f"{p}@layer{i}": round(best[1][j * len(TUNED_LAYERS) + i] * HIGH, 2) for j, p in enumerate(parts) for i in range(len(TUNED_LAYERS))}
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "grid":
        grid(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        search(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:7])
