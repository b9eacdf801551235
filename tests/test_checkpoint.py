"""Checkpoint I/O: lazy reading of every on-disk format, streaming sharded atomic writing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_merge.io.checkpoint import SAFETENSORS_INDEX, CheckpointReader, read_safetensors_header, resolve_model_dir
from vlm_merge.io.checkpoint_writer import CheckpointWriter, PlannedTensor
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.outputs import AtomicDir


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(16, generator=g),
        "c.weight": torch.randn(3, 5, generator=g).half(),
        "d.ids": torch.arange(7, dtype=torch.int64),
    }


def test_reader_safetensors_single_and_lazy_metadata(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "model.safetensors", metadata={"format": "pt"})
    r = CheckpointReader(tmp_path)
    assert r.format == "safetensors"
    assert set(r.keys()) == set(ts)
    for k, t in ts.items():
        assert r.info(k).shape == tuple(t.shape) and r.info(k).dtype == t.dtype
        assert torch.equal(r.get(k), t)
    assert r.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())


def test_reader_sharded_safetensors_and_bin(tmp_path):
    ts = _tensors(1)
    names = list(ts)
    st, binp = tmp_path / "st", tmp_path / "bin"
    st.mkdir()
    binp.mkdir()
    wm_st, wm_bin = {}, {}
    for i, chunk in enumerate((names[:2], names[2:])):
        save_file({k: ts[k] for k in chunk}, st / f"model-{i + 1:05d}-of-00002.safetensors")
        torch.save({k: ts[k] for k in chunk}, binp / f"pytorch_model-{i + 1:05d}-of-00002.bin")
        wm_st.update({k: f"model-{i + 1:05d}-of-00002.safetensors" for k in chunk})
        wm_bin.update({k: f"pytorch_model-{i + 1:05d}-of-00002.bin" for k in chunk})
    (st / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm_st}))
    (binp / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm_bin}))
    torch.save(ts, tmp_path / "pytorch_model.bin")
    for d, fmt in ((st, "safetensors"), (binp, "bin"), (tmp_path, "bin")):
        r = CheckpointReader(d)
        assert r.format == fmt
        assert {k: r.get(k) for k in r.keys()}.keys() == ts.keys()
        assert all(torch.equal(r.get(k), ts[k]) for k in ts)


def test_resolve_from_hf_cache(zoo):
    path = resolve_model_dir("openai/clip-vit-large-patch14-336", cache_dir=zoo.hf_cache)
    assert (path / "config.json").exists()
    assert "vision_model.embeddings.patch_embedding.weight" in CheckpointReader(path).keys()
    with pytest.raises(VlmMergeError, match="not in the Hugging Face cache"):
        resolve_model_dir("nobody/nothing", cache_dir=zoo.hf_cache)


def test_writer_shards_index_and_roundtrip(tmp_path):
    ts = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    planned = [PlannedTensor(k, tuple(t.shape), t.dtype) for k, t in ts.items()]
    atomic = AtomicDir(tmp_path / "out")
    with atomic as tmp:
        w = CheckpointWriter(tmp, planned, max_shard_bytes=3000, metadata={"note": "x"})
        for k, t in ts.items():
            w.write(k, t)
        w.close()
    out = tmp_path / "out"
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]  # 2 x 1 KiB per 3000-byte shard
    assert index["metadata"]["total_size"] == 10 * 1024
    assert all(os.path.getsize(out / s) - 2048 < 1024 for s in shards)  # header + 2 tensors
    loaded = {}
    for s in shards:
        loaded.update(load_file(out / s))
    assert loaded.keys() == ts.keys() and all(torch.equal(loaded[k], ts[k]) for k in ts)
    assert read_safetensors_header(out / shards[0])[1] == {"format": "pt", "note": "x"}
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_atomic_dir_failure_leaves_nothing_and_force(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and not list(tmp_path.iterdir())
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(VlmMergeError, match="already exists"):
        AtomicDir(target)
    with AtomicDir(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rows_read_and_written_in_pieces_roundtrip(tmp_path):
    """read_into(rows=) reads a tensor's rows; write_rows writes a tensor in ordered pieces, refusing a gap, an
    overrun, another tensor in between and a close before the last row."""
    a, b = torch.arange(40.0).reshape(10, 4), torch.arange(3.0)
    save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    buf = torch.empty(64, dtype=torch.uint8)
    assert torch.equal(reader.read_into("a", buf, (3, 7)), a[3:7])
    assert reader.read_into("a", buf, (10, 10)).shape == (0, 4)
    with pytest.raises(ValueError, match="outside"):
        reader.read_into("a", buf, (8, 11))
    planned = [PlannedTensor("a", (10, 4), torch.float32), PlannedTensor("b", (3,), torch.float32)]
    with AtomicDir(tmp_path / "out") as tmp:
        w = CheckpointWriter(tmp, planned)
        w.write_rows("a", 0, a[:3])
        for bad in (lambda: w.write_rows("a", 4, a[4:6]), lambda: w.write_rows("a", 3, a[3:10].repeat(2, 1)),
                    lambda: w.write("b", b)):
            with pytest.raises(RuntimeError):
                bad()
        w.write_rows("a", 3, a[3:10])
        w.write_rows("b", 0, b[:1])
        w.write_rows("b", 1, b[1:])
        w.close()
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
    (tmp_path / "cut").mkdir()
    w = CheckpointWriter(tmp_path / "cut", planned)
    w.write_rows("a", 0, a[:9])
    with pytest.raises(RuntimeError, match="9 of 10 rows"):
        w.close()


def test_writer_rejects_out_of_order(tmp_path):
    w = CheckpointWriter(tmp_path, [PlannedTensor("a", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))
    w.abort()
