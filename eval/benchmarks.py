"""Benchmarks: a small registry of the published Japanese VLM sets, plus custom sets from local files.

Every benchmark becomes a list of `Question`s (id, image key, question, reference answer, position of
the QA among its image's QAs) and a way to fetch an image by key. Two row schemas are read:

- `vg-vqa` (JA-VG-VQA-500): one row per image with `image` and `qas`, a list of
  {qa_id, question, answer, a_objects, q_objects}; question ids are the `qa_id`s.
- `vqa` (JA-VLM-Bench-In-the-Wild, custom sets): one row per question with `image` (or `image_path`),
  `question`, `answer`; question ids are a `question_id` column or the row number (as llm-jp-eval-mm).
- `heron` (Japanese-Heron-Bench, `eval.heron`): turing-motors' `questions_ja.jsonl` + `answers_gpt4.jsonl` +
  `images/`, or llm-jp's parquet whose `answer` is a dict keyed by model name; each question's `category` and
  `context` are kept for the judge; questions on the same image share its key.

Where the data comes from (never downloaded):

- `--data PATH`: a dataset directory (a clone of the Hub repository with parquet files, or a
  `save_to_disk` directory), a parquet / arrow / JSONL / CSV file;
- otherwise, for a registered benchmark, its Hub id in the local Hugging Face hub cache
  (`HF_HUB_CACHE`, or `cache_dir`), then in the `datasets` cache (`HF_DATASETS_CACHE`, arrow files
  written by an earlier `load_dataset`).

Custom image paths are relative to the data file's directory. The fingerprint is a SHA-256 over the
data files (and, for custom sets, the image files they name), so two runs are known to have read the
same data; the Hub revision is recorded when the data came from the hub cache.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from eval.heron import heron_dir_rows, heron_fields, image_identity, is_heron_dir
from eval.images import open_image, probe_image
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import parse_json, read_text

SCHEMAS = ("vg-vqa", "vqa", "heron")
TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
MAX_TABLE_BYTES = 1024**3  # a JSONL/CSV benchmark file read as text; larger sets belong in parquet


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hf_id: str
    split: str
    schema: str
    description: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec(
            "ja-vg-vqa-500", "SakanaAI/JA-VG-VQA-500", "test", "vg-vqa",
            "500 Visual Genome images with Japanese QAs (Yahoo! JAPAN ja-vg-vqa); EvoVLM-JP evaluation set",
        ),
        BenchmarkSpec(
            "ja-vlm-bench-in-the-wild", "SakanaAI/JA-VLM-Bench-In-the-Wild", "test", "vqa",
            "50 questions over 42 images of Japanese culture and scenes; EvoVLM-JP evaluation set",
        ),
        BenchmarkSpec(
            "japanese-heron-bench", "Silviase/Japanese-Heron-Bench", "train", "heron",
            "103 questions (conv / detail / complex) over 21 images of Japan, GPT-4 reference answers; LLM-judged",
        ),
    )
}

QUESTION_SELECTIONS = ("first-per-image", "all")
NOT_META = frozenset({"question", "answer", "question_id", "image", "image_path", "image_url"})


@dataclass(frozen=True)
class Question:
    question_id: str
    image_key: str
    question: str
    answer: str
    qa_index: int = 0  # position among the QAs of its image (0 for one-question rows)
    # a one-question row's other scalar columns (e.g. the miniature world's attribute / value / lang, which the
    # content-accuracy scorer reads); empty for JA-VG-VQA
    meta: Mapping[str, str | int | float | bool] = field(default_factory=dict, compare=False)


@dataclass
class Benchmark:
    """Questions of one benchmark split and their images (decoded on demand)."""

    name: str
    questions: list[Question]
    source: str
    schema: str
    fingerprint: str
    revision: str | None = None
    split: str | None = None
    _load_image: Callable[[str], Image.Image] = field(default=lambda key: None, repr=False)  # type: ignore[assignment]
    _probe_image: Callable[[str], None] = field(default=lambda key: None, repr=False)

    def image(self, key: str) -> Image.Image:
        return self._load_image(key)

    def check_images(self, questions: list[Question] | None = None) -> None:
        """Check the image files the questions use without decoding them (each exists, is a non-empty
        regular file, has an image header and an acceptable size; `eval.images.probe_image`; images embedded
        as bytes: their header and size), so a bad one is found before a model loads."""
        for key in dict.fromkeys(q.image_key for q in (questions if questions is not None else self.questions)):
            self._probe_image(key)

    def select(self, questions: str = "all", limit: int | None = None) -> list[Question]:
        """The questions a protocol evaluates: `first-per-image` (each image's first QA) or `all`; first `limit`."""
        if questions not in QUESTION_SELECTIONS:
            raise VlmMergeError(f"unknown question selection {questions!r}: use one of {', '.join(QUESTION_SELECTIONS)}")
        chosen = [q for q in self.questions if questions == "all" or q.qa_index == 0]
        if limit is not None:
            if limit < 1:
                raise VlmMergeError(f"--limit {limit}: must be at least 1")
            chosen = chosen[:limit]
        return chosen

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "split": self.split,
            "schema": self.schema,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "questions_in_split": len(self.questions),
            "images_in_split": len({q.image_key for q in self.questions}),
        }


