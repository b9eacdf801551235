"""Merge math: hand-computed goldens, equality with mergekit 0.1.5's algorithms (re-implemented
here from its source, independently of vlm_merge.methods), determinism, validation, memory shape.

The references below follow mergekit/sparsify.py and merge_methods/{generalized_task_arithmetic,
linear,slerp,model_stock}.py operation by operation, with stable sorts (mergekit's torch sorts are
unstable, so its order among equal magnitudes is unspecified; ours is by index, documented).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlm_merge.methods as M
from vlm_merge.methods import gta, sparsification
from vlm_merge.methods import METHODS, Method, Param, tensor_seed, validate_params

SHAPES = [(7, 5), (11,), (3, 4, 2)]
TASK_VECTOR_METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
RANDOM_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]
# Methods added from mergekit 0.1.5's registry beside the ones above: number of models, per-model
# and shared parameters of an example call (see also tests/test_methods_mergekit_more.py).
EXAMPLES = {
    "nuslerp": (2, {"weight": 0.5}, {}),
    "multislerp": (3, {"weight": 0.5}, {}),
    "karcher": (3, {}, {}),
    "sce": (3, {}, {"select_topk": 0.5}),
    "arcee_fusion": (1, {}, {}),
    "nearswap": (1, {}, {"t": 0.05}),
    "ram": (3, {}, {}),
    "ramplus_tl": (3, {}, {}),
    "slerp": (2, {}, {"t": 0.4}),
}


def example_call(name, per_model):
    """(number of models, per-model parameters, shared parameters) for METHODS[name]: `per_model`
    filtered to the method's parameters for the task-vector methods, EXAMPLES for the others."""
    m = METHODS[name]
    if name in EXAMPLES:
        n, mp, params = EXAMPLES[name]
        return n, [dict(mp) for _ in range(n)], params
    n = 3
    return n, [{k: v for k, v in per_model.items() if any(q.name == k for q in m.params)} for _ in range(n)], {}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    """Equal to float32 round-off (relative to the largest magnitude involved)."""
    assert a.shape == b.shape and a.dtype == torch.float32
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    return (a - b.float()).abs().max().item() <= rel * scale if b.numel() else True


def rand_inputs(shape, n=3, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# mergekit 0.1.5 algorithms, written out independently (stable sorts, explicit generator)


def ref_rescale_l1(t, masked, rescale):
    if not rescale:
        return masked
    before, after = t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def ref_magnitude(t, density, rescale=False):
    if density >= 1:
        return t
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())
    mask[torch.argsort(t.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return ref_rescale_l1(t, t * mask.reshape_as(t), rescale)


def ref_magnitude_outliers(t, density, gamma, rescale=False):
    if density >= 1:
        return t
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = torch.sort(t.abs().reshape(-1), descending=False, stable=True).indices
    mask = torch.zeros(n)
    mask[idx[n_bot : n_bot + target]] = 1
    return ref_rescale_l1(t, t * mask.reshape_as(t), rescale)


def ref_bernoulli(t, density, gen, rescale):
    if density >= 1:
        return t
    mask = M.bernoulli_mask(torch.full_like(t, density), gen)
    masked = t * mask
    return masked / density if rescale == "dare" else ref_rescale_l1(t, masked, rescale == "l1")


def ref_della(t, density, eps, gen, rescale):
    if density >= 1:
        return t
    shape = t.shape
    x = t.unsqueeze(0) if t.dim() < 2 else t
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1, stable=True).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - eps) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * eps
    masked = x * M.bernoulli_mask(probs, gen)
    out = masked / probs if rescale == "dare" else ref_rescale_l1(x, masked, rescale == "l1")
    return out.reshape(shape)


def ref_gta(base, models, weights, sparsify, consensus, normalize, lam, anchor=None):
    deltas = torch.stack([sparsify(i, m - base) for i, m in enumerate(models)])
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        mask = (deltas.sign() == majority).float()
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base if anchor is None else anchor) + mixed


def ref_linear(models, weights, normalize=True):
    out = sum(w * m for w, m in zip(weights, models))
    return out / sum(weights) if normalize else out


