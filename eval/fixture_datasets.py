"""Tiny benchmark datasets in exactly the published schemas, for tests and demos (no download).

- `write_ja_vg_vqa(dir)`: a clone of the `SakanaAI/JA-VG-VQA-500` Hub repository in miniature:
  `README.md` with its `dataset_info`/`configs` header and `data/{test,train}-00000-of-00001.parquet`
  with columns image_id, url, width, height, coco_id, flickr_id (float64, null where absent), qas
  (list of {a_objects, answer, q_objects, qa_id, question}), image (datasets Image).
- `write_in_the_wild(dir)`: `SakanaAI/JA-VLM-Bench-In-the-Wild` in miniature: page_url, image_url,
  image, question, answer, several questions sharing an image.
- `write_hub_dataset_cache(cache, repo_id, repo_dir)`: those files in the hub cache layout
  (`datasets--org--name/blobs`, `snapshots/<commit>/…` symlinks, `refs/main`), as a download leaves them.

Images are drawn shapes (deterministic from the seed); questions and answers are Japanese.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"赤": (220, 30, 30), "青": (30, 60, 220), "緑": (30, 170, 60), "黄色": (235, 210, 30), "白": (245, 245, 245)}
SHAPES = ("丸", "四角")


def draw_scene(rng: random.Random, size: tuple[int, int] = (64, 48)) -> tuple[Image.Image, list[tuple[str, str]]]:
    """An image with 1-3 coloured shapes on grey, and the (colour, shape) of each."""
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(rng.randint(1, 3)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        x, y = rng.randint(0, size[0] - 16), rng.randint(0, size[1] - 16)
        box = (x, y, x + 14, y + 14)
        (draw.ellipse if shape == "丸" else draw.rectangle)(box, fill=COLOURS[colour])
        objects.append((colour, shape))
    return img, objects


def _png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _qas(objects: list[tuple[str, str]], start_id: int) -> list[dict]:
    colour, shape = objects[0]
    qas = [
        ("何色の図形がありますか？", f"{colour}の{shape}があります。"),
        ("図形はいくつありますか？", f"{len(objects)}つです。"),
        ("背景は何色ですか？", "灰色です。"),
    ]
    return [{"a_objects": [], "answer": a, "q_objects": [], "qa_id": start_id + i, "question": q}
            for i, (q, a) in enumerate(qas[: 1 + (start_id % 3)])]


VG_VQA_README = """---
language:
- ja
license: cc-by-4.0
task_categories:
- visual-question-answering
dataset_info:
  features:
  - name: image_id
    dtype: int64
  - name: url
    dtype: string
  - name: width
    dtype: int64
  - name: height
    dtype: int64
  - name: coco_id
    dtype: float64
  - name: flickr_id
    dtype: float64
  - name: qas
    list:
    - name: a_objects
      sequence: 'null'
    - name: answer
      dtype: string
    - name: q_objects
      sequence: 'null'
    - name: qa_id
      dtype: int64
    - name: question
      dtype: string
  - name: image
    dtype: image
configs:
- config_name: default
  data_files:
  - split: test
    path: data/test-*
  - split: train
    path: data/train-*
---
# JA-VG-VQA-500 (miniature fixture)
"""


def _vg_features():
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    return Features({
        "image_id": Value("int64"), "url": Value("string"), "width": Value("int64"), "height": Value("int64"),
        "coco_id": Value("float64"), "flickr_id": Value("float64"),
        "qas": List({"a_objects": List(Value("null")), "answer": Value("string"), "q_objects": List(Value("null")),
                     "qa_id": Value("int64"), "question": Value("string")}),
        "image": HFImage(),
    })  # fmt: skip


def write_ja_vg_vqa(out_dir: str | Path, n_images: int = 6, seed: int = 0, n_train: int = 2) -> Path:
    """A miniature JA-VG-VQA-500 repository (test split of `n_images` rows, 1-3 QAs each, plus a train split)."""
    from datasets import Dataset

    root = Path(out_dir)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    qa_id = 1000
    for split, n in (("test", n_images), ("train", n_train)):
        rows: dict[str, list] = {k: [] for k in ("image_id", "url", "width", "height", "coco_id", "flickr_id", "qas", "image")}
        for i in range(n):
            img, objects = draw_scene(rng)
            image_id = 2300000 + (0 if split == "test" else 500) + i
            rows["image_id"].append(image_id)
            rows["url"].append(f"https://cs.stanford.edu/people/rak248/VG_100K_2/{image_id}.jpg")
            rows["width"].append(img.width)
            rows["height"].append(img.height)
            rows["coco_id"].append(None if i % 2 else float(100000 + i))
            rows["flickr_id"].append(None)
            qas = _qas(objects, qa_id)
            qa_id += len(qas)
            rows["qas"].append(qas)
            rows["image"].append(_png(img))
        Dataset.from_dict(rows, features=_vg_features()).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(VG_VQA_README, encoding="utf-8")
    return root


def write_in_the_wild(out_dir: str | Path, n_images: int = 4, seed: int = 1) -> Path:
    """A miniature JA-VLM-Bench-In-the-Wild repository: 1-2 questions per image, rows sharing image_url."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    root = Path(out_dir)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("page_url", "image_url", "image", "question", "answer")}
    for i in range(n_images):
        img, objects = draw_scene(rng)
        colour, shape = objects[0]
        qa = [("この画像について説明してください。", f"灰色の背景に{colour}の{shape}が描かれています。"),
              ("一番目立つ色は何ですか？", f"{colour}です。")][: 1 + i % 2]
        for q, a in qa:
            rows["page_url"].append(f"https://example.jp/page/{i}")
            rows["image_url"].append(f"https://example.jp/images/{i}.png")
            rows["image"].append(_png(img))
            rows["question"].append(q)
            rows["answer"].append(a)
    features = Features({"page_url": Value("string"), "image_url": Value("string"), "image": HFImage(),
                         "question": Value("string"), "answer": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlanguage:\n- ja\n---\n# JA-VLM-Bench-In-the-Wild (miniature fixture)\n",
                                    encoding="utf-8")
    return root


def write_hub_dataset_cache(cache_dir: str | Path, repo_id: str, repo_dir: str | Path) -> str:
    """Store `repo_dir`'s files in a hub cache as dataset `repo_id` (blobs + snapshot symlinks); return the commit."""
    repo = Path(cache_dir) / f"datasets--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(repo_dir).rglob("*") if p.is_file())
    blobs = {str(p.relative_to(repo_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for p in files:
        rel = str(p.relative_to(repo_dir))
        (repo / "blobs" / blobs[rel]).write_bytes(p.read_bytes())
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        depth = len(Path(rel).parts) + 1  # snapshots/<commit>/<rel…> -> ../../(..)blobs/<sha>
        link.symlink_to(Path(*([".."] * depth), "blobs", blobs[rel]))
    (repo / "refs" / "main").write_text(commit)
    return commit
