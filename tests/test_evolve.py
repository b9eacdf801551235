"""Evolutionary merging on the random-weight fixtures: genome <-> recipe, resident merging equals
`vlm-merge merge` bit for bit, a deterministic run and its outputs, failing candidates penalised,
resume after SIGKILL mid-generation equal to an uninterrupted run, config errors, and Ray workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval.fixture_datasets import draw_scene
from eval.model_loading import load_model
from eval.outputs import read_jsonl
from tests.conftest import error_line
from vlm_merge.cli.evolve import main
from vlm_merge.engine.merge import merge
from vlm_merge.engine.resident import ResidentMerger
from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve import (
    CHECKPOINT_FILE,
    LOG_FILE,
    Genome,
    config_from_dict,
    run_evolve,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> Path:
    """A custom JSONL VQA set: 24 drawn scenes, Japanese questions and answers."""
    root = tmp_path_factory.mktemp("dev")
    (root / "img").mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(24):
        img, objs = draw_scene(rng)
        img.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "何色の図形がありますか？", "answer": f"{objs[0][0]}の{objs[0][1]}です。"})
    (root / "dev.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root / "dev.jsonl"


def config(zoo, dev, **over) -> dict:
    cfg = {
        "sources": {"vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]),
                    "target": str(zoo.llms["ja-llama"]), "models": ["vlm"]},
        "method": "task_arithmetic",
        "genome": {"params": {"weight": [0.0, 1.5]}, "separate": ["embeddings"]},
        "fitness": {"benchmark": str(dev), "kind": "loglik", "metrics": {"loglik": 1.0}, "limit": 8},
        "cmaes": {"popsize": 4, "max_evaluations": 12, "seed": 3},
        "threads": 1,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def test_genome_decodes_to_a_recipe_with_one_value_per_gene(zoo, dev):
    cfg = config_from_dict(config(zoo, dev, method="ties", genome={
        "params": {"weight": [0.0, 2.0], "density": [0.2, 1.0]}, "split_modules": True, "separate": ["embeddings", "lm_head", "norms"],
        "fixed": {"normalize": False}}))
    g = Genome.of(cfg, num_layers=2)
    # 2 params x (2 layer groups x 2 modules + 3 separate genes)
    assert len(g) == 2 * (2 * 2 + 3)
    x = [i / (len(g) - 1) for i in range(len(g))]
    recipe = g.decode(x)
    values = g.values(x)
    assert recipe.parameters == {"normalize": False} and recipe.models[0].model == "vlm"
    rm_params = _resolved(zoo, recipe)
    w = lambda canon: rm_params[canon].per_model[0]["weight"]  # noqa: E731
    d = lambda canon: rm_params[canon].per_model[0]["density"]  # noqa: E731
    assert w("model.layers.1.mlp.down_proj.weight") == values["weight[vlm]@layers1/mlp"]
    assert w("model.layers.0.self_attn.q_proj.weight") == values["weight[vlm]@layers0/attention"]
    assert w("model.embed_tokens.weight") == values["weight[vlm]@embeddings"]
    assert w("lm_head.weight") == values["weight[vlm]@lm_head"]
    assert w("model.layers.1.input_layernorm.weight") == values["weight[vlm]@norms"] == w("model.norm.weight")
    assert d("model.layers.0.mlp.up_proj.weight") == values["density[vlm]@layers0/mlp"]
    assert values["weight[vlm]@layers0/attention"] == 0.0 and values["density[vlm]@norms"] == pytest.approx(1.0)
    # coarser granularity: one gene per parameter covers both layers
    g2 = Genome.of(config_from_dict(config(zoo, dev, genome={"params": {"weight": [0.5, 1.0]}, "layer_granularity": 2, "separate": []})), 2)
    assert [x.name for x in g2.genes] == ["weight[vlm]@layers0-1"] and g2.decode([0.5]).models[0].parameters == {"weight": 0.75}


def test_projection_split_gives_each_projection_and_layer_norm_its_own_gene(zoo, dev):
    cfg = config_from_dict(config(zoo, dev, genome={"params": {"weight": [0.0, 1.0]}, "split_modules": "projections", "separate": []}))
    assert config_from_dict(config(zoo, dev, genome={"split_modules": True})).genome.split_modules == "attention_mlp"
    g = Genome.of(cfg, num_layers=2)
    assert len(g) == 2 * 9 and g.genes[0].name == "weight[vlm]@layers0/q" and g.genes[-1].name == "weight[vlm]@layers1/mlp_norm"
    x = [i / (len(g) - 1) for i in range(len(g))]
    values, params = g.values(x), _resolved(zoo, g.decode(x))
    w = lambda canon: params[canon].per_model[0]["weight"]  # noqa: E731
    for layer in (0, 1):
        for gene, canon in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                            ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"),
                            ("attention_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            assert w(f"model.layers.{layer}.{canon}.weight") == pytest.approx(values[f"weight[vlm]@layers{layer}/{gene}"])
    assert len({w(f"model.layers.1.{c}.weight") for c in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}) == 3
    # tensors outside the layers follow the first gene of the first group (the rule of per-layer lists)
    assert w("model.embed_tokens.weight") == pytest.approx(values["weight[vlm]@layers0/q"])
    with pytest.raises(VlmMergeError, match="split_modules: 'heads' is not one of none, attention_mlp, projections"):
        config_from_dict(config(zoo, dev, genome={"split_modules": "heads"}))


def _resolved(zoo, recipe):
    from vlm_merge.engine.merge import plan_recipe

    rp = plan_recipe(recipe)
    rp.sources.close()
    return rp.params


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"weight": [0.3, 1.4]}), ("dare_ties", {"weight": [0.5, 1.2], "density": 0.6})])
def test_resident_merge_equals_merge_written_and_loaded(zoo, tmp_path, method, params):
    z = {"vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]), "target": str(zoo.llms["ja-llama"])}
    r0 = {"merge_method": method, **z, "models": [{"model": "vlm", "parameters": {"weight": 1.0}}], "seed": 5}
    r1 = {**r0, "models": [{"model": "vlm", "parameters": params}]}
    merge(r0, tmp_path / "m0", progress=False)
    merge(r1, tmp_path / "m1", progress=False)
    live, _ = load_model(tmp_path / "m0", device="cpu")
    vision = {k: v.clone() for k, v in live.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    rm = ResidentMerger.open(r0, live)
    stats = rm.apply(r1)
    assert stats.tensors == len(rm.tensors) > 10
    ref, _ = load_model(tmp_path / "m1", device="cpu")
    got, want = live.state_dict(), ref.state_dict()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert all(torch.equal(vision[k], got[k]) for k in vision)  # vision tower and projector untouched
    rm.apply(r0)  # back again
    assert not torch.equal(live.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"], want["model.language_model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(VlmMergeError, match="only parameter values"):
        rm.apply({**r1, "merge_method": "ties"})


@pytest.fixture
def benchmark_reads(monkeypatch):
    """The data paths `eval.benchmarks.load_benchmark` is called with from now on, in call order."""
    import eval.benchmarks

    reads = []
    load = eval.benchmarks.load_benchmark
    monkeypatch.setattr(eval.benchmarks, "load_benchmark", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    return reads


def test_run_is_deterministic_and_its_outputs_replay(zoo, dev, tmp_path, request):
    cfg = config(zoo, dev)
    a = run_evolve(config_from_dict(cfg), tmp_path / "a", progress=False)
    reads = request.getfixturevalue("benchmark_reads")
    run_evolve(config_from_dict(cfg), tmp_path / "b", progress=False, write_model=False)
    assert reads == [str(dev)]  # the data check's read serves the search: the fitness file is read once
    log_a = [json.loads(x) for x in (tmp_path / "a" / LOG_FILE).read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert len(log_a) == 12 and [r["generation"] for r in log_a] == [1] * 4 + [2] * 4 + [3] * 4
    assert [(r["x"], r["fitness"]) for r in log_a] == [(r["x"], r["fitness"]) for r in log_b]
    assert len({r["recipe_sha256"] for r in log_a}) == 12 and len({r["fitness"] for r in log_a}) > 1
    assert a.best["fitness"] == max(r["fitness"] for r in log_a) and all(r["error"] is None for r in log_a)
    assert all(r["merge_s"] > 0 and r["eval_s"] > 0 for r in log_a)
    assert (tmp_path / "a" / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "a" / ".scaffold").exists()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["best"]["x"] == a.best["x"] and summary["evaluations"] == 12
    # best_recipe.yaml replays with `vlm-merge merge` into the same bytes as the written model
    from vlm_merge.cli import main as cli_main

    assert cli_main(["merge", str(tmp_path / "a" / "best_recipe.yaml"), str(tmp_path / "replay"), "--quiet"]) == 0
    shards = sorted(p.name for p in (tmp_path / "a" / "model").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / "model" / s).read_bytes() == (tmp_path / "replay" / s).read_bytes() for s in shards)
    # ... and the written model scores what the search logged for the best genome
    from vlm_merge.evolve import Evaluator

    ev = Evaluator(config_from_dict(cfg), tmp_path / "a" / "model")
    best_recipe = Genome.of(config_from_dict(cfg), 2).decode(a.best["x"])
    assert ev.score(best_recipe).fitness == a.best["fitness"]


def _vlm_with_frozen(zoo, out: Path, prefixes: tuple[str, ...]) -> Path:
    """The llava-hf-llama fixture with the language-model tensors under `prefixes` (e.g. "model.layers.1.") set to
    the English base's (as if its fine-tune had frozen them); embedding rows the VLM added keep their values."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(zoo.vlms["llava-hf-llama"], out)
    en = load_file(zoo.llms["en-llama"] / "model.safetensors")
    for shard in out.glob("*.safetensors"):
        state = load_file(shard)
        hit = {}
        for k, v in state.items():
            name = k.removeprefix("language_model.")
            if k.startswith("language_model.") and name.startswith(prefixes):
                hit[k] = v.clone()
                hit[k][: en[name].shape[0]] = en[name].to(v.dtype)
        if hit:
            save_file({**state, **hit}, shard, metadata={"format": "pt"})
    return out


