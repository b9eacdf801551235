"""`vlm-merge` command line. Errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import NoReturn

from vlm_merge.errors import VlmMergeError
from vlm_merge.extras import missing_requirements, require_extra
from vlm_merge.tables import format_table


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a bad type or choice, a missing argument) are one line,
    `vlm-merge: error: ...` with exit status 2, like every other error; subcommand parsers inherit the
    class (`add_subparsers` uses the parent's), and `--help` is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vlm-merge: error: {message}; see `{self.prog} --help`\n")


def _parse_scales(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VlmMergeError(f"{what}: {text!r} is not a comma-separated list of numbers") from None


def _parse_module_scales(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise VlmMergeError(f"--module-scale {item!r}: expected NAME=NUMBER, e.g. mlp=0.5") from None
    return out


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


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlm_merge.anatomy import align, inspect_checkpoint, inspect_llm, inspect_vlm
    from vlm_merge.backbone import config_conflicts, describe_parts, vision_tower_status, vlm_text_config
    from vlm_merge.checkpoint import CheckpointReader

    reader = CheckpointReader(args.path, args.cache_dir)
    base = CheckpointReader(args.base, args.cache_dir) if args.base else None
    anatomy = inspect_vlm(reader, base) if (base is not None or _looks_multimodal(reader)) else inspect_checkpoint(reader)
    info = describe_parts(anatomy)
    tower = vision_tower_status(anatomy, args.vision_tower, args.cache_dir)
    if tower is not None:
        info["vision_tower_source"] = {k: v for k, v in tower.items() if k != "line"}
    alignment = None
    conflicts: list[str] = []
    if base is not None:
        base_anat = inspect_llm(base, "--base")
        alignment = align(anatomy, base_anat)
        conflicts = config_conflicts({f"{reader.path.name}": vlm_text_config(anatomy),
                                      f"{base.path.name} (--base)": base_anat.config})
        info["alignment"] = {
            "base": str(base.path),
            "paired_tensors": len(alignment.pairs),
            "base_vocab_rows": alignment.base_vocab_rows,
            "vlm_vocab_rows": alignment.vlm_vocab_rows,
            "text_config_conflicts": conflicts,
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tc = anatomy.text_config
    print(f"{anatomy.path}\nlayout: {anatomy.layout.name} — {anatomy.layout.description}")
    print(f"architectures: {', '.join(anatomy.config.get('architectures') or ['?'])}; format: {reader.format}, "
          f"{len(reader.weight_files)} weight file(s)")
    print(f"language model: {anatomy.num_layers} layers, hidden {anatomy.hidden_size}, vocab rows {anatomy.vocab_rows}"
          f" (config vocab_size {tc.get('vocab_size')}, model_type {tc.get('model_type')})\n")
    print(format_table(["part", "tensors", "parameters", "dtype", "key prefix"], anatomy.summary_rows()))
    if alignment is not None:
        delta = (alignment.vlm_vocab_rows or 0) - (alignment.base_vocab_rows or 0)
        print(f"\nalignment with {base.path}: {len(alignment.pairs)} language-model tensors paired, shapes match"
              + (f"; vocab rows differ by {delta:+d} (matched by token string when merging)" if delta else ""))
        for line in conflicts:
            print(f"warning: {line}")
    if tower is not None:
        print(f"\n{tower['line']}")
    return 0


def _looks_multimodal(reader) -> bool:
    from vlm_merge.anatomy import inspect_checkpoint

    return inspect_checkpoint(reader).layout.name not in ("llm",)


def cmd_chat_vector(args: argparse.Namespace) -> int:
    from chat_vector import chat_vector

    out = chat_vector(
        args.vlm, args.en_base, args.ja_base, args.out,
        scale=args.scale,
        layer_scales=_parse_scales(args.layer_scales, "--layer-scales"),
        module_scales=_parse_module_scales(args.module_scale),
        skip=args.skip,
        dtype=args.dtype,
        vision_tower=args.vision_tower,
        cache_dir=args.cache_dir,
        force=args.force,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
        text_config_from=args.text_config_from or "vlm",
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from vlm_merge.merge import merge

    out = merge(
        args.recipe, args.out, dtype=args.dtype, device=args.device, force=args.force,
        max_shard_bytes=parse_size(args.max_shard_size), vision_tower=args.vision_tower, cache_dir=args.cache_dir,
        progress=not args.quiet, trust_remote_code=args.trust_remote_code, text_config_from=args.text_config_from,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from vlm_merge.merge import validate

    rp, rows = validate(args.recipe, vision_tower=args.vision_tower, cache_dir=args.cache_dir,
                        text_config_from=args.text_config_from)
    r = rp.recipe
    print(f"recipe {args.recipe}: {r.merge_method} — OK")
    print(f"output: {'VLM ' + r.vlm if r.vlm else 'LLM'}; vocabulary and text config from {r.tokenizer_source}"
          + (f"; starts from target {r.target}" if r.target else ""))
    if rp.backbone.vocab is not None:
        print("vocabulary: " + rp.backbone.vocab.summary())
    print(rp.backbone.card_details()[0])
    print()
    print(format_table(["part", "tensors", "method", "sources"], rows))
    return 0


def _add_output_options(s: argparse.ArgumentParser) -> None:
    from vlm_merge.checkpoint import DEFAULT_MAX_SHARD_BYTES

    s.add_argument("--dtype", help="output dtype of the language model (default: the VLM's / the recipe's)")
    s.add_argument("--vision-tower", help="CLIP checkpoint for original-LLaVA VLMs that do not embed theirs")
    s.add_argument("--cache-dir", help="Hugging Face cache to look model ids up in (default: HF_HUB_CACHE)")
    s.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB (default)")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from the checkpoints")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged tensors even if they hold NaN/inf in the output dtype (default: refuse)")
    _add_text_config_option(s)


def _add_text_config_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--text-config-from", choices=("vlm", "target"),
                   help="whose RoPE / sliding window / norm eps / context length the output's language model has "
                        "when the sources disagree (default: the recipe's, else vlm)")


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlm_merge.demo import QUICK, REPORT_HTML, REPORT_MD, DemoSettings, run_demo

    settings = replace(QUICK if args.quick else DemoSettings(), seed=args.seed, threads=args.threads)
    out = run_demo(Path(args.out), force=args.force, zoo=args.zoo, settings=settings, quick=args.quick,
                   progress=not args.quiet)
    print(f"report: {out / REPORT_MD} (also {out / REPORT_HTML}, report.json, predictions/, plots/, gallery/)")
    return 0


def add_demo_command(sub) -> None:
    """Register `vlm-merge demo` on the CLI's subparsers."""
    s = sub.add_parser("demo", help="Chat Vector and an evolutionary merge on the miniature zoo, measured; writes a report")
    s.add_argument("--out", default="out/demo", help="report directory, written atomically (default out/demo)")
    s.add_argument("--zoo", help="miniature zoo directory (default: the shipped assets/miniature-zoo)")
    s.add_argument("--quick", action="store_true", help="fewer test questions and a tiny search (a smoke run)")
    s.add_argument("--seed", type=int, default=0, help="seed of the evolutionary search (default 0)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for the tiny models)")
    s.add_argument("--force", action="store_true", help="replace an existing report directory")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)


