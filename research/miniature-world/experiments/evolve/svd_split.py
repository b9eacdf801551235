"""Session-16 probe (EXPERIMENTS.md, "Session 16"): is what helps and what hurts in the English VLM's delta held in
different singular directions of each tensor?

Each linear of layers 0-1 gets ja_base + a * top_k(d) + b * (d - top_k(d)), d = vlm - en_base and top_k its rank-k SVD
truncation (norms and everything else at Chat Vector 0.5); every (k, a, b) of the grid is scored on ja-dev (300) and
ja-test (1000), content accuracy, the llm-jp protocol. Needs a scaffold of the merge (e.g. ZOO/.headroom-scaffold,
written by `headroom.py`): `python svd_split.py ZOO SCAFFOLD`."""
import json
import sys
from pathlib import Path

import torch

from headroom import probe

zoo, scaf = Path(sys.argv[1]), Path(sys.argv[2])
cfg, evs, (vlm, en, ja) = probe(zoo, scaf, {"dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl"})
LIN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
keys = [f"layers.{l}.{n}" for l in (0, 1) for n in LIN]
svd = {}
for k in keys:
    d = (vlm[k + ".weight"] - en[k + ".weight"]).double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    svd[k] = (U, S, Vh, d)
    e = (S**2).cumsum(0) / (S**2).sum()
    print(k, tuple(d.shape), "energy@2,4,8,16,32", [round(float(e[i - 1]), 3) for i in (2, 4, 8, 16, 32)], flush=True)
def apply(kr, a, b):
    for ev in evs.values():
        lm = ev.model.model.language_model
        with torch.no_grad():
            for k in keys:
                U, S, Vh, d = svd[k]
                top = (U[:, :kr] * S[:kr]) @ Vh[:kr]
                W = ja[k + ".weight"].double() + a * top + b * (d - top)
                lm.get_submodule(k).weight.copy_(W.float())
grid = [(0, 0.5, 0.5)]  # Chat Vector 0.5
grid += [(kr, a, b) for kr in (2, 4, 8, 16, 32) for a, b in [(1.0, 0.0), (1.0, 0.25), (1.0, 0.5), (0.75, 0.25), (0.75, 0.5), (1.5, 0.25),
                                                        (0.75, 0.0), (0.5, 0.25)]]  # the top part stronger
grid += [(kr, a, b) for kr in (1, 2, 4, 8, 16) for a, b in [(0.25, 0.75), (0.5, 0.75), (0.25, 1.0), (0.5, 1.0), (0.0, 1.0), (0.35, 0.65),
                                                       (0.4, 0.6)]]  # the rest stronger
for kr, a, b in grid:
    apply(kr, a, b)
    r = {"k": kr, "top": a, "rest": b, **{s: round(ev._scores(ev.pool)["content_accuracy"], 4) for s, ev in evs.items()}}
    print(json.dumps(r), flush=True)
