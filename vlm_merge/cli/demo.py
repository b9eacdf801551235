"""`vlm-merge demo`: Chat Vector and an evolutionary merge on the miniature zoo (the `demo` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlm_merge.world.demo import QUICK, REPORT_HTML, REPORT_MD, DemoSettings, run_demo

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
