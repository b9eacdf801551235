"""The streaming merge engine: every merge (Chat Vector, task arithmetic, …) runs through `execute`.

A merge is a `MergePlan`: the ordered list of output tensors, each either a byte copy of a source
tensor (vision tower, projector) or a merge of aligned source tensors computed by a pure function
from `vlm_merge.methods`. The engine reads one tensor per source at a time, computes in float32,
rounds once to the output dtype and streams the result into the output shard, so memory holds one
tensor per input plus the current output tensor. Elementwise merges are evaluated in chunks that stay
in cache, which makes the pass close to the cost of reading the inputs and writing the output once.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm_merge.anatomy import is_buffer
from vlm_merge.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    CheckpointWriter,
    PlannedTensor,
)
from vlm_merge.errors import VlmMergeError
from vlm_merge.threads import torch_threads
from vlm_merge.vocab import VocabPlan, fill_vocab_rows

# Elementwise merges run over 64K-element slices (256 KiB in float32): small enough to stay in cache
# and to be served by the allocator without faulting fresh pages (1 MiB slices ran 6x slower here).
CHUNK_ELEMENTS = 1 << 16

TensorFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Copy:
    """Copy a source tensor byte for byte."""

    role: str
    key: str


@dataclass(frozen=True)
class Merge:
    """Compute an output tensor from source tensors with `fn` (float32 in spirit, see `elementwise`).

    `inputs` maps role -> source key. `elementwise` promises that `fn` works on any slice of its
    inputs, so the engine may evaluate it in chunks. `vocab` marks embedding / lm_head tensors whose
    rows are aligned through the plan's `VocabPlan` first: `target_role` supplies the starting rows.
    """

    inputs: dict[str, str]
    fn: TensorFn
    elementwise: bool = True
    vocab: bool = False
    target_role: str | None = None
    vlm_rows_role: str | None = None  # role whose rows fill tokens new to the output (image/pad)
    vlm_rows_key: str | None = None
    vector_roles: tuple[str, ...] = ()  # roles that are task vectors, not models: unmatched rows are 0


@dataclass(frozen=True)
class OutputTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: Copy | Merge
    canonical: str | None = None  # the canonical LLM key, for language-model tensors


@dataclass
class MergePlan:
    tensors: list[OutputTensor]
    sources: dict[str, CheckpointReader]
    vocab: VocabPlan | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # where merge arithmetic runs; "cuda" moves each tensor's inputs to the GPU
    allow_nonfinite: bool = False  # write NaN/inf merged values instead of refusing (the user asked for it)

    def __post_init__(self) -> None:
        buffers = [t.key for t in self.tensors if is_buffer(t.key)]
        if buffers:  # planners skip them (anatomy.BUFFER_PATTERNS); writing one would be a bug
            raise ValueError(f"merge plan writes non-parameter buffer {buffers[0]!r} as a weight")

    def planned(self) -> list[PlannedTensor]:
        return [PlannedTensor(t.key, t.shape, t.dtype) for t in self.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.planned())


class Scratch:
    """Reusable buffers (one per source role, one for the output), so that reading and writing large
    tensors does not fault fresh memory in for every tensor."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, slot: str, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    def read(self, reader: CheckpointReader, role: str, key: str) -> torch.Tensor:
        return reader.read_into(key, self.buffer(role, reader.info(key).nbytes))

    def output(self, shape: tuple[int, ...], dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        return self.buffer(f"\0out{slot}", PlannedTensor("", shape, dtype).nbytes).view(dtype).view(shape)


def reuse_freed_memory() -> None:
    """Ask glibc to serve large allocations from its heap and keep freed memory for reuse.

    By default every tensor over 32 MiB is a fresh mmap whose pages fault in on first touch, which
    on VMs costs more than the arithmetic (a bf16 -> float32 copy ran 2.4x faster with reuse here).
    Merging allocates the same sizes tensor after tensor, so keeping them avoids the faults; the
    process's peak memory is unchanged. No effect off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of `x` is finite: one float32 sum (NaN/inf make it non-finite), and only
    when that overflows on huge but finite values, the elementwise `isfinite`."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def chunked(fn: TensorFn, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> bool:
    """Evaluate an elementwise `fn` slice by slice, writing each rounded slice into `out`.

    Returns whether every value was finite after rounding to `out`'s dtype (a float32 value beyond
    float16's range becomes inf only then).
    """
    flat = {r: t.reshape(-1) for r, t in tensors.items()}
    flat_out = out.view(-1)
    n = flat_out.numel()
    finite = True
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(n, start + CHUNK_ELEMENTS)
        chunk = flat_out[start:stop]
        chunk.copy_(fn({k: t[start:stop] for k, t in flat.items()}))
        finite = finite and all_finite(chunk)
    return finite


def gather_vocab(op: Merge, tensors: dict[str, torch.Tensor], plan: VocabPlan, sources: dict[str, CheckpointReader]) -> dict[str, torch.Tensor]:
    """Put every role's rows into the output's row space (float32).

    Rows a model role has no counterpart for are given the target's rows, so every task vector
    (m - b) is zero there and the output keeps the target's value; a role that already is a task
    vector (`vector_roles`) gets zeros there.
    """
    assert op.target_role is not None
    vlm_rows = None
    if op.vlm_rows_role is not None and op.vlm_rows_key is not None:
        vlm_rows = tensors.get(op.vlm_rows_role)
        if vlm_rows is None:
            vlm_rows = sources[op.vlm_rows_role].get(op.vlm_rows_key)
    filled = fill_vocab_rows(tensors[op.target_role], plan, vlm_rows)
    aligned = {op.target_role: filled}
    for role, t in tensors.items():
        if role == op.target_role:
            continue
        rows = plan.pairs[role]
        g = torch.zeros_like(filled) if role in op.vector_roles else filled.clone()
        g[rows.out] = t[rows.src].float()
        aligned[role] = g
    return aligned


def compute(t: OutputTensor, plan: MergePlan, scratch: Scratch | None = None, slot: int = 0) -> torch.Tensor:
    """The value of one merged output tensor, rounded to its dtype (in `scratch`'s output `slot`)."""
    op = t.op
    assert isinstance(op, Merge)
    scratch = scratch or Scratch()
    tensors = {role: scratch.read(plan.sources[role], role, key) for role, key in op.inputs.items()}
    vocab = plan.vocab
    if op.vocab and vocab is not None:
        if not vocab.is_identity or any(x.shape[0] != vocab.out_rows for x in tensors.values()):
            tensors = gather_vocab(op, tensors, vocab, plan.sources)
    for role, x in tensors.items():
        if tuple(x.shape) != t.shape:
            raise VlmMergeError(f"{t.key}: source {role} has shape {list(x.shape)}, output needs {list(t.shape)}")
    out = scratch.output(t.shape, t.dtype, slot)
    if plan.device != "cpu":
        r = op.fn({k: x.to(plan.device, non_blocking=True) for k, x in tensors.items()}).to(t.dtype)
        finite = all_finite(r)
        out.copy_(r.cpu())
    elif op.elementwise:
        finite = chunked(op.fn, tensors, out)
    else:
        out.copy_(op.fn(tensors))
        finite = all_finite(out)
    if not finite and not plan.allow_nonfinite:
        dtype = str(t.dtype).removeprefix("torch.")
        raise VlmMergeError(
            f"{t.key}: the merged values are NaN/inf in the output dtype {dtype} (likely cause: a scale/weight too large "
            f"for {dtype}, or NaN/inf in an input); use smaller scales, a wider --dtype, or pass --allow-nonfinite "
            "(allow_nonfinite=True) to write them anyway"
        )
    return out


def execute(
    plan: MergePlan,
    directory: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Write every tensor of `plan` into `directory` (a temporary directory owned by the caller).

    Writing overlaps computing: a writer thread writes tensor i from one output buffer while the next
    tensor is computed into the other (double buffering), so memory holds two output tensors at most.
    """
    reuse_freed_memory()
    writer = CheckpointWriter(directory, plan.planned(), max_shard_bytes, plan.metadata)
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress)
    scratch = Scratch()
    pending: list[Future | None] = [None, None]  # the write in flight from each output slot
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-merge-writer")
    with torch_threads(max(1, torch.get_num_threads() - 1)):  # leave a core to the writer thread
        try:
            for i, t in enumerate(plan.tensors):
                slot = i % 2
                if pending[slot] is not None:
                    pending[slot].result()
                if isinstance(t.op, Copy):
                    nbytes = PlannedTensor(t.key, t.shape, t.dtype).nbytes
                    value = plan.sources[t.op.role].read_into(t.op.key, scratch.buffer(f"\0out{slot}", nbytes))
                else:
                    value = compute(t, plan, scratch, slot)
                pending[slot] = pool.submit(writer.write, t.key, value)
                bar.update(PlannedTensor(t.key, t.shape, t.dtype).nbytes)
            for f in pending:
                if f is not None:
                    f.result()
            writer.close()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            writer.abort()
            raise  # the caller's output rule (vlm_merge.outputs) turns write errors into one line
        finally:
            pool.shutdown(wait=True)
            bar.close()
