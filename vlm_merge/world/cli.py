"""`vlm-merge zoo …`: build the miniature world, measure the bar.

Wire into `vlm_merge.cli.build_parser` with `add_world_commands(sub)` where `sub` is its subparsers object.
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
}


def _settings(args: argparse.Namespace):
    from vlm_merge.world.train import WorldSettings

    kw = dict(SMOKE) if getattr(args, "smoke", False) else {}
    for item in getattr(args, "set", None) or []:
        name, _, value = item.partition("=")
        kw[name] = json.loads(value)
    return WorldSettings(**kw)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    import torch

    from vlm_merge.world.build import build_zoo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    t = time.perf_counter()
    out = build_zoo(args.out, args.seed, _settings(args), progress=not args.quiet, force=args.force,
                    dev_check=20 if args.smoke else 150)
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s (log: {Path(out) / 'train_log.json'})")
    return 0


def cmd_zoo_bar(args: argparse.Namespace) -> int:
    from vlm_merge.world.build import build_zoo
    from vlm_merge.world.experiment import format_record, measure_bar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        zoo = Path(args.zoo) if args.zoo else out / f"zoo-{seed}"
        settings = _settings(args)
        if not (zoo / "zoo.json").exists():
            build_zoo(zoo, seed, settings, progress=not args.quiet, force=True)
        rec = measure_bar(zoo, out / f"work-{seed}", threads=settings.threads)
        print(format_record(rec), flush=True)
        records.append(rec)
        if args.zoo:
            break
    (out / "bar.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
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
    m.add_argument("--smoke", action="store_true")
    m.add_argument("--set", action="append", metavar="NAME=JSON")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_zoo_bar)
