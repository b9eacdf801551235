"""Data-flow-space routes (arXiv 2403.13187, sec. 3.2) exported as plain checkpoints by folding the scales.

The fold test: a route through two models' layers (one source layer at two positions) with a scale on the
hidden state entering every position, run two ways: a reference forward that multiplies the hidden
state explicitly (the source layer modules themselves, shared between positions), and the folded
checkpoint written by `vlm-merge merge`, loaded with transformers' LlamaForCausalLM. With RMSNorm's eps
set to 1e-12 the fold is exact up to float32 round-off, so the logits agree to 1e-5 relative to their
largest magnitude (measured: 7.4e-7). With the fixtures' eps = 1e-5, which is not small against the
tiny models' hidden-state mean square (~4e-4 at the embeddings), the fold is only approximate, as the
module docstring of vlm_merge.engine.stacking says (measured: 1.2e-2 relative; 1.4e-3 with eps = 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm_merge.engine.merge import merge
from vlm_merge.engine.stacking import DfsRoute, dfs_slices_recipe, pool_layers, route_from_indicator
from vlm_merge.errors import VlmMergeError
from vlm_merge.testing import TEXT_CLASSES, model_shapes, random_state_dict, text_config, tune_state_dict, vocab_sizes, write_llm

IDS = torch.tensor([[1, 7, 30, 4, 99, 12, 5, 250]])


def _pair(root: Path, eps: float) -> tuple[Path, Path]:
    shapes = model_shapes(TEXT_CLASSES["llama"][1], text_config("llama", vocab_sizes()["en"]))
    a = random_state_dict(shapes, 0, "a")
    b = tune_state_dict(a, 1, "b")
    b = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in b.items()}  # a distinct pool
    for name, state in (("a", a), ("b", b)):
        write_llm(root / name, "llama", state, "en")
        cfg = json.loads((root / name / "config.json").read_text())
        cfg["rms_norm_eps"] = eps
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root / "a", root / "b"


class _Scaled(torch.nn.Module):
    """A decoder layer whose input hidden state is multiplied by `w` first (the paper's W)."""

    def __init__(self, layer: torch.nn.Module, w: float) -> None:
        super().__init__()
        self.layer, self.w = layer, w

    def forward(self, hidden_states, *args, **kwargs):
        return self.layer(hidden_states * self.w, *args, **kwargs)


def _reference_logits(route: DfsRoute, models: dict[str, Path], edges: str) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    loaded = {role: LlamaForCausalLM.from_pretrained(path).eval() for role, path in models.items()}
    ref = loaded[edges]
    layers = [_Scaled(loaded[role].model.layers[i], w) for (role, i), w in zip(route.positions, route.scales)]
    ref.model.layers = torch.nn.ModuleList(layers)
    ref.config.num_hidden_layers = len(layers)
    with torch.no_grad():
        return ref(IDS, use_cache=False).logits


def _folded_logits(route: DfsRoute, edges: str, out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    recipe = dfs_slices_recipe(route, edges_from=edges)
    (out.parent / "dfs.yml").write_text(recipe.to_yaml())
    merge(out.parent / "dfs.yml", out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == len(route.positions)
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _route(a: Path, b: Path) -> DfsRoute:
    # pool a0 a1 b0 b1, r = 2: slots a0 a1 b0 b1 | a0 a1 b0 b1; a0 is used twice
    pool = [(str(a), 2), (str(b), 2)]
    indicator = [1, 0, 0, 1, 1, 1, 1, 0]
    w = [[1.0 + 0.1 * i - 0.15 * j for j in range(4)] for i in range(4)]
    route = route_from_indicator(pool, 2, [bool(x) for x in indicator], w)
    assert route.positions == ((str(a), 0), (str(b), 1), (str(a), 0), (str(a), 1), (str(b), 0))
    assert route.scales == (1.0, w[0][3], w[3][0], w[0][1], w[1][2])  # per transition i -> j
    return DfsRoute(route.positions, (1.3, *route.scales[1:]))  # a scale before the first layer too


def test_folded_dfs_equals_explicit_scaling(tmp_path):
    a, b = _pair(tmp_path, eps=1e-12)
    route = _route(a, b)
    ref = _reference_logits(route, {str(a): a, str(b): b}, str(a))
    got = _folded_logits(route, str(a), tmp_path / "out")
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 1e-5, err
    # without the scales the model differs: the test can fail
    plain = _reference_logits(DfsRoute(route.positions, (1.0,) * len(route.positions)), {str(a): a, str(b): b}, str(a))
    assert (plain - ref).abs().max().item() / ref.abs().max().item() > 1e-2


def test_fold_with_fixture_eps_is_approximate_and_bounded(tmp_path):
    a, b = _pair(tmp_path, eps=1e-5)
    route = _route(a, b)
    ref = _reference_logits(route, {str(a): a, str(b): b}, str(a))
    got = _folded_logits(route, str(a), tmp_path / "out")
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert 1e-6 < err < 5e-2, err  # eps / c^2 vs eps on a hidden state of mean square ~4e-4


def test_dfs_over_a_vlm_pool_loads_and_generates(zoo, tmp_path):
    vlm, ja = zoo.vlms["llava-v5-llama"], str(zoo.llms["ja-llama"])
    route = route_from_indicator([(ja, 2), ("vlm", 2)], 2, [True, True, False, True, True, False, True, False],
                                 [[0.9] * 4 for _ in range(4)])  # fmt: skip
    recipe = dfs_slices_recipe(route, edges_from=ja, vlm=str(vlm))
    (tmp_path / "dfs.yml").write_text(recipe.to_yaml())
    out = merge(tmp_path / "dfs.yml", tmp_path / "out", progress=False)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 5
    assert model.generate(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_bad_routes_are_one_line():
    with pytest.raises(VlmMergeError, match="no layer is used"):
        route_from_indicator([("a", 2)], 2, [False] * 4)
    with pytest.raises(VlmMergeError, match="expected M \\* r = 2 \\* 2 = 4"):
        route_from_indicator([("a", 2)], 2, [True] * 3)
    with pytest.raises(VlmMergeError, match="not a positive finite"):
        DfsRoute((("a", 0),), (0.0,))
    assert pool_layers([("a", 2), ("b", 1)]) == [("a", 0), ("a", 1), ("b", 0)]
