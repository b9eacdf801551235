"""Session-17 experiment (EXPERIMENTS.md, "Session 17"): a world that changes one stage of an existing zoo, retrained
on that zoo's other parts in a fraction of a build's time.

    python research/miniature-world/experiments/restage.py ZOO OUT STAGE '{"vlm_replay_mix": {...}, ...}'

STAGE is `en-vlm` (the VLM stage, on ZOO's English base: `build.train_en_vlm`) or `ja-base` (the Japanese continued
pretraining of ZOO's English base: `build.train_ja_base`); neither depends on the other. OUT gets links to ZOO's other
parts (en-base, ja-base or en-vlm, data, and dev3 if there) and the stage retrained with ZOO's settings plus the
overrides and ZOO's seed, as `build_zoo` trains it; zoo.json records the new settings and, under `restaged`, the
stage's seconds and the source zoo's stage times (no `timings_s`: they were not this zoo's). `vlm-merge zoo bar --zoo
OUT --out DIR` then measures it. With no overrides the retrained stage is ZOO's, byte for byte (checked for ja-base on
E8 seed 1). A zoo.json written before session 17 holds its mixes with sorted keys, and a mix is drawn from in its
keys' order (`text.mixture_sampler`): pass a mix that differs from the defaults again as an override.
"""

import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from vlm_merge.engine.threads import torch_threads
from vlm_merge.world import build, text, train

STAGES = ("ja-base", "en-vlm")


def main(zoo: Path, out: Path, stage: str, overrides: dict) -> None:
    if stage not in STAGES:
        raise SystemExit(f"STAGE {stage!r}: one of {', '.join(STAGES)}")
    meta = json.loads((zoo / "zoo.json").read_text())
    # zoo.json stored the mixes with sorted keys before session 17, and a mix is drawn from in its keys' order: overlay
    # only the settings that differ from the defaults, so that unchanged mixes keep the defaults' order
    defaults = train.WorldSettings().as_dict()
    s = train.WorldSettings.with_overrides(overrides, {k: v for k, v in meta["settings"].items() if v != defaults[k]})
    seed = meta["seed"]
    out.mkdir(parents=True)
    for part in ("en-base", *STAGES, "data", "dev3"):
        if part != stage and (zoo / part).exists():
            (out / part).symlink_to((zoo / part).resolve())
    tok = Tokenizer.from_file(str(zoo / "en-base" / "tokenizer.json"))
    en = LlamaForCausalLM.from_pretrained(zoo / "en-base")
    t0 = time.perf_counter()
    with torch_threads(s.threads):
        if stage == "ja-base":
            build.save_llm(build.train_ja_base(en, tok, s, seed, True, []), tok, out / "ja-base")
        else:
            tower = build.train_tower(s, seed, False, [])
            steps, checks = build.train_en_vlm(en, tower, text.vlm_tokenizer(tok), s, seed, zoo / meta["data"]["en-dev"],
                                               out / "en-vlm", True, [])
            meta |= {"vlm_steps": steps, "vlm_checks": checks}
    # the stage times of the build this zoo came from are not this zoo's: kept under `restaged`, beside the stage's own
    meta |= {"settings": s.as_dict(), "restaged": {"from": str(zoo.resolve()), "stage": stage, "overrides": overrides,
                                                   "seconds": round(time.perf_counter() - t0, 1),
                                                   "source_timings_s": meta.pop("timings_s", None)}}
    build.write_zoo_json(out, meta)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
