"""Session-17 probe (EXPERIMENTS.md, "Session 17"): is the harm of the English VLM's delta a shift of the residual stream
in a few directions that reading the image does not need?

On N dev3 Japanese questions (default 600; disjoint from ja-dev and ja-test) the residual stream after layer 1 (the
input of the Japanese layers 2-3) is taken at the text positions after the image, once with Chat Vector at 1.0 and
once at 0 (the Japanese shell); U holds the top-k left singular vectors of the stacked shifts (uncentred: the first is
close to the mean shift). The writers to the residual stream of layers 0-1 (`o_proj`, `down_proj`) get
ja_base + a (I - U U^T) d + b U U^T d, every other tensor of layers 0-1 ja_base + c d, d = vlm - en_base, the rest Chat
Vector 0.5. Each (k, a, b, c) is scored on ja-dev (300) and ja-test (1000), content accuracy, the llm-jp protocol.
Needs ZOO/dev3 (`dev2.py ZOO 3000 ZOO/dev3`) and a scaffold (`headroom.py`): `python shift_projection.py ZOO SCAFFOLD [N]`."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from eval.prompts import image_token
from headroom import image_inputs, probe, prompt_ids
from vlm_merge.evolve import Evaluator, chat_vector_recipe

WRITERS = ("self_attn.o_proj", "mlp.down_proj")
LIN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
       "input_layernorm", "post_attention_layernorm")


def interface(ev: Evaluator, questions, layer: int = 2) -> torch.Tensor:
    """Hidden states after decoder layer `layer - 1` at the text positions after the image, stacked over `questions`."""
    img_id = ev.processor.tokenizer.convert_tokens_to_ids(image_token(ev.processor))
    out = []
    with torch.no_grad():
        for q in questions:
            ids = torch.tensor([prompt_ids(ev, q)])
            hs = ev.model(input_ids=ids, output_hidden_states=True, **image_inputs([ev.encoded[q.image_key].features])).hidden_states
            last_img = int((ids[0] == img_id).nonzero().max())
            out.append(hs[layer][0, last_img + 1 :].float())
    return torch.cat(out)


def main(zoo: Path, scaffold: Path, n: int) -> None:
    cfg, evs, (vlm, en, ja) = probe(zoo, scaffold, {"dev": zoo / "data/ja-dev.jsonl", "test": zoo / "data/ja-test.jsonl"})
    shifts = Evaluator(replace(cfg, fitness=replace(cfg.fitness, benchmark=str(zoo / "dev3/ja-dev2.jsonl"))), scaffold)
    qs = shifts.pool[:n]
    shifts.merger.apply(chat_vector_recipe(cfg, 1.0))
    h1 = interface(shifts, qs)
    shifts.merger.apply(chat_vector_recipe(cfg, 0.0))
    h0 = interface(shifts, qs)
    delta = h1 - h0
    U, S, _ = torch.linalg.svd(delta.T.double(), full_matrices=False)
    e = (S**2).cumsum(0) / (S**2).sum()
    mean = delta.mean(0).double()
    print("positions", delta.shape[0], "energy@1,2,4,8,16", [round(float(e[i - 1]), 3) for i in (1, 2, 4, 8, 16)],
          "cos(u1, mean)", round(float(abs(U[:, 0] @ mean) / mean.norm()), 3), flush=True)
    keys = [f"layers.{l}.{n}.weight" for l in (0, 1) for n in LIN]

    def apply(k: int, a: float, b: float, c: float) -> None:
        P = U[:, :k] @ U[:, :k].T
        for ev in evs.values():
            lm = ev.model.model.language_model
            with torch.no_grad():
                for key in keys:
                    d = (vlm[key] - en[key]).double()
                    if key.removesuffix(".weight").endswith(WRITERS):
                        w = ja[key].double() + a * (d - P @ d) + b * (P @ d)
                    else:
                        w = ja[key].double() + c * d
                    lm.get_parameter(key).copy_(w.float())

    grid = [(0, 0.5, 0.5, 0.5)]  # Chat Vector 0.5
    grid += [(k, a, b, c) for k in (1, 2, 4, 8) for a, b, c in [(0.75, 0.0, 0.5), (1.0, 0.0, 0.5), (0.75, 0.0, 0.75), (1.0, 0.0, 1.0),
                                                               (0.75, 0.25, 0.75), (0.5, 0.0, 0.5), (1.0, 0.25, 0.75)]]
    for k, a, b, c in grid:
        apply(k, a, b, c)
        row = {"k": k, "a": a, "b": b, "c": c, **{s: round(ev._scores(ev.pool)["content_accuracy"], 4) for s, ev in evs.items()}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 600)
