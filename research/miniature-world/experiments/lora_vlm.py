"""Session-3 experiment (EXPERIMENTS.md, run E6): short answers, and the English VLM's language-model
blocks tuned through rank-R LoRA adapters (every Linear in the blocks; baked into the weights after
training, as `llava-v1.5-7b-lora` is merged before use) instead of in full.

    LORA_R=8 python research/miniature-world/experiments/lora_vlm.py OUT '{"threads": 1, ...}' SEED
"""

import os
import sys
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from vlm_merge.world import train

RANK = int(os.environ.get("LORA_R", "8"))


class LoRA(torch.nn.Module):
    """W -> W + B A, B zero-initialised (the tuned model starts as the base)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(RANK, in_features) / in_features**0.5)
        self.B = torch.nn.Parameter(torch.zeros(out_features, RANK))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


def main(argv: list[str]) -> int:
    full = train.train_vlm

    def train_vlm_lora(vlm, *args, **kwargs):
        linears = [m for m in vlm.model.language_model.layers.modules() if isinstance(m, torch.nn.Linear)]
        for m in linears:
            parametrize.register_parametrization(m, "weight", LoRA(*m.weight.shape))
            m.parametrizations.weight.original.requires_grad_(False)
        steps = full(vlm, *args, **kwargs)
        for m in linears:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(True)
        return steps

    train.train_vlm = train_vlm_lora
    import runpy

    module = runpy.run_path(str(Path(__file__).with_name("short_answers.py")))
    return module["main"](argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
