"""The world's VQA sets: PNG images + JSONL rows in the eval custom-benchmark schema.

Each row: ``image`` (path relative to the JSONL file), ``question``, ``answer``, ``question_id``, plus
``attribute`` / ``value`` (what content accuracy checks), ``qtype`` and ``lang``. English and Japanese
files of a split share images and question arguments (parallel questions); dev and test are drawn from
different seeds and no image of one appears in the other.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from vlm_merge.world import scenes

SPLITS = {"dev": (300, 1), "test": (1000, 2)}  # questions, questions per image


def _signature(scene: scenes.Scene) -> tuple:
    return tuple((o.cell, o.color, o.shape) for o in scene.objects)


def build_split(rng: random.Random, n_questions: int, per_image: int, exclude: set,
                qtypes: tuple[str, ...]) -> list[tuple[scenes.Scene, list]]:
    """[(scene, [(qtype, args, phrasing), ...])] with `n_questions` in all, the `qtypes` balanced."""
    out, total, t = [], 0, 0
    while total < n_questions:
        sc = scenes.sample_scene(rng)
        sig = _signature(sc)
        if sig in exclude:
            continue
        exclude.add(sig)
        qs, used = [], set()
        for _ in range(per_image):
            for _try in range(len(qtypes)):
                qtype = qtypes[t % len(qtypes)]
                t += 1
                cands = scenes._question_candidates(sc, qtype)
                if cands and qtype not in used:
                    used.add(qtype)
                    qs.append((qtype, scenes.choose_args(sc, qtype, cands, rng), rng.randrange(3)))
                    break
        qs = qs[: n_questions - total]
        total += len(qs)
        out.append((sc, qs))
    return out


def write_datasets(out_dir: str | Path, seed: int, book: scenes.Phrasebook) -> dict[str, Path]:
    """Write images/ and {lang}-{split}.jsonl under `out_dir`, worded by `book`; returns file paths by
    '{lang}-{split}'."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set = set()
    files: dict[str, Path] = {}
    for split, (n, per_image) in SPLITS.items():
        rng = random.Random(f"world-{seed}-{split}")
        items = build_split(rng, n, per_image, seen, book.qtypes)
        rows: dict[str, list[dict]] = {lang: [] for lang in scenes.LANGS}
        for i, (sc, qs) in enumerate(items):
            name = f"images/{split}-{i:04d}.png"
            scenes.draw_scene(sc).save(out / name, optimize=True)
            for j, (qtype, args, phrasing) in enumerate(qs):
                for lang in scenes.LANGS:
                    qa = book.make_qa(sc, qtype, lang, args, phrasing)
                    rows[lang].append({
                        "question_id": f"{split}-{i:04d}-{j}", "image": name, "question": qa.question,
                        "answer": qa.answer, "attribute": qa.attribute, "value": qa.value, "qtype": qtype, "lang": lang,
                    })
        for lang, rs in rows.items():
            path = out / f"{lang}-{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
            files[f"{lang}-{split}"] = path
    return files


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a zoo's JSONL data file (read by safe_load: a `--zoo` is user input)."""
    from vlm_merge.errors import VlmMergeError
    from vlm_merge.io.safe_load import parse_json, read_text

    rows = [parse_json(line, f"{path}:{n}") for n, line in enumerate(read_text(path, "data file").splitlines(), 1)
            if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise VlmMergeError(f"{path}: expected a JSON object per line")
    return rows


def load_images(path: str | Path, rows: list[dict]) -> list[Image.Image]:
    base = Path(path).parent
    cache: dict[str, Image.Image] = {}
    for r in rows:
        if r["image"] not in cache:
            with Image.open(base / r["image"]) as im:
                cache[r["image"]] = im.convert("RGB")
    return [cache[r["image"]] for r in rows]
