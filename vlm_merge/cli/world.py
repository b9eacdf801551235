"""`vlm-merge zoo …`: build the miniature world, measure the bar.

Registered by `vlm_merge.cli` (its `COMMAND_GROUPS`) with `add_world_commands(sub)` on its subparsers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

SMOKE = {  # a few seconds per stage: proves the pipeline, trains nothing useful
    "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "vision_hidden": 32, "batch": 8,
    "en_steps": 8, "ja_steps": 4, "vision_steps": 4, "vlm_steps": 8, "vlm_min_steps": 4, "vlm_check_every": 4,
    "ja_train_layers": [1], "vlm_train_layers": [0],  # the shipped split (VLM below, Japanese above) in 2 layers
}


def _settings(args: argparse.Namespace):
    from vlm_merge.errors import VlmMergeError
    from vlm_merge.world.train import WorldSettings

    overrides = {}
    for item in getattr(args, "set", None) or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise VlmMergeError(f"--set {item}: expected NAME=JSON, e.g. --set vlm_steps=2400")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError as e:
            raise VlmMergeError(f"--set {item}: the value is not JSON ({e.msg}); e.g. --set vlm_steps=2400, "
                                f"--set group_by_length=true, --set 'en_mix={{\"qa-en\": 1.0}}'") from None
        except RecursionError:
            raise VlmMergeError(f"--set {name}=...: the value is nested too deeply") from None
    return WorldSettings.with_overrides(overrides, SMOKE if getattr(args, "smoke", False) else None)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from vlm_merge.world.build import build_zoo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t = time.perf_counter()
    out = build_zoo(args.out, args.seed, _settings(args), progress=not args.quiet, force=args.force,
                    dev_check=20 if args.smoke else 150)
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s (log: {Path(out) / 'train_log.json'})")
    return 0


def cmd_zoo_bar(args: argparse.Namespace) -> int:
    from eval.outputs import dumps, write_atomic
    from vlm_merge.errors import VlmMergeError
    from vlm_merge.world.build import build_zoo
    from vlm_merge.io.outputs import check_output, output_error
    from vlm_merge.world.experiment import SCALES, format_record, measure_bar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = _settings(args)
    if args.zoo and not (Path(args.zoo) / "zoo.json").is_file():
        raise VlmMergeError(f"--zoo {args.zoo}: no zoo.json there, so it is not a built zoo; build one with "
                            "`vlm-merge zoo build --out DIR`, or leave out --zoo to build one per seed under --out")
    if args.limit is not None and args.limit < 1:
        raise VlmMergeError(f"--limit {args.limit}: must be a positive number of questions")
    out = check_output(args.out, [args.zoo])  # its zoo-SEED / work-SEED / bar.json are written under it
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(args.out, e) or e from None
    records = []
    for seed in args.seeds:
        zoo = Path(args.zoo) if args.zoo else out / f"zoo-{seed}"
        if not (zoo / "zoo.json").exists():
            build_zoo(zoo, seed, settings, progress=not args.quiet, force=True)
        rec = measure_bar(zoo, out / f"work-{seed}", scales=tuple(args.scales or SCALES), threads=settings.threads,
                          limit=args.limit, progress=not args.quiet)
        print(format_record(rec), flush=True)
        records.append(rec)
        if args.zoo:
            break
    write_atomic(out / "bar.json", dumps(records))
    holds = all(r["bar"]["holds"] for r in records)
    print(f"bar holds in {sum(r['bar']['holds'] for r in records)}/{len(records)} seeds; record: {out / 'bar.json'}")
    return 0 if holds else 1


def add_world_commands(subparsers) -> None:
    """Register `zoo build` and `zoo bar` on the `vlm-merge` subparsers."""
    zoo = subparsers.add_parser("zoo", help="the miniature world: tiny EN/JA LMs and an EN VLM trained on CPU")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="train the zoo of a seed (<= 10 min on 2 CPU cores) into --out")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    b.add_argument("--force", action="store_true", help="replace --out")
    b.add_argument("--smoke", action="store_true", help="tiny sizes and steps (seconds; for tests)")
    b.add_argument("--set", action="append", metavar="NAME=JSON", help="override a WorldSettings field")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_zoo_build)
    m = zsub.add_parser("bar", help="controls vs Chat Vector on the Japanese test set, per seed")
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m.add_argument("--zoo", help="measure this built zoo instead of building one per seed")
    m.add_argument("--out", required=True)
    m.add_argument("--scales", type=float, nargs="+", metavar="S",
                   help="Chat Vector scales tried on dev, each with and without the embedding delta "
                        "(default: 0.25 0.5 0.75 1.0 1.25 1.5)")
    m.add_argument("--limit", type=int, help="score only the first N questions of each split (a quick look; "
                   "the bar is defined on the whole sets)")
    m.add_argument("--smoke", action="store_true")
    m.add_argument("--set", action="append", metavar="NAME=JSON")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_zoo_bar)
