"""Merge recipes: a YAML file naming the sources, the method and its parameters.

The format is mergekit 0.1.5's (`models:` or `slices:` / `base_model` / `merge_method` /
`parameters` / `dtype` / `out_dtype` / `tokenizer_source` or `tokenizer:` / `chat_template`) plus keys of
ours (`vlm`, `target`, `text_config_from`, `seed`); `format` holds its pydantic models, `load` reads and
checks a file (each problem one line naming the file, field path, value and what to do), `resolve` gives
a setting's value for one tensor, `slices` holds layer-stacking recipes (`SlicesRecipe`: mergekit's
`slices:` with several slices, cut or repeated layers, passthrough; one slice over every layer is the
`models:` form):

```yaml
merge_method: ties
vlm: ./llava-1.5-7b-hf          # optional: the output is this VLM with a merged language model;
                                # vision tower and projector are copied from it. "vlm" names its LM.
base_model: ./Llama-2-7b-hf     # task vectors are taken against this model
target: ./ELYZA-japanese-Llama-2-7b   # optional: the output starts from here instead of base_model
models:                         # (anchored task arithmetic: target + sum w_i (m_i - base))
  - model: vlm
    parameters: {weight: 1.0, density: 0.5}
  - model: ./ELYZA-japanese-Llama-2-7b
    parameters: {weight: [1.0, 0.5], density: 0.7}
parameters: {normalize: true}
tokenizer_source: target        # whose vocabulary the output uses (default: target, else base_model);
                                # "base", a model, or "union" (the base's plus the other models' tokens)
text_config_from: vlm           # whose RoPE / sliding window / norm eps / context length the output has:
                                # vlm (default with a vlm) or target
dtype: bfloat16                 # the dtype merged tensors are written in (out_dtype wins when given)
chat_template: chatml           # optional: the output's chat template (a Jinja template, or a name mergekit knows)
seed: 0                         # random methods (DARE, DELLA) derive a seed per tensor from this
```

Parameter values, as in mergekit: a number or boolean; a list of numbers, interpolated across the
decoder layers (layer i of N takes position i/(N-1) along a list of any length; embeddings, final norm and
lm_head take position 0; a list of exactly N values gives layer i its i-th value); or a list of
`{filter: …, value: …}` conditions, the first that matches the tensor wins. `filter` is a
**substring** of the canonical tensor name (`model.layers.3.mlp.down_proj.weight`, `lm_head.weight`),
as in mergekit; `filter_regex` (ours) is a **regular expression** searched in it; an entry with
neither (or `filter: "*"`) always matches.
"""

from vlm_merge.recipe.format import (
    TEXT_CONFIG_SOURCES,
    VLM_REF,
    Condition,
    ModelEntry,
    Recipe,
    Setting,
    Slice,
    SliceSource,
    TokenizerSpec,
    TokenSpec,
)
from vlm_merge.recipe.load import (
    RESOLVED_RECIPE,
    load_recipe,
    read_yaml,
    rebase_paths,
    recipe_from_dict,
    resolved_recipe_files,
)
from vlm_merge.recipe.resolve import interpolate, layer_position, resolve_setting
from vlm_merge.recipe.slices import PASSTHROUGH, SlicesRecipe

__all__ = [
    "PASSTHROUGH", "RESOLVED_RECIPE", "TEXT_CONFIG_SOURCES", "VLM_REF", "Condition", "ModelEntry", "Recipe", "Setting", "Slice", "SliceSource", "SlicesRecipe",
    "TokenizerSpec", "TokenSpec", "interpolate", "layer_position", "load_recipe", "read_yaml", "rebase_paths",
    "recipe_from_dict", "resolve_setting", "resolved_recipe_files",
]  # fmt: skip
