"""Fused task arithmetic for resident merging on a GPU: one kernel launch writes a whole candidate.

On a GPU a resident merge is bound by memory traffic: a candidate must read every source tensor once
and write the merged language model once. Evaluated tensor by tensor with torch ops, task arithmetic
makes float32 copies and temporaries of every input (about five times those bytes) and launches a
handful of kernels per tensor. `FusedTaskArithmetic` instead turns the live model's parameters into
views of one flat output buffer, gives every source role one flat buffer that `ResidentMerger.open`
reads the checkpoints straight into (`slot`: a tensor's place in it, which the resident inputs are
views of), and runs one Triton kernel over all of it. Per element,
in float32 and in the operation order of `methods.task_arithmetic`:

    one model:   out = a                      if w == 0
                 out = (m - b) * w + a        otherwise (multiply, then add: two roundings)
    k models:    out = a;  for each i with w_i != 0:  out = fma(m_i - b, w_i, out)
                 (torch's vectorised `add_(d, alpha=w)` on the CPU is a fused multiply-add)
    a = anchor if the recipe has one (Chat Vector: the Japanese base), else b

then rounds once to the recipe's output dtype (bfloat16: round-to-nearest-even by bit arithmetic, so
the Triton interpreter and the GPU agree), stores in the live parameters' dtype and records, per block, whether any float32 value was NaN/inf. Weights
are per tensor: a small table uploaded per candidate. The kernel is compiled without contracting
multiplies and adds into FMAs, so the one-model form rounds exactly as the CPU engine does.

Used for `task_arithmetic` without `normalize` or `lambda` (the Chat Vector form and the per-layer
weights `vlm-merge evolve` searches) when the sources are on a CUDA device and Triton is importable
(it ships with PyTorch's CUDA wheels). Everything else runs tensor by tensor with torch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

BLOCK = 4096  # elements per program; every tensor starts on a block boundary

PARAMS_PLAIN = {"normalize": False, "lambda": 1.0}  # shared task_arithmetic parameters the kernel computes


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernel can run for tensors on `device`: CUDA with Triton, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1 before triton is imported; the tests run it so)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _kernel():
    """The Triton kernel, defined on first use (triton is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def task_arithmetic_kernel(
        out_ptr, base_ptr, anchor_ptr, models_ptr, weights_ptr, seg_ptr, bad_ptr, model_stride,
        K: tl.constexpr, HAS_ANCHOR: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        seg = tl.load(seg_ptr + pid)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b = tl.load(base_ptr + offs).to(tl.float32)
        if HAS_ANCHOR:
            a = tl.load(anchor_ptr + offs).to(tl.float32)
        else:
            a = b
        if K == 1:
            w = tl.load(weights_ptr + seg)
            m = tl.load(models_ptr + offs).to(tl.float32)
            out = tl.where(w == 0.0, a, (m - b) * w + a)
        else:
            out = a
            for i in tl.static_range(K):
                w = tl.load(weights_ptr + seg * K + i)
                m = tl.load(models_ptr + i * model_stride + offs).to(tl.float32)
                out = tl.where(w == 0.0, out, tl.fma(m - b, w, out))
        bad = (out != out) | (tl.abs(out) == float("inf"))  # noqa: PLR0124 (NaN is the value unequal to itself)
        tl.store(bad_ptr + pid, tl.max(bad.to(tl.int8), axis=0))
        if ROUND == 1:
            # float32 -> bfloat16, round to nearest even (finite values; NaN/inf are flagged above)
            u = out.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            out = u.to(tl.float32, bitcast=True)  # exactly representable in bfloat16
        elif ROUND == 2:
            out = out.to(tl.float16).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty))

    return task_arithmetic_kernel


@dataclass
class Segment:
    """One merged tensor's place in the flat buffers."""

    key: str
    start: int  # element offset (a multiple of BLOCK)
    numel: int


