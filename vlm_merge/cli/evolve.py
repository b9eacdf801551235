"""`vlm-merge evolve` (the `evolve` extra): run or resume an evolutionary merge from a config file."""

from __future__ import annotations

from vlm_merge.cli.push import add_push_options
from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve import EvolveInterrupted, run_evolve


def cmd_evolve(args) -> int:
    import sys
    from pathlib import Path

    from vlm_merge.cli.push import check_push, push_after
    from vlm_merge.io.tracking import EvolveTracking, Tracker, check_report_to

    if args.config is None and not args.resume:
        raise VlmMergeError("evolve: give CONFIG.yaml, or --resume with the run directory")
    out = args.out or (args.resume if isinstance(args.resume, str) else None)
    if out is None:
        raise VlmMergeError("evolve: --out DIR is required")
    check_push(args)
    tracking = EvolveTracking(Tracker(check_report_to(args.report_to), Path(out), f"evolve {Path(out).name}"))
    try:
        res = run_evolve(args.config, out, resume=bool(args.resume), force=args.force, progress=not args.quiet,
                         workers=args.workers, on_candidates=tracking)
        tracking.finish({"generations": res.generations, "evaluations": res.evaluations})
    except EvolveInterrupted as e:
        print(f"vlm-merge: {e}", file=sys.stderr)
        return 130
    finally:
        tracking.tracker.close()  # what was logged so far, when the run stops early
    b = res.best
    print(f"{res.evaluations} candidates in {res.generations} generations"
          + (f" over {len(res.best['x'])} genes ({len(res.held_genes)} inert genes held, see summary.json)" if b and res.held_genes else "")
          + "; "
          + (f"best fitness {b['fitness']:.6g} (evaluation {b['evaluation']}); " if b else "no candidate succeeded; ")
          + f"outputs in {res.out}")
    if args.push_to_hub:
        from vlm_merge.io.card import eval_rows_from_test_report

        push_after(args, res.model, eval_rows_from_test_report(res.out / "test_report.json") if res.test else ())
    return 0


def add_evolve_commands(subparsers) -> None:
    """Register `vlm-merge evolve` on the CLI's subparsers."""
    s = subparsers.add_parser("evolve", help="evolutionary merge: CMA-ES over per-layer merge parameters with a VQA fitness")
    s.add_argument("config", nargs="?", help="evolve config YAML (sources, method, genome, fitness, cmaes)")
    s.add_argument("--out", help="run directory (log, checkpoint, best recipe, model, plot)")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue the run in DIR (or in --out) from its last checkpoint")
    s.add_argument("--workers", type=int, help="Ray actors evaluating candidates in parallel (overrides the config)")
    s.add_argument("--force", action="store_true", help="replace an existing run directory")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.add_argument("--offline", action="store_true", help="never download: Hugging Face ids come from the cache only")
    s.add_argument("--report-to", action="append", metavar="BACKEND",
                   help="track the search in tensorboard (OUT/tensorboard/) and/or wandb (repeatable or comma-separated)")
    add_push_options(s, eval_runs=False)
    s.set_defaults(func=cmd_evolve)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlm_merge.cli.evolve ...`: the `vlm-merge evolve` command on its own (`vlm-merge`'s `main`)."""
    import sys

    from vlm_merge.cli import main as cli_main

    return cli_main(["evolve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # run through the imported module (one copy of its classes, e.g. EvolveInterrupted)
    from vlm_merge.cli.evolve import main as _main

    raise SystemExit(_main())
