"""Which language-model tensors a Chat Vector touches, and with what scale: the core's recipe preset
(`vlm_merge.recipe.presets`: skip presets, module groups, `Scales`), re-exported under its old name."""

from vlm_merge.recipe.presets import DEFAULT_SKIP, FINAL_NORM, MODULES, SKIP_PRESETS, Scales, resolve_skip

__all__ = ["DEFAULT_SKIP", "FINAL_NORM", "MODULES", "SKIP_PRESETS", "Scales", "resolve_skip"]
