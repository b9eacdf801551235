"""`vlm-merge` command line. Errors in the user's input print one line and exit with status 2.

One module per command group: `core` (inspect, chat-vector, merge, validate: the light install), `push`
(publishing to the Hugging Face Hub, also light), `demo`, `evolve`, `world` (zoo build / bar), `gguf`
(export-gguf); eval's commands live in `eval.cli`. `COMMAND_GROUPS` names each group's
pip extra, and a group's module is imported only when one of its commands runs (or for `--help`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from importlib import import_module

from vlm_merge.cli.core import add_core_commands
from vlm_merge.cli.parsing import OneLineParser
from vlm_merge.cli.push import add_push_command
from vlm_merge.errors import VlmMergeError
from vlm_merge.extras import missing_requirements, require_extra


@dataclass(frozen=True)
class CommandGroup:
    """Commands outside the light core: the pip extra they need and the function (`module:name`, given the
    subparsers) that registers them; the module is imported only when one of them runs, or for `--help`."""

    extra: str
    commands: tuple[str, ...]
    register: str


COMMAND_GROUPS = (
    CommandGroup("eval", ("eval", "score", "compare", "caption"), "eval.cli:add_eval_commands"),
    CommandGroup("evolve", ("evolve",), "vlm_merge.cli.evolve:add_evolve_commands"),
    CommandGroup("demo", ("demo",), "vlm_merge.cli.demo:add_demo_command"),
    CommandGroup("demo", ("zoo",), "vlm_merge.cli.world:add_world_commands"),  # zoo build, zoo bar
    CommandGroup("gguf", ("export-gguf",), "vlm_merge.cli.gguf:add_gguf_commands"),
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

    p = OneLineParser(prog="vlm-merge", description="Build Japanese VLMs by merging checkpoints.")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)
    add_core_commands(sub)
    add_push_command(sub)
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
    if getattr(args, "offline", False):  # read by vlm_merge.io.hub, huggingface_hub's children and Ray workers
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return args.func(args)
    except VlmMergeError as e:
        print(f"vlm-merge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlm-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
