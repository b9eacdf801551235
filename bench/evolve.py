"""Per-candidate cost of an evolutionary merge: resident in-place merging vs writing and reloading.

``python -m bench.evolve`` (CPU; seconds) on the miniature zoo: the shipped `assets/miniature-zoo` (its trained
en-vlm, en-base and ja-base; `--zoo DIR` for another zoo built by `vlm-merge zoo build`, `--zoo fixture` for the
random-weight test fixtures: llava-hf-llama + en/ja llama).

Contenders, for the same sequence of candidate recipes (task_arithmetic in the Chat Vector form, one random
weight per decoder layer plus one for the embeddings, the shape `vlm-merge evolve` searches), ``--rounds``
rounds in alternating order, medians reported:

- ``resident``: `ResidentMerger.apply(recipe)`: sources already in memory, the merged language model
  written into the one live model in place (what `vlm-merge evolve` does per candidate).
- ``on-disk``: `vlm_merge.engine.merge.merge(recipe, DIR)` then `eval.model_loading.load_model(DIR)`:
  mergekit-evolve's on-disk mode (write the merged model, load it back) with our own fast merge.

Correctness: after each round the resident model's state dict must equal the reloaded one bit for
bit. Results: ``bench/results/evolve.json`` and ``.md``.

``python -m bench.evolve --device cuda`` (GPU, a LLaVA-1.6-Mistral-7B-shaped model, random bf16 weights;
`--layers 32`): the per-candidate in-place merge against the bound set by reading the sources' bytes
from GPU memory once. Sources (written once as ordinary checkpoints, under /dev/shm when it has room):
the VLM as transformers saves it, an English base = its language model + noise (std 0.002), a
Japanese base = the English base + noise; the live model is the VLM itself on the GPU. Recipe: the
Chat Vector form of task_arithmetic (anchor = Japanese base) with one random weight per layer plus
one for the embeddings, `--rounds` candidates after a warm-up (Triton compile), medians reported:

- ``fused``: `ResidentMerger.apply` with the fused kernel (`vlm_merge.engine.fused`), wall time of the whole
  call (parameter resolution in Python + one launch + the NaN/inf check) and the kernel alone (CUDA
  events).
- ``tensor-by-tensor``: the same `apply` with the fused path off (torch ops per tensor on the GPU).
- ``bound``: reading every packed source byte once: the faster of a Triton read-and-sum kernel with
  the fused kernel's access pattern and `torch.sum`, best of 10.

Correctness: the fused result must equal the tensor-by-tensor one bit for bit over the whole language
model, and sampled tensors must equal the CPU engine's float32 `methods.task_arithmetic` rounded to
bf16. Results: ``bench/results/evolve-cuda.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import MachineFacts, write_results
from eval.model_loading import load_model
from vlm_merge.testing import build_fixture_zoo
from vlm_merge.engine.merge import merge
from vlm_merge.engine.resident import ResidentMerger, write_scaffold
from vlm_merge.world import shipped_zoo

RESULTS = Path(__file__).parent / "results"


def sources(zoo: str, work: Path) -> tuple[dict, str]:
    """The recipe's sources (vlm, base_model, target) and what they are, for `--zoo` ("fixture": built in `work`)."""
    if zoo == "fixture":
        fx = build_fixture_zoo(work / "zoo", seed=0)
        paths = {"vlm": fx.vlms["llava-hf-llama"], "base_model": fx.llms["en-llama"], "target": fx.llms["ja-llama"]}
        return {k: str(v) for k, v in paths.items()}, "the tiny random-weight fixture LLaVA-1.5 (CPU float32)"
    root = shipped_zoo() if zoo == "shipped" else Path(zoo)
    paths = {"vlm": root / "en-vlm", "base_model": root / "en-base", "target": root / "ja-base"}
    missing = [str(p) for p in paths.values() if not (p / "config.json").exists()]
    if missing:
        print(f"--zoo {zoo}: no model at {missing[0]}; pass a zoo built by `vlm-merge zoo build`", file=sys.stderr)
        raise SystemExit(2)
    name = "the shipped miniature zoo (assets/miniature-zoo" if zoo == "shipped" else f"the miniature zoo {root} ("
    return {k: str(v) for k, v in paths.items()}, f"{name}: trained en-vlm, en-base, ja-base; CPU float32)"


