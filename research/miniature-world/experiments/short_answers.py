"""Session-3 experiment (EXPERIMENTS.md, runs E1-E6): the miniature world with short answers.

Every answer becomes the asked value's word(s), as in VQAv2 / JA-VG-VQA ("two" / "二つ", "red" / "赤",
"top left" / "左上", "a red circle" / "赤い丸", "nothing" / "何もありません", zero "none" / "ありません"),
then `vlm-merge zoo bar` runs with the given settings. Short answers were an experiment patch in sessions 3-9
and are the world setting `answers` since session 10 (`scenes.Phrasebook`), so this is now
`vlm-merge zoo bar --set answers='"short"' --set ...`; the other experiment scripts build on it.

    python research/miniature-world/experiments/short_answers.py OUT '{"threads": 1, ...}' SEED
"""

import json
import sys

from vlm_merge.world import train

# The settings these scripts ran on before session 10: the world's defaults of that time (v3) plus short answers.
# Session 10 changed the defaults (run Z3), so the scripts start from these and a run's JSON overrides them, and a
# zoo.json written before session 10 (which records no wording) is read with them.
BEFORE_SESSION_10 = {
    "en_steps": 700, "vlm_steps": 1500, "group_by_length": False, "vlm_lr": 0.001, "vlm_lm_lr_scale": 0.5,
    "vlm_train_vocab": True, "ja_train_layers": None, "vlm_train_layers": None,
    "en_mix": {"qa-en": 0.5, "xqa-en": 0.05, "xqa-ja": 0.1, "text-en": 0.1, "qa-ja": 0.05, "text-ja": 0.05, "para": 0.15},
    "qtypes": None, "vlm_replay_mix": None, "answers": "short", "count_digits": False, "ja_order": "natural",
}


def recorded_settings(settings: dict) -> train.WorldSettings:
    """The settings of a zoo built by these scripts, from its zoo.json `settings`."""
    return train.WorldSettings(**(BEFORE_SESSION_10 | settings))


def main(argv: list[str]) -> int:
    from vlm_merge.cli import main as cli

    out, settings, seed = argv
    args = ["zoo", "bar", "--seeds", seed, "--out", out, "--quiet"]
    for k, v in (BEFORE_SESSION_10 | json.loads(settings)).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
