"""Chat Vector for vision-language models: `ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)`."""

from chat_vector.api import (
    ChatVectorDelta,
    apply_delta,
    chat_vector,
    chat_vector_recipe,
    extract_delta,
    load_delta,
    make_scales,
)
from chat_vector.rules import DEFAULT_SKIP, MODULES, SKIP_PRESETS, Scales

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
