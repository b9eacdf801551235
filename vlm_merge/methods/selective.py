"""Methods that decide element by element which models' changes survive, and how they are averaged:
SCE (variance selection, sign election, energy weights), RAM and RAM+ (overlap averaging), NearSwap
(interpolation towards the model where it is close to the base) and Arcee Fusion (importance-gated
replacement), as in mergekit 0.1.5's `sce`, `ram`, `ramplus_tl`, `nearswap` and `arcee_fusion`.

All take a base and work on float32 copies; the inputs are never modified. RAM and RAM+ work span by
span (`sparsification.CHUNK` elements): beside the output, only span-sized float32 scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_merge.methods import sparsification
from vlm_merge.methods.arithmetic import difference
from vlm_merge.methods.seeds import make_generator


def _spans(n: int):
    step = sparsification.CHUNK
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _sce_topk_mask(flats: list[torch.Tensor], density: float) -> torch.Tensor:
    """mergekit's sce_mask: 1 at the k = int(count_nonzero(var) * density) elements whose variance
    across models (population, dim 0) is largest, 0 elsewhere (ties: lowest index first)."""
    n = flats[0].numel()
    if density <= 0:
        return torch.zeros(n, dtype=torch.float32, device=flats[0].device)
    var = torch.empty(n, dtype=torch.float32, device=flats[0].device)
    for sl in _spans(n):
        var[sl] = torch.var(torch.stack([f[sl] for f in flats]), dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)  # float32 product, as mergekit computes it
    if k == 0:
        return var.zero_()
    sparsification.keep_largest_(var, k)  # var >= 0 and k <= nonzero: the kept entries are > 0
    return var.ne_(0).to(torch.float32)


def sce(base: torch.Tensor, models: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat), mergekit `sce`: Select, Calculate, Erase.

        d_i = m_i - b
        select  (select_topk < 1): keep, in every d_i, the k = int(nnz(var) * select_topk) elements
                of largest variance var_j = Var_i(d_ij) (population variance across models)
        calculate: e_i = mean_j d_ij^2,  w_i = e_i / sum_i e_i   (w_i = 1/N if sum_i e_i < 1e-6)
        erase:   s = sign(sum_i d_i) (0 -> +),  mask_i = [sign(d_i) == s]   (zeros never agree)
        out = b + sum_i w_i mask_i d_i / max(sum_i w_i mask_i, 1e-6)
    """
    if not models:
        raise ValueError("models: sce needs at least 1 model")
    b = base.to(torch.float32)
    tvs = [difference(m, b) for m in models]
    flats = [t.view(-1) for t in tvs]
    if select_topk < 1:
        mask = _sce_topk_mask(flats, select_topk)
        for f in flats:
            f.mul_(mask)
        del mask
    energies = torch.stack([f.square().mean() for f in flats])
    total = torch.sum(energies).item()
    weights = torch.ones_like(energies) / len(flats) if abs(total) < 1e-6 else energies / total
    out = torch.empty_like(flats[0])
    for sl in _spans(out.numel()):
        xs = [f[sl] for f in flats]
        total_x = xs[0].clone()
        for x in xs[1:]:
            total_x.add_(x)
        majority = (total_x >= 0).to(torch.float32).mul_(2).sub_(1)
        acc = torch.zeros_like(total_x)
        den = torch.zeros_like(total_x)
        for x, w in zip(xs, weights):
            ew = (torch.sign(x) == majority).to(torch.float32).mul_(w)
            acc.add_(x * ew)
            den.add_(ew)
        out[sl] = acc.div_(den.clamp_(min=1e-6))
    return out.view(base.shape).add_(b)


def _ram_span(base: torch.Tensor, models: Sequence[torch.Tensor], sl: slice, epsilon: float):
    """On the flat span `sl`: the base (float32), the task vectors with entries |d| <= epsilon
    zeroed, and the number of models contributing each element (float32: small integers, exact)."""
    b = base.reshape(-1)[sl].to(torch.float32)
    tvs = [difference(m.reshape(-1)[sl], b) for m in models]
    counts = torch.zeros_like(b)
    for d in tvs:
        nz = d.abs() > epsilon
        counts.add_(nz)
        d.mul_(nz)
    return b, tvs, counts


def _ram_merge(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float, lambdas: Sequence[object]):
    """b + sum_i z_i d_i (lambda_i [c == 1] + [c > 1] / c), span by span."""
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    for sl in _spans(base.numel()):
        b, tvs, counts = _ram_span(base, models, sl, epsilon)
        unique, overlap = counts == 1, counts > 1
        div = counts.clamp_(min=1)
        acc = torch.zeros_like(b)
        for d, lam in zip(tvs, lambdas):
            unique_part = d * unique if lam is None else d * unique * lam
            acc.add_(unique_part + d.mul_(overlap).div_(div))
        out[sl] = acc.add_(b)
    return out.view(base.shape)