# ---------------------------------------------------------------- fingerprints
def _sha256_files(files: Sequence[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else f.name
        digest.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- tables
@dataclass
class _Table:
    """Rows of a benchmark file: column names, row access, and the files read."""

    columns: list[str]
    rows: Callable[[], list[dict]]  # every column except the image
    image: Callable[[int], object]  # row -> image cell (PIL image, bytes, {bytes, path}, or a path string)
    files: list[Path]
    base_dir: Path  # relative image paths are resolved against this
    length: int


def _hf_table(dataset, files: list[Path], base_dir: Path) -> _Table:
    """A `datasets.Dataset` as a table. An `Image` column is read undecoded ({bytes, path} cells): its images are
    decoded by `eval.images` (header probe, decompression-bomb guard), never by `datasets` on access."""
    import datasets

    columns = list(dataset.column_names)
    image_col = "image" if "image" in columns else "image_path" if "image_path" in columns else None
    others = [c for c in columns if c != image_col]
    images = dataset.select_columns([image_col]) if image_col else None
    if images is not None and isinstance(images.features[image_col], datasets.Image):
        images = images.cast_column(image_col, datasets.Image(decode=False))
    return _Table(
        columns=columns,
        rows=lambda: dataset.select_columns(others).to_list(),
        image=(lambda i: images[i][image_col]) if images is not None else (lambda i: None),
        files=files,
        base_dir=base_dir,
        length=len(dataset),
    )


def _parquet_dataset(files: list[Path]):
    """Parquet files as an in-memory `datasets.Dataset` (features from the files' metadata; no cache writes)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in files])
    except (OSError, pa.ArrowException) as e:
        raise VlmMergeError(f"{files[0]}: not a readable parquet file ({e})") from None
    return datasets.Dataset(table)


def _arrow_dataset(files: list[Path]):
    import datasets

    try:
        parts = [datasets.Dataset.from_file(str(f)) for f in files]
    except Exception as e:  # noqa: BLE001 - any arrow decoding failure is the user's file
        raise VlmMergeError(f"{files[0]}: not a readable arrow file ({e})") from None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _text_table(path: Path) -> _Table:
    """A JSONL / JSON-lines / CSV file of rows (images given as paths)."""
    rows: list[dict] = []
    text = read_text(path, "benchmark file", MAX_TABLE_BYTES)
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = parse_json(line, f"{path}:{n}")
            if not isinstance(row, dict):
                raise VlmMergeError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    image_col = "image" if "image" in columns else "image_path"
    return _Table(
        columns=columns,
        rows=lambda: [{k: v for k, v in row.items() if k != image_col} for row in rows],
        image=lambda i: rows[i].get(image_col),
        files=[path],
        base_dir=path.parent,
        length=len(rows),
    )


def _split_files(root: Path, split: str, suffixes: Sequence[str]) -> list[Path]:
    """Data files of `split` under a dataset directory, by the Hub's naming conventions.

    A file belongs to the split when a directory on its path is named `split` or its name is `split`,
    `split-*`, `split_*` or `*-split-*`; a directory holding a single data file is that file.
    """
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    def matches(f: Path) -> bool:
        stem = f.name.split(".")[0]
        return (split in f.relative_to(root).parts[:-1] or stem == split or stem.startswith((f"{split}-", f"{split}_"))
                or f"-{split}-" in stem or stem.endswith(f"-{split}"))
    chosen = [f for f in files if matches(f)]
    if not chosen and len(files) == 1:
        chosen = files
    if not chosen:
        found = ", ".join(str(f.relative_to(root)) for f in files[:5]) or "none"
        raise VlmMergeError(f"{root}: no {'/'.join(suffixes)} files for split {split!r} (data files found: {found})")
    kinds = {f.suffix.lower() for f in chosen}
    if len(kinds) > 1:
        raise VlmMergeError(f"{root}: split {split!r} mixes file types {sorted(kinds)}; keep one format")
    return chosen


def _heron_dir_table(root: Path) -> _Table:
    rows, files = heron_dir_rows(root)
    return _Table(columns=list(dict.fromkeys(k for row in rows for k in row)),
                  rows=lambda: [{k: v for k, v in row.items() if k != "image"} for row in rows],
                  image=lambda i: rows[i]["image"], files=files, base_dir=root, length=len(rows))


def scoring_meta(q: Question) -> dict[str, str | int | float | bool]:
    """What scorers read of a question besides its reference: the question text and its other columns."""
    return {"question": q.question, **q.meta}


def _table_from_path(path: Path, split: str) -> _Table:
    if is_heron_dir(path):
        return _heron_dir_table(path)
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise VlmMergeError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            files = sorted(path.rglob("*.arrow"))
            return _hf_table(ds, files, path)
        files = _split_files(path, split, TABLE_SUFFIXES)
        return _table_from_files(files, path)
    if not path.exists():
        raise VlmMergeError(f"{path}: no such file or directory")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise VlmMergeError(f"{path}: unsupported data file; use one of {', '.join(TABLE_SUFFIXES)} or a dataset directory")
    return _table_from_files([path], path.parent)


def _table_from_files(files: list[Path], base_dir: Path) -> _Table:
    suffix = files[0].suffix.lower()
    if suffix == ".parquet":
        return _hf_table(_parquet_dataset(files), files, base_dir)
    if suffix == ".arrow":
        return _hf_table(_arrow_dataset(files), files, base_dir)
    if len(files) > 1:
        raise VlmMergeError(f"{base_dir}: several {suffix} files for one split; merge them into one file")
    return _text_table(files[0])


def _hub_cache_snapshot(repo_id: str, cache_dir: str | Path | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _datasets_cache_files(repo_id: str, split: str, datasets_cache: str | Path | None) -> list[Path]:
    """Arrow files of `repo_id`/`split` written by an earlier `load_dataset` into the datasets cache."""
    import datasets

    root = Path(datasets_cache or os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE)
    org, _, name = repo_id.partition("/")
    if not root.is_dir():
        return []
    wanted = f"{org}___{name}".lower()
    candidates = []
    for d in root.iterdir():
        if d.is_dir() and d.name.lower() == wanted:
            candidates += [f for f in d.rglob("*.arrow") if f.name.lower().startswith(f"{name.lower()}-{split}")]
    if not candidates:
        return []
    newest = max(candidates, key=lambda f: f.stat().st_mtime).parent  # one prepared version
    return sorted(f for f in candidates if f.parent == newest)


def _cell_source(cell: object, base_dir: Path, label: str) -> Image.Image | bytes | Path:
    """What an image cell holds: a decoded image, encoded bytes, or the file it names (relative to `base_dir`)."""
    if isinstance(cell, dict):  # an undecoded datasets Image struct
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (Image.Image, bytes)):
        return cell
    if isinstance(cell, str) and cell:
        path = Path(cell).expanduser()
        return path if path.is_absolute() else base_dir / path
    raise VlmMergeError(f"{label}: no image (image cell is {cell!r})")


def _cell_image(cell: object, base_dir: Path, label: str) -> Image.Image:
    source = _cell_source(cell, base_dir, label)
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return open_image(source, name=f"{label}: {source}" if isinstance(source, Path) else label)


def _probe_cell(cell: object, base_dir: Path, label: str) -> None:
    source = _cell_source(cell, base_dir, label)
    if isinstance(source, Path):
        probe_image(source, name=f"{label}: {source}")
    elif isinstance(source, bytes):  # embedded in the data (a parquet's image bytes): its header checked too
        probe_image(source, name=f"{label}: embedded image")


def _qas_list(qas: object) -> list[dict]:
    """`qas` as a list of dicts (datasets' older Sequence feature stores a dict of lists)."""
    if isinstance(qas, dict):
        keys = list(qas)
        return [dict(zip(keys, values)) for values in zip(*(qas[k] for k in keys))]
    if isinstance(qas, str):  # a JSONL/CSV custom set may store the list as JSON text
        qas = parse_json(qas, "a row's qas")
    if not isinstance(qas, (list, type(None))):
        raise VlmMergeError(f"a row's qas must be a list of question objects, not {type(qas).__name__}")
    return list(qas or [])


def _questions(table: _Table, schema: str, source: str) -> list[Question]:
    columns = set(table.columns)
    image_col_present = "image" in columns or "image_path" in columns
    required = {"vg-vqa": {"qas"}, "vqa": {"question", "answer"}, "heron": {"answer", "category", "context"}}[schema]
    missing = sorted(required - columns) + ([] if image_col_present else ["image"])
    if missing:
        raise VlmMergeError(
            f"{source}: no column {missing[0]!r} (columns: {', '.join(sorted(columns)) or 'none'}); a benchmark file "
            "needs image (or image_path), question, answer per row, or the JA-VG-VQA schema (image, qas)"
        )
    questions: list[Question] = []
    first_row_of_url: dict[str, int] = {}  # rows sharing an image_url share one image key (In-the-Wild)
    for i, row in enumerate(table.rows()):
        if schema == "heron":
            q, a, meta = heron_fields(row, source, i)
            same_image = first_row_of_url.setdefault(image_identity(table.image(i)), i)
            questions.append(Question(str(row.get("question_id", i)), f"{same_image}", q, a, 0, meta))
        elif schema == "vg-vqa":
            for j, qa in enumerate(_qas_list(row["qas"])):
                if not isinstance(qa, dict) or "question" not in qa or "answer" not in qa:
                    raise VlmMergeError(f"{source}: row {i}: qas[{j}] lacks question/answer ({qa!r})")
                qid = qa.get("qa_id")
                questions.append(Question(str(qid if qid is not None else f"{i}-{j}"), f"{i}", str(qa["question"]),
                                          str(qa["answer"]), j))
        else:
            q, a = row.get("question"), row.get("answer")
            if q is None or a is None:
                raise VlmMergeError(f"{source}: row {i}: empty question or answer")
            qid = row.get("question_id")
            key = first_row_of_url.setdefault(row["image_url"], i) if row.get("image_url") else i
            meta = {k: v for k, v in row.items() if k not in NOT_META and isinstance(v, (str, int, float, bool))}
            questions.append(Question(str(qid if qid not in (None, "") else i), f"{key}", str(q), str(a), 0, meta))
    if not questions:
        raise VlmMergeError(f"{source}: no questions")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise VlmMergeError(f"{source}: question id {dup!r} appears more than once; question ids must be unique")
    return questions


def _image_files(table: _Table) -> list[Path]:
    """Image files named by path in a table (custom sets), for the fingerprint."""
    files = []
    for i in range(table.length):
        cell = table.image(i)
        if isinstance(cell, dict):
            cell = None if cell.get("bytes") else cell.get("path")
        if isinstance(cell, str) and cell:
            p = Path(cell).expanduser()
            p = p if p.is_absolute() else table.base_dir / p
            if p.is_file():
                files.append(p)
    return sorted(set(files))


def _benchmark(name: str, table: _Table, schema: str | None, source: str, split: str, revision: str | None) -> Benchmark:
    schema = schema or ("vg-vqa" if "qas" in table.columns else "heron" if {"category", "context"} <= set(table.columns)
                        and "question" not in table.columns else "vqa")
    questions = _questions(table, schema, source)
    base = table.base_dir
    fingerprint = _sha256_files(sorted(table.files) + _image_files(table), base)

    def load(key: str) -> Image.Image:
        row = int(key)
        return _cell_image(table.image(row), base, f"{source} row {row}")

    def probe(key: str) -> None:
        row = int(key)
        _probe_cell(table.image(row), base, f"{source} row {row}")

    return Benchmark(name=name, questions=questions, source=source, schema=schema, fingerprint=fingerprint,
                     revision=revision, split=split, _load_image=load, _probe_image=probe)


def load_benchmark(
    bench: str | Path,
    data: str | Path | None = None,
    *,
    split: str | None = None,
    cache_dir: str | Path | None = None,
    datasets_cache: str | Path | None = None,
) -> Benchmark:
    """A registered benchmark by name (from `data`, else the local caches), or a custom set from a path.

    `cache_dir` is the Hugging Face hub cache to look ids up in (default HF_HUB_CACHE); `datasets_cache`
    the `datasets` cache (default HF_DATASETS_CACHE).
    """
    name = str(bench)
    spec = BENCHMARKS.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if not path.exists():
            raise VlmMergeError(
                f"--bench {name!r}: not a registered benchmark ({', '.join(BENCHMARKS)}) and no such file or directory"
            )
        table = _table_from_path(path, split or "test")
        return _benchmark(path.stem if path.is_file() else path.name, table, None, str(path), split or "test", None)

    split = split or spec.split
    if data is not None:
        path = Path(data).expanduser()
        if path.exists():
            return _benchmark(name, _table_from_path(path, split), spec.schema, str(path), split, None)
        if str(data).count("/") != 1:
            raise VlmMergeError(f"--data {data}: no such file or directory")
        repo_id = str(data)
    else:
        repo_id = spec.hf_id
    snapshot = _hub_cache_snapshot(repo_id, cache_dir)
    if snapshot is not None and is_heron_dir(snapshot):
        return _benchmark(name, _heron_dir_table(snapshot), spec.schema, f"hf-cache:{repo_id}", split, snapshot.name)
    if snapshot is not None:
        files = _split_files(snapshot, split, (".parquet", ".arrow"))
        table = _table_from_files(files, snapshot)
        return _benchmark(name, table, spec.schema, f"hf-cache:{repo_id}", split, snapshot.name)
    arrow = _datasets_cache_files(repo_id, split, datasets_cache)
    if arrow:
        table = _hf_table(_arrow_dataset(arrow), arrow, arrow[0].parent)
        return _benchmark(name, table, spec.schema, f"datasets-cache:{repo_id}", split, None)
    raise VlmMergeError(
        f"benchmark {name}: {repo_id} (split {split}) is not in the Hugging Face hub cache nor the datasets cache; "
        f"download it once (huggingface-cli download --repo-type dataset {repo_id}) or pass --data DIR"
    )
