"""Random-weight replicas of real public checkpoints, built from the corpus in this directory.

Each corpus entry ``<org>--<name>/`` describes one real Hugging Face repository: ``files/`` (its small text files),
``layout.json`` (every weight key with its full shape and dtype, the weight file names, the tokenizer kind and
special ids) and ``SOURCES.md`` (where each fact comes from). ``build_replica`` turns an entry into a directory
that loads like the real repository: the same files, the same key names, dtypes and buffers, the same weight file
naming scheme and index, a tokenizer of the same kind and size, but fewer layers (``layers``) and narrower tensors
(``width_divisor``) filled with seeded random values.

Width reduction divides every width dimension (hidden, intermediate, head_dim, projection sizes) by
``width_divisor`` and keeps head counts, so GQA groups, vocabulary sizes, position counts and image geometry stay
real. Depth reduction keeps decoder / encoder layers ``0 .. layers-1`` of every stack.
"""

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from vlm_merge.testing import write_hf_cache

CORPUS_DIR = Path(__file__).resolve().parent
INIT_STD = 0.02
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
SUB_CONFIGS = ("text_config", "vision_config")
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "head_dim", "projection_dim", "mm_hidden_size")
DEPTH_FIELD = "num_hidden_layers"
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
NORM_MODULE = re.compile(r"(norm|layrnorm)[^.]*$")  # CLIP spells its first norm "pre_layrnorm"
WEIGHT_STEMS = {"safetensors": ("model", "safetensors"), "bin": ("pytorch_model", "bin")}


@dataclass(frozen=True)
class Entry:
    """One corpus entry: its directory, parsed layout.json and config.json."""

    path: Path
    layout: dict
    config: dict

    @property
    def repo_id(self) -> str:
        return self.layout["repo_id"]

    @property
    def files_dir(self) -> Path:
        return self.path / "files"


def entry_names() -> list[str]:
    """Directory names of every corpus entry (``org--name``)."""
    return sorted(path.parent.name for path in CORPUS_DIR.glob("*/layout.json"))


def load_entry(name_or_repo_id: str) -> Entry:
    """The corpus entry for ``org/name`` or ``org--name``."""
    path = CORPUS_DIR / name_or_repo_id.replace("/", "--")
    if not (path / "layout.json").is_file():
        raise KeyError(f"no corpus entry {name_or_repo_id!r} under {CORPUS_DIR} (have: {', '.join(entry_names())})")
    layout = json.loads((path / "layout.json").read_text(encoding="utf-8"))
    config = json.loads((path / "files" / "config.json").read_text(encoding="utf-8"))
    return Entry(path, layout, config)


# ---------------------------------------------------------------- configs and shapes
def _config_parts(config: Mapping) -> list[Mapping]:
    """The config and its nested model configs (text_config, vision_config, legacy *_config_dict)."""
    parts = [config]
    for key, value in config.items():
        if isinstance(value, Mapping) and (key in SUB_CONFIGS or "num_hidden_layers" in value or "model_type" in value):
            parts.append(value)
    return parts


def _defaults(part: Mapping) -> dict:
    """transformers' defaults for the model_type of a config part (fields the real file leaves out)."""
    from transformers import CONFIG_MAPPING

    model_type = part.get("model_type")
    if model_type not in CONFIG_MAPPING or model_type == "llava" and "mm_vision_tower" in part:
        return {}  # original LLaVA writes model_type "llava" but is a Llama config with every field present
    return CONFIG_MAPPING[model_type]().to_dict()


def _field(part: Mapping, name: str) -> object:
    return part[name] if name in part else _defaults(part).get(name)


def _part_widths(part: Mapping) -> dict[str, int]:
    """The width fields of one config part (missing ones from transformers' defaults), head_dim included."""
    hidden, heads = _field(part, "hidden_size"), _field(part, "num_attention_heads")
    if not hidden or not heads:
        return {name: value for name in WIDTH_FIELDS if isinstance(value := _field(part, name), int)}
    head_dim = _field(part, "head_dim") or hidden // heads
    kv_heads = _field(part, "num_key_value_heads") or heads
    widths = {name: value for name in WIDTH_FIELDS if isinstance(value := _field(part, name), int)}
    fused = 3 * heads * head_dim  # fused q/k/v projections (SigLIP's pooling head in_proj)
    return widths | {"head_dim": head_dim, "q_width": heads * head_dim, "kv_width": kv_heads * head_dim, "qkv": fused}


