"""vlm_merge.methods against mergekit 0.1.5's own per-tensor functions.

    .venv/bin/python -m bench.methods_vs_mergekit [--mergekit-python bench/.venv-mergekit/bin/python]

For every method both tools share (all of mergekit's but passthrough), builds seeded random float32 tensors (2-D, 1-D, 4-D, and a
bf16-rounded set whose task vectors have many equal magnitudes, to exercise tie-breaking), saves
them, and runs mergekit in a subprocess of its own venv: `mergekit.merge_methods.merge_tensors`
(the registered method, i.e. the path mergekit-yaml takes per tensor) and `mergekit.sparsify.sparsify`
directly. Random cases seed torch's global RNG right before each mergekit call and hand the same
seed to our functions; mergekit's `torch.bernoulli` is replaced there by our sampler (u < p from
`torch.rand`, the same stream), so its algorithm is compared given identical masks. Ours run in this process via
`METHODS[name].merge` (and `sparsify`). Prints max |ours - mergekit| per case and PASS/FAIL at
float32 round-off: |diff| <= 2e-6 * max(1, max|mergekit|).

Rows marked INFO compare our defaults where they deliberately differ from mergekit (DARE/DELLA
rescale "dare" = 1/p vs mergekit's L1-norm match) and are not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlm_merge.methods import METHODS, sparsify

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MERGEKIT_PYTHON = ROOT / "bench" / ".venv-mergekit" / "bin" / "python"
REL_TOL = 2e-6

# Runs inside mergekit's venv: reads cases.json + tensors.pt, writes results.pt.
WORKER = r"""
import json, sys, torch
from mergekit.merge_methods import merge_tensors
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
_sort, _argsort, _targsort = torch.sort, torch.argsort, torch.Tensor.argsort
# Same Bernoulli draws as vlm_merge.methods.bernoulli_mask (u < p, u from torch.rand in flat order):
# mergekit's algorithm is compared given identical masks.
torch.bernoulli = lambda p, *a, generator=None, **k: (torch.rand(p.shape, generator=generator, dtype=p.dtype) < p).to(p.dtype)
def stable_sorts(on):
    # mergekit sorts with torch's default (unstable) sort; "stable" cases force stable=True so that
    # equal magnitudes are ordered by index, the documented order of vlm_merge.methods.
    if on:
        torch.sort = lambda *a, **k: _sort(*a, **{**k, "stable": True})
        torch.argsort = lambda *a, **k: _argsort(*a, **{**k, "stable": True})
        torch.Tensor.argsort = lambda self, *a, **k: _targsort(self, *a, **{**k, "stable": True})
    else:
        torch.sort, torch.argsort, torch.Tensor.argsort = _sort, _argsort, _targsort
work = sys.argv[1]
cases = json.load(open(f"{work}/cases.json"))
tensors = torch.load(f"{work}/tensors.pt")
results = {}
for c in cases:
    ts = [tensors[k] for k in c["inputs"]]
    if c["seed"] is not None:
        torch.manual_seed(c["seed"])
    stable_sorts(c.get("stable_sort", False))
    try:
        if c["kind"] == "sparsify":
            p = c["mk_params"]
            results[c["id"]] = sparsify(
                ts[0], density=p["density"], method=SparsificationMethod(p["method"]),
                gamma=p.get("gamma", 0), epsilon=p.get("epsilon", 0),
                rescale_norm=RescaleNorm.l1 if p.get("rescale") else None,
            )
        else:
            results[c["id"]] = merge_tensors(
                ts, c["mk_method"], parameters=c["mk_params"], base_index=c["mk_base_index"],
                dtype=torch.float32,
            )
    except Exception as e:
        results[c["id"]] = f"{type(e).__name__}: {e}"
