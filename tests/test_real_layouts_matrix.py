"""Every combination a user would run on the real checkpoint layouts (tests/real_layouts replicas), through the
real `vlm-merge` command: inspect, chat-vector (the README's command lines, with Hub ids resolved in a local HF
cache), a TIES recipe and its replay, loading and generating with transformers' own classes in each model's chat
template, and `vlm-merge eval` on a tiny custom benchmark. Every output is checked by `check_output`.

Replicas are built once per module (2 layers, reduced widths, real vocabularies and tokenizers) and installed in a
temporary HF cache under their Hub ids; outputs are built once per combination and shared between its tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

import transformers
from eval.prompts import chat_messages
from tests.real_layouts.replica import CORPUS_DIR, build_replica, install_in_hf_cache
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.cli import main

LLAMA2, ELYZA, SWALLOW = "meta-llama/Llama-2-7b-hf", "elyza/ELYZA-japanese-Llama-2-7b", "tokyotech-llm/Swallow-7b-hf"
MISTRAL_INSTRUCT, SHISA = "mistralai/Mistral-7B-Instruct-v0.2", "augmxnt/shisa-gamma-7b-v1"
LLAMA3_INSTRUCT, LLAMA3_ELYZA = "meta-llama/Meta-Llama-3-8B-Instruct", "elyza/Llama-3-ELYZA-JP-8B"
CLIP_336 = "openai/clip-vit-large-patch14-336"  # original LLaVA-1.5's tower, named by its mm_vision_tower
EVOVLM = "SakanaAI/EvoVLM-JP-v1-7B"


@dataclass(frozen=True)
class Combo:
    """One merge a user would run: an English VLM, the English LLM its language model was tuned from, and a
    Japanese LLM continued-pretrained from that same LLM."""

    vlm: str
    en: str
    ja: str

    @property
    def id(self) -> str:
        return f"{self.vlm.split('/')[1]}+{self.ja.split('/')[1]}"


LINEAGES = json.loads((CORPUS_DIR / "lineages.json").read_text(encoding="utf-8"))
# EvoVLM-JP's language model is already Japanese (a merge with Shisa Gamma): an input to inspect and evaluate,
# not a VLM to build a Japanese VLM from.
INPUT_ONLY = {EVOVLM}
COMBOS = [
    Combo(vlm, entry["en_base"], ja)
    for vlm, entry in LINEAGES.items()
    if not vlm.startswith("_") and vlm not in INPUT_ONLY
    for ja in entry["ja_bases"]
]
HEADLINE = Combo("llava-hf/llava-1.5-7b-hf", LLAMA2, ELYZA)  # the README's chat-vector command
# the README's "Use" section, word for word
README_INSPECT = ["inspect", "liuhaotian/llava-v1.5-7b", "--base", LLAMA2]
README_CHAT_VECTOR = [
    "chat-vector", "--vlm", "llava-hf/llava-1.5-7b-hf", "--en-base", LLAMA2, "--ja-base", ELYZA,
    "--out", "./llava-ja", "--scale", "1.0",
]
COMBO_SCALE = 0.8  # the other combinations' scale (not 1.0, so a scale that is not applied shows)
LARGE_VOCAB = {"TIGER-Lab/Mantis-8B-siglip-llama3"}  # 128k-row vocabularies: the slow ones
BUFFER_SUFFIXES = ("inv_freq", "position_ids")
ORIGINAL_PROJECTOR = {"model.mm_projector.0.": "multi_modal_projector.linear_1.",
                      "model.mm_projector.2.": "multi_modal_projector.linear_2."}
FILES_TRANSFORMERS_4_NEEDS = ("config.json", "preprocessor_config.json", "special_tokens_map.json",
                              "tokenizer_config.json")
SHARED_TOKENS = ("▁the", "the", "▁image", "画", "。")  # rows checked by token string (those each vocabulary has)
QUESTIONS = [("この画像には何がありますか？", "猫"), ("画像の色は何ですか？", "赤")]


def _slow_if(condition: bool, combo) -> object:
    return pytest.param(combo, id=combo.id, marks=[pytest.mark.slow] if condition else [])


def combo_params(slow: set[str] = frozenset()) -> list:
    """COMBOS as pytest params; those whose VLM is in ``slow`` marked slow."""
    return [_slow_if(c.vlm in slow, c) for c in COMBOS]


# ---------------------------------------------------------------- the corpus, once per module
@dataclass
class Corpus:
    """The replicas (repo id -> directory), the HF cache holding them, and a work directory for outputs."""

    replicas: dict[str, Path]
    cache: Path
    work: Path
    outputs: dict[tuple, Path]

    def out(self, kind: str, combo: Combo) -> Path:
        return self.work / kind / combo.id


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every replica the matrix uses, built once and installed in a fresh HF cache; HF_HUB_CACHE points at it
    (offline) for the module - in the environment for subprocesses, and in huggingface_hub's constants, which it
    read at import, for in-process calls - and the working directory is a scratch directory (the README writes
    ./llava-ja)."""
    root = tmp_path_factory.mktemp("real-matrix")
    ids = sorted({r for c in COMBOS for r in (c.vlm, c.en, c.ja)} | {CLIP_336, EVOVLM})
    replicas, cache = {}, root / "hub"
    for repo_id in ids:
        replicas[repo_id] = build_replica(repo_id, root / "replicas" / repo_id.replace("/", "--"))
        install_in_hf_cache(cache, repo_id, replicas[repo_id])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        (root / "cwd").mkdir()
        mp.chdir(root / "cwd")
        yield Corpus(replicas, cache, root / "work", {})


