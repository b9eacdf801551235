"""Resident merging: load the sources of a recipe once, then write each candidate's merged language
model into one live model in place (no disk, no reload).

`ResidentMerger.open(recipe, model, device=...)` plans the recipe with `merge.plan_recipe` (the same
source opening, key alignment and vocabulary row alignment as `vlm-merge merge`), reads every source
tensor the language model's merge needs onto `device` once (embedding / lm_head rows already aligned
to the output's vocabulary, exactly as the engine aligns them), and binds every output tensor to the
live model's parameter by its canonical key (`model.X` -> the decoder's `X`, `lm_head.weight` -> the
output embeddings). `apply(recipe)` then resolves the candidate's per-tensor parameters and, tensor by
tensor, runs the method and copies the result into the parameter: the same function, the same
float32 arithmetic (chunked like the engine for elementwise methods on the CPU), rounded once to the
output dtype. The live model then holds the weights `vlm-merge merge` would write for that recipe
(bit for bit, when the model is loaded in the output dtype). The vision tower and projector are never
touched, so image features computed once stay valid for every candidate.

On a CUDA device, `task_arithmetic` candidates (the Chat Vector form and per-layer weights) run as one
fused kernel over all tensors (`vlm_merge.engine.fused`): the live parameters become views of one flat output
buffer, then the sources are read straight into one flat buffer per role (so the sources take their own
bytes on the device and nothing more). Other methods, and recipes whose sources do not fit that layout
(a role stored in mixed dtypes), run tensor by tensor with torch on the device.

A candidate recipe must have the structure of the opening recipe (method, sources, vocabulary
source, dtype); only parameter values may differ.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from vlm_merge.engine.streaming import Copy, Merge, chunked, gather_vocab
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.fused import PARAMS_PLAIN, FusedTaskArithmetic, triton_available
from vlm_merge.engine.merge import (
    RecipePlan,
    TensorParams,
    as_recipe,
    check_layer_range,
    model_entries,
    plan_recipe,
    resolve_tensor_params,
    tensor_fn,
)
from vlm_merge.recipe import Recipe, SlicesRecipe
from vlm_merge.engine.stacking import merge_slices


class CandidateError(VlmMergeError):
    """A candidate that cannot be merged (invalid parameter combination, NaN/inf weights)."""


@dataclass
class _Bound:
    key: str  # output key (the layout `vlm-merge merge` writes)
    canonical: str
    param: torch.nn.Parameter  # the live model's parameter
    dtype: torch.dtype  # output dtype: every result is rounded to it once
    inputs: dict[str, torch.Tensor]  # role -> source tensor on the device (vocab rows aligned, float32)
    elementwise: bool


@dataclass(frozen=True)
class ApplyStats:
    seconds: float
    tensors: int
    bytes_written: int


def _structure(r: Recipe) -> tuple:
    return (r.merge_method, r.vlm, r.base_model, r.target, tuple(m.model for m in r.models), r.tokenizer_source, r.dtype)


def live_parameter(model, canonical: str) -> torch.nn.Parameter:
    """The live model's parameter for a canonical language-model key (`model.layers.0.mlp.up_proj.weight`)."""
    try:
        if canonical.startswith("model."):
            return model.get_decoder().get_parameter(canonical.removeprefix("model."))
        if canonical.startswith("lm_head."):
            head = model.get_output_embeddings()
            return head.get_parameter(canonical.removeprefix("lm_head."))
    except (AttributeError, NotImplementedError):
        pass
    raise VlmMergeError(f"{canonical}: the live model ({type(model).__name__}) has no such language-model parameter")


def _needs_gather(op: Merge, plan, rows: Mapping[str, int]) -> bool:
    """Whether a tensor's vocabulary rows must be aligned to the output's (`rows`: role -> row count)."""
    vocab = plan.vocab
    return bool(op.vocab and vocab is not None and (not vocab.is_identity or any(n != vocab.out_rows for n in rows.values())))