def ref_slerp(v0, v1, t, threshold=0.9995, eps=1e-8):
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.tensor(1.0)
    nb = nb if nb > eps else torch.tensor(1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b).reshape(v0.shape)


def ref_model_stock(base, models, filter_wise=False):
    w0, ws = base, list(models)
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            nprod = torch.norm(offs[i], dim=-1) * torch.norm(offs[j], dim=-1)
            cos.append(((offs[i] * offs[j]).sum(dim=-1) / nprod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / den)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def merge(name, base, models, model_params, params=None, **kw):
    return METHODS[name].merge(base, models, model_params, params or {}, **kw)


# ------------------------------------------------------------------------------------------------
# Goldens: tiny tensors, values by hand


def test_golden_task_arithmetic_and_linear():
    base = torch.tensor([1.0, 2.0])
    ms = [torch.tensor([2.0, 4.0]), torch.tensor([0.0, 0.0])]
    mp = [{"weight": 0.5}, {"weight": 1.0}]
    # 1 + 0.5*1 + 1*(-1) = 0.5 ; 2 + 0.5*2 + 1*(-2) = 1
    assert torch.equal(merge("task_arithmetic", base, ms, mp), torch.tensor([0.5, 1.0]))
    # normalize (sum w = 1.5) and lambda 2: [-0.5, -1] / 1.5 * 2 + base
    out = merge("task_arithmetic", base, ms, mp, {"normalize": True, "lambda": 2.0})
    assert torch.allclose(out, torch.tensor([1 - 2 / 3, 2 - 4 / 3]))
    lm = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, 9.0])]
    lp = [{"weight": 1.0}, {"weight": 3.0}]
    assert torch.equal(merge("linear", None, lm, lp), torch.tensor([2.5, 5.0, 7.5]))
    assert torch.equal(merge("linear", None, lm, lp, {"normalize": False}), torch.tensor([10.0, 20.0, 30.0]))


def test_golden_ties():
    base = torch.ones(4)
    d1, d2 = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, -3.0, 1.0, 2.5])
    ms = [base + d1, base + d2]
    mp = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    # trim to 2 of 4: v1 = [3, 0, 0, 2], v2 = 0.5 * [0, -3, 0, 2.5] = [0, -1.5, 0, 1.25]
    # sum = [3, -1.5, 0, 3.25] -> signs + - + +; agreeing weights [1, 0.5, 0 -> 1, 1.5]
    assert torch.allclose(merge("ties", base, ms, mp), torch.tensor([4.0, -2.0, 1.0, 1 + 3.25 / 1.5]))
    assert torch.allclose(merge("ties", base, ms, mp, {"normalize": False}), torch.tensor([4.0, -0.5, 1.0, 4.25]))
    assert torch.allclose(merge("ties", base, ms, mp, {"lambda": 2.0}), torch.tensor([7.0, -5.0, 1.0, 1 + 6.5 / 1.5]))
    # density 1 keeps everything: sum [1, -4, 1.5, 4.5]... with weights 1, 0.5: v2 = [-1, -1.5, .5, 1.25]
    full = [{"weight": 1.0}, {"weight": 0.5}]
    # sum = [2, -2.5, 1, 3.25]: e0 keeps v1 (3/1), e1 both (-1 - 1.5)/1.5, e2 both (0.5+0.5)/1.5, e3 both 3.25/1.5
    expect = base + torch.tensor([3.0, -2.5 / 1.5, 1.0 / 1.5, 3.25 / 1.5])
    assert torch.allclose(merge("ties", base, ms, full), expect)


