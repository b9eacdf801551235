"""Session-11 experiment data (EXPERIMENTS.md, "Session 11", runs R2 and R4): extra Japanese fitness questions.

ja-dev has 300 questions, so a search that scores candidates on it fits its noise. This writes N more ("dev2"),
one question per image as in ja-dev, in the zoo's own wording (its zoo.json settings), on new scenes from the RNG
"world-<seed>-dev2". The scenes of the zoo's dev and test splits are replayed and excluded (the replay is checked
against ja-dev's first question); ja-test is never read.

    python research/miniature-world/experiments/evolve/dev2.py assets/miniature-zoo 3000 research/miniature-world/experiments/evolve/dev2
"""

import json
import random
import sys
from pathlib import Path

from vlm_merge.world import datasets, scenes
from vlm_merge.world.train import WorldSettings


def main(zoo_dir: Path, n: int, out: Path) -> None:
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    book = WorldSettings(**zoo["settings"]).phrasebook()
    seen: set = set()
    for split, (count, per) in datasets.SPLITS.items():  # the zoo's own scenes, excluded below
        datasets.build_split(random.Random(f"world-{zoo['seed']}-{split}"), count, per, seen, book.qtypes)
    first = json.loads((zoo_dir / "data" / "ja-dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    sc, qs = datasets.build_split(random.Random(f"world-{zoo['seed']}-dev"), 1, 1, set(), book.qtypes)[0]
    qa = book.make_qa(sc, qs[0][0], "ja", qs[0][1], qs[0][2])
    if (qa.question, qa.answer) != (first["question"], first["answer"]):
        raise SystemExit(f"the replay of ja-dev does not match its first question ({qa.question} / {first['question']})")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (sc, qs) in enumerate(datasets.build_split(random.Random(f"world-{zoo['seed']}-dev2"), n, 1, seen, book.qtypes)):
        image = f"images/dev2-{i:04d}.png"
        scenes.draw_scene(sc).save(out / image, optimize=True)
        for j, (qtype, args, phrasing) in enumerate(qs):
            qa = book.make_qa(sc, qtype, "ja", args, phrasing)
            rows.append({"question_id": f"dev2-{i:04d}-{j}", "image": image, "question": qa.question, "answer": qa.answer,
                         "attribute": qa.attribute, "value": qa.value, "qtype": qtype, "lang": "ja"})  # fmt: skip
    (out / "ja-dev2.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} questions in {out / 'ja-dev2.jsonl'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
