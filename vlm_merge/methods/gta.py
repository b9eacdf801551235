"""mergekit's generalized task arithmetic: one function for task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear, which differ only in the
sparsification of each task vector and whether signs are elected (the registry's rows, as in
mergekit's registry.py, say which).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from vlm_merge.methods.arithmetic import difference, task_arithmetic, weight_sum
from vlm_merge.methods.sparsification import RANDOM_SPARSIFICATIONS, Rescale, Sparsification, sparsify_
from vlm_merge.methods.seeds import make_generator

# Elements per chunk for the final elementwise combination (512 KiB of float32: stays in cache).
COMBINE_CHUNK = 1 << 17


def generalized_task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsification: Sparsification | None = None,
    consensus: Literal["sum"] | None = None,
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "none",
    anchor: torch.Tensor | None = None,
    generator: int | torch.Generator | None = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*):

        v_i = S_i(m_i - b) * w_i                 S_i: sparsification of model i (identity if None)
        consensus "sum":  s = sign(sum_i v_i), with s = +1 where the sum is 0
                          mask_i = [sign(v_i) == s]
                          V = sum_i mask_i * v_i,  D = sum_i mask_i * w_i  (elementwise; 0 -> 1)
        no consensus:     V = sum_i v_i,           D = sum_i w_i           (|D| < 1e-8 -> 1)
        out = a + lambda * (V / D if normalize else V),    a = anchor if given, else b

    With no sparsification, no consensus, normalize off and lambda 1 this is `task_arithmetic`
    itself (bit for bit). Random sparsifications draw from `generator` model by model in order.
    """
    n = len(models)
    if len(weights) != n:
        raise ValueError(f"{n} models but {len(weights)} weights")
    if sparsification is None and consensus is None and not normalize and lambda_ == 1:
        return task_arithmetic(base, models, weights, anchor=anchor)
    densities = [1.0] * n if densities is None else list(densities)
    gammas = [0.01] * n if gammas is None else list(gammas)
    epsilons = [0.15] * n if epsilons is None else list(epsilons)
    if not len(densities) == len(gammas) == len(epsilons) == n:
        raise ValueError(f"{n} models but {len(densities)} densities, {len(gammas)} gammas, {len(epsilons)} epsilons")
    if consensus not in (None, "sum"):
        raise ValueError(f"consensus: {consensus!r} not one of None, 'sum'")
    gen = None
    if sparsification in RANDOM_SPARSIFICATIONS and any(x < 1 for x in densities):
        gen = make_generator(generator)
    start = base if anchor is None else anchor

    kept: list[torch.Tensor] = []
    mixed: torch.Tensor | None = None
    base32 = base.to(torch.float32)  # once: float32 - bfloat16 in place is a slow mixed-dtype kernel
    for i, (m, w) in enumerate(zip(models, weights)):
        d = difference(m, base32)
        if sparsification is not None:
            sparsify_(d, sparsification, densities[i], gamma=gammas[i], epsilon=epsilons[i], rescale=rescale, gen=gen)
        if w != 1:
            d.mul_(w)
        if consensus is not None:
            kept.append(d)
        elif mixed is None:
            mixed = d
        else:
            mixed.add_(d)
        del d
    if n == 0:
        return start.to(torch.float32, copy=True)

    if consensus is None:
        scale = 1.0
        if normalize:
            total_w = weight_sum(weights)
            if abs(total_w) >= 1e-8:
                scale = total_w
        return _finish_([mixed], None, scale, lambda_, start)
    return _finish_(kept, weights if normalize else None, None, lambda_, start)


def _finish_(
    vectors: list[torch.Tensor],
    consensus_weights: Sequence[float] | None,
    divisor: float | None,
    lambda_: float,
    start: torch.Tensor,
) -> torch.Tensor:
    """out = start + lambda * combine(vectors), written into vectors[0], in cache-sized chunks.

    divisor None: TIES sign consensus over the (weighted) vectors, divided elementwise by the sum
    of agreeing `consensus_weights` when given. Otherwise: a single vector divided by `divisor`.
    """
    out = vectors[0]
    flats = [v.view(-1) for v in vectors]
    start_flat = start.reshape(-1)
    for s in range(0, out.numel(), COMBINE_CHUNK):
        xs = [f[s : s + COMBINE_CHUNK] for f in flats]
        acc = xs[0]
        if divisor is None:
            total = xs[0].clone()
            for x in xs[1:]:
                total.add_(x)
            # Majority sign s = +1 where total >= 0 (copysign: a -0.0 total only arises when every
            # x is +-0, and those never agree). x agrees iff x * s > 0: scale by s, clamp the
            # disagreeing (and zero) entries to 0, scale back (s = +-1 is exact).
            sign = torch.copysign(torch.ones_like(total), total)
            den = torch.zeros_like(total) if consensus_weights is not None else None
            for i, x in enumerate(xs):
                x.mul_(sign).clamp_(min=0)
                if den is not None:
                    den.add_(torch.sign(x), alpha=consensus_weights[i])
                x.mul_(sign)
            for x in xs[1:]:
                acc.add_(x)
            if den is not None:
                den[den == 0] = 1
                acc.div_(den)
        elif divisor != 1:
            acc.div_(divisor)
        if lambda_ != 1:
            acc.mul_(lambda_)
        acc.add_(start_flat[s : s + COMBINE_CHUNK])
    return out

