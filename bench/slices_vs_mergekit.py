"""`slices:` layer-stacking recipes: vlm-merge against mergekit 0.1.5's `mergekit-yaml`, tensor for tensor.

    .venv/bin/python -m bench.slices_vs_mergekit [--mergekit-bin bench/.venv-mergekit/bin/mergekit-yaml]

Builds tiny plain LLMs with `vlm_merge.testing` (per family: `a` = a random model, `b` = `a` + noise,
same vocabulary), writes each recipe below once, merges it with `vlm-merge merge` (the Python API) and
with `mergekit-yaml` in its own venv, and compares every tensor: the same names, shapes, dtypes, and
max |ours - mergekit| (0 for byte copies; float32 round-off for merged slices). Prints one row per
recipe and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vlm_merge.engine.merge import merge
from vlm_merge.engine.stacking import dfs_slices_recipe, route_from_indicator
from vlm_merge.tables import format_table
from vlm_merge.testing import TEXT_CLASSES, model_shapes, random_state_dict, text_config, tune_state_dict, vocab_sizes, write_llm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MERGEKIT = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"
REL_TOL = 2e-6


def recipes(a: str, b: str) -> dict[str, dict]:
    """The recipes compared, by name (model paths `a`, `b`; both models have 2 decoder layers)."""
    return {
        "passthrough stack with a repeated layer": {
            "merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                       {"sources": [{"model": b, "layer_range": [1, 2]}]},
                       {"sources": [{"model": a, "layer_range": [1, 2]}]}],
        },
        "passthrough with scale (gradient + filter)": {
            "merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": b, "layer_range": [0, 2],
                                     "parameters": {"scale": [{"filter": "o_proj", "value": [0.5, 1.0]}, {"value": 1.0}]}}]},
                       {"sources": [{"model": a, "layer_range": [0, 1]}], "parameters": {"scale": 0.25}}],
        },
        "linear slices (weight gradient)": {
            "merge_method": "linear", "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.2]}},
                                    {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
                       {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                                    {"model": b, "layer_range": [0, 1], "parameters": {"weight": 3.0}}]}],
        },
        "slerp slices with base_model": {
            "merge_method": "slerp", "base_model": a, "dtype": "float32", "parameters": {"t": [0.1, 0.9]},
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
                       {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [1, 2]}],
                        "parameters": {"t": 0.3}}],
        },
        "task_arithmetic slices": {
            "merge_method": "task_arithmetic", "base_model": a, "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.7}}]},
                       {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2], "parameters": {"weight": [2.0, -1.0]}}]}],
        },
        "DFS route, scales folded (dfs_slices_recipe)": _dfs(a, b),
    }  # fmt: skip


def _dfs(a: str, b: str) -> dict:
    """A folded DFS route (a0 b1 a0 a1 b0, per-transition scales) as the slices recipe vlm-merge writes."""
    w = [[1.0 + 0.1 * i - 0.15 * j for j in range(4)] for i in range(4)]
    route = route_from_indicator([(a, 2), (b, 2)], 2, [bool(x) for x in (1, 0, 0, 1, 1, 1, 1, 0)], w)
    recipe = dfs_slices_recipe(route, dtype="float32").to_dict()
    recipe.pop("seed")
    return recipe


def build_models(root: Path, family: str) -> tuple[Path, Path]:
    """Two same-vocabulary 2-layer LLMs of `family`: a random one and a tuned copy."""
    shapes = model_shapes(TEXT_CLASSES[family][1], text_config(family, vocab_sizes()["en"]))
    a = random_state_dict(shapes, 0, f"a-{family}")
    b = tune_state_dict(a, 1, f"b-{family}")
    pa, pb = root / f"a-{family}", root / f"b-{family}"
    write_llm(pa, family, a, "en")
    write_llm(pb, family, b, "en")
    return pa, pb


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[bool, float, str]:
    if set(ours) != set(theirs):
        return False, float("nan"), f"names differ: ours only {sorted(set(ours) - set(theirs))[:3]}, mergekit only {sorted(set(theirs) - set(ours))[:3]}"
    worst, ok = 0.0, True
    for k, t in theirs.items():
        o = ours[k]
        if o.shape != t.shape or o.dtype != t.dtype:
            return False, float("nan"), f"{k}: ours {tuple(o.shape)} {o.dtype}, mergekit {tuple(t.shape)} {t.dtype}"
        d = (o.float() - t.float()).abs().max().item() if o.numel() else 0.0
        worst = max(worst, d)
        ok &= d <= REL_TOL * max(1.0, t.float().abs().max().item())
    return ok, worst, f"{len(theirs)} tensors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-bin", type=Path, default=DEFAULT_MERGEKIT)
    args = ap.parse_args()
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in ("llama", "mistral"):
            a, b = build_models(root, family)
            for i, (name, recipe) in enumerate(recipes(str(a), str(b)).items()):
                cfg = root / f"{family}-{i}.yml"
                cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
                mk_out, our_out = root / f"mk-{family}-{i}", root / f"ours-{family}-{i}"
                run = subprocess.run([str(args.mergekit_bin), str(cfg), str(mk_out), "--no-copy-tokenizer"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    rows.append((family, name, "FAIL", "", "mergekit: " + run.stderr.strip().splitlines()[-1]))
                    failed = True
                    continue
                merge(cfg, our_out, progress=False)
                ok, worst, note = compare(load_dir(our_out), load_dir(mk_out))
                n_layers = yaml.safe_load((our_out / "config.json").read_text())["num_hidden_layers"]
                mk_layers = yaml.safe_load((mk_out / "config.json").read_text())["num_hidden_layers"]
                if n_layers != mk_layers:
                    ok, note = False, f"num_hidden_layers: ours {n_layers}, mergekit {mk_layers}"
                rows.append((family, name, "PASS" if ok else "FAIL", f"{worst:.3g}", note))
                failed |= not ok
    print(format_table(["family", "recipe", "result", "max |diff|", "note"], rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
