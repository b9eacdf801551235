"""vlm-merge: build Japanese vision-language models by merging checkpoints."""

from vlm_merge.errors import VlmMergeError

__all__ = ["VlmMergeError"]
__version__ = "0.1.0"