@dataclass(frozen=True)
class CommandGroup:
    """Commands outside the light core: the pip extra they need and the function (`module:name`, given the
    subparsers) that registers them; the module is imported only when one of them runs, or for `--help`."""

    extra: str
    commands: tuple[str, ...]
    register: str


COMMAND_GROUPS = (
    CommandGroup("eval", ("eval", "score", "compare", "caption"), "eval.cli:add_eval_commands"),
    CommandGroup("evolve", ("evolve",), "vlm_merge.evolve:add_evolve_commands"),
    CommandGroup("demo", ("demo",), "vlm_merge.cli:add_demo_command"),
    CommandGroup("demo", ("zoo",), "vlm_merge.world.cli:add_world_commands"),  # zoo build, zoo bar
)


def _group_of(command: str | None) -> CommandGroup | None:
    return next((g for g in COMMAND_GROUPS if command in g.commands), None)


def _require_group(command: str) -> None:
    """The one-line error if `command` belongs to an extra that is not installed."""
    if (group := _group_of(command)) is not None:
        require_extra(group.extra, f"'vlm-merge {command}'")


def _cmd_needs_extra(args: argparse.Namespace) -> int:
    """The handler of a command whose extra is missing (`main` refuses it before parsing): the one-line error."""
    _require_group(args.command)
    return 2


