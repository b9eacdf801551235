"""What finding the inert genes costs at the start of `vlm-merge evolve`, in candidates.

``python -m bench.inert_genes`` (CPU, seconds): a 32-layer Llama (hidden 32, random weights; the number and names
of its tensors are a 7B Llama's, which is what `evolve.inert_genes` works through) as English base, a Japanese base
(the English base + noise everywhere) and a fine-tune that changed layers 0-15 only. Genome: task arithmetic with
one weight per projection and layer norm of every layer (`split_modules: projections`) plus embeddings and lm_head:
290 genes, of which layers 16-31, the embeddings and lm_head (146) are inert. Side by side, medians of `--rounds`:

- ``inert_genes``: `evolve.inert_genes(genome, merger)` on the resident merger (done once per run);
- ``candidate merge``: `ResidentMerger.apply` of one candidate recipe (done once per candidate).

Results: ``bench/results/inert_genes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import MachineFacts, write_results
from vlm_merge.evolve import Genome, config_from_dict, inert_genes
from vlm_merge.engine.resident import ResidentMerger

RESULTS = Path(__file__).parent / "results"
LAYERS, TUNED = 32, 16


def write_sources(root: Path) -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "en")
    state = base.state_dict()

    def tuned(key: str) -> bool:
        return ".layers." in key and int(key.split(".layers.")[1].split(".")[0]) < TUNED

    for name, seed, where in (("ja", 1, lambda k: True), ("ft", 2, tuned)):
        g = torch.Generator().manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        m.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) if where(k) else v for k, v in state.items()})
        m.save_pretrained(root / name)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-inert-"))
    try:
        cfg = write_sources(work)
        conf = config_from_dict({
            "sources": {"base_model": str(work / "en"), "target": str(work / "ja"), "models": [str(work / "ft")]},
            "method": "task_arithmetic",
            "genome": {"params": {"weight": [0.0, 1.5]}, "split_modules": "projections", "separate": ["embeddings", "lm_head"]},
            "fitness": {"benchmark": "unused.jsonl", "kind": "loglik", "metrics": {"loglik": 1.0}},
        })  # fmt: skip
        genome = Genome.of(conf, LAYERS)
        merger = ResidentMerger.open(genome.decode(genome.x0()), LlamaForCausalLM(cfg))
        recipes = [genome.decode([(i + 1) / (args.rounds + 2)] * len(genome)) for i in range(args.rounds)]
        merger.apply(recipes[0])  # warm-up
        find, apply = [], []
        for r in recipes:
            t = time.perf_counter()
            held = inert_genes(genome, merger)
            find.append(time.perf_counter() - t)
            t = time.perf_counter()
            merger.apply(r)
            apply.append(time.perf_counter() - t)
        find_med, apply_med = statistics.median(find), statistics.median(apply)
        result = {
            "what": f"inert_genes vs one candidate merge, {LAYERS}-layer Llama (hidden 32), projection split: {len(genome)} genes",
            "genes": len(genome), "inert": len(held), "rounds": args.rounds, "threads": args.threads,
            "inert_genes_s_median": find_med, "candidate_merge_s_median": apply_med, "ratio": find_med / apply_med,
            "machine": MachineFacts.collect().as_dict(),
            "command": "python -m bench.inert_genes " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        md = (f"# Finding the inert genes\n\n{result['what']} ({len(held)} inert), {args.rounds} rounds, medians.\n\n"
              f"| step | seconds |\n|---|---|\n| inert_genes (once per run) | {find_med:.3f} s |\n"
              f"| one candidate merge (resident, in place) | {apply_med * 1e3:.1f} ms |\n\n"
              f"**ratio: {find_med / apply_med:.0f}** candidate merges\n")
        write_results(RESULTS, "inert_genes", result, md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
