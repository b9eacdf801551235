"""Sparsification of task vectors (mergekit/sparsify.py): magnitude (TIES trim), magnitude_outliers
(breadcrumbs), random (DARE), della_magprune (DELLA), with mergekit's L1 or DARE's 1/p rescale.

All passes work in place on float32 tensors we own. Memory: no float64 copies, no whole-tensor
sorts. Top-k selections (TIES, breadcrumbs) find the k-th largest magnitude with a 15-bit radix
histogram of the float32 bit patterns plus `torch.kthvalue` on the one bucket that holds it, then
mask in chunks: beyond the float32 task vectors themselves (one per model, as in mergekit) they
need only chunk-sized scratch, where a whole-tensor `argsort` needs 12-16 bytes per element
(1.5-2 GiB for a 32000x4096 embedding). DELLA ranks within rows (its definition), in row blocks.
Random keep masks are Bernoulli(p) draws made as `u < p` with `u = torch.rand(...)` from the
per-tensor generator, in flat order (5x faster than `torch.bernoulli` on CPU; mergekit calls
`torch.bernoulli` on its global RNG, so masks differ from mergekit's by construction;
bench/methods_vs_mergekit.py feeds mergekit the same draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from vlm_merge.methods.seeds import make_generator

# Elements per chunk for the passes over a tensor (16 MiB of float32 scratch at most).
CHUNK = 1 << 22

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Rescale = Literal["dare", "l1", "none"]
RANDOM_SPARSIFICATIONS = ("random", "della_magprune")
_L1_EPS = 1e-7  # mergekit: rescaled_masked_tensor(eps=1e-7)


@dataclass(frozen=True)
class _TopSet:
    """The k elements of largest |x| under a total order: by |x|, ties by flat index.

    Members: |x| > thr, plus the elements with |x| == thr whose 0-based ordinal among those
    equal elements (in flat order) lies in [eq_lo, eq_hi).
    """

    thr: float
    eq_lo: int = 0
    eq_hi: int = 0
    n_eq: int = 0


def _abs_chunks(flat: torch.Tensor):
    for s in range(0, flat.numel(), CHUNK):
        yield s, flat[s : s + CHUNK].abs()


def _top_set(flat: torch.Tensor, k: int, *, prefer_low_index: bool) -> _TopSet:
    """The k largest |x| of a 1-D float32 tensor, without sorting it.

    A 15-bit histogram of the float32 bit patterns of |x| (monotonic in |x|) locates the bucket
    that holds the k-th largest value; `torch.kthvalue` on that bucket alone gives the exact value.
    Among elements equal to it, the lowest flat indices win if `prefer_low_index` (a stable
    descending sort) and the highest otherwise (a stable ascending sort read from the top).
    """
    n = flat.numel()
    if k <= 0:
        return _TopSet(math.inf)
    if k >= n:
        return _TopSet(-math.inf)
    nbins = 1 << 15
    hist = torch.zeros(nbins, dtype=torch.int64, device=flat.device)
    for _, a in _abs_chunks(flat):
        hist += torch.bincount(a.view(torch.int32) >> 16, minlength=nbins)
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64, device=flat.device)))
    bucket = nbins - 1 - j
    above = int(from_top[j - 1]) if j else 0
    cand = torch.cat([a[(a.view(torch.int32) >> 16) == bucket] for _, a in _abs_chunks(flat)])
    r = k - above  # the r-th largest candidate, 1 <= r <= len(cand)
    thr = torch.kthvalue(cand, cand.numel() - r + 1).values
    n_gt = above + int((cand > thr).sum())
    n_eq = int((cand == thr).sum())
    quota = k - n_gt  # 1 <= quota <= n_eq
    if prefer_low_index:
        return _TopSet(float(thr), 0, quota, n_eq)
    return _TopSet(float(thr), n_eq - quota, n_eq, n_eq)


def _members(a: torch.Tensor, ts: _TopSet, seen: int) -> tuple[torch.Tensor, int]:
    """Membership of the chunk `a` (= |x| of a chunk) in `ts`; `seen` counts earlier ties."""
    if ts.n_eq and ts.eq_lo == 0 and ts.eq_hi == ts.n_eq:  # every tie is in (the usual case)
        return a >= ts.thr, seen
    inside = a > ts.thr
    if ts.eq_hi <= ts.eq_lo:
        return inside, seen
    eq = a == ts.thr
    c = int(eq.sum())
    lo, hi = ts.eq_lo - seen, ts.eq_hi - seen
    if c and lo <= 0 and hi >= c:
        inside |= eq
    elif c and hi > 0 and lo < c:
        ordinal = eq.cumsum(0, dtype=torch.int32)  # 1-based among this chunk's ties
        inside |= eq & (ordinal > lo) & (ordinal <= hi)
    return inside, seen + c


def _keep_rank_window_(flat: torch.Tensor, lo: int, hi: int, *, prefer_low_index: bool) -> None:
    """Zero every element of `flat` whose rank by descending |x| is outside [lo, hi)."""
    upper = _top_set(flat, hi, prefer_low_index=prefer_low_index)
    drop = _top_set(flat, lo, prefer_low_index=prefer_low_index) if lo > 0 else None
    seen_u = seen_d = 0
    for s, a in _abs_chunks(flat):
        keep, seen_u = _members(a, upper, seen_u)
        if drop is not None:
            dropped, seen_d = _members(a, drop, seen_d)
            keep &= ~dropped
        flat[s : s + CHUNK].mul_(keep)


def _magnitude_(d: torch.Tensor, density: float) -> None:
    """TIES trim: keep the k = max(1, int(density * n)) largest |d| (ties: lowest index first)."""
    flat = d.view(-1)
    k = max(1, int(density * flat.numel()))
    _keep_rank_window_(flat, 0, k, prefer_low_index=True)


def _magnitude_outliers_(d: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs: drop the n_top = int(gamma * n) largest |d|, then the smallest, keeping
    target = int(density * n); n_bot = max(0, n - target - n_top) smallest are dropped, so the
    outlier cut shrinks when density + gamma > 1. Kept: ascending ranks [n_bot, n_bot + target)."""
    flat = d.view(-1)
    n = flat.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    _keep_rank_window_(flat, n - n_bot - target, n - n_bot, prefer_low_index=False)


