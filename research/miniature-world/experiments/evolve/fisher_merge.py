"""Session-16 probe (EXPERIMENTS.md, "Session 16"): a Fisher-weighted merge of the English VLM's delta (Matena & Raffel
2022), per parameter: does what the Japanese model needs sit in other parameters than what reads the image?

Over the parameters of layers 0-1 that the VLM stage changed (linears and layer norms), the diagonal empirical Fisher
(mean squared gradient of the answer's log-likelihood, one question at a time) is taken of
  - F_ja: the Japanese base in the VLM shell (Chat Vector 0) on the first N dev3 Japanese questions (default 1500),
  - F_vlm: the English VLM on the English questions (en-dev and en-test: 1300),
and the layers are set to ja_base + s * d * lam F_vlm / (lam F_vlm + F_ja), d = vlm - en_base (Fisher merging of the
two models there, lam weighting the VLM, s a scale); everything else stays at Chat Vector 0.5. Each (lam, s) is scored
on ja-dev (300) and ja-test (1000), content accuracy, the llm-jp protocol. The Fishers are cached in ZOO/fisher.pt.
Needs ZOO/dev3 (`dev2.py ZOO 3000 ZOO/dev3`) and a scaffold of the merge (e.g. ZOO/.headroom-scaffold, written by
`headroom.py`): `python fisher_merge.py ZOO SCAFFOLD [N]`."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from headroom import image_inputs, lm_tensors, prompt_ids
from vlm_merge.evolve import Evaluator, chat_vector_recipe, config_from_dict

GRID = [(lam, s) for lam in (0.01, 0.1, 1, 10, 100, 1000) for s in (1.0, 1.5)]


def set_layers(model, state: dict[str, torch.Tensor], keys) -> None:
    lm = model.model.language_model
    with torch.no_grad():
        for k in keys:
            lm.get_parameter(k).copy_(state[k])


def fisher(ev: Evaluator, questions, keys) -> dict[str, torch.Tensor]:
    """Mean over `questions` of the squared gradient of log p(answer + EOS | prompt), per parameter of `keys`."""
    model, tok = ev.model, ev.processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    params = {k: model.model.language_model.get_parameter(k) for k in keys}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for q in questions:
        p_ids, a_ids = prompt_ids(ev, q), tok(q.answer, add_special_tokens=False).input_ids + [eos]
        ids = torch.tensor([p_ids + a_ids])
        logits = model(input_ids=ids, **image_inputs([ev.encoded[q.image_key].features])).logits
        logp = torch.log_softmax(logits[0, len(p_ids) - 1 : -1].float(), -1).gather(-1, ids[0, len(p_ids) :].unsqueeze(-1)).sum()
        model.zero_grad(set_to_none=True)
        (-logp).backward()
        for k, p in params.items():
            total[k] += p.grad.detach() ** 2
    for p in params.values():
        p.requires_grad_(False)
    return {k: v / len(questions) for k, v in total.items()}


def main(zoo: Path, scaffold: Path, n: int) -> None:
    torch.set_num_threads(1)
    cfg = config_from_dict({
        "sources": {"vlm": "en-vlm", "base_model": "en-base", "target": "ja-base", "models": ["vlm"]},
        "fitness": {"benchmark": "data/ja-dev.jsonl", "protocol": "llm-jp", "max_new_tokens": 24,
                    "metrics": {"content_accuracy": 1.0}, "batch_size": 64},
        "threads": 1}, zoo)  # fmt: skip
    cfg_en = replace(cfg, sources=replace(cfg.sources, target=cfg.sources.base_model))  # en_base + 1.0 d: the English VLM
    files = {"dev": "data/ja-dev.jsonl", "test": "data/ja-test.jsonl", "dev3": "dev3/ja-dev2.jsonl", "en": "data/en-dev.jsonl",
             "en2": "data/en-test.jsonl"}
    evs = {}
    for name, f in files.items():
        c = cfg_en if name.startswith("en") else cfg
        evs[name] = Evaluator(replace(c, fitness=replace(c.fitness, benchmark=str(zoo / f))), scaffold)
        evs[name].merger.apply(chat_vector_recipe(c, 1.0 if name.startswith("en") else 0.0))
    vlm, en, ja = lm_tensors(zoo)
    keys = [k for k in vlm if k.startswith(("layers.0.", "layers.1.")) and not torch.equal(vlm[k], en[k])]
    cache = zoo / "fisher.pt"
    if cache.exists():
        f = torch.load(cache)
        f_ja, f_vlm = f["F_ja"], f["F_vlm"]
    else:
        f_ja = fisher(evs["dev3"], evs["dev3"].pool[:n], keys)
        fa, fb = fisher(evs["en"], evs["en"].pool, keys), fisher(evs["en2"], evs["en2"].pool, keys)
        na, nb = len(evs["en"].pool), len(evs["en2"].pool)
        f_vlm = {k: (fa[k] * na + fb[k] * nb) / (na + nb) for k in keys}
        torch.save({"F_ja": f_ja, "F_vlm": f_vlm}, cache)
    for k in keys:
        print(k, f"F_ja {float(f_ja[k].mean()):.3g} F_vlm {float(f_vlm[k].mean()):.3g}", flush=True)
    for lam, s in [(None, 0.5)] + GRID:  # None: Chat Vector (every mask 1)
        state, share = {}, []
        for k in keys:
            m = torch.ones_like(f_ja[k]) if lam is None else lam * f_vlm[k] / (lam * f_vlm[k] + f_ja[k] + 1e-30)
            state[k] = ja[k] + s * m * (vlm[k] - en[k])
            share.append(float(m.mean()))
        for name in ("dev", "test"):
            set_layers(evs[name].model, state, keys)
        row = {"lam": lam, "s": s, "mean_mask": round(sum(share) / len(share), 3),
               **{name: round(evs[name]._scores(evs[name].pool)["content_accuracy"], 4) for name in ("dev", "test")}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1500)
