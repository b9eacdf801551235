"""`python -m bench.evolve --device cuda`: resident in-place merging of a 7B-shaped VLM on a GPU against
the bound of reading the sources once (see bench/evolve.py's docstring for the protocol)."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import MachineFacts, ShardedWriter
from bench.generation import mistral_7b_shaped
from vlm_merge.engine.resident import ResidentMerger

NOISE_STD = 0.002
TARGET = 2.0  # fused merge time per candidate <= 2x the read bound


def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_sum(x_ptr, out_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + pid, tl.sum(tl.load(x_ptr + offs).to(tl.float32), axis=0))

    return read_sum


def cuda_time(fn, repeat: int) -> list[float]:
    """Seconds per call by CUDA events, each call timed on its own."""
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return times


def read_bound(buffers: list[torch.Tensor], block: int) -> dict[str, float]:
    """Seconds to read every byte of `buffers` once: a Triton read-and-sum kernel and torch.sum."""
    kernel = _read_kernel()
    partial = [torch.empty(b.numel() // block, dtype=torch.float32, device=b.device) for b in buffers]

    def triton_read():
        for b, p in zip(buffers, partial):
            kernel[(p.numel(),)](b, p, BLOCK=block, num_warps=8)

    def torch_read():
        for b in buffers:
            b.sum(dtype=torch.float32)

    out = {}
    for name, fn in (("triton_read_s", triton_read), ("torch_sum_s", torch_read)):
        cuda_time(fn, 2)
        out[name] = min(cuda_time(fn, 10))
    return out


def write_sources(model, processor, root: Path) -> dict[str, Path]:
    """The VLM as transformers saves it, and two language-model-only checkpoints: English base = the
    VLM's language model + noise, Japanese base = English base + noise (bf16, 4 GB shards)."""
    paths = {"vlm": root / "vlm", "en": root / "en_base", "ja": root / "ja_base"}
    model.save_pretrained(paths["vlm"], max_shard_size="4GB")
    processor.save_pretrained(paths["vlm"])
    text = model.config.text_config
    text.architectures = ["MistralForCausalLM"]
    writers = {}
    for name in ("en", "ja"):
        text.save_pretrained(paths[name])
        processor.tokenizer.save_pretrained(paths[name])
        writers[name] = ShardedWriter(paths[name], 4 * 10**9)
    gen = torch.Generator(device=model.device).manual_seed(0)
    items = [(f"model.{k}", p) for k, p in model.get_decoder().named_parameters()]
    items.append(("lm_head.weight", model.get_output_embeddings().weight))
    with torch.no_grad():
        for key, p in items:
            en = (p.float() + NOISE_STD * torch.randn(p.shape, generator=gen, device=p.device)).to(p.dtype)
            ja = (en.float() + NOISE_STD * torch.randn(p.shape, generator=gen, device=p.device)).to(p.dtype)
            writers["en"].add(key, en.cpu())
            writers["ja"].add(key, ja.cpu())
    for w in writers.values():
        w.close()
    return paths