def vlm_merge_command(argv: list[str]) -> subprocess.CompletedProcess:
    """``vlm-merge ARGV`` as a user types it (a subprocess of this environment's script, the module's environment)."""
    exe = Path(sys.executable).with_name("vlm-merge")
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, env=os.environ.copy(), timeout=600)


def chat_vector_out(corpus: Corpus, combo: Combo) -> Path:
    """The combination's chat-vector output, made once by the CLI with Hub ids (for the headline combination the
    README's command line itself, run by the ``vlm-merge`` script in the scratch working directory)."""
    key = ("chat-vector", combo)
    if key not in corpus.outputs:
        if combo == HEADLINE:
            proc = vlm_merge_command(README_CHAT_VECTOR)
            assert proc.returncode == 0, proc.stderr
            assert "wrote" in proc.stdout and "llava-ja" in proc.stdout
            corpus.outputs[key] = Path.cwd() / "llava-ja"
        else:
            out = corpus.out("chat-vector", combo)
            argv = ["chat-vector", "--vlm", combo.vlm, "--en-base", combo.en, "--ja-base", combo.ja, "--out", str(out),
                    "--scale", str(COMBO_SCALE), "--quiet"]
            assert main(argv) == 0
            corpus.outputs[key] = out
    return corpus.outputs[key]


def scale_of(combo: Combo) -> float:
    return 1.0 if combo == HEADLINE else COMBO_SCALE


def ties_recipe(combo: Combo) -> dict:
    """The README's TIES recipe for the combination (Hub ids as sources)."""
    return {
        "merge_method": "ties",
        "vlm": combo.vlm,
        "base_model": combo.en,
        "target": combo.ja,
        "models": [
            {"model": "vlm", "parameters": {"weight": 1.0, "density": [0.7, 0.3]}},
            {"model": combo.ja, "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}],
                                               "density": 0.5}},
        ],
        "dtype": "bfloat16",
    }


def ties_out(corpus: Corpus, combo: Combo) -> Path:
    key = ("ties", combo)
    if key not in corpus.outputs:
        recipe = corpus.work / "recipes" / f"{combo.id}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(ties_recipe(combo), sort_keys=False, allow_unicode=True), encoding="utf-8")
        out = corpus.out("ties", combo)
        assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
        corpus.outputs[key] = out
    return corpus.outputs[key]


# ---------------------------------------------------------------- the consistency check
def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _keys_named(data: object, name: str, where: str = "") -> list[str]:
    """Paths of every ``name`` key in nested JSON data."""
    if isinstance(data, dict):
        found = [f"{where}.{name}"] if name in data else []
        return found + [p for k, v in data.items() for p in _keys_named(v, name, f"{where}.{k}")]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _keys_named(v, name, f"{where}[{i}]")]
    return []


def lm_key(keys: list[str], suffix: str) -> str:
    """The one language-model key ending in ``suffix`` (vision tower keys excluded)."""
    found = [k for k in keys if k.endswith(suffix) and "vision" not in k and "mm_projector" not in k]
    assert len(found) == 1, f"{suffix}: {found}"
    return found[0]