def recipe(srcs: dict, weight) -> dict:
    """Chat Vector's form of task_arithmetic on `srcs` with the VLM's delta weighted by `weight`."""
    return {"merge_method": "task_arithmetic", **srcs, "models": [{"model": "vlm", "parameters": {"weight": weight}}]}


def recipes(srcs: dict, layers: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [recipe(srcs, [{"filter": "embed_tokens", "value": rng.uniform(0, 1.5)},
                          {"value": [rng.uniform(0, 1.5) for _ in range(layers)]}]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (the miniature zoo, resident vs on-disk) or cuda (7B-shaped, fused vs bound)")
    ap.add_argument("--zoo", default="shipped", help="--device cpu: 'shipped' (assets/miniature-zoo), a zoo directory, or 'fixture'")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model (--device cuda)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        from bench.evolve_cuda import run_cuda

        return run_cuda(args, RESULTS, "python -m bench.evolve " + " ".join(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-evolve-"))
    try:
        srcs, what = sources(args.zoo, work)
        write_scaffold(recipe(srcs, 0.5), work / "scaffold")  # a scaffold does not depend on the weights
        live, _ = load_model(work / "scaffold", device="cpu")
        cands = recipes(srcs, live.config.text_config.num_hidden_layers, args.rounds, args.seed)
        t = time.perf_counter()
        rm = ResidentMerger.open(cands[0], live)
        load_s = time.perf_counter() - t
        rm.apply(cands[0])  # warm-up (allocator, first-call costs) for both contenders
        merge(cands[0], work / "warm", progress=False)
        load_model(work / "warm", device="cpu")
        resident, disk = [], []
        for i, r in enumerate(cands):
            order = ("resident", "disk") if i % 2 == 0 else ("disk", "resident")
            loaded = None
            for who in order:
                if who == "resident":
                    t = time.perf_counter()
                    rm.apply(r)
                    resident.append(time.perf_counter() - t)
                else:
                    d = work / f"cand-{i}"
                    t = time.perf_counter()
                    merge(r, d, progress=False)
                    loaded, _ = load_model(d, device="cpu")
                    disk.append(time.perf_counter() - t)
                    shutil.rmtree(d)
            got, want = live.state_dict(), loaded.state_dict()
            if any(not torch.equal(got[k], want[k]) for k in want):
                raise SystemExit(f"round {i}: the resident model differs from the written and reloaded one")
        res_med, disk_med = statistics.median(resident), statistics.median(disk)
        result = {
            "what": f"per-candidate merge + load of the merged language model, {what}",
            "rounds": args.rounds, "threads": args.threads,
            "resident_s_median": res_med, "on_disk_s_median": disk_med, "ratio": disk_med / res_med,
            "resident_sources_load_s_once": load_s, "resident_source_bytes": rm.source_bytes,
            "bit_identical": True, "machine": MachineFacts.collect().as_dict(),
            "command": "python -m bench.evolve " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        md = (f"# Evolve: per-candidate merge + load\n\n{result['what']}, {args.rounds} rounds, medians.\n\n"
              f"| contender | seconds per candidate |\n|---|---|\n| resident (in place) | {res_med * 1e3:.2f} ms |\n"
              f"| on-disk (merge to dir + load_model) | {disk_med * 1e3:.1f} ms |\n\n"
              f"**ratio: {disk_med / res_med:.0f}x** (resident models bit-identical to the reloaded ones in every round)\n")
        write_results(RESULTS, "evolve", result, md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
