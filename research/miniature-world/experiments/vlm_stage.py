"""Session-5 experiment (EXPERIMENTS.md, "The English VLM itself"): the VLM stage alone, on the English base
of an existing zoo, printing per-question-type English dev content accuracy every EVERY steps.

    python research/miniature-world/experiments/vlm_stage.py ZOO STEPS EVERY {default,factored} ['{"vlm_lr": ...}']

The zoo's own settings are used (its `en_mix`, replay mix, ...), with `vlm_steps` = STEPS and no early stop;
`factored` pretrains the vision tower with one head per attribute (`ja_questions.factored_vision`).
"""

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import ja_questions
import short_answers
import torch
from tokenizers import Tokenizer
from transformers import AutoProcessor, LlamaForCausalLM

from vlm_merge.world import build, datasets, evaluate, scenes, text, train


def main(argv: list[str]) -> int:
    zoo, steps, every, vision = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    extra = json.loads(argv[4]) if len(argv) > 4 else {}
    ja_questions.patch()
    torch.set_num_threads(1)
    meta = json.loads((zoo / "zoo.json").read_text())
    s = short_answers.recorded_settings(meta["settings"] | {"vlm_steps": steps, "vlm_min_steps": 0, "vlm_check_every": every} | extra)
    seed = meta["seed"]
    tok = Tokenizer.from_file(str(zoo / "en-base" / "tokenizer.json"))
    vlm_tok = text.vlm_tokenizer(tok)
    pretrain_vision = ja_questions.factored_vision if vision == "factored" else train.train_vision
    tower = pretrain_vision(s, seed * 1000 + 3, False, [])
    vlm = build.build_vlm(LlamaForCausalLM.from_pretrained(zoo / "en-base"), tower, vlm_tok, s, seed * 1000 + 4)
    with tempfile.TemporaryDirectory() as tmp:
        build.write_processor_files(Path(tmp), vlm_tok)
        processor = AutoProcessor.from_pretrained(tmp)
    data = zoo / "data" / "en-dev.jsonl"
    rows = datasets.read_rows(data)[:300]
    images = datasets.load_images(data, rows)
    t0 = time.perf_counter()

    def check(step: int) -> bool:
        preds = evaluate.answer(vlm, processor, images, [r["question"] for r in rows])
        by_type = collections.defaultdict(list)
        for r, p in zip(rows, preds):
            by_type[r["qtype"]].append(scenes.content_correct(p, r["attribute"], r["value"], "en"))
        overall = sum(sum(v) for v in by_type.values()) / len(rows)
        per = {k: round(sum(v) / len(v), 2) for k, v in by_type.items()}
        print(f"step {step} ({time.perf_counter() - t0:.0f} s): {overall:.3f} {json.dumps(per)}", flush=True)
        vlm.train()
        return False

    train.train_vlm(vlm, vlm_tok, s, seed * 1000 + 5, False, [], check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
