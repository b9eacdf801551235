"""Merge math: one pure function per method, tensors in, float32 tensor out.

Inputs may be any floating dtype; arithmetic is float32, and the caller rounds once to the output
dtype. Functions never modify their inputs. Random methods take a `torch.Generator` or an integer
seed and draw from nothing else; `tensor_seed` derives a stable per-tensor seed from a tensor name.

The methods and their parameter names are mergekit 0.1.5's (`task_arithmetic`, `linear`, `ties`,
`dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`, `slerp`,
`model_stock`), so a mergekit YAML maps 1:1 onto `METHODS`. Our extension: `anchor`, for the
task-vector methods, starts the output from another tensor than the base
(`out = anchor + merged task vectors`, the Chat Vector form). Deliberate differences from mergekit
are listed in the docstrings (search "mergekit:").

Memory: no float64 copies, no whole-tensor sorts. Top-k selections (TIES, breadcrumbs) find the
k-th largest magnitude with a 15-bit radix histogram of the float32 bit patterns plus
`torch.kthvalue` on the one bucket that holds it, then mask in chunks: beyond the float32 task
vectors themselves (one per model, as in mergekit) they need only chunk-sized scratch, where a
whole-tensor `argsort` needs 12-16 bytes per element (1.5-2 GiB for a 32000x4096 embedding).
DELLA ranks within rows (its definition), in row blocks. Random keep masks are Bernoulli(p) draws
made as `u < p` with `u = torch.rand(...)` from the per-tensor generator, in flat order (5x faster
than `torch.bernoulli` on CPU; mergekit calls `torch.bernoulli` on its global RNG, so masks differ
from mergekit's by construction; bench/methods_vs_mergekit.py feeds mergekit the same draws).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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


# ----------------------------------------------------------------------------------------------
# Determinism


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, stable across processes and platforms:

        s = int.from_bytes(sha256(f"{seed}:{name}")[:8], "big") mod 2**63

    (never Python's `hash()`, which is salted per process).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (a given generator is returned as is, and advances)."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("seed: None; random methods need a seed or a torch.Generator (see tensor_seed)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r} is not an int")
    return torch.Generator(device="cpu").manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Sparsification primitives (mergekit/sparsify.py), all in place on float32 tensors we own.

# Elements per chunk for the passes over a tensor (16 MiB of float32 scratch at most).
CHUNK = 1 << 22
# Elements per chunk for the final elementwise combination (512 KiB of float32: stays in cache).
COMBINE_CHUNK = 1 << 17

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


def _sparsify_(
    d: torch.Tensor,
    method: Sparsification,
    density: float,
    *,
    gamma: float,
    epsilon: float,
    rescale: Rescale,
    gen: torch.Generator | None,
) -> None:
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
    _sparsify_(d, method, density, gamma=gamma, epsilon=epsilon, rescale=rescale, gen=gen)
    return d


# ----------------------------------------------------------------------------------------------
# Task-vector methods


def _weight_sum(weights: Sequence[float]) -> float:
    """sum(w) in float32, as mergekit computes it."""
    return float(torch.tensor(list(weights), dtype=torch.float32).sum())


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
            _sparsify_(d, sparsification, densities[i], gamma=gammas[i], epsilon=epsilons[i], rescale=rescale, gen=gen)
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
            total_w = _weight_sum(weights)
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


def ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: Rescale = "none",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES (Yadav et al. 2023), mergekit `ties`:

        v_i = w_i * trim(m_i - b, density_i)   trim: keep the max(1, int(density*n)) largest |.|
        s = sign(sum_i v_i) (0 -> +),  mask_i = [sign(v_i) == s]
        out = a + lambda * sum_i mask_i v_i / sum_i mask_i w_i     (denominator 0 -> 1;
              without normalize no division),   a = anchor or b
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="magnitude", consensus="sum", densities=densities,
        normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor,
    )  # fmt: skip


def dare_ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: int | torch.Generator,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "dare",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023) + TIES sign consensus, mergekit `dare_ties`:

        v_i = w_i * R(mask_i * (m_i - b)),   mask_i ~ Bernoulli(density_i) elementwise
        R: "dare" x/density_i (default, the paper's) | "l1" mergekit's L1-norm match | "none"
        then TIES election and disjoint mean as in `ties` (normalize off by default).
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="random", consensus="sum", densities=densities,
        normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor, generator=generator,
    )  # fmt: skip


def dare_linear(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    generator: int | torch.Generator,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "dare",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE without sign consensus, mergekit `dare_linear`:

        out = a + lambda * sum_i w_i R(mask_i * (m_i - b)) [/ sum_i w_i if normalize]
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="random", densities=densities,
        normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor, generator=generator,
    )  # fmt: skip


def breadcrumbs(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "none",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023), mergekit `breadcrumbs`:

        v_i = w_i * crumbs(m_i - b, density_i, gamma_i)
        crumbs: sorted by |.| ascending, keep positions [n_bot, n_bot + int(density*n)),
                n_bot = max(0, n - int(density*n) - int(gamma*n))  (the int(gamma*n) largest and
                the smallest are dropped)
        out = a + lambda * sum_i v_i [/ sum_i w_i if normalize]
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="magnitude_outliers", densities=densities, gammas=gammas,
        normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor,
    )  # fmt: skip


def breadcrumbs_ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "none",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Breadcrumbs sparsification + TIES sign consensus, mergekit `breadcrumbs_ties`
    (see `breadcrumbs` and `ties`)."""
    return generalized_task_arithmetic(
        base, models, weights, sparsification="magnitude_outliers", consensus="sum", densities=densities,
        gammas=gammas, normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor,
    )  # fmt: skip