def candidates(paths: dict[str, Path], layers: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    base = {"merge_method": "task_arithmetic", "vlm": str(paths["vlm"]), "base_model": str(paths["en"]),
            "target": str(paths["ja"]), "dtype": "bfloat16"}  # fmt: skip
    out = []
    for _ in range(n):
        weight = [{"filter": "embed_tokens", "value": rng.uniform(0, 1.5)}, {"value": [rng.uniform(0, 1.5) for _ in range(layers)]}]
        out.append({**base, "models": [{"model": "vlm", "parameters": {"weight": weight}}]})
    return out


def workspace(need_bytes: int) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * need_bytes:
        return Path(tempfile.mkdtemp(prefix="bench-evolve-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="bench-evolve-"))


def cpu_reference_check(rm: ResidentMerger, recipe: dict, canon_keys: list[str]) -> dict[str, bool]:
    """Sampled tensors against the CPU engine's float32 task arithmetic rounded to bf16."""
    state = rm.state()
    return {k: bool(torch.equal(rm.reference(recipe, k), state[k].detach().cpu())) for k in canon_keys}


def run_cuda(args: argparse.Namespace, results: Path, command: str) -> int:
    import triton

    from vlm_merge.engine.fused import BLOCK

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    model, processor, what = mistral_7b_shaped(args.device, args.layers, dtype=torch.bfloat16)
    lm_bytes = sum(p.numel() * p.element_size() for p in model.get_decoder().parameters())
    lm_bytes += model.get_output_embeddings().weight.numel() * 2
    work = workspace(3 * lm_bytes + 2 * 10**9)
    try:
        paths = write_sources(model, processor, work)
        sources_s = time.perf_counter() - t0
        cands = candidates(paths, args.layers, args.rounds + 1, args.seed)
        torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        rm = ResidentMerger.open(cands[0], model, fused=True)
        open_s = time.perf_counter() - t
        fz = rm.fused
        assert fz is not None
        t = time.perf_counter()
        rm.apply(cands[0])  # Triton compiles here
        first_s = time.perf_counter() - t
        fused_wall, kernel = [], []
        for c in cands[1:]:
            fused_wall.append(rm.apply(c).seconds)
        resolve_s = []
        for c in cands[1:]:
            t = time.perf_counter()
            weights = rm.fused_weights(rm.resolve(c))
            resolve_s.append(time.perf_counter() - t)
        kernel = cuda_time(lambda: fz.launch(weights), args.rounds)
        rm.apply(cands[-1])
        peak = torch.cuda.max_memory_allocated(dev)
        fused_out = fz.out.clone()
        sampled = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
                   "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]  # fmt: skip
        vs_cpu = cpu_reference_check(rm, cands[-1], sampled)
        rm.fused = None  # the same sources, tensor by tensor
        eager = [rm.apply(c).seconds for c in cands[-3:]]
        differing = int((fz.out != fused_out).sum())
        rm.fused = fz
        del fused_out
        bound = read_bound(fz.source_buffers, BLOCK)
        bound_s = min(bound.values())
        src = fz.source_bytes
        med_wall, med_kernel, med_eager = statistics.median(fused_wall), statistics.median(kernel), statistics.median(eager)
        result = {
            "what": what, "command": command, "rounds": args.rounds, "gpu": torch.cuda.get_device_name(dev),
            "triton": triton.__version__, "machine": MachineFacts.collect().as_dict(),
            "language_model_bytes": lm_bytes, "source_bytes_read_per_candidate": src, "tensors": len(rm.tensors),
            "write_sources_s": sources_s, "open_s": open_s, "first_apply_s_incl_compile": first_s,
            "fused_apply_s_median": med_wall, "fused_apply_s_all": fused_wall,
            "fused_kernel_s_median": med_kernel, "fused_kernel_s_all": kernel,
            "resolve_s_median": statistics.median(resolve_s),
            "tensor_by_tensor_apply_s_median": med_eager, "tensor_by_tensor_apply_s_all": eager,
            "bound": bound, "bound_s": bound_s, "read_bandwidth_tb_s": src / bound_s / 1e12,
            "ratio_apply_to_bound": med_wall / bound_s, "ratio_kernel_to_bound": med_kernel / bound_s,
            "ratio_tensor_by_tensor_to_bound": med_eager / bound_s, "target_ratio": TARGET,
            "fused_vs_tensor_by_tensor_differing_elements": differing, "sampled_tensors_equal_cpu_engine": vs_cpu,
            "peak_gpu_memory_bytes": peak,
        }
        results.mkdir(exist_ok=True)
        (results / "evolve-cuda.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        ok = "PASS" if med_wall / bound_s <= TARGET else "FAIL"
        md = (
            f"# Evolve on a GPU: in-place merge per candidate vs reading the sources once\n\n`{command}`\n\n"
            f"{what}; {result['gpu']}, torch {torch.__version__}, Triton {triton.__version__}. Chat Vector form of "
            f"task_arithmetic (3 sources, {src / 1e9:.1f} GB read per candidate, {len(rm.tensors)} tensors), "
            f"{args.rounds} candidates, medians.\n\n"
            "| | seconds per candidate | x read bound |\n|---|---|---|\n"
            f"| read bound (every source byte once; Triton {bound['triton_read_s'] * 1e3:.1f} ms, torch.sum "
            f"{bound['torch_sum_s'] * 1e3:.1f} ms) | {bound_s * 1e3:.1f} ms ({src / bound_s / 1e12:.2f} TB/s) | 1.00 |\n"
            f"| fused kernel alone (CUDA events) | {med_kernel * 1e3:.1f} ms | {med_kernel / bound_s:.2f} |\n"
            f"| parameter resolution alone (Python, `resolve` + `fused_weights`) | {result['resolve_s_median'] * 1e3:.1f} ms | |\n"
            f"| **fused `ResidentMerger.apply`** (resolve + launch + NaN check) | **{med_wall * 1e3:.1f} ms** | "
            f"**{med_wall / bound_s:.2f}** |\n"
            f"| tensor by tensor (torch ops on the GPU) | {med_eager * 1e3:.1f} ms | {med_eager / bound_s:.2f} |\n\n"
            f"{ok}: fused apply {med_wall / bound_s:.2f}x the read bound (target <= {TARGET}x). Fused vs tensor by tensor: "
            f"{differing} differing elements over the whole language model; sampled tensors equal to the CPU engine: "
            f"{sum(vs_cpu.values())}/{len(vs_cpu)}. Sources loaded onto the GPU and packed in {open_s:.1f} s; peak GPU "
            f"memory {peak / 2**30:.1f} GiB.\n"
        )  # fmt: skip
        (results / "evolve-cuda.md").write_text(md)
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
