"""Shared pieces of the benchmarks: checkpoint shapes, sharded safetensors I/O,
key layouts, machine facts and child-process measurement.

Peak RSS of a contender is the child's ``ru_maxrss`` as returned by
``os.wait4`` in the :mod:`bench.measure` trampoline (Linux reports KiB; it
includes reaped grandchildren and file-backed pages the child had mapped, e.g.
mmapped safetensors shards). Wall time is ``time.perf_counter`` around
spawn..reap, so interpreter start-up and imports count, exactly as they do for
a user running the command.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_merge.architecture.layouts import HF_LM, hf_key

INDEX_NAME = "model.safetensors.index.json"
GiB = 1024**3


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaShape:
    """Shape parameters of the synthetic Llama (TinyLlama-1.1B-like by default)."""

    layers: int = 22
    hidden: int = 2048
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """LlamaForCausalLM state-dict keys and shapes, in state-dict (module) order."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        shapes |= {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}
        return shapes

    def n_params(self) -> int:
        return sum(_numel(s) for s in self.tensor_shapes().values())


@dataclass(frozen=True)
class ClipShape:
    """A CLIP vision tower (tiny by default: only its presence and pass-through matter)."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    heads: int = 2
    image: int = 32
    patch: int = 8

    def tensor_shapes(self, text_hidden: int) -> dict[str, tuple[int, ...]]:
        """llava-hf (transformers 4.x) keys for the vision tower and projector, in state-dict order."""
        h, n_pos = self.hidden, (self.image // self.patch) ** 2 + 1
        v = "vision_tower.vision_model."
        shapes: dict[str, tuple[int, ...]] = {
            v + "embeddings.class_embedding": (h,),
            v + "embeddings.patch_embedding.weight": (h, 3, self.patch, self.patch),
            v + "embeddings.position_embedding.weight": (n_pos, h),
            v + "pre_layrnorm.weight": (h,),
            v + "pre_layrnorm.bias": (h,),
        }
        for n in range(self.layers):
            p = f"{v}encoder.layers.{n}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes |= {p + f"self_attn.{proj}.weight": (h, h), p + f"self_attn.{proj}.bias": (h,)}
            shapes |= {
                p + "layer_norm1.weight": (h,),
                p + "layer_norm1.bias": (h,),
                p + "mlp.fc1.weight": (self.intermediate, h),
                p + "mlp.fc1.bias": (self.intermediate,),
                p + "mlp.fc2.weight": (h, self.intermediate),
                p + "mlp.fc2.bias": (h,),
                p + "layer_norm2.weight": (h,),
                p + "layer_norm2.bias": (h,),
            }
        shapes |= {v + "post_layernorm.weight": (h,), v + "post_layernorm.bias": (h,)}
        shapes |= {
            "multi_modal_projector.linear_1.weight": (text_hidden, h),
            "multi_modal_projector.linear_1.bias": (text_hidden,),
            "multi_modal_projector.linear_2.weight": (text_hidden, text_hidden),
            "multi_modal_projector.linear_2.bias": (text_hidden,),
        }
        return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- key layouts


def canonical_key(key: str) -> tuple[str, str]:
    """Map a checkpoint key to (part, canonical key), part in {"lm", "vision"}.

    The key's llava-hf (transformers 4.x) name from the layout table
    (:func:`vlm_merge.architecture.layouts.hf_key`: LLM, llava-hf 4.x, 4.52 and
    transformers 5 module names alike); canonical LM keys are LlamaForCausalLM
    keys, canonical vision keys are 4.x llava keys.
    """
    hf = hf_key(key)
    return ("lm", hf.removeprefix(HF_LM)) if hf.startswith(HF_LM) else ("vision", hf)


def vlm_key(llama_key: str) -> str:
    """The transformers-4.x llava-hf key of a LlamaForCausalLM key."""
    return HF_LM + llama_key


# --------------------------------------------------------------------------- sharded safetensors


@dataclass
class ShardedWriter:
    """Accumulates tensors and writes ``model-0000k.safetensors`` shards of at
    most ``shard_bytes`` each (plain ``save_file`` per shard), then the index.

    Shards are first written as ``model-{k}.safetensors`` and renamed to the
    ``-of-N`` convention in :meth:`close` once N is known.
    """

    out_dir: Path
    shard_bytes: int
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list[list[str]] = field(default_factory=list)
    _total: int = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self.flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def flush(self) -> None:
        if not self._pending:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self._pending, str(self.out_dir / f"model-{len(self._shards) + 1}.safetensors"), self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for k, keys in enumerate(self._shards, start=1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"model-{k}.safetensors").rename(self.out_dir / name)
            weight_map |= dict.fromkeys(keys, name)
            files.append(self.out_dir / name)
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or single)."""
    index = model_dir / INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def weight_map(model_dir: Path) -> dict[str, Path]:
    """key -> shard path for a checkpoint directory."""
    index = model_dir / INDEX_NAME
    if index.exists():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in shard_files(model_dir):
        with safe_open(str(f), "pt") as fh:
            out |= dict.fromkeys(fh.keys(), f)
    return out


