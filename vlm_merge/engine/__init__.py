"""The merge engine's public API: running a recipe, merging a VLM's language backbone, saved task vectors,
resident (in-memory) merging for search, and torch's thread count.

Applications (`chat_vector`, `vlm_merge.evolve`, `vlm_merge.world`, `vlm_merge.cli`) use these names, not the
submodules (`tests/test_architecture.py` holds `chat_vector` to that):

- running a recipe (`merge`): `merge`, `validate`, `plan_recipe` (`RecipePlan`), `model_entries`, `RESOLVED_RECIPE`;
- the backbone (`backbone`): `open_sources` (`Sources`, `Source`, roles `VLM` / `TARGET`), `plan_backbone`
  (`BackbonePlan`), `write_backbone`, and what `inspect` reports: `describe_parts`, `config_conflicts`,
  `vision_tower_status`, `vlm_text_config`;
- saved task vectors (`vectors`): `extract_task_vector` (`TaskVectorInfo`), `apply_task_vector`;
- resident merging (`resident`): `ResidentMerger`, `CandidateError`, `write_scaffold`;
- layer stacking (`stacking`; `merge` and `validate` hand a `slices:` recipe to it): `merge_slices`,
  `StackValidation`, and data-flow-space routes (arXiv 2403.13187): `DfsRoute`, `pool_layers`,
  `route_from_indicator`, `dfs_slices_recipe` (a route folded into a replayable `slices:` recipe);
- `torch_threads` (`threads`).

The streaming engine itself (`streaming`: `MergePlan` of `Copy` / `Merge` tensors, `execute`) and the GPU path
(`fused`) are internal: the functions above build and run their plans.
"""

from vlm_merge.engine.backbone import TARGET, VLM, BackbonePlan, Source, Sources, describe_parts, open_sources, plan_backbone, vision_tower_status, write_backbone
from vlm_merge.engine.model_files import config_conflicts, vlm_text_config
from vlm_merge.engine.merge import RESOLVED_RECIPE, RecipePlan, merge, model_entries, plan_recipe, validate
from vlm_merge.engine.resident import CandidateError, ResidentMerger, write_scaffold
from vlm_merge.engine.stacking import (
    DfsRoute,
    StackValidation,
    dfs_slices_recipe,
    merge_slices,
    pool_layers,
    route_from_indicator,
)
from vlm_merge.engine.threads import torch_threads
from vlm_merge.engine.vectors import TaskVectorInfo, apply_task_vector, extract_task_vector

__all__ = [
    "RESOLVED_RECIPE",
    "TARGET",
    "VLM",
    "BackbonePlan",
    "CandidateError",
    "DfsRoute",
    "RecipePlan",
    "ResidentMerger",
    "Source",
    "Sources",
    "StackValidation",
    "TaskVectorInfo",
    "apply_task_vector",
    "config_conflicts",
    "describe_parts",
    "dfs_slices_recipe",
    "extract_task_vector",
    "merge",
    "merge_slices",
    "model_entries",
    "open_sources",
    "plan_backbone",
    "plan_recipe",
    "pool_layers",
    "route_from_indicator",
    "torch_threads",
    "validate",
    "vision_tower_status",
    "vlm_text_config",
    "write_backbone",
    "write_scaffold",
]
