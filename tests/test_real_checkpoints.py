"""Merges of replicas of real public checkpoints (tests/real_layouts: their real config, key names, buffers,
dtypes and tokenizers; random weights, 2 layers): what broke on the real layouts (issue 28, part 3).

- Llama-2-7b-hf and liuhaotian/llava-v1.5-7b store `rotary_emb.inv_freq`, openai's CLIP stores `position_ids`;
  llava-hf/llava-1.5-7b-hf stores neither: buffers never block alignment and never land in an output.
- llava-1.5-7b-hf + Swallow-7b-hf (vocabulary 43176): config top level, text_config, weights, tokenizer agree.
- The output keeps the VLM's padding side (left), not the Japanese base's (right).
- EvoVLM-JP's pair (LLaVA-1.6-Mistral: rope_theta 1e6, no sliding window; shisa-gamma: 1e4, 4096) is reported
  and the output follows `text_config_from`.
- Original LLaVA: a clean vision_config, no buffers, `inspect` names the CLIP it needs.
- Outputs carry the files transformers 4.x needs; `bench/tf4_load.py` loads one with 4.46 when the side
  environment bench/.venv-tf4 exists.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from chat_vector import chat_vector
from eval.prompts import build_prompt, prompt_record
from tests.real_layouts.replica import build_replica, install_in_hf_cache
from vlm_merge import cli
from vlm_merge.io import convert
from vlm_merge.architecture.anatomy import BUFFERS, inspect_checkpoint, inspect_vlm, is_buffer
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.engine.streaming import Copy, MergePlan, OutputTensor
from vlm_merge.errors import VlmMergeError
from vlm_merge.engine.merge import validate

LLAVA15, LLAVA15_ORIG, CLIP = "llava-hf/llava-1.5-7b-hf", "liuhaotian/llava-v1.5-7b", "openai/clip-vit-large-patch14-336"
LLAMA2, ELYZA, SWALLOW = "meta-llama/Llama-2-7b-hf", "elyza/ELYZA-japanese-Llama-2-7b", "tokyotech-llm/Swallow-7b-hf"
LLAVA16_MISTRAL, MISTRAL_INSTRUCT, SHISA = "llava-hf/llava-v1.6-mistral-7b-hf", "mistralai/Mistral-7B-Instruct-v0.2", "augmxnt/shisa-gamma-7b-v1"
REPO = Path(__file__).resolve().parent.parent
TF4_PYTHON = REPO / "bench" / ".venv-tf4" / "bin" / "python"


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    """Replicas by repo id, and an HF cache holding the CLIP LLaVA-1.5 names."""
    root = tmp_path_factory.mktemp("real")
    ids = (LLAVA15, LLAVA15_ORIG, CLIP, LLAMA2, ELYZA, SWALLOW, LLAVA16_MISTRAL, MISTRAL_INSTRUCT, SHISA)
    paths = {i: build_replica(i, root / i.replace("/", "--"), layers=2) for i in ids}
    install_in_hf_cache(root / "hf-cache", CLIP, paths[CLIP])
    paths["cache"] = root / "hf-cache"
    return paths


@pytest.fixture(scope="module")
def outs(rep, tmp_path_factory):
    """The issue's merges: llava-1.5-hf with ELYZA and with Swallow, original LLaVA-1.5, the EvoVLM-JP pair."""
    root = tmp_path_factory.mktemp("real-out")
    runs = {
        "elyza": (LLAVA15, LLAMA2, ELYZA),
        "swallow": (LLAVA15, LLAMA2, SWALLOW),
        "original": (LLAVA15_ORIG, LLAMA2, ELYZA),
        "evo": (LLAVA16_MISTRAL, MISTRAL_INSTRUCT, SHISA),
    }
    return {name: chat_vector(rep[v], rep[e], rep[j], root / name, cache_dir=rep["cache"], progress=False)
            for name, (v, e, j) in runs.items()}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_buffer_table():
    for key in ("model.layers.0.self_attn.rotary_emb.inv_freq", "vision_model.embeddings.position_ids",
                "text_model.embeddings.position_ids", "model.layers.3.self_attn.rotary_emb.cos_cached"):
        assert is_buffer(key), key
    for key in ("model.layers.0.self_attn.q_proj.weight", "vision_model.embeddings.position_embedding.weight"):
        assert not is_buffer(key), key
    with pytest.raises(ValueError, match="inv_freq"):
        MergePlan([OutputTensor("model.layers.0.self_attn.rotary_emb.inv_freq", (64,), None, Copy("vlm", "x"))], {})


