"""Spherical interpolations: slerp (two models, whole tensor), nuslerp (two models, per row or
whole tensor, optionally of task vectors), multislerp (N models, barycentric on the hypersphere)
and karcher (the weighted Karcher mean on the unit sphere)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_merge.methods import sparsification

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
        for s in range(0, n, sparsification.CHUNK):
            yield s, a[s : s + sparsification.CHUNK].to(torch.float32), b[s : s + sparsification.CHUNK].to(torch.float32)

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
        out[s : s + sparsification.CHUNK] = ca * x + cb * y
    return out.view(v0.shape)


def slerp_models(models: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """`slerp` of a list of exactly two models (the registry's calling convention)."""
    if len(models) != 2:
        raise ValueError(f"models: slerp needs exactly 2 models, got {len(models)}")
    return slerp(models[0], models[1], t)



NUSLERP_EPS = 1e-8  # mergekit nuslerp(eps=1e-8): colinear when 1 - cos^2 <= eps^2
_NUSLERP_NORM_EPS = 1e-7  # mergekit nuslerp's _normalize(eps=1e-7)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int, flatten: bool) -> torch.Tensor:
    """mergekit's `nuslerp(t, v0, v1, dim, flatten)` on float32 tensors, operation for operation
    (with `flatten`, in place in v0 and v1)."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_EPS)
    u0.mul_(v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_EPS))
    cos_theta = torch.sum(u0, dim=-1, keepdim=True).clamp(-1, 1)
    del u0
    colinear = (1 - cos_theta.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    if flatten and bool(colinear):
        result = v0.mul_(1 - t).add_(v1.mul_(t))
    elif flatten:  # v0, v1 are copies the caller owns: the same operations, in place
        result = v0.mul_(torch.sin((1 - t) * theta)).add_(v1.mul_(torch.sin(t * theta))).div_(sin_theta)
    else:
        result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        if bool(colinear.any()):
            result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP, mergekit `nuslerp`: slerp of two models (or of their task vectors) with t from weights.

        t = w_1 / (w_0 + w_1)        (t = 0.5 where |w_0 + w_1| < 1e-6)
        v_i = m_i - b with a base, else m_i
        u_i = v_i / max(|v_i|, 1e-7),  cos = clamp(<u_0, u_1>, -1, 1),  theta = acos(cos)
        s = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)
            (colinear, 1 - cos^2 <= 1e-16:  s = (1 - t) v_0 + t v_1)
        out = b + s with a base, else s

    The vectors are the whole tensor (`flatten`, the default: `nuslerp_flatten`), else the rows
    along the last dimension, or with `row_wise` (`nuslerp_row_wise`) along the first dimension.
    """
    if len(models) != 2 or len(weights) != 2:
        raise ValueError(f"models: nuslerp needs exactly 2 models, got {len(models)}")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    v0, v1 = (m.to(torch.float32, copy=True) for m in models)
    b = None
    if base is not None:
        b = base.to(torch.float32)
        v0.sub_(b)
        v1.sub_(b)
    out = _nuslerp_pair(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten)
    return out if b is None else out.add_(b)


def multislerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP, mergekit `multislerp`: barycentric interpolation of N models on the hypersphere.

        v_i = m_i - b with a base, else m_i;   w = w / sum(w) if normalize_weights (float32)
        u_i = v_i / (|v_i| + eps),   mu = sum_i w_i u_i,   mu_hat = mu / |mu|
        out = b + (sum_i w_i |v_i|) * mu_hat         (without a base: no b)
        one model: out = m_0 (the base is not applied, as in mergekit)
        |mu| < eps: two models give the linear  b + w_0 v_0 + w_1 v_1;  more raise ValueError

    mergekit also maps the u_i to the tangent space at mu_hat and back; the weighted tangent
    vectors sum to zero there (sum_i w_i (u_i - <u_i, mu_hat> mu_hat) = mu - |mu| mu_hat = 0), so that
    step changes its result only by float32 round-off, and it is left out here. The task vectors are
    recomputed per pass rather than stacked (one float32 tensor per pass beside the output).
    """
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} models but {len(weights)} weights")
    if len(models) == 1:
        return models[0].to(torch.float32, copy=True)
    b = base.to(torch.float32) if base is not None else None

    def vec(i: int) -> torch.Tensor:
        v = models[i].to(torch.float32, copy=True)
        return v.sub_(b) if b is not None else v

    w = torch.tensor(list(weights), dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms = []
    mean = torch.zeros(models[0].shape, dtype=torch.float32, device=models[0].device)
    for i in range(len(models)):
        v = vec(i)
        n = torch.linalg.vector_norm(v)
        norms.append(n)
        mean.add_(v.div_(n + eps).mul_(w[i].to(v.device)))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(models) == 2:
            out = vec(0).mul_(w[0].to(mean.device)).add_(vec(1).mul_(w[1].to(mean.device)))
            return out.add_(b) if b is not None else out
        raise ValueError(
            "weight: the weighted sum of the models' unit vectors is zero (antipodal models with "
            "balancing weights); multislerp needs other weights"
        )
    avg_norm = (torch.stack(norms) * w.to(mean.device)).sum()
    out = mean.div_(mean_norm).mul_(avg_norm)
    return out.add_(b) if b is not None else out


def karcher(models: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher mean, mergekit `karcher`: the Riemannian (Karcher) mean of the models' directions on
    the unit sphere, scaled by their mean norm (all inputs, the base model included, weight 1/N):

        a_i = 1/N,  n_i = |m_i|,  u_i = m_i / n_i  (0 where n_i = 0);  only n_i > tol take part,
                    with weights a_i / sum of theirs
        mu_0 = normalize(sum_i a_i u_i)    (u_first if that sum has norm < tol)
        repeat max_iter times:
            g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu),  cos(theta_i) = clamp(<mu, u_i>)
                (terms with theta_i < tol left out)
            stop if |g| < tol;  mu <- normalize(cos(|g|) mu + sin(|g|) g / |g|)
        out = (sum_i a_i n_i) mu      (all n_i <= tol: zeros; one model: that model)

    Memory: the unit vectors are recomputed chunk by chunk from the inputs at each pass, never held
    whole (beside the output only the tangent is a float32 tensor of the input's size). Norms and
    dot products of tensors above `sparsification.CHUNK` elements are summed chunk by chunk, which
    changes them from mergekit's by float32 round-off only.
    """
    if not models:
        raise ValueError("models: karcher needs at least 1 model")
    if len(models) == 1:
        return models[0].to(torch.float32, copy=True)
    n = models[0].numel()
    if n == 0:
        return torch.zeros(models[0].shape, dtype=torch.float32, device=models[0].device)
    flats = [m.reshape(-1) for m in models]
    step = sparsification.CHUNK
    spans = [slice(s, min(n, s + step)) for s in range(0, n, step)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        return norm_of(x, spans)

    norms = [norm(f) for f in flats]
    alphas = [1.0 / len(models)] * len(models)
    valid = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
    if not valid:
        return torch.zeros(models[0].shape, dtype=torch.float32, device=models[0].device)
    alpha_sum = sum(alphas[i] for i in valid)
    coeffs = [alphas[i] / alpha_sum for i in valid]

    def unit(k: int, sl: slice) -> torch.Tensor:
        """u_k on the span `sl`: the model's elements / its norm, recomputed from the input."""
        i = valid[k]
        return flats[i][sl].to(torch.float32).div(norms[i])

    # mergekit's operations elementwise, in place; the units are never held whole.
    mean = torch.zeros(n, dtype=torch.float32, device=models[0].device)
    for sl in spans:
        for k, a in enumerate(coeffs):
            mean[sl].add_(unit(k, sl).mul_(a))
    mean_norm = norm(mean)
    if mean_norm.item() < tol:
        for sl in spans:
            mean[sl] = unit(0, sl)
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        dots = [sum(torch.dot(mean[sl], unit(k, sl)) for sl in spans) for k in range(len(coeffs))]
        terms = []
        for k, a in enumerate(coeffs):
            dot = torch.clamp(dots[k], -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                terms.append((k, dot, a * (theta / torch.sin(theta))))
        tangent.zero_()
        for sl in spans:
            for k, dot, coef in terms:  # tangent += coef * (u - dot * mean)
                tangent[sl].add_(torch.mul(mean[sl], dot).neg_().add_(unit(k, sl)).mul_(coef))
        tangent_norm = norm(tangent)
        if tangent_norm.item() < tol:
            break
        # mean = cos(|g|) mean + sin(|g|) (g / |g|)
        mean.mul_(torch.cos(tangent_norm)).add_(tangent.div_(tangent_norm).mul_(torch.sin(tangent_norm)))
        unit_norm = norm(mean)
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    return mean.mul_(scale).view(models[0].shape)


def norm_of(flat: torch.Tensor, spans: list[slice]) -> torch.Tensor:
    """|x| in float32 of a flat tensor of any float dtype, chunk by chunk over `spans` (one span:
    `vector_norm` of its float32 copy, as mergekit computes it)."""
    if len(spans) == 1:
        return torch.linalg.vector_norm(flat.to(torch.float32))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(flat[sl].to(torch.float32)) for sl in spans]))
