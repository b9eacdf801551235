"""Chat Vector for vision-language models: `ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`.

The recipe preset (`chat_vector_recipe`, `Scales`, `make_scales`, the skip presets) is the core's
(`vlm_merge.recipe.presets`), re-exported here; merging runs on `vlm_merge.engine`'s public API.
"""

from chat_vector.api import ChatVectorDelta, apply_delta, chat_vector, extract_delta, load_delta
from vlm_merge.recipe.presets import DEFAULT_SKIP, MODULES, SKIP_PRESETS, Scales, chat_vector_recipe, make_scales

__all__ = [
    "DEFAULT_SKIP",
    "MODULES",
    "SKIP_PRESETS",
    "ChatVectorDelta",
    "Scales",
    "apply_delta",
    "chat_vector",
    "chat_vector_recipe",
    "extract_delta",
    "load_delta",
    "make_scales",
]
