"""Session-3 experiment (EXPERIMENTS.md, runs E1-E6): the miniature world with short answers.

Every answer becomes the asked value's word(s), as in VQAv2 / JA-VG-VQA ("two" / "二つ", "red" / "赤",
"top left" / "左上", "a red circle" / "赤い丸", "nothing" / "何もありません", zero "none" / "ありません"),
then `vlm-merge zoo bar` runs with the given settings. Short answers were an experiment patch in sessions 3-9
and are the world setting `answers` since session 10 (`scenes.Phrasebook`), so this is now
`vlm-merge zoo bar --set answers='"short"' --set ...`; the other experiment scripts build on it.

    python assets/miniature-zoo/experiments/short_answers.py OUT '{"threads": 1, ...}' SEED
"""

import json
import sys

from vlm_merge.world import scenes, train

SHORT = {"answers": "short"}


def phrasebook(settings: dict) -> scenes.Phrasebook:
    """The phrasebook of a zoo's recorded settings, short answers unless they say otherwise (zoos built by these
    scripts before session 10 record no `answers`)."""
    return train.WorldSettings(**(SHORT | settings)).phrasebook()


def main(argv: list[str]) -> int:
    from vlm_merge.cli import main as cli

    out, settings, seed = argv
    args = ["zoo", "bar", "--seeds", seed, "--out", out, "--quiet"]
    for k, v in (SHORT | json.loads(settings)).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