def bernoulli_mask(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Bernoulli(p) draws as float32 0/1: u < p with u ~ U[0, 1) from `gen`, in flat order.

    `gen` is a CPU generator: u is drawn on the CPU for tensors on any device, so the masks are the
    same wherever the merge runs."""
    return torch.rand(p.shape, generator=gen, dtype=torch.float32).to(p.device).lt_(p)


def _bernoulli_(d: torch.Tensor, density: float, dare_rescale: bool, gen: torch.Generator) -> None:
    """DARE drop: m ~ Bernoulli(density) per element, d <- m * d (/ density if dare_rescale).

    Draws u ~ U[0, 1) in flat order, chunk by chunk, and keeps u < density."""
    flat = d.view(-1)
    u = torch.empty(min(CHUNK, flat.numel()), dtype=torch.float32)
    for s in range(0, flat.numel(), CHUNK):
        chunk = flat[s : s + CHUNK]
        mask = u[: chunk.numel()]
        torch.rand(mask.shape, generator=gen, out=mask).lt_(density)
        chunk.mul_(mask.to(chunk.device))
        if dare_rescale:
            chunk.div_(density)


def della_keep_probs(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities for each row of a 2-D tensor (mergekit's della_magprune):

        r_i = rank of |x_i| within its row, 0 = smallest (ties: lower index smaller)
        p_i = (density - epsilon) + (r_i / (C - 1)) * 2 * epsilon        (C = row length)

    mergekit: a row of one element gives 0/0 = NaN there; here p = density.
    """
    C = rows.shape[-1]
    if C == 1:
        return torch.full(rows.shape, density, dtype=torch.float32, device=rows.device)
    order = rows.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(C, device=rows.device).expand_as(order))
    del order
    probs = ranks.to(torch.float32).div_(C - 1)
    return probs.mul_(2).mul_(epsilon).add_(density - epsilon)


