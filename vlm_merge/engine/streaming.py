"""The streaming merge engine: every merge (Chat Vector, task arithmetic, …) runs through `execute`.

A merge is a `MergePlan`: the ordered list of output tensors, each either a byte copy of a source
tensor (vision tower, projector) or a merge of aligned source tensors computed by a pure function
from `vlm_merge.methods`. The engine reads one tensor per source at a time, computes in float32,
rounds once to the output dtype and streams the result into the output shard, so memory holds one
tensor per input plus the current output tensor. On the CPU, copies and elementwise merges stream: each
tensor moves in pieces of rows (`PIECE_BYTES` of output), read, aligned to the output's vocabulary rows
where needed, merged in float32 chunks that stay in cache, rounded and written piece by piece, so memory
holds a few pieces whatever the tensor's size (plus the whole target embedding when its mean row fills
padding rows). A reader thread reads the next piece while the current one is merged and a writer thread
writes the previous one, so the pass costs about the longest of reading, merging and writing rather than
their sum: close to the cost of reading the inputs and writing the output once.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm_merge.architecture.anatomy import is_buffer
from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader
from vlm_merge.io.checkpoint_writer import CheckpointWriter, PlannedTensor
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.threads import torch_threads
from vlm_merge.architecture.vocab import VLM_ROWS, VocabPlan, fill_vocab_rows, needs_mean, target_mean, vocab_rows

# Elementwise merges run over 64K-element slices (256 KiB in float32): small enough to stay in cache
# and to be served by the allocator without faulting fresh pages (1 MiB slices ran 6x slower here).
CHUNK_ELEMENTS = 1 << 16
# Streamed tensors move in pieces of about this many output bytes (2048 rows of a 4096-wide fp16 matrix).
PIECE_BYTES = 16 << 20

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
    union_keys: dict[str, str] = field(default_factory=dict)  # role -> key of sources whose rows fill union tokens

    def row_source(self, role: str) -> tuple[str, str]:
        """(source role, key) of the rows an added token of `role` ("vlm": image / pad tokens) comes from."""
        if role == VLM_ROWS and self.vlm_rows_role is not None and self.vlm_rows_key is not None:
            return self.vlm_rows_role, self.vlm_rows_key
        return role, self.union_keys[role]

    @property
    def row_roles(self) -> tuple[str, ...]:
        """The roles added tokens can take rows from ("vlm" when the op has the VLM's rows)."""
        return (*((VLM_ROWS,) if self.vlm_rows_role is not None and self.vlm_rows_key is not None else ()), *self.union_keys)


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
    rows = {}
    for row_role in op.row_roles:
        role, key = op.row_source(row_role)
        rows[row_role] = tensors[role] if role in tensors and op.inputs.get(role) == key else sources[role].get(key)
    filled = fill_vocab_rows(tensors[op.target_role], plan, rows)
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
        raise nonfinite_error(t)
    return out


class Slots:
    """The two output buffers of `execute`: the writer thread writes from one while the next tensor or piece is
    computed into the other (double buffering)."""

    def __init__(self, scratch: Scratch, pool: ThreadPoolExecutor) -> None:
        self.scratch, self.pool = scratch, pool
        self.pending: list[Future | None] = [None, None]  # the write in flight from each buffer
        self.index = 0  # the buffer the next value goes into

    def wait(self) -> int:
        """The next buffer's index, once its previous write is done."""
        f = self.pending[self.index]
        if f is not None:
            self.pending[self.index] = None
            f.result()
        return self.index

    def buffer(self, nbytes: int) -> torch.Tensor:
        return self.scratch.buffer(f"\0out{self.wait()}", nbytes)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Write the value just put into the current buffer (`fn(*args)` on the writer thread)."""
        self.pending[self.index] = self.pool.submit(fn, *args)
        self.index ^= 1

    def drain(self) -> None:
        for i, f in enumerate(self.pending):
            if f is not None:
                self.pending[i] = None
                f.result()


class ReadAhead:
    """The source rows of every plainly streamed merge piece (`plain_pieces`), read one piece ahead on a reader
    thread into two alternating sets of buffers: the next piece is read while the current one is merged, so a
    merge costs about the longer of its reads and its arithmetic instead of their sum. Plans with `.bin` sources
    read in the caller's thread (their tensors come from a memory-mapped pickle, one shard at a time)."""

    def __init__(self, plan: MergePlan, scratch: Scratch, pool: ThreadPoolExecutor) -> None:
        self.plan, self.scratch, self.pool = plan, scratch, pool
        self.ahead = all(r.format == "safetensors" for r in plan.sources.values())
        self.jobs = plain_pieces(plan)
        self.parity = 0  # the buffer set the next read goes into
        self.next: tuple[str, tuple[int, int], Future | list] | None = None  # the next piece: its reads, or their future
        self._queue()

    def _queue(self) -> None:
        job = next(self.jobs, None)
        if job is None:
            self.next = None
            return
        t, rows = job
        assert isinstance(t.op, Merge)
        sources, parity = self.plan.sources, self.parity
        # The buffers come from this thread: the main heap, which serves the same sizes again and again.
        reads = [(sources[role], role, key, self.scratch.buffer(f"{role}\0{parity}", rows_nbytes(sources[role], key, rows[1] - rows[0])))
                 for role, key in t.op.inputs.items()]  # fmt: skip
        self.next = (t.key, rows, self.pool.submit(read_rows, reads, rows) if self.ahead else reads)
        self.parity ^= 1

    def take(self, t: OutputTensor, rows: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The rows of `t`'s sources (the next piece in plan order); starts reading the piece after it. The
        buffers stay valid until the piece after next is taken."""
        assert self.next is not None and self.next[:2] == (t.key, rows), (t.key, rows, self.next[:2] if self.next else None)
        pending = self.next[2]
        self._queue()
        return pending.result() if isinstance(pending, Future) else read_rows(pending, rows)


def read_rows(reads: list[tuple[CheckpointReader, str, str, torch.Tensor]], rows: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of each (reader, role, key, buffer)'s tensor, read into its buffer, by role."""
    return {role: reader.read_into(key, buf, rows) for reader, role, key, buf in reads}


def plain_pieces(plan: MergePlan) -> Iterator[tuple[OutputTensor, tuple[int, int]]]:
    """Every piece, in plan order, of the streamed merges whose rows are read as they are (not aligned to the
    output's vocabulary)."""
    for t in plan.tensors:
        if streams(t, plan) and isinstance(t.op, Merge) and not aligned(t.op, plan):
            for rows in row_ranges(t.shape, t.dtype):
                yield t, rows


def aligned(op: Merge, plan: MergePlan) -> bool:
    """Whether `op`'s rows go through the plan's vocabulary alignment (`aligned_pieces`, `gather_vocab`)."""
    vocab = plan.vocab
    return op.vocab and vocab is not None and (
        not vocab.is_identity or any(plan.sources[role].info(key).shape[:1] != (vocab.out_rows,) for role, key in op.inputs.items())
    )


def row_ranges(shape: tuple[int, ...], dtype: torch.dtype) -> Iterator[tuple[int, int]]:
    """Rows [start, stop) of a tensor's pieces, about `PIECE_BYTES` each."""
    step = max(1, PIECE_BYTES // max(1, PlannedTensor("", shape[1:], dtype).nbytes))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def streams(t: OutputTensor, plan: MergePlan) -> bool:
    """Whether `t` is written piece by piece (a CPU copy or elementwise merge of a tensor with rows)."""
    return bool(t.shape) and t.shape[0] > 0 and plan.device == "cpu" and (isinstance(t.op, Copy) or t.op.elementwise)


def rows_nbytes(reader: CheckpointReader, key: str, rows: int) -> int:
    """The bytes of `rows` rows of a source tensor."""
    info = reader.info(key)
    return info.nbytes // info.shape[0] * rows if info.shape and info.shape[0] else 0


def row_runs(out: torch.Tensor, src: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first output row, first source row, length) of each run where both row lists go up by one."""
    if not len(out):
        return []
    breaks = (((out[1:] != out[:-1] + 1) | (src[1:] != src[:-1] + 1)).nonzero().flatten() + 1).tolist()
    return [(int(out[a]), int(src[a]), b - a) for a, b in zip([0, *breaks], [*breaks, len(out)])]


def nonfinite_error(t: OutputTensor) -> VlmMergeError:
    dtype = str(t.dtype).removeprefix("torch.")
    return VlmMergeError(
        f"{t.key}: the merged values are NaN/inf in the output dtype {dtype} (likely cause: a scale/weight too large "
        f"for {dtype}, or NaN/inf in an input); use smaller scales, a wider --dtype, or pass --allow-nonfinite "
        "(allow_nonfinite=True) to write them anyway"
    )


def stream_merge(t: OutputTensor, plan: MergePlan, scratch: Scratch, slots: Slots, writer: CheckpointWriter, reads: ReadAhead) -> None:
    """Merge `t` piece by piece: each piece's rows read from every source (from `reads`, or aligned to the
    output's vocabulary rows for embeddings / lm_head, as `gather_vocab` aligns whole tensors), merged by
    `chunked`, written."""
    op = t.op
    assert isinstance(op, Merge)
    vocab = plan.vocab
    align = aligned(op, plan)
    for role, key in op.inputs.items():
        info = plan.sources[role].info(key)
        shape = (vocab.out_rows, *info.shape[1:]) if align and vocab is not None else tuple(info.shape)
        if shape != t.shape:
            raise VlmMergeError(f"{t.key}: source {role} has shape {list(shape)}, output needs {list(t.shape)}")
    if align:
        assert vocab is not None
        pieces = aligned_pieces(t, plan, vocab, scratch)
    else:
        pieces = ((rows, reads.take(t, rows)) for rows in row_ranges(t.shape, t.dtype))
    for (start, stop), tensors in pieces:
        out = slots.buffer(PlannedTensor(t.key, (stop - start, *t.shape[1:]), t.dtype).nbytes).view(t.dtype)
        out = out.view(stop - start, *t.shape[1:])
        if not chunked(op.fn, tensors, out) and not plan.allow_nonfinite:
            raise nonfinite_error(t)
        slots.submit(writer.write_rows, t.key, start, out)


def aligned_pieces(
    t: OutputTensor, plan: MergePlan, vocab: VocabPlan, scratch: Scratch
) -> Iterator[tuple[tuple[int, int], dict[str, torch.Tensor]]]:
    """The pieces of a vocabulary tensor, every role's rows in the output's row space (float32), as
    `gather_vocab` gives them for the whole tensor. The target is read whole only when its mean row is needed
    (padding), and then once: its mean, then its rows."""
    op = t.op
    assert isinstance(op, Merge) and op.target_role is not None
    target_role, sources = op.target_role, plan.sources
    target_key = op.inputs[target_role]
    target_info = sources[target_role].info(target_key)
    has_vlm = VLM_ROWS in op.row_roles
    mean, whole = None, None
    if needs_mean(vocab, target_info.shape[0], has_vlm):
        whole = sources[target_role].read_into(target_key, scratch.buffer(target_role, target_info.nbytes))
        mean = target_mean(whole)

    def source_row(row_role: str, i: int) -> torch.Tensor:
        role, key = op.row_source(row_role)
        reader = sources[role]
        return reader.read_into(key, scratch.buffer("\0row", rows_nbytes(reader, key, 1)), (i, i + 1))[0]

    n = min(vocab.target_rows, vocab.out_rows, target_info.shape[0])
    for start, stop in row_ranges(t.shape, t.dtype):
        if whole is not None:
            target = whole[start:]
        else:
            rows = (min(start, n), min(stop, n))
            buf = scratch.buffer(target_role, rows_nbytes(sources[target_role], target_key, rows[1] - rows[0]))
            target = sources[target_role].read_into(target_key, buf, rows)
        filled = vocab_rows(vocab, (start, stop), target, target_info.shape[0], mean, source_row if op.row_roles else None)
        aligned = {target_role: filled}
        for role, key in op.inputs.items():
            if role == target_role:
                continue
            g = torch.zeros_like(filled) if role in op.vector_roles else filled.clone()
            rows_of = vocab.pairs[role]
            inside = (rows_of.out >= start) & (rows_of.out < stop)
            reader = sources[role]
            buf = scratch.buffer(role, rows_nbytes(reader, key, stop - start))
            for out_row, src_row, m in row_runs(rows_of.out[inside], rows_of.src[inside]):
                g[out_row - start : out_row - start + m] = reader.read_into(key, buf, (src_row, src_row + m))
            aligned[role] = g
        yield (start, stop), aligned


def execute(
    plan: MergePlan,
    directory: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Write every tensor of `plan` into `directory` (a temporary directory owned by the caller).

    Writing and reading overlap computing: a writer thread writes one tensor or piece from one output buffer
    while the next is computed into the other (double buffering), and a reader thread reads the next streamed
    merge piece into a second set of input buffers (`ReadAhead`), so memory holds two output pieces (or whole
    tensors, for those that do not stream) and two sets of input pieces at most.
    """
    reuse_freed_memory()
    writer = CheckpointWriter(directory, plan.planned(), max_shard_bytes, plan.metadata)
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress)
    scratch = Scratch()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-merge-writer")
    read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-merge-reader")
    slots = Slots(scratch, pool)
    with torch_threads(max(1, torch.get_num_threads() - 1)):  # leave a core to the writer and reader threads
        try:
            reads = ReadAhead(plan, scratch, read_pool)
            for t in plan.tensors:
                if streams(t, plan) and isinstance(t.op, Copy):
                    reader = plan.sources[t.op.role]
                    for start, stop in row_ranges(t.shape, t.dtype):
                        value = reader.read_into(t.op.key, slots.buffer(PlannedTensor(t.key, (stop - start, *t.shape[1:]), t.dtype).nbytes), (start, stop))
                        slots.submit(writer.write_rows, t.key, start, value)
                elif streams(t, plan):
                    stream_merge(t, plan, scratch, slots, writer, reads)
                elif isinstance(t.op, Copy):
                    nbytes = PlannedTensor(t.key, t.shape, t.dtype).nbytes
                    slots.submit(writer.write, t.key, plan.sources[t.op.role].read_into(t.op.key, slots.buffer(nbytes)))
                else:
                    slot = slots.wait()
                    slots.submit(writer.write, t.key, compute(t, plan, scratch, slot))
                bar.update(PlannedTensor(t.key, t.shape, t.dtype).nbytes)
            slots.drain()
            writer.close()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            read_pool.shutdown(wait=True, cancel_futures=True)
            writer.abort()
            raise  # the caller's output rule (vlm_merge.io.outputs) turns write errors into one line
        finally:
            pool.shutdown(wait=True)
            read_pool.shutdown(wait=True)
            bar.close()