torch.save(results, f"{work}/results.pt")
"""


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20240601)
    out: dict[str, torch.Tensor] = {}
    for tag, shape in [("2d", (96, 64)), ("1d", (300,)), ("4d", (8, 6, 3, 3))]:
        base = torch.randn(shape, generator=g)
        out[f"{tag}.base"] = base
        for i in range(3):
            out[f"{tag}.m{i}"] = base + 0.1 * torch.randn(shape, generator=g)
    # bf16-rounded weights: task vectors take few distinct values, so magnitudes tie a lot.
    base = torch.randn(64, 32, generator=g).bfloat16().float()
    out["ties.base"] = base
    for i in range(3):
        out[f"ties.m{i}"] = (base + 0.05 * torch.randn(64, 32, generator=g)).bfloat16().float()
    # nearly colinear pair for slerp's lerp fallback
    v = torch.randn(50, 40, generator=g)
    out["col.v0"] = v
    out["col.v1"] = 2 * v + 1e-4 * torch.randn(50, 40, generator=g)
    out["col.neg"] = -v  # antipodal to col.v0: multislerp's linear fallback
    # above arcee_fusion's 1e6-element quantile sample
    base = torch.randn(1100, 1000, generator=g)
    out["big.base"] = base
    out["big.m0"] = base + 0.1 * torch.randn(1100, 1000, generator=g)
    # above vlm_merge.methods.CHUNK (4194304 elements): karcher's norms and dots summed in 2 chunks
    for i in range(2):
        out[f"huge.m{i}"] = torch.randn(2100, 2000, generator=g)
    return out


def build_cases() -> list[dict]:
    cases: list[dict] = []

    def gta(cid, method, tag, weights, our_params, mk_params, seed=None, model_params=None, info=None):
        n = len(weights)
        mp = model_params or [{} for _ in range(n)]
        ours_mp = [dict(weight=w, **p) for w, p in zip(weights, mp)]
        mk = {"weight": list(weights), **mk_params}
        for key in {k for p in mp for k in p}:
            mk[key] = [p[key] for p in mp]
        cases.append(dict(
            id=cid, kind="merge", method=method, mk_method=method, seed=seed, info=info,
            inputs=[f"{tag}.base"] + [f"{tag}.m{i}" for i in range(n)], mk_base_index=0,
            ours_model_params=ours_mp, ours_params=our_params, mk_params=mk, ours_has_base=True,
        ))  # fmt: skip

    for tag in ("2d", "1d", "4d"):
        w3 = [0.6, -0.3, 1.1]
        d3 = [{"density": 0.5}, {"density": 0.3}, {"density": 0.8}]
        gta(f"task_arithmetic/{tag}", "task_arithmetic", tag, w3, {}, {})
        gta(f"task_arithmetic/{tag}/normalize+lambda", "task_arithmetic", tag, w3,
            {"normalize": True, "lambda": 0.7}, {"normalize": True, "lambda": 0.7})  # fmt: skip
        gta(f"ties/{tag}", "ties", tag, w3, {}, {}, model_params=d3)
        gta(f"ties/{tag}/no-normalize+l1", "ties", tag, w3, {"normalize": False, "rescale": True},
            {"normalize": False, "rescale": True}, model_params=d3)  # fmt: skip
        for m in ("breadcrumbs", "breadcrumbs_ties"):
            bc = [{"density": 0.6, "gamma": 0.05}, {"density": 0.4, "gamma": 0.1}, {"density": 0.9, "gamma": 0.2}]
            gta(f"{m}/{tag}", m, tag, w3, {}, {}, model_params=bc)
            gta(f"{m}/{tag}/normalize", m, tag, w3, {"normalize": True}, {"normalize": True}, model_params=bc)
        for m in ("dare_ties", "dare_linear"):
            gta(f"{m}/{tag}/rescale=l1", m, tag, w3, {"rescale": "l1"}, {}, seed=11, model_params=d3)
            gta(f"{m}/{tag}/rescale=none", m, tag, w3, {"rescale": False}, {"rescale": False}, seed=12, model_params=d3)
            gta(f"{m}/{tag}/default(dare) vs mergekit default", m, tag, w3, {}, {}, seed=13, model_params=d3,
                info="ours 1/p vs mergekit L1")  # fmt: skip
        for m in ("della", "della_linear"):
            de = [{"density": 0.5, "epsilon": 0.1}, {"density": 0.4, "epsilon": 0.2}, {"density": 0.7, "epsilon": 0.15}]
            gta(f"{m}/{tag}/rescale=l1", m, tag, w3, {"rescale": "l1"}, {}, seed=21, model_params=de)
            gta(f"{m}/{tag}/rescale=none", m, tag, w3, {"rescale": False}, {"rescale": False}, seed=22, model_params=de)
            gta(f"{m}/{tag}/default(dare) vs mergekit default", m, tag, w3, {}, {}, seed=23, model_params=de,
                info="ours 1/p vs mergekit L1")  # fmt: skip
        for fw in (False, True):
            cases.append(dict(
                id=f"model_stock/{tag}/filter_wise={fw}", kind="merge", method="model_stock",
                mk_method="model_stock", seed=None, info=None,
                inputs=[f"{tag}.base", f"{tag}.m0", f"{tag}.m1", f"{tag}.m2"], mk_base_index=0,
                ours_model_params=[{}, {}, {}], ours_params={"filter_wise": fw},
                mk_params={"filter_wise": fw}, ours_has_base=True,
            ))  # fmt: skip
        cases.append(dict(
            id=f"linear/{tag}", kind="merge", method="linear", mk_method="linear", seed=None, info=None,
            inputs=[f"{tag}.m0", f"{tag}.m1", f"{tag}.m2"], mk_base_index=None,
            ours_model_params=[{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}], ours_params={},
            mk_params={"weight": [0.2, 0.5, 1.3]}, ours_has_base=False,
        ))  # fmt: skip
        for t in (0.0, 0.3, 1.0):
            cases.append(dict(
                id=f"slerp/{tag}/t={t}", kind="merge", method="slerp", mk_method="slerp", seed=None,
                info=None, inputs=[f"{tag}.m0", f"{tag}.m1"], mk_base_index=0,
                ours_model_params=[{}, {}], ours_params={"t": t}, mk_params={"t": t}, ours_has_base=False,
            ))  # fmt: skip
    cases.append(dict(
        id="slerp/colinear(lerp)/t=0.4", kind="merge", method="slerp", mk_method="slerp", seed=None,
        info=None, inputs=["col.v0", "col.v1"], mk_base_index=0, ours_model_params=[{}, {}],
        ours_params={"t": 0.4}, mk_params={"t": 0.4}, ours_has_base=False,
    ))  # fmt: skip
    new_method_cases(cases)
    # ties-heavy inputs (bf16 task vectors): see tie_variants below
    first_tie_case = len(cases)
    w3 = [1.0, 0.5, 0.8]
    d3 = [{"density": 0.3}, {"density": 0.5}, {"density": 0.25}]
    gta("ties/bf16-ties", "ties", "ties", w3, {}, {}, model_params=d3)
    bc = [{"density": 0.5, "gamma": 0.1}, {"density": 0.3, "gamma": 0.2}, {"density": 0.6, "gamma": 0.05}]
    gta("breadcrumbs_ties/bf16-ties", "breadcrumbs_ties", "ties", w3, {}, {}, model_params=bc)
    de = [{"density": 0.5, "epsilon": 0.2}, {"density": 0.3, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.3}]
    gta("della/bf16-ties/rescale=l1", "della", "ties", w3, {"rescale": "l1"}, {}, seed=5, model_params=de)

    # sparsification alone, mergekit.sparsify.sparsify vs ours
    for tag in ("2d", "1d", "ties"):
        for name, p in [
            ("magnitude", {"density": 0.35}),
            ("magnitude_outliers", {"density": 0.4, "gamma": 0.1}),
            ("random", {"density": 0.3}),
            ("della_magprune", {"density": 0.45, "epsilon": 0.2}),
        ]:
            for rescale in (False, True):
                cases.append(dict(
                    id=f"sparsify/{name}/{tag}/rescale={'l1' if rescale else 'none'}", kind="sparsify",
                    method=name, seed=31 if name in ("random", "della_magprune") else None, info=None,
                    inputs=[f"{tag}.m0"], mk_params={"method": name, "rescale": rescale, **p},
                ))  # fmt: skip
    return tie_variants(cases, first_tie_case)


def new_method_cases(cases: list[dict]) -> None:
    """mergekit 0.1.5's nuslerp, multislerp, karcher, sce, arcee_fusion, nearswap, ram, ramplus_tl."""

    def case(cid, method, inputs, *, base, model_params=None, params=None, mk_params=None, seed=None):
        model_params = model_params or [{} for _ in inputs[1 if base else 0 :]]
        params = params or {}
        if mk_params is None:
            mk_params = dict(params)
            for key in {k for p in model_params for k in p}:
                mk_params[key] = [p[key] for p in model_params]
        cases.append(dict(
            id=cid, kind="merge", method=method, mk_method=method, seed=seed, info=None, inputs=inputs,
            mk_base_index=0 if base else None, ours_model_params=model_params, ours_params=params,
            mk_params=mk_params, ours_has_base=base,
        ))  # fmt: skip

    for tag in ("2d", "1d", "4d"):
        b, m = f"{tag}.base", [f"{tag}.m{i}" for i in range(3)]
        w2 = [{"weight": 0.3}, {"weight": 0.9}]
        case(f"nuslerp/{tag}/base", "nuslerp", [b, m[0], m[1]], base=True, model_params=w2)
        case(f"nuslerp/{tag}/no-base", "nuslerp", [m[0], m[1]], base=False, model_params=w2)
        case(f"nuslerp/{tag}/rows", "nuslerp", [b, m[0], m[1]], base=True, model_params=w2,
             params={"nuslerp_flatten": False})  # fmt: skip
        case(f"nuslerp/{tag}/row_wise", "nuslerp", [b, m[0], m[1]], base=True, model_params=w2,
             params={"nuslerp_flatten": False, "nuslerp_row_wise": True})  # fmt: skip
        case(f"nuslerp/{tag}/zero-weights", "nuslerp", [m[0], m[1]], base=False,
             model_params=[{"weight": 0.5}, {"weight": -0.5}])  # fmt: skip
        w3 = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]
        case(f"multislerp/{tag}/base", "multislerp", [b, *m], base=True, model_params=w3)
        case(f"multislerp/{tag}/no-base", "multislerp", m, base=False, model_params=w3)
        case(f"multislerp/{tag}/unnormalized", "multislerp", [b, *m], base=True,
             model_params=[{"weight": 0.4}, {"weight": 1.0}, {"weight": 0.3}], params={"normalize_weights": False})  # fmt: skip
        case(f"multislerp/{tag}/one-model", "multislerp", [b, m[0]], base=True, model_params=[{"weight": 0.7}])
        case(f"karcher/{tag}", "karcher", m, base=False)
        case(f"karcher/{tag}/with-base-input", "karcher", [b, m[0], m[1]], base=False)
        case(f"karcher/{tag}/max_iter=3,tol=1e-6", "karcher", m, base=False, params={"max_iter": 3, "tol": 1e-6})
        for k in (1.0, 0.5, 0.1):
            case(f"sce/{tag}/select_topk={k}", "sce", [b, *m], base=True, params={"select_topk": k})
        case(f"arcee_fusion/{tag}", "arcee_fusion", [b, m[0]], base=True, seed=41)
        for t in (0.02, 0.1, 0.5):
            case(f"nearswap/{tag}/t={t}", "nearswap", [b, m[0]], base=True, params={"t": t})
        for eps in (1e-5, 0.1):
            case(f"ram/{tag}/epsilon={eps}", "ram", [b, *m], base=True, params={"epsilon": eps})
        case(f"ramplus_tl/{tag}", "ramplus_tl", [b, *m], base=True)
        case(f"ramplus_tl/{tag}/r=0.5,alpha=0.3,epsilon=0.1", "ramplus_tl", [b, *m], base=True,
             params={"r": 0.5, "alpha": 0.3, "epsilon": 0.1})  # fmt: skip
    case("nuslerp/nearly-colinear", "nuslerp", ["col.v0", "col.v1"], base=False,
         model_params=[{"weight": 0.6}, {"weight": 0.4}])  # fmt: skip
    case("multislerp/antipodal(lerp)", "multislerp", ["col.v0", "col.neg"], base=False,
         model_params=[{"weight": 0.5}, {"weight": 0.5}])  # fmt: skip
    case("karcher/4.2M-elements(2 chunks)", "karcher", ["huge.m0", "huge.m1"], base=False)
    case("arcee_fusion/1.1M-elements(sampled quantiles)", "arcee_fusion", ["big.base", "big.m0"], base=True, seed=43)