def test_golden_breadcrumbs():
    base = torch.zeros(10)
    d = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 6.0, 0.05])
    # n=10, density .5 -> keep 5, gamma .1 -> drop the 1 largest (6), n_bot = 10 - 5 - 1 = 4 smallest dropped
    kept = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0, 0, 0, 0, 0])
    out = merge("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(out, kept)
    # density + gamma > 1 shrinks the outlier cut: density .9, gamma .3 -> n_bot = 0, keep the 9 smallest
    out = merge("breadcrumbs", base, [d], [{"weight": 2.0, "density": 0.9, "gamma": 0.3}])
    assert torch.equal(out, 2 * torch.where(d.abs() < 6, d, 0))
    # breadcrumbs_ties: second model [-1]*10 weight 1 (density 1), first as above
    out = merge("breadcrumbs_ties", base, [d, -torch.ones(10)], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 1.0}])
    # sum = kept - 1: signs + - + - + (from index 4: 1 - 1 = 0 -> +) - - - - -
    expect = torch.tensor([5.0, -5.0, 3.0, -3.0, 1.0, -1, -1, -1, -1, -1])
    assert torch.equal(out, expect)
    out = merge("breadcrumbs_ties", base, [d, -torch.ones(10)], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 1.0}], {"normalize": True})
    assert torch.allclose(out, torch.tensor([5.0, -2.5, 3.0, -1.5, 1.0, -1, -1, -1, -1, -1]))


def test_golden_dare():
    base = torch.zeros(4000)
    ones = torch.ones(4000)
    # rescale "dare": every entry is 0 or 1/p, about p of them kept, mean about 1 (unbiased)
    out = merge("dare_linear", base, [ones], [{"weight": 1.0, "density": 0.25}], seed=3)
    assert set(out.unique().tolist()) <= {0.0, 4.0}
    assert abs(out.mean().item() - 1.0) < 0.1
    # the mask is u < density, u = torch.rand from Generator(seed) in flat order
    d = torch.linspace(-1, 1, 4000)
    mask = (torch.rand(4000, generator=torch.Generator().manual_seed(9)) < 0.3).float()
    out = merge("dare_linear", base, [d], [{"weight": 2.0, "density": 0.3}], seed=9)
    assert torch.allclose(out, 2 * d * mask / 0.3)
    # "l1" (mergekit): sum |out| = sum |d| exactly up to round-off; "none": plain mask
    out = merge("dare_linear", base, [d], [{"weight": 1.0, "density": 0.3}], {"rescale": "l1"}, seed=9)
    assert torch.allclose(out, d * mask * (d.abs().sum() / (d * mask).abs().sum()))
    assert math.isclose(out.abs().sum().item(), d.abs().sum().item(), rel_tol=1e-5)
    out = merge("dare_linear", base, [d], [{"weight": 1.0, "density": 0.3}], {"rescale": False}, seed=9)
    assert torch.equal(out, d * mask)
    # density 1: no drop, no randomness
    assert torch.equal(merge("dare_ties", base, [d], [{"weight": 1.0}], seed=1), d)


def test_golden_della():
    row = torch.tensor([[0.1, -0.4, 0.3, 0.2]])
    # ranks by |x| ascending: 0, 3, 2, 1 -> p = 0.3 + r / 3 * 0.4
    p = M.della_keep_probs(row, 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([[0.3, 0.3 + 0.4, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3]]))
    assert torch.equal(M.della_keep_probs(torch.tensor([[5.0]]), 0.4, 0.1), torch.tensor([[0.4]]))
    base = torch.zeros(1, 4)
    mask = (torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < p).float()
    out = merge("della_linear", base, [row], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], seed=5)
    assert torch.allclose(out, row * mask / p)


def test_golden_slerp():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    assert torch.allclose(M.slerp(e0, e1, 0.5), torch.tensor([h, h]))
    assert torch.allclose(M.slerp(e0, e1, 1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5]))
    # raw tensors are interpolated with the unit-vector coefficients
    assert torch.allclose(M.slerp(2 * e0, 3 * e1, 0.5), torch.tensor([2 * h, 3 * h]))
    # colinear / antipodal: lerp
    assert torch.allclose(M.slerp(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), 0.25), torch.tensor([1.25, 2.5]))
    assert torch.allclose(M.slerp(e0, -e0, 0.5), torch.zeros(2))
    assert torch.equal(merge("slerp", None, [e0, e1], [{}, {}], {"t": 0.0}), e0)
    assert torch.equal(merge("slerp", None, [e0, e1], [{}, {}], {"t": 1.0}), e1)