def load_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor(key)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def warm_page_cache(dirs: Iterable[Path], chunk: int = 64 * 2**20) -> int:
    """Read every file under ``dirs`` once (so all contenders start warm)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                with f.open("rb", buffering=0) as fh:
                    while n := fh.readinto(view):
                        total += n
    return total


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class ChildResult:
    """One measured child process."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    log: Path
    cpu_s: float = 0.0  # the child's user+system CPU time (with reaped grandchildren)
    others_cpu_s: float = 0.0  # CPU the rest of the machine used meanwhile

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def others_load(self, nproc: int) -> float:
        """Fraction of the machine's CPU capacity used by others during the run."""
        return self.others_cpu_s / (self.wall_s * nproc) if self.wall_s and nproc else 0.0

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def run_measured(cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` through the :mod:`bench.measure` trampoline, stdout+stderr to ``log``.

    The trampoline (a fresh, stdlib-only interpreter) times spawn..reap and reads
    ``ru_maxrss`` from ``os.wait4``, so the benchmark's own memory never leaks
    into the contender's peak RSS.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    with log.open("w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        subprocess.run(
            [sys.executable, "-m", "bench.measure", str(result), "--", *cmd],
            stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False,
        )
    if not result.exists():
        return ChildResult(127, 0.0, 0, log)
    data = json.loads(result.read_text())
    return ChildResult(
        returncode=int(data["returncode"]),
        wall_s=float(data["wall_s"]),
        peak_rss_bytes=int(data["peak_rss_bytes"]),
        log=log,
        cpu_s=float(data["cpu_s"]),
        others_cpu_s=max(0.0, float(data["machine_busy_s"]) - float(data["cpu_s"])),
    )


# --------------------------------------------------------------------------- machine facts


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class MachineFacts:
    nproc: int
    ram_total_gib: float
    cpu: str
    kernel: str
    python: str
    torch: str
    torch_threads: int
    transformers: str
    safetensors: str

    @classmethod
    def collect(cls) -> MachineFacts:
        return cls(
            nproc=os.cpu_count() or 0,
            ram_total_gib=round(_meminfo_total() / GiB, 1),
            cpu=_cpu_model(),
            kernel=platform.release(),
            python=platform.python_version(),
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            transformers=_version("transformers"),
            safetensors=_version("safetensors"),
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def iter_progress(items: list[str], label: str) -> Iterator[str]:
    """tqdm over ``items`` when available (it is a project dependency)."""
    from tqdm import tqdm

    yield from tqdm(items, desc=label, unit="tensor", leave=False, mininterval=1.0)


def write_results(results_dir: Path, name: str, data: dict, markdown: str) -> None:
    """A benchmark's record: `name`.json (`data`) and `name`.md (`markdown`, also printed) under `results_dir`."""
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (results_dir / f"{name}.md").write_text(markdown)
    print(markdown)
