"""GGUF export of a LLaVA checkpoint for llama.cpp: the language model and the vision tower + projector (mmproj).

The format follows the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml-org/llama.cpp@0c1e57098, gguf-py 0.19.0):
- the language model as `convert_hf_to_gguf.py`'s `LlamaModel` writes it (Mistral LMs are written as `llama` too,
  as that converter does): `general.architecture = llama`, the `llama.*` hyperparameters, tensor names from
  gguf-py's `TensorNameMap`, q/k rows permuted to GGML's rotary layout (`LlamaModel.permute`), 1-D tensors in F32
  and the rest in F16 or BF16; the tokenizer as a SentencePiece-style (`tokenizer.ggml.model = llama`) vocabulary
  with token types, special token ids and the chat template (`tokenizer.chat_template`);
- the mmproj as `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` writes LLaVA-1.5 / LLaVA-NeXT encoders,
  with the current tensor names `clip.cpp` reads (`clip-impl.h`: `v.blk.N.*`, `v.pre_ln`, `mm.0` / `mm.2`,
  `v.image_newline`): `clip.projector_type = mlp`, the encoder truncated at the deepest feature layer (which
  `clip.vision.feature_layer` names as a non-negative index), no post-layernorm (LLaVA takes hidden states before
  it), patch embedding in F16 (ggml's convolution kernel), LLaVA-NeXT's grid pinpoints and `spatial_unpad`.

The layouts: llava-hf (transformers 4.x: `language_model.model.*`, `vision_tower.vision_model.*`) and the
transformers >= 4.52 layout (`model.language_model.*`, `model.vision_tower.*`), with or without the CLIP
`vision_model.` level. Writing is atomic per file set: callers write into an `AtomicDir`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.checkpoint import CheckpointReader

LLAMA_CPP_VERSION = "ggml-org/llama.cpp@0c1e57098 (llama-cpp-python 0.3.36, gguf-py 0.19.0)"
VERSION_KEY = "vlm_merge.llama_cpp_format"  # the llama.cpp version whose format the file follows

# (regex on a checkpoint key, replacement): the key as the LM converter / the mmproj name map expect it.
LM_PREFIXES: tuple[tuple[str, str], ...] = (
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.language_model\.", "model."),
    (r"^lm_head\.", "lm_head."),
)
VISION_PREFIXES: tuple[tuple[str, str], ...] = (
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
)
# LLaVA's projector (Linear, GELU, Linear) under the names clip.cpp's `mlp` projector reads (TN_LLAVA_PROJ)
PROJECTOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"^(model\.)?multi_modal_projector\.linear_1\.", "mm.0."),
    (r"^(model\.)?multi_modal_projector\.linear_2\.", "mm.2."),
    (r"^(model\.)?image_newline$", "v.image_newline"),
)
# vision keys llama.cpp's llava graph has no use for (the legacy converter skips them too)
VISION_SKIPPED = re.compile(r"(post_layernorm\.|position_ids$)")
ARCHITECTURES = {"LlavaForConditionalGeneration": "llava-1.5", "LlavaNextForConditionalGeneration": "llava-next"}
TEXT_MODEL_TYPES = ("llama", "mistral")
FLOAT_TYPES = {"f16": np.float16, "bf16": None, "f32": np.float32}  # bf16 goes through gguf.quants


@dataclass(frozen=True)
class ExportedFiles:
    """What `export_gguf` wrote: the language model, the mmproj, and what each holds."""

    model: Path
    mmproj: Path
    family: str
    n_tensors: int
    n_vision_tensors: int


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _field(cfg: Mapping, key: str, where: str, kind: type | tuple[type, ...] = (int, float)) -> object:
    value = cfg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise VlmMergeError(f"{where}: '{key}' is {value!r}; a LLaVA config needs it to export GGUF")
    return value


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's `LlamaModel.permute`: HF's rotate-half q/k rows -> GGML's interleaved rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, ftype: str, force_f16: bool = False):
    """A tensor as the numpy array and GGML type the file stores: 1-D in F32, the rest in `ftype`."""
    import gguf

    t = t.detach().to(torch.float32)
    if t.ndim <= 1 and not force_f16:
        return t.numpy(), gguf.GGMLQuantizationType.F32
    if force_f16 or ftype == "f16":
        return t.numpy().astype(np.float16), gguf.GGMLQuantizationType.F16
    if ftype == "bf16":
        return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return t.numpy(), gguf.GGMLQuantizationType.F32


def _add(writer, name: str, t: torch.Tensor, ftype: str, force_f16: bool = False) -> None:
    data, qtype = _array(t, ftype, force_f16)
    writer.add_tensor(name, data, raw_dtype=qtype if qtype.name == "BF16" else None)


def read_text(path: Path, limit: int = 16 << 20) -> str:
    if not path.is_file() or path.stat().st_size > limit:
        raise VlmMergeError(f"{path}: not a regular file under {limit >> 20} MiB; GGUF export reads it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VlmMergeError(f"{path}: not UTF-8 ({e.reason}); GGUF export reads it") from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise VlmMergeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise VlmMergeError(f"{path}: a JSON object was expected, found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as llama.cpp's SentencePiece-style (`llama`) vocabulary: token strings by id, scores (a BPE
    merge's rank as a descending score, so llama.cpp's highest-score-first bigram merging follows the merge order),
    token types, and the special tokens."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _sentencepiece_scores(path: Path) -> list[float]:
    """The piece scores of a SentencePiece model (what convert_hf_to_gguf writes for Llama / Mistral tokenizers that
    ship tokenizer.model); empty without one."""
    if not path.is_file():
        return []
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as e:
        raise VlmMergeError(f"{path}: not a SentencePiece model ({e})") from None
    return [float(sp.GetScore(i)) for i in range(sp.GetPieceSize())]


def read_vocabulary(model_dir: Path, n_rows: int) -> Vocabulary:
    """The vocabulary of `model_dir`'s tokenizer.json, padded to the embedding's `n_rows` with `[PAD{i}]` tokens
    (convert_hf_to_gguf's padding of a vocabulary smaller than the embedding)."""
    import gguf

    tj = _json(model_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise VlmMergeError(f"{model_dir / 'tokenizer.json'}: model type {model.get('type')!r}; GGUF export "
                            "supports the BPE (SentencePiece-style, Llama / Mistral) tokenizers of LLaVA models")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1
    if n > n_rows:
        raise VlmMergeError(f"{model_dir}: the tokenizer has {n} tokens but the embedding only {n_rows} rows")
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges") or []):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault("".join(pair), r)
    sp_scores = _sentencepiece_scores(model_dir / "tokenizer.model")
    tokens, scores, types = [], [], []
    for i in range(n_rows):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tok)
        scores.append(sp_scores[i] if i < len(sp_scores) else -float(rank[tok] + 1) if tok in rank else 0.0)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    cfg = _json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    ids = {t: i for i, t in by_id.items()}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        tok = cfg.get(f"{role}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tok in ids:
            special[role] = ids[tok]
    template = None
    if (model_dir / "chat_template.jinja").exists():
        template = read_text(model_dir / "chat_template.jinja")
    elif (model_dir / "chat_template.json").exists():
        template = _json(model_dir / "chat_template.json").get("chat_template")
    elif isinstance(cfg.get("chat_template"), str):
        template = cfg["chat_template"]
    return Vocabulary(tokens, scores, [int(t) for t in types], special, bool(cfg.get("add_bos_token", True)),
                      bool(cfg.get("add_eos_token", False)), template)


@dataclass(frozen=True)
class LlavaSpec:
    """The facts the export needs from a LLaVA config, checked."""

    family: str  # llava-1.5 | llava-next
    text: dict
    vision: dict
    feature_layers: list[int]  # non-negative: hidden_states index (0 = embeddings)
    pinpoints: list[int]


def with_defaults(config: Mapping, where: str) -> dict:
    """`config` with transformers' defaults filled in (real configs leave out what equals the default: llava-1.5's
    text_config names neither its width nor its heads), read by transformers' own config class for its model_type."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in ("llava", "llava_next"):
        return dict(config)
    try:
        return CONFIG_MAPPING[model_type](**config).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        raise VlmMergeError(f"{where}: transformers cannot read it as a {model_type} config ({e})") from None


def read_spec(config: Mapping, where: str) -> LlavaSpec:
    config = with_defaults(config, where)
    archs = config.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        raise VlmMergeError(f"{where}: architectures {archs!r}; export-gguf supports {sorted(ARCHITECTURES)} "
                            "(convert original LLaVA checkpoints with vlm-merge merge first)")
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise VlmMergeError(f"{where}: text_config / vision_config missing; a llava-hf config has both")
    if text.get("model_type") not in TEXT_MODEL_TYPES:
        raise VlmMergeError(f"{where}: text_config.model_type {text.get('model_type')!r}; export-gguf supports "
                            f"{', '.join(TEXT_MODEL_TYPES)} language models")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise VlmMergeError(f"{where}: vision_feature_select_strategy {config['vision_feature_select_strategy']!r}; "
                            "llama.cpp's LLaVA graph drops the CLS token ('default') only")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise VlmMergeError(f"{where}: projector_hidden_act {config['projector_hidden_act']!r}; llama.cpp's "
                            "LLaVA projector is Linear-GELU-Linear")
    n_layers = int(_field(vision, "num_hidden_layers", where + " vision_config", int))
    layers = config.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) else layers
    if not isinstance(layers, list) or not all(isinstance(v, int) and -n_layers - 1 <= v <= n_layers for v in layers):
        raise VlmMergeError(f"{where}: vision_feature_layer {config.get('vision_feature_layer')!r} is not a layer "
                            f"index of the {n_layers}-layer vision tower")
    pinpoints = [int(p) for pair in config.get("image_grid_pinpoints") or [] for p in pair]
    return LlavaSpec(family, text, vision, [v if v >= 0 else n_layers + v + 1 for v in layers], pinpoints)


def _lm_metadata(writer, text: dict, where: str) -> tuple[int, int]:
    """The `llama.*` hyperparameters (convert_hf_to_gguf's TextModel / LlamaModel.set_gguf_parameters)."""
    import gguf

    hidden = int(_field(text, "hidden_size", where, int))
    n_head = int(_field(text, "num_attention_heads", where, int))
    n_kv = int(text.get("num_key_value_heads") or n_head)
    head_dim = int(text.get("head_dim") or hidden // n_head)
    if head_dim * n_head != hidden:
        raise VlmMergeError(f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {hidden}; llama.cpp's "
                            "llama architecture needs them equal")
    rope = text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or text.get("rope_scaling"):
        raise VlmMergeError(f"{where}: RoPE scaling {rope or text.get('rope_scaling')!r}; export-gguf writes "
                            "plain RoPE only")
    writer.add_context_length(int(_field(text, "max_position_embeddings", where, int)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(_field(text, "num_hidden_layers", where, int)))
    writer.add_feed_forward_length(int(_field(text, "intermediate_size", where, int)))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(_field(text, "rms_norm_eps", where)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(_field(text, "vocab_size", where, int)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    return n_head, n_kv


def _add_vocabulary(writer, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for role, tid in vocab.special.items():
        getattr(writer, f"add_{role}_token_id")(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _lm_tensors(reader: CheckpointReader, n_layers: int, n_head: int, n_kv: int) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for key in reader.keys():
        hf = _rename(key, LM_PREFIXES)
        if hf is None:
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise VlmMergeError(f"{reader.path}: tensor {key!r} has no llama.cpp name; export-gguf writes Llama / "
                                "Mistral language models only")
        t = reader.get(key)
        if hf.endswith("self_attn.q_proj.weight"):
            t = _permute(t, n_head)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = _permute(t, n_kv)
        yield name, t


def _vision_tensors(reader: CheckpointReader, spec: LlavaSpec) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    depth = max(spec.feature_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(spec.vision["num_hidden_layers"]))
    for key in reader.keys():
        if (name := _rename(key, PROJECTOR_NAMES)) is not None:
            yield name, reader.get(key)
            continue
        hf = _rename(key, VISION_PREFIXES)
        if hf is None or VISION_SKIPPED.search(hf):
            continue
        m = re.search(r"\.encoder\.layers\.(\d+)\.", hf)
        if m and int(m.group(1)) >= depth:  # layers past the deepest feature layer never run
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise VlmMergeError(f"{reader.path}: vision tensor {key!r} has no llama.cpp name; export-gguf writes "
                                "CLIP vision towers only")
        yield name, reader.get(key)


def _mmproj_metadata(writer, spec: LlavaSpec, processor: Mapping, name: str) -> None:
    v = spec.vision
    where = "vision_config"
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(int(_field(v, "image_size", where, int)))
    writer.add_vision_patch_size(int(_field(v, "patch_size", where, int)))
    writer.add_vision_embedding_length(int(_field(v, "hidden_size", where, int)))
    writer.add_vision_feed_forward_length(int(_field(v, "intermediate_size", where, int)))
    writer.add_vision_projection_dim(int(v.get("projection_dim") or 0))
    writer.add_vision_head_count(int(_field(v, "num_attention_heads", where, int)))
    writer.add_vision_attention_layernorm_eps(float(v.get("layer_norm_eps", 1e-5)))
    writer.add_vision_block_count(max(spec.feature_layers))
    writer.add_array("clip.vision.feature_layer", spec.feature_layers)
    act = v.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise VlmMergeError(f"vision_config.hidden_act {act!r}; llama.cpp's CLIP runs quick_gelu or gelu")
    writer.add_vision_use_gelu(act == "gelu")
    writer.add_vision_image_mean([float(x) for x in processor.get("image_mean", [0.48145466, 0.4578275, 0.40821073])])
    writer.add_vision_image_std([float(x) for x in processor.get("image_std", [0.26862954, 0.26130258, 0.27577711])])
    if spec.pinpoints:
        writer.add_array("clip.vision.image_grid_pinpoints", spec.pinpoints)
        writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
        writer.add_string("clip.vision.image_aspect_ratio", "anyres")


def export_gguf(model_dir: str | Path, out_dir: Path, ftype: str = "f16",
                progress: Callable[[str], None] | None = None) -> ExportedFiles:
    """Write `out_dir/model-{ftype}.gguf` (language model + tokenizer + chat template) and
    `out_dir/mmproj-{ftype}.gguf` (vision tower + projector) from the LLaVA checkpoint `model_dir`."""
    import gguf

    if ftype not in ("f16", "bf16"):
        raise VlmMergeError(f"--outtype {ftype!r}; export-gguf writes f16 or bf16 (quantise from those)")
    with CheckpointReader(model_dir) as reader:
        root = reader.path
        spec = read_spec(reader.config(), str(root / "config.json"))
        text_where = f"{root / 'config.json'} text_config"
        n_layers = int(_field(spec.text, "num_hidden_layers", text_where, int))
        embed = next((k for k in reader.keys() if _rename(k, LM_PREFIXES) == "model.embed_tokens.weight"), None)
        if embed is None:
            raise VlmMergeError(f"{root}: no language-model embedding (model.embed_tokens.weight) found")
        vocab = read_vocabulary(root, reader.info(embed).shape[0])
        processor = _json(root / "preprocessor_config.json") if (root / "preprocessor_config.json").exists() else {}
        name = root.name
        model_path, mmproj_path = out_dir / f"model-{ftype}.gguf", out_dir / f"mmproj-{ftype}.gguf"

        lm = gguf.GGUFWriter(model_path, "llama")
        lm.add_name(name)
        lm.add_string(VERSION_KEY, LLAMA_CPP_VERSION)
        n_head, n_kv = _lm_metadata(lm, spec.text, text_where)
        if ftype == "bf16":
            lm.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
        _add_vocabulary(lm, vocab)
        n_lm = 0
        for tname, t in _lm_tensors(reader, n_layers, n_head, n_kv):
            _add(lm, tname, t, ftype)
            n_lm += 1
        if progress:
            progress(f"writing {model_path.name} ({n_lm} tensors)")
        lm.write_header_to_file()
        lm.write_kv_data_to_file()
        lm.write_tensors_to_file()
        lm.close()

        mm = gguf.GGUFWriter(mmproj_path, "clip")
        mm.add_string(VERSION_KEY, LLAMA_CPP_VERSION)
        mm.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if ftype == "bf16" else gguf.LlamaFileType.MOSTLY_F16)
        _mmproj_metadata(mm, spec, processor, name)
        n_v = 0
        for tname, t in _vision_tensors(reader, spec):
            # the patch embedding is a convolution kernel, F16 in every llama.cpp mmproj
            _add(mm, tname, t, ftype, force_f16=tname == "v.patch_embd.weight")
            n_v += 1
        if progress:
            progress(f"writing {mmproj_path.name} ({n_v} tensors)")
        mm.write_header_to_file()
        mm.write_kv_data_to_file()
        mm.write_tensors_to_file()
        mm.close()
    return ExportedFiles(model_path, mmproj_path, spec.family, n_lm, n_v)


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """A GGUF file's key/value metadata (arrays of numbers as lists, strings decoded), and per tensor its GGML type
    under `tensor_types` (read with the gguf package's reader, which checks the file against its own sizes)."""
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise VlmMergeError(f"{path}: not a readable GGUF file ({e})") from None
    out: dict[str, object] = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.ggml.tokens":
            continue
        try:
            out[key] = field.contents()
        except (ValueError, IndexError):
            continue
    out["tensor_types"] = {t.name: t.tensor_type.name for t in r.tensors}
    return out
