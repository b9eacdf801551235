"""Session-8 experiment (EXPERIMENTS.md, "Session 8"): the world without some question types.

Sessions 5-6 found the two positional types (`what_at`: cell -> object, `where`: object -> cell) the ones that
keep the English VLM below the 0.95 the bar asks of it (0.77 / 0.62 after 3000 VLM steps, every other type
0.86-1.00). `"drop_qtypes": ["what_at", "where"]` removes them from every question stream of the build (the
text corpora, the VLM stage, the dev/test splits); the scenes still place objects on the 3x3 grid and the
descriptions still name their cells. Since session 10 this is the world setting `qtypes` (the types kept).
Other settings go to `ja_questions.py` (short answers, its options).

    python research/miniature-world/experiments/question_types.py OUT '{"drop_qtypes": ["what_at", "where"], ...}' SEED
"""

import json
import sys

import ja_questions

from vlm_merge.world import scenes


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = json.loads(settings)
    dropped = cfg.pop("drop_qtypes", [])
    unknown = set(dropped) - set(scenes.QTYPES)
    if unknown:
        raise SystemExit(f"drop_qtypes: unknown question types {sorted(unknown)}; known: {scenes.QTYPES}")
    if dropped:
        cfg["qtypes"] = [q for q in scenes.QTYPES if q not in dropped]
    return ja_questions.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