def _allocate_direct(rp: RecipePlan, merges: list[tuple]) -> FusedTaskArithmetic | None:
    """The fused kernel's flat buffers, for sources read straight into them (one stored dtype per role,
    every output of one dtype), from the checkpoints' metadata alone; the live parameters become views of
    the flat output at once, so their old storage is released before the sources' buffers are taken.
    None: load and merge tensor by tensor."""
    plan = rp.backbone.plan
    dtypes: dict[str, torch.dtype] = {}
    for t, _, op in merges:
        infos = {role: plan.sources[role].info(key) for role, key in op.inputs.items()}
        gathered = _needs_gather(op, plan, {r: i.shape[0] if i.shape else 0 for r, i in infos.items()})
        for role, info in infos.items():
            if dtypes.setdefault(role, info.dtype) != info.dtype or (not gathered and tuple(info.shape) != tuple(t.shape)):
                return None
    if len({t.dtype for t, _, _ in merges}) != 1:
        return None
    return FusedTaskArithmetic.allocate(
        [t.key for t, _, _ in merges], [p for _, p, _ in merges], rp.base_role, rp.model_roles, rp.anchor_role,
        dtypes, merges[0][0].dtype,
    )  # fmt: skip


def _load_sources(plan, merges: list[tuple], dev: torch.device, packed: FusedTaskArithmetic | None) -> tuple[list[_Bound], bool]:
    """Every merged tensor's inputs on `dev`, vocabulary rows aligned as the engine aligns them, each read once:
    into `packed`'s flat buffers when given, else one device tensor each. A gathered tensor whose values its flat
    buffer's dtype cannot hold gets its own device tensors instead; the second value is then False (the fused kernel
    cannot run; the others stay in the buffers and are merged tensor by tensor like it)."""
    bound: list[_Bound] = []
    fits = True
    for i, (t, param, op) in enumerate(merges):
        tensors = {role: plan.sources[role].get(key) for role, key in op.inputs.items()}
        if _needs_gather(op, plan, {r: x.shape[0] for r, x in tensors.items()}):
            tensors = gather_vocab(op, tensors, plan.vocab, plan.sources)
        slots = {role: packed.slot(i, role) for role in tensors} if packed is not None else {}
        if slots and any(x.dtype != slots[r].dtype and not torch.equal(x.to(slots[r].dtype).to(x.dtype), x) for r, x in tensors.items()):
            fits, slots = False, {}
        inputs = {r: slots[r].copy_(x.view(slots[r].shape)) if slots else x.to(dev).contiguous() for r, x in tensors.items()}
        bound.append(_Bound(t.key, t.canonical, param, t.dtype, inputs, op.elementwise))
    return bound, fits


