"""Evolved DFS / PS+DFS (vlm_merge.evolve.dfs): the live route equals the folded checkpoint without
copying weights, and `space: dfs` / `ps+dfs` runs end to end with a replayable best recipe."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from tests.test_evolve import config, dev  # noqa: F401 - the module-scoped VQA fixture
from vlm_merge.engine.merge import merge
from vlm_merge.engine.stacking import DfsRoute, dfs_slices_recipe
from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve import LOG_FILE, config_from_dict, run_evolve
from vlm_merge.evolve.dfs import DfsGenome, DfsMerger


def test_live_route_equals_the_folded_checkpoint_without_copies(zoo, tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm, ja = str(zoo.vlms["llava-hf-llama"]), str(zoo.llms["ja-llama"])
    first = dfs_slices_recipe(DfsRoute(((ja, 0), (ja, 1)), (1.0, 1.0)), edges_from=ja, vlm=vlm, tokenizer_source=ja)
    merge(first, tmp_path / "scaffold", progress=False)
    live = AutoModelForImageTextToText.from_pretrained(tmp_path / "scaffold").eval()
    merger = DfsMerger.open(live, [ja, "vlm"], vlm)
    pool_ptrs = {p.data_ptr() for layer in merger.layers.values() for p in layer.parameters()}
    ids = torch.tensor([[1, 7, 30, 4, 99, 12]])
    for route in (DfsRoute(((ja, 0), ("vlm", 1), (ja, 0), ("vlm", 0)), (1.0, 0.7, 1.4, 0.6)),
                  DfsRoute((("vlm", 0), ("vlm", 1), (ja, 1)), (1.2, 1.0, 0.8))):
        recipe = dfs_slices_recipe(route, edges_from=ja, vlm=vlm, tokenizer_source=ja)
        merger.apply(recipe)
        out = merge(recipe, tmp_path / f"m{len(route.positions)}", progress=False)
        ref = AutoModelForImageTextToText.from_pretrained(out).eval()
        with torch.no_grad():
            a, b = live(input_ids=ids).logits, ref(input_ids=ids).logits
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
        gen = dict(max_new_tokens=6, do_sample=False)  # KV cache: a layer used twice has two cache slots
        assert torch.equal(live.generate(input_ids=ids, **gen), ref.generate(input_ids=ids, **gen))
        live_ptrs = {p.data_ptr() for layer in merger.decoder.layers for p in layer.parameters()}
        assert live_ptrs <= pool_ptrs  # the live decoder holds the pool's tensors themselves
    for _ in range(20):
        merger.apply(recipe)
    assert statistics.median(merger.switch_s) < 1e-3, merger.switch_s


def _dfs_config(zoo, dev, **dfs):  # noqa: F811
    cfg = config(zoo, dev, cmaes={"popsize": 4, "max_evaluations": 8, "seed": 1})
    cfg["space"] = "dfs"
    cfg["dfs"] = {"pool": ["target", "vlm"], "repeats": 2, "max_depth": 5, **dfs}
    return cfg


def test_dfs_search_runs_and_its_best_recipe_replays(zoo, dev, tmp_path):  # noqa: F811
    cfg = config_from_dict(_dfs_config(zoo, dev))
    genome = DfsGenome.of(cfg)
    assert len(genome) == 8 + 16  # T = M * r = 4 * 2 indicator genes + M x M transition scales
    assert genome.route(genome.x0()).positions == ((cfg.sources.target, 0), (cfg.sources.target, 1))
    res = run_evolve(cfg, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert len(log) == 8 and all(r["error"] is None for r in log) and len({r["fitness"] for r in log}) > 1
    from vlm_merge.cli import main as cli_main

    assert cli_main(["merge", str(tmp_path / "run" / "best_recipe.yaml"), str(tmp_path / "replay"), "--quiet"]) == 0
    shards = sorted(p.name for p in (tmp_path / "run" / "model").glob("*.safetensors"))
    assert shards and all((tmp_path / "run" / "model" / s).read_bytes() == (tmp_path / "replay" / s).read_bytes() for s in shards)
    n = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert n == len(genome.route(res.best["x"]).positions)


def test_ps_dfs_pool_takes_the_ps_model(zoo, dev, tmp_path):  # noqa: F811
    ps = tmp_path / "ps"
    merge({"merge_method": "task_arithmetic", "vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]),
           "target": str(zoo.llms["ja-llama"]), "models": [{"model": "vlm", "parameters": {"weight": 0.5}}]}, ps, progress=False)
    raw = _dfs_config(zoo, dev, pool=["target", "ps"], ps_model=str(ps), scales="position")
    raw["space"] = "ps+dfs"
    with pytest.raises(VlmMergeError, match="ps_model"):
        config_from_dict({**raw, "dfs": {**raw["dfs"], "ps_model": None}})
    cfg = config_from_dict(raw)
    genome = DfsGenome.of(cfg)
    assert len(genome) == 8 + 8 and genome.pool[1] == ("vlm", 2)  # the PS VLM's language model
    assert genome.decode(genome.x0()).vlm == str(ps)
    res = run_evolve(cfg, tmp_path / "run", progress=False)
    assert res.best["error"] is None
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")
    assert model.config.text_config.num_hidden_layers == len(genome.route(res.best["x"]).positions)
