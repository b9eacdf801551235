"""Linear methods: task arithmetic (task vectors added to a base or an anchor), saved task vectors
applied, and the weighted average (mergekit `task_arithmetic`'s plain form and `linear`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023):

        out = a + sum_i w_i * (m_i - b),    a = anchor if given, else b

    With `anchor=None` this is mergekit's `task_arithmetic` (task vectors added back to the base).
    Chat Vector is the anchored form: b = English base, m_1 = the VLM's language model,
    w_1 = scale, a = the Japanese base: `ja + scale * (vlm - en)`.
    """
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    start = base if anchor is None else anchor
    out: torch.Tensor | None = None
    for m, w in zip(models, weights):
        if w == 0:
            continue
        d = m.to(torch.float32, copy=True)
        d.sub_(base)
        if out is None and len(models) == 1:
            # Fused single-vector form: one float32 temporary instead of two.
            if w != 1:
                d.mul_(w)
            return d.add_(start)
        if out is None:
            out = start.to(torch.float32, copy=True)
        out.add_(d, alpha=w)
    return out if out is not None else start.to(torch.float32, copy=True)


def add_task_vectors(
    anchor: torch.Tensor, vectors: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Apply saved task vectors:

        out = a + sum_i w_i * v_i

    With v_i = m_i - b this equals `task_arithmetic(b, [m_i], [w_i], anchor=a)` bit for bit (same
    operations in the same order), which is how a saved Chat Vector is applied.
    """
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    if len(vectors) == 1 and weights[0] != 0:
        d = vectors[0].to(torch.float32, copy=True)
        if weights[0] != 1:
            d.mul_(weights[0])
        return d.add_(anchor)
    out = anchor.to(torch.float32, copy=True)
    for v, w in zip(vectors, weights):
        if w != 0:
            out.add_(v.to(torch.float32), alpha=w)
    return out


def difference(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Task vector (Ilharco et al. 2023):  v = m - b  (float32)."""
    d = model.to(torch.float32, copy=True)
    return d.sub_(base)



def weight_sum(weights: Sequence[float]) -> float:
    """sum(w) in float32, as mergekit computes it."""
    return float(torch.tensor(list(weights), dtype=torch.float32).sum())


def linear(models: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average (Wortsman et al. 2022, model soups), mergekit `linear`:

        out = sum_i w_i m_i / sum_i w_i      (normalize, the default)
        out = sum_i w_i m_i                  (normalize off)

    mergekit: a zero weight sum divides by zero (inf/NaN); here it raises ValueError.
    """
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    if not models:
        raise ValueError("models: linear needs at least 1 model")
    out = torch.zeros(models[0].shape, dtype=torch.float32, device=models[0].device)
    for m, w in zip(models, weights):
        out.add_(m, alpha=w)
    if normalize:
        total = weight_sum(weights)
        if total == 0:
            raise ValueError(f"weight: {list(weights)} sum to 0; cannot normalize")
        out.div_(total)
    return out

