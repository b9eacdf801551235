"""Session-11 experiment (EXPERIMENTS.md, "Session 11", runs C1 and C2): scene descriptions that state the counts.

`diagnose.py reading` on the shipped zoo: the text bases answer count questions about a described scene at the
answer prior (English base 0.46-0.73 per count type, about the share of "1"), while they read colours and shapes.
The descriptions list every object on its own ("there is a red circle at the top left, a red circle ..."), and
the 4-layer bases never learn to add them up. So no count skill exists in the bases' upper layers for the English
VLM's lower layers to hook into: the VLM learns counting as its own mapping onto the English base's frozen
upper layers and vocabulary, which the Japanese base's retrained ones do not share; Chat Vector answers the prior.

This patch words every description by groups with their counts, in digits as the answers are
("there are 2 red circles and 1 blue square." / "赤い丸が2個、青い四角が1個あります。"), so reading a count
from text is copying it (count_both) or adding two or three (count_color, count_shape), as reading a colour is
copying it. Positions are not described (the shipped world asks no positional questions). Other settings go to
word_order.py.

    python research/miniature-world/experiments/counted_descriptions.py OUT SETTINGS_JSON SEED
"""

import collections
import sys

import word_order

from vlm_merge.world import scenes


def counted(scene: scenes.Scene, lang: str, ja_order: str = "natural") -> str:
    groups = collections.Counter((o.color, o.shape) for o in scene.objects)
    if lang == "en":
        parts = [f"{n} {scenes.en_obj(c, s, n)}" for (c, s), n in groups.items()]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"there {'is' if len(parts) == 1 and next(iter(groups.values())) == 1 else 'are'} {body}."
    return "、".join(f"{scenes.ja_obj(c, s)}が{n}個" for (c, s), n in groups.items()) + "あります。"


if __name__ == "__main__":
    scenes.describe = counted
    raise SystemExit(word_order.main(sys.argv[1:]))