def vision_sources(vlm: CheckpointReader, clip: CheckpointReader | None) -> dict[str, tuple[CheckpointReader, str]]:
    """Output key -> (reader, key) of every vision tower / projector / image_newline tensor the output must copy."""
    if clip is None:  # a transformers-layout VLM keeps its key names
        return {k: (vlm, k) for k in vlm.keys()
                if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline"))
                and not k.endswith(BUFFER_SUFFIXES)}
    out = {new + k[len(old):]: (vlm, k) for k in vlm.keys() for old, new in ORIGINAL_PROJECTOR.items()
           if k.startswith(old)}
    return out | {f"vision_tower.{k}": (clip, k) for k in clip.keys()
                  if k.startswith("vision_model.") and not k.endswith(BUFFER_SUFFIXES)}


def check_output(out: Path, vlm: Path, en: Path, ja: Path, *, scale: float | None, clip: Path | None = None) -> None:
    """Everything a merged VLM directory must satisfy (see the module docstring); with ``scale`` its language model
    must be Chat Vector ``ja + scale * (vlm - en)`` (rows matched by token string)."""
    names = {p.name for p in out.iterdir()}
    missing = [f for f in FILES_TRANSFORMERS_4_NEEDS if f not in names]
    assert not missing, f"{out.name}: files transformers 4.x needs are missing: {missing}"
    assert {"tokenizer.json", "tokenizer.model"} & names, "no tokenizer file"
    config = _json(out / "config.json")
    text = config["text_config"]
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert _keys_named(_json(out / name), "_name_or_path") == [], f"{name} keeps _name_or_path"

    tokenizer = AutoTokenizer.from_pretrained(out)
    reader = CheckpointReader(out)
    keys = reader.keys()
    assert [k for k in keys if k.endswith(BUFFER_SUFFIXES)] == [], "buffers written as weights"
    embed, head = reader.info(lm_key(keys, "embed_tokens.weight")), None
    rows = embed.shape[0]
    if not config.get("tie_word_embeddings") and not text.get("tie_word_embeddings"):
        head = reader.info(lm_key(keys, "lm_head.weight"))
        assert head.shape[0] == rows
    assert rows >= len(tokenizer), f"{rows} embedding rows < {len(tokenizer)} tokens"
    assert text["vocab_size"] == rows
    if "vocab_size" in config:
        assert config["vocab_size"] == rows, "stale top-level vocab_size"
    image_id = config.get("image_token_index", config.get("image_token_id"))
    assert image_id == tokenizer.convert_tokens_to_ids("<image>") and image_id < rows
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id < rows
    for where, part in (("top level", config), ("text_config", text)):
        assert part.get("pad_token_id") == tokenizer.pad_token_id, f"{where} pad_token_id"
    if _json(vlm / "tokenizer_config.json").get("padding_side") == "left":
        assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template or {"chat_template.jinja", "chat_template.json"} & names, "no chat template"

    vlm_reader = CheckpointReader(vlm)
    clip_reader = CheckpointReader(clip) if clip else None
    copied = vision_sources(vlm_reader, clip_reader)
    vision_out = {k for k in keys if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline"))}
    assert vision_out == set(copied)
    for key, (source, source_key) in copied.items():
        if source is clip_reader:  # a separate CLIP checkpoint (float32) is stored in the projector's dtype
            got, want = reader.get(key), source.get(source_key)
            assert torch.equal(got, want.to(got.dtype)), f"{key} is not the CLIP tower's value"
        else:
            assert reader.read_bytes(key) == source.read_bytes(source_key), f"{key} is not the VLM's bytes"

    if scale is None:
        return
    en_reader, ja_reader = CheckpointReader(en), CheckpointReader(ja)
    layers = text["num_hidden_layers"]
    for suffix in (f"layers.{layers - 1}.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
                   "layers.0.input_layernorm.weight", "model.norm.weight"):
        got = reader.get(lm_key(keys, suffix))
        ref = ja_reader.get(lm_key(ja_reader.keys(), suffix)).float() + scale * (
            vlm_reader.get(lm_key(vlm_reader.keys(), suffix)).float()
            - en_reader.get(lm_key(en_reader.keys(), suffix)).float())
        torch.testing.assert_close(got, ref.to(got.dtype), msg=lambda m, s=suffix: f"{s}: {m}")
    # embedding / lm_head rows by token string: a token all three vocabularies share
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in (("vlm", vlm), ("en", en), ("ja", ja))}
    readers = {"vlm": vlm_reader, "en": en_reader, "ja": ja_reader}
    vocabs = {role: tok.get_vocab() for role, tok in tokenizers.items()}
    out_vocab = tokenizer.get_vocab()
    shared = [t for t in SHARED_TOKENS if t in out_vocab and all(t in v for v in vocabs.values())]
    assert shared, "no shared token to check rows on"
    for suffix in ("embed_tokens.weight", *(["lm_head.weight"] if head else [])):
        matrices = {role: r.get(lm_key(r.keys(), suffix)) for role, r in readers.items()}
        got = reader.get(lm_key(keys, suffix))
        for token in shared:
            row = {role: matrices[role][vocabs[role][token]].float() for role in readers}
            ref = row["ja"] + scale * (row["vlm"] - row["en"])
            torch.testing.assert_close(got[out_vocab[token]], ref.to(got.dtype), msg=lambda m, t=token: f"{t}: {m}")


