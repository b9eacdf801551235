"""Session 14 (EXPERIMENTS.md): which training stage's sums depend on the CPU thread count.

    python research/miniature-world/experiments/thread_probe.py ZOO

Trains the vision tower of seed 0 with today's settings on 1 and on 2 threads, without the one-thread pin that
`train.train_vision` adds, then the VLM stage for 40 steps from one of those towers (on ZOO's English base) on 1
and on 2 threads, and prints how many tensors differ in each pair. Run alone: two threads on a busy 2-core machine
are very slow.
"""

import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from vlm_merge.world import text, train
from vlm_merge.world.build import build_vlm


def differing(a: torch.nn.Module, b: torch.nn.Module) -> tuple[int, list[str]]:
    sa, sb = a.state_dict(), b.state_dict()
    return len(sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def main(zoo: Path, seed: int = 0, steps: int = 40) -> None:
    s = train.WorldSettings()
    tok = text.build_tokenizer(seed, s.phrasebook())
    vlm_tok = text.vlm_tokenizer(tok)
    en = LlamaForCausalLM.from_pretrained(zoo / "en-base")

    def vision(threads: int):
        torch.set_num_threads(threads)
        return train._train_vision(s, seed * 1000 + 3, False, [])

    def vlm_stage(threads: int, tower):
        torch.set_num_threads(threads)
        vlm = build_vlm(en, copy.deepcopy(tower), vlm_tok, s, seed * 1000 + 4)
        quick = replace(s, vlm_min_steps=0, vlm_check_every=steps)  # stop at the first check
        train.train_vlm(vlm, vlm_tok, quick, seed * 1000 + 5, False, [], lambda step: True)
        return vlm

    one = vision(1)
    n, diff = differing(one, vision(2))
    print(f"vision tower, 1 vs 2 threads: {len(diff)} of {n} tensors differ {diff[:4]}")
    n, diff = differing(vlm_stage(1, one), vlm_stage(2, one))
    print(f"VLM stage ({steps} steps, one tower), 1 vs 2 threads: {len(diff)} of {n} tensors differ {diff[:4]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
