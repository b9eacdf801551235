"""A short `vlm-merge zoo build` runs end to end and writes checkpoints transformers and vlm-merge read."""

from __future__ import annotations

import argparse
import json

import pytest
import torch


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    from vlm_merge.world.cli import add_world_commands

    parser = argparse.ArgumentParser()
    add_world_commands(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("world") / "zoo"
    args = parser.parse_args(["zoo", "build", "--seed", "3", "--out", str(out), "--smoke", "--quiet"])
    assert args.func(args) == 0
    return out


def test_smoke_build_writes_every_part(smoke_zoo):
    meta = json.loads((smoke_zoo / "zoo.json").read_text())
    assert meta["seed"] == 3 and set(meta["timings_s"]) >= {"en-base", "ja-base", "vision", "en-vlm", "total"}
    log = json.loads((smoke_zoo / "train_log.json").read_text())
    assert all(log[k] for k in ("en-base", "ja-base", "vision", "en-vlm"))
    for part in ("en-base", "ja-base", "en-vlm"):
        assert (smoke_zoo / part / "model.safetensors").exists() and (smoke_zoo / part / "tokenizer.json").exists()
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        assert (smoke_zoo / "en-vlm" / name).exists()
    for k in ("ja-dev", "ja-test", "en-dev", "en-test"):
        assert (smoke_zoo / meta["data"][k]).exists()


def test_smoke_zoo_loads_and_merges(smoke_zoo, tmp_path):
    from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

    from chat_vector import chat_vector
    from vlm_merge.world import datasets, evaluate

    LlamaForCausalLM.from_pretrained(smoke_zoo / "ja-base")
    out = chat_vector(smoke_zoo / "en-vlm", smoke_zoo / "en-base", smoke_zoo / "ja-base", tmp_path / "cv", progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    rows = datasets.read_rows(smoke_zoo / "data" / "ja-test.jsonl")[:4]
    scores = evaluate.evaluate_model(None, smoke_zoo / "data" / "ja-test.jsonl", limit=4, rouge=False,
                                     model_and_processor=(model, processor))
    assert len(scores.predictions) == len(rows) == 4


def test_same_seed_same_weights(smoke_zoo, tmp_path):
    """Determinism: the language model of a rebuilt smoke zoo is bit-identical."""
    from safetensors.torch import load_file

    from vlm_merge.world.build import build_zoo
    from vlm_merge.world.cli import SMOKE
    from vlm_merge.world.train import WorldSettings

    again = build_zoo(tmp_path / "again", 3, WorldSettings(**SMOKE), progress=False, dev_check=20)
    a, b = load_file(smoke_zoo / "ja-base" / "model.safetensors"), load_file(again / "ja-base" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