def _add_group(sub, group: CommandGroup) -> None:
    """Register `group`'s commands, or, where its extra is missing, entries that say so (for `--help`)."""
    if missing_requirements(group.extra):
        for name in group.commands:
            s = sub.add_parser(name, help=f"needs the {group.extra} extra: pip install 'vlm-merge[{group.extra}]'")
            s.set_defaults(func=_cmd_needs_extra)
        return
    module, function = group.register.split(":")
    getattr(import_module(module), function)(sub)


def _command(argv: list[str]) -> str | None:
    """The command in `argv`: its first word that is not an option (the global options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `vlm-merge` parser for running `command`: the core commands, and of the others only `command`'s group
    (every group for None, an unknown command or `--help`), so a command imports only its own module."""
    from chat_vector.rules import DEFAULT_SKIP, SKIP_PRESETS

    p = OneLineParser(prog="vlm-merge", description="Build Japanese VLMs by merging checkpoints.")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="name the parts of a checkpoint (vision tower, projector, language model)")
    s.add_argument("path", help="model directory or Hugging Face id in the local cache")
    s.add_argument("--base", help="a standalone LLM to align the VLM's language model with")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--vision-tower", help="CLIP checkpoint for an original LLaVA that does not embed its tower")
    s.add_argument("--cache-dir", help="Hugging Face cache to look model ids up in (default: HF_HUB_CACHE)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("chat-vector", help="ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)")
    s.add_argument("--vlm", required=True, help="the English VLM (LLaVA-1.5 / LLaVA-1.6, any supported layout)")
    s.add_argument("--en-base", required=True, help="the English LLM the VLM was tuned from")
    s.add_argument("--ja-base", required=True, help="the Japanese LLM continued-pretrained from the same base")
    s.add_argument("--out", required=True, help="output directory (written atomically)")
    s.add_argument("--scale", type=float, default=1.0, help="global chat-vector scale (default 1.0)")
    s.add_argument("--layer-scales", help="comma-separated per-layer multipliers, one per decoder layer")
    s.add_argument("--module-scale", action="append", metavar="NAME=X",
                   help="per-module multiplier: attention, mlp, norms, embeddings, lm_head (repeatable)")
    s.add_argument("--skip", default=DEFAULT_SKIP,
                   help=f"tensors that keep the Japanese base's value: presets ({', '.join(SKIP_PRESETS)}) "
                        f"and/or regexes on canonical LLM keys, comma-separated (default: {DEFAULT_SKIP})")
    _add_output_options(s)
    s.set_defaults(func=cmd_chat_vector)

    s = sub.add_parser("merge", help="merge by a recipe (ours or mergekit's YAML)")
    s.add_argument("recipe", help="recipe YAML (e.g. a merged model's merge_recipe.yaml to reproduce it)")
    s.add_argument("out", help="output directory (written atomically)")
    s.add_argument("--device", default="cpu", help="where the merge arithmetic runs: cpu (default) or cuda")
    _add_output_options(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("validate", help="check a recipe against its sources without merging")
    s.add_argument("recipe")
    s.add_argument("--vision-tower", help="CLIP checkpoint for original-LLaVA VLMs that do not embed theirs")
    s.add_argument("--cache-dir", help="Hugging Face cache to look model ids up in (default: HF_HUB_CACHE)")
    _add_text_config_option(s)
    s.set_defaults(func=cmd_validate)
    if command not in sub.choices:  # a core command imports no other command's module
        grouped = {c for g in COMMAND_GROUPS for c in g.commands}
        for group in COMMAND_GROUPS:
            if command in group.commands or command not in grouped:
                _add_group(sub, group)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    try:
        _require_group(command)
    except VlmMergeError as e:
        print(f"vlm-merge: error: {e}", file=sys.stderr)
        return 2
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except VlmMergeError as e:
        print(f"vlm-merge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlm-merge: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
