"""Merge math: one pure function per method, tensors in, float32 tensor out.

Inputs may be any floating dtype; arithmetic is float32, and the caller rounds once to the output
dtype. Functions never modify their inputs. Random methods take a `torch.Generator` or an integer
seed and draw from nothing else; `tensor_seed` derives a stable per-tensor seed from a tensor name.

The methods and their parameter names are mergekit 0.1.5's: every method of its registry but
`passthrough` (`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`,
`breadcrumbs_ties`, `della`, `della_linear`, `linear`, `slerp`, `nuslerp`, `multislerp`, `karcher`,
`model_stock`, `sce`, `arcee_fusion`, `nearswap`, `ram`, `ramplus_tl`), so a mergekit YAML maps 1:1
onto `METHODS`. Our extension: `anchor`, for the task-vector methods, starts the output from another
tensor than the base (`out = anchor + merged task vectors`, the Chat Vector form). Deliberate
differences from mergekit are listed in the docstrings (search "mergekit:").

Modules, one per family (as mergekit's merge_methods/): `arithmetic` (task arithmetic, linear),
`gta` (generalized task arithmetic: ties, dare_*, breadcrumbs*, della*, as registry rows over one
function), `sparsification` (the task-vector sparsifiers), `spherical` (slerp, nuslerp,
multislerp, karcher), `selective` (sce, ram, ramplus_tl, nearswap, arcee_fusion), `stock`
(model_stock), `seeds` (per-tensor seeds), `base` (`Param`, `Method`) and `registry` (`METHODS`).
This package re-exports their public names.
"""

from vlm_merge.methods.arithmetic import add_task_vectors, difference, linear, task_arithmetic, weight_sum
from vlm_merge.methods.base import REQUIRED, Method, ModelCheck, Param
from vlm_merge.methods.gta import COMBINE_CHUNK, generalized_task_arithmetic
from vlm_merge.methods.registry import METHODS, validate_params
from vlm_merge.methods.seeds import make_generator, tensor_seed
from vlm_merge.methods.sparsification import (
    CHUNK,
    RANDOM_SPARSIFICATIONS,
    Rescale,
    Sparsification,
    bernoulli_mask,
    della_keep_probs,
    sparsify,
)
from vlm_merge.methods.selective import arcee_fusion, nearswap, ram, ramplus_tl, sce
from vlm_merge.methods.spherical import SLERP_DOT_THRESHOLD, SLERP_EPS, karcher, multislerp, nuslerp, slerp
from vlm_merge.methods.stock import model_stock

__all__ = [
    "CHUNK",
    "COMBINE_CHUNK",
    "METHODS",
    "RANDOM_SPARSIFICATIONS",
    "REQUIRED",
    "SLERP_DOT_THRESHOLD",
    "SLERP_EPS",
    "Method",
    "ModelCheck",
    "Param",
    "Rescale",
    "Sparsification",
    "add_task_vectors",
    "arcee_fusion",
    "bernoulli_mask",
    "della_keep_probs",
    "difference",
    "generalized_task_arithmetic",
    "karcher",
    "linear",
    "make_generator",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "sparsify",
    "task_arithmetic",
    "tensor_seed",
    "validate_params",
    "weight_sum",
]
