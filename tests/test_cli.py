"""The command line: inspect, chat-vector, and every bad input as a one-line error with exit code 2
and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import error_line
from vlm_merge.cli import main
from vlm_merge.io import checkpoint_writer


class Evil:
    """Not an allowed global for torch.load(weights_only=True)."""

    def __reduce__(self):
        return (os.getcwd, ())


def _cv_args(zoo, out, vlm="llava-hf-llama", en=None, ja=None):
    fam = zoo.vlm_family.get(vlm, "llama")
    vlm_path = zoo.vlms[vlm] if vlm in zoo.vlms else vlm
    return [
        "chat-vector", "--vlm", str(vlm_path), "--en-base", str(en or zoo.llms[f"en-{fam}"]),
        "--ja-base", str(ja or zoo.llms[f"ja-{fam}"]), "--out", str(out), "--quiet", "--cache-dir", str(zoo.hf_cache),
    ]


def _nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_inspect_table_and_json(zoo, capsys):
    assert main(["inspect", str(zoo.vlms["llava-original-mistral"]), "--base", str(zoo.llms["en-mistral"])]) == 0
    text = capsys.readouterr().out
    assert "llava-original" in text and "vision_tower" in text and "projector" in text and "21 language-model tensors paired" in text
    assert main(["inspect", str(zoo.vlms["llava-hf-llama"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "llava-hf" and info["num_layers"] == 2 and info["parts"]["projector"]["tensors"] == 4


def test_chat_vector_cli_writes_model(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_cv_args(zoo, out) + ["--scale", "0.5", "--skip", "norms", "--max-shard-size", "20KB"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # sharded at 20 KB
    recipe = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and recipe["models"][0]["model"] == "vlm"
    weight = recipe["models"][0]["parameters"]["weight"]
    assert weight[-1] == {"value": 0.5} and any(e.get("value") == 0.0 for e in weight)  # norms skipped
    # the resolved recipe replays bit for bit
    assert main(["merge", str(out / "merge_recipe.yaml"), str(tmp_path / "replay"), "--quiet", "--max-shard-size", "20KB"]) == 0
    for f in out.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "replay" / f.name).read_bytes()
    # refuse to overwrite; --force replaces
    assert main(_cv_args(zoo, out)) == 2
    assert "already exists" in error_line(capsys)
    assert main(_cv_args(zoo, out) + ["--force"]) == 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _missing_shard(zoo, tmp):
    d = _copy(zoo.vlms["llava-hf-llama"], tmp / "vlm")
    (d / "model-00002-of-00002.safetensors").unlink()
    return {"vlm": d}, "names shard 'model-00002-of-00002.safetensors', which is missing"


def _truncated(zoo, tmp):
    d = _copy(zoo.vlms["llava-hf-llama"], tmp / "vlm")
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return {"vlm": d}, "model-00002-of-00002.safetensors: truncated"


def _corrupt_header(zoo, tmp):
    d = _copy(zoo.llms["ja-llama"], tmp / "ja")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    f.write_bytes(bytes(data))
    return {"ja": d}, "corrupt safetensors header"


def _unsafe_bin(zoo, tmp):
    d = _copy(zoo.vlms["llava-original-llama"], tmp / "vlm")
    f = d / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(f, weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, f)
    return {"vlm": d}, "needs unsafe unpickling"


def _mismatched_base(zoo, tmp):
    return {"en": zoo.llms["en-mistral"]}, "shape mismatch at 'model.layers.0.self_attn.k_proj.weight'"


def _llm_as_vlm(zoo, tmp):
    return {"vlm": zoo.llms["en-llama"]}, "is not a vision-language model"


def _bad_layer_scales(zoo, tmp):
    return {"extra": ["--layer-scales", "1,1,1"]}, "layer_scales has 3 values but the language model has 2 layers"


def _bad_skip(zoo, tmp):
    return {"extra": ["--skip", "norms,(unclosed"]}, "neither a preset"


BAD = [_missing_shard, _truncated, _corrupt_header, _unsafe_bin, _mismatched_base, _llm_as_vlm, _bad_layer_scales, _bad_skip]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(zoo, tmp_path, capsys, make):
    spec, expected = make(zoo, tmp_path)
    out = tmp_path / "out"
    vlm = spec.get("vlm", "llava-original-llama" if make is _unsafe_bin else "llava-hf-llama")
    args = _cv_args(zoo, out, vlm=str(vlm) if isinstance(vlm, Path) else vlm, en=spec.get("en"), ja=spec.get("ja"))
    if isinstance(vlm, Path):
        fam = "llama"
        args[args.index("--en-base") + 1] = str(spec.get("en") or zoo.llms[f"en-{fam}"])
    assert main(args + spec.get("extra", [])) == 2
    line = error_line(capsys)
    assert expected in line, line
    _nothing_left(out)


def test_disk_full_midway_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}

    def failing(real):  # whole tensors (write) and row pieces (write_rows) count alike
        def write(self, *args):
            calls["n"] += 1
            if calls["n"] == 30:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, *args)
        return write

    for method in ("write", "write_rows"):
        monkeypatch.setattr(checkpoint_writer.CheckpointWriter, method, failing(getattr(checkpoint_writer.CheckpointWriter, method)))
    out = tmp_path / "out"
    assert main(_cv_args(zoo, out)) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "free disk space" in line
    assert calls["n"] >= 30  # the failing write happened (one more may be in flight: double buffering)
    _nothing_left(out)


def test_console_script_exit_code_and_no_traceback(zoo, tmp_path):
    exe = Path(sys.executable).with_name("vlm-merge")
    out = tmp_path / "out"
    proc = subprocess.run([str(exe), *_cv_args(zoo, out, vlm="llava-hf-llama", en=zoo.llms["en-mistral"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("vlm-merge: error: shape mismatch") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    _nothing_left(out)