def ram(base: torch.Tensor, models: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM, Reinforced Agent Merging (mergekit `ram`): changes only one model makes are kept whole,
    changes several models make are averaged over those models.

        d_i = m_i - b,   z_ij = [|d_ij| > epsilon],   c_j = sum_i z_ij
        out_j = b_j + sum_i z_ij d_ij * ([c_j == 1] + [c_j > 1] / c_j)
    """
    return _ram_merge(base, models, epsilon, [None] * len(models))


def ramplus_tl(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ tensor-local (mergekit `ramplus_tl`): RAM with each model's unique changes amplified by
    how much of its change the other models share, per tensor:

        z_ij, c_j as in `ram`;  shared_i = sum_j z_ij [c_j > 1],  unique_i = sum_j z_ij [c_j == 1]
        rho_i = shared_i / max(unique_i, epsilon),   lambda_i = 1 + r * clamp(rho_i, 0, alpha)
        out_j = b_j + sum_i z_ij d_ij * (lambda_i [c_j == 1] + [c_j > 1] / c_j)
    """
    shared = [torch.zeros((), dtype=torch.int64, device=base.device) for _ in models]
    uniq = [torch.zeros((), dtype=torch.int64, device=base.device) for _ in models]
    for sl in _spans(base.numel()):  # first pass: the per-model counts (integers: exact in any order)
        _, tvs, counts = _ram_span(base, models, sl, epsilon)
        unique, overlap = counts == 1, counts > 1
        for i, d in enumerate(tvs):
            nz = d != 0  # z_ij: the zeroed task vector is nonzero exactly where |d| > epsilon
            shared[i] += (nz & overlap).sum()
            uniq[i] += (nz & unique).sum()
    lambdas = [1 + r * (sh / un.clamp(min=epsilon)).clamp(min=0, max=alpha) for sh, un in zip(shared, uniq)]
    return _ram_merge(base, models, epsilon, lambdas)


def nearswap(base: torch.Tensor, models: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """NearSwap (mergekit `nearswap`): take the model where it is near the base, keep the base where
    they are far apart (b = base, m = the one model):

        w = clamp(t / max(|b - m|, 1e-6), 0, 1),    out = w m + (1 - w) b
    """
    if len(models) != 1:
        raise ValueError(f"models: nearswap needs exactly 1 model besides the base, got {len(models)}")
    a = base.to(torch.float32)
    m = models[0].to(torch.float32)
    w = (t / torch.abs(a - m).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * m + (1 - w) * a


ARCEE_FUSION_SAMPLE = 1_000_000  # mergekit _QUANTILE_SAMPLE_SIZE
_QUANTILES = (0.25, 0.5, 0.75)


def arcee_fusion(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, generator: int | torch.Generator
) -> torch.Tensor:
    """Arcee Fusion (mergekit `arcee_fusion`): replace the base by the model where the change is
    important, importance being the change's size times the rows' KL divergence (b = base, m = model):

        I = |m - b| * KL_row(softmax(m) + 1e-8 || softmax(b) + 1e-8)   (softmax and KL over the last dim)
        q_p = sorted(S)[int(p * (|S| - 1))] for p = 0.25, 0.5, 0.75,  S = I flattened, or, above
              1e6 elements, 1e6 of its elements drawn uniformly with replacement from `generator`
        out = b + (m - b) * [I >= q_0.5 + 1.5 (q_0.75 - q_0.25)]

    The quantiles are taken with `torch.kthvalue`, not a sort; the sample indices are
    `torch.randint(|I|, (1e6,))` from the generator (mergekit draws them from torch's global RNG).
    The KL divergences are computed in blocks of rows (three float32 tensors of the input's size in
    all: the model's copy, which becomes the change, the importance and the base's).
    """
    if len(models) != 1:
        raise ValueError(f"models: arcee_fusion needs exactly 1 model besides the base, got {len(models)}")
    b = base.to(torch.float32)
    m = models[0].to(torch.float32, copy=True)
    if m.numel() == 0:
        return m
    cols = b.shape[-1] if b.dim() else 1
    rows_b, rows_m = b.reshape(-1, cols), m.view(-1, cols)
    kl = torch.empty(rows_b.shape[0], 1, dtype=torch.float32, device=b.device)
    step = max(1, sparsification.CHUNK // max(1, cols))
    for r in range(0, rows_b.shape[0], step):  # row blocks: softmax and KL are per row
        p = torch.softmax(rows_m[r : r + step], dim=-1) + 1e-8
        q = torch.softmax(rows_b[r : r + step], dim=-1) + 1e-8
        kl[r : r + step] = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    delta = m.sub_(b)
    importance = delta.abs()
    importance.view(-1, cols).mul_(kl)
    flat = importance.reshape(-1)
    if flat.numel() > ARCEE_FUSION_SAMPLE:
        gen = make_generator(generator)
        idx = torch.randint(flat.numel(), (ARCEE_FUSION_SAMPLE,), generator=gen).to(flat.device)
        flat = flat[idx]
    positions = (torch.tensor(_QUANTILES) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in positions)
    threshold = median + 1.5 * (q3 - q1)
    return delta.mul_(importance >= threshold).add_(b)
