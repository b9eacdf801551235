"""The registry: every merge method by its mergekit name, with its parameters, ranges, defaults and
input contract (`METHODS`), and `validate_params`.

The generalized-task-arithmetic variants are rows over one function (`gta.generalized_task_arithmetic`),
as in mergekit's registry.py: each row names its sparsification, whether signs are elected, and
its defaults. The formula of each row is its `doc`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from vlm_merge.methods.arithmetic import linear
from vlm_merge.methods.base import REQUIRED, Method, ModelCheck, Param
from vlm_merge.methods.gta import generalized_task_arithmetic
from vlm_merge.methods.sparsification import RANDOM_SPARSIFICATIONS, Sparsification
from vlm_merge.methods.selective import arcee_fusion, nearswap, ram, ramplus_tl, sce
from vlm_merge.methods.spherical import slerp_models, karcher, multislerp, nuslerp, slerp
from vlm_merge.methods.stock import model_stock


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


def _gta(
    name: str,
    sparsification: Sparsification | None,
    *,
    ties: bool = False,
    normalize: bool = False,
    extra: tuple[Param, ...] = (),
    checks: tuple[ModelCheck, ...] = (),
    doc: str,
) -> Method:
    """One generalized-task-arithmetic row: `sparsification` of each task vector (None: none),
    `ties`: TIES sign election, `normalize`: its default; random iff the sparsification is."""
    sparse = sparsification is not None
    random = sparsification in RANDOM_SPARSIFICATIONS
    params = (_WEIGHT,)
    if sparse:
        params += (_DENSITY,) + extra
    params += (_normalize(normalize, _NORM_GTA), _LAMBDA)
    if sparse:
        params += (_rescale(random),)
    params += (_INT8,)
    fn = partial(generalized_task_arithmetic, sparsification=sparsification, consensus="sum" if ties else None)
    return Method(
        name=name, fn=fn, params=params, needs_base=True, min_models=1, max_models=None, random=random,
        elementwise=not sparse, supports_anchor=True, model_checks=tuple(checks), doc=doc, delta_only=True,
    )  # fmt: skip


_TIES_TAIL = """
        s = sign(sum_i v_i) (0 -> +),  mask_i = [sign(v_i) == s]
        out = a + lambda * sum_i mask_i v_i / sum_i mask_i w_i   (normalize; denominator 0 -> 1;
              without normalize no division),   a = anchor or b"""
_LINEAR_TAIL = """
        out = a + lambda * sum_i v_i [/ sum_i w_i if normalize],   a = anchor or b"""
_DARE = """
        v_i = w_i * R(mask_i * (m_i - b)),   mask_i ~ Bernoulli(density_i) elementwise
        R: "dare" x/density_i (default, the paper's) | "l1" mergekit's L1-norm match | "none"
"""
_DELLA = """
        p_ij = density_i - eps_i + 2 eps_i * rank(|d_ij|) / (C - 1)   (rank within the row, see
               `della_keep_probs`; density +- eps must lie in (0, 1))
        v_i = w_i * R(mask_i * d_i),  mask_ij ~ Bernoulli(p_ij),  d_i = m_i - b
        R: "dare" x/p_ij (default, the paper's) | "l1" mergekit's L1-norm match | "none"
"""
_TRIM = """
        v_i = w_i * trim(m_i - b, density_i)   trim: keep the max(1, int(density*n)) largest |.|"""
_CRUMBS = """
        v_i = w_i * crumbs(m_i - b, density_i, gamma_i)
        crumbs: sorted by |.| ascending, keep positions [n_bot, n_bot + int(density*n)),
                n_bot = max(0, n - int(density*n) - int(gamma*n))  (the int(gamma*n) largest and
                the smallest are dropped)"""

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _gta("task_arithmetic", None, doc="Task arithmetic (Ilharco et al. 2023):\n\n        out = a + lambda * sum_i w_i (m_i - b) [/ sum_i w_i if normalize],   a = anchor or b"),
        _gta("ties", "magnitude", ties=True, normalize=True, doc="TIES (Yadav et al. 2023):\n" + _TRIM + _TIES_TAIL),
        _gta("dare_ties", "random", ties=True, doc="DARE (Yu et al. 2023) + TIES sign election:\n" + _DARE + _TIES_TAIL),
        _gta("dare_linear", "random", doc="DARE without sign election:\n" + _DARE + _LINEAR_TAIL),
        _gta("breadcrumbs", "magnitude_outliers", extra=(_GAMMA,), doc="Model Breadcrumbs (Davari & Belilovsky 2023):\n" + _CRUMBS + _LINEAR_TAIL),
        _gta("breadcrumbs_ties", "magnitude_outliers", ties=True, extra=(_GAMMA,), doc="Breadcrumbs + TIES sign election:\n" + _CRUMBS + _TIES_TAIL),
        _gta("della", "della_magprune", ties=True, normalize=True, extra=(_EPSILON,), checks=(_della_check,), doc="DELLA (Deep et al. 2024) + TIES sign election:\n" + _DELLA + _TIES_TAIL),
        _gta("della_linear", "della_magprune", extra=(_EPSILON,), checks=(_della_check,), doc="DELLA without sign election:\n" + _DELLA + _LINEAR_TAIL),
        Method(
            name="linear", fn=linear,
            params=(_WEIGHT, _normalize(True, "Divide by the sum of the weights.")),
            needs_base=False, min_models=1, max_models=None, random=False, elementwise=True,
            supports_anchor=False, doc=linear.__doc__,
        ),
        Method(
            name="slerp", fn=slerp_models,
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
        Method(
            name="nuslerp", fn=nuslerp,
            params=(
                Param("weight", per_model=True, arg="weights", doc="Relative weight; t = w_1 / (w_0 + w_1)."),
                Param("nuslerp_row_wise", False, kind="bool", arg="row_wise", doc="Slerp along the first dimension (with nuslerp_flatten off)."),
                Param("nuslerp_flatten", True, kind="bool", arg="flatten", doc="Slerp the whole tensor as one vector (else row by row)."),
            ),
            needs_base=False, optional_base=True, min_models=2, max_models=2, random=False, elementwise=False,
            supports_anchor=False, doc=nuslerp.__doc__,
        ),
        Method(
            name="multislerp", fn=multislerp,
            params=(
                Param("weight", per_model=True, arg="weights", doc="Barycentric weight of the model."),
                Param("normalize_weights", True, kind="bool", arg="normalize_weights", doc="Divide the weights by their sum."),
                Param("eps", 1e-8, 0.0, None, arg="eps", doc="Added to norms before dividing by them."),
            ),
            needs_base=False, optional_base=True, min_models=1, max_models=None, random=False, elementwise=False,
            supports_anchor=False, doc=multislerp.__doc__,
        ),
        Method(
            name="karcher", fn=karcher,
            params=(
                Param("max_iter", 10, 0, None, kind="int", arg="max_iter", doc="Most fixed-point iterations."),
                Param("tol", 1e-5, 0.0, None, arg="tol", doc="Norms and angles below it count as zero; stop when the step is below it."),
            ),
            needs_base=False, min_models=1, max_models=None, random=False, elementwise=False,
            supports_anchor=False, doc=karcher.__doc__,
        ),
        Method(
            name="sce", fn=sce,
            params=(
                Param("select_topk", 1.0, 0.0, 1.0, arg="select_topk", doc="Fraction of elements kept, by variance across models."),
                _INT8,
            ),
            needs_base=True, min_models=1, max_models=None, random=False, elementwise=False,
            supports_anchor=False, doc=sce.__doc__, delta_only=True,
        ),
        Method(
            name="arcee_fusion", fn=arcee_fusion, params=(),
            needs_base=True, min_models=1, max_models=1, random=True, elementwise=False,
            supports_anchor=False, doc=arcee_fusion.__doc__, delta_only=True,
        ),
        Method(
            name="nearswap", fn=nearswap,
            params=(Param("t", REQUIRED, 0.0, None, arg="t", doc="Distance scale: w = clamp(t / |base - model|, 0, 1)."),),
            needs_base=True, min_models=1, max_models=1, random=False, elementwise=True,
            supports_anchor=False, doc=nearswap.__doc__,
        ),
        Method(
            name="ram", fn=ram,
            params=(Param("epsilon", 1e-5, 0.0, None, arg="epsilon", doc="Task-vector entries with |d| <= epsilon count as unchanged."),),
            needs_base=True, min_models=1, max_models=None, random=False, elementwise=True,
            supports_anchor=False, doc=ram.__doc__, delta_only=True,
        ),
        Method(
            name="ramplus_tl", fn=ramplus_tl,
            params=(
                Param("r", 0.1, 0.0, None, arg="r", doc="Amplification of unique changes per unit of rho."),
                Param("alpha", 0.2, 0.0, None, arg="alpha", doc="Cap on rho, the shared/unique ratio."),
                Param("epsilon", 1e-5, 0.0, None, low_inclusive=False, arg="epsilon", doc="Task-vector entries with |d| <= epsilon count as unchanged; floor of the unique count."),
            ),
            needs_base=True, min_models=1, max_models=None, random=False, elementwise=False,
            supports_anchor=False, doc=ramplus_tl.__doc__, delta_only=True,
        ),
    )
}  # fmt: skip
