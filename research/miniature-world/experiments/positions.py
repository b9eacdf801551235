"""Session-6 experiment (EXPERIMENTS.md, "The English VLM at 0.95"): position questions a 4-layer LM can learn.

Session 5 found `what_at` (cell -> object) below 0.5 after 3000 VLM steps and `where` at 0.4: the English
position names are not compositional ("top" is the top *middle* cell, "top left" a corner), so a query built
from the question's position words has to undo one word when the other is present. Here:
- English positions are named by row and column ("top left", "top middle", "middle left", "center", ...),
  as the Japanese ones already are single words (左上, 上, 左, 真ん中);
- the vision tower is pretrained with a row head and a column head besides its patch-content and cell heads,
  so a patch's row and column are each a direction of its features;
- short answers (`short_answers.py`).
`"row_col_vision": false` keeps the shipped vision tower (patch content and cell heads only).

    python research/miniature-world/experiments/positions.py OUT '{"threads": 1, "group_by_length": true, ...}' SEED
"""

import json
import random
import sys

import short_answers
import torch

from vlm_merge.world import scenes, train

POSITIONS = {
    0: ("top left", "左上"), 1: ("top middle", "上"), 2: ("top right", "右上"),
    3: ("middle left", "左"), 4: ("center", "真ん中"), 5: ("middle right", "右"),
    6: ("bottom left", "左下"), 7: ("bottom middle", "下"), 8: ("bottom right", "右下"),
}  # fmt: skip


def row_col_vision(s, seed: int, progress: bool, losses: list):
    """`train.train_vision` plus a row head and a column head."""
    torch.manual_seed(seed)
    tower = train.CLIPVisionModel(train.vision_config(s))
    n = scenes.GRID
    heads = [torch.nn.Linear(s.vision_hidden, k) for k in (train.N_PATCH_CLASSES, n * n, n, n)]
    cells = torch.arange(n * n)
    rng = random.Random(seed)

    def batch_fn(step: int) -> torch.Tensor:
        sc = [scenes.sample_scene(rng) for _ in range(64)]
        h = tower(pixel_values=train.pixels([scenes.draw_scene(x) for x in sc])).last_hidden_state[:, 1:]
        targets = [torch.tensor([train._patch_labels(x) for x in sc]), cells.repeat(len(sc), 1),
                   (cells // n).repeat(len(sc), 1), (cells % n).repeat(len(sc), 1)]
        return sum(torch.nn.functional.cross_entropy(head(h).reshape(-1, head.out_features), y.reshape(-1))
                   for head, y in zip(heads, targets))

    tower.train()
    train._loop(list(tower.parameters()) + [p for h in heads for p in h.parameters()], s.vision_steps, 3e-3, batch_fn,
                "vision tower", progress, losses)
    tower.eval()
    return tower


def patch(row_col: bool = True) -> None:
    scenes.POSITIONS.clear()
    scenes.POSITIONS.update(POSITIONS)
    if row_col:
        train.train_vision = row_col_vision


def main(argv: list[str]) -> int:
    out, settings, seed = argv
    cfg = json.loads(settings)
    patch(cfg.pop("row_col_vision", True))
    return short_answers.main([out, json.dumps(cfg), seed])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