def part_divisor(part: Mapping, width_divisor: int) -> int:
    """The largest divisor <= ``width_divisor`` of every width of ``part`` (SigLIP's 4304 / 72 allow only 8)."""
    common = math.gcd(*_part_widths(part).values()) if _part_widths(part) else width_divisor
    return max(d for d in range(1, width_divisor + 1) if common % d == 0)


def width_map(config: Mapping, width_divisor: int) -> dict[int, int]:
    """Real width dimension -> replica width, over every config part; rotary half head_dims included."""
    out: dict[int, int] = {}
    for part in _config_parts(config):
        divisor = part_divisor(part, width_divisor)
        widths = _part_widths(part)
        values = dict.fromkeys(widths.values(), divisor)
        if "q_width" in widths and widths["head_dim"] // divisor % 2 == 0:
            values[widths["head_dim"] // 2] = divisor  # inv_freq's length
        for value, divisor_here in values.items():
            reduced = value // divisor_here
            if out.setdefault(value, reduced) != reduced:
                raise ValueError(f"width {value} reduces to both {out[value]} and {reduced}; pick another divisor")
    return out


def reduce_config(config: Mapping, layers: int, width_divisor: int) -> dict:
    """``config`` with every stack cut to ``layers`` layers and every width field divided (per part, see
    ``part_divisor``) by up to ``width_divisor``.

    Fields the real file leaves to transformers' defaults (llava-hf's text_config omits hidden_size...) are written
    out when they change, so the replica's config says what its tensors are.
    """

    def reduce(part: Mapping) -> dict:
        out = dict(part)
        divisor = part_divisor(part, width_divisor)
        if DEPTH_FIELD in part or part.get("model_type") and _field(part, DEPTH_FIELD):
            out[DEPTH_FIELD] = min(layers, _field(part, DEPTH_FIELD))
        for name in WIDTH_FIELDS:
            value = _field(part, name)
            if isinstance(value, int) and (name in part or divisor > 1) and (name != "head_dim" or name in part):
                out[name] = value // divisor
        for key, value in part.items():
            if isinstance(value, Mapping) and value in _config_parts(part)[1:]:
                out[key] = reduce(value)
        return out

    return reduce(config)


def reduced_shape(shape: Iterable[int], widths: Mapping[int, int]) -> list[int]:
    """A tensor shape with its width dimensions replaced by the replica's."""
    return [widths.get(dim, dim) for dim in shape]


def kept_key(key: str, layers: int) -> bool:
    """Whether ``key`` belongs to the first ``layers`` layers of its stack (or to no layer stack)."""
    match = LAYER_INDEX.search(key)
    return match is None or int(match.group(1)) < layers


def replica_tensors(entry: Entry, layers: int, width_divisor: int) -> dict[str, tuple[list[int], str]]:
    """Key -> (shape, dtype) of the replica: the real keys of the kept layers at reduced width."""
    widths = width_map(entry.config, width_divisor)
    return {
        key: (reduced_shape(shape, widths), dtype)
        for key, (shape, dtype) in entry.layout["tensors"].items()
        if kept_key(key, layers)
    }


# ---------------------------------------------------------------- values
def _generator(seed: int, repo_id: str, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{repo_id}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _rope_theta(config: Mapping) -> float:
    for part in _config_parts(config):
        for source in (part, part.get("rope_parameters") or {}):
            if "rope_theta" in source:
                return float(source["rope_theta"])
    return 10000.0


def tensor_value(key: str, shape: list[int], dtype: str, config: Mapping, seed: int, repo_id: str) -> torch.Tensor:
    """The replica's value of one tensor: buffers computed as transformers computes them, norms 1, else N(0, 0.02)."""
    torch_dtype = DTYPES[dtype]
    if key.endswith("inv_freq"):
        head_dim = 2 * shape[0]
        return 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if key.endswith("logit_scale"):
        return torch.tensor(2.6592, dtype=torch_dtype)  # log(1 / 0.07), CLIP's init
    module = key.rsplit(".", 1)[0]
    if NORM_MODULE.search(module):
        return (torch.ones if key.endswith(".weight") else torch.zeros)(shape, dtype=torch_dtype)
    noise = torch.randn(shape, generator=_generator(seed, repo_id, key)) * INIT_STD
    return noise.to(torch_dtype)


# ---------------------------------------------------------------- weight files
def _real_weight_map(entry: Entry) -> dict[str, str]:
    """Key -> weight file name of the real repo (its index, or its single weight file)."""
    weights = entry.layout["weights"]
    index = entry.files_dir / f"{WEIGHT_STEMS[weights['format']][0]}.{weights['format']}.index.json"
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    (only,) = weights["files"]
    return dict.fromkeys(entry.layout["tensors"], only)


def replica_weight_map(entry: Entry, keys: Iterable[str], layers: int, fmt: str | None = None) -> dict[str, str]:
    """Key -> file for the replica: kept layer i lives where real layer i * real_layers // layers lives.

    Files left without keys are dropped and the rest renumbered (``model-0000k-of-0000n``), as if the smaller
    model had been sharded by the real tool.
    """
    real = _real_weight_map(entry)
    real_layers: dict[str, int] = {}  # per stack (the key up to ".layers."): its real depth
    for key in real:
        if match := LAYER_INDEX.search(key):
            stack = key[: match.start()]
            real_layers[stack] = max(real_layers.get(stack, 0), int(match.group(1)) + 1)

    def source_key(key: str) -> str:
        match = LAYER_INDEX.search(key)
        if match is None:
            return key
        spread = int(match.group(1)) * real_layers[key[: match.start()]] // max(layers, 1)
        return f"{key[: match.start()]}.layers.{spread}.{key[match.end():]}"

    chosen = {key: real[source_key(key)] for key in keys}
    fmt = fmt or entry.layout["weights"]["format"]
    stem, ext = WEIGHT_STEMS[fmt]
    used = sorted(set(chosen.values()))
    if len(used) == 1 and len(entry.layout["weights"]["files"]) == 1:
        return dict.fromkeys(chosen, f"{stem}.{ext}")
    renamed = {name: f"{stem}-{i + 1:05d}-of-{len(used):05d}.{ext}" for i, name in enumerate(used)}
    return {key: renamed[name] for key, name in chosen.items()}


def write_weights(state: Mapping[str, torch.Tensor], weight_map: Mapping[str, str], out: Path, fmt: str) -> None:
    """Write ``state`` into the files of ``weight_map`` (and its index when there are several)."""
    for name in sorted(set(weight_map.values())):
        part = {key: state[key].contiguous() for key in sorted(weight_map) if weight_map[key] == name}
        if fmt == "safetensors":
            save_file(part, out / name, metadata={"format": "pt"})
        else:
            torch.save(part, out / name)
    files = set(weight_map.values())
    if len(files) > 1:
        stem, ext = WEIGHT_STEMS[fmt]
        total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / f"{stem}.{ext}.index.json", index)


# ---------------------------------------------------------------- tokenizers
ENGLISH = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three image picture photo describe cat dog car red blue white black "
    "question answer what color how many"
).split()
JAPANESE = (
    "これはですますこのその画像写真何日本語人色赤青白黒上下中大小車花山川水木女男子猫犬"
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
    "がぎぐげござじずぜぞだぢづでどばびぶべぼぱぴぷぺぽっゃゅょー。、「」"
    "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲンッャュョ"
)
JA_WORDS = ("これは", "です", "ます", "この", "画像", "写真", "日本語", "何色", "ですか", "ありますか")


