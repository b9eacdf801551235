"""Japanese-Heron-Bench's two on-disk forms, read into benchmark rows (`eval.benchmarks`, schema `heron`).

103 questions over 21 images, each question in one category: conv (42), detail (21), complex (40) (counted in
turingmotors/heron `playground/data/japanese-heron-bench/questions_ja.jsonl`, commit 883cd7c).

- turing-motors' form (turingmotors/heron `playground/data/japanese-heron-bench/`, and the Hub dataset
  turing-motors/Japanese-Heron-Bench): `questions_ja.jsonl` ({question_id, image, category, image_category,
  context, text}), `answers_gpt4.jsonl` ({question_id, images, image_category, prompt, answer_id, model_id, text}:
  GPT-4's reference answers, model_id gpt-4-0125-preview) and the images under `images/` (Heron's README: "Download
  images/ ... and place them under playground/data/japanese-heron-bench/"). Heron pairs the two files line by line;
  here they are joined by question_id and must hold the same ids.
- llm-jp's copy (Hub dataset Silviase/Japanese-Heron-Bench, split train, which llm-jp-eval-mm 0.4.1's
  `tasks/japanese_heron_bench.py` loads): parquet rows with `question_id`, `image` (embedded), `text`, `context`,
  `category` and `answer`, a dict keyed by model name; the reference is `answer["gpt-4-0125-preview"]`
  (eval-mm's `doc_to_answer`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import parse_json, read_text

QUESTIONS_FILE = "questions_ja.jsonl"
ANSWERS_FILE = "answers_gpt4.jsonl"
IMAGES_DIR = "images"
REFERENCE_MODEL = "gpt-4-0125-preview"  # the reference answers' model (answers_gpt4.jsonl model_id; eval-mm's key)
NOT_META = frozenset({"question_id", "text", "question", "answer", "image", "image_path"})
MAX_FILE_BYTES = 64 * 1024**2


def is_heron_dir(path: Path) -> bool:
    return path.is_dir() and (path / QUESTIONS_FILE).is_file()


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path, "Heron-Bench file", MAX_FILE_BYTES).splitlines(), 1):
        if line.strip():
            row = parse_json(line, f"{path}:{n}")
            if not isinstance(row, dict) or "question_id" not in row:
                raise VlmMergeError(f"{path}:{n}: expected a JSON object with a question_id")
            rows.append(row)
    return rows


def heron_dir_rows(root: Path) -> tuple[list[dict], list[Path]]:
    """turing-motors' form: rows {question_id, image (path relative to `root`), text, context, category,
    image_category, answer} and the files read."""
    questions, answers_path = _jsonl(root / QUESTIONS_FILE), root / ANSWERS_FILE
    if not answers_path.is_file():
        raise VlmMergeError(f"{root}: no {ANSWERS_FILE} beside {QUESTIONS_FILE}; Heron-Bench's reference answers "
                            "are GPT-4's (turingmotors/heron playground/data/japanese-heron-bench/)")
    answers = {str(a["question_id"]): a for a in _jsonl(answers_path)}
    rows = []
    for q in questions:
        qid = str(q["question_id"])
        if qid not in answers or not isinstance(answers[qid].get("text"), str):
            raise VlmMergeError(f"{answers_path}: no answer text for question_id {qid}")
        image = str(q.get("image", ""))
        in_images = root / IMAGES_DIR / image
        rows.append({**{k: v for k, v in q.items() if k != "image"},
                     "image": f"{IMAGES_DIR}/{image}" if in_images.is_file() or not (root / image).is_file() else image,
                     "answer": answers[qid]["text"]})
    return rows, [root / QUESTIONS_FILE, answers_path]


def heron_fields(row: dict, source: str, i: int) -> tuple[str, str, dict]:
    """(question, reference answer, meta) of one Heron row of either form; the answer dict's reference is GPT-4's."""
    question = row.get("text", row.get("question"))
    answer = row.get("answer")
    if isinstance(answer, dict):
        if not isinstance(answer.get(REFERENCE_MODEL), str):
            raise VlmMergeError(f"{source}: row {i}: answer has no {REFERENCE_MODEL!r} entry (models: "
                                f"{', '.join(sorted(answer)) or 'none'}); Heron-Bench's reference is GPT-4's answer")
        answer = answer[REFERENCE_MODEL]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise VlmMergeError(f"{source}: row {i}: a Heron-Bench row needs text (the question) and answer")
    for key in ("category", "context"):
        if not isinstance(row.get(key), str):
            raise VlmMergeError(f"{source}: row {i}: no {key!r}; Heron-Bench rows carry category and context")
    meta = {k: v for k, v in row.items() if k not in NOT_META and isinstance(v, (str, int, float, bool))}
    return question, answer, meta


def image_identity(cell: object) -> str:
    """What tells two rows' images apart (questions on one image share its key): the path a cell names, or a hash
    of its bytes (llm-jp's parquet embeds every row's image)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes):
        return hashlib.sha256(cell).hexdigest()
    return f"path:{cell}"