@pytest.mark.slow
def test_buffers_on_every_side_never_block_alignment_nor_reach_outputs(rep, outs):
    # the sides store them (the real files do) ...
    assert any("rotary_emb.inv_freq" in k for k in CheckpointReader(rep[LLAMA2]).keys())
    assert any("rotary_emb.inv_freq" in k for k in CheckpointReader(rep[LLAVA15_ORIG]).keys())
    clip = CheckpointReader(rep[CLIP])
    assert str(clip.info("vision_model.embeddings.position_ids").dtype) == "torch.int64"
    assert not any(is_buffer(k) for k in CheckpointReader(rep[LLAVA15]).keys())
    anatomy = inspect_vlm(CheckpointReader(rep[LLAVA15_ORIG]))
    assert len(anatomy.parts[BUFFERS]) == 2 and not any(is_buffer(c) for c in anatomy.lm_keys)
    # ... and every merge above ran (the base has inv_freq, llava-hf has not); no output holds a buffer
    for out in outs.values():
        keys = CheckpointReader(out).keys()
        assert keys and not [k for k in keys if is_buffer(k)], out


@pytest.mark.slow
def test_swallow_vocabulary_config_tokenizer_and_weights_agree(outs):
    out = outs["swallow"]
    config, tok = _config(out), AutoTokenizer.from_pretrained(str(out))
    rows = inspect_checkpoint(CheckpointReader(out)).vocab_rows
    assert rows == 43200  # 43176 Swallow tokens + <image> + <pad>, padded to a multiple of 64 as llava-hf's 32064
    assert config["vocab_size"] == config["text_config"]["vocab_size"] == rows
    assert config["pad_token_id"] == config["text_config"]["pad_token_id"] == tok.pad_token_id == 43177
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>") == 43176
    assert tok.convert_ids_to_tokens(32001) != "<pad>"  # llava-hf's pad id is a Japanese token here
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 43177
    assert AutoProcessor.from_pretrained(str(out)).image_token == "<image>"


@pytest.mark.slow
def test_output_keeps_the_vlms_padding_side(rep, outs):
    assert json.loads((rep[SWALLOW] / "tokenizer_config.json").read_text())["padding_side"] == "right"
    for name in ("swallow", "elyza", "original", "evo"):  # llava-v1.6-mistral-hf's config names none: left
        assert AutoTokenizer.from_pretrained(str(outs[name])).padding_side == "left", name
        assert json.loads((outs[name] / "tokenizer_config.json").read_text())["padding_side"] == "left"


