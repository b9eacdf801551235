"""Session-16 probe (EXPERIMENTS.md, "Session 16"): does one attention head of layers 0-1 carry the English VLM delta's
harm (or its help) for Japanese questions?

Chat Vector 0.5 everywhere, except one head's slice of the delta (its rows of q/k/v_proj, its columns of o_proj) set
to weight 0 or 1; each of the 16 variants is scored on ja-dev (300) and ja-test (1000), content accuracy, the llm-jp
protocol. Needs a scaffold of the merge (e.g. ZOO/.headroom-scaffold, written by `headroom.py`):
`python head_weights.py ZOO SCAFFOLD`."""
import json
import sys
from pathlib import Path

import torch

from headroom import probe

zoo, scaf = Path(sys.argv[1]), Path(sys.argv[2])
cfg, evs, (vlm, en, ja) = probe(zoo, scaf, {"dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl"})
H, HD = 4, 32
def apply(w):  # w[(layer, head)] -> weight; everything else 0.5
    for ev in evs.values():
        lm = ev.model.model.language_model
        with torch.no_grad():
            for l in (0, 1):
                for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    k = f"layers.{l}.self_attn.{n}.weight"
                    d = vlm[k] - en[k]
                    m = torch.full((H,), 0.5)
                    for h in range(H):
                        m[h] = w.get((l, h), 0.5)
                    m = m.repeat_interleave(HD)
                    W = ja[k] + (d * m[:, None] if n != "o_proj" else d * m[None, :])
                    lm.get_submodule(f"layers.{l}.self_attn.{n}").weight.copy_(W)
grid = [{}] + [{(l, h): v} for l in (0, 1) for h in range(H) for v in (0.0, 1.0)]
for w in grid:
    apply(w)
    r = {"w": {f"L{l}H{h}": v for (l, h), v in w.items()}, **{s: round(ev._scores(ev.pool)["content_accuracy"], 4) for s, ev in evs.items()}}
    print(json.dumps(r), flush=True)