def test_golden_model_stock():
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    assert torch.equal(merge("model_stock", base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [{}, {}]), base)
    # cos = 1/sqrt2, N = 2: t = 2c / (1 + c); mean = [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = merge("model_stock", base + 1, [torch.tensor([2.0, 2.0]), torch.tensor([2.0, 1.0])], [{}, {}])
    assert torch.allclose(out, 1 + t * torch.tensor([1.0, 0.5]))
    # filter_wise: row 0 orthogonal (t 0), row 1 identical (cos 1 -> t 1)
    b2 = torch.zeros(2, 2)
    m1, m2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(merge("model_stock", b2, [m1, m2], [{}, {}], {"filter_wise": True}), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # opposite task vectors: 1 + (N-1) cos = 0 is singular -> t = 0
    assert torch.equal(merge("model_stock", base, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [{}, {}]), base)


# ------------------------------------------------------------------------------------------------
# Equality with the mergekit algorithm on random tensors


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_mergekit_deterministic(shape):
    base, ms = rand_inputs(shape)
    w = [0.6, -0.3, 1.1]
    dens, gam = [0.5, 0.3, 0.8], [0.05, 0.1, 0.2]
    for normalize in (False, True):
        for lam in (1.0, 0.7):
            p = {"normalize": normalize, "lambda": lam}
            ref = ref_gta(base, ms, w, lambda i, d: d, False, normalize, lam)
            assert close(merge("task_arithmetic", base, ms, [{"weight": x} for x in w], p), ref)
            for rescale in (False, True):
                pr = {**p, "rescale": rescale}
                mp = [{"weight": x, "density": d} for x, d in zip(w, dens)]
                ref = ref_gta(base, ms, w, lambda i, d: ref_magnitude(d, dens[i], rescale), True, normalize, lam)
                assert close(merge("ties", base, ms, mp, pr), ref)
                mp = [{"weight": x, "density": d, "gamma": g} for x, d, g in zip(w, dens, gam)]
                for name, cons in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
                    ref = ref_gta(base, ms, w, lambda i, d: ref_magnitude_outliers(d, dens[i], gam[i], rescale), cons, normalize, lam)
                    assert close(merge(name, base, ms, mp, pr), ref), name
    for normalize in (False, True):
        lw = [0.2, 0.5, 1.3]
        out = merge("linear", None, ms, [{"weight": x} for x in lw], {"normalize": normalize})
        assert close(out, ref_linear(ms, lw, normalize))
    for t in (0.0, 0.3, 0.75, 1.0):
        assert close(merge("slerp", None, ms[:2], [{}, {}], {"t": t}), ref_slerp(ms[0], ms[1], t))
    for fw in (False, True):
        assert close(merge("model_stock", base, ms, [{}] * 3, {"filter_wise": fw}), ref_model_stock(base, ms, fw))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["dare", "l1", "none"])
def test_matches_mergekit_random_given_the_stream(shape, rescale):
    """DARE/DELLA: the same masks as mergekit drawing from the same generator state."""
    base, ms = rand_inputs(shape, seed=1)
    w, dens, eps = [1.0, 0.5, -0.7], [0.5, 0.3, 0.8], [0.1, 0.2, 0.15]
    for name, cons, norm in (("dare_ties", True, False), ("dare_linear", False, False)):
        gen = torch.Generator().manual_seed(17)
        ref = ref_gta(base, ms, w, lambda i, d: ref_bernoulli(d, dens[i], gen, rescale), cons, norm, 1.0)
        mp = [{"weight": x, "density": d} for x, d in zip(w, dens)]
        assert close(merge(name, base, ms, mp, {"rescale": rescale}, seed=17), ref), name
    if len(shape) > 2:
        return  # della on N-D tensors ranks along dim 1: covered in test_della_nd_ranks_along_dim1
    for name, cons, norm in (("della", True, True), ("della_linear", False, False)):
        gen = torch.Generator().manual_seed(23)
        ref = ref_gta(base, ms, w, lambda i, d: ref_della(d, dens[i], eps[i], gen, rescale), cons, norm, 1.0)
        mp = [{"weight": x, "density": d, "epsilon": e} for x, d, e in zip(w, dens, eps)]
        assert close(merge(name, base, ms, mp, {"rescale": rescale}, seed=23), ref), name