def _cjk(count: int, skip: set[str]) -> list[str]:
    """The first ``count`` CJK unified ideographs not in ``skip``."""
    out = []
    for code in range(0x4E00, 0xA000):
        if len(out) == count:
            break
        if chr(code) not in skip:
            out.append(chr(code))
    return out


def _filler(count: int, skip: set[str]) -> list[str]:
    """``count`` synthetic English-looking sub-word pieces (letter pairs / triples, with and without ``▁``)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    out: list[str] = []
    for size in (2, 3, 4):
        for prefix in ("▁", ""):
            for index in range(len(letters) ** size):
                if len(out) == count:
                    return out
                chars, rest = [], index
                for _ in range(size):
                    rest, digit = divmod(rest, len(letters))
                    chars.append(letters[digit])
                piece = prefix + "".join(chars)
                if piece not in skip:
                    skip.add(piece)
                    out.append(piece)
    raise ValueError(f"cannot make {count} filler pieces")


def sentencepiece_pieces(spec: Mapping) -> list[tuple[str, int]]:
    """(piece, type) of a Llama-style SentencePiece vocabulary of ``spec["vocab_size"]`` pieces.

    ids 0-2 ``<unk> <s> </s>``, 3-258 the byte-fallback pieces, then English and some Japanese pieces and
    synthetic filler up to ``base_vocab_size`` (Llama-2's 32000), then, for extended vocabularies (Swallow),
    Japanese words and CJK characters appended up to ``vocab_size``.
    """
    types = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
    if spec.get("special_tokens", {}).get("unk_token", {}).get("id", 0) != 0:
        raise ValueError("only Llama-style SentencePiece vocabularies (<unk> <s> </s> at 0-2) are built")
    pieces = [("<unk>", types.UNKNOWN), ("<s>", types.CONTROL), ("</s>", types.CONTROL)]
    pieces += [(f"<0x{byte:02X}>", types.BYTE) for byte in range(256)]
    base = spec.get("base_vocab_size", spec["vocab_size"])
    seen = {piece for piece, _ in pieces}
    normal = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'\"-:;()"]
    normal += [f"▁{word}" for word in ENGLISH] + list(dict.fromkeys(JAPANESE[: len(JAPANESE) // 2]))
    normal = [piece for piece in dict.fromkeys(normal) if piece not in seen]
    seen |= set(normal)
    normal += _filler(base - len(pieces) - len(normal), seen)
    pieces += [(piece, types.NORMAL) for piece in normal]
    if spec["vocab_size"] > base:
        extra = [p for p in dict.fromkeys([*JAPANESE, *JA_WORDS, *(f"▁{w}" for w in JA_WORDS)]) if p not in seen]
        seen |= set(extra)
        extra += _cjk(spec["vocab_size"] - base - len(extra), seen)
        pieces += [(piece, types.NORMAL) for piece in extra]
    if len(pieces) != spec["vocab_size"]:
        raise ValueError(f"built {len(pieces)} pieces, want {spec['vocab_size']}")
    return pieces


def write_sentencepiece(spec: Mapping, path: Path) -> None:
    """A SentencePiece BPE ``tokenizer.model`` with Llama's trainer / normalizer settings and byte fallback."""
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    model.trainer_spec.vocab_size = spec["vocab_size"]
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    for rank, (piece, kind) in enumerate(sentencepiece_pieces(spec)):
        entry = model.pieces.add()
        entry.piece, entry.type = piece, kind
        entry.score = 0.0 if kind != sentencepiece_model_pb2.ModelProto.SentencePiece.Type.NORMAL else -float(rank)
    path.write_bytes(model.SerializeToString())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def base_vocab_size(spec: Mapping) -> int:
    """Size of the tokenizer's model vocabulary: ids below the first added token (or ``vocab_size``)."""
    added = [token["id"] for token in spec.get("added_tokens", [])]
    return spec.get("base_vocab_size") or min([*added, spec["vocab_size"]]) if spec["kind"] == "bpe-json" else spec["vocab_size"]


def bpe_json_tokenizer(spec: Mapping) -> Tokenizer:
    """A byte-level BPE tokenizer (Llama-3 style): the base vocabulary plus the added tokens at their real ids.

    Tokens: the 256 byte characters, then merges making English words / Japanese characters and synthetic filler
    until the base vocabulary (``base_vocab_size``) is full; ``spec["added_tokens"]`` ({id, content, special})
    after it, gaps between their ids filled with ``<|reserved_gap_N|>`` so every id is the real one.
    """
    size = base_vocab_size(spec)
    byte_chars = _bytes_to_unicode()
    vocab = {char: i for i, char in enumerate(byte_chars.values())}
    merges: list[tuple[str, str]] = []

    def add_word(word: str) -> None:
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        current = symbols[0]
        for symbol in symbols[1:]:
            if len(vocab) >= size:
                return
            merged = current + symbol
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, symbol))
            current = merged

    for word in [*(f" {w}" for w in ENGLISH), *ENGLISH, *JAPANESE, *JA_WORDS]:
        add_word(word)
    for piece in _filler(size, set()):
        if len(vocab) >= size:
            break
        add_word(piece.replace("▁", " "))
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    if len(vocab) != size:
        raise ValueError(f"byte-level vocab has {len(vocab)} tokens, want {size}")
    by_id = {token["id"]: token for token in spec.get("added_tokens", [])}
    for token_id in range(size, max(by_id, default=size - 1) + 1):
        token = by_id.get(token_id, {"content": f"<|reserved_gap_{token_id}|>", "special": True})
        tokenizer.add_tokens([AddedToken(token["content"], special=token.get("special", True), normalized=False)])
    return tokenizer