class ResidentMerger:
    """Sources of one recipe held on a device, writing merged language models into `model` in place."""

    def __init__(
        self, rp: RecipePlan, original: Recipe, model, device: torch.device, bound: list[_Bound], num_layers: int,
        fused: FusedTaskArithmetic | None = None,
    ) -> None:  # fmt: skip
        self._rp = rp
        self.fused = fused
        self.model = model
        self.device = device
        self.tensors = bound
        self.num_layers = num_layers
        self._structure = _structure(original)
        self._entries = model_entries(original, rp.method)
        self._scratch: dict[tuple, torch.Tensor] = {}

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, recipe: Recipe | dict | str, model, *, device: str | torch.device | None = None,
        vision_tower: str | None = None, cache_dir: str | None = None, fused: bool | None = None,
    ) -> ResidentMerger:
        """Plan `recipe` and load its language-model sources onto `device` (default: the model's).

        `fused`: run task arithmetic as one kernel (`vlm_merge.engine.fused`); None = on CUDA where it can,
        False = never (tensor by tensor), True = required (VlmMergeError where it cannot; on the CPU only
        under Triton's interpreter, for tests)."""
        recipe = as_recipe(recipe)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        rp = plan_recipe(recipe, vision_tower=vision_tower, cache_dir=cache_dir)
        wanted = (fused if fused is not None else dev.type == "cuda") and rp.method.name == "task_arithmetic"
        packed = None
        try:
            plan = rp.backbone.plan
            merges: list[tuple] = []
            for t in plan.tensors:
                if t.canonical is None:
                    continue  # vision tower, projector, image_newline: never merged
                param = live_parameter(model, t.canonical)
                if tuple(param.shape) != tuple(t.shape):
                    raise VlmMergeError(
                        f"{t.key}: the live model's parameter has shape {list(param.shape)}, the recipe's output "
                        f"{list(t.shape)}; load the model that `vlm-merge merge` writes for this recipe"
                    )
                op = t.op
                if isinstance(op, Copy):  # kept byte for byte: written once
                    with torch.no_grad():
                        param.copy_(plan.sources[op.role].get(op.key).to(t.dtype))
                    continue
                assert isinstance(op, Merge)
                merges.append((t, param, op))
            if wanted and triton_available(dev):
                packed = _allocate_direct(rp, merges)
            bound, fits = _load_sources(plan, merges, dev, packed)
            if not fits:  # a gathered vocabulary tensor the flat buffers' dtype cannot hold: tensor by tensor
                packed = None
            num_layers = rp.sources.reference.anatomy.num_layers
        finally:
            rp.sources.close()
        if fused and packed is None:
            raise VlmMergeError(
                f"resident merge on {dev}: the fused kernel needs task_arithmetic on a CUDA device with Triton (or "
                "Triton's interpreter, TRITON_INTERPRET=1) and sources of one dtype per model; pass fused=None to fall "
                "back to tensor-by-tensor merging"
            )
        return cls(rp, recipe, model, dev, bound, num_layers, packed)

    @property
    def recipe(self) -> Recipe:
        """The resolved opening recipe (absolute sources)."""
        return self._rp.recipe

    def inert(self) -> frozenset[str]:
        """Canonical keys of the merged tensors no parameter value can change: for a `delta_only` method, those
        where every model's tensor equals the base's (e.g. layers a fine-tune froze). Empty for other methods."""
        rp = self._rp
        if not rp.method.delta_only or rp.base_role is None:
            return frozenset()
        return frozenset(b.canonical for b in self.tensors
                         if rp.base_role in b.inputs and all(m in b.inputs and torch.equal(b.inputs[m], b.inputs[rp.base_role])
                                                             for m in rp.model_roles))

    @property
    def source_bytes(self) -> int:
        """Bytes of the resident source tensors (what one merge must read at least once)."""
        return sum(x.numel() * x.element_size() for b in self.tensors for x in b.inputs.values())

    # -- one candidate -------------------------------------------------------------------------
    def resolve(self, recipe: Recipe | dict) -> dict[str, TensorParams]:
        """Every tensor's parameters for `recipe`; CandidateError for out-of-range or invalid values."""
        recipe = as_recipe(recipe)
        if _structure(recipe) != self._structure:
            raise VlmMergeError(
                "resident merge: the recipe differs from the opened one in method, sources, tokenizer_source or dtype; "
                "only parameter values may change between candidates"
            )
        try:
            check_layer_range(recipe, self.num_layers)
            memo: dict = {}
            return {
                b.canonical: resolve_tensor_params(recipe, self._rp.method, self._entries, b.canonical, self.num_layers, memo)
                for b in self.tensors
            }
        except VlmMergeError as e:
            raise CandidateError(str(e)) from None

    @torch.inference_mode()
    def apply(self, recipe: Recipe | dict) -> ApplyStats:
        """Write `recipe`'s merged language model into the live model. CandidateError on NaN/inf results
        (the model's language model is then partly written; the next `apply` overwrites all of it)."""
        started = time.perf_counter()
        recipe = as_recipe(recipe)
        params = self.resolve(recipe)
        if self.fused is not None:
            weights = self.fused_weights(params)
            if weights is not None:
                self.fused.launch(weights)
                bad = self.fused.first_bad()  # synchronises
                if bad is not None:
                    raise CandidateError(f"{bad}: merge produced NaN/inf values")
                written = sum(b.param.numel() * b.param.element_size() for b in self.tensors)
                return ApplyStats(time.perf_counter() - started, len(self.tensors), written)
        rp = replace(self._rp, params=params)
        written = 0
        for b in self.tensors:
            fn = tensor_fn(rp, b.canonical, recipe.seed)
            try:
                if self.device.type == "cpu" and b.elementwise:
                    out = self._buffer(b)
                    finite = chunked(fn, b.inputs, out)  # the engine's own evaluation, slice by slice
                else:
                    r = fn(b.inputs)
                    finite = bool(torch.isfinite(r.sum())) or bool(torch.isfinite(r).all())
                    out = r.to(b.dtype)
            except ValueError as e:
                raise CandidateError(f"{b.canonical}: {e}") from None
            if not finite:
                raise CandidateError(f"{b.key}: merge produced NaN/inf values")
            b.param.copy_(out)
            written += b.param.numel() * b.param.element_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return ApplyStats(time.perf_counter() - started, len(self.tensors), written)

    def fused_weights(self, params: dict[str, TensorParams]) -> torch.Tensor | None:
        """[tensors, models] weights for the fused kernel, or None if some tensor is not plain task
        arithmetic (`normalize` or `lambda` set): the candidate then runs tensor by tensor."""
        rows = []
        for b in self.tensors:
            p = params[b.canonical]  # validated, defaults filled
            if any(p.shared.get(k, v) != v for k, v in PARAMS_PLAIN.items()):
                return None
            rows.append([float(pm["weight"]) for pm in p.per_model])
        return torch.tensor(rows, dtype=torch.float32)

    def reference(self, recipe: Recipe | dict, canonical: str) -> torch.Tensor:
        """One tensor of `recipe` merged on the CPU by the engine's function from the resident sources
        (float32 arithmetic, rounded to the output dtype): what `apply` must have written (for checks)."""
        recipe = as_recipe(recipe)
        b = next(x for x in self.tensors if x.canonical == canonical)
        rp = replace(self._rp, params=self.resolve(recipe))
        return tensor_fn(rp, canonical, recipe.seed)({r: t.cpu() for r, t in b.inputs.items()}).to(b.dtype)

    def _buffer(self, b: _Bound) -> torch.Tensor:
        key = (tuple(b.param.shape), b.dtype)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(b.param.shape, dtype=b.dtype, device=self.device)
        return buf

    def state(self) -> Mapping[str, torch.Tensor]:
        """Canonical key -> the live parameter (for checks)."""
        return {b.canonical: b.param for b in self.tensors}



def write_scaffold(recipe: Recipe | SlicesRecipe | dict | str, out, *, vision_tower: str | None = None, cache_dir: str | None = None):
    """Write the model a resident search starts from: the recipe's output layout, config, tokenizer and
    processor, its vision side copied, its language model the target's (aligned) tensors. Independent
    of parameter values, so it is written whatever the first candidate is (every candidate overwrites
    the language model). A layer route (`SlicesRecipe`, a DFS search) writes the stacked model itself."""
    from vlm_merge.engine.backbone import write_backbone

    if isinstance(recipe, SlicesRecipe):
        return merge_slices(recipe, out, force=True, progress=False, cache_dir=cache_dir, vision_tower=vision_tower)
    rp = plan_recipe(as_recipe(recipe), vision_tower=vision_tower, cache_dir=cache_dir)
    try:
        bp = rp.backbone
        target = bp.sources.target_role

        def keep(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return t[target]

        bp.plan.tensors = [
            replace(t, op=replace(t.op, fn=keep, elementwise=True)) if isinstance(t.op, Merge) else t for t in bp.plan.tensors
        ]
        return write_backbone(bp, out, force=True, progress=False)
    finally:
        rp.sources.close()