def _della_(d: torch.Tensor, density: float, epsilon: float, dare_rescale: bool, gen: torch.Generator) -> None:
    """DELLA drop: m_i ~ Bernoulli(p_i), d_i <- m_i * d_i (/ p_i if dare_rescale).

    Ranks are taken along dim 1 as mergekit does (1-D and 0-D tensors: the whole tensor; 2-D: each
    row; N-D: along dim 1). 2-D tensors are processed in row blocks; draws stay in flat order."""
    if d.numel() == 0:
        return
    if d.dim() <= 2:
        rows = d.view(-1, d.shape[-1]) if d.dim() == 2 else d.view(1, -1)
        step = max(1, CHUNK // rows.shape[1])
        for r in range(0, rows.shape[0], step):
            blk = rows[r : r + step]
            p = della_keep_probs(blk, density, epsilon)
            blk.mul_(bernoulli_mask(p, gen))
            if dare_rescale:
                blk.div_(p)
        return
    moved = d.movedim(1, -1)
    p = della_keep_probs(moved.reshape(-1, moved.shape[-1]), density, epsilon)
    p = p.view(moved.shape).movedim(-1, 1).contiguous()
    d.mul_(bernoulli_mask(p, gen))
    if dare_rescale:
        d.div_(p)


def _l1_norm(flat: torch.Tensor) -> torch.Tensor:
    """sum |x| as a float32 scalar: one float32 sum up to CHUNK elements (mergekit's
    `x.abs().sum()` exactly), float32 chunk sums added in double beyond."""
    if flat.numel() <= CHUNK:
        return flat.abs().sum()
    return torch.tensor(sum(float(a.sum()) for _, a in _abs_chunks(flat)), dtype=torch.float32, device=flat.device)


def sparsify_(
    d: torch.Tensor,
    method: Sparsification,
    density: float,
    *,
    gamma: float,
    epsilon: float,
    rescale: Rescale,
    gen: torch.Generator | None,
) -> None:
    """Sparsify the float32 task vector `d` in place (see `sparsify`); `gen` draws the random masks."""
    if rescale not in ("dare", "l1", "none"):
        raise ValueError(f"rescale: {rescale!r} not one of 'dare', 'l1', 'none'")
    if rescale == "dare" and method not in RANDOM_SPARSIFICATIONS:
        raise ValueError(f"rescale: 'dare' (1/p) is only defined for random drops, not {method!r}")
    if density >= 1:  # mergekit: returns the task vector untouched (no mask, no rescale)
        return
    if d.numel() == 0:
        return
    before = _l1_norm(d.view(-1)) if rescale == "l1" else None
    if method == "magnitude":
        _magnitude_(d, density)
    elif method == "magnitude_outliers":
        _magnitude_outliers_(d, density, gamma)
    elif method == "random":
        _bernoulli_(d, density, rescale == "dare", gen)
    elif method == "della_magprune":
        _della_(d, density, epsilon, rescale == "dare", gen)
    else:
        raise ValueError(f"sparsification: {method!r} unknown")
    if before is not None:
        after = _l1_norm(d.view(-1))
        if before >= _L1_EPS and after >= _L1_EPS:
            d.mul_(before / after)


def sparsify(
    delta: torch.Tensor,
    method: Sparsification,
    density: float,
    *,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: Rescale = "none",
    generator: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Sparsify a task vector (float32 copy; the input is not modified).

    method:
      "magnitude"           keep the max(1, int(density*n)) largest |v| (TIES trim)
      "magnitude_outliers"  drop the int(gamma*n) largest |v| and the smallest, keep int(density*n)
      "random"              keep each element with probability density (DARE)
      "della_magprune"      keep with probability p_i = density - eps + 2*eps*rank_i/(C-1) (DELLA)
    rescale:
      "dare"  divide kept elements by their keep probability (1/density, or 1/p_i): the DARE and
              DELLA papers' unbiased rescale; random methods only
      "l1"    mergekit 0.1.5 (`rescale: true`): v' = (m*v) * ||v||_1 / ||m*v||_1, skipped when
              either norm is below 1e-7
      "none"  keep m*v as is
    density >= 1 returns the task vector unchanged.
    """
    d = delta.to(torch.float32, copy=True)
    gen = make_generator(generator) if method in RANDOM_SPARSIFICATIONS and density < 1 else None
    sparsify_(d, method, density, gamma=gamma, epsilon=epsilon, rescale=rescale, gen=gen)
    return d



def keep_largest_(flat: torch.Tensor, k: int) -> None:
    """Zero every element of the 1-D float32 `flat` but its k largest |x| (ties: lowest index first)."""
    _keep_rank_window_(flat, 0, k, prefer_low_index=True)