def _layout(numels: Sequence[int]) -> tuple[list[int], int]:
    starts, pos = [], 0
    for n in numels:
        starts.append(pos)
        pos += -(-n // BLOCK) * BLOCK
    return starts, pos


class FusedTaskArithmetic:
    """The packed sources and output of a resident task-arithmetic merge, and its one-launch apply."""

    def __init__(
        self, segments: list[Segment], out: torch.Tensor, shapes: list[torch.Size], roles: tuple[str, list[str], str | None],
        dtypes: Mapping[str, torch.dtype], seg_of_block: torch.Tensor, rounding: int,
    ) -> None:  # fmt: skip
        self.segments, self.out, self._shapes = segments, out, shapes
        base_role, model_roles, anchor_role = roles
        self.k = len(model_roles)
        total, device = out.numel(), out.device
        self.models = torch.zeros((self.k, total), dtype=dtypes[model_roles[0]], device=device)
        self.base = torch.zeros(total, dtype=dtypes[base_role], device=device)
        self._buffers = {r: self.models[j] for j, r in enumerate(model_roles)} | {base_role: self.base}
        self.anchor: torch.Tensor | None = None  # None: the anchor is the base
        self._own_anchor = anchor_role is not None and anchor_role not in model_roles
        if self._own_anchor:
            self.anchor = self._buffers[anchor_role] = torch.zeros(total, dtype=dtypes[anchor_role], device=device)
        elif anchor_role is not None:
            self.anchor = self._buffers[anchor_role]  # an anchor that is also a model is read from its row
        self.seg_of_block = seg_of_block
        self.rounding = rounding  # 0: float32 (none), 1: bfloat16, 2: float16
        self.bad = torch.zeros(seg_of_block.numel(), dtype=torch.int8, device=out.device)
        self.weights = torch.zeros(len(segments) * self.k, dtype=torch.float32, device=out.device)
        self._fn = _kernel()

    @classmethod
    def allocate(
        cls, keys: Sequence[str], params: Sequence[torch.nn.Parameter], base_role: str, model_roles: Sequence[str],
        anchor_role: str | None, dtypes: Mapping[str, torch.dtype], round_to: torch.dtype,
    ) -> FusedTaskArithmetic | None:  # fmt: skip
        """The flat layout of `params` (one segment each, in order): the parameters become views of one
        flat output buffer at once (their old storage is released before any source buffer is taken);
        then the sources' flat buffers are taken (`dtypes`: role -> dtype, one for all models; `slot`).
        Results are rounded to `round_to` (the recipe's output dtype) and stored in the parameters' dtype.
        None (nothing changed) when they do not fit one layout: parameters of mixed devices or dtypes or
        shared between keys, models of mixed dtypes, or dtypes other than float32, float16, bfloat16."""
        floats = (torch.float32, torch.bfloat16, torch.float16)  # index = the kernel's ROUND
        if not keys or not model_roles or base_role in model_roles or round_to not in floats:
            return None
        device, out_dtype = params[0].device, params[0].dtype
        if out_dtype not in floats or len({id(p) for p in params}) != len(params):
            return None
        if any(p.device != device or p.dtype != out_dtype for p in params) or len({dtypes[r] for r in model_roles}) != 1:
            return None
        if any(d not in floats for d in dtypes.values()):
            return None
        numels = [p.numel() for p in params]
        starts, total = _layout(numels)
        out = torch.zeros(total, dtype=out_dtype, device=device)
        with torch.no_grad():
            for p, s, n in zip(params, starts, numels):
                view = out[s : s + n].view(p.shape)
                view.copy_(p.data)
                p.data = view
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the parameters' old storage
        seg_of_block = torch.empty(total // BLOCK, dtype=torch.int32)
        for i, (s, n) in enumerate(zip(starts, numels)):
            seg_of_block[s // BLOCK : (s + n + BLOCK - 1) // BLOCK] = i
        segments = [Segment(k, s, n) for k, s, n in zip(keys, starts, numels)]
        roles = (base_role, list(model_roles), anchor_role if anchor_role != base_role else None)
        return cls(segments, out, [p.shape for p in params], roles, dtypes, seg_of_block.to(device), floats.index(round_to))

    def slot(self, i: int, role: str) -> torch.Tensor:
        """Tensor `i`'s place in `role`'s flat buffer (shaped like its parameter), to fill and to read."""
        seg = self.segments[i]
        return self._buffers[role][seg.start : seg.start + seg.numel].view(self._shapes[i])

    @property
    def source_buffers(self) -> list[torch.Tensor]:
        """The flat source buffers, each once (an anchor that is a model lives in the models' buffer)."""
        return [self.base, self.models] + ([self.anchor] if self._own_anchor else [])

    @property
    def source_bytes(self) -> int:
        """Bytes of the packed sources (padding included): what one apply reads."""
        return sum(t.numel() * t.element_size() for t in self.source_buffers)

    def launch(self, weights: torch.Tensor) -> None:
        """Run the kernel with `weights` (float32, [segments, models], on the CPU); no synchronisation."""
        self.weights.copy_(weights.reshape(-1), non_blocking=False)
        grid = (self.seg_of_block.numel(),)
        self._fn[grid](
            self.out, self.base, self.anchor if self.anchor is not None else self.base, self.models, self.weights,
            self.seg_of_block, self.bad, self.models.stride(0),
            K=self.k, HAS_ANCHOR=self.anchor is not None, ROUND=self.rounding, BLOCK=BLOCK,
            num_warps=8, enable_fp_fusion=False,
        )  # fmt: skip

    def first_bad(self) -> str | None:
        """The key of the first tensor with a NaN/inf value in the last launch, or None (synchronises)."""
        if not bool(self.bad.any()):
            return None
        block = int(torch.nonzero(self.bad)[0])
        return self.segments[int(self.seg_of_block[block])].key
