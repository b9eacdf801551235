"""The fused resident task-arithmetic kernel (`vlm_merge.engine.fused`), run on the CPU by Triton's interpreter:
it must write exactly what tensor-by-tensor resident merging writes (which equals `vlm-merge merge`),
flag NaN/inf candidates, and leave candidates it does not compute to the tensor-by-tensor path.

On a GPU the same kernel is compiled; bench/evolve.py --device cuda checks it there against the
tensor-by-tensor path over a whole 7B-shaped language model and times it."""

from __future__ import annotations

import os

import pytest
import torch

from eval.model_loading import load_model
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.resident import CandidateError, ResidentMerger, write_scaffold


@pytest.fixture
def interpret():
    """Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before anything imports triton)."""
    pytest.importorskip("triton", reason="triton is a test dependency (pyproject [test]); run `make test`")
    assert os.environ.get("TRITON_INTERPRET") == "1"


def sources(zoo) -> dict:
    return {"vlm": str(zoo.vlms["llava-hf-llama"]), "base_model": str(zoo.llms["en-llama"]), "target": str(zoo.llms["ja-llama"])}


def pair(zoo, tmp_path, recipe):
    """Two live models from one scaffold: one merged by the fused kernel, one tensor by tensor."""
    write_scaffold(recipe, tmp_path / "scaffold")
    fused_model, _ = load_model(tmp_path / "scaffold", device="cpu")
    plain_model, _ = load_model(tmp_path / "scaffold", device="cpu")
    fused = ResidentMerger.open(recipe, fused_model, fused=True)
    plain = ResidentMerger.open(recipe, plain_model, fused=False)
    assert fused.fused is not None and plain.fused is None
    return fused, plain