def write_tokenizer(entry: Entry, out: Path) -> None:
    """The real repo's tokenizer model files, of the real kind and size (the JSON config files come from files/)."""
    spec = entry.layout["tokenizer"]
    ships = set(spec["files"])
    if spec["kind"] == "sentencepiece":
        write_sentencepiece(spec, out / "tokenizer.model")
        if "tokenizer.json" in ships:
            _convert_to_tokenizer_json(out)
    elif spec["kind"] == "bpe-json":
        bpe_json_tokenizer(spec).save(str(out / "tokenizer.json"))
    elif spec["kind"] != "none":
        raise ValueError(f"{entry.repo_id}: unknown tokenizer kind {spec['kind']!r}")


def _convert_to_tokenizer_json(out: Path) -> None:
    """tokenizer.json converted from tokenizer.model + the config files by transformers' Llama tokenizer."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(tmp) / name)
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))


# ---------------------------------------------------------------- the replica
def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _reduce_index_named_files(names: Iterable[str]) -> list[str]:
    return [name for name in names if not name.endswith(".index.json")]


def build_replica(
    name_or_repo_id: str, out_dir: str | Path, *, layers: int = 2, width_divisor: int = 32, seed: int = 0
) -> Path:
    """Write a loadable random-weight replica of a corpus entry into ``out_dir`` (created); return its path.

    ``layers`` layers per stack (vision and text), widths divided by ``width_divisor`` (1 = real widths),
    values seeded by (seed, repo id, key) so the same arguments give byte-identical weights.
    """
    entry = load_entry(name_or_repo_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _reduce_index_named_files(path.name for path in entry.files_dir.iterdir() if path.is_file()):
        shutil.copyfile(entry.files_dir / name, out / name)
    config = reduce_config(entry.config, layers, width_divisor)
    _write_json(out / "config.json", config)
    tensors = replica_tensors(entry, layers, width_divisor)
    state = {key: tensor_value(key, shape, dtype, config, seed, entry.repo_id) for key, (shape, dtype) in tensors.items()}
    weights = entry.layout["weights"]
    also = weights.get("also_ships")
    for fmt in [weights["format"], *([also["format"]] if also else [])]:
        write_weights(state, replica_weight_map(entry, state, layers, fmt), out, fmt)
    write_tokenizer(entry, out)
    return out


def install_in_hf_cache(cache_dir: str | Path, repo_id: str, replica_dir: str | Path) -> str:
    """Store ``replica_dir``'s files in a hub cache (HF_HUB_CACHE layout) as ``repo_id``; return the commit hash
    (the fixtures' cache writer: content-derived commit, blobs and snapshot links)."""
    return write_hf_cache(cache_dir, repo_id, replica_dir)


def real_size_bytes(entry: Entry) -> int:
    """Sum of the real tensors' bytes (what the real index's metadata.total_size states)."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}
    return sum(math.prod(shape) * sizes[dtype] for shape, dtype in entry.layout["tensors"].values())
