"""Publishing from the command line: `vlm-merge push DIR ORG/NAME` and the `--push-to-hub` options that
`chat-vector`, `merge` and `evolve` share (`add_push_options`, `check_push`, `push_output`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_merge.errors import VlmMergeError


def add_push_options(s: argparse.ArgumentParser, *, eval_runs: bool = True) -> None:
    """`--push-to-hub ORG/NAME`, `--private` and (where the model is not scored by the command itself)
    `--eval-run DIR` for the card's evaluation table."""
    s.add_argument("--push-to-hub", metavar="ORG/NAME", help="publish the output to this Hub model repo when done")
    s.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    if eval_runs:
        s.add_argument("--eval-run", action="append", metavar="DIR",
                       help="a `vlm-merge eval --out` run of this model whose scores go into the published card (repeatable)")


def _eval_rows(runs: list[str] | None) -> list:
    from vlm_merge.io.card import eval_rows_from_run

    return [row for run in runs or () for row in eval_rows_from_run(run)]


def check_push(args: argparse.Namespace) -> None:
    """Everything about `--push-to-hub` that can fail, checked before the command does its work."""
    if getattr(args, "private", False) and not getattr(args, "push_to_hub", None):
        raise VlmMergeError("--private: only with --push-to-hub ORG/NAME")
    if getattr(args, "eval_run", None) and not getattr(args, "push_to_hub", None):
        raise VlmMergeError("--eval-run: only with --push-to-hub ORG/NAME (it fills the published card)")
    if args.push_to_hub:
        from vlm_merge.io.hub import check_can_push

        check_can_push(args.push_to_hub)
        _eval_rows(getattr(args, "eval_run", None))


def push_output(model_dir: str | Path, repo_id: str, *, private: bool = False, evals=(), api=None) -> str:
    """Publish vlm-merge output `model_dir` to `repo_id` with its public card (`vlm_merge.io.card.public_card`);
    returns the repo's URL. `api`: an `HfApi`-like object (default: huggingface_hub's)."""
    from vlm_merge.io.card import public_card
    from vlm_merge.io.hub import push_folder

    card = public_card(model_dir, evals)
    return push_folder(model_dir, repo_id, card, private=private, api=api)


def push_after(args: argparse.Namespace, model_dir: Path | None, evals=()) -> None:
    """The end of a command with `--push-to-hub`: publish `model_dir` and say where it went."""
    if not args.push_to_hub:
        return
    if model_dir is None:
        raise VlmMergeError(f"--push-to-hub {args.push_to_hub}: the run wrote no model to publish")
    url = push_output(model_dir, args.push_to_hub, private=args.private,
                      evals=[*evals, *_eval_rows(getattr(args, "eval_run", None))])
    print(f"pushed {model_dir} to {url}")


def cmd_push(args: argparse.Namespace) -> int:
    from vlm_merge.io.card import TEST_REPORT_FILE, eval_rows_from_test_report
    from vlm_merge.io.hub import check_can_push

    check_can_push(args.repo_id, "push")
    model_dir = Path(args.dir)
    if not model_dir.is_dir():
        raise VlmMergeError(f"{model_dir}: no such directory; pass a vlm-merge output (chat-vector, merge, evolve's model/)")
    report = model_dir.parent / TEST_REPORT_FILE  # evolve's held-out report beside its model/
    evals = eval_rows_from_test_report(report) if model_dir.name == "model" and report.is_file() else []
    args.push_to_hub = args.repo_id
    push_after(args, model_dir, evals)
    return 0


def add_push_command(sub) -> None:
    """Register `vlm-merge push` on the CLI's subparsers."""
    s = sub.add_parser("push", help="publish a vlm-merge output to the Hugging Face Hub (model card included)")
    s.add_argument("dir", help="the output directory (of chat-vector, merge, or an evolve run's model/)")
    s.add_argument("repo_id", metavar="ORG/NAME", help="the Hub model repo (created if missing)")
    s.add_argument("--private", action="store_true", help="create the repo private")
    s.add_argument("--eval-run", action="append", metavar="DIR",
                   help="a `vlm-merge eval --out` run of this model whose scores go into the card (repeatable)")
    s.set_defaults(func=cmd_push)
