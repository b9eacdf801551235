"""Contenders that the benchmark implements itself, each run as a child process.

``python -m bench.workers floor --inputs DIR... --like VLM_DIR --out OUT``
    The I/O bound: read every byte of the input checkpoints once (64 MiB
    ``readinto`` into one reused buffer) and write as many output bytes as the
    real merge writes (one file per shard of ``--like``, same sizes), no compute.

``python -m bench.workers in-ram --vlm V --en-base E --ja-base J --out OUT --scale S``
    The naive Chat Vector: ``safetensors.torch.load_file`` every shard of the
    three checkpoints into RAM, compute ``ja + scale * (vlm - en)`` per LM key in
    float32, cast to bf16, copy non-LM tensors, save 1 GB safetensors shards.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

CHUNK = 64 * 2**20


def read_all(dirs: list[Path], buf: memoryview) -> int:
    total = 0
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                with f.open("rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        total += n
    return total


def write_like(like: Path, out: Path, buf: memoryview) -> int:
    """Write, under ``out``, one file per file of ``like`` with the same size."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in sorted(like.iterdir()):
        if not f.is_file():
            continue
        remaining = f.stat().st_size
        with (out / f.name).open("wb", buffering=0) as fh:
            while remaining:
                n = fh.write(buf[: min(remaining, len(buf))])
                remaining -= n
                total += n
    return total


def floor(inputs: list[Path], like: Path, out: Path) -> None:
    buf = memoryview(bytearray(CHUNK))
    read = read_all(inputs, buf)
    written = write_like(like, out, buf)
    print(f"floor: read {read / 1e9:.2f} GB, wrote {written / 1e9:.2f} GB")


def load_dir(model_dir: Path):
    from safetensors.torch import load_file

    from bench.common import shard_files

    state = {}
    for f in shard_files(model_dir):
        state |= load_file(str(f))
    return state


def in_ram(vlm: Path, en_base: Path, ja_base: Path, out: Path, scale: float, shard_bytes: int) -> None:
    import torch

    from bench.common import ShardedWriter, canonical_key

    vlm_sd, en_sd, ja_sd = load_dir(vlm), load_dir(en_base), load_dir(ja_base)
    merged = {}
    for key, t in vlm_sd.items():
        part, llama_key = canonical_key(key)
        if part == "lm":
            delta = t.float() - en_sd[llama_key].float()
            merged[key] = ja_sd[llama_key].float().add_(delta, alpha=scale).to(torch.bfloat16)
        else:
            merged[key] = t
    writer = ShardedWriter(out, shard_bytes)
    for key, t in merged.items():
        writer.add(key, t)
    writer.close()
    shutil.copy2(vlm / "config.json", out / "config.json")
    print(f"in-ram: merged {len(merged)} tensors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workers")
    sub = ap.add_subparsers(dest="which", required=True)
    fl = sub.add_parser("floor")
    fl.add_argument("--inputs", type=Path, nargs="+", required=True)
    fl.add_argument("--like", type=Path, required=True)
    fl.add_argument("--out", type=Path, required=True)
    ir = sub.add_parser("in-ram")
    ir.add_argument("--vlm", type=Path, required=True)
    ir.add_argument("--en-base", type=Path, required=True)
    ir.add_argument("--ja-base", type=Path, required=True)
    ir.add_argument("--out", type=Path, required=True)
    ir.add_argument("--scale", type=float, default=1.0)
    ir.add_argument("--shard-bytes", type=int, default=10**9)
    args = ap.parse_args(argv)
    if args.which == "floor":
        floor(args.inputs, args.like, args.out)
    else:
        in_ram(args.vlm, args.en_base, args.ja_base, args.out, args.scale, args.shard_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