def test_della_nd_ranks_along_dim1():
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(2))
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).float()
    probs = 0.4 + ranks / 4 * 0.2  # density .5, epsilon .1, C = 5
    mask = (torch.rand(probs.shape, generator=torch.Generator().manual_seed(4)) < probs).float()
    out = M.sparsify(x, "della_magprune", 0.5, epsilon=0.1, rescale="dare", generator=4)
    assert torch.allclose(out, x * mask / probs)


def test_ties_at_the_cutoff_go_by_index():
    """Equal magnitudes: TIES keeps the lowest indices (stable descending sort), breadcrumbs drops
    the lowest indices first at either end (stable ascending sort)."""
    x = torch.tensor([1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 1.0, 3.0])
    assert torch.equal(M.sparsify(x, "magnitude", 0.5), ref_magnitude(x, 0.5))  # keeps 3, 2, -2, 2
    assert torch.equal(M.sparsify(x, "magnitude", 0.25), torch.tensor([0, -2.0, 0, 0, 0, 0, 0, 3.0]))
    for d, g in ((0.5, 0.25), (0.25, 0.125), (0.375, 0.25)):
        assert torch.equal(M.sparsify(x, "magnitude_outliers", d, gamma=g), ref_magnitude_outliers(x, d, g)), (d, g)


