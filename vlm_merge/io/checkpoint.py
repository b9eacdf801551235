"""Checkpoint reading: lazy per-tensor reading and streaming of safetensors and `.bin` checkpoints.

Reading (`CheckpointReader`) accepts a local directory or a Hugging Face id (read from the cache, or
downloaded when online: `vlm_merge.io.hub`), holding safetensors (single file or sharded with
`model.safetensors.index.json`) or PyTorch `.bin` files (single or sharded with
`pytorch_model.bin.index.json`). Names, shapes and dtypes come from headers only; a tensor's bytes
are read with `pread` into a fresh or caller-provided buffer, one tensor at a time (no mapping of
whole files, so memory holds only the tensors in use). `.bin` files are only ever opened with
`torch.load(weights_only=True)`.

Writing lives in `vlm_merge.io.checkpoint_writer`: `CheckpointWriter` takes the full list of output tensors (name, shape, dtype) up front, so
each shard's safetensors header is written before its data and every tensor's bytes go straight to
disk as soon as they are computed: memory holds one output tensor, not a shard. Everything is
written into a temporary directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import (
    Want,
    check_fields,
    check_regular_file,
    field,
    load_json,
    parse_json,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

# safetensors dtype names <-> torch dtypes.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in _ST_DTYPES.items()}  # torch dtype -> safetensors dtype name (the writer)
# Every dtype the safetensors format defines (its `Dtype` enum); those not above are valid but unsupported here.
_ST_FORMAT_DTYPES = (*_ST_DTYPES, "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "U16", "U32", "U64", "C64")

def dtype_from_name(name: str) -> torch.dtype:
    """Map `bfloat16`/`bf16`/`float16`/`fp16`/`float32`/`fp32` to a torch dtype."""
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise VlmMergeError(f"unknown dtype {name!r}: use one of bfloat16, float16, float32") from None


def resolve_model_dir(path_or_id: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Return the local directory of a model given a path or a Hugging Face id (`ORG/NAME[@REVISION]`).

    An id is read from the cache offline (`HF_HUB_OFFLINE`, `--offline`) and otherwise downloaded or completed
    by huggingface_hub (`vlm_merge.io.hub.fetch_model`).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if revision:
            raise VlmMergeError(f"{path}: a local directory; --revision {revision} applies to Hugging Face ids only")
        return path
    if path.exists():
        raise VlmMergeError(f"{path}: is a file; pass the model directory that contains it")
    from vlm_merge.io.hub import fetch_model

    return fetch_model(str(path_or_id), cache_dir, revision)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # byte offset of the data in a safetensors file (0 for .bin)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in its tensor.rs)


def _header_error(path: Path, what: str) -> VlmMergeError:
    return VlmMergeError(f"{path}: corrupt safetensors header: {what}; re-download or re-save the file")


def _entry_info(path: Path, name: str, entry: object, base: int) -> tuple[TensorInfo, int, int]:
    """One header entry checked field by field: (its TensorInfo, data begin, data end)."""
    if not isinstance(entry, dict):
        raise _header_error(path, f"entry {name!r} is {type(entry).__name__}, not an object")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str):
        raise _header_error(path, f"tensor {name!r} has no dtype string")
    if dtype_name not in _ST_FORMAT_DTYPES:
        raise _header_error(path, f"tensor {name!r} has dtype {dtype_name[:40]!r}, which is not a safetensors dtype")
    if dtype_name not in _ST_DTYPES:
        raise VlmMergeError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}, which vlm-merge does not support "
            f"(supported: {', '.join(_ST_DTYPES)}); convert the checkpoint to one of those"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _header_error(path, f"tensor {name!r} has shape {str(shape)[:60]}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise _header_error(path, f"tensor {name!r} has data_offsets {str(offsets)[:60]}, not two integers")
    begin, end = offsets
    info = TensorInfo(name, tuple(shape), _ST_DTYPES[dtype_name], path, base + begin)
    if not 0 <= begin <= end:
        raise _header_error(path, f"tensor {name!r} has data_offsets [{begin}, {end}], not 0 <= begin <= end")
    if end - begin != info.nbytes:
        raise _header_error(
            path, f"tensor {name!r} has data_offsets [{begin}, {end}] but {dtype_name} {shape} needs {info.nbytes} bytes"
        )
    return info, begin, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header before any tensor is read.

    The checks are safetensors' own (`Metadata::validate` and `read_metadata` in its tensor.rs): the
    header length is at most 100 MB and fits the file; the header is a UTF-8 JSON object whose
    `__metadata__` maps strings to strings; every entry has a known dtype, a shape of non-negative
    integers and `data_offsets` [begin, end] with end - begin = numel x itemsize; sorted by offset,
    the tensors tile the data region exactly (no overlap, no gap) and end where the file ends.
    """
    st = check_regular_file(path, "safetensors file")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VlmMergeError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise VlmMergeError(
                    f"{path}: corrupt or truncated safetensors header (declared length {n}, file size {size}); re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise VlmMergeError(f"{path}: cannot read ({e.strerror}); check the file and its permissions") from None
    try:
        header = parse_json(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError:
        raise _header_error(path, "not UTF-8") from None
    except VlmMergeError:
        raise _header_error(path, "not JSON") from None
    if not isinstance(header, dict):
        raise _header_error(path, f"a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _header_error(path, "__metadata__ is not a map of strings to strings")
    base = 8 + n
    entries = sorted((_entry_info(path, name, entry, base) for name, entry in header.items()), key=lambda e: (e[1], e[2]))
    expected = 0
    for info, begin, end in entries:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else f"leaves a gap of {begin - expected} bytes before it"
            raise _header_error(path, f"tensor {info.name!r} at data_offsets [{begin}, {end}] {what}")
        expected = end
    if base + expected != size:
        if base + expected > size:
            raise VlmMergeError(
                f"{path}: truncated: its tensors need {base + expected} bytes but the file has {size}; re-download the file"
            )
        raise _header_error(path, f"the tensors end at byte {base + expected} but the file has {size} bytes")
    return {info.name: info for info, _, _ in entries}, metadata


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint with the safe unpickler only."""
    check_regular_file(path, "PyTorch checkpoint")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line.upper()), None)
        if refused is None:  # the safe unpickler met bytes that are no pickle it knows: not a checkpoint
            raise VlmMergeError(f"{path}: not a valid PyTorch checkpoint (corrupt or another kind of file); re-download it") from None
        raise VlmMergeError(
            f"{path}: refusing to load: it needs unsafe unpickling ({refused[:120]}); "
            "convert it to safetensors with code you trust"
        ) from None
    # weights_only's restricted unpickler runs no code, but on arbitrary bytes it fails with many exception
    # types (EOFError, KeyError, IndexError, struct.error, ...): each means the file is no valid checkpoint
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmMergeError(f"{path}: not a valid PyTorch checkpoint (truncated or corrupt: {msg[:120]}); re-download it") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VlmMergeError(f"{path}: not a state dict of tensors")
    return sd


_COUNT = Want((int,), minimum=1)
_TOKEN_ID = Want((int, type(None)), minimum=0)
_MODEL_FIELDS = {  # a (sub-)config's fields vlm-merge or transformers read, where present
    "model_type": Want((str,)),
    "architectures": Want((list, type(None))),
    "num_hidden_layers": _COUNT,
    "hidden_size": _COUNT,
    "intermediate_size": _COUNT,
    "num_attention_heads": _COUNT,
    "num_key_value_heads": Want((int, type(None)), minimum=1),
    "vocab_size": _COUNT,
    "max_position_embeddings": _COUNT,
    "pad_token_id": _TOKEN_ID,
    "image_token_index": _TOKEN_ID,
    "image_token_id": _TOKEN_ID,
    "tie_word_embeddings": Want((bool,)),
    "rope_theta": Want((int, float), minimum=0),
    "rope_scaling": Want((dict, type(None))),
    "rms_norm_eps": Want((int, float), minimum=0),
    "image_size": _COUNT,
    "patch_size": _COUNT,
}
CONFIG_FIELDS = {  # config.json: its top level and its text / vision sub-configs
    **_MODEL_FIELDS,
    "text_config": Want((dict, type(None)), fields=_MODEL_FIELDS),
    "vision_config": Want((dict, type(None)), fields=_MODEL_FIELDS),
}


class CheckpointReader:
    """Lazy access to the tensors of one model directory (safetensors preferred, `.bin` safely)."""

    def __init__(self, path_or_id: str | Path, cache_dir: str | Path | None = None, files: list[Path] | None = None):
        self.path = resolve_model_dir(path_or_id, cache_dir)
        self._whole_dir = files is None
        if files is None:
            self.format, self._files = self._find_weight_files()
        else:
            self._weight_map = None
            self.format = "safetensors" if all(f.suffix == ".safetensors" for f in files) else "bin"
            self._files = list(files)
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        if self.format == "safetensors":
            for file in self._files:
                infos, _ = read_safetensors_header(file)
                self._infos.update(infos)
        else:
            for file in self._files:
                for name, t in _load_bin(file).items():
                    self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
        self._check_index_consistency()

    # -- discovery -------------------------------------------------------------------------
    def _find_weight_files(self) -> tuple[str, list[Path]]:
        p = self.path
        for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            index = p / index_name
            if index.exists():
                self._weight_map = self._read_index(index)
                files = sorted({self._shard_path(index, f) for f in self._weight_map.values()})
                for f in files:
                    if not f.exists():
                        raise VlmMergeError(
                            f"{index}: names shard {f.name!r}, which is missing from {p}; re-download the model"
                        )
                return fmt, files
        self._weight_map = None
        if (p / SAFETENSORS_SINGLE).exists():
            return "safetensors", [p / SAFETENSORS_SINGLE]
        if (p / BIN_SINGLE).exists():
            return "bin", [p / BIN_SINGLE]
        others = sorted(p.glob("*.safetensors"))
        if others:
            return "safetensors", others
        raise VlmMergeError(
            f"{p}: no model weights found (expected model.safetensors, {SAFETENSORS_INDEX}, "
            f"{BIN_SINGLE} or {BIN_INDEX})"
        )

    @staticmethod
    def _read_index(index: Path) -> dict[str, str]:
        data = load_json(index, "index")
        weight_map = field(data, "weight_map", dict, str(index))
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise VlmMergeError(f"{index}: weight_map[{name!r}] must be a shard file name, not {shard!r}; re-download it")
        return dict(weight_map)

    def _shard_path(self, index: Path, name: str) -> Path:
        """The shard an index names: a relative path inside the checkpoint directory.

        Checked by name, not by resolving links: a Hugging Face cache snapshot's shards are links into
        its blob store, outside the snapshot directory.
        """
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            raise VlmMergeError(
                f"{index}: names shard {name!r}, which is outside the checkpoint directory; "
                "an index may only name files inside it (re-download the model)"
            )
        return self.path / name

    def _check_index_consistency(self) -> None:
        if self._weight_map is None:
            return
        for name, shard in self._weight_map.items():
            info = self._infos.get(name)
            if info is None or info.file.name != shard:
                raise VlmMergeError(
                    f"{self.path}: index lists {name!r} in {shard!r} but that shard does not hold it; "
                    "re-download the model"
                )

    # -- metadata --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise VlmMergeError(f"{self.path}: has no tensor {name!r}") from None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    @property
    def inputs(self) -> list[Path]:
        """What this reader reads, for the output rule: its model directory, or just its given files."""
        return [self.path] if self._whole_dir else list(self._files)

    @property
    def weight_files(self) -> list[Path]:
        return list(self._files)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def config(self) -> dict:
        """The parsed config.json ({} when absent), its fields checked by `CONFIG_FIELDS`."""
        cfg = self.path / "config.json"
        return self.read_config(cfg) if os.path.lexists(cfg) else {}

    @staticmethod
    def read_config(path: Path) -> dict:
        """A config.json file (a model's, a CLIP tower's), read by safe_load and checked by `CONFIG_FIELDS`."""
        data = load_json(path, "config")
        try:
            check_fields(data, CONFIG_FIELDS, str(path))
        except VlmMergeError as e:
            raise VlmMergeError(f"{e}; fix or re-download the config") from None
        return data

    # -- data ------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """One tensor, in memory of its own."""
        info = self.info(name)
        if self.format == "safetensors":
            return self.read_into(name, torch.empty(info.nbytes, dtype=torch.uint8))
        return self._bin_tensor(info)

    def read_into(self, name: str, buffer: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or its rows [start, stop) along the first dimension, read into `buffer` (uint8, at
        least that size); returns a typed view of it.

        For `.bin` checkpoints the tensor comes from the (memory-mapped) pickle instead.
        """
        info = self.info(name)
        shape = info.shape
        if rows is not None:
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise ValueError(f"{name}: rows {rows} outside its shape {list(shape)}")
            shape = (rows[1] - rows[0], *shape[1:])
        if self.format != "safetensors":
            t = self._bin_tensor(info)
            return t if rows is None else t[rows[0] : rows[1]]
        nbytes = math.prod(shape) * info.dtype.itemsize
        offset = info.offset + (rows[0] * (info.nbytes // info.shape[0]) if rows is not None and rows[0] else 0)
        view = buffer[:nbytes]
        if nbytes:
            fd = self._fds.get(info.file)
            if fd is None:  # two threads may open it at once (the engine reads ahead): keep one descriptor
                opened = os.open(info.file, os.O_RDONLY)
                fd = self._fds.setdefault(info.file, opened)
                if fd != opened:
                    os.close(opened)
            mv = memoryview(view.numpy())
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [mv[done:]], offset + done)
                if n <= 0:
                    raise VlmMergeError(f"{info.file}: ended while reading {name!r}; the file is truncated, re-download it")
                done += n
        return view.view(info.dtype).view(shape)

    def _bin_tensor(self, info: TensorInfo) -> torch.Tensor:
        if self._bin_cache is None or self._bin_cache[0] != info.file:
            self._bin_cache = None  # drop the previous shard before loading the next
            self._bin_cache = (info.file, _load_bin(info.file))
        return self._bin_cache[1][info.name]

    def read_bytes(self, name: str) -> bytes:
        """The raw stored bytes of one tensor (used to compare tensors byte for byte)."""
        t = self.get(name)
        return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_cache = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
