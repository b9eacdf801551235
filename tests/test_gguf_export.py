"""export-gguf, the format side: what the GGUF files hold, read back with gguf-py (no llama.cpp needed), on the
miniature zoo's LLaVA-1.5 model and the LLaVA-1.5 / LLaVA-NeXT fixtures; bad inputs as one line."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from vlm_merge.cli import main
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.io.gguf import LLAMA_CPP_VERSION, VERSION_KEY, _permute, export_gguf, read_gguf_metadata
from vlm_merge.world import shipped_zoo

EN_VLM = shipped_zoo() / "en-vlm"


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_miniature_vlm_round_trip(tmp_path):
    files = export_gguf(EN_VLM, tmp_path)
    meta = read_gguf_metadata(files.model)
    assert meta["general.architecture"] == "llama" and meta[VERSION_KEY] == LLAMA_CPP_VERSION
    assert meta["llama.block_count"] == 4 and meta["llama.embedding_length"] == 128
    assert meta["llama.rope.dimension_count"] == 32 and meta["llama.vocab_size"] == 341
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.padding_token_id"] == 340
    assert "ASSISTANT:" in meta["tokenizer.chat_template"]
    tokens = gguf.GGUFReader(files.model).fields["tokenizer.ggml.tokens"].contents()
    assert tokens[339] == "<image>" and len(tokens) == 341

    out = _tensors(files.model)
    with CheckpointReader(EN_VLM) as r:
        q = r.get("language_model.model.layers.2.self_attn.q_proj.weight")
        emb = r.get("language_model.model.embed_tokens.weight")
        norm = r.get("language_model.model.norm.weight")
    # q rows in GGML's rotary order (convert_hf_to_gguf's permute), F16; norms stay F32
    np.testing.assert_allclose(out["blk.2.attn_q.weight"], _permute(q, 4).numpy().astype(np.float16))
    assert not np.allclose(out["blk.2.attn_q.weight"], q.numpy().astype(np.float16))
    np.testing.assert_array_equal(out["token_embd.weight"], emb.numpy().astype(np.float16))
    assert out["output_norm.weight"].dtype == np.float32
    np.testing.assert_array_equal(out["output_norm.weight"], norm.numpy())
    assert len(out) == 4 * 9 + 3

    mm = read_gguf_metadata(files.mmproj)
    assert mm["general.architecture"] == "clip" and mm["clip.projector_type"] == "mlp"
    assert mm["clip.vision.feature_layer"] == [2] and mm["clip.vision.block_count"] == 2  # vision_feature_layer -1
    assert mm["clip.use_gelu"] is False  # quick_gelu
    types = mm["tensor_types"]
    assert types["v.patch_embd.weight"] == "F16" and types["mm.0.weight"] == "F16" and types["mm.2.bias"] == "F32"
    assert not any("post_ln" in n for n in types)


def test_permute_is_convert_hf_to_gguf(tmp_path):
    """LlamaModel.permute, written out: each head's first and second halves interleaved row by row."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    got = _permute(w, 2)  # 2 heads of 4 rows: [0,1 | 2,3] -> 0,2,1,3
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_fixture_layouts(zoo, tmp_path):
    """LLaVA-1.5 in both transformers layouts gives the same files; LLaVA-NeXT (Mistral) adds its grid and newline."""
    for d in "abn":
        (tmp_path / d).mkdir()
    a = export_gguf(zoo.vlms["llava-hf-llama"], tmp_path / "a")
    b = export_gguf(zoo.vlms["llava-v5-llama"], tmp_path / "b")
    ta, tb = _tensors(a.model), _tensors(b.model)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert _tensors(a.mmproj).keys() == _tensors(b.mmproj).keys()
    n = export_gguf(zoo.vlms["llava-next-hf-mistral"], tmp_path / "n")
    assert n.family == "llava-next"
    meta = read_gguf_metadata(n.mmproj)
    config = json.loads((zoo.vlms["llava-next-hf-mistral"] / "config.json").read_text())
    assert meta["clip.vision.image_grid_pinpoints"] == [p for pair in config["image_grid_pinpoints"] for p in pair]
    assert meta["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert "v.image_newline" in meta["tensor_types"]
    layer = config["vision_feature_layer"]
    depth = config["vision_config"]["num_hidden_layers"] + layer + 1 if layer < 0 else layer
    assert meta["clip.vision.feature_layer"] == [depth] and meta["clip.vision.block_count"] == depth
    blocks = {int(k.split(".")[2]) for k in meta["tensor_types"] if k.startswith("v.blk.")}
    assert blocks == set(range(depth))  # layers past the feature layer are not written


def test_cli_writes_atomically_and_records_version(tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export-gguf", str(EN_VLM), "--out", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["llama_cpp_format"] == LLAMA_CPP_VERSION
    assert record["models"]["f16"]["tensor_types"] == {"F16": 30, "F32": 9}
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "mmproj-f16.gguf", "model-f16.gguf", "processor"]
    assert (out / "processor" / "tokenizer.json").read_bytes() == (EN_VLM / "tokenizer.json").read_bytes()
    assert main(["export-gguf", str(EN_VLM), "--out", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(architectures=["Qwen2VLForConditionalGeneration"]), "architectures"),
    (lambda c: c["text_config"].update(model_type="gemma"), "model_type 'gemma'"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c.update(vision_feature_layer=7), "vision_feature_layer 7"),
])
def test_bad_config_is_one_line(tmp_path, capsys, edit, message):
    model = tmp_path / "model"
    shutil.copytree(EN_VLM, model)
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert main(["export-gguf", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_bad_quant_name(tmp_path, capsys):
    assert main(["export-gguf", str(EN_VLM), "--out", str(tmp_path / "o"), "--quant", "q4_k_m,q9"]) == 2
    assert "'q9' is not a llama.cpp quantisation type" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_llava_next_mistral_layout(tmp_path):
    """A replica of llava-hf/llava-v1.6-mistral-7b-hf (real config, tokenizer and vocabulary; 2 layers): the config's
    left-out defaults come from transformers, the vocabulary is padded to the embedding's 32064 rows, the added
    image / pad tokens are control tokens, the byte-fallback pieces byte tokens, the scores SentencePiece's."""
    from tests.real_layouts.replica import build_replica

    model = build_replica("llava-hf/llava-v1.6-mistral-7b-hf", tmp_path / "replica", layers=2)
    (tmp_path / "out").mkdir()
    files = export_gguf(model, tmp_path / "out")
    meta = read_gguf_metadata(files.model)
    assert files.family == "llava-next"
    assert meta["llama.attention.head_count_kv"] == 8 and meta["llama.vocab_size"] == 32064
    tokens = gguf.GGUFReader(files.model).fields["tokenizer.ggml.tokens"].contents()
    types = meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 32064 and tokens[32000] == "<image>" and types[32000] == gguf.TokenType.CONTROL
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and types[32063] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.scores"][300] < meta["tokenizer.ggml.scores"][299]
    assert "[INST]" in meta["tokenizer.chat_template"]
    mm = read_gguf_metadata(files.mmproj)
    assert len(mm["clip.vision.image_grid_pinpoints"]) == 10 and "v.image_newline" in mm["tensor_types"]