def test_inert_genes_are_held_out_of_the_search_and_the_run_resumes_with_them_held(zoo, dev, tmp_path):
    vlm = _vlm_with_frozen(zoo, tmp_path / "vlm", ("model.layers.1.",))
    # a projection split under a `norms` gene: the layer-norm genes set no tensor; layer 1 has no delta
    cfg = config(zoo, dev, sources={"vlm": str(vlm)},
                 genome={"params": {"weight": [0.0, 1.5]}, "split_modules": "projections", "separate": ["norms", "embeddings"]},
                 cmaes={"popsize": 4, "max_evaluations": 8, "seed": 3})
    from vlm_merge.engine.threads import torch_threads

    with torch_threads(2):  # the run's evaluators use `threads: 1`; the caller's count comes back
        res = run_evolve(config_from_dict(cfg), tmp_path / "run", progress=False, write_model=False)
        assert torch.get_num_threads() == 2
    proj = ("q", "k", "v", "o", "gate", "up", "down")
    no_tensor = {f"weight[vlm]@layers{i}/{n}" for i in (0, 1) for n in ("attention_norm", "mlp_norm")}
    frozen = {f"weight[vlm]@layers1/{n}" for n in proj}
    assert set(res.held_genes) == no_tensor | frozen
    assert all(res.held_genes[g] == "sets no tensor" for g in no_tensor)
    assert all(res.held_genes[g].startswith("sets only tensors where every model equals the base") for g in frozen)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    searched = [f"weight[vlm]@layers0/{n}" for n in proj] + ["weight[vlm]@norms", "weight[vlm]@embeddings"]
    assert summary["gene_names"] == searched and summary["genes"] == len(res.best["x"]) == 9
    assert set(summary["held_genes"]) == set(res.held_genes) and summary["held_genes"]["weight[vlm]@layers1/q"]["value"] == 0.75
    assert json.loads((tmp_path / "run" / CHECKPOINT_FILE).read_text())["held_genes"] == res.held_genes
    log = [json.loads(x) for x in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert all(len(r["x"]) == 9 and len(r["genes"]) == 9 + len(res.held_genes) for r in log)
    # the held genes keep their x0 value in every recipe; the searched ones vary
    recipes = [Genome.of(config_from_dict(cfg), 2).without(res.held_genes).decode(r["x"]) for r in log]
    layer1 = {_resolved(zoo, r)["model.layers.1.self_attn.q_proj.weight"].per_model[0]["weight"] for r in recipes[:2]}
    layer0 = {_resolved(zoo, r)["model.layers.0.self_attn.q_proj.weight"].per_model[0]["weight"] for r in recipes[:2]}
    assert layer1 == {0.75} and len(layer0) == 2
    # a finished run resumed from its checkpoint holds the same genes (no sources are read)
    again = run_evolve(None, tmp_path / "run", resume=True, progress=False, write_model=False)
    assert again.held_genes == res.held_genes and again.best["x"] == res.best["x"]
    # drop_inert: false searches every gene
    off = run_evolve(config_from_dict({**cfg, "genome": {**cfg["genome"], "drop_inert": False}}), tmp_path / "off", progress=False, write_model=False)
    assert off.held_genes == {} and len(off.best["x"]) == 9 + len(res.held_genes)


def test_a_genome_with_every_gene_inert_is_one_error_and_leaves_no_run_behind(zoo, dev, tmp_path):
    vlm = _vlm_with_frozen(zoo, tmp_path / "vlm", ("model.", "lm_head."))  # the VLM's language model is the base
    cfg = config(zoo, dev, sources={"vlm": str(vlm)}, genome={"params": {"weight": [0.0, 1.5]}, "separate": ["norms", "embeddings"]})
    with pytest.raises(VlmMergeError, match=r"^evolve config genome: all 4 genes are inert .* check sources.models and base_model$"):
        run_evolve(config_from_dict(cfg), tmp_path / "run", progress=False, write_model=False)
    assert not (tmp_path / "run").exists()
    # with drop_inert: false the same genome is searched (and every candidate is the target plus nothing)
    res = run_evolve(config_from_dict({**cfg, "genome": {**cfg["genome"], "drop_inert": False}, "cmaes": {"popsize": 4, "max_evaluations": 4, "seed": 3}}),
                     tmp_path / "off", progress=False, write_model=False)
    log = [json.loads(x) for x in (tmp_path / "off" / LOG_FILE).read_text().splitlines()]
    assert res.held_genes == {} and len(res.best["x"]) == 4 and len(log) == 4 and len({r["fitness"] for r in log}) == 1


def test_failing_candidates_are_penalised_logged_and_the_run_goes_on(zoo, dev, tmp_path):
    # DELLA needs density - epsilon and density + epsilon in (0, 1): part of this box is invalid
    cfg = config(zoo, dev, method="della", genome={"params": {"weight": [0.5, 1.5], "density": [0.05, 0.95], "epsilon": [0.0, 0.45]},
                                                    "layer_granularity": 2, "separate": []},
                 cmaes={"popsize": 6, "max_evaluations": 12, "sigma0": 0.4, "seed": 1}, fitness={"penalty": -99.0})
    res = run_evolve(config_from_dict(cfg), tmp_path / "run", progress=False, write_model=False)
    log = [json.loads(x) for x in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    bad, good = [r for r in log if r["error"]], [r for r in log if not r["error"]]
    assert len(log) == 12 and bad and good
    assert all(r["fitness"] == -99.0 and "epsilon" in r["error"] for r in bad)
    assert res.best["error"] is None and res.best["fitness"] == max(r["fitness"] for r in good)
    # NaN/inf weights: every candidate fails, the run still finishes and says so
    cfg = config(zoo, dev, genome={"params": {"weight": [1e300, 1e301]}}, cmaes={"popsize": 4, "max_evaluations": 4})
    res = run_evolve(config_from_dict(cfg), tmp_path / "nan", progress=False)
    log = [json.loads(x) for x in (tmp_path / "nan" / LOG_FILE).read_text().splitlines()]
    assert len(log) == 4 and all("NaN/inf" in r["error"] and r["fitness"] == -1e6 for r in log)
    assert res.best is None and not (tmp_path / "nan" / "best_recipe.yaml").exists()
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["failed"] == 4


def _kill_mid_generation(tmp_path, cfg, sig: int, generation: int) -> tuple[subprocess.Popen, Path, str, int]:
    """Start `python -m vlm_merge.cli.evolve` on `cfg` and send `sig` once `generation` has logged a candidate.

    The signal lands when this process next runs, so on a busy machine the run may have gone on into a later
    generation, or (rarely) be between two generations; the generation it landed in is read back from the log,
    and a kill that did not land mid-generation of an unfinished run is tried again in a fresh folder (3 tries).
    Returns the process, its output folder, its stderr and the generation the signal landed in."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missed = []
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "vlm_merge.cli.evolve", str(path), "--out", str(out), "--quiet"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = out / LOG_FILE
        deadline = time.time() + 120
        try:
            while time.time() < deadline and proc.poll() is None:
                if any(r["generation"] == generation and r["index"] >= 1 for r in _log_records(log)):
                    os.kill(proc.pid, sig)
                    break
                time.sleep(0.002)
        finally:
            proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        records = _log_records(log)
        state = json.loads((out / CHECKPOINT_FILE).read_text()) if (out / CHECKPOINT_FILE).exists() else None
        if state is not None and not state["finished"] and len(records) > state["log_lines"]:
            return proc, out, err, records[-1]["generation"]
        missed.append(f"exit {proc.returncode}, {len(records)} candidates logged, checkpoint {state and state['log_lines']}")
    raise AssertionError(f"the signal never landed mid-generation in 3 tries: {missed}; {err[-2000:]}")


def _log_records(log: Path) -> list[dict]:
    """The complete lines of a run's log.jsonl so far (a line being written is left out)."""
    return read_jsonl(log, tolerate_torn_tail=True) if log.exists() else []


def _assert_resumes_like(ref, out: Path, ref_dir: Path) -> None:
    assert main(["--resume", str(out), "--quiet"]) == 0
    resumed = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    reflog = [json.loads(x) for x in (ref_dir / LOG_FILE).read_text().splitlines()]
    assert [(r["x"], r["fitness"]) for r in resumed] == [(r["x"], r["fitness"]) for r in reflog]
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["x"] == ref.best["x"] and best["fitness"] == ref.best["fitness"]
    assert (out / "best_recipe.yaml").exists() and (out / "model" / "config.json").exists()


def test_resume_after_sigkill_mid_generation_matches_an_uninterrupted_run(zoo, dev, tmp_path):
    cfg = config(zoo, dev, fitness={"limit": None, "batch_size": 2}, cmaes={"popsize": 6, "max_evaluations": 24, "seed": 7})
    ref = run_evolve(config_from_dict(cfg), tmp_path / "ref", progress=False, write_model=False)
    proc, out, err, landed = _kill_mid_generation(tmp_path, cfg, signal.SIGKILL, 2)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    state = json.loads((out / CHECKPOINT_FILE).read_text())
    assert landed >= 2 and state["generation"] == landed - 1  # the last whole generation, not the one killed
    _assert_resumes_like(ref, out, tmp_path / "ref")


def test_ctrl_c_stops_with_a_checkpoint_and_resumes(zoo, dev, tmp_path):
    cfg = config(zoo, dev, fitness={"limit": None, "batch_size": 2}, cmaes={"popsize": 6, "max_evaluations": 24, "seed": 5})
    ref = run_evolve(config_from_dict(cfg), tmp_path / "ref", progress=False, write_model=False)
    proc, out, err, landed = _kill_mid_generation(tmp_path, cfg, signal.SIGINT, 2)
    assert proc.returncode == 130, err[-2000:]
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert "Traceback" not in err and last.startswith("vlm-merge: interrupted") and f"--resume {out}" in last, err
    state = json.loads((out / CHECKPOINT_FILE).read_text())
    assert landed >= 2 and state["generation"] == landed - 1 and not state["finished"]
    assert not (out / "best_recipe.yaml").exists()
    _assert_resumes_like(ref, out, tmp_path / "ref")


def test_config_errors_are_one_line_and_exit_2(zoo, dev, tmp_path, capsys):
    bad = [
        ({"genome": {"params": {"density": [0.1, 0.9]}}}, "not a parameter of task_arithmetic"),
        ({"genome": {"params": {"weight": [1.0, 0.5]}}}, "must be below high"),
        ({"method": "nope"}, "is not one of"),
        ({"fitness": {"subset": {"mode": "halving"}}}, "needs a size"),
        ({"cmaes": {"popsiz": 4}}, "unknown key"),
        ({"genome": {"drop_inert": "yes"}}, r"genome.drop_inert: expected true or false, got 'yes'"),
        ({"cmaes": {"popsize": "8"}}, r"cmaes.popsize: expected an integer, got '8'"),
        ({"cmaes": {"popsize": -3}}, r"cmaes.popsize: -3 is below 2"),
        ({"cmaes": {"popsize": 10**12}}, r"cmaes.popsize: 1000000000000 is above 10000"),
        ({"cmaes": [4]}, r"cmaes: expected a mapping, got \[4\]"),
        ({"genome": [1]}, r"genome: expected a mapping"),
        ({"fitness": {"limit": "8"}}, r"fitness.limit: expected an integer, got '8'"),
        ({"genome": {"separate": "embeddings"}}, r"genome.separate: expected a list, got 'embeddings'"),
        ({"genome": {"fixed": {"weight_typo": 1.0}}}, r"genome.fixed.weight_typo: is not a parameter of task_arithmetic"),
        ({"method": "ties", "genome": {"fixed": {"density": "abc"}}}, r"genome.fixed.density: density: 'abc' out of range"),
        ({"method": "ties", "genome": {"fixed": {"normalize": "x"}}}, r"genome.fixed.normalize: normalize: 'x' out of range"),
        ({"cmaes": {"sigma0": 0}}, r"^evolve config cmaes.sigma0: 0 is below 1e-06; give at least 1e-06$"),
        ({"fitness": {"metrics": {"loglik": float("nan")}}}, r"fitness.metrics.loglik: expected a finite number, got nan"),
        ({"fitness": {"protocol": None}}, r"fitness.protocol: expected a string, got None"),
        ({"genome": {"separate": ["embedding"]}}, r"genome.separate\[0\]: 'embedding' is not one of embeddings, norms, lm_head"),
        ({"cmaes": {"x0": {"weight": "a"}}}, r"^evolve config cmaes.x0.weight: expected a number, got 'a'$"),
        # a typo is named, not the key it leaves missing
        ({"test": {"benchmarks": str(dev)}}, r"^evolve config test.benchmarks: unknown key; remove it or correct its spelling "
                                             r"\(known: benchmark, data, split, limit, metric, chat_vector_scale\)$"),
    ]
    for over, msg in bad:
        with pytest.raises(VlmMergeError, match=msg) as e:
            config_from_dict(config(zoo, dev, **over))
        assert "\n" not in str(e.value)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config(zoo, dev, cmaes={"popsize": "8"})))  # the line names the file, field and value
    assert main([str(path), "--out", str(tmp_path / "o")]) == 2
    assert error_line(capsys) == f"vlm-merge: error: evolve config {path}: cmaes.popsize: expected an integer, got '8'"
    path.write_text("sources: [1, 2\n")
    assert main([str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid YAML" in err
    assert main(["--resume", str(tmp_path / "nothing-here")]) == 2
    # a metric the data cannot feed fails before any candidate is scored
    path.write_text(json.dumps(config(zoo, dev, fitness={"kind": "generate", "metrics": {"content_accuracy": 1.0}})))
    capsys.readouterr()
    assert main([str(path), "--out", str(tmp_path / "o2")]) == 2
    err = error_line(capsys)
    assert "fitness.metrics" in err and "has no 'attribute' column" in err
    assert not (tmp_path / "o2").exists()  # no half-made run: the fixed config reruns with the same command


def test_data_errors_fail_before_any_model_is_written_or_loaded(zoo, dev, tmp_path, capsys, monkeypatch):
    """The fitness file and the test split are read and checked against their metrics first: a wrong path,
    or a test metric its data cannot feed, costs no scaffold write and no source load (minutes at 7B) and no
    search (the test split is otherwise first read after it)."""
    from vlm_merge.engine import resident

    def no_model_work(*a, **k):
        raise AssertionError("a model was written or loaded before the data was checked")

    monkeypatch.setattr(resident, "write_scaffold", no_model_work)
    monkeypatch.setattr(resident.ResidentMerger, "open", no_model_work)
    test_split = {"benchmark": str(dev), "metric": "content_accuracy", "chat_vector_scale": 0.5}
    cases = [
        (config(zoo, dev, fitness={"benchmark": str(tmp_path / "missing.jsonl")}), "missing.jsonl"),
        (config(zoo, dev, test=test_split), "test.metric"),
    ]
    for i, (cfg, msg) in enumerate(cases):
        path = tmp_path / f"cfg{i}.yaml"
        path.write_text(json.dumps(cfg))
        capsys.readouterr()
        assert main([str(path), "--out", str(tmp_path / f"o{i}")]) == 2
        err = error_line(capsys)
        assert msg in err, err
        assert not (tmp_path / f"o{i}").exists()


def test_successive_halving_logs_rungs_and_picks_best_on_every_question(zoo, dev, tmp_path):
    cfg = config(zoo, dev, fitness={"limit": None, "subset": {"mode": "halving", "size": 6, "eta": 2}},
                 cmaes={"popsize": 8, "max_evaluations": 16})
    res = run_evolve(config_from_dict(cfg), tmp_path / "run", progress=False, write_model=False)
    log = [json.loads(x) for x in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert len(log) == 16 and {r["rung"] for r in log} == {0, 1, 2}  # 6 -> 12 -> 24 questions
    finals = [r for r in log if r["final"]]
    assert finals and all(r["questions"] == 24 for r in finals) and all(r["questions"] in (6, 12) for r in log if not r["final"])
    assert res.best["final"] and res.best["fitness"] == max(r["fitness"] for r in finals)


def _assert_ray_matches_serial(cfg: dict, tmp_path) -> None:
    """The same run in one process and on two Ray workers: the same candidates, fitnesses and best."""
    serial = run_evolve(config_from_dict(cfg), tmp_path / "serial", progress=False, write_model=False)
    par = run_evolve(config_from_dict(cfg), tmp_path / "ray", progress=False, write_model=False, workers=2)
    a = [json.loads(x) for x in (tmp_path / "serial" / LOG_FILE).read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ray" / LOG_FILE).read_text().splitlines()]
    assert [(r["x"], r["fitness"]) for r in a] == [(r["x"], r["fitness"]) for r in b]
    assert par.best["x"] == serial.best["x"]


@pytest.mark.slow
def test_ray_workers_score_like_one_process(zoo, dev, tmp_path):
    import ray  # noqa: F401 - part of the test extra; this test must run, not skip
    _assert_ray_matches_serial(config(zoo, dev, cmaes={"popsize": 4, "max_evaluations": 8}), tmp_path)


def test_held_out_report_compares_best_with_chat_vector_and_controls(zoo, dev, tmp_path, benchmark_reads):
    from eval.metrics import bootstrap_aggregate, paired_bootstrap

    cfg = config(zoo, dev, fitness={"kind": "generate", "metrics": {"rougeL": 1.0}, "limit": 8, "max_new_tokens": 6},
                 test={"benchmark": str(dev), "metric": "rougeL", "chat_vector_scale": 0.5})
    res = run_evolve(config_from_dict(cfg), tmp_path / "run", progress=False, write_model=False)
    assert benchmark_reads == [str(dev)] * 2  # the data check reads the fitness and the test split, once each, for the run
    rec = json.loads((tmp_path / "run" / "test_report.json").read_text())
    assert rec == json.loads(json.dumps(res.test)) and rec["questions"] == 24
    assert list(rec["models"]) == ["evolved", "chat-vector", "target-shell", "vlm"]
    per = {n: [json.loads(x) for x in (tmp_path / "run" / "test_predictions" / f"{n}.jsonl").read_text().splitlines()]
           for n in rec["models"]}
    for n, rows in per.items():  # the report is its predictions re-aggregated
        assert rec["models"][n]["mean"] == pytest.approx(bootstrap_aggregate([r["rougeL"] for r in rows]).mean)
    for n, d in rec["evolved_vs"].items():
        want = paired_bootstrap([r["rougeL"] for r in per["evolved"]], [r["rougeL"] for r in per[n]])
        assert d == pytest.approx(want)
    # the controls are what they say: the shell answers as the target model in the shell, the VLM as itself
    shell = merge({"merge_method": "task_arithmetic", "vlm": cfg["sources"]["vlm"], "base_model": cfg["sources"]["base_model"],
                   "target": cfg["sources"]["target"], "models": [{"model": "vlm", "parameters": {"weight": 0.0}}]},
                  tmp_path / "shell", progress=False)
    from eval.runner import evaluate

    for name, path in (("target-shell", shell), ("vlm", Path(cfg["sources"]["vlm"]))):
        model, proc = load_model(path, device="cpu")
        got = evaluate(model, str(dev), processor=proc, protocol="llm-jp", max_new_tokens=6, batch_size=8, progress=False)
        assert [r["prediction"] for r in got.predictions] == [r["prediction"] for r in per[name]]
    assert "| evolved minus |" in (tmp_path / "run" / "test_report.md").read_text()
    with pytest.raises(VlmMergeError, match="test.metric"):
        config_from_dict(config(zoo, dev, test={"benchmark": str(dev), "metric": "accuracy"}))