def same_state(a, b) -> list[str]:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return [k for k in sb if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_ja", [False, True], ids=["chat-vector", "vlm+ja"])
def test_fused_kernel_writes_what_tensor_by_tensor_merging_writes(zoo, tmp_path, interpret, dtype, with_ja):
    z = sources(zoo)
    names = ["vlm", z["target"]] if with_ja else ["vlm"]  # with_ja: the anchor is also a model (one buffer)
    r0 = {"merge_method": "task_arithmetic", **z, "dtype": dtype, "models": [{"model": m, "parameters": {"weight": 1.0}} for m in names]}
    per_layer = [{"filter": "embed_tokens", "value": 0.0}, {"value": [0.7, -0.35]}]
    cands = [
        r0,
        {**r0, "models": [{"model": m, "parameters": {"weight": per_layer if i == 0 else 0.4}} for i, m in enumerate(names)]},
        {**r0, "models": [{"model": m, "parameters": {"weight": 1.3 if i == 0 else 0.0}} for i, m in enumerate(names)]},
    ]
    fused, plain = pair(zoo, tmp_path, r0)
    before = fused.model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"].clone()
    for c in cands:
        fused.apply(c)
        plain.apply(c)
        assert same_state(fused, plain) == []
    # the kernel wrote through the live model's parameters (now views of one flat buffer)
    assert not torch.equal(fused.model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"], before)
    assert fused.source_bytes == plain.source_bytes


def test_fused_flags_nan_inf_and_hands_other_candidates_to_the_tensor_path(zoo, tmp_path, interpret):
    z = sources(zoo)
    r0 = {"merge_method": "task_arithmetic", **z, "models": [{"model": "vlm", "parameters": {"weight": 1.0}}]}
    fused, plain = pair(zoo, tmp_path, r0)
    # lambda is not computed by the kernel: the candidate runs tensor by tensor, with the same result
    scaled = {**r0, "parameters": {"lambda": 0.5}}
    assert fused.fused_weights(fused.resolve(scaled)) is None
    for c in (scaled, r0):  # and back to the kernel after it
        fused.apply(c)
        plain.apply(c)
        assert same_state(fused, plain) == []
    for rm in (fused, plain):  # a NaN in the VLM's layer-1 down_proj (in the fused one: inside the flat buffer)
        b = next(b for b in rm.tensors if b.canonical == "model.layers.1.mlp.down_proj.weight")
        b.inputs["vlm"][0, 1] = float("nan")
    cand = {**r0, "models": [{"model": "vlm", "parameters": {"weight": [{"filter": "layers.1.mlp", "value": 0.5}, {"value": 1.0}]}}]}
    for rm in (fused, plain):
        with pytest.raises(CandidateError, match=r"layers\.1\.mlp\.down_proj\.weight: merge produced NaN/inf"):
            rm.apply(cand)
    no_vlm_there = {**r0, "models": [{"model": "vlm", "parameters": {"weight": [{"filter": "layers.1.mlp", "value": 0.0}, {"value": 1.0}]}}]}
    fused.apply(no_vlm_there)  # weight 0 there: the NaN does not reach the result; the run goes on
    plain.apply(no_vlm_there)
    assert same_state(fused, plain) == []


def test_fused_kernel_only_where_asked_and_possible(zoo, tmp_path, interpret):
    z = sources(zoo)
    r0 = {"merge_method": "task_arithmetic", **z, "models": [{"model": "vlm", "parameters": {"weight": 1.0}}]}
    write_scaffold(r0, tmp_path / "scaffold")
    live, _ = load_model(tmp_path / "scaffold", device="cpu")
    assert ResidentMerger.open(r0, live).fused is None  # on the CPU the default is tensor by tensor
    ties = {**r0, "merge_method": "ties", "models": [{"model": "vlm", "parameters": {"weight": 1.0, "density": 0.5}}]}
    with pytest.raises(VlmMergeError, match="the fused kernel needs task_arithmetic"):
        ResidentMerger.open(ties, live, fused=True)


def test_sources_the_flat_buffers_cannot_hold_fall_back_to_tensor_by_tensor(zoo, tmp_path, interpret, monkeypatch):
    from vlm_merge.engine import resident
    from vlm_merge.engine.fused import FusedTaskArithmetic

    def bf16_buffers(keys, params, base_role, model_roles, anchor_role, dtypes, round_to):  # float32 sources
        return real(keys, params, base_role, model_roles, anchor_role, dict.fromkeys(dtypes, torch.bfloat16), round_to)

    real = FusedTaskArithmetic.allocate
    z = sources(zoo)
    r0 = {"merge_method": "task_arithmetic", **z, "models": [{"model": "vlm", "parameters": {"weight": 1.0}}]}
    write_scaffold(r0, tmp_path / "scaffold")
    live, _ = load_model(tmp_path / "scaffold", device="cpu")
    ref, _ = load_model(tmp_path / "scaffold", device="cpu")
    loads, loaded = [], []

    def load_sources(plan, merges, dev, packed):
        loads.append(packed is not None)
        out = real_load(plan, merges, dev, packed)
        loaded.append(out)
        return out

    real_load = resident._load_sources
    monkeypatch.setattr(resident.FusedTaskArithmetic, "allocate", staticmethod(bf16_buffers))
    monkeypatch.setattr(resident, "_load_sources", load_sources)
    with pytest.raises(VlmMergeError, match="the fused kernel needs"):
        ResidentMerger.open(r0, live, fused=True)
    assert loads == [True]  # the sources are read once: into the flat buffers, what they cannot hold beside them
    rm = ResidentMerger.open(r0, live, fused=False)  # the live model (its parameters re-pointed) still merges right
    plain = ResidentMerger.open(r0, ref, fused=False)
    rm.apply(r0)
    plain.apply(r0)
    assert rm.fused is None and same_state(rm, plain) == []
    bound, fits = loaded[0]  # what the flat buffers could not hold was read beside them, with the same values
    assert not fits and all(torch.equal(b.inputs[r], p.inputs[r]) for b, p in zip(bound, plain.tensors) for r in p.inputs)
