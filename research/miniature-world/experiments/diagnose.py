"""Session-4 diagnostics of a short-answer zoo (EXPERIMENTS.md, "Session 4"), one per subcommand:

    python research/miniature-world/experiments/diagnose.py reading ZOO      # text bases on reading-comprehension prompts
    python research/miniature-world/experiments/diagnose.py scales ZOO 0,1.0 # Chat Vector per question type on ja-dev
    python research/miniature-world/experiments/diagnose.py en-shell ZOO     # English base in the VLM shell vs EN-VLM, en-test
    python research/miniature-world/experiments/diagnose.py en-vlm ZOO       # EN-VLM on ja-dev, right in either language
    python research/miniature-world/experiments/diagnose.py counts ZOO       # first-answer-token digit odds, ja-test counts

Content accuracy per question type; `scales` also counts answers right in the other language.
"""

import collections
import json
import random
import sys
from pathlib import Path

import short_answers
import torch

from vlm_merge.world import datasets, evaluate, experiment, scenes, text


def by_type(qtypes: list[str], correct: list[bool]) -> str:
    groups = collections.defaultdict(list)
    for q, c in zip(qtypes, correct):
        groups[q].append(c)
    per = {k: round(sum(v) / len(v), 2) for k, v in groups.items()}
    return f"{sum(correct) / len(correct):.3f} {per}"


def reading(zoo: Path, n: int = 200) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    book = short_answers.recorded_settings(json.loads((zoo / "zoo.json").read_text())["settings"]).phrasebook()
    for part, lang in (("en-base", "en"), ("ja-base", "ja"), ("ja-base", "en"), ("en-base", "ja")):
        model = LlamaForCausalLM.from_pretrained(zoo / part).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(zoo / part)
        rng, qtypes, ok = random.Random(5), [], []
        for _ in range(n):
            scene = scenes.sample_scene(rng)
            qa = book.sample_qa(scene, rng, lang)
            ids = tok(text.prompt(book.describe(scene, lang), qa.question), return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            qtypes.append(qa.qtype)
            ok.append(scenes.content_correct(answer, qa.attribute, qa.value, lang))
        print(f"{part} reading {lang}: {by_type(qtypes, ok)}", flush=True)


def scales(zoo: Path, grid: str, n: int = 300) -> None:
    meta = json.loads((zoo / "zoo.json").read_text())
    data = zoo / meta["data"]["ja-dev"]
    rows = datasets.read_rows(data)[:n]
    images = datasets.load_images(data, rows)
    for scale in (float(x) for x in grid.split(",")):
        path = experiment.chat_vector_model(zoo, zoo.parent / "diagnose-cv", scale, "embeddings")
        preds = evaluate.answer(*evaluate.load_vlm(path), images, [r["question"] for r in rows])
        ja = [scenes.content_correct(p, r["attribute"], r["value"], "ja") for r, p in zip(rows, preds)]
        en = [scenes.content_correct(p, r["attribute"], r["value"], "en") for r, p in zip(rows, preds)]
        print(f"scale {scale}: ja {sum(ja) / n:.3f}, en {sum(en) / n:.3f}; per type (either language) "
              f"{by_type([r['qtype'] for r in rows], [a or b for a, b in zip(ja, en)])}", flush=True)


def en_shell(zoo: Path, n: int = 400) -> None:
    from chat_vector import chat_vector

    data = zoo / "data" / "en-test.jsonl"
    rows = datasets.read_rows(data)[:n]
    images = datasets.load_images(data, rows)
    shell = chat_vector(zoo / "en-vlm", zoo / "en-base", zoo / "en-base", zoo.parent / "diagnose-en-shell",
                        scale=0.0, force=True, progress=False)
    for name, path in (("en-shell", shell), ("en-vlm", zoo / "en-vlm")):
        preds = evaluate.answer(*evaluate.load_vlm(path), images, [r["question"] for r in rows])
        ok = [scenes.content_correct(p, r["attribute"], r["value"], "en") for r, p in zip(rows, preds)]
        print(f"{name} on en-test[:{n}]: {by_type([r['qtype'] for r in rows], ok)}", flush=True)


def en_vlm(zoo: Path, n: int = 300) -> None:
    data = zoo / "data" / "ja-dev.jsonl"
    rows = datasets.read_rows(data)[:n]
    preds = evaluate.answer(*evaluate.load_vlm(zoo / "en-vlm"), datasets.load_images(data, rows), [r["question"] for r in rows])
    ja = [scenes.content_correct(p, r["attribute"], r["value"], "ja") for r, p in zip(rows, preds)]
    en = [scenes.content_correct(p, r["attribute"], r["value"], "en") for r, p in zip(rows, preds)]
    print(f"en-vlm on ja-dev[:{n}]: ja {sum(ja) / n:.3f}, en {sum(en) / n:.3f}; per type (either language) "
          f"{by_type([r['qtype'] for r in rows], [a or b for a, b in zip(ja, en)])}", flush=True)


def counts(zoo: Path, n: int = 500) -> None:
    """Session 12: on the first `n` Japanese test count questions, the log-probabilities of the first answer
    token over the digits 0-4 (the count's token in both languages), for the EN-VLM and Chat Vector at scales 0
    (the shell), 0.75 and 1.0: greedy accuracy, accuracy once each model's mean log-odds per digit (its prior) is
    subtracted, and the mean probability of the right digit per true count."""
    import tempfile

    import numpy as np

    from eval.prompts import build_prompt

    data = zoo / "data" / "ja-test.jsonl"
    rows = [r for r in datasets.read_rows(data) if r["attribute"] == "count"][:n]
    images = datasets.load_images(data, rows)
    y = np.array([int(r["value"]) for r in rows])
    with tempfile.TemporaryDirectory() as scratch:  # the merged models, removed afterwards
        models = {"en-vlm": zoo / "en-vlm"} | {f"cv {s}": experiment.chat_vector_model(zoo, Path(scratch) / str(s), s)
                                                for s in (0.0, 0.75, 1.0)}
        for name, path in models.items():
            model, processor = evaluate.load_vlm(path)
            digits = processor.tokenizer.convert_tokens_to_ids([f"\u2581{d}" for d in range(5)])
            lp = []
            with torch.no_grad():
                for r, image in zip(rows, images):
                    x = processor(images=[image.convert("RGB")], text=[build_prompt(processor, r["question"])],
                                  return_tensors="pt")
                    lp.append(torch.log_softmax(model(**x).logits[0, -1], -1)[digits].numpy())
            lp = np.array(lp)
            per = {d: round(float(np.exp(lp[y == d, d]).mean()), 3) for d in range(5) if (y == d).any()}
            print(f"{name}: accuracy {(lp.argmax(1) == y).mean():.3f}, prior-corrected "
                  f"{((lp - lp.mean(0)).argmax(1) == y).mean():.3f}, P(right digit) per count {per}", flush=True)
    print(f"counts 0-4: {np.bincount(y, minlength=5).tolist()}")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    command, zoo, *rest = argv
    {"reading": reading, "scales": scales, "en-shell": en_shell, "en-vlm": en_vlm, "counts": counts}[command](Path(zoo), *rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