def della(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    generator: int | torch.Generator,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: Rescale = "dare",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA (Deep et al. 2024) with TIES sign consensus, mergekit `della`:

        p_ij = density_i - eps_i + 2 eps_i * rank(|d_ij|) / (C - 1)   (rank within the row, see
               `della_keep_probs`; density +- eps must lie in (0, 1))
        v_i = w_i * R(mask_i * d_i),  mask_ij ~ Bernoulli(p_ij),  d_i = m_i - b
        R: "dare" x/p_ij (default, the paper's) | "l1" mergekit's L1-norm match | "none"
        then TIES election and disjoint mean as in `ties` (normalize on by default).
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="della_magprune", consensus="sum", densities=densities,
        epsilons=epsilons, normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor,
        generator=generator,
    )  # fmt: skip


def della_linear(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    generator: int | torch.Generator,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: Rescale = "dare",
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA without sign consensus, mergekit `della_linear`:

        out = a + lambda * sum_i w_i R(mask_i * d_i) [/ sum_i w_i if normalize]   (see `della`)
    """
    return generalized_task_arithmetic(
        base, models, weights, sparsification="della_magprune", densities=densities, epsilons=epsilons,
        normalize=normalize, lambda_=lambda_, rescale=rescale, anchor=anchor, generator=generator,
    )  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# Interpolations


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
        total = _weight_sum(weights)
        if total == 0:
            raise ValueError(f"weight: {list(weights)} sum to 0; cannot normalize")
        out.div_(total)
    return out


SLERP_DOT_THRESHOLD = 0.9995  # mergekit slerp(dot_threshold=0.9995)
SLERP_EPS = 1e-8  # mergekit slerp(eps=1e-8): norms at or below it count as 1


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation over the whole tensor (mergekit `slerp`; t=0 -> v0):

        u0 = v0 / |v0|, u1 = v1 / |v1|   (a norm <= 1e-8 counts as 1),  dot = clamp(<u0, u1>, -1, 1)
        |dot| > 0.9995 (nearly colinear or antipodal):  out = (1 - t) v0 + t v1
        else:  theta = acos(dot),  out = sin((1 - t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1

    Note the result interpolates the raw tensors, not the unit vectors. Coefficients are computed
    in float32 like mergekit; the tensors are read in chunks, so bf16 inputs are never fully copied.
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes {tuple(v0.shape)} and {tuple(v1.shape)} differ")
    a, b = v0.reshape(-1), v1.reshape(-1)
    dev = v0.device
    tt = torch.tensor(t, dtype=torch.float32, device=dev)
    n = a.numel()

    def chunks():
        for s in range(0, n, CHUNK):
            yield s, a[s : s + CHUNK].to(torch.float32), b[s : s + CHUNK].to(torch.float32)

    if n == 0:
        return torch.zeros(v0.shape, dtype=torch.float32, device=dev)
    na_parts, nb_parts = [], []
    for _, x, y in chunks():
        na_parts.append(torch.linalg.vector_norm(x))
        nb_parts.append(torch.linalg.vector_norm(y))
    na = torch.linalg.vector_norm(torch.stack(na_parts))
    nb = torch.linalg.vector_norm(torch.stack(nb_parts))
    one = torch.ones((), dtype=torch.float32, device=dev)
    na = torch.where(na > SLERP_EPS, na, one)
    nb = torch.where(nb > SLERP_EPS, nb, one)
    dot = torch.zeros((), dtype=torch.float32, device=dev)
    for _, x, y in chunks():
        dot += ((x / na) * (y / nb)).sum()
    dot = dot.clamp(-1, 1)
    if dot.abs() > SLERP_DOT_THRESHOLD:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    out = torch.empty(n, dtype=torch.float32, device=dev)
    for s, x, y in chunks():
        out[s : s + CHUNK] = ca * x + cb * y
    return out.view(v0.shape)


def _slerp_models(models: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    if len(models) != 2:
        raise ValueError(f"models: slerp needs exactly 2 models, got {len(models)}")
    return slerp(models[0], models[1], t)


# ----------------------------------------------------------------------------------------------
# Registry


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Param:
    """One method parameter, named as in mergekit YAML.

    kind "float": a finite real number within [low, high] (bounds None = unbounded; inclusivity
    per flag). kind "bool": True/False. kind "choice": one of `choices`, or a spelling listed in
    `aliases` (booleans for `rescale`, as mergekit YAML writes it). `per_model` parameters take one
    value per model (mergekit's per-model `parameters`); the others are shared. `arg` is the keyword
    of `Method.fn` receiving it (a list for per-model parameters); None: accepted, no effect.
    """

    name: str
    default: object = REQUIRED
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    per_model: bool = False
    doc: str = ""
    kind: Literal["float", "bool", "choice"] = "float"
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[object, str], ...] = ()
    arg: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def range_text(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return "(-inf, inf)"
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + ("]" if self.high_inclusive else ")")
        return f"{lo}, {hi}"

    def check(self, value: object, where: str = "") -> object:
        """The canonical value, or ValueError("<name>: <value> out of range <range>")."""
        bad = ValueError(f"{self.name}: {value!r} out of range {self.range_text}{where}")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "choice":
            for alias, canonical in self.aliases:
                if type(value) is type(alias) and value == alias:
                    return canonical
            if isinstance(value, str) and value in self.choices:
                return value
            raise bad
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        v = float(value)
        if self.low is not None and (v < self.low or (v == self.low and not self.low_inclusive)):
            raise bad
        if self.high is not None and (v > self.high or (v == self.high and not self.high_inclusive)):
            raise bad
        return v


ModelCheck = Callable[[Mapping[str, object], str], None]


@dataclass(frozen=True)
class Method:
    """A merge method: its pure function, parameters and input contract.

    `needs_base`: the base tensor is an input (methods without it ignore `base`). `min_models` /
    `max_models` count the non-base models. `random`: `merge` needs a seed. `elementwise`: `fn` may
    be applied to any slice of its inputs independently (the engine may chunk it).
    `supports_anchor`: `merge(anchor=...)` starts the output from the anchor instead of the base.
    `delta_only`: the output is the anchor (or the base) plus a function of the task vectors m_i - b that is
    zero when they all are, so a tensor where every model equals the base comes out as the anchor whatever
    the parameters (an evolutionary search leaves genes that set only such tensors out).
    `model_checks`: cross-parameter checks run on each model's resolved parameters.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    random: bool
    elementwise: bool
    supports_anchor: bool
    unpack_models: bool = False  # fn(*models, ...) instead of fn(models, ...)
    model_checks: tuple[ModelCheck, ...] = ()
    doc: str = ""
    delta_only: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(
        self, model_params: Sequence[Mapping[str, object]], params: Mapping[str, object]
    ) -> tuple[list[dict[str, object]], dict[str, object]]:
        """Validate and fill defaults: (one dict per model, shared dict), canonical values.

        A per-model parameter in `params` is the default for models that do not set it (as in
        mergekit YAML's top-level `parameters`); a shared parameter given per model is an error.
        """
        names = {p.name: p for p in self.params}
        known = ", ".join(names)
        for k, v in params.items():
            if k not in names:
                raise ValueError(f"{k}: {v!r} is not a parameter of {self.name} (known: {known})")
        for i, mp in enumerate(model_params):
            for k, v in mp.items():
                if k not in names:
                    raise ValueError(f"{k}: {v!r} is not a parameter of {self.name} (model {i}; known: {known})")
                if not names[k].per_model:
                    raise ValueError(f"{k}: {v!r} is a shared parameter of {self.name}, not per model (model {i})")
        n = len(model_params)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise ValueError(f"models: {self.name} needs {want} models, got {n}")
        shared: dict[str, object] = {}
        for p in self.params:
            if p.per_model:
                continue
            v = params.get(p.name, p.default)
            if v is REQUIRED:
                raise ValueError(f"{p.name}: missing; required by {self.name}")
            shared[p.name] = p.check(v)
        per_model: list[dict[str, object]] = []
        for i, mp in enumerate(model_params):
            where = f" (model {i})"
            resolved: dict[str, object] = {}
            for p in self.params:
                if not p.per_model:
                    continue
                v = mp.get(p.name, params.get(p.name, p.default))
                if v is REQUIRED:
                    raise ValueError(f"{p.name}: missing; required by {self.name}{where}")
                resolved[p.name] = p.check(v, where)
            for check in self.model_checks:
                check(resolved, where)
            per_model.append(resolved)
        return per_model, shared

    def merge(
        self,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        model_params: Sequence[Mapping[str, object]],
        params: Mapping[str, object],
        *,
        anchor: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Merge one tensor: validate, fill defaults, call `fn`. Returns float32.

        `seed` (random methods: required) is the per-tensor seed, e.g. `tensor_seed(seed, name)`.
        """
        if len(model_params) != len(models):
            raise ValueError(f"models: {len(models)} models but {len(model_params)} parameter sets")
        if self.needs_base and base is None:
            raise ValueError(f"base: None; {self.name} needs a base tensor")
        shape = models[0].shape
        for what, t in [("base", base if self.needs_base else None), ("anchor", anchor)] + [
            (f"models[{i}]", m) for i, m in enumerate(models)
        ]:
            if t is not None and t.shape != shape:
                raise ValueError(f"{what}: shape {tuple(t.shape)} differs from models[0] {tuple(shape)}")
        return self.bind(model_params, params, seed=seed, anchored=anchor is not None)(base, models, anchor)

    def bind(
        self,
        model_params: Sequence[Mapping[str, object]],
        params: Mapping[str, object],
        *,
        seed: int | None = None,
        anchored: bool = False,
    ) -> Callable[[torch.Tensor | None, Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]:
        """Validate once and return `f(base, models, anchor)` calling `fn` directly.

        The engine evaluates elementwise methods slice by slice; binding keeps the parameter checks
        out of that loop.
        """
        per_model, shared = self.resolve(model_params, params)
        if anchored and not self.supports_anchor:
            raise ValueError(f"anchor: {self.name} does not take an anchor")
        if self.random and seed is None:
            raise ValueError(f"seed: None; {self.name} is random and needs a seed (see tensor_seed)")
        kwargs: dict[str, object] = {}
        for p in self.params:
            if p.arg is not None:
                kwargs[p.arg] = [pm[p.name] for pm in per_model] if p.per_model else shared[p.name]
        if self.random:
            kwargs["generator"] = seed
        fn, needs_base, unpack, supports_anchor = self.fn, self.needs_base, self.unpack_models, self.supports_anchor

        def call(base: torch.Tensor | None, models: Sequence[torch.Tensor], anchor: torch.Tensor | None = None) -> torch.Tensor:
            args = ((base,) if needs_base else ()) + (tuple(models) if unpack else (list(models),))
            return fn(*args, **kwargs, **({"anchor": anchor} if supports_anchor else {}))

        return call


def validate_params(
    method: Method | str, model_params: Sequence[Mapping[str, object]], params: Mapping[str, object]
) -> None:
    """Raise ValueError naming the parameter and value for unknown names, misplaced (shared vs
    per-model) names, missing required values, out-of-range values and a wrong number of models."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"merge_method: {method!r} unknown (known: {', '.join(METHODS)})")
        method = METHODS[method]
    method.resolve(model_params, params)


def _della_check(p: Mapping[str, object], where: str) -> None:
    density, epsilon = p["density"], p["epsilon"]
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"epsilon: {epsilon!r} out of range for density {density!r}: density - epsilon and "
            f"density + epsilon must lie in (0, 1){where}"
        )


_WEIGHT = Param("weight", per_model=True, arg="weights", doc="Weight of the model's task vector (any real).")
_DENSITY = Param(
    "density", 1.0, 0.0, 1.0, low_inclusive=False, per_model=True, arg="densities",
    doc="Fraction of the task vector kept (random methods: keep probability).",
)  # fmt: skip
_GAMMA = Param(
    "gamma", 0.01, 0.0, 1.0, per_model=True, arg="gammas",
    doc="Fraction of the largest-magnitude entries removed as outliers.",
)  # fmt: skip
_EPSILON = Param(
    "epsilon", 0.15, 0.0, 1.0, high_inclusive=False, per_model=True, arg="epsilons",
    doc="Half-width of DELLA's keep probabilities around density (density +- epsilon in (0, 1)).",
)  # fmt: skip
_LAMBDA = Param("lambda", 1.0, arg="lambda_", doc="Scale of the merged task vector.")
_INT8 = Param("int8_mask", False, kind="bool", doc="mergekit memory option; accepted, no effect here.")


def _normalize(default: bool, doc: str) -> Param:
    return Param("normalize", default, kind="bool", arg="normalize", doc=doc)


def _rescale(random: bool) -> Param:
    if random:
        return Param(
            "rescale", "dare", kind="choice", choices=("dare", "l1", "none"),
            aliases=((True, "dare"), (False, "none"), ("mergekit", "l1")), arg="rescale",
            doc="'dare' (default; true): kept entries / keep probability, as in the DARE/DELLA papers. "
            "'l1' ('mergekit'): mergekit 0.1.5's rescale, match the task vector's L1 norm. "
            "'none' (false): no rescale.",
        )  # fmt: skip
    return Param(
        "rescale", "none", kind="choice", choices=("l1", "none"),
        aliases=((True, "l1"), (False, "none"), ("mergekit", "l1")), arg="rescale",
        doc="'l1' (true, 'mergekit'): match the task vector's L1 norm after trimming; 'none' (false, default).",
    )  # fmt: skip


_NORM_GTA = "Divide by the sum of the weights (TIES-style methods: of the agreeing weights, per element)."


def _gta(name, fn, *, extra=(), normalize=False, random=False, sparse=True, checks=(), doc=""):
    params = (_WEIGHT,)
    if sparse:
        params += (_DENSITY,) + tuple(extra)
    params += (_normalize(normalize, _NORM_GTA), _LAMBDA)
    if sparse:
        params += (_rescale(random),)
    params += (_INT8,)
    return Method(
        name=name, fn=fn, params=params, needs_base=True, min_models=1, max_models=None, random=random,
        elementwise=not sparse, supports_anchor=True, model_checks=tuple(checks), doc=doc, delta_only=True,
    )  # fmt: skip


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _gta("task_arithmetic", generalized_task_arithmetic, sparse=False, doc="out = b + lambda * sum w_i (m_i - b)"),
        _gta("ties", ties, normalize=True, doc=ties.__doc__),
        _gta("dare_ties", dare_ties, random=True, doc=dare_ties.__doc__),
        _gta("dare_linear", dare_linear, random=True, doc=dare_linear.__doc__),
        _gta("breadcrumbs", breadcrumbs, extra=(_GAMMA,), doc=breadcrumbs.__doc__),
        _gta("breadcrumbs_ties", breadcrumbs_ties, extra=(_GAMMA,), doc=breadcrumbs_ties.__doc__),
        _gta("della", della, extra=(_EPSILON,), normalize=True, random=True, checks=(_della_check,), doc=della.__doc__),
        _gta("della_linear", della_linear, extra=(_EPSILON,), random=True, checks=(_della_check,), doc=della_linear.__doc__),
        Method(
            name="linear", fn=linear,
            params=(_WEIGHT, _normalize(True, "Divide by the sum of the weights.")),
            needs_base=False, min_models=1, max_models=None, random=False, elementwise=True,
            supports_anchor=False, doc=linear.__doc__,
        ),
        Method(
            name="slerp", fn=_slerp_models,
            params=(Param("t", REQUIRED, 0.0, 1.0, arg="t", doc="Interpolation factor: 0 = first model, 1 = second."),),
            needs_base=False, min_models=2, max_models=2, random=False, elementwise=False,
            supports_anchor=False, doc=slerp.__doc__,
        ),
        Method(
            name="model_stock", fn=model_stock,
            params=(Param("filter_wise", False, kind="bool", arg="filter_wise", doc="One angle per row (last dim)."),),
            needs_base=True, min_models=2, max_models=None, random=False, elementwise=False,
            supports_anchor=True, doc=model_stock.__doc__, delta_only=True,
        ),
    )
}  # fmt: skip