@pytest.mark.slow
def test_evovlm_pair_config_conflicts_reported_and_the_rule_followed(rep, outs, tmp_path, caplog, capsys):
    text = _config(outs["evo"])["text_config"]
    assert text["rope_theta"] == 1e6 and text["sliding_window"] is None  # the VLM's (default rule)
    assert "_name_or_path" not in text and "_name_or_path" not in _config(outs["evo"])
    card = (outs["evo"] / "README.md").read_text()
    assert "text_config_from: vlm" in card and "rope_theta differs: 1000000.0 in" in card and "10000.0 in" in card
    with caplog.at_level(logging.WARNING, logger="vlm_merge.engine.backbone"):
        chat_vector(rep[LLAVA16_MISTRAL], rep[MISTRAL_INSTRUCT], rep[SHISA], tmp_path / "t", progress=False,
                    text_config_from="target")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text config ")]
    assert len(lines) == 2 and all("augmxnt--shisa-gamma-7b-v1 (the target)" in line for line in lines)
    assert any("sliding_window differs: None in llava-hf--llava-v1.6-mistral-7b-hf (the VLM)" in line and "4096 in" in line
               for line in lines)
    text = _config(tmp_path / "t")["text_config"]
    assert text["rope_theta"] == 1e4 and text["sliding_window"] == 4096
    assert "text_config_from: target" in (tmp_path / "t" / "merge_recipe.yaml").read_text()
    # inspect and validate report them too
    assert cli.main(["inspect", str(rep[LLAVA16_MISTRAL]), "--base", str(rep[SHISA])]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: text config")]
    assert len(said) == 2 and "1000000.0 in llava-hf--llava-v1.6-mistral-7b-hf" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_merge.engine.backbone"):
        rp, _ = validate(tmp_path / "t" / "merge_recipe.yaml", text_config_from="vlm")
    assert rp.backbone.text_config_from == "vlm" and rp.backbone.config["text_config"]["rope_theta"] == 1e6
    assert sum(r.getMessage().startswith("text config ") for r in caplog.records) == 2
    with pytest.raises(VlmMergeError, match="text_config_from"):
        validate({**rp.recipe.to_dict(), "text_config_from": "ja"})


def test_agreeing_sources_are_not_reported(rep, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_merge.engine.backbone"):
        rp, _ = validate({"merge_method": "task_arithmetic", "vlm": str(rep[LLAVA15]), "base_model": str(rep[LLAMA2]),
                          "target": str(rep[ELYZA]), "models": [{"model": "vlm", "parameters": {"weight": 1.0}}]})
    assert not [r for r in caplog.records if r.getMessage().startswith("text config ")]
    assert rp.backbone.notes == []


@pytest.mark.slow
def test_original_llava_clean_vision_config_and_inspect_names_its_clip(rep, outs, capsys):
    real = json.loads((rep[CLIP] / "config.json").read_text())["vision_config"]
    vision = _config(outs["original"])["vision_config"]
    assert set(vision) <= {*convert.CLIP_VISION_FIELDS, "model_type"} and vision["image_size"] == 336
    assert "dropout" in real and "dropout" not in vision  # a field CLIPVisionConfig no longer has
    # a CLIP config saved by transformers 4.x spells out every PretrainedConfig field in its vision_config
    legacy = {**real, "max_length": 20, "temperature": 1.0, "id2label": {"0": "LABEL_0"}, "_name_or_path": "x"}
    assert convert.vision_config_of_clip({"vision_config": legacy}) == {
        **{k: real[k] for k in convert.CLIP_VISION_FIELDS if k in real}, "model_type": "clip_vision_model"}
    keys = CheckpointReader(outs["original"]).keys()
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert AutoConfig.from_pretrained(str(outs["original"])).vision_config.image_size == 336
    assert cli.main(["inspect", str(rep[LLAVA15_ORIG])]) == 0
    out = capsys.readouterr().out
    assert f"mm_vision_tower '{CLIP}', NOT found" in out and "--vision-tower" in out and "buffers" in out
    assert cli.main(["inspect", str(rep[LLAVA15_ORIG]), "--cache-dir", str(rep["cache"]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["vision_tower_source"]
    assert found["needs"] == CLIP and str(rep["cache"]) in found["found"]
    assert cli.main(["inspect", str(rep[LLAVA15_ORIG]), "--vision-tower", str(rep[CLIP])]) == 0
    assert f"found via --vision-tower at {rep[CLIP]}" in capsys.readouterr().out


@pytest.mark.slow
def test_outputs_ship_the_files_transformers_4_reads(rep, outs):
    for name, out in outs.items():
        for f in ("preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer_config.json",
                  "chat_template.json", "chat_template.jinja"):
            assert (out / f).is_file(), (name, f)
        assert "image_processor" not in json.loads((out / "processor_config.json").read_text())  # 4.x: flat
        assert _config(out)["transformers_version"] == transformers.__version__
        tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert tok_cfg["tokenizer_class"] == "LlamaTokenizer" and tok_cfg["chat_template"]
        assert "<image>" in {t["content"] for t in tok_cfg["added_tokens_decoder"].values()}
        assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    # Swallow's tokenizer.model spells the output vocabulary (the added tokens are in tokenizer_config.json)
    out = outs["swallow"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert sp.get_piece_size() == 43176 and all(vocab[sp.id_to_piece(i)] == i for i in range(0, 43176, 997))


def test_chat_prompt_falls_back_to_the_tokenizers_template(rep):
    proc = AutoProcessor.from_pretrained(str(rep[LLAVA15]))
    own = build_prompt(proc, "何?", "chat")
    assert own.startswith("USER: <image>\n何?") and own.rstrip().endswith("ASSISTANT:")
    proc.tokenizer.chat_template, proc.chat_template = proc.chat_template, None
    assert build_prompt(proc, "何?", "chat") == own
    record = prompt_record(proc, "ja-shisa-vqa", "protocol sakana", "何?")
    assert record["example"].startswith("[INST] <<SYS>>") and record["model_template_text"].startswith("USER: <image>")


@pytest.mark.slow
def test_transformers_4_loads_an_output(outs):
    """Runs bench/tf4_load.py (transformers 4.46) on the EvoVLM-pair output when bench/.venv-tf4 exists."""
    if not TF4_PYTHON.exists():  # `make test` creates it (`make tf4`); CI must run this check, never skip it
        missing = f"no transformers 4.x side environment at {TF4_PYTHON.parent.parent}: run `make tf4`"
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(f"SKIPPED: {missing}")
    for name in ("evo", "original"):
        run = subprocess.run([str(TF4_PYTHON), str(REPO / "bench" / "tf4_load.py"), str(outs[name])],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (name, run.stderr[-2000:])
        facts = json.loads(run.stdout.strip().splitlines()[-1])
        assert facts["transformers"].startswith("4.") and facts["generated_tokens"] >= 1 and facts["padding_side"] == "left"
        assert facts["slow_tokenizer"] == "LlamaTokenizer"  # tokenizer.model shipped and agreeing


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
