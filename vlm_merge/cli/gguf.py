"""`vlm-merge export-gguf`: a LLaVA checkpoint as GGUF files for llama.cpp (the `gguf` extra), quantised by
llama.cpp's own quantiser (`llama_model_quantize` through llama-cpp-python, the `llamacpp` extra).

The output directory (written atomically) holds `model-f16.gguf` (or bf16), `mmproj-f16.gguf`, one
`model-<quant>.gguf` per `--quant` level and `export.json`: the llama.cpp version whose format the files follow,
each file's size and the GGML types its tensors really have (llama.cpp falls back to other types for rows narrower
than a K-quant's 256-wide block: the miniature world's hidden size is 128).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from vlm_merge.errors import VlmMergeError

# --quant names -> llama.cpp's `LLAMA_FTYPE_MOSTLY_*` constant (llama.h `enum llama_ftype`)
QUANT_TYPES: dict[str, str] = {
    "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q5_0": "Q5_0",
    "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_0": "Q4_0", "q3_k_m": "Q3_K_M", "q3_k_s": "Q3_K_S",
    "q3_k_l": "Q3_K_L", "q2_k": "Q2_K",
}
DEFAULT_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
EXPORT_JSON = "export.json"
# the HF processor / tokenizer files copied to DIR/processor/: eval --backend llama.cpp builds the transformers
# backend's prompts and token ids with them
PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json")


def parse_quants(text: str | None) -> list[str]:
    """`--quant q8_0,q4_k_m` -> the levels, checked ('all' = the default ladder)."""
    if not text:
        return []
    names = list(DEFAULT_QUANTS) if text.strip() == "all" else [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUANT_TYPES]
    if unknown:
        raise VlmMergeError(f"--quant {unknown[0]!r} is not a llama.cpp quantisation type; choose from "
                            f"{', '.join(QUANT_TYPES)} or 'all'")
    return list(dict.fromkeys(names))


def quantize(source: Path, target: Path, quant: str, threads: int = 1) -> None:
    """llama.cpp's quantiser (`llama_model_quantize`) from the F16/BF16 GGUF `source` to `target`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANT_TYPES[quant]}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise VlmMergeError(f"{source}: llama.cpp's quantiser failed for {quant} (status {rc})")


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the GGUF file `path` holds."""
    from vlm_merge.io.gguf import read_gguf_metadata

    return dict(sorted(Counter(read_gguf_metadata(path)["tensor_types"].values()).items()))


def llama_cpp_python_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def run_export(model: str, out: str | Path, ftype: str = "f16", quants: list[str] | None = None, force: bool = False,
               threads: int = 1) -> Path:
    """Export `model` to GGUF in `out` (atomically), quantise it to each of `quants`, write export.json."""
    from vlm_merge.extras import require_extra
    from vlm_merge.io.checkpoint import resolve_model_dir
    from vlm_merge.io.gguf import LLAMA_CPP_VERSION, export_gguf
    from vlm_merge.io.outputs import AtomicDir

    quants = quants or []
    if quants:
        require_extra("llamacpp", "'vlm-merge export-gguf --quant'")
    source = resolve_model_dir(model)
    with AtomicDir(out, force, [source]) as tmp:
        files = export_gguf(source, tmp, ftype)
        (tmp / "processor").mkdir()
        for name in PROCESSOR_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / "processor" / name)
        levels = {ftype: files.model}
        for q in quants:
            levels[q] = tmp / f"model-{q}.gguf"
            quantize(files.model, levels[q], q, threads)
        record = {
            "source": str(source),
            "family": files.family,
            "llama_cpp_format": LLAMA_CPP_VERSION,
            "llama_cpp_python": llama_cpp_python_version(),
            "mmproj": {"file": files.mmproj.name, "bytes": files.mmproj.stat().st_size,
                       "tensor_types": tensor_type_counts(files.mmproj)},
            "models": {level: {"file": p.name, "bytes": p.stat().st_size, "tensor_types": tensor_type_counts(p)}
                       for level, p in levels.items()},
        }
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from vlm_merge.tables import format_table

    quants = parse_quants(args.quant)
    out = run_export(args.model, args.out, args.outtype, quants, args.force, args.threads)
    record = json.loads((out / EXPORT_JSON).read_text(encoding="utf-8"))
    rows = [[level, m["file"], f"{m['bytes'] / 1e6:.2f}", ", ".join(f"{t}:{n}" for t, n in m["tensor_types"].items())]
            for level, m in record["models"].items()]
    print(format_table(["level", "file", "MB", "tensor types (count)"], rows))
    print(f"mmproj: {out / record['mmproj']['file']}; format of {record['llama_cpp_format']}")
    return 0


def add_gguf_commands(sub) -> None:
    """Register `vlm-merge export-gguf` on the CLI's subparsers."""
    s = sub.add_parser("export-gguf", help="a LLaVA model as GGUF for llama.cpp: language model + mmproj, quantised")
    s.add_argument("model", help="LLaVA model directory (llava-hf layout, Llama or Mistral language model)")
    s.add_argument("--out", required=True, help="output directory, written atomically")
    s.add_argument("--outtype", choices=("f16", "bf16"), default="f16", help="unquantised type (default f16)")
    s.add_argument("--quant", help=f"comma-separated llama.cpp quantisation levels ({', '.join(QUANT_TYPES)}) "
                                   "or 'all' (" + ",".join(DEFAULT_QUANTS) + "); needs the llamacpp extra")
    s.add_argument("--threads", type=int, default=1, help="quantiser threads (default 1)")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=cmd_export_gguf)
