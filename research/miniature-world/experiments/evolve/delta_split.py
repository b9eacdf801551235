"""Session-15 probe (EXPERIMENTS.md, "Session 15"): can the English VLM's delta be split into a part that reads the
image and a part that hurts Japanese questions, by the inputs each tensor sees?

For each linear of layers 0-1, the input Gram matrices of image-token positions (G_img) and of the prompt's text
positions (G_txt) are summed over 1500 dev3 prompts under Chat Vector 0.5, and the delta d = vlm - en_base is split
RegMean-style into d_img = d G_img (G_img + G_txt + eps I)^-1 and d_txt = d - d_img. The layers' linears are then
set to ja_base + a d_img + b d_txt (norms stay at Chat Vector 0.5) and scored on ja-dev and ja-test.
Needs ZOO/dev3 (`dev2.py ZOO 3000 ZOO/dev3`) and a scaffold of the merge (e.g. ZOO/.headroom-scaffold, written by
`headroom.py`): `python delta_split.py ZOO SCAFFOLD`."""
import json
import sys
from pathlib import Path

import torch
from eval.prompts import image_token
from headroom import image_inputs, probe, prompt_ids

zoo, scaf = Path(sys.argv[1]), Path(sys.argv[2])
files = {"dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl", "dev3": zoo / "dev3/ja-dev2.jsonl"}
cfg, evs, (vlm, en, ja) = probe(zoo, scaf, files)

ev = evs["dev3"]
model = ev.model
lm = model.model.language_model
img_id = ev.processor.tokenizer.convert_tokens_to_ids(image_token(ev.processor))
LIN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
mods = {f"layers.{l}.{n}": lm.layers[l].get_submodule(n) for l in (0, 1) for n in LIN}
G = {k: {"img": 0, "txt": 0} for k in mods}
state = {}
def hook(name):
    def f(m, inp):
        x = inp[0].detach().float()
        for part in ("img", "txt"):
            xs = x[state[part]]
            G[name][part] = G[name][part] + xs.T @ xs
    return f
hs = [m.register_forward_pre_hook(hook(k)) for k, m in mods.items()]
qs = ev.pool[:1500]  # calibration: dev3 questions 0-1499 (prompts only)
with torch.inference_mode():
    for s in range(0, len(qs), 64):
        batch = qs[s:s + 64]
        rows, feats = [], []
        for q in batch:
            rows.append(prompt_ids(ev, q)); feats.append(ev.encoded[q.image_key].features)
        w = max(map(len, rows))
        ids = torch.zeros((len(rows), w), dtype=torch.long); mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r); mask[i, :len(r)] = 1
        state["img"] = ids == img_id
        state["txt"] = (mask == 1) & ~state["img"]
        model(input_ids=ids, attention_mask=mask, **image_inputs(feats))
for h in hs: h.remove()

split = {}
for k in mods:
    d = (vlm[k + ".weight"] - en[k + ".weight"]).float()
    gi, gt = G[k]["img"].double(), G[k]["txt"].double()
    n = gi.shape[0]
    eps = 1e-3 * (gi.trace() + gt.trace()) / n
    p = gi @ torch.linalg.inv(gi + gt + eps * torch.eye(n, dtype=torch.float64))  # in x in
    d_img = (d.double() @ p).float()
    split[k] = (d_img, d - d_img)
    print(k, "|d|", round(float(d.norm()), 3), "|d_img|", round(float(d_img.norm()), 3), flush=True)

def apply(a, b):
    for ev in evs.values():
        lm = ev.model.model.language_model
        with torch.no_grad():
            for k in mods:
                W = ja[k + ".weight"].float() + a * split[k][0] + b * split[k][1]
                lm.get_submodule(k).weight.copy_(W)
res = []
for a, b in [(0.5, 0.5), (1.0, 1.0), (1.0, 0.0), (1.0, 0.25), (1.0, 0.5), (0.75, 0.25), (0.75, 0.5), (1.5, 0.25), (1.5, 0.5), (0.5, 0.0), (0.5, 0.25)]:
    apply(a, b)
    r = {"img": a, "txt": b, **{s: ev._scores(ev.pool)["content_accuracy"] for s, ev in evs.items() if s != "dev3"}}
    print(json.dumps(r), flush=True)