def check_combo_output(corpus: Corpus, out: Path, combo: Combo, *, scale: float | None) -> None:
    clip = corpus.replicas[CLIP_336] if combo.vlm.startswith("liuhaotian/") else None
    r = corpus.replicas
    check_output(out, r[combo.vlm], r[combo.en], r[combo.ja], scale=scale, clip=clip)


# ---------------------------------------------------------------- the tests
def test_readme_inspect_command(corpus):
    proc = vlm_merge_command(README_INSPECT)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "llava-original" in text and "shapes match" in text
    assert "openai/clip-vit-large-patch14-336" in text  # the tower it names, found in the cache


@pytest.mark.parametrize("combo", combo_params(), ids=lambda c: c.id)
def test_inspect(corpus, combo, capsys):
    assert main(["inspect", combo.vlm, "--base", combo.en]) == 0
    text = capsys.readouterr().out
    assert "language_model" in text and "shapes match" in text
    assert main(["inspect", combo.vlm, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 2 and "projector" in info["parts"]


@pytest.mark.parametrize("combo", combo_params(LARGE_VOCAB), ids=lambda c: c.id)
def test_chat_vector(corpus, combo, capsys):
    out = chat_vector_out(corpus, combo)
    check_combo_output(corpus, out, combo, scale=scale_of(combo))
    recipe = yaml.safe_load((out / "merge_recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["merge_method"] == "task_arithmetic" and recipe["models"][0]["parameters"]["weight"] == scale_of(combo)


def test_evovlm_pair_reports_config_disagreement(corpus, caplog):
    """LLaVA-1.6-Mistral (Mistral-7B-Instruct-v0.2: rope_theta 1e6, no sliding window) with Shisa Gamma (Mistral
    v0.1: rope_theta 1e4, sliding window 4096): the disagreement is reported and --text-config-from chooses."""
    combo = next(c for c in COMBOS if c.ja == SHISA)
    out = corpus.out("chat-vector-target-config", combo)
    argv = ["chat-vector", "--vlm", combo.vlm, "--en-base", combo.en, "--ja-base", combo.ja, "--out", str(out),
            "--quiet", "--text-config-from", "target"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    reported = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for field in ("rope_theta", "sliding_window"):
        assert any(f"text config {field} differs" in line and "the output takes the target's" in line
                   for line in reported), reported
    text = _json(out / "config.json")["text_config"]
    theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))
    assert theta == 10000.0 and text.get("sliding_window") == 4096
    vlm_text = _json(chat_vector_out(corpus, combo) / "config.json")["text_config"]
    assert vlm_text.get("rope_theta", (vlm_text.get("rope_parameters") or {}).get("rope_theta")) == 1000000.0
    assert vlm_text.get("sliding_window") is None


@pytest.mark.slow
@pytest.mark.parametrize("combo", combo_params(), ids=lambda c: c.id)
def test_ties_recipe_and_replay(corpus, combo):
    out = ties_out(corpus, combo)
    check_combo_output(corpus, out, combo, scale=None)
    recipe = yaml.safe_load((out / "merge_recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["merge_method"] == "ties"
    again = corpus.out("ties-replay", combo)
    assert main(["merge", str(out / "merge_recipe.yaml"), str(again), "--quiet"]) == 0
    first, second = CheckpointReader(out), CheckpointReader(again)
    assert first.keys() == second.keys()
    assert [k for k in first.keys() if first.read_bytes(k) != second.read_bytes(k)] == []
    assert _json(out / "config.json") == _json(again / "config.json")
    ja = CheckpointReader(corpus.replicas[combo.ja])
    key = lm_key(first.keys(), "layers.0.self_attn.q_proj.weight")
    assert not torch.equal(first.get(key).float(), ja.get(lm_key(ja.keys(), "layers.0.self_attn.q_proj.weight")).float())


def _image() -> Image.Image:
    return Image.new("RGB", (64, 48), (200, 30, 30))


def generate_with_chat_template(model_dir: Path) -> tuple[str, torch.Tensor]:
    """Load with transformers' own classes, prompt in the model's chat template with an image, generate 3 tokens."""
    config = _json(model_dir / "config.json")
    model_class = getattr(transformers, config["architectures"][0])
    assert model_class in (transformers.LlavaForConditionalGeneration, transformers.LlavaNextForConditionalGeneration)
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor.chat_template, "the processor has no chat template"
    messages = chat_messages(processor.chat_template, QUESTIONS[0][0], processor.image_token)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert processor.image_token in prompt and QUESTIONS[0][0] in prompt
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in generated[0, -3:]
    return prompt, generated


@pytest.mark.slow
@pytest.mark.parametrize("combo", combo_params(), ids=lambda c: c.id)
def test_transformers_loads_and_generates(corpus, combo):
    generate_with_chat_template(chat_vector_out(corpus, combo))


def write_custom_bench(root: Path) -> Path:
    """A two-question custom JSONL benchmark with one image."""
    root.mkdir(parents=True, exist_ok=True)
    _image().save(root / "red.png")
    rows = [{"image": "red.png", "question": q, "answer": a, "question_id": f"q{i}"} for i, (q, a) in
            enumerate(QUESTIONS)]
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_eval(corpus: Corpus, model: str | Path, name: str) -> list[dict]:
    bench = write_custom_bench(corpus.work / "bench")
    out = corpus.work / "eval" / name
    argv = ["eval", "--model", str(model), "--bench", str(bench), "--protocol", "llm-jp", "--max-new-tokens", "3",
            "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == len(QUESTIONS)
    scores = _json(out / "scores.json")
    assert scores["benchmark"]["questions_evaluated"] == len(QUESTIONS)
    return predictions


@pytest.mark.slow
@pytest.mark.parametrize("combo", combo_params(), ids=lambda c: c.id)
def test_eval_custom_benchmark(corpus, combo):
    run_eval(corpus, chat_vector_out(corpus, combo), combo.id)


@pytest.mark.slow
def test_evovlm_jp_as_input(corpus, capsys):
    """EvoVLM-JP-v1-7B (a LLaVA-1.6-Mistral whose language model is merged with Shisa Gamma) inspected against
    Mistral-7B-Instruct-v0.2 and evaluated by Hub id in its tokenizer's (Mistral's, text-only) chat template; its
    processor files predate transformers 4.47 (no patch_size), so eval builds the LlavaProcessor."""
    assert main(["inspect", EVOVLM, "--base", MISTRAL_INSTRUCT]) == 0
    assert "shapes match" in capsys.readouterr().out
    run_eval(corpus, EVOVLM, "evovlm")
    prompt = _json(corpus.work / "eval" / "evovlm" / "scores.json")["prompt"]["example"]
    assert prompt.startswith("<s>[INST] <image>\n") and prompt.endswith("[/INST]")


@pytest.mark.slow
def test_readme_chat_vector_at_real_width(tmp_path, monkeypatch):
    """The README's chat-vector command on real-width replicas (1 layer, hidden 4096, 32000-row vocabularies)."""
    cache = tmp_path / "hub"
    replicas = {}
    start = time.perf_counter()
    for repo_id in (HEADLINE.vlm, HEADLINE.en, HEADLINE.ja):
        replicas[repo_id] = build_replica(repo_id, tmp_path / repo_id.replace("/", "--"), layers=1, width_divisor=1)
        install_in_hf_cache(cache, repo_id, replicas[repo_id])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert main([*README_CHAT_VECTOR, "--quiet"]) == 0
    out = tmp_path / "llava-ja"
    check_output(out, replicas[HEADLINE.vlm], replicas[HEADLINE.en], replicas[HEADLINE.ja], scale=1.0)
    reader = CheckpointReader(out)
    assert reader.info(lm_key(reader.keys(), "embed_tokens.weight")).shape == (32064, 4096)
    print(f"real-width README chat-vector: {time.perf_counter() - start:.1f} s")
