"""What every `vlm-merge` command's parser shares: one-line usage errors, sizes, the output options."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from vlm_merge.errors import VlmMergeError


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a bad type or choice, a missing argument) are one line,
    `vlm-merge: error: ...` with exit status 2, like every other error; subcommand parsers inherit the
    class (`add_subparsers` uses the parent's), and `--help` is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vlm-merge: error: {message}; see `{self.prog} --help`\n")


SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
              "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
MAX_SIZE_BYTES = 1000**5  # a petabyte: beyond any shard


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """A byte count from `5GB`, `500MB`, `2GiB` or a plain number; anything else (negative, zero, nan,
    1e999GB) is a one-line error naming `what`."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not 1 <= value <= MAX_SIZE_BYTES:  # also false for nan
        raise VlmMergeError(f"{what} {text!r}: not a size between 1 byte and 1 PB (e.g. 5GB, 500MB)")
    return int(value)


def add_output_options(s: argparse.ArgumentParser) -> None:
    from vlm_merge.io.checkpoint import DEFAULT_MAX_SHARD_BYTES

    s.add_argument("--dtype", help="output dtype of the language model (default: the VLM's / the recipe's)")
    s.add_argument("--vision-tower", help="CLIP checkpoint for original-LLaVA VLMs that do not embed theirs")
    add_hub_options(s)
    s.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB (default)")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from the checkpoints")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged tensors even if they hold NaN/inf in the output dtype (default: refuse)")
    add_text_config_option(s)


def add_hub_options(s: argparse.ArgumentParser, *, revision: bool = False) -> None:
    """How a command finds Hugging Face ids: the cache, offline mode and (single-model commands) a revision.
    `main` turns `--offline` into HF_HUB_OFFLINE=1 for the whole process (and any worker it starts)."""
    s.add_argument("--cache-dir", help="Hugging Face cache to look model ids up in and download to (default: HF_HUB_CACHE)")
    s.add_argument("--offline", action="store_true",
                   help="never download: Hugging Face ids come from the cache only (as HF_HUB_OFFLINE=1)")
    if revision:
        s.add_argument("--revision", help="branch, tag or commit of a Hugging Face id (same as ORG/NAME@REVISION)")


def add_text_config_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--text-config-from", choices=("vlm", "target"),
                   help="whose RoPE / sliding window / norm eps / context length the output's language model has "
                        "when the sources disagree (default: the recipe's, else vlm)")
