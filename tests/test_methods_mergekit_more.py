"""The methods vlm-merge took from mergekit 0.1.5's registry after the first eleven: nuslerp,
multislerp, karcher, sce, arcee_fusion, nearswap, ram, ramplus_tl.

Goldens on tiny tensors (values by hand), equality with mergekit 0.1.5's algorithms written out
here from its source (merge_methods/{nuslerp,multislerp,karcher,sce,arcee_fusion,nearswap,ram}.py,
on stacked tensors as mergekit computes them, independently of vlm_merge.methods), validation,
and each method run through a recipe. bench/methods_vs_mergekit.py compares with mergekit itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm_merge.engine.merge import merge
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.methods import METHODS, sparsification, tensor_seed, validate_params

NEW = ["nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl"]
S8, C8 = math.sin(math.pi / 8), math.cos(math.pi / 8)  # sin(pi/8), sin(3 pi/8)
R2 = math.sqrt(0.5)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    assert a.shape == b.shape and a.dtype == torch.float32, (a.shape, b.shape, a.dtype)
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() <= rel * scale


def run(name, base, models, model_params=None, params=None, seed=None):
    model_params = model_params or [{} for _ in models]
    return METHODS[name].merge(base, models, model_params, params or {}, seed=seed)


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Goldens


def test_golden_nearswap():
    base, m = T(0.0, 0.0, 0.0, 0.0), T(0.01, 0.1, -1.0, 0.0)
    # w = clamp(0.05 / max(|d|, 1e-6), 0, 1) = [1, 0.5, 0.05, 1]
    assert close(run("nearswap", base, [m], params={"t": 0.05}), T(0.01, 0.05, -0.05, 0.0))


def test_golden_ram_and_ramplus():
    base = T(0.0, 0.0, 0.0, 0.0)
    m0, m1 = T(1.0, 2.0, 0.0, 0.0), T(3.0, 0.0, 0.0, 5e-6)  # 5e-6 <= epsilon: no change
    # counts [2, 1, 0, 0]: overlap averaged, unique kept
    assert close(run("ram", base, [m0, m1]), T(2.0, 2.0, 0.0, 0.0))
    # m0: shared 1, unique 1 -> rho 1 -> lambda 1 + 0.5 * min(1, 1) = 1.5 on its unique change
    assert close(run("ramplus_tl", base, [m0, m1], params={"r": 0.5, "alpha": 1.0}), T(2.0, 3.0, 0.0, 0.0))
    # alpha caps rho: lambda = 1 + 0.5 * 0.2
    assert close(run("ramplus_tl", base, [m0, m1], params={"r": 0.5}), T(2.0, 2.2, 0.0, 0.0))
    # a wider epsilon turns m1's 3.0 and m0's 1.0, 2.0 into no change
    assert close(run("ram", base, [m0, m1], params={"epsilon": 2.5}), T(3.0, 0.0, 0.0, 0.0))


def test_golden_sce():
    base = T(0.0, 0.0, 0.0, 0.0)
    m0, m1 = T(1.0, -2.0, 3.0, 0.0), T(1.0, 2.0, -2.0, 0.0)
    # energies 3.5, 2.25; signs elected +,+,+,+ (a zero sum is +); each element: the agreeing
    # models' weighted mean -> [1, 2 (m1 only), 3 (m0 only), 0]
    assert close(run("sce", base, [m0, m1]), T(1.0, 2.0, 3.0, 0.0))
    # variances [0, 4, 6.25, 0]: 2 nonzero, select_topk 0.5 keeps element 2 only
    assert close(run("sce", base, [m0, m1], params={"select_topk": 0.5}), T(0.0, 0.0, 3.0, 0.0))
    assert torch.equal(run("sce", base, [m0, m1], params={"select_topk": 0.0}), base)


def test_golden_nuslerp():
    e0, e1 = T(1.0, 0.0), T(0.0, 1.0)
    w11 = [{"weight": 1.0}, {"weight": 1.0}]
    assert close(run("nuslerp", None, [e0, e1], w11), T(R2, R2))
    # with a base: the task vectors are slerped, the base added back
    b = T(1.0, 1.0)
    assert close(run("nuslerp", b, [b + e0, b + 2 * e1], w11), b + T(R2, 2 * R2))
    # row by row, t = 3 / (1 + 3): row 0 orthogonal, row 1 colinear (linear)
    m0, m1 = T([1.0, 0.0], [1.0, 0.0]), T([0.0, 1.0], [2.0, 0.0])
    w13 = [{"weight": 1.0}, {"weight": 3.0}]
    rows = run("nuslerp", None, [m0, m1], w13, {"nuslerp_flatten": False})
    assert close(rows, T([S8, C8], [1.75, 0.0]))
    # row_wise: vectors along dim 0 (the columns); column 1 of m0 is zero (its unit vector is 0)
    cols = run("nuslerp", None, [m0, m1], w13, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    theta = math.pi / 4
    c0 = [(math.sin(0.25 * theta) * a + math.sin(0.75 * theta) * b) / math.sin(theta) for a, b in ((1, 0), (1, 2))]
    assert close(cols, T([c0[0], C8], [c0[1], 0.0]))
    # weights summing to 0: t = 0.5
    assert close(run("nuslerp", None, [e0, e1], [{"weight": 1.0}, {"weight": -1.0}]), T(R2, R2))


def test_golden_multislerp():
    half = [{"weight": 0.5}, {"weight": 0.5}]
    assert close(run("multislerp", None, [T(1.0, 0.0), T(0.0, 1.0)], half), T(R2, R2))
    # norms 2 and 4: the direction of the unit vectors' mean, the weighted mean norm 3
    assert close(run("multislerp", None, [T(2.0, 0.0), T(0.0, 4.0)], [{"weight": 1.0}] * 2), T(3 * R2, 3 * R2))
    # with a base, unnormalized weights scale the norm
    b = T(1.0, -1.0)
    out = run("multislerp", b, [b + T(2.0, 0.0), b + T(0.0, 2.0)], [{"weight": 1.0}] * 2, {"normalize_weights": False})
    assert close(out, b + T(4 * R2, 4 * R2))  # weighted norm sum 1 * 2 + 1 * 2
    # antipodal pair: the linear fallback; more than two: an error naming the weights
    assert close(run("multislerp", None, [T(1.0, 0.0), T(-1.0, 0.0)], half), T(0.0, 0.0))
    with pytest.raises(ValueError, match="weight: the weighted sum"):
        run("multislerp", None, [T(1.0, 0.0), T(-1.0, 0.0), T(0.0, 0.0)], [{"weight": 1.0}] * 3)
    # one model: that model, whatever the base
    assert torch.equal(run("multislerp", b, [T(5.0, 6.0)], [{"weight": 0.3}]), T(5.0, 6.0))


def test_golden_karcher():
    assert close(run("karcher", None, [T(1.0, 0.0), T(0.0, 1.0)]), T(R2, R2), rel=1e-5)
    assert close(run("karcher", None, [T(2.0, 0.0), T(0.0, 4.0)]), T(3 * R2, 3 * R2), rel=1e-5)
    r3 = 1 / math.sqrt(3)
    axes = [T(1.0, 0.0, 0.0), T(0.0, 1.0, 0.0), T(0.0, 0.0, 1.0)]
    assert close(run("karcher", None, axes), T(r3, r3, r3), rel=1e-5)
    assert torch.equal(run("karcher", None, [T(0.0, 0.0), T(0.0, 0.0)]), T(0.0, 0.0))
    assert torch.equal(run("karcher", None, [T(1.5, -2.0)]), T(1.5, -2.0))


def test_golden_arcee_fusion():
    base = torch.zeros(2, 4)
    m = T([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0])
    # importance: row 0 zero (no change), row 1 |d| * K (K = KL of its softmax vs uniform > 0);
    # sorted [0, 0, 0, 0, K, 2K, 3K, 4K]: q1 = 0, median = 0, q3 = 2K; threshold 3K
    assert torch.equal(run("arcee_fusion", base, [m], seed=0), T([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]))


# ------------------------------------------------------------------------------------------------
# mergekit 0.1.5's algorithms, written out from its source (stacked tensors)


def ref_nuslerp(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    out_shape = v0.shape

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(out_shape)


def ref_nuslerp_method(base, models, weights, row_wise=False, flatten=True):
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if base is not None:
        return base + ref_nuslerp(t, models[0] - base, models[1] - base, dim=dim, flatten=flatten)
    return ref_nuslerp(t, models[0], models[1], dim=dim, flatten=flatten)


def ref_multislerp(base, models, weights, normalize_weights=True, eps=1e-8):
    if len(models) == 1:
        return models[0]
    x = torch.stack(models)
    if base is not None:
        x = x - base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tr = (tangent * w.view(-1, 1)).sum(0)
    tn = torch.norm(tr) + eps
    res = (mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    res = res.view(x.shape[1:])
    return res + base if base is not None else res


def ref_karcher(tensors, max_iter=10, tol=1e-5):
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / n if n.item() != 0 else torch.zeros_like(t) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us))
    mn = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if mn.item() < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent)
        if tnorm.item() < tol:
            break
        mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean = mean / un
    return sum(al * n for al, n in zip(alphas, norms)) * mean


def ref_sce(base, models, select_topk=1.0):
    tvs = torch.stack([m - base for m in models])
    if select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k > 0:
            # stable descending order: ties by index (mergekit's topk leaves their order open)
            mask.view(-1)[torch.argsort(var.abs().view(-1), descending=True, stable=True)[:k]] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    erase = sign == ((tvs.sum(dim=0) >= 0).float() * 2 - 1)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = w.sum().item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return base + (tvs * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


def ref_ram(base, models, epsilon=1e-5, plus=None):
    tv = torch.stack([m - base for m in models]).view(len(models), -1)
    nz = tv.abs() > epsilon
    counts = nz.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nz
    lam = torch.ones(len(models), 1)
    if plus is not None:
        r, alpha = plus
        rho = (nz & overlap).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=epsilon)
        lam = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (tvz * unique * lam + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ref_nearswap(base, model, t):
    w = (t / torch.abs(base - model).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * model + (1 - w) * base


def ref_arcee_fusion(base, model, seed):
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=gen)]
    s, _ = torch.sort(flat)
    q1, med, q3 = s[(torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()]
    mask = (importance >= med + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


def rand_inputs(shape, n=3, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * torch.randn(shape, generator=g) for _ in range(n)]


SHAPES = [(9, 7), (13,), (4, 3, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equal_to_mergekit_algorithms(shape):
    base, ms = rand_inputs(shape, seed=len(shape))
    w = [0.3, 0.9, 0.4]
    for b in (base, None):
        for flat, row_wise in ((True, False), (False, False), (False, True)):
            ours = run("nuslerp", b, ms[:2], [{"weight": x} for x in w[:2]],
                       {"nuslerp_flatten": flat, "nuslerp_row_wise": row_wise})  # fmt: skip
            assert close(ours, ref_nuslerp_method(b, ms[:2], w[:2], row_wise, flat)), (b is None, flat, row_wise)
        for norm in (True, False):
            ours = run("multislerp", b, ms, [{"weight": x} for x in w], {"normalize_weights": norm})
            assert close(ours, ref_multislerp(b, ms, w, norm)), (b is None, norm)
    assert close(run("karcher", None, ms), ref_karcher(ms))
    assert close(run("karcher", None, [base, *ms], params={"max_iter": 2}), ref_karcher([base, *ms], max_iter=2))
    for k in (1.0, 0.6, 0.2):
        assert close(run("sce", base, ms, params={"select_topk": k}), ref_sce(base, ms, k)), k
    for eps in (1e-5, 0.08):
        assert close(run("ram", base, ms, params={"epsilon": eps}), ref_ram(base, ms, eps)), eps
        p = {"r": 0.5, "alpha": 0.3, "epsilon": eps}
        assert close(run("ramplus_tl", base, ms, params=p), ref_ram(base, ms, eps, plus=(0.5, 0.3))), eps
    for t in (0.01, 0.1, 1.0):
        assert close(run("nearswap", base, ms[:1], params={"t": t}), ref_nearswap(base, ms[0], t)), t
    assert close(run("arcee_fusion", base, ms[:1], seed=5), ref_arcee_fusion(base, ms[0], 5))


def test_chunked_passes_match(monkeypatch):
    """Tiny chunks (sce's variance and election spans, arcee_fusion's row blocks, ram's spans) change nothing;
    karcher's chunked sums change its result by round-off only."""
    base, ms = rand_inputs((9, 6), seed=11)
    calls = [("sce", ms, {"select_topk": 0.4}), ("arcee_fusion", ms[:1], {}), ("ram", ms, {"epsilon": 0.05}),
             ("ramplus_tl", ms, {"epsilon": 0.05, "r": 0.5, "alpha": 0.5})]
    expected = [run(n, base, xs, params=p, seed=1) for n, xs, p in calls]
    monkeypatch.setattr(sparsification, "CHUNK", 5)
    for (n, xs, p), want in zip(calls, expected):
        assert torch.equal(run(n, base, xs, params=p, seed=1), want), n
    assert close(expected[1], ref_arcee_fusion(base, ms[0], 1))
    # karcher sums its norms and dot products chunk by chunk: equal to round-off
    assert close(run("karcher", None, [base, *ms]), ref_karcher([base, *ms]))
    assert close(run("karcher", None, ms, params={"max_iter": 3}), ref_karcher(ms, max_iter=3))


def test_arcee_fusion_samples_quantiles_from_the_seed_above_a_million_elements():
    base, ms = rand_inputs((1001, 1000), n=1, seed=3)
    a = run("arcee_fusion", base, ms, seed=tensor_seed(1, "x"))
    assert close(a, ref_arcee_fusion(base, ms[0], tensor_seed(1, "x")))
    assert torch.equal(a, run("arcee_fusion", base, ms, seed=tensor_seed(1, "x")))
    with pytest.raises(ValueError, match="seed"):
        run("arcee_fusion", base, ms)


# ------------------------------------------------------------------------------------------------
# Registry and validation


def test_registry_is_mergekit_0_1_5_but_passthrough():
    mergekit_0_1_5 = {
        "multislerp", "nearswap", "ram", "ramplus_tl", "sce", "linear", "slerp", "nuslerp", "passthrough",
        "model_stock", "arcee_fusion", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    }  # fmt: skip
    assert set(METHODS) == mergekit_0_1_5 - {"passthrough"}
    assert METHODS["karcher"].param("max_iter").default == 10 and METHODS["karcher"].param("tol").default == 1e-5
    assert METHODS["ramplus_tl"].param("r").default == 0.1 and METHODS["ramplus_tl"].param("alpha").default == 0.2
    assert METHODS["nuslerp"].param("nuslerp_flatten").default is True
    assert METHODS["nearswap"].param("t").required and METHODS["nuslerp"].param("weight").required


BAD = [
    ("nearswap", [{}], {}, r"t: missing"),
    ("nearswap", [{}], {"t": -0.1}, r"t: -0\.1 out of range \[0, inf\)"),
    ("nearswap", [{}, {}], {"t": 0.1}, r"models: nearswap needs exactly 1 models, got 2"),
    ("arcee_fusion", [{}, {}], {}, r"models: arcee_fusion needs exactly 1 models, got 2"),
    ("nuslerp", [{"weight": 1.0}] * 3, {}, r"models: nuslerp needs exactly 2 models, got 3"),
    ("nuslerp", [{"weight": 1.0}, {}], {}, r"weight: missing; required by nuslerp \(model 1\)"),
    ("multislerp", [{"weight": 1.0}], {"eps": -1.0}, r"eps: -1\.0 out of range \[0, inf\)"),
    ("karcher", [{}, {}], {"max_iter": 2.5}, r"max_iter: 2\.5 out of range an integer in \[0, inf\)"),
    ("karcher", [{}, {}], {"max_iter": True}, r"max_iter: True out of range"),
    ("sce", [{}], {"select_topk": 1.5}, r"select_topk: 1\.5 out of range \[0, 1\]"),
    ("ramplus_tl", [{}], {"epsilon": 0.0}, r"epsilon: 0\.0 out of range \(0, inf\)"),
    ("ram", [{"epsilon": 0.1}], {}, r"epsilon: 0\.1 is a shared parameter of ram"),
]


@pytest.mark.parametrize("name,model_params,params,message", BAD)
def test_validation_errors(name, model_params, params, message):
    with pytest.raises(ValueError, match=message):
        validate_params(name, model_params, params)


def test_integer_parameter_accepts_integral_floats():
    assert METHODS["karcher"].resolve([{}, {}], {"max_iter": 3.0})[1]["max_iter"] == 3
    assert isinstance(METHODS["karcher"].resolve([{}, {}], {"max_iter": 3})[1]["max_iter"], int)


# ------------------------------------------------------------------------------------------------
# Through a recipe: a VLM's language model and the Japanese base, English base as base model


RECIPES = {
    "nuslerp": ({"weight": 0.4}, {}, True),
    "multislerp": ({"weight": 0.5}, {}, True),
    "karcher": ({}, {"max_iter": 4}, False),
    "sce": ({}, {"select_topk": 0.5}, True),
    "arcee_fusion": ({}, {}, True),
    "nearswap": ({}, {"t": 0.01}, True),
    "ram": ({}, {"epsilon": 0.001}, True),
    "ramplus_tl": ({}, {"epsilon": 0.001}, True),
}


@pytest.mark.parametrize("name", NEW)
def test_recipe_merges_with_the_method(zoo, tmp_path, name):
    vlm, en, ja = zoo.vlms["llava-hf-llama"], zoo.llms["en-llama"], zoo.llms["ja-llama"]
    per_model, params, with_base = RECIPES[name]
    one = METHODS[name].max_models == 1
    models = [{"model": str(ja), "parameters": dict(per_model)}]
    if not one:
        models.insert(0, {"model": "vlm", "parameters": dict(per_model)})
    data = {"merge_method": name, "vlm": str(vlm), "models": models, "parameters": params,
            "tokenizer_source": str(ja), "seed": 3, "dtype": "float32"}  # fmt: skip
    if with_base:
        data["base_model"] = str(en)
    out = merge(data, tmp_path / "out", progress=False)
    canon = "model.layers.1.mlp.down_proj.weight"
    key = "language_model." + canon
    r_v, r_e, r_j, r_o = (CheckpointReader(p) for p in (vlm, en, ja, out))
    inputs = ([] if one else [r_v.get(key)]) + [r_j.get(canon)]
    mp = [dict(per_model) for _ in inputs]
    seed = tensor_seed(3, canon) if METHODS[name].random else None
    ref = METHODS[name].merge(r_e.get(canon) if with_base else None, inputs, mp, params, seed=seed)
    assert torch.equal(r_o.get(key), ref), name
    if METHODS[name].optional_base:  # the base model gives task vectors, it is not a third model
        no_base = METHODS[name].merge(None, inputs, mp, params)
        assert not torch.equal(ref, no_base)