def test_chunked_passes_match(monkeypatch):
    """Tiny chunk sizes (ties straddling chunk borders, many row blocks) give the same results."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(9, 6, generator=g)
    ms = [(base + torch.randn(9, 6, generator=g).mul(0.1).bfloat16().float()) for _ in range(3)]  # many ties
    cases = [
        ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 0.8, "density": 0.45}], {}),
        ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.4, "gamma": 0.1}] * 3, {"normalize": True}),
        ("dare_ties", [{"weight": 1.0, "density": 0.4}] * 3, {}),
        ("della", [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}] * 3, {}),
        ("model_stock", [{}] * 3, {}),
    ]
    expected = [merge(n, base, ms, mp, p, seed=3) for n, mp, p in cases]
    refs = [ref_gta(base, ms, [1.0, 0.5, 0.8], lambda i, d: ref_magnitude(d, (0.3, 0.6, 0.45)[i]), True, True, 1.0)]
    assert close(expected[0], refs[0])
    monkeypatch.setattr(sparsification, "CHUNK", 5)
    monkeypatch.setattr(gta, "COMBINE_CHUNK", 4)
    for (n, mp, p), exp in zip(cases, expected):
        assert torch.equal(merge(n, base, ms, mp, p, seed=3), exp), n
    assert close(M.slerp(ms[0], ms[1], 0.3), ref_slerp(ms[0], ms[1], 0.3))
    d = ms[0] - base
    assert close(M.sparsify(d, "magnitude", 0.3, rescale="l1"), ref_magnitude(d, 0.3, True))


def test_anchor_replaces_the_base_as_start():
    base, ms = rand_inputs((6, 4), seed=4)
    anchor = base + 1.5
    for name in TASK_VECTOR_METHODS + ["model_stock"]:
        m = METHODS[name]
        mp = [{"weight": 0.7, "density": 0.5, "gamma": 0.1, "epsilon": 0.2}] * 3
        mp = [{k: v for k, v in p.items() if any(q.name == k for q in m.params)} for p in mp]
        plain = m.merge(base, ms, mp, {}, seed=5)
        anchored = m.merge(base, ms, mp, {}, anchor=anchor, seed=5)
        assert close(anchored - plain, torch.full_like(base, 1.5), rel=1e-5), name


def test_delta_only_methods_give_the_anchor_where_every_model_equals_the_base():
    """The promise `inert_genes` relies on: no parameter value moves such a tensor off the anchor (or the base)."""
    base, _ = rand_inputs((6, 4), seed=7)
    anchor = base + torch.linspace(-1.0, 1.0, 24).view(6, 4)
    flagged = [n for n, m in METHODS.items() if m.delta_only]
    assert set(flagged) == set(TASK_VECTOR_METHODS + ["model_stock", "sce", "arcee_fusion", "ram", "ramplus_tl"])
    for name in flagged:
        m = METHODS[name]
        for w, dens in ((0.3, 0.2), (1.4, 0.8)):
            n, mp, params = example_call(name, {"weight": w, "density": dens, "gamma": 0.05, "epsilon": 0.15})
            n = min(n, 2)
            models = [base.clone() for _ in range(n)]
            assert torch.equal(m.merge(base, models, mp[:n], params, seed=2), base), (name, w)
            if m.supports_anchor:
                assert torch.equal(m.merge(base, models, mp[:n], params, anchor=anchor, seed=2), anchor), (name, w)
    assert not METHODS["linear"].delta_only and not METHODS["slerp"].delta_only


def test_task_arithmetic_registry_is_the_chat_vector_function_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    en, vlm, ja = (torch.randn(5, 3, generator=g).bfloat16() for _ in range(3))
    ref = M.task_arithmetic(en, [vlm], [0.7], anchor=ja)
    assert torch.equal(merge("task_arithmetic", en, [vlm], [{"weight": 0.7}], anchor=ja), ref)


def test_dtypes_and_inputs_untouched():
    base, ms = rand_inputs((5, 4), seed=6)
    for dtype in (torch.bfloat16, torch.float16):
        b, xs = base.to(dtype), [m.to(dtype) for m in ms]
        copies = [t.clone() for t in (b, *xs)]
        for name, m in METHODS.items():
            n, mp, params = example_call(name, {"weight": 0.5, "density": 0.5})
            models = xs[:n]
            out = m.merge(b, models, mp, params, seed=1)
            assert out.dtype == torch.float32 and out.shape == b.shape, name
            assert all(torch.equal(c, t) for c, t in zip(copies, (b, *xs))), name
        # float32 math on upcast inputs equals the float32 path
        assert torch.equal(
            merge("ties", b, xs, [{"weight": 0.5, "density": 0.5}] * 3),
            merge("ties", b.float(), [x.float() for x in xs], [{"weight": 0.5, "density": 0.5}] * 3),
        )


# ------------------------------------------------------------------------------------------------
# Determinism


def test_tensor_seed_is_sha256_and_stable_across_processes():
    name = "model.layers.0.mlp.down_proj.weight"
    expect = int.from_bytes(hashlib.sha256(f"42:{name}".encode()).digest()[:8], "big") & ((1 << 63) - 1)
    assert tensor_seed(42, name) == expect
    assert tensor_seed(0, "model.embed_tokens.weight") == 5667790390681887260  # pinned
    code = f"from vlm_merge.methods import tensor_seed; print(tensor_seed(42, {name!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert int(out.stdout) == expect
    assert tensor_seed(42, name) != tensor_seed(43, name) != tensor_seed(42, name + "x")


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_are_deterministic(name):
    base, ms = rand_inputs((8, 6), seed=8)
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}] * 3
    mp = [{k: v for k, v in p.items() if any(q.name == k for q in METHODS[name].params)} for p in mp]
    s = tensor_seed(1, "layer.weight")
    a = merge(name, base, ms, mp, seed=s)
    assert torch.equal(a, merge(name, base, ms, mp, seed=s))
    assert not torch.equal(a, merge(name, base, ms, mp, seed=tensor_seed(2, "layer.weight")))
    assert not torch.equal(a, merge(name, base, ms, mp, seed=tensor_seed(1, "other.weight")))
    with pytest.raises(ValueError, match="seed"):
        merge(name, base, ms, mp)


# ------------------------------------------------------------------------------------------------
# Validation


def test_registry_contents_follow_mergekit():
    expected = {
        "task_arithmetic": {"weight", "normalize", "lambda", "int8_mask"},
        "ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
        "dare_ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
        "dare_linear": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
        "breadcrumbs": {"weight", "density", "gamma", "normalize", "lambda", "rescale", "int8_mask"},
        "breadcrumbs_ties": {"weight", "density", "gamma", "normalize", "lambda", "rescale", "int8_mask"},
        "della": {"weight", "density", "epsilon", "normalize", "lambda", "rescale", "int8_mask"},
        "della_linear": {"weight", "density", "epsilon", "normalize", "lambda", "rescale", "int8_mask"},
        "linear": {"weight", "normalize"},
        "slerp": {"t"},
        "model_stock": {"filter_wise"},
        "nuslerp": {"weight", "nuslerp_row_wise", "nuslerp_flatten"},
        "multislerp": {"weight", "normalize_weights", "eps"},
        "karcher": {"max_iter", "tol"},
        "sce": {"select_topk", "int8_mask"},
        "arcee_fusion": set(),
        "nearswap": {"t"},
        "ram": {"epsilon"},
        "ramplus_tl": {"r", "alpha", "epsilon"},
    }
    assert {n: {p.name for p in m.params} for n, m in METHODS.items()} == expected
    normalize_on = {"ties", "della", "linear"}
    for n, m in METHODS.items():
        assert isinstance(m, Method) and all(isinstance(p, Param) for p in m.params)
        if any(p.name == "normalize" for p in m.params):
            assert m.param("normalize").default == (n in normalize_on), n
        assert m.random == (n in RANDOM_METHODS + ["arcee_fusion"])
        assert m.elementwise == (n in ("task_arithmetic", "linear", "nearswap", "ram"))
        assert m.needs_base == (n not in ("linear", "slerp", "nuslerp", "multislerp", "karcher"))
        assert m.optional_base == (n in ("nuslerp", "multislerp"))
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (2, 2)
    assert METHODS["model_stock"].min_models == 2
    assert METHODS["dare_ties"].param("rescale").default == "dare"
    assert METHODS["ties"].param("rescale").default == "none"
    assert METHODS["breadcrumbs"].param("gamma").default == 0.01
    assert METHODS["della"].param("epsilon").default == 0.15
    assert METHODS["ties"].param("density").default == 1.0
    assert METHODS["ties"].param("weight").required


BAD = [
    ("ties", [{"weight": 1.0, "density": 0.0}], {}, r"density: 0\.0 out of range \(0, 1\]"),
    ("ties", [{"weight": 1.0, "density": 1.5}], {}, r"density: 1\.5 out of range \(0, 1\]"),
    ("dare_ties", [{"weight": 1.0, "density": -0.2}], {}, r"density: -0\.2 out of range"),
    ("breadcrumbs", [{"weight": 1.0, "gamma": -0.1}], {}, r"gamma: -0\.1 out of range \[0, 1\]"),
    ("breadcrumbs", [{"weight": 1.0, "gamma": 1.5}], {}, r"gamma: 1\.5 out of range"),
    ("della", [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}], {}, r"epsilon: 0\.15 out of range for density 0\.1"),
    ("della", [{"weight": 1.0, "density": 0.9, "epsilon": 0.1}], {}, r"epsilon: 0\.1 out of range"),
    ("della", [{"weight": 1.0, "epsilon": 1.0}], {}, r"epsilon: 1\.0 out of range \[0, 1\)"),
    ("slerp", [{}, {}], {"t": 1.5}, r"t: 1\.5 out of range \[0, 1\]"),
    ("slerp", [{}, {}], {"t": -0.1}, r"t: -0\.1 out of range"),
    ("slerp", [{}, {}], {}, r"t: missing"),
    ("slerp", [{}, {}, {}], {"t": 0.5}, r"models: slerp needs exactly 2 models, got 3"),
    ("model_stock", [{}], {}, r"models: model_stock needs at least 2 models, got 1"),
    ("ties", [{"density": 0.5}], {}, r"weight: missing"),
    ("ties", [{"weight": float("nan")}], {}, r"weight: nan out of range"),
    ("ties", [{"weight": True}], {}, r"weight: True out of range"),
    ("ties", [{"weight": "1"}], {}, r"weight: '1' out of range"),
    ("ties", [{"weight": 1.0}], {"normalize": "yes"}, r"normalize: 'yes' out of range true or false"),
    ("ties", [{"weight": 1.0}], {"rescale": "dare"}, r"rescale: 'dare' out of range one of 'l1', 'none'"),
    ("dare_ties", [{"weight": 1.0}], {"rescale": "l2"}, r"rescale: 'l2' out of range one of 'dare', 'l1', 'none'"),
    ("ties", [{"weight": 1.0}], {"densty": 0.5}, r"densty: 0\.5 is not a parameter of ties"),
    ("task_arithmetic", [{"weight": 1.0, "density": 0.5}], {}, r"density: 0\.5 is not a parameter of task_arithmetic"),
    ("ties", [{"weight": 1.0, "lambda": 2.0}], {}, r"lambda: 2\.0 is a shared parameter of ties"),
    ("linear", [{"weight": 1.0}], {"lambda": 2.0}, r"lambda: 2\.0 is not a parameter of linear"),
]


@pytest.mark.parametrize("name,model_params,params,message", BAD)
def test_validation_errors(name, model_params, params, message):
    with pytest.raises(ValueError, match=message):
        validate_params(name, model_params, params)
    shape = (3,)
    models = [torch.ones(shape)] * len(model_params)
    with pytest.raises(ValueError, match=message):
        METHODS[name].merge(torch.zeros(shape), models, model_params, params, seed=0)


def test_validation_accepts_and_canonicalizes():
    per_model, shared = METHODS["dare_ties"].resolve([{"weight": 1}, {"weight": -2.5, "density": 0.3}], {"density": 0.7, "rescale": True})
    assert per_model == [{"weight": 1.0, "density": 0.7}, {"weight": -2.5, "density": 0.3}]
    assert shared["rescale"] == "dare" and shared["normalize"] is False and shared["lambda"] == 1.0
    assert METHODS["ties"].resolve([{"weight": 1.0}], {"rescale": True})[1]["rescale"] == "l1"
    assert METHODS["della"].resolve([{"weight": 1.0}], {"rescale": "mergekit"})[1]["rescale"] == "l1"
    validate_params("della", [{"weight": 1.0, "density": 1.0, "epsilon": 0.5}], {})  # density 1: no drop
    with pytest.raises(ValueError, match="merge_method: 'tie' unknown"):
        validate_params("tie", [{"weight": 1.0}], {})


def test_merge_input_errors():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="base: None"):
        merge("ties", None, [x], [{"weight": 1.0}])
    with pytest.raises(ValueError, match="anchor: linear does not take an anchor"):
        merge("linear", None, [x], [{"weight": 1.0}], anchor=x)
    with pytest.raises(ValueError, match=r"models\[1\]: shape \(4,\) differs"):
        merge("ties", x, [x, torch.ones(4)], [{"weight": 1.0}] * 2)
    with pytest.raises(ValueError, match="models: 2 models but 1 parameter sets"):
        merge("ties", x, [x, x], [{"weight": 1.0}])
    with pytest.raises(ValueError, match="weight: .* sum to 0"):
        merge("linear", None, [x, x], [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError, match="rescale: 'dare'"):
        M.sparsify(x, "magnitude", 0.5, rescale="dare")


# ------------------------------------------------------------------------------------------------
# Memory shape: no float64 tensors, no sorts outside DELLA's per-row ranks


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype | None, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.calls.append((str(func), o.dtype, o.numel()))
        return out


def test_no_float64_and_no_whole_tensor_sort():
    base, ms = rand_inputs((64, 48), seed=9)
    n = base.numel()
    for name, m in METHODS.items():
        k, mp, params = example_call(name, {"weight": 0.5, "density": 0.3, "gamma": 0.05, "epsilon": 0.1})
        with _Recorder() as rec:
            m.merge(base, ms[:k], mp, params, seed=1)
        assert not [c for c in rec.calls if c[1] == torch.float64 and c[2] > 1], name
        sorts = [c for c in rec.calls if c[0].startswith(("aten.sort", "aten.argsort"))]
        if name in ("della", "della_linear"):
            assert sorts and max(c[2] for c in sorts) == n  # one (64, 48) argsort, rank along rows
        else:
            assert not sorts, (name, sorts)
    with _Recorder() as rec:
        M.sparsify(ms[0] - base, "magnitude", 0.3)
    kth = [c for c in rec.calls if "kthvalue" in c[0]]
    assert kth and not [c for c in rec.calls if c[0].startswith(("aten.sort", "aten.argsort"))]
