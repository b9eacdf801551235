"""Every merge method on a GPU against the same method on the CPU: same values, and how much faster.

``python -m bench.methods_device --device cuda``

Inputs: a base and 3 models, bf16, `--rows` x 4096 (random, std 0.02; models = base + noise 0.002),
one parameter set per method (weights 0.6/0.3/0.9, density 0.5, t 0.3...), seed 7 for the random
methods (their masks are drawn on the CPU generator wherever the merge runs, so they are the same).
Per method: the largest |GPU - CPU| difference of the float32 results (in units of the largest |CPU|
value), whether the bf16-rounded results are identical, and median wall times (3 runs after one warm-up)
on each device. Results: ``bench/results/methods-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vlm_merge.methods import METHODS, tensor_seed

RESULTS = Path(__file__).resolve().parent / "results"
PARAMS: dict[str, tuple[list[dict], dict]] = {
    "task_arithmetic": ([{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.9}], {}),
    "linear": ([{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.9}], {}),
    "ties": ([{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.7}], {}),
    "dare_ties": ([{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.7}], {}),
    "dare_linear": ([{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.5}, {"weight": 0.9, "density": 0.7}], {}),
    "breadcrumbs": ([{"weight": 0.6, "density": 0.8, "gamma": 0.01}] * 3, {}),
    "breadcrumbs_ties": ([{"weight": 0.6, "density": 0.8, "gamma": 0.01}] * 3, {}),
    "della": ([{"weight": 0.6, "density": 0.5, "epsilon": 0.1}] * 3, {}),
    "della_linear": ([{"weight": 0.6, "density": 0.5, "epsilon": 0.1}] * 3, {}),
    "slerp": ([{}, {}], {"t": 0.3}),
    "model_stock": ([{}, {}, {}], {}),
    "nuslerp": ([{"weight": 0.4}, {"weight": 0.6}], {}),
    "multislerp": ([{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    "karcher": ([{}, {}, {}], {}),
    "sce": ([{}, {}, {}], {"select_topk": 0.5}),
    "arcee_fusion": ([{}], {}),
    "nearswap": ([{}], {"t": 0.001}),
    "ram": ([{}, {}, {}], {"epsilon": 0.001}),
    "ramplus_tl": ([{}, {}, {}], {"epsilon": 0.001}),
}


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = fn()
    times = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def merge_on(method, base, models, per_model, shared, seed, device: torch.device):
    """`method` over the inputs moved to `device`, as a call without arguments."""
    b, ms = base.to(device), [x.to(device) for x in models]
    return lambda: method.merge(b if method.uses_base else None, ms, per_model, shared, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=4096)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, 4096, generator=gen) * 0.02
    models = [(base + 0.002 * torch.randn(base.shape, generator=gen)).bfloat16() for _ in range(3)]
    base = base.bfloat16()
    rows = []
    for name, (per_model, shared) in PARAMS.items():
        m = METHODS[name]
        n = len(per_model)
        seed = tensor_seed(7, "model.layers.0.mlp.up_proj.weight") if m.random else None

        cpu_s, cpu = timed(merge_on(m, base, models[:n], per_model, shared, seed, torch.device("cpu")), torch.device("cpu"))
        dev_s, got = timed(merge_on(m, base, models[:n], per_model, shared, seed, dev), dev)
        got = got.cpu()
        scale = float(cpu.abs().max()) or 1.0
        rows.append({
            "method": name, "max_abs_diff_rel": float((got - cpu).abs().max()) / scale,
            "bf16_identical": bool(torch.equal(got.bfloat16(), cpu.bfloat16())),
            "bf16_differing_fraction": float((got.bfloat16() != cpu.bfloat16()).float().mean()),
            "cpu_s": cpu_s, "device_s": dev_s, "speedup": cpu_s / dev_s,
        })  # fmt: skip
    facts = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
             "shape": [args.rows, 4096], "command": "python -m bench.methods_device " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"methods-{dev.type}.json").write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")
    md = [f"# Merge methods on {facts['device']} vs the CPU\n", f"`{facts['command']}` ({args.rows}x4096, bf16 inputs, torch {torch.__version__})\n",
          "| method | max abs diff / max abs | bf16 identical | bf16 differing | CPU | device | speed-up |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['method']} | {r['max_abs_diff_rel']:.1e} | {r['bf16_identical']} | {r['bf16_differing_fraction']:.1e} | "
                  f"{r['cpu_s'] * 1e3:.1f} ms | {r['device_s'] * 1e3:.2f} ms | {r['speedup']:.0f}x |")  # fmt: skip
    text = "\n".join(md) + "\n"
    (RESULTS / f"methods-{dev.type}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