TIE_NOTE = "equal magnitudes at the cut: mergekit's unstable torch sort vs our index order"


def tie_variants(cases: list[dict], first_tie_case: int) -> list[dict]:
    """Cases on the bf16 ("ties") inputs run twice: mergekit as is (INFO: it breaks ties at the
    cut-off in torch's unspecified unstable-sort order) and with mergekit's sorts forced stable
    (pass/fail: then its tie order is by index, which is ours)."""
    out = []
    for i, c in enumerate(cases):
        tie = i >= first_tie_case and any(k.startswith("ties.") for k in c["inputs"])
        deterministic_tie_free = c["method"] in ("random",)  # no sort involved
        if not tie or deterministic_tie_free:
            out.append(c)
            continue
        out.append({**c, "info": c["info"] or TIE_NOTE})
        out.append({**c, "id": c["id"] + " [mergekit stable sort]", "stable_sort": True})
    return out


def ours(case: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    ts = [tensors[k] for k in case["inputs"]]
    if case["kind"] == "sparsify":
        p = dict(case["mk_params"])
        method = p.pop("method")
        rescale = "l1" if p.pop("rescale") else "none"
        return sparsify(ts[0], method, p.pop("density"), rescale=rescale, generator=case["seed"], **p)
    m = METHODS[case["method"]]
    base, models = (ts[0], ts[1:]) if case["ours_has_base"] else (None, ts)
    return m.merge(base, models, case["ours_model_params"], case["ours_params"], seed=case["seed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-python", default=str(DEFAULT_MERGEKIT_PYTHON))
    args = ap.parse_args(argv)
    tensors = make_tensors()
    cases = build_cases()
    with tempfile.TemporaryDirectory(prefix="methods-vs-mergekit-") as work:
        torch.save(tensors, f"{work}/tensors.pt")
        (Path(work) / "cases.json").write_text(json.dumps(cases))
        (Path(work) / "worker.py").write_text(WORKER)
        t0 = time.perf_counter()
        done = subprocess.run([args.mergekit_python, f"{work}/worker.py", work], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
            return 2
        mk_seconds = time.perf_counter() - t0
        results = torch.load(f"{work}/results.pt")
    version = subprocess.run(
        [args.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    print(f"mergekit {version} ({args.mergekit_python}, {mk_seconds:.1f}s) vs vlm_merge.methods, torch {torch.__version__}")
    print(f"PASS: max|ours - mergekit| <= {REL_TOL:g} * max(1, max|mergekit|)\n")
    width = max(len(c["id"]) for c in cases)
    failed = 0
    per_method: dict[str, float] = {}
    for c in cases:
        ref = results[c["id"]]
        if isinstance(ref, str):
            print(f"{c['id']:<{width}}  mergekit error: {ref}  {'INFO' if c['info'] else 'FAIL'}")
            failed += not c["info"]
            continue
        mine = ours(c, tensors)
        diff = (mine - ref.float()).abs().max().item() if ref.numel() else 0.0
        tol = REL_TOL * max(1.0, ref.abs().max().item())
        if c["info"]:
            n_diff = int(((mine - ref.float()).abs() > tol).sum())
            verdict = f"INFO ({c['info']}; {n_diff}/{ref.numel()} elements differ)"
        else:
            ok = diff <= tol and mine.shape == ref.shape
            verdict = "PASS" if ok else "FAIL"
            failed += not ok
            key = ("sparsify:" + c["method"]) if c["kind"] == "sparsify" else c["method"]
            per_method[key] = max(per_method.get(key, 0.0), diff)
        print(f"{c['id']:<{width}}  max|diff| {diff:.3e}  {verdict}")
    print("\nmax |diff| per method (pass/fail rows):")
    for k, v in per_method.items():
        print(f"  {k:<30} {v:.3e}")
    n = sum(1 for c in cases if not c["info"])
    print(f"\n{n - failed}/{n} PASS, {failed} FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
