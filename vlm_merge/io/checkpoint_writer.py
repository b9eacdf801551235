"""Checkpoint writing: safetensors shards streamed tensor by tensor (header first), written atomically.

The plan (`plan_shards`) follows transformers' shard rule; `CheckpointWriter` streams each tensor's bytes
(or row pieces of it) into the open shard and writes the index. Reading is `vlm_merge.io.checkpoint`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from vlm_merge.io.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TORCH_TO_SAFETENSORS,
)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will receive, declared before writing starts."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def _safetensors_header(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Streams tensors, in the declared order, into sharded safetensors files in `directory`.

    Use inside an `AtomicDir`: `directory` is the temporary directory. Shard `k` of `n` is named
    `model-0000k-of-0000n.safetensors` (a single shard is `model.safetensors`), plus the index.
    """

    def __init__(
        self,
        directory: Path,
        tensors: Iterable[PlannedTensor],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = directory
        self.shards = plan_shards(list(tensors), max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        n = len(self.shards)
        self.names = (
            [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order: Iterator[tuple[int, PlannedTensor]] = (
            (i, t) for i, shard in enumerate(self.shards) for t in shard
        )
        self._shard_index = -1
        self._file: BinaryIO | None = None
        self._rows: tuple[PlannedTensor, int] | None = None  # the tensor `write_rows` is in, rows written

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the declared name, shape and dtype."""
        planned = self._next(name)
        if planned.name != name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"writer expected {planned.name} {planned.shape} {planned.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        assert self._file is not None
        if tensor.numel():
            self._file.write(tensor.contiguous().view(torch.uint8).numpy().data)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start + len(rows)) of a tensor, in order: start 0 begins the next declared tensor,
        each later call continues where the previous one stopped, and the tensor is done with its last row."""
        if start == 0:
            self._rows = (self._next(name), 0)
        if self._rows is None:
            raise RuntimeError(f"writer received rows of {name!r} from {start} before its first row")
        planned, done = self._rows
        shape = tuple(rows.shape)
        if (planned.name != name or not planned.shape or start != done or rows.dtype != planned.dtype
                or shape[1:] != planned.shape[1:] or done + shape[0] > planned.shape[0]):
            raise RuntimeError(
                f"writer expected rows of {planned.name} {planned.shape} {planned.dtype} from {done}, "
                f"got {name} {shape} {rows.dtype} from {start}"
            )
        assert self._file is not None
        if rows.numel():
            self._file.write(rows.contiguous().view(torch.uint8).numpy().data)
        done += shape[0]
        self._rows = None if done == planned.shape[0] else (planned, done)

    def _next(self, name: str) -> PlannedTensor:
        """The next declared tensor (its shard opened), for a write of `name`."""
        if self._rows is not None:
            raise RuntimeError(f"writer received {name!r} before the rows of {self._rows[0].name!r} were all written")
        try:
            i, planned = next(self._order)
        except StopIteration:
            raise RuntimeError(f"writer received undeclared tensor {name!r}") from None
        if i != self._shard_index:
            self._open_shard(i)
        return planned

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write the next tensor as raw bytes (byte-identical copies)."""
        planned = self._next(name)
        if planned.name != name or len(data) != planned.nbytes:
            raise RuntimeError(f"writer expected {planned.name} ({planned.nbytes} bytes), got {name} ({len(data)} bytes)")
        assert self._file is not None
        self._file.write(data)

    def _open_shard(self, i: int) -> None:
        self._close_file()
        self._shard_index = i
        self._file = open(self.directory / self.names[i], "wb")
        self._file.write(_safetensors_header(self.shards[i], self.metadata))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index (for more than one shard)."""
        if self._rows is not None:
            self._close_file()
            raise RuntimeError(f"writer closed with {self._rows[1]} of {self._rows[0].shape[0]} rows of {self._rows[0].name!r} written")
        left = next(self._order, None)
        if left is not None:
            self._close_file()
            raise RuntimeError(f"writer closed before tensor {left[1].name!r} was written")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
