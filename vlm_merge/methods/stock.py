"""Model Stock (Jang et al. 2024): the task vectors' mean, scaled by a ratio from their angles."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_merge.methods.arithmetic import difference


def model_stock(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    filter_wise: bool = False,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), mergekit `model_stock` (N >= 2 models):

        d_i = m_i - b
        cos = mean over pairs i < j of clamp(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)
        t = N cos / (1 + (N - 1) cos)          (t = 0 where |1 + (N - 1) cos| < 1e-6)
        out = t * mean_i m_i + (1 - t) * b  =  a + t * mean_i d_i,    a = anchor or b

    The angle is taken over the whole tensor, or with `filter_wise` per row along the last
    dimension (1-D tensors: the whole vector), giving one t per row.
    """
    n = len(models)
    if n < 2:
        raise ValueError(f"models: model_stock needs at least 2 models besides the base, got {n}")
    deltas = [difference(m, base) for m in models]
    shape = base.shape
    if filter_wise and len(shape) >= 2:
        rows = [d.view(-1, shape[-1]) for d in deltas]
    else:
        rows = [d.view(1, -1) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=1) for r in rows]
    cos_sum = torch.zeros(rows[0].shape[0], dtype=torch.float32, device=base.device)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.bmm(rows[i].unsqueeze(1), rows[j].unsqueeze(2)).view(-1)
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            pairs += 1
    cos = cos_sum / pairs
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
    out = deltas[0]
    for d in deltas[1:]:
        out.add_(d)
    del deltas, rows
    out.div_(n)
    out.view(t.shape[0], -1).mul_(t.unsqueeze(1))
    return out.add_(base if anchor is None else anchor)

